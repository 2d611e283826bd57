//! The `negcache` command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use negcache_host::data::{beir, wordnet};
use negcache_host::eval::{
    evaluate_baselines, rank_baselines, read_run, write_run, Baselines, Evaluator, Metrics, Protocol, Ranking,
};
use negcache_host::flags::given;
use negcache_host::report::{column_points, line_chart, read_series, MetricsLog, Series};
use negcache_host::train::{self, ProtocolSettings, Run, TrainConfig, METRIC_COLUMNS};
use negcache_host::{convergence, reference, resume};

#[derive(Parser, Debug)]
#[command(name = "negcache", version, about = "Train two-tower retrieval models with a negative cache")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Threads for the training step's scoring pass (and the full
    /// softmax's corpus embedding, its first softmax pass and, for
    /// `bench --dense`'s model, which keeps a twin of its item tower, its
    /// back-propagation in two halves), 0 for one per core. The pass is cut
    /// into pieces of 16 queries (a batch of 32 uses two threads) and only
    /// when the cache is large enough to pay for it; a --distributed run's
    /// processes do not split it. A step computes the same bits whatever
    /// the number, so it is not a setting of the run.
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train towers on a BEIR dataset and evaluate them beside BM25 and
    /// popularity.
    ///
    /// Writes <out>/metrics.csv, <out>/summary.json, plots and an atomic
    /// checkpoint <out>/checkpoint.ckpt. Settings come from defaults, then
    /// --config, then flags, and are all checked before any output is
    /// touched. Ctrl-C stops at the next step with a checkpoint (exit 130);
    /// a run whose losses turn NaN or explode stops with an error, keeping
    /// its last good checkpoint.
    ///
    /// Examples:
    ///   negcache train
    ///   negcache train --config runs/cache.toml --steps 10000 --seed 3
    ///   negcache train --objective in-batch --out runs/in-batch
    ///   negcache train --resume runs/default/checkpoint.ckpt --steps 6000
    Train(Box<TrainArgs>),
    /// Evaluate a checkpoint by exact retrieval over the whole corpus, or
    /// score a TREC run file.
    ///
    /// Prints Recall@1/10/100, MRR@10 and NDCG@10 for the model, BM25 and
    /// popularity under BEIR's protocol (see --exclude-train and the other
    /// protocol flags); optionally writes TREC run files with the systems'
    /// real scores. With --run, scores that run file against the split's
    /// qrels as trec_eval / pytrec_eval would.
    ///
    /// Examples:
    ///   negcache eval --checkpoint runs/default/checkpoint.ckpt --trec runs/default/test.run
    ///   negcache eval --run runs/default/test.run --data fixtures/data/wordnet-hypernyms
    Eval(Box<EvalArgs>),
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
    /// Example: negcache compare --config docs/results/estimators/compare.toml
    Compare {
        /// The comparison file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Measure the scoring pass, a training step, the towers and exact
    /// retrieval against the machine's measured fp32 peak; or, with
    /// --dense, the original TensorFlow library's benchmark model in its
    /// five configurations (steps/s and peak memory).
    ///
    /// Examples: negcache bench --write docs/results/bench.md
    ///           negcache bench --dense --json docs/results/bench-dense.json
    ///           negcache bench --dense --tf-lib /tmp/tfbench   (TF beside it)
    Bench(negcache_host::bench::BenchArgs),
    /// Export a checkpoint for serving: item embeddings of the whole corpus
    /// with their ids, optionally the query embeddings of a split, and the
    /// towers' weights, as safetensors files numpy and PyTorch read.
    ///
    /// Writes <out>/embeddings.safetensors (item_embeddings, item_tokens,
    /// and with --split query_embeddings, query_tokens), <out>/item_ids.txt,
    /// <out>/query_ids.txt and <out>/weights.safetensors. Rows are
    /// L2-normalised; the model's score is score_scale (in the metadata)
    /// times the dot product, so a plain dot product ranks as `eval` does.
    ///
    /// Example: negcache export --checkpoint runs/default/checkpoint.ckpt --split test --out runs/default/export
    Export(negcache_host::export::ExportArgs),
    /// Embed new text with a checkpoint's query (or item) tower.
    ///
    /// Reads JSON lines on stdin ({"_id": ..., "title": ..., "text": ...})
    /// or plain lines of text, and writes JSON lines {"id": ..., "vector":
    /// [...]} to stdout, or a safetensors file (tensor `embeddings`) with
    /// --out, its ids in <out stem>.ids.txt.
    ///
    /// Example: echo '{"_id": "q1", "text": "a small songbird"}' | negcache embed --checkpoint runs/default/checkpoint.ckpt
    Embed(negcache_host::embed::EmbedArgs),
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

/// Flags of `eval`.
#[derive(Args, Debug)]
struct EvalArgs {
    /// The checkpoint to evaluate.
    #[arg(long, required_unless_present = "run", conflicts_with = "run")]
    checkpoint: Option<PathBuf>,
    /// Score this TREC run file (qid Q0 docid rank score tag) instead of a
    /// checkpoint.
    #[arg(long)]
    run: Option<PathBuf>,
    /// The split to evaluate.
    #[arg(long, default_value = "test")]
    split: String,
    /// The dataset (default: the checkpoint's; with --run, the bundled
    /// WordNet task).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Write the model's ranking as a TREC run file (real scores, depth
    /// --eval-depth, trec_eval's tie order).
    #[arg(long)]
    trec: Option<PathBuf>,
    /// Write BM25's and popularity's rankings as TREC run files into this
    /// directory (bm25.run, popularity.run).
    #[arg(long)]
    baseline_trec: Option<PathBuf>,
    /// Write the metrics as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    protocol: ProtocolSettings,
}

/// Flags of `train`: the settings ([`TrainConfig`], where each is
/// declared with its help and default), a config file, and where to start.
#[derive(Args, Debug)]
struct TrainArgs {
    /// A TOML file with any of the settings below (snake_case keys); a
    /// flag overrides the file's value, which overrides the default.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue from a checkpoint; the result and the log equal an
    /// uninterrupted run's. Writes beside the checkpoint (or into --out).
    /// Only --steps, the evaluation and checkpoint settings and --data may
    /// differ from the checkpoint's; other settings are refused.
    #[arg(long)]
    resume: Option<PathBuf>,
    #[command(flatten)]
    settings: TrainConfig,
    /// Train data-parallel over MPI with a sharded cache; run under
    /// `mpirun -np P` (needs a build with the mpi feature; see
    /// docs/distributed.md).
    #[arg(long)]
    distributed: bool,
}

/// `cfg` with the settings whose flags are on the command line `flags`
/// of `train`.
fn with_flags(mut cfg: TrainConfig, flags: &ArgMatches) -> anyhow::Result<TrainConfig> {
    negcache_host::flags::update_given(&mut cfg, flags)?;
    Ok(cfg)
}

/// `cfg` with the protocol settings whose flags are on the command line
/// `flags` of `eval`.
fn with_protocol_flags(mut cfg: TrainConfig, flags: &ArgMatches) -> anyhow::Result<TrainConfig> {
    let mut protocol = ProtocolSettings::of(&cfg);
    negcache_host::flags::update_given(&mut protocol, flags)?;
    protocol.set_in(&mut cfg);
    Ok(cfg)
}

fn main() -> ExitCode {
    // The matches, besides the values parsed from them, tell a flag on the
    // command line from one at its default.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut Cli::command()).exit());
    let Some((_, flags)) = matches.subcommand() else { unreachable!("clap requires a subcommand") };
    if let Err(e) = negcache_host::threads::configure(cli.threads) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    match run(cli, flags) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs the command; `flags` are its subcommand's matches.
fn run(cli: Cli, flags: &ArgMatches) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Train(args) => train_command(&args, flags),
        Command::Eval(args) => eval_command(&args, flags),
        Command::Verify { reference, expected } => verify(&reference, &expected),
        Command::Compare { config } => {
            negcache_host::compare::run(&config)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            negcache_host::bench::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Export(args) => {
            negcache_host::export::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Embed(args) => {
            negcache_host::embed::run(&args, std::io::stdin().lock(), std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::ConvertWordnet { task, seed, test_fraction, wordnet: dir, out, plain } => {
            let (ds, stats) = wordnet::convert(&dir, task, seed, test_fraction)?;
            beir::write(&out, &ds, !plain)?;
            let license = wordnet::license_text(&dir)?;
            negcache_host::checkpoint::write_atomically(&out.join("LICENSE-WORDNET"), |f| {
                f.write_all(license.as_bytes()).map_err(Into::into)
            })?;
            println!("{stats}");
            println!("wrote {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn train_command(args: &TrainArgs, flags: &ArgMatches) -> anyhow::Result<ExitCode> {
    if args.distributed {
        return distributed_train(args, flags);
    }
    let resumed = args.resume.is_some();
    let (mut run, data) = match &args.resume {
        Some(path) => {
            let Some(run) = resume_run(args, flags, path)? else { return Ok(ExitCode::SUCCESS) };
            eprintln!("loading {} ...", run.cfg.data.display());
            let data = train::prepare(&run.cfg)?;
            (run, data)
        }
        None => {
            let cfg = match &args.config {
                Some(p) => with_flags(TrainConfig::from_toml(p)?, flags)?,
                None => args.settings.clone(),
            };
            // Every setting is checked, and the data loaded, before any
            // output is touched.
            cfg.validate()?;
            eprintln!("loading {} ...", cfg.data.display());
            let data = train::prepare(&cfg)?;
            (Run::start(cfg, &data)?, data)
        }
    };
    let cfg = run.cfg.clone();
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("{}: cannot create", cfg.out.display()))?;
    let stale = negcache_host::checkpoint::remove_stale_temp_files(&cfg.out)?;
    if stale > 0 {
        eprintln!("removed {stale} temporary file(s) left in {} by a killed run", cfg.out.display());
    }
    negcache_host::interrupt::install()?;
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
    // what it logged; a resumed run keeps the rows an uninterrupted run
    // would have logged by its step.
    let metrics_path = cfg.out.join("metrics.csv");
    let mut log = if resumed {
        match std::fs::metadata(&metrics_path) {
            Ok(m) if m.len() == 0 => eprintln!(
                "warning: {} is empty: the rows of steps up to {} are lost; logging continues from there",
                metrics_path.display(),
                run.step
            ),
            Err(_) => eprintln!("note: {} does not exist: it starts at step {}", metrics_path.display(), run.step),
            Ok(_) => {}
        }
        let (step, finished, to_complete) = (run.step, run.progress.finished, run.step >= cfg.steps);
        MetricsLog::reopen_keeping(&metrics_path, &METRIC_COLUMNS, &|r| {
            if to_complete {
                resume::keeps_row_to_complete(r, step)
            } else {
                resume::keeps_row(r, step, finished)
            }
        })?
    } else {
        MetricsLog::create(&metrics_path, &METRIC_COLUMNS)?
    };
    let mut log_row = |step, secs, values: &[(&str, f64)]| log.log_at(step, secs, values);
    let trained = if run.step < cfg.steps {
        train::train(&mut run, &data, &mut log_row)
    } else {
        train::complete(&mut run, &data, &mut log_row)
    };
    log.close()?;
    let summary = match trained {
        Ok(s) => s,
        Err(e) => match e.downcast_ref::<negcache_host::interrupt::Interrupted>() {
            Some(stop) => {
                eprintln!("{stop}");
                return Ok(ExitCode::from(negcache_host::interrupt::EXIT_STATUS));
            }
            None => return Err(e),
        },
    };
    let baselines = evaluate_baselines(&data.ds, &data.evaluator, cfg.bm25())?;
    print_summary(&cfg, &summary.metrics, &baselines);
    println!(
        "{} steps in {:.1} s ({:.1} steps/s), {:.1} tower evaluations per step, trainer state {:.1} MB",
        summary.steps,
        summary.train_seconds,
        summary.steps as f64 / summary.train_seconds.max(1e-9),
        summary.tower_evals_per_step,
        summary.state_bytes as f64 / 1e6
    );
    if summary.session_steps < summary.steps {
        println!(
            "this run: steps {} to {} in {:.1} s ({:.1} steps/s)",
            summary.steps - summary.session_steps + 1,
            summary.steps,
            summary.session_seconds,
            summary.session_steps as f64 / summary.session_seconds.max(1e-9)
        );
    }
    plot_run(&metrics_path, &cfg.out, &baselines)?;
    let report = serde_json::json!({
        "config": cfg,
        "protocol": cfg.protocol().describe(),
        "summary": summary,
        "baselines": baselines,
    });
    negcache_host::checkpoint::write_atomically(&cfg.out.join("summary.json"), |f| {
        serde_json::to_writer_pretty(f, &report).map_err(Into::into)
    })?;
    println!(
        "wrote {0}/summary.json, {0}/metrics.csv, {0}/loss.svg|png, {0}/recall.svg|png and {0}/checkpoint.ckpt",
        cfg.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The run `train --resume PATH` continues, with the changeable settings
/// of the config file and flags applied (and named) and the others refused
/// when they differ; `None` when it is already at its last step. It writes
/// into `--out`, or beside the checkpoint, never into the directory stored
/// in the checkpoint.
fn resume_run(args: &TrainArgs, flags: &ArgMatches, path: &Path) -> anyhow::Result<Option<Run>> {
    let mut run = Run::resume(path, None)?;
    let stored = run.cfg.clone();
    let requested = match &args.config {
        Some(p) => resume::overlay_toml(&stored, p)?,
        None => stored.clone(),
    };
    let requested = with_flags(requested, flags)?;
    let (mut cfg, applied) =
        resume::apply_settings(&stored, &requested).with_context(|| format!("--resume {}", path.display()))?;
    cfg.out = resume::out_dir(path, given::<PathBuf>(flags, "out").as_deref());
    cfg.validate().with_context(|| format!("--resume {}", path.display()))?;
    if cfg.steps < run.step {
        anyhow::bail!(
            "--steps {}: {} is already at step {}; pass --steps above {} to train further",
            cfg.steps,
            path.display(),
            run.step,
            run.step
        );
    }
    if cfg.steps == run.step {
        // A final checkpoint whose run was stopped before its outputs were
        // all written is completed; anything else has nothing to do.
        if run.progress.finished && !resume::outputs_complete(&cfg.out, run.step) {
            eprintln!(
                "resume: {} is the final checkpoint of a run whose outputs in {} are incomplete; completing them",
                path.display(),
                cfg.out.display()
            );
            run.cfg = cfg;
            return Ok(Some(run));
        }
        println!(
            "nothing to do: {} is at step {} of {}; pass --steps above {} to train further",
            path.display(),
            run.step,
            cfg.steps,
            run.step
        );
        return Ok(None);
    }
    for line in &applied {
        eprintln!("resume: applying {line}");
    }
    eprintln!("resume: from step {} of {}, writing to {}", run.step, path.display(), cfg.out.display());
    run.cfg = cfg;
    Ok(Some(run))
}

/// `train --distributed`: the settings as for `train`, then the MPI run.
#[cfg(feature = "mpi")]
fn distributed_train(args: &TrainArgs, flags: &ArgMatches) -> anyhow::Result<ExitCode> {
    let cfg = match &args.config {
        Some(p) => with_flags(TrainConfig::from_toml(p)?, flags)?,
        None => args.settings.clone(),
    };
    let (steps, out) = (given::<u64>(flags, "steps"), given::<PathBuf>(flags, "out"));
    negcache_host::distributed::train_command(cfg, args.resume.as_deref(), steps, out)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "mpi"))]
fn distributed_train(_: &TrainArgs, _: &ArgMatches) -> anyhow::Result<ExitCode> {
    anyhow::bail!(
        "--distributed: this negcache was built without the mpi feature; build it with \
         `cargo build --release -p negcache-host --features mpi` and run it under mpirun"
    )
}

/// Loss and recall curves of a run, as SVG and PNG, with the baselines'
/// Recall@10 as reference lines.
fn plot_run(metrics: &Path, out: &Path, b: &Baselines) -> anyhow::Result<()> {
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

fn print_summary(cfg: &TrainConfig, m: &Metrics, b: &Baselines) {
    let protocol = cfg.protocol();
    println!("\n{} split, {} queries; evaluation: {}", cfg.eval_split, m.queries, protocol.describe());
    print_table(&protocol, &[("negcache towers".to_owned(), *m)], b);
}

/// The metrics table, every row labelled with a non-standard protocol.
fn print_table(protocol: &Protocol, systems: &[(String, Metrics)], b: &Baselines) {
    let label = protocol.label();
    let bm25 = format!("BM25 (k1 {}, b {})", b.bm25_config.k1, b.bm25_config.b);
    println!("| system | Recall@1 | Recall@10 | Recall@100 | MRR@10 | NDCG@10 |");
    println!("|---|---|---|---|---|---|");
    let rows =
        systems.iter().map(|(n, x)| (n.as_str(), x)).chain([(bm25.as_str(), &b.bm25), ("popularity", &b.popularity)]);
    for (name, x) in rows {
        println!(
            "| {name}{label} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |",
            x.recall_at_1, x.recall_at_10, x.recall_at_100, x.mrr_at_10, x.ndcg_at_10
        );
    }
}

fn eval_command(args: &EvalArgs, flags: &ArgMatches) -> anyhow::Result<ExitCode> {
    if let Some(run_file) = &args.run {
        return eval_run_file(args, run_file);
    }
    let Some(checkpoint) = &args.checkpoint else { anyhow::bail!("eval needs --checkpoint or --run") };
    let mut run = Run::resume(checkpoint, None)?;
    if let Some(d) = &args.data {
        run.cfg.data = d.clone();
    }
    run.cfg.eval_split = args.split.clone();
    run.cfg = with_protocol_flags(run.cfg, flags)?;
    run.cfg.validate()?;
    let cfg = run.cfg.clone();
    let prepared = train::prepare_eval(&cfg)?;
    let ev = &prepared.evaluator;
    let queries = ev.queries();
    let items = train::embed_all(run.session.as_ref(), negcache::tower::Side::Item, &prepared.features.items);
    let depth = if args.trec.is_some() { cfg.eval_depth } else { ev.metrics_depth() };
    let ranks = train::rank(run.session.as_ref(), ev, &queries, &prepared.features.queries, &items, depth);
    let model: Vec<(u32, Ranking)> = queries.iter().copied().zip(ranks).collect();
    let by_query: std::collections::HashMap<u32, Ranking> = model.iter().cloned().collect();
    let m = ev.metrics_of(&by_query);
    let baseline_depth = if args.baseline_trec.is_some() { cfg.eval_depth } else { ev.metrics_depth() };
    let ranked = rank_baselines(&prepared.ds, ev, cfg.bm25(), baseline_depth)?;
    let baselines = Baselines {
        popularity: ev.metrics_of(&ranked.popularity),
        bm25: ev.metrics_of(&ranked.bm25),
        bm25_config: cfg.bm25(),
    };
    print_summary(&cfg, &m, &baselines);
    if let Some(path) = &args.trec {
        write_run(path, &prepared.ds, &model, "negcache")?;
        println!("wrote {} (score: the dot product <q, d>, the model's score divided by alpha)", path.display());
    }
    if let Some(dir) = &args.baseline_trec {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        for (name, r) in [("bm25", &ranked.bm25), ("popularity", &ranked.popularity)] {
            let mut run: Vec<(u32, Ranking)> = r.iter().map(|(&q, r)| (q, r.clone())).collect();
            run.sort_by_key(|p| p.0);
            let path = dir.join(format!("{name}.run"));
            write_run(&path, &prepared.ds, &run, name)?;
            println!("wrote {}", path.display());
        }
    }
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "split": cfg.eval_split, "protocol": cfg.protocol(), "protocol_text": cfg.protocol().describe(),
            "towers": m, "baselines": baselines,
        });
        negcache_host::checkpoint::write_atomically(path, |f| {
            serde_json::to_writer_pretty(f, &report).map_err(Into::into)
        })?;
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `eval --run FILE`: scores a TREC run file against the split's qrels.
fn eval_run_file(args: &EvalArgs, run_file: &Path) -> anyhow::Result<ExitCode> {
    let mut cfg = TrainConfig::default();
    if let Some(d) = &args.data {
        cfg.data = d.clone();
    }
    args.protocol.clone().set_in(&mut cfg);
    cfg.eval_split = args.split.clone();
    cfg.validate()?;
    let mut splits = vec![args.split.as_str()];
    if cfg.exclude_train && args.split != "train" {
        splits.push("train");
    }
    let ds = beir::load(&cfg.data, &splits).with_context(|| format!("loading {}", cfg.data.display()))?;
    let ev = Evaluator::new(&ds, &args.split, cfg.protocol())?;
    let lines = read_run(run_file)?;
    let rankings = negcache_host::eval::trec::rankings_of_run(run_file, &lines, &ds, &ev)?;
    // As pytrec_eval and BEIR: the mean over the run's queries that have a
    // relevant judgement.
    let mut in_run: Vec<u32> = rankings.keys().copied().collect();
    in_run.sort_unstable();
    let m = ev.metrics_on(&in_run, |q| rankings.get(&q).cloned());
    anyhow::ensure!(
        m.queries > 0,
        "{}: no query of the run has a relevant judgement in the {} split",
        run_file.display(),
        args.split
    );
    let label = ev.protocol().label();
    println!(
        "{} split of {}: {} queries of the run (of {} judged); evaluation: {}",
        args.split,
        cfg.data.display(),
        m.queries,
        ev.queries().len(),
        ev.protocol().describe()
    );
    println!("| run | Recall@1 | Recall@10 | Recall@100 | MRR@10 | NDCG@10 |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {}{label} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |",
        run_file.display(),
        m.recall_at_1,
        m.recall_at_10,
        m.recall_at_100,
        m.mrr_at_10,
        m.ndcg_at_10
    );
    if let Some(path) = &args.json {
        let report = serde_json::json!({ "split": args.split, "protocol": cfg.protocol(), "run": m });
        negcache_host::checkpoint::write_atomically(path, |f| {
            serde_json::to_writer_pretty(f, &report).map_err(Into::into)
        })?;
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
        } else if p.exists() {
            files.push(p.clone());
        } else {
            anyhow::bail!("{}: no such file or directory", p.display());
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
    // Every file is classified by its format before anything runs: a file
    // that cannot be read, or whose format is unknown or misspelled, is an
    // error, never a file quietly skipped.
    let skip = expected.len() == 1 && expected[0].as_os_str() == "none";
    let mut convergence_files = Vec::new();
    if !skip {
        for p in expected {
            for f in json_files(std::slice::from_ref(p))? {
                let format = convergence::file_format(&f)?;
                if format == convergence::FORMAT {
                    convergence_files.push(f);
                } else if p.is_dir() && convergence::OTHER_FORMATS.contains(&format.as_str()) {
                    eprintln!("skipping {} (format {format}: checked by its own tests)", f.display());
                } else {
                    anyhow::bail!(
                        "{}: format {format:?} is not a convergence fixture ({:?}){}",
                        f.display(),
                        convergence::FORMAT,
                        if convergence::OTHER_FORMATS.contains(&format.as_str()) {
                            ""
                        } else {
                            "; an unknown format tag"
                        }
                    );
                }
            }
        }
    }
    for f in json_files(reference)? {
        report(&f, reference::run_file(&f)?);
    }
    for f in &convergence_files {
        eprintln!("training the runs of {} ...", f.display());
        report(f, convergence::run_file(f)?);
    }
    println!("verify: {passed} passed, {failed} failed");
    if passed + failed == 0 {
        anyhow::bail!("verify: no case was checked");
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
