//! Seeded training on the planted problem (`negcache_tests::planted`)
//! reaches the recall bands stored in `fixtures/expected/planted.json`,
//! and is bit-for-bit deterministic.
//!
//! The bands were measured on real runs of this test's configurations over
//! several seeds (the command is in the fixture); a regression that slows
//! learning falls below them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use negcache::optim::OptimizerKind;
use negcache::tower::{SeparateTowers, TowerConfig};
use negcache::trainer::{Batch, Objective, Trainer, TrainerConfig};
use negcache::NegativeCache;
use negcache_host::memory::boxed;
use negcache_tests::planted::{self, ItemTokens, QueryTokens};
use rand_core::SeedableRng;

type Towers = SeparateTowers<4096, 32, 64, 32, 2>;
type PlantedTrainer = Trainer<Towers, QueryTokens, ItemTokens, 32, 32, 1>;
/// 256 slots: the planted corpus fits.
type PlantedCache = NegativeCache<ItemTokens, 256, 32>;

/// Trains `steps` steps with `objective` from `seed`; returns the trainer
/// and its cache.
pub fn train(objective: Objective, seed: u64, steps: usize) -> (Box<PlantedTrainer>, Box<PlantedCache>) {
    train_with(TrainerConfig { objective, optimizer: OptimizerKind::ADAM, ..TrainerConfig::DEFAULT }, seed, steps)
}

/// [`train`] with every setting given.
pub fn train_with(cfg: TrainerConfig, seed: u64, steps: usize) -> (Box<PlantedTrainer>, Box<PlantedCache>) {
    let mut t = boxed(move || Trainer::new(Towers::new(TowerConfig::DEFAULT), cfg)).unwrap();
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
    t.model.init(&mut rng);
    t.init().unwrap();
    let mut cache = Box::new(PlantedCache::new());
    let corpus = planted::corpus();
    for _ in 0..steps {
        let (q, y, idx) = planted::batch(32, &mut rng);
        let b = Batch { queries: &q, positives: &y, positive_index: Some(&idx) };
        t.step(&mut cache.view_mut(), &b, &corpus, 0.01, &mut rng).unwrap();
    }
    (t, cache)
}

fn band(name: &str) -> (f64, f64) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/expected/planted.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let run =
        v["runs"].as_array().unwrap().iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no band {name}"));
    (run["recall_at_10_min"].as_f64().unwrap(), run["recall_at_1_min"].as_f64().unwrap())
}

fn check(name: &str, objective: Objective) {
    let (t, _) = train(objective, 0, STEPS);
    let (r1, r10) = planted::recall(&t.model);
    let (min10, min1) = band(name);
    println!("planted {name}: recall@1 {r1:.3}, recall@10 {r10:.3}");
    assert!(r10 >= min10 && r1 >= min1, "{name}: recall@1 {r1}, @10 {r10}; band: @1 >= {min1}, @10 >= {min10}");
}

#[test]
fn the_cache_learns_the_planted_towers() {
    check("cache", Objective::Cache);
}

#[test]
fn in_batch_learns_the_planted_towers() {
    check("in_batch", Objective::InBatch);
}

#[test]
fn full_softmax_learns_the_planted_towers() {
    check("full", Objective::Full);
}

#[test]
fn mixed_cache_and_in_batch_learns_the_planted_towers() {
    check("cache_mixed", Objective::CacheMixed);
}

#[test]
fn sampled_softmax_learns_the_planted_towers() {
    check("sampled", Objective::Sampled { negatives: 256 });
}

#[test]
fn sampled_item_gradients_subsample_only_the_item_side() {
    // Keeping every negative's item gradient is the plain objective, bit
    // for bit; keeping 16 of 256 changes the run.
    let cfg = |g| TrainerConfig {
        objective: Objective::Sampled { negatives: 256 },
        optimizer: OptimizerKind::ADAM,
        sampled_item_gradients: g,
        ..TrainerConfig::DEFAULT
    };
    let emb = |t: &PlantedTrainer| {
        let mut e = [0.0f32; 32];
        use negcache::tower::{Side, TokenModel};
        t.model.embed(Side::Item, &planted::corpus()[5], &mut e);
        e.map(f32::to_bits)
    };
    let plain = train_with(cfg(0), 3, 20).0;
    assert_eq!(emb(&plain), emb(&train_with(cfg(256), 3, 20).0));
    assert_ne!(emb(&plain), emb(&train_with(cfg(16), 3, 20).0));
    // Priority sampling of the 16 trains, and differently again.
    let priority = TrainerConfig { sampled_item_priority: true, ..cfg(16) };
    let chosen = emb(&train_with(priority, 3, 20).0);
    assert_ne!(emb(&plain), chosen);
    assert_ne!(emb(&train_with(cfg(16), 3, 20).0), chosen);
    // The settings are refused for another objective, and priority
    // sampling beyond the step's gradient buffers (BATCH x NEG = 32).
    for bad in [
        TrainerConfig { sampled_item_gradients: 8, ..TrainerConfig::DEFAULT },
        TrainerConfig { sampled_item_priority: true, ..cfg(64) },
    ] {
        let mut t = boxed(move || Trainer::new(Towers::new(TowerConfig::DEFAULT), bad)).unwrap();
        let t: &mut PlantedTrainer = &mut t;
        assert!(t.init().is_err(), "{bad:?}");
    }
}

#[test]
fn training_is_bit_for_bit_deterministic() {
    let a = train(Objective::Cache, 7, 40);
    let b = train(Objective::Cache, 7, 40);
    let c = train(Objective::Cache, 8, 40);
    let emb = |t: &PlantedTrainer| {
        let mut e = [0.0f32; 32];
        use negcache::tower::{Side, TokenModel};
        t.model.embed(Side::Query, &planted::query(3, 1), &mut e);
        e.map(f32::to_bits)
    };
    assert_eq!(emb(&a.0), emb(&b.0));
    assert_ne!(emb(&a.0), emb(&c.0));
    assert_eq!(a.1.view().embeddings(), b.1.view().embeddings());
}

/// Measures the bands for `fixtures/expected/planted.json`: every
/// objective over seeds 0..5 at `STEPS` steps. Run with
/// `cargo test --release -p negcache-tests --test planted -- --ignored --nocapture measure`.
#[test]
#[ignore]
fn measure_planted_bands() {
    for (name, obj) in [
        ("cache", Objective::Cache),
        ("in_batch", Objective::InBatch),
        ("sampled", Objective::Sampled { negatives: 256 }),
        ("full", Objective::Full),
        ("cache_mixed", Objective::CacheMixed),
    ] {
        let mut r = Vec::new();
        for seed in 0..5 {
            let (t, _) = train(obj, seed, STEPS);
            r.push(planted::recall(&t.model));
        }
        let min1 = r.iter().map(|x| x.0).fold(1.0, f64::min);
        let min10 = r.iter().map(|x| x.1).fold(1.0, f64::min);
        let mean1 = r.iter().map(|x| x.0).sum::<f64>() / 5.0;
        let mean10 = r.iter().map(|x| x.1).sum::<f64>() / 5.0;
        println!("{name}: steps {STEPS} recall@1 min {min1:.3} mean {mean1:.3}; recall@10 min {min10:.3} mean {mean10:.3}; {r:?}");
    }
}

/// The step budget of the stored bands.
const STEPS: usize = 300;
