//! The inode table: what each inode number stands for.
//!
//! Inodes are created lazily, the first time a name is looked up or listed,
//! and numbers are never reused, so a number means one thing for the life
//! of the mount. While the kernel remembers an inode, the same (parent,
//! name) yields it again.
//!
//! The table follows the kernel's own cache: each lookup the kernel is told
//! of is counted, and when the kernel forgets an inode (FUSE `forget`, sent
//! as it trims its dentry cache under memory pressure) the node goes, with
//! the nodes a listing of it made that nothing looked up. So walking a
//! guest filesystem of millions of files does not grow the daemon without
//! bound. Nothing in here does I/O.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::SystemTime;

use fuser::{FileAttr, FileType, INodeNo};

use crate::catalog::SnapEntry;
use crate::guest::{GuestMeta, Volume};

pub const ROOT: u64 = 1;

/// Partitions of one disk, found on first access.
pub type Volumes = Vec<(String, Arc<Volume>)>;

pub enum Kind {
    Root,
    /// `ids/`: one link per snapshot id.
    Ids,
    /// `<vm>/`
    Vm {
        vm: String,
    },
    /// `<vm>/latest`, pointing at the newest `<time>`.
    Latest {
        vm: String,
    },
    /// `ids/<id>`
    IdLink {
        snap: Arc<SnapEntry>,
    },
    /// `<vm>/<time>/`
    Snap {
        snap: Arc<SnapEntry>,
    },
    /// `<vm>/<time>/<disk>.img`
    Image {
        snap: Arc<SnapEntry>,
        disk: String,
        /// 512-byte units of data (not holes), counted on first use.
        data_blocks: OnceLock<u64>,
    },
    /// `<vm>/<time>/<disk>/`
    DiskDir {
        snap: Arc<SnapEntry>,
        disk: String,
        volumes: Mutex<Option<Arc<Volumes>>>,
    },
    /// A path inside a guest filesystem; `/` is the partition folder itself.
    Guest {
        vol: Arc<Volume>,
        path: Vec<u8>,
        meta: RwLock<Option<GuestMeta>>,
    },
}

pub struct Node {
    pub ino: u64,
    pub parent: u64,
    pub kind: Kind,
    name: Vec<u8>,
    /// Lookups the kernel was told of and has not forgotten.
    lookups: AtomicU64,
}

pub struct Tree {
    nodes: RwLock<HashMap<u64, Arc<Node>>>,
    /// parent → name → inode. Also the lock that orders `child`, `pin`
    /// and `forget`.
    children: Mutex<HashMap<u64, HashMap<Vec<u8>, u64>>>,
    next: AtomicU64,
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new()
    }
}

impl Tree {
    pub fn new() -> Tree {
        let root = Arc::new(Node {
            ino: ROOT,
            parent: ROOT,
            kind: Kind::Root,
            name: Vec::new(),
            lookups: AtomicU64::new(0),
        });
        Tree {
            nodes: RwLock::new(HashMap::from([(ROOT, root)])),
            children: Mutex::new(HashMap::new()),
            next: AtomicU64::new(ROOT + 1),
        }
    }

    pub fn get(&self, ino: u64) -> Option<Arc<Node>> {
        self.nodes.read().expect("tree lock").get(&ino).cloned()
    }

    /// Inodes in the table now.
    pub fn inode_count(&self) -> u64 {
        u64::try_from(self.nodes.read().expect("tree lock").len()).unwrap_or(u64::MAX)
    }

    /// The node for `name` in `parent`: the existing one if `same` accepts
    /// it, otherwise a new one made by `make`.
    pub fn child(
        &self,
        parent: u64,
        name: &[u8],
        same: impl Fn(&Kind) -> bool,
        make: impl FnOnce() -> Kind,
    ) -> Arc<Node> {
        let mut children = self.children.lock().expect("children lock");
        let kids = children.entry(parent).or_default();
        if let Some(n) = kids.get(name).and_then(|ino| self.get(*ino)) {
            if same(&n.kind) {
                return n;
            }
        }
        let ino = self.next.fetch_add(1, Ordering::Relaxed);
        let node = Arc::new(Node {
            ino,
            parent,
            kind: make(),
            name: name.to_vec(),
            lookups: AtomicU64::new(0),
        });
        // A replaced node (a name that now means something else) stays
        // until the kernel forgets it.
        kids.insert(name.to_vec(), ino);
        self.nodes
            .write()
            .expect("tree lock")
            .insert(ino, Arc::clone(&node));
        node
    }

    /// Count one lookup of `node` that is about to be replied to the
    /// kernel. `false` if the node left the table meanwhile (forgotten
    /// between being found and now): the caller looks it up again.
    pub fn pin(&self, node: &Node) -> bool {
        let _order = self.children.lock().expect("children lock");
        if self.get(node.ino).is_none() {
            return false;
        }
        node.lookups.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The kernel forgot `n` lookups of `ino`. At zero the node leaves the
    /// table, with the children that only a listing made.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let mut children = self.children.lock().expect("children lock");
        let Some(node) = self.get(ino) else {
            return;
        };
        let left = node.lookups.load(Ordering::Relaxed).saturating_sub(n);
        node.lookups.store(left, Ordering::Relaxed);
        if left > 0 {
            return;
        }
        let mut nodes = self.nodes.write().expect("tree lock");
        nodes.remove(&ino);
        if let Some(kids) = children.get_mut(&node.parent) {
            if kids.get(&node.name) == Some(&ino) {
                kids.remove(&node.name);
            }
            if kids.is_empty() {
                children.remove(&node.parent);
            }
        }
        if let Some(mut kids) = children.remove(&ino) {
            kids.retain(|_, k| {
                let looked_up = nodes
                    .get(k)
                    .is_some_and(|c| c.lookups.load(Ordering::Relaxed) > 0);
                if !looked_up {
                    nodes.remove(k);
                }
                looked_up
            });
            if !kids.is_empty() {
                children.insert(ino, kids);
            }
        }
    }
}

/// Who owns the synthetic part of the tree (the user who mounted it).
#[derive(Clone, Copy)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

fn attr(
    ino: u64,
    kind: FileType,
    perm: u16,
    size: u64,
    time: SystemTime,
    owner: Owner,
) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: time,
        mtime: time,
        ctime: time,
        crtime: time,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: owner.uid,
        gid: owner.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// A directory of the synthetic tree: only its owner may enter, since the
/// disks below hold everything of the guests.
pub fn dir_attr(ino: u64, time: SystemTime, owner: Owner) -> FileAttr {
    attr(ino, FileType::Directory, 0o500, 0, time, owner)
}

/// A disk image. `blocks` counts its data only, in 512-byte units, so that
/// `cp`, `tar` and `qemu-img` see a sparse file and look for its holes.
pub fn image_attr(ino: u64, size: u64, blocks: u64, time: SystemTime, owner: Owner) -> FileAttr {
    FileAttr {
        blocks,
        ..attr(ino, FileType::RegularFile, 0o400, size, time, owner)
    }
}

pub fn link_attr(ino: u64, target_len: usize, time: SystemTime, owner: Owner) -> FileAttr {
    attr(
        ino,
        FileType::Symlink,
        0o777,
        u64::try_from(target_len).unwrap_or(0),
        time,
        owner,
    )
}

/// A guest file's attributes, as the guest has them (owner and mode too).
pub fn guest_attr(ino: u64, m: &GuestMeta) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: m.size,
        blocks: m.size.div_ceil(512),
        atime: m.atime,
        mtime: m.mtime,
        // Neither reader exposes ctime; mtime is the closest they have.
        ctime: m.mtime,
        crtime: m.crtime,
        kind: m.kind,
        perm: m.perm,
        nlink: if m.kind == FileType::Directory { 2 } else { 1 },
        uid: m.uid,
        gid: m.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}
