//! A trainer of a realistic configuration (hashed-token towers with 2^15
//! buckets, DIM 64, a cache of 65,536, batch 32) lives in a `static`, its
//! steps allocate nothing, and a step's stack use is bounded.
//!
//! This binary holds one test only: the allocation counter is global, so
//! nothing else may run beside it. The stack bound is in `step_stack.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]

use negcache::tower::{SeparateTowers, TowerConfig};
use negcache::trainer::{Batch, Trainer, TrainerConfig};
use rand_core::SeedableRng;
use static_cell::ConstStaticCell;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

type Towers = SeparateTowers<32768, 64, 128, 64, 2>;
type Big = Trainer<Towers, [u32; 32], [u32; 12], 64, 32, 1>;
type BigCache = negcache::NegativeCache<[u32; 12], 65536, 64>;

static TRAINER: ConstStaticCell<Big> =
    ConstStaticCell::new(Trainer::new(Towers::new(TowerConfig::DEFAULT), TrainerConfig::DEFAULT));
static CACHE: ConstStaticCell<BigCache> = ConstStaticCell::new(BigCache::new());

fn batch(rng: &mut rand_pcg::Pcg64Mcg, step: u32) -> ([[u32; 32]; 32], [[u32; 12]; 32]) {
    let mut q = [[u32::MAX; 32]; 32];
    let mut y = [[u32::MAX; 12]; 32];
    for b in 0..32 {
        let item = negcache::random::below(rng, 5000);
        for t in 0..8 {
            q[b][t] = item.wrapping_mul(31).wrapping_add(t as u32 + step % 3);
        }
        y[b][0] = item;
        y[b][1] = item / 10;
    }
    (q, y)
}

/// Takes `steps` steps; returns the heap allocations made during them.
fn run_steps(t: &mut Big, cache: &mut BigCache, steps: u32) -> usize {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(1);
    let mut allocs = 0;
    for s in 0..steps {
        let (q, y) = batch(&mut rng, s);
        let b = Batch { queries: &q, positives: &y, positive_index: None };
        let region = Region::new(GLOBAL);
        t.step(&mut cache.as_mut(), &b, &[], 0.001, &mut rng).unwrap();
        allocs += region.change().allocations;
    }
    allocs
}

#[test]
fn a_realistic_trainer_lives_in_a_static_and_steps_without_allocating() {
    // 2 tables x 4 copies (value, gradient, Adam m and v) x 2^15 x 64 x 4 B
    // = 67,108,864 B, two MLPs and the step's buffers; the cache is apart,
    // 65,536 x (256 + 48 + 8 + 4 + 4 + 1) B.
    let size = size_of::<Big>();
    println!("trainer state: {size} bytes ({:.1} MB)", size as f64 / 1e6);
    assert!(size > 67_108_864 && size < 75_000_000, "{size}");
    assert!(size_of::<BigCache>() >= 65_536 * 321, "{}", size_of::<BigCache>());
    let t: &'static mut Big = TRAINER.take();
    let cache: &'static mut BigCache = CACHE.take();
    t.model.init(&mut rand_pcg::Pcg64Mcg::seed_from_u64(0));
    t.init().unwrap();
    let allocs = run_steps(t, cache, 40);
    assert_eq!(allocs, 0, "a step allocated");
    assert_eq!(cache.len(), cache.as_ref().occupied().iter().filter(|&&o| o).count());
    assert!(cache.len() > 1000);
}
