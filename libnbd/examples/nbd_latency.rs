//! 4 KiB random-read latency through one NBD connection, for scripts/bench.
//!
//! `nbd_latency URI [READS] [SPAN_BYTES]`: two passes over the same random
//! offsets (the first warms caches), each reporting p50, p99 and max.

use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let uri = args
        .next()
        .ok_or("usage: nbd_latency URI [READS] [SPAN_BYTES]")?;
    let reads: usize = args.next().map_or(Ok(2000), |s| s.parse())?;
    let h = ekko_libnbd::Handle::new()?;
    h.connect_uri(&uri)?;
    let size = h.size()?;
    let span: u64 = args.next().map_or(Ok(size), |s| s.parse())?;
    let blocks = (span.min(size) / 4096).max(1);
    let mut buf = vec![0u8; 4096];
    for pass in ["first", "warm"] {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut lat = Vec::with_capacity(reads);
        for _ in 0..reads {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let t = Instant::now();
            h.pread(&mut buf, (x % blocks) * 4096)?;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        lat.sort_by(f64::total_cmp);
        // Nearest-rank percentile over a sorted sample.
        let q = |p: u32| lat[(lat.len() - 1) * usize::try_from(p).unwrap_or(0) / 100];
        println!(
            "{pass}: reads={reads} p50_us={:.1} p99_us={:.1} max_us={:.1}",
            q(50),
            q(99),
            lat[lat.len() - 1]
        );
    }
    Ok(())
}
