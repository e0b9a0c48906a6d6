//! Load a C library when it is first needed, not when the program starts.
//!
//! Ekko calls two system libraries, libnbd (to read NBD exports) and
//! libvirt (for `--domain`). Linked, they load with all their dependencies
//! (about 60 shared libraries together, among them ICU, GnuTLS and
//! Kerberos) at the start of every `ekko` command, which costs tens of
//! milliseconds with a cold page cache, and an `ekko` linked with them does
//! not start at all on a host that lacks them. Loaded with [`Library::open`]
//! and described by [`api!`], each loads only when a command uses it, and
//! its absence is an error that command can explain.

use std::ffi::{c_void, CStr, CString};
use std::sync::OnceLock;

/// A library opened with `dlopen`. It is never closed: the function
/// pointers taken from it stay valid for the life of the process.
pub struct Library {
    handle: *mut c_void,
    name: String,
}

// SAFETY: a dlopen handle may be used from any thread (dlsym is
// thread-safe); it is never closed.
unsafe impl Send for Library {}
unsafe impl Sync for Library {}

impl Library {
    /// Opens `name` (a soname such as `libnbd.so.0`, found the way the
    /// dynamic linker finds libraries). The error is `dlerror`'s text.
    pub fn open(name: &str) -> Result<Library, String> {
        let c = CString::new(name).map_err(|_| format!("{name:?} contains a NUL byte"))?;
        // SAFETY: a NUL-terminated name. RTLD_LOCAL keeps the library's
        // symbols out of the global namespace.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(last_dl_error());
        }
        Ok(Library {
            handle,
            name: name.to_string(),
        })
    }

    /// The address of the function `symbol`.
    pub fn symbol(&self, symbol: &str) -> Result<*mut c_void, String> {
        let c = CString::new(symbol).map_err(|_| format!("{symbol:?} contains a NUL byte"))?;
        // SAFETY: a live handle and a NUL-terminated name.
        let p = unsafe { libc::dlsym(self.handle, c.as_ptr()) };
        if p.is_null() {
            return Err(format!("{} has no function {symbol}", self.name));
        }
        Ok(p)
    }
}

/// The function table of library `soname`, built by `load` the first time
/// and kept in `cell`; or why it cannot be: a missing library is an error
/// that says what it is needed for (`needed_for`) and which Debian
/// `package` provides it.
pub fn once<T>(
    cell: &'static OnceLock<Result<T, String>>,
    soname: &str,
    needed_for: &str,
    package: &str,
    load: impl FnOnce(&Library) -> Result<T, String>,
) -> Result<&'static T, String> {
    cell.get_or_init(|| {
        let lib = Library::open(soname).map_err(|why| {
            format!("cannot load {soname} ({why}); {needed_for} (Debian: apt install {package})")
        })?;
        load(&lib)
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn last_dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated message, which is
    // copied at once.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        return "not found".into();
    }
    unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
}

/// Declares a struct of C function pointers and its `load` function, which
/// resolves each field by its C name from a [`Library`]:
///
/// ```ignore
/// ekko_dl::api! {
///     pub(crate) struct Api {
///         create = "nbd_create": fn() -> *mut Handle;
///         close = "nbd_close": fn(*mut Handle);
///     }
/// }
/// ```
///
/// `load` is unsafe: the caller promises that each named function has the
/// signature given for it, as the C header declares it.
#[macro_export]
macro_rules! api {
    ($vis:vis struct $name:ident {
        $($field:ident = $sym:literal: fn($($arg:ty),*) $(-> $ret:ty)?;)*
    }) => {
        $vis struct $name {
            $(pub $field: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)*
        }

        impl $name {
            /// # Safety
            /// Each function of `lib` has the signature declared here.
            $vis unsafe fn load(lib: &$crate::Library) -> Result<$name, String> {
                Ok($name {
                    $($field: {
                        let p = lib.symbol($sym)?;
                        // SAFETY: the caller's promise: the C function has
                        // exactly this signature.
                        unsafe {
                            std::mem::transmute::<
                                *mut std::ffi::c_void,
                                unsafe extern "C" fn($($arg),*) $(-> $ret)?,
                            >(p)
                        }
                    },)*
                })
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    api! {
        struct Libc {
            strlen = "strlen": fn(*const std::ffi::c_char) -> usize;
        }
    }

    #[test]
    fn loads_and_calls_a_function() {
        let lib = Library::open("libc.so.6").unwrap();
        // SAFETY: strlen has this signature.
        let api = unsafe { Libc::load(&lib) }.unwrap();
        assert_eq!(unsafe { (api.strlen)(c"hello".as_ptr()) }, 5);
    }

    #[test]
    fn once_loads_once_and_says_what_to_install() {
        static LIBC: OnceLock<Result<Libc, String>> = OnceLock::new();
        let mut calls = 0;
        for _ in 0..2 {
            // SAFETY: strlen has this signature.
            let api = once(&LIBC, "libc.so.6", "", "libc6", |lib| {
                calls += 1;
                unsafe { Libc::load(lib) }
            })
            .unwrap();
            assert_eq!(unsafe { (api.strlen)(c"abc".as_ptr()) }, 3);
        }
        assert_eq!(calls, 1);
        static MISSING: OnceLock<Result<(), String>> = OnceLock::new();
        let e = once(
            &MISSING,
            "libekko-none.so.0",
            "X needs it",
            "ekko-none",
            |_| Ok(()),
        )
        .unwrap_err();
        assert!(
            e.contains("X needs it (Debian: apt install ekko-none)"),
            "{e}"
        );
    }

    #[test]
    fn missing_library_and_symbol_are_errors() {
        let e = Library::open("libekko-no-such-library.so.0").err().unwrap();
        assert!(e.contains("libekko-no-such-library"), "{e}");
        let lib = Library::open("libc.so.6").unwrap();
        let e = lib.symbol("ekko_no_such_function").unwrap_err();
        assert!(e.contains("ekko_no_such_function"), "{e}");
    }
}
