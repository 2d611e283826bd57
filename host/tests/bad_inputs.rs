//! The `negcache` command under bad input: a corpus of malformed files and
//! settings, one case per failure mode the loaders, the checkpoint reader,
//! the resume rules, `verify`, `compare` and `bench` know.
//!
//! [`generate`] writes every case's inputs under one directory (beside a
//! small finished run whose outputs the cases aim at) and returns the
//! cases; [`every_bad_input_fails_cleanly_and_touches_nothing`] runs each
//! and asserts a non-zero exit, no panic, a message naming the file (and
//! line or setting), no message repeating itself, and, for every case but
//! those marked otherwise, a tree unchanged byte for byte (no output
//! written, truncated, replaced, or left behind as a temporary file).
//!
//! Set NEGCACHE_BAD_INPUTS_KEEP=DIR to generate the corpus into DIR and keep
//! it for inspection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use negcache_host::checkpoint::Checkpoint;
use negcache_host::data::beir;

mod common;

/// One bad input: the command, what its message must contain, and whether
/// the tree must be left as it was.
struct Case {
    name: &'static str,
    args: Vec<String>,
    expect: Vec<String>,
    /// Most cases must change nothing; a failure while writing the outputs
    /// of a run that did train (plots) necessarily has written some.
    unchanged: bool,
}

fn case(name: &'static str, args: &[&str], expect: &[&str]) -> Case {
    Case {
        name,
        args: args.iter().map(|s| (*s).to_owned()).collect(),
        expect: expect.iter().map(|s| (*s).to_owned()).collect(),
        unchanged: true,
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A plain-text copy of the tiny dataset: 40 documents (line k of
/// corpus.jsonl is document k-1), 120 queries, train and test qrels with a
/// header line.
fn plain_tiny(dir: &Path, tmp: &Path) {
    let gz = tmp.join("tiny-gz");
    if !gz.exists() {
        common::tiny_dataset(&gz);
    }
    let ds = beir::load(&gz, &["train", "test"]).unwrap();
    beir::write(dir, &ds, false).unwrap();
}

/// A copy of the plain tiny dataset at `root/name`, changed by `edit`.
fn bad_data(root: &Path, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = root.join(name);
    plain_tiny(&dir, root);
    edit(&dir);
    dir
}

/// Replaces line `n` (1-based) of `file`.
fn set_line(file: &Path, n: usize, line: &str) {
    let text = fs::read_to_string(file).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[n - 1] = line;
    fs::write(file, lines.join("\n") + "\n").unwrap();
}

fn negcache(cwd: &Path, args: &[String]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_negcache")).args(args).current_dir(cwd).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Every entry under `root`: regular files by size, modification and
/// change times, inode (a replaced file is a new inode) and, below 4 MB,
/// checksum; other entries by kind.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let t = meta.file_type();
            let what = if t.is_dir() {
                stack.push(path.clone());
                "dir".to_owned()
            } else if t.is_file() {
                let crc = if meta.len() < 4 << 20 { crc32fast::hash(&fs::read(&path).unwrap()) } else { 0 };
                #[cfg(unix)]
                let stamp = {
                    use std::os::unix::fs::MetadataExt;
                    (meta.ino(), meta.ctime(), meta.ctime_nsec())
                };
                #[cfg(not(unix))]
                let stamp = ();
                format!("file {} {:?} {stamp:?} {crc:08x}", meta.len(), meta.modified().ok())
            } else {
                format!("{t:?}")
            };
            out.insert(path.strip_prefix(root).unwrap().to_path_buf(), what);
        }
    }
    out
}

/// A reference file with one case.
fn reference_file(path: &Path, case: &str) {
    fs::write(path, format!("{{\"format\": \"negcache-reference-v1\", \"cases\": [{case}]}}")).unwrap();
}

/// Writes every case's inputs under `root` and returns the cases. `run` is
/// a finished 50-step run (batch 8, cache 64) whose directory the training
/// cases name as their output.
#[allow(clippy::too_many_lines)]
fn generate(root: &Path, run: &Path) -> Vec<Case> {
    let ck = run.join("checkpoint.ckpt");
    let good = root.join("good");
    plain_tiny(&good, root);
    let mut cases = Vec::new();
    // `train` into the finished run's directory; `extra` flags replace the
    // defaults of the same name.
    let train = |data: &Path, extra: &[&str]| -> Vec<String> {
        let base = [
            ("--data", s(data)),
            ("--out", s(run)),
            ("--steps", "60"),
            ("--batch", "8"),
            ("--cache-capacity", "64"),
            ("--eval-every", "0"),
        ];
        let overridden = |flag: &str| extra.iter().any(|e| *e == flag || e.starts_with(&format!("{flag}=")));
        let mut a = vec!["train".to_owned()];
        for (flag, value) in base.iter().filter(|(f, _)| !overridden(f)) {
            a.extend([(*flag).to_owned(), (*value).to_owned()]);
        }
        a.extend(extra.iter().map(|x| (*x).to_owned()));
        a
    };

    // Settings, all checked before any output is touched (issue 2).
    for (name, extra, expect) in [
        ("setting-inv-temp-nan", &["--inv-temp", "nan"][..], "inv_temp"),
        ("setting-inv-temp-inf", &["--inv-temp", "inf"], "inv_temp"),
        ("setting-inv-temp-negative", &["--inv-temp=-1"], "inv_temp"),
        ("setting-scale-nan", &["--scale", "nan"], "scale"),
        ("setting-scale-inf", &["--scale", "inf"], "scale"),
        ("setting-learned-scale-out-of-range", &["--learn-scale", "true", "--scale", "500"], "scale"),
        ("setting-clip-norm-negative", &["--clip-norm=-1"], "clip_norm"),
        ("setting-clip-norm-nan", &["--clip-norm", "nan"], "clip_norm"),
        ("setting-lr-nan", &["--lr", "nan"], "lr"),
        ("setting-lr-zero", &["--lr", "0"], "lr"),
        ("setting-cache-below-batch", &["--cache-capacity", "4"], "cache_capacity (4) must be at least the batch (8)"),
        ("setting-top-k-not-divisor", &["--top-k", "3"], "top_k"),
        ("setting-steps-zero", &["--steps", "0"], "steps"),
        ("setting-eval-split-path", &["--eval-split", "../../etc"], "eval_split"),
        ("setting-batch-too-large", &["--batch", "999"], "batch"),
        ("setting-negatives", &["--negatives", "3"], "negatives"),
        ("setting-char-ngrams", &["--char-ngrams", "9"], "char_ngrams"),
        ("setting-eval-depth", &["--eval-depth", "5"], "eval_depth"),
        ("setting-bm25-k1-nan", &["--bm25-k1", "nan"], "bm25_k1"),
        ("setting-sampled-negatives", &["--objective", "sampled", "--sampled-negatives", "0"], "sampled_negatives"),
        ("setting-refresh-per-step", &["--refresh-per-step", "100"], "refresh_per_step"),
    ] {
        cases.push(Case { name, args: train(&good, extra), expect: vec![expect.into()], unchanged: true });
    }
    let toml = |name: &str, text: &str| -> PathBuf {
        let p = root.join(name);
        fs::write(&p, text).unwrap();
        p
    };
    let p = toml("unknown-key.toml", "stepz = 3\n");
    cases.push(Case {
        name: "config-unknown-key",
        args: train(&good, &["--config", s(&p)]),
        expect: vec!["unknown-key.toml".into(), "stepz".into()],
        unchanged: true,
    });
    let p = toml("invalid.toml", "steps = \n");
    cases.push(Case {
        name: "config-invalid-toml",
        args: train(&good, &["--config", s(&p)]),
        expect: vec!["invalid.toml".into(), "line 1".into()],
        unchanged: true,
    });
    let p = toml("nan.toml", "inv_temp = nan\n");
    cases.push(Case {
        name: "config-nan-setting",
        args: train(&good, &["--config", s(&p)]),
        expect: vec!["inv_temp".into()],
        unchanged: true,
    });

    // Datasets: every kind of file the loader refuses, with file and line
    // (issue 10 among them).
    let corpus = |d: &Path| d.join("corpus.jsonl");
    let queries = |d: &Path| d.join("queries.jsonl");
    let train_qrels = |d: &Path| d.join("qrels/train.tsv");
    let test_qrels = |d: &Path| d.join("qrels/test.tsv");
    let mut data_case = |name: &'static str, edit: &dyn Fn(&Path), expect: &[&str]| {
        let d = bad_data(root, name, edit);
        cases.push(Case {
            name,
            args: train(&d, &[]),
            expect: expect.iter().map(|x| (*x).into()).collect(),
            unchanged: true,
        });
    };
    data_case("data-missing-corpus", &|d| fs::remove_file(corpus(d)).unwrap(), &["corpus.jsonl", "neither"]);
    data_case(
        "data-corpus-is-a-directory",
        &|d| {
            fs::remove_file(corpus(d)).unwrap();
            fs::create_dir(corpus(d)).unwrap();
        },
        &["corpus.jsonl", "a directory"],
    );
    #[cfg(unix)]
    data_case(
        "data-corpus-is-dev-zero",
        &|d| {
            fs::remove_file(corpus(d)).unwrap();
            std::os::unix::fs::symlink("/dev/zero", corpus(d)).unwrap();
        },
        &["corpus.jsonl", "a device"],
    );
    if Command::new("mkfifo").arg("--version").output().is_ok() {
        data_case(
            "data-corpus-is-a-fifo",
            &|d| {
                fs::remove_file(corpus(d)).unwrap();
                assert!(Command::new("mkfifo").arg(corpus(d)).status().unwrap().success());
            },
            &["corpus.jsonl", "a FIFO"],
        );
    }
    data_case(
        "data-corpus-gzip-truncated",
        &|d| {
            let text = fs::read(corpus(d)).unwrap();
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            std::io::Write::write_all(&mut enc, &text).unwrap();
            let gz = enc.finish().unwrap();
            fs::remove_file(corpus(d)).unwrap();
            fs::write(d.join("corpus.jsonl.gz"), &gz[..gz.len() / 2]).unwrap();
        },
        &["corpus.jsonl.gz", "line"],
    );
    data_case(
        "data-corpus-line-too-long",
        &|d| fs::write(corpus(d), "x".repeat(beir::MAX_LINE_BYTES + 10)).unwrap(),
        &["corpus.jsonl", "line 1", "16 MiB"],
    );
    data_case(
        "data-corpus-invalid-utf8",
        &|d| {
            let mut b = fs::read(corpus(d)).unwrap();
            let third = b.iter().enumerate().filter(|(_, &c)| c == b'\n').nth(1).unwrap().0 + 12;
            b[third] = 0xff;
            fs::write(corpus(d), b).unwrap();
        },
        &["corpus.jsonl: line 3", "UTF-8"],
    );
    data_case(
        "data-corpus-invalid-json",
        &|d| set_line(&corpus(d), 2, r#"{"_id": "d1", "#),
        &["corpus.jsonl: line 2", "JSON"],
    );
    data_case(
        "data-corpus-record-without-text",
        &|d| set_line(&corpus(d), 2, r#"{"_id": "d1"}"#),
        &["corpus.jsonl: line 2", "text"],
    );
    data_case(
        "data-query-is-a-json-array",
        &|d| set_line(&queries(d), 5, r#"["q4", "a red thing"]"#),
        &["queries.jsonl: line 5", "array"],
    );
    data_case(
        "data-corpus-id-too-large-for-a-number",
        &|d| set_line(&corpus(d), 3, r#"{"_id": 123456789012345678901234567890, "text": "red cat"}"#),
        &["corpus.jsonl: line 3", "too large"],
    );
    data_case(
        "data-corpus-empty-id",
        &|d| set_line(&corpus(d), 4, r#"{"_id": "", "text": "red cat"}"#),
        &["corpus.jsonl: line 4", "empty"],
    );
    data_case(
        "data-query-id-with-a-tab",
        &|d| set_line(&queries(d), 2, r#"{"_id": "q\tone", "text": "red"}"#),
        &["queries.jsonl: line 2", "tab"],
    );
    data_case(
        "data-corpus-duplicate-id",
        &|d| set_line(&corpus(d), 3, r#"{"_id": "d0", "text": "red cat"}"#),
        &["corpus.jsonl: line 3", "duplicate"],
    );
    data_case("data-corpus-empty-file", &|d| fs::write(corpus(d), "").unwrap(), &["corpus.jsonl", "empty"]);
    data_case(
        "data-qrels-two-fields",
        &|d| set_line(&train_qrels(d), 2, "q0\td0"),
        &["train.tsv: line 2", "3 tab-separated"],
    );
    data_case(
        "data-qrels-bad-score",
        &|d| set_line(&train_qrels(d), 3, "q1\td1\tyes"),
        &["train.tsv: line 3", "score"],
    );
    data_case(
        "data-qrels-unknown-query",
        &|d| set_line(&train_qrels(d), 4, "q999\td1\t1"),
        &["train.tsv: line 4", "unknown query id"],
    );
    data_case(
        "data-qrels-unknown-corpus-id",
        &|d| set_line(&test_qrels(d), 2, "q100\td999\t1"),
        &["test.tsv: line 2", "unknown corpus id"],
    );
    data_case("data-qrels-empty-file", &|d| fs::write(test_qrels(d), "").unwrap(), &["test.tsv", "empty"]);
    data_case("data-qrels-missing", &|d| fs::remove_file(test_qrels(d)).unwrap(), &["test.tsv", "neither"]);
    data_case(
        "data-no-training-positive",
        &|d| {
            let t = fs::read_to_string(train_qrels(d)).unwrap().replace("\t1\n", "\t0\n");
            fs::write(train_qrels(d), t).unwrap();
        },
        &["train.tsv", "no positive"],
    );
    data_case(
        "data-no-test-query",
        &|d| fs::write(test_qrels(d), "query-id\tcorpus-id\tscore\n").unwrap(),
        &["test.tsv", "nothing to evaluate"],
    );
    data_case(
        "data-every-text-empty",
        &|d| {
            let lines: Vec<String> = (0..40).map(|i| format!(r#"{{"_id": "d{i}", "text": ""}}"#)).collect();
            fs::write(corpus(d), lines.join("\n") + "\n").unwrap();
        },
        &["corpus.jsonl", "empty text"],
    );
    let not_dir = root.join("a-file");
    fs::write(&not_dir, "x").unwrap();
    cases.push(Case {
        name: "data-path-is-a-file",
        args: train(&not_dir, &[]),
        expect: vec!["a-file".into(), "not a directory".into()],
        unchanged: true,
    });
    cases.push(Case {
        name: "data-missing-directory",
        args: train(&root.join("no-such-data"), &[]),
        expect: vec!["no-such-data".into(), "does not exist".into()],
        unchanged: true,
    });
    // `eval --trec` with an id a run file cannot hold: refused when loading,
    // not after the evaluation.
    let tab = root.join("data-query-id-with-a-tab");
    let trec = root.join("tab.run");
    cases.push(case(
        "eval-trec-with-a-tab-in-an-id",
        &["eval", "--checkpoint", s(&ck), "--data", s(&tab), "--trec", s(&trec)],
        &["queries.jsonl: line 2", "tab"],
    ));
    // Evaluating a split without a judged query.
    let empty_test = root.join("data-no-test-query");
    cases.push(case(
        "eval-split-without-judged-queries",
        &["eval", "--checkpoint", s(&ck), "--data", s(&empty_test)],
        &["test.tsv", "nothing to evaluate"],
    ));

    // Checkpoints: unreadable, damaged, and well-formed but impossible.
    let good_ck = Checkpoint::load(&ck).unwrap();
    let bytes = fs::read(&ck).unwrap();
    let ckdir = root.join("checkpoints");
    fs::create_dir_all(&ckdir).unwrap();
    let mut ck_case = |name: &'static str, file: &str, content: Option<Vec<u8>>, expect: &str| {
        let p = ckdir.join(file);
        if let Some(c) = content {
            fs::write(&p, c).unwrap();
        }
        cases.push(Case {
            name,
            args: vec!["train".into(), "--resume".into(), s(&p).into(), "--steps".into(), "60".into()],
            expect: vec![file.into(), expect.into()],
            unchanged: true,
        });
    };
    ck_case("checkpoint-missing", "missing.ckpt", None, "cannot read");
    ck_case("checkpoint-not-a-checkpoint", "text.ckpt", Some(b"hello".to_vec()), "not a negcache checkpoint");
    ck_case("checkpoint-truncated", "truncated.ckpt", Some(bytes[..bytes.len() / 2].to_vec()), "truncated");
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x10;
    ck_case("checkpoint-corrupted", "flipped.ckpt", Some(flipped), "checksum mismatch");
    let mut version = bytes.clone();
    version[16] = 7;
    ck_case("checkpoint-other-version", "version.ckpt", Some(version), "version 7");
    let edited = |edit: &dyn Fn(&mut Checkpoint)| -> Vec<u8> {
        let mut c = good_ck.clone();
        edit(&mut c);
        c.to_bytes().unwrap()
    };
    ck_case(
        "checkpoint-valid-crc-cache-0",
        "cache0.ckpt",
        Some(edited(&|c| c.header["config"]["cache_capacity"] = 0.into())),
        "cache_capacity",
    );
    ck_case(
        "checkpoint-valid-crc-nan-weights",
        "nan.ckpt",
        // The body opens with the tag "PARM", a u64 length, then the first
        // tensor's values.
        Some(edited(&|c| c.body[12..16].copy_from_slice(&f32::NAN.to_le_bytes()))),
        "NaN",
    );
    ck_case(
        "checkpoint-short-body",
        "short.ckpt",
        Some(edited(&|c| c.body.truncate(c.body.len() / 2))),
        "cannot restore",
    );
    ck_case(
        "checkpoint-unknown-setting",
        "setting.ckpt",
        Some(edited(&|c| c.header["config"]["warp_speed"] = 9.into())),
        "does not fit",
    );
    ck_case("checkpoint-other-shape", "shape.ckpt", Some(edited(&|c| c.header["shape"]["dim"] = 32.into())), "shape");
    ck_case(
        "checkpoint-malformed-progress",
        "progress.ckpt",
        Some(edited(&|c| c.header["progress"]["train_seconds"] = (-1.0).into())),
        "progress",
    );
    let nan_ck = ckdir.join("nan.ckpt");
    cases.push(case("eval-checkpoint-with-nan-weights", &["eval", "--checkpoint", s(&nan_ck)], &["nan.ckpt", "NaN"]));

    // Resuming (issues 3, 7, 11).
    let resume = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = vec!["train".into(), "--resume".into(), s(&ck).into()];
        a.extend(extra.iter().map(|x| (*x).to_owned()));
        a
    };
    cases.push(Case {
        name: "resume-with-settings-that-cannot-change",
        args: resume(&["--lr", "5", "--batch", "16", "--seed", "3", "--objective", "full", "--steps", "60"]),
        expect: ["checkpoint.ckpt", "--lr 5", "--batch 16", "--seed 3", "--objective full"].map(String::from).to_vec(),
        unchanged: true,
    });
    cases.push(Case {
        name: "resume-to-fewer-steps",
        args: resume(&["--steps", "30"]),
        expect: ["checkpoint.ckpt", "--steps 30", "step 50"].map(String::from).to_vec(),
        unchanged: true,
    });
    let p = toml("resume-lr.toml", "lr = 5.0\nsteps = 60\n");
    cases.push(Case {
        name: "resume-with-a-config-that-changes-lr",
        args: resume(&["--config", s(&p)]),
        expect: vec!["--lr 5".into()],
        unchanged: true,
    });
    for (name, content, expect) in [
        ("resume-metrics-header-without-step", "this,is\n1,2\n", "line 1"),
        ("resume-metrics-bad-row", "step,wall_s,training_loss\n100,1.0,2.0\nnot,a,row\n200,2.0,1.0\n", "line 3"),
    ] {
        let dir = root.join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::copy(&ck, dir.join("checkpoint.ckpt")).unwrap();
        fs::write(dir.join("metrics.csv"), content).unwrap();
        cases.push(Case {
            name,
            args: vec![
                "train".into(),
                "--resume".into(),
                s(&dir.join("checkpoint.ckpt")).into(),
                "--steps".into(),
                "60".into(),
            ],
            expect: vec![s(&dir.join("metrics.csv")).into(), expect.into()],
            unchanged: true,
        });
    }

    // verify (issues 5 and 6).
    let vdir = root.join("verify");
    fs::create_dir_all(&vdir).unwrap();
    let ok_ref = vdir.join("ok.json");
    reference_file(
        &ok_ref,
        r#"{"name": "ok", "kind": "in_cache_filter", "inputs": {"cache_items": [[1]], "new_items": [[2]]}, "expected": {"keep": [true]}}"#,
    );
    let mut verify_case =
        |name: &'static str, reference: Option<&str>, expected: Option<(&str, &str)>, expect: &[&str]| {
            let mut args = vec!["verify".to_owned(), "--reference".into()];
            match reference {
                Some(body) => {
                    let p = vdir.join(format!("{name}.json"));
                    fs::write(&p, body).unwrap();
                    args.push(s(&p).into());
                }
                None => args.push(s(&ok_ref).into()),
            }
            args.push("--expected".into());
            match expected {
                Some((file, body)) => {
                    let p = vdir.join(file);
                    if !body.is_empty() {
                        fs::write(&p, body).unwrap();
                    }
                    args.push(s(&p).into());
                }
                None => args.push("none".into()),
            }
            cases.push(Case { name, args, expect: expect.iter().map(|x| (*x).into()).collect(), unchanged: true });
        };
    verify_case("verify-missing-expected-file", None, Some(("missing.json", "")), &["missing.json"]);
    verify_case(
        "verify-expected-format-misspelled",
        None,
        Some(("misspelled.json", r#"{"format": "negcache-convergance-v1", "runs": []}"#)),
        &["misspelled.json", "negcache-convergance-v1"],
    );
    verify_case(
        "verify-convergence-without-runs",
        None,
        Some(("no-runs.json", r#"{"format": "negcache-convergence-v1", "runs": []}"#)),
        &["no-runs.json", "runs"],
    );
    let conv = |bands: &str| {
        format!(
            r#"{{"format": "negcache-convergence-v1", "runs": [{{"name": "r1", "config": {{"data": "../good", "steps": 1}}, "bands": {bands}, "command": "x"}}]}}"#
        )
    };
    verify_case(
        "verify-convergence-empty-bands",
        None,
        Some(("no-bands.json", &conv("{}"))),
        &["no-bands.json", "r1", "bands"],
    );
    verify_case(
        "verify-convergence-unknown-metric",
        None,
        Some(("metric.json", &conv(r#"{"recal_at_10": {"min": 0, "max": 1}}"#))),
        &["metric.json", "r1", "bands.recal_at_10"],
    );
    verify_case(
        "verify-reference-format-misspelled",
        Some(r#"{"format": "negcache-referense-v1", "cases": []}"#),
        None,
        &["verify-reference-format-misspelled.json", "format"],
    );
    verify_case(
        "verify-reference-not-json",
        Some("[1, 2"),
        None,
        &["verify-reference-not-json.json", "not valid JSON"],
    );
    verify_case(
        "verify-reference-without-cases",
        Some(r#"{"format": "negcache-reference-v1", "cases": []}"#),
        None,
        &["verify-reference-without-cases.json", "cases"],
    );
    let one = |c: &str| format!(r#"{{"format": "negcache-reference-v1", "cases": [{c}]}}"#);
    let softmax = |expected: &str| {
        one(&format!(
            r#"{{"name": "s1", "kind": "softmax_loss", "inputs": {{"method": "in_batch", "query": [[1, 0]], "positive": [[0, 1]]}}, "expected": {expected}}}"#
        ))
    };
    verify_case(
        "verify-softmax-empty-expectation",
        Some(&softmax("{}")),
        None,
        &["verify-softmax-empty-expectation.json", "s1", "expected"],
    );
    verify_case(
        "verify-softmax-misspelled-fields",
        Some(&softmax(r#"{"los": [1.0], "mean_los": 1.0}"#)),
        None,
        &["verify-softmax-misspelled-fields.json", "s1", "expected.los", "expected.mean_los"],
    );
    verify_case(
        "verify-cache-update-empty-states",
        Some(&one(
            r#"{"name": "u1", "kind": "cache_update", "inputs": {"cache_size": 2, "use_lru": false, "steps": [{"new_embeddings": [[1, 0]], "new_items": [[1]]}, {"new_embeddings": [[0, 1]], "new_items": [[2]]}]}, "expected": {"states": [{}, {}]}}"#,
        )),
        None,
        &["verify-cache-update-empty-states.json", "u1", "expected.states[0]"],
    );
    verify_case(
        "verify-unknown-field",
        Some(&one(
            r#"{"name": "f1", "kind": "in_cache_filter", "inputs": {"cache_items": [[1]], "new_items": [[2]]}, "expected": {"keep": [true], "kept": [false]}}"#,
        )),
        None,
        &["verify-unknown-field.json", "f1", "expected.kept"],
    );
    verify_case(
        "verify-cache-size-1e12",
        Some(&one(
            r#"{"name": "big", "kind": "cache_update", "inputs": {"cache_size": 1000000000000, "use_lru": false, "steps": [{"new_embeddings": [[1, 0]], "new_items": [[1]]}]}, "expected": {"states": [{"age": [0]}]}}"#,
        )),
        None,
        &["verify-cache-size-1e12.json", "big", "inputs.cache_size"],
    );

    // compare and bench (issue 12).
    for (name, entry) in [
        ("compare-run-name-escapes", "[[run]]\nname = \"../../escape\"\n"),
        ("compare-group-escapes", "[[run]]\nname = \"ok\"\ngroup = \"../up\"\n"),
    ] {
        let p = root.join(format!("{name}.toml"));
        fs::write(
            &p,
            format!(
                "out = \"{}\"\nseeds = [0]\n[base]\nsteps = 1\ndata = \"{}\"\n{entry}",
                s(&root.join("cmp")),
                s(&good)
            ),
        )
        .unwrap();
        cases.push(Case {
            name,
            args: vec!["compare".into(), "--config".into(), s(&p).into()],
            expect: vec![format!("{name}.toml"), "must be a plain name".into()],
            unchanged: true,
        });
    }
    cases.push(case("bench-seconds-nan", &["bench", "--seconds", "nan"], &["--seconds", "NaN"]));
    cases.push(case("bench-seconds-inf", &["bench", "--seconds", "inf"], &["--seconds", "inf"]));

    // A failure while writing a trained run's outputs names the file (here
    // the PNG's place is taken by a directory, as a full disk would fail).
    let plots = root.join("plot-out");
    fs::create_dir_all(plots.join("loss.png")).unwrap();
    let mut args = train(&good, &[]);
    let out = args.iter().position(|a| a == "--out").unwrap() + 1;
    args[out] = s(&plots).into();
    cases.push(Case { name: "plot-cannot-be-written", args, expect: vec!["loss.png".into()], unchanged: false });
    cases
}

/// The segments of a message (`a: b: c`) must not repeat one another.
fn repeats_itself(message: &str) -> bool {
    let parts: Vec<&str> = message.split(": ").map(str::trim).collect();
    parts.windows(2).any(|w| !w[0].is_empty() && w[0] == w[1])
}

#[test]
fn every_bad_input_fails_cleanly_and_touches_nothing() {
    let kept = std::env::var_os("NEGCACHE_BAD_INPUTS_KEEP").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let root = kept.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    fs::create_dir_all(&root).unwrap();
    let root = root.canonicalize().unwrap();
    let run = root.join("run");
    let good = root.join("good-run-data");
    plain_tiny(&good, &root);
    let setup: Vec<String> = ["train", "--data", s(&good), "--out", s(&run), "--steps", "50", "--batch", "8"]
        .iter()
        .chain(&["--cache-capacity", "64", "--eval-every", "0"])
        .map(|x| (*x).to_owned())
        .collect();
    let (code, _, err) = negcache(&root, &setup);
    assert_eq!(code, Some(0), "setting up the finished run failed: {err}");
    let cases = generate(&root, &run);
    let mut failures = Vec::new();
    for c in &cases {
        let before = snapshot(&root);
        let (code, out, err) = negcache(&root, &c.args);
        let text = format!("{out}\n{err}");
        let mut why = Vec::new();
        if code == Some(0) || code.is_none() {
            why.push(format!("exit status {code:?}, expected a failure"));
        }
        if code == Some(101) || err.contains("panicked") {
            why.push("panicked".to_owned());
        }
        for e in &c.expect {
            if !text.contains(e.as_str()) {
                why.push(format!("the message does not contain {e:?}"));
            }
        }
        if let Some(line) = err.lines().find(|l| repeats_itself(l)) {
            why.push(format!("the message repeats itself: {line}"));
        }
        if c.unchanged {
            let after = snapshot(&root);
            if after != before {
                let changed: Vec<_> = after
                    .iter()
                    .filter(|(k, v)| before.get(*k) != Some(*v))
                    .map(|(k, _)| k.display().to_string())
                    .chain(
                        before.keys().filter(|k| !after.contains_key(*k)).map(|k| format!("removed {}", k.display())),
                    )
                    .collect();
                why.push(format!("the tree changed: {changed:?}"));
            }
        }
        if !why.is_empty() {
            failures.push(format!("{}: {}\n  args: {:?}\n  output: {}", c.name, why.join("; "), c.args, text.trim()));
        }
    }
    assert!(cases.len() >= 80, "only {} cases", cases.len());
    assert!(
        failures.is_empty(),
        "{} of {} bad inputs were not handled:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn the_message_check_catches_a_repeated_cause() {
    assert!(repeats_itself("error: x.gz: read failed: incomplete deflate stream: incomplete deflate stream"));
    assert!(!repeats_itself("error: x.gz: line 3: read failed: incomplete deflate stream"));
}
