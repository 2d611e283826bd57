//! Prepares the firmware's training data: a few hundred WordNet hypernym
//! pairs over a small item set, tokenised by the core's tokenizer and
//! written in the compact format that `negcache_firmware::data` decodes at
//! compile time.
//!
//! ```text
//! cd firmware
//! cargo run --release --no-default-features --features host --target x86_64-unknown-linux-gnu --bin prep
//! ```
//!
//! Selection (deterministic for a given seed and dataset):
//! 1. Only queries with exactly one positive are used, so every query has
//!    one right answer among the items.
//! 2. Items are ranked by how many such training queries they parent (ties
//!    by corpus order); the first `--items` are kept, skipping an item whose
//!    token list equals that of one already kept (WordNet has several
//!    synsets that read alike; the device could not tell them apart and the
//!    cache's duplicate test compares token lists) and items with too few
//!    queries in either split.
//! 3. Per kept item, its training-split queries are shuffled (PCG32 from
//!    `--seed`) and the first `--train-per-item` kept; likewise
//!    `--heldout-per-item` queries from the dataset's test split, which the
//!    firmware never trains on.
//!
//! Options: `--data DIR` (BEIR layout, gzip), `--out FILE`, `--items N`,
//! `--train-per-item K`, `--heldout-per-item H`, `--query-len L`,
//! `--item-len L`, `--seed S`. Defaults are the committed file's.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use negcache::layers::PAD;
use negcache::tokenizer::{tokenize, TokenizerConfig};
use negcache_firmware::format::{HEADER_WORDS, MAGIC, VERSION};
use rand_core::{RngCore, SeedableRng};

struct Args {
    data: PathBuf,
    out: PathBuf,
    items: usize,
    train_per_item: usize,
    heldout_per_item: usize,
    query_len: usize,
    item_len: usize,
    seed: u64,
}

impl Args {
    fn parse() -> Result<Self, String> {
        // The repository root: the firmware crate is one level below it.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new(".."));
        let mut a = Args {
            data: root.join("fixtures/data/wordnet-hypernyms"),
            out: root.join("fixtures/firmware/wordnet-tiny.bin"),
            items: 512,
            train_per_item: 3,
            heldout_per_item: 1,
            query_len: 16,
            item_len: 8,
            seed: 0,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let num = || value.parse::<usize>().map_err(|e| format!("{flag} {value}: {e}"));
            match flag.as_str() {
                "--data" => a.data = value.clone().into(),
                "--out" => a.out = value.clone().into(),
                "--items" => a.items = num()?,
                "--train-per-item" => a.train_per_item = num()?,
                "--heldout-per-item" => a.heldout_per_item = num()?,
                "--query-len" => a.query_len = num()?,
                "--item-len" => a.item_len = num()?,
                "--seed" => a.seed = num()? as u64,
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        Ok(a)
    }
}

/// The lines of a gzip file.
fn gz_lines(path: &Path) -> Result<Vec<String>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    BufReader::new(flate2::read::GzDecoder::new(f))
        .lines()
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// `(id, text)` of every JSON line, in file order.
fn jsonl(path: &Path) -> Result<Vec<(String, String)>, String> {
    gz_lines(path)?
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).map_err(|e| format!("{}: {e}", path.display()))?;
            let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
            let (title, text) = (field("title"), field("text"));
            // The host's featuriser joins a non-empty title to the text the
            // same way (host/src/featurize.rs).
            let text = if title.is_empty() { text } else { format!("{title} {text}") };
            Ok((field("_id"), text))
        })
        .collect()
}

/// Query id to its positive item ids, in file order (header skipped).
fn qrels(path: &Path) -> Result<BTreeMap<String, Vec<String>>, String> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in gz_lines(path)?.iter().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() >= 3 && f[2].trim().parse::<f64>().is_ok_and(|s| s > 0.0) {
            m.entry(f[0].to_string()).or_default().push(f[1].to_string());
        }
    }
    Ok(m)
}

/// Queries with exactly one positive, grouped by that positive, in query
/// file order within each group.
fn single_positive(queries: &[(String, String)], q: &BTreeMap<String, Vec<String>>) -> HashMap<String, Vec<usize>> {
    let mut by_item: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, (id, _)) in queries.iter().enumerate() {
        if let Some([item]) = q.get(id).map(Vec::as_slice) {
            by_item.entry(item.clone()).or_default().push(i);
        }
    }
    by_item
}

fn tokens(text: &str, len: usize) -> Vec<u32> {
    let mut t = vec![PAD; len];
    tokenize(text, &TokenizerConfig::DEFAULT, &mut t);
    t
}

/// Fisher-Yates with a uniform index drawn by the core's rejection sampler.
fn shuffle<T>(v: &mut [T], rng: &mut impl RngCore) {
    for i in (1..v.len()).rev() {
        let j = negcache::random::below(rng, (i + 1) as u32) as usize;
        v.swap(i, j);
    }
}

fn run(a: &Args) -> Result<(), String> {
    let corpus = jsonl(&a.data.join("corpus.jsonl.gz"))?;
    let queries = jsonl(&a.data.join("queries.jsonl.gz"))?;
    let train = single_positive(&queries, &qrels(&a.data.join("qrels/train.tsv.gz"))?);
    let test = single_positive(&queries, &qrels(&a.data.join("qrels/test.tsv.gz"))?);

    // Rank items by training queries parented, ties by corpus order.
    let mut ranked: Vec<usize> = (0..corpus.len()).collect();
    let count = |i: &usize| train.get(&corpus[*i].0).map_or(0, Vec::len);
    ranked.sort_by_key(|i| (std::cmp::Reverse(count(i)), *i));

    let mut rng = rand_pcg::Pcg32::seed_from_u64(a.seed);
    let mut seen: HashSet<Vec<u32>> = HashSet::new();
    let mut items: Vec<(usize, Vec<u32>)> = Vec::new();
    let mut train_q: Vec<(usize, u32)> = Vec::new();
    let mut held_q: Vec<(usize, u32)> = Vec::new();
    for &i in &ranked {
        if items.len() == a.items {
            break;
        }
        let id = &corpus[i].0;
        let (tr, te) = (train.get(id).cloned().unwrap_or_default(), test.get(id).cloned().unwrap_or_default());
        if tr.len() < a.train_per_item || te.len() < a.heldout_per_item {
            continue;
        }
        let t = tokens(&corpus[i].1, a.item_len);
        if !seen.insert(t.clone()) {
            continue;
        }
        let k = items.len() as u32;
        let (mut tr, mut te) = (tr, te);
        shuffle(&mut tr, &mut rng);
        shuffle(&mut te, &mut rng);
        train_q.extend(tr[..a.train_per_item].iter().map(|&q| (q, k)));
        held_q.extend(te[..a.heldout_per_item].iter().map(|&q| (q, k)));
        items.push((i, t));
    }
    if items.len() < a.items {
        return Err(format!("only {} items have enough queries", items.len()));
    }

    let header = [
        u32::from_le_bytes(MAGIC),
        VERSION,
        items.len() as u32,
        train_q.len() as u32,
        held_q.len() as u32,
        a.item_len as u32,
        a.query_len as u32,
        TokenizerConfig::DEFAULT.char_ngrams as u32,
    ];
    assert_eq!(header.len(), HEADER_WORDS);
    let mut words: Vec<u32> = header.to_vec();
    for (_, t) in &items {
        words.extend(t);
    }
    for &(q, k) in train_q.iter().chain(&held_q) {
        words.extend(tokens(&queries[q].1, a.query_len));
        words.push(k);
    }
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(&a.out, &bytes).map_err(|e| format!("{}: {e}", a.out.display()))?;

    eprintln!(
        "wrote {} ({} bytes): {} items, {} training and {} held-out queries",
        a.out.display(),
        bytes.len(),
        items.len(),
        train_q.len(),
        held_q.len()
    );
    for (k, (i, _)) in items.iter().enumerate().take(5) {
        eprintln!("  item {k}: {} {:?} ({} training queries in the dataset)", corpus[*i].0, corpus[*i].1, count(i));
    }
    for &(q, k) in train_q.iter().take(3) {
        eprintln!("  query {:?} -> item {k}", queries[q].1);
    }
    Ok(())
}

fn main() -> ExitCode {
    match Args::parse().and_then(|a| run(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("prep: {e}");
            ExitCode::FAILURE
        }
    }
}
