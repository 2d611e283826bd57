//! How the core runs independent pieces of work: one after the other
//! ([`Serial`], the default, and all a microcontroller has) or at once, on
//! threads the caller owns (the host's thread pool implements [`Fork`]).
//!
//! The core only ever splits work whose pieces compute the same bits
//! whatever runs them and in whatever order: the scoring pass splits its
//! batch at query tiles, and each query draws from its own random stream
//! seeded in query order before the split (see [`crate::kernel`]); a
//! corpus embedded for the full softmax splits at item boundaries, each
//! item's embedding being its own ([`crate::tower::Towers::embed_items_on`]);
//! the full softmax's first pass at half the queries, each query's sum
//! being its own; and a model that gathers the corpus's halves apart
//! ([`crate::tower::Towers::item_halves`]) back-propagates them on two
//! threads, the halves fixed by the corpus and their gradients added in a
//! fixed order. A run is therefore the same on one thread, on many, and
//! on the firmware.

/// Runs two closures, possibly at the same time, and returns when both are
/// done: the fork-join primitive (`rayon::join`'s shape).
pub trait Fork: Sync {
    /// Runs `a` and `b` to completion, in any order or concurrently.
    fn join<A, B>(&self, a: A, b: B)
    where
        A: FnOnce() + Send,
        B: FnOnce() + Send;

    /// How many pieces are worth running at once; 1 means never split.
    fn width(&self) -> usize;

    /// The least work, in multiply-adds, worth handing to another piece:
    /// below it a hand-over costs more than it saves. It changes only
    /// speed, never a result.
    fn min_piece_work(&self) -> usize {
        MIN_PIECE_WORK
    }
}

/// The default [`Fork::min_piece_work`]: 2^20 multiply-adds, a tile of 16
/// queries over 1,024 slots at DIM 64. On a 2-core Intel Xeon VM (an
/// earlier `docs/results/bench.md`), `negcache train` (hashed-token towers,
/// batch 32) split its pass from a cache of 1,024 slots for 8 % more steps
/// per second, and from 8,192 slots for about 35 % more; at 512 slots
/// (2^19) the split won 1 %, within noise. On the AMD VM of
/// `docs/results/bench-dense-runs/d8fa336.md` the 4,096-slot dense
/// benchmark ran slower split (and level with one thread in the runs
/// after it): waking a parked worker costs more there. The host's pool
/// therefore measures its own threshold when it starts
/// (`negcache_host::threads::measure_min_piece_work`); this is the
/// default of a `Fork` that does not.
pub const MIN_PIECE_WORK: usize = 1 << 20;

/// The pieces worth cutting `n` units of `unit_work` multiply-adds each
/// into on `fork`: its width (at most `n`) when each piece would carry at
/// least [`Fork::min_piece_work`], else 1. The corpus embedding
/// ([`crate::tower::embed_items_split`]), the full softmax's halves and its
/// first pass ask it.
pub fn split_parts(fork: &impl Fork, n: usize, unit_work: usize) -> usize {
    let width = fork.width().max(1);
    if n.saturating_mul(unit_work) / width >= fork.min_piece_work() {
        width.min(n).max(1)
    } else {
        1
    }
}

/// Everything on the calling thread, `a` then `b`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Serial;

impl Fork for Serial {
    fn join<A, B>(&self, a: A, b: B)
    where
        A: FnOnce() + Send,
        B: FnOnce() + Send,
    {
        a();
        b();
    }

    fn width(&self) -> usize {
        1
    }
}

/// For tests: runs `b` before `a` and claims four pieces at once, however
/// small, so that a split must not depend on the order or the size of its
/// pieces; counts its joins.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Reversed(core::sync::atomic::AtomicUsize);

#[cfg(test)]
impl Reversed {
    /// The joins made so far.
    pub(crate) fn joins(&self) -> usize {
        self.0.load(core::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
impl Fork for Reversed {
    fn join<A, B>(&self, a: A, b: B)
    where
        A: FnOnce() + Send,
        B: FnOnce() + Send,
    {
        self.0.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        b();
        a();
    }

    fn width(&self) -> usize {
        4
    }

    fn min_piece_work(&self) -> usize {
        0
    }
}
