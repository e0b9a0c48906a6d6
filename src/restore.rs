//! Restore one disk of a snapshot to a file or block device.
//!
//! A planner walks the disk in windows and sorts each window's blocks into
//! runs of neighbouring chunks of one pack; fetcher threads read each run
//! with one ranged read; one decoder per core decrypts, decompresses and
//! writes each block with `pwrite` at its offset. Bounded queues keep
//! memory at about (2 × fetchers + decoders) runs. Holes are left as holes
//! in a regular file (the output is sparse) and written as zeros on a block
//! device.
//!
//! Whole blocks are written with `O_DIRECT` where the filesystem allows it
//! (`open_direct`), by writer threads from aligned buffers straight to the
//! device, past the page cache. Buffered writes copy every byte into newly
//! allocated page-cache pages under the inode's lock, which cost a restore
//! of 1.37 GB here anywhere from 0.5 to 2.5 s of system time from one run
//! to the next.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crossbeam_channel::bounded;

use crate::aligned::{self, AlignedBuf};
use crate::atomic_file::{AtomicFile, Existing};
use crate::error::{Error, Result};
use crate::reader::{DiskReader, PackRun};

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RestoreStats {
    pub bytes: u64,
    pub bytes_data: u64,
}

/// How a restore reads: runs of neighbouring chunks are fetched by
/// `fetchers` threads with one ranged read each (at most `max_run` bytes),
/// and decoded and written by one thread per core, so that waiting for the
/// store overlaps with decoding.
struct Pipeline {
    fetchers: usize,
    max_run: u64,
}

/// Bytes written between two requests to start writeback (see
/// `start_writeback`).
const WRITEBACK_EVERY: u64 = 64 << 20;

/// Ask the kernel to start writing the file's dirty pages now, without
/// waiting for them. Otherwise they pile up in the page cache (gigabytes on
/// a large host) and the final `fsync` writes them all while nothing else
/// runs: 0.36 s of a 1.75 s restore of 1.35 GB here.
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range on a valid descriptor with a whole-file range
    // only schedules I/O; its failure (e.g. on a filesystem without it)
    // costs nothing but the early start, and `sync_all` still runs.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Consecutive block indices as `(first, end)` ranges.
fn hole_runs(holes: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &idx in holes {
        match runs.last_mut() {
            Some(r) if r.1 == idx => r.1 += 1,
            _ => runs.push((idx, idx + 1)),
        }
    }
    runs
}

/// Make `len` bytes of a block device at `off` read as zeros: one
/// `fallocate(ZERO_RANGE)` (the device zeroes it, often without moving the
/// bytes), or, where the device refuses, plain writes of `zeros`.
fn zero_device(dev: &File, off: u64, len: u64, zeros: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) {
        // SAFETY: fallocate on a valid descriptor; it touches only the
        // device's contents in the given range.
        let r = unsafe { libc::fallocate(dev.as_raw_fd(), libc::FALLOC_FL_ZERO_RANGE, o, l) };
        if r == 0 {
            return Ok(());
        }
    }
    let mut at = off;
    while at < off + len {
        let n = zeros
            .len()
            .min(usize::try_from(off + len - at).unwrap_or(usize::MAX));
        dev.write_all_at(&zeros[..n], at)?;
        at += u64::try_from(n).expect("fits");
    }
    Ok(())
}

/// Blocks planned at once: a window of the disk, sorted into pack runs.
const WINDOW_BYTES: u64 = 256 << 20;

impl Pipeline {
    fn for_store(large_reads: bool, threads: usize) -> Pipeline {
        if large_reads {
            // An object store: a request costs the store far more CPU than
            // its bytes. Measured against Swift: reads of up to a whole
            // 16 MiB pack cut the store's CPU by 40% against ~5 MiB reads;
            // a third fetcher or 32 MiB reads gained nothing.
            Pipeline {
                fetchers: 2,
                max_run: 16 << 20,
            }
        } else {
            // A local folder: one read in flight per core keeps the device
            // busy while the cores decode. Runs of up to 4 MiB: a run's
            // chunks are opened together, and AES-SIV's CMAC chains only
            // run side by side (see `siv`) when a run holds several. With
            // 1 MiB runs (one to three chunks) CMAC took 16% of a restore's
            // CPU, with 4 MiB runs 8%, for about 16 MiB more memory.
            Pipeline {
                fetchers: threads,
                max_run: 4 << 20,
            }
        }
    }
}

/// Threads writing with `O_DIRECT`, and the aligned buffers they share with
/// the decoders (a block each: 8 MiB in all with 1 MiB chunks). A direct write
/// waits for the device, so these are the writes in flight: on this
/// virtio disk, restoring the bench image (cold cache, alternated, seven
/// rounds each) took a median of 1.72 s with 2 writers and 4 buffers, 1.58 s
/// with 4 and 8 (peak RSS +3 MiB), 1.51 s with 6 and 12 (+8 MiB).
const DIRECT_WRITERS: usize = 4;
const DIRECT_BUFFERS: usize = 8;

/// A second descriptor on the output, opened with `O_DIRECT`, for the
/// blocks whose length is a multiple of `aligned::ALIGN` (all but a short
/// last block). It is opened through `/proc/self/fd`, so it is the very
/// file `file` is, whatever happens to its path meanwhile. `None` where the
/// filesystem refuses `O_DIRECT` (some FUSE filesystems), or without
/// `/proc`: everything is then written buffered.
fn open_direct(file: &File, buffered: bool) -> Option<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    if buffered {
        return None;
    }
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()
}

pub struct RestoreOptions<'a> {
    pub threads: usize,
    pub overwrite: bool,
    /// Write through the page cache, never with `O_DIRECT`.
    pub buffered: bool,
    pub cancel: &'a AtomicBool,
    pub progress: Option<&'a (dyn Fn(u64) + Sync)>,
}

pub fn restore(reader: &DiskReader, to: &Path, opts: &RestoreOptions<'_>) -> Result<RestoreStats> {
    let is_dev = std::fs::metadata(to)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    if is_dev {
        if !opts.overwrite {
            return Err(Error::Invalid(format!(
                "{} is a block device: the restore overwrites all it holds; pass --force to do so",
                to.display()
            )));
        }
        let mut file = OpenOptions::new()
            .write(true)
            .open(to)
            .map_err(|e| Error::io(to, e))?;
        let room = std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))
            .map_err(|e| Error::io(to, e))?;
        if room < reader.size() {
            return Err(Error::Invalid(format!(
                "{} holds {room} bytes, but the disk is {} bytes: nothing was written",
                to.display(),
                reader.size()
            )));
        }
        return restore_into(reader, &file, true, to, opts);
    }
    // A file is written under a temporary name beside `to` and takes its
    // name only when complete and on disk: a restore that fails or is
    // interrupted leaves nothing that looks whole, and an old file that
    // `--force` would replace stays until then.
    match std::fs::symlink_metadata(to) {
        Ok(m) if m.is_dir() => {
            return Err(Error::Invalid(format!(
                "{} is a folder: give a file path to restore to (or restore every disk into the folder with --all)",
                to.display()
            )));
        }
        Ok(m) if !m.is_file() => {
            return Err(Error::Invalid(format!(
                "{} exists and is not a regular file or block device; give another path",
                to.display()
            )));
        }
        Ok(_) if !opts.overwrite => return Err(crate::atomic_file::exists(to)),
        _ => {}
    }
    let out = AtomicFile::create(to.to_path_buf())?;
    out.file()
        .set_len(reader.size())
        .map_err(|e| Error::io(to, e))?;
    let stats = restore_into(reader, out.file(), false, to, opts)?;
    out.commit(if opts.overwrite {
        Existing::Replace
    } else {
        Existing::Keep
    })?;
    Ok(stats)
}

/// A block of a streaming restore's window: its index, and its bytes there.
type Slot<'a> = (u64, &'a mut [u8]);

/// Bytes of the disk a streaming restore decodes at a time. Two windows
/// are in memory: one being decoded on all cores, one being written.
const STREAM_WINDOW_BYTES: u64 = 16 << 20;

/// Restore to a stream (standard output, a pipe, a character device such as
/// `/dev/null`): the disk's bytes in order, holes as zeros. Each window of
/// the disk is planned into pack runs like a file restore, its runs are
/// fetched and decoded on `opts.threads` threads straight into the window's
/// buffer, and a writer thread writes the previous window meanwhile. `to`
/// names the output in messages.
pub fn restore_stream(
    reader: &DiskReader,
    out: &mut (dyn Write + Send),
    to: &Path,
    opts: &RestoreOptions<'_>,
) -> Result<RestoreStats> {
    let cs = reader.chunk_size();
    let window = (STREAM_WINDOW_BYTES / cs).max(4);
    let block = usize::try_from(cs).expect("chunk size fits in memory");
    let window_len = block * usize::try_from(window).expect("small");
    let pipe = Pipeline::for_store(reader.prefers_large_reads(), opts.threads.max(1));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.max(pipe.fetchers))
        .thread_name(|i| format!("ekko-restore-{i}"))
        .build()
        .map_err(|e| Error::Invalid(format!("starting restore threads: {e}")))?;
    let (full_tx, full_rx) = bounded::<(Vec<u8>, usize)>(1);
    let (free_tx, free_rx) = bounded::<Vec<u8>>(2);
    for _ in 0..2 {
        free_tx.send(vec![0u8; window_len]).expect("room");
    }
    let mut data = 0u64;
    let mut done = 0u64;
    let written: Result<()> = std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<()> {
            for (buf, len) in full_rx {
                out.write_all(&buf[..len]).map_err(|e| Error::io(to, e))?;
                // Gone only when the decoding side has stopped.
                let _ = free_tx.send(buf);
            }
            out.flush().map_err(|e| Error::io(to, e))
        });
        let decoded = (|| -> Result<()> {
            let mut from = 0;
            while from < reader.nchunks() {
                if opts.cancel.load(Ordering::Relaxed) {
                    return Err(Error::Interrupted);
                }
                let to_idx = (from + window).min(reader.nchunks());
                let Ok(mut buf) = free_rx.recv() else {
                    break; // the writer failed: its error is returned below
                };
                let plan = reader.plan(from, to_idx, pipe.max_run)?;
                let mut slots: Vec<Option<&mut [u8]>> = buf.chunks_mut(block).map(Some).collect();
                let slot = |idx: u64| usize::try_from(idx - from).expect("within the window");
                for &idx in &plan.holes {
                    if let Some(s) = slots[slot(idx)].take() {
                        s.fill(0);
                    }
                }
                // Each run gets the buffers of its own blocks: the runs
                // are decoded side by side into disjoint parts of `buf`.
                let jobs: Vec<(PackRun, Vec<Slot<'_>>)> = plan
                    .runs
                    .into_iter()
                    .map(|run| {
                        let mut mine: Vec<Slot<'_>> = Vec::new();
                        for idx in run.block_indices() {
                            if let Some(s) = slots[slot(idx)].take() {
                                mine.push((idx, s));
                            }
                        }
                        (run, mine)
                    })
                    .collect();
                let decoded: u64 = pool.install(|| {
                    use rayon::prelude::*;
                    jobs.into_par_iter()
                        .map(|(run, mut mine)| -> Result<u64> {
                            let mut fetched = reader.fetch_run(&run);
                            let mut n = 0u64;
                            reader.decode_run(&run, fetched.as_deref_mut(), |idx, plain| {
                                let len = reader.block_len(idx);
                                let out = mine
                                    .iter_mut()
                                    .find(|(i, _)| *i == idx)
                                    .map(|(_, s)| &mut s[..usize::try_from(len).expect("fits")])
                                    .expect("a run's blocks have their buffers");
                                plain.write_to(out)?;
                                n += len;
                                Ok(())
                            })?;
                            Ok(n)
                        })
                        .try_reduce(|| 0, |a, b| Ok(a + b))
                })?;
                data += decoded;
                let len = (from..to_idx).map(|i| reader.block_len(i)).sum::<u64>();
                done += len;
                if full_tx
                    .send((buf, usize::try_from(len).expect("within the window")))
                    .is_err()
                {
                    break;
                }
                if let Some(p) = opts.progress {
                    p(done);
                }
                from = to_idx;
            }
            Ok(())
        })();
        drop(full_tx);
        let wrote = writer.join().expect("the writer thread does not panic");
        // A write error explains a stopped decoder; report it first.
        wrote.and(decoded)
    });
    written?;
    Ok(RestoreStats {
        bytes: reader.size(),
        bytes_data: data,
    })
}

/// Restore into `file`: a block device at `to`, or a new file already
/// sized to the disk that will take the name `to` (used in messages).
fn restore_into(
    reader: &DiskReader,
    file: &File,
    is_dev: bool,
    to: &Path,
    opts: &RestoreOptions<'_>,
) -> Result<RestoreStats> {
    let direct = open_direct(file, opts.buffered);
    let cs = reader.chunk_size();
    let done = AtomicU64::new(0);
    let data = AtomicU64::new(0);
    let decoders = opts.threads.max(1);
    let pipe = Pipeline::for_store(reader.prefers_large_reads(), decoders);
    let zeros = if is_dev {
        vec![0u8; usize::try_from(cs).expect("fits")]
    } else {
        Vec::new()
    };
    let window = (WINDOW_BYTES / cs).max(1);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let fail = |e: Error| {
        stop.store(true, Ordering::Relaxed);
        failure.lock().expect("failure lock").get_or_insert(e);
    };
    let stopped = || {
        if opts.cancel.load(Ordering::Relaxed) {
            fail(Error::Interrupted);
        }
        stop.load(Ordering::Relaxed)
    };
    let advance = |len: u64| {
        let d = done.fetch_add(len, Ordering::Relaxed) + len;
        if let Some(p) = opts.progress {
            p(d);
        }
    };
    let written = AtomicU64::new(0);
    // Buffered writes (all of them without `direct`).
    let write = |idx: u64, buf: &[u8]| -> Result<()> {
        file.write_all_at(buf, idx * cs)
            .map_err(|e| Error::io(to, e))?;
        let n = u64::try_from(buf.len()).expect("fits");
        let before = written.fetch_add(n, Ordering::Relaxed);
        if before / WRITEBACK_EVERY != (before + n) / WRITEBACK_EVERY {
            start_writeback(file);
        }
        Ok(())
    };
    // Direct writes: decoders decompress a block into a free aligned
    // buffer and queue it; writer threads write it and hand the buffer
    // back. So the device has several writes in flight while the cores
    // decode.
    let block = usize::try_from(cs).expect("fits");
    let direct_ok = |at: u64, len: usize| direct.is_some() && aligned::fits(at, len);
    let (free_tx, free_rx) = bounded::<AlignedBuf>(DIRECT_BUFFERS);
    if direct.is_some() {
        for _ in 0..DIRECT_BUFFERS {
            free_tx
                .send(AlignedBuf::new(block))
                .expect("room for every buffer");
        }
    }
    let (queue_tx, queue_rx) = bounded::<(u64, usize, AlignedBuf)>(DIRECT_BUFFERS);
    let (fail, stopped, advance, write, data, file_ref, direct_ok) =
        (&fail, &stopped, &advance, &write, &data, file, &direct_ok);
    std::thread::scope(|scope| {
        let (run_tx, run_rx) = bounded::<PackRun>(pipe.fetchers);
        let (got_tx, got_rx) = bounded::<(PackRun, Option<Vec<u8>>)>(1);
        // Planner: windows of the disk in order; holes are written here.
        scope.spawn(move || {
            let mut from = 0;
            while from < reader.nchunks() && !stopped() {
                let plan = match reader.plan(from, from + window, pipe.max_run) {
                    Ok(p) => p,
                    Err(e) => return fail(e),
                };
                for (first, end) in hole_runs(&plan.holes) {
                    let len: u64 = (first..end).map(|i| reader.block_len(i)).sum();
                    if is_dev {
                        if let Err(e) = zero_device(file_ref, first * cs, len, &zeros) {
                            return fail(Error::io(to, e));
                        }
                    }
                    advance(len);
                }
                for run in plan.runs {
                    if run_tx.send(run).is_err() {
                        return;
                    }
                }
                from += window;
            }
        });
        for _ in 0..pipe.fetchers {
            let (run_rx, got_tx) = (run_rx.clone(), got_tx.clone());
            scope.spawn(move || {
                for run in run_rx {
                    if stopped() {
                        return;
                    }
                    let fetched = reader.fetch_run(&run);
                    if got_tx.send((run, fetched)).is_err() {
                        return;
                    }
                }
            });
        }
        drop((run_rx, got_tx));
        if let Some(d) = &direct {
            for _ in 0..DIRECT_WRITERS {
                let (queue_rx, free_tx) = (queue_rx.clone(), free_tx.clone());
                scope.spawn(move || {
                    // Drain the queue even after a failure, so that no
                    // decoder waits forever for a free buffer.
                    for (at, len, buf) in queue_rx {
                        if !stopped() {
                            if let Err(e) = d.write_all_at(buf.get(len), at) {
                                fail(Error::io(to, e));
                            }
                        }
                        let _ = free_tx.send(buf);
                    }
                });
            }
        }
        let free_back = free_tx.clone();
        drop((queue_rx, free_tx));
        for _ in 0..decoders {
            let (got_rx, free_rx, queue_tx) = (got_rx.clone(), free_rx.clone(), queue_tx.clone());
            let free_back = free_back.clone();
            scope.spawn(move || {
                for (run, mut fetched) in got_rx {
                    if stopped() {
                        return;
                    }
                    let r = reader.decode_run(&run, fetched.as_deref_mut(), |idx, plain| {
                        let at = idx * cs;
                        let n = plain.len();
                        if direct_ok(at, n) {
                            // Decompressed straight into the aligned buffer.
                            let mut buf = free_rx.recv().map_err(|_| Error::Interrupted)?;
                            if let Err(e) = plain.write_to(buf.get_mut(n)) {
                                // The buffer goes back, so that no decoder
                                // waits for it forever.
                                let _ = free_back.send(buf);
                                return Err(e);
                            }
                            queue_tx
                                .send((at, n, buf))
                                .map_err(|_| Error::Interrupted)?;
                        } else {
                            plain.with_bytes(|b| write(idx, b))?;
                        }
                        let len = reader.block_len(idx);
                        data.fetch_add(len, Ordering::Relaxed);
                        advance(len);
                        Ok(())
                    });
                    if let Err(e) = r {
                        return fail(e);
                    }
                }
            });
        }
        drop((queue_tx, free_back));
    });
    if let Some(e) = failure.into_inner().expect("failure lock") {
        return Err(e);
    }
    // Direct writes are on the device but maybe in its volatile cache, and
    // the file's new extents in the journal: one fsync covers both
    // descriptors' writes.
    file.sync_all().map_err(|e| Error::io(to, e))?;
    Ok(RestoreStats {
        bytes: reader.size(),
        bytes_data: data.load(Ordering::Relaxed),
    })
}
