//! Sharded passes ([`sample_shard`]) whose draws merge exactly
//! ([`merge_draws`]).

// Lane loops index several arrays by the lane: the form that vectorises.
#![allow(clippy::needless_range_loop)]

use core::ops::Range;

use rand_core::RngCore;

use super::{pass, Mode, Outputs, Pass, Rows, NO_SLOT, TILE};
use crate::error::{check_len, Error, Result};
use crate::random;
use crate::sampler::{LogSumExp, Picks};

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
        let mut sampling = [LogSumExp::EMPTY; TILE];
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
            sampling: &mut sampling[..nq],
            group: &mut group[..nq],
            top: None,
            mean: None,
            found: None,
        };
        finite &= pass(&p, &mut o, rng);
        for l in 0..nq {
            out[b0 + l] = Draw {
                lse: lse[l],
                sample_lse: sampling[l],
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
    use crate::kernel::{exp_le0, Bf16Rows, F32Rows, I8Rows, LaneRng, Rows, BLOCK};
    use crate::stats::chi_square;
    use rand_core::SeedableRng;
    use rand_pcg::Pcg64Mcg;

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
            let mut lane = LaneRng::new(rng.next_u64());
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

    /// Caches stored as int8 and bf16 score within rounding of the `f32`
    /// cache, and the int8 cache holds exactly `quantize_i8` of each row.
    #[test]
    fn quantized_rows_score_close_to_f32() {
        use crate::storage::{f32_to_bf16, quantize_i8, Bf16Store, Int8Store, Store};
        fn filled<S: Store<64, D>>(emb: &[[f32; D]; 64]) -> NegativeCache<u32, 64, D, S> {
            let mut cache = NegativeCache::<u32, 64, D, S>::new();
            let mut cm = cache.as_mut();
            for (j, e) in emb.iter().enumerate() {
                cm.set_slot(j, e, j as u32, 0, true).unwrap();
            }
            cache
        }
        fn lse<R: Rows<D>>(rows: &R, keys: &[u64], occupied: &[bool], q: &[[f32; D]; 1]) -> f32 {
            let mut d = [Draw::EMPTY];
            let s = Slots { rows, keys, occupied };
            sample_shard(s, 0..64, q, None, 4.0, 1.0, &mut Pcg64Mcg::seed_from_u64(1), &mut d).unwrap();
            d[0].lse.max + crate::math::ln(d[0].lse.sum)
        }
        let mut r = Pcg64Mcg::seed_from_u64(8);
        let emb: [[f32; D]; 64] = rows(&mut r, 0.5);
        let q: [[f32; D]; 1] = rows(&mut r, 0.5);
        let f32_cache = filled::<crate::storage::F32Store<64, D>>(&emb);
        let i8_cache = filled::<Int8Store<64, D>>(&emb);
        let bf_cache = filled::<Bf16Store<64, D>>(&emb);
        let (keys, occ) = (f32_cache.view().keys(), f32_cache.view().occupied());
        let f = lse(&F32Rows(f32_cache.view().embeddings().as_f32().unwrap()), keys, occ, &q);
        let crate::storage::Stored::Int8 { rows: i8rows, scales } = i8_cache.view().embeddings() else { panic!() };
        let i = lse(&I8Rows { rows: i8rows, scales }, keys, occ, &q);
        let crate::storage::Stored::Bf16(bf) = bf_cache.view().embeddings() else { panic!() };
        let h = lse(&Bf16Rows(bf), keys, occ, &q);
        assert!(f != i && f != h, "quantized scores should differ from f32 in the last bits");
        assert!((f - i).abs() < 0.05 && (f - h).abs() < 0.05, "{f} {i} {h}");
        for j in 0..64 {
            assert_eq!((i8rows[j], scales[j]), quantize_i8(&emb[j]));
            assert_eq!(bf[j], emb[j].map(f32_to_bf16));
        }
    }
}
