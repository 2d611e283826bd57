//! Partial selection of the best-scoring items.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// Indices of the `k` highest scores, best first.
///
/// Equal scores are ordered by increasing index, and NaN scores rank below
/// every number (among themselves, again by index), so the result is fully
/// determined by the input. Returns `min(k, scores.len())` indices.
///
/// Runs in O(n log k) time and O(k) extra space with a bounded heap.
pub fn top_k(scores: &[f32], k: usize) -> Vec<u32> {
    let candidates = scores.iter().enumerate().map(|(i, &s)| (index_u32(i), s));
    top_k_pairs(candidates, k).into_iter().map(|(i, _)| i).collect()
}

/// [`top_k`] over an arbitrary set of `(index, score)` candidates, returning
/// the pairs. The order among candidates does not matter; indices should be
/// distinct.
pub fn top_k_pairs(candidates: impl IntoIterator<Item = (u32, f32)>, k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    // A min-heap (through `Reverse`) of the best `k` seen so far: its top is
    // the weakest kept candidate, the only one a newcomer has to beat.
    let mut heap: BinaryHeap<Reverse<Ranked>> = BinaryHeap::with_capacity(k.saturating_add(1).min(1 << 16));
    // Score of the weakest kept candidate once the heap is full. Anything
    // strictly below it can be rejected with one float comparison, which is
    // the common case when scanning a large corpus for a small k. A NaN
    // compares false and so always takes the full comparison, as do ties
    // (decided by index).
    let mut floor = f32::NEG_INFINITY;
    for (index, score) in candidates {
        if score < floor {
            continue;
        }
        let item = Ranked { index, score };
        if heap.len() < k {
            heap.push(Reverse(item));
        } else if let Some(mut weakest) = heap.peek_mut() {
            if item <= weakest.0 {
                continue;
            }
            *weakest = Reverse(item);
        }
        if heap.len() == k {
            floor = heap.peek().map_or(f32::NEG_INFINITY, |Reverse(w)| {
                // A NaN floor would reject nothing anyway; keep it explicit.
                if w.score.is_nan() {
                    f32::NEG_INFINITY
                } else {
                    w.score
                }
            });
        }
    }
    // Ascending order of `Reverse<Ranked>` is best first.
    heap.into_sorted_vec().into_iter().map(|Reverse(r)| (r.index, r.score)).collect()
}

/// Converts a slice position to the `u32` indices used across the crate.
fn index_u32(i: usize) -> u32 {
    u32::try_from(i).expect("more than u32::MAX scores")
}

/// A candidate ordered by quality: greater means better.
#[derive(Debug, Clone, Copy)]
struct Ranked {
    index: u32,
    score: f32,
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        // NaN is worse than any number; two numbers compare by value (so
        // -0.0 and 0.0 tie); any tie goes to the lower index, i.e. the lower
        // index is "greater".
        let by_score = match (self.score.is_nan(), other.score.is_nan()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Less,
            (false, true) => Ordering::Greater,
            (false, false) => self.score.partial_cmp(&other.score).unwrap_or(Ordering::Equal),
        };
        by_score.then_with(|| other.index.cmp(&self.index))
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ranked {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reference: a full stable sort of all indices (stability gives ties to
    /// the lower index), NaN last.
    fn full_sort(scores: &[f32], k: usize) -> Vec<u32> {
        let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
        idx.sort_by(|&a, &b| {
            let (x, y) = (scores[a as usize], scores[b as usize]);
            match (x.is_nan(), y.is_nan()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => y.partial_cmp(&x).unwrap(),
            }
        });
        idx.truncate(k);
        idx
    }

    #[test]
    fn small_examples() {
        let s = [0.5, 2.0, f32::NAN, 2.0, -1.0];
        assert_eq!(top_k(&s, 0), Vec::<u32>::new());
        assert_eq!(top_k(&s, 1), vec![1]);
        assert_eq!(top_k(&s, 3), vec![1, 3, 0]);
        assert_eq!(top_k(&s, 10), vec![1, 3, 0, 4, 2]);
        assert_eq!(top_k(&[], 3), Vec::<u32>::new());
        assert_eq!(top_k(&[f32::NAN, f32::NAN, 1.0], 3), vec![2, 0, 1]);
        assert_eq!(top_k(&[0.0, -0.0, f32::NEG_INFINITY, f32::INFINITY], 4), vec![3, 0, 1, 2]);
    }

    #[test]
    fn pairs_ignore_candidate_order() {
        let got = top_k_pairs([(7, 1.0), (3, 1.0), (5, 4.0), (1, f32::NAN)], 3);
        assert_eq!(got, vec![(5, 4.0), (3, 1.0), (7, 1.0)]);
    }

    fn score() -> impl Strategy<Value = f32> {
        // Few distinct values so that ties are common, plus NaN and signed zeros.
        prop_oneof![(-3i8..4).prop_map(f32::from), Just(f32::NAN), Just(-0.0f32), any::<f32>(),]
    }

    proptest! {
        #[test]
        fn matches_full_sort(scores in prop::collection::vec(score(), 0..300), k in 0usize..320) {
            prop_assert_eq!(top_k(&scores, k), full_sort(&scores, k));
        }
    }
}
