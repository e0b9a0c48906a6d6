//! `ekko diff`: the byte ranges of each disk that changed between two
//! snapshots, from their block maps (no data is read).

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use ekko::reader::{NodeCache, RepoNodes};
use serde_json::json;

use super::Global;

#[derive(Args)]
pub struct DiffArgs {
    /// The earlier snapshot: id, unique prefix, or VM@latest.
    from: String,
    /// The later snapshot.
    to: String,
    /// Only this disk.
    #[arg(long)]
    disk: Option<String>,
    /// One JSON object on stdout: every disk with its changed ranges.
    #[arg(long)]
    json: bool,
}

pub fn run(g: &Global, a: DiffArgs) -> Result<ExitCode> {
    let repo = g.open()?;
    let (backend, keys) = (repo.backend().as_ref(), repo.keys());
    let from = ekko::snapshot::resolve_exact(backend, keys, &a.from)?;
    let to = ekko::snapshot::resolve_exact(backend, keys, &a.to)?;
    let mut names: Vec<&str> = from.disks.iter().map(|d| d.name.as_str()).collect();
    for d in &to.disks {
        if !names.contains(&d.name.as_str()) {
            names.push(&d.name);
        }
    }
    if let Some(d) = &a.disk {
        if !names.contains(&d.as_str()) {
            anyhow::bail!(
                "no disk {d:?} in snapshot {} or {} (they have: {})",
                from.short_id(),
                to.short_id(),
                names.join(", ")
            );
        }
        names = vec![d.as_str()];
    }
    let cache = NodeCache::new(4096);
    let nodes = RepoNodes {
        repo: &repo,
        cache: &cache,
    };
    let mut disks = Vec::new();
    let mut out = std::io::stdout().lock();
    if !a.json {
        writeln!(
            out,
            "from {} ({}) to {} ({})",
            from.id, from.time, to.id, to.time
        )?;
    }
    for name in names {
        let (x, y) = (from.disk(name).ok(), to.disk(name).ok());
        let (status, ranges) = match (x, y) {
            (Some(x), Some(y)) => {
                let r = ekko::diff::changed(&nodes, x, y)
                    .with_context(|| format!("comparing disk {name}"))?;
                (if r.is_empty() { "same" } else { "changed" }, r)
            }
            (None, Some(_)) => ("added", Vec::new()),
            (Some(_), None) => ("removed", Vec::new()),
            (None, None) => unreachable!("a name from one of the snapshots"),
        };
        let changed: u64 = ranges.iter().map(|r| r.length).sum();
        let size = |d: Option<&ekko::snapshot::Disk>| d.map(|d| d.size);
        if a.json {
            disks.push(json!({
                "name": name, "status": status,
                "size_from": size(x), "size_to": size(y),
                "changed_bytes": changed, "ranges": ranges,
            }));
            continue;
        }
        match status {
            "added" | "removed" => writeln!(out, "{name}: {status}")?,
            _ => {
                writeln!(
                    out,
                    "{name}: {} changed in {} range(s) of {}",
                    super::mb(changed),
                    ranges.len(),
                    super::mb(size(y).unwrap_or(0))
                )?;
                if !ranges.is_empty() {
                    writeln!(out, "  {:>16} {:>14}", "offset", "length")?;
                }
                for r in &ranges {
                    writeln!(out, "  {:>16} {:>14}", r.offset, r.length)?;
                }
            }
        }
    }
    if a.json {
        let v = json!({ "from": from.id, "to": to.id, "disks": disks });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    }
    Ok(ExitCode::SUCCESS)
}
