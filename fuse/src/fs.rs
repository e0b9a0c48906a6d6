//! The FUSE operations.
//!
//! Each operation finds its inode in the `Tree`, asks the `Catalog`, a
//! `DiskReader` or a guest `Volume`, and replies. Operations run on several
//! FUSE threads at once; all shared state sits behind the tree's and the
//! catalog's own locks, and nothing here holds a lock while reading data.
//!
//! Attribute and entry timeouts: everything below `<vm>/<time>/` is
//! immutable and cached by the kernel for a day. The root, `ids/`, `<vm>/`
//! and `latest` change when snapshots are committed or pruned, so they are
//! cached for one second, and looking them up lists the snapshots again
//! (at most once per second).
//!
//! Every write-like operation fails with EROFS.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use ekko::DiskReader;
use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::catalog::{safe_name, Catalog, SnapEntry};
use crate::errno::{errno, FsError};
use crate::guest::{Volume, VolumeSource};
use crate::prefetch::{Cursor, Prefetcher};
use crate::ptable::{self, Table};
use crate::tree::{self, Kind, Node, Owner, Tree, Volumes, ROOT};

/// For what changes when snapshots come and go.
pub const SHORT_TTL: Duration = Duration::from_secs(1);
/// For what never changes: everything inside a snapshot.
pub const LONG_TTL: Duration = Duration::from_secs(24 * 3600);
/// The largest read the kernel is asked to send.
pub const MAX_READ: u32 = 1 << 20;

/// Name of the folder for a disk without a partition table.
pub const WHOLE_DISK: &str = "whole";

/// Tuning of a mounted tree.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Worker threads per guest filesystem.
    pub guest_workers: usize,
}

pub struct EkkoFs {
    catalog: Arc<Catalog>,
    tree: Tree,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    prefetch: Arc<Prefetcher>,
    owner: Owner,
    mounted_at: SystemTime,
    settings: Settings,
    /// Closed until the mount is set up (read-ahead raised or given up).
    /// A file's read-ahead window is fixed when it is opened, and opening
    /// needs a lookup first: holding lookups back for those few
    /// milliseconds means no file is opened with the kernel's small default.
    ready: Arc<Gate>,
}

/// A one-way gate: closed at first, opened once, waited on cheaply.
#[derive(Default)]
pub struct Gate {
    open: AtomicBool,
    lock: Mutex<()>,
    cond: std::sync::Condvar,
}

impl Gate {
    pub fn open(&self) {
        let _g = self.lock.lock().expect("gate lock");
        self.open.store(true, Ordering::Release);
        self.cond.notify_all();
    }

    /// Wait until the gate opens, at most `limit`.
    fn wait(&self, limit: std::time::Duration) {
        if self.open.load(Ordering::Acquire) {
            return;
        }
        let g = self.lock.lock().expect("gate lock");
        let _ = self
            .cond
            .wait_timeout_while(g, limit, |_| !self.open.load(Ordering::Acquire));
    }
}

enum Handle {
    Image {
        reader: Arc<DiskReader>,
        cursor: Mutex<Cursor>,
        label: String,
    },
    Guest {
        vol: Arc<Volume>,
        path: Vec<u8>,
        size: u64,
    },
    Dir(Vec<DirEntry>),
}

/// The bytes of a read reply. Most reads of an image fall within one chunk
/// (the kernel asks for aligned runs of up to `MAX_READ`): the reply then
/// points into the cached chunk, or into a static page of zeros for a hole,
/// without a copy.
enum Data {
    Owned(Vec<u8>),
    Chunk(Arc<Vec<u8>>, std::ops::Range<usize>),
    Zeros(usize),
}

/// As many zeros as the largest read (in .bss: no memory until touched).
static ZEROS: [u8; MAX_READ as usize] = [0; MAX_READ as usize];

impl Data {
    fn bytes(&self) -> &[u8] {
        match self {
            Data::Owned(v) => v,
            Data::Chunk(c, r) => &c[r.clone()],
            Data::Zeros(n) => &ZEROS[..*n],
        }
    }
}

/// `n` bytes (at most `MAX_READ`, within the disk) of an image at `offset`.
fn image_read(reader: &DiskReader, offset: u64, n: u64) -> ekko::Result<Data> {
    let cs = reader.chunk_size();
    let idx = offset / cs;
    let within = offset % cs;
    let to_usize = |v: u64| usize::try_from(v).expect("below MAX_READ or the chunk size");
    if within + n <= cs {
        let start = to_usize(within);
        return Ok(match reader.block(idx)? {
            None => Data::Zeros(to_usize(n)),
            Some(chunk) => Data::Chunk(chunk, start..start + to_usize(n)),
        });
    }
    // Across chunk boundaries: one copy, chunk by chunk.
    let mut buf = Vec::with_capacity(to_usize(n));
    let end = offset + n;
    let mut pos = offset;
    while pos < end {
        let idx = pos / cs;
        let within = to_usize(pos % cs);
        let take = to_usize((cs - pos % cs).min(end - pos));
        match reader.block(idx)? {
            None => buf.extend_from_slice(&ZEROS[..take]),
            Some(chunk) => buf.extend_from_slice(&chunk[within..within + take]),
        }
        pos += u64::try_from(take).expect("fits");
    }
    Ok(Data::Owned(buf))
}

struct DirEntry {
    ino: u64,
    kind: FileType,
    name: OsString,
}

type Res<T> = Result<T, Errno>;

fn join(path: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = path.to_vec();
    if p.last() != Some(&b'/') {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicked FUSE thread must not take the whole tree down with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EkkoFs {
    pub fn new(
        catalog: Arc<Catalog>,
        prefetch: Arc<Prefetcher>,
        owner: Owner,
        settings: Settings,
    ) -> EkkoFs {
        EkkoFs {
            catalog,
            tree: Tree::new(),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            prefetch,
            owner,
            mounted_at: SystemTime::now(),
            settings,
            ready: Arc::new(Gate::default()),
        }
    }

    /// Open this once the mount is fully set up; lookups wait for it.
    pub fn ready_gate(&self) -> Arc<Gate> {
        Arc::clone(&self.ready)
    }

    fn node(&self, ino: INodeNo) -> Res<Arc<Node>> {
        self.tree.get(ino.0).ok_or(Errno::ENOENT)
    }

    fn handle(&self, fh: FileHandle) -> Res<Arc<Handle>> {
        lock(&self.handles).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn add_handle(&self, h: Handle) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, Arc::new(h));
        FileHandle(fh)
    }

    fn latest_target(&self, vm: &str) -> Option<String> {
        self.catalog
            .snapshots(vm)
            .last()
            .map(|e| e.time_dir.clone())
    }

    fn id_target(snap: &SnapEntry) -> String {
        format!("../{}/{}", snap.vm_dir, snap.time_dir)
    }

    fn disk_label(snap: &SnapEntry, disk: &str) -> String {
        format!("{}/{}/{}", snap.vm_dir, snap.time_dir, safe_name(disk))
    }

    /// The partitions of a disk, parsed on first access.
    fn volumes(
        &self,
        snap: &Arc<SnapEntry>,
        disk: &str,
        cell: &Mutex<Option<Arc<Volumes>>>,
    ) -> Res<Arc<Volumes>> {
        let mut cached = lock(cell);
        if let Some(v) = &*cached {
            return Ok(Arc::clone(v));
        }
        let label = Self::disk_label(snap, disk);
        let reader = self
            .catalog
            .reader(snap, disk)
            .map_err(|e| errno(&label, &FsError::Core(e)))?;
        let table = match ptable::parse(&|buf, off| reader.read_at(buf, off), reader.size()) {
            Ok(t) => t,
            Err(e) if e.is_damage() => {
                tracing::error!(
                    "{label}: the partition table cannot be read ({e}); the folder stays empty"
                );
                let v = Arc::new(Vec::new());
                *cached = Some(Arc::clone(&v));
                return Ok(v);
            }
            // Perhaps transient (a backend error): not remembered.
            Err(e) => return Err(errno(&label, &FsError::Core(e))),
        };
        let regions: Vec<(String, u64, u64)> = match &table {
            Table::None => vec![(WHOLE_DISK.to_string(), 0, reader.size())],
            Table::Mbr(p) | Table::Gpt(p) => p
                .iter()
                .map(|p| (format!("part{}", p.number), p.offset, p.size))
                .collect(),
        };
        tracing::debug!("{label}: partition table {table:?}");
        let vols: Volumes = regions
            .into_iter()
            .map(|(name, offset, size)| {
                let source = VolumeSource {
                    catalog: Arc::clone(&self.catalog),
                    snap: Arc::clone(snap),
                    disk: disk.to_string(),
                    offset,
                    size,
                    prefetch: Arc::clone(&self.prefetch),
                };
                let vol = Volume::new(
                    format!("{label}/{name}"),
                    source,
                    self.settings.guest_workers,
                );
                (name, Arc::new(vol))
            })
            .collect();
        let v = Arc::new(vols);
        *cached = Some(Arc::clone(&v));
        Ok(v)
    }

    fn guest_child(&self, parent: &Node, vol: &Arc<Volume>, path: &[u8], name: &[u8]) -> Arc<Node> {
        let child_path = join(path, name);
        self.tree.child(
            parent.ino,
            name,
            |_| true,
            || Kind::Guest {
                vol: Arc::clone(vol),
                path: child_path,
                meta: std::sync::RwLock::new(None),
            },
        )
    }

    fn lookup_node(&self, parent: &Node, name: &OsStr) -> Res<Arc<Node>> {
        let bytes = name.as_bytes();
        let name_s = name.to_str();
        match &parent.kind {
            Kind::Root => {
                self.catalog.refresh();
                if bytes == b"ids" {
                    return Ok(self.tree.child(ROOT, bytes, |_| true, || Kind::Ids));
                }
                let vm = name_s
                    .filter(|n| self.catalog.vms().iter().any(|v| v == n))
                    .ok_or(Errno::ENOENT)?;
                Ok(self
                    .tree
                    .child(ROOT, bytes, |_| true, || Kind::Vm { vm: vm.to_string() }))
            }
            Kind::Ids => {
                self.catalog.refresh();
                let snap = name_s
                    .and_then(|n| self.catalog.by_id(n))
                    .ok_or(Errno::ENOENT)?;
                let id = snap.snap.id.clone();
                Ok(self.tree.child(
                    parent.ino,
                    bytes,
                    |k| matches!(k, Kind::IdLink { snap } if snap.snap.id == id),
                    || Kind::IdLink { snap },
                ))
            }
            Kind::Vm { vm } => {
                self.catalog.refresh();
                let snaps = self.catalog.snapshots(vm);
                if bytes == b"latest" && !snaps.is_empty() {
                    return Ok(self.tree.child(
                        parent.ino,
                        bytes,
                        |_| true,
                        || Kind::Latest { vm: vm.clone() },
                    ));
                }
                let snap = name_s
                    .and_then(|n| snaps.into_iter().find(|e| e.time_dir == n))
                    .ok_or(Errno::ENOENT)?;
                let id = snap.snap.id.clone();
                Ok(self.tree.child(
                    parent.ino,
                    bytes,
                    |k| matches!(k, Kind::Snap { snap } if snap.snap.id == id),
                    || Kind::Snap { snap },
                ))
            }
            Kind::Snap { snap } => {
                let n = name_s.ok_or(Errno::ENOENT)?;
                for (dir, disk) in snap.disk_names() {
                    if n.strip_suffix(".img") == Some(dir.as_str()) {
                        let snap = Arc::clone(snap);
                        return Ok(self.tree.child(
                            parent.ino,
                            bytes,
                            |_| true,
                            || Kind::Image {
                                snap,
                                disk,
                                data_blocks: OnceLock::new(),
                            },
                        ));
                    }
                    if n == dir {
                        let snap = Arc::clone(snap);
                        return Ok(self.tree.child(
                            parent.ino,
                            bytes,
                            |_| true,
                            || Kind::DiskDir {
                                snap,
                                disk,
                                volumes: Mutex::new(None),
                            },
                        ));
                    }
                }
                Err(Errno::ENOENT)
            }
            Kind::DiskDir {
                snap,
                disk,
                volumes,
            } => {
                let vols = self.volumes(snap, disk, volumes)?;
                let (_, vol) = vols
                    .iter()
                    .find(|(n, _)| n.as_bytes() == bytes)
                    .ok_or(Errno::ENOENT)?;
                Ok(self.tree.child(
                    parent.ino,
                    bytes,
                    |_| true,
                    || Kind::Guest {
                        vol: Arc::clone(vol),
                        path: b"/".to_vec(),
                        meta: std::sync::RwLock::new(None),
                    },
                ))
            }
            Kind::Guest { vol, path, .. } => {
                // Metadata first: names that do not exist get no inode.
                let child_path = join(path, bytes);
                let m = vol.metadata(child_path.clone()).map_err(|e| {
                    errno(
                        &format!("{}{}", vol.label, String::from_utf8_lossy(&child_path)),
                        &e,
                    )
                })?;
                let m = m.ok_or(Errno::ENOENT)?;
                let child = self.guest_child(parent, vol, path, bytes);
                if let Kind::Guest { meta, .. } = &child.kind {
                    *meta.write().unwrap_or_else(PoisonError::into_inner) = Some(m);
                }
                Ok(child)
            }
            Kind::Latest { .. } | Kind::IdLink { .. } | Kind::Image { .. } => Err(Errno::ENOTDIR),
        }
    }

    fn attr(&self, node: &Node) -> Res<(FileAttr, Duration)> {
        let ino = node.ino;
        let o = self.owner;
        Ok(match &node.kind {
            Kind::Root | Kind::Ids => (tree::dir_attr(ino, self.mounted_at, o), SHORT_TTL),
            Kind::Vm { vm } => {
                let t = self
                    .catalog
                    .snapshots(vm)
                    .last()
                    .map_or(self.mounted_at, |e| e.time);
                (tree::dir_attr(ino, t, o), SHORT_TTL)
            }
            Kind::Latest { vm } => {
                let len = self.latest_target(vm).map_or(0, |t| t.len());
                (tree::link_attr(ino, len, self.mounted_at, o), SHORT_TTL)
            }
            Kind::IdLink { snap } => (
                tree::link_attr(ino, Self::id_target(snap).len(), snap.time, o),
                LONG_TTL,
            ),
            Kind::Snap { snap } | Kind::DiskDir { snap, .. } => {
                (tree::dir_attr(ino, snap.time, o), LONG_TTL)
            }
            Kind::Image {
                snap,
                disk,
                data_blocks,
            } => {
                let size = snap
                    .snap
                    .disk(disk)
                    .map(|d| d.size)
                    .map_err(|e| errno(&"image", &FsError::Core(e)))?;
                let blocks = self.data_blocks(snap, disk, data_blocks, size);
                (tree::image_attr(ino, size, blocks, snap.time, o), LONG_TTL)
            }
            Kind::Guest { vol, path, meta } => {
                if let Some(m) = &*meta.read().unwrap_or_else(PoisonError::into_inner) {
                    return Ok((tree::guest_attr(ino, m), LONG_TTL));
                }
                let label = format!("{}{}", vol.label, String::from_utf8_lossy(path));
                match vol.metadata(path.clone()).map_err(|e| errno(&label, &e))? {
                    Some(m) => {
                        let a = tree::guest_attr(ino, &m);
                        *meta.write().unwrap_or_else(PoisonError::into_inner) = Some(m);
                        (a, LONG_TTL)
                    }
                    // An unreadable partition: an empty folder.
                    None if path == b"/" => {
                        let t = match self.tree.get(node.parent).map(|p| match &p.kind {
                            Kind::DiskDir { snap, .. } => Some(snap.time),
                            _ => None,
                        }) {
                            Some(Some(t)) => t,
                            _ => self.mounted_at,
                        };
                        (tree::dir_attr(ino, t, o), LONG_TTL)
                    }
                    None => return Err(Errno::ENOENT),
                }
            }
        })
    }

    /// `st_blocks` of a disk image: its data chunks in 512-byte units, from
    /// the block map (one cached lookup per chunk, once per image). Holes
    /// take no room, so tools that copy sparse files see one. If the map
    /// cannot be read, the image counts as all data (and the count is tried
    /// again next time).
    fn data_blocks(
        &self,
        snap: &Arc<SnapEntry>,
        disk: &str,
        cell: &OnceLock<u64>,
        size: u64,
    ) -> u64 {
        if let Some(b) = cell.get() {
            return *b;
        }
        let counted = self
            .catalog
            .reader(snap, disk)
            .and_then(|r| r.extents(0, size))
            .map(|ext| {
                ext.iter()
                    .filter(|e| e.data)
                    .map(|e| e.len)
                    .sum::<u64>()
                    .div_ceil(512)
            });
        match counted {
            Ok(b) => *cell.get_or_init(|| b),
            Err(e) => {
                let label = format!("{}.img", Self::disk_label(snap, disk));
                tracing::warn!("{label}: cannot count its data blocks ({e}); reported as all data");
                size.div_ceil(512)
            }
        }
    }

    fn list(&self, node: &Node) -> Res<Vec<DirEntry>> {
        let mut out = vec![
            DirEntry {
                ino: node.ino,
                kind: FileType::Directory,
                name: ".".into(),
            },
            DirEntry {
                ino: node.parent,
                kind: FileType::Directory,
                name: "..".into(),
            },
        ];
        let mut add = |n: &Node, kind: FileType, name: &[u8]| {
            out.push(DirEntry {
                ino: n.ino,
                kind,
                name: OsString::from_vec(name.to_vec()),
            });
        };
        match &node.kind {
            Kind::Root => {
                self.catalog.refresh();
                add(
                    &self.tree.child(ROOT, b"ids", |_| true, || Kind::Ids),
                    FileType::Directory,
                    b"ids",
                );
                for vm in self.catalog.vms() {
                    let n = self.tree.child(
                        ROOT,
                        vm.as_bytes(),
                        |_| true,
                        || Kind::Vm { vm: vm.clone() },
                    );
                    add(&n, FileType::Directory, vm.as_bytes());
                }
            }
            Kind::Ids => {
                self.catalog.refresh();
                for id in self.catalog.ids() {
                    let Some(snap) = self.catalog.by_id(&id) else {
                        continue;
                    };
                    let n = self.tree.child(
                        node.ino,
                        id.as_bytes(),
                        |k| matches!(k, Kind::IdLink { snap } if snap.snap.id == id),
                        || Kind::IdLink { snap },
                    );
                    add(&n, FileType::Symlink, id.as_bytes());
                }
            }
            Kind::Vm { vm } => {
                self.catalog.refresh();
                let snaps = self.catalog.snapshots(vm);
                if !snaps.is_empty() {
                    let n = self.tree.child(
                        node.ino,
                        b"latest",
                        |_| true,
                        || Kind::Latest { vm: vm.clone() },
                    );
                    add(&n, FileType::Symlink, b"latest");
                }
                for snap in snaps {
                    let name = snap.time_dir.clone();
                    let id = snap.snap.id.clone();
                    let n = self.tree.child(
                        node.ino,
                        name.as_bytes(),
                        |k| matches!(k, Kind::Snap { snap } if snap.snap.id == id),
                        || Kind::Snap { snap },
                    );
                    add(&n, FileType::Directory, name.as_bytes());
                }
            }
            Kind::Snap { snap } => {
                for (dir, disk) in snap.disk_names() {
                    let img = format!("{dir}.img");
                    let s = Arc::clone(snap);
                    let d = disk.clone();
                    let n = self.tree.child(
                        node.ino,
                        img.as_bytes(),
                        |_| true,
                        || Kind::Image {
                            snap: s,
                            disk: d,
                            data_blocks: OnceLock::new(),
                        },
                    );
                    add(&n, FileType::RegularFile, img.as_bytes());
                    let s = Arc::clone(snap);
                    let n = self.tree.child(
                        node.ino,
                        dir.as_bytes(),
                        |_| true,
                        || Kind::DiskDir {
                            snap: s,
                            disk,
                            volumes: Mutex::new(None),
                        },
                    );
                    add(&n, FileType::Directory, dir.as_bytes());
                }
            }
            Kind::DiskDir {
                snap,
                disk,
                volumes,
            } => {
                for (name, vol) in self.volumes(snap, disk, volumes)?.iter() {
                    let n = self.tree.child(
                        node.ino,
                        name.as_bytes(),
                        |_| true,
                        || Kind::Guest {
                            vol: Arc::clone(vol),
                            path: b"/".to_vec(),
                            meta: std::sync::RwLock::new(None),
                        },
                    );
                    add(&n, FileType::Directory, name.as_bytes());
                }
            }
            Kind::Guest { vol, path, .. } => {
                let label = format!("{}{}", vol.label, String::from_utf8_lossy(path));
                for e in vol.read_dir(path.clone()).map_err(|e| errno(&label, &e))? {
                    let n = self.guest_child(node, vol, path, &e.name);
                    add(&n, e.kind, &e.name);
                }
            }
            Kind::Latest { .. } | Kind::IdLink { .. } | Kind::Image { .. } => {
                return Err(Errno::ENOTDIR)
            }
        }
        Ok(out)
    }

    fn open_node(&self, node: &Node) -> Res<Handle> {
        match &node.kind {
            Kind::Image { snap, disk, .. } => {
                let label = format!("{}.img", Self::disk_label(snap, disk));
                let reader = self
                    .catalog
                    .reader(snap, disk)
                    .map_err(|e| errno(&label, &FsError::Core(e)))?;
                Ok(Handle::Image {
                    reader,
                    cursor: Mutex::new(Cursor::default()),
                    label,
                })
            }
            Kind::Guest { vol, path, .. } => {
                let (a, _) = self.attr(node)?;
                match a.kind {
                    FileType::RegularFile => Ok(Handle::Guest {
                        vol: Arc::clone(vol),
                        path: path.clone(),
                        size: a.size,
                    }),
                    FileType::Directory => Err(Errno::EISDIR),
                    // Devices, fifos and sockets of a guest have nothing to read.
                    _ => Err(Errno::ENXIO),
                }
            }
            Kind::Latest { .. } | Kind::IdLink { .. } => Err(Errno::ELOOP),
            _ => Err(Errno::EISDIR),
        }
    }

    fn read_handle(&self, fh: FileHandle, offset: u64, size: u32) -> Res<Data> {
        let len = u64::from(size.min(MAX_READ));
        match &*self.handle(fh)? {
            Handle::Image {
                reader,
                cursor,
                label,
            } => {
                let disk = reader.size();
                if offset >= disk {
                    return Ok(Data::Owned(Vec::new()));
                }
                let n = len.min(disk - offset);
                let map = |e| errno(&format!("{label} at offset {offset}"), &FsError::Core(e));
                let data = image_read(reader, offset, n).map_err(map)?;
                self.prefetch.hint(reader, &mut lock(cursor), offset, len);
                Ok(data)
            }
            Handle::Guest { vol, path, .. } => {
                let label = format!(
                    "{}{} at offset {offset}",
                    vol.label,
                    String::from_utf8_lossy(path)
                );
                let n = usize::try_from(len).map_err(|_| Errno::EINVAL)?;
                vol.read(fh.0, path.clone(), offset, n)
                    .map(Data::Owned)
                    .map_err(|e| errno(&label, &e))
            }
            Handle::Dir(_) => Err(Errno::EISDIR),
        }
    }

    fn seek(&self, fh: FileHandle, offset: i64, whence: i32) -> Res<i64> {
        let off = u64::try_from(offset).map_err(|_| Errno::ENXIO)?;
        let pos = match &*self.handle(fh)? {
            Handle::Image { reader, label, .. } => {
                if off >= reader.size() {
                    return Err(Errno::ENXIO);
                }
                let map = |e| errno(&format!("{label}: seek from {off}"), &FsError::Core(e));
                match whence {
                    libc::SEEK_DATA => reader.next_data(off).map_err(map)?.ok_or(Errno::ENXIO)?,
                    libc::SEEK_HOLE => reader.next_hole(off).map_err(map)?,
                    _ => return Err(Errno::EINVAL),
                }
            }
            // Guest files are reported as all data.
            Handle::Guest { size, .. } => {
                if off >= *size {
                    return Err(Errno::ENXIO);
                }
                match whence {
                    libc::SEEK_DATA => off,
                    libc::SEEK_HOLE => *size,
                    _ => return Err(Errno::EINVAL),
                }
            }
            Handle::Dir(_) => return Err(Errno::EISDIR),
        };
        i64::try_from(pos).map_err(|_| Errno::EOVERFLOW)
    }
}

impl Filesystem for EkkoFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_readahead(MAX_READ) {
            let _ = config.set_max_readahead(max);
        }
        // The largest request size also bounds reads (the kernel's max_pages).
        if let Err(max) = config.set_max_write(MAX_READ) {
            let _ = config.set_max_write(max);
        }
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        // Shared (read-only) mmap of a direct-I/O image; kernels before 6.6
        // lack it, and there only private mappings work.
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.ready.wait(std::time::Duration::from_secs(2));
        let r = self.node(parent).and_then(|p| loop {
            let n = self.lookup_node(&p, name)?;
            let attr = self.attr(&n)?;
            // Counted only once the reply is certain; a node forgotten in
            // between is looked up again.
            if self.tree.pin(&n) {
                break Ok(attr);
            }
        });
        match r {
            Ok((attr, ttl)) => reply.entry(&ttl, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    // fuser's default `batch_forget` calls this for each inode.
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.tree.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino).and_then(|n| self.attr(&n)) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self.node(ino).and_then(|n| match &n.kind {
            Kind::Latest { vm } => self
                .latest_target(vm)
                .map(String::into_bytes)
                .ok_or(Errno::ENOENT),
            Kind::IdLink { snap } => Ok(Self::id_target(snap).into_bytes()),
            Kind::Guest { vol, path, .. } => {
                let label = format!("{}{}", vol.label, String::from_utf8_lossy(path));
                vol.read_link(path.clone()).map_err(|e| errno(&label, &e))
            }
            _ => Err(Errno::EINVAL),
        });
        match r {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        match self.node(ino).and_then(|n| self.open_node(&n)) {
            Ok(h) => {
                // Disk images bypass the page cache (direct I/O): each read
                // reaches the daemon, is answered from its chunk cache with
                // one copy into the reader's buffer, and the daemon's own
                // read-ahead decodes the next chunks on all cores. Through
                // the page cache, the kernel copied every byte twice, holes
                // included, and kept only a few requests in flight: a
                // sequential read ran at 60-80% of `ekko restore`, against
                // 100-120% now. Guest files keep the page cache (mmap, and
                // small reads of ext4 metadata); snapshots never change,
                // so it stays valid across opens.
                let flags = match h {
                    Handle::Image { .. } => FopenFlags::FOPEN_DIRECT_IO,
                    _ => FopenFlags::FOPEN_KEEP_CACHE,
                };
                reply.opened(self.add_handle(h), flags)
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.read_handle(fh, offset, size) {
            Ok(data) => reply.data(data.bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.seek(fh, offset, whence) {
            Ok(p) => reply.offset(p),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(h) = lock(&self.handles).remove(&fh.0) {
            if let Handle::Guest { vol, .. } = &*h {
                vol.release(fh.0);
            }
        }
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // The listing is taken once per open, so that offsets stay valid
        // however the reads of it are split.
        match self.node(ino).and_then(|n| self.list(&n)) {
            Ok(entries) => reply.opened(self.add_handle(Handle::Dir(entries)), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let Handle::Dir(entries) = &*h else {
            return reply.error(Errno::ENOTDIR);
        };
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, e) in entries.iter().enumerate().skip(skip) {
            let next = u64::try_from(i).expect("fits") + 1;
            if reply.add(INodeNo(e.ino), next, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.handles).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, self.tree.inode_count(), 0, 4096, 255, 4096);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::from_i32(libc::ENODATA));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS);
        } else {
            reply.ok();
        }
    }

    // Everything below would change the tree: a backup is read-only.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }
}
