//! `negcache compare`: many runs on the same data, steps and seeds, one
//! table and two plots.
//!
//! The comparison file (TOML) has a `[base]` table of settings shared by
//! every run, a list of `seeds`, an output directory, and `[[run]]` tables,
//! each a `name` and settings over the base. Every (run, seed) is trained
//! and its summary saved under `<out>/runs/<name>-s<seed>/summary.json`; a
//! summary already there is reused, so an interrupted comparison continues
//! where it stopped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::checkpoint::write_atomically;
use crate::eval::{evaluate_baselines, Baselines, Metrics};
use crate::report::{fmt_metric, line_chart, markdown_table, Series};
use crate::train::{prepare, train, Run, TrainConfig};

/// A comparison file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareFile {
    /// Title of the results document.
    #[serde(default = "default_title")]
    pub title: String,
    /// Where the table, plots and per-run summaries go.
    pub out: PathBuf,
    /// Seeds every run is trained with.
    pub seeds: Vec<u64>,
    /// Settings shared by every run.
    #[serde(default)]
    pub base: toml::Table,
    /// The runs.
    #[serde(rename = "run")]
    pub runs: Vec<RunEntry>,
}

fn default_group() -> String {
    "main".into()
}

fn default_title() -> String {
    "Comparison".into()
}

/// One run: a name and its settings over the base.
#[derive(Debug, Deserialize)]
pub struct RunEntry {
    /// Name in tables, plots and directories.
    pub name: String,
    /// A line saying what the run tests.
    #[serde(default)]
    pub about: String,
    /// Seeds for this run only (default: the file's).
    #[serde(default)]
    pub seeds: Option<Vec<u64>>,
    /// Which pair of plots the run is drawn in (default `main`), so that no
    /// plot has more curves than can be told apart.
    #[serde(default = "default_group")]
    pub group: String,
    /// Settings over the base.
    #[serde(flatten)]
    pub settings: toml::Table,
}

/// What one (run, seed) produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// Run name.
    pub name: String,
    /// Seed.
    pub seed: u64,
    /// Final metrics on the evaluation split.
    pub metrics: Metrics,
    /// Seconds of training.
    pub train_seconds: f64,
    /// Tower evaluations per step.
    pub tower_evals_per_step: f64,
    /// Bytes of trainer state.
    pub state_bytes: usize,
    /// (step, seconds, Recall@10) of periodic evaluations.
    pub curve: Vec<(u64, f64, f64)>,
    /// The settings the run was trained and evaluated with; a saved result
    /// is reused only under the same settings.
    pub config: TrainConfig,
    /// The evaluation protocol, in words.
    pub protocol: String,
}

/// The settings of one run: defaults, then the base, then the run's own.
pub fn run_config(file: &CompareFile, entry: &RunEntry, seed: u64) -> anyhow::Result<TrainConfig> {
    let mut table = toml::Table::try_from(TrainConfig::default())?;
    for (k, v) in file.base.iter().chain(entry.settings.iter()) {
        if !table.contains_key(k) {
            bail!("run {:?}: unknown setting {k:?}", entry.name);
        }
        table.insert(k.clone(), v.clone());
    }
    let mut cfg: TrainConfig = table.try_into().with_context(|| format!("run {:?}", entry.name))?;
    cfg.seed = seed;
    cfg.out = file.out.join("runs").join(format!("{}-s{seed}", entry.name));
    cfg.validate().with_context(|| format!("run {:?}", entry.name))?;
    Ok(cfg)
}

/// Trains every run (reusing saved summaries) and writes the results.
pub fn run(path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let file: CompareFile =
        toml::from_str(&text).with_context(|| format!("{}: invalid comparison file", path.display()))?;
    if file.runs.is_empty() || file.seeds.is_empty() {
        bail!("{}: needs at least one [[run]] and one seed", path.display());
    }
    let mut names = std::collections::HashSet::new();
    for e in &file.runs {
        // Names become directory and file names under `out`.
        for (what, name) in [("run name", &e.name), ("group", &e.group)] {
            if !plain_name(name) {
                bail!(
                    "{}: {what} {name:?} must be a plain name (letters, digits, '-', '_', '.'; not starting \
                     with '.'), since it names files under {}",
                    path.display(),
                    file.out.display()
                );
            }
        }
        if !names.insert(&e.name) {
            bail!("{}: run name {:?} is used twice", path.display(), e.name);
        }
        for s in e.seeds.as_ref().unwrap_or(&file.seeds) {
            run_config(&file, e, *s)?;
        }
    }
    let first = run_config(&file, &file.runs[0], file.seeds[0])?;
    eprintln!("loading {} ...", first.data.display());
    let mut data = prepare(&first)?;
    let key = |c: &TrainConfig| (c.data.clone(), c.eval_split.clone(), c.item_id_token, c.char_ngrams, c.protocol());
    let mut data_key = key(&first);
    let mut results: Vec<RunResult> = Vec::new();
    let total: usize = file.runs.iter().map(|e| e.seeds.as_ref().unwrap_or(&file.seeds).len()).sum();
    let mut done = 0;
    for entry in &file.runs {
        for &seed in entry.seeds.as_ref().unwrap_or(&file.seeds) {
            done += 1;
            let cfg = run_config(&file, entry, seed)?;
            if cfg.data != first.data || cfg.eval_split != first.eval_split {
                bail!("run {:?}: every run must use the same data and evaluation split", entry.name);
            }
            if cfg.protocol() != first.protocol() || cfg.bm25() != first.bm25() {
                bail!("run {:?}: every run must use the same evaluation protocol and BM25 settings", entry.name);
            }
            crate::checkpoint::remove_stale_temp_files(&cfg.out)?;
            let saved = cfg.out.join("result.json");
            let reusable = std::fs::read(&saved)
                .ok()
                .and_then(|b| serde_json::from_slice::<RunResult>(&b).ok())
                .filter(|r| r.config == cfg && r.name == entry.name);
            if let Some(r) = reusable {
                eprintln!("[{done}/{total}] {} seed {seed}: reused {}", entry.name, saved.display());
                results.push(r);
                continue;
            }
            if key(&cfg) != data_key {
                // Another featurisation (item-id token, n-grams) or protocol.
                data = prepare(&cfg)?;
                data_key = key(&cfg);
            }
            eprintln!("[{done}/{total}] {} seed {seed}: training {} steps", entry.name, cfg.steps);
            let mut run = Run::start(cfg.clone(), &data)?;
            let mut curve = Vec::new();
            let summary = train(&mut run, &data, &mut |step, secs, values| {
                if let Some((_, r)) = values.iter().find(|(k, _)| *k == "recall_at_10") {
                    curve.push((step, secs, *r));
                }
                Ok(())
            })?;
            let r = RunResult {
                name: entry.name.clone(),
                seed,
                metrics: summary.metrics,
                train_seconds: summary.train_seconds,
                tower_evals_per_step: summary.tower_evals_per_step,
                state_bytes: summary.state_bytes,
                curve,
                config: cfg.clone(),
                protocol: cfg.protocol().describe(),
            };
            let _ = std::fs::remove_file(cfg.out.join("checkpoint.ckpt"));
            write_atomically(&saved, |f| serde_json::to_writer_pretty(f, &r).map_err(Into::into))?;
            eprintln!(
                "    Recall@10 {:.4}, MRR@10 {:.4}, {:.0} s",
                r.metrics.recall_at_10, r.metrics.mrr_at_10, r.train_seconds
            );
            results.push(r);
        }
    }
    let baselines = evaluate_baselines(&data.ds, &data.evaluator, first.bm25())?;
    write_results(&file, &results, &baselines, &first)?;
    Ok(())
}

/// Whether `name` can be used as one file-name component: no separators,
/// no `..`, no hidden or empty names.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn mean_spread(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let sd = if xs.len() > 1 { (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    (mean, sd)
}

fn write_results(file: &CompareFile, results: &[RunResult], b: &Baselines, cfg: &TrainConfig) -> anyhow::Result<()> {
    let mut by_run: BTreeMap<usize, Vec<&RunResult>> = BTreeMap::new();
    for r in results {
        let Some(i) = file.runs.iter().position(|e| e.name == r.name) else {
            bail!("a result of run {:?}, which the file does not have", r.name);
        };
        by_run.entry(i).or_default().push(r);
    }
    let headers = [
        "run",
        "seeds",
        "Recall@10",
        "MRR@10",
        "Recall@100",
        "train s",
        "tower evals/step",
        "trainer MB",
        "what it tests",
    ];
    let mut rows = Vec::new();
    let pm = |xs: Vec<f64>| {
        let (m, sd) = mean_spread(&xs);
        if xs.len() > 1 {
            format!("{} ± {:.4}", fmt_metric(m), sd)
        } else {
            fmt_metric(m)
        }
    };
    for (i, rs) in &by_run {
        let e = &file.runs[*i];
        rows.push(vec![
            format!("{}{}", e.name, cfg.protocol().label()),
            rs.len().to_string(),
            pm(rs.iter().map(|r| r.metrics.recall_at_10).collect()),
            pm(rs.iter().map(|r| r.metrics.mrr_at_10).collect()),
            pm(rs.iter().map(|r| r.metrics.recall_at_100).collect()),
            format!("{:.0}", mean_spread(&rs.iter().map(|r| r.train_seconds).collect::<Vec<_>>()).0),
            format!("{:.0}", rs[0].tower_evals_per_step),
            format!("{:.1}", rs[0].state_bytes as f64 / 1e6),
            e.about.clone(),
        ]);
    }
    let bm25 = format!("BM25 (k1 {}, b {})", b.bm25_config.k1, b.bm25_config.b);
    for (name, m) in [(bm25.as_str(), &b.bm25), ("popularity", &b.popularity)] {
        rows.push(vec![
            format!("{name}{}", cfg.protocol().label()),
            "-".into(),
            fmt_metric(m.recall_at_10),
            fmt_metric(m.mrr_at_10),
            fmt_metric(m.recall_at_100),
            "-".into(),
            "-".into(),
            "-".into(),
            "reference".into(),
        ]);
    }
    let table = markdown_table(&headers, &rows);
    std::fs::create_dir_all(&file.out)?;
    let stem = file.out.join("compare");
    let mean_curve = |rs: &[&RunResult], x_secs: bool| -> Vec<(f64, f64)> {
        let n = rs.iter().map(|r| r.curve.len()).min().unwrap_or(0);
        (0..n)
            .map(|k| {
                let x = rs.iter().map(|r| if x_secs { r.curve[k].1 } else { r.curve[k].0 as f64 }).sum::<f64>()
                    / rs.len() as f64;
                let y = rs.iter().map(|r| r.curve[k].2).sum::<f64>() / rs.len() as f64;
                (x, y)
            })
            .collect()
    };
    let refs = [("BM25".to_owned(), b.bm25.recall_at_10), ("popularity".to_owned(), b.popularity.recall_at_10)];
    let mut groups: Vec<&str> = Vec::new();
    for e in &file.runs {
        if !groups.contains(&e.group.as_str()) {
            groups.push(&e.group);
        }
    }
    let mut plots = Vec::new();
    for g in &groups {
        let in_group = |i: &usize| file.runs[*i].group == *g;
        let steps: Vec<Series> = by_run
            .iter()
            .filter(|(i, _)| in_group(i))
            .map(|(i, rs)| Series::new(file.runs[*i].name.clone(), mean_curve(rs, false)))
            .collect();
        let secs: Vec<Series> = by_run
            .iter()
            .filter(|(i, _)| in_group(i))
            .map(|(i, rs)| Series::new(file.runs[*i].name.clone(), mean_curve(rs, true)))
            .collect();
        let name = format!("compare-{g}");
        line_chart(
            &stem.with_file_name(format!("{name}-steps")),
            &format!("Recall@10 against steps ({g})"),
            "step",
            "Recall@10",
            &steps,
            &refs,
        )?;
        line_chart(
            &stem.with_file_name(format!("{name}-seconds")),
            &format!("Recall@10 against training time ({g})"),
            "seconds of training",
            "Recall@10",
            &secs,
            &refs,
        )?;
        plots.push(format!("`{name}-steps.svg`, `{name}-seconds.svg`"));
    }
    let doc = format!(
        "# {}\n\nData: `{}`, split `{}`; evaluation: {}. {} steps of batch {} per run (unless the run says otherwise); \
         mean ± standard deviation over seeds. Curves: {} \
         (periodic evaluations on {}; the table's figures use every query).\n\n{}\n",
        file.title,
        cfg.data.display(),
        cfg.eval_split,
        cfg.protocol().describe(),
        cfg.steps,
        cfg.batch,
        plots.join("; "),
        if cfg.eval_queries == 0 { "every judged query".to_owned() } else { format!("the first {} judged queries", cfg.eval_queries) },
        table
    );
    write_atomically(&stem.with_extension("md"), |f| f.write_all(doc.as_bytes()).map_err(Into::into))?;
    println!("{doc}");
    Ok(())
}
