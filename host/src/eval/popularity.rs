//! The popularity baseline: one fixed ranking for every query.

use crate::data::Qrel;

/// All document indices `0..num_docs`, ranked by how many positive
/// (score > 0) judgements they receive in `train`, most first; equal counts
/// go to the lower index.
///
/// Every positive judgement line counts, so a document judged relevant for
/// five training queries scores five. Judgements naming a document index
/// `>= num_docs` are ignored (they cannot be ranked).
pub fn popularity_ranking(train: &[Qrel], num_docs: usize) -> Vec<u32> {
    let counts = positive_counts(train, num_docs);
    let mut order: Vec<u32> = (0..num_docs).map(|i| u32::try_from(i).expect("more than u32::MAX documents")).collect();
    // A stable sort keeps increasing index order within equal counts.
    order.sort_by_key(|&d| std::cmp::Reverse(counts[d as usize]));
    order
}

/// Number of positive judgements per document.
pub(crate) fn positive_counts(train: &[Qrel], num_docs: usize) -> Vec<u32> {
    let mut counts = vec![0u32; num_docs];
    for j in train.iter().filter(|j| j.score > 0) {
        if let Some(c) = counts.get_mut(j.doc as usize) {
            *c += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(query: u32, doc: u32, score: i32) -> Qrel {
        Qrel { query, doc, score }
    }

    #[test]
    fn ranks_by_positive_count_then_index() {
        // Positive counts: doc 0 → 0, doc 1 → 1, doc 2 → 2, doc 3 → 1
        // (plus one zero-score line that must not count), doc 4 → 0; the
        // out-of-range doc 9 is ignored.
        let train = [q(0, 2, 1), q(1, 2, 2), q(0, 3, 1), q(2, 3, 0), q(2, 1, 1), q(3, 4, -1), q(3, 9, 1)];
        assert_eq!(popularity_ranking(&train, 5), vec![2, 1, 3, 0, 4]);
    }

    #[test]
    fn without_judgements_it_is_index_order() {
        assert_eq!(popularity_ranking(&[], 4), vec![0, 1, 2, 3]);
        assert_eq!(popularity_ranking(&[], 0), Vec::<u32>::new());
    }
}
