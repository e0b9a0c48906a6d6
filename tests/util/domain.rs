//! Tiny TCG domains on the real libvirtd (qemu:///system), for the libvirt
//! tests. A domain needs no OS: it sits in SeaBIOS while the test plays the
//! guest by writing through QEMU's `qemu-io` monitor command.
//!
//! Each disk has a model: a raw file to which the test applies every guest
//! write too. The model is "the disk at this instant" for the sha256
//! comparisons, and [`Domain::check_models`] proves it right against the
//! qcow2 files once QEMU has closed them.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::util::*;

pub const URI: &str = "qemu:///system";
pub const MIB: u64 = 1 << 20;

/// Fails (never skips) when libvirtd does not answer.
pub fn require_libvirtd() {
    require("virsh");
    let out = Command::new("virsh")
        .args(["-c", URI, "version"])
        .output()
        .expect("running virsh");
    assert!(
        out.status.success(),
        "libvirtd does not answer at {URI} ({}): run the tests through scripts/test, which starts it, or start it with scripts/libvirtd start",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

pub fn virsh(args: &[&str]) -> Output {
    Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .expect("running virsh")
}

/// virsh that must succeed; returns stdout.
pub fn virsh_ok(args: &[&str]) -> String {
    let out = virsh(args);
    assert!(
        out.status.success(),
        "virsh {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub struct Disk {
    pub target: String,
    pub image: PathBuf,
    pub model: PathBuf,
}

pub struct Domain {
    pub name: String,
    pub disks: Vec<Disk>,
}

/// What a disk starts with: `(offset, bytes)`.
pub type Content = Vec<(u64, Vec<u8>)>;

impl Domain {
    /// Defines and starts a domain with one qcow2 disk per `(target, size,
    /// content)`; `extra_devices` and `metadata` go into the XML as given.
    pub fn start(
        env: &Env,
        tag: &str,
        disks: &[(&str, u64, Content)],
        extra_devices: &str,
        metadata: &str,
    ) -> Domain {
        require_libvirtd();
        require("qemu-img");
        let name = format!(
            "ekko-test-{tag}-{}-{:04x}",
            std::process::id(),
            rand::random::<u16>()
        );
        let mut out = Vec::new();
        let mut xml_disks = String::new();
        for (target, size, content) in disks {
            let model = env.path(&format!("{target}.model.raw"));
            let parts: Vec<(u64, &[u8])> =
                content.iter().map(|(o, d)| (*o, d.as_slice())).collect();
            make_image(&model, *size, &parts);
            let image = env.path(&format!("{target}.qcow2"));
            run_tool(Command::new("qemu-img").args([
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "qcow2",
                model.to_str().unwrap(),
                image.to_str().unwrap(),
            ]));
            xml_disks.push_str(&format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='{target}' bus='virtio'/></disk>\n",
                image.display()
            ));
            out.push(Disk {
                target: target.to_string(),
                image,
                model,
            });
        }
        let xml = format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <metadata>{metadata}</metadata>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <devices>
{xml_disks}{extra_devices}
    <serial type='file'><source path='{}'/></serial>
    <video><model type='none'/></video>
  </devices>
</domain>",
            env.path("serial.log").display()
        );
        let xml_path = env.path("domain.xml");
        write_file(&xml_path, xml.as_bytes());
        let dom = Domain { name, disks: out };
        virsh_ok(&["define", xml_path.to_str().unwrap()]);
        virsh_ok(&["start", &dom.name]);
        dom
    }

    pub fn disk(&self, target: &str) -> &Disk {
        self.disks.iter().find(|d| d.target == target).unwrap()
    }

    /// A guest write of `len` bytes of `pattern` at `offset`, applied to
    /// the model too.
    pub fn write(&self, target: &str, pattern: u8, offset: u64, len: u64) {
        let i = self.disks.iter().position(|d| d.target == target).unwrap();
        let cmd = format!(
            "qemu-io -d /machine/peripheral/virtio-disk{i}/virtio-backend \"write -P 0x{pattern:02x} {offset} {len}\""
        );
        let out = virsh_ok(&["qemu-monitor-command", &self.name, "--hmp", &cmd]);
        assert!(
            !out.to_lowercase().contains("error") && !out.contains("failed"),
            "qemu-io: {out}"
        );
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&self.disk(target).model)
            .unwrap();
        f.write_all_at(&vec![pattern; usize::try_from(len).unwrap()], offset)
            .unwrap();
    }

    pub fn model_sha(&self, target: &str) -> String {
        sha256_file(&self.disk(target).model)
    }

    /// A copy of the model as it is now.
    pub fn freeze_model(&self, env: &Env, target: &str, tag: &str) -> PathBuf {
        let p = env.path(&format!("{target}.{tag}.raw"));
        fs::copy(&self.disk(target).model, &p).unwrap();
        p
    }

    pub fn checkpoints(&self) -> Vec<String> {
        let mut v: Vec<String> = virsh_ok(&["checkpoint-list", &self.name, "--name"])
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        v.sort();
        v
    }

    pub fn has_job(&self) -> bool {
        // Right as a backup job starts, libvirt may answer "backup job data
        // missing" for a moment: a job is there.
        let mut tries = 0;
        let info = loop {
            let out = virsh(&["domjobinfo", &self.name]);
            if out.status.success() {
                break String::from_utf8_lossy(&out.stdout).into_owned();
            }
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            tries += 1;
            if err.contains("backup job data missing") && tries >= 20 {
                return true;
            }
            assert!(tries < 20, "virsh domjobinfo {}: {err}", self.name);
            std::thread::sleep(Duration::from_millis(25));
        };
        let kind = info
            .lines()
            .find(|l| l.starts_with("Job type:"))
            .map(|l| l.trim_start_matches("Job type:").trim().to_string())
            .unwrap_or_default();
        kind != "None"
    }

    pub fn state(&self) -> String {
        virsh_ok(&["domstate", &self.name]).trim().to_string()
    }

    pub fn wait_for_job(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.has_job() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn wait_for_no_job(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if !self.has_job() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Stops QEMU cleanly (QMP `quit`: the bitmaps are stored in the
    /// images) and waits until libvirt sees the domain shut off.
    pub fn quit(&self) {
        // The monitor closes as QEMU exits, so virsh may report an error.
        let _ = virsh(&["qemu-monitor-command", &self.name, r#"{"execute":"quit"}"#]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.state() != "shut off" {
            assert!(Instant::now() < deadline, "domain did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every image, read by qemu-img once QEMU has closed it, equals its
    /// model: the models the tests compare restores with are right.
    pub fn check_models(&self, env: &Env) {
        if self.state() != "shut off" {
            self.quit();
        }
        for d in &self.disks {
            let raw = env.path(&format!("{}.final.raw", d.target));
            run_tool(Command::new("qemu-img").args([
                "convert",
                "-q",
                "-O",
                "raw",
                d.image.to_str().unwrap(),
                raw.to_str().unwrap(),
            ]));
            assert_eq!(
                sha256_file(&raw),
                sha256_file(&d.model),
                "disk {} differs from the writes the test made",
                d.target
            );
        }
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name, "--checkpoints-metadata"]);
    }
}

/// The entries of a directory (none if it does not exist).
pub fn dir_entries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
