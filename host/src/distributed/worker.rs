//! One process's part of a distributed run: a driver of the core's phases
//! around the exchanges. The refresh, the embeddings, the scoring pass, the
//! loss terms, back-propagation, the optimiser and the cache updates are
//! the core's (`Trainer::refresh_stalest`, `Towers`, `CacheLoss` through
//! the sampler, `loss::query_terms` or
//! `remainder::in_batch_part_with_remainder`, `Optimizer::step`,
//! `CacheMut`); this file only orders them around the collectives.

use std::time::Instant;

use anyhow::{bail, ensure, Context};
use clap::ValueEnum;
use negcache::loss::{query_terms, QueryControl, QueryGrads, QueryNegatives};
use negcache::random;
use negcache::remainder::{
    in_batch_part_with_remainder, in_batch_part_with_shared_draws, BatchPart, CacheSide, Control, RemainderGrads,
    RemainderSummary, SharedDraws,
};
use negcache::sampler::LogSumExp;
use negcache::tower::Upstream;
use negcache::trainer::{CacheMode, StepReport};
use negcache::Item;
use rand_core::SeedableRng;
use rand_pcg::Pcg64Mcg;

use super::comm::Comm;
use super::exchange::{Exchange, Outgoing};
use super::gradients::GradientSum;
use super::replica::{new_replica, Replica, Replicated};
use super::sampler::{Draw, DrawSpec, ShardedSampler};
use super::shards::{gather, take_shard, Owners};
use crate::checkpoint::{Checkpoint, Reader, Writer};
use crate::featurize::{ItemTokens, QueryTokens};
use crate::session::{load_cache, save_cache, Session, DIM};
use crate::store::OwnedCache;
use crate::train::{self, ObjectiveName, PrecisionName, Prepared, SamplerName, TrainConfig};

/// The generator of process `rank` at `step`. Process 0 draws exactly what
/// a single-process run draws ([`train::step_rng`]), so one process
/// reproduces `negcache train` bit for bit; every other process gets a
/// stream of its own, so the shards' draws are independent.
pub fn rank_rng(seed: u64, step: u64, rank: usize) -> Pcg64Mcg {
    train::step_rng(seed ^ (rank as u64).wrapping_mul(0xd6e8_feb8_6659_fd93), step)
}

/// Checks that a configuration is one the sharded cache trains exactly.
pub fn validate(cfg: &TrainConfig, processes: usize) -> anyhow::Result<()> {
    cfg.validate()?;
    let p = processes;
    match cfg.objective {
        ObjectiveName::Cache | ObjectiveName::CacheInBatch | ObjectiveName::CacheShared => ensure!(
            cfg.negatives == 1 || cfg.sampler == SamplerName::Independent,
            "--distributed draws several negatives per query independently (--sampler independent): distinct draws do not merge exactly across shards"
        ),
        other => bail!(
            "--distributed trains --objective cache-shared (the default), cache-in-batch or cache, not {}",
            other.to_possible_value().map(|v| v.get_name().to_owned()).unwrap_or_default()
        ),
    }
    ensure!(
        cfg.inv_temp == 1.0,
        "--distributed needs inv_temp = 1: only then do the shards' log-sum-exps merge into an exact draw"
    );
    ensure!(cfg.top_k == 0, "--distributed scores every slot (top_k = 0): top-k groups would cut across shards");
    ensure!(
        cfg.cache_precision == PrecisionName::F32,
        "--distributed stores its cache shards as f32 (cache_precision = \"f32\")"
    );
    ensure!(cfg.batch % p == 0, "batch {} is not a multiple of the {p} processes", cfg.batch);
    ensure!(
        cfg.cache_capacity % p == 0,
        "cache_capacity {} is not a multiple of the {p} processes",
        cfg.cache_capacity
    );
    ensure!(
        cfg.corpus_cache || cfg.cache_capacity / p >= cfg.batch,
        "a cache shard of {} slots cannot take a batch of {} positives that one process may own",
        cfg.cache_capacity / p,
        cfg.batch
    );
    ensure!(
        cfg.refresh_per_step % p == 0,
        "refresh_per_step {} is not a multiple of the {p} processes",
        cfg.refresh_per_step
    );
    Ok(())
}

/// The parts of a step timed separately, in order.
pub(super) const PHASES: [&str; 7] = [
    "refresh",
    "embed batch",
    "draw (score + queries + replies)",
    "embed negatives, loss, backward",
    "gradient all-reduce (touched + gradients)",
    "optimiser",
    "cache update (update)",
];

/// Seconds spent in each of [`PHASES`] (collectives included).
#[derive(Debug)]
pub(super) struct Laps {
    pub seconds: [f64; PHASES.len()],
    clock: Instant,
}

impl Laps {
    /// Zero seconds in every phase.
    pub fn new() -> Self {
        Self { seconds: [0.0; PHASES.len()], clock: Instant::now() }
    }

    /// Starts timing a step.
    fn start(&mut self) {
        self.clock = Instant::now();
    }

    /// Adds the time since the last lap to phase `k`.
    fn lap(&mut self, k: usize) {
        let now = Instant::now();
        self.seconds[k] += (now - self.clock).as_secs_f64();
        self.clock = now;
    }
}

/// Where this process's `local` queries sit in the global batch: every
/// process holds `local` of them, in rank order.
pub fn local_part(comm: &Comm, local: usize) -> BatchPart {
    BatchPart { first: comm.rank() * local, batch: comm.size() * local }
}

/// The exact in-batch terms of this process's queries
/// (`remainder::in_batch_part_with_remainder`): every process holds `B/P`
/// of the global batch's queries, in rank order, and all `B` positives.
/// `grads.positive` receives this process's share of each positive's
/// gradient, and `positive_sum` the sum of every process's shares
/// (**positive gradients**: an all-reduce of B x DIM floats), the whole
/// batch's gradient of each positive. The summary is this process's share
/// of the batch means. Collective.
///
/// # Errors
/// The core's, for mismatched lengths or non-finite inputs.
#[allow(clippy::too_many_arguments)]
pub fn in_batch_part(
    comm: &mut Comm,
    queries: &[[f32; DIM]],
    positives: &[[f32; DIM]],
    ids: Option<&[u64]>,
    alpha: f32,
    neg: usize,
    side: CacheSide<'_, DIM>,
    grads: RemainderGrads<'_, DIM>,
    positive_sum: &mut Vec<[f32; DIM]>,
) -> anyhow::Result<RemainderSummary> {
    let part = local_part(comm, queries.len());
    let RemainderGrads { query, positive, negative } = grads;
    let grads = RemainderGrads { query, positive: &mut *positive, negative };
    let sum = in_batch_part_with_remainder(queries, positives, ids, alpha, neg, part, side, grads)?;
    positive_sum.resize(positive.len(), [0.0; DIM]);
    comm.sum_f32("positive gradients", positive.as_flattened(), positive_sum.as_flattened_mut());
    Ok(sum)
}

/// This process's inputs and their gradients in the trainer's order for
/// back-propagation: query, positive, negatives, query by query. `gp` has
/// one row per local query, `gn` `K` rows per local query.
fn sequence<'a, const K: usize>(
    queries: &'a [QueryTokens],
    gq: &'a [[f32; DIM]],
    positives: &'a [ItemTokens],
    gp: &'a [[f32; DIM]],
    draws: &'a [Draw],
    gn: &'a [[f32; DIM]],
) -> Vec<Upstream<'a, QueryTokens, ItemTokens, DIM>> {
    let mut seq = Vec::with_capacity(draws.len() * (2 + K));
    for (b, d) in draws.iter().enumerate() {
        seq.push(Upstream::Query(&queries[b], &gq[b]));
        seq.push(Upstream::Item(&positives[b], &gp[b]));
        for (i, pick) in d.picks().iter().enumerate() {
            seq.push(Upstream::Item(&pick.item, &gn[b * K + i]));
        }
    }
    seq
}

/// A process's own queries and their draws for [`shared_part`], `k` rows
/// per query.
#[derive(Debug, Clone, Copy)]
pub struct LocalDraws<'a> {
    /// The local queries' embeddings.
    pub queries: &'a [[f32; DIM]],
    /// Per local query, its cache log-sum-exp over every shard.
    pub lse: &'a [LogSumExp],
    /// Per row: the fresh embedding, the cached one, the share of its
    /// query's draws (0 past its draws).
    pub fresh: &'a [[f32; DIM]],
    pub stale: &'a [[f32; DIM]],
    pub shares: &'a [f32],
    /// Per local query, the candidates' softmax mean of the cached rows
    /// (read with the control variate only).
    pub means: &'a [[f32; DIM]],
}

/// What every process of a step shares for [`shared_part`].
#[derive(Debug, Clone, Copy)]
pub struct SharedInputs<'a> {
    /// Every query of the global batch, in rank order.
    pub batch_queries: &'a [[f32; DIM]],
    /// Every positive's embedding, in the same order.
    pub positives: &'a [[f32; DIM]],
    /// The positives' keys, for leaving accidental hits out.
    pub ids: Option<&'a [u64]>,
    pub alpha: f32,
    /// Rows per query.
    pub k: usize,
    /// The control variate's beta, if any.
    pub control: Option<f32>,
    pub fresh_scores: bool,
}

/// Shared draws over processes: every process gathers every query's
/// log-sum-exp and every row (**shared draws**: all-gather), computes its
/// own queries' terms over all rows
/// (`remainder::in_batch_part_with_shared_draws`), and sums the positives'
/// and the rows' gradients over processes (**positive gradients**,
/// **negative gradients**: all-reduce) into `gp_sum` and `buf.gn_sum`.
/// `gq` receives the local queries' gradients. Returns this process's
/// share of the batch means. Collective.
///
/// # Errors
/// The core's, for mismatched lengths or non-finite inputs.
pub fn shared_part(
    comm: &mut Comm,
    local: LocalDraws<'_>,
    inputs: SharedInputs<'_>,
    buf: &mut SharedBuffers,
    gq: &mut [[f32; DIM]],
    gp: &mut Vec<[f32; DIM]>,
    gp_sum: &mut Vec<[f32; DIM]>,
) -> anyhow::Result<RemainderSummary> {
    let (p, bl, k) = (comm.size(), local.queries.len(), inputs.k);
    ensure!(
        local.lse.len() == bl && [local.fresh.len(), local.stale.len(), local.shares.len()] == [bl * k; 3],
        "shared draws: {bl} queries of {k} rows each, got {} log-sum-exps and {} rows",
        local.lse.len(),
        local.fresh.len()
    );
    // This process's queries and rows, packed per query: lse (2 words),
    // then k rows of fresh, cached and share.
    let row_words = 2 * DIM + 1;
    let query_words = 2 + k * row_words;
    buf.send.clear();
    for b in 0..bl {
        buf.send.extend([local.lse[b].max.to_bits(), local.lse[b].sum.to_bits()]);
        for r in b * k..(b + 1) * k {
            buf.send.extend(local.fresh[r].iter().map(|x| x.to_bits()));
            buf.send.extend(local.stale[r].iter().map(|x| x.to_bits()));
            buf.send.push(local.shares[r].to_bits());
        }
    }
    buf.recv.clear();
    buf.recv.resize(p * bl * query_words, 0);
    comm.all_gather("shared draws", &buf.send, &mut buf.recv);
    let floats = |w: &[u32]| -> [f32; DIM] { std::array::from_fn(|i| f32::from_bits(w[i])) };
    buf.lse.clear();
    buf.fresh.clear();
    buf.stale.clear();
    buf.shares.clear();
    for q in buf.recv.chunks_exact(query_words) {
        buf.lse.push(LogSumExp { max: f32::from_bits(q[0]), sum: f32::from_bits(q[1]) });
        for r in q[2..].chunks_exact(row_words) {
            buf.fresh.push(floats(r));
            buf.stale.push(floats(&r[DIM..]));
            buf.shares.push(f32::from_bits(r[2 * DIM]));
        }
    }
    let rows = buf.fresh.len();
    buf.counts.resize(rows, [0.0; 3]);
    buf.gn.resize(rows, [0.0; DIM]);
    buf.gn_sum.resize(rows, [0.0; DIM]);
    buf.corrected.resize(bl, LogSumExp::EMPTY);
    gp.resize(inputs.positives.len(), [0.0; DIM]);
    gp_sum.resize(inputs.positives.len(), [0.0; DIM]);
    let side = CacheSide {
        lse: local.lse,
        fresh: &buf.fresh,
        weights: &buf.shares,
        control: inputs.control.map(|beta| Control { beta, stale: &buf.stale, mean: local.means }),
    };
    let draws = SharedDraws {
        stale: &buf.stale,
        shares: &buf.shares,
        batch_queries: inputs.batch_queries,
        sample_lse: &buf.lse,
        inv_temp: 1.0,
        fresh_scores: inputs.fresh_scores,
        counts: &mut buf.counts,
        lse: &mut buf.corrected,
    };
    let grads = RemainderGrads { query: gq, positive: gp, negative: &mut buf.gn };
    let part = local_part(comm, bl);
    let sum = in_batch_part_with_shared_draws(
        local.queries,
        inputs.positives,
        inputs.ids,
        inputs.alpha,
        part,
        side,
        draws,
        grads,
    )?;
    comm.sum_f32("positive gradients", gp.as_flattened(), gp_sum.as_flattened_mut());
    comm.sum_f32("negative gradients", buf.gn.as_flattened(), buf.gn_sum.as_flattened_mut());
    Ok(sum)
}

/// A process's share of a step's figures: the training loss, the
/// interpretable loss, the probability of the positive and the tower
/// evaluations, summed over processes by the gradient all-reduce; the
/// first three are multiplied by `scale` after the sum.
struct Terms {
    extra: [f32; 4],
    scale: f32,
}

/// A step's report, and this shard's staleness sum and count (summed over
/// processes once per logging window rather than every step).
pub(super) struct Stepped {
    pub report: StepReport,
    pub stale_sum: f32,
    pub stale_count: f32,
}

/// One process's part of a distributed run, drawing `K` negatives per
/// query.
pub(super) struct Worker<M, const K: usize> {
    pub comm: Comm,
    pub cfg: TrainConfig,
    pub replica: Replica<M>,
    pub local_batch: usize,
    pub step: u64,
    pub laps: Laps,
    sampler: ShardedSampler<K>,
    gradients: GradientSum,
    exchange: Exchange,
    owners: Owners,
    pairs: Vec<(u32, u32)>,
    queries: Vec<QueryTokens>,
    positives: Vec<ItemTokens>,
    /// Per local query (`q`, `p`, `gq`, `lse`, `means`); per pick, `K` rows
    /// per query (`picked`, `f`, `gn`, `weights`, `stale`); per positive
    /// of the global batch with exact in-batch terms (`gp`, `gp_sum`),
    /// else per local query (`gp`).
    q: Vec<[f32; DIM]>,
    p: Vec<[f32; DIM]>,
    picked: Vec<ItemTokens>,
    f: Vec<[f32; DIM]>,
    gq: Vec<[f32; DIM]>,
    gp: Vec<[f32; DIM]>,
    gp_sum: Vec<[f32; DIM]>,
    gn: Vec<[f32; DIM]>,
    lse: Vec<LogSumExp>,
    weights: Vec<f32>,
    stale: Vec<[f32; DIM]>,
    means: Vec<[f32; DIM]>,
    keys: Vec<u64>,
    draws: Vec<Draw>,
    shared: SharedBuffers,
}

/// With shared draws, every process's draws, gathered (per row: `K` rows
/// per query of the global batch, in rank order), and the buffers of the
/// gathering.
#[derive(Debug, Default)]
pub struct SharedBuffers {
    /// Per query of the global batch: its cache log-sum-exp.
    lse: Vec<LogSumExp>,
    /// Per row: the fresh embedding, the cached one, the share of its
    /// query's draws.
    fresh: Vec<[f32; DIM]>,
    stale: Vec<[f32; DIM]>,
    shares: Vec<f32>,
    /// Per row: the core's working memory, this process's share of the
    /// row's gradient, and its sum over processes (what [`shared_part`]
    /// leaves for back-propagation).
    counts: Vec<[f32; 3]>,
    gn: Vec<[f32; DIM]>,
    pub gn_sum: Vec<[f32; DIM]>,
    /// Per local query: the core's working memory.
    corrected: Vec<LogSumExp>,
    send: Vec<u32>,
    recv: Vec<u32>,
}

impl<M: Replicated, const K: usize> Worker<M, K> {
    /// A replica initialised from the seed (the same towers on every
    /// process), with an empty shard of `cache_capacity / P` slots (in
    /// corpus mode, filled with the items this process owns).
    pub fn new(comm: Comm, cfg: TrainConfig, data: &Prepared) -> anyhow::Result<Self> {
        let (rank, p) = (comm.rank(), comm.size());
        validate(&cfg, p)?;
        ensure!(cfg.negatives == K, "a worker drawing {K} negatives per query, configured for {}", cfg.negatives);
        let shard_cap = cfg.cache_capacity / p;
        let mut tcfg = cfg.trainer();
        tcfg.refresh_per_step = cfg.refresh_per_step / p;
        let mut replica = new_replica::<M>(cfg.tower(), tcfg, shard_cap)?;
        replica.init(&mut Pcg64Mcg::seed_from_u64(cfg.seed))?;
        replica.trainer.set_control_variate(cfg.control())?;
        let pairs: Vec<(u32, u32)> = data.pairs.iter().skip(rank).step_by(p).copied().collect();
        ensure!(!pairs.is_empty(), "process {rank} has no training pairs: fewer pairs than processes");
        let owners = Owners::new(&data.features.items, p);
        if cfg.corpus_cache {
            let mine: Vec<ItemTokens> =
                data.features.items.iter().filter(|t| owners.of(t) == Some(rank)).copied().collect();
            ensure!(
                mine.len() <= shard_cap,
                "corpus mode: process {rank} owns {} items but its shard has {shard_cap} slots",
                mine.len()
            );
            replica.fill_cache(&mine)?;
        }
        let bl = cfg.batch / p;
        Ok(Self {
            comm,
            local_batch: bl,
            gradients: GradientSum::new(&mut replica.trainer.model),
            cfg,
            replica,
            step: 0,
            laps: Laps::new(),
            sampler: ShardedSampler::new(),
            exchange: Exchange::default(),
            owners,
            pairs,
            queries: Vec::new(),
            positives: Vec::new(),
            q: vec![[0.0; DIM]; bl],
            p: vec![[0.0; DIM]; bl],
            picked: vec![ItemTokens::EMPTY; bl * K],
            f: vec![[0.0; DIM]; bl * K],
            gq: vec![[0.0; DIM]; bl],
            gp: Vec::new(),
            gp_sum: Vec::new(),
            gn: vec![[0.0; DIM]; bl * K],
            lse: vec![LogSumExp::EMPTY; bl],
            weights: vec![0.0; bl * K],
            stale: vec![[0.0; DIM]; bl * K],
            means: vec![[0.0; DIM]; bl],
            keys: Vec::new(),
            draws: Vec::new(),
            shared: SharedBuffers::default(),
        })
    }

    /// Restores a checkpoint written by either kind of run: the towers and
    /// optimiser as they are, and this process's shard of its cache (see
    /// [`take_shard`]).
    pub fn restore(&mut self, ck: &Checkpoint) -> anyhow::Result<()> {
        let mut r = Reader::new(&ck.body);
        let mut all = OwnedCache::new(self.cfg.cache_capacity)?;
        self.replica
            .load_model(&mut r)
            .and_then(|()| load_cache(&mut all, &mut r))
            .and_then(|()| r.finish())
            .context("cannot restore the checkpoint")?;
        let from = ck.header.get("distributed").and_then(|d| d["processes"].as_u64());
        let same_layout = from == Some(self.comm.size() as u64);
        take_shard(&all.as_ref(), &mut self.replica.cache, self.comm.rank(), &self.owners, same_layout)?;
        self.step = ck.header["step"].as_u64().context("the checkpoint's header has no step")?;
        Ok(())
    }

    /// One step (see the module docs).
    pub fn step(&mut self, data: &Prepared) -> anyhow::Result<Stepped> {
        let (rank, bl) = (self.comm.rank(), self.local_batch);
        let mut rng = rank_rng(self.cfg.seed, self.step, rank);
        let n = self.pairs.len() as u32;
        self.queries.clear();
        self.positives.clear();
        for _ in 0..bl {
            let (q, d) = self.pairs[random::below(&mut rng, n) as usize];
            self.queries.push(data.features.queries[q as usize]);
            self.positives.push(data.features.items[d as usize]);
        }
        let lr = self.cfg.lr_at(self.step);
        let shared = self.cfg.objective == ObjectiveName::CacheShared;
        let in_batch = shared || self.cfg.objective == ObjectiveName::CacheInBatch;
        let Replica { trainer, cache, .. } = &mut self.replica;
        self.laps.start();
        trainer.model.zero_grad();
        let mut evals = trainer.refresh_stalest(&mut cache.as_mut())?;
        self.laps.lap(0);
        trainer.model.embed_queries(&self.queries, &mut self.q);
        trainer.model.embed_items(&self.positives, &mut self.p);
        evals += 2 * bl as u32;
        self.laps.lap(1);
        let alpha = trainer.model.score_scale();
        let spec = DrawSpec {
            alpha,
            mask_accidental_hits: self.cfg.mask_accidental_hits,
            retrieval: trainer.config().retrieval,
            control: trainer.control_variate().is_some(),
            stale: trainer.control_variate().is_some() || shared,
            in_batch,
        };
        let (queries, positives, rows) = (&self.q, &self.positives, &self.p);
        self.sampler.draw(&mut self.comm, cache.as_mut(), queries, positives, rows, spec, &mut rng, &mut self.draws)?;
        self.laps.lap(2);
        // Each query's picks embedded afresh, one batched call per query;
        // rows past a query's picks are zero (weight 0).
        self.f.fill([0.0; DIM]);
        for (b, d) in self.draws.iter().enumerate() {
            let (rows, m) = (b * K..b * K + d.picks().len(), d.picks().len());
            for (slot, pick) in self.picked[rows.clone()].iter_mut().zip(d.picks()) {
                *slot = pick.item;
            }
            trainer.model.embed_items(&self.picked[rows.clone()], &mut self.f[rows]);
            evals += m as u32;
        }

        let terms = if shared {
            self.shared_terms(alpha, evals)?
        } else if in_batch {
            self.in_batch_terms(alpha, evals)?
        } else {
            self.cache_terms(alpha, evals)?
        };
        let trainer = &mut self.replica.trainer;
        self.laps.lap(3);

        let sums = self.gradients.all_reduce(&mut self.comm, &mut trainer.model, &terms.extra)?;
        self.laps.lap(4);
        let mut opt = *trainer.optimizer();
        let stats = opt.step(lr, &mut |v| trainer.model.visit(v))?;
        *trainer.optimizer_mut() = opt;
        trainer.model.zero_grad();
        self.laps.lap(5);
        let out = Outgoing {
            draws: &self.draws,
            fresh: &self.f,
            neg: K,
            positives: &self.positives,
            positive_rows: &self.p,
            first_query: rank * bl,
        };
        let streaming = trainer.config().cache_mode == CacheMode::Streaming;
        let eviction = trainer.config().eviction;
        let positives = self.sampler.positives();
        let cache = &mut self.replica.cache;
        let (stale_sum, stale_count) =
            self.exchange.run(&mut self.comm, cache, &self.owners, out, positives, streaming, eviction)?;
        self.laps.lap(6);
        self.step += 1;
        let mean = |x: f32| x * terms.scale;
        Ok(Stepped {
            report: StepReport {
                training_loss: mean(sums[0]),
                interpretable_loss: mean(sums[1]),
                staleness: 0.0,
                prob_pos: mean(sums[2]),
                tower_evals: sums[3] as u32,
                grad_norm: stats.grad_norm,
                score_scale: alpha,
            },
            stale_sum,
            stale_count,
        })
    }

    /// The paper's estimator, with one or several picks per query, with or
    /// without the control variate: each query's terms with the global
    /// log-sum-exp (`loss::query_terms`, what
    /// `CacheLoss::backward` computes for one cache), then
    /// back-propagation. Returns the sums to all-reduce: raw sums, to be
    /// scaled by 1/B.
    fn cache_terms(&mut self, alpha: f32, evals: u32) -> anyhow::Result<Terms> {
        let (p, bl) = (self.comm.size(), self.local_batch);
        let trainer = &mut self.replica.trainer;
        self.gp.resize(bl, [0.0; DIM]);
        let inv_b = 1.0 / (p * bl) as f32;
        let beta = trainer.control_variate();
        let (mut training, mut interpretable, mut prob_pos, mut grad_scale) = (0.0f32, 0.0f32, 0.0f32, 0.0f32);
        for b in 0..bl {
            let d = &self.draws[b];
            let (picks, rows) = (d.picks(), b * K..(b + 1) * K);
            for (w, pick) in self.weights[rows.clone()].iter_mut().zip(picks) {
                *w = pick.weight;
            }
            let negatives = QueryNegatives {
                fresh: &self.f[b * K..b * K + picks.len()],
                weights: &self.weights[b * K..b * K + picks.len()],
                stale: |i: usize| picks[i].stale,
                mean_of_dots: false,
            };
            let cv = beta.map(|beta| QueryControl { beta, candidate_mean: &d.mean });
            let grads = QueryGrads { query: &mut self.gq[b], positive: &mut self.gp[b], negative: &mut self.gn[rows] };
            let t = query_terms(&self.q[b], &self.p[b], &d.lse, negatives, cv, alpha, inv_b, Some(grads))?;
            training += t.training_loss;
            interpretable += t.interpretable_loss;
            prob_pos += t.prob_pos;
            if !picks.is_empty() {
                grad_scale += t.grad_scale;
            }
        }
        let model = &mut trainer.model;
        model.backward_sequence(&sequence::<K>(
            &self.queries,
            &self.gq,
            &self.positives,
            &self.gp,
            &self.draws,
            &self.gn,
        ));
        model.backward_scale(grad_scale * inv_b);
        Ok(Terms { extra: [training, interpretable, prob_pos, evals as f32], scale: inv_b })
    }

    /// Lays out the merged draws for the in-batch and shared-draw terms:
    /// per local query its log-sum-exp and candidate mean, per row (`K`
    /// per query) its weight, the share of its query's draws, and its
    /// cached row (zero past the query's picks); and the keys of every
    /// positive of the global batch.
    fn unpack_draws(&mut self) {
        for (b, d) in self.draws.iter().enumerate() {
            self.lse[b] = d.lse;
            self.means[b] = d.mean;
            for i in 0..K {
                let pick = d.picks().get(i);
                self.weights[b * K + i] = pick.map_or(0.0, |k| k.weight);
                self.stale[b * K + i] = pick.map_or([0.0; DIM], |k| k.stale);
            }
        }
        self.keys.clear();
        self.keys.extend(self.sampler.positives().iter().map(|y| y.key()));
    }

    /// Shared draws (estimator D, the default): each local query's cache
    /// share is estimated from the draws of every process's queries. The
    /// processes gather every query's log-sum-exp and every draw's fresh
    /// row, cached row and share (**shared draws**: an all-gather of
    /// `B K (2 DIM + 1) + 2 B` words), so each computes its queries' terms
    /// over all rows (`remainder::in_batch_part_with_shared_draws`, what
    /// the single-process trainer computes for the whole batch); the
    /// rows' gradients from every process's queries are summed
    /// (**negative gradients**: an all-reduce of `B K x DIM`) as the
    /// positives' are, and each process back-propagates its own rows.
    /// Returns the sums to all-reduce: already batch means.
    fn shared_terms(&mut self, alpha: f32, evals: u32) -> anyhow::Result<Terms> {
        let (bl, k) = (self.local_batch, K);
        self.unpack_draws();
        let trainer = &mut self.replica.trainer;
        let local = LocalDraws {
            queries: &self.q,
            lse: &self.lse,
            fresh: &self.f,
            stale: &self.stale,
            shares: &self.weights,
            means: &self.means,
        };
        let inputs = SharedInputs {
            batch_queries: self.sampler.queries(),
            positives: self.sampler.positive_rows(),
            ids: self.cfg.mask_accidental_hits.then_some(&self.keys[..]),
            alpha,
            k,
            control: trainer.control_variate(),
            fresh_scores: trainer.config().fresh_scores,
        };
        let sh = &mut self.shared;
        let sum = shared_part(&mut self.comm, local, inputs, sh, &mut self.gq, &mut self.gp, &mut self.gp_sum)?;
        let part = local_part(&self.comm, bl);
        let (mine, rows) = (part.first..part.first + bl, part.first * K..(part.first + bl) * K);
        let (gp, gn) = (&self.gp_sum[mine], &sh.gn_sum[rows]);
        let model = &mut trainer.model;
        model.backward_sequence(&sequence::<K>(&self.queries, &self.gq, &self.positives, gp, &self.draws, gn));
        model.backward_scale(sum.grad_scale);
        Ok(Terms { extra: [sum.loss, sum.loss, sum.prob_pos, evals as f32], scale: 1.0 })
    }

    /// The exact in-batch objective with each query's own draws (A+B+C): each local query's
    /// softmax over every positive of the global batch, exactly, and the
    /// sharded cache's remainder from its picks
    /// (`remainder::in_batch_part_with_remainder`, what the single-process
    /// trainer computes for the whole batch). The positives' gradients
    /// from every process's queries are summed (**positive gradients**:
    /// all-reduce of B x DIM) before each process back-propagates its
    /// own. Returns the sums to all-reduce: already batch means.
    fn in_batch_terms(&mut self, alpha: f32, evals: u32) -> anyhow::Result<Terms> {
        let bl = self.local_batch;
        self.unpack_draws();
        let trainer = &mut self.replica.trainer;
        let all = self.sampler.positives();
        self.gp.resize(all.len(), [0.0; DIM]);
        let side = CacheSide {
            lse: &self.lse,
            fresh: &self.f,
            weights: &self.weights,
            control: trainer.control_variate().map(|beta| Control { beta, stale: &self.stale, mean: &self.means }),
        };
        let grads = RemainderGrads { query: &mut self.gq, positive: &mut self.gp, negative: &mut self.gn };
        let ids = self.cfg.mask_accidental_hits.then_some(&self.keys[..]);
        let rows = self.sampler.positive_rows();
        let sum = in_batch_part(&mut self.comm, &self.q, rows, ids, alpha, K, side, grads, &mut self.gp_sum)?;
        let first = local_part(&self.comm, bl).first;
        let gp = &self.gp_sum[first..first + bl];
        let model = &mut trainer.model;
        model.backward_sequence(&sequence::<K>(&self.queries, &self.gq, &self.positives, gp, &self.draws, &self.gn));
        model.backward_scale(sum.grad_scale);
        Ok(Terms { extra: [sum.loss, sum.loss, sum.prob_pos, evals as f32], scale: 1.0 })
    }

    /// The run as a checkpoint in the single-process format, on process 0
    /// (collective: the shards are gathered there). The towers and the
    /// optimiser are process 0's, equal to every other's; the cache is the
    /// shards side by side ([`gather`]).
    pub fn checkpoint(&mut self) -> anyhow::Result<Option<Checkpoint>> {
        let Some(all) = gather(&mut self.comm, &self.replica.cache.as_ref())? else {
            return Ok(None);
        };
        let mut w = Writer::default();
        self.replica.save_model(&mut w);
        save_cache(&all, &mut w);
        let header = serde_json::json!({
            "config": self.cfg,
            "step": self.step,
            "shape": train::shape_json(),
            "distributed": { "processes": self.comm.size() },
        });
        Ok(Some(Checkpoint { header, body: w.0 }))
    }

    /// Every process's checksum of its towers and optimiser state (what
    /// `model_checksum` reads from a checkpoint), in rank order
    /// (collective).
    pub fn checksums(&mut self) -> Vec<u32> {
        let mut w = Writer::default();
        self.replica.save_model(&mut w);
        let mine = [crc32fast::hash(&w.0)];
        let mut all = vec![0u32; self.comm.size()];
        self.comm.all_gather("checksum", &mine, &mut all);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::RngCore;

    /// The configurations the sharded cache would not train exactly are
    /// refused before anything runs; the default is accepted.
    #[test]
    fn inexact_configurations_are_refused() {
        let ok = TrainConfig::default();
        assert!(validate(&ok, 2).is_ok(), "{:?}", validate(&ok, 2));
        for objective in [ObjectiveName::Cache, ObjectiveName::CacheInBatch] {
            let four = TrainConfig { objective, control_variate: true, ..ok.clone() };
            assert!(validate(&four, 2).is_ok(), "{objective:?}");
        }
        let shared_one = TrainConfig { negatives: 1, sampler: SamplerName::Gumbel, ..ok.clone() };
        assert!(validate(&shared_one, 2).is_ok());
        let in_batch = TrainConfig { objective: ObjectiveName::CacheInBatch, ..ok.clone() };
        let refused = [
            (TrainConfig { objective: ObjectiveName::CacheMixed, ..ok.clone() }, "cache-in-batch"),
            (TrainConfig { objective: ObjectiveName::InBatch, ..ok.clone() }, "cache-in-batch"),
            (TrainConfig { sampler: SamplerName::ExpJump, ..in_batch.clone() }, "independently"),
            (TrainConfig { sampler: SamplerName::Gumbel, ..in_batch.clone() }, "independently"),
            (TrainConfig { sampler: SamplerName::Gumbel, ..ok.clone() }, "independent"),
            (TrainConfig { inv_temp: 0.5, ..ok.clone() }, "inv_temp"),
            (TrainConfig { top_k: 64, ..ok.clone() }, "top_k"),
            (TrainConfig { cache_precision: PrecisionName::Int8, ..ok.clone() }, "f32"),
            (TrainConfig { batch: 33, ..ok.clone() }, "multiple"),
            (TrainConfig { refresh_per_step: 3, ..ok.clone() }, "refresh_per_step"),
        ];
        for (cfg, says) in refused {
            let e = validate(&cfg, 2).expect_err("refused").to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn process_zero_draws_what_a_single_process_run_draws() {
        let (mut a, mut b) = (rank_rng(7, 3, 0), train::step_rng(7, 3));
        assert_eq!(a.next_u64(), b.next_u64());
        assert_ne!(rank_rng(7, 3, 1).next_u64(), train::step_rng(7, 3).next_u64());
    }
}
