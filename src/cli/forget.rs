//! `ekko forget`: remove snapshot manifests by a retention policy (see
//! `ekko::retention` for the exact rules), and optionally prune.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use ekko::retention::{self, Policy};
use serde_json::json;

use super::prune::GcArgs;
use super::Global;

#[derive(Args)]
pub struct ForgetArgs {
    /// Forget these snapshots (ids, prefixes or VM@latest) instead of
    /// applying a policy. Protected ones are refused.
    #[arg(value_name = "SNAPSHOT", conflicts_with_all = ["keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly"])]
    snapshots: Vec<String>,
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_last: u32,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_hourly: u32,
    /// Keep the newest snapshot of each of the last N days (UTC) that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_daily: u32,
    /// Keep the newest snapshot of each of the last N ISO weeks that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_weekly: u32,
    /// Keep the newest snapshot of each of the last N months that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    keep_monthly: u32,
    /// Only this VM's snapshots (the policy always applies per VM).
    #[arg(long)]
    vm: Option<String>,
    /// Apply the policy only to snapshots carrying this tag (given several
    /// times: carrying every one); the others are left alone. Not with
    /// named snapshots.
    #[arg(long = "tag", value_name = "TAG", value_parser = super::backup::parse_tag, conflicts_with = "snapshots")]
    tags: Vec<String>,
    /// Show what would be removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Run `ekko prune` afterwards.
    #[arg(long)]
    prune: bool,
    #[command(flatten)]
    gc: GcArgs,
    /// Print a JSON report.
    #[arg(long)]
    json: bool,
}

pub fn run(g: &Global, a: ForgetArgs) -> Result<ExitCode> {
    let policy = Policy {
        last: a.keep_last,
        hourly: a.keep_hourly,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
    };
    if policy.is_empty() && a.snapshots.is_empty() {
        eprintln!("ekko: error: no retention policy given: pass at least one --keep-* option (nothing was removed)");
        return Ok(ExitCode::from(2));
    }
    let repo = g.open()?;
    let backend = repo.backend().as_ref();
    let keys = repo.keys();
    let _lock = if a.dry_run {
        None
    } else {
        Some(ekko::lock::Lock::gc(repo.backend(), keys, "forget")?)
    };
    let (snaps, bad) = ekko::snapshot::load_all(backend, keys)?;
    for e in &bad {
        eprintln!("ekko: warning: {e} (left alone)");
    }
    let snaps: Vec<_> = snaps
        .into_iter()
        .filter(|s| a.vm.as_ref().is_none_or(|v| &s.vm == v))
        .filter(|s| s.has_tags(&a.tags))
        .collect();
    if let Some(vm) = &a.vm {
        if snaps.is_empty() && !g.quiet {
            eprintln!("ekko: warning: no snapshot of VM {vm:?}; `ekko snapshots` lists the VMs");
        }
    }
    let protected = ekko::gc::protected_ids(backend)?;
    let mut damaged_named: Vec<String> = Vec::new();
    let decisions = if a.snapshots.is_empty() {
        retention::apply(&policy, &snaps, &protected)?
    } else {
        let mut named = std::collections::HashSet::new();
        for spec in &a.snapshots {
            if spec.ends_with("@latest") && !bad.is_empty() {
                anyhow::bail!(
                    "{spec}: {} snapshot manifest(s) do not open, and one may be {spec}'s newest snapshot; name the snapshot by its id (nothing was removed)",
                    bad.len()
                );
            }
            let s = match ekko::snapshot::resolve(backend, keys, spec) {
                // A manifest beyond repair, named by its full id: it goes.
                Err(e) if e.is_damage() && ekko::snapshot::is_listed_full_id(backend, spec) => {
                    let id = spec.to_ascii_lowercase();
                    if let Some(vm) = &a.vm {
                        anyhow::bail!(
                            "snapshot {id}: its manifest is damaged, so ekko cannot tell whether it belongs to VM {vm}; run the command without --vm to remove it (nothing was removed)"
                        );
                    }
                    if protected.contains(&id) {
                        anyhow::bail!(
                            "snapshot {id} is protected: run `ekko protect --remove {id}` first (nothing was removed)"
                        );
                    }
                    damaged_named.push(id);
                    continue;
                }
                Err(e) if e.is_damage() => {
                    let without = if a.vm.is_some() { ", without --vm" } else { "" };
                    anyhow::bail!(
                        "{e}; to remove a snapshot whose manifest is damaged, name it by its full id{without} (nothing was removed)"
                    )
                }
                // A prefix several VMs share: --vm narrows it (unless a
                // manifest does not open: it may be that VM's too).
                Err(e @ ekko::Error::AmbiguousSnapshot { .. })
                    if a.vm.is_some() && bad.is_empty() =>
                {
                    let prefix = spec.to_ascii_lowercase();
                    let mut of_vm = snaps.iter().filter(|s| s.id.starts_with(&prefix));
                    match (of_vm.next(), of_vm.next()) {
                        (Some(one), None) => one.clone(),
                        _ => return Err(e.into()),
                    }
                }
                r => r?,
            };
            if let Some(vm) = a.vm.as_ref().filter(|v| **v != s.vm) {
                anyhow::bail!(
                    "snapshot {} belongs to VM {}, not {vm} (nothing was removed)",
                    s.id,
                    s.vm
                );
            }
            if protected.contains(&s.id) {
                anyhow::bail!(
                    "snapshot {} is protected: run `ekko protect --remove {}` first (nothing was removed)",
                    s.id,
                    s.id
                );
            }
            named.insert(s.id);
        }
        snaps
            .iter()
            .map(|s| retention::Decision {
                id: s.id.clone(),
                vm: s.vm.clone(),
                time: s.time.clone(),
                keep: !named.contains(&s.id),
                reasons: if named.contains(&s.id) {
                    vec![]
                } else {
                    vec!["not named".into()]
                },
            })
            .collect()
    };
    let mut removed = 0usize;
    for id in &damaged_named {
        if !a.dry_run {
            backend.delete(&ekko::snapshot::snapshot_name(id))?;
        }
        if !a.json && !g.quiet {
            println!("(damaged manifest):");
            println!(
                "  remove {:<8} its manifest is damaged beyond repair",
                &id[..8]
            );
        }
        removed += 1;
    }
    for d in decisions.iter().filter(|d| !d.keep) {
        if !a.dry_run {
            backend.delete(&ekko::snapshot::snapshot_name(&d.id))?;
        }
        removed += 1;
    }
    if !a.json && !g.quiet {
        let mut vm = None;
        // Snapshots named on the command line: show what goes, not every
        // snapshot that stays.
        let by_name = !a.snapshots.is_empty();
        for d in decisions.iter().filter(|d| !(by_name && d.keep)) {
            if vm != Some(&d.vm) {
                println!("{}:", d.vm);
                vm = Some(&d.vm);
            }
            println!(
                "  {} {:<8} {:<31} {}",
                if d.keep { "keep  " } else { "remove" },
                &d.id[..8],
                d.time,
                d.reasons.join(", ")
            );
        }
        println!(
            "{} snapshot(s) {}removed, {} kept",
            removed,
            if a.dry_run { "would be " } else { "" },
            decisions.iter().filter(|d| d.keep).count()
        );
    }
    let pruned = if a.prune {
        drop(_lock);
        let mut opts = a.gc.options(a.dry_run);
        if a.dry_run {
            // Report the prune as it would run after this forget.
            opts.assume_forgotten = decisions
                .iter()
                .filter(|d| !d.keep)
                .map(|d| d.id.clone())
                .chain(damaged_named.iter().cloned())
                .collect();
        }
        Some(ekko::prune::prune(&repo, &opts)?)
    } else {
        None
    };
    if a.json {
        let v = json!({
            "dry_run": a.dry_run,
            "keep": decisions.iter().filter(|d| d.keep).collect::<Vec<_>>(),
            "remove": decisions.iter().filter(|d| !d.keep).collect::<Vec<_>>(),
            "remove_damaged": damaged_named,
            "prune": pruned,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if let Some(r) = &pruned {
        super::prune::print_report(g, r, false)?;
    }
    Ok(ExitCode::SUCCESS)
}
