//! `negcache export`: a trained model's embeddings and weights in files that
//! numpy, PyTorch, faiss or usearch read without negcache.
//!
//! From a checkpoint, into one directory (`--out`):
//!
//! | file | what |
//! |---|---|
//! | `embeddings.safetensors` | the item embeddings of the whole corpus, their token ids, and with `--split` the query embeddings of that split |
//! | `item_ids.txt` | one corpus `_id` per line: line `i` names row `i` of `item_embeddings` |
//! | `query_ids.txt` | with `--split`: one query `_id` per line, row order of `query_embeddings` |
//! | `weights.safetensors` | every parameter of the towers |
//!
//! # `embeddings.safetensors`
//!
//! | tensor | dtype | shape | holds |
//! |---|---|---|---|
//! | `item_embeddings` | F32 | `[items, DIM]` | the item tower's output for corpus document `i` (corpus file order), bit for bit what `negcache eval` scores |
//! | `item_tokens` | U32 | `[items, ITEM_TOKENS]` | the token ids the item tower read (`PAD` = 4294967295 in unused places) |
//! | `query_embeddings` | F32 | `[queries, DIM]` | with `--split`: the query tower's output for each query judged in that split, in queries-file order |
//! | `query_tokens` | U32 | `[queries, QUERY_TOKENS]` | with `--split`: their token ids |
//!
//! `DIM` is 64, `ITEM_TOKENS` 12 and `QUERY_TOKENS` 32 in this build. Rows
//! are L2-normalised (a zero tower output stays zero), so a plain dot
//! product ranks as the model does; the model's score is `score_scale *
//! dot`. String metadata ([`EMBEDDINGS_FORMAT`]):
//!
//! | key | value |
//! |---|---|
//! | `format` | `negcache-embeddings-v1` |
//! | `score` | `score_scale * dot(query_embedding, item_embedding)` |
//! | `score_scale` | alpha, as the shortest decimal that reads back as the f32 |
//! | `normalization` | `l2` |
//! | `dim`, `items`, `queries` | sizes |
//! | `item_ids`, `query_ids` | the ids files' names |
//! | `split` | the split of the queries (absent without `--split`) |
//! | `ranking` | how `negcache eval` orders and filters, to reproduce its top-k |
//! | `protocol` | the checkpoint's evaluation protocol as JSON (`ignore_identical_ids`, `exclude_train`, `merge_identical_text`, `depth`) |
//! | `dot` | the summation order of negcache's f32 dot product, for bit-identical scores |
//! | `pad_token`, `tokenizer` | the padding id, and the tokenizer settings as JSON |
//! | `checkpoint`, `step`, `data` | where it came from |
//!
//! # `weights.safetensors`
//!
//! Each parameter once, named after PyTorch's modules (`nn.EmbeddingBag`
//! with `mode="mean"`, `nn.Sequential(nn.Linear, nn.ReLU, nn.Linear)`), so
//! `weight` of a linear layer is `[out, in]` and a layer is `x @ weight.T +
//! bias`:
//!
//! | tensor | dtype | shape |
//! |---|---|---|
//! | `token_embedding.weight` (one table) or `query_token_embedding.weight` and `item_token_embedding.weight` (separate towers) | F32 | `[BUCKETS, E]` = `[32768, 64]` |
//! | `{P}.0.weight` | F32 | `[H, E]` = `[128, 64]` |
//! | `{P}.0.bias` | F32 | `[H]` |
//! | `{P}.2.weight` | F32 | `[DIM, H]` = `[64, 128]` |
//! | `{P}.2.bias` | F32 | `[DIM]` |
//!
//! with `{P}` = `query_mlp` and `item_mlp`, or `mlp` for Siamese towers.
//! Metadata: `format` (`negcache-weights-v1`), `tying`, `query_tower` and
//! `item_tower` (the tensors each side reads), `forward` (the formula),
//! `pooling`, `activation`, `normalization`, `score_scale`, `scale`
//! (`fixed` or `learned`), `buckets`, `pad_token`, `config` (the training
//! settings as JSON, tokenizer included).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use negcache::layers::{Activation, Pooling, PAD};
use negcache::tower::{Model, Scale, SiameseTowers, Side, TowerConfig};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::checkpoint::{write_atomically, Reader, Writer};
use crate::data::{beir, Dataset};
use crate::featurize::{featurize, ITEM_TOKENS, QUERY_TOKENS};
use crate::session::{Session, Tying, BUCKETS, DIM, E, H, S};
use crate::train::{embed_all, Run, TrainConfig};

/// `format` of `embeddings.safetensors`.
pub const EMBEDDINGS_FORMAT: &str = "negcache-embeddings-v1";
/// `format` of `weights.safetensors`.
pub const WEIGHTS_FORMAT: &str = "negcache-weights-v1";
/// The embeddings file's name in the export directory.
pub const EMBEDDINGS_FILE: &str = "embeddings.safetensors";
/// The weights file's name in the export directory.
pub const WEIGHTS_FILE: &str = "weights.safetensors";
/// The item ids file's name.
pub const ITEM_IDS_FILE: &str = "item_ids.txt";
/// The query ids file's name.
pub const QUERY_IDS_FILE: &str = "query_ids.txt";

/// How `negcache eval` ranks, for the `ranking` metadata key.
pub const RANKING: &str = "by score, highest first; equal scores: the larger document id first (byte order, as \
    trec_eval); with ignore_identical_ids, a document whose id equals the query's id is not retrieved; with \
    exclude_train, neither are the query's positives of the train split";
/// The dot product's summation order, for the `dot` metadata key.
pub const DOT_ORDER: &str = "f32, no fused multiply-add: four partial sums s[j] over the components i with i % 4 == \
    j, each accumulated in increasing i, then (s[0] + s[1]) + (s[2] + s[3])";

/// Flags of `export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// The checkpoint to export.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output directory (created if needed; the files in it are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Also export the query embeddings of the queries judged in this split
    /// (e.g. test).
    #[arg(long)]
    pub split: Option<String>,
    /// The dataset (default: the checkpoint's).
    #[arg(long)]
    pub data: Option<PathBuf>,
}

/// A tensor to write: name, shape and little-endian bytes.
#[derive(Debug, Clone)]
pub struct Tensor {
    /// Its name in the file.
    pub name: String,
    /// F32 or U32.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Row-major little-endian data.
    pub bytes: Vec<u8>,
}

impl Tensor {
    /// An F32 tensor.
    pub fn f32(name: &str, shape: Vec<usize>, values: &[f32]) -> Self {
        let bytes = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        Self { name: name.to_owned(), dtype: Dtype::F32, shape, bytes }
    }
    /// A U32 tensor.
    pub fn u32(name: &str, shape: Vec<usize>, values: &[u32]) -> Self {
        let bytes = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        Self { name: name.to_owned(), dtype: Dtype::U32, shape, bytes }
    }
}

/// Writes `tensors` and `metadata` as a safetensors file, atomically.
pub fn write_safetensors(path: &Path, tensors: &[Tensor], metadata: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let views = tensors
        .iter()
        .map(|t| Ok((t.name.as_str(), TensorView::new(t.dtype, t.shape.clone(), &t.bytes)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .with_context(|| format!("{}: a tensor's shape does not match its data", path.display()))?;
    let info: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let bytes =
        safetensors::serialize(views, Some(info)).with_context(|| format!("{}: cannot serialise", path.display()))?;
    write_atomically(path, |f| f.write_all(&bytes).map_err(Into::into))
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes one id per line (UTF-8, `\n` after each), atomically. An id
/// holding a line break could not be read back, and is an error.
pub fn write_ids<'a>(path: &Path, ids: impl IntoIterator<Item = &'a str>) -> anyhow::Result<()> {
    let mut text = String::new();
    for id in ids {
        ensure!(!id.contains(['\n', '\r']), "{}: id {id:?} contains a line break", path.display());
        text.push_str(id);
        text.push('\n');
    }
    write_atomically(path, |f| f.write_all(text.as_bytes()).map_err(Into::into))
        .with_context(|| format!("writing {}", path.display()))
}

/// The score scale alpha of towers with `cfg` and ln-scale `log_scale`,
/// computed by the core's own towers (so it is the f32 the model used).
pub fn score_scale(cfg: TowerConfig, log_scale: f32) -> f32 {
    let mut t = SiameseTowers::<1, 1, 1, 1, 0>::new(cfg);
    *t.log_scale_mut() = log_scale;
    Model::<1>::score_scale(&t)
}

/// The score scale alpha of a session's towers, set up by `cfg` (reading
/// the parameters only when alpha is learned).
pub fn model_score_scale(session: &mut dyn Session, cfg: &TrainConfig) -> anyhow::Result<f32> {
    match cfg.tower().scale {
        Scale::Fixed(_) => Ok(score_scale(cfg.tower(), 0.0)),
        Scale::Learned { .. } => Ok(weights(session, cfg)?.score_scale),
    }
}

/// The model's parameters, read from a session.
#[derive(Debug, Clone)]
pub struct Weights {
    /// Named tensors, in the order the optimiser visits them.
    pub tensors: Vec<Tensor>,
    /// The score scale alpha.
    pub score_scale: f32,
    /// Which tensors the query tower reads.
    pub query_tower: String,
    /// Which tensors the item tower reads.
    pub item_tower: String,
}

/// The parameters of a session's towers, set up by `cfg`, in PyTorch's
/// layout (see the module docs), read from what the session writes to a
/// checkpoint.
pub fn weights(session: &mut dyn Session, cfg: &TrainConfig) -> anyhow::Result<Weights> {
    let mut w = Writer::default();
    session.save(&mut w);
    let mut r = Reader::new(&w.0);
    r.tag(b"PARM")?;
    // Each parameter is its values, then S optimiser-state arrays of the
    // same length (session.rs, SaveParams); skip the state.
    let mut next = |n: usize| -> anyhow::Result<Vec<f32>> {
        let mut v = vec![0.0f32; n];
        r.f32s_into(&mut v)?;
        let mut state = vec![0.0f32; n];
        for _ in 0..S {
            r.f32s_into(&mut state)?;
        }
        Ok(v)
    };
    let (tables, mlps): (&[&str], &[&str]) = match cfg.tying {
        Tying::Separate => (&["query_token_embedding", "item_token_embedding"], &["query_mlp", "item_mlp"]),
        Tying::SharedTokens => (&["token_embedding"], &["query_mlp", "item_mlp"]),
        Tying::Siamese => (&["token_embedding"], &["mlp"]),
    };
    let mut tensors = Vec::new();
    for t in tables {
        tensors.push(Tensor::f32(&format!("{t}.weight"), vec![BUCKETS, E], &next(BUCKETS * E)?));
    }
    for m in mlps {
        // nalgebra stores a layer's OUT x IN matrix column-major, which is
        // the row-major [IN, OUT]; PyTorch's Linear.weight is [OUT, IN].
        let w0 = transpose(&next(H * E)?, H, E);
        let b0 = next(H)?;
        let w2 = transpose(&next(DIM * H)?, DIM, H);
        let b2 = next(DIM)?;
        tensors.push(Tensor::f32(&format!("{m}.0.weight"), vec![H, E], &w0));
        tensors.push(Tensor::f32(&format!("{m}.0.bias"), vec![H], &b0));
        tensors.push(Tensor::f32(&format!("{m}.2.weight"), vec![DIM, H], &w2));
        tensors.push(Tensor::f32(&format!("{m}.2.bias"), vec![DIM], &b2));
    }
    let tower = cfg.tower();
    let log_scale = match tower.scale {
        Scale::Learned { .. } => next(1)?[0],
        Scale::Fixed(_) => 0.0,
    };
    r.tag(b"OPTM").context("the checkpoint's parameters are not those of this model shape")?;
    let side = |t: &str, m: &str| format!("{t}.weight, {m}.0.weight, {m}.0.bias, {m}.2.weight, {m}.2.bias");
    let (first, last) = (tables.len() - 1, mlps.len() - 1);
    Ok(Weights {
        tensors,
        score_scale: score_scale(tower, log_scale),
        query_tower: side(tables[0], mlps[0]),
        item_tower: side(tables[first], mlps[last]),
    })
}

/// A column-major `rows x cols` matrix as row-major `[rows, cols]`.
fn transpose(col_major: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            out[r * cols + c] = col_major[c * rows + r];
        }
    }
    out
}

/// Metadata of `weights.safetensors`.
fn weights_metadata(cfg: &TrainConfig, w: &Weights) -> anyhow::Result<BTreeMap<String, String>> {
    let tower = cfg.tower();
    let pooling = match tower.pooling {
        Pooling::Mean => "mean",
        Pooling::Sum => "sum",
    };
    let activation = match tower.activation {
        Activation::Relu => "relu",
        Activation::Tanh => "tanh",
        Activation::Identity => "identity",
    };
    let tying = serde_json::to_value(cfg.tying)?.as_str().unwrap_or_default().to_owned();
    let forward = format!(
        "tokens t (PAD = {PAD} skipped) -> e = {pooling} over t of TABLE[t % {BUCKETS}] (zero without tokens) -> \
         h = {activation}(e @ MLP.0.weight.T + MLP.0.bias) -> y = h @ MLP.2.weight.T + MLP.2.bias -> y / |y|_2 \
         (zero stays zero); score = score_scale * <query, item>"
    );
    let scale = match tower.scale {
        Scale::Fixed(_) => "fixed",
        Scale::Learned { .. } => "learned",
    };
    Ok(BTreeMap::from([
        ("format".into(), WEIGHTS_FORMAT.into()),
        ("tying".into(), tying),
        ("query_tower".into(), w.query_tower.clone()),
        ("item_tower".into(), w.item_tower.clone()),
        ("forward".into(), forward),
        ("pooling".into(), pooling.into()),
        ("activation".into(), activation.into()),
        ("normalization".into(), "l2".into()),
        ("score_scale".into(), w.score_scale.to_string()),
        ("scale".into(), scale.into()),
        ("buckets".into(), BUCKETS.to_string()),
        ("pad_token".into(), PAD.to_string()),
        ("config".into(), serde_json::to_string(cfg)?),
    ]))
}

/// The queries judged in `split` (any grade), in queries-file order.
pub fn split_queries(ds: &Dataset, split: &str) -> anyhow::Result<Vec<u32>> {
    let qrels = ds.qrels.get(split).with_context(|| format!("no split {split:?} loaded"))?;
    let mut q: Vec<u32> = qrels.iter().map(|j| j.query).collect();
    q.sort_unstable();
    q.dedup();
    Ok(q)
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    /// Files written.
    pub files: Vec<PathBuf>,
    /// Corpus items.
    pub items: usize,
    /// Queries (0 without a split).
    pub queries: usize,
    /// The score scale.
    pub score_scale: f32,
}

/// Writes the export directory (see the module docs).
pub fn export(args: &ExportArgs) -> anyhow::Result<Exported> {
    let mut run = Run::resume(&args.checkpoint, None)?;
    if let Some(d) = &args.data {
        run.cfg.data = d.clone();
    }
    let cfg = run.cfg.clone();
    let splits: Vec<&str> = args.split.as_deref().into_iter().collect();
    let ds = beir::load(&cfg.data, &splits).with_context(|| format!("loading {}", cfg.data.display()))?;
    let features = featurize(&ds, &cfg.tokenizer(), cfg.item_id_token);
    let w = weights(run.session.as_mut(), &cfg)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("{}: cannot create", args.out.display()))?;

    let items = embed_all(run.session.as_ref(), Side::Item, &features.items);
    let n = items.len();
    let mut tensors = vec![
        Tensor::f32("item_embeddings", vec![n, DIM], items.as_flattened()),
        Tensor::u32("item_tokens", vec![n, ITEM_TOKENS], features.items.as_flattened()),
    ];
    let mut meta = BTreeMap::from([
        ("format".to_owned(), EMBEDDINGS_FORMAT.to_owned()),
        ("score".into(), "score_scale * dot(query_embedding, item_embedding)".into()),
        ("score_scale".into(), w.score_scale.to_string()),
        ("normalization".into(), "l2".into()),
        ("dim".into(), DIM.to_string()),
        ("items".into(), n.to_string()),
        ("item_ids".into(), ITEM_IDS_FILE.into()),
        ("ranking".into(), RANKING.into()),
        ("protocol".into(), serde_json::to_string(&cfg.protocol())?),
        ("dot".into(), DOT_ORDER.into()),
        ("pad_token".into(), PAD.to_string()),
        (
            "tokenizer".into(),
            serde_json::json!({ "char_ngrams": cfg.char_ngrams, "item_id_token": cfg.item_id_token }).to_string(),
        ),
        ("checkpoint".into(), args.checkpoint.display().to_string()),
        ("step".into(), run.step.to_string()),
        ("data".into(), cfg.data.display().to_string()),
    ]);
    let mut files = vec![args.out.join(EMBEDDINGS_FILE), args.out.join(ITEM_IDS_FILE)];
    let mut queries = Vec::new();
    if let Some(split) = &args.split {
        queries = split_queries(&ds, split)?;
        ensure!(!queries.is_empty(), "split {split:?} judges no query");
        let tokens: Vec<_> = queries.iter().map(|&q| features.queries[q as usize]).collect();
        let emb = embed_all(run.session.as_ref(), Side::Query, &tokens);
        let m = queries.len();
        tensors.push(Tensor::f32("query_embeddings", vec![m, DIM], emb.as_flattened()));
        tensors.push(Tensor::u32("query_tokens", vec![m, QUERY_TOKENS], tokens.as_flattened()));
        meta.insert("queries".into(), m.to_string());
        meta.insert("query_ids".into(), QUERY_IDS_FILE.into());
        meta.insert("split".into(), split.clone());
        write_ids(&args.out.join(QUERY_IDS_FILE), queries.iter().map(|&q| ds.queries[q as usize].id.as_str()))?;
        files.push(args.out.join(QUERY_IDS_FILE));
    } else {
        meta.insert("queries".into(), "0".into());
    }
    write_ids(&args.out.join(ITEM_IDS_FILE), ds.corpus.iter().map(|d| d.id.as_str()))?;
    write_safetensors(&args.out.join(EMBEDDINGS_FILE), &tensors, &meta)?;
    let wmeta = weights_metadata(&cfg, &w)?;
    write_safetensors(&args.out.join(WEIGHTS_FILE), &w.tensors, &wmeta)?;
    files.push(args.out.join(WEIGHTS_FILE));
    Ok(Exported { files, items: n, queries: queries.len(), score_scale: w.score_scale })
}

/// `negcache export`: [`export`], then what it wrote.
pub fn run(args: &ExportArgs) -> anyhow::Result<()> {
    let e = export(args)?;
    println!(
        "exported {} item embeddings{} (score = {} * dot product of L2-normalised rows)",
        e.items,
        if e.queries > 0 { format!(" and {} query embeddings", e.queries) } else { String::new() },
        e.score_scale
    );
    for f in &e.files {
        println!("wrote {}", f.display());
    }
    Ok(())
}

/// Reads an F32 or U32 tensor of a safetensors file as its shape and
/// values (for checks and tests).
pub fn read_tensor<T: Copy>(
    st: &safetensors::SafeTensors<'_>,
    name: &str,
    dtype: Dtype,
    decode: impl Fn([u8; 4]) -> T,
) -> anyhow::Result<(Vec<usize>, Vec<T>)> {
    let t = st.tensor(name).with_context(|| format!("no tensor {name:?}"))?;
    if t.dtype() != dtype {
        bail!("tensor {name:?} is {:?}, not {dtype:?}", t.dtype());
    }
    let values = t.data().chunks_exact(4).map(|b| decode([b[0], b[1], b[2], b[3]])).collect();
    Ok((t.shape().to_vec(), values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_column_major() {
        // [[1, 2, 3], [4, 5, 6]] column-major is 1 4 2 5 3 6.
        assert_eq!(transpose(&[1.0, 4.0, 2.0, 5.0, 3.0, 6.0], 2, 3), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn scale_is_the_towers() {
        assert_eq!(score_scale(TowerConfig::DEFAULT, 0.0).to_bits(), 20.0f32.to_bits());
        let learned = TowerConfig { scale: Scale::Learned { init: 5.0, min: 1.0, max: 100.0 }, ..TowerConfig::DEFAULT };
        assert_eq!(score_scale(learned, 10.0).to_bits(), 100.0f32.to_bits());
        let a = score_scale(learned, 2.0);
        assert!((a - 2.0f32.exp()).abs() <= 1e-5, "{a}");
    }

    #[test]
    fn files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let meta = BTreeMap::from([("k".to_owned(), "v".to_owned())]);
        let t = [Tensor::f32("a", vec![2, 2], &[1.0, -0.0, 3.5, f32::MIN_POSITIVE]), Tensor::u32("b", vec![1], &[PAD])];
        write_safetensors(&path, &t, &meta).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (shape, a) = read_tensor(&st, "a", Dtype::F32, f32::from_le_bytes).unwrap();
        assert_eq!(shape, [2, 2]);
        assert_eq!(
            a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            t[0].bytes.chunks(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect::<Vec<_>>()
        );
        assert_eq!(read_tensor(&st, "b", Dtype::U32, u32::from_le_bytes).unwrap().1, [PAD]);
        assert!(read_tensor(&st, "b", Dtype::F32, f32::from_le_bytes).is_err());
        let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(m.metadata().as_ref().unwrap()["k"], "v");
        let ids = dir.path().join("ids.txt");
        write_ids(&ids, ["a", "b c"]).unwrap();
        assert_eq!(std::fs::read_to_string(&ids).unwrap(), "a\nb c\n");
        assert!(write_ids(&ids, ["x\ny"]).is_err());
    }
}
