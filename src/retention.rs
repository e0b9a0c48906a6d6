//! Retention policies for `ekko forget`: which snapshots to keep, and why.
//!
//! The policy is applied to each VM's snapshots separately, newest first
//! (by the snapshot's `time`, then id), with restic's semantics:
//!
//! - `last N` keeps the N newest snapshots.
//! - `hourly N` / `daily N` / `weekly N` / `monthly N` keep, for each of the
//!   N most recent hours / days / ISO weeks / months *that have snapshots*,
//!   the newest snapshot of that period. Periods are in UTC; weeks are ISO
//!   8601 weeks (Monday to Sunday, numbered by the year of their Thursday).
//! - A snapshot is kept if any rule keeps it; it then lists every rule that
//!   did. Each rule counts on its own: a snapshot kept by `last` also fills
//!   its day's `daily` slot.
//! - A protected snapshot is always kept (reason `protected`) and takes part
//!   in the rules like any other.
//! - A snapshot whose time cannot be read is kept (reason `unreadable time`).
//! - An empty policy is refused: it would remove everything.

use crate::time::{civil_from_days, days_from_civil};
use std::collections::HashSet;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::snapshot::Snapshot;

#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        self.last == 0
            && self.hourly == 0
            && self.daily == 0
            && self.weekly == 0
            && self.monthly == 0
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub id: String,
    pub vm: String,
    pub time: String,
    pub keep: bool,
    /// Why it is kept: `last`, `hourly`, `daily`, `weekly`, `monthly`,
    /// `protected`, `unreadable time`. Empty when it is removed.
    pub reasons: Vec<String>,
}

/// The period keys of one instant (seconds since the epoch, UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Periods {
    hour: i64,
    day: i64,
    week: (i64, i64),
    month: (i64, u32),
}

fn periods(secs: i64) -> Periods {
    let days = secs.div_euclid(86_400);
    let (y, m, _) = civil_from_days(days);
    // Monday = 0; 1970-01-01 was a Thursday.
    let weekday = (days + 3).rem_euclid(7);
    let thursday = days - weekday + 3;
    let (wy, _, _) = civil_from_days(thursday);
    let week = (thursday - days_from_civil(wy, 1, 1)) / 7 + 1;
    Periods {
        hour: secs.div_euclid(3600),
        day: days,
        week: (wy, week),
        month: (y, m),
    }
}

fn epoch_seconds(t: std::time::SystemTime) -> Option<i64> {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).ok(),
        Err(e) => i64::try_from(e.duration().as_secs()).ok().map(|s| -s),
    }
}

/// Decide for every snapshot. Snapshots of different VMs never compete.
/// The result is ordered by VM, then newest first.
pub fn apply(
    policy: &Policy,
    snaps: &[Snapshot],
    protected: &HashSet<String>,
) -> Result<Vec<Decision>> {
    if policy.is_empty() {
        return Err(Error::Invalid(
            "no retention policy given: pass at least one --keep-* option (nothing was removed)"
                .into(),
        ));
    }
    let mut vms: Vec<&str> = snaps.iter().map(|s| s.vm.as_str()).collect();
    vms.sort_unstable();
    vms.dedup();
    let mut out = Vec::with_capacity(snaps.len());
    for vm in vms {
        // Newest first, to the nanosecond (backups a moment apart must not
        // tie), then by id for a stable order.
        let mut group: Vec<(&Snapshot, Option<std::time::SystemTime>)> = snaps
            .iter()
            .filter(|s| s.vm == vm)
            .map(|s| (s, crate::time::parse_rfc3339(&s.time)))
            .collect();
        group.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.id.cmp(&a.0.id)));
        let mut last = 0u32;
        let mut counts = [0u32; 4];
        let mut prev: [Option<Periods>; 4] = [None; 4];
        let limits = [policy.hourly, policy.daily, policy.weekly, policy.monthly];
        let names = ["hourly", "daily", "weekly", "monthly"];
        for (s, t) in group {
            let secs = t.and_then(epoch_seconds);
            let mut reasons = Vec::new();
            if protected.contains(&s.id) {
                reasons.push("protected".to_string());
            }
            if last < policy.last {
                last += 1;
                reasons.push("last".to_string());
            }
            match secs {
                None => reasons.push("unreadable time".to_string()),
                Some(secs) => {
                    let p = periods(secs);
                    for k in 0..4 {
                        let same = prev[k].is_some_and(|q| match k {
                            0 => q.hour == p.hour,
                            1 => q.day == p.day,
                            2 => q.week == p.week,
                            _ => q.month == p.month,
                        });
                        if !same && counts[k] < limits[k] {
                            counts[k] += 1;
                            prev[k] = Some(p);
                            reasons.push(names[k].to_string());
                        }
                    }
                }
            }
            out.push(Decision {
                id: s.id.clone(),
                vm: s.vm.clone(),
                time: s.time.clone(),
                keep: !reasons.is_empty(),
                reasons,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: &str) -> Periods {
        periods(epoch_seconds(crate::time::parse_rfc3339(t).unwrap()).unwrap())
    }

    #[test]
    fn iso_weeks_and_months() {
        // 2026-09-13 is a Sunday, 2026-09-14 a Monday: different ISO weeks.
        assert_ne!(
            at("2026-09-13T10:00:00Z").week,
            at("2026-09-14T10:00:00Z").week
        );
        assert_eq!(
            at("2026-09-07T00:00:00Z").week,
            at("2026-09-13T23:59:59Z").week
        );
        // 2027-01-01 is a Friday: ISO week 53 of 2026.
        assert_eq!(at("2027-01-01T12:00:00Z").week, (2026, 53));
        assert_eq!(at("2026-12-28T00:00:00Z").week, (2026, 53));
        assert_eq!(at("2026-01-01T00:00:00Z").week, (2026, 1));
        assert_eq!(at("2026-02-28T23:00:00Z").month, (2026, 2));
        assert_eq!(at("2024-02-29T23:00:00Z").month, (2024, 2));
        for d in [-800_000i64, -1, 0, 1, 20_000, 60_000] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    fn snap(id: &str, vm: &str, time: &str) -> Snapshot {
        Snapshot {
            id: id.into(),
            vm: vm.into(),
            time: time.into(),
            parent: None,
            host: "h".into(),
            disks: vec![],
            ekko_version: "0".into(),
            domain: None,
            tags: Vec::new(),
        }
    }

    #[test]
    fn newest_by_nanoseconds_and_per_vm() {
        let snaps = [
            snap("aa", "x", "2026-09-01T10:00:00.000000002Z"),
            snap("bb", "x", "2026-09-01T10:00:00.000000001Z"),
            snap("cc", "y", "2020-01-01T00:00:00Z"),
        ];
        let p = Policy {
            last: 1,
            ..Policy::default()
        };
        let d = apply(&p, &snaps, &HashSet::new()).unwrap();
        let kept: Vec<&str> = d.iter().filter(|d| d.keep).map(|d| d.id.as_str()).collect();
        assert_eq!(kept, ["aa", "cc"]);
        let prot: HashSet<String> = ["bb".to_string()].into();
        let d = apply(&p, &snaps, &prot).unwrap();
        assert!(d.iter().all(|d| d.keep));
        assert_eq!(
            d.iter().find(|d| d.id == "bb").unwrap().reasons,
            ["protected"]
        );
        assert!(apply(&Policy::default(), &snaps, &HashSet::new()).is_err());
    }
}
