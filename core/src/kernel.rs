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
//! - the exponential-jump reservoir keeps its running sum in the same
//!   lanes; since weights are non-negative, the running sum at the end of a
//!   block exceeds the query's threshold exactly when some slot of the
//!   block would replace the pick, so one comparison per block and query
//!   finds the rare blocks where a query jumps, and only those lanes are
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
//! # Sharding
//!
//! [`sample_shard`] runs the pass (exponential-jump sampling) over a range
//! of slots; [`merge_draws`] combines the shards exactly: log-sum-exps
//! merge, and the pick is taken from shard `k` with probability
//! `W_k / sum_i W_i` (`W_k` the shard's total sampling weight) by a
//! Gumbel-max over the shards' log-sum-exps. Since shard `k`'s pick is slot
//! `j` with probability `w_j / W_k`, the merged pick is slot `j` with
//! probability `w_j / W`: the distribution of an unsharded pass. The host's
//! benchmark (`negcache bench`) scores the halves of a cache on two threads
//! this way; the trainer still runs one pass on one thread.
//!
//! # Quantized rows
//!
//! [`Rows`] is what the pass reads a block of cached embeddings through:
//! `f32` rows as stored ([`F32Rows`]), int8 rows with a per-row scale
//! ([`I8Rows`], 68 bytes per 64-dimensional row instead of 256) or bf16
//! rows ([`Bf16Rows`], 128 bytes). Quantized blocks are decoded to `f32` in
//! a 4 KiB buffer before scoring: one decode per cached value per query
//! tile, against `TILE` multiply-adds that use it.
// Lane loops index several arrays by the lane: the form that vectorises.
#![allow(clippy::needless_range_loop)]

use core::ops::Range;

use rand_core::RngCore;

use crate::error::{check_len, Error, Result};
use crate::loss::TopKOut;
use crate::random;
use crate::sampler::{Jump, LogSumExp, Picks};

/// Query lanes of the micro-kernel: one AVX-512 register, two AVX2 ones,
/// four SSE2 or NEON ones.
pub const LANES: usize = 16;
/// Groups of [`LANES`] per query tile. One keeps the pass's stack small
/// (about 10 KiB at `DIM` 64, so a training step still fits a 16 KiB
/// thread stack); a batch of 32 then reads the cache twice, from L3.
const GROUPS: usize = 1;
/// Queries per tile.
pub const TILE: usize = GROUPS * LANES;
/// Slots per block: the granularity of the log-sum-exp's running maximum.
/// It is a fixed constant, so the arithmetic (and so every result) is the
/// same whatever register tiling the target uses.
pub const BLOCK: usize = 16;

/// Slots per register tile (accumulators: `SUB x LANES` floats). Chosen
/// for the target's register file; it changes no result, only speed.
#[cfg(target_feature = "avx512f")]
const SUB: usize = 8;
#[cfg(all(not(target_feature = "avx512f"), any(target_feature = "avx", target_arch = "aarch64")))]
const SUB: usize = 4;
#[cfg(not(any(target_feature = "avx512f", target_feature = "avx", target_arch = "aarch64")))]
const SUB: usize = 2;

const NO_SLOT: u32 = u32::MAX;

/// Lower clamp of [`exp_le0`]'s argument: below it the result is 0.
const EXP_LO: f32 = -88.0;

/// `e^x` for `x <= 0`, in plain IEEE single-precision arithmetic.
///
/// Range reduction `x = n ln 2 + r` (`n` by the round-to-nearest of
/// `x log2 e`, Cody-Waite two-part `ln 2`, `|r| <= ~0.35`), Cephes' degree-6
/// polynomial for `e^r`, and `2^n` built from its exponent bits. Every
/// operation is a basic IEEE operation (no FMA, no libm), so the result is
/// the same on every target, and the function vectorises.
///
/// Accuracy: at most 2 ulp from the correctly rounded `e^x` for
/// `x` in `[-87.3, 0]` (the test `exp_is_within_two_ulp` checks 2^24 evenly
/// spread arguments against `f64`); `exp_le0(0) == 1` exactly. Results
/// below `2^-126` (`x < -87.3`) may lose precision as subnormals and are
/// flushed to 0 below `x ~ -87.7`; positive arguments are treated as 0 and
/// NaN as `-inf` (result 0). In the pass, arguments are
/// `score - running max <= 0`, so a weight that is flushed is below
/// `1e-38` times the largest weight.
#[inline(always)]
pub fn exp_le0(x: f32) -> f32 {
    const LOG2E: f32 = core::f32::consts::LOG2_E;
    // 1.5 * 2^23: adding it rounds to an integer (ties to even).
    const MAGIC: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // `x > EXP_LO` is false for NaN, so NaN becomes EXP_LO.
    let x = if x > EXP_LO { x } else { EXP_LO };
    let x = if x < 0.0 { x } else { 0.0 };
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    // t's low mantissa bits hold n + 2^22; n + 127 in [0, 127] is the
    // biased exponent of 2^n (0 gives +0.0, which flushes the result).
    let biased = t.to_bits().wrapping_sub(0x4B40_0000u32.wrapping_sub(127));
    let scale = f32::from_bits(biased << 23);
    let r = x - n * LN2_HI;
    let r = r - n * LN2_LO;
    let z = r * r;
    let p = 1.987_569_2e-4;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * z + r + 1.0;
    y * scale
}

/// One query's random stream: SplitMix64, seeded from the caller's
/// generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneRng(u64);

impl LaneRng {
    /// A stream starting from `seed`.
    pub const fn new(seed: u64) -> Self {
        Self(seed)
    }
}

impl RngCore for LaneRng {
    #[inline]
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
    #[inline]
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        rand_core::impls::fill_bytes_via_next(self, dst)
    }
}

/// Cached embeddings as the pass reads them: blocks of [`BLOCK`] rows as
/// `f32`, decoded if the storage is quantized.
pub trait Rows<const DIM: usize> {
    /// Bytes one row occupies in this storage.
    const BYTES_PER_ROW: usize;
    /// The number of rows.
    fn len(&self) -> usize;
    /// Whether there are no rows.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Rows `j0 .. j0 + BLOCK` (all in range) as `f32`: borrowed from the
    /// storage, or decoded into `buf`.
    fn block<'b>(&'b self, j0: usize, buf: &'b mut [[f32; DIM]; BLOCK]) -> &'b [[f32; DIM]; BLOCK];
    /// Row `j` as `f32`.
    fn row(&self, j: usize, out: &mut [f32; DIM]);
}

/// `f32` rows, as the cache stores them.
#[derive(Debug, Clone, Copy)]
pub struct F32Rows<'a, const DIM: usize>(pub &'a [[f32; DIM]]);

impl<const DIM: usize> Rows<DIM> for F32Rows<'_, DIM> {
    const BYTES_PER_ROW: usize = 4 * DIM;
    #[inline]
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn block<'b>(&'b self, j0: usize, buf: &'b mut [[f32; DIM]; BLOCK]) -> &'b [[f32; DIM]; BLOCK] {
        match <&[[f32; DIM]; BLOCK]>::try_from(&self.0[j0..j0 + BLOCK]) {
            Ok(b) => b,
            Err(_) => buf,
        }
    }
    #[inline]
    fn row(&self, j: usize, out: &mut [f32; DIM]) {
        *out = self.0[j];
    }
}

/// Int8 rows with one `f32` scale per row: component `d` of row `j` is
/// `scales[j] * rows[j][d]`. `4 * DIM / (DIM + 4)` times smaller than
/// `f32` (3.76x at `DIM` 64).
#[derive(Debug, Clone, Copy)]
pub struct I8Rows<'a, const DIM: usize> {
    /// The quantized components.
    pub rows: &'a [[i8; DIM]],
    /// One scale per row.
    pub scales: &'a [f32],
}

impl<const DIM: usize> Rows<DIM> for I8Rows<'_, DIM> {
    const BYTES_PER_ROW: usize = DIM + 4;
    #[inline]
    fn len(&self) -> usize {
        self.rows.len().min(self.scales.len())
    }
    #[inline(always)]
    fn block<'b>(&'b self, j0: usize, buf: &'b mut [[f32; DIM]; BLOCK]) -> &'b [[f32; DIM]; BLOCK] {
        for (s, out) in buf.iter_mut().enumerate() {
            self.row(j0 + s, out);
        }
        buf
    }
    #[inline(always)]
    fn row(&self, j: usize, out: &mut [f32; DIM]) {
        let (r, k) = (&self.rows[j], self.scales[j]);
        for d in 0..DIM {
            out[d] = k * r[d] as f32;
        }
    }
}

/// Quantizes a row to int8 with a per-row scale `max |x| / 127`, rounding
/// to nearest (ties to even). A zero row gets scale 0.
pub fn quantize_i8<const DIM: usize>(x: &[f32; DIM]) -> ([i8; DIM], f32) {
    // 1.5 * 2^23: adding it rounds |v| <= 2^22 to an integer.
    const MAGIC: f32 = 12_582_912.0;
    let m = x.iter().fold(0.0f32, |m, &v| if v.abs() > m { v.abs() } else { m });
    if !(m > 0.0 && m.is_finite()) {
        return ([0; DIM], 0.0);
    }
    let scale = m / 127.0;
    let inv = 127.0 / m;
    let mut q = [0i8; DIM];
    for d in 0..DIM {
        let v = (x[d] * inv + MAGIC) - MAGIC;
        q[d] = v.clamp(-127.0, 127.0) as i8;
    }
    (q, scale)
}

/// bf16 rows: the upper 16 bits of each `f32` (2x smaller).
#[derive(Debug, Clone, Copy)]
pub struct Bf16Rows<'a, const DIM: usize>(pub &'a [[u16; DIM]]);

impl<const DIM: usize> Rows<DIM> for Bf16Rows<'_, DIM> {
    const BYTES_PER_ROW: usize = 2 * DIM;
    #[inline]
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn block<'b>(&'b self, j0: usize, buf: &'b mut [[f32; DIM]; BLOCK]) -> &'b [[f32; DIM]; BLOCK] {
        for (s, out) in buf.iter_mut().enumerate() {
            self.row(j0 + s, out);
        }
        buf
    }
    #[inline(always)]
    fn row(&self, j: usize, out: &mut [f32; DIM]) {
        let r = &self.0[j];
        for d in 0..DIM {
            out[d] = bf16_to_f32(r[d]);
        }
    }
}

/// `f32` to bf16, rounding to nearest (ties to even); NaN stays NaN.
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7FFF + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// bf16 to `f32` (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `f32` rows read through int8 quantization (per-row scale, as
/// [`quantize_i8`]): the scores an int8 cache would give, from an `f32`
/// cache. The `int8-scoring` feature makes training score its cache this
/// way, to measure what an int8 cache costs in accuracy.
#[derive(Debug, Clone, Copy)]
pub struct QuantizedView<'a, const DIM: usize>(pub &'a [[f32; DIM]]);

impl<const DIM: usize> Rows<DIM> for QuantizedView<'_, DIM> {
    const BYTES_PER_ROW: usize = DIM + 4;
    #[inline]
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline]
    fn block<'b>(&'b self, j0: usize, buf: &'b mut [[f32; DIM]; BLOCK]) -> &'b [[f32; DIM]; BLOCK] {
        for (s, out) in buf.iter_mut().enumerate() {
            self.row(j0 + s, out);
        }
        buf
    }
    #[inline]
    fn row(&self, j: usize, out: &mut [f32; DIM]) {
        let (q, k) = quantize_i8(&self.0[j]);
        for d in 0..DIM {
            out[d] = k * q[d] as f32;
        }
    }
}

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

/// Where one pass writes, one entry per query. `picks` are read first (the
/// fixed retrieval presets them) and written back. `jump[b].lse` receives
/// the log-sum-exp of the sampling logits `inv_temp * c` when they differ
/// from the scores and one negative is drawn (for the importance weight);
/// otherwise the scores' own.
///
/// `mean`, if given, receives each query's candidate mean of the stale
/// embeddings, `sum_j softmax(c)_j e_j` (zero without candidates), kept
/// during the pass like the log-sum-exp: `sum_j exp(c_j - max) e_j`,
/// rescaled whenever the maximum moves, divided by the sum at the end.
pub(crate) struct Outputs<'o, 't, const NEG: usize, const DIM: usize> {
    pub lse: &'o mut [LogSumExp],
    pub picks: &'o mut [Picks<NEG>],
    pub jump: &'o mut [Jump],
    pub group: &'o mut [(f32, u32)],
    pub top: Option<&'o mut TopKOut<'t>>,
    pub mean: Option<&'o mut [[f32; DIM]]>,
    /// If given (and `hits` too), receives for each query the lowest
    /// occupied slot holding its positive, or `NO_SLOT`: the in-cache
    /// filter, found by the masking it does anyway.
    pub found: Option<&'o mut [u32]>,
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
    thr: [f32; TILE],
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
            thr: [0.0; TILE],
            bad: [0.0; TILE],
            gbest: [f32::NEG_INFINITY; TILE],
            gslot: [NO_SLOT; TILE],
            picks: [Picks::EMPTY; TILE],
            rng: [LaneRng(0); TILE],
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

/// The pass over `p.range` for every query; returns false if a candidate's
/// score was not finite.
pub(crate) fn pass<R: Rows<DIM>, const DIM: usize, const NEG: usize>(
    p: &Pass<'_, R, DIM>,
    out: &mut Outputs<'_, '_, NEG, DIM>,
    rng: &mut impl RngCore,
) -> bool {
    let bsz = p.queries.len();
    let random = matches!(p.mode, Mode::Jump1 | Mode::Jump(_) | Mode::Gumbel(_));
    let mut finite = true;
    let mut q0 = 0;
    while q0 < bsz {
        let nq = (bsz - q0).min(TILE);
        let mut t = Lanes::<NEG>::new();
        for l in 0..nq {
            t.picks[l] = out.picks[q0 + l];
            if random {
                t.rng[l] = LaneRng(rng.next_u64());
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
            let sampling =
                if tempered::<NEG>(p.mode) { LogSumExp { max: t.m2[l], sum: t.sum2[l] } } else { out.lse[b] };
            out.jump[b] = Jump { lse: sampling, threshold: t.thr[l] };
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
    out: &mut Outputs<'_, '_, NEG, DIM>,
) {
    let halves = nq.div_ceil(LANES);
    let hits = p.hits.map(|h| &h[q0..q0 + nq]);
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
        if let Some(h) = hits {
            for s in 0..nb {
                if occ[s] {
                    let key = p.keys[j0 + s];
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
            t.thr[l] *= r;
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
                if t.sum[l] > t.thr[l] {
                    // Some slot of the block replaces the pick: replay.
                    let mut acc = start[l];
                    for (s, row) in c.iter().enumerate() {
                        acc += exp_le0(row[l] - t.m[l]);
                        if acc > t.thr[l] {
                            t.thr[l] = acc / random::open01(&mut t.rng[l]);
                            t.picks[l].set_one((j0 + s) as u32, row[l]);
                        }
                    }
                }
            }
        }
        Mode::Jump(temp) => {
            // A second log-sum-exp over the sampling logits temp * c.
            let r = t.rescale_tempered(c, temp);
            for l in 0..TILE {
                t.thr[l] *= r[l];
            }
            let start = t.sum2;
            t.add_tempered(c, temp);
            for l in 0..nq {
                if t.sum2[l] > t.thr[l] {
                    let mut acc = start[l];
                    for (s, row) in c.iter().enumerate() {
                        acc += exp_le0(temp * row[l] - t.m2[l]);
                        if acc > t.thr[l] {
                            t.thr[l] = acc / random::open01(&mut t.rng[l]);
                            t.picks[l].set_one((j0 + s) as u32, row[l]);
                        }
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
    out: &mut Outputs<'_, '_, NEG, DIM>,
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
            let mut jump = Jump { lse: LogSumExp::EMPTY, threshold: t.thr[l] };
            if jump.step(sum, r, &mut t.rng[l]) {
                t.picks[l].set_one(slot, c);
            }
            t.thr[l] = jump.threshold;
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
                t.picks[l].set_one(slot, c);
            }
        }
    }
    r
}

/// One query's result of a shard: its candidates' log-sum-exp (the loss's,
/// at temperature 1), the log-sum-exp of its sampling logits, and the
/// slot drawn from the shard (`u32::MAX` if it had no candidate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    /// Log-sum-exp of the scores `alpha <q, e_j>` over the shard's
    /// candidates.
    pub lse: LogSumExp,
    /// Log-sum-exp of the sampling logits `inv_temp * score`.
    pub sample_lse: LogSumExp,
    /// The slot drawn, with probability proportional to
    /// `exp(inv_temp * score)` within the shard; `u32::MAX` if none.
    pub slot: u32,
}

impl Draw {
    /// No candidate.
    pub const EMPTY: Self = Self { lse: LogSumExp::EMPTY, sample_lse: LogSumExp::EMPTY, slot: NO_SLOT };
}

/// The cache a shard reads: rows, item keys and occupancy of every slot
/// (the shard's range indexes them).
#[derive(Debug)]
pub struct Slots<'a, R> {
    /// The embeddings.
    pub rows: &'a R,
    /// The items' keys (for accidental-hit masking).
    pub keys: &'a [u64],
    /// Which slots hold an item.
    pub occupied: &'a [bool],
}

impl<R> Clone for Slots<'_, R> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<R> Copy for Slots<'_, R> {}

/// Scores `queries` against the slots in `range` and draws one slot per
/// query from `softmax(inv_temp * alpha <q, e_j>)` over the range's
/// candidates, by exponential jumps; `hits`, if given, are the queries'
/// own positives' keys, masked out. Writes one [`Draw`] per query.
///
/// Slot indices in the result are indices into the whole of `slots`.
#[allow(clippy::too_many_arguments)]
pub fn sample_shard<R: Rows<DIM>, const DIM: usize>(
    slots: Slots<'_, R>,
    range: Range<usize>,
    queries: &[[f32; DIM]],
    hits: Option<&[u64]>,
    alpha: f32,
    inv_temp: f32,
    rng: &mut impl RngCore,
    out: &mut [Draw],
) -> Result<()> {
    check_len("draws", queries.len(), out.len())?;
    check_len("keys", slots.rows.len(), slots.keys.len())?;
    check_len("occupancy", slots.rows.len(), slots.occupied.len())?;
    if let Some(h) = hits {
        check_len("positive items", queries.len(), h.len())?;
    }
    if range.start > range.end || range.end > slots.rows.len() {
        return Err(Error::IndexOutOfRange { what: "shard end", index: range.end, bound: slots.rows.len() + 1 });
    }
    if !(inv_temp.is_finite() && inv_temp >= 0.0 && alpha.is_finite()) {
        return Err(Error::InvalidConfig { what: "scale and inverse temperature must be finite, temperature >= 0" });
    }
    let mode = if inv_temp == 1.0 { Mode::Jump1 } else { Mode::Jump(inv_temp) };
    let mut finite = true;
    for (k, chunk) in queries.chunks(TILE).enumerate() {
        let b0 = k * TILE;
        let nq = chunk.len();
        let mut lse = [LogSumExp::EMPTY; TILE];
        let mut picks = [Picks::<1>::EMPTY; TILE];
        let mut jump = [Jump::EMPTY; TILE];
        let mut group = [(f32::NEG_INFINITY, NO_SLOT); TILE];
        let p = Pass {
            rows: slots.rows,
            keys: slots.keys,
            occupied: slots.occupied,
            range: range.clone(),
            queries: chunk,
            hits: hits.map(|h| &h[b0..b0 + nq]),
            alpha,
            top_k: 0,
            mode,
        };
        let mut o = Outputs {
            lse: &mut lse[..nq],
            picks: &mut picks[..nq],
            jump: &mut jump[..nq],
            group: &mut group[..nq],
            top: None,
            mean: None,
            found: None,
        };
        finite &= pass(&p, &mut o, rng);
        for l in 0..nq {
            out[b0 + l] = Draw {
                lse: lse[l],
                sample_lse: jump[l].lse,
                slot: if picks[l].len > 0 { picks[l].slots[0] } else { NO_SLOT },
            };
        }
    }
    if finite {
        Ok(())
    } else {
        Err(Error::NonFinite { what: "cache score" })
    }
}

/// Merges the draws of shards that together cover a cache: per query, the
/// log-sum-exps merge and the pick comes from shard `k` with probability
/// `W_k / sum_i W_i` (Gumbel-max over the shards' sampling log-sum-exps),
/// which makes it an exact draw from the whole cache's softmax.
pub fn merge_draws(parts: &[&[Draw]], rng: &mut impl RngCore, out: &mut [Draw]) -> Result<()> {
    for part in parts {
        check_len("shard draws", out.len(), part.len())?;
    }
    for (b, o) in out.iter_mut().enumerate() {
        let mut merged = Draw::EMPTY;
        let mut best = f32::NEG_INFINITY;
        for part in parts {
            let d = &part[b];
            merged.lse.merge(&d.lse);
            merged.sample_lse.merge(&d.sample_lse);
            if d.slot != NO_SLOT && d.sample_lse.sum > 0.0 {
                let key = d.sample_lse.max + crate::math::ln(d.sample_lse.sum) + random::gumbel(rng);
                if key > best {
                    best = key;
                    merged.slot = d.slot;
                }
            }
        }
        *o = merged;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::NegativeCache;
    use crate::stats::chi_square;
    use rand_core::SeedableRng;
    use rand_pcg::Pcg64Mcg;

    fn ulp_distance(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp() {
        assert_eq!(exp_le0(0.0), 1.0);
        assert_eq!(exp_le0(-0.0), 1.0);
        assert_eq!(exp_le0(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_le0(f32::NAN), 0.0);
        assert_eq!(exp_le0(-200.0), 0.0);
        assert_eq!(exp_le0(3.0), 1.0);
        let mut worst = 0;
        let n = 1 << 24;
        let lo = -87.3f64;
        for i in 0..=n {
            let x = (lo * i as f64 / n as f64) as f32;
            let want = libm::exp(x as f64) as f32;
            let d = ulp_distance(exp_le0(x), want);
            worst = worst.max(d);
        }
        // Also every float in [-1, 0] with exponent >= -20 sampled densely.
        let mut x = -1.0f32;
        while x < -1e-6 {
            let want = libm::exp(x as f64) as f32;
            worst = worst.max(ulp_distance(exp_le0(x), want));
            x = f32::from_bits(x.to_bits() - 97);
        }
        assert!(worst <= 2, "worst error {worst} ulp");
    }

    #[test]
    fn bf16_and_int8_round_trip() {
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0)), 1.0);
        assert_eq!(bf16_to_f32(f32_to_bf16(-0.5)), -0.5);
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: rounds to even (1).
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        let x = [0.5f32, -0.25, 0.125, 0.0];
        let (q, k) = quantize_i8(&x);
        assert_eq!(q, [127, -64, 32, 0]);
        assert!((k - 0.5 / 127.0).abs() < 1e-9);
        assert_eq!(quantize_i8(&[0.0f32; 4]), ([0; 4], 0.0));
    }

    const D: usize = 4;

    fn rows<const N: usize>(r: &mut Pcg64Mcg, scale: f32) -> [[f32; D]; N] {
        core::array::from_fn(|_| core::array::from_fn(|_| scale * random::normal(r)))
    }

    /// The pass written the plain way: one score at a time, in slot order
    /// per query, the same arithmetic (sequential dot, block maxima of
    /// `BLOCK` slots, `exp_le0`) and the same per-query streams.
    fn reference_jump(emb: &[[f32; D]], occupied: &[bool], q: &[[f32; D]], alpha: f32, seed: u64) -> [Draw; 3] {
        let mut rng = Pcg64Mcg::seed_from_u64(seed);
        let mut out = [Draw::EMPTY; 3];
        for (b, qb) in q.iter().enumerate() {
            let mut lane = LaneRng(rng.next_u64());
            let (mut m, mut sum, mut thr) = (f32::NEG_INFINITY, 0.0f32, 0.0f32);
            let mut slot = NO_SLOT;
            for j0 in (0..emb.len()).step_by(BLOCK) {
                let idx = j0..(j0 + BLOCK).min(emb.len());
                let score = |j: usize| {
                    let mut acc = 0.0f32;
                    for d in 0..D {
                        acc += emb[j][d] * qb[d];
                    }
                    alpha * acc
                };
                let bm = idx.clone().filter(|&j| occupied[j]).map(score).fold(f32::NEG_INFINITY, f32::max);
                let nm = if bm > m { bm } else { m };
                let r = exp_le0(m - nm);
                sum *= r;
                thr *= r;
                m = nm;
                for j in idx {
                    if occupied[j] {
                        sum += exp_le0(score(j) - m);
                        if sum > thr {
                            thr = sum / random::open01(&mut lane);
                            slot = j as u32;
                        }
                    }
                }
            }
            out[b] = Draw { lse: LogSumExp { max: m, sum }, sample_lse: LogSumExp { max: m, sum }, slot };
        }
        out
    }

    #[test]
    fn blocked_pass_equals_the_plain_one_bit_for_bit() {
        let mut r = Pcg64Mcg::seed_from_u64(5);
        let emb: [[f32; D]; 70] = rows(&mut r, 1.0);
        let mut occupied = [true; 70];
        occupied[3] = false;
        occupied[40] = false;
        let q: [[f32; D]; 3] = rows(&mut r, 1.0);
        let keys: [u64; 70] = core::array::from_fn(|j| j as u64);
        let slots = Slots { rows: &F32Rows(&emb), keys: &keys, occupied: &occupied };
        for seed in 0..50 {
            let mut out = [Draw::EMPTY; 3];
            let mut rng = Pcg64Mcg::seed_from_u64(seed);
            sample_shard(slots, 0..70, &q, None, 3.0, 1.0, &mut rng, &mut out).unwrap();
            let want = reference_jump(&emb, &occupied, &q, 3.0, seed);
            assert_eq!(out, want, "seed {seed}");
        }
    }

    fn softmax(c: &[f64]) -> heapless::Vec<f64, 64> {
        let m = c.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x));
        let z: f64 = c.iter().map(|&x| (x - m).exp()).sum();
        c.iter().map(|&x| (x - m).exp() / z).collect()
    }

    /// Shards of 3 uneven ranges, merged, draw from the whole cache's
    /// softmax (chi-square, 100,000 draws), at temperature 1 and 0.5, with
    /// one slot masked as the query's positive.
    #[test]
    fn merged_shards_follow_the_softmax() {
        for (inv_temp, seed) in [(1.0f32, 21u64), (0.5, 22)] {
            let mut r = Pcg64Mcg::seed_from_u64(seed);
            let emb: [[f32; D]; 40] = rows(&mut r, 0.6);
            let mut occupied = [true; 40];
            occupied[7] = false;
            let keys: [u64; 40] = core::array::from_fn(|j| j as u64);
            let q: [[f32; D]; 1] = rows(&mut r, 1.0);
            let hits = [30u64];
            let alpha = 1.5f32;
            let score = |j: usize| alpha as f64 * (0..D).map(|d| q[0][d] as f64 * emb[j][d] as f64).sum::<f64>();
            let cand: heapless::Vec<usize, 40> = (0..40).filter(|&j| occupied[j] && j != 30).collect();
            let logits: heapless::Vec<f64, 40> = cand.iter().map(|&j| inv_temp as f64 * score(j)).collect();
            let probs = softmax(&logits);
            let slots = Slots { rows: &F32Rows(&emb), keys: &keys, occupied: &occupied };
            let mut counts = [0u64; 40];
            let (mut a, mut b, mut c, mut m) = ([Draw::EMPTY], [Draw::EMPTY], [Draw::EMPTY], [Draw::EMPTY]);
            for _ in 0..100_000 {
                sample_shard(slots, 0..5, &q, Some(&hits), alpha, inv_temp, &mut r, &mut a).unwrap();
                sample_shard(slots, 5..29, &q, Some(&hits), alpha, inv_temp, &mut r, &mut b).unwrap();
                sample_shard(slots, 29..40, &q, Some(&hits), alpha, inv_temp, &mut r, &mut c).unwrap();
                merge_draws(&[&a, &b, &c], &mut r, &mut m).unwrap();
                let pos = cand.iter().position(|&j| j == m[0].slot as usize).expect("a non-candidate was drawn");
                counts[pos] += 1;
            }
            let t = chi_square(&counts[..cand.len()], &probs).unwrap();
            assert!(t.p_value > 0.001, "inv_temp {inv_temp}: {t:?}");
            // The merged log-sum-exp is the whole cache's.
            let want = {
                let all: heapless::Vec<f64, 40> = cand.iter().map(|&j| score(j)).collect();
                let mx = all.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x));
                mx + all.iter().map(|&x| (x - mx).exp()).sum::<f64>().ln()
            };
            let got = m[0].lse.max as f64 + (m[0].lse.sum as f64).ln();
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
    }

    #[test]
    fn quantized_rows_score_close_to_f32() {
        let mut r = Pcg64Mcg::seed_from_u64(8);
        let mut cache = NegativeCache::<u32, 64, D>::new();
        let emb: [[f32; D]; 64] = rows(&mut r, 0.5);
        let mut cm = cache.as_mut();
        for (j, e) in emb.iter().enumerate() {
            cm.set_slot(j, e, j as u32, 0, true).unwrap();
        }
        let q: [[f32; D]; 1] = rows(&mut r, 0.5);
        let mut i8rows = [[0i8; D]; 64];
        let mut scales = [0f32; 64];
        let mut bf = [[0u16; D]; 64];
        for j in 0..64 {
            (i8rows[j], scales[j]) = quantize_i8(&emb[j]);
            bf[j] = emb[j].map(f32_to_bf16);
        }
        let cr = cache.as_ref();
        let lse_of = |rows: &dyn Fn(&mut [Draw; 1])| {
            let mut d = [Draw::EMPTY];
            rows(&mut d);
            d[0].lse.max + crate::math::ln(d[0].lse.sum)
        };
        let occ = cr.occupied();
        let keys = cr.keys();
        let run = |d: &mut [Draw; 1], rows: &dyn Fn(&mut [Draw; 1])| rows(d);
        let _ = run;
        let f = lse_of(&|d| {
            let s = Slots { rows: &F32Rows(cr.embeddings()), keys, occupied: occ };
            sample_shard(s, 0..64, &q, None, 4.0, 1.0, &mut Pcg64Mcg::seed_from_u64(1), d).unwrap();
        });
        let i = lse_of(&|d| {
            let s = Slots { rows: &I8Rows { rows: &i8rows, scales: &scales }, keys, occupied: occ };
            sample_shard(s, 0..64, &q, None, 4.0, 1.0, &mut Pcg64Mcg::seed_from_u64(1), d).unwrap();
        });
        let v = lse_of(&|d| {
            let s = Slots { rows: &QuantizedView(cr.embeddings()), keys, occupied: occ };
            sample_shard(s, 0..64, &q, None, 4.0, 1.0, &mut Pcg64Mcg::seed_from_u64(1), d).unwrap();
        });
        let h = lse_of(&|d| {
            let s = Slots { rows: &Bf16Rows(&bf), keys, occupied: occ };
            sample_shard(s, 0..64, &q, None, 4.0, 1.0, &mut Pcg64Mcg::seed_from_u64(1), d).unwrap();
        });
        assert!((f - i).abs() < 0.05 && (f - h).abs() < 0.05, "{f} {i} {h}");
        // The quantizing view sees exactly what int8 storage holds.
        assert_eq!(i, v);
    }
}
