//! The `negcache` binary's exit codes and messages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn negcache(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_negcache"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn verify_passes_the_reference_files() {
    let (code, out, _) = negcache(&["verify", "--reference", "fixtures/reference", "--expected", "none"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().last().unwrap().ends_with(" 0 failed"), "{out}");
}

#[test]
fn verify_rejects_malformed_and_failing_files() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"format\": \"negcache-reference-v1\", \"cases\": [{\"name\": \"x\", \"kind\": \"in_cache_filter\", \"inputs\": {\"cache_items\": [[1]], \"new_items\": [[1]]}, \"expected\": {\"keep\": [true]}}]}").unwrap();
    let (code, out, _) = negcache(&["verify", "--reference", bad.to_str().unwrap(), "--expected", "none"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL") && out.contains("keep[0]"), "{out}");
    std::fs::write(&bad, "[1, 2").unwrap();
    let (code, _, err) = negcache(&["verify", "--reference", bad.to_str().unwrap(), "--expected", "none"]);
    assert_eq!(code, 2);
    assert!(err.contains("bad.json") && err.contains("not valid JSON"), "{err}");
}

#[test]
fn every_command_has_help_with_examples() {
    for cmd in ["train", "eval", "verify", "compare", "bench", "export", "embed", "convert-wordnet"] {
        let (code, out, _) = negcache(&[cmd, "--help"]);
        assert_eq!(code, 0);
        assert!(out.contains("Example"), "{cmd}: {out}");
    }
}

#[test]
fn bad_settings_are_reported_before_any_work() {
    let (code, _, err) = negcache(&["train", "--batch", "999"]);
    assert_eq!(code, 2);
    assert!(err.contains("batch must be between 1 and 256"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "stepz = 3\n").unwrap();
    let (code, _, err) = negcache(&["train", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("c.toml") && err.contains("stepz"), "{err}");
}

#[test]
fn bench_dense_runs_the_benchmark_model_and_writes_its_figures() {
    // One configuration in this process: its figures as JSON.
    let (code, out, err) = negcache(&["bench", "--dense-one", "inbatch_B32", "--seconds", "0.05"]);
    assert_eq!(code, 0, "{err}");
    let fig: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(fig["name"], "inbatch_B32");
    assert!(fig["steps_per_s"].as_f64().unwrap() > 0.0 && fig["windows"].as_u64().unwrap() >= 3, "{fig}");
    assert_eq!(fig["threads"], 1);
    // The pass is split over the threads asked for when a tile is worth a
    // hand-over, as the pool measures it at start (at most 2^26
    // multiply-adds, a 65,536-slot tile's work; whether a 4,096-slot tile
    // is worth it depends on the machine), never over more.
    for (name, asked, threads) in [("cache_N65536", "2", 2), ("cache_N4096", "1", 1), ("cache_N65536", "1", 1)] {
        let (code, out, err) = negcache(&["--threads", asked, "bench", "--dense-one", name, "--seconds", "0.05"]);
        assert_eq!(code, 0, "{err}");
        let fig: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(fig["threads"], threads, "{fig}");
    }
    // An unknown configuration is an error that names it.
    let (code, _, err) = negcache(&["bench", "--dense-one", "cache_N7", "--seconds", "0.05"]);
    assert_ne!(code, 0);
    assert!(err.contains("cache_N7"), "{err}");
    // A TF library directory without the library is refused before any run.
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = negcache(&["bench", "--dense", "--tf-lib", dir.path().to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("negative_cache") && err.contains(dir.path().to_str().unwrap()), "{err}");
}

/// `bench --dense --tf-lib`: every configuration runs in TF (here a
/// stand-in script with known figures) and in negcache, and the ratios are
/// taken against the TF figures of the same run.
#[test]
fn bench_dense_puts_tf_figures_of_the_same_run_beside_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("fixtures/bench")).unwrap();
    std::fs::create_dir_all(root.join("lib/negative_cache")).unwrap();
    std::fs::write(root.join("lib/negative_cache/losses.py"), "").unwrap();
    // Reports 100 steps/s in round 1, 200 in round 2, 300 in round 3 (a
    // counter file per configuration), so the median is 200.
    std::fs::write(
        root.join("fixtures/bench/tf_dense.py"),
        "import json, pathlib, sys\n\
         a = sys.argv\n\
         name = a[a.index('--one') + 1]\n\
         assert a[a.index('--lib') + 1].endswith('lib')\n\
         c = pathlib.Path(name + '.count')\n\
         n = int(c.read_text()) + 1 if c.exists() else 1\n\
         c.write_text(str(n))\n\
         print('warming up')\n\
         print(json.dumps({'name': name, 'steps_per_s': 100.0 * n, 'windows': 3, 'peak_rss_mib': 1000.0 + n, \
         'threads': 2, 'tf_version': 'stand-in'}))\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_negcache"))
        .args(["bench", "--dense", "--seconds", "0.05", "--tf-lib", "lib", "--write", "d.md", "--json", "d.json"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("d.json")).unwrap()).unwrap();
    let md = std::fs::read_to_string(root.join("d.md")).unwrap();
    assert!(md.contains("TensorFlow stand-in") && md.contains("--tf-lib DIR"), "{md}");
    // The largest of each configuration's rounds, and the goal checked
    // per configuration (negcache stays far below 1003 / 8 MiB).
    assert!(md.contains("TF 1003.0-1003.0 MiB (this run's)"), "{md}");
    assert!(md.contains("same configuration: met in every configuration"), "{md}");
    let configs = json["configs"].as_array().unwrap();
    assert_eq!(configs.len(), 5);
    for c in configs {
        let tf = &c["tf"];
        assert_eq!(tf["steps_per_s"], 200.0, "{c}");
        assert_eq!(tf["rounds"], serde_json::json!([100.0, 200.0, 300.0]), "{c}");
        let name = c["name"].as_str().unwrap();
        // The median of the rounds' ratios (TF ran 100, 200, 300).
        let mut ratios: Vec<f64> = c["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .zip([100.0, 200.0, 300.0])
            .map(|(n, t)| n.as_f64().unwrap() / t)
            .collect();
        ratios.sort_by(f64::total_cmp);
        let row = md.lines().find(|l| l.starts_with(&format!("| {name} |"))).unwrap();
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(cells[2], "200.0", "{row}");
        assert_eq!(cells[3], "100.0, 200.0, 300.0", "{row}");
        assert_eq!(cells[6], format!("{:.2}x", ratios[1]), "{row}");
    }
}
