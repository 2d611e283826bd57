//! Tests of the BEIR loader and writer on tiny hand-written datasets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write;
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::Compression;
use negcache_host::data::beir::{self, DataError};
use negcache_host::data::{Dataset, Doc, Qrel, Query};
use tempfile::TempDir;

const CORPUS: &str = concat!(
    r#"{"_id": "d1", "title": "First", "text": "alpha"}"#,
    "\n",
    r#"{"_id": "d2", "text": "beta", "metadata": {"url": "x"}}"#,
    "\n",
    r#"{"_id": 3, "title": null, "text": "gamma"}"#,
    "\n",
);
const QUERIES: &str = concat!(
    r#"{"_id": "q1", "text": "which is first?", "metadata": {}}"#,
    "\n",
    r#"{"_id": 2, "text": "and the rest?"}"#,
    "\n",
);
const TEST_QRELS: &str = "query-id\tcorpus-id\tscore\nq1\td1\t1\n2\td2\t1\n2\t3\t2\n";

fn put(dir: &Path, name: &str, content: &[u8]) {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("create the test file's directory");
    }
    fs::write(path, content).expect("write a test file");
}

fn gz(content: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(content).expect("compress in memory");
    enc.finish().expect("compress in memory")
}

/// A valid dataset directory with a test split.
fn valid_dir() -> TempDir {
    let dir = TempDir::new().expect("create a temporary directory");
    put(dir.path(), "corpus.jsonl", CORPUS.as_bytes());
    put(dir.path(), "queries.jsonl", QUERIES.as_bytes());
    put(dir.path(), "qrels/test.tsv", TEST_QRELS.as_bytes());
    dir
}

/// Loads the test split and returns the error message, failing if loading
/// succeeds.
fn load_err(dir: &Path) -> String {
    match beir::load(dir, &["test"]) {
        Ok(_) => panic!("loading {} should have failed", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "message {message:?} does not contain {part:?}");
    }
}

#[test]
fn loads_a_valid_dataset_with_lenient_fields() {
    let dir = valid_dir();
    let ds = beir::load(dir.path(), &["test"]).unwrap();
    assert_eq!(ds.corpus.len(), 3);
    assert_eq!(ds.corpus[0], Doc { id: "d1".into(), title: "First".into(), text: "alpha".into() });
    // A missing and a null title both read as empty.
    assert_eq!(ds.corpus[1].title, "");
    assert_eq!(ds.corpus[2].title, "");
    // A numeric _id is stored as its decimal text.
    assert_eq!(ds.corpus[2].id, "3");
    assert_eq!(ds.queries[1].id, "2");
    assert_eq!(ds.doc_index["3"], 2);
    assert_eq!(ds.query_index["q1"], 0);
    assert_eq!(
        ds.qrels["test"],
        vec![
            Qrel { query: 0, doc: 0, score: 1 },
            Qrel { query: 1, doc: 1, score: 1 },
            Qrel { query: 1, doc: 2, score: 2 },
        ]
    );
}

#[test]
fn qrels_without_header_load() {
    let dir = valid_dir();
    put(dir.path(), "qrels/test.tsv", b"q1\td1\t1\n2\t3\t0");
    let ds = beir::load(dir.path(), &["test"]).unwrap();
    assert_eq!(ds.qrels["test"].len(), 2);
    assert_eq!(ds.qrels["test"][1].score, 0);
}

#[test]
fn crlf_blank_lines_and_no_final_newline_are_accepted() {
    let dir = valid_dir();
    let corpus = CORPUS.replace('\n', "\r\n") + "\r\n\r\n";
    put(dir.path(), "corpus.jsonl", corpus.as_bytes());
    put(
        dir.path(),
        "queries.jsonl",
        QUERIES.trim_end().as_bytes(), // no trailing newline
    );
    put(dir.path(), "qrels/test.tsv", b"query-id\tcorpus-id\tscore\r\n\r\nq1\td1\t1\r\n");
    let ds = beir::load(dir.path(), &["test"]).unwrap();
    assert_eq!(ds.corpus.len(), 3);
    assert_eq!(ds.corpus[2].text, "gamma");
    assert_eq!(ds.queries.len(), 2);
    assert_eq!(ds.qrels["test"].len(), 1);
}

#[test]
fn byte_order_mark_is_ignored() {
    let dir = valid_dir();
    put(dir.path(), "corpus.jsonl", format!("\u{feff}{CORPUS}").as_bytes());
    put(dir.path(), "qrels/test.tsv", format!("\u{feff}{TEST_QRELS}").as_bytes());
    let ds = beir::load(dir.path(), &["test"]).unwrap();
    assert_eq!(ds.corpus[0].id, "d1");
    assert_eq!(ds.qrels["test"].len(), 3);
}

#[test]
fn header_only_qrels_is_an_empty_split() {
    let dir = valid_dir();
    put(dir.path(), "qrels/test.tsv", b"query-id\tcorpus-id\tscore\n");
    let ds = beir::load(dir.path(), &["test"]).unwrap();
    assert!(ds.qrels["test"].is_empty());
}

#[test]
fn gzip_and_plain_files_mix() {
    let dir = TempDir::new().unwrap();
    put(dir.path(), "corpus.jsonl.gz", &gz(CORPUS.as_bytes()));
    put(dir.path(), "queries.jsonl", QUERIES.as_bytes());
    put(dir.path(), "qrels/test.tsv.gz", &gz(TEST_QRELS.as_bytes()));
    let ds = beir::load(dir.path(), &["test"]).unwrap();
    assert_eq!(ds.corpus.len(), 3);
    assert_eq!(ds.qrels["test"].len(), 3);
}

#[test]
fn concatenated_gzip_members_are_read_in_full() {
    let dir = valid_dir();
    fs::remove_file(dir.path().join("corpus.jsonl")).unwrap();
    let (head, tail) = CORPUS.split_at(CORPUS.find("{\"_id\": 3").unwrap());
    let mut both = gz(head.as_bytes());
    both.extend(gz(tail.as_bytes()));
    put(dir.path(), "corpus.jsonl.gz", &both);
    let ds = beir::load(dir.path(), &["test"]).unwrap();
    assert_eq!(ds.corpus.len(), 3);
}

#[test]
fn plain_file_is_preferred_when_both_exist() {
    let dir = valid_dir();
    let other = r#"{"_id": "d1", "text": "from gz"}"#;
    put(dir.path(), "corpus.jsonl.gz", &gz(other.as_bytes()));
    let ds = beir::load(dir.path(), &["test"]).unwrap();
    assert_eq!(ds.corpus.len(), 3);
}

#[test]
fn missing_directory() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("nope");
    let message = load_err(&missing);
    assert_contains(&message, &["nope", "does not exist"]);
}

#[test]
fn missing_corpus_file() {
    let dir = valid_dir();
    fs::remove_file(dir.path().join("corpus.jsonl")).unwrap();
    let message = load_err(dir.path());
    assert_contains(&message, &["corpus.jsonl", "corpus.jsonl.gz", "neither"]);
}

#[test]
fn missing_split_file() {
    let dir = valid_dir();
    let err = beir::load(dir.path(), &["test", "dev"]).unwrap_err();
    assert!(matches!(err, DataError::MissingFile { .. }));
    assert_contains(&err.to_string(), &["qrels", "dev.tsv", "dev.tsv.gz"]);
}

#[test]
fn duplicate_corpus_id_names_both_lines() {
    let dir = valid_dir();
    let corpus = format!("{CORPUS}\n{}\n", r#"{"_id": "d2", "text": "again"}"#);
    put(dir.path(), "corpus.jsonl", corpus.as_bytes());
    let message = load_err(dir.path());
    // Line 4 is blank; the repeat is on line 5.
    assert_contains(&message, &["corpus.jsonl", "line 5", "duplicate _id \"d2\"", "line 2"]);
}

#[test]
fn duplicate_query_id_counts_numbers_and_strings_alike() {
    let dir = valid_dir();
    let queries = format!("{QUERIES}{}\n", r#"{"_id": "2", "text": "dup"}"#);
    put(dir.path(), "queries.jsonl", queries.as_bytes());
    let message = load_err(dir.path());
    assert_contains(&message, &["queries.jsonl", "line 3", "duplicate _id \"2\"", "first defined on line 2"]);
}

#[test]
fn qrel_with_unknown_query_id() {
    let dir = valid_dir();
    put(dir.path(), "qrels/test.tsv", b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq9\td1\t1\n");
    let message = load_err(dir.path());
    assert_contains(&message, &["test.tsv", "line 3", "unknown query id \"q9\"", "queries.jsonl"]);
}

#[test]
fn qrel_with_unknown_corpus_id() {
    let dir = valid_dir();
    put(dir.path(), "qrels/test.tsv", b"q1\td7\t1\n");
    let message = load_err(dir.path());
    assert_contains(&message, &["test.tsv", "line 1", "unknown corpus id \"d7\"", "corpus.jsonl"]);
}

#[test]
fn empty_corpus_file() {
    let dir = valid_dir();
    put(dir.path(), "corpus.jsonl", b"");
    let message = load_err(dir.path());
    assert_contains(&message, &["corpus.jsonl", "empty"]);
}

#[test]
fn corpus_of_blank_lines_is_empty() {
    let dir = valid_dir();
    put(dir.path(), "queries.jsonl", b"\n\n  \n");
    let message = load_err(dir.path());
    assert_contains(&message, &["queries.jsonl", "empty"]);
}

#[test]
fn empty_qrels_file() {
    let dir = valid_dir();
    put(dir.path(), "qrels/test.tsv", b"");
    let message = load_err(dir.path());
    assert_contains(&message, &["test.tsv", "empty"]);
}

#[test]
fn invalid_utf8() {
    let dir = valid_dir();
    let mut corpus = CORPUS.as_bytes().to_vec();
    corpus.extend_from_slice(b"{\"_id\": \"d4\", \"text\": \"caf\xe9\"}\n");
    put(dir.path(), "corpus.jsonl", &corpus);
    let message = load_err(dir.path());
    assert_contains(&message, &["corpus.jsonl", "line 4", "invalid UTF-8", "byte 27"]);
}

#[test]
fn invalid_json_quotes_serde() {
    let dir = valid_dir();
    let queries = format!("{QUERIES}{{\"_id\": \"q3\", \"text\": }}\n");
    put(dir.path(), "queries.jsonl", queries.as_bytes());
    let message = load_err(dir.path());
    assert_contains(&message, &["queries.jsonl", "line 3", "invalid JSON", "expected value"]);
    // serde's own "line 1" would contradict the file's line number.
    assert!(!message.contains("line 1 "), "{message}");
}

#[test]
fn missing_required_field() {
    let dir = valid_dir();
    put(dir.path(), "corpus.jsonl", b"{\"_id\": \"d1\", \"title\": \"t\"}\n");
    let message = load_err(dir.path());
    assert_contains(&message, &["corpus.jsonl", "line 1", "missing field `text`"]);

    put(dir.path(), "corpus.jsonl", b"{\"text\": \"no id\"}\n");
    let message = load_err(dir.path());
    assert_contains(&message, &["corpus.jsonl", "line 1", "missing field `_id`"]);
}

#[test]
fn wrongly_typed_id() {
    let dir = valid_dir();
    put(dir.path(), "corpus.jsonl", b"{\"_id\": true, \"text\": \"x\"}\n");
    let message = load_err(dir.path());
    assert_contains(&message, &["corpus.jsonl", "line 1", "expected a string or a number"]);
}

#[test]
fn non_integer_score() {
    let dir = valid_dir();
    put(dir.path(), "qrels/test.tsv", b"query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0.5\n");
    let message = load_err(dir.path());
    assert_contains(&message, &["test.tsv", "line 3", "score \"0.5\" is not an integer"]);
}

#[test]
fn wrong_field_count() {
    let dir = valid_dir();
    put(dir.path(), "qrels/test.tsv", b"q1\td1\t1\nq1\td2\n");
    let message = load_err(dir.path());
    assert_contains(&message, &["test.tsv", "line 2", "expected 3", "found 2"]);
}

#[test]
fn line_longer_than_16_mib() {
    let dir = valid_dir();
    let mut corpus = CORPUS.as_bytes().to_vec();
    corpus.extend_from_slice(b"{\"_id\": \"big\", \"text\": \"");
    corpus.resize(corpus.len() + 17 * 1024 * 1024, b'a');
    corpus.extend_from_slice(b"\"}\n");
    put(dir.path(), "corpus.jsonl", &corpus);
    let message = load_err(dir.path());
    assert_contains(&message, &["corpus.jsonl", "line 4 is longer than 16 MiB"]);
}

#[test]
fn corrupt_gzip() {
    let dir = valid_dir();
    fs::remove_file(dir.path().join("corpus.jsonl")).unwrap();
    let mut data = gz(CORPUS.as_bytes());
    // Keep the magic bytes and header, scramble the deflate stream.
    for byte in data.iter_mut().skip(12).take(20) {
        *byte ^= 0x5a;
    }
    put(dir.path(), "corpus.jsonl.gz", &data);
    let message = load_err(dir.path());
    assert_contains(&message, &["corpus.jsonl.gz", "read failed while reading line 1"]);
}

#[test]
fn truncated_gzip() {
    let dir = valid_dir();
    fs::remove_file(dir.path().join("queries.jsonl")).unwrap();
    let data = gz(QUERIES.repeat(50).as_bytes());
    put(dir.path(), "queries.jsonl.gz", &data[..data.len() / 2]);
    let message = load_err(dir.path());
    assert_contains(&message, &["queries.jsonl.gz", "read failed"]);
}

fn sample_dataset() -> Dataset {
    let corpus = vec![
        Doc { id: "n:1".into(), title: "".into(), text: "entity (noun)".into() },
        Doc { id: "42".into(), title: "Ünïcode \"quoted\"".into(), text: "line\nbreak and\ttab".into() },
    ];
    let queries =
        vec![Query { id: "q:a".into(), text: "what is it?".into() }, Query { id: "7".into(), text: "".into() }];
    let mut ds = Dataset {
        doc_index: corpus.iter().enumerate().map(|(i, d)| (d.id.clone(), i as u32)).collect(),
        query_index: queries.iter().enumerate().map(|(i, q)| (q.id.clone(), i as u32)).collect(),
        corpus,
        queries,
        ..Dataset::default()
    };
    ds.qrels.insert("train".into(), vec![Qrel { query: 0, doc: 0, score: 1 }]);
    ds.qrels.insert("test".into(), vec![Qrel { query: 1, doc: 1, score: 2 }, Qrel { query: 1, doc: 0, score: -1 }]);
    ds
}

fn assert_same(a: &Dataset, b: &Dataset) {
    assert_eq!(a.corpus, b.corpus);
    assert_eq!(a.queries, b.queries);
    assert_eq!(a.doc_index, b.doc_index);
    assert_eq!(a.query_index, b.query_index);
    assert_eq!(a.qrels, b.qrels);
}

#[test]
fn round_trip_plain_and_gzip() {
    let ds = sample_dataset();
    for gzip in [false, true] {
        let dir = TempDir::new().unwrap();
        let out = dir.path().join("ds");
        beir::write(&out, &ds, gzip).unwrap();
        let suffix = if gzip { ".gz" } else { "" };
        for name in ["corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"] {
            assert!(out.join(format!("{name}{suffix}")).is_file(), "{name}{suffix}");
        }
        let back = beir::load(&out, &["train", "test"]).unwrap();
        assert_same(&ds, &back);
        // No temporary files are left behind.
        for sub in [out.clone(), out.join("qrels")] {
            for entry in fs::read_dir(sub).unwrap() {
                let name = entry.unwrap().file_name();
                assert!(!name.to_string_lossy().ends_with(".tmp"), "{name:?}");
            }
        }
    }
}

#[test]
fn writing_replaces_the_other_compression() {
    let ds = sample_dataset();
    let dir = TempDir::new().unwrap();
    beir::write(dir.path(), &ds, false).unwrap();
    let mut smaller = ds.clone();
    smaller.qrels.get_mut("test").unwrap().pop();
    beir::write(dir.path(), &smaller, true).unwrap();
    assert!(!dir.path().join("corpus.jsonl").exists());
    assert!(!dir.path().join("qrels/test.tsv").exists());
    let back = beir::load(dir.path(), &["test"]).unwrap();
    assert_eq!(back.qrels["test"].len(), 1);
}

#[test]
fn gzip_output_is_deterministic() {
    let ds = sample_dataset();
    let a = TempDir::new().unwrap();
    let b = TempDir::new().unwrap();
    beir::write(a.path(), &ds, true).unwrap();
    beir::write(b.path(), &ds, true).unwrap();
    for name in ["corpus.jsonl.gz", "queries.jsonl.gz", "qrels/test.tsv.gz"] {
        assert_eq!(fs::read(a.path().join(name)).unwrap(), fs::read(b.path().join(name)).unwrap());
    }
}

#[test]
fn write_refuses_what_would_not_load_back() {
    let dir = TempDir::new().unwrap();
    let out = dir.path().join("ds");

    let mut tab_id = sample_dataset();
    tab_id.queries[0].id = "a\tb".into();
    let message = beir::write(&out, &tab_id, false).unwrap_err().to_string();
    assert_contains(&message, &["train.tsv", "tab"]);

    let mut dangling = sample_dataset();
    dangling.qrels.get_mut("train").unwrap()[0].doc = 9;
    let message = beir::write(&out, &dangling, false).unwrap_err().to_string();
    assert_contains(&message, &["train.tsv", "document index 9"]);

    let mut duplicate = sample_dataset();
    duplicate.corpus[1].id = "n:1".into();
    let message = beir::write(&out, &duplicate, false).unwrap_err().to_string();
    assert_contains(&message, &["corpus.jsonl", "duplicate document id"]);

    let mut bad_split = sample_dataset();
    bad_split.qrels.insert("../escape".into(), Vec::new());
    let message = beir::write(&out, &bad_split, false).unwrap_err().to_string();
    assert_contains(&message, &["not a plain file name"]);

    // Nothing was written by any of the refused calls.
    assert!(!out.exists());
}
