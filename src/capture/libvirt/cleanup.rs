//! Cleaning up after a backup job: the guard that ends an uncommitted job,
//! the watchdog that does it when ekko is killed, and what the next backup
//! finds of a dead ekko process (its job, its private directory).

use std::path::{Path, PathBuf};

use ekko_libvirt::Domain;

use super::{Error, DIR_PREFIX, JOB_END_WAIT};

/// Ends an uncommitted backup job: aborts it, deletes its checkpoint (so
/// the last committed one still covers every write) and removes the
/// private directory.
pub(super) struct JobGuard<'a> {
    pub(super) dom: &'a Domain,
    pub(super) dir: PathBuf,
    pub(super) checkpoint: String,
    pub(super) committed: bool,
    pub(super) watchdog: Option<Watchdog>,
}

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        if let Err(e) = self.dom.abort_job(JOB_END_WAIT) {
            tracing::error!(
                "ending the backup job after the failure: {e}; run `virsh domjobabort {}`",
                self.dom.name()
            );
        }
        if let Err(e) = self.dom.delete_checkpoint(&self.checkpoint) {
            tracing::error!(
                "deleting checkpoint {} after the failure: {e}",
                self.checkpoint
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The cleanup a killed ekko cannot do itself. `$1` URI, `$2` domain UUID,
/// `$3` the new checkpoint, `$4` the private directory. ekko says
/// `committed` once the snapshot is stored and `done` when it has ended the
/// job itself; end of input without `done` means ekko died. The job is
/// aborted only if its socket is in ekko's directory (it is this job), and
/// the checkpoint deleted only if no snapshot records it.
const WATCHDOG_SCRIPT: &str = r#"committed=0
while IFS= read -r line; do
  case "$line" in committed) committed=1 ;; done) exit 0 ;; esac
done
if virsh -q -c "$1" backup-dumpxml "$2" 2>/dev/null | grep -qF "$4/"; then
  virsh -q -c "$1" domjobabort "$2" >/dev/null 2>&1
fi
# The abort returns before the job is torn down; until then the checkpoint
# cannot be deleted.
if [ "$committed" != 1 ]; then
  for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
    virsh -q -c "$1" checkpoint-info "$2" "$3" >/dev/null 2>&1 || break
    virsh -q -c "$1" checkpoint-delete "$2" "$3" >/dev/null 2>&1 && break
    sleep 0.5
  done
fi
rm -rf -- "$4"
"#;

/// A small `sh` process that ends the backup job if ekko is killed
/// (SIGKILL, OOM) before it can: libvirt keeps a pull-mode job running
/// until a client aborts it. It holds the read end of a pipe; ekko's death
/// closes it. It runs in its own process group, so a Ctrl-C reaches only
/// ekko, which cleans up itself and then tells the watchdog `done`.
pub(super) struct Watchdog {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
}

impl Watchdog {
    pub(super) fn spawn(
        uri: &str,
        uuid: &str,
        checkpoint: &str,
        dir: &Path,
        warnings: &mut Vec<String>,
    ) -> Option<Watchdog> {
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};
        let spawned = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("ekko-libvirt-watchdog")
            .args([uri, uuid, checkpoint])
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn();
        match spawned {
            Ok(mut child) => Some(Watchdog {
                stdin: child.stdin.take(),
                child,
            }),
            Err(e) => {
                warnings.push(format!("no watchdog for the backup job ({e}): if ekko is killed, the job stays until the next backup ends it"));
                None
            }
        }
    }

    pub(super) fn say(&mut self, line: &str) {
        use std::io::Write;
        if let Some(s) = &mut self.stdin {
            let _ = writeln!(s, "{line}");
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.say("done");
        self.stdin = None;
        let _ = self.child.wait();
    }
}

/// Ends a backup job that a dead ekko process left (its socket lies in an
/// `ekko-libvirt-<dead pid>-…` directory of `workdir`). Any other job is
/// refused.
pub(super) fn end_stale_job(
    dom: &Domain,
    workdir: &Path,
    warnings: &mut Vec<String>,
) -> Result<(), Error> {
    let Some(job) = dom.backup_job()? else {
        return Ok(());
    };
    let owner = job.socket.as_deref().and_then(|s| {
        let dir = Path::new(s).parent()?;
        if dir.parent()? != workdir {
            return None;
        }
        dir_owner(&dir.file_name()?.to_string_lossy())
    });
    match owner {
        Some(pid) if !ekko_qmp::pid_alive(pid) => {
            dom.abort_job(JOB_END_WAIT)?;
            let w = format!(
                "ended the backup job that a dead ekko process (pid {pid}) left on domain {}",
                dom.name()
            );
            tracing::warn!("{w}");
            warnings.push(w);
            Ok(())
        }
        Some(pid) => Err(Error::Busy {
            domain: dom.name().to_string(),
            detail: format!("ekko process {pid} is backing it up"),
        }),
        None => Err(Error::Busy {
            domain: dom.name().to_string(),
            detail: format!(
                "a {} backup{} not started by ekko",
                job.mode,
                job.socket
                    .as_deref()
                    .map(|s| format!(" on socket {s}"))
                    .unwrap_or_default()
            ),
        }),
    }
}

/// Removes private directories of dead ekko processes in `workdir`.
pub(super) fn remove_stale_dirs(workdir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(rd) = std::fs::read_dir(workdir) else {
        return removed;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = dir_owner(&name) else {
            continue;
        };
        if pid != std::process::id()
            && !ekko_qmp::pid_alive(pid)
            && std::fs::remove_dir_all(e.path()).is_ok()
        {
            removed.push(e.path());
        }
    }
    removed
}

/// The PID in an `ekko-libvirt-<pid>-<hex>` directory name.
pub(super) fn dir_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(DIR_PREFIX)?;
    let (pid, tag) = rest.split_once('-')?;
    if tag.len() != 8 || !tag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    pid.parse().ok()
}
