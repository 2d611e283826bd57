//! `negcache embed`: new text through a trained tower.
//!
//! Reads JSON lines on stdin, BEIR's records (`{"_id": ..., "title": ...,
//! "text": ...}`, title optional) or plain lines of text (id: the line
//! number, from 1), tokenises them as training did and embeds them with
//! the query tower (default) or the item tower. Writes JSON lines
//! `{"id": ..., "vector": [...]}` to stdout, or with `--out F` a
//! safetensors file (tensor `embeddings`, F32 `[n, DIM]`, and `tokens`, U32
//! `[n, L]`) with its ids beside it in `F` with the extension `ids.txt`.
//!
//! A line that starts with `{` must be a JSON object; a blank line is
//! skipped. Title and text are joined by a space, as for corpus documents.
//! New items get no item-id token (they have no trained identity), so a
//! corpus item embedded here differs from its exported embedding when the
//! model was trained with `item_id_token`; `negcache export` gives those.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use negcache::layers::PAD;
use negcache::tokenizer::tokenize;
use negcache::tower::Side;

use crate::export::{model_score_scale, write_ids, write_safetensors, Tensor};
use crate::featurize::{ITEM_TOKENS, QUERY_TOKENS};
use crate::session::DIM;
use crate::train::{embed_all, Run, TrainConfig};

/// Which tower `embed` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum EmbedSide {
    /// The query tower (search queries).
    #[default]
    Query,
    /// The item tower (new documents to add to an index).
    Item,
}

/// Flags of `embed`.
#[derive(Debug, Clone, clap::Args)]
pub struct EmbedArgs {
    /// The checkpoint whose towers embed.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Which tower.
    #[arg(long, value_enum, default_value = "query")]
    pub side: EmbedSide,
    /// Write a safetensors file (and its ids beside it) instead of JSON
    /// lines on stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One input record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// `_id`, or the line number.
    pub id: String,
    /// Title and text, joined by a space when both are there.
    pub text: String,
}

/// Parses the input (see the module docs); errors name the line.
pub fn read_records(input: impl BufRead) -> anyhow::Result<Vec<Record>> {
    let mut out = Vec::new();
    for (n, line) in input.lines().enumerate() {
        let number = n + 1;
        let line = line.with_context(|| format!("stdin line {number}: cannot read"))?;
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        if !trimmed.starts_with('{') {
            out.push(Record { id: number.to_string(), text: line });
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(trimmed).with_context(|| format!("stdin line {number}: not valid JSON"))?;
        let Some(obj) = v.as_object() else { bail!("stdin line {number}: not a JSON object") };
        let field = |k: &str| -> anyhow::Result<Option<String>> {
            Ok(match obj.get(k) {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Number(x)) if k == "_id" => Some(x.to_string()),
                Some(other) => bail!("stdin line {number}: {k:?} must be a string, got {other}"),
            })
        };
        let id = field("_id")?.unwrap_or_else(|| number.to_string());
        let (title, text) = (field("title")?.unwrap_or_default(), field("text")?.unwrap_or_default());
        if title.is_empty() && text.is_empty() {
            bail!("stdin line {number}: the object has neither \"text\" nor \"title\"");
        }
        let text = if title.is_empty() {
            text
        } else if text.is_empty() {
            title
        } else {
            format!("{title} {text}")
        };
        out.push(Record { id, text });
    }
    Ok(out)
}

/// Token ids of `text` for `side`, as training featurised it (items get no
/// id token; see the module docs).
pub fn tokens<const L: usize>(cfg: &TrainConfig, text: &str, out: &mut [u32; L], room: usize) {
    *out = [PAD; L];
    tokenize(text, &cfg.tokenizer(), &mut out[..room.min(L)]);
}

/// Embeds `records` with `run`'s `side` tower: the vectors and the token
/// ids (row-major, `L` per record).
pub fn embed_records(run: &Run, side: EmbedSide, records: &[Record]) -> (Vec<[f32; DIM]>, Vec<u32>, usize) {
    match side {
        EmbedSide::Query => {
            let t: Vec<[u32; QUERY_TOKENS]> = records
                .iter()
                .map(|r| {
                    let mut t = [PAD; QUERY_TOKENS];
                    tokens(&run.cfg, &r.text, &mut t, QUERY_TOKENS);
                    t
                })
                .collect();
            (embed_all(run.session.as_ref(), Side::Query, &t), t.as_flattened().to_vec(), QUERY_TOKENS)
        }
        EmbedSide::Item => {
            // Training kept the last place for the id token.
            let room = if run.cfg.item_id_token { ITEM_TOKENS - 1 } else { ITEM_TOKENS };
            let t: Vec<[u32; ITEM_TOKENS]> = records
                .iter()
                .map(|r| {
                    let mut t = [PAD; ITEM_TOKENS];
                    tokens(&run.cfg, &r.text, &mut t, room);
                    t
                })
                .collect();
            (embed_all(run.session.as_ref(), Side::Item, &t), t.as_flattened().to_vec(), ITEM_TOKENS)
        }
    }
}

/// Where `--out F` puts the ids: `F` with the extension `ids.txt`.
pub fn ids_path(out: &Path) -> PathBuf {
    out.with_extension("ids.txt")
}

/// `negcache embed`: stdin to stdout (or `--out`).
pub fn run(args: &EmbedArgs, input: impl BufRead, mut output: impl Write) -> anyhow::Result<()> {
    let mut run = Run::resume(&args.checkpoint, None)?;
    let records = read_records(input)?;
    if args.side == EmbedSide::Item && run.cfg.item_id_token {
        eprintln!(
            "note: this model gives corpus items an item-id token; new items get none, so a corpus item embedded \
             here differs from its `negcache export` embedding"
        );
    }
    let (vectors, toks, len) = embed_records(&run, args.side, &records);
    let Some(out) = &args.out else {
        for (r, v) in records.iter().zip(&vectors) {
            let line = serde_json::json!({ "id": r.id, "vector": v.as_slice() });
            writeln!(output, "{line}")?;
        }
        output.flush()?;
        return Ok(());
    };
    let n = records.len();
    let ids = ids_path(out);
    let alpha = model_score_scale(run.session.as_mut(), &run.cfg)?;
    let side = match args.side {
        EmbedSide::Query => "query",
        EmbedSide::Item => "item",
    };
    let meta = BTreeMap::from([
        ("format".to_owned(), "negcache-embed-v1".to_owned()),
        ("side".into(), side.into()),
        ("score".into(), "score_scale * dot(query_embedding, item_embedding)".into()),
        ("score_scale".into(), alpha.to_string()),
        ("normalization".into(), "l2".into()),
        ("dim".into(), DIM.to_string()),
        ("rows".into(), n.to_string()),
        ("ids".into(), ids.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()),
        ("pad_token".into(), PAD.to_string()),
        ("checkpoint".into(), args.checkpoint.display().to_string()),
    ]);
    write_ids(&ids, records.iter().map(|r| r.id.as_str()))?;
    let tensors =
        [Tensor::f32("embeddings", vec![n, DIM], vectors.as_flattened()), Tensor::u32("tokens", vec![n, len], &toks)];
    write_safetensors(out, &tensors, &meta)?;
    writeln!(output, "wrote {} ({n} {side} embeddings) and {}", out.display(), ids.display())?;
    Ok(())
}
