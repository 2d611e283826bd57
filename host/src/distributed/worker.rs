//! One process's part of a distributed run: a driver of the core's phases
//! around the exchanges. The refresh, the embeddings, the scoring pass, the
//! loss terms, back-propagation, the optimiser and the cache updates are
//! the core's (`Trainer::refresh_stalest`, `Towers`, `CacheLoss` through
//! the sampler, `loss::query_terms`, `Optimizer::step`, `CacheMut`); this
//! file only orders them around the collectives.

use std::time::Instant;

use anyhow::{ensure, Context};
use negcache::loss::{query_terms, QueryControl, QueryGrads};
use negcache::random;
use negcache::trainer::{CacheMode, StepReport};
use rand_core::SeedableRng;
use rand_pcg::Pcg64Mcg;

use super::comm::Comm;
use super::exchange::{Exchange, Outgoing};
use super::gradients::GradientSum;
use super::replica::{new_replica, Replica, Replicated};
use super::sampler::{Draw, ShardedSampler};
use super::shards::{gather, take_shard, Owners};
use crate::checkpoint::{Checkpoint, Reader, Writer};
use crate::featurize::{ItemTokens, QueryTokens};
use crate::session::{load_cache, save_cache, Session, DIM};
use crate::store::OwnedCache;
use crate::train::{self, ObjectiveName, PrecisionName, Prepared, TrainConfig};

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
    ensure!(
        cfg.objective == ObjectiveName::Cache,
        "--distributed trains the cache objective only (--objective cache --negatives 1), with or without the control variate"
    );
    ensure!(cfg.negatives == 1, "--distributed draws one negative per query (negatives = 1)");
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

/// A step's report, and this shard's staleness sum and count (summed over
/// processes once per logging window rather than every step).
pub(super) struct Stepped {
    pub report: StepReport,
    pub stale_sum: f32,
    pub stale_count: f32,
}

/// One process's part of a distributed run.
pub(super) struct Worker<M> {
    pub comm: Comm,
    pub cfg: TrainConfig,
    pub replica: Replica<M>,
    pub local_batch: usize,
    pub step: u64,
    pub laps: Laps,
    sampler: ShardedSampler,
    gradients: GradientSum,
    exchange: Exchange,
    owners: Owners,
    pairs: Vec<(u32, u32)>,
    queries: Vec<QueryTokens>,
    positives: Vec<ItemTokens>,
    q: Vec<[f32; DIM]>,
    p: Vec<[f32; DIM]>,
    f: Vec<[f32; DIM]>,
    gq: Vec<[f32; DIM]>,
    gp: Vec<[f32; DIM]>,
    gn: Vec<[f32; DIM]>,
    draws: Vec<Draw>,
}

impl<M: Replicated> Worker<M> {
    /// A replica initialised from the seed (the same towers on every
    /// process), with an empty shard of `cache_capacity / P` slots (in
    /// corpus mode, filled with the items this process owns).
    pub fn new(comm: Comm, cfg: TrainConfig, data: &Prepared) -> anyhow::Result<Self> {
        let (rank, p) = (comm.rank(), comm.size());
        validate(&cfg, p)?;
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
        Ok(Self {
            comm,
            local_batch: cfg.batch / p,
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
            q: Vec::new(),
            p: Vec::new(),
            f: Vec::new(),
            gq: Vec::new(),
            gp: Vec::new(),
            gn: Vec::new(),
            draws: Vec::new(),
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
        let (rank, p, bl) = (self.comm.rank(), self.comm.size(), self.local_batch);
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
        let Replica { trainer, cache, .. } = &mut self.replica;
        self.laps.start();
        trainer.model.zero_grad();
        let mut evals = trainer.refresh_stalest(&mut cache.as_mut())?;
        self.laps.lap(0);
        for v in [&mut self.q, &mut self.p, &mut self.f, &mut self.gq, &mut self.gp, &mut self.gn] {
            v.clear();
            v.resize(bl, [0.0; DIM]);
        }
        trainer.model.embed_queries(&self.queries, &mut self.q);
        trainer.model.embed_items(&self.positives, &mut self.p);
        evals += 2 * bl as u32;
        self.laps.lap(1);
        let alpha = trainer.model.score_scale();
        self.sampler.draw(
            &mut self.comm,
            cache.as_ref(),
            &self.q,
            &self.positives,
            alpha,
            self.cfg.mask_accidental_hits,
            trainer.config().retrieval,
            trainer.control_variate().is_some(),
            &mut rng,
            &mut self.draws,
        )?;
        self.laps.lap(2);
        for (d, f) in self.draws.iter().zip(&mut self.f) {
            if d.pick.is_some() {
                trainer.model.embed_item(&d.item, f);
                evals += 1;
            }
        }

        // The loss of the global batch's mean, with prob_pos from the global
        // log-sum-exp: each process's part, summed by the all-reduce.
        let inv_b = 1.0 / (p * bl) as f32;
        let beta = trainer.control_variate();
        let (mut training, mut interpretable, mut prob_pos, mut grad_scale) = (0.0f32, 0.0f32, 0.0f32, 0.0f32);
        for b in 0..bl {
            let d = &self.draws[b];
            let grads = QueryGrads { query: &mut self.gq[b], positive: &mut self.gp[b], negative: &mut self.gn[b] };
            let fresh = d.pick.map(|_| &self.f[b]);
            let cv = beta.map(|beta| QueryControl { beta, stale: &d.stale, candidate_mean: &d.mean });
            let t = query_terms(&self.q[b], &self.p[b], &d.lse, fresh, cv, alpha, inv_b, Some(grads))?;
            training += t.training_loss;
            interpretable += t.interpretable_loss;
            prob_pos += t.prob_pos;
            if d.pick.is_some() {
                grad_scale += t.grad_scale;
            }
        }
        let model = &mut trainer.model;
        for b in 0..bl {
            model.backward_query(&self.queries[b], &self.gq[b]);
            model.backward_item(&self.positives[b], &self.gp[b]);
            if self.draws[b].pick.is_some() {
                model.backward_item(&self.draws[b].item, &self.gn[b]);
            }
        }
        model.backward_scale(grad_scale * inv_b);
        self.laps.lap(3);

        let extra = [training, interpretable, prob_pos, evals as f32];
        let sums = self.gradients.all_reduce(&mut self.comm, &mut trainer.model, &extra)?;
        self.laps.lap(4);
        let mut opt = *trainer.optimizer();
        let stats = opt.step(lr, &mut |v| trainer.model.visit(v))?;
        *trainer.optimizer_mut() = opt;
        trainer.model.zero_grad();
        self.laps.lap(5);
        let out = Outgoing {
            draws: &self.draws,
            fresh: &self.f,
            positives: &self.positives,
            positive_rows: &self.p,
            first_query: rank * bl,
        };
        let streaming = trainer.config().cache_mode == CacheMode::Streaming;
        let eviction = trainer.config().eviction;
        let positives = self.sampler.positives();
        let (stale_sum, stale_count) =
            self.exchange.run(&mut self.comm, cache, &self.owners, out, positives, streaming, eviction)?;
        self.laps.lap(6);
        self.step += 1;
        Ok(Stepped {
            report: StepReport {
                training_loss: sums[0] * inv_b,
                interpretable_loss: sums[1] * inv_b,
                staleness: 0.0,
                prob_pos: sums[2] * inv_b,
                tower_evals: sums[3] as u32,
                grad_norm: stats.grad_norm,
                score_scale: alpha,
            },
            stale_sum,
            stale_count,
        })
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

    #[test]
    fn process_zero_draws_what_a_single_process_run_draws() {
        let (mut a, mut b) = (rank_rng(7, 3, 0), train::step_rng(7, 3));
        assert_eq!(a.next_u64(), b.next_u64());
        assert_ne!(rank_rng(7, 3, 1).next_u64(), train::step_rng(7, 3).next_u64());
    }
}
