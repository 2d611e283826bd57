//! Regenerates the WordNet datasets bundled under `fixtures/data/`.
//!
//! Ignored by default because it rewrites files in the repository; run
//!
//! ```text
//! cargo test -p negcache-host --test data_bundle -- --ignored
//! ```
//!
//! with Debian's `wordnet-base` installed. The output is deterministic
//! (fixed seed, gzip without timestamps), so rerunning it on the same
//! WordNet leaves the files byte-for-byte unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};

use negcache_host::data::beir;
use negcache_host::data::wordnet::{self, Task};

const WORDNET: &str = "/usr/share/wordnet";
const SEED: u64 = 0;
const TEST_FRACTION: f64 = 0.1;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/data")
}

#[test]
#[ignore = "rewrites fixtures/data; run explicitly with --ignored"]
fn write_bundled_wordnet() {
    let source = Path::new(WORDNET);
    assert!(source.join("data.noun").is_file(), "WordNet not found at {WORDNET}; install Debian's wordnet-base");
    let license = wordnet::license_text(source).unwrap();
    for task in [Task::Hypernyms, Task::ReverseDictionary] {
        let out = fixtures().join(format!("wordnet-{}", task.name()));
        let (ds, stats) = wordnet::convert(source, task, SEED, TEST_FRACTION).unwrap();
        beir::write(&out, &ds, true).unwrap();
        // The WordNet license asks for its notice on all copies of the
        // database, including modified ones; this data is such a copy.
        let notice = format!(
            "The files in this directory are derived from WordNet 3.0\n\
             (Princeton University), and are distributed under its license:\n\n{license}"
        );
        fs::write(out.join("LICENSE-WORDNET"), notice).unwrap();
        println!("{}: {stats}", out.display());
        // What was written must load back unchanged.
        let back = beir::load(&out, &["train", "test"]).unwrap();
        assert_eq!(back.corpus, ds.corpus);
        assert_eq!(back.queries, ds.queries);
        assert_eq!(back.qrels, ds.qrels);
    }
}
