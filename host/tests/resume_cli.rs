//! `negcache train --resume` and the run's outputs: where a resumed run
//! writes, which settings it takes, that its log equals an uninterrupted
//! run's, Ctrl-C, divergence, and the warnings that used to be missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use negcache_host::checkpoint::{Checkpoint, TEMP_PREFIX};
use negcache_host::report::read_series;
use negcache_host::train::Run;

mod common;

fn negcache(cwd: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_negcache")).args(args).current_dir(cwd).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `train` on `data` into `out` with the small settings every test uses.
fn train_args<'a>(data: &'a str, out: &'a str, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["train", "--data", data, "--out", out, "--steps", steps, "--batch", "8"];
    a.extend(["--cache-capacity", "64", "--eval-every", "0"]);
    a.extend(extra);
    a
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn setup() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::tiny_dataset(&data);
    (tmp, data)
}

/// Every file under `dir` with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&p).unwrap()))
        .collect()
}

fn temp_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(TEMP_PREFIX))
        .collect()
}

#[test]
fn a_resumed_copy_writes_beside_its_checkpoint_and_leaves_the_original_run_alone() {
    let (tmp, data) = setup();
    let a = tmp.path().join("a");
    let (code, _, err) = negcache(tmp.path(), &train_args(s(&data), s(&a), "50", &[]));
    assert_eq!(code, 0, "{err}");
    let original = files(&a);
    let b = tmp.path().join("b");
    fs::create_dir(&b).unwrap();
    fs::copy(a.join("checkpoint.ckpt"), b.join("checkpoint.ckpt")).unwrap();
    let (code, out, err) = negcache(tmp.path(), &["train", "--resume", s(&b.join("checkpoint.ckpt")), "--steps", "60"]);
    assert_eq!(code, 0, "{err}");
    assert!(files(&a) == original, "resuming a copy changed the original run's files");
    for f in ["checkpoint.ckpt", "metrics.csv", "summary.json", "loss.svg", "recall.png"] {
        assert!(b.join(f).is_file(), "{f} was not written beside the resumed checkpoint");
    }
    assert_eq!(Checkpoint::load(&b.join("checkpoint.ckpt")).unwrap().header["step"], 60);
    // Steps per second of the resumed part alone, not 60 steps over its time.
    assert!(out.contains("this run: steps 51 to 60"), "{out}");
    // --out takes precedence, and the checkpoint resumed is left as it was.
    let c = tmp.path().join("c");
    let before = fs::read(b.join("checkpoint.ckpt")).unwrap();
    let (code, _, err) =
        negcache(tmp.path(), &["train", "--resume", s(&b.join("checkpoint.ckpt")), "--steps", "70", "--out", s(&c)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(Checkpoint::load(&c.join("checkpoint.ckpt")).unwrap().header["step"], 70);
    assert!(fs::read(b.join("checkpoint.ckpt")).unwrap() == before);
}

#[test]
fn a_log_resumed_twice_equals_the_uninterrupted_log() {
    let (tmp, data) = setup();
    let eval = ["--eval-every", "50", "--eval-queries", "10"];
    let straight = tmp.path().join("straight");
    let mut args = train_args(s(&data), s(&straight), "250", &[]);
    args.truncate(args.len() - 2);
    args.extend(eval);
    let (code, _, err) = negcache(tmp.path(), &args);
    assert_eq!(code, 0, "{err}");
    // Finished at 130 (inside a loss window) and at 200 (on a window and an
    // evaluation), each time extended: the rows of the finished runs'
    // last steps must become those of a longer run.
    let split = tmp.path().join("split");
    let mut args = train_args(s(&data), s(&split), "130", &[]);
    args.truncate(args.len() - 2);
    args.extend(eval);
    let (code, _, err) = negcache(tmp.path(), &args);
    assert_eq!(code, 0, "{err}");
    let ck = split.join("checkpoint.ckpt");
    for steps in ["200", "250"] {
        let (code, _, err) = negcache(tmp.path(), &["train", "--resume", s(&ck), "--steps", steps]);
        assert_eq!(code, 0, "{err}");
    }
    let want = common::log_without_timing(&straight.join("metrics.csv"));
    let got = common::log_without_timing(&split.join("metrics.csv"));
    assert!(want.len() > 5, "{want:?}");
    assert_eq!(got, want, "the resumed run's log differs from the uninterrupted run's");
    let wall: Vec<f64> = read_series(&split.join("metrics.csv")).unwrap().iter().map(|r| r.wall_s).collect();
    assert!(wall.windows(2).all(|w| w[0] <= w[1]), "wall_s restarted: {wall:?}");
    let body = |d: &Path| Checkpoint::load(&d.join("checkpoint.ckpt")).unwrap().body;
    assert!(body(&straight) == body(&split), "the resumed run's final state differs");
}

#[test]
fn resuming_a_finished_run_has_nothing_to_do_and_changes_nothing() {
    let (tmp, data) = setup();
    let a = tmp.path().join("a");
    let (code, _, err) = negcache(tmp.path(), &train_args(s(&data), s(&a), "20", &[]));
    assert_eq!(code, 0, "{err}");
    let before = files(&a);
    let (code, out, err) = negcache(tmp.path(), &["train", "--resume", s(&a.join("checkpoint.ckpt"))]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("nothing to do"), "{out}");
    assert!(files(&a) == before, "resuming a finished run changed its files");
}

#[test]
fn a_final_checkpoint_without_its_outputs_is_completed() {
    let (tmp, data) = setup();
    let a = tmp.path().join("a");
    let (code, _, err) = negcache(tmp.path(), &train_args(s(&data), s(&a), "20", &[]));
    assert_eq!(code, 0, "{err}");
    let want = common::log_without_timing(&a.join("metrics.csv"));
    // As if killed after the final checkpoint: no summary, no final row.
    fs::remove_file(a.join("summary.json")).unwrap();
    let text = fs::read_to_string(a.join("metrics.csv")).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.pop();
    fs::write(a.join("metrics.csv"), lines.join("\n") + "\n").unwrap();
    let (code, _, err) = negcache(tmp.path(), &["train", "--resume", s(&a.join("checkpoint.ckpt"))]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("completing them"), "{err}");
    assert!(a.join("summary.json").is_file());
    assert_eq!(common::log_without_timing(&a.join("metrics.csv")), want);
}

#[test]
fn changeable_settings_are_applied_and_named_on_resume() {
    let (tmp, data) = setup();
    let a = tmp.path().join("a");
    let (code, _, err) = negcache(tmp.path(), &train_args(s(&data), s(&a), "50", &[]));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = negcache(
        tmp.path(),
        &[
            "train",
            "--resume",
            s(&a.join("checkpoint.ckpt")),
            "--steps",
            "60",
            "--eval-every",
            "5",
            "--eval-depth",
            "200",
        ],
    );
    assert_eq!(code, 0, "{err}");
    for applied in ["applying --steps 60", "applying --eval-every 5", "applying --eval-depth 200"] {
        assert!(err.contains(applied), "{err}");
    }
    let rows = read_series(&a.join("metrics.csv")).unwrap();
    assert!(rows.iter().any(|r| r.step == 55 && r.get("recall_at_10").is_some()), "--eval-every was not applied");
    let summary: serde_json::Value = serde_json::from_slice(&fs::read(a.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["config"]["eval_depth"], 200);
}

#[test]
fn an_empty_metrics_log_is_reported_on_resume() {
    let (tmp, data) = setup();
    let a = tmp.path().join("a");
    let (code, _, err) = negcache(tmp.path(), &train_args(s(&data), s(&a), "20", &[]));
    assert_eq!(code, 0, "{err}");
    fs::write(a.join("metrics.csv"), "").unwrap();
    let (code, _, err) = negcache(tmp.path(), &["train", "--resume", s(&a.join("checkpoint.ckpt")), "--steps", "30"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("metrics.csv is empty") && err.contains("up to 20"), "{err}");
}

#[test]
fn ctrl_c_stops_at_a_step_boundary_with_a_checkpoint() {
    let (tmp, data) = setup();
    let a = tmp.path().join("a");
    let args = train_args(s(&data), s(&a), "100000000", &[]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_negcache"))
        .args(&args)
        .current_dir(tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it trains (the log exists), then interrupt.
    let started = Instant::now();
    while !a.join("metrics.csv").exists() && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let sent = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the run did not stop within 30 s of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted at step") && err.contains("--resume"), "{err}");
    let run = Run::resume(&a.join("checkpoint.ckpt"), None).unwrap();
    assert!(run.step > 0 && err.contains(&format!("interrupted at step {}", run.step)), "{err}");
    assert!(temp_files(&a).is_empty(), "{:?}", temp_files(&a));
    // It continues from there.
    let to = (run.step + 5).to_string();
    let (code, _, err) = negcache(tmp.path(), &["train", "--resume", s(&a.join("checkpoint.ckpt")), "--steps", &to]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn divergence_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let (tmp, data) = setup();
    let a = tmp.path().join("a");
    let (code, _, err) =
        negcache(tmp.path(), &train_args(s(&data), s(&a), "200", &["--lr", "1e6", "--checkpoint-every", "2"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("diverged at step") && err.contains("last good checkpoint"), "{err}");
    let run = Run::resume(&a.join("checkpoint.ckpt"), None).unwrap();
    assert!(run.step > 0 && run.step % 2 == 0, "step {}", run.step);
    assert!(!a.join("summary.json").exists());
}

#[test]
fn eval_needs_no_train_split() {
    let (tmp, data) = setup();
    let a = tmp.path().join("a");
    let (code, _, err) = negcache(tmp.path(), &train_args(s(&data), s(&a), "10", &[]));
    assert_eq!(code, 0, "{err}");
    let test_only = tmp.path().join("test-only");
    fs::create_dir_all(test_only.join("qrels")).unwrap();
    for f in ["corpus.jsonl.gz", "queries.jsonl.gz", "qrels/test.tsv.gz"] {
        fs::copy(data.join(f), test_only.join(f)).unwrap();
    }
    let (code, out, err) =
        negcache(tmp.path(), &["eval", "--checkpoint", s(&a.join("checkpoint.ckpt")), "--data", s(&test_only)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Recall@10"), "{out}");
}

#[test]
fn empty_texts_are_warned_about() {
    let (tmp, data) = setup();
    let ds = negcache_host::data::beir::load(&data, &["train", "test"]).unwrap();
    let mut ds = ds;
    ds.corpus[3].text.clear();
    ds.corpus[3].title.clear();
    let d = tmp.path().join("some-empty");
    negcache_host::data::beir::write(&d, &ds, false).unwrap();
    let a = tmp.path().join("a");
    let (code, _, err) = negcache(tmp.path(), &train_args(s(&d), s(&a), "5", &[]));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("corpus.jsonl: 1 of 40 document texts are empty"), "{err}");
}
