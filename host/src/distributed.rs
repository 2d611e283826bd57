//! Data-parallel training over MPI with the negative cache sharded across
//! the processes: `mpirun -np P negcache train --distributed ...`.
//!
//! Every process keeps a full replica of the towers and the optimiser
//! state, draws its B/P queries of a step from its own shard of the
//! training pairs (pair `i` belongs to process `i mod P`), and holds one
//! shard of the cache: N/P slots holding only the items it owns
//! ([`Owners`]: corpus index mod P). One step, with the collective that
//! carries each exchange in brackets:
//!
//! ```text
//!  1. refresh      each shard re-embeds its R/P stalest entries
//!  2. embed        each process embeds its B/P queries and positives
//!  3. [queries]    all-gather: every process gets all B queries and positive items
//!  4. score        every shard scores all B queries: its log-sum-exp Z_s and its
//!                  exact winner per query (the core's CacheLoss, inv_temp 1)
//!  5. [replies]    all-to-all: per query, each shard's (Z_s, winner slot, winner
//!                  tokens) go to the query's process
//!  6. draw         the query's process merges the Z_s into the global Z, picks
//!                  shard s with probability Z_s / Z (Gumbel-max over ln Z_s) and
//!                  takes that shard's winner: exactly a draw from the softmax over
//!                  all N slots; it embeds the winner afresh
//!  7. loss         prob_pos from the global Z; gradients of the global-batch mean
//!  8. [touched]    all-reduce (bitwise or): the embedding rows any process touched
//!  9. [gradients]  all-reduce (sum): dense gradients, the touched rows only, and
//!                  the step's loss sums
//! 10. optimiser    the same update on every process, so the replicas stay equal
//! 11. [update]     all-to-all (counts, then records): each fresh negative goes
//!                  back to the shard that holds it (refresh), each positive to
//!                  the shard that owns it (insert)
//! 12. update       each shard: refresh, insert, age (one core update call)
//! ```
//!
//! The draw is restricted to what merges exactly: one negative per query,
//! inverse temperature 1 (the shards' log-sum-exps are then the sampling
//! normalisers), all slots as candidates (no top-k) and the cache
//! objective. Process 0 draws from the same generator as a single-process
//! run ([`rank_rng`]), so with P = 1 a distributed run reproduces
//! `negcache train` bit for bit. Checkpoints gather the shards into one
//! cache in the single-process format, so the two kinds of run resume from
//! each other's checkpoints. `docs/distributed.md` has the costs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;
use negcache::cache::{CacheRef, SlotsMut, Update};
use negcache::layers::{EmbeddingBag, ParamVisitor};
use negcache::loss::relative_staleness;
use negcache::random;
use negcache::sampler::LogSumExp;
use negcache::tower::{Model, Side, TowerConfig, TwoTower};
use negcache::trainer::{StepReport, Trainer};
use negcache::vector::{axpy, dot};
use negcache::{CacheLoss, Item, LossConfig, Retrieval};
use rand_core::{RngCore, SeedableRng};
use rand_pcg::Pcg64Mcg;
use serde::Serialize;

use crate::checkpoint::{Checkpoint, Reader, Writer};
use crate::featurize::{ItemTokens, QueryTokens, ITEM_TOKENS};
use crate::memory::boxed;
use crate::report::MetricsLog;
use crate::session::{Session, Tying, BATCH, BUCKETS, CAP, DIM, E, H, NEG, S};
use crate::train::{self, ObjectiveName, Prepared, TrainConfig, TrainSummary, METRIC_COLUMNS};

/// Steps per logging window, as in `train::train`.
const WINDOW: u64 = 100;

/// A slot that holds no winner in a reply.
const NO_SLOT: u32 = u32::MAX;

/// Collective calls of one kind and what they carried.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Meter {
    /// Calls made.
    pub calls: u64,
    /// Payload bytes this process handed over for the other processes
    /// (for an all-reduce, its whole buffer).
    pub bytes_out: u64,
    /// Payload bytes this process received from the other processes (for
    /// an all-reduce, the whole result).
    pub bytes_in: u64,
    /// Seconds inside the calls, waiting for the slowest process included.
    pub seconds: f64,
}

/// A [`Meter`] divided by the steps it covered.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PerStep {
    /// Calls per step.
    pub calls: f64,
    /// Bytes out per step.
    pub bytes_out: f64,
    /// Bytes in per step.
    pub bytes_in: f64,
    /// Seconds per step.
    pub seconds: f64,
}

/// The world communicator, with a [`Meter`] per kind of exchange.
pub struct Comm {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    meters: Vec<(&'static str, Meter)>,
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Comm").field("rank", &self.rank).field("size", &self.size).finish_non_exhaustive()
    }
}

fn count(n: usize) -> Count {
    Count::try_from(n).expect("an MPI message of more than 2^31 elements")
}

impl Comm {
    /// Wraps a communicator.
    pub fn new(world: SimpleCommunicator) -> Self {
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Self { world, rank, size, meters: Vec::new() }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of processes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The meters, in the order their kinds were first used.
    pub fn meters(&self) -> &[(&'static str, Meter)] {
        &self.meters
    }

    /// Zeroes the meters (after set-up, so that they count steps only).
    pub fn reset_meters(&mut self) {
        self.meters.clear();
    }

    fn record(&mut self, name: &'static str, out: usize, inn: usize, t0: Instant) {
        let i = match self.meters.iter().position(|(n, _)| *n == name) {
            Some(i) => i,
            None => {
                self.meters.push((name, Meter::default()));
                self.meters.len() - 1
            }
        };
        let m = &mut self.meters[i].1;
        m.calls += 1;
        m.bytes_out += out as u64;
        m.bytes_in += inn as u64;
        m.seconds += t0.elapsed().as_secs_f64();
    }

    /// All-gather: `recv` (P times `send`'s length) gets every process's
    /// `send`, in rank order.
    pub fn all_gather(&mut self, name: &'static str, send: &[u32], recv: &mut [u32]) {
        assert_eq!(recv.len(), send.len() * self.size);
        let t0 = Instant::now();
        self.world.all_gather_into(send, recv);
        let others = 4 * send.len() * (self.size - 1);
        self.record(name, others, others, t0);
    }

    /// All-to-all with equal blocks: block `r` of `send` goes to process
    /// `r`, and block `r` of `recv` comes from it.
    pub fn all_to_all(&mut self, name: &'static str, send: &[u32], recv: &mut [u32]) {
        assert_eq!(send.len(), recv.len());
        assert_eq!(send.len() % self.size, 0);
        let t0 = Instant::now();
        self.world.all_to_all_into(send, recv);
        let others = 4 * send.len() / self.size * (self.size - 1);
        self.record(name, others, others, t0);
    }

    /// All-to-all with blocks of any length: `counts[r]` words of `send`
    /// (blocks in rank order) go to process `r`; `recv` is replaced by the
    /// blocks received, in rank order. Two calls: the counts, then the
    /// words.
    pub fn all_to_all_v(&mut self, name: &'static str, send: &[u32], counts: &[Count], recv: &mut Vec<u32>) {
        assert_eq!(counts.len(), self.size);
        let t0 = Instant::now();
        let mut incoming = vec![0 as Count; self.size];
        self.world.all_to_all_into(counts, &mut incoming[..]);
        let displs = offsets(counts);
        let in_displs = offsets(&incoming);
        let total: usize = incoming.iter().map(|&c| c as usize).sum();
        recv.clear();
        recv.resize(total, 0);
        let send_part = Partition::new(send, counts, &displs[..]);
        let mut recv_part = PartitionMut::new(&mut recv[..], &incoming[..], &in_displs[..]);
        self.world.all_to_all_varcount_into(&send_part, &mut recv_part);
        let me = self.rank;
        let out: usize = counts.iter().enumerate().filter(|&(r, _)| r != me).map(|(_, &c)| c as usize).sum();
        let inn = total - incoming[me] as usize;
        let counts_bytes = 4 * (self.size - 1);
        self.record(name, 4 * out + counts_bytes, 4 * inn + counts_bytes, t0);
        // The counts exchange is a call of its own.
        if let Some((_, m)) = self.meters.iter_mut().find(|(n, _)| *n == name) {
            m.calls += 1;
        }
    }

    /// Element-wise sum over processes; every process gets the result.
    pub fn sum_f32(&mut self, name: &'static str, send: &[f32], recv: &mut [f32]) {
        // MPI would read past a shorter buffer rather than complain.
        assert_eq!(send.len(), recv.len());
        let t0 = Instant::now();
        self.world.all_reduce_into(send, recv, SystemOperation::sum());
        self.record(name, 4 * send.len(), 4 * recv.len(), t0);
    }

    /// Element-wise bitwise or over processes.
    pub fn or_u32(&mut self, name: &'static str, send: &[u32], recv: &mut [u32]) {
        // MPI would read past a shorter buffer rather than complain.
        assert_eq!(send.len(), recv.len());
        let t0 = Instant::now();
        self.world.all_reduce_into(send, recv, SystemOperation::bitwise_or());
        self.record(name, 4 * send.len(), 4 * recv.len(), t0);
    }

    /// Gathers every process's `send` (all of equal length) on process 0,
    /// in rank order; `None` elsewhere.
    pub fn gather_to_root(&mut self, name: &'static str, send: &[u32]) -> Option<Vec<u32>> {
        let t0 = Instant::now();
        let root = self.world.process_at_rank(0);
        let got = if self.rank == 0 {
            let mut all = vec![0u32; send.len() * self.size];
            root.gather_into_root(send, &mut all[..]);
            Some(all)
        } else {
            root.gather_into(send);
            None
        };
        let (out, inn) = if self.rank == 0 { (0, 4 * send.len() * (self.size - 1)) } else { (4 * send.len(), 0) };
        self.record(name, out, inn, t0);
        got
    }
}

fn offsets(counts: &[Count]) -> Vec<Count> {
    counts
        .iter()
        .scan(0 as Count, |at, &c| {
            let d = *at;
            *at += c;
            Some(d)
        })
        .collect()
}

/// The generator of process `rank` at `step`. Process 0 draws exactly what
/// a single-process run draws ([`train::step_rng`]), so one process
/// reproduces `negcache train` bit for bit; every other process gets a
/// stream of its own, so the shards' draws are independent.
pub fn rank_rng(seed: u64, step: u64, rank: usize) -> Pcg64Mcg {
    train::step_rng(seed ^ (rank as u64).wrapping_mul(0xd6e8_feb8_6659_fd93), step)
}

/// Which process's shard holds an item: its corpus index modulo P.
/// Items with identical tokens (identical text, without the item-id token)
/// count as the first of them, because the in-cache filter and the
/// accidental-hit mask compare tokens: every copy must live in one shard
/// for them to see it.
#[derive(Debug)]
pub struct Owners {
    first: HashMap<ItemTokens, u32>,
    size: usize,
}

impl Owners {
    /// The owners of `items` (the corpus, in order) among `size` processes.
    pub fn new(items: &[ItemTokens], size: usize) -> Self {
        let mut first = HashMap::with_capacity(items.len());
        for (i, t) in items.iter().enumerate() {
            first.entry(*t).or_insert(i as u32);
        }
        Self { first, size }
    }

    /// The process that owns `item`, or `None` if it is not in the corpus.
    pub fn of(&self, item: &ItemTokens) -> Option<usize> {
        self.first.get(item).map(|&i| i as usize % self.size)
    }
}

/// Picks the shard a query's negative comes from: shard `s` with
/// probability `Z_s / sum_t Z_t`, by Gumbel-max over `ln Z_s`. Shards
/// without a candidate (`sum == 0`) are never picked; `None` when no shard
/// has one. With a single candidate shard no random number is drawn.
///
/// Taking the picked shard's own exact winner then draws slot `j` of
/// shard `s` with probability `Z_s / Z * exp(c_j) / Z_s = exp(c_j) / Z`:
/// the softmax over every slot of every shard, as one cache would.
pub fn choose_shard(lse: &[LogSumExp], rng: &mut impl RngCore) -> Option<usize> {
    let live = lse.iter().filter(|z| z.sum > 0.0).count();
    match live {
        0 => None,
        1 => lse.iter().position(|z| z.sum > 0.0),
        _ => {
            let mut best: Option<(f32, usize)> = None;
            for (s, z) in lse.iter().enumerate().filter(|(_, z)| z.sum > 0.0) {
                let key = z.minus(0.0) + random::gumbel(rng);
                if best.is_none_or(|(k, _)| key > k) {
                    best = Some((key, s));
                }
            }
            best.map(|(_, s)| s)
        }
    }
}

/// One query's negative from the sharded cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    /// The log-sum-exp over the candidates of every shard (the positive
    /// not included).
    pub lse: LogSumExp,
    /// The shard and slot drawn; `None` when no shard had a candidate.
    pub pick: Option<(usize, u32)>,
    /// The drawn item (`ItemTokens::EMPTY` without a pick).
    pub item: ItemTokens,
}

/// The sharded draw (steps 3 to 6 of the module docs): every process
/// scores every query of the step against its shard, and each query's own
/// process merges the shards' answers into one exact draw.
pub struct ShardedSampler {
    loss: Box<CacheLoss<BATCH, NEG>>,
    queries: Vec<[f32; DIM]>,
    items: Vec<ItemTokens>,
    send: Vec<u32>,
    recv: Vec<u32>,
    lse: Vec<LogSumExp>,
}

impl std::fmt::Debug for ShardedSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedSampler").field("queries", &self.queries.len()).finish_non_exhaustive()
    }
}

/// Words per query in the all-gather: the embedding, then the positive.
const QUERY_WORDS: usize = DIM + ITEM_TOKENS;
/// Words per (query, shard) reply: lse max, lse sum, slot, the item.
const REPLY_WORDS: usize = 3 + ITEM_TOKENS;

impl Default for ShardedSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl ShardedSampler {
    /// Empty buffers.
    pub fn new() -> Self {
        Self {
            loss: Box::new(CacheLoss::new()),
            queries: Vec::new(),
            items: Vec::new(),
            send: Vec::new(),
            recv: Vec::new(),
            lse: Vec::new(),
        }
    }

    /// The positives' items of the last draw, for every process's queries
    /// in rank order (global query `g` is query `g mod B/P` of process
    /// `g / (B/P)`).
    pub fn positives(&self) -> &[ItemTokens] {
        &self.items
    }

    /// Draws one negative per local query from the union of every
    /// process's shard. Collective: every process calls it with the same
    /// number of queries. `positives` are the local queries' positive items
    /// (masked in every shard when `mask_accidental_hits`), `alpha` the
    /// score scale; `retrieval` must be `ExpJump` or `Gumbel` with inverse
    /// temperature 1. `rng` is this process's: it draws this shard's
    /// winners and the shard choice for this process's queries.
    #[allow(clippy::too_many_arguments)]
    pub fn draw(
        &mut self,
        comm: &mut Comm,
        shard: CacheRef<'_, ItemTokens, DIM>,
        queries: &[[f32; DIM]],
        positives: &[ItemTokens],
        alpha: f32,
        mask_accidental_hits: bool,
        retrieval: Retrieval<'_>,
        rng: &mut impl RngCore,
        out: &mut Vec<Draw>,
    ) -> anyhow::Result<()> {
        ensure!(
            matches!(retrieval, Retrieval::ExpJump { inv_temp } | Retrieval::Gumbel { inv_temp } if inv_temp == 1.0),
            "the sharded cache draws exactly only with exp-jump or gumbel at inverse temperature 1"
        );
        ensure!(queries.len() == positives.len(), "{} queries but {} positives", queries.len(), positives.len());
        let (p, bl) = (comm.size(), queries.len());
        ensure!(p * bl <= BATCH, "a global batch of {} exceeds {BATCH}", p * bl);

        // Every shard needs every query, and the positives for the mask.
        self.send.clear();
        for (q, y) in queries.iter().zip(positives) {
            self.send.extend(q.iter().map(|x| x.to_bits()));
            self.send.extend_from_slice(y);
        }
        self.recv.clear();
        self.recv.resize(p * bl * QUERY_WORDS, 0);
        comm.all_gather("queries", &self.send, &mut self.recv);
        self.queries.clear();
        self.items.clear();
        for w in self.recv.chunks_exact(QUERY_WORDS) {
            self.queries.push(std::array::from_fn(|i| f32::from_bits(w[i])));
            self.items.push(std::array::from_fn(|i| w[DIM + i]));
        }

        // This shard's log-sum-exp and exact winner for every query. The
        // positives' embeddings only enter the core's prob_pos, which needs
        // the global log-sum-exp and is recomputed by the query's process,
        // so the queries stand in for them here.
        let cfg = LossConfig { score_scale: alpha, top_k: 0, mask_accidental_hits };
        self.loss.score_and_sample(
            shard,
            &self.queries,
            &self.queries,
            Some(&self.items),
            &cfg,
            retrieval,
            rng,
            None,
        )?;
        self.send.clear();
        for g in 0..p * bl {
            let z = self.loss.candidate_lse(g);
            let (slot, item) = match self.loss.negatives(g).first() {
                Some(&s) => (s, shard.items()[s as usize]),
                None => (NO_SLOT, ItemTokens::EMPTY),
            };
            self.send.extend([z.max.to_bits(), z.sum.to_bits(), slot]);
            self.send.extend_from_slice(&item);
        }
        self.recv.clear();
        self.recv.resize(self.send.len(), 0);
        comm.all_to_all("replies", &self.send, &mut self.recv);

        // Block s of the replies is shard s's answer for the local queries.
        out.clear();
        for i in 0..bl {
            self.lse.clear();
            let mut total = LogSumExp::EMPTY;
            for s in 0..p {
                let r = &self.recv[(s * bl + i) * REPLY_WORDS..];
                let z = LogSumExp { max: f32::from_bits(r[0]), sum: f32::from_bits(r[1]) };
                total.merge(&z);
                self.lse.push(z);
            }
            let draw = match choose_shard(&self.lse, rng) {
                Some(s) => {
                    let r = &self.recv[(s * bl + i) * REPLY_WORDS..(s * bl + i + 1) * REPLY_WORDS];
                    ensure!(r[2] != NO_SLOT, "shard {s} reported candidates but no winner");
                    Draw { lse: total, pick: Some((s, r[2])), item: std::array::from_fn(|k| r[3 + k]) }
                }
                None => Draw { lse: total, pick: None, item: ItemTokens::EMPTY },
            };
            out.push(draw);
        }
        Ok(())
    }
}

/// A model whose token tables can be reached, so that rows another process
/// touched can be marked touched here (see `EmbeddingBag::touch`).
pub trait Towers: Model<DIM> + Send + Sync + Sized + 'static {
    /// Zero parameters with the given settings.
    fn with_config(cfg: TowerConfig) -> Self;
    /// The token tables, in the order `Model::visit` shows them.
    fn tables(&mut self) -> &mut [EmbeddingBag<BUCKETS, E, S>];
}

impl<const T: usize, const M: usize> Towers for TwoTower<T, M, BUCKETS, E, H, DIM, S> {
    fn with_config(cfg: TowerConfig) -> Self {
        Self::new(cfg)
    }
    fn tables(&mut self) -> &mut [EmbeddingBag<BUCKETS, E, S>] {
        self.tables_mut()
    }
}

type Tr<M> = Trainer<M, QueryTokens, ItemTokens, CAP, DIM, BATCH, NEG>;

/// Bytes of the cache section at the end of a checkpoint body (fixed by
/// the shape: every slot of `CAP` is written).
const CACHE_SECTION_BYTES: usize = 4 + (8 + CAP * DIM * 4) + (8 + CAP * ITEM_TOKENS * 4) + 3 * (8 + CAP * 4) + 8;

/// CRC-32 of a checkpoint body without its cache section: the towers, the
/// optimiser state and step count, which must be identical on every
/// process of a distributed run.
pub fn model_checksum(body: &[u8]) -> u32 {
    crc32fast::hash(&body[..body.len().saturating_sub(CACHE_SECTION_BYTES)])
}

/// The slots `[from, to)` of a cache's storage, copied out.
#[derive(Debug, Clone, Default)]
struct SlotCopy {
    embeddings: Vec<[f32; DIM]>,
    items: Vec<ItemTokens>,
    ages: Vec<i32>,
    stamps: Vec<u32>,
    occupied: Vec<bool>,
}

impl SlotCopy {
    fn read(s: &SlotsMut<'_, ItemTokens, DIM>, from: usize, to: usize) -> Self {
        Self {
            embeddings: s.embeddings[from..to].to_vec(),
            items: s.items[from..to].to_vec(),
            ages: s.ages[from..to].to_vec(),
            stamps: s.stamps[from..to].to_vec(),
            occupied: s.occupied[from..to].to_vec(),
        }
    }

    fn write(&self, s: &mut SlotsMut<'_, ItemTokens, DIM>, at: usize) {
        let n = self.ages.len();
        s.embeddings[at..at + n].copy_from_slice(&self.embeddings);
        s.items[at..at + n].copy_from_slice(&self.items);
        s.ages[at..at + n].copy_from_slice(&self.ages);
        s.stamps[at..at + n].copy_from_slice(&self.stamps);
        s.occupied[at..at + n].copy_from_slice(&self.occupied);
    }

    /// `n` slots as a never-written cache has them after `clock` updates.
    fn empty(n: usize, clock: u32) -> Self {
        Self {
            embeddings: vec![[0.0; DIM]; n],
            items: vec![ItemTokens::EMPTY; n],
            ages: vec![clock.min(i32::MAX as u32) as i32; n],
            stamps: vec![0; n],
            occupied: vec![false; n],
        }
    }

    fn push(&mut self, o: &SlotCopy, j: usize) {
        self.embeddings.push(o.embeddings[j]);
        self.items.push(o.items[j]);
        self.ages.push(o.ages[j]);
        self.stamps.push(o.stamps[j]);
        self.occupied.push(o.occupied[j]);
    }

    /// Words per slot on the wire: embedding, item, age, stamp, occupied.
    const WORDS: usize = DIM + ITEM_TOKENS + 3;

    fn to_words(&self, out: &mut Vec<u32>) {
        for j in 0..self.ages.len() {
            out.extend(self.embeddings[j].iter().map(|x| x.to_bits()));
            out.extend_from_slice(&self.items[j]);
            out.extend([self.ages[j] as u32, self.stamps[j], self.occupied[j] as u32]);
        }
    }

    fn from_words(w: &[u32]) -> Self {
        let mut c = Self::default();
        for r in w.chunks_exact(Self::WORDS) {
            c.embeddings.push(std::array::from_fn(|i| f32::from_bits(r[i])));
            c.items.push(std::array::from_fn(|i| r[DIM + i]));
            let t = DIM + ITEM_TOKENS;
            c.ages.push(r[t] as i32);
            c.stamps.push(r[t + 1]);
            c.occupied.push(r[t + 2] != 0);
        }
        c
    }
}

/// Packs the touched flags of each table into bit words.
struct TouchedBits<'a>(&'a mut Vec<u32>);

impl ParamVisitor for TouchedBits<'_> {
    fn dense(&mut self, _: &mut [f32], _: &mut [f32], _: &mut [&mut [f32]]) {}
    fn sparse(&mut self, _: usize, _: &mut [f32], _: &mut [f32], _: &mut [&mut [f32]], touched: &[bool]) {
        let at = self.0.len();
        self.0.resize(at + touched.len().div_ceil(32), 0);
        for (r, _) in touched.iter().enumerate().filter(|(_, &t)| t) {
            self.0[at + r / 32] |= 1 << (r % 32);
        }
    }
}

/// Copies gradients out (`pack`) or back in (`!pack`): every dense tensor
/// whole, and the touched rows of each table, in visiting order.
struct Grads<'a> {
    buf: &'a mut Vec<f32>,
    at: usize,
    pack: bool,
}

impl Grads<'_> {
    fn copy(&mut self, grad: &mut [f32]) {
        if self.pack {
            self.buf.extend_from_slice(grad);
        } else {
            grad.copy_from_slice(&self.buf[self.at..self.at + grad.len()]);
            self.at += grad.len();
        }
    }
}

impl ParamVisitor for Grads<'_> {
    fn dense(&mut self, _: &mut [f32], grad: &mut [f32], _: &mut [&mut [f32]]) {
        self.copy(grad);
    }
    fn sparse(&mut self, n: usize, _: &mut [f32], grad: &mut [f32], _: &mut [&mut [f32]], touched: &[bool]) {
        for (r, _) in touched.iter().enumerate().filter(|(_, &t)| t) {
            self.copy(&mut grad[r * n..(r + 1) * n]);
        }
    }
}

/// Parameter values counted, for the cost model in the summary.
struct CountParams {
    dense: usize,
    sparse: usize,
}

impl ParamVisitor for CountParams {
    fn dense(&mut self, v: &mut [f32], _: &mut [f32], _: &mut [&mut [f32]]) {
        self.dense += v.len();
    }
    fn sparse(&mut self, _: usize, v: &mut [f32], _: &mut [f32], _: &mut [&mut [f32]], _: &[bool]) {
        self.sparse += v.len();
    }
}

/// Checks that a configuration is one the sharded cache trains exactly.
pub fn validate(cfg: &TrainConfig, processes: usize) -> anyhow::Result<()> {
    cfg.validate()?;
    let p = processes;
    ensure!(
        cfg.objective == ObjectiveName::Cache,
        "--distributed trains the paper's cache objective only (--objective cache --negatives 1 --control-variate false)"
    );
    ensure!(cfg.negatives == 1, "--distributed draws one negative per query (negatives = 1)");
    ensure!(!cfg.control_variate, "--distributed has no control variate yet (control_variate = false)");
    ensure!(
        cfg.inv_temp == 1.0,
        "--distributed needs inv_temp = 1: only then do the shards' log-sum-exps merge into an exact draw"
    );
    ensure!(cfg.top_k == 0, "--distributed scores every slot (top_k = 0): top-k groups would cut across shards");
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

/// One process's part of a distributed run.
struct Worker<M: Towers> {
    comm: Comm,
    cfg: TrainConfig,
    trainer: Box<Tr<M>>,
    sampler: ShardedSampler,
    owners: Owners,
    pairs: Vec<(u32, u32)>,
    shard_cap: usize,
    local_batch: usize,
    dense_params: usize,
    step: u64,
    /// Seconds spent in each of [`PHASES`] (collectives included).
    phases: [f64; PHASES.len()],
    queries: Vec<QueryTokens>,
    positives: Vec<ItemTokens>,
    q: Vec<[f32; DIM]>,
    p: Vec<[f32; DIM]>,
    f: Vec<[f32; DIM]>,
    gq: Vec<[f32; DIM]>,
    gp: Vec<[f32; DIM]>,
    gn: Vec<[f32; DIM]>,
    draws: Vec<Draw>,
    bits: Vec<u32>,
    bits_all: Vec<u32>,
    grads: Vec<f32>,
    grads_sum: Vec<f32>,
    words: Vec<u32>,
    words_in: Vec<u32>,
    slots: Vec<usize>,
    rows: Vec<[f32; DIM]>,
    items: Vec<ItemTokens>,
}

/// The parts of a step timed separately, in order.
const PHASES: [&str; 7] = [
    "refresh",
    "embed batch",
    "draw (score + queries + replies)",
    "embed negatives, loss, backward",
    "gradient all-reduce (touched + gradients)",
    "optimiser",
    "cache update (update)",
];

/// A step's report, and this shard's staleness sum and count (summed over
/// processes once per logging window rather than every step).
struct Stepped {
    report: StepReport,
    stale_sum: f32,
    stale_count: f32,
}

impl<M: Towers> Worker<M> {
    fn new(comm: Comm, cfg: TrainConfig, data: &Prepared) -> anyhow::Result<Self> {
        let (rank, p) = (comm.rank(), comm.size());
        validate(&cfg, p)?;
        let shard_cap = cfg.cache_capacity / p;
        let mut tcfg = cfg.trainer();
        tcfg.cache_capacity = shard_cap;
        tcfg.refresh_per_step = cfg.refresh_per_step / p;
        let tower = cfg.tower();
        let mut trainer = boxed(move || Tr::<M>::new(M::with_config(tower), tcfg))?;
        // The same initial towers on every process: the seed alone decides.
        Session::init(&mut *trainer, &mut Pcg64Mcg::seed_from_u64(cfg.seed))?;
        let pairs: Vec<(u32, u32)> = data.pairs.iter().skip(rank).step_by(p).copied().collect();
        ensure!(!pairs.is_empty(), "process {rank} has no training pairs: fewer pairs than processes");
        let owners = Owners::new(&data.features.items, p);
        let mut params = CountParams { dense: 0, sparse: 0 };
        trainer.model.visit(&mut params);
        let mut w = Self {
            comm,
            local_batch: cfg.batch / p,
            dense_params: params.dense,
            phases: [0.0; PHASES.len()],
            cfg,
            trainer,
            sampler: ShardedSampler::new(),
            owners,
            pairs,
            shard_cap,
            step: 0,
            queries: Vec::new(),
            positives: Vec::new(),
            q: Vec::new(),
            p: Vec::new(),
            f: Vec::new(),
            gq: Vec::new(),
            gp: Vec::new(),
            gn: Vec::new(),
            draws: Vec::new(),
            bits: Vec::new(),
            bits_all: Vec::new(),
            grads: Vec::new(),
            grads_sum: Vec::new(),
            words: Vec::new(),
            words_in: Vec::new(),
            slots: Vec::new(),
            rows: Vec::new(),
            items: Vec::new(),
        };
        if w.cfg.corpus_cache {
            let mine: Vec<ItemTokens> =
                data.features.items.iter().filter(|t| w.owners.of(t) == Some(rank)).copied().collect();
            ensure!(
                mine.len() <= shard_cap,
                "corpus mode: process {rank} owns {} items but its shard has {shard_cap} slots",
                mine.len()
            );
            w.trainer.fill_cache(&mine)?;
        }
        Ok(w)
    }

    /// Restores a checkpoint written by either kind of run: the towers and
    /// optimiser as they are, the cache redistributed (see
    /// [`Self::take_shard`]).
    fn restore(&mut self, ck: &Checkpoint) -> anyhow::Result<()> {
        let body = &ck.body;
        Session::load(&mut *self.trainer, &mut Reader::new(body)).context("cannot restore the checkpoint")?;
        let from = ck.header.get("distributed").and_then(|d| d["processes"].as_u64());
        self.take_shard(from == Some(self.comm.size() as u64))
    }

    /// Replaces the loaded single-cache storage (global layout, slots
    /// `0..N`) by this process's shard. From a distributed run with as many
    /// processes, shard `r` is block `r`, copied as it was. Otherwise the
    /// shard takes the occupied slots whose items it owns, in slot order
    /// (the youngest `N/P` if it owns more), and its other slots are empty
    /// and as old as a never-written slot, so that they fill first.
    fn take_shard(&mut self, same_layout: bool) -> anyhow::Result<()> {
        let (rank, n) = (self.comm.rank(), self.shard_cap);
        let global = self.cfg.cache_capacity;
        let slots = self.trainer.cache_mut().slots_mut();
        let clock = *slots.clock;
        let all = SlotCopy::read(&slots, 0, global);
        let mine = if same_layout {
            let mut c = SlotCopy::default();
            (rank * n..(rank + 1) * n).for_each(|j| c.push(&all, j));
            c
        } else {
            let mut owned = Vec::new();
            for j in (0..global).filter(|&j| all.occupied[j]) {
                match self.owners.of(&all.items[j]) {
                    Some(o) if o == rank => owned.push(j),
                    Some(_) => {}
                    None => bail!("the checkpoint's cache holds an item (slot {j}) that is not in this dataset"),
                }
            }
            if owned.len() > n {
                owned.sort_by_key(|&j| (all.ages[j], j));
                owned.truncate(n);
                owned.sort_unstable();
            }
            let mut c = SlotCopy::default();
            owned.iter().for_each(|&j| c.push(&all, j));
            let pad = SlotCopy::empty(n - owned.len(), clock);
            (0..pad.ages.len()).for_each(|j| c.push(&pad, j));
            c
        };
        let mut slots = self.trainer.cache_mut().slots_mut();
        SlotCopy::empty(CAP, 0).write(&mut slots, 0);
        mine.write(&mut slots, 0);
        Ok(())
    }

    /// Adds the time since `clock` to phase `k` and restarts the clock.
    fn lap(&mut self, k: usize, clock: &mut Instant) {
        let now = Instant::now();
        self.phases[k] += (now - *clock).as_secs_f64();
        *clock = now;
    }

    /// Re-embeds this shard's `R/P` stalest entries, as the core's trainer
    /// does for its whole cache.
    fn refresh_stalest(&mut self) -> anyhow::Result<u32> {
        let n = self.shard_cap;
        let mut left = (self.cfg.refresh_per_step / self.comm.size()).min(n);
        let mut evals = 0;
        let eviction = self.trainer.config().eviction;
        while left > 0 {
            let want = left.min(BATCH);
            self.slots.resize(want, 0);
            let got = self.trainer.cache().prefix(n).stalest(&mut self.slots[..want]);
            self.rows.resize(got, [0.0; DIM]);
            for k in 0..got {
                let item = self.trainer.cache().prefix(n).items()[self.slots[k]];
                self.trainer.model.embed(Side::Item, &item, &mut self.rows[k]);
            }
            let up = Update {
                refresh_indices: &self.slots[..got],
                refresh_embeddings: &self.rows[..got],
                ..Update::default()
            };
            self.trainer.cache_mut().prefix_mut(n).refresh(&up, eviction)?;
            evals += got as u32;
            left -= want;
            if got < want {
                break;
            }
        }
        Ok(evals)
    }

    /// One step (see the module docs). The loss and gradient arithmetic
    /// follows `CacheLoss::backward` operation for operation, so that one
    /// process reproduces the core's trainer exactly.
    fn step(&mut self, data: &Prepared) -> anyhow::Result<Stepped> {
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
        let mut clock = Instant::now();
        self.trainer.model.zero_grad();
        let mut evals = self.refresh_stalest()?;
        self.lap(0, &mut clock);
        for v in [&mut self.q, &mut self.p, &mut self.f, &mut self.gq, &mut self.gp, &mut self.gn] {
            v.clear();
            v.resize(bl, [0.0; DIM]);
        }
        for b in 0..bl {
            self.trainer.model.embed(Side::Query, &self.queries[b], &mut self.q[b]);
            self.trainer.model.embed(Side::Item, &self.positives[b], &mut self.p[b]);
        }
        evals += 2 * bl as u32;
        self.lap(1, &mut clock);
        let alpha = self.trainer.model.score_scale();
        self.sampler.draw(
            &mut self.comm,
            self.trainer.cache().prefix(self.shard_cap),
            &self.q,
            &self.positives,
            alpha,
            self.cfg.mask_accidental_hits,
            self.trainer.config().retrieval,
            &mut rng,
            &mut self.draws,
        )?;
        self.lap(2, &mut clock);
        for b in 0..bl {
            if self.draws[b].pick.is_some() {
                self.trainer.model.embed(Side::Item, &self.draws[b].item, &mut self.f[b]);
                evals += 1;
            }
        }

        // The loss of the global batch's mean, with prob_pos from the global
        // log-sum-exp: each process's part, summed by the all-reduce.
        let inv_b = 1.0 / (p * bl) as f32;
        let (mut training, mut interpretable, mut prob_pos, mut grad_scale) = (0.0f32, 0.0f32, 0.0f32, 0.0f32);
        for b in 0..bl {
            let (q, pos) = (&self.q[b], &self.p[b]);
            let s = alpha * dot(q, pos);
            ensure!(s.is_finite(), "non-finite positive score");
            let cand = self.draws[b].lse;
            let mut z = LogSumExp::EMPTY;
            z.push(s);
            z.merge(&cand);
            let w = if cand.sum > 0.0 { cand.sum * z.weight(cand.max) } else { 0.0 };
            let m = usize::from(self.draws[b].pick.is_some());
            let f = &self.f[b];
            let mut neg_dot = 0.0f32;
            if m > 0 {
                ensure!(f.iter().all(|x| x.is_finite()), "non-finite fresh negative embedding");
                neg_dot += dot(q, f);
            }
            let (mean_dot, inv_m) = if m > 0 { (neg_dot / m as f32, 1.0 / m as f32) } else { (0.0, 0.0) };
            training += if m > 0 { w * (alpha * mean_dot - s) } else { 0.0 };
            if m > 0 {
                grad_scale += w * (mean_dot - dot(q, pos));
            }
            interpretable += z.minus(s);
            prob_pos += z.weight(s);
            let c = if m > 0 { w * alpha * inv_b } else { 0.0 };
            if m > 0 {
                axpy(c * inv_m, f, &mut self.gq[b]);
                axpy(c * inv_m, q, &mut self.gn[b]);
            }
            axpy(-c, pos, &mut self.gq[b]);
            axpy(-c, q, &mut self.gp[b]);
        }
        let model = &mut self.trainer.model;
        for b in 0..bl {
            model.backward(Side::Query, &self.queries[b], &self.gq[b]);
            model.backward(Side::Item, &self.positives[b], &self.gp[b]);
            if self.draws[b].pick.is_some() {
                model.backward(Side::Item, &self.draws[b].item, &self.gn[b]);
            }
        }
        model.backward_scale(grad_scale * inv_b);
        self.lap(3, &mut clock);

        let sums = self.all_reduce_gradients(&[training, interpretable, prob_pos, evals as f32])?;
        self.lap(4, &mut clock);
        let mut opt = *self.trainer.optimizer();
        let model = &mut self.trainer.model;
        let stats = opt.step(lr, &mut |v| model.visit(v))?;
        *self.trainer.optimizer_mut() = opt;
        self.trainer.model.zero_grad();
        self.lap(5, &mut clock);
        let (stale_sum, stale_count) = self.exchange_updates()?;
        self.lap(6, &mut clock);
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

    /// Sums the gradients over processes (steps 8 and 9), with `extra`
    /// values riding along; returns their sums. Embedding tables carry only
    /// the rows some process touched, which every process then marks as
    /// touched so that its lazy optimiser updates the same rows.
    fn all_reduce_gradients(&mut self, extra: &[f32]) -> anyhow::Result<Vec<f32>> {
        self.bits.clear();
        self.trainer.model.visit(&mut TouchedBits(&mut self.bits));
        self.bits_all.clear();
        self.bits_all.resize(self.bits.len(), 0);
        self.comm.or_u32("touched", &self.bits, &mut self.bits_all);
        let words = BUCKETS.div_ceil(32);
        for (k, table) in self.trainer.model.tables().iter_mut().enumerate() {
            for (i, &w) in self.bits_all[k * words..(k + 1) * words].iter().enumerate() {
                let mut w = w;
                while w != 0 {
                    table.touch(i * 32 + w.trailing_zeros() as usize);
                    w &= w - 1;
                }
            }
        }
        self.grads.clear();
        self.trainer.model.visit(&mut Grads { buf: &mut self.grads, at: 0, pack: true });
        let params = self.grads.len();
        // Every process must hand the all-reduce a buffer of one length (MPI
        // does not check): the dense tensors and the union's rows.
        let rows: u32 = self.bits_all.iter().map(|w| w.count_ones()).sum();
        ensure!(
            params == self.dense_params + rows as usize * E,
            "the gradient buffer ({params} values) is not the dense tensors ({}) and the {rows} touched rows",
            self.dense_params
        );
        self.grads.extend_from_slice(extra);
        self.grads_sum.clear();
        self.grads_sum.resize(self.grads.len(), 0.0);
        self.comm.sum_f32("gradients", &self.grads, &mut self.grads_sum);
        self.trainer.model.visit(&mut Grads { buf: &mut self.grads_sum, at: 0, pack: false });
        Ok(self.grads_sum[params..].to_vec())
    }

    /// Sends each fresh negative back to its shard and each positive to its
    /// owner, then updates this shard (steps 11 and 12). Returns this
    /// shard's staleness sum and count over the negatives it refreshed.
    fn exchange_updates(&mut self) -> anyhow::Result<(f32, f32)> {
        const KIND_REFRESH: u32 = 0;
        const KIND_INSERT: u32 = 1;
        const WORDS: usize = 2 + DIM;
        let (rank, p, bl, n) = (self.comm.rank(), self.comm.size(), self.local_batch, self.shard_cap);
        let streaming = !self.cfg.corpus_cache;
        // Each positive's owner, looked up once rather than once per shard:
        // the shard that holds it (then refreshed, as the single-process
        // trainer refreshes cached positives) or would insert it.
        let owner: Vec<Option<usize>> = self.positives.iter().map(|y| self.owners.of(y)).collect();
        self.words.clear();
        let mut counts = vec![0 as Count; p];
        for (dest, c) in counts.iter_mut().enumerate() {
            let start = self.words.len();
            for (b, own) in owner.iter().enumerate() {
                if let Some((s, slot)) = self.draws[b].pick {
                    if s == dest {
                        self.words.extend([KIND_REFRESH, slot]);
                        self.words.extend(self.f[b].iter().map(|x| x.to_bits()));
                    }
                }
                if *own == Some(dest) {
                    self.words.extend([KIND_INSERT, (rank * bl + b) as u32]);
                    self.words.extend(self.p[b].iter().map(|x| x.to_bits()));
                }
            }
            *c = count(self.words.len() - start);
        }
        self.comm.all_to_all_v("update", &self.words, &counts, &mut self.words_in);

        // Records arrive by sending process, each in its query order: global
        // query order, the order one cache applies them in.
        self.slots.clear();
        self.rows.clear();
        self.items.clear();
        let mut fresh_rows: Vec<[f32; DIM]> = Vec::new();
        let (mut cached_slots, mut cached_rows): (Vec<usize>, Vec<[f32; DIM]>) = (Vec::new(), Vec::new());
        let mut seen: Vec<ItemTokens> = Vec::new();
        let (mut stale_sum, mut stale_count) = (0.0f32, 0.0f32);
        let cache = self.trainer.cache().prefix(n);
        for r in self.words_in.chunks_exact(WORDS) {
            let e: [f32; DIM] = std::array::from_fn(|i| f32::from_bits(r[2 + i]));
            match r[0] {
                KIND_REFRESH => {
                    let slot = r[1] as usize;
                    ensure!(slot < n, "a refresh of slot {slot} of a shard of {n}");
                    stale_sum += relative_staleness(&cache.embeddings()[slot], &e);
                    stale_count += 1.0;
                    self.slots.push(slot);
                    self.rows.push(e);
                }
                KIND_INSERT => {
                    let g = r[1] as usize;
                    let item = *self.sampler.positives().get(g).context("an insert for an unknown query")?;
                    if let Some(slot) = cache.position(&item) {
                        cached_slots.push(slot);
                        cached_rows.push(e);
                    } else if streaming && !seen.contains(&item) {
                        self.items.push(item);
                        fresh_rows.push(e);
                    }
                    seen.push(item);
                }
                k => bail!("unknown update record kind {k}"),
            }
        }
        let eviction = self.trainer.config().eviction;
        // First the cached positives (a refresh, no ageing), then the drawn
        // negatives and the inserts: the single-process order.
        let positives =
            Update { refresh_indices: &cached_slots, refresh_embeddings: &cached_rows, ..Update::default() };
        self.trainer.cache_mut().prefix_mut(n).refresh(&positives, eviction)?;
        let up = Update {
            refresh_indices: &self.slots,
            refresh_embeddings: &self.rows,
            refresh_mask: None,
            new_embeddings: &fresh_rows,
            new_items: &self.items,
            new_mask: None,
        };
        self.trainer.cache_mut().prefix_mut(n).update(&up, eviction)?;
        Ok((stale_sum, stale_count))
    }

    /// The run as a checkpoint in the single-process format, on process 0
    /// (collective: the shards are gathered there). The towers and the
    /// optimiser are process 0's, equal to every other's; the cache is the
    /// shards side by side, shard `r` in slots `r N/P .. (r + 1) N/P`.
    fn checkpoint(&mut self) -> anyhow::Result<Option<Checkpoint>> {
        let (p, n) = (self.comm.size(), self.shard_cap);
        let mut words = Vec::with_capacity(n * SlotCopy::WORDS + 1);
        {
            let slots = self.trainer.cache_mut().slots_mut();
            SlotCopy::read(&slots, 0, n).to_words(&mut words);
            words.push(*slots.clock);
        }
        let Some(all) = self.comm.gather_to_root("checkpoint", &words) else {
            return Ok(None);
        };
        let block = n * SlotCopy::WORDS + 1;
        let clock = all[block - 1];
        for r in 0..p {
            ensure!(all[(r + 1) * block - 1] == clock, "the cache shards' clocks differ");
        }
        let global = self.cfg.cache_capacity;
        // Lay the shards out in this process's storage for the write, then
        // put its own shard back.
        let mut slots = self.trainer.cache_mut().slots_mut();
        let mine = SlotCopy::read(&slots, 0, global);
        for r in 0..p {
            SlotCopy::from_words(&all[r * block..(r + 1) * block - 1]).write(&mut slots, r * n);
        }
        let mut w = Writer::default();
        Session::save(&mut *self.trainer, &mut w);
        mine.write(&mut self.trainer.cache_mut().slots_mut(), 0);
        let header = serde_json::json!({
            "config": self.cfg,
            "step": self.step,
            "shape": train::shape_json(),
            "distributed": { "processes": p },
        });
        Ok(Some(Checkpoint { header, body: w.0 }))
    }

    /// Every process's [`model_checksum`], in rank order (collective).
    fn checksums(&mut self) -> Vec<u32> {
        let mut w = Writer::default();
        Session::save(&mut *self.trainer, &mut w);
        let mine = [model_checksum(&w.0)];
        let mut all = vec![0u32; self.comm.size()];
        self.comm.all_gather("checksum", &mine, &mut all);
        all
    }
}

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
            let c: TrainConfig = serde_json::from_value(ck.header["config"].clone())
                .with_context(|| format!("{}: the header's config does not fit this build", path.display()))?;
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
        Tying::Separate => go::<negcache::tower::SeparateTowers<BUCKETS, E, H, DIM, S>>(comm, cfg, &data, ck),
        Tying::SharedTokens => go::<negcache::tower::SharedTokenTowers<BUCKETS, E, H, DIM, S>>(comm, cfg, &data, ck),
        Tying::Siamese => go::<negcache::tower::SiameseTowers<BUCKETS, E, H, DIM, S>>(comm, cfg, &data, ck),
    }
}

fn go<M: Towers>(comm: Comm, cfg: TrainConfig, data: &Prepared, ck: Option<Checkpoint>) -> anyhow::Result<()> {
    let rank = comm.rank();
    let mut w = Worker::<M>::new(comm, cfg.clone(), data)?;
    let resumed = ck.is_some();
    if let Some(ck) = &ck {
        w.restore(ck)?;
        w.step = ck.header["step"].as_u64().context("the checkpoint's header has no step")?;
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
            w.shard_cap
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
fn train_loop<M: Towers>(
    w: &mut Worker<M>,
    data: &Prepared,
    log: &mut Option<MetricsLog>,
) -> anyhow::Result<Option<(TrainSummary, DistributedSummary)>> {
    let cfg = w.cfg.clone();
    let lead = w.comm.rank() == 0;
    let start_step = w.step;
    let mut summary = TrainSummary { state_bytes: Session::state_bytes(&*w.trainer), ..TrainSummary::default() };
    let (mut sum_train, mut sum_interp, mut sum_prob, mut n) = (0.0f64, 0.0f64, 0.0f64, 0u64);
    // Per step of the window: this shard's staleness sum and count, summed
    // over processes once at the window's end.
    let mut stale: Vec<f32> = Vec::new();
    let (mut evals_total, mut train_time) = (0u64, 0.0f64);
    let ckpt = cfg.out.join("checkpoint.ckpt");
    w.comm.reset_meters();
    w.phases = [0.0; PHASES.len()];
    while w.step < cfg.steps {
        let t0 = Instant::now();
        let r = w.step(data)?;
        train_time += t0.elapsed().as_secs_f64();
        evals_total += r.report.tower_evals as u64;
        sum_train += r.report.training_loss as f64;
        sum_interp += r.report.interpretable_loss as f64;
        sum_prob += r.report.prob_pos as f64;
        stale.extend([r.stale_sum, r.stale_count]);
        n += 1;
        if w.step % WINDOW == 0 || w.step == cfg.steps {
            let mut total = vec![0.0f32; stale.len()];
            w.comm.sum_f32("staleness", &stale, &mut total);
            let sum_stale: f64 =
                total.chunks_exact(2).map(|c| if c[1] > 0.0 { (c[0] / c[1]) as f64 } else { 0.0 }).sum();
            stale.clear();
            let k = n.max(1) as f64;
            let (tl, il) = (sum_train / k, sum_interp / k);
            summary.losses.push((w.step, tl, il));
            if let Some(log) = log.as_mut() {
                log.log_at(
                    w.step,
                    train_time,
                    &[
                        ("training_loss", tl),
                        ("interpretable_loss", il),
                        ("staleness", sum_stale / k),
                        ("prob_pos", sum_prob / k),
                        ("steps_per_s", (w.step - start_step) as f64 / train_time.max(1e-9)),
                    ],
                )?;
            }
            (sum_train, sum_interp, sum_prob, n) = (0.0, 0.0, 0.0, 0);
        }
        if cfg.eval_every > 0 && w.step % cfg.eval_every == 0 && w.step < cfg.steps && lead {
            let m = train::evaluate(&*w.trainer, data, cfg.eval_queries);
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
    let m = train::evaluate(&*w.trainer, data, 0);
    if let Some(log) = log.as_mut() {
        log.log_at(w.step, train_time, &[("recall_at_10", m.recall_at_10), ("mrr_at_10", m.mrr_at_10)])?;
    }
    summary.curve.push((w.step, m));
    summary.metrics = m;
    summary.steps = w.step;
    summary.train_seconds = train_time;
    summary.tower_evals_per_step = evals_total as f64 / steps_done;
    let mut params = CountParams { dense: 0, sparse: 0 };
    w.trainer.model.visit(&mut params);
    let dist = DistributedSummary {
        processes: w.comm.size(),
        local_batch: w.local_batch,
        shard_capacity: w.shard_cap,
        model_checksums: checksums,
        dense_params: params.dense,
        table_params: params.sparse,
        step_seconds: train_time / steps_done,
        comm_seconds,
        per_step: meters,
        phase_seconds: PHASES.iter().zip(w.phases).map(|(n, s)| ((*n).to_owned(), s / steps_done)).collect(),
    };
    Ok(Some((summary, dist)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use negcache::stats::chi_square;

    #[test]
    fn the_shard_is_chosen_in_proportion_to_its_sum() {
        // Z = (e^1 * 2, 0 (no candidate), e^0 * 3, e^2 * 0.5).
        let lse = [
            LogSumExp { max: 1.0, sum: 2.0 },
            LogSumExp::EMPTY,
            LogSumExp { max: 0.0, sum: 3.0 },
            LogSumExp { max: 2.0, sum: 0.5 },
        ];
        let z: Vec<f64> =
            lse.iter().map(|l| if l.sum > 0.0 { (l.max as f64).exp() * l.sum as f64 } else { 0.0 }).collect();
        let total: f64 = z.iter().sum();
        let want: Vec<f64> = z.iter().map(|x| x / total).collect();
        let mut rng = Pcg64Mcg::seed_from_u64(5);
        let mut counts = [0u64; 4];
        for _ in 0..100_000 {
            counts[choose_shard(&lse, &mut rng).expect("a shard has candidates")] += 1;
        }
        assert_eq!(counts[1], 0);
        let t = chi_square(&counts, &want).expect("enough cells");
        assert!(t.p_value > 0.001, "{t:?} {counts:?}");
    }

    #[test]
    fn no_candidate_anywhere_is_no_draw_and_one_shard_draws_nothing() {
        let mut rng = Pcg64Mcg::seed_from_u64(1);
        assert_eq!(choose_shard(&[LogSumExp::EMPTY, LogSumExp::EMPTY], &mut rng), None);
        let before = rng.clone().next_u64();
        let one = [LogSumExp::EMPTY, LogSumExp { max: 0.5, sum: 1.0 }];
        assert_eq!(choose_shard(&one, &mut rng), Some(1));
        assert_eq!(rng.next_u64(), before, "a single candidate shard must not consume randomness");
    }

    #[test]
    fn owners_follow_the_first_identical_item() {
        let items = [[1u32; ITEM_TOKENS], [2; ITEM_TOKENS], [1; ITEM_TOKENS], [3; ITEM_TOKENS]];
        let o = Owners::new(&items, 2);
        assert_eq!(o.of(&items[0]), Some(0));
        assert_eq!(o.of(&items[1]), Some(1));
        assert_eq!(o.of(&items[2]), Some(0), "a copy lives where the first one does");
        assert_eq!(o.of(&items[3]), Some(1));
        assert_eq!(o.of(&[9; ITEM_TOKENS]), None);
    }

    #[test]
    fn process_zero_draws_what_a_single_process_run_draws() {
        let (mut a, mut b) = (rank_rng(7, 3, 0), train::step_rng(7, 3));
        assert_eq!(a.next_u64(), b.next_u64());
        assert_ne!(rank_rng(7, 3, 1).next_u64(), train::step_rng(7, 3).next_u64());
    }

    #[test]
    fn the_cache_section_size_matches_the_writer() {
        let mut t = boxed(|| {
            Tr::<negcache::tower::SiameseTowers<BUCKETS, E, H, DIM, S>>::new(
                negcache::tower::SiameseTowers::new(TowerConfig::DEFAULT),
                negcache::trainer::TrainerConfig::DEFAULT,
            )
        })
        .expect("a trainer");
        let mut full = Writer::default();
        Session::save(&mut *t, &mut full);
        // The cache section starts with its tag.
        let at = full.0.len() - CACHE_SECTION_BYTES;
        assert_eq!(&full.0[at..at + 4], b"CACH");
    }
}
