//! Softmax cross-entropy losses the cache is compared against: in-batch,
//! sampled with logQ correction, and exact full softmax over a corpus.
//!
//! All three are one computation: query `b` has candidates `x_j` with
//! logits `l_bj = alpha * <q_b, x_j> - log_q_j`, some removed, and a target
//! column `t_b`; `loss_b = logsumexp_j l_bj - l_b,t_b`. They differ in the
//! candidates:
//!
//! - in-batch: the batch's positives; the target is the query's own; a
//!   positive equal to the query's own item elsewhere in the batch is
//!   removed (an accidental hit).
//! - sampled: the query's own positive plus `S` negatives shared by the
//!   batch; a negative equal to the query's positive item is removed.
//! - full: every corpus item; the target is the positive's index.
//!
//! Gradients of the mean loss `L = mean_b loss_b`, with `P_bj` the softmax
//! weights and `y_bj` the one-hot target:
//!
//! ```text
//! dL/dq_b   = alpha / B * sum_j (P_bj - y_bj) x_j
//! dL/dx_j   = alpha / B * sum_b (P_bj - y_bj) q_b
//! dL/dalpha = 1 / B * sum_bj (P_bj - y_bj) <q_b, x_j>
//! ```
//!
//! The log-sum-exp of each query is computed in a first pass (kept in a
//! caller-supplied scratch of one [`LogSumExp`] per query) and the weights
//! recomputed in a second, candidate-major pass that hands each
//! candidate's gradient to a callback as soon as it is complete, so
//! neither a batch x candidates matrix nor a candidates x DIM gradient is
//! stored: a trainer back-propagates each candidate's gradient through the
//! item tower at once. The
//! precise contract is `fixtures/reference/softmax_loss.md`.

use core::ops::Range;

use crate::error::{check_len, Error, Result};
use crate::math;
use crate::parallel::{split_parts, Fork};
pub use crate::sampler::LogSumExp;
use crate::vector::{self, dot};

/// A callback receiving one candidate's gradient: `(candidate, d L / d x)`.
pub type GradSink<'a, const DIM: usize> = &'a mut dyn FnMut(usize, &[f32; DIM]);

/// The cache's drawn negatives mixed with in-batch negatives in one
/// softmax: query `b`'s candidates are its positive, the batch's other
/// positives and every drawn negative of the batch; a candidate whose id
/// equals `b`'s positive id is removed. `grad_shared` receives candidate
/// `j` for the positives (`j < B`, the positive's in-batch gradient; its
/// own-candidate gradient goes to `grad_positive`) and `B + k` for the k-th
/// negative. No correction is applied for how the negatives were drawn.
pub fn mixed<I: PartialEq, const DIM: usize>(
    queries: &[[f32; DIM]],
    positives: &[[f32; DIM]],
    negatives: &[[f32; DIM]],
    positive_ids: &[I],
    negative_ids: &[I],
    alpha: f32,
    out: SoftmaxOut<'_, DIM>,
) -> Result<SoftmaxSummary> {
    mixed_by(queries, positives, negatives, positive_ids, &negative_ids, alpha, out)
}

/// Ids of candidates, looked up by position (a slice, or items found
/// through cache slots without copying them).
pub trait Ids<I> {
    /// How many.
    fn len(&self) -> usize;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The k-th id.
    fn id(&self, k: usize) -> &I;
}

impl<I> Ids<I> for &[I] {
    fn len(&self) -> usize {
        <[I]>::len(self)
    }
    fn id(&self, k: usize) -> &I {
        &self[k]
    }
}

/// [`mixed`] with the negatives' ids given through [`Ids`].
pub fn mixed_by<I: PartialEq, const DIM: usize>(
    queries: &[[f32; DIM]],
    positives: &[[f32; DIM]],
    negatives: &[[f32; DIM]],
    positive_ids: &[I],
    negative_ids: &impl Ids<I>,
    alpha: f32,
    out: SoftmaxOut<'_, DIM>,
) -> Result<SoftmaxSummary> {
    let bsz = queries.len();
    check_len("positives", bsz, positives.len())?;
    check_len("positive ids", bsz, positive_ids.len())?;
    check_len("negative ids", negatives.len(), negative_ids.len())?;
    let id = |j: usize| if j < bsz { &positive_ids[j] } else { negative_ids.id(j - bsz) };
    let keep = |b: usize, j: usize| j != b && *id(j) != positive_ids[b];
    let SoftmaxOut { scratch, loss, grad_query, grad_positive, grad_shared } = out;
    let problem = Problem {
        queries,
        own: Some((positives, None)),
        shared: positives,
        extra: negatives,
        shared_log_q: None,
        alpha,
    };
    problem.run(keep, None, scratch, loss, grad_query, grad_positive, grad_shared)
}

/// A query's own candidate rows and, optionally, their log_q.
type OwnRows<'a, const DIM: usize> = Option<(&'a [[f32; DIM]], Option<&'a [f32]>)>;

/// Where a softmax loss writes its outputs; every field but the scratch is
/// optional, and every given slice is overwritten.
pub struct SoftmaxOut<'a, const DIM: usize> {
    /// One log-sum-exp per query: the working memory of the two passes.
    pub scratch: &'a mut [LogSumExp],
    /// Per query loss.
    pub loss: Option<&'a mut [f32]>,
    /// d L / d q_b, one row per query.
    pub grad_query: Option<&'a mut [[f32; DIM]]>,
    /// d L / d p_b, one row per query (in-batch and sampled).
    pub grad_positive: Option<&'a mut [[f32; DIM]]>,
    /// Called once per shared candidate with d L / d x_j: the negatives
    /// (sampled) or the corpus rows (full); unused by in-batch.
    pub grad_shared: Option<GradSink<'a, DIM>>,
}

impl<'a, const DIM: usize> SoftmaxOut<'a, DIM> {
    /// Only the scratch: the summary is computed, nothing else written.
    pub fn new(scratch: &'a mut [LogSumExp]) -> Self {
        Self { scratch, loss: None, grad_query: None, grad_positive: None, grad_shared: None }
    }
}

impl<const DIM: usize> core::fmt::Debug for SoftmaxOut<'_, DIM> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SoftmaxOut").field("queries", &self.scratch.len()).finish_non_exhaustive()
    }
}

/// Batch means of a softmax loss.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SoftmaxSummary {
    /// Mean loss.
    pub loss: f32,
    /// Mean probability of the target.
    pub prob_pos: f32,
    /// d L / d alpha.
    pub grad_scale: f32,
}

/// In-batch softmax. `ids` (optional) removes accidental hits; `log_q`
/// (optional) corrects each positive's logit for how often it appears in
/// batches.
pub fn in_batch<I: PartialEq, const DIM: usize>(
    queries: &[[f32; DIM]],
    positives: &[[f32; DIM]],
    ids: Option<&[I]>,
    log_q: Option<&[f32]>,
    alpha: f32,
    out: SoftmaxOut<'_, DIM>,
) -> Result<SoftmaxSummary> {
    let bsz = queries.len();
    check_len("positives", bsz, positives.len())?;
    if let Some(ids) = ids {
        check_len("ids", bsz, ids.len())?;
    }
    let keep = |b: usize, j: usize| j == b || ids.is_none_or(|ids| ids[j] != ids[b]);
    let SoftmaxOut { scratch, loss, grad_query, grad_positive, grad_shared } = out;
    if grad_shared.is_some() {
        return Err(Error::InvalidConfig { what: "in-batch softmax has no shared candidates; use grad_positive" });
    }
    if let Some(g) = &grad_positive {
        check_len("positive gradient", bsz, g.len())?;
    }
    let problem = Problem { queries, own: None, shared: positives, extra: &[], shared_log_q: log_q, alpha };
    match grad_positive {
        Some(rows) => {
            let mut sink = |j: usize, g: &[f32; DIM]| rows[j] = *g;
            problem.run(keep, Some(&|b| b), scratch, loss, grad_query, None, Some(&mut sink))
        }
        None => problem.run(keep, Some(&|b| b), scratch, loss, grad_query, None, None),
    }
}

/// Sampled softmax with logQ correction: the query's own positive and `S`
/// shared negatives. A negative whose id equals the query's positive id is
/// removed (only when both id lists are given).
#[allow(clippy::too_many_arguments)]
pub fn sampled<I: PartialEq, const DIM: usize>(
    queries: &[[f32; DIM]],
    positives: &[[f32; DIM]],
    negatives: &[[f32; DIM]],
    positive_log_q: Option<&[f32]>,
    negative_log_q: Option<&[f32]>,
    positive_ids: Option<&[I]>,
    negative_ids: Option<&[I]>,
    alpha: f32,
    out: SoftmaxOut<'_, DIM>,
) -> Result<SoftmaxSummary> {
    let bsz = queries.len();
    check_len("positives", bsz, positives.len())?;
    if let Some(l) = positive_log_q {
        check_len("positive log_q", bsz, l.len())?;
    }
    if let Some(ids) = positive_ids {
        check_len("positive ids", bsz, ids.len())?;
    }
    if let Some(ids) = negative_ids {
        check_len("negative ids", negatives.len(), ids.len())?;
    }
    let keep = |b: usize, j: usize| match (positive_ids, negative_ids) {
        (Some(p), Some(n)) => n[j] != p[b],
        _ => true,
    };
    let SoftmaxOut { scratch, loss, grad_query, grad_positive, grad_shared } = out;
    let problem = Problem {
        queries,
        own: Some((positives, positive_log_q)),
        shared: negatives,
        extra: &[],
        shared_log_q: negative_log_q,
        alpha,
    };
    problem.run(keep, None, scratch, loss, grad_query, grad_positive, grad_shared)
}

/// Exact softmax over every corpus item; `positive_index[b]` is the row of
/// `corpus` that is query `b`'s positive.
pub fn full<const DIM: usize>(
    queries: &[[f32; DIM]],
    corpus: &[[f32; DIM]],
    positive_index: &[usize],
    alpha: f32,
    out: SoftmaxOut<'_, DIM>,
) -> Result<SoftmaxSummary> {
    let bsz = queries.len();
    check_len("positive_index", bsz, positive_index.len())?;
    if let Some(&bad) = positive_index.iter().find(|&&i| i >= corpus.len()) {
        return Err(Error::IndexOutOfRange { what: "positive_index", index: bad, bound: corpus.len() });
    }
    let SoftmaxOut { scratch, loss, grad_query, grad_positive, grad_shared } = out;
    if grad_positive.is_some() {
        return Err(Error::InvalidConfig { what: "full softmax: the positives' gradient is part of grad_shared" });
    }
    let problem = Problem { queries, own: None, shared: corpus, extra: &[], shared_log_q: None, alpha };
    problem.run(|_, _| true, Some(&|b| positive_index[b]), scratch, loss, grad_query, None, grad_shared)
}

/// [`full`] in parts, for a step that back-propagates its corpus's
/// gradients in ranges, possibly on several threads: [`Self::first_on`]
/// once, [`Self::second`] over ranges of the corpus (consecutive ranges
/// into the same query gradient and d L / d alpha, or groups of them into
/// sums of their own, added afterwards), then [`Self::finish`]. Ranges that
/// cover the corpus in order, into the same sums, give [`full`]'s bits.
///
/// The caller holds the sums: it zeroes each query gradient, starts the
/// first group's d L / d alpha from the `grad_scale` [`Self::first_on`]
/// returns (each other group's from zero), and writes the total back into
/// that summary before [`Self::finish`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct FullParts<'a, const DIM: usize> {
    queries: &'a [[f32; DIM]],
    corpus: &'a [[f32; DIM]],
    positive_index: &'a [usize],
    alpha: f32,
}

impl<'a, const DIM: usize> FullParts<'a, DIM> {
    /// [`full`]'s inputs, checked as it checks them.
    pub(crate) fn new(
        queries: &'a [[f32; DIM]],
        corpus: &'a [[f32; DIM]],
        positive_index: &'a [usize],
        alpha: f32,
    ) -> Result<Self> {
        check_len("positive_index", queries.len(), positive_index.len())?;
        if let Some(&bad) = positive_index.iter().find(|&&i| i >= corpus.len()) {
            return Err(Error::IndexOutOfRange { what: "positive_index", index: bad, bound: corpus.len() });
        }
        Ok(Self { queries, corpus, positive_index, alpha })
    }

    fn problem(&self) -> Problem<'a, DIM> {
        Problem {
            queries: self.queries,
            own: None,
            shared: self.corpus,
            extra: &[],
            shared_log_q: None,
            alpha: self.alpha,
        }
    }

    /// The first pass: each query's log-sum-exp into `lse`; the loss and
    /// the target's probability summed, not yet divided by the batch. The
    /// queries go in two halves on `fork`'s threads when the halves are
    /// worth a hand-over: the same bits, since each query's log-sum-exp is
    /// its own.
    pub(crate) fn first_on(&self, fork: &impl Fork, lse: &mut [LogSumExp]) -> Result<SoftmaxSummary> {
        let problem = self.problem();
        problem.start(lse, &None, &None, &None)?;
        let keep = |_: usize, _: usize| true;
        let work = self.corpus.len().saturating_mul(DIM);
        if split_parts(fork, lse.len(), work) >= 2 {
            let mid = lse.len() / 2;
            let (a, b) = lse.split_at_mut(mid);
            fork.join(|| problem.push_shared(&keep, 0, a), || problem.push_shared(&keep, mid, b));
        } else {
            problem.push_shared(&keep, 0, lse);
        }
        let target = |b: usize| self.positive_index[b];
        problem.close(Some(&target), lse, None, None, None)
    }

    /// The second pass over corpus rows `range` (clipped to the corpus):
    /// adds their terms to `grad_query` (unscaled) and `grad_scale` in row
    /// order, and writes row `j`'s gradient, final, to
    /// `out[j - range.start]`. An `out` shorter than the range is refused.
    pub(crate) fn second(
        &self,
        range: Range<usize>,
        lse: &[LogSumExp],
        grad_query: &mut [[f32; DIM]],
        grad_scale: &mut f32,
        out: &mut [[f32; DIM]],
    ) -> Result<()> {
        let bsz = self.queries.len();
        check_len("scratch", bsz, lse.len())?;
        check_len("query gradient", bsz, grad_query.len())?;
        let (start, end) = (range.start, range.end.min(self.corpus.len()));
        if end > start && end - start > out.len() {
            return Err(Error::CapacityExceeded { requested: end - start, capacity: out.len() });
        }
        let target = |b: usize| self.positive_index[b];
        let mut sink = |j: usize, g: &[f32; DIM]| out[j - start] = *g;
        self.problem().second_pass(
            start..end,
            &|_, _| true,
            Some(&target),
            lse,
            Some(grad_query),
            grad_scale,
            Some(&mut sink),
        );
        Ok(())
    }

    /// Divides the summary's sums by the batch and scales `grad_query` by
    /// `alpha / B`, as [`full`] ends.
    pub(crate) fn finish(&self, sum: &mut SoftmaxSummary, grad_query: &mut [[f32; DIM]]) {
        self.problem().finish(sum, Some(grad_query));
    }
}

/// Candidates side by side in the passes' vector lanes.
const TILE: usize = 16;

/// Query-candidate terms of d L / d alpha held per tile in the second
/// pass: a tile spans `TERMS / B` candidates (at most [`TILE`], at least
/// one) so that their terms can be added in candidate order.
const TERMS: usize = 512;

/// [`LogSumExp::push`] of the logits `c` for which `keep` holds, in order,
/// bit for bit: the running maximum, and so each exponential's argument,
/// is known before any exponential, so that they are computed side by
/// side.
fn push_tile(z: &mut LogSumExp, c: &[f32], keep: impl Fn(usize) -> bool) {
    let mut args = [0.0f32; TILE];
    let mut kept = [false; TILE];
    let mut max = z.max;
    for (l, &c) in c.iter().enumerate().take(TILE) {
        if keep(l) {
            kept[l] = true;
            if c > max {
                args[l] = max - c;
                max = c;
            } else {
                args[l] = c - max;
            }
        }
    }
    let e = math::exp_lanes(args);
    for (l, &c) in c.iter().enumerate().take(TILE) {
        if kept[l] {
            if c > z.max {
                z.sum = z.sum * e[l] + 1.0;
                z.max = c;
            } else {
                z.sum += e[l];
            }
        }
    }
}

struct Problem<'a, const DIM: usize> {
    queries: &'a [[f32; DIM]],
    own: OwnRows<'a, DIM>,
    shared: &'a [[f32; DIM]],
    /// More shared candidates, numbered after `shared` (mixed softmax).
    extra: &'a [[f32; DIM]],
    shared_log_q: Option<&'a [f32]>,
    alpha: f32,
}

impl<const DIM: usize> Problem<'_, DIM> {
    fn validate(&self) -> Result<()> {
        if !self.alpha.is_finite() {
            return Err(Error::NonFinite { what: "score scale" });
        }
        if !vector::rows_finite(self.queries) {
            return Err(Error::NonFinite { what: "query embedding" });
        }
        if !vector::rows_finite(self.shared) || !vector::rows_finite(self.extra) {
            return Err(Error::NonFinite { what: "candidate embedding" });
        }
        if let Some(l) = self.shared_log_q {
            check_len("log_q", self.shared.len(), l.len())?;
            if !vector::all_finite(l) {
                return Err(Error::NonFinite { what: "log_q" });
            }
        }
        if let Some((rows, lq)) = self.own {
            if !vector::rows_finite(rows) {
                return Err(Error::NonFinite { what: "positive embedding" });
            }
            if lq.is_some_and(|l| !vector::all_finite(l)) {
                return Err(Error::NonFinite { what: "positive log_q" });
            }
        }
        Ok(())
    }

    /// Shared candidate `j`: a row of `shared`, then of `extra`.
    fn row(&self, j: usize) -> &[f32; DIM] {
        if j < self.shared.len() {
            &self.shared[j]
        } else {
            &self.extra[j - self.shared.len()]
        }
    }

    fn shared_logit(&self, b: usize, j: usize) -> f32 {
        self.alpha * dot(&self.queries[b], self.row(j)) - self.shared_log_q.map_or(0.0, |l| l[j])
    }

    /// Rows `j0..j0 + m` (`m <= TILE`) into lanes: `t[i][l]` is
    /// component `i` of row `j0 + l`; lanes past `m` are zero.
    fn transpose(&self, j0: usize, m: usize, t: &mut [[f32; TILE]; DIM]) {
        for (l, j) in (j0..j0 + m).enumerate() {
            for (t, &x) in t.iter_mut().zip(self.row(j)) {
                t[l] = x;
            }
        }
        for t in t.iter_mut() {
            t[m..].fill(0.0);
        }
    }

    /// [`Self::shared_logit`] of query `b` and candidates `j0 + l`, lanes
    /// `l < m`, side by side, with the dot products they came from: each
    /// lane sums as [`dot`] does (four running sums, combined in its
    /// order), so the bits are those of one candidate at a time.
    fn logits(&self, b: usize, j0: usize, m: usize, t: &[[f32; TILE]; DIM]) -> ([f32; TILE], [f32; TILE]) {
        let q = &self.queries[b];
        let mut acc = [[0.0f32; TILE]; 4];
        let whole = DIM / 4 * 4;
        let mut i = 0;
        while i < whole {
            for (r, a) in acc.iter_mut().enumerate() {
                let (qi, ti) = (q[i + r], &t[i + r]);
                for l in 0..TILE {
                    a[l] += qi * ti[l];
                }
            }
            i += 4;
        }
        while i < DIM {
            for l in 0..TILE {
                acc[0][l] += q[i] * t[i][l];
            }
            i += 1;
        }
        let d: [f32; TILE] = core::array::from_fn(|l| (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]));
        let c = core::array::from_fn(|l| {
            let lq = match self.shared_log_q {
                Some(lq) if l < m => lq[j0 + l],
                _ => 0.0,
            };
            self.alpha * d[l] - lq
        });
        (c, d)
    }

    /// `1 / B`, or 0 for an empty batch.
    fn inv_b(&self) -> f32 {
        let bsz = self.queries.len();
        if bsz > 0 {
            1.0 / bsz as f32
        } else {
            0.0
        }
    }

    fn own_logit(&self, b: usize) -> Option<f32> {
        self.own.map(|(rows, lq)| self.alpha * dot(&self.queries[b], &rows[b]) - lq.map_or(0.0, |l| l[b]))
    }

    /// The two passes. `target` is `Some` for a shared target column and
    /// `None` when the target is the query's own candidate.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        keep: impl Fn(usize, usize) -> bool,
        target: Option<&dyn Fn(usize) -> usize>,
        lse: &mut [LogSumExp],
        loss: Option<&mut [f32]>,
        mut grad_query: Option<&mut [[f32; DIM]]>,
        grad_own: Option<&mut [[f32; DIM]]>,
        grad_shared: Option<GradSink<'_, DIM>>,
    ) -> Result<SoftmaxSummary> {
        let mut sum = self.first_pass(&keep, target, lse, loss, grad_query.as_deref_mut(), grad_own)?;
        let n = self.shared.len() + self.extra.len();
        self.second_pass(0..n, &keep, target, lse, grad_query.as_deref_mut(), &mut sum.grad_scale, grad_shared);
        self.finish(&mut sum, grad_query);
        Ok(sum)
    }

    /// Pass 1, query-major: checks the inputs, and writes each query's
    /// log-sum-exp, loss and its own candidate's share of the gradients
    /// (`grad_query`'s rows start from zero here). The summary's sums are
    /// not yet divided by the batch ([`Self::finish`]).
    fn first_pass(
        &self,
        keep: &impl Fn(usize, usize) -> bool,
        target: Option<&dyn Fn(usize) -> usize>,
        lse: &mut [LogSumExp],
        loss: Option<&mut [f32]>,
        grad_query: Option<&mut [[f32; DIM]]>,
        grad_own: Option<&mut [[f32; DIM]]>,
    ) -> Result<SoftmaxSummary> {
        self.start(lse, &loss, &grad_query, &grad_own)?;
        self.push_shared(keep, 0, lse);
        self.close(target, lse, loss, grad_query, grad_own)
    }

    /// Pass 1's checks, and each query's log-sum-exp started with its own
    /// candidate.
    fn start(
        &self,
        lse: &mut [LogSumExp],
        loss: &Option<&mut [f32]>,
        grad_query: &Option<&mut [[f32; DIM]]>,
        grad_own: &Option<&mut [[f32; DIM]]>,
    ) -> Result<()> {
        self.validate()?;
        let bsz = self.queries.len();
        check_len("scratch", bsz, lse.len())?;
        if let Some(l) = loss {
            check_len("loss", bsz, l.len())?;
        }
        if let Some(g) = grad_query {
            check_len("query gradient", bsz, g.len())?;
        }
        if let Some(g) = grad_own {
            check_len("positive gradient", bsz, g.len())?;
        }
        for (b, z) in lse.iter_mut().enumerate() {
            *z = LogSumExp::EMPTY;
            if let Some(o) = self.own_logit(b) {
                z.push(o);
            }
        }
        Ok(())
    }

    /// Adds the shared candidates to the log-sum-exps of queries `b0..`
    /// (`lse[k]` is query `b0 + k`'s), tile by tile; each query takes them
    /// in order, so a query's sum does not depend on which others go with
    /// it.
    fn push_shared(&self, keep: &impl Fn(usize, usize) -> bool, b0: usize, lse: &mut [LogSumExp]) {
        let n = self.shared.len() + self.extra.len();
        let mut rows = [[0.0f32; TILE]; DIM];
        let mut j0 = 0;
        while j0 < n {
            let m = TILE.min(n - j0);
            self.transpose(j0, m, &mut rows);
            for (b, z) in (b0..).zip(lse.iter_mut()) {
                let (c, _) = self.logits(b, j0, m, &rows);
                push_tile(z, &c[..m], |l| keep(b, j0 + l));
            }
            j0 += m;
        }
    }

    /// The end of pass 1: each query's loss, and its own candidate's
    /// share of the gradients.
    fn close(
        &self,
        target: Option<&dyn Fn(usize) -> usize>,
        lse: &[LogSumExp],
        mut loss: Option<&mut [f32]>,
        mut grad_query: Option<&mut [[f32; DIM]]>,
        mut grad_own: Option<&mut [[f32; DIM]]>,
    ) -> Result<SoftmaxSummary> {
        let inv_b = self.inv_b();
        let mut sum = SoftmaxSummary::default();
        for b in 0..self.queries.len() {
            let z = lse[b];
            let own = self.own_logit(b);
            let target_logit = match target {
                Some(t) => self.shared_logit(b, t(b)),
                None => own.unwrap_or(0.0),
            };
            if !(z.sum.is_finite() && z.max.is_finite() && target_logit.is_finite()) {
                return Err(Error::NonFinite { what: "logit" });
            }
            let lb = z.minus(target_logit);
            sum.loss += lb;
            sum.prob_pos += math::exp(-lb);
            if let Some(l) = &mut loss {
                l[b] = lb;
            }
            let q = &self.queries[b];
            if let Some(g) = &mut grad_query {
                g[b] = [0.0; DIM];
            }
            if let (Some(o), Some((rows, _))) = (own, self.own) {
                let coeff = z.weight(o) - 1.0;
                sum.grad_scale += coeff * dot(q, &rows[b]);
                if let Some(g) = &mut grad_query {
                    vector::axpy(coeff, &rows[b], &mut g[b]);
                }
                if let Some(g) = &mut grad_own {
                    g[b] = [0.0; DIM];
                    vector::axpy(coeff * self.alpha * inv_b, q, &mut g[b]);
                }
            }
        }
        Ok(sum)
    }

    /// Pass 2 over the shared candidates `range`, after
    /// [`Self::first_pass`]: adds their terms to `grad_query` and
    /// `grad_scale` in candidate order and hands each candidate's gradient
    /// to `grad_shared` as soon as it is complete. Consecutive ranges give
    /// the bits of one range covering them.
    #[allow(clippy::too_many_arguments)]
    fn second_pass(
        &self,
        range: Range<usize>,
        keep: &impl Fn(usize, usize) -> bool,
        target: Option<&dyn Fn(usize) -> usize>,
        lse: &[LogSumExp],
        mut grad_query: Option<&mut [[f32; DIM]]>,
        grad_scale: &mut f32,
        mut grad_shared: Option<GradSink<'_, DIM>>,
    ) {
        let bsz = self.queries.len();
        let n = range.end.min(self.shared.len() + self.extra.len());
        let inv_b = self.inv_b();
        let mut rows = [[0.0f32; TILE]; DIM];
        // Each shared candidate's gradient is complete after its
        // column and is handed over at once, in candidate order. A tile
        // of `w` candidates is scored query by query (in chunks when the
        // batch is large); the sums keep the one-candidate-at-a-time
        // order: each gradient adds its queries in order, and d L / d
        // alpha adds candidate by candidate, each over its queries, from
        // `terms`.
        let w = TERMS.checked_div(bsz).map_or(TILE, |w| w.clamp(1, TILE));
        // The whole batch while a tile spans more than one candidate.
        let chunk = bsz.min(TERMS / w);
        let mut terms = [0.0f32; TERMS];
        let mut coeffs = [0.0f32; TERMS];
        let mut gx = [[0.0f32; DIM]; TILE];
        let mut j0 = range.start;
        while j0 < n {
            let m = w.min(n - j0);
            self.transpose(j0, m, &mut rows);
            gx[..m].iter_mut().for_each(|g| *g = [0.0; DIM]);
            let mut any = [false; TILE];
            let mut b0 = 0;
            while b0 < bsz {
                let nb = chunk.min(bsz - b0);
                for b in b0..b0 + nb {
                    let (c, d) = self.logits(b, j0, m, &rows);
                    let z = lse[b];
                    // Lanes past the tile's end would only cost a call of
                    // `exp` each (they can be positive).
                    let e = math::exp_lanes::<TILE>(core::array::from_fn(|l| if l < m { c[l] - z.max } else { 0.0 }));
                    // Removed candidates and lanes past the end weigh 0.
                    let t = target.map(|t| t(b));
                    let coeff: [f32; TILE] = core::array::from_fn(|l| {
                        let j = j0 + l;
                        if l < m && keep(b, j) {
                            e[l] / z.sum - if t == Some(j) { 1.0 } else { 0.0 }
                        } else {
                            0.0
                        }
                    });
                    let k = (b - b0) * w;
                    coeffs[k..k + w].copy_from_slice(&coeff[..w]);
                    for (l, term) in terms[k..k + w].iter_mut().enumerate() {
                        *term = if coeff[l] == 0.0 { 0.0 } else { coeff[l] * d[l] };
                    }
                    // d L / d q_b adds the tile's candidates in order, in
                    // registers.
                    if let Some(g) = &mut grad_query {
                        let mut acc = g[b];
                        for (l, &c) in coeff.iter().enumerate().take(m) {
                            if c != 0.0 {
                                vector::axpy(c, self.row(j0 + l), &mut acc);
                            }
                        }
                        g[b] = acc;
                    }
                }
                // Each candidate's gradient adds the chunk's queries in
                // order, in registers.
                for (l, (gx, any)) in gx.iter_mut().zip(any.iter_mut()).enumerate().take(m) {
                    let mut acc = *gx;
                    for k in 0..nb {
                        let c = coeffs[k * w + l];
                        if c != 0.0 {
                            *any = true;
                            vector::axpy(c, &self.queries[b0 + k], &mut acc);
                        }
                    }
                    *gx = acc;
                }
                // Adding a zero term changes nothing: the sum is never
                // -0.0 (it starts at +0.0, and x + (-x) is +0.0).
                for l in 0..m {
                    for k in 0..nb {
                        *grad_scale += terms[k * w + l];
                    }
                }
                b0 += nb;
            }
            if let Some(sink) = &mut grad_shared {
                for l in 0..m {
                    if any[l] {
                        gx[l].iter_mut().for_each(|x| *x *= self.alpha * inv_b);
                    }
                    sink(j0 + l, &gx[l]);
                }
            }
            j0 += m;
        }
    }

    /// Divides the summary's sums by the batch and scales `grad_query` by
    /// `alpha / B`: the last step of [`Self::run`].
    fn finish(&self, sum: &mut SoftmaxSummary, mut grad_query: Option<&mut [[f32; DIM]]>) {
        let inv_b = self.inv_b();
        if let Some(g) = &mut grad_query {
            for row in g.iter_mut() {
                row.iter_mut().for_each(|x| *x *= self.alpha * inv_b);
            }
        }
        sum.loss *= inv_b;
        sum.prob_pos *= inv_b;
        sum.grad_scale *= inv_b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    impl<const DIM: usize> Problem<'_, DIM> {
        /// The two passes as they were written before the tiles, one logit at
        /// a time: the reference the tiled passes must match bit for bit. `target` is `Some` for a shared target column and
        /// `None` when the target is the query's own candidate.
        #[allow(clippy::too_many_arguments)]
        fn run_plain(
            &self,
            keep: impl Fn(usize, usize) -> bool,
            target: Option<&dyn Fn(usize) -> usize>,
            lse: &mut [LogSumExp],
            mut loss: Option<&mut [f32]>,
            mut grad_query: Option<&mut [[f32; DIM]]>,
            mut grad_own: Option<&mut [[f32; DIM]]>,
            mut grad_shared: Option<GradSink<'_, DIM>>,
        ) -> Result<SoftmaxSummary> {
            self.validate()?;
            let bsz = self.queries.len();
            let n = self.shared.len() + self.extra.len();
            check_len("scratch", bsz, lse.len())?;
            if let Some(l) = &loss {
                check_len("loss", bsz, l.len())?;
            }
            if let Some(g) = &grad_query {
                check_len("query gradient", bsz, g.len())?;
            }
            if let Some(g) = &grad_own {
                check_len("positive gradient", bsz, g.len())?;
            }
            let inv_b = if bsz > 0 { 1.0 / bsz as f32 } else { 0.0 };
            let mut sum = SoftmaxSummary::default();
            // Pass 1, query-major: log-sum-exp, loss, and the own candidate's
            // share of the gradients.
            for b in 0..bsz {
                let mut z = LogSumExp::EMPTY;
                let own = self.own_logit(b);
                if let Some(o) = own {
                    z.push(o);
                }
                for j in 0..n {
                    if keep(b, j) {
                        z.push(self.shared_logit(b, j));
                    }
                }
                let target_logit = match target {
                    Some(t) => self.shared_logit(b, t(b)),
                    None => own.unwrap_or(0.0),
                };
                if !(z.sum.is_finite() && z.max.is_finite() && target_logit.is_finite()) {
                    return Err(Error::NonFinite { what: "logit" });
                }
                lse[b] = z;
                let lb = z.minus(target_logit);
                sum.loss += lb;
                sum.prob_pos += math::exp(-lb);
                if let Some(l) = &mut loss {
                    l[b] = lb;
                }
                let q = &self.queries[b];
                if let Some(g) = &mut grad_query {
                    g[b] = [0.0; DIM];
                }
                if let (Some(o), Some((rows, _))) = (own, self.own) {
                    let coeff = z.weight(o) - 1.0;
                    sum.grad_scale += coeff * dot(q, &rows[b]);
                    if let Some(g) = &mut grad_query {
                        vector::axpy(coeff, &rows[b], &mut g[b]);
                    }
                    if let Some(g) = &mut grad_own {
                        g[b] = [0.0; DIM];
                        vector::axpy(coeff * self.alpha * inv_b, q, &mut g[b]);
                    }
                }
            }
            // Pass 2, candidate-major: each shared candidate's gradient is
            // complete after its column and is handed over at once.
            for j in 0..n {
                let mut gx = [0.0f32; DIM];
                let mut any = false;
                for b in 0..bsz {
                    if !keep(b, j) {
                        continue;
                    }
                    let p = lse[b].weight(self.shared_logit(b, j));
                    let coeff = p - if target.is_some_and(|t| t(b) == j) { 1.0 } else { 0.0 };
                    if coeff == 0.0 {
                        continue;
                    }
                    any = true;
                    let q = &self.queries[b];
                    sum.grad_scale += coeff * dot(q, self.row(j));
                    vector::axpy(coeff, q, &mut gx);
                    if let Some(g) = &mut grad_query {
                        vector::axpy(coeff, self.row(j), &mut g[b]);
                    }
                }
                if let Some(sink) = &mut grad_shared {
                    if any {
                        gx.iter_mut().for_each(|x| *x *= self.alpha * inv_b);
                    }
                    sink(j, &gx);
                }
            }
            if let Some(g) = &mut grad_query {
                for row in g.iter_mut() {
                    row.iter_mut().for_each(|x| *x *= self.alpha * inv_b);
                }
            }
            sum.loss *= inv_b;
            sum.prob_pos *= inv_b;
            sum.grad_scale *= inv_b;
            Ok(sum)
        }
    }

    /// Random problems of every kind (own rows or not, log_q or not,
    /// removed candidates, shared or own targets, zero and repeated
    /// candidates), batches below, at and above one tile's terms, run
    /// through the tiled passes and [`Problem::run_plain`]: every output
    /// the same bits.
    fn tiles_match_one_logit_at_a_time<const DIM: usize>(seed: u64) {
        use rand_core::SeedableRng;
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
        let mut normal = || crate::random::normal(&mut rng);
        const MAXB: usize = 600;
        const MAXN: usize = 53;
        let queries: [[f32; DIM]; MAXB] = core::array::from_fn(|_| core::array::from_fn(|_| normal()));
        let own: [[f32; DIM]; MAXB] = core::array::from_fn(|_| core::array::from_fn(|_| normal()));
        let mut shared: [[f32; DIM]; MAXN] = core::array::from_fn(|_| core::array::from_fn(|_| normal()));
        shared[3] = [0.0; DIM];
        shared[7] = shared[5];
        let extra: [[f32; DIM]; 9] = core::array::from_fn(|_| core::array::from_fn(|_| normal()));
        let log_q: [f32; MAXN] = core::array::from_fn(|_| normal());
        let own_lq: [f32; MAXB] = core::array::from_fn(|_| normal());
        for (bsz, n, alpha) in
            [(0, 5, 2.0), (1, 1, 3.0), (3, 17, 5.0), (32, 53, 20.0), (33, 16, 1.0), (70, 40, 8.0), (600, 20, 4.0)]
        {
            for kind in 0..4 {
                let extra: &[[f32; DIM]] = if kind == 3 { &extra } else { &[] };
                let problem = Problem {
                    queries: &queries[..bsz],
                    own: match kind {
                        0 => None,
                        1 => Some((&own[..bsz], None)),
                        _ => Some((&own[..bsz], Some(&own_lq[..bsz]))),
                    },
                    shared: &shared[..n],
                    extra,
                    shared_log_q: if kind == 2 { Some(&log_q[..n]) } else { None },
                    alpha,
                };
                let total = n + extra.len();
                let keep = |b: usize, j: usize| (b * 7 + j * 3) % 11 != 4 || kind == 0;
                let t = |b: usize| (b * 5 + 1) % total;
                let target: Option<&dyn Fn(usize) -> usize> = if kind == 0 { Some(&t) } else { None };
                let run = |tiled: bool| {
                    let mut lse = [LogSumExp::EMPTY; MAXB];
                    let mut loss = [0.0f32; MAXB];
                    let mut gq = [[0.0f32; DIM]; MAXB];
                    let mut go = [[0.0f32; DIM]; MAXB];
                    let mut gs = [[0.0f32; DIM]; MAXN + 9];
                    let mut calls = 0usize;
                    let mut sink = |j: usize, g: &[f32; DIM]| {
                        assert_eq!(j, calls, "candidates handed over in order");
                        calls += 1;
                        gs[j] = *g;
                    };
                    let args = (&mut lse[..bsz], Some(&mut loss[..bsz]), Some(&mut gq[..bsz]), Some(&mut go[..bsz]));
                    let sum = if tiled {
                        problem.run(keep, target, args.0, args.1, args.2, args.3, Some(&mut sink))
                    } else {
                        problem.run_plain(keep, target, args.0, args.1, args.2, args.3, Some(&mut sink))
                    }
                    .unwrap();
                    assert_eq!(calls, total);
                    // FNV-1a over every output's bits, and the count.
                    let (mut hash, mut count) = (0xcbf2_9ce4_8422_2325u64, 0usize);
                    let flat = lse[..bsz].iter().flat_map(|z| [z.max, z.sum]).chain(loss[..bsz].iter().copied());
                    let flat =
                        flat.chain(gq[..bsz].iter().flatten().copied()).chain(go[..bsz].iter().flatten().copied());
                    let flat = flat.chain(gs[..total].iter().flatten().copied());
                    let flat = flat.chain([sum.loss, sum.prob_pos, sum.grad_scale]);
                    for x in flat {
                        hash = (hash ^ u64::from(x.to_bits())).wrapping_mul(0x100_0000_01b3);
                        count += 1;
                    }
                    (hash, count, sum)
                };
                assert_eq!(run(true), run(false), "DIM {DIM}, batch {bsz}, {n} candidates, kind {kind}");
            }
        }
    }

    #[test]
    fn tiled_passes_are_the_one_logit_at_a_time_bits() {
        tiles_match_one_logit_at_a_time::<5>(1);
        tiles_match_one_logit_at_a_time::<16>(2);
        tiles_match_one_logit_at_a_time::<64>(3);
    }

    #[test]
    fn in_batch_of_two_matches_the_closed_form() {
        // q0 = (1, 0), q1 = (0, 1); p0 = (2, 0), p1 = (0, 1); alpha = 1.
        // Query 0: logits (2, 0): loss = ln(e^2 + 1) - 2.
        // Query 1: logits (0, 1): loss = ln(1 + e) - 1.
        let q = [[1.0, 0.0], [0.0, 1.0]];
        let p = [[2.0, 0.0], [0.0, 1.0]];
        let mut loss = [0.0; 2];
        let mut scratch = [LogSumExp::EMPTY; 2];
        let out = SoftmaxOut { loss: Some(&mut loss), ..SoftmaxOut::new(&mut scratch) };
        let s = in_batch::<u32, 2>(&q, &p, None, None, 1.0, out).unwrap();
        let l0 = (2f64.exp() + 1.0).ln() - 2.0;
        let l1 = (1.0 + 1f64.exp()).ln() - 1.0;
        assert_relative_eq!(loss[0] as f64, l0, max_relative = 1e-6);
        assert_relative_eq!(loss[1] as f64, l1, max_relative = 1e-6);
        assert_relative_eq!(s.loss as f64, (l0 + l1) / 2.0, max_relative = 1e-6);
        // With equal ids, the other positive is removed: zero loss.
        let out = SoftmaxOut { loss: Some(&mut loss), ..SoftmaxOut::new(&mut scratch) };
        in_batch(&q, &p, Some(&[3u32, 3]), None, 1.0, out).unwrap();
        assert_eq!(loss, [0.0, 0.0]);
    }

    #[test]
    fn mixed_without_negatives_is_in_batch() {
        let q = [[0.3, -1.2], [1.1, 0.4], [-0.5, 0.2]];
        let p = [[0.2, 0.1], [1.0, 0.0], [-0.4, 0.9]];
        let ids = [1u32, 2, 3];
        let (mut l1, mut l2) = ([0.0; 3], [0.0; 3]);
        let (mut s1, mut s2) = ([LogSumExp::EMPTY; 3], [LogSumExp::EMPTY; 3]);
        let (mut g1, mut g2) = ([[0.0; 2]; 3], [[0.0; 2]; 3]);
        let a = in_batch(
            &q,
            &p,
            Some(&ids),
            None,
            2.0,
            SoftmaxOut { loss: Some(&mut l1), grad_query: Some(&mut g1), ..SoftmaxOut::new(&mut s1) },
        )
        .unwrap();
        let out = SoftmaxOut { loss: Some(&mut l2), grad_query: Some(&mut g2), ..SoftmaxOut::new(&mut s2) };
        let b = mixed::<u32, 2>(&q, &p, &[], &ids, &[], 2.0, out).unwrap();
        assert_relative_eq!(a.loss, b.loss, max_relative = 1e-6);
        for i in 0..3 {
            assert_relative_eq!(l1[i], l2[i], max_relative = 1e-5);
            assert_relative_eq!(g1[i][0], g2[i][0], epsilon = 1e-6);
        }
        // A negative equal to query 0's positive item is removed for it.
        let mut s3 = [LogSumExp::EMPTY; 3];
        let c = mixed::<u32, 2>(&q, &p, &[[5.0, 5.0]], &ids, &[1], 2.0, SoftmaxOut::new(&mut s3)).unwrap();
        assert!(c.loss > a.loss);
    }

    /// `FullParts` over consecutive ranges into the same sums gives
    /// `full`'s bits; over two halves into sums of their own, added, it
    /// gives `full`'s values up to rounding.
    #[test]
    fn full_in_parts_gives_full() {
        const N: usize = 53;
        let mut rng = <rand_pcg::Pcg64Mcg as rand_core::SeedableRng>::seed_from_u64(3);
        let mut draw = || -> [f32; 5] { core::array::from_fn(|_| crate::random::normal(&mut rng)) };
        let q: [[f32; 5]; 3] = core::array::from_fn(|_| draw());
        let corpus: [[f32; 5]; N] = core::array::from_fn(|_| draw());
        let index = [7, 0, 52];
        let (mut gq, mut gc, mut lse) = ([[0.0; 5]; 3], [[0.0; 5]; N], [LogSumExp::EMPTY; 3]);
        let mut sink = |j: usize, g: &[f32; 5]| gc[j] = *g;
        let out = SoftmaxOut { grad_query: Some(&mut gq), grad_shared: Some(&mut sink), ..SoftmaxOut::new(&mut lse) };
        let want = full(&q, &corpus, &index, 2.5, out).unwrap();
        let bits = |x: &[[f32; 5]]| x.as_flattened().iter().map(|v| v.to_bits()).collect::<heapless::Vec<u32, 512>>();

        let parts = FullParts::new(&q, &corpus, &index, 2.5).unwrap();
        let mut lse = [LogSumExp::EMPTY; 3];
        // The first pass split (its queries last to first) or not.
        let reversed = crate::parallel::Reversed::default();
        let mut sum = parts.first_on(&reversed, &mut lse).unwrap();
        assert_eq!(reversed.joins(), 1);
        let (mut g, mut rows) = ([[0.0; 5]; 3], [[0.0; 5]; N]);
        let mut scale = sum.grad_scale;
        for r in [0..5, 5..37, 37..N] {
            let start = r.start;
            parts.second(r, &lse, &mut g, &mut scale, &mut rows[start..]).unwrap();
        }
        sum.grad_scale = scale;
        parts.finish(&mut sum, &mut g);
        assert_eq!(sum, want);
        assert_eq!(bits(&g), bits(&gq));
        assert_eq!(bits(&rows), bits(&gc));

        let mut sum = parts.first_on(&crate::parallel::Serial, &mut lse).unwrap();
        let (mut g, mut h, mut rows) = ([[0.0; 5]; 3], [[0.0; 5]; 3], [[0.0; 5]; N]);
        let (mut s, mut t) = (sum.grad_scale, 0.0);
        let (a, b) = rows.split_at_mut(26);
        parts.second(26..N, &lse, &mut h, &mut t, b).unwrap();
        parts.second(0..26, &lse, &mut g, &mut s, a).unwrap();
        for (g, h) in g.iter_mut().zip(&h) {
            for (g, h) in g.iter_mut().zip(h) {
                *g += h;
            }
        }
        sum.grad_scale = s + t;
        parts.finish(&mut sum, &mut g);
        assert_eq!(sum.loss, want.loss);
        assert_relative_eq!(sum.grad_scale, want.grad_scale, max_relative = 1e-5);
        assert_eq!(bits(&rows), bits(&gc));
        for (g, w) in g.as_flattened().iter().zip(gq.as_flattened()) {
            assert_relative_eq!(*g, *w, epsilon = 1e-6, max_relative = 1e-5);
        }
        // A short query gradient or output is refused, a range past the
        // corpus clipped, without a panic.
        assert!(parts.second(0..N, &lse, &mut g[..2], &mut s, &mut rows).is_err());
        assert!(parts.second(3..N, &lse, &mut g, &mut s, &mut rows[..N - 4]).is_err());
        parts.second(N - 2..N + 9, &lse, &mut g, &mut s, &mut rows[..2]).unwrap();
        parts.second(N + 1..N + 9, &lse, &mut g, &mut s, &mut []).unwrap();
    }

    #[test]
    fn full_softmax_gradient_sums_to_zero_over_candidates() {
        // sum_j dL/dx_j = alpha/B sum_b (sum_j P_bj - 1) q_b = 0.
        let q = [[0.3, -1.2, 0.5], [1.1, 0.4, -0.7]];
        let corpus = [[0.2, 0.1, -0.3], [1.0, 0.0, 0.5], [-0.4, 0.9, 0.2], [0.0, -0.6, 1.3]];
        let mut gc = [[0.0; 3]; 4];
        let mut scratch = [LogSumExp::EMPTY; 2];
        let mut sink = |j: usize, g: &[f32; 3]| gc[j] = *g;
        let out = SoftmaxOut { grad_shared: Some(&mut sink), ..SoftmaxOut::new(&mut scratch) };
        full(&q, &corpus, &[2, 0], 3.0, out).unwrap();
        for i in 0..3 {
            let s: f32 = gc.iter().map(|g| g[i]).sum();
            assert!(s.abs() < 1e-6, "{s}");
        }
    }
}
