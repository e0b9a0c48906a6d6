//! The parts of libvirt's XML that ekko reads (domain, checkpoint, backup
//! job) and the XML it writes (backup and checkpoint definitions).

use crate::error::Error;

/// The Nova (OpenStack) metadata namespace prefix; versions 1.0 to 1.1
/// share it.
const NOVA_NS_PREFIX: &str = "http://openstack.org/xmlns/libvirt/nova/";

/// One `<disk>` of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// `<target dev=…>`: vda, sdb…
    pub target: String,
    /// `device=`: disk, cdrom, floppy, lun.
    pub device: String,
    /// `<driver type=…>`: qcow2, raw…
    pub format: Option<String>,
    /// `<source file=…>` (or `dev=`), when local.
    pub source: Option<String>,
    pub readonly: bool,
    pub shareable: bool,
    pub transient: bool,
    /// `<target removable='on'>`.
    pub removable: bool,
}

impl DiskInfo {
    /// Why ekko cannot back this disk up, or `None` if it can: only qcow2
    /// disks that a guest writes and owns can carry checkpoints.
    pub fn unsupported(&self) -> Option<String> {
        if self.device == "cdrom" || self.device == "floppy" || self.removable {
            Some(format!("removable {} device", self.device))
        } else if self.device != "disk" {
            Some(format!("device type {:?}, not a disk", self.device))
        } else if self.readonly {
            Some("read-only".into())
        } else if self.shareable {
            Some("shareable (several domains write it)".into())
        } else if self.transient {
            Some("transient (its writes are discarded)".into())
        } else if self.format.as_deref() != Some("qcow2") {
            Some(format!(
                "format {}, not qcow2 (checkpoints need qcow2 bitmaps)",
                self.format.as_deref().unwrap_or("unknown")
            ))
        } else {
            None
        }
    }
}

/// OpenStack Nova's `<nova:instance>` metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NovaInfo {
    /// Nova gives the domain the instance's UUID.
    pub instance_uuid: String,
    /// `<nova:name>`: the instance's display name.
    pub name: Option<String>,
    /// `<nova:owner><nova:project uuid=…>`.
    pub project_uuid: Option<String>,
}

/// What ekko needs of a domain definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    pub name: String,
    pub uuid: String,
    pub disks: Vec<DiskInfo>,
    pub nova: Option<NovaInfo>,
}

/// A checkpoint and the disks it tracks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub name: String,
    pub parent: Option<String>,
    pub disks: Vec<CheckpointDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointDisk {
    pub name: String,
    /// `checkpoint='bitmap'` (tracked) or `'no'`.
    pub tracked: bool,
    pub bitmap: Option<String>,
}

/// The running backup job, as `virDomainBackupGetXMLDesc` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupJob {
    pub mode: String,
    /// The Unix socket of a pull-mode job's NBD server.
    pub socket: Option<String>,
    pub incremental: Option<String>,
    /// Scratch files, per disk.
    pub scratch: Vec<String>,
}

fn parse<'a>(domain: &str, what: &str, text: &'a str) -> Result<roxmltree::Document<'a>, Error> {
    roxmltree::Document::parse(text).map_err(|e| Error::Xml {
        domain: domain.to_string(),
        what: what.to_string(),
        reason: e.to_string(),
    })
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

fn child_text(n: roxmltree::Node<'_, '_>, name: &str) -> Option<String> {
    child(n, name)
        .and_then(|c| c.text())
        .map(|t| t.trim().to_string())
}

/// Parses a domain's XML (`virDomainGetXMLDesc`).
pub fn parse_domain(xml: &str) -> Result<DomainInfo, Error> {
    let doc = parse("?", "domain", xml)?;
    let root = doc.root_element();
    let name = child_text(root, "name").unwrap_or_default();
    let bad = |reason: &str| Error::Xml {
        domain: name.clone(),
        what: "domain".into(),
        reason: reason.into(),
    };
    if root.tag_name().name() != "domain" {
        return Err(bad("the root element is not <domain>"));
    }
    let uuid = child_text(root, "uuid").ok_or_else(|| bad("no <uuid>"))?;
    let mut disks = Vec::new();
    if let Some(devices) = child(root, "devices") {
        for d in devices
            .children()
            .filter(|c| c.is_element() && c.tag_name().name() == "disk")
        {
            let Some(target) = child(d, "target").and_then(|t| t.attribute("dev")) else {
                continue;
            };
            let source = child(d, "source").and_then(|s| {
                s.attribute("file")
                    .or_else(|| s.attribute("dev"))
                    .map(str::to_string)
            });
            disks.push(DiskInfo {
                target: target.to_string(),
                device: d.attribute("device").unwrap_or("disk").to_string(),
                format: child(d, "driver")
                    .and_then(|x| x.attribute("type"))
                    .map(str::to_string),
                source,
                readonly: child(d, "readonly").is_some(),
                shareable: child(d, "shareable").is_some(),
                transient: child(d, "transient").is_some(),
                removable: child(d, "target").and_then(|t| t.attribute("removable")) == Some("on"),
            });
        }
    }
    let nova = child(root, "metadata")
        .and_then(|m| {
            m.children().find(|c| {
                c.is_element()
                    && c.tag_name().name() == "instance"
                    && c.tag_name()
                        .namespace()
                        .is_some_and(|ns| ns.starts_with(NOVA_NS_PREFIX))
            })
        })
        .map(|inst| NovaInfo {
            instance_uuid: uuid.clone(),
            name: child_text(inst, "name"),
            project_uuid: child(inst, "owner")
                .and_then(|o| child(o, "project"))
                .and_then(|p| p.attribute("uuid"))
                .map(str::to_string),
        });
    Ok(DomainInfo {
        name,
        uuid,
        disks,
        nova,
    })
}

/// Parses a checkpoint's XML (`virDomainCheckpointGetXMLDesc`).
pub fn parse_checkpoint(domain: &str, xml: &str) -> Result<CheckpointInfo, Error> {
    let doc = parse(domain, "checkpoint", xml)?;
    let root = doc.root_element();
    let name = child_text(root, "name").ok_or_else(|| Error::Xml {
        domain: domain.to_string(),
        what: "checkpoint".into(),
        reason: "no <name>".into(),
    })?;
    let parent = child(root, "parent").and_then(|p| child_text(p, "name"));
    let disks = child(root, "disks")
        .map(|ds| {
            ds.children()
                .filter(|c| c.is_element() && c.tag_name().name() == "disk")
                .filter_map(|d| {
                    Some(CheckpointDisk {
                        name: d.attribute("name")?.to_string(),
                        tracked: d.attribute("checkpoint") == Some("bitmap"),
                        bitmap: d.attribute("bitmap").map(str::to_string),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(CheckpointInfo {
        name,
        parent,
        disks,
    })
}

/// Parses the running backup job's XML (`virDomainBackupGetXMLDesc`).
pub fn parse_backup(domain: &str, xml: &str) -> Result<BackupJob, Error> {
    let doc = parse(domain, "backup", xml)?;
    let root = doc.root_element();
    let scratch = child(root, "disks")
        .map(|ds| {
            ds.children()
                .filter(|c| c.is_element() && c.tag_name().name() == "disk")
                .filter_map(|d| child(d, "scratch").and_then(|s| s.attribute("file")))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Ok(BackupJob {
        mode: root.attribute("mode").unwrap_or("push").to_string(),
        socket: child(root, "server")
            .and_then(|s| s.attribute("socket"))
            .map(str::to_string),
        incremental: child_text(root, "incremental"),
        scratch,
    })
}

/// Escapes text for an XML attribute or element.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// A pull-mode backup over a Unix socket: `disks` are `(target, scratch
/// file)`, `others` the domain's disks left out; `incremental` names the
/// checkpoint to diff against.
pub fn backup_xml(
    socket: &str,
    disks: &[(String, String)],
    others: &[String],
    incremental: Option<&str>,
) -> String {
    let mut x = String::from("<domainbackup mode='pull'>\n");
    if let Some(c) = incremental {
        x.push_str(&format!("  <incremental>{}</incremental>\n", escape(c)));
    }
    x.push_str(&format!(
        "  <server transport='unix' socket='{}'/>\n  <disks>\n",
        escape(socket)
    ));
    for (target, scratch) in disks {
        x.push_str(&format!(
            "    <disk name='{}' backup='yes' type='file'><scratch file='{}'/></disk>\n",
            escape(target),
            escape(scratch)
        ));
    }
    for t in others {
        x.push_str(&format!("    <disk name='{}' backup='no'/>\n", escape(t)));
    }
    x.push_str("  </disks>\n</domainbackup>\n");
    x
}

/// A checkpoint tracking `tracked` and explicitly not the `others`.
pub fn checkpoint_xml(name: &str, tracked: &[String], others: &[String]) -> String {
    let mut x = format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <description>ekko backup</description>\n  <disks>\n",
        escape(name)
    );
    for t in tracked {
        x.push_str(&format!(
            "    <disk name='{}' checkpoint='bitmap'/>\n",
            escape(t)
        ));
    }
    for t in others {
        x.push_str(&format!(
            "    <disk name='{}' checkpoint='no'/>\n",
            escape(t)
        ));
    }
    x.push_str("  </disks>\n</domaincheckpoint>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOVA: &str = r#"<domain type='kvm' id='3'>
  <name>instance-0000002a</name>
  <uuid>8f1c2b7e-1d2a-4c3b-9e8f-0a1b2c3d4e5f</uuid>
  <metadata>
    <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
      <nova:package version="27.1.0"/>
      <nova:name>web-1</nova:name>
      <nova:owner>
        <nova:user uuid="u1">admin</nova:user>
        <nova:project uuid="p-42">demo</nova:project>
      </nova:owner>
    </nova:instance>
  </metadata>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/nova/instances/x/disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/nova/instances/x/disk.config'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/raw.img'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/srv/shared.qcow2'/>
      <target dev='vdc' bus='virtio'/>
      <shareable/>
    </disk>
  </devices>
</domain>"#;

    #[test]
    fn domain_disks_and_nova_metadata() {
        let d = parse_domain(NOVA).unwrap();
        assert_eq!(d.name, "instance-0000002a");
        let nova = d.nova.as_ref().unwrap();
        assert_eq!(nova.instance_uuid, d.uuid);
        assert_eq!(nova.name.as_deref(), Some("web-1"));
        assert_eq!(nova.project_uuid.as_deref(), Some("p-42"));
        let why: Vec<_> = d.disks.iter().map(|d| d.unsupported()).collect();
        assert_eq!(why[0], None);
        assert!(why[1].as_deref().unwrap().starts_with("removable cdrom"));
        assert!(why[2].as_deref().unwrap().starts_with("format raw"));
        assert!(why[3].as_deref().unwrap().starts_with("shareable"));
        assert_eq!(
            d.disks[0].source.as_deref(),
            Some("/var/lib/nova/instances/x/disk")
        );
    }

    #[test]
    fn plain_domain_has_no_nova() {
        let x = "<domain><name>a</name><uuid>u</uuid><metadata><x:y xmlns:x='urn:other'/></metadata></domain>";
        assert_eq!(parse_domain(x).unwrap().nova, None);
    }

    #[test]
    fn checkpoint_and_backup_round_trip() {
        let c = checkpoint_xml("ekko-a-b", &["vda".into()], &["vdb".into()]);
        let p = parse_checkpoint("d", &c).unwrap();
        assert_eq!(p.name, "ekko-a-b");
        assert!(p.disks[0].tracked && !p.disks[1].tracked);

        let b = backup_xml(
            "/run/x'.sock",
            &[("vda".into(), "/s/vda".into())],
            &["hdc".into()],
            Some("ekko-a-b"),
        );
        let j = parse_backup("d", &b).unwrap();
        assert_eq!(j.mode, "pull");
        assert_eq!(j.socket.as_deref(), Some("/run/x'.sock"));
        assert_eq!(j.incremental.as_deref(), Some("ekko-a-b"));
        assert_eq!(j.scratch, ["/s/vda"]);
    }
}
