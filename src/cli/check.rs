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
    /// Repair what the check finds, under the exclusive lock: copy the
    /// intact chunks of damaged packs into new packs, rebuild the index
    /// (dropping damaged chunks and packs that are gone), delete the
    /// damaged packs, and record what snapshots still lack, so that the
    /// next backup of each affected VM reads its disks in full and, where
    /// they still hold the data, brings those snapshots back whole. Give it
    /// with --read-data to find every damaged chunk.
    #[arg(long)]
    repair: bool,
    /// With --repair: a pack whose header names a format version this ekko
    /// does not know, and some of whose chunks fail verification, is
    /// treated as a damaged pack of this version (its intact chunks are
    /// kept, the others recorded as lost). Only for a repository that no
    /// newer ekko writes to; without it the repair refuses such a pack.
    #[arg(long, requires = "repair")]
    rewrite_unknown_versions: bool,
    /// Crash tests: pause after every change a repair makes.
    #[arg(long, hide = true, value_parser = humantime::parse_duration)]
    crash_test_delay: Option<std::time::Duration>,
    /// The report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Threads reading and verifying packs.
    #[arg(long, default_value_t = super::default_threads(), value_parser = super::at_least_one)]
    threads: usize,
}

pub fn run(g: &Global, a: CheckArgs) -> Result<ExitCode> {
    let repo = g.open()?;
    let read = match (a.read_data, a.read_data_subset) {
        (_, Some(subset)) => subset,
        (true, None) => ReadData::All,
        (false, None) => ReadData::None,
    };
    if a.repair {
        if read == ReadData::None && !g.quiet {
            eprintln!("note: without --read-data only structural damage is found and repaired");
        }
        let opts = ekko::repair::RepairOptions {
            step_delay: a.crash_test_delay,
            rewrite_unknown_versions: a.rewrite_unknown_versions,
        };
        let r = ekko::repair::check_and_repair(&repo, read, a.threads, &opts)?;
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "before": r.before,
                    "repair": r.repair,
                    "after": r.after,
                }))?
            );
        } else {
            if !r.before.ok() {
                println!("found:");
                for p in &r.before.problems {
                    println!("  {p}");
                }
            }
            let Some(after) = &r.after else {
                if !g.quiet {
                    eprintln!("the repository checks clean: nothing to repair");
                }
                return Ok(exit(true));
            };
            print_repair(&r.repair);
            if !after.ok() {
                println!("after the repair:");
                for p in &after.problems {
                    println!("  {p}");
                }
            }
            if !g.quiet {
                eprintln!(
                    "{}",
                    if after.ok() {
                        "the repository checks clean".to_string()
                    } else {
                        format!("{} problems remain", after.problems.len())
                    }
                );
            }
        }
        return Ok(exit(r.ok()));
    }
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
            let all_known_lost = r.chunks_known_lost > 0
                && r.chunks_known_lost == r.damaged_chunks.len()
                && r.problems.len() == r.damaged_chunks.len() + r.damaged_snapshots.len();
            if !r.damage.unreadable_packs.is_empty() {
                eprintln!(
                    "{} pack(s) could not be read (an I/O, permission or store error, not damage seen): make them readable and check again; a repair leaves them alone",
                    r.damage.unreadable_packs.len()
                );
            }
            if all_known_lost {
                eprintln!(
                    "every damaged chunk is known lost: the next backup of each affected VM stores what its disks still hold; forget the snapshots whose data is gone for good"
                );
            } else if !r.ok() {
                eprintln!(
                    "`ekko check --read-data --repair` keeps every intact chunk, drops the damage, rebuilds the index, puts back damaged snapshot manifests from this host's cache, and has the next backup of each affected VM store lost data again"
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
    Ok(exit(r.ok()))
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}

fn print_repair(r: &ekko::repair::RepairReport) {
    for (from, to) in &r.packs_moved_back {
        println!("repair: {from} is pack {to}, stored under another name: copied back to {to}");
    }
    if r.packs_replaced + r.packs_written + r.chunks_dropped + r.packs_missing > 0
        || !r.packs_kept.is_empty()
    {
        println!(
            "repair: {} damaged pack(s) replaced by {} new pack(s): {} intact chunk(s) saved, {} damaged chunk(s) dropped; {} missing pack(s) dropped from the index",
            r.packs_replaced, r.packs_written, r.chunks_salvaged, r.chunks_dropped, r.packs_missing
        );
    }
    for p in &r.packs_kept {
        println!(
            "repair: kept damaged pack {p}: its trailer is damaged and the index entries do not cover all of it, so it may hold chunks that snapshots lack; it goes once none does"
        );
    }
    if r.index_files_written + r.index_files_removed > 0 {
        println!(
            "repair: index rewritten: {} file(s) written, {} removed",
            r.index_files_written, r.index_files_removed
        );
    }
    if r.marks_removed > 0 {
        println!(
            "repair: {} damaged GC mark(s) removed (a later prune judges their packs afresh)",
            r.marks_removed
        );
    }
    if r.protections_rewritten > 0 {
        println!(
            "repair: {} damaged protect object(s) written again",
            r.protections_rewritten
        );
    }
    if r.manifests_restored > 0 {
        println!(
            "repair: {} damaged snapshot manifest(s) put back from this host's manifest cache",
            r.manifests_restored
        );
    }
    for m in &r.manifests_damaged {
        println!(
            "repair: {m} is damaged and this host's cache has no good copy (a repair on the host that made or listed the snapshot may have one)"
        );
    }
    if r.chunks_lost > 0 {
        println!(
            "repair: {} chunk(s) are lost; {} snapshot(s) reference them and are incomplete until a backup stores the same data again:",
            r.chunks_lost,
            r.snapshots_incomplete.len()
        );
        for s in &r.snapshots_incomplete {
            println!("  {s}");
        }
        println!(
            "repair: the next backup of those VMs reads their disks in full (recorded in {}); forget the snapshots whose data is gone for good",
            r.lost_record.as_deref().unwrap_or("a lost-chunk record")
        );
    } else if r.lost_records_removed > 0 {
        println!(
            "repair: no snapshot lacks a chunk any more; {} lost-chunk record(s) removed",
            r.lost_records_removed
        );
    }
}
