//! A repository in a local directory: the embedded default.
//!
//! `LocalWriter` is the only code in Ekko that writes repository files,
//! through the one durability protocol (`atomic_file`): write a temporary
//! file in the target folder, fsync it, rename it into place, fsync the
//! folder.

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Backend, ObjectInfo, ObjectWriter};
use crate::atomic_file::{AtomicFile, Existing, TEMP_PREFIX};
use crate::error::{Error, Result};

pub struct LocalBackend {
    root: PathBuf,
}

impl LocalBackend {
    pub fn new(root: impl Into<PathBuf>) -> LocalBackend {
        LocalBackend { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, name: &str) -> Result<PathBuf> {
        super::check_name(name)?;
        Ok(self.root.join(name))
    }
}

fn not_found_or_io(name: &str, path: &Path, e: std::io::Error) -> Error {
    if e.kind() == ErrorKind::NotFound {
        Error::NotFound { name: name.into() }
    } else {
        Error::io(path, e)
    }
}

/// A file being written: a temporary name in the target folder until
/// `commit` makes it durable and renames it into place (`AtomicFile`).
pub struct LocalWriter {
    file: AtomicFile,
    len: u64,
}

impl LocalWriter {
    fn create(path: PathBuf) -> Result<LocalWriter> {
        let dir = path
            .parent()
            .ok_or_else(|| Error::Invalid(format!("no parent folder for {}", path.display())))?;
        create_dirs_durably(dir)?;
        Ok(LocalWriter {
            file: AtomicFile::create(path)?,
            len: 0,
        })
    }
}

/// `create_dir_all`, then fsync the parent of every folder it made: a new
/// folder's own entry must be on disk before a file committed into it
/// counts as durable (the file's commit fsyncs only the folder itself).
fn create_dirs_durably(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let made: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for d in made {
        let parent = d.parent().filter(|p| !p.as_os_str().is_empty());
        let parent = parent.unwrap_or(Path::new("."));
        File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(parent, e))?;
    }
    Ok(())
}

impl ObjectWriter for LocalWriter {
    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.file.write_all(data)?;
        self.len += u64::try_from(data.len()).expect("fits");
        Ok(())
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn commit(self: Box<Self>) -> Result<()> {
        // Object names are content-derived or random: replacing is safe.
        self.file.commit(Existing::Replace)
    }
}

impl Backend for LocalBackend {
    fn create(&self, name: &str) -> Result<Box<dyn ObjectWriter>> {
        Ok(Box::new(LocalWriter::create(self.path(name)?)?))
    }

    fn get_range(&self, name: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let path = self.path(name)?;
        let mut f = File::open(&path).map_err(|e| not_found_or_io(name, &path, e))?;
        // Read into fresh capacity: zeroing the buffer first cost a restore
        // of incompressible data 2% of its CPU.
        let mut buf = Vec::with_capacity(len);
        let want = u64::try_from(len).unwrap_or(u64::MAX);
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.take(want).read_to_end(&mut buf))
            .map_err(|e| Error::io(&path, e))?;
        if buf.len() != len {
            return Err(Error::corrupt(
                name,
                format!("truncated: {len} bytes at offset {offset} are past its end"),
            ));
        }
        Ok(buf)
    }

    fn stale_temporaries(&self, older_than: Duration, dry_run: bool) -> Result<(usize, u64)> {
        let mut found = (0, 0);
        sweep_temporaries(&self.root, older_than, dry_run, &mut found)?;
        Ok(found)
    }

    fn get(&self, name: &str) -> Result<Vec<u8>> {
        let path = self.path(name)?;
        fs::read(&path).map_err(|e| not_found_or_io(name, &path, e))
    }

    fn size(&self, name: &str) -> Result<u64> {
        let path = self.path(name)?;
        Ok(fs::metadata(&path)
            .map_err(|e| not_found_or_io(name, &path, e))?
            .len())
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        let start = self.root.join(prefix.trim_end_matches('/'));
        walk(&self.root, &start, &mut out)?;
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<()> {
        let path = self.path(name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }
}

/// The entries of `dir`, or `None` if it does not exist.
fn read_dir(dir: &Path) -> Result<Option<fs::ReadDir>> {
    match fs::read_dir(dir) {
        Ok(rd) => Ok(Some(rd)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// Count (and unless `dry_run` remove) the `.tmp-` files under `dir` that
/// nothing has written to for `older_than`. One that vanishes meanwhile
/// (committed or cleaned up by its writer) is skipped.
fn sweep_temporaries(
    dir: &Path,
    older_than: Duration,
    dry_run: bool,
    found: &mut (usize, u64),
) -> Result<()> {
    let Some(rd) = read_dir(dir)? else {
        return Ok(());
    };
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            sweep_temporaries(&path, older_than, dry_run, found)?;
            continue;
        }
        let temp = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(TEMP_PREFIX));
        let idle = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > older_than);
        if !(meta.is_file() && temp && idle) {
            continue;
        }
        if !dry_run {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        found.0 += 1;
        found.1 += meta.len();
    }
    Ok(())
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<ObjectInfo>) -> Result<()> {
    let Some(rd) = read_dir(dir)? else {
        return Ok(());
    };
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(TEMP_PREFIX) {
            continue; // debris of an interrupted put: never an object
        }
        let path = entry.path();
        // An entry deleted since the directory was read (a concurrent
        // prune replacing index files) is not listed: it no longer exists.
        let ft = match entry.file_type() {
            Ok(ft) => ft,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(&path, e)),
        };
        if ft.is_dir() {
            walk(root, &path, out)?;
        } else if ft.is_file() {
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&path, e)),
            };
            let size = meta.len();
            let modified = meta.modified().map_err(|e| Error::io(&path, e))?;
            let rel = path
                .strip_prefix(root)
                .map_err(|_| Error::Invalid(format!("{} outside repository", path.display())))?;
            if let Some(rel) = rel.to_str() {
                out.push(ObjectInfo {
                    name: rel.to_string(),
                    size,
                    modified,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        b.put("packs/ab/x", b"hello").unwrap();
        assert_eq!(b.get("packs/ab/x").unwrap(), b"hello");
        assert_eq!(b.get_range("packs/ab/x", 1, 3).unwrap(), b"ell");
        assert!(matches!(
            b.get_range("packs/ab/x", 3, 5),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(b.get("packs/zz"), Err(Error::NotFound { .. })));
        let l = b.list("packs/").unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].name, "packs/ab/x");
        b.delete("packs/ab/x").unwrap();
        b.delete("packs/ab/x").unwrap();
        assert!(b.list("packs/").unwrap().is_empty());
        assert!(b.put("../evil", b"x").is_err());
    }

    /// A listing races with deletions (prune replacing index files while a
    /// backup lists them): an object deleted between reading the directory
    /// and looking at the entry is simply not listed, never an I/O error.
    #[test]
    fn listing_while_objects_are_deleted_never_fails() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        let stop = std::sync::atomic::AtomicBool::new(false);
        let rounds = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for i in 0..64 {
                        b.put(&format!("index/{n}-{i}"), b"x").unwrap();
                    }
                    for i in 0..64 {
                        b.delete(&format!("index/{n}-{i}")).unwrap();
                    }
                    n += 1;
                    rounds.store(n, std::sync::atomic::Ordering::Relaxed);
                }
            });
            // List while the writer goes through several rounds, however
            // slow its fsyncs are on a loaded machine.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            let (mut lists, mut listed) = (0u64, 0usize);
            while lists < 3000 || rounds.load(std::sync::atomic::Ordering::Relaxed) < 3 {
                match b.list("index/") {
                    Ok(l) => listed += l.len(),
                    Err(e) => {
                        stop.store(true, std::sync::atomic::Ordering::Relaxed);
                        panic!("listing failed: {e}");
                    }
                }
                lists += 1;
                if std::time::Instant::now() > deadline {
                    break;
                }
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert!(listed > 0, "the writer never got going");
        });
    }
}
