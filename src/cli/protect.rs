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
    let snap = match ekko::snapshot::resolve_exact(backend, repo.keys(), &a.snapshot) {
        // A protected snapshot whose manifest is damaged beyond repair:
        // its protection must be removable, or forget could never remove
        // it (and prune stays blocked by it).
        Err(e)
            if a.remove
                && e.is_damage()
                && ekko::snapshot::is_listed_full_id(backend, &a.snapshot) =>
        {
            let id = a.snapshot.to_ascii_lowercase();
            let had = ekko::gc::unprotect(backend, &id)?;
            if !g.quiet {
                eprintln!(
                    "snapshot {} (its manifest is damaged) {}",
                    id,
                    if had {
                        "is no longer protected"
                    } else {
                        "was not protected"
                    }
                );
            }
            println!("{id}");
            return Ok(ExitCode::SUCCESS);
        }
        // A protected snapshot whose manifest is gone: check reports it,
        // and this is how a user who meant it to go says so.
        Err(ekko::Error::SnapshotNotFound { .. })
            if a.remove
                && ekko::gc::protected_ids(backend)?.contains(&a.snapshot.to_ascii_lowercase()) =>
        {
            let id = a.snapshot.to_ascii_lowercase();
            ekko::gc::unprotect(backend, &id)?;
            if !g.quiet {
                eprintln!("snapshot {id} (its manifest is gone) is no longer protected");
            }
            println!("{id}");
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) if a.remove && e.is_damage() => {
            anyhow::bail!(
                "{e}; to unprotect a snapshot whose manifest is damaged, name it by its full id"
            )
        }
        r => r?,
    };
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
