//! Test data shared by the integration tests.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::Path;

use negcache_host::data::{beir, Dataset, Doc, Qrel, Query};

/// A small dataset: 40 items, 120 queries naming their item's words.
pub fn tiny_dataset(dir: &Path) {
    let words = ["red", "blue", "green", "cat", "dog", "fish", "tree", "rock", "sun", "moon"];
    let mut ds = Dataset::default();
    for i in 0..40 {
        ds.corpus.push(Doc {
            id: format!("d{i}"),
            title: String::new(),
            text: format!("{} {}", words[i % 10], words[(i / 10 + 3) % 10]),
        });
        ds.doc_index.insert(format!("d{i}"), i as u32);
    }
    let mut train = Vec::new();
    let mut test = Vec::new();
    for q in 0..120u32 {
        let d = q % 40;
        ds.queries.push(Query { id: format!("q{q}"), text: format!("a {} thing", ds.corpus[d as usize].text) });
        ds.query_index.insert(format!("q{q}"), q);
        let qrel = Qrel { query: q, doc: d, score: 1 };
        if q < 100 {
            train.push(qrel)
        } else {
            test.push(qrel)
        }
    }
    ds.qrels.insert("train".into(), train);
    ds.qrels.insert("test".into(), test);
    beir::write(dir, &ds, true).unwrap();
}

/// metrics.csv without its timing column: (step, named values) rows in file
/// order.
pub fn log_without_timing(path: &Path) -> Vec<(u64, Vec<(String, f64)>)> {
    negcache_host::report::read_series(path)
        .unwrap()
        .into_iter()
        .map(|r| (r.step, r.values.into_iter().filter(|(k, _)| k != "steps_per_s").collect()))
        .collect()
}
