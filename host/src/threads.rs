//! The threads a training step's scoring pass runs on: the host's
//! [`Fork`] for the core.
//!
//! The core splits the pass at tiles of queries, and every query draws
//! from its own stream, so a step computes the same bits on one thread or
//! many (`negcache::parallel`). The count is therefore a resource, not a
//! setting of the run: it is the global `--threads` flag, not a key of the
//! run's config, and changing it neither invalidates a stored run nor
//! stops a resume.
//!
//! The workers are a rayon pool: they stay up between steps, so a split
//! costs a hand-over, not a thread spawn.

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
            Arc::new(Threads::new(count()).unwrap_or_else(|e| {
                eprintln!("warning: {e:#}; the pass runs on one thread");
                Threads::serial()
            }))
        })
        .clone()
}
