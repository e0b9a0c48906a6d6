//! `ekko unlock`: remove locks whose holders are gone.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::Global;

#[derive(Args)]
pub struct UnlockArgs {
    /// Remove every lock, live or not. Only when no ekko process, on any
    /// host, uses the repository.
    #[arg(long)]
    remove_all: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(g: &Global, a: UnlockArgs) -> Result<ExitCode> {
    let repo = g.open()?;
    let r = ekko::lock::unlock(repo.backend(), repo.keys(), a.remove_all)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else if !g.quiet {
        for l in &r.removed {
            eprintln!("removed {}: {} ({})", l.name, l.holder, l.reason);
        }
        for l in &r.live {
            eprintln!("kept {}: {} (may still be running)", l.name, l.holder);
        }
        eprintln!("{} lock(s) removed, {} kept", r.removed.len(), r.live.len());
    }
    Ok(ExitCode::SUCCESS)
}
