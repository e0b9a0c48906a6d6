//! Buffers aligned for `O_DIRECT`, which wants the buffer address, the file
//! offset and the length all multiples of the device's logical block size.

/// The alignment used for every `O_DIRECT` transfer: the largest logical
/// block size in use (4096; 512-byte devices accept it too).
pub const ALIGN: usize = 4096;

/// Whether a transfer of `len` bytes at `offset` can use `O_DIRECT`.
pub fn fits(offset: u64, len: usize) -> bool {
    len > 0 && len % ALIGN == 0 && offset % ALIGN as u64 == 0
}

/// A buffer whose usable part starts at an `ALIGN` boundary. The default
/// one is empty and allocates nothing until `get_mut` grows it.
#[derive(Default)]
pub struct AlignedBuf {
    buf: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let buf = vec![0u8; len + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        AlignedBuf { buf, start }
    }

    /// How many bytes fit from the aligned start.
    pub fn capacity(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The first `len` bytes from the aligned start, growing the buffer if
    /// it is too small.
    pub fn get_mut(&mut self, len: usize) -> &mut [u8] {
        if len > self.capacity() {
            *self = AlignedBuf::new(len);
        }
        &mut self.buf[self.start..self.start + len]
    }

    /// The first `len` bytes from the aligned start (`len` ≤ capacity).
    pub fn get(&self, len: usize) -> &[u8] {
        &self.buf[self.start..self.start + len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_grow() {
        let mut b = AlignedBuf::new(10_000);
        assert_eq!(b.get_mut(10_000).as_ptr().align_offset(ALIGN), 0);
        b.get_mut(20_000).fill(7);
        assert_eq!(b.get(20_000).as_ptr().align_offset(ALIGN), 0);
        assert!(b.get(20_000).iter().all(|&x| x == 7));
        assert!(fits(8192, 4096) && !fits(100, 4096) && !fits(0, 100) && !fits(0, 0));
    }
}
