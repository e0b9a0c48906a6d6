//! The few libvirt C functions Ekko calls, loaded from `libvirt.so.0` the
//! first time a libvirt domain is backed up, not when `ekko` starts.
//!
//! Linking libvirt.so (as the `virt` crate does) made every `ekko` command
//! load about 40 shared libraries at start, libvirt's dependencies, which
//! costs about 40 ms with a cold page cache; and an `ekko` built with it
//! would not start at all on a host without libvirt installed. Loaded here,
//! only `ekko backup --domain` needs libvirt, and without it that command
//! fails with a message that says what to install.
//!
//! Signatures and constants are those of libvirt's public headers
//! (`libvirt-domain.h`, `libvirt-domain-checkpoint.h`, `virterror.h`);
//! every function here exists since libvirt 7.2 (checkpoints and backups).

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr};
use std::sync::OnceLock;

/// `virConnectPtr`, `virDomainPtr` and `virDomainCheckpointPtr`: opaque.
pub(crate) type Ptr = *mut c_void;

/// `virDomainBlockInfo`.
#[repr(C)]
#[derive(Default)]
pub(crate) struct BlockInfo {
    pub capacity: c_ulonglong,
    pub allocation: c_ulonglong,
    pub physical: c_ulonglong,
}

/// `virDomainJobInfo`.
#[repr(C)]
#[derive(Default)]
pub(crate) struct JobInfo {
    pub kind: c_int,
    pub rest: [c_ulonglong; 11],
}

/// The start of `virError`: only these fields are read.
#[repr(C)]
pub(crate) struct VirError {
    pub code: c_int,
    pub domain: c_int,
    pub message: *mut c_char,
}

pub(crate) const VIR_ERR_NO_DOMAIN: c_int = 42;
pub(crate) const VIR_ERR_OPERATION_INVALID: c_int = 55;
pub(crate) const VIR_ERR_NO_DOMAIN_CHECKPOINT: c_int = 103;
pub(crate) const VIR_ERR_NO_DOMAIN_BACKUP: c_int = 104;
pub(crate) const VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN: c_uint = 2;
pub(crate) const VIR_DOMAIN_JOB_NONE: c_int = 0;

type ErrorFunc = unsafe extern "C" fn(*mut c_void, *mut VirError);

ekko_dl::api! {
    pub(crate) struct Api {
        initialize = "virInitialize": fn() -> c_int;
        set_error_func = "virSetErrorFunc": fn(*mut c_void, Option<ErrorFunc>);
        get_last_error = "virGetLastError": fn() -> *mut VirError;
        connect_open = "virConnectOpen": fn(*const c_char) -> Ptr;
        connect_close = "virConnectClose": fn(Ptr) -> c_int;
        lookup_by_name = "virDomainLookupByName": fn(Ptr, *const c_char) -> Ptr;
        domain_free = "virDomainFree": fn(Ptr) -> c_int;
        is_active = "virDomainIsActive": fn(Ptr) -> c_int;
        xml_desc = "virDomainGetXMLDesc": fn(Ptr, c_uint) -> *mut c_char;
        block_info = "virDomainGetBlockInfo": fn(Ptr, *const c_char, *mut BlockInfo, c_uint) -> c_int;
        list_checkpoints = "virDomainListAllCheckpoints": fn(Ptr, *mut *mut Ptr, c_uint) -> c_int;
        checkpoint_name = "virDomainCheckpointGetName": fn(Ptr) -> *const c_char;
        checkpoint_free = "virDomainCheckpointFree": fn(Ptr) -> c_int;
        checkpoint_lookup = "virDomainCheckpointLookupByName": fn(Ptr, *const c_char, c_uint) -> Ptr;
        checkpoint_xml = "virDomainCheckpointGetXMLDesc": fn(Ptr, c_uint) -> *mut c_char;
        checkpoint_delete = "virDomainCheckpointDelete": fn(Ptr, c_uint) -> c_int;
        backup_begin = "virDomainBackupBegin": fn(Ptr, *const c_char, *const c_char, c_uint) -> c_int;
        backup_xml = "virDomainBackupGetXMLDesc": fn(Ptr, c_uint) -> *mut c_char;
        abort_job = "virDomainAbortJob": fn(Ptr) -> c_int;
        job_info = "virDomainGetJobInfo": fn(Ptr, *mut JobInfo) -> c_int;
        fs_freeze = "virDomainFSFreeze": fn(Ptr, *mut *const c_char, c_uint, c_uint) -> c_int;
        fs_thaw = "virDomainFSThaw": fn(Ptr, *mut *const c_char, c_uint, c_uint) -> c_int;
    }
}

/// The shared library's name: its major version, as installed by Debian's
/// `libvirt0` (no `-dev` package needed).
const LIBRARY: &str = "libvirt.so.0";

/// Errors are read with `virGetLastError` where they happen; this keeps
/// libvirt's default handler from also printing them.
unsafe extern "C" fn silent(_: *mut c_void, _: *mut VirError) {}

/// libvirt's functions, loaded on first use.
pub(crate) fn api() -> Result<&'static Api, crate::Error> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    ekko_dl::once(
        &API,
        LIBRARY,
        "backing up libvirt domains needs libvirt's client library",
        "libvirt0",
        |lib| {
            // SAFETY: the table declares libvirt's own signatures.
            let api = unsafe { Api::load(lib) }
                .map_err(|e| format!("{e}: libvirt 7.2 or newer is needed"))?;
            // SAFETY: no arguments; both may be called at any time.
            if unsafe { (api.initialize)() } < 0 {
                return Err(format!("{LIBRARY}: virInitialize failed"));
            }
            unsafe { (api.set_error_func)(std::ptr::null_mut(), Some(silent)) };
            Ok(api)
        },
    )
    .map_err(|message| crate::Error::Load { message })
}

/// This thread's last libvirt error: its code and message.
pub(crate) fn last_error(api: &Api) -> (i32, String) {
    // SAFETY: NULL or a pointer to this thread's error, valid until the
    // next libvirt call on this thread; the message is copied at once.
    let e = unsafe { (api.get_last_error)() };
    if e.is_null() {
        return (-1, "an unknown libvirt error occurred".into());
    }
    let (code, msg) = unsafe { ((*e).code, (*e).message) };
    let message = if msg.is_null() {
        format!("libvirt error {code}")
    } else {
        unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned()
    };
    (code, message)
}
