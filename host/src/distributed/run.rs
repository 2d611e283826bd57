//! The `train --distributed` command: set-up, the training loop (every
//! process steps; process 0 logs, evaluates and writes) and the summary.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use mpi::traits::Communicator;
use negcache::tower::{SeparateTowers, SharedTokenTowers, SiameseTowers};
use serde::Serialize;

use super::comm::{Comm, PerStep};
use super::params;
use super::replica::Replicated;
use super::worker::{validate, Laps, Worker, PHASES};
use crate::checkpoint::Checkpoint;
use crate::report::MetricsLog;
use crate::resume::{LossWindow, LOSS_WINDOW};
use crate::session::{Session, Tying, BUCKETS, DIM, E, H, NEG, NEGATIVES, NEG_MANY, NEG_TWO, S};
use crate::train::{self, Prepared, TrainConfig, TrainSummary, METRIC_COLUMNS};

/// What a distributed run adds to `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct DistributedSummary {
    /// Processes.
    pub processes: usize,
    /// Queries per process per step.
    pub local_batch: usize,
    /// Cache slots per process.
    pub shard_capacity: usize,
    /// Every process's checksum of towers and optimiser state at the end.
    pub model_checksums: Vec<u32>,
    /// Dense parameter values (all-reduced whole every step).
    pub dense_params: usize,
    /// Embedding-table values (only touched rows are all-reduced).
    pub table_params: usize,
    /// Process 0's mean seconds per step, and of those inside collectives.
    pub step_seconds: f64,
    /// See `step_seconds`.
    pub comm_seconds: f64,
    /// Process 0's meters per kind of exchange, averaged per step.
    pub per_step: Vec<(String, PerStep)>,
    /// Process 0's mean seconds per step in each part of the step
    /// (collectives included; the named exchanges are in `per_step`).
    pub phase_seconds: Vec<(String, f64)>,
}

/// `negcache train --distributed`: initialises MPI, trains, and on process
/// 0 writes `<out>/metrics.csv`, `<out>/summary.json` and
/// `<out>/checkpoint.ckpt`. With `resume`, the configuration comes from the
/// checkpoint (only `steps` and `out` apply), which may come from a
/// single-process run. On an error with several processes it prints it and
/// aborts every process, which would otherwise wait for it forever.
pub fn train_command(
    cfg: TrainConfig,
    resume: Option<&Path>,
    steps: Option<u64>,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    let universe = mpi::initialize().context("MPI cannot be initialised (or already was)")?;
    let comm = Comm::new(universe.world());
    let (rank, size) = (comm.rank(), comm.size());
    let result = run(comm, cfg, resume, steps, out);
    if let Err(e) = &result {
        if size > 1 {
            eprintln!("error on process {rank} of {size}: {e:#}");
            universe.world().abort(2);
        }
    }
    result
}

fn run(
    comm: Comm,
    cfg: TrainConfig,
    resume: Option<&Path>,
    steps: Option<u64>,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    let (ck, mut cfg) = match resume {
        Some(path) => {
            let ck = Checkpoint::load(path)?;
            let c = train::stored_config(&ck, path)?;
            (Some(ck), c)
        }
        None => (None, cfg),
    };
    if let Some(s) = steps.filter(|_| resume.is_some()) {
        cfg.steps = s;
    }
    if let Some(o) = out.filter(|_| resume.is_some()) {
        cfg.out = o;
    }
    validate(&cfg, comm.size())?;
    // Every process reads the whole dataset: it needs the corpus's tokens
    // to know each item's owner and its own shard of the pairs.
    let data = train::prepare(&cfg)?;
    match cfg.tying {
        Tying::Separate => picks::<SeparateTowers<BUCKETS, E, H, DIM, S>>(comm, cfg, &data, ck),
        Tying::SharedTokens => picks::<SharedTokenTowers<BUCKETS, E, H, DIM, S>>(comm, cfg, &data, ck),
        Tying::Siamese => picks::<SiameseTowers<BUCKETS, E, H, DIM, S>>(comm, cfg, &data, ck),
    }
}

/// [`go`] with the worker of the configured negatives per query.
fn picks<M: Replicated>(comm: Comm, cfg: TrainConfig, data: &Prepared, ck: Option<Checkpoint>) -> anyhow::Result<()> {
    match cfg.negatives {
        NEG => go::<M, NEG>(comm, cfg, data, ck),
        NEG_TWO => go::<M, NEG_TWO>(comm, cfg, data, ck),
        NEG_MANY => go::<M, NEG_MANY>(comm, cfg, data, ck),
        n => bail!("negatives per query must be one of {NEGATIVES:?}, got {n}"),
    }
}

fn go<M: Replicated, const K: usize>(
    comm: Comm,
    cfg: TrainConfig,
    data: &Prepared,
    ck: Option<Checkpoint>,
) -> anyhow::Result<()> {
    let rank = comm.rank();
    let mut w = Worker::<M, K>::new(comm, cfg.clone(), data)?;
    let resumed = ck.is_some();
    if let Some(ck) = &ck {
        w.restore(ck)?;
    }
    let lead = rank == 0;
    if lead {
        std::fs::create_dir_all(&cfg.out).with_context(|| format!("{}: cannot create", cfg.out.display()))?;
        eprintln!(
            "training on {} processes: {} queries, {} items, {} training pairs; {} steps of batch {} ({} per process), cache {} ({} per process)",
            w.comm.size(),
            data.ds.queries.len(),
            data.ds.corpus.len(),
            data.pairs.len(),
            cfg.steps,
            cfg.batch,
            w.local_batch,
            cfg.cache_capacity,
            w.replica.cache.capacity()
        );
    }
    let metrics_path = cfg.out.join("metrics.csv");
    let mut log =
        if lead { Some(MetricsLog::reopen(&metrics_path, &METRIC_COLUMNS, resumed.then_some(w.step))?) } else { None };
    let summary = train_loop(&mut w, data, &mut log)?;
    if let Some(log) = log {
        log.close()?;
    }
    if let Some((summary, dist)) = summary {
        let m = &summary.metrics;
        println!(
            "{} split, {} queries: Recall@10 {:.4}, MRR@10 {:.4}, NDCG@10 {:.4}",
            cfg.eval_split, m.queries, m.recall_at_10, m.mrr_at_10, m.ndcg_at_10
        );
        println!(
            "{} steps on {} process{} in {:.1} s ({:.2} ms per step, {:.2} ms of it in collectives); towers identical on every process (checksum {:08x})",
            summary.steps,
            dist.processes,
            if dist.processes == 1 { "" } else { "es" },
            summary.train_seconds,
            dist.step_seconds * 1e3,
            dist.comm_seconds * 1e3,
            dist.model_checksums[0]
        );
        let report = serde_json::json!({ "config": cfg, "summary": summary, "distributed": dist });
        crate::checkpoint::write_atomically(&cfg.out.join("summary.json"), |f| {
            serde_json::to_writer_pretty(f, &report).map_err(Into::into)
        })?;
        println!("wrote {0}/summary.json, {0}/metrics.csv and {0}/checkpoint.ckpt", cfg.out.display());
    }
    Ok(())
}

/// The training loop of `train::train`, collective: every process steps;
/// process 0 logs, evaluates and writes. Returns the summaries on process 0.
fn train_loop<M: Replicated, const K: usize>(
    w: &mut Worker<M, K>,
    data: &Prepared,
    log: &mut Option<MetricsLog>,
) -> anyhow::Result<Option<(TrainSummary, DistributedSummary)>> {
    let cfg = w.cfg.clone();
    let lead = w.comm.rank() == 0;
    let start_step = w.step;
    let mut summary = TrainSummary { state_bytes: w.replica.state_bytes(), ..TrainSummary::default() };
    let mut window = LossWindow::default();
    // Per step of the window: this shard's staleness sum and count, summed
    // over processes once at the window's end.
    let mut stale: Vec<f32> = Vec::new();
    let (mut evals_total, mut train_time) = (0u64, 0.0f64);
    let ckpt = cfg.out.join("checkpoint.ckpt");
    w.comm.reset_meters();
    w.laps = Laps::new();
    while w.step < cfg.steps {
        let t0 = Instant::now();
        let r = w.step(data)?;
        train_time += t0.elapsed().as_secs_f64();
        evals_total += r.report.tower_evals as u64;
        window.add(&r.report);
        stale.extend([r.stale_sum, r.stale_count]);
        if w.step % LOSS_WINDOW == 0 || w.step == cfg.steps {
            let mut total = vec![0.0f32; stale.len()];
            w.comm.sum_f32("staleness", &stale, &mut total);
            let sum_stale: f64 =
                total.chunks_exact(2).map(|c| if c[1] > 0.0 { (c[0] / c[1]) as f64 } else { 0.0 }).sum();
            stale.clear();
            let mut row = window.means().to_vec();
            row[2].1 = sum_stale / window.steps.max(1) as f64;
            row.push(("steps_per_s", (w.step - start_step) as f64 / train_time.max(1e-9)));
            summary.losses.push((w.step, row[0].1, row[1].1));
            if let Some(log) = log.as_mut() {
                log.log_at(w.step, train_time, &row)?;
            }
            window = LossWindow::default();
        }
        if cfg.eval_every > 0 && w.step % cfg.eval_every == 0 && w.step < cfg.steps && lead {
            let m = train::evaluate(&w.replica, data, cfg.eval_queries);
            eprintln!(
                "step {}: {} Recall@10 {:.4}, MRR@10 {:.4} ({} queries)",
                w.step, cfg.eval_split, m.recall_at_10, m.mrr_at_10, m.queries
            );
            if let Some(log) = log.as_mut() {
                log.log_at(w.step, train_time, &[("recall_at_10", m.recall_at_10), ("mrr_at_10", m.mrr_at_10)])?;
            }
            summary.curve.push((w.step, m));
        }
        if cfg.checkpoint_every > 0 && w.step % cfg.checkpoint_every == 0 && w.step < cfg.steps {
            if let Some(ck) = w.checkpoint()? {
                ck.save(&ckpt)?;
            }
        }
    }
    let steps_done = (w.step - start_step).max(1) as f64;
    let meters: Vec<(String, PerStep)> = w
        .comm
        .meters()
        .iter()
        .map(|(name, m)| {
            let per = PerStep {
                calls: m.calls as f64 / steps_done,
                bytes_out: m.bytes_out as f64 / steps_done,
                bytes_in: m.bytes_in as f64 / steps_done,
                seconds: m.seconds / steps_done,
            };
            ((*name).to_owned(), per)
        })
        .collect();
    let comm_seconds = meters.iter().map(|(_, m)| m.seconds).sum();
    let ck = w.checkpoint()?;
    let checksums = w.checksums();
    if checksums.iter().any(|&c| c != checksums[0]) {
        bail!("the processes' towers differ at the end (checksums {checksums:08x?})");
    }
    let Some(ck) = ck else {
        return Ok(None);
    };
    ck.save(&ckpt)?;
    let m = train::evaluate(&w.replica, data, 0);
    if let Some(log) = log.as_mut() {
        log.log_at(w.step, train_time, &[("recall_at_10", m.recall_at_10), ("mrr_at_10", m.mrr_at_10)])?;
    }
    summary.curve.push((w.step, m));
    summary.metrics = m;
    summary.steps = w.step;
    summary.train_seconds = train_time;
    summary.tower_evals_per_step = evals_total as f64 / steps_done;
    let (dense_params, table_params) = params::count(&mut w.replica.trainer.model);
    let dist = DistributedSummary {
        processes: w.comm.size(),
        local_batch: w.local_batch,
        shard_capacity: w.replica.cache.capacity(),
        model_checksums: checksums,
        dense_params,
        table_params,
        step_seconds: train_time / steps_done,
        comm_seconds,
        per_step: meters,
        phase_seconds: PHASES.iter().zip(w.laps.seconds).map(|(n, s)| ((*n).to_owned(), s / steps_done)).collect(),
    };
    Ok(Some((summary, dist)))
}
