use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::Global;

#[derive(Args)]
pub struct CheckArgs {
    /// Also read, decrypt and verify every chunk.
    #[arg(long)]
    read_data: bool,
    #[arg(long)]
    json: bool,
    #[arg(long, default_value_t = super::default_threads())]
    threads: usize,
}

pub fn run(g: &Global, a: CheckArgs) -> Result<ExitCode> {
    let repo = g.open()?;
    let r = ekko::check::check(&repo, a.read_data, a.threads)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for p in &r.problems {
            println!("{p}");
        }
        if !g.quiet {
            eprintln!(
                "checked {} snapshots, {} packs, {} index files, {} chunks{}: {}",
                r.snapshots,
                r.packs,
                r.index_files,
                r.chunks,
                if a.read_data {
                    format!(" ({} read and verified)", r.chunks_read)
                } else {
                    String::new()
                },
                if r.ok() {
                    "no problems".to_string()
                } else {
                    format!("{} PROBLEMS", r.problems.len())
                }
            );
            if r.gc_marks > 0 {
                eprintln!(
                    "{} GC mark(s) name {} pack(s) that a later prune deletes (normal)",
                    r.gc_marks, r.packs_marked
                );
            }
            if r.unreferenced_packs > 0 {
                eprintln!(
                    "{} pack(s) are not referenced by any index (left by interrupted backups)",
                    r.unreferenced_packs
                );
            }
        }
    }
    Ok(if r.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}
