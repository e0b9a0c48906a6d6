//! Where a passphrase comes from: `EKKO_PASSWORD`, a password file given as
//! an argument or by `EKKO_PASSWORD_FILE`. Never from a command-line
//! argument, where `ps` would show it. The binary adds a prompt on a tty.

use std::path::Path;

use crate::error::{Error, Result};

/// The passphrase from the environment or `file`, if any is configured.
pub fn from_env(file: Option<&Path>) -> Result<Option<Vec<u8>>> {
    if let Some(f) = file {
        return read_file(f).map(Some);
    }
    if let Some(p) = std::env::var_os("EKKO_PASSWORD_FILE") {
        return read_file(Path::new(&p)).map(Some);
    }
    if let Some(p) = std::env::var_os("EKKO_PASSWORD") {
        use std::os::unix::ffi::OsStringExt;
        if p.is_empty() {
            return Err(Error::Invalid(
                "EKKO_PASSWORD is set but empty: set it to the passphrase, or unset it".into(),
            ));
        }
        return Ok(Some(p.into_vec()));
    }
    Ok(None)
}

/// The passphrase in the file `f`, without a trailing newline. A missing
/// or empty file is an error that names it as the password file.
pub fn read_file(f: &Path) -> Result<Vec<u8>> {
    let mut data = std::fs::read(f).map_err(|e| {
        Error::Invalid(format!(
            "cannot read the password file {}: {e}",
            f.display()
        ))
    })?;
    // A trailing newline is an artefact of `echo pass > file`, not a secret.
    while data.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        data.pop();
    }
    if data.is_empty() {
        return Err(Error::Invalid(format!(
            "the password file {} is empty: write the passphrase into it",
            f.display()
        )));
    }
    Ok(data)
}
