//! The evaluation protocol: how a system's scores become a ranking, and a
//! ranking becomes metrics, the same way for the towers, BM25 and
//! popularity.
//!
//! By default it is BEIR's, scored as trec_eval scores a run file:
//!
//! 1. A retrieved document whose id equals the query's id is dropped (BEIR's
//!    `ignore_identical_ids`).
//! 2. With [`Protocol::exclude_train`], the query's positives of the `train`
//!    split are dropped too, as recommendation evaluations do (a user's
//!    training items are not predictions).
//! 3. What remains is ordered as trec_eval orders a run: by score,
//!    highest first, equal scores by document id in *decreasing* byte order.
//!    The ranking is cut to [`Protocol::depth`] documents in that order, so a
//!    run file written from it scores the same in trec_eval or pytrec_eval
//!    as here.
//! 4. Metrics ([`super::metrics`]) are averaged over the split's queries with
//!    a relevant judgement; a query whose ranking is empty scores zero (as
//!    `trec_eval -c`). Scoring a run file (`negcache eval --run`) averages
//!    over the run's queries instead, as pytrec_eval and BEIR do: a run file
//!    has no line for a query with an empty ranking (BM25 finds nothing for
//!    a query sharing no term with the corpus), so its mean can differ from
//!    the in-process one by such queries.
//!
//! [`Protocol::merge_identical_text`] departs from BEIR: documents with the
//! same title and text count as one. Every number computed with it is
//! labelled where it is printed or written ([`Protocol::label`]).

use std::collections::{HashMap, HashSet};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::metrics::{evaluate_with_equivalence, Metrics, RANKING_DEPTH};
use super::topk::top_k_present;
use crate::data::{Dataset, Qrel};

/// Settings of the evaluation protocol; the defaults are BEIR's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Protocol {
    /// Drop a retrieved document whose id equals the query id (BEIR's
    /// default). Default `true`.
    pub ignore_identical_ids: bool,
    /// Drop each query's `train` positives from its ranking before the
    /// metrics and before a run file is cut. Default `false`.
    pub exclude_train: bool,
    /// Count documents with identical title and text as one document (not
    /// BEIR; labelled wherever printed). Default `false`.
    pub merge_identical_text: bool,
    /// Documents kept per query in rankings and run files. Default 1,000,
    /// the depth of BEIR's own evaluations.
    pub depth: usize,
}

impl Protocol {
    /// BEIR's protocol: identical ids dropped, nothing else.
    pub const BEIR: Self =
        Self { ignore_identical_ids: true, exclude_train: false, merge_identical_text: false, depth: 1000 };

    /// Checks the settings.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.depth >= RANKING_DEPTH,
            "evaluation depth must be at least {RANKING_DEPTH} (the deepest cut-off), got {}",
            self.depth
        );
        Ok(())
    }

    /// A one-line description of the protocol, printed beside every table.
    pub fn describe(&self) -> String {
        let mut parts = vec![if self.merge_identical_text {
            "NON-STANDARD: documents with identical text merged".to_owned()
        } else {
            "standard (BEIR/trec_eval)".to_owned()
        }];
        parts.push(if self.ignore_identical_ids {
            "a document with the query's own id dropped".to_owned()
        } else {
            "documents with the query's own id kept (not BEIR)".to_owned()
        });
        if self.exclude_train {
            parts.push("training positives excluded from each ranking".to_owned());
        }
        parts.push(format!("rankings of depth {}", self.depth));
        parts.join("; ")
    }

    /// A short label for numbers computed under a non-standard protocol,
    /// empty for the standard one (with or without `exclude_train`, which is
    /// the standard protocol for recommendation data).
    pub fn label(&self) -> &'static str {
        match (self.merge_identical_text, self.ignore_identical_ids) {
            (false, true) => "",
            (true, true) => " [identical texts merged]",
            (false, false) => " [own ids kept]",
            (true, false) => " [identical texts merged, own ids kept]",
        }
    }
}

impl Default for Protocol {
    fn default() -> Self {
        Self::BEIR
    }
}

/// A ranking: (document index, score), best first.
pub type Ranking = Vec<(u32, f32)>;

/// Evaluates rankings of one split under a [`Protocol`].
#[derive(Debug)]
pub struct Evaluator {
    protocol: Protocol,
    qrels: Vec<Qrel>,
    /// Per query, the documents its ranking may not hold.
    excluded: HashMap<u32, HashSet<u32>>,
    /// `tie_key[doc]`: the document's position in decreasing id order, so
    /// that among equal scores a lower key ranks first (as in trec_eval).
    tie_key: Vec<u32>,
    /// The inverse of `tie_key`.
    doc_of_key: Vec<u32>,
    /// Document to canonical document, when merging identical texts.
    canonical: Option<HashMap<u32, u32>>,
}

impl Evaluator {
    /// An evaluator of the judged queries of `split` in `ds`.
    ///
    /// # Errors
    /// If `split` is not loaded, the protocol is invalid, or `exclude_train`
    /// is set without a loaded `train` split.
    pub fn new(ds: &Dataset, split: &str, protocol: Protocol) -> anyhow::Result<Self> {
        protocol.validate()?;
        let qrels = ds.qrels.get(split).with_context(|| format!("no split {split:?} loaded"))?.clone();
        let mut excluded: HashMap<u32, HashSet<u32>> = HashMap::new();
        if protocol.exclude_train {
            let train = ds.qrels.get("train").context("exclude_train needs the train split")?;
            for j in train.iter().filter(|j| j.score > 0) {
                excluded.entry(j.query).or_default().insert(j.doc);
            }
        }
        if protocol.ignore_identical_ids {
            let by_id: HashMap<&str, u32> = (0u32..).zip(&ds.corpus).map(|(i, d)| (d.id.as_str(), i)).collect();
            for &q in &super::judged_queries(&qrels) {
                if let Some(&doc) = ds.queries.get(q as usize).and_then(|query| by_id.get(query.id.as_str())) {
                    excluded.entry(q).or_default().insert(doc);
                }
            }
        }
        let mut doc_of_key: Vec<u32> = (0u32..).take(ds.corpus.len()).collect();
        doc_of_key.sort_by(|&a, &b| ds.corpus[b as usize].id.as_bytes().cmp(ds.corpus[a as usize].id.as_bytes()));
        let mut tie_key = vec![0u32; doc_of_key.len()];
        for (key, &doc) in (0u32..).zip(&doc_of_key) {
            tie_key[doc as usize] = key;
        }
        let canonical = protocol.merge_identical_text.then(|| ds.duplicate_text_groups());
        Ok(Self { protocol, qrels, excluded, tie_key, doc_of_key, canonical })
    }

    /// The protocol.
    pub fn protocol(&self) -> &Protocol {
        &self.protocol
    }

    /// The split's judgements.
    pub fn qrels(&self) -> &[Qrel] {
        &self.qrels
    }

    /// The queries evaluated (those with a relevant judgement), increasing.
    pub fn queries(&self) -> Vec<u32> {
        super::judged_queries(&self.qrels)
    }

    /// Whether `doc` may appear in `query`'s ranking.
    pub fn admits(&self, query: u32, doc: u32) -> bool {
        self.excluded.get(&query).is_none_or(|set| !set.contains(&doc))
    }

    /// `query`'s ranking from scored candidates (any order, distinct
    /// documents): the admitted ones, the best [`Protocol::depth`] in
    /// trec_eval's order (see the module docs).
    pub fn rank(&self, query: u32, candidates: impl IntoIterator<Item = (u32, f32)>) -> Ranking {
        self.rank_to(query, candidates, self.protocol.depth)
    }

    /// [`Self::rank`] cut at `depth` instead of the protocol's depth. Cut at
    /// [`Self::metrics_depth`] or deeper, the metrics are the same as at the
    /// protocol's depth.
    pub fn rank_to(&self, query: u32, candidates: impl IntoIterator<Item = (u32, f32)>, depth: usize) -> Ranking {
        // The query's excluded set is looked up once, not per candidate
        // (`admits` per candidate left the per-item loop 2.5 times slower
        // in some builds: `negcache bench`, exact retrieval).
        // Candidates are dropped as `None`, not filtered out (see
        // `top_k_present`).
        match self.excluded.get(&query) {
            Some(set) => self.best_present(
                candidates.into_iter().map(|(doc, score)| (!set.contains(&doc)).then_some((doc, score))),
                depth,
            ),
            None => self.best(candidates, depth),
        }
    }

    /// All `candidates` in the protocol's order, none dropped: a ranking
    /// shared by every query, whose admitted prefix is then each query's
    /// ranking.
    pub fn order(&self, candidates: impl IntoIterator<Item = (u32, f32)>) -> Ranking {
        self.best(candidates, self.tie_key.len())
    }

    fn best(&self, candidates: impl IntoIterator<Item = (u32, f32)>, depth: usize) -> Ranking {
        self.best_present(candidates.into_iter().map(Some), depth)
    }

    /// [`Self::best`] over the candidates that are `Some`.
    fn best_present(&self, candidates: impl IntoIterator<Item = Option<(u32, f32)>>, depth: usize) -> Ranking {
        let keyed = candidates
            .into_iter()
            .map(|c| c.and_then(|(doc, score)| self.tie_key.get(doc as usize).map(|&key| (key, score))));
        top_k_present(keyed, depth).into_iter().map(|(key, score)| (self.doc_of_key[key as usize], score)).collect()
    }

    /// The depth that the metrics read: [`RANKING_DEPTH`], or the whole
    /// protocol depth when identical texts are merged (twins then take
    /// places that do not count).
    pub fn metrics_depth(&self) -> usize {
        if self.protocol.merge_identical_text {
            self.protocol.depth
        } else {
            RANKING_DEPTH
        }
    }

    /// Metrics of the rankings (`rankings(q)` for each evaluated query; a
    /// query without one scores zero).
    pub fn metrics(&self, rankings: impl Fn(u32) -> Option<Ranking>) -> Metrics {
        self.metrics_over(&self.qrels, rankings)
    }

    /// [`Self::metrics`] over the given queries only.
    pub fn metrics_on(&self, queries: &[u32], rankings: impl Fn(u32) -> Option<Ranking>) -> Metrics {
        let keep: HashSet<u32> = queries.iter().copied().collect();
        let qrels: Vec<Qrel> = self.qrels.iter().copied().filter(|j| keep.contains(&j.query)).collect();
        self.metrics_over(&qrels, rankings)
    }

    fn metrics_over(&self, qrels: &[Qrel], rankings: impl Fn(u32) -> Option<Ranking>) -> Metrics {
        evaluate_with_equivalence(qrels, self.canonical.as_ref(), |q| {
            rankings(q).map(|r| r.into_iter().map(|(d, _)| d).collect()).unwrap_or_default()
        })
    }

    /// Metrics of rankings held in a map.
    pub fn metrics_of(&self, rankings: &HashMap<u32, Ranking>) -> Metrics {
        self.metrics(|q| rankings.get(&q).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Doc, Query};

    fn dataset() -> Dataset {
        let doc = |id: &str, text: &str| Doc { id: id.into(), title: String::new(), text: text.into() };
        let corpus = vec![doc("a", "x"), doc("b", "x"), doc("c", "y"), doc("q1", "z")];
        let queries = vec![Query { id: "q1".into(), text: String::new() }];
        let mut ds = Dataset { corpus, queries, ..Dataset::default() };
        ds.qrels.insert("test".into(), vec![Qrel { query: 0, doc: 0, score: 1 }]);
        ds.qrels.insert("train".into(), vec![Qrel { query: 0, doc: 2, score: 1 }]);
        ds
    }

    #[test]
    fn ties_go_to_the_larger_id_and_own_id_is_dropped() {
        let ds = dataset();
        let ev = Evaluator::new(&ds, "test", Protocol { depth: 100, ..Protocol::BEIR }).unwrap();
        // All four tie; "q1" (own id) is dropped; then c > b > a by id.
        let r = ev.rank(0, [(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0)]);
        assert_eq!(r, vec![(2, 1.0), (1, 1.0), (0, 1.0)]);
        // A higher score beats any id.
        let r = ev.rank(0, [(0, 2.0), (1, 1.0), (2, 1.0)]);
        assert_eq!(r.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 2, 1]);
        let m = ev.metrics(|_| Some(r.clone()));
        assert_eq!(m.queries, 1);
        assert!((m.recall_at_1 - 1.0).abs() < 1e-12);
    }

    #[test]
    fn exclude_train_and_merging() {
        let ds = dataset();
        let p = Protocol { depth: 100, exclude_train: true, ..Protocol::BEIR };
        let ev = Evaluator::new(&ds, "test", p).unwrap();
        assert_eq!(ev.rank(0, [(2, 3.0), (1, 2.0), (0, 1.0)]), vec![(1, 2.0), (0, 1.0)]);
        // Without merging, b at rank 1 is a miss; with merging it is a's twin.
        let r = ev.rank(0, [(1, 2.0), (0, 1.0)]);
        assert!(ev.metrics(|_| Some(r.clone())).recall_at_1.abs() < 1e-12);
        let merged = Evaluator::new(&ds, "test", Protocol { merge_identical_text: true, ..p }).unwrap();
        assert!((merged.metrics(|_| Some(r.clone())).recall_at_1 - 1.0).abs() < 1e-12);
        assert!(!merged.protocol().label().is_empty());
        assert!(Protocol::BEIR.label().is_empty());
    }

    #[test]
    fn shallow_depth_is_refused() {
        let ds = dataset();
        assert!(Evaluator::new(&ds, "test", Protocol { depth: 10, ..Protocol::BEIR }).is_err());
        assert!(Evaluator::new(&ds, "dev", Protocol::BEIR).is_err());
    }
}
