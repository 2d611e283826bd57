//! A planted retrieval problem whose true towers are known.
//!
//! There are `ITEMS` items in `CATS` categories. Item i is the token list
//! `[own_i, cat_c(i)]`; a query for item i is `[alias_i, cat_c(i), noise]`
//! with a noise token drawn from `NOISE` shared ones. A perfect pair of
//! towers exists and is simple: the query tower maps `alias_i` to the item
//! tower's image of `own_i` and ignores noise; with it every query ranks its
//! item first. Positives are drawn with Zipf weights `1 / (i + 1)^0.8`, so
//! the data has a heavy head as real retrieval data does.
//!
//! Token ids are raw integers in disjoint ranges modulo 4096 buckets
//! (own 576.., categories 1152.., aliases 1728.., noise 2304..), so a tower
//! with at least 4096 buckets sees no collisions.

use negcache::random;
use negcache::tower::{Side, TokenModel};
use negcache::vector::dot;
use rand_core::RngCore;

/// Number of items.
pub const ITEMS: usize = 256;
/// Number of categories.
pub const CATS: u32 = 16;
/// Number of shared noise tokens.
pub const NOISE: u32 = 64;

/// An item: its own token and its category token.
pub type ItemTokens = [u32; 2];
/// A query: alias, category and noise tokens.
pub type QueryTokens = [u32; 3];

/// Item i's tokens.
pub fn item(i: usize) -> ItemTokens {
    [1_000_000 + i as u32, 2_000_000 + i as u32 % CATS]
}

/// A query for item i with noise token `noise`.
pub fn query(i: usize, noise: u32) -> QueryTokens {
    [3_000_000 + i as u32, 2_000_000 + i as u32 % CATS, 4_000_000 + noise % NOISE]
}

/// Every item, in order.
pub fn corpus() -> Vec<ItemTokens> {
    (0..ITEMS).map(item).collect()
}

/// Draws a positive item by its Zipf weight.
pub fn draw_item(rng: &mut impl RngCore) -> usize {
    let total: f64 = (0..ITEMS).map(weight).sum();
    let mut u = random::open01(rng) as f64 * total;
    for i in 0..ITEMS {
        u -= weight(i);
        if u <= 0.0 {
            return i;
        }
    }
    ITEMS - 1
}

fn weight(i: usize) -> f64 {
    1.0 / ((i + 1) as f64).powf(0.8)
}

/// A batch of `n` (query, item, item index) triples.
pub fn batch(n: usize, rng: &mut impl RngCore) -> (Vec<QueryTokens>, Vec<ItemTokens>, Vec<u32>) {
    let mut qs = Vec::with_capacity(n);
    let mut ys = Vec::with_capacity(n);
    let mut idx = Vec::with_capacity(n);
    for _ in 0..n {
        let i = draw_item(rng);
        qs.push(query(i, rng.next_u32()));
        ys.push(item(i));
        idx.push(i as u32);
    }
    (qs, ys, idx)
}

/// Recall@1 and Recall@10 over one query per item (noise token 0, never
/// more likely than others in training), by exact retrieval over every item.
pub fn recall<const DIM: usize>(model: &impl TokenModel<DIM>) -> (f64, f64) {
    let mut items = [[0.0f32; DIM]; ITEMS];
    for (i, e) in items.iter_mut().enumerate() {
        model.embed(Side::Item, &item(i), e);
    }
    let (mut at1, mut at10) = (0usize, 0usize);
    for i in 0..ITEMS {
        let mut q = [0.0f32; DIM];
        model.embed(Side::Query, &query(i, 0), &mut q);
        let own = dot(&q, &items[i]);
        // Rank = number of items scoring strictly higher.
        let rank = items.iter().filter(|e| dot(&q, e) > own).count();
        at1 += usize::from(rank == 0);
        at10 += usize::from(rank < 10);
    }
    (at1 as f64 / ITEMS as f64, at10 as f64 / ITEMS as f64)
}
