use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

use super::Global;

#[derive(Subcommand)]
pub enum IndexCommand {
    /// Rebuild the index files from the packs' trailers (after index files
    /// were lost or damaged). Takes the exclusive lock.
    Rebuild,
}

pub fn run(g: &Global, c: IndexCommand) -> Result<ExitCode> {
    match c {
        IndexCommand::Rebuild => {
            let repo = g.open_without_cache()?;
            let r = ekko::repair::rebuild_index(&repo)?;
            eprintln!(
                "indexed {} chunks from {} packs into {} index file(s); removed {} old index file(s)",
                r.chunks, r.packs, r.index_files_written, r.index_files_removed
            );
            for p in &r.unreadable_packs {
                eprintln!("unreadable pack trailer: {p}");
            }
            if !r.unreadable_packs.is_empty() {
                eprintln!(
                    "kept {} entries the old index files had for those packs; run `ekko check --read-data` to see what is damaged",
                    r.chunks_kept
                );
            }
            Ok(if r.unreadable_packs.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
    }
}
