//! `negcache bench`: throughput of the scoring-and-sampling pass, a whole
//! training step, the towers and exact evaluation retrieval, against the
//! machine's fp32 multiply-add peak measured in the same run; bytes per
//! cached item and peak memory; optionally written as markdown
//! (`negcache bench --write docs/results/bench.md`).
//!
//! The set-up functions are public so that the criterion benches
//! (`host/benches/negcache.rs`) time the same work.

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use negcache::kernel::{self, Bf16Rows, Draw, F32Rows, I8Rows, LaneRng, Slots};
use negcache::sampler::LogSumExp;
use negcache::storage::{self, Precision};
use negcache::tower::{Model, SharedTokenTowers, Side, TokenModel, TowerConfig};
use negcache::trainer::{Batch, TrainerConfig};
use negcache::{random, vector, CacheLoss, Item, LossConfig, NegativeCache, Retrieval};
use rand_core::{RngCore, SeedableRng};
use rand_pcg::Pcg64Mcg;

use crate::featurize::{ItemTokens, QueryTokens, ITEM_TOKENS, QUERY_TOKENS};
use crate::memory::boxed;
use crate::session::{new_session, CacheShape, Session, Tying, BUCKETS, DIM, E, H, S};
use crate::store::OwnedCache;

/// The pass's batch.
pub const B: usize = 32;
/// The pass's cache capacity.
pub const N: usize = 65_536;
/// Top-k groups of the top-k variant.
pub const TOP_K: usize = 64;
/// Corpus size of the evaluation benchmark (WordNet 3.0's synsets).
pub const EVAL_ITEMS: usize = 117_659;
pub mod dense;

/// Score scale of every benchmark (the training default).
pub const ALPHA: f32 = 20.0;

/// Flags of `negcache bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Write the results as markdown to this file (e.g.
    /// docs/results/bench.md; with --dense, docs/results/bench-dense.md).
    #[arg(long)]
    pub write: Option<PathBuf>,
    /// Seconds spent on each timed measurement (more: steadier figures).
    #[arg(long, default_value_t = 1.5)]
    pub seconds: f64,
    /// Training runs with each cache precision to include: the directory
    /// that `negcache compare --config docs/results/precision/compare.toml`
    /// writes (its `compare.md` and `runs/`); skipped if missing.
    #[arg(long, default_value = "docs/results/precision")]
    pub recall_results: PathBuf,
    /// Run the original TensorFlow library's benchmark model in its five
    /// configurations (cache_N4096, cache_N65536, cache_N65536_topk64,
    /// inbatch_B32, fullsoftmax_C4096) instead of the kernel benchmarks.
    #[arg(long)]
    pub dense: bool,
    /// With `--dense`: write the figures to this JSON file.
    #[arg(long, requires = "dense")]
    pub json: Option<PathBuf>,
    /// With `--dense`: also measure the original TensorFlow library on the
    /// same model, side by side (in each round every configuration runs
    /// in TF and then in negcache), with `fixtures/bench/tf_dense.py`.
    /// DIR holds the library's `negative_cache` package (google-research's
    /// folder of that name); the `python3` on PATH needs TensorFlow.
    #[arg(long, requires = "dense", value_name = "DIR")]
    pub tf_lib: Option<PathBuf>,
    /// Run one dense configuration in this process and print its figures
    /// as JSON (what `--dense` runs in a child process per configuration).
    #[arg(long, hide = true)]
    pub dense_one: Option<String>,
}

/// A timed figure: seconds per call (median of rounds) and calls made.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Median seconds per call.
    pub median: f64,
    /// Fastest round's seconds per call.
    pub best: f64,
    /// Calls timed.
    pub calls: usize,
}

/// Times `f` for about `seconds`: rounds of calls (each round at least
/// ~20 ms), after one warm-up call; the median and best round.
pub fn time(seconds: f64, mut f: impl FnMut()) -> Timing {
    let [t] = time_rounds(seconds, [&mut f]);
    t
}

/// Times `f` and `g` in alternating rounds of about 20 ms each for about
/// `seconds` in all (after a warm-up call of each): the median and best
/// round of each. Two figures compared as a ratio are measured this way,
/// so that a change in the machine's speed during the run (this VM's
/// figures move by a fifth and more between minutes) touches both alike.
pub fn time_alternating(seconds: f64, mut f: impl FnMut(), mut g: impl FnMut()) -> (Timing, Timing) {
    let [tf, tg] = time_rounds(seconds, [&mut f, &mut g]);
    (tf, tg)
}

/// Rounds of each of `fs` in turn, each round at least ~20 ms of calls,
/// for about `seconds` in all, after a warm-up call of each: the median
/// and best round of each.
fn time_rounds<const K: usize>(seconds: f64, mut fs: [&mut dyn FnMut(); K]) -> [Timing; K] {
    let calls: [(usize, f64); K] = core::array::from_fn(|k| {
        let h = &mut fs[k];
        h();
        let t0 = Instant::now();
        h();
        let one = t0.elapsed().as_secs_f64().max(1e-7);
        (((0.02 / one).ceil() as usize).max(1), one)
    });
    let per_round: f64 = calls.iter().map(|&(n, one)| n as f64 * one).sum();
    let rounds = ((seconds / per_round) as usize).clamp(3, 200);
    let mut per_call: [Vec<f64>; K] = core::array::from_fn(|_| Vec::with_capacity(rounds));
    for _ in 0..rounds {
        for ((h, &(n, _)), out) in fs.iter_mut().zip(&calls).zip(per_call.iter_mut()) {
            let t = Instant::now();
            for _ in 0..n {
                h();
            }
            out.push(t.elapsed().as_secs_f64() / n as f64);
        }
    }
    core::array::from_fn(|k| {
        let v = &mut per_call[k];
        v.sort_by(f64::total_cmp);
        Timing { median: v[v.len() / 2], best: v[0], calls: v.len() * calls[k].0 }
    })
}

// ---------------------------------------------------------------- peak

/// `K` rows of 16 accumulators, `a = a * b + c` (plain multiply and add,
/// which Rust never fuses), vectorised by the compiler; returns flops/s.
fn mul_add_rate<const K: usize>(iters: u64) -> f64 {
    let b = black_box([0.999_999_9f32; 16]);
    let c = black_box([1e-7f32; 16]);
    let mut acc = black_box([[0.5f32; 16]; K]);
    let t = Instant::now();
    for _ in 0..iters {
        for row in acc.iter_mut() {
            for l in 0..16 {
                row[l] = row[l] * b[l] + c[l];
            }
        }
    }
    let dt = t.elapsed().as_secs_f64();
    black_box(acc);
    2.0 * 16.0 * K as f64 * iters as f64 / dt
}

/// The same with `f32::mul_add` (one rounding), when the build has FMA.
fn fma_rate<const K: usize>(iters: u64) -> f64 {
    let b = black_box([0.999_999_9f32; 16]);
    let c = black_box([1e-7f32; 16]);
    let mut acc = black_box([[0.5f32; 16]; K]);
    let t = Instant::now();
    for _ in 0..iters {
        for row in acc.iter_mut() {
            for l in 0..16 {
                row[l] = row[l].mul_add(b[l], c[l]);
            }
        }
    }
    let dt = t.elapsed().as_secs_f64();
    black_box(acc);
    2.0 * 16.0 * K as f64 * iters as f64 / dt
}

/// The single-core fp32 multiply-add peak in flops/s: the best of several
/// numbers of independent accumulator chains (enough to cover the
/// latency without spilling registers), each the best of a few runs of
/// ~`seconds / 10`.
pub fn peak_flops(seconds: f64) -> f64 {
    let iters = |rate_guess: f64, k: usize| ((seconds / 12.0) * rate_guess / (32.0 * k as f64)) as u64;
    let guess = 5e10;
    let mut best = 0.0f64;
    for _ in 0..2 {
        best = best.max(mul_add_rate::<2>(iters(guess, 2)));
        best = best.max(mul_add_rate::<3>(iters(guess, 3)));
        best = best.max(mul_add_rate::<4>(iters(guess, 4)));
        best = best.max(mul_add_rate::<6>(iters(guess, 6)));
        best = best.max(mul_add_rate::<8>(iters(guess, 8)));
        best = best.max(mul_add_rate::<12>(iters(guess, 12)));
        if cfg!(target_feature = "fma") {
            best = best.max(fma_rate::<6>(iters(guess, 6)));
            best = best.max(fma_rate::<8>(iters(guess, 8)));
            best = best.max(fma_rate::<12>(iters(guess, 12)));
        }
    }
    best
}

/// The peak of `threads` cores run at once (sum of their rates).
pub fn peak_flops_threads(threads: usize, seconds: f64) -> f64 {
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads).map(|_| s.spawn(|| peak_flops(seconds))).collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
    })
}

// ---------------------------------------------------------------- data

/// A unit vector of `DIM` normal components.
pub fn unit(rng: &mut impl RngCore) -> [f32; DIM] {
    let mut v: [f32; DIM] = std::array::from_fn(|_| random::normal(rng));
    let n = vector::norm_sq(&v).sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

/// Item `i`'s synthetic tokens (distinct for distinct `i`).
pub fn item_tokens(i: u32) -> ItemTokens {
    let mut t = [negcache::layers::PAD; ITEM_TOKENS];
    for (k, x) in t.iter_mut().enumerate().take(6) {
        *x = i.wrapping_mul(2_654_435_761).wrapping_add(k as u32 * 7919) % BUCKETS as u32;
    }
    t[ITEM_TOKENS - 1] = i;
    t
}

/// Query tokens derived from item `i` (20 tokens).
pub fn query_tokens(i: u32, salt: u32) -> QueryTokens {
    let mut t = [negcache::layers::PAD; QUERY_TOKENS];
    for (k, x) in t.iter_mut().enumerate().take(20) {
        *x = (i ^ salt).wrapping_mul(40_503).wrapping_add(k as u32 * 104_729) % BUCKETS as u32;
    }
    t
}

/// The pass's inputs: a full cache of `N` random unit rows holding items
/// `0..N`, `B` unit queries, and positives of which half are cached.
pub struct PassData {
    /// The cache.
    pub cache: Box<NegativeCache<ItemTokens, N, DIM>>,
    /// Queries.
    pub queries: Vec<[f32; DIM]>,
    /// Positive embeddings.
    pub positives: Vec<[f32; DIM]>,
    /// Positive items (for masking).
    pub items: Vec<ItemTokens>,
    /// Their keys.
    pub keys: Vec<u64>,
}

impl std::fmt::Debug for PassData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassData").finish_non_exhaustive()
    }
}

/// Builds [`PassData`] from a seed.
pub fn pass_data(seed: u64) -> anyhow::Result<PassData> {
    let mut rng = Pcg64Mcg::seed_from_u64(seed);
    let mut cache = boxed(NegativeCache::<ItemTokens, N, DIM>::new)?;
    let mut c = NegativeCache::as_mut(&mut *cache);
    for j in 0..N {
        c.set_slot(j, &unit(&mut rng), item_tokens(j as u32), 0, true)?;
    }
    let queries: Vec<_> = (0..B).map(|_| unit(&mut rng)).collect();
    let positives: Vec<_> = (0..B).map(|_| unit(&mut rng)).collect();
    let items: Vec<ItemTokens> = (0..B)
        .map(|b| item_tokens(if b % 2 == 0 { random::below(&mut rng, N as u32) } else { N as u32 + b as u32 }))
        .collect();
    let keys = items.iter().map(Item::key).collect();
    Ok(PassData { cache, queries, positives, items, keys })
}

/// One scoring-and-sampling pass through `CacheLoss::score_and_sample`
/// (exp-jump sampling, hits masked); returns the first query's negative.
pub fn run_pass(d: &PassData, loss: &mut CacheLoss<B, 1>, top_k: usize, mask: bool, rng: &mut Pcg64Mcg) -> u32 {
    run_pass_on(&negcache::Serial, d, loss, top_k, mask, rng)
}

/// [`run_pass`] with the pass split over `fork` at query tiles, as
/// `Trainer::step_on` splits it.
pub fn run_pass_on(
    fork: &impl negcache::Fork,
    d: &PassData,
    loss: &mut CacheLoss<B, 1>,
    top_k: usize,
    mask: bool,
    rng: &mut Pcg64Mcg,
) -> u32 {
    let cfg = LossConfig { score_scale: ALPHA, top_k, mask_accidental_hits: mask };
    let r = loss.score_and_sample_with(
        NegativeCache::as_ref(&*d.cache),
        &d.queries,
        &d.positives,
        Some(&d.items),
        &cfg,
        Retrieval::ExpJump { inv_temp: 1.0 },
        rng,
        None,
        None,
        fork,
    );
    if r.is_err() {
        return u32::MAX;
    }
    loss.negatives(0).first().copied().unwrap_or(u32::MAX)
}

/// The pass as it was before the blocked kernel: per slot, per query,
/// `alpha * vector::dot` (four partial sums), `LogSumExp::push` (libm
/// `exp`, running maximum per score) and the exponential-jump step, with
/// top-k groups as before. Kept to measure the speed-up in the same run.
pub fn legacy_pass(d: &PassData, top_k: usize, mask: bool, rng: &mut impl RngCore, out: &mut [Draw]) {
    let cache = NegativeCache::as_ref(&*d.cache);
    let (emb, items, occupied) = (cache.embeddings().as_f32().expect("an f32 cache"), cache.items(), cache.occupied());
    let n = emb.len();
    let glen = n.checked_div(top_k).unwrap_or(0);
    let mut st = Legacy { lse: [LogSumExp::EMPTY; B], thr: [0.0; B], pick: [u32::MAX; B] };
    let mut group = [(f32::NEG_INFINITY, u32::MAX); B];
    for j in 0..n {
        if glen > 0 && j % glen == 0 {
            group.fill((f32::NEG_INFINITY, u32::MAX));
        }
        if occupied[j] {
            for (b, q) in d.queries.iter().enumerate() {
                if mask && items[j] == d.items[b] {
                    continue;
                }
                let c = ALPHA * vector::dot(q, &emb[j]);
                if !c.is_finite() {
                    continue;
                }
                if glen > 0 {
                    if c > group[b].0 {
                        group[b] = (c, j as u32);
                    }
                } else {
                    st.feed(b, c, j as u32, rng);
                }
            }
        }
        if glen > 0 && (j + 1) % glen == 0 {
            for (b, &(c, s)) in group.iter().enumerate() {
                if s != u32::MAX {
                    st.feed(b, c, s, rng);
                }
            }
        }
    }
    for (b, o) in out.iter_mut().enumerate().take(B) {
        *o = Draw { lse: st.lse[b], sample_lse: st.lse[b], slot: st.pick[b] };
    }
}

struct Legacy {
    lse: [LogSumExp; B],
    thr: [f32; B],
    pick: [u32; B],
}

impl Legacy {
    #[inline]
    fn feed(&mut self, b: usize, c: f32, s: u32, rng: &mut impl RngCore) {
        let scale = self.lse[b].push(c);
        self.thr[b] *= scale;
        if self.lse[b].sum > self.thr[b] {
            self.thr[b] = self.lse[b].sum / random::open01(rng);
            self.pick[b] = s;
        }
    }
}

/// The pass on `threads` threads: the cache cut into that many ranges
/// (multiples of the kernel's block), each sampled by
/// `kernel::sample_shard` with its own generator, then merged exactly by
/// `kernel::merge_draws`.
pub fn sharded_pass<R: kernel::Rows<DIM> + Sync>(
    d: &PassData,
    rows: &R,
    threads: usize,
    rng: &mut impl RngCore,
    out: &mut [Draw],
) -> anyhow::Result<()> {
    let cache = NegativeCache::as_ref(&*d.cache);
    let slots = Slots { rows, keys: cache.keys(), occupied: cache.occupied() };
    let n = rows.len();
    let per = n.div_ceil(threads).div_ceil(kernel::BLOCK) * kernel::BLOCK;
    let seeds: Vec<u64> = (0..threads).map(|_| rng.next_u64()).collect();
    let hits = Some(&d.keys[..]);
    if threads == 1 {
        let mut r = LaneRng::new(seeds[0]);
        kernel::sample_shard(slots, 0..n, &d.queries, hits, ALPHA, 1.0, &mut r, out)?;
        return Ok(());
    }
    // Shard 0 runs on the calling thread, the others on scoped threads.
    let shard = |k: usize| -> anyhow::Result<Vec<Draw>> {
        let mut draws = vec![Draw::EMPTY; d.queries.len()];
        let mut r = LaneRng::new(seeds[k]);
        let range = (k * per).min(n)..((k + 1) * per).min(n);
        kernel::sample_shard(slots, range, &d.queries, hits, ALPHA, 1.0, &mut r, &mut draws)?;
        Ok(draws)
    };
    let parts: Vec<anyhow::Result<Vec<Draw>>> = std::thread::scope(|s| {
        let hs: Vec<_> = (1..threads).map(|k| s.spawn(move || shard(k))).collect();
        let mut parts = vec![shard(0)];
        parts.extend(hs.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("a shard panicked"))?));
        parts
    });
    let parts = parts.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let refs: Vec<&[Draw]> = parts.iter().map(|p| &p[..]).collect();
    kernel::merge_draws(&refs, rng, out)?;
    Ok(())
}

/// The cache's rows quantized to int8 (per-row scale) and to bf16.
pub struct Quantized {
    /// Int8 components.
    pub i8_rows: Vec<[i8; DIM]>,
    /// Int8 row scales.
    pub scales: Vec<f32>,
    /// bf16 components.
    pub bf16_rows: Vec<[u16; DIM]>,
}

impl std::fmt::Debug for Quantized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quantized").field("rows", &self.scales.len()).finish()
    }
}

/// Quantizes the pass's cache.
pub fn quantize(d: &PassData) -> Quantized {
    let emb = NegativeCache::as_ref(&*d.cache).embeddings().as_f32().expect("an f32 cache");
    let (i8_rows, scales) = emb.iter().map(storage::quantize_i8).unzip();
    let bf16_rows = emb.iter().map(|r| r.map(storage::f32_to_bf16)).collect();
    Quantized { i8_rows, scales, bf16_rows }
}

// ---------------------------------------------------------------- step

/// The standard training configuration at capacity 65,536 (streaming,
/// exp-jump, hits masked, Adam), its cache filled with `N` synthetic items,
/// and a generator of batches.
pub struct StepData {
    /// The trainer.
    pub session: Box<dyn Session>,
    /// The synthetic corpus (item `i` is `item_tokens(i)`).
    pub corpus: Vec<ItemTokens>,
    rng: Pcg64Mcg,
}

impl std::fmt::Debug for StepData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepData").finish_non_exhaustive()
    }
}

/// Builds [`StepData`] (fills the cache: `N` tower forwards).
pub fn step_data(seed: u64) -> anyhow::Result<StepData> {
    let cfg = TrainerConfig::DEFAULT;
    let tower = TowerConfig { scale: negcache::tower::Scale::Fixed(ALPHA), ..TowerConfig::DEFAULT };
    let mut session =
        new_session(Tying::SharedTokens, 1, CacheShape { capacity: N, precision: Precision::F32 }, tower, cfg)?;
    // One thread, like the pass the step is compared with.
    session.set_threads(std::sync::Arc::new(crate::threads::Threads::serial()));
    let mut rng = Pcg64Mcg::seed_from_u64(seed);
    session.init(&mut rng)?;
    let corpus: Vec<ItemTokens> = (0..2 * N as u32).map(item_tokens).collect();
    session.fill_cache(&corpus[..N])?;
    Ok(StepData { session, corpus, rng })
}

/// One training step on a batch of `B` (query, positive) pairs drawn from
/// twice the cache's items, so about half the positives are not cached.
pub fn run_step(d: &mut StepData) -> anyhow::Result<f32> {
    let mut queries = [[0u32; QUERY_TOKENS]; B];
    let mut positives = [[0u32; ITEM_TOKENS]; B];
    for b in 0..B {
        let i = random::below(&mut d.rng, d.corpus.len() as u32);
        queries[b] = query_tokens(i, 0);
        positives[b] = d.corpus[i as usize];
    }
    let batch = Batch { queries: &queries, positives: &positives, positive_index: None };
    let r = d.session.step(&batch, &[], 0.001, &mut d.rng)?;
    Ok(r.training_loss)
}

/// The towers of the standard shape, initialised.
pub type Towers = SharedTokenTowers<BUCKETS, E, H, DIM, S>;

/// A boxed, initialised [`Towers`].
pub fn towers(seed: u64) -> anyhow::Result<Box<Towers>> {
    let mut m = boxed(|| Towers::new(TowerConfig::DEFAULT))?;
    m.init(&mut Pcg64Mcg::seed_from_u64(seed));
    Ok(m)
}

/// Multiply-adds of one tower forward on `tokens` non-padding tokens:
/// the bag's sums plus the MLP's two layers.
pub fn tower_flops(tokens: usize) -> f64 {
    2.0 * (E * H + H * DIM) as f64 + (tokens * E) as f64
}

// ---------------------------------------------------------------- eval

/// Exact retrieval as `negcache eval` does it (`train::rank`): each query
/// embedded, scored against every item by `vector::dot`, top 100 under the
/// standard protocol; on every core. Returns the number of results.
pub fn run_eval(
    session: &dyn Session,
    ev: &crate::eval::Evaluator,
    items: &[[f32; DIM]],
    queries: &[u32],
    tokens: &[QueryTokens],
) -> usize {
    let r = crate::train::rank(session, ev, queries, tokens, items, 100);
    r.iter().map(Vec::len).sum()
}

/// An evaluator over a synthetic corpus of `items` documents (ids `d0`,
/// `d1`, ...) and `queries` queries, one judgement each, for [`run_eval`].
pub fn eval_evaluator(items: usize, queries: usize) -> anyhow::Result<crate::eval::Evaluator> {
    use crate::data::{Dataset, Doc, Qrel, Query};
    let corpus = (0..items).map(|i| Doc { id: format!("d{i}"), title: String::new(), text: String::new() }).collect();
    let qs = (0..queries).map(|i| Query { id: format!("q{i}"), text: String::new() }).collect();
    let mut ds = Dataset { corpus, queries: qs, ..Dataset::default() };
    let qrels = (0..queries as u32).map(|q| Qrel { query: q, doc: q, score: 1 }).collect();
    ds.qrels.insert("test".into(), qrels);
    crate::eval::Evaluator::new(&ds, "test", crate::eval::Protocol::BEIR)
}

// ---------------------------------------------------------------- report

/// Bytes of resident memory at peak (VmHWM), if /proc says.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The machine: lscpu's model, cores and the SIMD flags that matter, and
/// what this build was compiled for.
pub fn machine() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let lscpu =
        std::process::Command::new("lscpu").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let field = |name: &str| {
        lscpu.as_deref().and_then(|t| {
            t.lines()
                .find(|l| l.trim_start().starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
    };
    for (k, f) in [
        ("model", "Model name:"),
        ("CPUs", "CPU(s):"),
        ("threads per core", "Thread(s) per core:"),
        ("family/model", "CPU family:"),
        ("L1d / L2 / L3", "L1d cache:"),
    ] {
        let mut v = field(f).unwrap_or_else(|| "?".into());
        if k == "family/model" {
            v = format!("{v}/{}", field("Model:").unwrap_or_default());
        }
        if k == "L1d / L2 / L3" {
            v = format!(
                "{v} / {} / {}",
                field("L2 cache:").unwrap_or_default(),
                field("L3 cache:").unwrap_or_default()
            );
        }
        out.push((k.to_string(), v));
    }
    let flags = field("Flags:").unwrap_or_default();
    let wanted =
        ["sse2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"];
    let have: Vec<&str> = wanted.iter().copied().filter(|w| flags.split_whitespace().any(|f| f == *w)).collect();
    out.push(("SIMD flags".into(), have.join(" ")));
    let mut built = Vec::new();
    for (name, on) in [
        ("sse2", cfg!(target_feature = "sse2")),
        ("avx", cfg!(target_feature = "avx")),
        ("avx2", cfg!(target_feature = "avx2")),
        ("fma", cfg!(target_feature = "fma")),
        ("avx512f", cfg!(target_feature = "avx512f")),
        ("neon", cfg!(target_feature = "neon")),
    ] {
        if on {
            built.push(name);
        }
    }
    out.push(("build's target features".into(), format!("{} ({})", built.join(" "), std::env::consts::ARCH)));
    if let Ok(mem) = std::fs::read_to_string("/proc/meminfo") {
        if let Some(l) = mem.lines().next() {
            out.push(("memory".into(), l.replace("MemTotal:", "").trim().to_string()));
        }
    }
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        out.push(("load average at start".into(), l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")));
    }
    out
}

/// One row of a results table.
struct Row {
    name: String,
    ms: f64,
    per_s: f64,
    gflops: f64,
    peak: f64,
    note: String,
}

fn rows_table(out: &mut String, unit: &str, rows: &[Row]) {
    let _ = writeln!(out, "| benchmark | ms | {unit}/s | GFLOP/s | of 1-core peak | notes |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---|");
    for r in rows {
        let (g, p) = if r.gflops > 0.0 {
            (format!("{:.1}", r.gflops), format!("{:.0} %", 100.0 * r.peak))
        } else {
            ("-".into(), "-".into())
        };
        let _ = writeln!(out, "| {} | {:.3} | {:.1} | {g} | {p} | {} |", r.name, r.ms, r.per_s, r.note);
    }
}

/// `negcache bench`.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let secs = args.seconds;
    // NaN or infinite seconds would time nothing and report 0 GFLOP/s,
    // "inf %" and a passing verdict.
    anyhow::ensure!(
        secs.is_finite() && (0.01..=3600.0).contains(&secs),
        "--seconds must be a number of seconds between 0.01 and 3600, got {secs}"
    );
    if let Some(name) = &args.dense_one {
        let fig = dense::run_one(name, secs)?;
        println!("{}", serde_json::to_string(&fig)?);
        return Ok(());
    }
    if args.dense {
        dense::run_all(secs, args.json.as_deref(), args.write.as_deref(), args.tf_lib.as_deref())?;
        return Ok(());
    }
    let machine = machine();
    for (k, v) in &machine {
        eprintln!("{k}: {v}");
    }

    eprintln!("measuring the fp32 multiply-add peak ...");
    let peak1 = peak_flops(secs);
    let peak2 = peak_flops_threads(2, secs);
    eprintln!("peak: {:.1} GFLOP/s on 1 core, {:.1} on 2", peak1 / 1e9, peak2 / 1e9);

    eprintln!("building the pass's cache ({N} x {DIM}) ...");
    let d = pass_data(1)?;
    let flops = 2.0 * (B * N * DIM) as f64;
    let mut loss = boxed(CacheLoss::<B, 1>::new)?;
    let mut rng = Pcg64Mcg::seed_from_u64(2);
    let mut draws = vec![Draw::EMPTY; B];
    let mut pass_rows = Vec::new();
    let add = |name: &str, t: Timing, flops: f64, note: String, rows: &mut Vec<Row>| {
        eprintln!("{name}: {:.3} ms", t.median * 1e3);
        rows.push(Row {
            name: name.into(),
            ms: t.median * 1e3,
            per_s: 1.0 / t.median,
            gflops: flops / t.median / 1e9,
            peak: flops / t.median / peak1,
            note,
        });
        t
    };
    let fast = add(
        "pass, exp-jump, hits masked (blocked kernel)",
        time(secs, || {
            black_box(run_pass(&d, &mut loss, 0, true, &mut rng));
        }),
        flops,
        "`CacheLoss::score_and_sample`".into(),
        &mut pass_rows,
    );
    let no_mask = add(
        "pass, exp-jump, no masking",
        time(secs, || {
            black_box(run_pass(&d, &mut loss, 0, false, &mut rng));
        }),
        flops,
        "without the B x N item comparisons".into(),
        &mut pass_rows,
    );
    let topk = add(
        "pass, top-k 64, hits masked",
        time(secs, || {
            black_box(run_pass(&d, &mut loss, TOP_K, true, &mut rng));
        }),
        flops,
        "group maxima, then exp-jump over 64 candidates".into(),
        &mut pass_rows,
    );
    let threads = crate::threads::Threads::new(2)?;
    let split = add(
        "pass, hits masked, 2 threads at query tiles",
        time(secs, || {
            black_box(run_pass_on(&threads, &d, &mut loss, 0, true, &mut rng));
        }),
        flops,
        "`Trainer::step_on`'s split: the same bits as 1 thread; GFLOP/s summed over both cores".into(),
        &mut pass_rows,
    );
    let legacy_secs = (secs / 3.0).max(0.3);
    let legacy = add(
        "before: per-slot pass, exp-jump, hits masked",
        time(legacy_secs, || legacy_pass(&d, 0, true, &mut rng, &mut draws)),
        flops,
        "4-accumulator dot + libm exp per score".into(),
        &mut pass_rows,
    );
    let legacy_topk = add(
        "before: per-slot pass, top-k 64",
        time(legacy_secs, || legacy_pass(&d, TOP_K, true, &mut rng, &mut draws)),
        flops,
        String::new(),
        &mut pass_rows,
    );
    let f32_rows = F32Rows(NegativeCache::as_ref(&*d.cache).embeddings().as_f32().expect("an f32 cache"));
    let one = add(
        "kernel::sample_shard, 1 thread",
        time(secs, || sharded_pass(&d, &f32_rows, 1, &mut rng, &mut draws).unwrap_or(())),
        flops,
        "the pass without `CacheLoss` around it".into(),
        &mut pass_rows,
    );
    let two = add(
        "2 threads: 2 shards + exact merge",
        time(secs, || sharded_pass(&d, &f32_rows, 2, &mut rng, &mut draws).unwrap_or(())),
        flops,
        "GFLOP/s summed over both cores".into(),
        &mut pass_rows,
    );
    let q = quantize(&d);
    let i8r = I8Rows { rows: &q.i8_rows, scales: &q.scales };
    let int8 = add(
        "int8 cache (per-row scale), 1 thread",
        time(secs, || sharded_pass(&d, &i8r, 1, &mut rng, &mut draws).unwrap_or(())),
        flops,
        "rows decoded to f32 per block".into(),
        &mut pass_rows,
    );
    let bfr = Bf16Rows(&q.bf16_rows);
    let bf16 = add(
        "bf16 cache, 1 thread",
        time(secs, || sharded_pass(&d, &bfr, 1, &mut rng, &mut draws).unwrap_or(())),
        flops,
        String::new(),
        &mut pass_rows,
    );
    // Deterministic samples of a fixed seed, to compare builds.
    let checksum = {
        let mut r = Pcg64Mcg::seed_from_u64(7);
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for _ in 0..4 {
            run_pass(&d, &mut loss, 0, true, &mut r);
            for b in 0..B {
                for &s in loss.negatives(b) {
                    h = (h ^ s as u64).wrapping_mul(0x100_0000_01b3);
                }
                h = (h ^ loss.candidate_lse(b).sum.to_bits() as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
        h
    };
    drop(q);

    eprintln!("building the standard trainer (cache {N}) ...");
    let mut sd = step_data(3)?;
    let mut step_rows = Vec::new();
    // Forward: query and positive per example, plus the fresh negative;
    // backward recomputes the forward (x2) for 3 towers; the pass.
    let tower_f = tower_flops(20) * B as f64 + tower_flops(7) * 2.0 * B as f64;
    let step_flops = flops + 3.0 * tower_f;
    let contains = add(
        "B x `CacheRef::contains` over 65,536 slots",
        time(secs / 2.0, || {
            let c = NegativeCache::as_ref(&*d.cache);
            black_box(d.items.iter().filter(|y| c.contains(y)).count());
        }),
        0.0,
        "what a scan for the cached positives would cost; the pass reports them instead".into(),
        &mut step_rows,
    );
    let step = add(
        "whole training step (standard shape, cache 65,536)",
        time(secs, || {
            black_box(run_step(&mut sd).unwrap_or(f32::NAN));
        }),
        step_flops,
        "refresh 0, embed 2B, pass, embed B negatives, backward 3B, Adam, cache update".into(),
        &mut step_rows,
    );
    // The goal's ratio, from alternating rounds of the pass and the step.
    let (alt_pass, alt_step) = time_alternating(
        2.0 * secs,
        || {
            black_box(run_pass(&d, &mut loss, 0, true, &mut rng));
        },
        || {
            black_box(run_step(&mut sd).unwrap_or(f32::NAN));
        },
    );
    eprintln!(
        "alternating rounds: step {:.3} ms, pass {:.3} ms ({:.2}x)",
        alt_step.median * 1e3,
        alt_pass.median * 1e3,
        alt_step.median / alt_pass.median
    );
    let sd_session = sd.session;
    drop(sd.corpus);

    let mut m = towers(4)?;
    let qt: Vec<QueryTokens> = (0..256).map(|i| query_tokens(i, 1)).collect();
    let it: Vec<ItemTokens> = (0..256).map(item_tokens).collect();
    let mut e = [0.0f32; DIM];
    let mut k = 0usize;
    let fwd_q = add(
        "tower forward, query (20 tokens)",
        time(secs / 2.0, || {
            m.embed(Side::Query, &qt[k % 256], &mut e);
            k += 1;
            black_box(&e);
        }),
        tower_flops(20),
        String::new(),
        &mut step_rows,
    );
    let fwd_i = add(
        "tower forward, item (7 tokens)",
        time(secs / 2.0, || {
            m.embed(Side::Item, &it[k % 256], &mut e);
            k += 1;
            black_box(&e);
        }),
        tower_flops(7),
        String::new(),
        &mut step_rows,
    );
    let g = [0.01f32; DIM];
    let bwd_q = add(
        "tower backward, query (recomputes the forward)",
        time(secs / 2.0, || {
            m.backward(Side::Query, &qt[k % 256], &g);
            k += 1;
        }),
        3.0 * tower_flops(20),
        "gradients accumulate; no optimiser step".into(),
        &mut step_rows,
    );
    let bwd_i = add(
        "tower backward, item",
        time(secs / 2.0, || {
            m.backward(Side::Item, &it[k % 256], &g);
            k += 1;
        }),
        3.0 * tower_flops(7),
        String::new(),
        &mut step_rows,
    );
    m.zero_grad();
    drop(m);

    eprintln!("exact retrieval over {EVAL_ITEMS} items ...");
    let mut r = Pcg64Mcg::seed_from_u64(5);
    let items: Vec<[f32; DIM]> = (0..EVAL_ITEMS).map(|_| unit(&mut r)).collect();
    let nq = 64usize;
    let qids: Vec<u32> = (0..nq as u32).collect();
    let qtok: Vec<QueryTokens> = (0..nq as u32).map(|i| query_tokens(i, 2)).collect();
    let eval_flops = 2.0 * (EVAL_ITEMS * DIM * nq) as f64;
    let ev = eval_evaluator(EVAL_ITEMS, nq)?;
    let mut eval_rows = Vec::new();
    let eval = add(
        "exact retrieval, 64 queries x 117,659 items, top 100",
        time(secs, || {
            black_box(run_eval(sd_session.as_ref(), &ev, &items, &qids, &qtok));
        }),
        eval_flops,
        "`train::rank` (vector::dot per item, all cores)".into(),
        &mut eval_rows,
    );
    drop(items);
    drop(sd_session);
    let rss = peak_rss();

    // ------------------------------------------------------------ report
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks: scoring, sampling and training on one machine\n");
    let _ = writeln!(
        md,
        "Written by `negcache bench --write docs/results/bench.md` ({:.0} s). Every figure is the median of \
         rounds of about 20 ms within ~{secs} s per benchmark; GFLOP/s count 2 flops per multiply-add of the \
         scoring (2 B N DIM per pass) or of the towers, and \"of peak\" divides by the single-core fp32 \
         multiply-add peak measured below in the same run.\n",
        started.elapsed().as_secs_f64() + 1.0
    );
    let _ = writeln!(md, "## Machine\n");
    let _ = writeln!(md, "| | |\n|---|---|");
    for (k, v) in &machine {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    let _ = writeln!(
        md,
        "| fp32 multiply-add peak, 1 core | {:.1} GFLOP/s |\n| fp32 multiply-add peak, 2 threads | {:.1} GFLOP/s ({:.2}x) |",
        peak1 / 1e9,
        peak2 / 1e9,
        peak2 / peak1
    );
    if peak2 < 1.8 * peak1 {
        let _ = writeln!(
            md,
            "\n**Warning:** the peak scaled only {:.2}x on 2 threads: another process was probably using a core \
             during this run, so its figures (the 2-thread ones above all) are not representative.",
            peak2 / peak1
        );
    }
    let _ = writeln!(
        md,
        "\nThe peak is a microbenchmark of 2 to 12 rows of 16 independent accumulators, `a = a * b + c` in plain \
         f32 (and `f32::mul_add` when the build has FMA), vectorised by the compiler for this build's target \
         features; the best configuration counts.\n"
    );
    let _ = writeln!(md, "## Scoring and sampling pass (B {B}, N {N}, DIM {DIM}, alpha {ALPHA})\n");
    rows_table(&mut md, "passes", &pass_rows);
    let _ = writeln!(md, "\nSample checksum of 4 passes from seed 7 (compare across builds): `{checksum:016x}`.\n");
    let _ = writeln!(md, "## Training step and towers (BUCKETS 2^15, E {E}, H {H}, DIM {DIM}, batch {B})\n");
    rows_table(&mut md, "calls", &step_rows);
    let _ = writeln!(md, "\n## Exact evaluation retrieval\n");
    rows_table(&mut md, "calls", &eval_rows);
    let per_item = eval.median / (nq as f64);
    let _ = writeln!(md, "\n{:.2} ms per query over {EVAL_ITEMS} items.\n", per_item * 1e3);

    let slot = OwnedCache::<ItemTokens, DIM>::bytes_per_slot;
    let _ = writeln!(md, "## Bytes per cached item (DIM {DIM})\n");
    let _ = writeln!(
        md,
        "| storage (`--cache-precision`) | embedding | whole slot (with item tokens, key, age, stamp, flag) | embedding vs f32 | whole slot vs f32 |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    for (name, p) in [("f32", Precision::F32), ("int8 + f32 row scale", Precision::Int8), ("bf16", Precision::Bf16)] {
        let (bytes, f) = (p.bytes_per_row(DIM), Precision::F32.bytes_per_row(DIM));
        let _ = writeln!(
            md,
            "| {name} | {bytes} | {} | {:.2}x | {:.2}x |",
            slot(p),
            f as f64 / bytes as f64,
            slot(Precision::F32) as f64 / slot(p) as f64
        );
    }
    let _ = writeln!(md);

    let _ = writeln!(md, "## Goals\n");
    let _ = writeln!(md, "| goal | measured | met |\n|---|---|---|");
    let frac = |t: &Timing| flops / t.median / peak1;
    let yes = |b: bool| if b { "yes" } else { "**no**" };
    let _ = writeln!(
        md,
        "| pass >= 60 % of 1-core peak | {:.0} % masked, {:.0} % unmasked, {:.0} % top-k 64 (before: {:.0} %, {:.0} %) | {} masked, {} unmasked |",
        100.0 * frac(&fast),
        100.0 * frac(&no_mask),
        100.0 * frac(&topk),
        100.0 * frac(&legacy),
        100.0 * frac(&legacy_topk),
        yes(frac(&fast) >= 0.6),
        yes(frac(&no_mask) >= 0.6)
    );
    let _ = writeln!(
        md,
        "| whole step <= 1.3x pass | {:.2}x ({:.2} ms vs {:.2} ms, in alternating rounds of each; measured apart above: {:.2}x) | {} |",
        alt_step.median / alt_pass.median,
        alt_step.median * 1e3,
        alt_pass.median * 1e3,
        step.median / fast.median,
        yes(alt_step.median <= 1.3 * alt_pass.median)
    );
    let _ = writeln!(
        md,
        "| 2 threads >= 1.8x on the pass | {:.2}x (machine: {:.2}x on the peak microbenchmark) | {} |",
        one.median / two.median,
        peak2 / peak1,
        yes(one.median / two.median >= 1.8)
    );
    let _ = writeln!(
        md,
        "| the trainer's pass >= 70 % of the 2-core peak | {:.0} % (split at query tiles, hits masked: {:.2}x the 1-thread pass) | {} |",
        100.0 * flops / split.median / peak2,
        fast.median / split.median,
        yes(flops / split.median / peak2 >= 0.7)
    );
    let ratio = |p: Precision| slot(Precision::F32) as f64 / slot(p) as f64;
    let _ = writeln!(
        md,
        "| int8 storage: >= 3.5x fewer bytes per slot, all fields counted | {:.2}x (whole slot), {:.2}x (embedding); pass {:.2}x the f32 time | {} |",
        ratio(Precision::Int8),
        Precision::F32.bytes_per_row(DIM) as f64 / Precision::Int8.bytes_per_row(DIM) as f64,
        int8.median / one.median,
        yes(ratio(Precision::Int8) >= 3.5)
    );
    let _ = writeln!(
        md,
        "| bf16 storage: >= 2x fewer bytes per slot, all fields counted | {:.2}x (whole slot), 2.00x (embedding); pass {:.2}x the f32 time | {} |",
        ratio(Precision::Bf16),
        bf16.median / one.median,
        yes(ratio(Precision::Bf16) >= 2.0)
    );
    for p in ["int8", "bf16"] {
        if let Some((diff, sd, n)) = recall_difference(&args.recall_results, p) {
            let _ = writeln!(
                md,
                "| {p} storage costs <= 1 point of Recall@10 on WordNet | {:+.2} points ({p} - f32, mean of {n} seeds; sd {:.2}) | {} |",
                100.0 * diff,
                100.0 * sd,
                yes(diff >= -0.01)
            );
        }
    }
    let _ = writeln!(
        md,
        "| speed-up of the pass | {:.1}x masked, {:.1}x top-k 64 | |",
        legacy.median / fast.median,
        legacy_topk.median / topk.median
    );
    let _ = writeln!(
        md,
        "\nTower figures for reference: forward {:.1} / {:.1} us (query / item), backward {:.1} / {:.1} us.\n",
        fwd_q.median * 1e6,
        fwd_i.median * 1e6,
        bwd_q.median * 1e6,
        bwd_i.median * 1e6
    );
    let _ = writeln!(md, "## Cache precision: Recall@10 on WordNet\n");
    match std::fs::read_to_string(args.recall_results.join("compare.md")) {
        Ok(text) => {
            // The compare's table (its notes name files of that directory).
            let table = text.lines().filter(|l| l.starts_with('|')).collect::<Vec<_>>().join("\n");
            let _ = writeln!(
                md,
                "From `negcache compare --config {}/compare.toml` (its `compare.md`): the configuration it names, \
                 10,000 steps, seeds 0, 1, 2, the cache stored in each precision; figures on the whole test split \
                 under the standard evaluation, mean ± standard deviation over the seeds.\n\n{table}\n",
                args.recall_results.display()
            );
        }
        Err(_) => {
            let _ = writeln!(md, "(No cache-precision results in {}.)\n", args.recall_results.display());
        }
    }
    let _ = writeln!(
        md,
        "## Memory\n\nPeak resident memory of the whole benchmark process (VmHWM): {}.\n",
        rss.map_or("unknown".into(), |b| format!("{:.1} MB", b as f64 / 1e6))
    );
    limits(
        &mut md,
        &Limits {
            peak1,
            peak2,
            fast: fast.median,
            no_mask: no_mask.median,
            topk: topk.median,
            step: step.median,
            alt_step: alt_step.median,
            alt_pass: alt_pass.median,
            one: one.median,
            two: two.median,
            split: split.median,
            bwd: (bwd_q.median + 2.0 * bwd_i.median) * B as f64,
            contains: contains.median,
            fwd: (fwd_q.median + 2.0 * fwd_i.median) * B as f64,
        },
    );
    print!("{md}");
    if let Some(path) = &args.write {
        crate::checkpoint::write_atomically(path, |f| f.write_all(md.as_bytes()).map_err(Into::into))?;
        eprintln!("wrote {} ({:.0} s)", path.display(), started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// The figures the closing analysis quotes (seconds, flops/s).
struct Limits {
    peak1: f64,
    peak2: f64,
    fast: f64,
    no_mask: f64,
    topk: f64,
    step: f64,
    alt_step: f64,
    alt_pass: f64,
    one: f64,
    two: f64,
    split: f64,
    bwd: f64,
    fwd: f64,
    contains: f64,
}

/// Mean and standard deviation over seeds of `precision`'s minus f32's
/// Recall@10, seed by seed, from the runs `default-f32` and
/// `default-<precision>` stored in `dir`.
fn recall_difference(dir: &std::path::Path, precision: &str) -> Option<(f64, f64, usize)> {
    let recall = |name: &str, seed: u64| -> Option<f64> {
        let path = dir.join(format!("runs/default-{name}-s{seed}/result.json"));
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        v["metrics"]["recall_at_10"].as_f64()
    };
    let d: Vec<f64> = (0..).map_while(|s| Some(recall(precision, s)? - recall("f32", s)?)).collect();
    let n = d.len();
    if n < 2 {
        return None;
    }
    let mean = d.iter().sum::<f64>() / n as f64;
    let sd = (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    Some((mean, sd, n))
}

/// What limits each goal, with this run's figures.
fn limits(md: &mut String, l: &Limits) {
    let flops = 2.0 * (B * N * DIM) as f64;
    let pct = |t: f64| 100.0 * flops / t / l.peak1;
    let _ = writeln!(md, "## What limits each goal\n");
    let _ = writeln!(
        md,
        "**The pass.** Unmasked it runs at {:.0} % of the 1-core peak; masking accidental hits costs {:.2} ms more \
         ({:.0} % masked). Masking compares every slot's key (`Item::key`) with the tile's positives' keys: \
         B x N = {} candidate pairs, most of them ruled out by one bit test per slot against a 1,024-bit \
         filter of the tile's 16 keys, the rest compared in full. Between the unmasked pass and \
         the peak: each score also pays its weight `exp_le0(c - max)` (about 25 vector operations next to the \
         dot product's 128), a block maximum, a running sum, and a comparison against the jump threshold per block \
         and query; and the cache (16.8 MB) streams from L3 once per 16-query tile (twice per batch of 32, the \
         price of a pass that fits a 16 KiB stack). Top-k 64 pays no `exp` per score but keeps a group maximum \
         and its slot per score ({:.0} %).\n",
        pct(l.no_mask),
        (l.fast - l.no_mask) * 1e3,
        pct(l.fast),
        B * N,
        pct(l.topk)
    );
    let _ = writeln!(
        md,
        "**The step.** In alternating rounds of each, a step costs {:.2} ms beyond the pass ({:.2} ms against \
         {:.2} ms). The pass there took {:+.2} ms against the pass measured alone above: the step's cache and \
         the pass's (about 17 MB each), with the step's tables, share the L3, and this VM's speed drifts \
         between minutes. Measured apart, the step costs {:.2} ms beyond the pass. The towers account for \
         about {:.2} ms of it ({} backward passes of about {:.1} us, each recomputing its forward, plus {} \
         forwards); a `perf` profile of the step (not stored) put much of the rest in the optimiser, whose \
         lazy Adam update loads each touched table row and its state from memory. The cache update does not \
         scan the cache: the pass reports where it found each positive while masking it (a scan with \
         `CacheRef::contains` would cost {:.2} ms, measured alone). The step here runs on one thread, like \
         the pass it is compared with.\n",
        (l.alt_step - l.alt_pass) * 1e3,
        l.alt_step * 1e3,
        l.alt_pass * 1e3,
        (l.alt_pass - l.fast) * 1e3,
        (l.step - l.fast) * 1e3,
        (l.bwd + l.fwd) * 1e3,
        3 * B,
        l.bwd / (3 * B) as f64 * 1e6,
        3 * B,
        l.contains * 1e3,
    );
    let _ = writeln!(
        md,
        "**Two threads.** The sharded pass runs {:.2}x faster on 2 threads; the multiply-add microbenchmark scales \
         {:.2}x on this machine. Each pass spawns a scoped thread for the second half (tens of microseconds) \
         and merges 32 draws; both cores stream their half of the cache from the shared L3. The trainer \
         splits its pass at query tiles instead (`Trainer::step_on`: each thread scores its 16 queries against \
         the whole cache, and every thread count computes the same bits): {:.2}x the one-thread pass here.\n",
        l.one / l.two,
        l.peak2 / l.peak1,
        l.fast / l.split
    );
    let meta = OwnedCache::<ItemTokens, DIM>::bytes_per_slot(Precision::F32) - Precision::F32.bytes_per_row(DIM);
    let ids = size_of::<u32>() + 8 + 4 + 4 + 1;
    let ratio =
        |m: usize| (Precision::F32.bytes_per_row(DIM) + m) as f64 / (Precision::Int8.bytes_per_row(DIM) + m) as f64;
    // The most bookkeeping per slot at which int8 still saves 3.5x:
    // (256 + m) / (68 + m) >= 3.5.
    let most = (Precision::F32.bytes_per_row(DIM) as f64 - 3.5 * Precision::Int8.bytes_per_row(DIM) as f64) / 2.5;
    let _ = writeln!(
        md,
        "**Bytes per item.** With a per-row scale, int8 cannot reach 4x on the embedding: {DIM} bytes of \
         components plus a 4-byte scale is {} bytes against {} (3.76x; a 2-byte scale would give 3.88x). Exactly \
         4x needs no per-row metadata, e.g. a fixed scale of 1/127 for L2-normalised rows, at about 3x the \
         rounding error of a per-row scale (typical components are near 1/8); that variant is not built. \
         Counting the whole slot, the {meta} bytes each slot also keeps here (item tokens, key, age, stamp, flag) \
         bring the savings to {:.2}x (int8) and {:.2}x (bf16); with `u32` ids for items ({ids} bytes) int8 saves \
         {:.2}x. A saving of 3.5x counting every field needs at most {most:.1} bytes of bookkeeping per slot \
         next to a 68-byte int8 row, less than the key alone: the goal is out of reach at DIM {DIM} while slots \
         keep their key, age and stamp.\n",
        Precision::Int8.bytes_per_row(DIM),
        Precision::F32.bytes_per_row(DIM),
        ratio(meta),
        (Precision::F32.bytes_per_row(DIM) + meta) as f64 / (Precision::Bf16.bytes_per_row(DIM) + meta) as f64,
        ratio(ids)
    );
    let _ = writeln!(
        md,
        "**Exactness and determinism.** There is one code path: plain Rust over fixed arrays that the compiler \
         vectorises for the build's target features (no `std::arch`, no FMA contraction), so SSE2, AVX2, AVX-512 \
         and Cortex-M4 builds compute the same bits and draw the same samples for a seed (the sample checksum \
         above is the same for a default and a `-C target-cpu=native` build; the firmware test checks a \
         Cortex-M4 run bit for bit against the host). `exp_le0` is within 2 ulp of the correctly rounded `exp` \
         (tested on 2^24 arguments); the samplers' chi-square tests in `core/src/loss.rs` and the sharded \
         merge's in `core/src/kernel.rs` pass, and a plain one-score-at-a-time transcription of the pass gives \
         the same draws and log-sum-exps bit for bit (`kernel::tests`). Against the pass before this kernel, \
         scores differ by rounding (the dot product sums in index order instead of four partial sums), the \
         log-sum-exp rescales once per 16-slot block, and each query draws from its own SplitMix64 stream \
         seeded from the caller's generator, so the same seed gives different (equally distributed) draws than \
         before.\n"
    );
    let _ = writeln!(
        md,
        "**Build.** Figures depend on the target features the binary was built for (see Machine). The \
         workspace's `.cargo/config.toml` builds for this machine (`target-cpu=native`, and 512-bit vectors \
         where the CPU has AVX-512); a portable build (`RUSTFLAGS` set, e.g. `-C target-cpu=x86-64-v2`) is \
         slower and draws the same samples.\n"
    );
}
