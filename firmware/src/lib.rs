//! Training a two-tower retrieval model with a negative cache on a
//! microcontroller, with the same code on the host for comparison.
//!
//! This library holds everything but the entry points: the data (decoded
//! from flash at compile time, [`data`]), the model and trainer sizes, the
//! training loop, the evaluation, and after training the answers to a few
//! queries with their top items by exact retrieval ([`run`], [`answer`]). `src/main.rs` runs it on a
//! Cortex-M4 under QEMU with semihosting output; `src/bin/host-sim.rs` runs
//! it on the host. Both print the lines written by [`run`]; the lines that
//! start with one of [`DETERMINISTIC_PREFIXES`] must be identical between
//! the two, because every float operation on the training path is an IEEE
//! single-precision operation or a `libm` function compiled from the same
//! source on both.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod data;
pub mod format;

use core::fmt::{self, Write};

use negcache::layers::ParamVisitor;
use negcache::optim::OptimizerKind;
use negcache::retrieve::{search, Hit};
use negcache::sampler::LogSumExp;
use negcache::storage::{Int8Store, Store};
use negcache::tower::{Model, SharedTokenTowers, Side, TokenModel, TowerConfig};
use negcache::trainer::{Batch, Trainer, TrainerConfig};
use negcache::vector::dot;
use rand_core::SeedableRng;
use static_cell::ConstStaticCell;

use data::{ItemTokens, Query, QueryTokens, HELDOUT, ITEMS, N_HELDOUT, N_ITEMS, N_TRAIN, TRAIN};

/// Hash buckets of the shared token table.
pub const BUCKETS: usize = 1024;
/// Token embedding width.
pub const E: usize = 8;
/// Hidden width of each tower's MLP.
pub const H: usize = 32;
/// Output embedding dimension.
pub const DIM: usize = 16;
/// Negative-cache slots: half the items, so negatives come from a cache
/// that does not hold the whole corpus.
pub const CAP: usize = N_ITEMS / 2;
/// Queries per step.
pub const BATCH: usize = 16;
/// Negatives drawn from the cache per query.
pub const NEG: usize = 1;
/// Items retrieved per query answered after training.
pub const TOP_K: usize = 5;
/// Queries answered after training, from each of the training and the
/// held-out queries (spread evenly over each).
pub const ANSWERED: usize = 3;

/// One token table shared by both sides (queries and items use the same
/// words, so sharing lets them match from the first step and halves the
/// largest tensor), two MLPs, and one optimiser-state slot per parameter
/// for Adagrad. Measured on the host: Adam's two slots cost about 40 KB
/// more and learned no better; plain SGD (no slot), even with a table
/// twice as wide, needed about four times as many steps to memorise the
/// training queries.
pub type Towers = SharedTokenTowers<BUCKETS, E, H, DIM, 1>;

/// The trainer: towers and batch buffers (the cache is in [`Scratch`]).
pub type FwTrainer = Trainer<Towers, QueryTokens, ItemTokens, DIM, BATCH, NEG>;
/// The negative cache: `CAP` items, owned by this program and lent to the
/// trainer at each step, their embeddings stored as int8 with a per-row
/// scale: 20 bytes per embedding instead of 64 as `f32`.
pub type FwCache = negcache::NegativeCache<ItemTokens, CAP, DIM, FwStore>;
/// The cache's embedding storage.
pub type FwStore = Int8Store<CAP, DIM>;

/// The paper's method (streaming cache, FIFO eviction, exact sampling
/// from the softmax over the cache, accidental hits masked) with Adagrad,
/// whose per-parameter step sizes suit sparse, hashed token tables.
pub const TRAINER_CONFIG: TrainerConfig = TrainerConfig {
    optimizer: OptimizerKind::Adagrad { eps: 1e-8, initial_accumulator: 0.1 },
    ..TrainerConfig::DEFAULT
};

/// Run settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Seeds the generator for initialisation, batch order and sampling.
    pub seed: u64,
    /// Training steps.
    pub steps: u32,
    /// Learning rate.
    pub lr: f32,
    /// Steps per printed point of the loss curve.
    pub report_every: u32,
}

/// The settings both the device and the host run.
/// 4,800 steps of 16 queries are 50 passes over the 1,536 training queries.
pub const SETTINGS: Settings = Settings { seed: 0, steps: 4800, lr: 0.1, report_every: 192 };

/// The trainer's storage. Its constant initialiser contains non-zero
/// settings (the score scale, the optimiser), so the linker puts it in
/// `.data`: RAM, plus a copy of its initial image in flash.
pub static TRAINER: ConstStaticCell<FwTrainer> =
    ConstStaticCell::new(Trainer::new(Towers::new(TowerConfig::DEFAULT), TRAINER_CONFIG));

/// Evaluation and batching buffers, apart from the trainer so that this
/// all-zero static lands in `.bss` (no flash image).
#[derive(Debug)]
pub struct Scratch {
    /// The negative cache.
    pub cache: FwCache,
    /// Every item's embedding, for exact retrieval.
    pub item_embeddings: [[f32; DIM]; N_ITEMS],
    /// The current epoch's order of training queries.
    pub order: [u16; N_TRAIN],
}

impl Scratch {
    /// Zeros.
    pub const fn new() -> Self {
        Self { cache: FwCache::new(), item_embeddings: [[0.0; DIM]; N_ITEMS], order: [0; N_TRAIN] }
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

/// The scratch storage.
pub static SCRATCH: ConstStaticCell<Scratch> = ConstStaticCell::new(Scratch::new());

/// Line prefixes whose lines must be identical on the host and the device.
pub const DETERMINISTIC_PREFIXES: &[&str] = &["data ", "config ", "recall ", "loss ", "topk ", "checksum "];

/// Why a run stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunError {
    /// The core reported an error.
    Train(negcache::Error),
    /// Writing the output failed.
    Output,
}

impl From<negcache::Error> for RunError {
    fn from(e: negcache::Error) -> Self {
        Self::Train(e)
    }
}

impl From<fmt::Error> for RunError {
    fn from(_: fmt::Error) -> Self {
        Self::Output
    }
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Train(e) => write!(f, "training failed: {e}"),
            Self::Output => f.write_str("writing the output failed"),
        }
    }
}

/// Exact retrieval over all items for a set of queries: hits at ranks 1
/// and 10, and the full-softmax cross-entropy.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Recall {
    /// Queries evaluated.
    pub queries: u32,
    /// Queries whose positive ranks first.
    pub at1: u32,
    /// Queries whose positive ranks in the first ten.
    pub at10: u32,
    /// Mean cross-entropy of the softmax over all items at the model's
    /// score scale: the loss that the cache's sampled gradient estimates.
    pub full_ce: f32,
}

impl Recall {
    /// Recall@1 as a fraction.
    pub fn r1(&self) -> f32 {
        self.at1 as f32 / self.queries.max(1) as f32
    }
    /// Recall@10 as a fraction.
    pub fn r10(&self) -> f32 {
        self.at10 as f32 / self.queries.max(1) as f32
    }
}

/// What a run measured.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Summary {
    /// Full-softmax cross-entropy on the training queries before training.
    pub first_loss: f32,
    /// The same after training.
    pub last_loss: f32,
    /// Recall on the training queries after training.
    pub train: Recall,
    /// Recall on the held-out queries after training.
    pub heldout: Recall,
}

/// Embeds every item into `out` with the item tower.
fn embed_items(model: &Towers, out: &mut [[f32; DIM]; N_ITEMS]) {
    for (e, item) in out.iter_mut().zip(ITEMS.iter()) {
        model.embed(Side::Item, item, e);
    }
}

/// Exact retrieval over all items: a query's positive has rank r when r
/// other items score at least as high (ties count against the positive).
/// `items` must hold the current item embeddings ([`embed_items`]).
pub fn recall(model: &Towers, items: &[[f32; DIM]; N_ITEMS], queries: &[Query]) -> Recall {
    let mut r = Recall { queries: queries.len() as u32, ..Recall::default() };
    let alpha = model.score_scale();
    let mut q = [0.0; DIM];
    let mut ce = 0.0f32;
    for query in queries {
        model.embed(Side::Query, &query.tokens, &mut q);
        let pos = query.positive as usize;
        let s = dot(&q, &items[pos]);
        let (mut rank, mut lse) = (0, LogSumExp::EMPTY);
        for (j, e) in items.iter().enumerate() {
            let sj = dot(&q, e);
            rank += usize::from(j != pos && sj >= s);
            lse.push(alpha * sj);
        }
        ce += lse.minus(alpha * s);
        r.at1 += u32::from(rank < 1);
        r.at10 += u32::from(rank < 10);
    }
    r.full_ce = ce / r.queries.max(1) as f32;
    r
}

fn write_recall(out: &mut dyn Write, when: &str, split: &str, r: &Recall) -> fmt::Result {
    writeln!(
        out,
        "recall {when} {split} n={} hits@1={} hits@10={} r@1={:.4} r@10={:.4} full_ce={:.4}",
        r.queries,
        r.at1,
        r.at10,
        r.r1(),
        r.r10(),
        r.full_ce
    )
}

/// Answers one query as a server would: its [`TOP_K`] items by exact
/// retrieval over all item embeddings (the core's [`search`], a bounded heap
/// in a buffer on the stack; equal scores go to the lower item index),
/// printed as `item:score:bits`, best first, with the rank of the query's
/// positive among them (`-` when it is not there).
pub fn answer(
    out: &mut dyn Write,
    model: &Towers,
    items: &[[f32; DIM]; N_ITEMS],
    split: &str,
    i: usize,
    query: &Query,
) -> Result<(), RunError> {
    let mut q = [0.0; DIM];
    model.embed(Side::Query, &query.tokens, &mut q);
    let mut buf = [Hit::EMPTY; TOP_K];
    let hits = search(&q, items, &mut buf)?;
    write!(out, "topk {split}[{i}] positive={} at=", query.positive)?;
    match hits.iter().position(|h| h.key == query.positive) {
        Some(r) => write!(out, "{}", r + 1)?,
        None => out.write_str("-")?,
    }
    out.write_str(" hits=")?;
    for (r, h) in hits.iter().enumerate() {
        let sep = if r == 0 { "" } else { "," };
        write!(out, "{sep}{}:{:.4}:{:08x}", h.key, h.score, h.score.to_bits())?;
    }
    writeln!(out)?;
    Ok(())
}

/// FNV-1a over the bits of every parameter, in the order an optimiser
/// visits them: equal checksums mean bit-identical models.
pub fn checksum(model: &mut Towers) -> u32 {
    struct Fnv(u32);
    impl Fnv {
        fn add(&mut self, v: &[f32]) {
            for x in v {
                for b in x.to_bits().to_le_bytes() {
                    self.0 = (self.0 ^ u32::from(b)).wrapping_mul(0x0100_0193);
                }
            }
        }
    }
    impl ParamVisitor for Fnv {
        fn dense(&mut self, value: &mut [f32], _: &mut [f32], _: &mut [&mut [f32]]) {
            self.add(value);
        }
        fn sparse(&mut self, _: usize, value: &mut [f32], _: &mut [f32], _: &mut [&mut [f32]], _: &[bool]) {
            self.add(value);
        }
    }
    let mut h = Fnv(0x811c_9dc5);
    model.visit(&mut h);
    h.0
}

/// A uniformly random permutation of the training queries (Fisher-Yates,
/// with the core's unbiased index sampler).
fn shuffle(order: &mut [u16; N_TRAIN], rng: &mut rand_pcg::Pcg32) {
    for i in (1..N_TRAIN).rev() {
        let j = negcache::random::below(rng, (i + 1) as u32) as usize;
        order.swap(i, j);
    }
}

/// Trains `t` from scratch with `s`, printing the configuration, the loss
/// curve, and recall before and after training to `out`.
///
/// Every line written here is identical on the host and the device for
/// the same settings (see [`DETERMINISTIC_PREFIXES`]).
pub fn run(t: &mut FwTrainer, scratch: &mut Scratch, s: &Settings, out: &mut dyn Write) -> Result<Summary, RunError> {
    writeln!(
        out,
        "data items={N_ITEMS} train={N_TRAIN} heldout={N_HELDOUT} item_len={} query_len={} bytes={}",
        data::ITEM_LEN,
        data::QUERY_LEN,
        data::BYTES.len()
    )?;
    writeln!(
        out,
        "config towers=shared-token buckets={BUCKETS} e={E} h={H} dim={DIM} cache={CAP} cache_precision={} batch={BATCH} \
         neg={NEG} optimizer=adagrad lr={} steps={} seed={}",
        <FwStore as Store<CAP, DIM>>::PRECISION.name(),
        s.lr,
        s.steps,
        s.seed
    )?;

    let mut rng = rand_pcg::Pcg32::seed_from_u64(s.seed);
    t.model.init(&mut rng);
    t.init()?;
    embed_items(&t.model, &mut scratch.item_embeddings);
    let before = recall(&t.model, &scratch.item_embeddings, &TRAIN);
    write_recall(out, "before", "train", &before)?;
    write_recall(out, "before", "heldout", &recall(&t.model, &scratch.item_embeddings, &HELDOUT))?;
    writeln!(out, "loss step=0 full_ce={:.5} bits={:08x}", before.full_ce, before.full_ce.to_bits())?;

    for (i, o) in scratch.order.iter_mut().enumerate() {
        *o = i as u16;
    }
    let mut next = N_TRAIN; // forces a shuffle before the first batch
    let (mut sum_loss, mut sum_ce, mut sum_p, mut window) = (0.0f32, 0.0f32, 0.0f32, 0u32);
    let mut summary = Summary { first_loss: before.full_ce, ..Summary::default() };
    for step in 1..=s.steps {
        let mut queries = [[0u32; data::QUERY_LEN]; BATCH];
        let mut positives = [[0u32; data::ITEM_LEN]; BATCH];
        for b in 0..BATCH {
            if next == N_TRAIN {
                shuffle(&mut scratch.order, &mut rng);
                next = 0;
            }
            let q = &TRAIN[scratch.order[next] as usize];
            next += 1;
            queries[b] = q.tokens;
            positives[b] = ITEMS[q.positive as usize];
        }
        let batch = Batch { queries: &queries, positives: &positives, positive_index: None };
        let r = t.step(&mut scratch.cache.as_mut(), &batch, &[], s.lr, &mut rng)?;
        sum_loss += r.training_loss;
        sum_ce += r.interpretable_loss;
        sum_p += r.prob_pos;
        window += 1;
        if window == s.report_every || step == s.steps {
            // The curve's main figure is the full-softmax cross-entropy on
            // the training queries, which must fall. The step's own
            // figures are means over the window: the cache surrogate
            // (whose gradient, not value, matches the softmax's; it turns
            // negative as positives outscore negatives), the cross-entropy
            // over the cache's candidates, and the positive's probability.
            embed_items(&t.model, &mut scratch.item_embeddings);
            let full = recall(&t.model, &scratch.item_embeddings, &TRAIN).full_ce;
            let n = window as f32;
            let (loss, ce, p) = (sum_loss / n, sum_ce / n, sum_p / n);
            // The bits make the host comparison exact, independent of
            // decimal formatting.
            writeln!(
                out,
                "loss step={step} full_ce={full:.5} surrogate={loss:.5} cache_ce={ce:.5} p_pos={p:.4} bits={:08x}/{:08x}",
                full.to_bits(),
                loss.to_bits()
            )?;
            summary.last_loss = full;
            (sum_loss, sum_ce, sum_p, window) = (0.0, 0.0, 0.0, 0);
        }
    }

    embed_items(&t.model, &mut scratch.item_embeddings);
    summary.train = recall(&t.model, &scratch.item_embeddings, &TRAIN);
    summary.heldout = recall(&t.model, &scratch.item_embeddings, &HELDOUT);
    write_recall(out, "after", "train", &summary.train)?;
    write_recall(out, "after", "heldout", &summary.heldout)?;
    for (split, queries) in [("train", &TRAIN[..]), ("heldout", &HELDOUT[..])] {
        // Spread over the set: queries 0, n/3 and 2n/3.
        let stride = (queries.len() / ANSWERED).max(1);
        for (i, query) in queries.iter().enumerate().step_by(stride).take(ANSWERED) {
            answer(out, &t.model, &scratch.item_embeddings, split, i, query)?;
        }
    }
    writeln!(out, "checksum params={:08x}", checksum(&mut t.model))?;
    Ok(summary)
}

/// Sizes of the statics and their parts, in bytes, on the target this is
/// compiled for (they differ between 32- and 64-bit targets: the trainer
/// keeps slot indices as `usize`).
pub fn write_sizes(out: &mut dyn Write) -> fmt::Result {
    use core::mem::size_of;
    writeln!(
        out,
        "mem trainer={} (towers={}) scratch={} (cache={}) data_flash={}",
        size_of::<FwTrainer>(),
        size_of::<Towers>(),
        size_of::<Scratch>(),
        size_of::<FwCache>(),
        size_of_val(&ITEMS) + size_of_val(&TRAIN) + size_of_val(&HELDOUT),
    )
}
