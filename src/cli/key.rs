use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;

use super::Global;

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Add a passphrase. The new one comes from EKKO_NEW_PASSWORD or
    /// EKKO_NEW_PASSWORD_FILE, or a prompt.
    Add,
    /// List key files.
    List,
    /// Remove a key file, so that its passphrase no longer opens the
    /// repository. The passphrase given must open another key file.
    Remove {
        /// The key file, as `ekko key list` prints it.
        key: String,
        /// Race tests: pause between the checks and the deletion.
        #[arg(long, hide = true, value_parser = humantime::parse_duration)]
        crash_test_delay: Option<std::time::Duration>,
    },
}

pub fn run(g: &Global, c: KeyCommand) -> Result<ExitCode> {
    match c {
        KeyCommand::Add => {
            let (ring, current) = g.open_keyring()?;
            let current = current.context("the repository is not encrypted; it has no keys")?;
            let new = if let Some(f) = std::env::var_os("EKKO_NEW_PASSWORD_FILE") {
                ekko::secret::read_file(std::path::Path::new(&f))?
            } else if let Some(p) = std::env::var_os("EKKO_NEW_PASSWORD") {
                anyhow::ensure!(!p.is_empty(), "EKKO_NEW_PASSWORD is set but empty");
                p.into_encoded_bytes()
            } else {
                super::prompt_new_passphrase().context(
                    "no new passphrase: set EKKO_NEW_PASSWORD or EKKO_NEW_PASSWORD_FILE, or run on a terminal to type one",
                )??
            };
            let name = ring.add_key(&current, &new)?;
            println!("{name}");
        }
        KeyCommand::Remove {
            key,
            crash_test_delay,
        } => {
            let (ring, current) = g.open_keyring()?;
            let current = current.context("the repository is not encrypted; it has no keys")?;
            let name = ring.remove_key_pausing(&current, &key, crash_test_delay)?;
            if !g.quiet {
                eprintln!("removed {name}");
            }
        }
        KeyCommand::List => {
            // Opening checks the passphrase, as every other command does,
            // and tells which key file it opens.
            let (ring, _) = g.open_keyring()?;
            let mine = ring.opened_with();
            for name in ring.list()? {
                println!("{name}");
                if !g.quiet && mine == Some(name.as_str()) {
                    eprintln!("(the passphrase given opens {name})");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
