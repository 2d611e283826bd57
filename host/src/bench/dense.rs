//! The original TensorFlow library's benchmark model, run through the core
//! in that benchmark's five configurations: dense features F = 128, each
//! tower Dense(128, relu) -> Dense(64) -> L2, score 20 <q, d>, batch 32,
//! Adam; items carry their features.
//!
//! Each configuration runs in a child process of its own (`negcache bench
//! --dense-one NAME`), so that its peak resident memory is its own; the
//! parent gathers the figures, prints them and writes `--json`. With
//! `--tf-lib`, each configuration also runs in the TF library through
//! [`TF_SCRIPT`], just before negcache's run of it in every round.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use negcache::kernel;
use negcache::layered::{LayerTowers, Twin};
use negcache::layers::{Act, Activation, Chain, Dense, L2};
use negcache::random;
use negcache::tower::{Model, Towers};
use negcache::trainer::{Batch, Objective, Trainer, TrainerConfig};
use rand_core::SeedableRng;
use rand_pcg::Pcg64Mcg;
use serde::{Deserialize, Serialize};

use crate::store::OwnedCache;

/// Feature width.
pub const F: usize = 128;
/// Embedding width.
pub const D: usize = 64;
/// Batch size.
pub const BATCH: usize = 32;
/// Dense(128, relu) -> Dense(64) -> L2, with Adam's state.
pub type Tower = Chain<Dense<F, 128, 2>, Chain<Act<128>, Chain<Dense<128, D, 2>, L2<D>, D>, 128>, 128>;
/// The two towers, with a twin of the item tower so that the full
/// softmax back-propagates the halves of its corpus on two threads.
pub type DenseModel = LayerTowers<Tower, Tower, F, F, 2, Twin<Tower>>;
type DenseTrainer = Trainer<DenseModel, [f32; F], [f32; F], D, BATCH, 1>;

/// The original TensorFlow library on this benchmark, measured on an
/// Intel Xeon VM with 2 threads in issue 14: steps/s per configuration,
/// and the goal for negcache as a multiple of it. `--tf-lib` measures TF
/// on the machine at hand instead.
pub const TF_STEPS_PER_S: [(&str, f64, f64); 5] = [
    ("cache_N4096", 358.5, 4.0),
    ("cache_N65536", 32.9, 10.0),
    ("cache_N65536_topk64", 50.7, 6.0),
    ("inbatch_B32", 1266.0, 2.0),
    ("fullsoftmax_C4096", 157.6, 1.5),
];
/// The TF library's peak resident memory on this benchmark, MiB (lowest
/// and highest configuration).
pub const TF_PEAK_RSS_MIB: (f64, f64) = (545.0, 799.0);

/// The script that runs the benchmark model in the TF library, one
/// configuration per call (`--one NAME`), relative to the project root.
pub const TF_SCRIPT: &str = "fixtures/bench/tf_dense.py";

/// One configuration's figures in the TF library, as [`TF_SCRIPT`] prints
/// them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TfFigure {
    /// Median steps per second over the timed windows (of the rounds,
    /// once gathered).
    pub steps_per_s: f64,
    /// Timed windows.
    pub windows: usize,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: f64,
    /// TF's intra- and inter-op threads.
    pub threads: usize,
    /// TensorFlow's version.
    pub tf_version: String,
    /// Each round's steps per second, in the order they ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<f64>,
}

/// The five configurations: name, objective, cache (or corpus) size,
/// top-k.
pub const CONFIGS: [(&str, Objective, usize, usize); 5] = [
    ("cache_N4096", Objective::Cache, 4096, 0),
    ("cache_N65536", Objective::Cache, 65_536, 0),
    ("cache_N65536_topk64", Objective::Cache, 65_536, 64),
    ("inbatch_B32", Objective::InBatch, BATCH, 0),
    ("fullsoftmax_C4096", Objective::Full, 4096, 0),
];

/// One configuration's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DenseFigure {
    /// Configuration name.
    pub name: String,
    /// Median steps per second over the timed windows.
    pub steps_per_s: f64,
    /// Timed windows.
    pub windows: usize,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: f64,
    /// Threads the training step used (gathered over rounds: the most any
    /// round used, as each process decides for itself).
    pub threads: usize,
    /// Steps per second of the same configuration on one thread, measured
    /// in the same run, in each round that used more than one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_thread_steps_per_s: Option<f64>,
    /// Each round's steps per second, in the order they ran (the figure is
    /// their median).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<f64>,
    /// Each round's steps per second on one thread, when measured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub one_thread_rounds: Vec<f64>,
    /// The same configuration in the TF library, measured side by side
    /// (`--tf-lib`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tf: Option<TfFigure>,
}

/// Rounds of every configuration in `negcache bench --dense`: the
/// two-thread figures on this VM moved by up to a fifth between runs
/// minutes apart, so each figure is the median of rounds spread over the
/// whole benchmark, with their range.
pub const ROUNDS: usize = 3;

/// The median of `xs` (the upper middle value for an even count).
fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn tower() -> Tower {
    Chain(Dense::new(), Chain(Act(Activation::Relu), Chain(Dense::new(), L2)))
}

/// Features uniform in [-1, 1), a function of `stream` and `index` alone:
/// value `i` is SplitMix64's finaliser (`negcache::item::finish`) of a
/// counter, a few instructions per value, so that drawing a batch's
/// features costs the step next to nothing.
fn features(stream: u64, index: usize) -> [f32; F] {
    use negcache::item::finish;
    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    let base = finish(stream.wrapping_mul(GOLDEN) ^ index as u64);
    std::array::from_fn(|i| {
        let z = finish(base.wrapping_add((i as u64 + 1).wrapping_mul(GOLDEN)));
        (z >> 40) as f32 * (2.0 / (1u64 << 24) as f32) - 1.0
    })
}

/// Item `j`'s features.
fn item_features(j: usize) -> [f32; F] {
    features(1, j)
}

/// Query `j`'s features (4,096 distinct queries).
fn query_features(j: usize) -> [f32; F] {
    features(2, j)
}

/// Runs configuration `name` in this process for about `seconds` after a
/// warm-up and returns its figures.
pub fn run_one(name: &str, seconds: f64) -> anyhow::Result<DenseFigure> {
    let &(_, objective, size, top_k) =
        CONFIGS.iter().find(|c| c.0 == name).with_context(|| format!("no dense configuration {name:?}"))?;
    let mut rng = Pcg64Mcg::seed_from_u64(7);
    // Twice the cache's items, so that about half the positives are new.
    // Each item's and query's features are drawn from its index when it is
    // needed, so that the process holds no dataset beside the cache: its
    // peak resident memory is the trainer's and the cache's.
    let n_items = (2 * size).max(4096);
    let cfg = TrainerConfig { objective, top_k, ..TrainerConfig::DEFAULT };
    let mut trainer = Box::new(DenseTrainer::new(LayerTowers::new(tower(), tower(), 20.0).with_twin(tower()), cfg));
    trainer.model.init(&mut rng);
    trainer.init()?;
    let mut cache = OwnedCache::<[f32; F], D>::new(size)?;
    // Full softmax needs its corpus as one slice; it is only 4,096 items.
    let corpus: Vec<[f32; F]> =
        if objective == Objective::Full { (0..size.min(n_items)).map(item_features).collect() } else { Vec::new() };
    if objective == Objective::Cache {
        // A full cache from the first timed step, as in a long run.
        let mut c = cache.as_mut();
        let mut e = [[0.0f32; D]; BATCH];
        for j0 in (0..size).step_by(BATCH) {
            let chunk: [[f32; F]; BATCH] = std::array::from_fn(|k| item_features(j0 + k));
            let n = BATCH.min(size - j0);
            trainer.model.embed_items(&chunk[..n], &mut e[..n]);
            for k in 0..n {
                c.set_slot(j0 + k, &e[k], chunk[k], 0, true)?;
            }
        }
    }
    let threads = crate::threads::shared();
    let mut step = |rng: &mut Pcg64Mcg| -> anyhow::Result<()> {
        let pool = if objective == Objective::Full { corpus.len() } else { n_items };
        let picks: [usize; BATCH] = std::array::from_fn(|_| random::below(rng, pool as u32) as usize);
        let q: [[f32; F]; BATCH] = std::array::from_fn(|b| query_features(picks[b] % 4096));
        let p: [[f32; F]; BATCH] = std::array::from_fn(|b| item_features(picks[b]));
        let index: [u32; BATCH] = std::array::from_fn(|b| picks[b] as u32);
        let batch = Batch { queries: &q, positives: &p, positive_index: Some(&index) };
        trainer.step_on(&*threads, &mut cache.as_mut(), &batch, &corpus, 1e-3, rng)?;
        Ok(())
    };
    for _ in 0..20 {
        step(&mut rng)?;
    }
    let (window, mut rates) = ((seconds / 12.0).max(0.05), Vec::new());
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < seconds || rates.len() < 3 {
        let (t, mut n) = (Instant::now(), 0usize);
        while t.elapsed().as_secs_f64() < window {
            step(&mut rng)?;
            n += 1;
        }
        rates.push(n as f64 / t.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    let rss = super::peak_rss().map_or(f64::NAN, |b| b as f64 / (1 << 20) as f64);
    Ok(DenseFigure {
        name: name.into(),
        steps_per_s: rates[rates.len() / 2],
        windows: rates.len(),
        peak_rss_mib: rss,
        // The cache objectives' scoring pass is split at tiles of queries,
        // and the full softmax's corpus embedding at items, each only when
        // a piece's work is worth a hand-over (the full softmax's halves
        // split by the same measure, with twice the work per item).
        threads: match objective {
            Objective::Cache => kernel::pass_threads(&*threads, BATCH, size, D),
            Objective::Full => negcache::parallel::split_parts(&*threads, corpus.len(), DenseModel::item_work(D)),
            _ => 1,
        },
        one_thread_steps_per_s: None,
        rounds: Vec::new(),
        one_thread_rounds: Vec::new(),
        tf: None,
    })
}

/// Runs every configuration, each in a child process, prints a table and
/// writes the figures to `json` and a report beside the TF figures to
/// `markdown`, if given.
pub fn run_all(
    seconds: f64,
    json: Option<&Path>,
    markdown: Option<&Path>,
    tf_lib: Option<&Path>,
) -> anyhow::Result<Vec<DenseFigure>> {
    if let Some(lib) = tf_lib {
        anyhow::ensure!(
            lib.join("negative_cache").join("losses.py").is_file(),
            "{}: no negative_cache/losses.py here; --tf-lib takes the directory that holds the TF library's \
             negative_cache folder",
            lib.display()
        );
        anyhow::ensure!(
            Path::new(TF_SCRIPT).is_file(),
            "{TF_SCRIPT} not found: run `negcache bench --dense --tf-lib` from the project's root"
        );
    }
    // The load before any configuration runs: how idle the machine was.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let exe = std::env::current_exe().context("cannot find this program to run the configurations")?;
    let mut figures = Vec::new();
    let child = |name: &str, threads: usize| -> anyhow::Result<DenseFigure> {
        let out = std::process::Command::new(&exe)
            .args(["bench", "--dense-one", name, "--seconds", &seconds.to_string()])
            .args(["--threads", &threads.to_string()])
            .output()
            .with_context(|| format!("cannot run {}", exe.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "configuration {name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        serde_json::from_slice(&out.stdout).with_context(|| format!("configuration {name} printed no figures"))
    };
    let tf_child = |name: &str, lib: &Path| -> anyhow::Result<TfFigure> {
        let out = std::process::Command::new("python3")
            .arg(TF_SCRIPT)
            .arg("--lib")
            .arg(lib)
            .args(["--one", name, "--seconds", &seconds.to_string()])
            .args(["--threads", &crate::threads::count().to_string()])
            .output()
            .context("cannot run python3 for the TF library's figures")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            // TF logs a great deal; the end of it says what went wrong.
            let err = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = err.trim().lines().collect();
            anyhow::bail!("configuration {name} failed in TF:\n{}", lines[lines.len().saturating_sub(20)..].join("\n"));
        }
        let last = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(last).with_context(|| format!("configuration {name} in TF printed no figures"))
    };
    for round in 1..=ROUNDS {
        for (k, (name, ..)) in CONFIGS.iter().enumerate() {
            let tf = match tf_lib {
                Some(lib) => {
                    eprintln!("dense benchmark model, round {round} of {ROUNDS}, {name} in the TF library ...");
                    Some(tf_child(name, lib)?)
                }
                None => None,
            };
            eprintln!("dense benchmark model, round {round} of {ROUNDS}, {name} ...");
            let fig = child(name, crate::threads::count())?;
            let one = if fig.threads > 1 {
                // The same configuration on one thread, side by side.
                eprintln!("dense benchmark model, round {round} of {ROUNDS}, {name} on one thread ...");
                Some(child(name, 1)?.steps_per_s)
            } else {
                None
            };
            if round == 1 {
                figures.push(DenseFigure { tf: tf.clone(), ..fig.clone() });
            }
            let f = &mut figures[k];
            f.rounds.push(fig.steps_per_s);
            f.one_thread_rounds.extend(one);
            f.peak_rss_mib = f.peak_rss_mib.max(fig.peak_rss_mib);
            f.threads = f.threads.max(fig.threads);
            if let (Some(all), Some(this)) = (&mut f.tf, tf) {
                all.rounds.push(this.steps_per_s);
                all.peak_rss_mib = all.peak_rss_mib.max(this.peak_rss_mib);
            }
        }
    }
    for f in &mut figures {
        f.steps_per_s = median(&f.rounds);
        f.one_thread_steps_per_s = (!f.one_thread_rounds.is_empty()).then(|| median(&f.one_thread_rounds));
        if let Some(tf) = &mut f.tf {
            tf.steps_per_s = median(&tf.rounds);
        }
    }
    println!("dense benchmark model (F 128, Dense(128, relu) -> Dense(64) -> L2, batch 32, Adam)");
    println!("load average before the runs: {load}");
    println!(
        "{:<22} {:>10} {:>8} {:>14} {:>8} {:>18} {:>12}",
        "config", "steps/s", "windows", "peak RSS MiB", "threads", "1-thread steps/s", "TF steps/s"
    );
    for f in &figures {
        println!(
            "{:<22} {:>10.1} {:>8} {:>14.1} {:>8} {:>18} {:>12}",
            f.name,
            f.steps_per_s,
            f.windows,
            f.peak_rss_mib,
            f.threads,
            f.one_thread_steps_per_s.map_or("-".into(), |x| format!("{x:.1}")),
            f.tf.as_ref().map_or("-".into(), |t| format!("{:.1}", t.steps_per_s))
        );
    }
    if let Some(path) = json {
        let doc = serde_json::json!({
            "model": "dense F=128, Dense(128, relu) -> Dense(64) -> L2, alpha 20, batch 32, Adam; items carry features",
            "load_average": load,
            "machine": super::machine().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            "configs": figures,
        });
        crate::checkpoint::write_atomically(path, |w| {
            serde_json::to_writer_pretty(&mut *w, &doc)?;
            Ok(writeln!(w)?)
        })?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = markdown {
        let text = report(&figures, &load, seconds);
        crate::checkpoint::write_atomically(path, |w| Ok(w.write_all(text.as_bytes())?))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(figures)
}

/// The markdown report: every configuration beside the TF library's
/// figure (measured in the same run when the figures hold TF's, otherwise
/// issue 14's) and the goal.
fn report(figures: &[DenseFigure], load: &str, seconds: f64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let machine = super::machine();
    let model = machine.iter().find(|(k, _)| k == "model").map_or("?", |(_, v)| v.as_str());
    let tf_flag = if figures.iter().any(|f| f.tf.is_some()) { " --tf-lib DIR" } else { "" };
    let _ = writeln!(out, "# The original library's benchmark model through negcache\n");
    let _ = writeln!(
        out,
        "Written by `negcache bench --dense --seconds {seconds}{tf_flag} --write docs/results/bench-dense.md --json \
         docs/results/bench-dense.json` (release build at this machine's vector width). Model: dense features \
         F = 128, each tower Dense(128, relu) -> Dense(64) -> L2, score 20 <q, d>, batch 32, Adam; items carry \
         their features, drawn from each item's index when a batch needs them (the process holds no dataset \
         beside the cache). Each configuration ran in its own process after 20 warm-up steps, in {ROUNDS} \
         rounds over all configurations; a round's figure is the median of its timed windows, and steps/s is \
         the median of the rounds (listed in the order they ran; figures move between rounds on this \
         VM).\n"
    );
    let _ = writeln!(out, "Machine: {model}. Load average before the runs: {load}.\n");
    let tf_version = figures.iter().find_map(|f| f.tf.as_ref()).map(|t| (t.tf_version.clone(), t.threads));
    match &tf_version {
        Some((version, threads)) => {
            let _ = writeln!(
                out,
                "The TF figures were measured in the same run, side by side: in every round each configuration \
                 ran in the original library (google-research's `negative_cache`, TensorFlow {version}, \
                 {threads} intra- and inter-op threads, ten steps per call into TF, through `{TF_SCRIPT}`, where \
                 DIR holds the library) and then in negcache. Issue 14's TF figures, measured on an Intel Xeon with AVX-512, are the last \
                 column, for reference; the ratio is the median of the rounds' ratios of negcache to TF, \
                 each round's pair measured back to back."
            );
        }
        None => {
            let _ = writeln!(
                out,
                "The TF figures are the original library's with 2 threads, measured on an Intel Xeon VM in issue \
                 14, not on this machine (`--tf-lib` measures them side by side)."
            );
        }
    }
    let _ = writeln!(
        out,
        "In negcache the cache configurations' scoring pass runs on the threads listed (split at \
         tiles of 16 queries, the same bits as on one, and only when a tile's pass is worth a hand-over: at \
         least twice the time of a hand-over to a parked worker, as each process measures it when it \
         starts). The full softmax embeds its corpus on the threads listed (split at item boundaries, \
         when each piece is worth a hand-over by the same measure), runs its first softmax pass in two halves \
         of the queries when each is worth one, and back-propagates the corpus in two fixed halves, the second into a twin of the item \
         tower, added to the first's at the end (`LayerTowers::with_twin`: other bits than one buffer's, the \
         same on any number of threads), each half with its share of the second softmax pass; the \
         other towers' work, the optimiser and the other objectives run on one. The towers take each side's inputs as one \
         batch (register-blocked matrix products in nalgebra's summation order, so the bits are those of one \
         input at a time). The threads column is the most any round used (each process decides for itself); \
         in each round that used more than one, the same configuration also ran on one thread just after, \
         and the column \"on one thread\" is the median of those runs.\n"
    );
    // One column list for both layouts: (name, right-aligned, shown). Side
    // by side adds TF's rounds, its memory and issue 14's figure.
    let side = tf_version.is_some();
    let columns: Vec<(&str, bool, bool)> = vec![
        ("config", false, true),
        ("TF steps/s", true, true),
        ("TF rounds", false, side),
        ("negcache steps/s", true, true),
        ("rounds", false, true),
        ("ratio", true, true),
        ("goal", true, true),
        ("met", false, true),
        ("peak RSS MiB", true, true),
        ("TF peak RSS MiB", true, side),
        ("threads", true, true),
        ("on one thread", true, true),
        ("issue 14's TF", true, side),
    ];
    let shown = |cells: Vec<String>| -> String {
        let kept: Vec<String> = cells.into_iter().zip(&columns).filter(|(_, c)| c.2).map(|(x, _)| x).collect();
        format!("| {} |", kept.join(" | "))
    };
    let _ = writeln!(out, "{}", shown(columns.iter().map(|c| c.0.to_string()).collect()));
    let rule: Vec<&str> = columns.iter().filter(|c| c.2).map(|c| if c.1 { "---:" } else { "---" }).collect();
    let _ = writeln!(out, "|{}|", rule.join("|"));
    let list = |xs: &[f64]| xs.iter().map(|r| format!("{r:.1}")).collect::<Vec<_>>().join(", ");
    for f in figures {
        let Some(&(_, issue_tf, goal)) = TF_STEPS_PER_S.iter().find(|t| t.0 == f.name) else { continue };
        let tf = f.tf.as_ref().map_or(issue_tf, |t| t.steps_per_s);
        // Side by side, each round's two figures ran back to back: the
        // ratio is the median of the rounds' ratios, so that a slow spell
        // of the machine weighs on both sides of one ratio.
        let ratio = match &f.tf {
            Some(t) => median(&f.rounds.iter().zip(&t.rounds).map(|(n, t)| n / t).collect::<Vec<_>>()),
            None => f.steps_per_s / tf,
        };
        let (tf_rounds, tf_rss) =
            f.tf.as_ref().map_or_else(Default::default, |t| (list(&t.rounds), format!("{:.1}", t.peak_rss_mib)));
        let _ = writeln!(
            out,
            "{}",
            shown(vec![
                f.name.clone(),
                format!("{tf:.1}"),
                tf_rounds,
                format!("{:.1}", f.steps_per_s),
                list(&f.rounds),
                format!("{ratio:.2}x"),
                format!("{goal}x"),
                (if ratio >= goal { "yes" } else { "no" }).into(),
                format!("{:.1}", f.peak_rss_mib),
                tf_rss,
                f.threads.to_string(),
                f.one_thread_steps_per_s.map_or("-".into(), |x| format!("{x:.1}")),
                format!("{issue_tf:.1}"),
            ])
        );
    }
    let worst = figures.iter().map(|f| f.peak_rss_mib).fold(0.0, f64::max);
    let tf_rss: Vec<(&str, f64, f64)> = figures
        .iter()
        .filter_map(|f| f.tf.as_ref().map(|t| (f.name.as_str(), f.peak_rss_mib, t.peak_rss_mib)))
        .collect();
    if tf_rss.is_empty() {
        let (lo, hi) = TF_PEAK_RSS_MIB;
        let _ = writeln!(
            out,
            "\nPeak resident memory: TF {lo:.0}-{hi:.0} MiB (issue 14's); negcache at most {worst:.1} MiB (goal: at \
             most 1/8 of TF's, {:.1} MiB).",
            lo / 8.0
        );
    } else {
        // The goal holds per configuration: negcache's against TF's in
        // the same configuration.
        let lo = tf_rss.iter().map(|r| r.2).fold(f64::INFINITY, f64::min);
        let hi = tf_rss.iter().map(|r| r.2).fold(0.0, f64::max);
        let missed: Vec<&str> = tf_rss.iter().filter(|r| r.1 > r.2 / 8.0).map(|r| r.0).collect();
        let verdict = if missed.is_empty() {
            "met in every configuration".into()
        } else {
            format!("missed in {}", missed.join(", "))
        };
        let _ = writeln!(
            out,
            "\nPeak resident memory: TF {lo:.1}-{hi:.1} MiB (this run's); negcache at most {worst:.1} MiB. Goal, at most \
             1/8 of TF's in the same configuration: {verdict}."
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The TF harness (`TF_SCRIPT`) draws item features with its own numpy
    /// transcription of [`item_features`]: both sides must train on the
    /// same items, bit for bit.
    #[test]
    fn the_tf_harness_draws_the_same_item_features() {
        let ids = [0usize, 1, 4095, 65_535, 131_071];
        let code = format!(
            "import sys, numpy; sys.path.insert(0, 'fixtures/bench'); import tf_dense; \
             f = tf_dense.item_features(numpy.array({ids:?})); \
             print(' '.join(str(x) for x in f.view(numpy.uint32).ravel()))"
        );
        let out = std::process::Command::new("python3")
            .args(["-c", &code])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .output();
        let out = match out {
            Ok(out) if out.status.success() => out,
            _ => {
                // .ci/run installs numpy (tests/python/requirements.txt).
                assert!(std::env::var_os("CI").is_none(), "CI: python3 with numpy cannot run {TF_SCRIPT}");
                println!("skipped: python3 with numpy cannot run {TF_SCRIPT}");
                return;
            }
        };
        let theirs: Vec<u32> =
            String::from_utf8_lossy(&out.stdout).split_whitespace().map(|w| w.parse().unwrap_or(u32::MAX)).collect();
        let ours: Vec<u32> = ids.iter().flat_map(|&j| item_features(j).map(f32::to_bits)).collect();
        assert_eq!(theirs.len(), ids.len() * F);
        assert!(theirs == ours, "the TF harness's item features differ from negcache's");
    }
}
