//! The `negcache` command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use negcache_host::data::{beir, wordnet};
use negcache_host::eval::evaluate_baselines;
use negcache_host::report::{column_points, line_chart, read_series, MetricsLog, Series};
use negcache_host::session::Tying;
use negcache_host::train::{self, ObjectiveName, OptimizerName, Run, SamplerName, TrainConfig, METRIC_COLUMNS};
use negcache_host::{convergence, reference};

#[derive(Parser, Debug)]
#[command(name = "negcache", version, about = "Train two-tower retrieval models with a negative cache")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train towers on a BEIR dataset and evaluate them beside BM25 and
    /// popularity.
    ///
    /// Writes <out>/metrics.csv, <out>/summary.json, plots and an atomic
    /// checkpoint <out>/checkpoint.ckpt. Settings come from defaults, then
    /// --config, then flags.
    ///
    /// Examples:
    ///   negcache train
    ///   negcache train --config runs/cache.toml --steps 10000 --seed 3
    ///   negcache train --objective in-batch --out runs/in-batch
    ///   negcache train --resume runs/default/checkpoint.ckpt --steps 6000
    Train(Box<TrainArgs>),
    /// Evaluate a checkpoint by exact retrieval over the whole corpus.
    ///
    /// Prints Recall@1/10/100, MRR@10 and NDCG@10 for the model, BM25 and
    /// popularity; optionally writes a TREC run file.
    ///
    /// Example: negcache eval --checkpoint runs/default/checkpoint.ckpt --split test --trec runs/default/test.run
    Eval {
        /// The checkpoint to evaluate.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The split to evaluate.
        #[arg(long, default_value = "test")]
        split: String,
        /// The dataset (default: the one the checkpoint was trained on).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Also write the model's top-100 per query as a TREC run file.
        #[arg(long)]
        trec: Option<PathBuf>,
    },
    /// Check this build against reference cases and convergence bands.
    ///
    /// Runs every case of each reference file (or of every *.json file in
    /// each directory) and prints a table: case, kind, pass/fail, largest
    /// deviation. Exits with status 1 when a case fails or is malformed,
    /// and 2 when a file cannot be used at all.
    ///
    /// Example: negcache verify --reference fixtures/reference
    Verify {
        /// Reference-case files or directories of them
        /// (format negcache-reference-v1).
        #[arg(long, num_args = 1.., default_value = "fixtures/reference")]
        reference: Vec<PathBuf>,
        /// Convergence fixtures or directories of them
        /// (format negcache-convergence-v1; other JSON files are skipped).
        /// Pass --expected none to skip training.
        #[arg(long, num_args = 1.., default_value = "fixtures/expected")]
        expected: Vec<PathBuf>,
    },
    /// Train many configurations on the same data, steps and seeds, and
    /// write a markdown table and plots.
    ///
    /// The file (TOML) has `title`, `out`, `seeds`, a `[base]` table of
    /// settings and `[[run]]` tables (`name`, `about`, settings). Finished
    /// runs are saved and reused, so an interrupted comparison continues.
    ///
    /// Example: negcache compare --config docs/results/compare.toml
    Compare {
        /// The comparison file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Measure the scoring pass, a training step, the towers and exact
    /// retrieval against the machine's measured fp32 peak.
    ///
    /// Example: negcache bench --write docs/results/bench.md
    Bench(negcache_host::bench::BenchArgs),
    /// Convert Debian's WordNet (package wordnet-base) into a BEIR dataset.
    ///
    /// Example: negcache convert-wordnet --task hypernyms --seed 0 --out fixtures/data/wordnet-hypernyms
    ConvertWordnet {
        /// hypernyms (default) or revdict.
        #[arg(long, default_value = "hypernyms")]
        task: wordnet::Task,
        /// Seed of the train/test split.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Fraction of queries in the test split.
        #[arg(long, default_value_t = 0.1)]
        test_fraction: f64,
        /// WordNet's data files.
        #[arg(long, default_value = "/usr/share/wordnet")]
        wordnet: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Write plain files instead of gzip.
        #[arg(long)]
        plain: bool,
    },
}

/// Flags of `train`; each overrides the config file.
#[derive(Args, Debug, Default)]
struct TrainArgs {
    /// A TOML file with any of the settings below (snake_case keys).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue from a checkpoint; the result equals an uninterrupted run.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// BEIR dataset directory [default: fixtures/data/wordnet-hypernyms].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output directory [default: runs/default].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Training steps [default: 10000].
    #[arg(long)]
    steps: Option<u64>,
    /// Batch size, at most 256 [default: 32].
    #[arg(long)]
    batch: Option<usize>,
    /// Learning rate [default: 0.002].
    #[arg(long)]
    lr: Option<f32>,
    /// Warm-up steps [default: 100].
    #[arg(long)]
    warmup: Option<u64>,
    /// Objective [default: cache].
    #[arg(long, value_enum)]
    objective: Option<ObjectiveName>,
    /// Negatives per step for --objective sampled [default: 8192].
    #[arg(long)]
    sampled_negatives: Option<usize>,
    /// Cache capacity, at most 65536 [default: 8192].
    #[arg(long)]
    cache_capacity: Option<usize>,
    /// Fill the cache with the corpus first (corpus mode).
    #[arg(long)]
    corpus_cache: Option<bool>,
    /// LRU instead of FIFO eviction.
    #[arg(long)]
    lru: Option<bool>,
    /// Sampler [default: exp-jump].
    #[arg(long, value_enum)]
    sampler: Option<SamplerName>,
    /// Negatives per query from the cache, 1 or 4 [default: 1].
    #[arg(long)]
    negatives: Option<usize>,
    /// Sampling inverse temperature [default: 1].
    #[arg(long)]
    inv_temp: Option<f32>,
    /// Approximate top-k groups, 0 for off [default: 0].
    #[arg(long)]
    top_k: Option<usize>,
    /// Mask the query's own positive among negatives [default: true].
    #[arg(long)]
    mask_accidental_hits: Option<bool>,
    /// Cache entries re-embedded per step [default: 0].
    #[arg(long)]
    refresh_per_step: Option<usize>,
    /// Tower tying [default: shared-tokens].
    #[arg(long, value_enum)]
    tying: Option<Tying>,
    /// Append an item-id token to items [default: true].
    #[arg(long)]
    item_id_token: Option<bool>,
    /// Character n-grams, 0 for words only [default: 0].
    #[arg(long)]
    char_ngrams: Option<u8>,
    /// Score scale alpha [default: 20].
    #[arg(long)]
    scale: Option<f32>,
    /// Learn alpha [default: false].
    #[arg(long)]
    learn_scale: Option<bool>,
    /// Optimiser [default: adam].
    #[arg(long, value_enum)]
    optimizer: Option<OptimizerName>,
    /// Global gradient-norm clip, 0 for none [default: 0].
    #[arg(long)]
    clip_norm: Option<f32>,
    /// Evaluate every N steps, 0 for only at the end [default: 1000].
    #[arg(long)]
    eval_every: Option<u64>,
    /// Queries in periodic evaluations, 0 for all [default: 2000].
    #[arg(long)]
    eval_queries: Option<usize>,
    /// Split to evaluate [default: test].
    #[arg(long)]
    eval_split: Option<String>,
    /// Checkpoint every N steps, 0 for only at the end [default: 0].
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Train data-parallel over MPI with a sharded cache; run under
    /// `mpirun -np P` (needs a build with the mpi feature; see
    /// docs/distributed.md).
    #[arg(long)]
    distributed: bool,
}

impl TrainArgs {
    fn apply(&self, c: &mut TrainConfig) {
        macro_rules! set {
            ($($f:ident),*) => {$( if let Some(v) = &self.$f { c.$f = v.clone(); } )*};
        }
        set!(
            data,
            out,
            seed,
            steps,
            batch,
            lr,
            warmup,
            objective,
            sampled_negatives,
            cache_capacity,
            corpus_cache,
            lru
        );
        set!(
            sampler,
            negatives,
            inv_temp,
            top_k,
            mask_accidental_hits,
            refresh_per_step,
            tying,
            item_id_token,
            char_ngrams
        );
        set!(scale, learn_scale, optimizer, clip_norm, eval_every, eval_queries, eval_split, checkpoint_every);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Train(args) => train_command(&args),
        Command::Eval { checkpoint, split, data, trec } => eval_command(&checkpoint, &split, data, trec),
        Command::Verify { reference, expected } => verify(&reference, &expected),
        Command::Compare { config } => {
            negcache_host::compare::run(&config)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            negcache_host::bench::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::ConvertWordnet { task, seed, test_fraction, wordnet: dir, out, plain } => {
            let (ds, stats) = wordnet::convert(&dir, task, seed, test_fraction)?;
            beir::write(&out, &ds, !plain)?;
            let license = wordnet::license_text(&dir)?;
            negcache_host::checkpoint::write_atomically(&out.join("LICENSE-WORDNET"), |f| {
                use std::io::Write;
                f.write_all(license.as_bytes()).map_err(Into::into)
            })?;
            println!("{stats}");
            println!("wrote {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn train_command(args: &TrainArgs) -> anyhow::Result<ExitCode> {
    if args.distributed {
        return distributed_train(args);
    }
    let mut run = match &args.resume {
        Some(path) => {
            let mut r = Run::resume(path, args.steps)?;
            if args.config.is_some() || args.data.is_some() {
                eprintln!(
                    "note: --resume takes the configuration stored in the checkpoint; only --steps and --out apply"
                );
            }
            if let Some(out) = &args.out {
                r.cfg.out = out.clone();
            }
            r
        }
        None => {
            let mut cfg = match &args.config {
                Some(p) => TrainConfig::from_toml(p)?,
                None => TrainConfig::default(),
            };
            args.apply(&mut cfg);
            cfg.validate()?;
            Run {
                cfg: cfg.clone(),
                session: negcache_host::session::new_session(cfg.tying, cfg.negatives, cfg.tower(), cfg.trainer())?,
                step: 0,
            }
        }
    };
    let cfg = run.cfg.clone();
    eprintln!("loading {} ...", cfg.data.display());
    let data = train::prepare(&cfg)?;
    if args.resume.is_none() {
        run = Run::start(cfg.clone(), &data)?;
    }
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("{}: cannot create", cfg.out.display()))?;
    eprintln!(
        "training: {} queries, {} items, {} training pairs; objective {:?}, {} steps of batch {}",
        data.ds.queries.len(),
        data.ds.corpus.len(),
        data.pairs.len(),
        cfg.objective,
        cfg.steps,
        cfg.batch
    );
    // Metrics go to <out>/metrics.csv row by row, so a killed run keeps
    // what it logged; a resumed run keeps the rows up to its step.
    let metrics_path = cfg.out.join("metrics.csv");
    let mut log = MetricsLog::reopen(&metrics_path, &METRIC_COLUMNS, args.resume.is_some().then_some(run.step))?;
    let summary = train::train(&mut run, &data, &mut |step, secs, values| log.log_at(step, secs, values))?;
    log.close()?;
    let baselines = evaluate_baselines(&data.ds, &cfg.eval_split, Some(&data.equivalent));
    print_summary(&cfg, &summary.metrics, &baselines);
    println!(
        "{} steps in {:.1} s ({:.1} steps/s), {:.1} tower evaluations per step, trainer state {:.1} MB",
        summary.steps,
        summary.train_seconds,
        summary.steps as f64 / summary.train_seconds.max(1e-9),
        summary.tower_evals_per_step,
        summary.state_bytes as f64 / 1e6
    );
    plot_run(&metrics_path, &cfg.out, &baselines)?;
    let report = serde_json::json!({ "config": cfg, "summary": summary, "baselines": baselines });
    negcache_host::checkpoint::write_atomically(&cfg.out.join("summary.json"), |f| {
        serde_json::to_writer_pretty(f, &report).map_err(Into::into)
    })?;
    println!(
        "wrote {0}/summary.json, {0}/metrics.csv, {0}/loss.svg|png, {0}/recall.svg|png and {0}/checkpoint.ckpt",
        cfg.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `train --distributed`: the settings as for `train`, then the MPI run.
#[cfg(feature = "mpi")]
fn distributed_train(args: &TrainArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = match &args.config {
        Some(p) => TrainConfig::from_toml(p)?,
        None => TrainConfig::default(),
    };
    args.apply(&mut cfg);
    negcache_host::distributed::train_command(cfg, args.resume.as_deref(), args.steps, args.out.clone())?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "mpi"))]
fn distributed_train(_: &TrainArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!(
        "--distributed: this negcache was built without the mpi feature; build it with \
         `cargo build --release -p negcache-host --features mpi` and run it under mpirun"
    )
}

/// Loss and recall curves of a run, as SVG and PNG, with the baselines'
/// Recall@10 as reference lines.
fn plot_run(metrics: &Path, out: &Path, b: &negcache_host::eval::Baselines) -> anyhow::Result<()> {
    let rows = read_series(metrics)?;
    let losses = [
        Series::new("cross-entropy over candidates", column_points(&rows, "interpretable_loss")),
        Series::new("training loss (surrogate)", column_points(&rows, "training_loss")),
    ];
    line_chart(&out.join("loss"), "Training loss", "step", "loss", &losses, &[])?;
    let recall = [Series::new("negcache towers", column_points(&rows, "recall_at_10"))];
    let refs = [("BM25".to_owned(), b.bm25.recall_at_10), ("popularity".to_owned(), b.popularity.recall_at_10)];
    line_chart(&out.join("recall"), "Recall@10 during training", "step", "Recall@10", &recall, &refs)
}

fn print_summary(cfg: &TrainConfig, m: &negcache_host::eval::Metrics, b: &negcache_host::eval::Baselines) {
    println!("\n{} split, {} queries:", cfg.eval_split, m.queries);
    println!("| system | Recall@1 | Recall@10 | Recall@100 | MRR@10 | NDCG@10 |");
    println!("|---|---|---|---|---|---|");
    for (name, x) in [("negcache towers", m), ("BM25", &b.bm25), ("popularity", &b.popularity)] {
        println!(
            "| {name} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |",
            x.recall_at_1, x.recall_at_10, x.recall_at_100, x.mrr_at_10, x.ndcg_at_10
        );
    }
}

fn eval_command(
    checkpoint: &Path,
    split: &str,
    data: Option<PathBuf>,
    trec: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let mut run = Run::resume(checkpoint, None)?;
    if let Some(d) = data {
        run.cfg.data = d;
    }
    run.cfg.eval_split = split.to_owned();
    let prepared = train::prepare(&run.cfg)?;
    let m = train::evaluate(run.session.as_ref(), &prepared, split, 0)?;
    let baselines = evaluate_baselines(&prepared.ds, split, Some(&prepared.equivalent));
    print_summary(&run.cfg, &m, &baselines);
    if let Some(path) = trec {
        let qrels = &prepared.ds.qrels[split];
        let mut judged: Vec<u32> = qrels.iter().filter(|q| q.score > 0).map(|q| q.query).collect();
        judged.sort_unstable();
        judged.dedup();
        let items = train::embed_all(run.session.as_ref(), negcache::tower::Side::Item, &prepared.features.items);
        let ranks = train::rank(run.session.as_ref(), &judged, &prepared.features.queries, &items, 100);
        let results: Vec<_> = judged
            .iter()
            .zip(ranks)
            .map(|(&q, r)| {
                let len = r.len();
                (q, r.into_iter().enumerate().map(|(i, d)| (d, (len - i) as f32)).collect())
            })
            .collect();
        negcache_host::eval::write_run(&path, &prepared.ds, &results, "negcache")?;
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The .json files named, directories expanded (sorted).
fn json_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("{}: cannot list", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "json"))
                .collect();
            found.sort();
            if found.is_empty() {
                anyhow::bail!("{}: no .json files in this directory", p.display());
            }
            files.extend(found);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

fn verify(reference: &[PathBuf], expected: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let (mut passed, mut failed) = (0usize, 0usize);
    let mut report = |f: &Path, results: Vec<reference::CaseResult>| {
        println!("== {}", f.display());
        print!("{}", reference::table(&results));
        let ok = results.iter().filter(|r| r.passed()).count();
        passed += ok;
        failed += results.len() - ok;
    };
    for f in json_files(reference)? {
        report(&f, reference::run_file(&f)?);
    }
    let skip = expected.len() == 1 && expected[0].as_os_str() == "none";
    if !skip {
        for f in json_files(expected)? {
            if convergence::is_convergence_file(&f) {
                eprintln!("training the runs of {} ...", f.display());
                report(&f, convergence::run_file(&f)?);
            }
        }
    }
    println!("verify: {passed} passed, {failed} failed");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
