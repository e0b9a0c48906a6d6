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
        KeyCommand::List => {
            for o in g.backend()?.list("keys/")? {
                println!("{}", o.name);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
