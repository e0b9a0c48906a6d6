//! Which copy of each referenced chunk prune keeps, when several packs hold
//! one (concurrent first backups each store their own copy of what they
//! share). The choice decides how much garbage survives: prune keeps a pack
//! whole while little of it is garbage, so a copy kept in a partly live
//! pack keeps the rest of that pack too.
//!
//! The choice is a set of packs to keep whole, made to lower what prune
//! leaves: the kept packs' bytes, plus the referenced bytes no kept pack
//! holds, which prune copies out of the others, weighted by the repack
//! threshold (at `t` %, rewriting a byte is worth `t / (100 − t)` bytes of
//! garbage, the same trade the threshold makes for a single pack).
//!
//! Only packs that share a chunk with another pack take part: for any
//! other pack the choice changes nothing.
//!
//! 1. Greedy: keep the pack that saves most, then the next, while one
//!    saves anything. Packs prune keeps anyway (too young) come first.
//! 2. Local search, while the cost falls: drop a kept pack, keep another,
//!    or swap a kept pack for the packs that share chunks with it.
//!
//! Each chunk then lives in the first kept pack that holds it, or else in
//! the pack with the most such chunks to copy out. Chunks are numbered and
//! counted in vectors, not hashed, so that a repository of millions of
//! chunks is placed in seconds.
//!
//! Safety does not depend on any of this: every referenced chunk keeps a
//! copy in a pack prune keeps or repacks.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use crate::format::Location;
use crate::id::{ChunkId, ObjectId};

/// A pack that may hold the kept copy of a chunk.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// The pack's size in the store.
    pub size: u64,
    /// Prune will keep it whatever it holds (too young to mark).
    pub fixed: bool,
}

/// Whether prune repacks a pack of `size` bytes of which `live` are live
/// (its live chunks and the framing a pack of them needs, `pack::packed_size`):
/// when at least `threshold` percent of it is garbage.
pub fn repacks(size: u64, live: u64, threshold: u8) -> bool {
    size > 0
        && u128::from(size.saturating_sub(live)) * 100 >= u128::from(size) * u128::from(threshold)
}

/// The pack whose copy prune keeps, for each referenced chunk with copies
/// in more than one of `candidates`. (A chunk with one copy there keeps it.)
pub fn place(
    referenced: &HashSet<ChunkId>,
    locs: &HashMap<ChunkId, Vec<Location>>,
    candidates: &HashMap<ObjectId, Candidate>,
    threshold: u8,
) -> HashMap<ChunkId, ObjectId> {
    let mut packs: Vec<ObjectId> = candidates.keys().copied().collect();
    packs.sort_unstable();
    let number: HashMap<ObjectId, u32> = packs.iter().zip(0u32..).map(|(p, i)| (*p, i)).collect();
    // Each pack's referenced chunks (by number), and the candidate copies
    // of every chunk that has several.
    let mut holds: Vec<Vec<(u32, u64)>> = vec![Vec::new(); packs.len()];
    let mut several: Vec<(ChunkId, Vec<u32>)> = Vec::new();
    let mut n: u32 = 0;
    let mut seen: Vec<u32> = Vec::new();
    for id in referenced {
        seen.clear();
        for l in locs.get(id).into_iter().flatten() {
            if let Some(&p) = number.get(&l.pack) {
                if !seen.contains(&p) {
                    seen.push(p);
                    holds[p as usize].push((n, u64::from(l.stored_len)));
                }
            }
        }
        if seen.is_empty() {
            continue;
        }
        if seen.len() > 1 {
            several.push((*id, seen.clone()));
        }
        n = n.checked_add(1).expect("fewer than 2^32 referenced chunks");
    }
    if several.is_empty() {
        return HashMap::new();
    }
    let sizes: Vec<Candidate> = packs.iter().map(|p| candidates[p]).collect();
    let mut keep = Keep::new(&holds, &sizes, n, threshold);
    let involved = keep.search(&several);

    // Each chunk's copy: in the kept pack chosen first, or else (it will be
    // repacked) in the pack that has the most such chunks to copy out.
    let mut orphans: Vec<u64> = vec![0; holds.len()];
    for p in involved {
        if !keep.kept(p) {
            orphans[p] = holds[p]
                .iter()
                .filter(|(c, _)| keep.counts[*c as usize] == 0)
                .map(|(_, n)| n)
                .sum();
        }
    }
    several
        .into_iter()
        .filter_map(|(c, v)| {
            let kept = v
                .iter()
                .filter_map(|p| keep.order[*p as usize].map(|r| (r, *p)))
                .min()
                .map(|(_, p)| p);
            let p =
                kept.or_else(|| v.iter().copied().max_by_key(|p| (orphans[*p as usize], *p)))?;
            Some((c, packs[p as usize]))
        })
        .collect()
}

/// The set of packs to keep whole, by number. Costs are scaled by
/// `100 − t` so that the weight stays an integer: keeping `n` bytes costs
/// `n·(100 − t)`, and repacking them `n·100`.
struct Keep<'a> {
    holds: &'a [Vec<(u32, u64)>],
    packs: &'a [Candidate],
    threshold: u8,
    /// Kept packs: the order they were chosen in.
    order: Vec<Option<u64>>,
    next: u64,
    /// How many kept packs hold each chunk.
    counts: Vec<u32>,
}

impl<'a> Keep<'a> {
    fn new(
        holds: &'a [Vec<(u32, u64)>],
        packs: &'a [Candidate],
        chunks: u32,
        threshold: u8,
    ) -> Self {
        Keep {
            holds,
            packs,
            threshold,
            order: vec![None; packs.len()],
            next: 0,
            counts: vec![0; chunks as usize],
        }
    }

    fn kept(&self, p: usize) -> bool {
        self.order[p].is_some()
    }

    fn keep_cost(&self, p: usize) -> i128 {
        i128::from(self.packs[p].size) * i128::from(100 - self.threshold)
    }

    /// What keeping `p` saves (negative: costs).
    fn gain_add(&self, p: usize) -> i128 {
        let uncovered: u64 = self.holds[p]
            .iter()
            .filter(|(c, _)| self.counts[*c as usize] == 0)
            .map(|(_, n)| n)
            .sum();
        i128::from(uncovered) * 100 - self.keep_cost(p)
    }

    /// What no longer keeping `p` saves.
    fn gain_remove(&self, p: usize) -> i128 {
        let only: u64 = self.holds[p]
            .iter()
            .filter(|(c, _)| self.counts[*c as usize] == 1)
            .map(|(_, n)| n)
            .sum();
        self.keep_cost(p) - i128::from(only) * 100
    }

    fn add(&mut self, p: usize) {
        self.next += 1;
        self.add_as(p, self.next);
    }

    /// Keep `p` as the `order`th choice.
    fn add_as(&mut self, p: usize, order: u64) {
        self.order[p] = Some(order);
        for (c, _) in &self.holds[p] {
            self.counts[*c as usize] += 1;
        }
    }

    /// No longer keep `p`; its order, if it was kept.
    fn remove(&mut self, p: usize) -> Option<u64> {
        let order = self.order[p].take()?;
        for (c, _) in &self.holds[p] {
            let n = &mut self.counts[*c as usize];
            *n = n.saturating_sub(1);
        }
        Some(order)
    }

    /// Greedy, then local moves while they lower the cost: drop a pack,
    /// keep one, or swap one for the packs that share chunks with it.
    /// Only packs that share a chunk with another take part: keeping any
    /// other pack or not changes no chunk's choice of copy. Returns them.
    fn search(&mut self, several: &[(ChunkId, Vec<u32>)]) -> Vec<usize> {
        // Packs that share chunks, and with which: where a swap can help.
        let mut sharing: Vec<Vec<u32>> = vec![Vec::new(); self.packs.len()];
        for (_, v) in several {
            for p in v {
                sharing[*p as usize].extend(v.iter().filter(|q| *q != p));
            }
        }
        for v in &mut sharing {
            v.sort_unstable();
            v.dedup();
            v.truncate(MAX_SWAP_PARTNERS);
        }
        let involved: Vec<usize> = (0..self.packs.len())
            .filter(|p| !sharing[*p].is_empty())
            .collect();
        for &p in &involved {
            if self.packs[p].fixed {
                self.add(p);
            }
        }
        // A pack's gain only falls as others are kept: a lazy max-heap.
        let mut heap: BinaryHeap<(i128, Reverse<usize>)> = involved
            .iter()
            .filter(|p| !self.kept(**p))
            .map(|&p| (self.gain_add(p), Reverse(p)))
            .collect();
        while let Some((g, Reverse(p))) = heap.pop() {
            let now = self.gain_add(p);
            if now <= 0 {
                continue;
            }
            if now < g {
                heap.push((now, Reverse(p)));
                continue;
            }
            self.add(p);
        }
        for _ in 0..MAX_PASSES {
            let mut changed = false;
            for &p in &involved {
                if self.packs[p].fixed {
                    continue;
                }
                if !self.kept(p) {
                    if self.gain_add(p) > 0 {
                        self.add(p);
                        changed = true;
                    }
                    continue;
                }
                if self.gain_remove(p) > 0 {
                    self.remove(p);
                    changed = true;
                    continue;
                }
                // Swap p for the partners that gain most without it.
                let mut total = self.gain_remove(p);
                let was = self.remove(p).unwrap_or(self.next);
                let mut added = Vec::new();
                while let Some((g, q)) = sharing[p]
                    .iter()
                    .map(|q| *q as usize)
                    .filter(|q| !self.kept(*q))
                    .map(|q| (self.gain_add(q), Reverse(q)))
                    .max()
                    .filter(|(g, _)| *g > 0)
                    .map(|(g, Reverse(q))| (g, q))
                {
                    total += g;
                    added.push(q);
                    self.add(q);
                }
                if total > 0 {
                    changed = true;
                } else {
                    for q in added {
                        self.remove(q);
                    }
                    self.add_as(p, was);
                }
            }
            if !changed {
                break;
            }
        }
        involved
    }
}

const MAX_PASSES: usize = 8;
const MAX_SWAP_PARTNERS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ChunkKind;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    /// A pack's own framing is not garbage: a pack holding one small live
    /// chunk (a block map's, 528 bytes in a 640-byte pack) is kept at any
    /// threshold, or every prune would rewrite it into an identical pack.
    /// One dead chunk beside it is garbage again.
    #[test]
    fn pack_framing_is_not_garbage() {
        use crate::pack::packed_size;
        assert_eq!(packed_size(528, 1), 640);
        for t in [1, 10, 50] {
            assert!(!repacks(640, packed_size(528, 1), t), "threshold {t}");
        }
        let two = packed_size(528 + 528, 2);
        assert!(repacks(two, packed_size(528, 1), 10));
        assert!(!repacks(two, packed_size(528, 1), 50));
    }

    fn loc(p: ObjectId, n: u32) -> Location {
        Location {
            pack: p,
            offset: 0,
            stored_len: n,
            raw_len: n,
            kind: ChunkKind::Data,
            compressed: false,
        }
    }

    /// `place`, plus the chunks with a single candidate copy.
    fn place_all(
        referenced: &HashSet<ChunkId>,
        locs: &HashMap<ChunkId, Vec<Location>>,
        candidates: &HashMap<ObjectId, Candidate>,
        threshold: u8,
    ) -> HashMap<ChunkId, ObjectId> {
        let mut placed = place(referenced, locs, candidates, threshold);
        for c in referenced {
            let v: Vec<ObjectId> = locs[c]
                .iter()
                .map(|l| l.pack)
                .filter(|p| candidates.contains_key(p))
                .collect();
            if v.len() == 1 {
                assert!(
                    placed.insert(*c, v[0]).is_none(),
                    "single copies are not placed"
                );
            }
        }
        placed
    }

    /// What prune leaves with this placement, by its own rule: kept packs
    /// whole, and repacked packs' live bytes, which it also rewrites.
    /// (stored, rewritten)
    fn left(
        placed: &HashMap<ChunkId, ObjectId>,
        locs: &HashMap<ChunkId, Vec<Location>>,
        candidates: &HashMap<ObjectId, Candidate>,
        threshold: u8,
    ) -> (u64, u64) {
        let mut live: HashMap<ObjectId, u64> = HashMap::new();
        for (c, p) in placed {
            let l = locs[c].iter().find(|l| l.pack == *p).unwrap();
            *live.entry(*p).or_default() += u64::from(l.stored_len);
        }
        let (mut stored, mut rewritten) = (0, 0);
        for (p, c) in candidates {
            let l = live.get(p).copied().unwrap_or(0);
            if c.fixed || (l > 0 && !repacks(c.size, l, threshold)) {
                stored += c.size;
            } else {
                stored += l;
                rewritten += l;
            }
        }
        (stored, rewritten)
    }

    /// Packs A = {1,2,3}, B = {1,2} (a second copy), C = {3,4}, D = {5}
    /// (unreferenced). Keeping A would leave C half garbage, to repack;
    /// keeping B and C whole stores as little and rewrites nothing.
    #[test]
    fn duplicate_copies_become_whole_packs_of_garbage() {
        let pack = |b: u8| ObjectId([b; 16]);
        let chunk = |b: u8| ChunkId([b; 32]);
        let mut locs: HashMap<ChunkId, Vec<Location>> = HashMap::new();
        for (c, ps) in [
            (1, vec![b'A', b'B']),
            (2, vec![b'A', b'B']),
            (3, vec![b'A', b'C']),
            (4, vec![b'C']),
            (5, vec![b'D']),
        ] {
            locs.insert(
                chunk(c),
                ps.into_iter().map(|p| loc(pack(p), 100)).collect(),
            );
        }
        let referenced: HashSet<ChunkId> = (1..=4).map(chunk).collect();
        let sizes = [(b'A', 300), (b'B', 200), (b'C', 200), (b'D', 100)];
        let candidates: HashMap<ObjectId, Candidate> = sizes
            .iter()
            .map(|&(p, size)| (pack(p), Candidate { size, fixed: false }))
            .collect();
        let placed = place_all(&referenced, &locs, &candidates, 50);
        assert_eq!(placed.len(), 4);
        assert_eq!(placed[&chunk(1)], pack(b'B'));
        assert_eq!(placed[&chunk(3)], pack(b'C'));
        assert_eq!(left(&placed, &locs, &candidates, 50), (400, 0));
        // Repacking everything partly garbage (threshold 0): A goes too,
        // and only the live bytes stay.
        let placed = place_all(&referenced, &locs, &candidates, 0);
        assert_eq!(left(&placed, &locs, &candidates, 0).0, 400);
        // Never repacking (threshold 100): A covers most and is kept; C is
        // the only other copy of chunk 4.
        let placed = place_all(&referenced, &locs, &candidates, 100);
        assert_eq!(placed[&chunk(1)], pack(b'A'));
        assert_eq!(left(&placed, &locs, &candidates, 100), (500, 0));
    }

    /// A pack that prune keeps anyway (too young) takes the copies it
    /// holds, so the older copies free their pack.
    #[test]
    fn fixed_packs_take_the_copies_they_hold() {
        let (a, b) = (ObjectId([1; 16]), ObjectId([2; 16]));
        let mut locs = HashMap::new();
        let mut referenced = HashSet::new();
        for i in 0..4u8 {
            let c = ChunkId([i; 32]);
            referenced.insert(c);
            // a holds all four, b (young) three of them.
            let mut v = vec![loc(a, 100)];
            if i < 3 {
                v.push(loc(b, 100));
            }
            locs.insert(c, v);
        }
        let candidates = HashMap::from([
            (
                a,
                Candidate {
                    size: 400,
                    fixed: false,
                },
            ),
            (
                b,
                Candidate {
                    size: 300,
                    fixed: true,
                },
            ),
        ]);
        let placed = place_all(&referenced, &locs, &candidates, 50);
        assert_eq!(left(&placed, &locs, &candidates, 50), (300 + 100, 100));
    }

    /// The case that motivated the search: hosts back up clones of one base
    /// at once into an empty repository, each storing the base in its own
    /// packs, in its own order, with its own changed chunks mixed in (as
    /// the backup lays them out: a 16-chunk pack, then the rest with the
    /// host's small block-map chunk). Whatever the layout, prune must leave
    /// less garbage than the threshold allows, and at the default
    /// threshold, at most one chunk's worth more than one base and the
    /// deltas.
    #[test]
    fn concurrent_clones_leave_about_one_base() {
        const BASE: usize = 24;
        const HOSTS: usize = 4;
        const DELTA: usize = 2;
        const N: u32 = 1 << 20;
        const MAP: u32 = 1040;
        for threshold in [crate::prune::DEFAULT_REPACK_THRESHOLD, 30, 50] {
            let (mut worst, mut rewrote) = (0, 0);
            for seed in 0..200u64 {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut locs: HashMap<ChunkId, Vec<Location>> = HashMap::new();
                let mut candidates = HashMap::new();
                let mut referenced = HashSet::new();
                for h in 0..HOSTS {
                    // Base chunks 0..BASE but the host's own DELTA, its
                    // chunks from 1000, its map chunk from 2000.
                    let mut all: Vec<u32> = (0..BASE)
                        .filter(|i| i / DELTA != h * 3 + 1)
                        .chain((0..DELTA).map(|d| 1000 + h * DELTA + d))
                        .map(|i| u32::try_from(i).unwrap())
                        .collect();
                    all.shuffle(&mut rng);
                    all.push(u32::try_from(2000 + h).unwrap());
                    for part in all.chunks(16) {
                        let p = ObjectId(rng.gen());
                        let mut size = 0;
                        for &c in part {
                            let mut id = [0u8; 32];
                            id[..4].copy_from_slice(&c.to_le_bytes());
                            let id = ChunkId(id);
                            let n = if c >= 2000 { MAP } else { N };
                            size += u64::from(n);
                            referenced.insert(id);
                            locs.entry(id).or_default().push(loc(p, n));
                        }
                        candidates.insert(p, Candidate { size, fixed: false });
                    }
                }
                let placed = place_all(&referenced, &locs, &candidates, threshold);
                assert_eq!(placed.len(), referenced.len());
                let (stored, rewritten) = left(&placed, &locs, &candidates, threshold);
                let maps = u64::try_from(HOSTS).unwrap() * u64::from(MAP);
                let ideal = u64::try_from(BASE + HOSTS * DELTA).unwrap() * u64::from(N) + maps;
                assert!(
                    u128::from(stored - ideal) * 100 < u128::from(stored) * u128::from(threshold),
                    "threshold {threshold}: {stored} stored, {ideal} live"
                );
                worst = worst.max(stored - ideal);
                rewrote += rewritten;
            }
            eprintln!(
                "threshold {threshold}: worst excess {worst}, rewritten {} per layout",
                rewrote / 200
            );
            if threshold == crate::prune::DEFAULT_REPACK_THRESHOLD {
                assert!(worst <= u64::from(N), "worst excess {worst}");
            }
        }
    }
}
