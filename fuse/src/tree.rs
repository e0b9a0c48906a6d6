//! The inode table: what each inode number stands for.
//!
//! Inodes are created lazily, the first time a name is looked up or listed,
//! and never reused, so a number means the same thing for the life of the
//! mount. The same (parent, name) always yields the same inode. Nothing in
//! here does I/O.

use std::collections::HashMap;
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
}

pub struct Tree {
    nodes: RwLock<Vec<Arc<Node>>>,
    children: Mutex<HashMap<(u64, Vec<u8>), u64>>,
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
        });
        Tree {
            nodes: RwLock::new(vec![root]),
            children: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, ino: u64) -> Option<Arc<Node>> {
        let idx = usize::try_from(ino.checked_sub(1)?).ok()?;
        self.nodes.read().expect("tree lock").get(idx).cloned()
    }

    /// Inodes handed out so far.
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
        let key = (parent, name.to_vec());
        if let Some(ino) = children.get(&key) {
            if let Some(n) = self.get(*ino) {
                if same(&n.kind) {
                    return n;
                }
            }
        }
        let mut nodes = self.nodes.write().expect("tree lock");
        let ino = u64::try_from(nodes.len()).expect("fits") + 1;
        let node = Arc::new(Node {
            ino,
            parent,
            kind: make(),
        });
        nodes.push(Arc::clone(&node));
        children.insert(key, ino);
        node
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
