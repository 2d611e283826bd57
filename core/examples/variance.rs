//! The query gradient's variance under each way of drawing m negatives,
//! against one draw, through the public API: a report for
//! docs/results/variance.md.
//!
//! A cache of 1,024 random unit rows (D = 16) and one query, at scale 10.
//! Two cases: a flat softmax (no row near the query), and a dominated one
//! (one cached row is the query itself, as a near-synonym is for a
//! WordNet query). Each estimator runs 40,000 passes; the report gives the
//! variance of its query gradient (summed over the dimensions), its ratio
//! to one draw's, and how far its mean is from the exact softmax gradient
//! in standard errors (all estimators here are unbiased, so that column
//! should stay within a few). It fails unless every mean is within 6
//! standard errors of the exact gradient and m independent draws have
//! 1/m of one draw's variance (within 0.1).
//!
//! `cargo run --release -p negcache --example variance > docs/results/variance.md`

use negcache::{random, CacheLoss, LossConfig, LossGrads, NegativeCache, Retrieval};
use rand_core::SeedableRng;

const D: usize = 16;
const N: usize = 1024;
const ALPHA: f32 = 10.0;
const PASSES: usize = 40_000;

fn unit(r: &mut rand_pcg::Pcg64Mcg) -> [f32; D] {
    let mut v = [0.0f32; D];
    v.iter_mut().for_each(|x| *x = random::normal(r));
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.map(|x| x / n)
}

/// Mean and variance per dimension of the query gradient over `PASSES`
/// passes with `M` negatives drawn by `ret`.
fn moments<const M: usize>(
    cache: &NegativeCache<u32, N, D>,
    q: &[f32; D],
    p: &[f32; D],
    ret: Retrieval<'_>,
) -> [[f64; D]; 2] {
    let emb = cache.as_ref().embeddings().as_f32().expect("an f32 cache");
    let cfg = LossConfig { score_scale: ALPHA, mask_accidental_hits: false, ..LossConfig::DEFAULT };
    let mut r = rand_pcg::Pcg64Mcg::seed_from_u64(7);
    let mut loss = CacheLoss::<1, M>::new();
    let (mut s1, mut s2) = ([0f64; D], [0f64; D]);
    for _ in 0..PASSES {
        loss.score_and_sample(cache.as_ref(), &[*q], &[*p], None, &cfg, ret, &mut r, None).expect("pass");
        let mut fresh = [[0.0f32; D]; M];
        for (i, &slot) in loss.negatives(0).iter().enumerate() {
            fresh[i] = emb[slot as usize];
        }
        let (mut gq, mut gp, mut gf) = ([[0.0; D]; 1], [[0.0; D]; 1], [[0.0; D]; M]);
        let grads = LossGrads { query: &mut gq, positive: &mut gp, negative: &mut gf };
        loss.backward(cache.as_ref(), &[*q], &[*p], &fresh, Some(grads)).expect("backward");
        for d in 0..D {
            let g = f64::from(gq[0][d]);
            s1[d] += g;
            s2[d] += g * g;
        }
    }
    let n = PASSES as f64;
    let mean = s1.map(|s| s / n);
    let var = core::array::from_fn(|d| s2[d] / n - mean[d] * mean[d]);
    [mean, var]
}

/// The exact softmax gradient of the query (f64): `alpha (1 - p_pos)
/// (sum_j P_j e_j - p)`.
fn exact(cache: &NegativeCache<u32, N, D>, q: &[f32; D], p: &[f32; D]) -> [f64; D] {
    let emb = cache.as_ref().embeddings().as_f32().expect("an f32 cache");
    let dot = |a: &[f32; D], b: &[f32; D]| (0..D).map(|d| f64::from(a[d]) * f64::from(b[d])).sum::<f64>();
    let c: Vec<f64> = emb.iter().map(|e| f64::from(ALPHA) * dot(q, e)).collect();
    let s = f64::from(ALPHA) * dot(q, p);
    let mx = c.iter().fold(s, |a, &x| a.max(x));
    let z_cache: f64 = c.iter().map(|&x| (x - mx).exp()).sum();
    let neg = z_cache / (z_cache + (s - mx).exp());
    core::array::from_fn(|d| {
        let mean: f64 = c.iter().zip(emb).map(|(&x, e)| (x - mx).exp() / z_cache * f64::from(e[d])).sum();
        f64::from(ALPHA) * neg * (mean - f64::from(p[d]))
    })
}

fn main() -> Result<(), String> {
    let mut r = rand_pcg::Pcg64Mcg::seed_from_u64(3);
    let mut cache: NegativeCache<u32, N, D> = NegativeCache::new();
    let rows: Vec<[f32; D]> = (0..N).map(|_| unit(&mut r)).collect();
    let (q, p) = (unit(&mut r), unit(&mut r));
    println!("# The query gradient's variance per way of drawing negatives\n");
    println!("`cargo run --release -p negcache --example variance > docs/results/variance.md`: a cache of {N} random");
    println!("unit rows (D = {D}), one query, scale {ALPHA}, {PASSES} passes per estimator; the plain cache");
    println!("loss (no control variate). \"variance\" is the query gradient's, summed over the dimensions;");
    println!("\"mean off\" is the largest distance, over the dimensions, of its mean from the exact softmax");
    println!("gradient, in standard errors.\n");
    for (case, dominated) in
        [("flat: no cached row near the query", false), ("dominated: one cached row is the query itself", true)]
    {
        {
            let mut c = cache.as_mut();
            for (j, e) in rows.iter().enumerate() {
                let e = if dominated && j == 9 { &q } else { e };
                c.set_slot(j, e, j as u32, 0, true).expect("slot");
            }
        }
        let want = exact(&cache, &q, &p);
        println!("## {case}\n");
        println!("| negatives | drawn by | variance | against one draw | mean off (s.e.) |");
        println!("|---|---|---:|---:|---:|");
        let jump = Retrieval::ExpJump { inv_temp: 1.0 };
        let gumbel = Retrieval::Gumbel { inv_temp: 1.0 };
        let runs: [(usize, &str, [[f64; D]; 2]); 5] = [
            (1, "one draw (exponential jumps)", moments::<1>(&cache, &q, &p, jump)),
            (2, "independent draws", moments::<2>(&cache, &q, &p, jump)),
            (4, "independent draws", moments::<4>(&cache, &q, &p, jump)),
            (2, "Gumbel-top-2, Horvitz-Thompson", moments::<2>(&cache, &q, &p, gumbel)),
            (4, "Gumbel-top-4, Horvitz-Thompson", moments::<4>(&cache, &q, &p, gumbel)),
        ];
        let one: f64 = runs[0].2[1].iter().sum();
        for (m, how, [mean, var]) in runs {
            let total: f64 = var.iter().sum();
            let off = (0..D)
                .map(|d| (mean[d] - want[d]).abs() / (var[d] / PASSES as f64).sqrt().max(1e-12))
                .fold(0.0, f64::max);
            println!("| {m} | {how} | {total:.4} | {:.3} | {off:.1} |", total / one);
            if off > 6.0 {
                return Err(format!("{case}: {m} by {how}: mean {off:.1} standard errors off"));
            }
            if how.starts_with("independent") && (total / one - 1.0 / m as f64).abs() > 0.1 {
                return Err(format!("{case}: {m} independent draws: {:.3} of one draw's variance", total / one));
            }
        }
        println!();
    }
    Ok(())
}
