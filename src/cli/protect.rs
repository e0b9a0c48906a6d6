//! `ekko protect`: keep a snapshot from ever being forgotten.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::Global;

#[derive(Args)]
pub struct ProtectArgs {
    /// The snapshot: an id, a unique prefix, or VM@latest.
    snapshot: String,
    /// Remove the protection instead.
    #[arg(long)]
    remove: bool,
}

pub fn run(g: &Global, a: ProtectArgs) -> Result<ExitCode> {
    let repo = g.open()?;
    let backend = repo.backend().as_ref();
    let snap = ekko::snapshot::resolve(backend, repo.keys(), &a.snapshot)?;
    if a.remove {
        let had = ekko::gc::unprotect(backend, &snap.id)?;
        if !g.quiet {
            eprintln!(
                "snapshot {} of {} {}",
                snap.short_id(),
                snap.vm,
                if had {
                    "is no longer protected"
                } else {
                    "was not protected"
                }
            );
        }
    } else {
        ekko::gc::protect(backend, repo.keys(), &snap.id)?;
        if !g.quiet {
            eprintln!("snapshot {} of {} is protected", snap.short_id(), snap.vm);
        }
    }
    println!("{}", snap.id);
    Ok(ExitCode::SUCCESS)
}
