//! `ekko prune`: delete what no snapshot references (see docs/GC.md).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use ekko::prune::{PruneOptions, PruneReport};

use super::Global;

#[derive(Args, Clone)]
pub struct GcArgs {
    /// How long a pack stays marked before a later prune deletes it; also
    /// how old a pack must be before it is marked. Must exceed the longest
    /// backup.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// Bound on the skew of the store's timestamps, plus listing delay and
    /// the time a manifest upload takes (docs/GC.md). Backups that did not see a mark must finish within
    /// grace − 2 × skew.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub clock_skew: Duration,
    /// Repack a pack when at least this percentage of it is garbage.
    #[arg(long, default_value_t = ekko::prune::DEFAULT_REPACK_THRESHOLD, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub repack_threshold: u8,
    /// Crash tests: pause after every change to the repository.
    #[arg(long, hide = true, value_parser = humantime::parse_duration)]
    pub crash_test_delay: Option<Duration>,
}

impl GcArgs {
    pub fn options(&self, dry_run: bool) -> PruneOptions {
        PruneOptions {
            grace: self.grace,
            skew: self.clock_skew,
            repack_threshold: self.repack_threshold,
            dry_run,
            step_delay: self.crash_test_delay,
            assume_forgotten: Default::default(),
        }
    }
}

#[derive(Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub gc: GcArgs,
    /// Report what would be deleted, marked and repacked; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print a JSON report.
    #[arg(long)]
    json: bool,
}

pub fn print_report(g: &Global, r: &PruneReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    if g.quiet {
        return Ok(());
    }
    let would = if r.dry_run { "would be " } else { "" };
    println!(
        "{} snapshots reference {} chunks in {} packs",
        r.snapshots, r.chunks_referenced, r.packs
    );
    println!(
        "freed: {} packs, {} {}deleted ({} marked packs kept: a snapshot came to need them)",
        r.packs_deleted,
        super::mb(r.bytes_deleted),
        would,
        r.packs_kept_referenced
    );
    println!(
        "marked for deletion: {} packs, {} ({} repacked: {} of live data copied into {} new packs)",
        r.packs_marked,
        super::mb(r.bytes_marked),
        r.packs_repacked,
        super::mb(r.bytes_repacked),
        r.packs_written
    );
    if r.packs_too_young > 0 {
        println!(
            "not judged: {} packs younger than the grace period (a backup may still be writing them)",
            r.packs_too_young
        );
    }
    if let Some(t) = &r.next_deletion {
        println!(
            "{} mark(s) pending: run prune again after {t} to delete their packs",
            r.marks_pending
        );
    }
    if r.temporaries_removed > 0 {
        println!(
            "temporary files left by interrupted writes: {}, {} {}removed",
            r.temporaries_removed,
            super::mb(r.bytes_temporaries),
            would
        );
    }
    if r.chunks_lost > 0 {
        println!(
            "lost chunks (recorded by a repair) still referenced: {}; the snapshots that need them stay incomplete until a backup stores the data again",
            r.chunks_lost
        );
    }
    if r.lost_map_nodes > 0 {
        println!(
            "GC HELD: nothing marked or repacked: {} lost block-map node(s) hide what their snapshots need. Forgetting the snapshots that reference them releases it (or putting the lost pack back and running `ekko check --repair`); a backup brings a node back only if the disk still holds exactly what it mapped. Incomplete snapshots: {}",
            r.lost_map_nodes,
            r.held_by.join(" ")
        );
    }
    if r.lost_records_removed > 0 {
        println!(
            "lost-chunk records {}removed (their chunks are back, or no longer referenced): {}",
            would, r.lost_records_removed
        );
    }
    println!(
        "index: {} files {}written, {} {}removed; {:.2} s",
        r.index_files_written, would, r.index_files_removed, would, r.seconds
    );
    Ok(())
}

pub fn run(g: &Global, a: PruneArgs) -> Result<ExitCode> {
    let repo = g.open()?;
    let r = ekko::prune::prune(&repo, &a.gc.options(a.dry_run))?;
    print_report(g, &r, a.json)?;
    // Held garbage collection is damage that needs a decision: cron sees it.
    Ok(if r.lost_map_nodes > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}
