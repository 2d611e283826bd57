//! BM25 at the scale of the real datasets: 120k documents, 10k queries.
//!
//! Ignored by default because it only measures; run it with
//! `cargo test --release -p negcache-host --test eval_bm25_timing -- --ignored --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use negcache_host::data::Doc;
use negcache_host::eval::{Bm25Config, Bm25Index};
use rand_core::{RngCore, SeedableRng};
use rand_pcg::Pcg64;

/// Samples word ranks from a Zipf(1) law over `vocab` words, the usual shape
/// of natural-language term frequencies: a few very frequent terms with huge
/// posting lists dominate the search cost, since there are no stopwords.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(vocab: usize) -> Zipf {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=vocab)
            .map(|r| {
                acc += 1.0 / r as f64;
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut impl RngCore) -> usize {
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

fn text(rng: &mut impl RngCore, zipf: &Zipf, min: u32, spread: u32) -> String {
    let len = min + rng.next_u32() % spread;
    (0..len).map(|_| format!("w{}", zipf.sample(rng))).collect::<Vec<_>>().join(" ")
}

#[test]
#[ignore = "timing only; run with --release --ignored"]
fn bm25_120k_docs_10k_queries() {
    let mut rng = Pcg64::seed_from_u64(12);
    let zipf = Zipf::new(100_000);
    let t = Instant::now();
    let docs: Vec<Doc> = (0..120_000)
        .map(|i| Doc { id: format!("d{i}"), title: text(&mut rng, &zipf, 3, 6), text: text(&mut rng, &zipf, 40, 80) })
        .collect();
    let queries: Vec<String> = (0..10_000).map(|_| text(&mut rng, &zipf, 3, 8)).collect();
    println!("generate: {:.2?}", t.elapsed());

    let t = Instant::now();
    let index = Bm25Index::build(&docs, Bm25Config::default());
    println!(
        "build: {:.2?} ({} docs, {} terms, avgdl {:.1})",
        t.elapsed(),
        index.num_docs(),
        index.vocab_len(),
        index.avgdl()
    );

    let t = Instant::now();
    let mut searcher = index.searcher();
    let hits: usize = queries.iter().map(|q| searcher.search(q, 100).len()).sum();
    println!("search, 1 thread: {:.2?} ({hits} hits)", t.elapsed());

    let t = Instant::now();
    let batch = index.search_batch(&queries, 100);
    println!(
        "search_batch, {} threads: {:.2?}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        t.elapsed()
    );
    assert_eq!(batch.iter().map(Vec::len).sum::<usize>(), hits);
}
