//! Restore one disk of a snapshot to a file or block device.
//!
//! Blocks are fetched and decoded in parallel and written with `pwrite` at
//! their offsets. Holes are left as holes in a regular file (the output is
//! sparse) and written as zeros on a block device.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::reader::DiskReader;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RestoreStats {
    pub bytes: u64,
    pub bytes_data: u64,
}

/// Bytes of disk that one restore task handles at once on an object store:
/// up to this much is fetched per request when the chunks sit together in a
/// pack. Measured against Swift: 16 MiB batches on 4 tasks restore about
/// 15% faster than 4 MiB batches on 8, for about 120 MiB of memory.
const BATCH_BYTES: u64 = 16 << 20;

pub struct RestoreOptions<'a> {
    pub threads: usize,
    pub overwrite: bool,
    pub cancel: &'a AtomicBool,
    pub progress: Option<&'a (dyn Fn(u64) + Sync)>,
}

pub fn restore(reader: &DiskReader, to: &Path, opts: &RestoreOptions<'_>) -> Result<RestoreStats> {
    let is_dev = std::fs::metadata(to)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let file: File = if is_dev {
        OpenOptions::new()
            .write(true)
            .open(to)
            .map_err(|e| Error::io(to, e))?
    } else {
        let mut o = OpenOptions::new();
        o.write(true);
        if opts.overwrite {
            o.create(true).truncate(true);
        } else {
            o.create_new(true);
        }
        let f = o.open(to).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Invalid(format!(
                    "{} exists; pass --force to overwrite it",
                    to.display()
                ))
            } else {
                Error::io(to, e)
            }
        })?;
        f.set_len(reader.size()).map_err(|e| Error::io(to, e))?;
        f
    };
    let cs = reader.chunk_size();
    let done = AtomicU64::new(0);
    let data = AtomicU64::new(0);
    // Reads from the repository wait on I/O; more threads than cores keep
    // the device's queue deep while the cores decrypt. On an object store
    // each task fetches a whole batch per request, so fewer tasks keep as
    // many bytes in flight (and memory bounded: tasks × batch, decoded).
    let large_reads = reader.prefers_large_reads();
    let per_core = if large_reads { 2 } else { 4 };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.max(1) * per_core)
        .build()
        .map_err(|e| Error::Invalid(format!("thread pool: {e}")))?;
    let zeros = if is_dev {
        vec![0u8; usize::try_from(cs).expect("fits")]
    } else {
        Vec::new()
    };
    // Batches of neighbouring blocks, so that chunks stored side by side
    // come in one ranged read (see `DiskReader::blocks_uncached`).
    let batch = if large_reads {
        (BATCH_BYTES / cs).max(1)
    } else {
        1
    };
    let nbatches = reader.nchunks().div_ceil(batch);
    pool.install(|| {
        (0..nbatches)
            .into_par_iter()
            .try_for_each(|b| -> Result<()> {
                if opts.cancel.load(Ordering::Relaxed) {
                    return Err(Error::Interrupted);
                }
                let from = b * batch;
                let blocks = reader.blocks_uncached(from, from + batch)?;
                for (idx, block) in (from..).zip(blocks) {
                    let off = idx * cs;
                    let len = reader.block_len(idx);
                    match block {
                        Some(block) => {
                            file.write_all_at(&block, off)
                                .map_err(|e| Error::io(to, e))?;
                            data.fetch_add(len, Ordering::Relaxed);
                        }
                        None if is_dev => {
                            let n = usize::try_from(len).expect("fits");
                            file.write_all_at(&zeros[..n], off)
                                .map_err(|e| Error::io(to, e))?;
                        }
                        None => {}
                    }
                    let d = done.fetch_add(len, Ordering::Relaxed) + len;
                    if let Some(p) = opts.progress {
                        p(d);
                    }
                }
                Ok(())
            })
    })?;
    file.sync_all().map_err(|e| Error::io(to, e))?;
    Ok(RestoreStats {
        bytes: reader.size(),
        bytes_data: data.into_inner(),
    })
}
