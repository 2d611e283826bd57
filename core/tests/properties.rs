//! Property tests of the cache and the scoring pass: invariants that hold
//! for any sequence of updates, and two equivalent computations agreeing.
#![allow(clippy::unwrap_used, clippy::needless_range_loop)]

use negcache::cache::{CacheMut, SlotsMut, Update};
use negcache::{CacheLoss, Eviction, LossConfig, NegativeCache, Retrieval, TopKOut};
use proptest::prelude::*;
use rand_core::SeedableRng;

const N: usize = 12;
const D: usize = 2;
/// A cache of a few hundred slots.
const BIG: usize = 200;

/// One update call's inputs, generated.
#[derive(Debug, Clone)]
struct Step {
    refresh: Vec<(usize, bool)>,
    insert: Vec<(u32, bool)>,
}

fn step() -> impl Strategy<Value = Step> {
    step_in(N, N)
}

/// A step over a cache of `n` slots inserting up to `insert` items.
fn step_in(n: usize, insert: usize) -> impl Strategy<Value = Step> {
    (
        proptest::collection::vec((0..n, any::<bool>()), 0..4),
        proptest::collection::vec((1u32..40, prop::bool::weighted(0.8)), 0..=insert),
    )
        .prop_map(|(mut refresh, insert)| {
            refresh.sort_by_key(|r| r.0);
            refresh.dedup_by_key(|r| r.0);
            Step { refresh, insert }
        })
}

/// The spec's `cache_update`, written as plainly as possible: sort the slots
/// by (age descending, index ascending) and take the first ones.
#[derive(Debug, Clone, PartialEq)]
struct Model {
    items: Vec<u32>,
    ages: Vec<i32>,
    occupied: Vec<bool>,
}

impl Model {
    fn apply(&mut self, s: &Step, lru: bool) {
        for &(j, on) in &s.refresh {
            if on && lru {
                self.ages[j] = -1;
            }
        }
        let mut order: Vec<usize> = (0..self.ages.len()).collect();
        order.sort_by_key(|&j| (std::cmp::Reverse(self.ages[j]), j));
        let unmasked: Vec<u32> = s.insert.iter().filter(|x| x.1).map(|x| x.0).collect();
        for (slot, item) in order.into_iter().zip(unmasked) {
            self.items[slot] = item;
            self.occupied[slot] = true;
            self.ages[slot] = -1;
        }
        for a in &mut self.ages {
            *a += 1;
        }
    }
}

/// Applies the steps; with `occupied_only`, refreshes of empty slots are
/// dropped, as a trainer (which refreshes only drawn negatives) does.
fn run_steps(cache: &mut CacheMut<'_, u32, D>, steps: &[Step], ev: Eviction, occupied_only: bool) {
    for s in steps {
        let occupied = cache.as_ref().occupied().to_vec();
        let refresh: Vec<(usize, bool)> =
            s.refresh.iter().copied().filter(|r| !occupied_only || occupied[r.0]).collect();
        let idx: Vec<usize> = refresh.iter().map(|r| r.0).collect();
        let mask: Vec<bool> = refresh.iter().map(|r| r.1).collect();
        let remb: Vec<[f32; D]> = idx.iter().map(|&j| [j as f32, 1.0]).collect();
        let items: Vec<u32> = s.insert.iter().map(|x| x.0).collect();
        let nmask: Vec<bool> = s.insert.iter().map(|x| x.1).collect();
        let nemb: Vec<[f32; D]> = items.iter().map(|&i| [i as f32, -1.0]).collect();
        let up = Update {
            refresh_indices: &idx,
            refresh_embeddings: &remb,
            refresh_mask: Some(&mask),
            new_embeddings: &nemb,
            new_items: &items,
            new_mask: Some(&nmask),
        };
        cache.update(&up, ev).unwrap();
    }
}

/// Runs `steps` on a cache of `C` slots and on the plain model, and
/// compares their items, ages and occupancy.
fn matches_the_plain_model<const C: usize>(steps: &[Step], lru: bool) -> Result<(), TestCaseError> {
    let ev = if lru { Eviction::Lru } else { Eviction::Fifo };
    let mut cache = NegativeCache::<u32, C, D>::new();
    let mut model = Model { items: vec![0; C], ages: vec![0; C], occupied: vec![false; C] };
    run_steps(&mut cache.as_mut(), steps, ev, false);
    for s in steps {
        model.apply(s, lru);
    }
    let r = cache.as_ref();
    prop_assert_eq!(r.items(), &model.items[..]);
    prop_assert_eq!(r.ages(), &model.ages[..]);
    prop_assert_eq!(r.occupied(), &model.occupied[..]);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn updates_match_the_plain_model(steps in proptest::collection::vec(step(), 1..8), lru in any::<bool>()) {
        matches_the_plain_model::<N>(&steps, lru)?;
    }

    /// A cache of several blocks of the insertion's skip test, and more
    /// insertions than its buffer holds.
    #[test]
    fn large_updates_match_the_plain_model(
        steps in proptest::collection::vec(step_in(BIG, 80), 1..12),
        lru in any::<bool>(),
    ) {
        matches_the_plain_model::<BIG>(&steps, lru)?;
    }

    #[test]
    fn occupancy_and_ages_are_consistent(steps in proptest::collection::vec(step(), 1..8), lru in any::<bool>()) {
        let ev = if lru { Eviction::Lru } else { Eviction::Fifo };
        let mut cache = NegativeCache::<u32, N, D>::new();
        run_steps(&mut cache.as_mut(), &steps, ev, true);
        let r = cache.as_ref();
        let inserted: usize = steps.iter().map(|s| s.insert.iter().filter(|x| x.1).count()).sum();
        // Nothing is evicted while an empty slot remains.
        prop_assert_eq!(cache.len(), inserted.min(N));
        // Every age is non-negative after an update. Empty slots are the
        // oldest, so they are always filled first (an LRU refresh of an
        // empty slot, which the spec allows, would reset its age; the
        // trainer never refreshes empty slots, and neither does this test).
        prop_assert!(r.ages().iter().all(|&a| a >= 0));
        let oldest_occupied = (0..N).filter(|&j| r.occupied()[j]).map(|j| r.ages()[j]).max();
        for j in (0..N).filter(|&j| !r.occupied()[j]) {
            prop_assert!(oldest_occupied.is_none_or(|a| r.ages()[j] > a));
        }
        // The last call's inserted items have age 0.
        let last = steps.last().unwrap();
        let fresh = last.insert.iter().filter(|x| x.1).count();
        prop_assert!(r.ages().iter().filter(|&&a| a == 0).count() >= fresh);
    }

    #[test]
    fn sampling_never_returns_empty_or_masked_slots(
        steps in proptest::collection::vec(step(), 1..4),
        queries in proptest::collection::vec((-2.0f32..2.0, -2.0f32..2.0, 1u32..40), 1..6),
        seed in any::<u64>(),
        which in 0usize..3,
    ) {
        let mut cache = NegativeCache::<u32, N, D>::new();
        run_steps(&mut cache.as_mut(), &steps, Eviction::Fifo, true);
        let q: Vec<[f32; D]> = queries.iter().map(|x| [x.0, x.1]).collect();
        let items: Vec<u32> = queries.iter().map(|x| x.2).collect();
        let retrieval = [Retrieval::Gumbel { inv_temp: 1.0 }, Retrieval::ExpJump { inv_temp: 0.7 }, Retrieval::MaxScore][which];
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
        let mut loss = CacheLoss::<8, 1>::new();
        let r = cache.as_ref();
        loss.score_and_sample(r, &q, &q, Some(&items), &LossConfig::DEFAULT, retrieval, &mut rng, None).unwrap();
        for b in 0..q.len() {
            let has_candidate = (0..N).any(|j| r.occupied()[j] && r.items()[j] != items[b]);
            prop_assert_eq!(loss.negatives(b).len(), usize::from(has_candidate));
            for &s in loss.negatives(b) {
                prop_assert!(r.occupied()[s as usize]);
                prop_assert_ne!(r.items()[s as usize], items[b]);
            }
            if !has_candidate {
                prop_assert_eq!(loss.prob_pos()[b], 1.0);
            }
        }
    }

    #[test]
    fn streaming_pass_agrees_with_a_direct_computation(
        emb in proptest::collection::vec((-3.0f32..3.0, -3.0f32..3.0), N),
        q in (-3.0f32..3.0, -3.0f32..3.0),
        p in (-3.0f32..3.0, -3.0f32..3.0),
        alpha in 0.1f32..30.0,
        k in prop::sample::select(vec![0usize, 1, 2, 3, 4, 6, 12]),
    ) {
        let mut embeddings = [[0.0f32; D]; N];
        let mut items = [0u32; N];
        let mut keys = [0u64; N];
        let (mut ages, mut stamps, mut occ, mut clock) = ([0i32; N], [0u32; N], [true; N], 0u32);
        for j in 0..N {
            embeddings[j] = [emb[j].0, emb[j].1];
            items[j] = j as u32;
        }
        let mut cache = CacheMut::from_slots(SlotsMut {
            embeddings: negcache::storage::StoredMut::F32(&mut embeddings), items: &mut items, keys: &mut keys, ages: &mut ages,
            stamps: &mut stamps, occupied: &mut occ, clock: &mut clock,
        }).unwrap();
        cache.rekey();
        let (qq, pp) = ([[q.0, q.1]], [[p.0, p.1]]);
        let cfg = LossConfig { score_scale: alpha, top_k: k, mask_accidental_hits: false };
        let mut loss = CacheLoss::<1, 1>::new();
        let (mut ts, mut ti) = (vec![0.0; k], vec![0u32; k]);
        let out = (k > 0).then(|| TopKOut { scores: &mut ts, slots: &mut ti });
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(0);
        loss.score_and_sample(cache.as_ref(), &qq, &pp, None, &cfg, Retrieval::MaxScore, &mut rng, out).unwrap();
        // Direct: candidate scores in f64, groups by index.
        let score = |j: usize| alpha as f64 * (q.0 as f64 * emb[j].0 as f64 + q.1 as f64 * emb[j].1 as f64);
        let cands: Vec<usize> = match N.checked_div(k) {
            None => (0..N).collect(),
            Some(g) => {
                (0..k).map(|c| (c * g..(c + 1) * g).fold(c * g, |a, j| if score(j) > score(a) { j } else { a })).collect()
            }
        };
        let s = alpha as f64 * (q.0 as f64 * p.0 as f64 + q.1 as f64 * p.1 as f64);
        let m = cands.iter().map(|&j| score(j)).fold(s, f64::max);
        let z: f64 = (s - m).exp() + cands.iter().map(|&j| (score(j) - m).exp()).sum::<f64>();
        let prob = (s - m).exp() / z;
        // Scores up to 30 * 18 in f32 carry absolute errors near 1e-4.
        prop_assert!((loss.prob_pos()[0] as f64 - prob).abs() < 1e-3 + 1e-3 * prob, "{} vs {}", loss.prob_pos()[0], prob);
        let best = cands.iter().copied().fold(cands[0], |a, j| if score(j) > score(a) { j } else { a });
        // Near-ties may resolve differently in f32; the winner's score must match.
        let got = loss.negatives(0)[0] as usize;
        prop_assert!((score(got) - score(best)).abs() < 1e-3 * (1.0 + score(best).abs()));
        if k > 0 {
            for c in 0..k {
                prop_assert!((score(ti[c] as usize) - score(cands[c])).abs() < 1e-3 * (1.0 + score(cands[c]).abs()));
            }
        }
    }
}
