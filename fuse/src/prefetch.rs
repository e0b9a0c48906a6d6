//! Sequential read-ahead: when a reader moves forward through a disk, the
//! next chunks are fetched and decoded on background threads, so that
//! decryption and decompression of chunk N+1 overlap the copy of chunk N.
//!
//! Prefetched chunks land in the shared chunk cache; a read that needs one
//! that is still being fetched waits for that fetch rather than repeating
//! it (the cache's insert guard does this). Hints are dropped, never queued
//! without bound, when the threads fall behind.

use std::sync::Arc;

use crossbeam_channel::{bounded, Sender, TrySendError};
use ekko::DiskReader;

pub struct Prefetcher {
    tx: Option<Sender<(Arc<DiskReader>, u64)>>,
    /// Chunks to fetch ahead of a sequential reader.
    window: u64,
}

/// Where one reader (an open file, a guest filesystem) is in a disk.
#[derive(Default)]
pub struct Cursor {
    last_end: u64,
    /// Chunks below this index have been asked for already.
    ahead: u64,
}

impl Prefetcher {
    /// `threads` background threads; a window of 0 disables read-ahead.
    pub fn new(threads: usize, window: u64) -> Prefetcher {
        if window == 0 || threads == 0 {
            return Prefetcher { tx: None, window };
        }
        let (tx, rx) = bounded::<(Arc<DiskReader>, u64)>(
            usize::try_from(window).unwrap_or(64).saturating_mul(4),
        );
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("ekko-prefetch-{i}"))
                .spawn(move || {
                    for (reader, idx) in rx {
                        // Errors surface, with their log line, when the data is
                        // actually read.
                        reader.prefetch(idx, idx + 1);
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start a read-ahead thread ({e}); reading without it");
                return Prefetcher { tx: None, window };
            }
        }
        Prefetcher {
            tx: Some(tx),
            window,
        }
    }

    /// Note a read of `len` bytes at `offset` and fetch ahead if the reader
    /// is moving forward.
    pub fn hint(&self, reader: &Arc<DiskReader>, cursor: &mut Cursor, offset: u64, len: u64) {
        let Some(tx) = &self.tx else { return };
        let cs = reader.chunk_size();
        let end = offset.saturating_add(len);
        // Parallel kernel read-ahead requests arrive slightly out of order:
        // anything near the previous end counts as sequential.
        let sequential = offset <= cursor.last_end.saturating_add(2 * cs)
            && end.saturating_add(2 * cs) > cursor.last_end;
        cursor.last_end = if sequential {
            cursor.last_end.max(end)
        } else {
            end
        };
        if !sequential || cursor.last_end == 0 {
            cursor.ahead = 0;
            return;
        }
        let next = end.div_ceil(cs);
        let to = next.saturating_add(self.window).min(reader.nchunks());
        let mut idx = cursor.ahead.max(next);
        while idx < to {
            match tx.try_send((Arc::clone(reader), idx)) {
                Ok(()) => idx += 1,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => break,
            }
        }
        cursor.ahead = cursor.ahead.max(idx);
    }
}
