//! Metrics and baselines.
//!
//! * [`metrics`]: Recall@k, MRR@10 and NDCG@10 as BEIR reports them, with
//!   optional merging of documents with identical text.
//! * [`topk`]: partial selection of the best scores.
//! * [`bm25`]: an in-memory BM25 retriever.
//! * [`popularity`]: the most-judged-documents-first ranking.
//! * [`trec`]: TREC run and qrels files for cross-checking with trec_eval.
//!
//! [`evaluate_baselines`] runs both baselines on one split.

pub mod bm25;
pub mod metrics;
pub mod popularity;
pub mod topk;
pub mod trec;

use std::collections::{HashMap, HashSet};

use serde::Serialize;

pub use bm25::{tokenize, Bm25Config, Bm25Index, Bm25Searcher};
pub use metrics::{evaluate, evaluate_with_equivalence, judged_queries, Metrics, RANKING_DEPTH};
pub use popularity::popularity_ranking;
pub use topk::{top_k, top_k_pairs};
pub use trec::{read_run, write_qrels, write_run, RunLine};

use crate::data::{Dataset, Qrel};

/// Metrics of the two baselines on one split.
#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub struct Baselines {
    /// Popularity ranking learnt from the `train` split.
    pub popularity: Metrics,
    /// BM25 with [`Bm25Config::default`] over title and text.
    pub bm25: Metrics,
}

/// Evaluates the popularity and BM25 baselines on the queries of `split`
/// (see [`evaluate_with_equivalence`] for `equivalent`).
///
/// Popularity counts positive judgements of the `train` split; without one,
/// it degenerates to corpus order. A missing `split` yields metrics over zero
/// queries. BM25 searches `ds.queries[q].text`, in parallel over the
/// available cores. When `equivalent` is given, both baselines retrieve
/// deeper than [`RANKING_DEPTH`] as needed so that that many distinct
/// canonical documents are evaluated.
pub fn evaluate_baselines(ds: &Dataset, split: &str, equivalent: Option<&HashMap<u32, u32>>) -> Baselines {
    let no_qrels: &[Qrel] = &[];
    let qrels = ds.qrels.get(split).map_or(no_qrels, Vec::as_slice);
    let train = ds.qrels.get("train").map_or(no_qrels, Vec::as_slice);
    let canonical = |doc: u32| equivalent.and_then(|m| m.get(&doc).copied()).unwrap_or(doc);

    // The popularity ranking is the same for every query: cut it once.
    let popular = popularity_ranking(train, ds.corpus.len());
    let popular = distinct_originals(&popular, canonical, RANKING_DEPTH);
    let popularity = evaluate_with_equivalence(qrels, equivalent, |_| popular.clone());

    let index = Bm25Index::build(&ds.corpus, Bm25Config::default());
    let queries = judged_queries(qrels);
    let ranked = bm25::parallel_map(
        &queries,
        || index.searcher(),
        |searcher, &q| {
            let text = ds.queries.get(q as usize).map_or("", |query| query.text.as_str());
            bm25_ranking(searcher, text, canonical, equivalent.is_some())
        },
    );
    let by_query: HashMap<u32, Vec<u32>> = queries.into_iter().zip(ranked).collect();
    let bm25 = evaluate_with_equivalence(qrels, equivalent, |q| by_query.get(&q).cloned().unwrap_or_default());

    Baselines { popularity, bm25 }
}

/// BM25's ranking for one query, deep enough to hold [`RANKING_DEPTH`]
/// distinct canonical documents when `merge` is set: the search depth doubles
/// until that many remain or the matching documents run out.
fn bm25_ranking(
    searcher: &mut Bm25Searcher<'_>,
    text: &str,
    canonical: impl Fn(u32) -> u32 + Copy,
    merge: bool,
) -> Vec<u32> {
    let mut k = RANKING_DEPTH;
    loop {
        let hits: Vec<u32> = searcher.search(text, k).into_iter().map(|(d, _)| d).collect();
        let exhausted = hits.len() < k;
        if !merge || exhausted {
            return hits;
        }
        let distinct = distinct_originals(&hits, canonical, RANKING_DEPTH);
        if distinct.len() == RANKING_DEPTH {
            return distinct;
        }
        k *= 2;
    }
}

/// The first `depth` documents of `ranking` whose canonical ids are new,
/// kept as their original indices (so the evaluator's own mapping sees the
/// documents actually retrieved).
fn distinct_originals(ranking: &[u32], canonical: impl Fn(u32) -> u32, depth: usize) -> Vec<u32> {
    let mut seen = HashSet::new();
    ranking.iter().copied().filter(|&d| seen.insert(canonical(d))).take(depth).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_originals_keeps_first_members() {
        let eq = HashMap::from([(3u32, 1u32), (4, 2)]);
        let canonical = |d: u32| eq.get(&d).copied().unwrap_or(d);
        assert_eq!(distinct_originals(&[3, 1, 4, 5, 2, 6], canonical, 10), vec![3, 4, 5, 6]);
        assert_eq!(distinct_originals(&[3, 1, 4, 5, 2, 6], canonical, 2), vec![3, 4]);
    }
}
