//! A cap on the bytes per second read from a source (`--rate-limit`), so
//! that a backup leaves the host's storage to the tenants' VMs.
//!
//! One [`RateLimiter`] is shared by every worker of a backup (and by every
//! disk of it): the cap is on the sum. It is a token bucket without burst, in
//! its "virtual scheduling" form: `next_free` is the instant at which every
//! byte granted so far would have been read at exactly the rate. A request
//! moves it forward by its own cost and sleeps until the start of its slot,
//! so over any stretch of time the bytes read never exceed `rate × elapsed`
//! plus one request, whatever the number of workers. Grants are taken under
//! a mutex that is held only to move `next_free`, never while sleeping.
//!
//! [`RateLimited`] wraps a [`Source`] and splits each read into pieces of
//! about 1/16 s worth of the rate, so that the flow is smooth rather than a
//! burst per chunk, and a cancel request is seen within that time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::source::{Range, Source};

/// Longest single sleep, so that a cancel request is seen promptly.
const SLEEP_SLICE: Duration = Duration::from_millis(50);

/// Bounds of the piece a rate-limited read is split into.
const MIN_PIECE: u64 = 64 * 1024;
const MAX_PIECE: u64 = 4 << 20;

/// A shared cap on bytes per second. See the module documentation.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_sec: u64,
    next_free: Mutex<Instant>,
    granted: AtomicU64,
    cancel: Option<Arc<AtomicBool>>,
}

impl RateLimiter {
    /// A limiter of `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> Result<RateLimiter> {
        if bytes_per_sec == 0 {
            return Err(Error::Invalid(
                "a rate limit must be above zero; omit it for no limit".into(),
            ));
        }
        Ok(RateLimiter {
            bytes_per_sec,
            next_free: Mutex::new(Instant::now()),
            granted: AtomicU64::new(0),
            cancel: None,
        })
    }

    /// Waits stop early with `Error::Interrupted` once `cancel` is set.
    pub fn with_cancel(mut self, cancel: Arc<AtomicBool>) -> RateLimiter {
        self.cancel = Some(cancel);
        self
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    /// Bytes granted so far.
    pub fn granted(&self) -> u64 {
        self.granted.load(Ordering::Relaxed)
    }

    /// How long `n` bytes take at the rate.
    fn cost(&self, n: u64) -> Duration {
        let nanos = u128::from(n) * 1_000_000_000 / u128::from(self.bytes_per_sec);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// The size of piece that takes about 1/16 s at the rate, in whole
    /// 64 KiB units so that reads stay aligned.
    pub fn piece_len(&self) -> u64 {
        (self.bytes_per_sec / 16).clamp(MIN_PIECE, MAX_PIECE) / MIN_PIECE * MIN_PIECE
    }

    /// Takes the right to read `n` bytes, sleeping until it is their turn.
    pub fn acquire(&self, n: u64) -> Result<()> {
        let now = Instant::now();
        let start = {
            let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
            // Idle time is not saved up: no burst after a pause.
            let start = (*next).max(now);
            *next = start + self.cost(n);
            start
        };
        self.granted.fetch_add(n, Ordering::Relaxed);
        loop {
            if self
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
            {
                return Err(Error::Interrupted);
            }
            let left = start.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(SLEEP_SLICE));
        }
    }
}

/// A source whose reads are paced by a shared [`RateLimiter`].
pub struct RateLimited {
    inner: Box<dyn Source>,
    limiter: Arc<RateLimiter>,
}

impl RateLimited {
    pub fn new(inner: Box<dyn Source>, limiter: Arc<RateLimiter>) -> RateLimited {
        RateLimited { inner, limiter }
    }

    /// `inner` itself without a limit, else wrapped.
    pub fn wrap(inner: Box<dyn Source>, limiter: Option<&Arc<RateLimiter>>) -> Box<dyn Source> {
        match limiter {
            Some(l) => Box::new(RateLimited::new(inner, Arc::clone(l))),
            None => inner,
        }
    }
}

impl Source for RateLimited {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let piece = usize::try_from(self.limiter.piece_len()).unwrap_or(usize::MAX);
        let mut done = 0usize;
        for part in buf.chunks_mut(piece) {
            let len = u64::try_from(part.len()).expect("fits");
            self.limiter.acquire(len)?;
            self.inner
                .read_at(part, offset + u64::try_from(done).expect("fits"))?;
            done += part.len();
        }
        Ok(())
    }

    fn data_ranges(&self) -> Result<Vec<Range>> {
        self.inner.data_ranges()
    }

    fn dirty_ranges(&self) -> Result<Option<Vec<Range>>> {
        self.inner.dirty_ranges()
    }

    fn read_direct(&self, hint: bool) {
        self.inner.read_direct(hint);
    }

    fn read_threads(&self) -> usize {
        self.inner.read_threads()
    }

    fn unchanged(&self) -> Result<()> {
        self.inner.unchanged()
    }
}

/// Parses a `--rate-limit` value in MB/s (10^6 bytes per second): `50`,
/// `2.5`, `0.25`, optionally followed by `MB/s` or `M`. Returns bytes per
/// second.
pub fn parse_mb_per_sec(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("MB/s")
        .or_else(|| t.strip_suffix("MB"))
        .or_else(|| t.strip_suffix('M'))
        .unwrap_or(t)
        .trim();
    let bad = || format!("not a rate in MB/s: {s:?} (expected e.g. 50 or 2.5)");
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 6
    {
        return Err(bad());
    }
    let whole: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let mut micro = 0u64;
    for (i, b) in frac.bytes().enumerate() {
        micro += u64::from(b - b'0') * 10u64.pow(5 - u32::try_from(i).expect("at most 6"));
    }
    let bytes = whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(micro))
        .ok_or_else(|| format!("rate {s:?} is too large"))?;
    if bytes == 0 {
        return Err("a rate limit must be above zero; omit --rate-limit for no limit".into());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Zeros(u64);

    impl Source for Zeros {
        fn describe(&self) -> String {
            "zeros".into()
        }
        fn size(&self) -> u64 {
            self.0
        }
        fn read_at(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn data_ranges(&self) -> Result<Vec<Range>> {
            Ok(vec![Range {
                offset: 0,
                len: self.0,
            }])
        }
    }

    #[test]
    fn parses_rates() {
        assert_eq!(parse_mb_per_sec("50"), Ok(50_000_000));
        assert_eq!(parse_mb_per_sec("2.5"), Ok(2_500_000));
        assert_eq!(parse_mb_per_sec(".25MB/s"), Ok(250_000));
        assert_eq!(parse_mb_per_sec("1M"), Ok(1_000_000));
        assert_eq!(parse_mb_per_sec("0.000001"), Ok(1));
        for bad in [
            "",
            "0",
            "0.0",
            "-1",
            "1.2.3",
            "x",
            "1e6",
            "0.0000001",
            "99999999999999999",
        ] {
            assert!(parse_mb_per_sec(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn shared_limit_holds_across_threads() {
        // 4 threads reading 1 MiB blocks (in pieces of 448 KiB) at 8 MB/s in
        // all: 4 MiB in ~0.5 s (the last piece starts, not ends, in its slot).
        let limiter = Arc::new(RateLimiter::new(8_000_000).unwrap());
        let src = RateLimited::new(Box::new(Zeros(1 << 30)), Arc::clone(&limiter));
        let t = Instant::now();
        std::thread::scope(|s| {
            for i in 0..4u64 {
                let src = &src;
                s.spawn(move || {
                    let mut buf = vec![1u8; 1 << 20];
                    src.read_at(&mut buf, i << 20).unwrap();
                    assert!(buf.iter().all(|&b| b == 0));
                });
            }
        });
        let secs = t.elapsed().as_secs_f64();
        let piece = 458_752.0;
        let want = (4.0 * 1_048_576.0 - piece) / 8e6;
        assert!(secs >= want * 0.98, "{secs} s, want ≥ {want}");
        assert!(secs < want * 1.3 + 0.05, "{secs} s, want about {want}");
        assert_eq!(limiter.granted(), 4 << 20);
    }

    #[test]
    fn cancel_stops_a_wait() {
        let cancel = Arc::new(AtomicBool::new(false));
        let limiter = RateLimiter::new(1000)
            .unwrap()
            .with_cancel(Arc::clone(&cancel));
        limiter.acquire(1000).unwrap(); // the next grant is 1 s away
        let c = Arc::clone(&cancel);
        let t = Instant::now();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            c.store(true, Ordering::Relaxed);
        });
        assert!(matches!(limiter.acquire(1000), Err(Error::Interrupted)));
        assert!(t.elapsed() < Duration::from_millis(500));
    }
}
