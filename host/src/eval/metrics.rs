//! Ranking metrics computed the way BEIR (through pytrec_eval / trec_eval)
//! computes them: Recall@{1,10,100}, MRR@10 and NDCG@10.
//!
//! # Conventions
//!
//! * A judgement is *relevant* when its score is > 0 (trec_eval's default
//!   relevance level of 1). Judgements with score ≤ 0 are kept as "judged"
//!   but contribute no gain.
//! * Only queries with at least one relevant judgement in the given qrels
//!   are evaluated; the averages are over those queries, and
//!   [`Metrics::queries`] says how many there were.
//! * If the same (query, document) pair is judged more than once, the highest
//!   grade wins (the same rule that merges equivalent documents below).
//! * The ranking is taken in the order given. trec_eval would instead re-sort
//!   a run by score and break ties by document id; callers that want its exact
//!   tie behaviour must order their ranking that way themselves.
//! * A document appearing twice in a ranking counts at its first position only
//!   (a pytrec_eval run is a map, so it cannot hold duplicates at all).
//! * Only the first [`RANKING_DEPTH`] distinct documents are looked at.
//!
//! # Equivalent documents
//!
//! Corpora scraped from the web often hold the same text under several ids,
//! and a retriever that returns a twin of the judged document is not wrong.
//! [`evaluate_with_equivalence`] takes a map from document index to a
//! canonical index (documents missing from the map are their own canonical
//! index). Both the ranked and the judged documents are replaced by their
//! canonical index; the ranking is then de-duplicated keeping the first
//! occurrence, and the judged set becomes a set of canonical ids (each keeping
//! the highest grade among its members). So a group of twins counts as one
//! relevant item, found as soon as any member is retrieved.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::data::Qrel;

/// How many distinct documents of a ranking are scored (the largest cut-off
/// any metric here uses). Rankings should supply at least this many.
pub const RANKING_DEPTH: usize = 100;

/// Cut-off of MRR and NDCG.
const CUTOFF_10: usize = 10;

/// Mean metrics over the evaluated queries of one split.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
pub struct Metrics {
    /// Number of queries averaged over (those with a relevant judgement).
    pub queries: usize,
    /// Mean fraction of the relevant documents found at rank 1.
    pub recall_at_1: f64,
    /// Mean fraction of the relevant documents found in the top 10.
    pub recall_at_10: f64,
    /// Mean fraction of the relevant documents found in the top 100.
    pub recall_at_100: f64,
    /// Mean reciprocal rank of the first relevant document in the top 10
    /// (0 when none is there).
    pub mrr_at_10: f64,
    /// Mean NDCG over the top 10 with linear gains equal to the grades.
    pub ndcg_at_10: f64,
}

/// Evaluates `ranking` against `qrels`.
///
/// `ranking(q)` returns the document indices retrieved for query index `q`,
/// best first; it should return at least [`RANKING_DEPTH`] documents, or the
/// whole corpus if it is smaller. It is called once per evaluated query, in
/// increasing query order. See the module documentation for conventions.
pub fn evaluate(qrels: &[Qrel], ranking: impl Fn(u32) -> Vec<u32>) -> Metrics {
    evaluate_with_equivalence(qrels, None, ranking)
}

/// Like [`evaluate`], but when `equivalent` is given, documents are first
/// replaced by their canonical index (see the module documentation).
///
/// When twins are likely to appear in a ranking, `ranking` should return
/// enough documents that [`RANKING_DEPTH`] distinct canonical ids remain
/// after merging.
pub fn evaluate_with_equivalence(
    qrels: &[Qrel],
    equivalent: Option<&HashMap<u32, u32>>,
    ranking: impl Fn(u32) -> Vec<u32>,
) -> Metrics {
    let canonical = |doc: u32| -> u32 { equivalent.and_then(|map| map.get(&doc).copied()).unwrap_or(doc) };

    let mut sums = PerQuery::default();
    let mut queries = 0usize;
    for (query, grades) in judgements_by_query(qrels, canonical) {
        if !grades.values().any(|&g| g > 0) {
            continue;
        }
        let ranked = distinct_prefix(ranking(query), canonical, RANKING_DEPTH);
        sums.add(&score_query(&grades, &ranked));
        queries += 1;
    }

    if queries == 0 {
        return Metrics::default();
    }
    let n = queries as f64;
    Metrics {
        queries,
        recall_at_1: sums.recall_at_1 / n,
        recall_at_10: sums.recall_at_10 / n,
        recall_at_100: sums.recall_at_100 / n,
        mrr_at_10: sums.mrr_at_10 / n,
        ndcg_at_10: sums.ndcg_at_10 / n,
    }
}

/// The query indices that [`evaluate`] would evaluate (those with at least
/// one relevant judgement), in increasing order. Useful to compute rankings
/// ahead of time, for example in parallel.
pub fn judged_queries(qrels: &[Qrel]) -> Vec<u32> {
    let set: std::collections::BTreeSet<u32> = qrels.iter().filter(|j| j.score > 0).map(|j| j.query).collect();
    set.into_iter().collect()
}

/// Maps `ranking` through `canonical` and keeps the first `depth` distinct
/// ids, in order.
pub fn distinct_prefix(ranking: Vec<u32>, canonical: impl Fn(u32) -> u32, depth: usize) -> Vec<u32> {
    let mut seen = HashSet::with_capacity(depth.min(ranking.len()));
    let mut out = Vec::with_capacity(depth.min(ranking.len()));
    for doc in ranking {
        if out.len() == depth {
            break;
        }
        let c = canonical(doc);
        if seen.insert(c) {
            out.push(c);
        }
    }
    out
}

/// Groups judgements by query (ordered, so that `ranking` is called in a
/// predictable order), mapping documents through `canonical` and keeping the
/// highest grade per (query, canonical document).
fn judgements_by_query(qrels: &[Qrel], canonical: impl Fn(u32) -> u32) -> BTreeMap<u32, HashMap<u32, i32>> {
    let mut by_query: BTreeMap<u32, HashMap<u32, i32>> = BTreeMap::new();
    for j in qrels {
        let grade = by_query.entry(j.query).or_default().entry(canonical(j.doc)).or_insert(j.score);
        *grade = (*grade).max(j.score);
    }
    by_query
}

/// Metric values of one query, or their sums over queries.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct PerQuery {
    recall_at_1: f64,
    recall_at_10: f64,
    recall_at_100: f64,
    mrr_at_10: f64,
    ndcg_at_10: f64,
}

impl PerQuery {
    fn add(&mut self, other: &PerQuery) {
        self.recall_at_1 += other.recall_at_1;
        self.recall_at_10 += other.recall_at_10;
        self.recall_at_100 += other.recall_at_100;
        self.mrr_at_10 += other.mrr_at_10;
        self.ndcg_at_10 += other.ndcg_at_10;
    }
}

/// Discount of the (0-based) position `i`: trec_eval divides the gain at rank
/// `i + 1` by `log2(i + 2)`.
fn discount(i: usize) -> f64 {
    ((i + 2) as f64).log2()
}

/// Scores one query. `grades` holds at least one positive grade; `ranked` is
/// already distinct and at most [`RANKING_DEPTH`] long.
fn score_query(grades: &HashMap<u32, i32>, ranked: &[u32]) -> PerQuery {
    let gain = |doc: &u32| -> f64 { grades.get(doc).map_or(0.0, |&g| f64::from(g.max(0))) };
    let num_relevant = grades.values().filter(|&&g| g > 0).count() as f64;
    let recall_at = |k: usize| -> f64 { ranked.iter().take(k).filter(|d| gain(d) > 0.0).count() as f64 / num_relevant };

    let mrr_at_10 = ranked.iter().take(CUTOFF_10).position(|d| gain(d) > 0.0).map_or(0.0, |i| 1.0 / (i + 1) as f64);

    let dcg: f64 = ranked.iter().take(CUTOFF_10).enumerate().map(|(i, d)| gain(d) / discount(i)).sum();
    let mut ideal: Vec<i32> = grades.values().copied().filter(|&g| g > 0).collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let idcg: f64 = ideal.iter().take(CUTOFF_10).enumerate().map(|(i, &g)| f64::from(g) / discount(i)).sum();

    PerQuery {
        recall_at_1: recall_at(1),
        recall_at_10: recall_at(10),
        recall_at_100: recall_at(100),
        mrr_at_10,
        // idcg > 0 because at least one grade is positive.
        ndcg_at_10: dcg / idcg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;
    use proptest::prelude::*;

    fn q(query: u32, doc: u32, score: i32) -> Qrel {
        Qrel { query, doc, score }
    }

    fn ranking_of(map: &HashMap<u32, Vec<u32>>) -> impl Fn(u32) -> Vec<u32> + '_ {
        move |query| map.get(&query).cloned().unwrap_or_default()
    }

    #[test]
    fn binary_relevance_single_query() {
        // Relevant: docs 3 and 7. Ranking: 5, 3, 9, 1, 7, …
        // recall@1 = 0/2 = 0; recall@10 = 2/2 = 1 (3 at rank 2, 7 at rank 5).
        // MRR@10 = 1/2 (first relevant at rank 2).
        // DCG = 1/log2(3) + 1/log2(6) = 0.630930 + 0.386853 = 1.017783
        // IDCG = 1/log2(2) + 1/log2(3) = 1 + 0.630930 = 1.630930
        // NDCG = 1.017783 / 1.630930 = 0.624051
        let qrels = [q(0, 3, 1), q(0, 7, 1), q(0, 2, 0)];
        let rankings = HashMap::from([(0, vec![5, 3, 9, 1, 7, 2, 4])]);
        let m = evaluate(&qrels, ranking_of(&rankings));
        assert_eq!(m.queries, 1);
        assert_relative_eq!(m.recall_at_1, 0.0);
        assert_relative_eq!(m.recall_at_10, 1.0);
        assert_relative_eq!(m.recall_at_100, 1.0);
        assert_relative_eq!(m.mrr_at_10, 0.5);
        let expected = (1.0 / 3f64.log2() + 1.0 / 6f64.log2()) / (1.0 + 1.0 / 3f64.log2());
        assert_relative_eq!(m.ndcg_at_10, expected, epsilon = 1e-12);
        assert_relative_eq!(m.ndcg_at_10, 0.624051, epsilon = 1e-6);
    }

    #[test]
    fn graded_ndcg() {
        // Grades: doc 1 → 3, doc 2 → 2, doc 3 → 1. Ranking: 3, 0, 1, 2.
        // DCG = 1/log2(2) + 0/log2(3) + 3/log2(4) + 2/log2(5)
        //     = 1 + 0 + 1.5 + 0.861353 = 3.361353
        // IDCG (3, 2, 1) = 3/1 + 2/log2(3) + 1/log2(4)
        //     = 3 + 1.261860 + 0.5 = 4.761860
        // NDCG = 3.361353 / 4.761860 = 0.705891
        // recall@1 = 1/3 (doc 3 is relevant), MRR = 1.
        let qrels = [q(0, 1, 3), q(0, 2, 2), q(0, 3, 1)];
        let rankings = HashMap::from([(0, vec![3, 0, 1, 2])]);
        let m = evaluate(&qrels, ranking_of(&rankings));
        let dcg = 1.0 + 3.0 / 2.0 + 2.0 / 5f64.log2();
        let idcg = 3.0 + 2.0 / 3f64.log2() + 0.5;
        assert_relative_eq!(m.ndcg_at_10, dcg / idcg, epsilon = 1e-12);
        assert_relative_eq!(m.ndcg_at_10, 0.705891, epsilon = 1e-6);
        assert_relative_eq!(m.recall_at_1, 1.0 / 3.0, epsilon = 1e-12);
        assert_relative_eq!(m.mrr_at_10, 1.0);
    }

    #[test]
    fn cutoff_at_ten() {
        // The only relevant doc (42) sits at rank 11: outside the top 10, so
        // recall@10 = MRR@10 = NDCG@10 = 0, but recall@100 = 1.
        let qrels = [q(0, 42, 1)];
        let mut ranked: Vec<u32> = (0..10).collect();
        ranked.push(42);
        let rankings = HashMap::from([(0, ranked)]);
        let m = evaluate(&qrels, ranking_of(&rankings));
        assert_relative_eq!(m.recall_at_10, 0.0);
        assert_relative_eq!(m.mrr_at_10, 0.0);
        assert_relative_eq!(m.ndcg_at_10, 0.0);
        assert_relative_eq!(m.recall_at_100, 1.0);
    }

    #[test]
    fn ideal_dcg_is_cut_at_ten() {
        // Twelve relevant docs (0..12), all grade 1, ranked perfectly: the
        // ideal DCG only counts ten of them, so NDCG@10 = 1, while
        // recall@10 = 10/12 and recall@1 = 1/12.
        let qrels: Vec<Qrel> = (0..12).map(|d| q(0, d, 1)).collect();
        let rankings = HashMap::from([(0, (0..12).collect())]);
        let m = evaluate(&qrels, ranking_of(&rankings));
        assert_relative_eq!(m.ndcg_at_10, 1.0, epsilon = 1e-12);
        assert_relative_eq!(m.recall_at_10, 10.0 / 12.0, epsilon = 1e-12);
        assert_relative_eq!(m.recall_at_1, 1.0 / 12.0, epsilon = 1e-12);
    }

    #[test]
    fn averages_and_skips_queries_without_relevant_docs() {
        // Query 0: relevant 1, ranked first → every metric 1.
        // Query 1: only a grade-0 judgement → skipped (never ranked).
        // Query 2: relevant 5, ranked third of [7, 8, 5]:
        //   recall@1 = 0, recall@10 = 1, MRR = 1/3, NDCG = 1/log2(4) = 0.5.
        // Means over 2 queries: recall@1 = 0.5, recall@10 = 1,
        //   MRR = (1 + 1/3)/2 = 2/3, NDCG = (1 + 0.5)/2 = 0.75.
        let qrels = [q(0, 1, 1), q(1, 4, 0), q(2, 5, 1)];
        let rankings = HashMap::from([(0, vec![1, 2, 3]), (2, vec![7, 8, 5])]);
        let m = evaluate(&qrels, |query| {
            assert_ne!(query, 1, "query without relevant docs must be skipped");
            rankings[&query].clone()
        });
        assert_eq!(m.queries, 2);
        assert_relative_eq!(m.recall_at_1, 0.5);
        assert_relative_eq!(m.recall_at_10, 1.0);
        assert_relative_eq!(m.mrr_at_10, 2.0 / 3.0, epsilon = 1e-12);
        assert_relative_eq!(m.ndcg_at_10, 0.75, epsilon = 1e-12);
    }

    #[test]
    fn no_judged_queries_gives_zeros() {
        let m = evaluate(&[q(0, 1, 0)], |_| vec![1]);
        assert_eq!(m, Metrics::default());
        assert_eq!(judged_queries(&[q(0, 1, 0)]), Vec::<u32>::new());
    }

    #[test]
    fn duplicates_in_ranking_count_once() {
        // Ranking [2, 2, 1]: after de-duplication [2, 1], so the relevant doc 1
        // is at rank 2 → MRR = 1/2, NDCG = 1/log2(3).
        let qrels = [q(0, 1, 1)];
        let m = evaluate(&qrels, |_| vec![2, 2, 1]);
        assert_relative_eq!(m.mrr_at_10, 0.5);
        assert_relative_eq!(m.ndcg_at_10, 1.0 / 3f64.log2(), epsilon = 1e-12);
    }

    #[test]
    fn equivalence_merges_twins() {
        // Docs 10 and 11 have identical text (canonical 10); so do 20 and 21
        // (canonical 20). Relevant: 11 (grade 1) and 21 (grade 2).
        // Ranking: 10, 11, 5, 20, 21, 6.
        //
        // Without equivalence: relevant 11 at rank 2, 21 at rank 5.
        //   recall@1 = 0, MRR = 1/2,
        //   DCG = 1/log2(3) + 2/log2(6) = 0.630930 + 0.773706 = 1.404636,
        //   IDCG = 2/1 + 1/log2(3) = 2.630930, NDCG = 0.533893.
        // With equivalence: the ranking becomes 10, 10, 5, 20, 20, 6 and then
        //   10, 5, 20, 6; relevant {10: 1, 20: 2}.
        //   recall@1 = 1/2, MRR = 1,
        //   DCG = 1/1 + 2/log2(4) = 2, IDCG = 2.630930, NDCG = 0.760188.
        let qrels = [q(0, 11, 1), q(0, 21, 2)];
        let ranked = vec![10, 11, 5, 20, 21, 6];
        let plain = evaluate(&qrels, |_| ranked.clone());
        assert_relative_eq!(plain.recall_at_1, 0.0);
        assert_relative_eq!(plain.mrr_at_10, 0.5);
        let idcg = 2.0 + 1.0 / 3f64.log2();
        assert_relative_eq!(plain.ndcg_at_10, (1.0 / 3f64.log2() + 2.0 / 6f64.log2()) / idcg, epsilon = 1e-12);
        assert_relative_eq!(plain.ndcg_at_10, 0.533893, epsilon = 1e-6);

        let eq = HashMap::from([(11, 10), (21, 20), (10, 10)]);
        let merged = evaluate_with_equivalence(&qrels, Some(&eq), |_| ranked.clone());
        assert_relative_eq!(merged.recall_at_1, 0.5);
        assert_relative_eq!(merged.recall_at_10, 1.0);
        assert_relative_eq!(merged.mrr_at_10, 1.0);
        assert_relative_eq!(merged.ndcg_at_10, 2.0 / idcg, epsilon = 1e-12);
        assert_relative_eq!(merged.ndcg_at_10, 0.760188, epsilon = 1e-6);
    }

    #[test]
    fn equivalent_relevant_docs_form_one_item_with_max_grade() {
        // Docs 1 and 2 are twins (canonical 1), judged 1 and 3. They become
        // one relevant item of grade 3, so retrieving only doc 2 is perfect:
        // recall@1 = 1, NDCG = 3/3 = 1.
        let qrels = [q(0, 1, 1), q(0, 2, 3)];
        let eq = HashMap::from([(2, 1)]);
        let m = evaluate_with_equivalence(&qrels, Some(&eq), |_| vec![2, 0]);
        assert_relative_eq!(m.recall_at_1, 1.0);
        assert_relative_eq!(m.ndcg_at_10, 1.0);
        // Without merging it is recall@1 = 1/2 and
        // NDCG = 3 / (3 + 1/log2(3)) = 0.826235.
        let plain = evaluate(&qrels, |_| vec![2, 0]);
        assert_relative_eq!(plain.recall_at_1, 0.5);
        assert_relative_eq!(plain.ndcg_at_10, 3.0 / (3.0 + 1.0 / 3f64.log2()), epsilon = 1e-12);
    }

    #[test]
    fn only_first_hundred_distinct_docs_count() {
        // Relevant doc 500 at (distinct) rank 101: recall@100 = 0.
        let qrels = [q(0, 500, 1)];
        let mut ranked: Vec<u32> = (0..100).collect();
        ranked.push(500);
        assert_relative_eq!(evaluate(&qrels, |_| ranked.clone()).recall_at_100, 0.0);
        // With a duplicate inserted the depth is still 100 distinct docs.
        ranked.insert(1, 0);
        assert_relative_eq!(evaluate(&qrels, |_| ranked.clone()).recall_at_100, 0.0);
        // Removing one earlier doc brings it to rank 100.
        ranked.retain(|&d| d != 7);
        assert_relative_eq!(evaluate(&qrels, |_| ranked.clone()).recall_at_100, 1.0);
    }

    /// Random qrels over `docs` documents and a few queries, plus a random
    /// permutation of all documents per query.
    fn qrels_and_rankings() -> impl Strategy<Value = (Vec<Qrel>, Vec<Vec<u32>>)> {
        (1u32..40, 1u32..5).prop_flat_map(|(docs, queries)| {
            let judgement = (0..queries, 0..docs, -1i32..4).prop_map(|(qu, d, s)| q(qu, d, s));
            let perm = Just((0..docs).collect::<Vec<u32>>()).prop_shuffle();
            (prop::collection::vec(judgement, 0..60), prop::collection::vec(perm, queries as usize))
        })
    }

    /// The ranking that puts judged documents by decreasing grade (merged per
    /// pair with the maximum, as the evaluator does), then the rest.
    fn perfect_ranking(qrels: &[Qrel], query: u32, docs: &[u32]) -> Vec<u32> {
        let mut grade: HashMap<u32, i32> = HashMap::new();
        for j in qrels.iter().filter(|j| j.query == query) {
            let g = grade.entry(j.doc).or_insert(j.score);
            *g = (*g).max(j.score);
        }
        let mut out = docs.to_vec();
        out.sort_by_key(|d| std::cmp::Reverse(grade.get(d).copied().unwrap_or(0).max(0)));
        out
    }

    proptest! {
        #[test]
        fn metrics_are_bounded_and_recall_grows((qrels, rankings) in qrels_and_rankings()) {
            let m = evaluate(&qrels, |query| rankings[query as usize].clone());
            for v in [m.recall_at_1, m.recall_at_10, m.recall_at_100, m.mrr_at_10, m.ndcg_at_10] {
                prop_assert!((0.0..=1.0 + 1e-12).contains(&v), "{m:?}");
            }
            prop_assert!(m.recall_at_1 <= m.recall_at_10 + 1e-12);
            prop_assert!(m.recall_at_10 <= m.recall_at_100 + 1e-12);
            // Every permutation holds all docs, and there are fewer than 100.
            if m.queries > 0 {
                prop_assert!((m.recall_at_100 - 1.0).abs() < 1e-12);
            }
            prop_assert_eq!(m.queries, judged_queries(&qrels).len());
        }

        #[test]
        fn perfect_ranking_scores_one((qrels, rankings) in qrels_and_rankings()) {
            let m = evaluate(&qrels, |query| {
                perfect_ranking(&qrels, query, &rankings[query as usize])
            });
            if m.queries > 0 {
                prop_assert!((m.mrr_at_10 - 1.0).abs() < 1e-12, "{m:?}");
                prop_assert!((m.ndcg_at_10 - 1.0).abs() < 1e-12, "{m:?}");
                prop_assert!((m.recall_at_100 - 1.0).abs() < 1e-12, "{m:?}");
            }
        }

        #[test]
        fn perfect_ranking_with_one_relevant_doc_is_one_everywhere(
            docs in 1u32..200, relevant in 0u32..200, grade in 1i32..4,
        ) {
            let relevant = relevant % docs;
            let qrels = [q(0, relevant, grade)];
            let mut ranked: Vec<u32> = (0..docs).filter(|&d| d != relevant).collect();
            ranked.insert(0, relevant);
            let m = evaluate(&qrels, |_| ranked.clone());
            let one = Metrics {
                queries: 1,
                recall_at_1: 1.0,
                recall_at_10: 1.0,
                recall_at_100: 1.0,
                mrr_at_10: 1.0,
                ndcg_at_10: 1.0,
            };
            prop_assert_eq!(m, one);
        }
    }
}
