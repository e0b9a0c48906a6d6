//! AES-SIV (RFC 5297), with a multi-buffer S2V.
//!
//! The construction and its bytes are exactly RFC 5297's, so repositories
//! are unchanged; the tests check every output against the `aes-siv` crate.
//! What differs is speed. S2V is CMAC, a chain in which every AES call waits
//! for the previous one, so one message runs at the AES instruction's
//! latency (about 1 GB/s here) while the AES units sit mostly idle. The
//! `*_many` calls run the CMAC chains of up to `LANES` messages side by
//! side, one block of each per step, which keeps the units busy: several
//! GB/s per core. Backup seals, and restore opens, a batch of chunks at once.
//!
//! CTR mode is already parallel: the counter blocks of each stretch are
//! encrypted together, then XORed into the buffer in place.

use aes::cipher::array::Array;
use aes::cipher::consts::U16;
use aes::cipher::{
    Block, BlockCipherEncBackend, BlockCipherEncClosure, BlockCipherEncrypt, BlockSizeUser, KeyInit,
};

/// A 16-byte block.
type B16 = [u8; 16];

/// Counter blocks encrypted together in CTR mode (1 KiB of keystream).
const CTR_BLOCKS: usize = 64;

/// How many CMAC chains run side by side.
pub const LANES: usize = 8;

/// Messages per S2V pass. More than `LANES`, so that a finished chain's
/// slot takes another message while longer ones still run: a pass of
/// exactly `LANES` messages of mixed lengths ends with its longest one
/// running alone, at the AES instruction's latency. Callers that hold many
/// messages (restore, check) pass them all at once.
pub const GROUP: usize = LANES * 4;

/// The length of the synthetic IV that prefixes every sealed message.
pub const TAG_LEN: usize = 16;

/// An AES-SIV key: `C` is the block cipher (AES-256 for Ekko; AES-128 for
/// the RFC's test vector).
#[derive(Clone)]
pub struct Siv<C> {
    mac: C,
    ctr: C,
    k1: B16,
    k2: B16,
    /// CMAC of the all-zero block, S2V's starting value.
    d0: B16,
}

/// Ekko's cipher: AES-256-SIV with a 64-byte key.
pub type Aes256Siv = Siv<aes::Aes256>;

/// One associated-data list and one message.
pub type Item<'a> = (&'a [&'a [u8]], &'a [u8]);

fn xor(a: B16, b: B16) -> B16 {
    (u128::from_ne_bytes(a) ^ u128::from_ne_bytes(b)).to_ne_bytes()
}

/// Doubling in GF(2^128), without a branch on the (secret) top bit.
fn dbl(b: B16) -> B16 {
    let x = u128::from_be_bytes(b);
    ((x << 1) ^ ((x >> 127) * 0x87)).to_be_bytes()
}

/// `m` (at most 16 bytes) followed by 0x80 and zeros.
fn pad(m: &[u8]) -> B16 {
    let mut b = [0u8; 16];
    b[..m.len()].copy_from_slice(m);
    if let Some(p) = b.get_mut(m.len()) {
        *p = 0x80;
    }
    b
}

/// One CMAC input: whole blocks that need nothing special (`head`), then
/// the last 1 to 32 bytes (`tail`), copied so that S2V's xorend can be
/// applied without copying the message.
struct Lane<'a> {
    head: &'a [u8],
    tail: [u8; 32],
    tail_len: usize,
}

impl<'a> Lane<'a> {
    /// A plain CMAC input.
    fn message(m: &'a [u8]) -> Lane<'a> {
        let h = m.len().saturating_sub(1) / 16 * 16;
        Lane::split(m, h)
    }

    /// S2V's last input: `m xorend d` when `m` is at least one block long,
    /// else `dbl(d) xor pad(m)`.
    fn s2v_last(m: &'a [u8], d: B16) -> Lane<'a> {
        if m.len() < 16 {
            let mut tail = [0u8; 32];
            tail[..16].copy_from_slice(&xor(dbl(d), pad(m)));
            return Lane {
                head: &[],
                tail,
                tail_len: 16,
            };
        }
        let h = (m.len() - 16) / 16 * 16;
        let mut lane = Lane::split(m, h);
        let end = lane.tail_len;
        for (t, k) in lane.tail[end - 16..end].iter_mut().zip(d) {
            *t ^= k;
        }
        lane
    }

    fn split(m: &'a [u8], h: usize) -> Lane<'a> {
        let (head, rest) = m.split_at(h);
        let mut tail = [0u8; 32];
        tail[..rest.len()].copy_from_slice(rest);
        Lane {
            head,
            tail,
            tail_len: rest.len(),
        }
    }
}

/// The CMAC of every lane, computed with one backend: whole blocks of up to
/// `LANES` lanes per step, then each lane's last blocks.
struct CmacPass<'a, 'b> {
    lanes: &'a [Lane<'b>],
    k1: B16,
    k2: B16,
    out: &'a mut Vec<B16>,
}

impl BlockSizeUser for CmacPass<'_, '_> {
    type BlockSize = U16;
}

impl BlockCipherEncClosure for CmacPass<'_, '_> {
    fn call<E: BlockCipherEncBackend<BlockSize = U16>>(self, be: &E) {
        let enc = |b: B16| -> B16 {
            let mut block = b.into();
            be.encrypt_block_inplace(&mut block);
            block.0
        };
        let mut state = vec![[0u8; 16]; self.lanes.len()];
        // Longest first: the short ones then fill the slots that free up,
        // instead of a long one starting last and running alone.
        let mut order: Vec<usize> = (0..self.lanes.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(self.lanes[i].head.len()));
        // Each slot holds a lane and what is left of its head; a finished
        // slot takes the next lane, so long and short messages mix without
        // idling. `x` is each slot's chaining value.
        let mut slots: [(usize, &[u8]); LANES] = [(0, &[]); LANES];
        let mut x: [aes::Block; LANES] = Default::default();
        let mut active = 0;
        let mut next = 0;
        loop {
            while active < LANES && next < order.len() {
                let lane = order[next];
                if !self.lanes[lane].head.is_empty() {
                    slots[active] = (lane, self.lanes[lane].head);
                    x[active] = Default::default();
                    active += 1;
                }
                next += 1;
            }
            if active == 0 {
                break;
            }
            // Run every slot until the first one ends.
            let steps = slots[..active]
                .iter()
                .map(|(_, rest)| rest.len() / 16)
                .min()
                .unwrap_or(0);
            for k in 0..steps {
                let at = k * 16;
                for (xs, (_, rest)) in x[..active].iter_mut().zip(&slots[..active]) {
                    let m: B16 = rest[at..at + 16].try_into().expect("16 bytes");
                    *xs = xor(xs.0, m).into();
                }
                // Independent blocks: the CPU overlaps these AES calls.
                for xs in &mut x[..active] {
                    be.encrypt_block_inplace(xs);
                }
            }
            let mut s = 0;
            while s < active {
                let (lane, rest) = &mut slots[s];
                *rest = &rest[steps * 16..];
                if rest.is_empty() {
                    state[*lane] = x[s].0;
                    active -= 1;
                    slots[s] = slots[active];
                    x[s] = x[active];
                } else {
                    s += 1;
                }
            }
        }
        for (lane, mut x) in self.lanes.iter().zip(state) {
            let tail = &lane.tail[..lane.tail_len];
            let last = if tail.is_empty() {
                xor(pad(&[]), self.k2) // only the empty message
            } else {
                let (full, last) = tail.split_at((tail.len() - 1) / 16 * 16);
                for b in full.chunks_exact(16) {
                    x = enc(xor(x, b.try_into().expect("16 bytes")));
                }
                if last.len() == 16 {
                    xor(last.try_into().expect("16 bytes"), self.k1)
                } else {
                    xor(pad(last), self.k2)
                }
            };
            self.out.push(enc(xor(x, last)));
        }
    }
}

impl<C> Siv<C>
where
    C: BlockCipherEncrypt + BlockSizeUser<BlockSize = U16> + KeyInit + Clone,
{
    /// A key of twice the cipher's key length: the first half keys S2V, the
    /// second CTR mode (RFC 5297, section 2.2).
    pub fn new(key: &[u8]) -> Option<Siv<C>> {
        let (a, b) = key.split_at(key.len() / 2);
        let mac = C::new_from_slice(a).ok()?;
        let ctr = C::new_from_slice(b).ok()?;
        let mut l = Default::default();
        mac.encrypt_block(&mut l);
        let k1 = dbl(l.0);
        let k2 = dbl(k1);
        let mut siv = Siv {
            mac,
            ctr,
            k1,
            k2,
            d0: [0; 16],
        };
        siv.d0 = siv.cmac(&[Lane::message(&[0; 16])])[0];
        Some(siv)
    }

    fn cmac(&self, lanes: &[Lane<'_>]) -> Vec<B16> {
        let mut out = Vec::with_capacity(lanes.len());
        self.mac.encrypt_with_backend(CmacPass {
            lanes,
            k1: self.k1,
            k2: self.k2,
            out: &mut out,
        });
        out
    }

    /// S2V of each (associated data, message) pair.
    fn s2v(&self, items: &[Item<'_>]) -> Vec<B16> {
        let ad_lanes: Vec<Lane<'_>> = items
            .iter()
            .flat_map(|(ad, _)| ad.iter().map(|a| Lane::message(a)))
            .collect();
        let mut ad_macs = self.cmac(&ad_lanes).into_iter();
        let last: Vec<Lane<'_>> = items
            .iter()
            .map(|(ad, m)| {
                let d = ad.iter().fold(self.d0, |d, _| {
                    xor(dbl(d), ad_macs.next().expect("one per header"))
                });
                Lane::s2v_last(m, d)
            })
            .collect();
        self.cmac(&last)
    }

    /// XOR CTR mode's keystream for synthetic IV `v` into `buf`, in place:
    /// the counter blocks of a stretch are encrypted together (the backend
    /// overlaps them), then XORed into `buf`. The `ctr` crate's generic
    /// in-out path copied every block once more (about 4% of a restore's
    /// CPU); the tests compare the output with `aes-siv`'s.
    fn ctr(&self, v: B16, buf: &mut [u8]) {
        let mut iv = v;
        // RFC 5297, section 2.5: clear the top bit of the last two 32-bit
        // words, so that implementations may use 32-bit counters.
        iv[8] &= 0x7f;
        iv[12] &= 0x7f;
        // A 128-bit big-endian counter that wraps, as `Ctr128BE`.
        let mut counter = u128::from_be_bytes(iv);
        let mut stream: [Block<C>; CTR_BLOCKS] = std::array::from_fn(|_| Default::default());
        for piece in buf.chunks_mut(CTR_BLOCKS * 16) {
            let blocks = &mut stream[..piece.len().div_ceil(16)];
            for b in blocks.iter_mut() {
                *b = counter.to_be_bytes().into();
                counter = counter.wrapping_add(1);
            }
            self.ctr.encrypt_blocks(blocks);
            for (x, k) in piece.iter_mut().zip(Array::slice_as_flattened(blocks)) {
                *x ^= k;
            }
        }
    }

    /// Seal messages in place. Each buffer holds `TAG_LEN` spare bytes and
    /// then the message; they become the synthetic IV and the ciphertext.
    pub fn seal_in_place(&self, items: &mut [(&[&[u8]], &mut [u8])]) {
        for group in items.chunks_mut(GROUP) {
            let view: Vec<Item<'_>> = group
                .iter()
                .map(|(ad, buf)| (*ad, &buf[TAG_LEN..]))
                .collect();
            let tags = self.s2v(&view);
            for ((_, buf), v) in group.iter_mut().zip(tags) {
                let (iv, body) = buf.split_at_mut(TAG_LEN);
                iv.copy_from_slice(&v);
                self.ctr(v, body);
            }
        }
    }

    /// Open sealed messages in place: each buffer's bytes after the first
    /// `TAG_LEN` become the plaintext. An item is `true` when it opened;
    /// for a `false` one (damaged, too short, or sealed under another key or
    /// associated data) the buffer holds garbage that must not be used.
    pub fn open_in_place(&self, items: &mut [(&[&[u8]], &mut [u8])]) -> Vec<bool> {
        let mut ok = Vec::with_capacity(items.len());
        for group in items.chunks_mut(GROUP) {
            let mut ivs = Vec::with_capacity(group.len());
            for (_, buf) in group.iter_mut() {
                let iv = buf.split_first_chunk_mut::<TAG_LEN>().map(|(iv, body)| {
                    self.ctr(*iv, body);
                    *iv
                });
                ivs.push(iv);
            }
            // S2V over what decrypted; too-short inputs are skipped.
            let view: Vec<Item<'_>> = group
                .iter()
                .zip(&ivs)
                .filter(|(_, iv)| iv.is_some())
                .map(|((ad, buf), _)| (*ad, &buf[TAG_LEN..]))
                .collect();
            let mut tags = self.s2v(&view).into_iter();
            for iv in ivs {
                ok.push(iv.is_some_and(|v| {
                    let want = tags.next().expect("one per decrypted item");
                    // Constant time: fold the difference of every byte.
                    v.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
                }));
            }
        }
        ok
    }

    /// The synthetic IV, then the ciphertext of `m`.
    pub fn seal(&self, ad: &[&[u8]], m: &[u8]) -> Vec<u8> {
        let mut buf = vec![0; TAG_LEN];
        buf.extend_from_slice(m);
        self.seal_in_place(&mut [(ad, &mut buf)]);
        buf
    }

    /// The plaintext of `sealed`, if it opens.
    pub fn open(&self, ad: &[&[u8]], sealed: &[u8]) -> Option<Vec<u8>> {
        let mut buf = sealed.to_vec();
        self.open_in_place(&mut [(ad, &mut buf)])[0].then(|| buf.split_off(TAG_LEN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 5297, appendix A.1 (AES-128 keys).
    #[test]
    fn rfc5297_vector() {
        let key = hex("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff");
        let ad = hex("101112131415161718191a1b1c1d1e1f2021222324252627");
        let pt = hex("112233445566778899aabbccddee");
        let siv = Siv::<aes::Aes128>::new(&key).unwrap();
        let sealed = siv.seal(&[&ad], &pt);
        assert_eq!(
            sealed,
            hex("85632d07c6e8f37f950acd320a2ecc9340c02b9690c4dc04daef7f6afe5c")
        );
        assert_eq!(siv.open(&[&ad], &sealed).unwrap(), pt);
    }

    /// A small deterministic generator, so that failures reproduce.
    fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect()
    }

    /// Byte for byte what the `aes-siv` crate produces, for every message
    /// length around block boundaries, several header shapes, and batches
    /// that mix long and short messages.
    #[test]
    fn same_bytes_as_the_aes_siv_crate() {
        let key = bytes(1, 64);
        let ours = Aes256Siv::new(&key).unwrap();
        let mut lens: Vec<usize> = (0..70).collect();
        lens.extend([255, 256, 257, 4095, 4096, 4097, 65_537, 1 << 20]);
        let headers: Vec<Vec<Vec<u8>>> = vec![
            vec![],
            vec![vec![]],
            vec![b"ekko chunk".to_vec(), vec![1], bytes(2, 32)],
            vec![bytes(3, 16), bytes(4, 17), bytes(5, 100)],
        ];
        let msgs: Vec<Vec<u8>> = lens.iter().map(|&n| bytes(n as u64 + 7, n)).collect();
        for h in &headers {
            let ad: Vec<&[u8]> = h.iter().map(Vec::as_slice).collect();
            let mut bufs: Vec<Vec<u8>> = msgs
                .iter()
                .map(|m| [&[0; TAG_LEN][..], m].concat())
                .collect();
            let mut items: Vec<_> = bufs
                .iter_mut()
                .map(|b| (ad.as_slice(), b.as_mut_slice()))
                .collect();
            ours.seal_in_place(&mut items);
            let sealed = bufs;
            for (m, s) in msgs.iter().zip(&sealed) {
                let mut theirs = aes_siv::siv::Aes256Siv::new_from_slice(&key).unwrap();
                assert_eq!(s, &theirs.encrypt(&ad, m).unwrap(), "length {}", m.len());
                assert_eq!(&ours.open(&ad, s).unwrap(), m);
            }
            let mut opened = sealed.clone();
            let mut items: Vec<_> = opened
                .iter_mut()
                .map(|b| (ad.as_slice(), b.as_mut_slice()))
                .collect();
            assert!(ours.open_in_place(&mut items).iter().all(|&ok| ok));
            for (m, o) in msgs.iter().zip(&opened) {
                assert_eq!(&o[TAG_LEN..], m);
            }
        }
    }

    #[test]
    fn any_change_fails_to_open() {
        let siv = Aes256Siv::new(&bytes(9, 64)).unwrap();
        let m = bytes(10, 1000);
        let sealed = siv.seal(&[b"a", b"b"], &m);
        for i in [0, 5, 15, 16, 500, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 0x10;
            assert!(siv.open(&[b"a", b"b"], &bad).is_none(), "flip at {i}");
        }
        assert!(siv.open(&[b"a", b"c"], &sealed).is_none());
        assert!(siv.open(&[b"a"], &sealed).is_none());
        assert!(siv.open(&[b"a", b"b"], &sealed[..15]).is_none());
        // A damaged item fails alone; its neighbours in the batch open.
        let mut bad = sealed.clone();
        bad[100] ^= 1;
        let ad: &[&[u8]] = &[b"a", b"b"];
        let (mut a, mut b, mut c, mut d) = (sealed.clone(), bad, sealed[..3].to_vec(), sealed);
        let r = siv.open_in_place(&mut [(ad, &mut a), (ad, &mut b), (ad, &mut c), (ad, &mut d)]);
        assert_eq!(r, [true, false, false, true]);
        assert_eq!(a[TAG_LEN..], m);
        assert_eq!(d[TAG_LEN..], m);
        let other = Aes256Siv::new(&bytes(11, 64)).unwrap();
        assert!(other.open(&[b"a", b"b"], &a).is_none());
    }
}
