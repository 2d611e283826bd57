//! The cross-shard draw (steps 3 to 6 of the module docs): every shard
//! scores every query of the step with the core's streaming pass, and each
//! query's own process merges the shards' log-sum-exps and draws into
//! exact independent draws from the softmax over every slot of every
//! shard.

use anyhow::ensure;
use negcache::cache::CacheMut;
use negcache::random;
use negcache::sampler::LogSumExp;
use negcache::{CacheLoss, Item, LossConfig, Retrieval};
use rand_core::RngCore;

use super::comm::Comm;
use crate::featurize::{ItemTokens, ITEM_TOKENS};
use crate::session::{BATCH, DIM, NEG_MANY};

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

/// The most negatives a query draws (the largest of the sessions'
/// shapes).
pub const MAX_DRAWS: usize = NEG_MANY;

/// One drawn slot of the sharded cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    /// The shard and its slot.
    pub shard: usize,
    /// See `shard`.
    pub slot: u32,
    /// The slot's item.
    pub item: ItemTokens,
    /// The draw's weight in the estimate of the cache softmax mean: `c / K`
    /// for a slot drawn `c` times in `K` independent draws (1 for one
    /// draw), as the core weighs one cache's draws.
    pub weight: f32,
    /// With the control variate or shared draws: the slot's cached
    /// embedding (zero otherwise).
    pub stale: [f32; DIM],
}

impl Pick {
    const EMPTY: Self = Self { shard: 0, slot: 0, item: ItemTokens::EMPTY, weight: 0.0, stale: [0.0; DIM] };
}

/// One query's negatives from the sharded cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    /// The log-sum-exp over the candidates of every shard (the positive
    /// not included).
    pub lse: LogSumExp,
    picks: [Pick; MAX_DRAWS],
    len: usize,
    /// With the control variate: the softmax mean of the stale cached
    /// embeddings over every shard's candidates, merged exactly from the
    /// shards' means (zero without candidates or without the variate).
    pub mean: [f32; DIM],
}

impl Draw {
    /// The distinct slots drawn (none when no shard had a candidate), in
    /// the order of their shards, each shard's in its core's order.
    pub fn picks(&self) -> &[Pick] {
        &self.picks[..self.len]
    }
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

/// One draw of [`merge_draws`]'s result: `count` of the draws are shard
/// `shard`'s pick `pick`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// The shard.
    pub shard: usize,
    /// The index of the pick in the shard's reply.
    pub pick: usize,
    /// How many of the `K` draws it is.
    pub count: u32,
}

/// Merges `K` independent draws from each shard's softmax into `K`
/// independent draws from the softmax over every shard's candidates.
/// `counts[s * K + i]` is how many of shard `s`'s `K` draws were its pick
/// `i` (`K` entries per shard, summing to `K` for a shard with
/// candidates).
///
/// Draw `k` comes from shard `s` with probability `Z_s / Z`
/// ([`choose_shard`], once per draw), so shard `s` supplies `n_s` of the
/// `K` draws; those are `n_s` of its own draws chosen uniformly without
/// replacement. A subset chosen without looking at the values of
/// independent, identically distributed draws is itself such draws, so
/// each merged draw is slot `j` of shard `s` with probability
/// `Z_s / Z * exp(c_j) / Z_s`, independently of the others. With one shard
/// holding every candidate its draws are taken as they are and no random
/// number is drawn, so one process draws what one cache draws.
///
/// # Errors
/// `K` above [`MAX_DRAWS`], counts not `K` per shard, or a shard with
/// candidates whose counts do not sum to `K`.
pub fn merge_draws(
    lse: &[LogSumExp],
    counts: &[u32],
    k: usize,
    rng: &mut impl RngCore,
    out: &mut Vec<Taken>,
) -> anyhow::Result<()> {
    out.clear();
    ensure!(k <= MAX_DRAWS, "{k} draws per query, at most {MAX_DRAWS}");
    ensure!(counts.len() == lse.len() * k, "{} counts for {} shards of {k} draws", counts.len(), lse.len());
    let shard = |s: usize| &counts[s * k..(s + 1) * k];
    let mut live = (0..lse.len()).filter(|&s| lse[s].sum > 0.0);
    for s in live.clone() {
        let total: u32 = shard(s).iter().sum();
        ensure!(total as usize == k, "shard {s} reported candidates and {total} draws instead of {k}");
    }
    let take = |s: usize, taken: &[u32], out: &mut Vec<Taken>| {
        for (pick, &count) in taken.iter().enumerate().filter(|(_, &c)| c > 0) {
            out.push(Taken { shard: s, pick, count });
        }
    };
    if let (Some(s), None) = (live.next(), live.next()) {
        take(s, shard(s), out);
        return Ok(());
    }
    // The shard of each draw, then each shard's share of its own draws.
    let mut from = [usize::MAX; MAX_DRAWS];
    for f in &mut from[..k] {
        *f = choose_shard(lse, rng).unwrap_or(usize::MAX);
    }
    for s in 0..lse.len() {
        let n = from[..k].iter().filter(|&&f| f == s).count();
        if n == 0 {
            continue;
        }
        if n == k {
            take(s, shard(s), out);
            continue;
        }
        let (mut left, mut taken) = ([0u32; MAX_DRAWS], [0u32; MAX_DRAWS]);
        left[..k].copy_from_slice(shard(s));
        let mut remaining = k as u32;
        for _ in 0..n {
            let mut r = random::below(rng, remaining);
            let i = left
                .iter()
                .position(|&c| {
                    let here = r < c;
                    r = r.wrapping_sub(c);
                    here
                })
                .expect("the counts sum to the draws remaining");
            left[i] -= 1;
            taken[i] += 1;
            remaining -= 1;
        }
        take(s, &taken[..k], out);
    }
    Ok(())
}

/// Marks every slot of `slots` occupied or not, all of them even when one
/// fails; the first failure is the error.
fn set_occupied(shard: &mut CacheMut<'_, ItemTokens, DIM>, slots: &[usize], occupied: bool) -> anyhow::Result<()> {
    let mut first = Ok(());
    for &slot in slots {
        if let Err(e) = shard.set_occupied(slot, occupied) {
            first = first.and(Err(e));
        }
    }
    Ok(first?)
}

/// What a draw does besides drawing.
#[derive(Debug, Clone, Copy)]
pub struct DrawSpec<'a> {
    /// The score scale.
    pub alpha: f32,
    /// Remove each query's positive from its candidates.
    pub mask_accidental_hits: bool,
    /// `ExpJump` or `Gumbel` at inverse temperature 1; `ExpJump` (K
    /// independent reservoirs) when a query draws more than one negative.
    pub retrieval: Retrieval<'a>,
    /// Return the candidates' softmax mean of the cached rows (the control
    /// variate's input).
    pub control: bool,
    /// Return each draw's cached row (the control variate's and the shared
    /// draws' input).
    pub stale: bool,
    /// Gather every process's positive embeddings too, and hide every
    /// slot holding one of the global batch's positives from the draw (the
    /// exact in-batch objective, where they enter exactly).
    pub in_batch: bool,
}

/// The sharded draw (steps 3 to 6 of the module docs): every process
/// scores every query of the step against its shard, and each query's own
/// process merges the shards' answers into `K` exact independent draws.
pub struct ShardedSampler<const K: usize> {
    loss: Box<CacheLoss<BATCH, K>>,
    queries: Vec<[f32; DIM]>,
    positive_rows: Vec<[f32; DIM]>,
    means: Vec<[f32; DIM]>,
    shard_means: Vec<[f32; DIM]>,
    items: Vec<ItemTokens>,
    hidden: Vec<usize>,
    send: Vec<u32>,
    recv: Vec<u32>,
    lse: Vec<LogSumExp>,
    counts: Vec<u32>,
    taken: Vec<Taken>,
}

impl<const K: usize> std::fmt::Debug for ShardedSampler<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedSampler").field("queries", &self.queries.len()).finish_non_exhaustive()
    }
}

/// Words per query in the all-gather: the embedding, the positive, and
/// with exact in-batch terms the positive's embedding.
fn query_words(in_batch: bool) -> usize {
    DIM + ITEM_TOKENS + if in_batch { DIM } else { 0 }
}

/// Words per pick in a reply: slot, count, item, and with `stale` its
/// cached embedding.
fn pick_words(stale: bool) -> usize {
    2 + ITEM_TOKENS + if stale { DIM } else { 0 }
}

/// Words per (query, shard) reply: lse max, lse sum, `K` picks (unused
/// ones with slot [`NO_SLOT`]), and with the control variate the shard's
/// candidate mean.
fn reply_words(k: usize, stale: bool, control: bool) -> usize {
    2 + k * pick_words(stale) + if control { DIM } else { 0 }
}

impl<const K: usize> Default for ShardedSampler<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const K: usize> ShardedSampler<K> {
    /// Empty buffers.
    pub fn new() -> Self {
        const { assert!(K >= 1 && K <= MAX_DRAWS, "a query draws 1 to MAX_DRAWS negatives") };
        Self {
            loss: Box::new(CacheLoss::new()),
            queries: Vec::new(),
            positive_rows: Vec::new(),
            means: Vec::new(),
            shard_means: Vec::new(),
            items: Vec::new(),
            hidden: Vec::new(),
            send: Vec::new(),
            recv: Vec::new(),
            lse: Vec::new(),
            counts: Vec::new(),
            taken: Vec::new(),
        }
    }

    /// The positives' items of the last draw, for every process's queries
    /// in rank order (global query `g` is query `g mod B/P` of process
    /// `g / (B/P)`).
    pub fn positives(&self) -> &[ItemTokens] {
        &self.items
    }

    /// Every process's query embeddings of the last draw, in the order of
    /// [`Self::positives`].
    pub fn queries(&self) -> &[[f32; DIM]] {
        &self.queries
    }

    /// The positives' embeddings of the last draw with exact in-batch
    /// terms, in the order of [`Self::positives`] (empty otherwise).
    pub fn positive_rows(&self) -> &[[f32; DIM]] {
        &self.positive_rows
    }

    /// Draws `K` independent negatives per local query (merged into
    /// distinct picks) from the union of every process's shard.
    /// Collective: every process calls it with the same number of queries.
    /// `positives` are the local queries' positive items (masked in every
    /// shard when `mask_accidental_hits`) and `positive_rows` their
    /// embeddings (sent only with `spec.in_batch`). `rng` is this
    /// process's: it draws this shard's winners and the shard choices for
    /// this process's queries. With `spec.in_batch`, the slots holding the
    /// batch's positives are hidden from the pass and restored after it.
    #[allow(clippy::too_many_arguments)]
    pub fn draw(
        &mut self,
        comm: &mut Comm,
        mut shard: CacheMut<'_, ItemTokens, DIM>,
        queries: &[[f32; DIM]],
        positives: &[ItemTokens],
        positive_rows: &[[f32; DIM]],
        spec: DrawSpec<'_>,
        rng: &mut impl RngCore,
        out: &mut Vec<Draw>,
    ) -> anyhow::Result<()> {
        ensure!(
            match spec.retrieval {
                Retrieval::ExpJump { inv_temp } => inv_temp == 1.0,
                Retrieval::Gumbel { inv_temp } => inv_temp == 1.0 && K == 1,
                _ => false,
            },
            "the sharded cache draws exactly only at inverse temperature 1, with exp-jump (independent draws) or, for one negative, gumbel"
        );
        ensure!(queries.len() == positives.len(), "{} queries but {} positives", queries.len(), positives.len());
        ensure!(
            !spec.in_batch || positive_rows.len() == positives.len(),
            "{} positives but {} positive embeddings",
            positives.len(),
            positive_rows.len()
        );
        let (p, bl) = (comm.size(), queries.len());
        ensure!(p * bl <= BATCH, "a global batch of {} exceeds {BATCH}", p * bl);

        // Every shard needs every query, and the positives for the mask.
        self.send.clear();
        for (b, (q, y)) in queries.iter().zip(positives).enumerate() {
            self.send.extend(q.iter().map(|x| x.to_bits()));
            self.send.extend_from_slice(y);
            if spec.in_batch {
                self.send.extend(positive_rows[b].iter().map(|x| x.to_bits()));
            }
        }
        let words = query_words(spec.in_batch);
        self.recv.clear();
        self.recv.resize(p * bl * words, 0);
        comm.all_gather("queries", &self.send, &mut self.recv);
        self.queries.clear();
        self.items.clear();
        self.positive_rows.clear();
        for w in self.recv.chunks_exact(words) {
            self.queries.push(std::array::from_fn(|i| f32::from_bits(w[i])));
            self.items.push(std::array::from_fn(|i| w[DIM + i]));
            if spec.in_batch {
                self.positive_rows.push(std::array::from_fn(|i| f32::from_bits(w[DIM + ITEM_TOKENS + i])));
            }
        }

        // With exact in-batch terms the batch's items are not cache
        // candidates: their slots are found first (a slot hidden earlier
        // would hide a later copy from the lookup), then hidden for the
        // pass, as the single-process trainer does.
        self.hidden.clear();
        if spec.in_batch {
            let view = shard.as_ref();
            self.hidden.extend(self.items.iter().filter_map(|y| view.position_of_key(y.key())));
            if let Err(e) = set_occupied(&mut shard, &self.hidden, false) {
                // Every slot was found occupied: marking them all occupied
                // again restores the shard.
                set_occupied(&mut shard, &self.hidden, true)?;
                return Err(e);
            }
        }
        // This shard's log-sum-exp and exact draws for every query. The
        // positives' embeddings only enter the core's prob_pos, which needs
        // the global log-sum-exp and is recomputed by the query's process,
        // so the queries stand in for them here.
        let cfg = LossConfig { score_scale: spec.alpha, top_k: 0, mask_accidental_hits: spec.mask_accidental_hits };
        self.means.clear();
        self.means.resize(p * bl, [0.0; DIM]);
        let scored = self.loss.score_and_sample_with(
            shard.as_ref(),
            &self.queries,
            &self.queries,
            Some(&self.items),
            &cfg,
            spec.retrieval,
            rng,
            None,
            spec.control.then_some(&mut self.means[..]),
            &negcache::Serial,
        );
        set_occupied(&mut shard, &self.hidden, true)?;
        scored?;
        let view = shard.as_ref();
        self.send.clear();
        for g in 0..p * bl {
            let z = self.loss.candidate_lse(g);
            self.send.extend([z.max.to_bits(), z.sum.to_bits()]);
            let (slots, weights) = (self.loss.negatives(g), self.loss.negative_weights(g));
            for i in 0..K {
                match slots.get(i).zip(weights.get(i)) {
                    Some((&slot, &w)) => {
                        // K independent draws at temperature 1 weigh c / K.
                        let count = (w * K as f32).round() as u32;
                        ensure!(
                            (1..=K as u32).contains(&count) && count as f32 / K as f32 == w,
                            "a draw of weight {w} is not one of {K} independent draws"
                        );
                        self.send.extend([slot, count]);
                        self.send.extend_from_slice(&view.items()[slot as usize]);
                        if spec.stale {
                            self.send.extend(view.embeddings().row(slot as usize).iter().map(|x| x.to_bits()));
                        }
                    }
                    None => {
                        self.send.extend([NO_SLOT, 0]);
                        self.send.extend_from_slice(&ItemTokens::EMPTY);
                        if spec.stale {
                            self.send.extend([0u32; DIM]);
                        }
                    }
                }
            }
            if spec.control {
                self.send.extend(self.means[g].iter().map(|x| x.to_bits()));
            }
        }
        self.recv.clear();
        self.recv.resize(self.send.len(), 0);
        comm.all_to_all("replies", &self.send, &mut self.recv);

        // Block s of the replies is shard s's answer for the local queries.
        out.clear();
        let (words, pw) = (reply_words(K, spec.stale, spec.control), pick_words(spec.stale));
        let reply = |s: usize, i: usize| &self.recv[(s * bl + i) * words..(s * bl + i + 1) * words];
        let pick_at = |s: usize, i: usize, k: usize| &reply(s, i)[2 + k * pw..2 + (k + 1) * pw];
        // The cached rows (replies carry them only when asked).
        let floats = |r: &[u32], at: usize| -> [f32; DIM] { std::array::from_fn(|k| f32::from_bits(r[at + k])) };
        for i in 0..bl {
            self.lse.clear();
            self.shard_means.clear();
            self.counts.clear();
            let mut total = LogSumExp::EMPTY;
            for s in 0..p {
                let r = reply(s, i);
                let z = LogSumExp { max: f32::from_bits(r[0]), sum: f32::from_bits(r[1]) };
                total.merge(&z);
                self.lse.push(z);
                self.counts.extend((0..K).map(|k| pick_at(s, i, k)[1]));
                if spec.control {
                    self.shard_means.push(floats(r, 2 + K * pw));
                }
            }
            let mean = if spec.control { merge_means(&self.lse, &self.shard_means) } else { [0.0; DIM] };
            merge_draws(&self.lse, &self.counts, K, rng, &mut self.taken)?;
            let mut draw = Draw { lse: total, picks: [Pick::EMPTY; MAX_DRAWS], len: 0, mean };
            for t in &self.taken {
                let r = pick_at(t.shard, i, t.pick);
                ensure!(r[0] != NO_SLOT, "shard {} reported a draw without a slot", t.shard);
                draw.picks[draw.len] = Pick {
                    shard: t.shard,
                    slot: r[0],
                    item: std::array::from_fn(|k| r[2 + k]),
                    weight: t.count as f32 / K as f32,
                    stale: if spec.stale { floats(r, 2 + ITEM_TOKENS) } else { [0.0; DIM] },
                };
                draw.len += 1;
            }
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

    /// Four independent draws from each of three shards' softmaxes (one
    /// without candidates), merged: every merged draw follows the softmax
    /// over all the shards' slots (chi-square over 40,000 rounds of four
    /// draws), and the draws of a round are independent: the number of
    /// distinct slots in a round has the law of four independent draws
    /// from that softmax.
    #[test]
    fn merged_draws_are_independent_draws_from_every_shards_softmax() {
        const K: u32 = 4;
        let scores: [&[f32]; 3] = [&[0.5, -1.0, 1.2], &[], &[0.0, 2.0]];
        let lse: Vec<LogSumExp> = scores
            .iter()
            .map(|c| {
                let mut z = LogSumExp::EMPTY;
                for &x in c.iter() {
                    z.push(x);
                }
                z
            })
            .collect();
        let global: Vec<f64> = scores.iter().flat_map(|c| c.iter().map(|&x| f64::from(x).exp())).collect();
        let total: f64 = global.iter().sum();
        let probs: Vec<f64> = global.iter().map(|x| x / total).collect();
        let offset = [0, 3, 3];
        let mut rng = Pcg64Mcg::seed_from_u64(9);
        let (mut cells, mut distinct, mut out) = (vec![0u64; probs.len()], [0u64; 5], Vec::new());
        let rounds = 40_000;
        for _ in 0..rounds {
            // Each shard's K draws from its own softmax, as its reservoirs
            // would return them: counts per slot, K entries per shard.
            let counts: Vec<Vec<u32>> = scores
                .iter()
                .zip(&lse)
                .map(|(c, z)| {
                    let mut n = vec![0u32; K as usize];
                    if z.sum > 0.0 {
                        for _ in 0..K {
                            let u = random::open01(&mut rng);
                            let mut acc = 0.0;
                            let i = c.iter().position(|&x| {
                                acc += z.weight(x);
                                u < acc
                            });
                            n[i.unwrap_or(c.len() - 1)] += 1;
                        }
                    }
                    n
                })
                .collect();
            merge_draws(&lse, &counts.concat(), K as usize, &mut rng, &mut out).unwrap();
            assert_eq!(out.iter().map(|t| t.count).sum::<u32>(), K);
            for t in &out {
                assert!(t.count <= counts[t.shard][t.pick], "a pick taken more often than its shard drew it");
                cells[offset[t.shard] + t.pick] += u64::from(t.count);
            }
            // The merged picks are distinct slots.
            distinct[out.len()] += 1;
        }
        let t = chi_square(&cells, &probs).expect("enough cells");
        assert!(t.p_value > 0.001, "{t:?} {cells:?} {probs:?}");
        // P(d distinct slots among 4 independent draws), by enumerating
        // every sequence of 4 draws.
        let n = probs.len();
        let mut want = [0.0f64; 5];
        for code in 0..n.pow(4) {
            let seq: Vec<usize> = (0..4).map(|i| code / n.pow(i) % n).collect();
            let mut d = seq.clone();
            d.sort_unstable();
            d.dedup();
            want[d.len()] += seq.iter().map(|&j| probs[j]).product::<f64>();
        }
        let t = chi_square(&distinct[1..], &want[1..]).expect("enough cells");
        assert!(t.p_value > 0.001, "distinct slots per round: {t:?} {distinct:?} {want:?}");
    }

    #[test]
    fn one_live_shard_passes_its_draws_through_without_randomness() {
        let mut rng = Pcg64Mcg::seed_from_u64(1);
        let before = rng.clone().next_u64();
        let lse = [LogSumExp::EMPTY, LogSumExp { max: 0.5, sum: 1.0 }];
        let mut out = Vec::new();
        merge_draws(&lse, &[0, 0, 0, 0, 3, 0, 1, 0], 4, &mut rng, &mut out).unwrap();
        let want = [Taken { shard: 1, pick: 0, count: 3 }, Taken { shard: 1, pick: 2, count: 1 }];
        assert_eq!(out, want);
        assert_eq!(rng.next_u64(), before, "a single candidate shard must not consume randomness");
        // A shard with candidates must report all its draws.
        assert!(merge_draws(&lse, &[0, 0, 0, 0, 3, 0, 0, 0], 4, &mut rng, &mut out).is_err());
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
