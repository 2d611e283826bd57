//! `negcache verify`'s convergence fixtures: the stored runs reach their
//! bands, and a deliberately broken configuration misses them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use negcache_host::convergence::run_file;
use negcache_host::reference::Outcome;

fn expected(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/expected").join(name)
}

#[test]
fn the_stored_runs_reach_their_bands() {
    for r in run_file(&expected("hypernyms.json")).unwrap() {
        println!("{}: {:?} {}", r.name, r.outcome, r.worst_field);
        assert!(r.passed(), "{}: {:?}", r.name, r.outcome);
    }
}

#[test]
fn a_broken_config_misses_its_band() {
    // The cache run's bands with a learning rate too small to learn:
    // recall stays near chance and the run must fail.
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/data/wordnet-hypernyms");
    let fixture = serde_json::json!({
        "format": "negcache-convergence-v1",
        "runs": [{
            "name": "broken-lr",
            "config": {"data": data, "steps": 200, "lr": 1e-7, "warmup": 0, "objective": "cache"},
            "bands": {"recall_at_10": {"min": 0.1487, "max": 0.2331}},
            "command": "a deliberately broken configuration"
        }]
    });
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.json");
    std::fs::write(&p, fixture.to_string()).unwrap();
    let r = &run_file(&p).unwrap()[0];
    assert!(matches!(&r.outcome, Outcome::Fail(m) if m.contains("recall_at_10")), "{r:?}");
    // An unknown setting is malformed, not silently ignored.
    let bad = fixture.to_string().replace("\"lr\"", "\"learning_rate\"");
    std::fs::write(&p, bad).unwrap();
    let r = &run_file(&p).unwrap()[0];
    assert!(matches!(&r.outcome, Outcome::Malformed(m) if m.contains("unknown setting")), "{r:?}");
}
