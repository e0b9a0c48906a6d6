//! A libvirt connection and a domain's backup-related calls.
//!
//! Each call into libvirt (loaded by `ffi`) sits in one small `unsafe`
//! block, with the pointer rules stated.

use std::ffi::{c_char, CStr, CString};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::ffi::{self, api, Api, Ptr};
use crate::xml::{self, BackupJob, CheckpointInfo, DomainInfo};
use crate::Result;

/// A connection to libvirtd.
pub struct Connection {
    api: &'static Api,
    conn: Ptr,
    uri: String,
}

// SAFETY: libvirt's connection and domain objects are reference counted
// and locked inside libvirt, and its API may be called from any thread.
unsafe impl Send for Connection {}
unsafe impl Sync for Connection {}
unsafe impl Send for Domain {}
unsafe impl Sync for Domain {}

impl Drop for Connection {
    fn drop(&mut self) {
        // SAFETY: `conn` came from virConnectOpen and is released once.
        unsafe { (self.api.connect_close)(self.conn) };
    }
}

impl Connection {
    pub fn open(uri: &str) -> Result<Connection> {
        let api = api()?;
        let c = CString::new(uri).map_err(|_| Error::Connect {
            uri: uri.to_string(),
            message: "the URI contains a NUL byte".into(),
        })?;
        // SAFETY: a NUL-terminated URI; the result is NULL or owned by us.
        let conn = unsafe { (api.connect_open)(c.as_ptr()) };
        if conn.is_null() {
            return Err(Error::Connect {
                uri: uri.to_string(),
                message: ffi::last_error(api).1,
            });
        }
        Ok(Connection {
            api,
            conn,
            uri: uri.to_string(),
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn domain(&self, name: &str) -> Result<Domain> {
        let c = cstring(name, "domain name", name)?;
        // SAFETY: a live connection and a NUL-terminated name; the result is
        // NULL or a domain reference we own.
        let dom = unsafe { (self.api.lookup_by_name)(self.conn, c.as_ptr()) };
        if dom.is_null() {
            let e = ffi::last_error(self.api);
            if e.0 == ffi::VIR_ERR_NO_DOMAIN {
                return Err(Error::NoDomain {
                    uri: self.uri.clone(),
                    domain: name.to_string(),
                });
            }
            return Err(Error::libvirt(name, "looking it up", e));
        }
        Ok(Domain {
            api: self.api,
            dom,
            name: name.to_string(),
        })
    }
}

/// A domain of a [`Connection`].
pub struct Domain {
    api: &'static Api,
    dom: Ptr,
    name: String,
}

impl Drop for Domain {
    fn drop(&mut self) {
        // SAFETY: `dom` came from a lookup and is released once.
        unsafe { (self.api.domain_free)(self.dom) };
    }
}

/// An owned `virDomainCheckpointPtr`.
struct Checkpoint<'a>(&'a Api, Ptr);

impl Drop for Checkpoint<'_> {
    fn drop(&mut self) {
        // SAFETY: the pointer came from libvirt and is released once.
        unsafe { (self.0.checkpoint_free)(self.1) };
    }
}

/// Takes ownership of a string libvirt allocated: copies it, frees it.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string from libvirt's allocator.
unsafe fn take_string(p: *mut c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    unsafe { libc::free(p.cast()) };
    Some(s)
}

fn cstring(domain: &str, what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Libvirt {
        domain: domain.to_string(),
        action: format!("{what} contains a NUL byte"),
        message: s.to_string(),
        code: -1,
    })
}

impl Domain {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The error of the libvirt call that just failed on this thread.
    fn err(&self, action: &str) -> Error {
        Error::libvirt(&self.name, action, ffi::last_error(self.api))
    }

    pub fn is_active(&self) -> Result<bool> {
        // SAFETY: a live domain.
        match unsafe { (self.api.is_active)(self.dom) } {
            n if n < 0 => Err(self.err("asking whether it runs")),
            n => Ok(n == 1),
        }
    }

    /// The live definition of a running domain, the persistent one of a
    /// stopped domain.
    pub fn info(&self) -> Result<DomainInfo> {
        // SAFETY: a live domain; the result is NULL or ours to free.
        let x = unsafe { take_string((self.api.xml_desc)(self.dom, 0)) }
            .ok_or_else(|| self.err("reading its XML"))?;
        xml::parse_domain(&x).map_err(|e| match e {
            Error::Xml { what, reason, .. } => Error::Xml {
                domain: self.name.clone(),
                what,
                reason,
            },
            e => e,
        })
    }

    /// A disk's virtual size, as the running QEMU sees it.
    pub fn capacity(&self, target: &str) -> Result<u64> {
        let t = cstring(&self.name, "disk target", target)?;
        let mut info = ffi::BlockInfo::default();
        // SAFETY: a live domain, a NUL-terminated target, and a struct of
        // the header's layout for libvirt to fill.
        if unsafe { (self.api.block_info)(self.dom, t.as_ptr(), &mut info, 0) } < 0 {
            return Err(self.err(&format!("reading the size of {target}")));
        }
        Ok(info.capacity)
    }

    /// The names of all checkpoints of the domain.
    pub fn checkpoints(&self) -> Result<Vec<String>> {
        let mut list: *mut Ptr = std::ptr::null_mut();
        // SAFETY: a live domain; on success `list` holds `n` checkpoint
        // references and the array is ours to free.
        let n = unsafe { (self.api.list_checkpoints)(self.dom, &mut list, 0) };
        let n = usize::try_from(n).map_err(|_| self.err("listing its checkpoints"))?;
        let mut names = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: `i < n` entries were filled in.
            let cp = Checkpoint(self.api, unsafe { *list.add(i) });
            // SAFETY: the name belongs to the checkpoint, which is alive.
            let name = unsafe { (self.api.checkpoint_name)(cp.1) };
            if !name.is_null() {
                names.push(
                    unsafe { CStr::from_ptr(name) }
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
        if !list.is_null() {
            // SAFETY: the array came from libvirt's allocator.
            unsafe { libc::free(list.cast()) };
        }
        Ok(names)
    }

    fn lookup_checkpoint(&self, name: &str) -> Result<Option<Checkpoint<'static>>> {
        let c = cstring(&self.name, "checkpoint name", name)?;
        // SAFETY: a live domain and a NUL-terminated name.
        let p = unsafe { (self.api.checkpoint_lookup)(self.dom, c.as_ptr(), 0) };
        if p.is_null() {
            let e = ffi::last_error(self.api);
            if e.0 == ffi::VIR_ERR_NO_DOMAIN_CHECKPOINT {
                return Ok(None);
            }
            return Err(Error::libvirt(
                &self.name,
                format!("looking up checkpoint {name}"),
                e,
            ));
        }
        Ok(Some(Checkpoint(self.api, p)))
    }

    /// A checkpoint's definition, or `None` if the domain has no such
    /// checkpoint.
    pub fn checkpoint(&self, name: &str) -> Result<Option<CheckpointInfo>> {
        let Some(cp) = self.lookup_checkpoint(name)? else {
            return Ok(None);
        };
        // SAFETY: a live checkpoint; the result is NULL or ours to free.
        let x = unsafe {
            take_string((self.api.checkpoint_xml)(
                cp.1,
                ffi::VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN,
            ))
        }
        .ok_or_else(|| self.err(&format!("reading checkpoint {name}")))?;
        xml::parse_checkpoint(&self.name, &x).map(Some)
    }

    /// Deletes one checkpoint (libvirt merges its bitmap where needed and
    /// keeps its children). Returns false if it was already gone.
    pub fn delete_checkpoint(&self, name: &str) -> Result<bool> {
        let Some(cp) = self.lookup_checkpoint(name)? else {
            return Ok(false);
        };
        // SAFETY: a live checkpoint.
        if unsafe { (self.api.checkpoint_delete)(cp.1, 0) } < 0 {
            return Err(self.err(&format!("deleting checkpoint {name}")));
        }
        Ok(true)
    }

    /// Starts a backup job (`virDomainBackupBegin`), creating the checkpoint
    /// `checkpoint_xml` at the same instant.
    pub fn backup_begin(&self, backup_xml: &str, checkpoint_xml: Option<&str>) -> Result<()> {
        let b = cstring(&self.name, "backup XML", backup_xml)?;
        let c = checkpoint_xml
            .map(|c| cstring(&self.name, "checkpoint XML", c))
            .transpose()?;
        let cptr = c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: a live domain; NUL-terminated XML, or NULL for none.
        if unsafe { (self.api.backup_begin)(self.dom, b.as_ptr(), cptr, 0) } < 0 {
            return Err(self.err("starting the backup job"));
        }
        Ok(())
    }

    /// The running backup job, or `None` when there is none.
    pub fn backup_job(&self) -> Result<Option<BackupJob>> {
        // SAFETY: a live domain; the result is NULL or ours to free.
        let x = unsafe { take_string((self.api.backup_xml)(self.dom, 0)) };
        match x {
            Some(x) => xml::parse_backup(&self.name, &x).map(Some),
            None => {
                let e = ffi::last_error(self.api);
                if e.0 == ffi::VIR_ERR_NO_DOMAIN_BACKUP || e.0 == ffi::VIR_ERR_OPERATION_INVALID {
                    Ok(None)
                } else {
                    Err(Error::libvirt(&self.name, "reading its backup job", e))
                }
            }
        }
    }

    /// Aborts the domain's job (the normal end of a pull-mode backup) and
    /// waits until libvirt has torn it down: the abort itself returns
    /// before that, and until then the checkpoints cannot be changed.
    pub fn abort_job(&self, wait: Duration) -> Result<()> {
        // SAFETY: a live domain.
        if unsafe { (self.api.abort_job)(self.dom) } < 0 {
            return Err(self.err("ending the backup job"));
        }
        let deadline = Instant::now() + wait;
        loop {
            // Errors while the job ends ("backup job data missing") mean
            // it is still going.
            if let Ok(false) = self.has_job() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Libvirt {
                    domain: self.name.clone(),
                    action: "ending the backup job".into(),
                    message: format!(
                        "the job was still there {} s after the abort",
                        wait.as_secs()
                    ),
                    code: -1,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the domain has any job (of any kind) running.
    pub fn has_job(&self) -> Result<bool> {
        let mut info = ffi::JobInfo::default();
        // SAFETY: a live domain and a struct of the header's layout.
        if unsafe { (self.api.job_info)(self.dom, &mut info) } < 0 {
            return Err(self.err("reading its job info"));
        }
        Ok(info.kind != ffi::VIR_DOMAIN_JOB_NONE)
    }

    /// Freezes every guest file system through the guest agent; returns
    /// how many were frozen.
    pub fn fs_freeze(&self) -> Result<u32> {
        // SAFETY: a live domain; no mount point list.
        let n = unsafe { (self.api.fs_freeze)(self.dom, std::ptr::null_mut(), 0, 0) };
        u32::try_from(n).map_err(|_| self.err("freezing the guest file systems"))
    }

    pub fn fs_thaw(&self) -> Result<u32> {
        // SAFETY: a live domain; no mount point list.
        let n = unsafe { (self.api.fs_thaw)(self.dom, std::ptr::null_mut(), 0, 0) };
        u32::try_from(n).map_err(|_| self.err("thawing the guest file systems"))
    }
}
