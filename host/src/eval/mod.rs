//! Metrics and baselines.
//!
//! * [`protocol`]: how scores become rankings and rankings metrics (BEIR's
//!   and trec_eval's conventions by default), for every system alike.
//! * [`metrics`]: Recall@k, MRR@10 and NDCG@10 as BEIR reports them.
//! * [`topk`]: partial selection of the best scores.
//! * [`bm25`]: Lucene's BM25 with English stopwords.
//! * [`popularity`]: the most-judged-documents-first ranking.
//! * [`trec`]: TREC run and qrels files for cross-checking with trec_eval.
//!
//! [`evaluate_baselines`] runs both baselines on one split.

pub mod bm25;
pub mod metrics;
pub mod popularity;
pub mod protocol;
pub mod topk;
pub mod trec;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

pub use bm25::{tokenize, Bm25Config, Bm25Index, Bm25Searcher};
pub use metrics::{evaluate, evaluate_with_equivalence, judged_queries, Metrics, RANKING_DEPTH};
pub use popularity::popularity_ranking;
pub use protocol::{Evaluator, Protocol, Ranking};
pub use topk::{top_k, top_k_pairs};
pub use trec::{read_run, write_qrels, write_run, RunLine};

use crate::data::{Dataset, Qrel};

/// Metrics of the two baselines on one split.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct Baselines {
    /// Popularity ranking learnt from the `train` split.
    pub popularity: Metrics,
    /// BM25 over title and text.
    pub bm25: Metrics,
    /// BM25's parameters.
    pub bm25_config: Bm25Config,
}

/// Rankings of both baselines for the evaluator's queries, cut at `depth`.
#[derive(Debug, Clone, Default)]
pub struct BaselineRankings {
    /// Popularity's ranking per query.
    pub popularity: HashMap<u32, Ranking>,
    /// BM25's ranking per query.
    pub bm25: HashMap<u32, Ranking>,
}

/// Evaluates the popularity and BM25 baselines on the evaluator's queries,
/// under its protocol.
pub fn evaluate_baselines(ds: &Dataset, ev: &Evaluator, bm25: Bm25Config) -> anyhow::Result<Baselines> {
    let r = rank_baselines(ds, ev, bm25, ev.metrics_depth())?;
    Ok(Baselines { popularity: ev.metrics_of(&r.popularity), bm25: ev.metrics_of(&r.bm25), bm25_config: bm25 })
}

/// Ranks the evaluator's queries with both baselines, `depth` documents
/// each.
///
/// Popularity scores a document by its number of positive judgements in the
/// `train` split (zero without one), the same for every query except for
/// what the protocol drops. BM25 searches `ds.queries[q].text`, in parallel
/// over the available cores; documents that share no term with the query
/// are not ranked.
pub fn rank_baselines(
    ds: &Dataset,
    ev: &Evaluator,
    bm25: Bm25Config,
    depth: usize,
) -> anyhow::Result<BaselineRankings> {
    bm25.validate()?;
    let no_qrels: &[Qrel] = &[];
    let train = ds.qrels.get("train").map_or(no_qrels, Vec::as_slice);
    let queries = ev.queries();

    // One global order, then each query's admitted prefix: the order is
    // total, so that prefix is the query's own ranking.
    let counts = popularity::positive_counts(train, ds.corpus.len());
    let everything = (0u32..).zip(counts.iter().map(|&c| c as f32));
    let order = ev.order(everything);
    let popularity = queries
        .iter()
        .map(|&q| (q, order.iter().copied().filter(|&(d, _)| ev.admits(q, d)).take(depth).collect()))
        .collect();

    let index = Bm25Index::build(&ds.corpus, bm25);
    let ranked = bm25::parallel_map(
        &queries,
        || index.searcher(),
        |searcher, &q| {
            let text = ds.queries.get(q as usize).map_or("", |query| query.text.as_str());
            searcher.with_matches(text, |matches| ev.rank_to(q, matches, depth))
        },
    );
    let bm25 = queries.iter().copied().zip(ranked).collect();
    Ok(BaselineRankings { popularity, bm25 })
}
