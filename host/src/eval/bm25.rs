//! BM25 as Lucene scores it, the lexical baseline.
//!
//! # Scoring
//!
//! For a query with term counts `qtf(t)` and a document `d` of `|d|` tokens,
//!
//! ```text
//! score(q, d) = Σ_t  qtf(t) · idf(t) · tf(t,d) / (tf(t,d) + k1·(1 − b + b·|d|/avgdl))
//! idf(t)      = ln(1 + (N − df(t) + 0.5) / (df(t) + 0.5))
//! ```
//!
//! with `N` documents and `avgdl` their mean length: Lucene's BM25 since
//! version 8 (no constant `(k1 + 1)` factor), and the "lucene" method of
//! bm25s, against which `fixtures/eval/gen.py` checks this module. Repeated
//! query terms count once per occurrence, as in a Lucene bag-of-words query.
//! Lengths are exact (Lucene itself stores them in one byte, a rounding this
//! module does not copy). The idf is always positive, hence so is every
//! non-zero contribution.
//!
//! # Tokenisation
//!
//! The usual English analysis of bm25s and scikit-learn: text is lowercased
//! (Unicode-aware); a token is a maximal run of two or more word characters
//! (alphanumeric or `_`, the regex `\b\w\w+\b`); tokens in the English
//! stopword list ([`STOPWORDS_EN`], bm25s's list) are dropped, from
//! documents and queries alike, before lengths are counted. No stemming.
//!
//! A document is indexed as its `title`, a space, then its `text`.

use std::collections::HashMap;

use crate::data::Doc;
use crate::eval::topk::top_k_pairs;

/// BM25 parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Bm25Config {
    /// Term-frequency saturation, ≥ 0. Default 0.9 (Anserini's default,
    /// used by BEIR's Lucene baselines).
    pub k1: f32,
    /// Length normalisation strength in [0, 1]. Default 0.4 (Anserini's
    /// default).
    pub b: f32,
}

impl Default for Bm25Config {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Bm25Config {
    /// k1 0.9, b 0.4.
    pub const DEFAULT: Self = Self { k1: 0.9, b: 0.4 };

    /// Checks the ranges (either out of range could make a denominator
    /// vanish).
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.k1.is_finite() && self.k1 >= 0.0, "bm25_k1 must be finite and >= 0, got {}", self.k1);
        anyhow::ensure!((0.0..=1.0).contains(&self.b), "bm25_b must be in [0, 1], got {}", self.b);
        Ok(())
    }
}

/// The English stopword list (bm25s's `en` list, one word per line in
/// `stopwords_en.txt`).
pub const STOPWORDS_EN: &str = include_str!("stopwords_en.txt");

/// Whether `token` (lowercase) is an English stopword.
fn is_stopword(token: &str) -> bool {
    use std::sync::OnceLock;
    static SET: OnceLock<std::collections::HashSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| STOPWORDS_EN.lines().map(str::trim).filter(|w| !w.is_empty()).collect()).contains(token)
}

/// Splits `text` into lowercase tokens, stopwords dropped (see the module
/// docs).
pub fn tokenize(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for_each_token(text, |t| out.push(t.to_owned()));
    out
}

/// Calls `f` on each token of `text`, without allocating one string per
/// token.
fn for_each_token(text: &str, mut f: impl FnMut(&str)) {
    let lower = text.to_lowercase();
    lower
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|t| t.chars().nth(1).is_some() && !is_stopword(t))
        .for_each(&mut f);
}

/// An inverted index with precomputed per-posting impacts.
///
/// Postings are stored contiguously per term (compressed sparse rows), in
/// increasing document order. Because BM25's document-side factor depends
/// only on the term frequency and the document length, it is computed once at
/// build time; a search is then one multiply-add per posting.
#[derive(Debug, Clone)]
pub struct Bm25Index {
    cfg: Bm25Config,
    num_docs: usize,
    avgdl: f64,
    vocab: HashMap<String, u32>,
    idf: Vec<f32>,
    /// `offsets[t]..offsets[t + 1]` is the range of term `t`'s postings.
    offsets: Vec<usize>,
    post_docs: Vec<u32>,
    /// `tf / (tf + k1·(1 − b + b·|d|/avgdl))` for each posting.
    post_impacts: Vec<f32>,
}

impl Bm25Index {
    /// Indexes `docs`; document `i` gets index `i`.
    ///
    /// # Panics
    ///
    /// If `cfg` fails [`Bm25Config::validate`] (check it first), or the
    /// corpus exceeds `u32` indices.
    pub fn build(docs: &[Doc], cfg: Bm25Config) -> Bm25Index {
        assert!(cfg.validate().is_ok(), "invalid BM25 parameters {cfg:?}");
        let num_docs = docs.len();
        assert!(u32::try_from(num_docs).is_ok(), "more than u32::MAX documents");

        // Pass 1: per document, its (term, tf) pairs and its length.
        let mut vocab: HashMap<String, u32> = HashMap::new();
        let mut doc_terms: Vec<(u32, u32)> = Vec::new();
        let mut doc_starts: Vec<usize> = Vec::with_capacity(num_docs + 1);
        let mut doc_lens: Vec<u32> = Vec::with_capacity(num_docs);
        let mut df: Vec<u32> = Vec::new();
        let mut ids: Vec<u32> = Vec::new();
        for doc in docs {
            ids.clear();
            let mut intern = |tok: &str| {
                let id = match vocab.get(tok) {
                    Some(&id) => id,
                    None => {
                        let id = u32::try_from(vocab.len()).expect("more than u32::MAX terms");
                        vocab.insert(tok.to_owned(), id);
                        df.push(0);
                        id
                    }
                };
                ids.push(id);
            };
            for_each_token(&doc.title, &mut intern);
            for_each_token(&doc.text, &mut intern);
            doc_lens.push(u32::try_from(ids.len()).expect("document longer than u32::MAX tokens"));
            // Sorting then counting runs is cheaper than a hash map per doc.
            ids.sort_unstable();
            doc_starts.push(doc_terms.len());
            let mut i = 0;
            while i < ids.len() {
                let term = ids[i];
                let run = ids[i..].iter().take_while(|&&t| t == term).count();
                doc_terms.push((term, run as u32));
                df[term as usize] += 1;
                i += run;
            }
        }
        doc_starts.push(doc_terms.len());

        let total_len: u64 = doc_lens.iter().map(|&l| u64::from(l)).sum();
        let avgdl = if num_docs == 0 { 0.0 } else { total_len as f64 / num_docs as f64 };
        // Document-side denominators k1·(1 − b + b·|d|/avgdl). With an empty
        // corpus (avgdl = 0) there is nothing to normalise by, and no
        // postings either.
        let (k1, b) = (f64::from(cfg.k1), f64::from(cfg.b));
        let norms: Vec<f64> = doc_lens
            .iter()
            .map(|&l| {
                let rel = if avgdl > 0.0 { f64::from(l) / avgdl } else { 1.0 };
                k1 * (1.0 - b + b * rel)
            })
            .collect();

        // Pass 2: lay postings out term by term (counting sort by term);
        // visiting documents in order keeps each posting list sorted by doc.
        let mut offsets = Vec::with_capacity(df.len() + 1);
        let mut acc = 0usize;
        offsets.push(0);
        for &d in &df {
            acc += d as usize;
            offsets.push(acc);
        }
        let mut cursor: Vec<usize> = offsets[..df.len()].to_vec();
        let mut post_docs = vec![0u32; acc];
        let mut post_impacts = vec![0f32; acc];
        for (doc, window) in doc_starts.windows(2).enumerate() {
            for &(term, tf) in &doc_terms[window[0]..window[1]] {
                let slot = &mut cursor[term as usize];
                let tf = f64::from(tf);
                post_docs[*slot] = doc as u32;
                post_impacts[*slot] = (tf / (tf + norms[doc])) as f32;
                *slot += 1;
            }
        }

        let n = num_docs as f64;
        let idf = df
            .iter()
            .map(|&d| {
                let d = f64::from(d);
                (1.0 + (n - d + 0.5) / (d + 0.5)).ln() as f32
            })
            .collect();

        Bm25Index { cfg, num_docs, avgdl, vocab, idf, offsets, post_docs, post_impacts }
    }

    /// The parameters the index was built with.
    pub fn config(&self) -> Bm25Config {
        self.cfg
    }

    /// Number of indexed documents.
    pub fn num_docs(&self) -> usize {
        self.num_docs
    }

    /// Mean document length in tokens.
    pub fn avgdl(&self) -> f64 {
        self.avgdl
    }

    /// Number of distinct terms.
    pub fn vocab_len(&self) -> usize {
        self.vocab.len()
    }

    /// The idf of `term` (already a single lowercase token), if indexed.
    pub fn idf(&self, term: &str) -> Option<f32> {
        self.vocab.get(term).map(|&t| self.idf[t as usize])
    }

    /// The `k` best documents for `query`, best first, as (doc index,
    /// score). Only documents sharing at least one term with the query are
    /// returned, so there may be fewer than `k`; ties go to the lower index.
    ///
    /// Allocates a corpus-sized buffer per call; use [`Bm25Index::searcher`]
    /// to reuse it across many queries.
    pub fn search(&self, query: &str, k: usize) -> Vec<(u32, f32)> {
        self.searcher().search(query, k)
    }

    /// A reusable search context (scratch buffers) for this index. Each
    /// thread should own its own.
    pub fn searcher(&self) -> Bm25Searcher<'_> {
        Bm25Searcher { index: self, scores: vec![0.0; self.num_docs], touched: Vec::new() }
    }

    /// Searches every query of `queries`, spreading them over the available
    /// cores; result `i` belongs to `queries[i]`.
    pub fn search_batch<S: AsRef<str> + Sync>(&self, queries: &[S], k: usize) -> Vec<Vec<(u32, f32)>> {
        parallel_map(queries, || self.searcher(), |s, q| s.search(q.as_ref(), k))
    }
}

/// Search state for one thread: a dense score accumulator (all zero between
/// searches) and the list of documents it touched.
#[derive(Debug)]
pub struct Bm25Searcher<'a> {
    index: &'a Bm25Index,
    scores: Vec<f32>,
    touched: Vec<u32>,
}

impl Bm25Searcher<'_> {
    /// Same as [`Bm25Index::search`], reusing this searcher's buffers.
    pub fn search(&mut self, query: &str, k: usize) -> Vec<(u32, f32)> {
        self.with_matches(query, |matches| top_k_pairs(matches, k))
    }

    /// Calls `take` with every document that matches `query`, with its
    /// score, in no particular order (so that a caller can rank them its own
    /// way), and returns what `take` returns.
    pub fn with_matches<R>(&mut self, query: &str, take: impl FnOnce(&mut dyn Iterator<Item = (u32, f32)>) -> R) -> R {
        let index = self.index;
        let mut terms: Vec<u32> = Vec::new();
        for_each_token(query, |tok| {
            if let Some(&t) = index.vocab.get(tok) {
                terms.push(t);
            }
        });
        terms.sort_unstable();

        // (posting range, query weight) per distinct term.
        let mut lists = Vec::new();
        let mut postings = 0usize;
        let mut i = 0;
        while i < terms.len() {
            let term = terms[i] as usize;
            let qtf = terms[i..].iter().take_while(|&&t| t as usize == term).count();
            i += qtf;
            let range = index.offsets[term]..index.offsets[term + 1];
            postings += range.len();
            lists.push((range, qtf as f32 * index.idf[term]));
        }

        // Queries with frequent terms touch most of the corpus; then tracking
        // touched documents costs more than sweeping the whole accumulator.
        // Below the threshold, only the touched slots are read and reset.
        let dense = postings.saturating_mul(4) >= index.num_docs;
        for (range, weight) in lists {
            let docs = &index.post_docs[range.clone()];
            let impacts = &index.post_impacts[range];
            if dense {
                for (&doc, &impact) in docs.iter().zip(impacts) {
                    self.scores[doc as usize] += weight * impact;
                }
            } else {
                for (&doc, &impact) in docs.iter().zip(impacts) {
                    let s = &mut self.scores[doc as usize];
                    if *s == 0.0 {
                        self.touched.push(doc);
                    }
                    *s += weight * impact;
                }
            }
        }

        // Every contribution is positive, so a zero slot is an unmatched
        // document. Slots are zeroed as they are read, ready for the next
        // query; that also reports a document listed twice in `touched`
        // (possible only if a contribution underflowed to zero) once.
        let scores = &mut self.scores;
        // `take` may stop early; the rest is drained so the buffers are
        // clean for the next query either way.
        if dense {
            let mut candidates = scores.iter_mut().enumerate().filter_map(|(doc, slot)| {
                let s = std::mem::take(slot);
                (s != 0.0).then_some((doc as u32, s))
            });
            let out = take(&mut candidates);
            candidates.for_each(drop);
            out
        } else {
            let mut candidates = self.touched.drain(..).filter_map(|doc| {
                let s = std::mem::take(&mut scores[doc as usize]);
                (s != 0.0).then_some((doc, s))
            });
            let out = take(&mut candidates);
            candidates.for_each(drop);
            out
        }
    }
}

/// Applies `f` to every item of `items` on up to all available cores, each
/// worker owning a state made by `init`; results keep the input order.
pub(crate) fn parallel_map<T: Sync, S, R: Send>(
    items: &[T],
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, &T) -> R + Sync,
) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // A few queries are not worth a thread (nor a corpus-sized buffer each).
    let threads = threads.min(items.len().div_ceil(64)).max(1);
    if threads == 1 {
        let mut state = init();
        return items.iter().map(|item| f(&mut state, item)).collect();
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = items
            .chunks(chunk)
            .map(|part| {
                let (init, f) = (&init, &f);
                scope.spawn(move || {
                    let mut state = init();
                    part.iter().map(|item| f(&mut state, item)).collect::<Vec<R>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| match w.join() {
                Ok(part) => part,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;
    use proptest::prelude::*;

    fn doc(id: &str, title: &str, text: &str) -> Doc {
        Doc { id: id.into(), title: title.into(), text: text.into() }
    }

    fn corpus() -> Vec<Doc> {
        vec![
            // tokens: [cat, sat] ("the" is a stopword) → |d| = 2
            doc("a", "", "The cat sat"),
            // tokens: [cats, dog, dog, ran] → |d| = 4
            doc("b", "Cats!", "the DOG, the dog ran"),
            // tokens: [dog] ("a" is a stopword and too short) → |d| = 1
            doc("c", "", "a dog"),
        ]
    }

    #[test]
    fn tokenizer() {
        // Runs of two or more word characters (letters, digits, '_'),
        // lowercased; single characters and stopwords dropped.
        assert_eq!(tokenize("Hello, World! x2-y_z a I"), ["hello", "world", "x2", "y_z"]);
        assert_eq!(tokenize("Ünïcode ÄÖ straße 東京"), ["ünïcode", "äö", "straße", "東京"]);
        assert_eq!(tokenize("The state of the art, and THIS is it"), ["state", "art"]);
        assert!(tokenize(" ,.; ").is_empty());
        assert_eq!(STOPWORDS_EN.lines().count(), 33);
    }

    #[test]
    fn statistics() {
        let idx = Bm25Index::build(&corpus(), Bm25Config::default());
        // N = 3, avgdl = (2 + 4 + 1) / 3 = 7/3.
        assert_eq!(idx.num_docs(), 3);
        assert_relative_eq!(idx.avgdl(), 7.0 / 3.0, epsilon = 1e-12);
        // Terms: cat, sat, cats, dog, ran.
        assert_eq!(idx.vocab_len(), 5);
        // df(dog) = 2: idf = ln(1 + (3 - 2 + 0.5)/(2 + 0.5)) = ln(1.6) = 0.470004
        assert_relative_eq!(idx.idf("dog").unwrap(), 1.6f32.ln(), epsilon = 1e-6);
        // df(cat) = 1: idf = ln(1 + 2.5/1.5) = ln(8/3) = 0.980829
        assert_relative_eq!(idx.idf("cat").unwrap(), (8.0f32 / 3.0).ln(), epsilon = 1e-6);
        assert_eq!(idx.idf("Cat"), None);
        assert_eq!(idx.idf("the"), None);
    }

    #[test]
    fn hand_computed_scores() {
        let idx = Bm25Index::build(&corpus(), Bm25Config::default());
        // k1 = 0.9, b = 0.4, avgdl = 7/3; norm(d) = k1·(1 − b + b·|d|/avgdl):
        //   doc a (2): 0.848571; doc b (4): 1.157143; doc c (1): 0.694286.
        // Query "dog", idf ln 1.6 = 0.470004:
        //   b: tf 2 → 0.470004·2/(2 + 1.157143) = 0.297740
        //   c: tf 1 → 0.470004·1/(1 + 0.694286) = 0.277405
        let hits = idx.search("dog", 10);
        assert_eq!(hits.iter().map(|h| h.0).collect::<Vec<_>>(), [1, 2]);
        assert_relative_eq!(hits[0].1, 0.297740, epsilon = 1e-5);
        assert_relative_eq!(hits[1].1, 0.277405, epsilon = 1e-5);

        // Query "the cat": "the" is dropped; cat in a: 0.980829/1.848571 = 0.530588.
        let hits = idx.search("the cat", 10);
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].0, 0);
        assert_relative_eq!(hits[0].1, 0.530588, epsilon = 1e-5);

        // A repeated query term counts twice: "dog dog" doubles every score.
        let twice = idx.search("DOG dog", 10);
        assert_relative_eq!(twice[0].1, 2.0 * 0.297740, epsilon = 1e-5);

        // Unknown terms contribute nothing; k truncates.
        assert!(idx.search("zebra", 10).is_empty());
        assert_eq!(idx.search("dog zebra", 1), vec![hits_of(&idx, "dog")[0]]);
    }

    fn hits_of(idx: &Bm25Index, q: &str) -> Vec<(u32, f32)> {
        idx.search(q, 10)
    }

    #[test]
    fn searcher_reuse_and_batch_agree() {
        let idx = Bm25Index::build(&corpus(), Bm25Config::default());
        let queries = ["dog", "the cat", "zebra", "a dog sat", "cats ran"];
        let mut s = idx.searcher();
        let one_by_one: Vec<_> = queries.iter().map(|q| s.search(q, 3)).collect();
        // The scratch buffer is all zeros again after each search.
        assert!(s.scores.iter().all(|&x| x == 0.0));
        assert_eq!(idx.search_batch(&queries, 3), one_by_one);
        let many: Vec<&str> = queries.iter().copied().cycle().take(1000).collect();
        let batch = idx.search_batch(&many, 3);
        for (q, r) in many.iter().zip(&batch) {
            assert_eq!(r, &idx.search(q, 3));
        }
    }

    /// Scores every document straight from the formula in the module docs,
    /// in f64, without an index.
    fn brute_force(docs: &[Doc], cfg: Bm25Config, query: &str) -> Vec<f64> {
        let tokens: Vec<Vec<String>> = docs.iter().map(|d| tokenize(&format!("{} {}", d.title, d.text))).collect();
        let n = docs.len() as f64;
        let avgdl = tokens.iter().map(Vec::len).sum::<usize>() as f64 / n;
        let (k1, b) = (f64::from(cfg.k1), f64::from(cfg.b));
        tokens
            .iter()
            .map(|doc| {
                tokenize(query)
                    .iter()
                    .map(|t| {
                        let df = tokens.iter().filter(|d| d.contains(t)).count() as f64;
                        let tf = doc.iter().filter(|w| *w == t).count() as f64;
                        if tf == 0.0 {
                            return 0.0;
                        }
                        let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
                        idf * tf / (tf + k1 * (1.0 - b + b * doc.len() as f64 / avgdl))
                    })
                    .sum()
            })
            .collect()
    }

    #[test]
    fn sparse_path_on_rare_terms() {
        // 40 filler docs and one with a rare word: the query's single posting
        // is far below a quarter of the corpus, so only touched slots are
        // read. The scratch buffer must be clean afterwards.
        let mut docs: Vec<Doc> = (0..40).map(|i| doc(&i.to_string(), "", "filler text")).collect();
        docs.push(doc("x", "Rare", "word"));
        let idx = Bm25Index::build(&docs, Bm25Config::default());
        let mut s = idx.searcher();
        let hits = s.search("rare", 5);
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].0, 40);
        assert_relative_eq!(
            f64::from(hits[0].1),
            brute_force(&docs, Bm25Config::default(), "rare")[40],
            epsilon = 1e-5
        );
        assert!(s.scores.iter().all(|&x| x == 0.0));
        assert!(s.touched.is_empty());
    }

    fn word() -> impl Strategy<Value = String> {
        // Skewed: a few words are in most documents (dense path), most are
        // rare (sparse path).
        prop_oneof![(0u8..3).prop_map(|i| format!("w{i}")), (0u8..60).prop_map(|i| format!("W{i}"))]
    }

    fn words(max: usize) -> impl Strategy<Value = String> {
        prop::collection::vec(word(), 0..max).prop_map(|w| w.join(" "))
    }

    proptest! {
        #[test]
        fn agrees_with_brute_force(
            texts in prop::collection::vec((words(3), words(12)), 1..80),
            queries in prop::collection::vec(words(4), 1..6),
            k in 1usize..20,
            k1 in 0.1f32..2.0,
            b in 0.0f32..1.0,
        ) {
            let docs: Vec<Doc> = texts
                .iter()
                .enumerate()
                .map(|(i, (title, text))| doc(&i.to_string(), title, text))
                .collect();
            let cfg = Bm25Config { k1, b };
            let idx = Bm25Index::build(&docs, cfg);
            let mut searcher = idx.searcher();
            for query in &queries {
                let want = brute_force(&docs, cfg, query);
                let got = searcher.search(query, k);
                let matched = want.iter().filter(|&&s| s > 0.0).count();
                prop_assert_eq!(got.len(), matched.min(k));
                for w in got.windows(2) {
                    prop_assert!(w[0].1 >= w[1].1);
                }
                for &(d, s) in &got {
                    prop_assert!((f64::from(s) - want[d as usize]).abs() <= 1e-4 * (1.0 + want[d as usize]));
                }
                // Nothing left out scores clearly better than the last kept.
                if let Some(&(_, last)) = got.last() {
                    let kept: std::collections::HashSet<u32> = got.iter().map(|h| h.0).collect();
                    for (d, &s) in want.iter().enumerate() {
                        if !kept.contains(&(d as u32)) {
                            prop_assert!(s <= f64::from(last) + 1e-4 * (1.0 + s));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn empty_corpus() {
        let idx = Bm25Index::build(&[], Bm25Config::default());
        assert!(idx.search("anything", 5).is_empty());
    }

    #[test]
    fn custom_parameters() {
        // With b = 0 length is ignored: norm = k1 = 1.2 for every doc, so for
        // "dog" doc c (tf 1) scores idf/2.2 and doc b (tf 2) idf·2/3.2.
        let cfg = Bm25Config { k1: 1.2, b: 0.0 };
        let idx = Bm25Index::build(&corpus(), cfg);
        assert_eq!(idx.config(), cfg);
        let hits = idx.search("dog", 10);
        let idf = 1.6f32.ln();
        assert_relative_eq!(hits[0].1, idf * 2.0 / 3.2, epsilon = 1e-6);
        assert_relative_eq!(hits[1].1, idf / 2.2, epsilon = 1e-6);
    }
}
