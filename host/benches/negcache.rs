//! Criterion benchmarks of the same work `negcache bench` times (see
//! `negcache_host::bench`): the scoring-and-sampling pass (B 32, N 65,536,
//! DIM 64; with and without top-k 64; one and two threads; int8 and bf16
//! rows), a whole training step of the standard shape, tower forward and
//! backward, and exact retrieval over 117,659 items.
//!
//! `cargo bench -p negcache-host --bench negcache` (add
//! `RUSTFLAGS="-C target-cpu=native"` to use the machine's AVX2/AVX-512).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use negcache::kernel::{Bf16Rows, Draw, F32Rows, I8Rows};
use negcache::tower::{Side, TokenModel};
use negcache::{CacheLoss, NegativeCache};
use negcache_host::bench::{self, B, EVAL_ITEMS, N, TOP_K};
use negcache_host::featurize::{ItemTokens, QueryTokens};
use negcache_host::session::DIM;
use rand_core::SeedableRng;
use rand_pcg::Pcg64Mcg;

fn pass(c: &mut Criterion) {
    let d = bench::pass_data(1).unwrap();
    let mut loss = negcache_host::memory::boxed(CacheLoss::<B, 1>::new).unwrap();
    let mut rng = Pcg64Mcg::seed_from_u64(2);
    let mut g = c.benchmark_group("pass");
    g.throughput(Throughput::Elements((B * N) as u64)).sample_size(20).measurement_time(Duration::from_secs(3));
    g.bench_function("exp_jump_masked", |b| b.iter(|| black_box(bench::run_pass(&d, &mut loss, 0, true, &mut rng))));
    g.bench_function("top_k_64_masked", |b| {
        b.iter(|| black_box(bench::run_pass(&d, &mut loss, TOP_K, true, &mut rng)))
    });
    g.bench_function("exp_jump_unmasked", |b| b.iter(|| black_box(bench::run_pass(&d, &mut loss, 0, false, &mut rng))));
    let mut draws = vec![Draw::EMPTY; B];
    let rows = F32Rows(NegativeCache::as_ref(&*d.cache).embeddings().as_f32().expect("an f32 cache"));
    g.bench_function("shards_2_threads", |b| {
        b.iter(|| bench::sharded_pass(&d, &rows, 2, &mut rng, &mut draws).unwrap())
    });
    let q = bench::quantize(&d);
    let i8r = I8Rows { rows: &q.i8_rows, scales: &q.scales };
    g.bench_function("int8_rows", |b| b.iter(|| bench::sharded_pass(&d, &i8r, 1, &mut rng, &mut draws).unwrap()));
    let bfr = Bf16Rows(&q.bf16_rows);
    g.bench_function("bf16_rows", |b| b.iter(|| bench::sharded_pass(&d, &bfr, 1, &mut rng, &mut draws).unwrap()));
    g.sample_size(10);
    g.bench_function("before_per_slot", |b| b.iter(|| bench::legacy_pass(&d, 0, true, &mut rng, &mut draws)));
    g.finish();
}

fn step(c: &mut Criterion) {
    let mut sd = bench::step_data(3).unwrap();
    let mut g = c.benchmark_group("step");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    g.bench_function("standard_cache_65536", |b| b.iter(|| black_box(bench::run_step(&mut sd).unwrap())));
    g.finish();
}

fn towers(c: &mut Criterion) {
    let mut m = bench::towers(4).unwrap();
    let q: QueryTokens = bench::query_tokens(7, 1);
    let it: ItemTokens = bench::item_tokens(7);
    let mut e = [0.0f32; DIM];
    let grad = [0.01f32; DIM];
    let mut g = c.benchmark_group("tower");
    g.bench_function("forward_query", |b| b.iter(|| m.embed(Side::Query, black_box(&q), &mut e)));
    g.bench_function("forward_item", |b| b.iter(|| m.embed(Side::Item, black_box(&it), &mut e)));
    g.bench_function("backward_query", |b| b.iter(|| m.backward(Side::Query, black_box(&q), &grad)));
    g.bench_function("backward_item", |b| b.iter(|| m.backward(Side::Item, black_box(&it), &grad)));
    g.finish();
}

fn eval(c: &mut Criterion) {
    let sd = bench::step_data(3).unwrap();
    let mut r = Pcg64Mcg::seed_from_u64(5);
    let items: Vec<[f32; DIM]> = (0..EVAL_ITEMS).map(|_| bench::unit(&mut r)).collect();
    let ids: Vec<u32> = (0..16).collect();
    let tokens: Vec<QueryTokens> = (0..16).map(|i| bench::query_tokens(i, 2)).collect();
    let ev = bench::eval_evaluator(EVAL_ITEMS, 16).unwrap();
    let mut g = c.benchmark_group("eval");
    g.throughput(Throughput::Elements(16)).sample_size(10);
    g.bench_function("rank_16_queries_117659_items", |b| {
        b.iter(|| black_box(bench::run_eval(sd.session.as_ref(), &ev, &items, &ids, &tokens)))
    });
    g.finish();
}

criterion_group!(benches, pass, step, towers, eval);
criterion_main!(benches);
