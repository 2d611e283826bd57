//! The benchmark model of the original TensorFlow library, trained with the
//! negative cache through the public API: dense features F = 128, each
//! tower Dense(128, relu) -> Dense(64) -> L2, score 20 <q, d>, batch 32,
//! Adam, a streaming cache of 4,096 items.
//!
//! The task is synthetic and learnable: item `i` has random features `y_i`,
//! and its queries are `M y_i` plus noise for a fixed random matrix `M`, so
//! the query tower must learn to undo `M`. The program prints the loss and
//! Recall@10 over all items before and after, and fails unless both moved
//! the right way.
//!
//! `cargo run --release -p negcache --example dense`

use negcache::layered::LayerTowers;
use negcache::layers::{Act, Activation, Chain, Dense, L2};
use negcache::tower::{Model, Towers};
use negcache::trainer::{Batch, Trainer, TrainerConfig};
use negcache::{random, NegativeCache};
use rand_core::SeedableRng;

const F: usize = 128;
const ITEMS: usize = 8192;
/// Dense(128, relu) -> Dense(64) -> L2, with Adam's two state slots.
type Tower = Chain<Dense<F, 128, 2>, Chain<Act<128>, Chain<Dense<128, 64, 2>, L2<64>, 64>, 128>, 128>;
type Model2 = LayerTowers<Tower, Tower, F, F, 2>;

fn tower() -> Tower {
    Chain(Dense::new(), Chain(Act(Activation::Relu), Chain(Dense::new(), L2)))
}

fn main() {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(1);
    let uniform = |rng: &mut rand_pcg::Pcg64Mcg| 2.0 * random::open01(rng) - 1.0;
    let items: Vec<[f32; F]> = (0..ITEMS).map(|_| std::array::from_fn(|_| uniform(&mut rng))).collect();
    let m: Vec<[f32; F]> = (0..F).map(|_| std::array::from_fn(|_| uniform(&mut rng) / 8.0)).collect();
    let query_of = |i: usize, rng: &mut rand_pcg::Pcg64Mcg| -> [f32; F] {
        std::array::from_fn(|r| (0..F).map(|c| m[r][c] * items[i][c]).sum::<f32>() + 0.5 * uniform(rng))
    };

    let mut trainer: Box<Trainer<Model2, [f32; F], [f32; F], 64, 32, 1>> =
        Box::new(Trainer::new(LayerTowers::new(tower(), tower(), 20.0), TrainerConfig::DEFAULT));
    let mut cache: Box<NegativeCache<[f32; F], 4096, 64>> = Box::new(NegativeCache::new());
    trainer.model.init(&mut rng);
    trainer.init().expect("settings");

    let eval: Vec<(usize, [f32; F])> = (0..500).map(|k| (k * 13 % ITEMS, query_of(k * 13 % ITEMS, &mut rng))).collect();
    let before = recall_at_10(&trainer.model, &items, &eval);
    let (mut first, mut last) = (0.0, 0.0);
    for step in 0..1000 {
        let picks: Vec<usize> = (0..32).map(|_| random::below(&mut rng, ITEMS as u32) as usize).collect();
        let queries: Vec<[f32; F]> = picks.iter().map(|&i| query_of(i, &mut rng)).collect();
        let positives: Vec<[f32; F]> = picks.iter().map(|&i| items[i]).collect();
        let batch = Batch { queries: &queries, positives: &positives, positive_index: None };
        let r = trainer.step(&mut cache.view_mut(), &batch, &[], 1e-3, &mut rng).expect("step");
        if step < 100 {
            first += r.interpretable_loss / 100.0;
        } else if step >= 900 {
            last += r.interpretable_loss / 100.0;
        }
    }
    let after = recall_at_10(&trainer.model, &items, &eval);
    println!("cache loss (mean of 100 steps): first {first:.3}, last {last:.3}");
    println!("Recall@10 over {ITEMS} items: before {before:.3}, after {after:.3}");
    assert!(last < first && after > before + 0.2, "the model did not learn");
}

/// The share of `eval` queries whose item is among the 10 best-scored.
fn recall_at_10(model: &Model2, items: &[[f32; F]], eval: &[(usize, [f32; F])]) -> f64 {
    let mut emb = vec![[0.0; 64]; items.len()];
    model.embed_items(items, &mut emb);
    let hits = eval.iter().filter(|(i, x)| {
        let mut q = [0.0; 64];
        model.embed_query(x, &mut q);
        let score = |e: &[f32; 64]| q.iter().zip(e).map(|(a, b)| a * b).sum::<f32>();
        let own = score(&emb[*i]);
        emb.iter().filter(|e| score(e) > own).count() < 10
    });
    hits.count() as f64 / eval.len() as f64
}
