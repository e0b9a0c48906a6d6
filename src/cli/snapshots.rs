use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::Global;

#[derive(Args)]
pub struct SnapshotsArgs {
    /// Only this VM's snapshots.
    #[arg(long)]
    vm: Option<String>,
    /// Only snapshots carrying this tag; given several times, only those
    /// carrying every one.
    #[arg(long = "tag", value_name = "TAG", value_parser = super::backup::parse_tag)]
    tags: Vec<String>,
    /// One JSON array on stdout (id, vm, time, parent, host, tags, disks, …).
    #[arg(long)]
    json: bool,
}

pub fn run(g: &Global, a: SnapshotsArgs) -> Result<ExitCode> {
    let repo = g.open()?;
    let (snaps, bad) = ekko::snapshot::load_all(repo.backend().as_ref(), repo.keys())?;
    for e in &bad {
        eprintln!("ekko: warning: {e}");
    }
    let snaps: Vec<_> = snaps
        .into_iter()
        .filter(|s| a.vm.as_ref().is_none_or(|v| &s.vm == v))
        .filter(|s| s.has_tags(&a.tags))
        .collect();
    let protected = ekko::gc::protected_ids(repo.backend().as_ref())?;
    let mut out = std::io::stdout().lock();
    if a.json {
        let v: Vec<_> = snaps
            .iter()
            .map(|s| {
                let mut v = json!({
                    "id": s.id, "vm": s.vm, "time": s.time, "parent": s.parent, "host": s.host,
                    "protected": protected.contains(&s.id), "tags": s.tags,
                    "disks": s.disks.iter().map(|d| json!({
                        "name": d.name, "size": d.size, "chunk_size": d.chunk_size,
                        "mode": d.capture.mode, "bitmap": d.capture.bitmap,
                        "next_bitmap": d.capture.next_bitmap, "source": d.source,
                        "bytes_new": d.stats.bytes_new,
                        "bytes_stored": d.stats.bytes_stored,
                    })).collect::<Vec<_>>(),
                });
                if let Some(d) = &s.domain {
                    v["domain"] = json!(d);
                }
                v
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(
            out,
            "{:<10} {:<16} {:<31} {:<12} {:<9} {:>10}  disks",
            "id", "vm", "time", "mode", "protected", "added"
        )?;
        let any_tags = snaps.iter().any(|s| !s.tags.is_empty());
        for s in &snaps {
            let mode = if s
                .disks
                .iter()
                .any(|d| d.capture.mode == ekko::snapshot::CaptureMode::Incremental)
            {
                "incremental"
            } else {
                "full"
            };
            let disks: Vec<String> = s
                .disks
                .iter()
                .map(|d| format!("{}({} MiB)", d.name, d.size >> 20))
                .collect();
            // What this snapshot added to the repository, after
            // deduplication and compression.
            let added: u64 = s.disks.iter().map(|d| d.stats.bytes_stored).sum();
            writeln!(
                out,
                "{:<10} {:<16} {:<31} {:<12} {:<9} {:>10}  {}{}",
                s.short_id(),
                s.vm,
                s.time,
                mode,
                if protected.contains(&s.id) { "yes" } else { "" },
                super::mb(added),
                disks.join(" "),
                if any_tags && !s.tags.is_empty() {
                    format!("  tags: {}", s.tags.join(","))
                } else {
                    String::new()
                }
            )?;
        }
    }
    if bad.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        // The list above is incomplete: a script must not take it for the
        // whole truth (for example to pick the newest snapshot).
        eprintln!(
            "ekko: {} snapshot manifest(s) could not be read and are missing from this list; \
             `ekko check --repair` puts back those this host's cache holds",
            bad.len()
        );
        Ok(ExitCode::from(3))
    }
}
