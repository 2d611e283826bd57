//! The threads a training step's scoring pass (and the full softmax's
//! corpus embedding and first softmax pass) runs on: the host's [`Fork`]
//! for the core.
//!
//! The core splits the pass at tiles of queries, and every query draws
//! from its own stream; a corpus at items, each embedded on its own; the
//! full softmax's first pass at queries, each with its own sum; and a
//! twin model's back-propagation at two halves fixed by the corpus, their
//! gradients added at the end; so a step computes the same bits on one
//! thread or many (`negcache::parallel`). The count is therefore a
//! resource, not a setting of the run: it is the global `--threads` flag,
//! not a key of the run's config, and changing it neither invalidates a
//! stored run nor stops a resume.
//!
//! The workers are a rayon pool: they stay up between steps, so a split
//! costs a hand-over, not a thread spawn. What a hand-over costs depends on
//! the machine, so the process's pool measures it when it starts and
//! splits only passes worth it ([`measure_min_piece_work`]).

use std::sync::{Arc, OnceLock};

use anyhow::Context;
use negcache::parallel::Fork;

/// The calling thread and a pool of `count - 1` workers, or the calling
/// thread alone.
#[derive(Debug)]
pub struct Threads {
    pool: Option<rayon::ThreadPool>,
    count: usize,
    min_piece_work: usize,
}

impl Threads {
    /// `count` threads; 0 for one per core. One thread means no pool.
    pub fn new(count: usize) -> anyhow::Result<Self> {
        let count = if count == 0 { cores() } else { count };
        if count == 1 {
            return Ok(Self::serial());
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(count - 1)
            .thread_name(|i| format!("negcache-pass-{i}"))
            .build()
            .with_context(|| format!("starting {count} threads"))?;
        Ok(Self { pool: Some(pool), count, min_piece_work: negcache::parallel::MIN_PIECE_WORK })
    }

    /// These threads, splitting only pieces worth a hand-over on this
    /// machine ([`measure_min_piece_work`]); unchanged on one thread.
    pub fn calibrated(self) -> Self {
        match &self.pool {
            Some(pool) => {
                let work = measure_min_piece_work(pool);
                self.with_min_piece_work(work)
            }
            None => self,
        }
    }

    /// These threads, splitting work down to pieces of `work`
    /// multiply-adds (tests split small passes with 0).
    pub fn with_min_piece_work(mut self, work: usize) -> Self {
        self.min_piece_work = work;
        self
    }

    /// The calling thread alone.
    pub fn serial() -> Self {
        Self { pool: None, count: 1, min_piece_work: negcache::parallel::MIN_PIECE_WORK }
    }
}

impl Fork for Threads {
    fn join<A, B>(&self, a: A, b: B)
    where
        A: FnOnce() + Send,
        B: FnOnce() + Send,
    {
        match &self.pool {
            // `b` goes to a worker and `a` runs here: one hand-over per
            // split, and the calling thread works instead of waiting.
            Some(pool) => pool.in_place_scope(|s| {
                s.spawn(|_| b());
                a();
            }),
            None => {
                a();
                b();
            }
        }
    }

    fn width(&self) -> usize {
        self.count
    }

    fn min_piece_work(&self) -> usize {
        self.min_piece_work
    }
}

/// Cold hand-overs timed by [`measure_min_piece_work`] (the median counts).
const HANDOVERS: usize = 11;

/// The least work, in multiply-adds, worth splitting on `pool`, measured
/// in about 30 ms. Splitting two tiles saves one tile's time and costs a
/// hand-over (and the wait for the other piece), so a tile is split when
/// its pass takes at least twice a hand-over: twice the hand-over's time
/// in multiply-adds of one thread's pass, within 2^18 to 2^26 (so a tile
/// of 16 queries over 65,536 slots of 64 floats always splits). The
/// hand-over is the median of [`HANDOVERS`] to a parked worker (a step
/// splits its pass once, and the worker sleeps between steps): on a VM, waking a parked thread can cost
/// more than a small pass (on the 2-core AMD EPYC VM of
/// `docs/results/bench-dense.md`, about 150 us, against 2^22
/// multiply-adds of the pass in about 100 us: the 4,096- and 8,192-slot
/// caches ran faster on one thread, the 16,384-slot one 1.28x faster on
/// two). The pass's speed is one thread's `kernel::sample_shard` over a
/// synthetic 4,096-slot cache. Timing moves only the split's threshold,
/// so only speed: a step's bits are the same split or not.
pub fn measure_min_piece_work(pool: &rayon::ThreadPool) -> usize {
    use negcache::kernel::{self, Draw, F32Rows, Slots};
    use rand_core::SeedableRng;
    use std::time::{Duration, Instant};
    let mut handover: Vec<f64> = (0..HANDOVERS)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(2));
            let t = Instant::now();
            pool.in_place_scope(|s| s.spawn(|_| {}));
            t.elapsed().as_secs_f64()
        })
        .collect();
    handover.sort_by(f64::total_cmp);
    let handover = handover[HANDOVERS / 2];
    const N: usize = 4096;
    const D: usize = 64;
    let rows: Vec<[f32; D]> = (0..N).map(|j| std::array::from_fn(|i| ((j * 7 + i) % 13) as f32 * 0.01)).collect();
    let (keys, occupied) = (vec![0u64; N], vec![true; N]);
    let queries = [[0.05f32; D]; 16];
    let slots = Slots { rows: &F32Rows(&rows), keys: &keys, occupied: &occupied };
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(0);
    let mut draws = [Draw::EMPTY; 16];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        if kernel::sample_shard(slots, 0..N, &queries, None, 20.0, 1.0, &mut rng, &mut draws).is_err() {
            return negcache::parallel::MIN_PIECE_WORK;
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    let per_madd = best / (N * D * queries.len()) as f64;
    let work = 2.0 * handover / per_madd.max(1e-15);
    (work as usize).clamp(1 << 18, 1 << 26)
}

/// The machine's cores (1 if unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

static COUNT: OnceLock<usize> = OnceLock::new();
static SHARED: OnceLock<Arc<Threads>> = OnceLock::new();

/// Sets the process's thread count (the `--threads` flag; 0 for one per
/// core), once; the pool starts at the first [`shared`], so a command that
/// trains nothing starts no thread.
pub fn configure(count: usize) -> anyhow::Result<()> {
    COUNT.set(count).map_err(|_| anyhow::anyhow!("the process's threads were already set"))
}

/// How many threads the process's pass may use: as [`configure`]d, or one
/// per core (without starting them).
pub fn count() -> usize {
    match COUNT.get().copied().unwrap_or(0) {
        0 => cores(),
        n => n,
    }
}

/// The process's threads: as many as [`configure`]d, or one per core; on
/// the calling thread alone if the pool cannot start.
pub fn shared() -> Arc<Threads> {
    SHARED
        .get_or_init(|| {
            Arc::new(Threads::new(count()).map(Threads::calibrated).unwrap_or_else(|e| {
                eprintln!("warning: {e:#}; the pass runs on one thread");
                Threads::serial()
            }))
        })
        .clone()
}
