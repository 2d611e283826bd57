//! A training step's stack use is bounded: this test binary re-runs itself
//! as a child process that takes steps on a thread with a given stack size;
//! an overflow kills only the child. The smallest size that works is
//! printed (`cargo test --release -p negcache-tests --test step_stack -- --nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]

use negcache::tower::{SeparateTowers, TowerConfig};
use negcache::trainer::{Batch, Objective, Trainer, TrainerConfig};
use rand_core::SeedableRng;

type Towers = SeparateTowers<32768, 64, 128, 64, 2>;
type Big = Trainer<Towers, [u32; 32], [u32; 12], 64, 32, 1>;
type BigCache = negcache::NegativeCache<[u32; 12], 65536, 64>;

fn run_steps(t: &mut Big, cache: &mut BigCache, steps: u32) {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(1);
    for s in 0..steps {
        let mut q = [[u32::MAX; 32]; 32];
        let mut y = [[u32::MAX; 12]; 32];
        for b in 0..32 {
            let item = negcache::random::below(&mut rng, 5000);
            for t in 0..8 {
                q[b][t] = item.wrapping_mul(31).wrapping_add(t as u32 + s % 3);
            }
            y[b][0] = item;
            y[b][1] = item / 10;
        }
        let b = Batch { queries: &q, positives: &y, positive_index: None };
        t.step(&mut cache.as_mut(), &b, &[], 0.001, &mut rng).unwrap();
    }
}

const PROBE: &str = "NEGCACHE_STACK_PROBE";
/// Set (to anything) for the probe to train in-batch softmax, which runs
/// through `softmax.rs` and its stack tiles, instead of the default.
const IN_BATCH: &str = "NEGCACHE_STACK_PROBE_IN_BATCH";

/// In a child process: 20 steps of a trainer on a thread with the stack
/// size given in the environment.
#[test]
fn stack_probe_child() {
    let Ok(kib) = std::env::var(PROBE) else { return };
    let kib: usize = kib.parse().unwrap();
    let cfg = if std::env::var(IN_BATCH).is_ok() {
        TrainerConfig { objective: Objective::InBatch, ..TrainerConfig::DEFAULT }
    } else {
        TrainerConfig::DEFAULT
    };
    let mut t = negcache_host::memory::boxed(move || Trainer::new(Towers::new(TowerConfig::DEFAULT), cfg)).unwrap();
    t.model.init(&mut rand_pcg::Pcg64Mcg::seed_from_u64(0));
    t.init().unwrap();
    let mut cache = negcache_host::memory::boxed(BigCache::new).unwrap();
    std::thread::Builder::new()
        .stack_size(kib * 1024)
        .spawn(move || run_steps(&mut t, &mut cache, 20))
        .unwrap()
        .join()
        .unwrap();
}

/// Whether 20 steps run on a thread stack of `kib` KiB (in-batch softmax
/// when `in_batch`), in a child process.
fn works(kib: usize, in_batch: bool) -> bool {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child.args(["--exact", "stack_probe_child", "--test-threads", "1"]).env(PROBE, kib.to_string());
    if in_batch {
        child.env(IN_BATCH, "1");
    }
    child.output().unwrap().status.success()
}

/// The bound the README states, in KiB.
const BOUND_KIB: usize = 128;

#[test]
fn a_step_needs_little_stack() {
    if std::env::var(PROBE).is_ok() {
        return;
    }
    // The default objective, and in-batch softmax, which scores through
    // `softmax.rs` and its tiles on the stack. The smallest working size
    // (to 4 KiB) is printed; the batched towers' backward pass takes most
    // of it. Below 16 KiB (glibc's PTHREAD_STACK_MIN) the runtime rounds a
    // request up, so that is the floor of what can be measured this way.
    for (what, in_batch) in [("a training step", false), ("an in-batch step", true)] {
        assert!(works(BOUND_KIB, in_batch), "{what} overflowed a {BOUND_KIB} KiB stack");
        let (mut lo, mut hi) = (12usize, BOUND_KIB);
        while hi - lo > 4 {
            let mid = (lo + hi) / 2;
            if works(mid, in_batch) {
                hi = mid
            } else {
                lo = mid
            }
        }
        println!("{what} runs on a thread stack of {hi} KiB (fails at {lo} KiB)");
    }
}
