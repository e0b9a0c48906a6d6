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
            let repo = g.open()?;
            let current = g.passphrase("Current passphrase: ")?;
            let new = if let Some(f) = std::env::var_os("EKKO_NEW_PASSWORD_FILE") {
                ekko::secret::from_env(Some(std::path::Path::new(&f)))?.context("empty")?
            } else if let Some(p) = std::env::var_os("EKKO_NEW_PASSWORD") {
                p.into_encoded_bytes()
            } else {
                rpassword::prompt_password("New passphrase: ")?.into_bytes()
            };
            let name = repo.add_key(&current, &new)?;
            println!("{name}");
        }
        KeyCommand::Remove {
            key,
            crash_test_delay,
        } => {
            let repo = g.open()?;
            let current = g.passphrase("Current passphrase: ")?;
            let name = repo.remove_key_pausing(&current, &key, crash_test_delay)?;
            if !g.quiet {
                eprintln!("removed {name}");
            }
        }
        KeyCommand::List => {
            for o in g.backend()?.list("keys/")? {
                println!("{}", o.name);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
