//! Convergence fixtures: short training runs that must reach stored bands.
//!
//! A file in `fixtures/expected/` with format `negcache-convergence-v1`
//! names runs, each a set of [`TrainConfig`] settings (over the defaults),
//! and for each metric a band `[min, max]` measured on real runs, with the
//! command that measured it. `negcache verify` trains each run and reports
//! it as passed or failed like a reference case. The `data` path of a run
//! is relative to the fixture file's directory.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::reference::{CaseResult, Outcome};
use crate::train::{prepare, train, Run, TrainConfig};

/// The format tag of a convergence fixture.
pub const FORMAT: &str = "negcache-convergence-v1";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    format: String,
    #[serde(default)]
    #[allow(dead_code)]
    note: String,
    runs: Vec<RunSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunSpec {
    name: String,
    config: serde_json::Value,
    bands: std::collections::BTreeMap<String, Band>,
    #[allow(dead_code)]
    command: String,
    #[serde(default)]
    #[allow(dead_code)]
    measured: serde_json::Value,
}

/// The metrics a band may bound.
const METRICS: [&str; 5] = ["recall_at_1", "recall_at_10", "recall_at_100", "mrr_at_10", "ndcg_at_10"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Band {
    min: f64,
    max: f64,
}

/// Fixture formats of this project that `verify` does not run (other tests
/// check them): found in a directory of fixtures they are skipped, named
/// on their own they are refused. Any other format is an error, so that a
/// misspelled tag cannot pass unchecked.
pub const OTHER_FORMATS: &[&str] = &[
    "negcache-firmware-v1",
    "negcache-planted-v1",
    "negcache-optim-v1",
    "negcache-bm25-reference-v1",
    "negcache-trec-metrics-v1",
];

/// The format tag of a JSON fixture file; errors name the file.
pub fn file_format(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    match v.get("format").and_then(serde_json::Value::as_str) {
        Some(f) => Ok(f.to_owned()),
        None => bail!("{}: no string field `format` (expected {FORMAT:?})", path.display()),
    }
}

/// Whether `path` is a convergence fixture (by its format tag).
pub fn is_convergence_file(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["format"] == FORMAT)
}

/// Trains every run of the file and checks its bands.
pub fn run_file(path: &Path) -> anyhow::Result<Vec<CaseResult>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let file: File =
        serde_json::from_str(&text).with_context(|| format!("{}: not a convergence fixture", path.display()))?;
    if file.format != FORMAT {
        bail!("{}: format must be {FORMAT:?}, found {:?}", path.display(), file.format);
    }
    if file.runs.is_empty() {
        bail!("{}: field `runs` is empty: a convergence fixture must hold at least one run", path.display());
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for spec in &file.runs {
        out.push(match run_one(spec, base) {
            Ok(r) => r,
            Err(e) => CaseResult {
                name: spec.name.clone(),
                kind: "convergence".into(),
                outcome: Outcome::Malformed(format!("{e:#}")),
                max_deviation: f64::NAN,
                worst_field: String::new(),
            },
        });
    }
    Ok(out)
}

fn run_one(spec: &RunSpec, base: &Path) -> anyhow::Result<CaseResult> {
    // The bands are checked before anything is trained.
    if spec.bands.is_empty() {
        bail!("bands: empty, so nothing would be checked");
    }
    for metric in spec.bands.keys() {
        if !METRICS.contains(&metric.as_str()) {
            bail!("bands.{metric}: unknown metric; expected one of {}", METRICS.join(", "));
        }
    }
    for (metric, band) in &spec.bands {
        if !(band.min.is_finite() && band.max.is_finite() && band.min <= band.max) {
            bail!("bands.{metric}: min {} and max {} must be finite with min <= max", band.min, band.max);
        }
    }
    let mut merged = serde_json::to_value(TrainConfig::default())?;
    let overrides = spec.config.as_object().context("config must be an object of settings")?;
    for (k, v) in overrides {
        if merged.get(k).is_none() {
            bail!("config: unknown setting {k:?}");
        }
        merged[k] = v.clone();
    }
    let mut cfg: TrainConfig = serde_json::from_value(merged).context("config")?;
    cfg.validate().context("config")?;
    cfg.data = base.join(&cfg.data);
    cfg.out = std::env::temp_dir().join(format!("negcache-verify-{}-{}", spec.name, std::process::id()));
    cfg.eval_every = 0;
    let data = prepare(&cfg)?;
    let mut run = Run::start(cfg.clone(), &data)?;
    let summary = train(&mut run, &data, &mut |_, _, _| Ok(()))?;
    let _ = std::fs::remove_dir_all(&cfg.out);
    let m = summary.metrics;
    let value = |name: &str| -> anyhow::Result<f64> {
        Ok(match name {
            "recall_at_1" => m.recall_at_1,
            "recall_at_10" => m.recall_at_10,
            "recall_at_100" => m.recall_at_100,
            "mrr_at_10" => m.mrr_at_10,
            "ndcg_at_10" => m.ndcg_at_10,
            other => bail!("bands: unknown metric {other:?}"),
        })
    };
    let mut failure = None;
    let mut worst = (0.0f64, String::new());
    for (metric, band) in &spec.bands {
        let v = value(metric)?;
        let miss = if v < band.min {
            band.min - v
        } else if v > band.max {
            v - band.max
        } else {
            0.0
        };
        if miss >= worst.0 {
            worst = (miss, format!("{metric} = {v:.4} (band {:.4}..{:.4})", band.min, band.max));
        }
        if miss > 0.0 && failure.is_none() {
            failure = Some(format!("{metric} = {v:.4} is outside {:.4}..{:.4}", band.min, band.max));
        }
    }
    Ok(CaseResult {
        name: spec.name.clone(),
        kind: "convergence".into(),
        outcome: failure.map_or(Outcome::Pass, Outcome::Fail),
        max_deviation: worst.0,
        worst_field: worst.1,
    })
}
