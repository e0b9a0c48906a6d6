//! An NBD export read through libnbd, over several connections for parallel
//! reads. Images that qemu-nbd can open (qcow2) are served by a private
//! qemu-nbd started through systemd socket activation, one per connection.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ekko_libnbd::{Handle, CONTEXT_BASE_ALLOCATION, STATE_DIRTY, STATE_ZERO};

use super::{normalize, Range, Source};
use crate::error::{Error, Result};

pub struct NbdSource {
    describe: String,
    handles: Vec<Mutex<Handle>>,
    next: AtomicUsize,
    size: u64,
    bitmap_context: Option<String>,
    has_allocation: bool,
}

/// Largest request we send (QEMU's NBD server accepts up to 32 MiB).
const MAX_REQUEST: usize = 32 << 20;

/// The largest disk read over NBD: far beyond any VM disk, and small
/// enough that a server reporting a nonsense size (up to 2^63 - 1 bytes)
/// is refused instead of asked for block status for days.
const MAX_DISK_SIZE: u64 = 1 << 52;

/// How long the first connection may take to complete the NBD handshake.
/// A local server answers in milliseconds, an nbdkit plugin that opens a
/// remote disk (ssh, curl, VDDK) in seconds; one that accepted the
/// connection and never answers serves its limit of clients already.
const FIRST_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// The same for further connections, which only speed reads up: a server
/// that leaves them waiting is read over fewer.
const MORE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

impl NbdSource {
    /// Open up to `connections` connections with `connect`, which is told
    /// whether the connection is the first. Only the first must succeed:
    /// a server that serves fewer clients at once (qemu-nbd serves one by
    /// default, QEMU's server may have `max-connections`) refuses or
    /// stalls the others, and the reads share the connections there are.
    fn from_connector(
        describe: String,
        bitmap: Option<&str>,
        connections: usize,
        connect: &dyn Fn(&Handle, bool) -> Result<()>,
    ) -> Result<NbdSource> {
        let bitmap_context = bitmap.map(ekko_libnbd::dirty_bitmap_context);
        let mut handles: Vec<Handle> = Vec::new();
        for _ in 0..connections.max(1) {
            let h = Handle::new()?;
            h.add_meta_context(CONTEXT_BASE_ALLOCATION)?;
            if let Some(c) = &bitmap_context {
                h.add_meta_context(c)?;
            }
            match connect(&h, handles.is_empty()) {
                Ok(()) => {}
                Err(e) if !handles.is_empty() => {
                    tracing::info!(
                        "{describe}: reading over {} connection(s), as another one failed: {e}",
                        handles.len()
                    );
                    break;
                }
                Err(e) => return Err(e),
            }
            handles.push(h);
            if !handles[0].can_multi_conn().unwrap_or(false)
                && handles.len() == 1
                && connections > 1
            {
                // Read-only exports are consistent across connections even
                // without multi-conn; QEMU point-in-time exports are read-only.
                if !handles[0].is_read_only().unwrap_or(false) {
                    break;
                }
            }
        }
        let first = &handles[0];
        let size = first.size()?;
        if size > MAX_DISK_SIZE {
            return Err(Error::Source {
                source_name: describe,
                reason: format!(
                    "the server reports a disk of {size} bytes, larger than the {} PiB ekko backs up: check the export",
                    MAX_DISK_SIZE >> 50
                ),
            });
        }
        let has_allocation = first
            .can_meta_context(CONTEXT_BASE_ALLOCATION)
            .unwrap_or(false);
        if let Some(c) = &bitmap_context {
            if !first.can_meta_context(c).unwrap_or(false) {
                return Err(Error::Source {
                    source_name: describe,
                    reason: format!(
                        "the export offers no {c} context: the bitmap is missing, or the server does not export it"
                    ),
                });
            }
        }
        Ok(NbdSource {
            describe,
            handles: handles.into_iter().map(Mutex::new).collect(),
            next: AtomicUsize::new(0),
            size,
            bitmap_context,
            has_allocation,
        })
    }

    pub fn connect_uri(uri: &str, bitmap: Option<&str>, connections: usize) -> Result<NbdSource> {
        Self::from_connector(uri.to_string(), bitmap, connections, &|h, first| {
            let wait = if first {
                FIRST_HANDSHAKE_TIMEOUT
            } else {
                MORE_HANDSHAKE_TIMEOUT
            };
            Ok(h.connect_uri_within(uri, wait)?)
        })
    }

    pub fn qemu_nbd(
        path: &Path,
        format: &str,
        bitmap: Option<&str>,
        connections: usize,
        force_share: bool,
    ) -> Result<NbdSource> {
        let p = path
            .to_str()
            .ok_or_else(|| Error::Invalid(format!("{} is not UTF-8", path.display())))?;
        // Without QEMU's image locks (to read an image that another QEMU
        // holds for writing), the image is named by options, in which a
        // comma is written twice.
        let unlocked = format!(
            "driver={format},file.driver=file,file.filename={},file.locking=off",
            p.replace(',', ",,")
        );
        let mut argv = vec!["qemu-nbd", "-r", "--cache=none", "--aio=threads"];
        if let Some(b) = bitmap {
            argv.extend(["-B", b]);
        }
        if force_share {
            argv.extend(["--image-opts", &unlocked]);
        } else {
            argv.extend(["-f", format, p]);
        }
        Self::from_connector(path.display().to_string(), bitmap, connections, &|h, _| {
            h.connect_systemd_socket_activation(&argv)
                .map_err(|e| Error::Source {
                    source_name: p.to_string(),
                    reason: why_qemu_cannot_open(path, format, bitmap, force_share)
                        .unwrap_or_else(|| format!("qemu-nbd could not open it: {e}")),
                })
        })
    }

    fn extents(&self, context: &str) -> Result<Vec<ekko_libnbd::Extent>> {
        let h = self.handles[0].lock().expect("nbd handle lock");
        Ok(h.extents(context, 0, self.size)?)
    }
}

/// Why qemu-nbd failed to serve `path`, in QEMU's own words: `qemu-img
/// info` opens the image the same way and says what is wrong (a missing
/// backing file, an encrypted image), or lists the bitmaps when the one
/// asked for is not there. `None` if it finds nothing wrong.
fn why_qemu_cannot_open(
    path: &Path,
    format: &str,
    bitmap: Option<&str>,
    force_share: bool,
) -> Option<String> {
    // The whole chain: a missing backing file fails only then.
    let info = match super::qemu_img_info(path, format, force_share, true).ok()? {
        Ok(info) => info,
        Err(err) => return Some(format!("QEMU cannot open it: {err}")),
    };
    let want = bitmap?;
    let names: Vec<&str> = info
        .pointer("/0/format-specific/data/bitmaps")
        .and_then(|b| b.as_array())
        .map(|b| {
            b.iter()
                .filter_map(|m| m.get("name").and_then(|n| n.as_str()))
                .collect()
        })
        .unwrap_or_default();
    if names.contains(&want) {
        return None;
    }
    Some(if names.is_empty() {
        format!("it has no dirty bitmap (asked for {want:?}): drop --bitmap for a full backup, or add one with `qemu-img bitmap --add`")
    } else {
        format!(
            "it has no dirty bitmap named {want:?}; it has: {}",
            names.join(", ")
        )
    })
}

impl Source for NbdSource {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        let h = self.handles[i].lock().expect("nbd handle lock");
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_REQUEST);
            let off = offset + u64::try_from(done).expect("fits");
            h.pread(&mut buf[done..done + n], off)
                .map_err(|e| Error::Source {
                    source_name: self.describe.clone(),
                    reason: format!("read of {n} bytes at {off} failed: {e}"),
                })?;
            done += n;
        }
        Ok(())
    }

    fn data_ranges(&self) -> Result<Vec<Range>> {
        if !self.has_allocation {
            return Ok(vec![Range {
                offset: 0,
                len: self.size,
            }]);
        }
        let ext = self.extents(CONTEXT_BASE_ALLOCATION)?;
        // A region that reads as zeros need not be read, allocated or not.
        Ok(normalize(
            ext.into_iter()
                .filter(|e| e.flags & STATE_ZERO == 0)
                .map(|e| Range {
                    offset: e.offset,
                    len: e.length,
                })
                .collect(),
        ))
    }

    /// A reader per connection (a connection serves one request at a time
    /// here): without them, a worker waiting for its block leaves its core
    /// idle, as nothing reads an NBD export ahead.
    fn read_threads(&self) -> usize {
        self.handles.len()
    }

    fn dirty_ranges(&self) -> Result<Option<Vec<Range>>> {
        let Some(c) = &self.bitmap_context else {
            return Ok(None);
        };
        let ext = self.extents(c)?;
        Ok(Some(normalize(
            ext.into_iter()
                .filter(|e| e.flags & STATE_DIRTY != 0)
                .map(|e| Range {
                    offset: e.offset,
                    len: e.length,
                })
                .collect(),
        )))
    }
}
