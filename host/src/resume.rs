//! What a checkpoint carries besides the trainer's state, so that a resumed
//! run continues exactly as an uninterrupted one would: the logging window,
//! the training clock, and which settings may change on resume.
//!
//! A resumed run
//! * writes next to the checkpoint it resumes, or into `--out`, never into
//!   the directory stored inside the checkpoint ([`out_dir`]);
//! * refuses settings that would change what is trained, and applies the
//!   evaluation, logging and length settings ([`apply_settings`]);
//! * continues the loss window and the clock of `metrics.csv`
//!   ([`Progress`]), and keeps exactly the rows an uninterrupted run would
//!   have logged up to its step ([`keeps_row`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use negcache::trainer::StepReport;
use serde::{Deserialize, Serialize};

use crate::report::Row;
use crate::train::TrainConfig;

/// Steps per row of training losses in `metrics.csv` (rows fall on the
/// multiples of this, and on the last step).
pub const LOSS_WINDOW: u64 = 100;

/// Sums of the step reports since the last logged loss row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossWindow {
    /// Sum of training losses.
    pub training_loss: f64,
    /// Sum of interpretable losses.
    pub interpretable_loss: f64,
    /// Sum of staleness values.
    pub staleness: f64,
    /// Sum of probabilities of the positive.
    pub prob_pos: f64,
    /// Steps summed.
    pub steps: u64,
}

impl LossWindow {
    /// Adds one step's report.
    pub fn add(&mut self, r: &StepReport) {
        self.training_loss += f64::from(r.training_loss);
        self.interpretable_loss += f64::from(r.interpretable_loss);
        self.staleness += f64::from(r.staleness);
        self.prob_pos += f64::from(r.prob_pos);
        self.steps += 1;
    }

    /// The means, named as the `metrics.csv` columns.
    pub fn means(&self) -> [(&'static str, f64); 4] {
        let k = self.steps.max(1) as f64;
        [
            ("training_loss", self.training_loss / k),
            ("interpretable_loss", self.interpretable_loss / k),
            ("staleness", self.staleness / k),
            ("prob_pos", self.prob_pos / k),
        ]
    }
}

/// The run's progress besides the trainer's state, stored in the
/// checkpoint header as `progress`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Progress {
    /// Seconds of training so far (evaluation excluded): the `wall_s`
    /// column continues from here.
    pub train_seconds: f64,
    /// Tower evaluations so far.
    pub tower_evals: u64,
    /// The loss window not yet complete. At the end of a run its last,
    /// partial window is logged but kept here, so that a run resumed to
    /// more steps logs the same full window as an uninterrupted one.
    pub window: LossWindow,
    /// Whether the checkpoint was written at the end of a run (its final,
    /// all-query evaluation is in `metrics.csv` at this step).
    pub finished: bool,
}

impl Progress {
    /// Reads the header's `progress` (absent in older checkpoints: zero).
    pub fn from_header(header: &serde_json::Value, what: &Path) -> anyhow::Result<Self> {
        let p: Self = match header.get("progress") {
            None | Some(serde_json::Value::Null) => Self::default(),
            Some(v) => serde_json::from_value(v.clone())
                .with_context(|| format!("{}: header field `progress` is malformed", what.display()))?,
        };
        let w = &p.window;
        let finite = [p.train_seconds, w.training_loss, w.interpretable_loss, w.staleness, w.prob_pos];
        ensure!(
            finite.iter().all(|x| x.is_finite()) && p.train_seconds >= 0.0,
            "{}: header field `progress` holds a negative or non-finite number",
            what.display()
        );
        Ok(p)
    }
}

/// Settings that may differ between a checkpoint and its resumed run: they
/// change how far the run goes, how it is evaluated and logged, and where
/// the data is found, but not what one step computes.
pub const CHANGEABLE: &[&str] = &[
    "steps",
    "eval_every",
    "eval_queries",
    "eval_split",
    "checkpoint_every",
    "ignore_identical_ids",
    "exclude_train",
    "merge_identical_text",
    "eval_depth",
    "bm25_k1",
    "bm25_b",
    "data",
];

/// The flag that sets a setting: `inv_temp` is `--inv-temp`.
pub fn flag(setting: &str) -> String {
    format!("--{}", setting.replace('_', "-"))
}

/// The settings of a resumed run: `stored` (the checkpoint's) with the
/// changeable settings of `requested` (the checkpoint's overlaid with the
/// config file and flags the user gave). Any other difference is an error
/// naming every such setting, its value and the checkpoint's. The output
/// directory is not compared (see [`out_dir`]). Returns the settings and a
/// line per applied change.
pub fn apply_settings(stored: &TrainConfig, requested: &TrainConfig) -> anyhow::Result<(TrainConfig, Vec<String>)> {
    let old = serde_json::to_value(stored)?;
    let new = serde_json::to_value(requested)?;
    let (Some(old), Some(new)) = (old.as_object(), new.as_object()) else {
        bail!("settings are not a JSON object");
    };
    let mut applied = Vec::new();
    let mut refused = Vec::new();
    for (key, value) in new {
        if key == "out" || old.get(key) == Some(value) {
            continue;
        }
        let was = old.get(key).map_or_else(|| "none".to_owned(), show);
        let line = format!("{} {} (the checkpoint's: {was})", flag(key), show(value));
        if CHANGEABLE.contains(&key.as_str()) {
            applied.push(line);
        } else {
            refused.push(line);
        }
    }
    if !refused.is_empty() {
        bail!(
            "cannot change on resume, since the resumed run would no longer continue the checkpoint's: {}. \
             Only {} may change; start a new run (another --out) to train with other settings",
            refused.join(", "),
            CHANGEABLE.iter().map(|s| flag(s)).collect::<Vec<_>>().join(", ")
        );
    }
    let mut cfg = requested.clone();
    cfg.out = stored.out.clone();
    Ok((cfg, applied))
}

/// A setting's value as a user writes it: strings unquoted, and an f32
/// setting in its shortest form (0.002, not 0.0020000000949949026).
fn show(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "none".into(),
        serde_json::Value::Number(n) => match (n.as_f64(), n.is_f64()) {
            (Some(x), true) if f64::from(x as f32) == x => format!("{}", x as f32),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// A config file's settings over `cfg` (only the keys the file names).
pub fn overlay_toml(cfg: &TrainConfig, path: &Path) -> anyhow::Result<TrainConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read config", path.display()))?;
    let file: toml::Table = toml::from_str(&text).with_context(|| format!("{}: invalid config", path.display()))?;
    let mut table = toml::Table::try_from(cfg)?;
    for (k, v) in file {
        if !table.contains_key(&k) {
            bail!("{}: unknown setting {k:?}", path.display());
        }
        table.insert(k, v);
    }
    table.try_into().with_context(|| format!("{}: invalid config", path.display()))
}

/// Where a resumed run writes: `--out` when given, else the directory of
/// the checkpoint it resumes.
pub fn out_dir(checkpoint: &Path, out: Option<&Path>) -> PathBuf {
    match out {
        Some(o) => o.to_path_buf(),
        None => match checkpoint.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        },
    }
}

/// Whether a row of an earlier `metrics.csv` stays when a run resumes from
/// a checkpoint at `step`: the rows an uninterrupted run would have logged
/// by then. A checkpoint written at the end of a run (`finished`) had its
/// last loss window and its all-query evaluation logged at `step`; a longer
/// run logs neither there, save a loss row on a window boundary.
pub fn keeps_row(row: &Row, step: u64, finished: bool) -> bool {
    if row.step != step {
        return row.step < step;
    }
    !finished || (step % LOSS_WINDOW == 0 && row.get("training_loss").is_some())
}

/// Whether a row stays when the outputs of a run whose final checkpoint is
/// at `step` are completed: everything before, and the last loss row; the
/// final evaluation is logged again.
pub fn keeps_row_to_complete(row: &Row, step: u64) -> bool {
    row.step < step || (row.step == step && row.get("training_loss").is_some())
}

/// Whether `out` holds the complete outputs of a run at `step`: its
/// `summary.json`, written last, says so.
pub fn outputs_complete(out: &Path, step: u64) -> bool {
    std::fs::read(out.join("summary.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v["summary"]["steps"].as_u64() == Some(step))
}

#[cfg(test)]
mod tests {

    /// The loss window's f64 sums go through the checkpoint header as JSON
    /// and must come back bit for bit (serde_json's `float_roundtrip`).
    #[test]
    fn header_floats_read_back_exactly() {
        let (mut x, mut state) = (0.0f64, 0x9e37_79b9_7f4a_7c15u64);
        for _ in 0..200_000 {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            x += f64::from((state >> 40) as f32 / 16_777_216.0);
            let text = serde_json::to_string(&x).unwrap();
            let back: f64 = serde_json::from_str(&text).unwrap();
            assert_eq!(x.to_bits(), back.to_bits(), "{text}");
        }
    }
    use super::*;

    #[test]
    fn fixed_settings_are_refused_and_changeable_ones_applied() {
        let stored = TrainConfig::default();
        let mut req = stored.clone();
        req.steps = 20_000;
        req.eval_depth = 100;
        let (cfg, applied) = apply_settings(&stored, &req).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(cfg.steps, 20_000);
        assert_eq!(applied.len(), 2, "{applied:?}");
        assert!(applied.iter().any(|l| l.starts_with("--steps 20000")), "{applied:?}");
        req.lr = 5.0;
        req.batch = 8;
        req.seed = 3;
        let e = format!("{:#}", apply_settings(&stored, &req).unwrap_err());
        for f in ["--lr 5 (the checkpoint's: 0.004)", "--batch 8", "--seed 3"] {
            assert!(e.contains(f), "{e}");
        }
        assert!(!e.contains("--steps 20000"), "{e}");
    }

    #[test]
    fn a_finished_run_keeps_only_the_rows_a_longer_run_has() {
        let row = |step, col: &str| Row { step, wall_s: 0.0, values: [(col.to_owned(), 1.0)].into_iter().collect() };
        assert!(keeps_row(&row(49, "training_loss"), 50, true));
        assert!(!keeps_row(&row(50, "training_loss"), 50, true));
        assert!(!keeps_row(&row(50, "recall_at_10"), 50, true));
        assert!(keeps_row(&row(50, "recall_at_10"), 50, false));
        assert!(keeps_row(&row(100, "training_loss"), 100, true));
        assert!(!keeps_row(&row(100, "recall_at_10"), 100, true));
        assert!(!keeps_row(&row(51, "training_loss"), 50, false));
    }
}
