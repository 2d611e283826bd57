//! `negcache export` and `negcache embed` on a small trained model:
//!
//! - the exported item and query embeddings are the towers' outputs bit
//!   for bit, and the ids files name their rows;
//! - the top-k computed in Rust straight from the exported tensors (with
//!   the core's `negcache::retrieve`) is `negcache eval --trec`'s run line
//!   for line: same documents, same order, same f32 scores;
//! - the exported weights, with the formula in their metadata, give the
//!   embeddings again;
//! - `tests/python/check_export.py` (numpy + safetensors) reproduces the
//!   checkpoint's Recall@10 from `negcache eval --json` to 1e-6, when
//!   python3 can import both (CI installs them; with `CI` set, missing
//!   modules are a failure);
//! - `negcache embed` reads JSON lines and plain lines and writes the
//!   towers' vectors, as JSON lines or safetensors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use negcache::layers::PAD;
use negcache::retrieve::{search_by, Hit};
use negcache::tokenizer::tokenize;
use negcache::tower::Side;
use negcache_host::data::{beir, Dataset, Doc, Qrel, Query};
use negcache_host::eval::read_run;
use negcache_host::export::read_tensor;
use negcache_host::export::weights;
use negcache_host::featurize::{featurize, Features, ITEM_TOKENS, QUERY_TOKENS};
use negcache_host::session::{new_session, Tying, BUCKETS, DIM};
use negcache_host::train::{prepare, train, Run, TrainConfig};
use safetensors::{Dtype, SafeTensors};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn negcache(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_negcache"))
        .args(args)
        .current_dir(root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn ok(args: &[&str]) -> String {
    let (code, out, err) = negcache(args, None);
    assert_eq!(code, 0, "negcache {args:?} failed:\n{out}\n{err}");
    out
}

/// 240 documents whose texts come in identical pairs (`d{i}` and
/// `d{i + 120}`), 360 queries naming two words of their document and one
/// other; the last 60 are the test split. One test query is named `d7` and
/// has the text of document `d7`, whose twin `d127` is its positive. With
/// the item-id token off, twins have identical embeddings, so exact score
/// ties (ordered by the larger id first, `d99` before `d127`) and the
/// dropping of the query's own id are exercised; ids of different lengths
/// make byte order differ from numeric order.
fn twins_dataset(dir: &Path) {
    let words = [
        "red", "blue", "green", "cat", "dog", "fish", "tree", "rock", "sun", "moon", "star", "rain", "snow", "wind",
        "fire", "lake", "hill", "road", "bird", "leaf", "seed", "salt", "iron", "gold",
    ];
    let text = |i: usize| {
        let i = i % 120;
        format!("{} {} {}", words[i % 24], words[(i / 24 * 5 + i * 7 + 3) % 24], words[(i * 11 + 1) % 24])
    };
    let mut ds = Dataset::default();
    for i in 0..240 {
        ds.corpus.push(Doc { id: format!("d{i}"), title: String::new(), text: text(i) });
        ds.doc_index.insert(format!("d{i}"), i as u32);
    }
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for q in 0..360u32 {
        let (id, d, query_text) = if q == 359 {
            ("d7".to_owned(), 127, text(7))
        } else {
            let d = (q * 37 % 240) as usize;
            let t = text(d);
            let w: Vec<&str> = t.split(' ').collect();
            let noise = words[(q as usize * 13 + 5) % 24];
            (format!("q{q}"), d as u32, format!("{} {} {noise}", w[q as usize % 3], w[(q as usize + 1) % 3]))
        };
        ds.queries.push(Query { id: id.clone(), text: query_text });
        ds.query_index.insert(id, q);
        let qrel = Qrel { query: q, doc: d, score: 1 };
        if q < 300 {
            train.push(qrel)
        } else {
            test.push(qrel)
        }
    }
    ds.qrels.insert("train".into(), train);
    ds.qrels.insert("test".into(), test);
    beir::write(dir, &ds, true).unwrap();
}

/// A model trained for 50 steps on [`twins_dataset`], exported with the
/// test split's queries, and evaluated with a run file and a JSON report.
struct Trained {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    ckpt: PathBuf,
    export: PathBuf,
    trec: PathBuf,
    json: PathBuf,
}

impl Trained {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        twins_dataset(&data);
        let cfg = TrainConfig {
            data: data.clone(),
            out: tmp.path().join("run"),
            steps: 50,
            batch: 8,
            cache_capacity: 64,
            warmup: 3,
            eval_every: 0,
            item_id_token: false,
            // Two towers over one token table: the export then holds both
            // MLPs, which the checks below read.
            tying: Tying::SharedTokens,
            ..TrainConfig::default()
        };
        let prepared = prepare(&cfg).unwrap();
        let mut run = Run::start(cfg.clone(), &prepared).unwrap();
        train(&mut run, &prepared, &mut |_, _, _| Ok(())).unwrap();
        let ckpt = cfg.out.join("checkpoint.ckpt");
        let export = tmp.path().join("export");
        let (trec, json) = (tmp.path().join("test.run"), tmp.path().join("eval.json"));
        let s = |p: &Path| p.to_str().unwrap().to_owned();
        let out = ok(&["export", "--checkpoint", &s(&ckpt), "--split", "test", "--out", &s(&export)]);
        assert!(out.contains("exported 240 item embeddings and 60 query embeddings"), "{out}");
        ok(&["eval", "--checkpoint", &s(&ckpt), "--trec", &s(&trec), "--json", &s(&json)]);
        Self { _tmp: tmp, data, ckpt, export, trec, json }
    }

    fn dataset(&self) -> (Dataset, Features, Run) {
        let run = Run::resume(&self.ckpt, None).unwrap();
        let ds = beir::load(&self.data, &["test"]).unwrap();
        let features = featurize(&ds, &run.cfg.tokenizer(), run.cfg.item_id_token);
        (ds, features, run)
    }
}

fn read_ids(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
}

/// A safetensors file: its bytes, from which tensors and metadata are read.
struct File(Vec<u8>);

impl File {
    fn open(path: &Path) -> Self {
        Self(std::fs::read(path).unwrap())
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.0).unwrap()
    }
    fn meta(&self) -> HashMap<String, String> {
        SafeTensors::read_metadata(&self.0).unwrap().1.metadata().clone().unwrap()
    }
    fn f32s(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        read_tensor(&self.st(), name, Dtype::F32, f32::from_le_bytes).unwrap()
    }
    fn u32s(&self, name: &str) -> (Vec<usize>, Vec<u32>) {
        read_tensor(&self.st(), name, Dtype::U32, u32::from_le_bytes).unwrap()
    }
    fn rows(&self, name: &str) -> Vec<[f32; DIM]> {
        let (shape, v) = self.f32s(name);
        assert_eq!(shape[1], DIM, "{name}: {shape:?}");
        v.chunks_exact(DIM).map(|r| r.try_into().unwrap()).collect()
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn export_is_the_towers_and_its_top_k_is_evals() {
    let t = Trained::new();
    let (ds, features, run) = t.dataset();
    let emb = File::open(&t.export.join("embeddings.safetensors"));

    // Metadata.
    let meta = emb.meta();
    for (k, v) in [
        ("format", "negcache-embeddings-v1"),
        ("score_scale", "20"),
        ("normalization", "l2"),
        ("dim", "64"),
        ("items", "240"),
        ("queries", "60"),
        ("split", "test"),
        ("item_ids", "item_ids.txt"),
        ("query_ids", "query_ids.txt"),
    ] {
        assert_eq!(meta.get(k).map(String::as_str), Some(v), "metadata {k}: {meta:?}");
    }
    let protocol: serde_json::Value = serde_json::from_str(&meta["protocol"]).unwrap();
    assert_eq!(protocol["ignore_identical_ids"], true);

    // Item embeddings: the item tower's output, bit for bit, in corpus order.
    let item_ids = read_ids(&t.export.join("item_ids.txt"));
    assert_eq!(item_ids, ds.corpus.iter().map(|d| d.id.clone()).collect::<Vec<_>>());
    let items = emb.rows("item_embeddings");
    assert_eq!(items.len(), ds.corpus.len());
    for (i, row) in items.iter().enumerate() {
        let mut e = [0.0f32; DIM];
        run.session.embed(Side::Item, &features.items[i], &mut e);
        assert_eq!(bits(row), bits(&e), "item {i}");
    }
    let (shape, tokens) = emb.u32s("item_tokens");
    assert_eq!(shape, [ds.corpus.len(), ITEM_TOKENS]);
    assert_eq!(tokens, features.items.as_flattened());

    // Query embeddings: the test split's queries, in file order.
    let query_ids = read_ids(&t.export.join("query_ids.txt"));
    let queries = emb.rows("query_embeddings");
    assert_eq!(query_ids.len(), 60);
    assert_eq!(queries.len(), 60);
    for (id, row) in query_ids.iter().zip(&queries) {
        let q = ds.query_index[id] as usize;
        let mut e = [0.0f32; DIM];
        run.session.embed(Side::Query, &features.queries[q], &mut e);
        assert_eq!(bits(row), bits(&e), "query {id}");
    }
    assert_eq!(emb.u32s("query_tokens").0, [60, QUERY_TOKENS]);

    // Top-k straight from the file, with the core's retrieval and eval's
    // conventions (own id dropped; equal scores: larger id first), against
    // eval's TREC run: same documents in the same order with the same
    // scores.
    let run_lines = read_run(&t.trec).unwrap();
    let mut trec: BTreeMap<&str, Vec<(&str, f32)>> = BTreeMap::new();
    for l in &run_lines {
        trec.entry(&l.query_id).or_default().push((&l.doc_id, l.score));
    }
    assert_eq!(trec.len(), query_ids.len(), "eval ranked other queries than the export holds");
    let mut by_decreasing_id: Vec<u32> = (0..item_ids.len() as u32).collect();
    by_decreasing_id.sort_by(|&a, &b| item_ids[b as usize].as_bytes().cmp(item_ids[a as usize].as_bytes()));
    let mut tie_key = vec![0u32; item_ids.len()];
    for (key, &doc) in by_decreasing_id.iter().enumerate() {
        tie_key[doc as usize] = key as u32;
    }
    let depth = 1000; // eval's default --eval-depth
    let mut buf = vec![Hit::EMPTY; depth];
    let mut compared = 0;
    for (qid, q) in query_ids.iter().zip(&queries) {
        let hits =
            search_by(q, &items, |i| (item_ids[i as usize] != *qid).then(|| tie_key[i as usize]), &mut buf).unwrap();
        let mine: Vec<(&str, u32)> = hits
            .iter()
            .map(|h| (item_ids[by_decreasing_id[h.key as usize] as usize].as_str(), h.score.to_bits()))
            .collect();
        let theirs: Vec<(&str, u32)> = trec[qid.as_str()].iter().map(|&(d, s)| (d, s.to_bits())).collect();
        assert_eq!(mine, theirs, "query {qid}: top-k from the exported tensors differs from eval's run");
        compared += mine.len();
    }
    assert_eq!(compared, run_lines.len());
    // The conventions were exercised: the query named d7 did not retrieve
    // d7 (its own id), and twins tied exactly.
    assert!(trec["d7"].iter().all(|&(d, _)| d != "d7") && trec["d7"].iter().any(|&(d, _)| d == "d127"));
    let ties = trec.values().flat_map(|r| r.windows(2)).filter(|w| w[0].1.to_bits() == w[1].1.to_bits()).count();
    assert!(ties > 0, "no exact ties in the run");

    // The weights give the embeddings again (float64, the documented
    // formula), within f32 rounding.
    let w = File::open(&t.export.join("weights.safetensors"));
    let wmeta = w.meta();
    assert_eq!(wmeta["format"], "negcache-weights-v1");
    assert_eq!(wmeta["tying"], "shared_tokens");
    assert_eq!(wmeta["score_scale"], "20");
    assert_eq!(w.f32s("token_embedding.weight").0, [32768, 64]);
    assert_eq!(w.f32s("query_mlp.0.weight").0, [128, 64]);
    assert_eq!(w.f32s("item_mlp.2.weight").0, [64, 128]);
    assert_eq!(w.f32s("item_mlp.2.bias").0, [64]);
    for (side, inputs, stored) in [
        ("item", features.items.iter().map(|t| t.as_slice()).collect::<Vec<_>>(), &items),
        (
            "query",
            query_ids.iter().map(|id| features.queries[ds.query_index[id] as usize].as_slice()).collect(),
            &queries,
        ),
    ] {
        let names: Vec<&str> = wmeta[&format!("{side}_tower")].split(", ").collect();
        let table = w.f32s(names[0]).1;
        let [w0, b0, w2, b2] = [1, 2, 3, 4].map(|i| w.f32s(names[i]).1);
        let mut worst = 0.0f64;
        for (tokens, row) in inputs.iter().zip(stored.iter()) {
            let y = forward(&table, &w0, &b0, &w2, &b2, tokens);
            for (a, &b) in y.iter().zip(row) {
                worst = worst.max((a - f64::from(b)).abs());
            }
        }
        // f32 rounding of sums of a few hundred terms below 1 in magnitude.
        assert!(worst <= 1e-5, "{side}: embeddings from the weights differ by {worst}");
    }
}

/// The tower in float64 from PyTorch-layout weights: mean of table rows,
/// Linear, ReLU, Linear, L2 normalisation.
fn forward(table: &[f32], w0: &[f32], b0: &[f32], w2: &[f32], b2: &[f32], tokens: &[u32]) -> Vec<f64> {
    let (e, h, d) = (table.len() / BUCKETS, b0.len(), b2.len());
    let used: Vec<usize> = tokens.iter().filter(|&&t| t != PAD).map(|&t| t as usize % BUCKETS).collect();
    let mut pooled = vec![0.0f64; e];
    for &r in &used {
        for j in 0..e {
            pooled[j] += f64::from(table[r * e + j]);
        }
    }
    if !used.is_empty() {
        pooled.iter_mut().for_each(|x| *x /= used.len() as f64);
    }
    let hid: Vec<f64> = (0..h)
        .map(|r| (f64::from(b0[r]) + (0..e).map(|c| f64::from(w0[r * e + c]) * pooled[c]).sum::<f64>()).max(0.0))
        .collect();
    let y: Vec<f64> =
        (0..d).map(|r| f64::from(b2[r]) + (0..h).map(|c| f64::from(w2[r * h + c]) * hid[c]).sum::<f64>()).collect();
    let norm = y.iter().map(|x| x * x).sum::<f64>().sqrt();
    y.iter().map(|x| if norm > 0.0 { x / norm } else { 0.0 }).collect()
}

/// For every tying, the weights' names and the towers they name give each
/// side's embedding again (an untrained model with a learned scale, so the
/// scale parameter is read too).
#[test]
fn weights_follow_the_tying() {
    let tokens = [3u32, 70_000, 12, PAD, 3];
    for tying in [Tying::Separate, Tying::SharedTokens, Tying::Siamese] {
        let cfg = TrainConfig { tying, learn_scale: true, scale: 7.5, ..TrainConfig::default() };
        let mut session = new_session(tying, 1, cfg.cache(), cfg.tower(), cfg.trainer()).unwrap();
        session.init(&mut rand_pcg::Pcg64Mcg::new(5)).unwrap();
        let w = weights(session.as_mut(), &cfg).unwrap();
        assert!((w.score_scale - 7.5).abs() < 1e-5, "{tying:?}: score scale {}", w.score_scale);
        let tensor = |name: &str| -> Vec<f32> {
            let t = w.tensors.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("{tying:?}: no {name}"));
            t.bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
        };
        let expected_tensors = match tying {
            Tying::Separate => 10,
            Tying::SharedTokens => 9,
            Tying::Siamese => 5,
        };
        assert_eq!(w.tensors.len(), expected_tensors, "{tying:?}");
        for (side, names) in [(Side::Query, &w.query_tower), (Side::Item, &w.item_tower)] {
            let names: Vec<&str> = names.split(", ").collect();
            let [table, w0, b0, w2, b2] = [0, 1, 2, 3, 4].map(|i| tensor(names[i]));
            let y = forward(&table, &w0, &b0, &w2, &b2, &tokens);
            let mut e = [0.0f32; DIM];
            session.embed(side, &tokens, &mut e);
            let worst = y.iter().zip(&e).map(|(a, &b)| (a - f64::from(b)).abs()).fold(0.0, f64::max);
            assert!(worst <= 1e-5, "{tying:?} {side:?}: {worst}");
        }
    }
}

/// Whether `python3` can import numpy and safetensors.
fn python_ready() -> bool {
    Command::new("python3")
        .args(["-c", "import numpy, safetensors.numpy"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn python_reproduces_the_checkpoints_recall() {
    if !python_ready() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI: python3 cannot import numpy and safetensors (.ci/run installs them)"
        );
        println!("skipped: python3 cannot import numpy and safetensors (pip install -r tests/python/requirements.txt)");
        return;
    }
    let t = Trained::new();
    let script = root().join("tests/python/check_export.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg("--export")
        .arg(&t.export)
        .arg("--data")
        .arg(&t.data)
        .args(["--split", "test", "--eval-json"])
        .arg(&t.json)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{stdout}{stderr}");
    assert!(out.status.success(), "{} failed ({}):\n{stdout}\n{stderr}", script.display(), out.status);
    assert!(stdout.lines().last() == Some("check_export: OK"), "{stdout}");
    // The number it matched is eval's.
    let ev: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&t.json).unwrap()).unwrap();
    let r10 = ev["towers"]["recall_at_10"].as_f64().unwrap();
    assert!(stdout.contains(&format!("negcache eval {r10:.6}")), "{stdout}");
}

#[test]
fn embed_writes_the_towers_vectors() {
    let t = Trained::new();
    let (ds, features, run) = t.dataset();
    let ckpt = t.ckpt.to_str().unwrap();
    let q300 = &ds.queries[ds.query_index["q300"] as usize].text;
    let input = format!(
        "{{\"_id\": \"q300\", \"text\": {q300:?}}}\nplain words here\n\n{{\"_id\": 7, \"title\": \"red\", \"text\": \"cat\"}}\n"
    );
    let (code, out, err) = negcache(&["embed", "--checkpoint", ckpt], Some(&input));
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().map(|l| l["id"].as_str().unwrap()).collect::<Vec<_>>(), ["q300", "2", "7"]);
    let vector = |l: &serde_json::Value| -> Vec<f32> {
        l["vector"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    let query = |text: &str| {
        let mut tokens = [PAD; QUERY_TOKENS];
        tokenize(text, &run.cfg.tokenizer(), &mut tokens);
        let mut e = [0.0f32; DIM];
        run.session.embed(Side::Query, &tokens, &mut e);
        e
    };
    // A dataset query: the exported (and evaluated) embedding, bit for bit.
    let mut e = [0.0f32; DIM];
    run.session.embed(Side::Query, &features.queries[ds.query_index["q300"] as usize], &mut e);
    assert_eq!(bits(&vector(&lines[0])), bits(&e));
    assert_eq!(bits(&vector(&lines[1])), bits(&query("plain words here")));
    assert_eq!(bits(&vector(&lines[2])), bits(&query("red cat")));

    // The same as safetensors, with the ids beside it.
    let st = t.export.join("new.safetensors");
    let (code, _, err) = negcache(&["embed", "--checkpoint", ckpt, "--out", st.to_str().unwrap()], Some(&input));
    assert_eq!(code, 0, "{err}");
    let f = File::open(&st);
    let rows = f.rows("embeddings");
    assert_eq!(read_ids(&t.export.join("new.ids.txt")), ["q300", "2", "7"]);
    for (row, l) in rows.iter().zip(&lines) {
        assert_eq!(bits(row), bits(&vector(l)));
    }
    assert_eq!(f.meta()["side"], "query");
    assert_eq!(f.meta()["score_scale"], "20");

    // The item tower: without the item-id token (this model), a corpus
    // document's text gives its exported embedding.
    let d5 = &ds.corpus[5].text;
    let (code, out, err) = negcache(&["embed", "--checkpoint", ckpt, "--side", "item"], Some(&format!("{d5}\n")));
    assert_eq!(code, 0, "{err}");
    let l: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    run.session.embed(Side::Item, &features.items[5], &mut e);
    assert_eq!(bits(&vector(&l)), bits(&e));

    // Malformed input names its line.
    let (code, _, err) = negcache(&["embed", "--checkpoint", ckpt], Some("fine\n{\"_id\": 1\n"));
    assert_eq!(code, 2);
    assert!(err.contains("stdin line 2") && err.contains("not valid JSON"), "{err}");
    let (code, _, err) = negcache(&["embed", "--checkpoint", ckpt], Some("{\"_id\": \"x\"}\n"));
    assert_eq!(code, 2);
    assert!(err.contains("neither \"text\" nor \"title\""), "{err}");
    // An export of a split that does not exist is refused.
    let out = t.export.join("x");
    let (code, _, err) =
        negcache(&["export", "--checkpoint", ckpt, "--split", "nosuch", "--out", out.to_str().unwrap()], None);
    assert_eq!(code, 2);
    assert!(err.contains("nosuch"), "{err}");
}
