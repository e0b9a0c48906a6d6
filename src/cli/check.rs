use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use ekko::check::ReadData;

use super::Global;

#[derive(Args)]
pub struct CheckArgs {
    /// Also read, decrypt and verify every chunk.
    #[arg(long, conflicts_with = "read_data_subset")]
    read_data: bool,
    /// Read, decrypt and verify the chunks of only some packs: `N/M` for
    /// part N of M (`$(date +%u)/7` every night reads
    /// everything each week), or `P%` for a random P percent.
    #[arg(long, value_name = "N/M|P%", value_parser = ReadData::parse_subset)]
    read_data_subset: Option<ReadData>,
    #[arg(long)]
    json: bool,
    #[arg(long, default_value_t = super::default_threads())]
    threads: usize,
}

pub fn run(g: &Global, a: CheckArgs) -> Result<ExitCode> {
    let repo = g.open()?;
    let read = match (a.read_data, a.read_data_subset) {
        (_, Some(subset)) => subset,
        (true, None) => ReadData::All,
        (false, None) => ReadData::None,
    };
    let r = ekko::check::check(&repo, read, a.threads)?;
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
                if read != ReadData::None {
                    format!(
                        " ({} read and verified, from {} of {} packs)",
                        r.chunks_read, r.packs_read, r.packs
                    )
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
