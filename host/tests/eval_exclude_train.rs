//! `--exclude-train` on a planted user-item dataset whose right answers are
//! known: each user has watched three items (train) and will watch one more
//! (test). A recommender that puts the watched items first is perfect once
//! they are excluded, and has Recall@1 0 (and Recall@10 1) without.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;
use std::process::Command;

use negcache_host::data::{beir, Dataset, Doc, Qrel, Query};

const USERS: u32 = 30;
const ITEMS: u32 = 50;

/// User u watched items 3u, 3u+1, 3u+2 (mod ITEMS); the next is 3u+3.
fn planted(dir: &Path) -> Dataset {
    let mut ds = Dataset::default();
    for i in 0..ITEMS {
        ds.corpus.push(Doc { id: format!("item{i}"), title: String::new(), text: format!("genre{} film", i % 5) });
        ds.doc_index.insert(format!("item{i}"), i);
    }
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for u in 0..USERS {
        ds.queries.push(Query { id: format!("user{u}"), text: format!("genre{} fan", u % 5) });
        ds.query_index.insert(format!("user{u}"), u);
        for k in 0..3 {
            train.push(Qrel { query: u, doc: (3 * u + k) % ITEMS, score: 1 });
        }
        test.push(Qrel { query: u, doc: (3 * u + 3) % ITEMS, score: 1 });
    }
    ds.qrels.insert("train".into(), train);
    ds.qrels.insert("test".into(), test);
    beir::write(dir, &ds, false).unwrap();
    ds
}

fn negcache(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_negcache")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// The markdown row's five metrics.
fn row(out: &str) -> Vec<f64> {
    let line = out.lines().find(|l| l.starts_with("| ") && !l.starts_with("| run")).expect("a table row");
    line.split('|').skip(2).filter_map(|c| c.trim().parse().ok()).collect()
}

#[test]
fn watched_items_are_excluded_before_scoring() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    planted(&data);
    // The run: the three watched items score 3, 2, 1.5, the next one 1,
    // every other item 0.5.
    let run = dir.path().join("watched-first.run");
    let mut f = std::fs::File::create(&run).unwrap();
    for u in 0..USERS {
        let mut scored: Vec<(u32, f32)> = (0..ITEMS).map(|i| (i, 0.5)).collect();
        for (k, s) in [3.0, 2.0, 1.5, 1.0].iter().enumerate() {
            scored[((3 * u + k as u32) % ITEMS) as usize].1 = *s;
        }
        for (rank, (i, s)) in scored.iter().enumerate() {
            writeln!(f, "user{u} Q0 item{i} {} {s} planted", rank + 1).unwrap();
        }
    }
    drop(f);
    let (data_s, run_s) = (data.to_str().unwrap(), run.to_str().unwrap());

    let (code, out, err) = negcache(&["eval", "--run", run_s, "--data", data_s]);
    assert_eq!(code, 0, "{err}");
    // Without exclusion the held-out item is 4th: R@1 0, R@10 1, MRR 1/4,
    // NDCG 1/log2(5).
    let m = row(&out);
    assert_eq!(m.len(), 5, "{out}");
    assert!(m[0].abs() < 1e-4 && (m[1] - 1.0).abs() < 1e-4 && (m[3] - 0.25).abs() < 1e-4, "{out}");
    assert!((m[4] - 1.0 / 5f64.log2()).abs() < 1e-4, "{out}");

    let (code, out, err) = negcache(&["eval", "--run", run_s, "--data", data_s, "--exclude-train"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("training positives excluded"), "{out}");
    let m = row(&out);
    assert!(m.iter().all(|&x| (x - 1.0).abs() < 1e-4), "{out}");
}

#[test]
fn training_with_exclude_train_writes_runs_without_watched_items() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ds = planted(&data);
    let out_dir = dir.path().join("out");
    let (code, out, err) = negcache(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--steps",
        "30",
        "--cache-capacity",
        "64",
        "--eval-every",
        "0",
        "--exclude-train",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("training positives excluded"), "{out}");
    let run = dir.path().join("model.run");
    let ckpt = out_dir.join("checkpoint.ckpt");
    let (code, _, err) = negcache(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--trec",
        run.to_str().unwrap(),
        "--baseline-trec",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    // The checkpoint's setting applies: no run file ranks a watched item,
    // and each ranks every other item (50 − 3).
    for file in ["model.run", "bm25.run", "popularity.run"] {
        let lines = negcache_host::eval::read_run(&dir.path().join(file)).unwrap();
        for l in &lines {
            let u = ds.query_index[&l.query_id];
            let i = ds.doc_index[&l.doc_id];
            assert!(!ds.qrels["train"].iter().any(|j| j.query == u && j.doc == i), "{file}: {l:?}");
        }
        if file != "bm25.run" {
            assert_eq!(lines.len(), (USERS * (ITEMS - 3)) as usize, "{file}");
        }
    }
}
