//! Partial selection of the best-scoring items.

use negcache::retrieve::{Hit, TopK};

/// Indices of the `k` highest scores, best first.
///
/// Equal scores are ordered by increasing index, and NaN scores rank below
/// every number (among themselves, again by index), so the result is fully
/// determined by the input. Returns `min(k, scores.len())` indices.
///
/// Runs in O(n log k) time and O(k) extra space with a bounded heap (see
/// [`top_k_pairs`]).
pub fn top_k(scores: &[f32], k: usize) -> Vec<u32> {
    let candidates = scores.iter().enumerate().map(|(i, &s)| (index_u32(i), s));
    top_k_pairs(candidates, k).into_iter().map(|(i, _)| i).collect()
}

/// [`top_k`] over an arbitrary set of `(index, score)` candidates, returning
/// the pairs. The order among candidates does not matter; indices should be
/// distinct.
///
/// The selection is the core's ([`negcache::retrieve::TopK`], the one a
/// device runs): a bounded heap in a buffer of `k` hits, with the same
/// order as here (higher score first, equal scores by lower index, NaN
/// last). A cut deeper than [`DIRECT_CUT`] (a whole-corpus order) collects
/// the candidates first, so the buffer never holds more hits than there
/// are candidates.
pub fn top_k_pairs(candidates: impl IntoIterator<Item = (u32, f32)>, k: usize) -> Vec<(u32, f32)> {
    top_k_present(candidates.into_iter().map(Some), k)
}

/// [`top_k_pairs`] over the candidates that are `Some`. A caller that drops
/// candidates maps them to `None` here instead of filtering them out: the
/// compiler vectorises a filter's search for the next kept candidate into
/// per-lane extracts and branches, three times slower than one candidate
/// at a time (`negcache bench`, exact retrieval).
pub fn top_k_present(candidates: impl IntoIterator<Item = Option<(u32, f32)>>, k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    if k <= DIRECT_CUT {
        return select(candidates, k);
    }
    let all: Vec<Option<(u32, f32)>> = candidates.into_iter().flatten().map(Some).collect();
    let k = k.min(all.len());
    select(all, k)
}

/// The deepest cut whose buffer [`top_k_pairs`] allocates before seeing the
/// candidates (512 KB of hits).
pub const DIRECT_CUT: usize = 1 << 16;

fn select(candidates: impl IntoIterator<Item = Option<(u32, f32)>>, k: usize) -> Vec<(u32, f32)> {
    let mut buf = vec![Hit::EMPTY; k];
    let mut top = TopK::new(&mut buf);
    // Not `.flatten()`: its search for the next `Some` is the kind of
    // inner loop the compiler vectorises badly (see `top_k_present`).
    #[allow(clippy::manual_flatten)]
    for candidate in candidates {
        if let Some((index, score)) = candidate {
            top.push(index, score);
        }
    }
    top.into_sorted().iter().map(|h| (h.key, h.score)).collect()
}

/// Converts a slice position to the `u32` indices used across the crate.
fn index_u32(i: usize) -> u32 {
    u32::try_from(i).expect("more than u32::MAX scores")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cmp::Ordering;

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
