//! The evaluation API end to end on a tiny in-memory dataset.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use approx::assert_relative_eq;
use negcache_host::data::{Dataset, Doc, Qrel, Query};
use negcache_host::eval::{
    evaluate, evaluate_baselines, evaluate_with_equivalence, popularity_ranking, read_run, write_qrels, write_run,
    Bm25Config, Bm25Index, Metrics,
};

fn doc(id: &str, title: &str, text: &str) -> Doc {
    Doc { id: id.into(), title: title.into(), text: text.into() }
}

fn qrel(query: u32, doc: u32, score: i32) -> Qrel {
    Qrel { query, doc, score }
}

/// Five recipes (d3 is a verbatim copy of d0) and four queries.
///
/// * train: q3→d2, q1→d2, q0→d1, so popularity ranks d2, d1, d0, d3, d4.
/// * test: q0→d3 (1), q1→d1 (2), q2→d4 (1) and q2→d0 (0, not relevant).
fn recipes() -> Dataset {
    let corpus = vec![
        doc("d0", "Apple pie", "sweet apple dessert"),
        doc("d1", "Banana bread", "banana loaf baking"),
        doc("d2", "Cherry tart", "cherry pastry"),
        doc("d3", "Apple pie", "sweet apple dessert"),
        doc("d4", "Dog food", "kibble for dogs"),
    ];
    let queries: Vec<Query> = ["apple dessert", "banana loaf", "Kibble?", "cherry"]
        .iter()
        .enumerate()
        .map(|(i, text)| Query { id: format!("q{i}"), text: (*text).into() })
        .collect();
    let qrels = HashMap::from([
        ("train".to_owned(), vec![qrel(3, 2, 1), qrel(1, 2, 1), qrel(0, 1, 1)]),
        ("test".to_owned(), vec![qrel(0, 3, 1), qrel(1, 1, 2), qrel(2, 4, 1), qrel(2, 0, 0)]),
    ]);
    Dataset {
        doc_index: corpus.iter().enumerate().map(|(i, d)| (d.id.clone(), i as u32)).collect(),
        query_index: queries.iter().enumerate().map(|(i, q)| (q.id.clone(), i as u32)).collect(),
        corpus,
        queries,
        qrels,
    }
}

fn l2(x: f64) -> f64 {
    x.log2()
}

fn assert_metrics(got: Metrics, want: Metrics) {
    assert_eq!(got.queries, want.queries, "{got:?}");
    assert_relative_eq!(got.recall_at_1, want.recall_at_1, epsilon = 1e-12);
    assert_relative_eq!(got.recall_at_10, want.recall_at_10, epsilon = 1e-12);
    assert_relative_eq!(got.recall_at_100, want.recall_at_100, epsilon = 1e-12);
    assert_relative_eq!(got.mrr_at_10, want.mrr_at_10, epsilon = 1e-12);
    assert_relative_eq!(got.ndcg_at_10, want.ndcg_at_10, epsilon = 1e-12);
}

#[test]
fn baselines_on_recipes() {
    let ds = recipes();
    let b = evaluate_baselines(&ds, "test", None);

    // BM25: q0 matches d0 and d3 equally (tie → d0 first), so the relevant
    // d3 is second: R@1 0, MRR 1/2, NDCG 1/log2(3). q1 finds d1 and q2 finds
    // d4 at rank 1: every metric 1. Means over the 3 judged queries.
    assert_metrics(
        b.bm25,
        Metrics {
            queries: 3,
            recall_at_1: 2.0 / 3.0,
            recall_at_10: 1.0,
            recall_at_100: 1.0,
            mrr_at_10: (0.5 + 1.0 + 1.0) / 3.0,
            ndcg_at_10: (1.0 / l2(3.0) + 2.0) / 3.0,
        },
    );

    // Popularity ranks d2, d1, d0, d3, d4 for every query:
    // q0 (d3) at rank 4: MRR 1/4, NDCG 1/log2(5);
    // q1 (d1, grade 2) at rank 2: MRR 1/2, NDCG (2/log2 3)/2 = 1/log2(3);
    // q2 (d4) at rank 5: MRR 1/5, NDCG 1/log2(6).
    assert_metrics(
        b.popularity,
        Metrics {
            queries: 3,
            recall_at_1: 0.0,
            recall_at_10: 1.0,
            recall_at_100: 1.0,
            mrr_at_10: (0.25 + 0.5 + 0.2) / 3.0,
            ndcg_at_10: (1.0 / l2(5.0) + 1.0 / l2(3.0) + 1.0 / l2(6.0)) / 3.0,
        },
    );
}

#[test]
fn baselines_with_equivalent_documents() {
    let ds = recipes();
    let eq = HashMap::from([(3u32, 0u32)]);
    let b = evaluate_baselines(&ds, "test", Some(&eq));

    // BM25: q0's first hit d0 now counts as its twin d3: all metrics are 1.
    assert_metrics(
        b.bm25,
        Metrics {
            queries: 3,
            recall_at_1: 1.0,
            recall_at_10: 1.0,
            recall_at_100: 1.0,
            mrr_at_10: 1.0,
            ndcg_at_10: 1.0,
        },
    );

    // Popularity d2, d1, d0, d3, d4 becomes d2, d1, d0, d4 after merging:
    // q0's relevant item (d0 ≡ d3) is at rank 3: MRR 1/3, NDCG 1/log2(4);
    // q1 is unchanged; q2's d4 moves up to rank 4: MRR 1/4, NDCG 1/log2(5).
    assert_metrics(
        b.popularity,
        Metrics {
            queries: 3,
            recall_at_1: 0.0,
            recall_at_10: 1.0,
            recall_at_100: 1.0,
            mrr_at_10: (1.0 / 3.0 + 0.5 + 0.25) / 3.0,
            ndcg_at_10: (0.5 + 1.0 / l2(3.0) + 1.0 / l2(5.0)) / 3.0,
        },
    );
}

#[test]
fn missing_split_evaluates_nothing() {
    let b = evaluate_baselines(&recipes(), "dev", None);
    assert_eq!(b.bm25, Metrics::default());
    assert_eq!(b.popularity, Metrics::default());
}

#[test]
fn popularity_and_bm25_building_blocks() {
    let ds = recipes();
    assert_eq!(popularity_ranking(&ds.qrels["train"], ds.corpus.len()), vec![2, 1, 0, 3, 4]);

    let index = Bm25Index::build(&ds.corpus, Bm25Config::default());
    let hits = index.search("APPLE", 10);
    assert_eq!(hits.iter().map(|h| h.0).collect::<Vec<_>>(), vec![0, 3]);
    assert_eq!(hits[0].1, hits[1].1);

    // A hand-made evaluation matches what the baseline helper reports.
    let by_bm25 =
        |q: u32| -> Vec<u32> { index.search(&ds.queries[q as usize].text, 100).into_iter().map(|(d, _)| d).collect() };
    let test = &ds.qrels["test"];
    assert_eq!(evaluate(test, by_bm25), evaluate_baselines(&ds, "test", None).bm25);
    let eq = HashMap::from([(3u32, 0u32)]);
    assert_eq!(evaluate_with_equivalence(test, Some(&eq), by_bm25), evaluate_baselines(&ds, "test", Some(&eq)).bm25);
}

/// With many twins ahead of the relevant document, BM25 must retrieve deeper
/// than 100 to fill 100 distinct slots.
#[test]
fn equivalence_deepens_bm25() {
    // Docs 0..60 are identical ("common word"); docs 60..160 are "common uN".
    // All have the same length and one "common", so for the query "common"
    // every score ties and the ranking is index order. The relevant doc 130
    // is at rank 131, but at distinct rank 72 once 1..60 merge into 0.
    let mut corpus: Vec<Doc> = (0..60).map(|i| doc(&format!("d{i}"), "", "common word")).collect();
    corpus.extend((60..160).map(|i| doc(&format!("d{i}"), "", &format!("common u{i}"))));
    let ds = Dataset {
        corpus,
        queries: vec![Query { id: "q".into(), text: "common".into() }],
        qrels: HashMap::from([("test".to_owned(), vec![qrel(0, 130, 1)])]),
        ..Dataset::default()
    };
    let eq: HashMap<u32, u32> = (1..60).map(|d| (d, 0)).collect();

    let plain = evaluate_baselines(&ds, "test", None).bm25;
    assert_eq!(plain.recall_at_100, 0.0);
    let merged = evaluate_baselines(&ds, "test", Some(&eq)).bm25;
    assert_eq!(merged.recall_at_100, 1.0);
    assert_eq!(merged.recall_at_10, 0.0);
}

#[test]
fn trec_files_round_trip() {
    let ds = recipes();
    let index = Bm25Index::build(&ds.corpus, Bm25Config::default());
    let run: Vec<(u32, Vec<(u32, f32)>)> =
        (0..ds.queries.len() as u32).map(|q| (q, index.search(&ds.queries[q as usize].text, 10))).collect();

    let dir = tempfile::tempdir().unwrap();
    let run_path = dir.path().join("bm25.run");
    write_run(&run_path, &ds, &run, "bm25").unwrap();
    let lines = read_run(&run_path).unwrap();

    let expected: Vec<(String, String, u32, f32)> = run
        .iter()
        .flat_map(|(q, hits)| {
            let ds = &ds;
            hits.iter().enumerate().map(move |(r, &(d, s))| {
                (ds.queries[*q as usize].id.clone(), ds.corpus[d as usize].id.clone(), r as u32 + 1, s)
            })
        })
        .collect();
    let got: Vec<(String, String, u32, f32)> =
        lines.iter().map(|l| (l.query_id.clone(), l.doc_id.clone(), l.rank, l.score)).collect();
    assert_eq!(got, expected);
    assert!(lines.iter().all(|l| l.tag == "bm25"));
    assert_eq!(lines[0].query_id, "q0");
    assert_eq!((lines[0].doc_id.as_str(), lines[1].doc_id.as_str()), ("d0", "d3"));

    let qrels_path = dir.path().join("test.qrels");
    write_qrels(&qrels_path, &ds, &ds.qrels["test"]).unwrap();
    assert_eq!(std::fs::read_to_string(&qrels_path).unwrap(), "q0 0 d3 1\nq1 0 d1 2\nq2 0 d4 1\nq2 0 d0 0\n");
}
