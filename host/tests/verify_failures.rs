//! `negcache verify` must not pass with nothing checked: every way a
//! reference or convergence file can check nothing (no cases, an empty or
//! misspelled expectation, an unknown field or format) is a failure naming
//! the file, case and field; sizes from a file are bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;
use std::process::Command;

use negcache_host::reference::{run_file, CaseResult, Outcome};

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

fn one_case(dir: &Path, case: &str) -> CaseResult {
    let p = write(dir, "case.json", &format!(r#"{{"format": "negcache-reference-v1", "cases": [{case}]}}"#));
    let mut r = run_file(&p).unwrap();
    assert_eq!(r.len(), 1);
    r.remove(0)
}

fn malformed(r: &CaseResult) -> &str {
    match &r.outcome {
        Outcome::Malformed(why) => why,
        other => panic!("case {} should be malformed, is {other:?}", r.name),
    }
}

const SOFTMAX_INPUTS: &str = r#""inputs": {"method": "in_batch", "query": [[1, 0]], "positive": [[0, 1]]}"#;

#[test]
fn a_file_without_cases_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "empty.json", r#"{"format": "negcache-reference-v1", "cases": []}"#);
    let e = format!("{:#}", run_file(&p).unwrap_err());
    assert!(e.contains("empty.json") && e.contains("cases"), "{e}");
    let p = write(dir.path(), "tag.json", r#"{"format": "negcache-reference-v2", "cases": [{}]}"#);
    let e = format!("{:#}", run_file(&p).unwrap_err());
    assert!(e.contains("tag.json") && e.contains("negcache-reference-v2"), "{e}");
}

#[test]
fn an_empty_or_misspelled_expectation_is_malformed() {
    let dir = tempfile::tempdir().unwrap();
    let r = one_case(
        dir.path(),
        &format!(r#"{{"name": "a", "kind": "softmax_loss", {SOFTMAX_INPUTS}, "expected": {{}}}}"#),
    );
    assert!(malformed(&r).contains("nothing would be checked"), "{r:?}");
    let r = one_case(
        dir.path(),
        &format!(r#"{{"name": "b", "kind": "softmax_loss", {SOFTMAX_INPUTS}, "expected": {{"mean_los": 1.0}}}}"#),
    );
    assert!(malformed(&r).contains("expected.mean_los"), "{r:?}");
}

#[test]
fn an_unknown_field_beside_known_ones_is_malformed() {
    let dir = tempfile::tempdir().unwrap();
    // The known field passes; the unknown one would be silently unchecked.
    let r = one_case(
        dir.path(),
        &format!(
            r#"{{"name": "c", "kind": "softmax_loss", {SOFTMAX_INPUTS}, "expected": {{"mean_loss": 0.0, "grad_qurey": [[0, 0]]}}, "tolerance": {{"abs": 10}}}}"#
        ),
    );
    assert!(malformed(&r).contains("expected.grad_qurey"), "{r:?}");
    let r = one_case(
        dir.path(),
        r#"{"name": "d", "kind": "in_cache_filter", "inputs": {"cache_items": [[1]], "new_items": [[2]], "mode": "x"}, "expected": {"keep": [true]}}"#,
    );
    assert!(malformed(&r).contains("inputs.mode"), "{r:?}");
    let r = one_case(
        dir.path(),
        r#"{"name": "e", "kind": "in_cache_filter", "inputs": {"cache_items": [[1]], "new_items": [[2]]}, "expected": {"keep": [true]}, "note": "x"}"#,
    );
    assert!(malformed(&r).contains("note"), "{r:?}");
}

#[test]
fn cache_update_states_must_check_something_and_sizes_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let update = |size: &str, states: &str| {
        format!(
            r#"{{"name": "u", "kind": "cache_update", "inputs": {{"cache_size": {size}, "use_lru": false, "steps": [{{"new_embeddings": [[1, 0]], "new_items": [[1]]}}]}}, "expected": {{"states": [{states}]}}}}"#
        )
    };
    let r = one_case(dir.path(), &update("2", "{}"));
    assert!(malformed(&r).contains("expected.states[0]"), "{r:?}");
    let r = one_case(dir.path(), &update("2", r#"{"agee": [0, 1]}"#));
    assert!(malformed(&r).contains("expected.states[0].agee"), "{r:?}");
    let r = one_case(dir.path(), &update("1000000000000", r#"{"age": [0]}"#));
    assert!(malformed(&r).contains("inputs.cache_size"), "{r:?}");
    // A well-formed one still passes.
    let r = one_case(dir.path(), &update("2", r#"{"age": [0, 1], "items": [[1], [0]]}"#));
    assert!(r.passed(), "{r:?}");
}

fn verify(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_negcache")).arg("verify").args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn expected_files_are_classified_by_format_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let reference = write(
        d,
        "ok.json",
        r#"{"format": "negcache-reference-v1", "cases": [{"name": "ok", "kind": "in_cache_filter", "inputs": {"cache_items": [[1]], "new_items": [[2]]}, "expected": {"keep": [true]}}]}"#,
    );
    let r = reference.to_str().unwrap();
    // A missing file, a misspelled tag and another fixture's format named
    // on its own are errors.
    let missing = d.join("missing.json");
    let (code, out) = verify(&["--reference", r, "--expected", missing.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("missing.json"), "{out}");
    let typo = write(d, "typo.json", r#"{"format": "negcache-convergance-v1", "runs": []}"#);
    let (code, out) = verify(&["--reference", r, "--expected", typo.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("typo.json") && out.contains("unknown format"), "{out}");
    let expected = d.join("expected");
    fs::create_dir(&expected).unwrap();
    let firmware = write(&expected, "firmware.json", r#"{"format": "negcache-firmware-v1"}"#);
    let (code, out) = verify(&["--reference", r, "--expected", firmware.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    // In a directory, a known other format is skipped, and said so.
    let (code, out) = verify(&["--reference", r, "--expected", expected.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("skipping") && out.contains("firmware.json") && out.contains("1 passed, 0 failed"), "{out}");
    // But not a misspelled one.
    write(&expected, "zz.json", r#"{"format": "negcache-planted-v2"}"#);
    let (code, out) = verify(&["--reference", r, "--expected", expected.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("zz.json"), "{out}");
}

#[test]
fn a_convergence_run_with_nothing_to_check_fails_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r = write(
        d,
        "ok.json",
        r#"{"format": "negcache-reference-v1", "cases": [{"name": "ok", "kind": "in_cache_filter", "inputs": {"cache_items": [[1]], "new_items": [[2]]}, "expected": {"keep": [true]}}]}"#,
    );
    // The data does not exist: a run that trained would fail on it, so
    // these fail on their bands alone.
    for (name, bands, want) in [
        ("no-bands.json", "{}", "bands: empty"),
        ("metric.json", r#"{"recal_at_10": {"min": 0, "max": 1}}"#, "bands.recal_at_10"),
        ("band.json", r#"{"recall_at_10": {"min": 1, "max": 0}}"#, "bands.recall_at_10"),
    ] {
        let p = write(
            d,
            name,
            &format!(
                r#"{{"format": "negcache-convergence-v1", "runs": [{{"name": "r1", "config": {{"data": "nowhere", "steps": 1}}, "bands": {bands}, "command": "x"}}]}}"#
            ),
        );
        let (code, out) = verify(&["--reference", r.to_str().unwrap(), "--expected", p.to_str().unwrap()]);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains(name) && out.contains("r1") && out.contains(want), "{out}");
    }
    let p = write(d, "no-runs.json", r#"{"format": "negcache-convergence-v1", "runs": []}"#);
    let (code, out) = verify(&["--reference", r.to_str().unwrap(), "--expected", p.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no-runs.json") && out.contains("runs"), "{out}");
}
