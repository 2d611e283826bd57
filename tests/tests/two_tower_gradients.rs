//! Finite-difference checks of whole two-tower losses: the cache loss and
//! in-batch softmax computed on embeddings from real towers, gradients
//! back-propagated through both towers, compared per parameter with
//! central differences of the same loss (the cache loss holds prob_pos at
//! its value at the base point, as its definition says).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use negcache::layers::ParamVisitor;
use negcache::loss::{CacheLoss, LossConfig, LossGrads};
use negcache::softmax::{self, LogSumExp, SoftmaxOut};
use negcache::tower::{Model, SharedTokenTowers, Side, TokenModel, TowerConfig};
use negcache::vector::dot;
use negcache::{NegativeCache, Retrieval};
use rand_core::SeedableRng;

const D: usize = 4;
type Towers = SharedTokenTowers<16, 3, 5, D, 0>;

/// Towers with tanh: central differences of a ReLU network straddle its
/// kink wherever a hidden unit sits within h of zero (seen here at a
/// first-layer bias), which says nothing about the code; ReLU's derivative
/// is checked on its own in `core/src/layers/activation.rs` and `mlp.rs`.
fn towers() -> Towers {
    let mut m = Towers::new(TowerConfig {
        scale: negcache::tower::Scale::Fixed(2.0),
        activation: negcache::layers::Activation::Tanh,
        ..TowerConfig::DEFAULT
    });
    m.init(&mut rand_pcg::Pcg64Mcg::seed_from_u64(4));
    m
}

const QUERIES: [[u32; 2]; 3] = [[1, 2], [3, 4], [2, 5]];
const POSITIVES: [[u32; 2]; 3] = [[6, 7], [8, 9], [7, 10]];
const CACHED: [[u32; 2]; 4] = [[11, 12], [6, 13], [14, 15], [8, 3]];

fn embed<const N: usize>(m: &Towers, side: Side, x: &[[u32; 2]; N]) -> [[f32; D]; N] {
    let mut out = [[0.0; D]; N];
    for (o, t) in out.iter_mut().zip(x) {
        m.embed(side, t, o);
    }
    out
}

/// Every parameter, flattened, with its gradient.
fn params(m: &mut Towers) -> Vec<(f32, f32)> {
    struct C(Vec<(f32, f32)>);
    impl ParamVisitor for C {
        fn dense(&mut self, v: &mut [f32], g: &mut [f32], _: &mut [&mut [f32]]) {
            self.0.extend(v.iter().copied().zip(g.iter().copied()));
        }
        fn sparse(&mut self, _: usize, v: &mut [f32], g: &mut [f32], _: &mut [&mut [f32]], _: &[bool]) {
            self.0.extend(v.iter().copied().zip(g.iter().copied()));
        }
    }
    let mut c = C(Vec::new());
    m.visit(&mut c);
    c.0
}

/// Adds `delta` to parameter `k`.
fn bump(m: &mut Towers, k: usize, delta: f32) {
    struct B(usize, f32);
    impl B {
        fn go(&mut self, v: &mut [f32]) {
            if self.0 < v.len() {
                v[self.0] += self.1;
            }
            self.0 = self.0.wrapping_sub(v.len());
        }
    }
    impl ParamVisitor for B {
        fn dense(&mut self, v: &mut [f32], _: &mut [f32], _: &mut [&mut [f32]]) {
            self.go(v)
        }
        fn sparse(&mut self, _: usize, v: &mut [f32], _: &mut [f32], _: &mut [&mut [f32]], _: &[bool]) {
            self.go(v)
        }
    }
    m.visit(&mut B(k, delta));
}

fn check(m: &mut Towers, loss: impl Fn(&Towers) -> f64) {
    let analytic = params(m);
    let h = 5e-3f32;
    let mut checked = 0;
    for (k, &(_, g)) in analytic.iter().enumerate() {
        bump(m, k, h);
        let up = loss(m);
        bump(m, k, -2.0 * h);
        let down = loss(m);
        bump(m, k, h);
        let fd = (up - down) / (2.0 * h as f64);
        let tol = 2e-3 + 2e-2 * fd.abs();
        assert!((g as f64 - fd).abs() <= tol, "parameter {k}: analytic {g}, finite difference {fd}");
        checked += usize::from(g != 0.0);
    }
    assert!(checked > 50, "only {checked} parameters had a gradient");
}

#[test]
fn cache_loss_through_both_towers() {
    let mut m = towers();
    let alpha = m.score_scale();
    // A cache of stale embeddings (from other parameters).
    let mut stale_towers = towers();
    stale_towers.init(&mut rand_pcg::Pcg64Mcg::seed_from_u64(9));
    let mut cache = NegativeCache::<[u32; 2], 4, D>::new();
    for (j, it) in CACHED.iter().enumerate() {
        let mut e = [0.0; D];
        stale_towers.embed(Side::Item, it, &mut e);
        cache.as_mut().set_slot(j, &e, *it, 0, true).unwrap();
    }
    let chosen = [2usize, 0, 3];
    let cfg = LossConfig { score_scale: alpha, top_k: 0, mask_accidental_hits: false };
    let (q, p) = (embed(&m, Side::Query, &QUERIES), embed(&m, Side::Item, &POSITIVES));
    let mut lo = CacheLoss::<3, 1>::new();
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(0);
    lo.score_and_sample(cache.as_ref(), &q, &p, None, &cfg, Retrieval::Fixed(&chosen), &mut rng, None).unwrap();
    let negs: [[u32; 2]; 3] = core::array::from_fn(|b| CACHED[chosen[b]]);
    let f = embed(&m, Side::Item, &negs);
    let (mut gq, mut gp, mut gf) = ([[0.0; D]; 3], [[0.0; D]; 3], [[0.0; D]; 3]);
    lo.backward(cache.as_ref(), &q, &p, &f, Some(LossGrads { query: &mut gq, positive: &mut gp, negative: &mut gf }))
        .unwrap();
    m.zero_grad();
    for b in 0..3 {
        m.backward(Side::Query, &QUERIES[b], &gq[b]);
        m.backward(Side::Item, &POSITIVES[b], &gp[b]);
        m.backward(Side::Item, &negs[b], &gf[b]);
    }
    let w: Vec<f64> = lo.prob_pos().iter().map(|&p| 1.0 - p as f64).collect();
    check(&mut m, |m| {
        let (q, p, f) =
            (embed(m, Side::Query, &QUERIES), embed(m, Side::Item, &POSITIVES), embed(m, Side::Item, &negs));
        (0..3).map(|b| w[b] * alpha as f64 * (dot(&q[b], &f[b]) - dot(&q[b], &p[b])) as f64).sum::<f64>() / 3.0
    });
}

#[test]
fn in_batch_softmax_through_both_towers() {
    let mut m = towers();
    let alpha = m.score_scale();
    let (q, p) = (embed(&m, Side::Query, &QUERIES), embed(&m, Side::Item, &POSITIVES));
    let (mut gq, mut gp) = ([[0.0; D]; 3], [[0.0; D]; 3]);
    let mut scratch = [LogSumExp::EMPTY; 3];
    let out = SoftmaxOut { grad_query: Some(&mut gq), grad_positive: Some(&mut gp), ..SoftmaxOut::new(&mut scratch) };
    softmax::in_batch::<u32, D>(&q, &p, None, None, alpha, out).unwrap();
    m.zero_grad();
    for b in 0..3 {
        m.backward(Side::Query, &QUERIES[b], &gq[b]);
        m.backward(Side::Item, &POSITIVES[b], &gp[b]);
    }
    check(&mut m, |m| {
        let (q, p) = (embed(m, Side::Query, &QUERIES), embed(m, Side::Item, &POSITIVES));
        let mut s = [LogSumExp::EMPTY; 3];
        softmax::in_batch::<u32, D>(&q, &p, None, None, alpha, SoftmaxOut::new(&mut s)).unwrap().loss as f64
    });
}
