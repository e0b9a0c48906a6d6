//! Discovery of the disks, block nodes and dirty bitmaps of a QEMU process.
//!
//! # Which nodes are "disks"
//!
//! 1. **qemu-system** (`query-block` lists devices): every device with
//!    inserted media that is not read-only. Its name is the drive name
//!    (`-drive id=`), else the device id (`-device id=`, taken from the qdev
//!    path `/machine/peripheral/ID/...`), else the whole qdev path.
//! 2. **qemu-storage-daemon** (`query-block` is empty: it has no devices):
//!    every *top-level* named node, i.e. one that is no other node's child
//!    in `x-debug-query-block-graph` (parents that are block backends of
//!    exports or jobs do not count), is writable, and is not an ekko-internal
//!    node (`ekko-` prefix). If that command is unavailable, the nodes of
//!    `query-block-exports` are used instead. The name is the node name.
//!
//! In both cases filters (copy-before-write, throttle, snapshot-access, ...)
//! are followed down to the node they filter, because that is where the dirty
//! bitmaps live and what must be backed up; so a disk under a running backup
//! is still reported once, with its own node name.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::qmp::Qmp;
use crate::util::NAME_PREFIX;

/// A dirty bitmap of a block node (`BlockDirtyInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BitmapInfo {
    /// Empty for QEMU-internal anonymous bitmaps (never listed).
    #[serde(default)]
    pub name: String,
    /// Enabled: it records new writes.
    pub recording: bool,
    /// Stored in the image (qcow2) when QEMU closes it.
    pub persistent: bool,
    /// Marked in-use in the image after an unclean shutdown: it may have
    /// missed writes and QEMU only allows removing it.
    #[serde(default)]
    pub inconsistent: bool,
    /// In use by an operation (an NBD export, a job): cannot be changed.
    pub busy: bool,
    /// Bytes per bit.
    pub granularity: u64,
    /// Dirty bytes.
    #[serde(default)]
    pub count: u64,
}

/// A disk that can be backed up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Device name (qemu-system) or node name (qemu-storage-daemon).
    pub name: String,
    /// The node to back up and that holds the bitmaps (filters skipped).
    pub node_name: String,
    /// Block driver of `node_name` (`qcow2`, `raw`, ...).
    pub driver: String,
    /// Virtual size in bytes.
    pub size: u64,
    pub bitmaps: Vec<BitmapInfo>,
}

/// One named block node (`query-named-block-nodes` entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_name: String,
    pub driver: String,
    pub read_only: bool,
    /// Virtual size in bytes.
    pub size: u64,
    /// File name as QEMU reports it.
    pub filename: Option<String>,
    pub bitmaps: Vec<BitmapInfo>,
}

#[derive(Deserialize)]
struct RawNode {
    #[serde(rename = "node-name")]
    node_name: String,
    #[serde(default)]
    drv: String,
    #[serde(default)]
    ro: bool,
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    image: Option<RawImage>,
    #[serde(rename = "dirty-bitmaps", default)]
    dirty_bitmaps: Vec<BitmapInfo>,
}

#[derive(Deserialize)]
struct RawImage {
    #[serde(rename = "virtual-size", default)]
    virtual_size: u64,
}

impl From<RawNode> for NodeInfo {
    fn from(r: RawNode) -> Self {
        NodeInfo {
            node_name: r.node_name,
            driver: r.drv,
            read_only: r.ro,
            size: r.image.map(|i| i.virtual_size).unwrap_or(0),
            filename: r.file,
            // Anonymous bitmaps are QEMU-internal (e.g. of backup jobs).
            bitmaps: r
                .dirty_bitmaps
                .into_iter()
                .filter(|b| !b.name.is_empty())
                .collect(),
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(cmd: &str, v: Value) -> Result<T> {
    serde_json::from_value(v)
        .map_err(|e| Error::Protocol(format!("unexpected answer to '{cmd}': {e}")))
}

/// All named block nodes.
pub fn named_nodes(qmp: &mut Qmp) -> Result<Vec<NodeInfo>> {
    let v = qmp.execute("query-named-block-nodes", json!({ "flat": true }))?;
    let raw: Vec<RawNode> = parse("query-named-block-nodes", v)?;
    Ok(raw.into_iter().map(NodeInfo::from).collect())
}

/// One named node, or [`Error::NodeNotFound`].
pub fn node_info(qmp: &mut Qmp, node: &str) -> Result<NodeInfo> {
    named_nodes(qmp)?
        .into_iter()
        .find(|n| n.node_name == node)
        .ok_or_else(|| Error::NodeNotFound {
            node: node.to_string(),
        })
}

/// Virtual size in bytes of a node.
pub fn node_size(qmp: &mut Qmp, node: &str) -> Result<u64> {
    Ok(node_info(qmp, node)?.size)
}

/// The dirty bitmaps of a node.
pub fn bitmaps(qmp: &mut Qmp, node: &str) -> Result<Vec<BitmapInfo>> {
    Ok(node_info(qmp, node)?.bitmaps)
}

/// Removes a dirty bitmap (and, if persistent, its copy in the image), e.g.
/// one orphaned by an interrupted backup.
pub fn remove_bitmap(qmp: &mut Qmp, node: &str, name: &str) -> Result<()> {
    qmp.execute(
        "block-dirty-bitmap-remove",
        json!({ "node": node, "name": name }),
    )?;
    Ok(())
}

/// Drivers whose data is that of one child: followed down to find the disk.
const FILTER_DRIVERS: &[&str] = &[
    "copy-before-write",
    "snapshot-access",
    "throttle",
    "copy-on-read",
    "preallocate",
    "compress",
    "blklogwrites",
    "blkdebug",
    "blkverify",
    "mirror_top",
    "commit_top",
    "backup-top",
];

/// The block graph from `x-debug-query-block-graph`.
#[derive(Debug, Default)]
struct Graph {
    /// id -> (type, name)
    nodes: BTreeMap<u64, (String, String)>,
    /// (parent, child, edge name)
    edges: Vec<(u64, u64, String)>,
}

impl Graph {
    fn id_of(&self, name: &str) -> Option<u64> {
        self.nodes
            .iter()
            .find(|(_, (ty, n))| ty == "block-driver" && n == name)
            .map(|(id, _)| *id)
    }

    fn child(&self, parent: &str, edge: &str) -> Option<String> {
        let pid = self.id_of(parent)?;
        self.edges
            .iter()
            .find(|(p, _, e)| *p == pid && e == edge)
            .and_then(|(_, c, _)| self.nodes.get(c))
            .map(|(_, n)| n.clone())
    }

    /// Named block-driver nodes that are no other block-driver node's child.
    fn top_level(&self) -> Vec<String> {
        let children: HashSet<u64> = self
            .edges
            .iter()
            .filter(|(p, _, _)| {
                self.nodes
                    .get(p)
                    .is_some_and(|(ty, _)| ty == "block-driver")
            })
            .map(|(_, c, _)| *c)
            .collect();
        self.nodes
            .iter()
            .filter(|(id, (ty, name))| {
                ty == "block-driver" && !name.is_empty() && !children.contains(id)
            })
            .map(|(_, (_, name))| name.clone())
            .collect()
    }
}

/// `None` if QEMU lacks the (unstable) command.
fn block_graph(qmp: &mut Qmp) -> Result<Option<Graph>> {
    let v = match qmp.execute("x-debug-query-block-graph", Value::Null) {
        Ok(v) => v,
        Err(Error::Command { class, .. }) if class == "CommandNotFound" => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut g = Graph::default();
    for n in v["nodes"].as_array().into_iter().flatten() {
        if let Some(id) = n["id"].as_u64() {
            g.nodes.insert(
                id,
                (
                    n["type"].as_str().unwrap_or("").to_string(),
                    n["name"].as_str().unwrap_or("").to_string(),
                ),
            );
        }
    }
    for e in v["edges"].as_array().into_iter().flatten() {
        if let (Some(p), Some(c)) = (e["parent"].as_u64(), e["child"].as_u64()) {
            g.edges
                .push((p, c, e["name"].as_str().unwrap_or("").to_string()));
        }
    }
    Ok(Some(g))
}

/// Follows filter nodes down to the node they filter.
fn resolve_filters(
    node: &str,
    nodes: &BTreeMap<String, NodeInfo>,
    graph: Option<&Graph>,
) -> String {
    let mut cur = node.to_string();
    for _ in 0..16 {
        let Some(info) = nodes.get(&cur) else { break };
        if !FILTER_DRIVERS.contains(&info.driver.as_str()) {
            break;
        }
        let Some(g) = graph else { break };
        match g.child(&cur, "file").or_else(|| g.child(&cur, "backing")) {
            Some(c) if !c.is_empty() => cur = c,
            _ => break,
        }
    }
    cur
}

/// `/machine/peripheral/ID[/virtio-backend]` -> `ID` (the `-device id=`, e.g.
/// libvirt's `virtio-disk0`); any other qdev path is kept whole.
fn qdev_name(qdev: &str) -> String {
    qdev.strip_prefix("/machine/peripheral/")
        .and_then(|rest| rest.split('/').next())
        .filter(|id| !id.is_empty())
        .unwrap_or(qdev)
        .to_string()
}

/// Every writable top-level block device; see the module documentation for
/// the rule.
pub fn list_disks(qmp: &mut Qmp) -> Result<Vec<DiskInfo>> {
    let nodes: BTreeMap<String, NodeInfo> = named_nodes(qmp)?
        .into_iter()
        .map(|n| (n.node_name.clone(), n))
        .collect();
    let graph = block_graph(qmp)?;

    // (name, top node)
    let mut candidates: Vec<(Option<String>, String)> = Vec::new();
    let blocks = qmp.execute("query-block", Value::Null)?;
    for b in blocks.as_array().into_iter().flatten() {
        let Some(ins) = b.get("inserted") else {
            continue;
        };
        if ins["ro"].as_bool().unwrap_or(false) {
            continue;
        }
        let Some(node) = ins["node-name"].as_str() else {
            continue;
        };
        let device = b["device"].as_str().filter(|s| !s.is_empty());
        let qdev = b["qdev"].as_str().filter(|s| !s.is_empty());
        let name = device.map(str::to_string).or_else(|| qdev.map(qdev_name));
        candidates.push((
            Some(name.unwrap_or_else(|| node.to_string())),
            node.to_string(),
        ));
    }
    let storage_daemon = candidates.is_empty();
    if storage_daemon {
        let tops = match &graph {
            Some(g) => g.top_level(),
            None => {
                let exports = qmp.execute("query-block-exports", Value::Null)?;
                exports
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e["node-name"].as_str().map(str::to_string))
                    .collect()
            }
        };
        // ekko-internal nodes are filtered after resolving: a session's
        // snapshot-access node is the top of the disk it captures.
        candidates.extend(tops.into_iter().map(|n| (None, n)));
    }

    let mut seen = HashSet::new();
    let mut disks = Vec::new();
    for (name, top) in candidates {
        let node = resolve_filters(&top, &nodes, graph.as_ref());
        if node.starts_with(NAME_PREFIX) || !seen.insert(node.clone()) {
            continue;
        }
        let Some(info) = nodes.get(&node) else {
            continue;
        };
        if info.read_only {
            continue;
        }
        disks.push(DiskInfo {
            name: name.unwrap_or_else(|| node.clone()),
            node_name: node.clone(),
            driver: info.driver.clone(),
            size: info.size,
            bitmaps: info.bitmaps.clone(),
        });
    }
    if storage_daemon {
        disks.sort_by(|a, b| a.name.cmp(&b.name));
    }
    Ok(disks)
}
