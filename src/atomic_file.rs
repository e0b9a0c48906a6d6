//! The one atomic-write path: a file is written under a temporary name in
//! its target folder, and `commit` makes it durable and visible: fsync the
//! file, rename it into place, fsync the folder. Until then the target name
//! shows nothing new (an older file there stays as it was), and a temporary
//! file that is dropped uncommitted (an error, a full disk, an interruption)
//! is removed.
//!
//! Repository files (`backend::LocalWriter`) and restored disk images
//! (`restore`) are written this way.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// How every temporary file begins: listings skip such names, and prune
/// removes those that killed writers left.
pub const TEMP_PREFIX: &str = ".tmp-";

pub struct AtomicFile {
    file: Option<File>,
    tmp: PathBuf,
    path: PathBuf,
}

/// What `commit` does when the target name exists.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Existing {
    Replace,
    /// Fail with `Error::Invalid`, leaving the existing file alone.
    Keep,
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

impl AtomicFile {
    /// A new, empty temporary file beside `path` (whose folder must exist).
    pub fn create(path: PathBuf) -> Result<AtomicFile> {
        let mut rnd = [0u8; 8];
        crate::crypto::random_bytes(&mut rnd);
        let tmp = parent(&path).join(format!("{TEMP_PREFIX}{}", hex::encode(rnd)));
        // Named by its target: the temporary name means nothing to a user.
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(&path, e))?;
        Ok(AtomicFile {
            file: Some(file),
            tmp,
            path,
        })
    }

    /// The file being written.
    pub fn file(&self) -> &File {
        self.file.as_ref().expect("used after commit")
    }

    /// Append `data`; an error names the target (the temporary name means
    /// nothing to a user).
    pub fn write_all(&mut self, data: &[u8]) -> Result<()> {
        use std::io::Write;
        let f = self.file.as_mut().expect("used after commit");
        f.write_all(data).map_err(|e| Error::io(&self.path, e))
    }

    /// Make the file durable, then give it its name.
    pub fn commit(mut self, existing: Existing) -> Result<()> {
        let f = self.file.take().expect("committed twice");
        let done = (|| {
            f.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
            drop(f);
            match existing {
                Existing::Replace => {
                    fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?
                }
                Existing::Keep => rename_no_replace(&self.tmp, &self.path)?,
            }
            let dir = parent(&self.path);
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(dir, e))
        })();
        if done.is_err() {
            // Not in place: the temporary file is debris.
            let _ = fs::remove_file(&self.tmp);
        }
        done
    }
}

/// The error for a target that exists and may not be replaced.
pub fn exists(path: &Path) -> Error {
    Error::Invalid(format!(
        "{} exists; pass --force to overwrite it",
        path.display()
    ))
}

/// `rename`, unless `to` exists. Where the filesystem cannot rename that
/// way, checking first leaves only a small window.
fn rename_no_replace(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).ok();
    let exists = || exists(to);
    if let (Some(f), Some(t)) = (c(from), c(to)) {
        // SAFETY: two valid NUL-terminated paths, relative to the cwd.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                f.as_ptr(),
                libc::AT_FDCWD,
                t.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EEXIST) => return Err(exists()),
            Some(libc::EINVAL) | Some(libc::ENOSYS) => {}
            _ => return Err(Error::io(to, e)),
        }
    }
    if fs::symlink_metadata(to).is_ok() {
        return Err(exists());
    }
    fs::rename(from, to).map_err(|e| Error::io(to, e))
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_visible_until_commit_and_drops_leave_no_debris() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let names = || {
            let mut v: Vec<String> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };
        let mut f = AtomicFile::create(path.clone()).unwrap();
        f.write_all(b"one").unwrap();
        assert!(!path.exists());
        f.commit(Existing::Keep).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        // Dropped uncommitted: gone, and the old file is untouched.
        let mut f = AtomicFile::create(path.clone()).unwrap();
        f.write_all(b"two").unwrap();
        drop(f);
        assert_eq!(names(), ["a"]);
        // Keep refuses to replace, and cleans up.
        let mut f = AtomicFile::create(path.clone()).unwrap();
        f.write_all(b"two").unwrap();
        let e = f.commit(Existing::Keep).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(names(), ["a"]);
        assert_eq!(fs::read(&path).unwrap(), b"one");
        let mut f = AtomicFile::create(path.clone()).unwrap();
        f.write_all(b"two").unwrap();
        f.commit(Existing::Replace).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(names(), ["a"]);
    }
}
