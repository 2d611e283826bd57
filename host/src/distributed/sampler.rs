//! The cross-shard draw (steps 3 to 6 of the module docs): every shard
//! scores every query of the step with the core's streaming pass, and each
//! query's own process merges the shards' log-sum-exps and winners into
//! one exact draw from the softmax over every slot of every shard.

use anyhow::ensure;
use negcache::cache::CacheRef;
use negcache::random;
use negcache::sampler::LogSumExp;
use negcache::{CacheLoss, Item, LossConfig, Retrieval};
use rand_core::RngCore;

use super::comm::Comm;
use crate::featurize::{ItemTokens, ITEM_TOKENS};
use crate::session::{BATCH, DIM, NEG};

/// A slot that holds no winner in a reply.
const NO_SLOT: u32 = u32::MAX;

/// Picks the shard a query's negative comes from: shard `s` with
/// probability `Z_s / sum_t Z_t`, by Gumbel-max over `ln Z_s`. Shards
/// without a candidate (`sum == 0`) are never picked; `None` when no shard
/// has one. With a single candidate shard no random number is drawn.
///
/// Taking the picked shard's own exact winner then draws slot `j` of
/// shard `s` with probability `Z_s / Z * exp(c_j) / Z_s = exp(c_j) / Z`:
/// the softmax over every slot of every shard, as one cache would.
pub fn choose_shard(lse: &[LogSumExp], rng: &mut impl RngCore) -> Option<usize> {
    let live = lse.iter().filter(|z| z.sum > 0.0).count();
    match live {
        0 => None,
        1 => lse.iter().position(|z| z.sum > 0.0),
        _ => {
            let mut best: Option<(f32, usize)> = None;
            for (s, z) in lse.iter().enumerate().filter(|(_, z)| z.sum > 0.0) {
                let key = z.minus(0.0) + random::gumbel(rng);
                if best.is_none_or(|(k, _)| key > k) {
                    best = Some((key, s));
                }
            }
            best.map(|(_, s)| s)
        }
    }
}

/// One query's negative from the sharded cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    /// The log-sum-exp over the candidates of every shard (the positive
    /// not included).
    pub lse: LogSumExp,
    /// The shard and slot drawn; `None` when no shard had a candidate.
    pub pick: Option<(usize, u32)>,
    /// The drawn item (`ItemTokens::EMPTY` without a pick).
    pub item: ItemTokens,
    /// With the control variate: the drawn slot's cached embedding (zero
    /// without a pick or without the variate).
    pub stale: [f32; DIM],
    /// With the control variate: the softmax mean of the stale cached
    /// embeddings over every shard's candidates, merged exactly from the
    /// shards' means (zero without candidates or without the variate).
    pub mean: [f32; DIM],
}

/// Merges the shards' candidate means into the whole cache's: shard `s`'s
/// mean weighs `Z_s / Z`. With one shard holding every candidate its mean
/// is taken as it is, so that one process computes the bits of one cache.
pub fn merge_means(lse: &[LogSumExp], means: &[[f32; DIM]]) -> [f32; DIM] {
    let live: Vec<usize> = (0..lse.len()).filter(|&s| lse[s].sum > 0.0).collect();
    match live.as_slice() {
        [] => [0.0; DIM],
        [s] => means[*s],
        _ => {
            let mut total = LogSumExp::EMPTY;
            lse.iter().for_each(|z| total.merge(z));
            let mut out = [0.0; DIM];
            for &s in &live {
                negcache::vector::axpy(lse[s].sum * total.weight(lse[s].max), &means[s], &mut out);
            }
            out
        }
    }
}

/// The sharded draw (steps 3 to 6 of the module docs): every process
/// scores every query of the step against its shard, and each query's own
/// process merges the shards' answers into one exact draw.
pub struct ShardedSampler {
    loss: Box<CacheLoss<BATCH, NEG>>,
    queries: Vec<[f32; DIM]>,
    means: Vec<[f32; DIM]>,
    shard_means: Vec<[f32; DIM]>,
    items: Vec<ItemTokens>,
    send: Vec<u32>,
    recv: Vec<u32>,
    lse: Vec<LogSumExp>,
}

impl std::fmt::Debug for ShardedSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedSampler").field("queries", &self.queries.len()).finish_non_exhaustive()
    }
}

/// Words per query in the all-gather: the embedding, then the positive.
const QUERY_WORDS: usize = DIM + ITEM_TOKENS;
/// Words per (query, shard) reply: lse max, lse sum, slot, the item; with
/// the control variate, then the winner's cached embedding and the shard's
/// candidate mean.
fn reply_words(control: bool) -> usize {
    3 + ITEM_TOKENS + if control { 2 * DIM } else { 0 }
}

impl Default for ShardedSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl ShardedSampler {
    /// Empty buffers.
    pub fn new() -> Self {
        Self {
            loss: Box::new(CacheLoss::new()),
            queries: Vec::new(),
            means: Vec::new(),
            shard_means: Vec::new(),
            items: Vec::new(),
            send: Vec::new(),
            recv: Vec::new(),
            lse: Vec::new(),
        }
    }

    /// The positives' items of the last draw, for every process's queries
    /// in rank order (global query `g` is query `g mod B/P` of process
    /// `g / (B/P)`).
    pub fn positives(&self) -> &[ItemTokens] {
        &self.items
    }

    /// Draws one negative per local query from the union of every
    /// process's shard. Collective: every process calls it with the same
    /// number of queries. `positives` are the local queries' positive items
    /// (masked in every shard when `mask_accidental_hits`), `alpha` the
    /// score scale; `retrieval` must be `ExpJump` or `Gumbel` with inverse
    /// temperature 1. `rng` is this process's: it draws this shard's
    /// winners and the shard choice for this process's queries. With
    /// `control`, each draw also carries its slot's cached embedding and
    /// the whole cache's candidate mean (the control variate's inputs).
    #[allow(clippy::too_many_arguments)]
    pub fn draw(
        &mut self,
        comm: &mut Comm,
        shard: CacheRef<'_, ItemTokens, DIM>,
        queries: &[[f32; DIM]],
        positives: &[ItemTokens],
        alpha: f32,
        mask_accidental_hits: bool,
        retrieval: Retrieval<'_>,
        control: bool,
        rng: &mut impl RngCore,
        out: &mut Vec<Draw>,
    ) -> anyhow::Result<()> {
        ensure!(
            matches!(retrieval, Retrieval::ExpJump { inv_temp } | Retrieval::Gumbel { inv_temp } if inv_temp == 1.0),
            "the sharded cache draws exactly only with exp-jump or gumbel at inverse temperature 1"
        );
        ensure!(queries.len() == positives.len(), "{} queries but {} positives", queries.len(), positives.len());
        let (p, bl) = (comm.size(), queries.len());
        ensure!(p * bl <= BATCH, "a global batch of {} exceeds {BATCH}", p * bl);

        // Every shard needs every query, and the positives for the mask.
        self.send.clear();
        for (q, y) in queries.iter().zip(positives) {
            self.send.extend(q.iter().map(|x| x.to_bits()));
            self.send.extend_from_slice(y);
        }
        self.recv.clear();
        self.recv.resize(p * bl * QUERY_WORDS, 0);
        comm.all_gather("queries", &self.send, &mut self.recv);
        self.queries.clear();
        self.items.clear();
        for w in self.recv.chunks_exact(QUERY_WORDS) {
            self.queries.push(std::array::from_fn(|i| f32::from_bits(w[i])));
            self.items.push(std::array::from_fn(|i| w[DIM + i]));
        }

        // This shard's log-sum-exp and exact winner for every query. The
        // positives' embeddings only enter the core's prob_pos, which needs
        // the global log-sum-exp and is recomputed by the query's process,
        // so the queries stand in for them here.
        let cfg = LossConfig { score_scale: alpha, top_k: 0, mask_accidental_hits };
        self.means.clear();
        self.means.resize(p * bl, [0.0; DIM]);
        self.loss.score_and_sample_with(
            shard,
            &self.queries,
            &self.queries,
            Some(&self.items),
            &cfg,
            retrieval,
            rng,
            None,
            control.then_some(&mut self.means[..]),
            &negcache::Serial,
        )?;
        self.send.clear();
        for g in 0..p * bl {
            let z = self.loss.candidate_lse(g);
            let (slot, item, stale) = match self.loss.negatives(g).first() {
                Some(&s) if control => (s, shard.items()[s as usize], shard.embeddings().row(s as usize)),
                Some(&s) => (s, shard.items()[s as usize], [0.0; DIM]),
                None => (NO_SLOT, ItemTokens::EMPTY, [0.0; DIM]),
            };
            self.send.extend([z.max.to_bits(), z.sum.to_bits(), slot]);
            self.send.extend_from_slice(&item);
            if control {
                self.send.extend(stale.iter().chain(&self.means[g]).map(|x| x.to_bits()));
            }
        }
        self.recv.clear();
        self.recv.resize(self.send.len(), 0);
        comm.all_to_all("replies", &self.send, &mut self.recv);

        // Block s of the replies is shard s's answer for the local queries.
        out.clear();
        let words = reply_words(control);
        let reply = |s: usize, i: usize| &self.recv[(s * bl + i) * words..(s * bl + i + 1) * words];
        // The control variate's rows (replies carry them only with it).
        let floats = |r: &[u32], at: usize| -> [f32; DIM] { std::array::from_fn(|k| f32::from_bits(r[at + k])) };
        let (stale_at, mean_at) = (3 + ITEM_TOKENS, 3 + ITEM_TOKENS + DIM);
        for i in 0..bl {
            self.lse.clear();
            self.shard_means.clear();
            let mut total = LogSumExp::EMPTY;
            for s in 0..p {
                let r = reply(s, i);
                let z = LogSumExp { max: f32::from_bits(r[0]), sum: f32::from_bits(r[1]) };
                total.merge(&z);
                self.lse.push(z);
                if control {
                    self.shard_means.push(floats(r, mean_at));
                }
            }
            let mean = if control { merge_means(&self.lse, &self.shard_means) } else { [0.0; DIM] };
            let draw = match choose_shard(&self.lse, rng) {
                Some(s) => {
                    let r = reply(s, i);
                    ensure!(r[2] != NO_SLOT, "shard {s} reported candidates but no winner");
                    let item = std::array::from_fn(|k| r[3 + k]);
                    let stale = if control { floats(r, stale_at) } else { [0.0; DIM] };
                    Draw { lse: total, pick: Some((s, r[2])), item, stale, mean }
                }
                None => Draw { lse: total, pick: None, item: ItemTokens::EMPTY, stale: [0.0; DIM], mean },
            };
            out.push(draw);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use negcache::stats::chi_square;
    use rand_core::SeedableRng;
    use rand_pcg::Pcg64Mcg;

    #[test]
    fn the_shard_is_chosen_in_proportion_to_its_sum() {
        // Z = (e^1 * 2, 0 (no candidate), e^0 * 3, e^2 * 0.5).
        let lse = [
            LogSumExp { max: 1.0, sum: 2.0 },
            LogSumExp::EMPTY,
            LogSumExp { max: 0.0, sum: 3.0 },
            LogSumExp { max: 2.0, sum: 0.5 },
        ];
        let z: Vec<f64> =
            lse.iter().map(|l| if l.sum > 0.0 { (l.max as f64).exp() * l.sum as f64 } else { 0.0 }).collect();
        let total: f64 = z.iter().sum();
        let want: Vec<f64> = z.iter().map(|x| x / total).collect();
        let mut rng = Pcg64Mcg::seed_from_u64(5);
        let mut counts = [0u64; 4];
        for _ in 0..100_000 {
            counts[choose_shard(&lse, &mut rng).expect("a shard has candidates")] += 1;
        }
        assert_eq!(counts[1], 0);
        let t = chi_square(&counts, &want).expect("enough cells");
        assert!(t.p_value > 0.001, "{t:?} {counts:?}");
    }

    #[test]
    fn no_candidate_anywhere_is_no_draw_and_one_shard_draws_nothing() {
        let mut rng = Pcg64Mcg::seed_from_u64(1);
        assert_eq!(choose_shard(&[LogSumExp::EMPTY, LogSumExp::EMPTY], &mut rng), None);
        let before = rng.clone().next_u64();
        let one = [LogSumExp::EMPTY, LogSumExp { max: 0.5, sum: 1.0 }];
        assert_eq!(choose_shard(&one, &mut rng), Some(1));
        assert_eq!(rng.next_u64(), before, "a single candidate shard must not consume randomness");
    }
}
