//! The evaluation API end to end on a tiny in-memory dataset.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use approx::assert_relative_eq;
use negcache_host::data::{Dataset, Doc, Qrel, Query};
use negcache_host::eval::{
    evaluate, evaluate_baselines, popularity_ranking, read_run, write_qrels, write_run, Bm25Config, Bm25Index,
    Evaluator, Metrics, Protocol,
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

fn beir(ds: &Dataset, split: &str) -> Evaluator {
    Evaluator::new(ds, split, Protocol::BEIR).unwrap()
}

#[test]
fn baselines_on_recipes() {
    let ds = recipes();
    let b = evaluate_baselines(&ds, &beir(&ds, "test"), Bm25Config::default()).unwrap();

    // BM25: q0 matches d0 and d3 equally; trec_eval's order puts the larger
    // id first, so the relevant d3 is at rank 1. q1 finds d1 and q2 finds d4
    // at rank 1: every metric is 1.
    let ones = Metrics {
        queries: 3,
        recall_at_1: 1.0,
        recall_at_10: 1.0,
        recall_at_100: 1.0,
        mrr_at_10: 1.0,
        ndcg_at_10: 1.0,
    };
    assert_metrics(b.bm25, ones);

    // Popularity: d2 (2 train positives), d1 (1), then the zero counts by
    // decreasing id: d4, d3, d0.
    // q0 (d3) at rank 4: MRR 1/4, NDCG 1/log2(5);
    // q1 (d1, grade 2) at rank 2: MRR 1/2, NDCG (2/log2 3)/2 = 1/log2(3);
    // q2 (d4) at rank 3: MRR 1/3, NDCG 1/log2(4).
    assert_metrics(
        b.popularity,
        Metrics {
            queries: 3,
            recall_at_1: 0.0,
            recall_at_10: 1.0,
            recall_at_100: 1.0,
            mrr_at_10: (0.25 + 0.5 + 1.0 / 3.0) / 3.0,
            ndcg_at_10: (1.0 / l2(5.0) + 1.0 / l2(3.0) + 0.5) / 3.0,
        },
    );
}

#[test]
fn popularity_without_training_positives() {
    // exclude_train: q0 loses d1 (its train positive), q1 loses d2.
    // q0: d2, d4, d3, d0 → d3 at rank 3; q1: d1, d4, d3, d0 → d1 at rank 1;
    // q2 (no train positive): d2, d1, d4 → d4 at rank 3.
    let ds = recipes();
    let ev = Evaluator::new(&ds, "test", Protocol { exclude_train: true, ..Protocol::BEIR }).unwrap();
    let b = evaluate_baselines(&ds, &ev, Bm25Config::default()).unwrap();
    assert_metrics(
        b.popularity,
        Metrics {
            queries: 3,
            recall_at_1: 1.0 / 3.0,
            recall_at_10: 1.0,
            recall_at_100: 1.0,
            mrr_at_10: (1.0 / 3.0 + 1.0 + 1.0 / 3.0) / 3.0,
            ndcg_at_10: (0.5 + 1.0 + 0.5) / 3.0,
        },
    );
}

#[test]
fn baselines_with_identical_texts_merged() {
    let ds = recipes();
    let ev = Evaluator::new(&ds, "test", Protocol { merge_identical_text: true, ..Protocol::BEIR }).unwrap();
    let b = evaluate_baselines(&ds, &ev, Bm25Config::default()).unwrap();
    assert!(!ev.protocol().label().is_empty());

    // Popularity d2, d1, d4, d3, d0 becomes d2, d1, d4, d0 (d3 ≡ d0, first
    // seen as d3 at rank 4): q0 at rank 4, q1 at rank 2, q2 at rank 3, as
    // without merging, since d0 came after its twin.
    assert_relative_eq!(b.popularity.mrr_at_10, (0.25 + 0.5 + 1.0 / 3.0) / 3.0, epsilon = 1e-12);
    assert_relative_eq!(b.bm25.recall_at_1, 1.0, epsilon = 1e-12);
}

#[test]
fn missing_split_is_an_error() {
    assert!(Evaluator::new(&recipes(), "dev", Protocol::BEIR).is_err());
}

#[test]
fn popularity_and_bm25_building_blocks() {
    let ds = recipes();
    assert_eq!(popularity_ranking(&ds.qrels["train"], ds.corpus.len()), vec![2, 1, 0, 3, 4]);

    let index = Bm25Index::build(&ds.corpus, Bm25Config::default());
    let hits = index.search("APPLE", 10);
    assert_eq!(hits.iter().map(|h| h.0).collect::<Vec<_>>(), vec![0, 3]);
    assert_eq!(hits[0].1, hits[1].1);

    // A hand-made evaluation (trec_eval's tie order by hand: d3 before d0)
    // matches what the baseline helper reports.
    let ev = beir(&ds, "test");
    let by_bm25 = |q: u32| -> Vec<u32> {
        let mut hits = index.search(&ds.queries[q as usize].text, 100);
        hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(ds.corpus[b.0 as usize].id.cmp(&ds.corpus[a.0 as usize].id)));
        hits.into_iter().map(|(d, _)| d).collect()
    };
    let test = &ds.qrels["test"];
    assert_eq!(evaluate(test, by_bm25), evaluate_baselines(&ds, &ev, Bm25Config::default()).unwrap().bm25);
}

/// Merging identical texts counts a group of twins once, so a relevant
/// document behind many twins moves up; the evaluator then ranks deeper
/// than 100 so that 100 distinct documents are scored.
#[test]
fn merging_looks_deeper_than_100() {
    // d000..d059 read "common word", d060..d119 "common uN": for the query
    // "common" every score ties, so the order is by decreasing id: d119 ..
    // d060 (60 documents), then d059 .. d000. The relevant d000 is at rank
    // 120; merged, d059 .. d000 are one document at distinct rank 61.
    let mut corpus: Vec<Doc> = (0..60).map(|i| doc(&format!("d{i:03}"), "", "common word")).collect();
    corpus.extend((60..120).map(|i| doc(&format!("d{i:03}"), "", &format!("common u{i}"))));
    let ds = Dataset {
        corpus,
        queries: vec![Query { id: "q".into(), text: "common".into() }],
        qrels: HashMap::from([("test".to_owned(), vec![qrel(0, 0, 1)])]),
        ..Dataset::default()
    };
    let plain = evaluate_baselines(&ds, &beir(&ds, "test"), Bm25Config::default()).unwrap().bm25;
    assert_eq!(plain.recall_at_100, 0.0);
    let ev = Evaluator::new(&ds, "test", Protocol { merge_identical_text: true, ..Protocol::BEIR }).unwrap();
    let merged = evaluate_baselines(&ds, &ev, Bm25Config::default()).unwrap().bm25;
    assert_eq!(merged.recall_at_100, 1.0);
    assert_eq!(merged.recall_at_10, 0.0);
    assert_relative_eq!(merged.mrr_at_10, 0.0);
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
