//! The blocked scoring-and-sampling pass behind
//! [`CacheLoss::score_and_sample`](crate::CacheLoss::score_and_sample), a
//! fast `exp`, quantized cache rows, and sharded passes whose results merge
//! exactly.
//!
//! # How the pass is laid out
//!
//! The cache is cut into blocks of [`BLOCK`] slots and the queries into
//! tiles of [`TILE`]. For each tile, the queries are transposed once
//! (`q[d][lane]`, 4 KiB at `DIM` 64, in L1) and every block of the cache is
//! scored against them by a register-tiled micro-kernel: a few slots times
//! 16 query lanes of accumulators, one broadcast of `e[s][d]` per slot and
//! one load of `q[d][..]` per 16 lanes, so each loaded value feeds many
//! multiply-adds. It is plain Rust over fixed-size arrays; the compiler
//! vectorises it for whatever the build targets (SSE2, AVX2, AVX-512, NEON,
//! or scalar on a Cortex-M4). There is no `std::arch` and no separate SIMD
//! path: every target runs the same IEEE operations in the same order and
//! so computes the same bits (Rust never contracts `a * b + c` into an FMA
//! nor reassociates). Each score is `alpha * (sum over d in index order of
//! e[d] * q[d])`; that summation order differs from
//! [`vector::dot`](crate::vector::dot)'s four partial sums by rounding only.
//!
//! Each block's scores of one query tile then go through a vectorised
//! epilogue:
//!
//! - the log-sum-exp is kept per query relative to a running maximum that
//!   is updated once per block (the block's maximum), not once per score,
//!   so the rescale costs one `exp` per block and query;
//! - every weight `exp(c - max)` is computed by [`exp_le0`], a range
//!   reduction and a polynomial in basic IEEE arithmetic (no libm call,
//!   vectorisable, at most 2 ulp from the correctly rounded value; see its
//!   docs and the test `exp_is_within_two_ulp`);
//! - the exponential-jump reservoirs (one per negative) keep their running
//!   sum in the same lanes; since weights are non-negative, the running sum
//!   at the end of a block exceeds the lowest of the query's thresholds
//!   exactly when some slot of the block would replace a pick, so one
//!   comparison per block and query finds the rare blocks where a query
//!   jumps, and only those lanes are
//!   replayed slot by slot (the replay recomputes the same weights and
//!   repeats the same additions in the same order, so it sees the same
//!   sums).
//!
//! Masking a query's own positive compares each slot's key
//! ([`crate::Item::key`]) with each query's positive key: `B x N` integer
//! comparisons, whatever the item's size, skipped only when there is
//! nothing to mask.
//!
//! # Randomness
//!
//! Each query draws from its own stream ([`LaneRng`], SplitMix64) seeded by
//! one `next_u64` of the caller's generator per query, in query order.
//! What a query draws therefore depends only on its own scores, never on
//! how queries are tiled or on the order in which lanes are visited, and a
//! run is still a function of the caller's seed.
//!
//! # Threads
//!
//! The trainer's pass (`pass_on`) draws the queries' seeds first (up to
//! 128 queries at a time), in query order, then cuts them at tile
//! boundaries and runs the pieces
//! through the caller's [`Fork`]: each tile computes exactly what it
//! computes in a one-thread pass, so the result is the same bits on any
//! number of threads (tested with a fork that runs the pieces in reverse).
//! A piece goes to another thread only when a tile's pass is at least
//! [`Fork::min_piece_work`] multiply-adds.
//!
//! # Sharding
//!
//! [`sample_shard`] runs the pass (exponential-jump sampling) over a range
//! of slots; [`merge_draws`] combines the shards exactly: log-sum-exps
//! merge, and the pick is taken from shard `k` with probability
//! `W_k / sum_i W_i` (`W_k` the shard's total sampling weight) by a
//! Gumbel-max over the shards' log-sum-exps. Since shard `k`'s pick is slot
//! `j` with probability `w_j / W_k`, the merged pick is slot `j` with
//! probability `w_j / W`: the distribution of an unsharded pass, though
//! not its bits. The host's benchmark (`negcache bench`) splits a cache
//! this way (the MPI driver merges its shards' log-sum-exps by the same
//! rule); the trainer splits its queries instead (above), which keeps the
//! bits.
//!
//! # Quantized rows
//!
//! [`Rows`] is what the pass reads a block of cached embeddings through,
//! one implementation per precision a cache may store
//! ([`crate::storage::Precision`]): `f32` rows as stored ([`F32Rows`]),
//! int8 rows with a per-row scale ([`I8Rows`], 68 bytes per 64-dimensional
//! row instead of 256) or bf16 rows ([`Bf16Rows`], 128 bytes). Quantized
//! blocks are decoded to `f32` in a 4 KiB buffer before scoring: one
//! decode per cached value per query tile, against `TILE` multiply-adds
//! that use it. The loss picks the implementation from the cache's view,
//! once per pass.
//!
//! # Files
//!
//! Imports point one way: `exp.rs` ([`exp_le0`]), `rng.rs` ([`LaneRng`])
//! and `rows.rs` ([`Rows`] and its storages, [`BLOCK`]) depend on nothing
//! here; this file holds the pass and [`TopKOut`], which it writes;
//! `shards.rs` ([`sample_shard`], [`merge_draws`]) runs the pass. Every
//! public item is re-exported here, as `kernel::X`.
// Lane loops index several arrays by the lane: the form that vectorises.
#![allow(clippy::needless_range_loop)]

mod exp;
mod rng;
mod rows;
mod shards;

use core::ops::Range;

use rand_core::RngCore;

use crate::parallel::Fork;
use crate::random;
use crate::sampler::{LogSumExp, Picks};

pub use exp::exp_le0;
pub use rng::LaneRng;
pub use rows::{Bf16Rows, F32Rows, I8Rows, Rows, BLOCK};
pub use shards::{merge_draws, sample_shard, Draw, Slots};

/// Query lanes of the micro-kernel: one AVX-512 register, two AVX2 ones,
/// four SSE2 or NEON ones.
pub const LANES: usize = 16;
/// Groups of [`LANES`] per query tile. One keeps the pass's stack small
/// (about 10 KiB at `DIM` 64, so a training step still fits a 16 KiB
/// thread stack); a batch of 32 then reads the cache twice, from L3.
const GROUPS: usize = 1;
/// Queries per tile.
pub const TILE: usize = GROUPS * LANES;

/// Slots per register tile (accumulators: `SUB x LANES` floats). Chosen
/// for the target's register file; it changes no result, only speed.
#[cfg(target_feature = "avx512f")]
const SUB: usize = 8;
#[cfg(all(not(target_feature = "avx512f"), any(target_feature = "avx", target_arch = "aarch64")))]
const SUB: usize = 4;
#[cfg(not(any(target_feature = "avx512f", target_feature = "avx", target_arch = "aarch64")))]
const SUB: usize = 2;

const NO_SLOT: u32 = u32::MAX;

/// How the pass chooses among a query's candidates (see
/// [`crate::sampler::Retrieval`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Mode<'a> {
    /// Exponential jumps on the log-sum-exp's own weights (temperature 1).
    Jump1,
    /// Exponential jumps on `exp(inv_temp * c)`.
    Jump(f32),
    /// Gumbel-top-m at `inv_temp`.
    Gumbel(f32),
    /// The highest scores.
    Max,
    /// Given picks (top-k: a candidate position per query).
    Fixed(&'a [usize]),
}

impl Mode<'_> {
    /// Whether each query draws from its own random stream.
    fn is_random(self) -> bool {
        matches!(self, Mode::Jump1 | Mode::Jump(_) | Mode::Gumbel(_))
    }
}

/// What one pass reads.
pub(crate) struct Pass<'a, R, const DIM: usize> {
    pub rows: &'a R,
    pub keys: &'a [u64],
    pub occupied: &'a [bool],
    pub range: Range<usize>,
    pub queries: &'a [[f32; DIM]],
    pub hits: Option<&'a [u64]>,
    pub alpha: f32,
    pub top_k: usize,
    pub mode: Mode<'a>,
}

/// Where the top-k candidates are written, `B x k` row-major; a group with
/// no candidate gets score `-inf` and slot `u32::MAX`.
#[derive(Debug)]
pub struct TopKOut<'a> {
    /// Candidate scores.
    pub scores: &'a mut [f32],
    /// Candidate slot indices.
    pub slots: &'a mut [u32],
}

/// Where one pass writes, one entry per query. `picks` are read first (the
/// fixed retrieval presets them) and written back. `sampling[b]` receives
/// the log-sum-exp of the sampling logits `inv_temp * c` when the draw is
/// tempered (exponential jumps, or a single Gumbel draw: for the
/// importance weights); otherwise the scores' own.
///
/// `mean`, if given, receives each query's candidate mean of the stale
/// embeddings, `sum_j softmax(c)_j e_j` (zero without candidates), kept
/// during the pass like the log-sum-exp: `sum_j exp(c_j - max) e_j`,
/// rescaled whenever the maximum moves, divided by the sum at the end.
pub(crate) struct Outputs<'o, const NEG: usize, const DIM: usize> {
    pub lse: &'o mut [LogSumExp],
    pub picks: &'o mut [Picks<NEG>],
    pub sampling: &'o mut [LogSumExp],
    pub group: &'o mut [(f32, u32)],
    pub top: Option<TopKOut<'o>>,
    pub mean: Option<&'o mut [[f32; DIM]]>,
    /// If given (and `hits` too), receives for each query the lowest
    /// occupied slot holding its positive, or `NO_SLOT`: the in-cache
    /// filter, found by the masking it does anyway.
    pub found: Option<&'o mut [u32]>,
}

impl<'a, R, const DIM: usize> Pass<'a, R, DIM> {
    /// The pass of queries `..mid` and the pass of queries `mid..`.
    fn split_at(&self, mid: usize) -> (Self, Self) {
        let part = |q: Range<usize>| Pass {
            rows: self.rows,
            keys: self.keys,
            occupied: self.occupied,
            range: self.range.clone(),
            queries: &self.queries[q.clone()],
            hits: self.hits.map(|h| &h[q.clone()]),
            alpha: self.alpha,
            top_k: self.top_k,
            mode: match self.mode {
                Mode::Fixed(chosen) => Mode::Fixed(&chosen[q]),
                m => m,
            },
        };
        let n = self.queries.len();
        (part(0..mid), part(mid..n))
    }
}

impl<'o, const NEG: usize, const DIM: usize> Outputs<'o, NEG, DIM> {
    /// The outputs of queries `..mid` and those of queries `mid..` (the
    /// top-k rows hold `k` entries per query).
    fn split_at(self, mid: usize, k: usize) -> (Self, Self) {
        let (lse_a, lse_b) = self.lse.split_at_mut(mid);
        let (picks_a, picks_b) = self.picks.split_at_mut(mid);
        let (sampling_a, sampling_b) = self.sampling.split_at_mut(mid);
        let (group_a, group_b) = self.group.split_at_mut(mid);
        let (top_a, top_b) = match self.top {
            Some(t) => {
                let (sa, sb) = t.scores.split_at_mut(mid * k);
                let (ia, ib) = t.slots.split_at_mut(mid * k);
                (Some(TopKOut { scores: sa, slots: ia }), Some(TopKOut { scores: sb, slots: ib }))
            }
            None => (None, None),
        };
        let (mean_a, mean_b) = match self.mean {
            Some(m) => {
                let (a, b) = m.split_at_mut(mid);
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        let (found_a, found_b) = match self.found {
            Some(f) => {
                let (a, b) = f.split_at_mut(mid);
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        (
            Outputs {
                lse: lse_a,
                picks: picks_a,
                sampling: sampling_a,
                group: group_a,
                top: top_a,
                mean: mean_a,
                found: found_a,
            },
            Outputs {
                lse: lse_b,
                picks: picks_b,
                sampling: sampling_b,
                group: group_b,
                top: top_b,
                mean: mean_b,
                found: found_b,
            },
        )
    }
}

/// A bit set over a hash of the tile's positive keys: a slot whose key's
/// bit is clear holds none of them, so the `B x N` key comparisons of
/// masking become one test per slot, and a full comparison only on the
/// rare slots whose bit is set (16 keys in 1,024 bits). It never rules out
/// a key it holds, so masking finds exactly what the plain scan finds.
struct KeyFilter([u64; 16]);

impl KeyFilter {
    fn bit(key: u64) -> usize {
        // Fibonacci hashing: the top 10 bits of the key times 2^64 / phi.
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54) as usize
    }

    fn new(keys: &[u64]) -> Self {
        let mut bits = [0u64; 16];
        for &k in keys {
            let b = Self::bit(k);
            bits[b / 64] |= 1 << (b % 64);
        }
        Self(bits)
    }

    #[inline(always)]
    fn may_hold(&self, key: u64) -> bool {
        let b = Self::bit(key);
        self.0[b / 64] & (1 << (b % 64)) != 0
    }
}

/// Whether the pass keeps a second log-sum-exp over the sampling logits.
#[inline]
fn tempered<const NEG: usize>(mode: Mode<'_>) -> bool {
    match mode {
        Mode::Jump(_) => true,
        Mode::Gumbel(temp) => NEG == 1 && temp != 1.0,
        _ => false,
    }
}

/// One tile's running state, one lane per query.
struct Lanes<const NEG: usize> {
    m: [f32; TILE],
    sum: [f32; TILE],
    m2: [f32; TILE],
    sum2: [f32; TILE],
    /// Each reservoir's jump threshold (exponential jumps: one reservoir
    /// per negative, independent draws).
    thr: [[f32; NEG]; TILE],
    bad: [f32; TILE],
    gbest: [f32; TILE],
    gslot: [u32; TILE],
    picks: [Picks<NEG>; TILE],
    rng: [LaneRng; TILE],
}

impl<const NEG: usize> Lanes<NEG> {
    /// Raises the sampling log-sum-exp's running maximum `m2` to the
    /// block's maximum of `temp * c`, rescaling `sum2`; returns each lane's
    /// rescale factor.
    #[inline(always)]
    fn rescale_tempered(&mut self, c: &[[f32; TILE]; BLOCK], temp: f32) -> [f32; TILE] {
        let mut bm2 = [f32::NEG_INFINITY; TILE];
        for row in c.iter() {
            for l in 0..TILE {
                let u = temp * row[l];
                bm2[l] = if u > bm2[l] { u } else { bm2[l] };
            }
        }
        let mut r = [1.0; TILE];
        for l in 0..TILE {
            let nm = if bm2[l] > self.m2[l] { bm2[l] } else { self.m2[l] };
            r[l] = exp_le0(self.m2[l] - nm);
            self.sum2[l] *= r[l];
            self.m2[l] = nm;
        }
        r
    }

    /// Adds the block's `exp(temp * c - m2)` to `sum2`.
    #[inline(always)]
    fn add_tempered(&mut self, c: &[[f32; TILE]; BLOCK], temp: f32) {
        for row in c.iter() {
            for l in 0..TILE {
                self.sum2[l] += exp_le0(temp * row[l] - self.m2[l]);
            }
        }
    }

    fn new() -> Self {
        Self {
            m: [f32::NEG_INFINITY; TILE],
            sum: [0.0; TILE],
            m2: [f32::NEG_INFINITY; TILE],
            sum2: [0.0; TILE],
            thr: [[0.0; NEG]; TILE],
            bad: [0.0; TILE],
            gbest: [f32::NEG_INFINITY; TILE],
            gslot: [NO_SLOT; TILE],
            picks: [Picks::EMPTY; TILE],
            rng: [LaneRng::new(0); TILE],
        }
    }
}

/// `max + ln(sum)`-style push of one value into a lane's log-sum-exp;
/// returns the factor the earlier sum was rescaled by.
#[inline]
fn push(m: &mut f32, sum: &mut f32, c: f32) -> f32 {
    if c > *m {
        let r = exp_le0(*m - c);
        *sum = *sum * r + 1.0;
        *m = c;
        r
    } else {
        *sum += exp_le0(c - *m);
        1.0
    }
}

/// The query tile transposed: `q[h][d][l]` is component `d` of query
/// `h * LANES + l` (zero past the batch).
type Transposed<const DIM: usize> = [[[f32; LANES]; DIM]; GROUPS];

/// `acc[k][l] += e[s0 + k][d] * q[d][l]` for every `d` in order and the
/// listed `k`, then `c[s0 + k][off + l] = alpha * acc[k][l]`: the literal
/// indices keep `acc` in registers and leave the lane loop as the one to
/// vectorise (a loop over `k` gets vectorised across slots with gathers).
macro_rules! micro_body {
    ($q:ident, $e:ident, $s0:ident, $c:ident, $off:ident, $alpha:ident; $($k:literal)+) => {{
        let mut acc = [[0.0f32; LANES]; SUB];
        for d in 0..DIM {
            let qd = &$q[d];
            let x = [$($e[$s0 + $k][d]),+];
            for l in 0..LANES {
                $(acc[$k][l] += x[$k] * qd[l];)+
            }
        }
        $(
            let row = &mut $c[$s0 + $k];
            for l in 0..LANES {
                row[$off + l] = $alpha * acc[$k][l];
            }
        )+
    }};
}

/// Scores slots `s0 .. s0 + SUB` of a block against one group of lanes.
#[inline(always)]
fn micro<const DIM: usize>(
    q: &[[f32; LANES]; DIM],
    e: &[[f32; DIM]; BLOCK],
    s0: usize,
    alpha: f32,
    off: usize,
    c: &mut [[f32; TILE]; BLOCK],
) {
    #[cfg(target_feature = "avx512f")]
    micro_body!(q, e, s0, c, off, alpha; 0 1 2 3 4 5 6 7);
    #[cfg(all(not(target_feature = "avx512f"), any(target_feature = "avx", target_arch = "aarch64")))]
    micro_body!(q, e, s0, c, off, alpha; 0 1 2 3);
    #[cfg(not(any(target_feature = "avx512f", target_feature = "avx", target_arch = "aarch64")))]
    micro_body!(q, e, s0, c, off, alpha; 0 1);
}

/// Scores a block against the tile: `c[s][lane] = alpha * <e_s, q_lane>`
/// for the first `halves` groups of lanes.
#[inline(always)]
fn score_block<const DIM: usize>(
    q: &Transposed<DIM>,
    e: &[[f32; DIM]; BLOCK],
    alpha: f32,
    halves: usize,
    c: &mut [[f32; TILE]; BLOCK],
) {
    for h in 0..halves {
        let mut s0 = 0;
        while s0 < BLOCK {
            micro(&q[h], e, s0, alpha, h * LANES, c);
            s0 += SUB;
        }
    }
}

/// The pass over `p.range` for every query, on the calling thread, each
/// query's stream seeded by one `rng.next_u64()` in query order; returns
/// false if a candidate's score was not finite.
pub(crate) fn pass<R: Rows<DIM>, const DIM: usize, const NEG: usize>(
    p: &Pass<'_, R, DIM>,
    out: &mut Outputs<'_, NEG, DIM>,
    rng: &mut impl RngCore,
) -> bool {
    tiles(p, out, &mut || rng.next_u64())
}

/// [`pass`] with its query tiles split over `fork` when a tile's pass is
/// worth a hand-over: the seeds of up to [`CHUNK`] queries are drawn
/// first, in query order (what [`pass`] draws tile by tile), then their
/// tiles run as pieces. Each tile computes what it computes in [`pass`],
/// so the result is the same bits whatever `fork` does.
pub(crate) fn pass_on<R: Rows<DIM> + Sync, F: Fork, const DIM: usize, const NEG: usize>(
    fork: &F,
    p: &Pass<'_, R, DIM>,
    mut out: Outputs<'_, NEG, DIM>,
    rng: &mut impl RngCore,
) -> bool {
    if pass_threads(fork, p.queries.len(), p.range.len(), DIM) > 1 {
        split_chunks(fork, p, out, rng)
    } else {
        pass(p, &mut out, rng)
    }
}

/// How many threads the trainer's pass uses on `fork` for `queries`
/// queries over `slots` slots of `dim` floats: one per tile of [`TILE`]
/// queries, up to the fork's width, when a tile's pass is at least
/// [`Fork::min_piece_work`] multiply-adds; else one.
pub fn pass_threads(fork: &impl Fork, queries: usize, slots: usize, dim: usize) -> usize {
    let tile_work = slots.saturating_mul(dim.saturating_mul(TILE));
    if tile_work < fork.min_piece_work() {
        1
    } else {
        fork.width().min(queries.div_ceil(TILE)).max(1)
    }
}

/// Queries whose seeds are drawn at once before a split: 1 KiB of seeds on
/// the stack, only on the split path (a device's one-thread step never
/// reserves it).
const CHUNK: usize = 8 * TILE;

/// The split path of [`pass_on`], chunk by chunk.
#[inline(never)]
fn split_chunks<R: Rows<DIM> + Sync, F: Fork, const DIM: usize, const NEG: usize>(
    fork: &F,
    p: &Pass<'_, R, DIM>,
    mut out: Outputs<'_, NEG, DIM>,
    rng: &mut impl RngCore,
) -> bool {
    let random = p.mode.is_random();
    let bsz = p.queries.len();
    let mut finite = true;
    let mut c0 = 0;
    while c0 < bsz {
        let n = (bsz - c0).min(CHUNK);
        let (_, rest) = p.split_at(c0);
        let (chunk, _) = rest.split_at(n);
        let (here, tail) = out.split_at(n, p.top_k);
        out = tail;
        let mut seeds = [0u64; CHUNK];
        if random {
            for s in &mut seeds[..n] {
                *s = rng.next_u64();
            }
        }
        finite &= split_tiles(fork, &chunk, here, &seeds[..n], fork.width());
        c0 += n;
    }
    finite
}

/// Runs `parts` pieces of `p`'s queries, cut at tile boundaries.
fn split_tiles<R: Rows<DIM> + Sync, F: Fork, const DIM: usize, const NEG: usize>(
    fork: &F,
    p: &Pass<'_, R, DIM>,
    mut out: Outputs<'_, NEG, DIM>,
    seeds: &[u64],
    parts: usize,
) -> bool {
    let n_tiles = p.queries.len().div_ceil(TILE);
    if parts <= 1 || n_tiles <= 1 {
        let mut next = seeds.iter().copied();
        return tiles(p, &mut out, &mut || next.next().unwrap_or(0));
    }
    let left_parts = parts / 2;
    let mid = (n_tiles * left_parts / parts).max(1) * TILE;
    let (pa, pb) = p.split_at(mid);
    let (oa, ob) = out.split_at(mid, p.top_k);
    let (sa, sb) = seeds.split_at(mid.min(seeds.len()));
    let (mut fa, mut fb) = (true, true);
    fork.join(
        || fa = split_tiles(fork, &pa, oa, sa, left_parts),
        || fb = split_tiles(fork, &pb, ob, sb, parts - left_parts),
    );
    fa && fb
}

/// Every query tile of `p` in turn; `seed` gives each query's stream seed
/// in query order (called only by the random modes).
fn tiles<R: Rows<DIM>, const DIM: usize, const NEG: usize>(
    p: &Pass<'_, R, DIM>,
    out: &mut Outputs<'_, NEG, DIM>,
    seed: &mut dyn FnMut() -> u64,
) -> bool {
    let bsz = p.queries.len();
    let random = p.mode.is_random();
    let mut finite = true;
    let mut q0 = 0;
    while q0 < bsz {
        let nq = (bsz - q0).min(TILE);
        let mut t = Lanes::<NEG>::new();
        for l in 0..nq {
            t.picks[l] = out.picks[q0 + l];
            if random {
                t.rng[l] = LaneRng::new(seed());
            }
        }
        if let Some(mean) = out.mean.as_deref_mut() {
            mean[q0..q0 + nq].fill([0.0; DIM]);
        }
        if let Some(found) = out.found.as_deref_mut() {
            found[q0..q0 + nq].fill(NO_SLOT);
        }
        let mut q: Transposed<DIM> = [[[0.0; LANES]; DIM]; GROUPS];
        for (l, row) in p.queries[q0..q0 + nq].iter().enumerate() {
            for d in 0..DIM {
                q[l / LANES][d][l % LANES] = row[d];
            }
        }
        tile(p, &q, q0, nq, &mut t, out);
        for l in 0..nq {
            let b = q0 + l;
            finite &= !t.bad[l].is_nan();
            out.lse[b] = LogSumExp { max: t.m[l], sum: t.sum[l] };
            out.sampling[b] =
                if tempered::<NEG>(p.mode) { LogSumExp { max: t.m2[l], sum: t.sum2[l] } } else { out.lse[b] };
            out.picks[b] = t.picks[l];
            out.group[b] = (t.gbest[l], t.gslot[l]);
            if let Some(mean) = out.mean.as_deref_mut() {
                let sum = t.sum[l];
                for x in mean[b].iter_mut() {
                    *x = if sum > 0.0 { *x / sum } else { 0.0 };
                }
            }
        }
        q0 += nq;
    }
    finite
}

/// One query tile over the whole range.
fn tile<R: Rows<DIM>, const DIM: usize, const NEG: usize>(
    p: &Pass<'_, R, DIM>,
    q: &Transposed<DIM>,
    q0: usize,
    nq: usize,
    t: &mut Lanes<NEG>,
    out: &mut Outputs<'_, NEG, DIM>,
) {
    let halves = nq.div_ceil(LANES);
    let hits = p.hits.map(|h| &h[q0..q0 + nq]);
    let filter = hits.map(KeyFilter::new);
    let mut buf = [[0.0f32; DIM]; BLOCK];
    let mut c = [[0.0f32; TILE]; BLOCK];
    let mut j0 = p.range.start;
    while j0 < p.range.end {
        let nb = (p.range.end - j0).min(BLOCK);
        let e = if nb == BLOCK {
            p.rows.block(j0, &mut buf)
        } else {
            for (s, row) in buf.iter_mut().enumerate() {
                if s < nb {
                    p.rows.row(j0 + s, row);
                } else {
                    *row = [0.0; DIM];
                }
            }
            &buf
        };
        score_block(q, e, p.alpha, halves, &mut c);

        // Which scores are candidates: occupied slots of the block, minus a
        // query's own positive.
        let occ = &p.occupied[j0..j0 + nb];
        let mut hit = [0u32; BLOCK];
        let mut any_hit = false;
        if let (Some(h), Some(filter)) = (hits, &filter) {
            for s in 0..nb {
                let key = p.keys[j0 + s];
                if occ[s] && filter.may_hold(key) {
                    for (l, &y) in h.iter().enumerate() {
                        if key == y {
                            hit[s] |= 1 << l;
                            any_hit = true;
                            if let Some(found) = out.found.as_deref_mut() {
                                let f = &mut found[q0 + l];
                                *f = (*f).min((j0 + s) as u32);
                            }
                        }
                    }
                }
            }
        }
        if nb == BLOCK && !any_hit && occ.iter().all(|&o| o) {
            for row in c.iter() {
                for l in 0..TILE {
                    t.bad[l] += row[l] * 0.0;
                }
            }
        } else {
            for s in 0..BLOCK {
                if s >= nb || !occ[s] {
                    c[s] = [f32::NEG_INFINITY; TILE];
                    continue;
                }
                for l in 0..TILE {
                    if hit[s] & (1 << l) != 0 {
                        c[s][l] = f32::NEG_INFINITY;
                    } else {
                        t.bad[l] += c[s][l] * 0.0;
                    }
                }
            }
        }

        if p.top_k > 0 {
            top_k_block(p, j0, nb, q0, nq, &c, t, out);
        } else {
            let mean = out.mean.as_deref_mut().map(|m| &mut m[q0..q0 + nq]);
            block(p.mode, j0, nq, &c, e, t, mean);
        }
        j0 += nb;
    }
}

/// The epilogue of one block without top-k: every valid score is a
/// candidate (invalid ones are `-inf`). `e` are the block's rows, `mean`
/// the tile's candidate-mean accumulators (if asked for).
#[inline(always)]
fn block<const NEG: usize, const DIM: usize>(
    mode: Mode<'_>,
    j0: usize,
    nq: usize,
    c: &[[f32; TILE]; BLOCK],
    e: &[[f32; DIM]; BLOCK],
    t: &mut Lanes<NEG>,
    mean: Option<&mut [[f32; DIM]]>,
) {
    // The loss's log-sum-exp: rescale to the block's maximum once.
    let mut bm = [f32::NEG_INFINITY; TILE];
    for row in c.iter() {
        for l in 0..TILE {
            bm[l] = if row[l] > bm[l] { row[l] } else { bm[l] };
        }
    }
    let jump1 = matches!(mode, Mode::Jump1);
    let mut rescale = [1.0f32; TILE];
    for l in 0..TILE {
        let nm = if bm[l] > t.m[l] { bm[l] } else { t.m[l] };
        let r = exp_le0(t.m[l] - nm);
        t.sum[l] *= r;
        if jump1 {
            t.thr[l].iter_mut().for_each(|x| *x *= r);
        }
        t.m[l] = nm;
        rescale[l] = r;
    }
    let start = t.sum;
    for row in c.iter() {
        for l in 0..TILE {
            t.sum[l] += exp_le0(row[l] - t.m[l]);
        }
    }
    if let Some(mean) = mean {
        // The same weights as the sum, in the same order, times the rows.
        for l in 0..nq {
            if rescale[l] != 1.0 {
                mean[l].iter_mut().for_each(|x| *x *= rescale[l]);
            }
            for (s, row) in c.iter().enumerate() {
                if row[l] != f32::NEG_INFINITY {
                    let w = exp_le0(row[l] - t.m[l]);
                    for d in 0..DIM {
                        mean[l][d] += w * e[s][d];
                    }
                }
            }
        }
    }
    match mode {
        Mode::Jump1 => {
            for l in 0..nq {
                if t.sum[l] > lowest(&t.thr[l]) {
                    // Some slot of the block replaces a pick: replay.
                    let mut acc = start[l];
                    for (s, row) in c.iter().enumerate() {
                        acc += exp_le0(row[l] - t.m[l]);
                        jump_at(&mut t.thr[l], &mut t.picks[l], &mut t.rng[l], acc, (j0 + s) as u32, row[l]);
                    }
                }
            }
        }
        Mode::Jump(temp) => {
            // A second log-sum-exp over the sampling logits temp * c.
            let r = t.rescale_tempered(c, temp);
            for l in 0..TILE {
                t.thr[l].iter_mut().for_each(|x| *x *= r[l]);
            }
            let start = t.sum2;
            t.add_tempered(c, temp);
            for l in 0..nq {
                if t.sum2[l] > lowest(&t.thr[l]) {
                    let mut acc = start[l];
                    for (s, row) in c.iter().enumerate() {
                        acc += exp_le0(temp * row[l] - t.m2[l]);
                        jump_at(&mut t.thr[l], &mut t.picks[l], &mut t.rng[l], acc, (j0 + s) as u32, row[l]);
                    }
                }
            }
        }
        Mode::Gumbel(temp) => {
            if tempered::<NEG>(mode) {
                // The sampling logits' log-sum-exp, for the importance
                // weight of a single tempered draw (as in `Mode::Jump`).
                t.rescale_tempered(c, temp);
                t.add_tempered(c, temp);
            }
            for l in 0..nq {
                for (s, row) in c.iter().enumerate() {
                    if row[l] != f32::NEG_INFINITY {
                        let key = temp * row[l] + random::gumbel(&mut t.rng[l]);
                        t.picks[l].offer(key, row[l], (j0 + s) as u32);
                    }
                }
            }
        }
        Mode::Max => {
            for l in 0..nq {
                let worst = if t.picks[l].len == NEG { t.picks[l].keys[NEG - 1] } else { f32::NEG_INFINITY };
                if bm[l] > worst || (t.picks[l].len < NEG && bm[l] != f32::NEG_INFINITY) {
                    for (s, row) in c.iter().enumerate() {
                        if row[l] != f32::NEG_INFINITY {
                            t.picks[l].offer(row[l], row[l], (j0 + s) as u32);
                        }
                    }
                }
            }
        }
        Mode::Fixed(_) => {}
    }
}

/// The lowest of a query's reservoir thresholds: no pick changes while
/// the running sum stays at or below it.
#[inline(always)]
fn lowest<const NEG: usize>(thr: &[f32; NEG]) -> f32 {
    thr.iter().fold(f32::INFINITY, |a, &x| if x < a { x } else { a })
}

/// The exponential-jump step of each of a query's `NEG` independent
/// reservoirs once the running sum of sampling weights has reached `acc`
/// at `slot`: reservoir `i` takes the slot when `acc` passes its
/// threshold, and draws its next one (`acc / U`). In reservoir order, so
/// the random stream is read the same way on every target.
#[inline(always)]
fn jump_at<const NEG: usize>(
    thr: &mut [f32; NEG],
    picks: &mut Picks<NEG>,
    rng: &mut LaneRng,
    acc: f32,
    slot: u32,
    score: f32,
) {
    for (i, x) in thr.iter_mut().enumerate() {
        if acc > *x {
            *x = acc / random::open01(rng);
            picks.set_at(i, slot, score);
        }
    }
}

/// The epilogue of one block with top-k: each group's best slot (lowest
/// index on ties) becomes a candidate when the group ends.
#[allow(clippy::too_many_arguments)]
fn top_k_block<R: Rows<DIM>, const DIM: usize, const NEG: usize>(
    p: &Pass<'_, R, DIM>,
    j0: usize,
    nb: usize,
    q0: usize,
    nq: usize,
    c: &[[f32; TILE]; BLOCK],
    t: &mut Lanes<NEG>,
    out: &mut Outputs<'_, NEG, DIM>,
) {
    let n = p.rows.len();
    let k = p.top_k;
    let glen = n / k;
    for (s, row) in c.iter().enumerate().take(nb) {
        let j = j0 + s;
        if j % glen == 0 {
            t.gbest = [f32::NEG_INFINITY; TILE];
            t.gslot = [NO_SLOT; TILE];
        }
        for l in 0..TILE {
            let better = row[l] > t.gbest[l];
            t.gbest[l] = if better { row[l] } else { t.gbest[l] };
            t.gslot[l] = if better { j as u32 } else { t.gslot[l] };
        }
        if (j + 1) % glen == 0 {
            let g = j / glen;
            for l in 0..nq {
                let (cand, slot) = (t.gbest[l], t.gslot[l]);
                if let Some(o) = out.top.as_mut() {
                    o.scores[(q0 + l) * k + g] = cand;
                    o.slots[(q0 + l) * k + g] = slot;
                }
                if slot != NO_SLOT {
                    let r = candidate(p.mode, t, l, q0 + l, cand, slot, g);
                    if let Some(mean) = out.mean.as_deref_mut() {
                        let acc = &mut mean[q0 + l];
                        if r != 1.0 {
                            acc.iter_mut().for_each(|x| *x *= r);
                        }
                        let w = exp_le0(cand - t.m[l]);
                        let mut row = [0.0; DIM];
                        p.rows.row(slot as usize, &mut row);
                        for d in 0..DIM {
                            acc[d] += w * row[d];
                        }
                    }
                }
            }
        }
    }
}

/// One candidate of lane `l` (query `b`), scalar: for top-k's group bests.
/// Returns the factor by which the lane's log-sum-exp sum was rescaled.
#[inline]
fn candidate<const NEG: usize>(
    mode: Mode<'_>,
    t: &mut Lanes<NEG>,
    l: usize,
    b: usize,
    c: f32,
    slot: u32,
    g: usize,
) -> f32 {
    let r = push(&mut t.m[l], &mut t.sum[l], c);
    match mode {
        Mode::Jump1 | Mode::Jump(_) => {
            let (sum, r) = match mode {
                Mode::Jump(temp) => {
                    let r2 = push(&mut t.m2[l], &mut t.sum2[l], temp * c);
                    (t.sum2[l], r2)
                }
                _ => (t.sum[l], r),
            };
            t.thr[l].iter_mut().for_each(|x| *x *= r);
            jump_at(&mut t.thr[l], &mut t.picks[l], &mut t.rng[l], sum, slot, c);
        }
        Mode::Gumbel(temp) => {
            if tempered::<NEG>(mode) {
                push(&mut t.m2[l], &mut t.sum2[l], temp * c);
            }
            let key = temp * c + random::gumbel(&mut t.rng[l]);
            t.picks[l].offer(key, c, slot);
        }
        Mode::Max => t.picks[l].offer(c, c, slot),
        Mode::Fixed(chosen) => {
            if chosen[b] == g {
                t.picks[l].set_at(0, slot, c);
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::KeyFilter;
    use crate::random;
    use rand_core::{RngCore, SeedableRng};
    use rand_pcg::Pcg64Mcg;

    #[test]
    fn the_key_filter_keeps_its_keys_and_passes_few_others() {
        let mut r = Pcg64Mcg::seed_from_u64(3);
        let mut passed = 0;
        for round in 0..50 {
            // Small integers (the keys of integer items) and fingerprints.
            let keys: [u64; 16] =
                core::array::from_fn(|i| if round % 2 == 0 { (round * 16 + i) as u64 } else { r.next_u64() });
            let f = KeyFilter::new(&keys);
            assert!(keys.iter().all(|&k| f.may_hold(k)));
            for _ in 0..1000 {
                let k = if round % 2 == 0 { u64::from(random::below(&mut r, 1 << 20)) + 10_000 } else { r.next_u64() };
                passed += usize::from(f.may_hold(k));
            }
        }
        // At most 16 of 1,024 bits set: about 1.6% pass; allow 3%.
        assert!(passed < 1500, "{passed} of 50,000 other keys passed");
    }
}
