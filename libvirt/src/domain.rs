//! A libvirt connection and a domain's backup-related calls.
//!
//! The safe `virt` API covers connecting, lookups and XML; checkpoints,
//! backup jobs, job abort and fsfreeze go through `virt::sys`, each call in
//! one small `unsafe` block with the pointer rules stated.

use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt::sys;

use crate::error::Error;
use crate::xml::{self, BackupJob, CheckpointInfo, DomainInfo};
use crate::Result;

/// A connection to libvirtd.
pub struct Connection {
    conn: Connect,
    uri: String,
}

impl Connection {
    pub fn open(uri: &str) -> Result<Connection> {
        // libvirt prints every error to stderr by default, even those we
        // expect and handle (no backup job, no such checkpoint); ours carry
        // libvirt's message instead.
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(|e| Error::Connect {
            uri: uri.to_string(),
            message: e.message().to_string(),
        })?;
        Ok(Connection {
            conn,
            uri: uri.to_string(),
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn domain(&self, name: &str) -> Result<Domain> {
        match self.conn.lookup_domain_by_name(name) {
            Ok(dom) => Ok(Domain {
                dom,
                name: name.to_string(),
            }),
            Err(e) if e.code().is(ErrorNumber::NoDomain) => Err(Error::NoDomain {
                uri: self.uri.clone(),
                domain: name.to_string(),
            }),
            Err(e) => Err(Error::libvirt(name, "looking it up", &e)),
        }
    }
}

/// A domain of a [`Connection`].
pub struct Domain {
    dom: virt::domain::Domain,
    name: String,
}

/// An owned `virDomainCheckpointPtr`.
struct Checkpoint(sys::virDomainCheckpointPtr);

impl Drop for Checkpoint {
    fn drop(&mut self) {
        // SAFETY: we own one reference, obtained from libvirt.
        unsafe { sys::virDomainCheckpointFree(self.0) };
    }
}

/// Takes a string libvirt allocated for us.
///
/// # Safety
/// `p` is null or a NUL-terminated string allocated with malloc that the
/// caller owns.
unsafe fn take_string(p: *mut c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: per the contract above.
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    // SAFETY: libvirt allocates returned strings with malloc.
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

    fn err(&self, action: &str) -> Error {
        Error::libvirt(&self.name, action, &virt::error::Error::last_error())
    }

    pub fn is_active(&self) -> Result<bool> {
        self.dom
            .is_active()
            .map_err(|e| Error::libvirt(&self.name, "asking whether it runs", &e))
    }

    /// The live definition of a running domain, the persistent one of a
    /// stopped domain.
    pub fn info(&self) -> Result<DomainInfo> {
        let x = self
            .dom
            .xml_desc(0)
            .map_err(|e| Error::libvirt(&self.name, "reading its XML", &e))?;
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
        self.dom
            .block_info(target, 0)
            .map(|b| b.capacity)
            .map_err(|e| Error::libvirt(&self.name, format!("reading the size of {target}"), &e))
    }

    /// The names of all checkpoints of the domain.
    pub fn checkpoints(&self) -> Result<Vec<String>> {
        let mut list: *mut sys::virDomainCheckpointPtr = std::ptr::null_mut();
        // SAFETY: the domain pointer is valid while `self` lives; libvirt
        // fills `list` with an array it allocated, of `n` owned pointers.
        let n = unsafe { sys::virDomainListAllCheckpoints(self.dom.as_ptr(), &mut list, 0) };
        let n = usize::try_from(n).map_err(|_| self.err("listing its checkpoints"))?;
        let mut names = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: `i < n` elements were returned; each is owned by us
            // and freed by `Checkpoint`'s drop.
            let cp = Checkpoint(unsafe { *list.add(i) });
            // SAFETY: valid checkpoint; the name belongs to the object.
            let name = unsafe { sys::virDomainCheckpointGetName(cp.0) };
            if !name.is_null() {
                // SAFETY: a NUL-terminated string owned by `cp`.
                names.push(
                    unsafe { CStr::from_ptr(name) }
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
        if !list.is_null() {
            // SAFETY: the array itself was malloc'd by libvirt.
            unsafe { libc::free(list.cast()) };
        }
        Ok(names)
    }

    fn lookup_checkpoint(&self, name: &str) -> Result<Option<Checkpoint>> {
        let c = cstring(&self.name, "checkpoint name", name)?;
        // SAFETY: valid domain pointer and C string.
        let p = unsafe { sys::virDomainCheckpointLookupByName(self.dom.as_ptr(), c.as_ptr(), 0) };
        if p.is_null() {
            let e = virt::error::Error::last_error();
            if e.code().is(ErrorNumber::NoDomainCheckpoint) {
                return Ok(None);
            }
            return Err(Error::libvirt(
                &self.name,
                format!("looking up checkpoint {name}"),
                &e,
            ));
        }
        Ok(Some(Checkpoint(p)))
    }

    /// A checkpoint's definition, or `None` if the domain has no such
    /// checkpoint.
    pub fn checkpoint(&self, name: &str) -> Result<Option<CheckpointInfo>> {
        let Some(cp) = self.lookup_checkpoint(name)? else {
            return Ok(None);
        };
        // SAFETY: valid checkpoint; the returned string is ours to free.
        let x = unsafe {
            take_string(sys::virDomainCheckpointGetXMLDesc(
                cp.0,
                sys::VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN,
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
        // SAFETY: valid checkpoint pointer.
        if unsafe { sys::virDomainCheckpointDelete(cp.0, 0) } < 0 {
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
        // SAFETY: valid domain pointer; C strings live across the call.
        if unsafe { sys::virDomainBackupBegin(self.dom.as_ptr(), b.as_ptr(), cptr, 0) } < 0 {
            return Err(self.err("starting the backup job"));
        }
        Ok(())
    }

    /// The running backup job, or `None` when there is none.
    pub fn backup_job(&self) -> Result<Option<BackupJob>> {
        // SAFETY: valid domain pointer; the string is ours to free.
        let x = unsafe { take_string(sys::virDomainBackupGetXMLDesc(self.dom.as_ptr(), 0)) };
        match x {
            Some(x) => xml::parse_backup(&self.name, &x).map(Some),
            None => {
                let e = virt::error::Error::last_error();
                if e.code().is(ErrorNumber::NoDomainBackup)
                    || e.code().is(ErrorNumber::OperationInvalid)
                {
                    Ok(None)
                } else {
                    Err(Error::libvirt(&self.name, "reading its backup job", &e))
                }
            }
        }
    }

    /// Aborts the domain's job (the normal end of a pull-mode backup) and
    /// waits until libvirt has torn it down: the abort itself returns
    /// before that, and until then the checkpoints cannot be changed.
    pub fn abort_job(&self, wait: Duration) -> Result<()> {
        // SAFETY: valid domain pointer.
        if unsafe { sys::virDomainAbortJob(self.dom.as_ptr()) } < 0 {
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
        let info = self
            .dom
            .job_info()
            .map_err(|e| Error::libvirt(&self.name, "reading its job info", &e))?;
        Ok(i64::from(info.r#type) != i64::from(sys::VIR_DOMAIN_JOB_NONE))
    }

    /// Freezes every guest file system through the guest agent; returns
    /// how many were frozen.
    pub fn fs_freeze(&self) -> Result<u32> {
        // SAFETY: valid domain pointer; no mount point list.
        let n = unsafe { sys::virDomainFSFreeze(self.dom.as_ptr(), std::ptr::null_mut(), 0, 0) };
        u32::try_from(n).map_err(|_| self.err("freezing the guest file systems"))
    }

    pub fn fs_thaw(&self) -> Result<u32> {
        // SAFETY: valid domain pointer; no mount point list.
        let n = unsafe { sys::virDomainFSThaw(self.dom.as_ptr(), std::ptr::null_mut(), 0, 0) };
        u32::try_from(n).map_err(|_| self.err("thawing the guest file systems"))
    }
}
