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
//! The log-sum-exp is computed in a first streaming pass and the weights
//! recomputed in a second, so no batch x candidates matrix is stored. The
//! precise contract is `fixtures/reference/softmax_loss.md`.

use crate::error::{check_len, Error, Result};
use crate::math;
use crate::sampler::LogSumExp;
use crate::vector::{self, dot};

/// Where a softmax loss writes its outputs; every field is optional and
/// every given slice is overwritten.
#[derive(Debug, Default)]
pub struct SoftmaxOut<'a, const DIM: usize> {
    /// Per query loss.
    pub loss: Option<&'a mut [f32]>,
    /// d L / d q_b, one row per query.
    pub grad_query: Option<&'a mut [[f32; DIM]]>,
    /// d L / d p_b, one row per query (in-batch and sampled).
    pub grad_positive: Option<&'a mut [[f32; DIM]]>,
    /// d L / d x_j for the shared candidates: the negatives (sampled) or
    /// the corpus (full).
    pub grad_shared: Option<&'a mut [[f32; DIM]]>,
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
    let SoftmaxOut {
        loss,
        grad_query,
        grad_positive,
        grad_shared,
    } = out;
    if grad_shared.is_some() {
        return Err(Error::InvalidConfig {
            what: "in-batch softmax has no shared candidates; use grad_positive",
        });
    }
    let problem = Problem {
        queries,
        own: None,
        shared: positives,
        shared_log_q: log_q,
        alpha,
    };
    problem.run(keep, Some(&|b| b), loss, grad_query, None, grad_positive)
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
    let SoftmaxOut {
        loss,
        grad_query,
        grad_positive,
        grad_shared,
    } = out;
    let problem = Problem {
        queries,
        own: Some((positives, positive_log_q)),
        shared: negatives,
        shared_log_q: negative_log_q,
        alpha,
    };
    problem.run(keep, None, loss, grad_query, grad_positive, grad_shared)
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
        return Err(Error::IndexOutOfRange {
            what: "positive_index",
            index: bad,
            bound: corpus.len(),
        });
    }
    let SoftmaxOut {
        loss,
        grad_query,
        grad_positive,
        grad_shared,
    } = out;
    if grad_positive.is_some() {
        return Err(Error::InvalidConfig {
            what: "full softmax: the positives' gradient is part of grad_shared",
        });
    }
    let problem = Problem {
        queries,
        own: None,
        shared: corpus,
        shared_log_q: None,
        alpha,
    };
    problem.run(
        |_, _| true,
        Some(&|b| positive_index[b]),
        loss,
        grad_query,
        None,
        grad_shared,
    )
}

struct Problem<'a, const DIM: usize> {
    queries: &'a [[f32; DIM]],
    own: Option<(&'a [[f32; DIM]], Option<&'a [f32]>)>,
    shared: &'a [[f32; DIM]],
    shared_log_q: Option<&'a [f32]>,
    alpha: f32,
}

impl<const DIM: usize> Problem<'_, DIM> {
    fn validate(&self) -> Result<()> {
        if !self.alpha.is_finite() {
            return Err(Error::NonFinite {
                what: "score scale",
            });
        }
        if !vector::rows_finite(self.queries) {
            return Err(Error::NonFinite {
                what: "query embedding",
            });
        }
        if !vector::rows_finite(self.shared) {
            return Err(Error::NonFinite {
                what: "candidate embedding",
            });
        }
        if let Some(l) = self.shared_log_q {
            check_len("log_q", self.shared.len(), l.len())?;
            if !vector::all_finite(l) {
                return Err(Error::NonFinite { what: "log_q" });
            }
        }
        if let Some((rows, lq)) = self.own {
            if !vector::rows_finite(rows) {
                return Err(Error::NonFinite {
                    what: "positive embedding",
                });
            }
            if lq.is_some_and(|l| !vector::all_finite(l)) {
                return Err(Error::NonFinite {
                    what: "positive log_q",
                });
            }
        }
        Ok(())
    }

    fn shared_logit(&self, b: usize, j: usize) -> f32 {
        self.alpha * dot(&self.queries[b], &self.shared[j])
            - self.shared_log_q.map_or(0.0, |l| l[j])
    }

    fn own_logit(&self, b: usize) -> Option<f32> {
        self.own.map(|(rows, lq)| {
            self.alpha * dot(&self.queries[b], &rows[b]) - lq.map_or(0.0, |l| l[b])
        })
    }

    /// The two passes. `target` is `Some` for a shared target column and
    /// `None` when the target is the query's own candidate.
    fn run(
        &self,
        keep: impl Fn(usize, usize) -> bool,
        target: Option<&dyn Fn(usize) -> usize>,
        mut loss: Option<&mut [f32]>,
        mut grad_query: Option<&mut [[f32; DIM]]>,
        mut grad_own: Option<&mut [[f32; DIM]]>,
        mut grad_shared: Option<&mut [[f32; DIM]]>,
    ) -> Result<SoftmaxSummary> {
        self.validate()?;
        let bsz = self.queries.len();
        let n = self.shared.len();
        if let Some(l) = &loss {
            check_len("loss", bsz, l.len())?;
        }
        if let Some(g) = &grad_query {
            check_len("query gradient", bsz, g.len())?;
        }
        if let Some(g) = &grad_own {
            check_len("positive gradient", bsz, g.len())?;
        }
        if let Some(g) = &mut grad_shared {
            check_len("candidate gradient", n, g.len())?;
            g.fill([0.0; DIM]);
        }
        let inv_b = if bsz > 0 { 1.0 / bsz as f32 } else { 0.0 };
        let mut sum = SoftmaxSummary::default();
        for b in 0..bsz {
            // Pass 1: log-sum-exp over the kept candidates.
            let mut lse = LogSumExp::EMPTY;
            let own = self.own_logit(b);
            if let Some(o) = own {
                lse.push(o);
            }
            for j in 0..n {
                if keep(b, j) {
                    lse.push(self.shared_logit(b, j));
                }
            }
            let target_logit = match target {
                Some(t) => self.shared_logit(b, t(b)),
                None => own.unwrap_or(0.0),
            };
            if !(lse.sum.is_finite() && lse.max.is_finite() && target_logit.is_finite()) {
                return Err(Error::NonFinite { what: "logit" });
            }
            let lb = lse.minus(target_logit);
            sum.loss += lb;
            sum.prob_pos += math::exp(-lb);
            if let Some(l) = &mut loss {
                l[b] = lb;
            }
            // Pass 2: gradients from the weights P - y.
            let mut gq = [0.0f32; DIM];
            let q = &self.queries[b];
            if let (Some(o), Some((rows, _))) = (own, self.own) {
                let coeff = lse.weight(o) - 1.0;
                vector::axpy(coeff, &rows[b], &mut gq);
                sum.grad_scale += coeff * dot(q, &rows[b]);
                if let Some(g) = &mut grad_own {
                    g[b] = [0.0; DIM];
                    vector::axpy(coeff * self.alpha * inv_b, q, &mut g[b]);
                }
            }
            let tb = target.map(|t| t(b));
            for j in 0..n {
                if !keep(b, j) {
                    continue;
                }
                let p = lse.weight(self.shared_logit(b, j));
                let coeff = p - if tb == Some(j) { 1.0 } else { 0.0 };
                if coeff == 0.0 {
                    continue;
                }
                vector::axpy(coeff, &self.shared[j], &mut gq);
                sum.grad_scale += coeff * dot(q, &self.shared[j]);
                if let Some(g) = &mut grad_shared {
                    vector::axpy(coeff * self.alpha * inv_b, q, &mut g[j]);
                }
            }
            if let Some(g) = &mut grad_query {
                g[b] = [0.0; DIM];
                vector::axpy(self.alpha * inv_b, &gq, &mut g[b]);
            }
        }
        sum.loss *= inv_b;
        sum.prob_pos *= inv_b;
        sum.grad_scale *= inv_b;
        Ok(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    #[test]
    fn in_batch_of_two_matches_the_closed_form() {
        // q0 = (1, 0), q1 = (0, 1); p0 = (2, 0), p1 = (0, 1); alpha = 1.
        // Query 0: logits (2, 0): loss = ln(e^2 + 1) - 2.
        // Query 1: logits (0, 1): loss = ln(1 + e) - 1.
        let q = [[1.0, 0.0], [0.0, 1.0]];
        let p = [[2.0, 0.0], [0.0, 1.0]];
        let mut loss = [0.0; 2];
        let out = SoftmaxOut {
            loss: Some(&mut loss),
            ..SoftmaxOut::default()
        };
        let s = in_batch::<u32, 2>(&q, &p, None, None, 1.0, out).unwrap();
        let l0 = (2f64.exp() + 1.0).ln() - 2.0;
        let l1 = (1.0 + 1f64.exp()).ln() - 1.0;
        assert_relative_eq!(loss[0] as f64, l0, max_relative = 1e-6);
        assert_relative_eq!(loss[1] as f64, l1, max_relative = 1e-6);
        assert_relative_eq!(s.loss as f64, (l0 + l1) / 2.0, max_relative = 1e-6);
        // With equal ids, the other positive is removed: zero loss.
        let out = SoftmaxOut {
            loss: Some(&mut loss),
            ..SoftmaxOut::default()
        };
        in_batch(&q, &p, Some(&[3u32, 3]), None, 1.0, out).unwrap();
        assert_eq!(loss, [0.0, 0.0]);
    }

    #[test]
    fn full_softmax_gradient_sums_to_zero_over_candidates() {
        // sum_j dL/dx_j = alpha/B sum_b (sum_j P_bj - 1) q_b = 0.
        let q = [[0.3, -1.2, 0.5], [1.1, 0.4, -0.7]];
        let corpus = [
            [0.2, 0.1, -0.3],
            [1.0, 0.0, 0.5],
            [-0.4, 0.9, 0.2],
            [0.0, -0.6, 1.3],
        ];
        let mut gc = [[0.0; 3]; 4];
        let out = SoftmaxOut {
            grad_shared: Some(&mut gc),
            ..SoftmaxOut::default()
        };
        full(&q, &corpus, &[2, 0], 3.0, out).unwrap();
        for i in 0..3 {
            let s: f32 = gc.iter().map(|g| g[i]).sum();
            assert!(s.abs() < 1e-6, "{s}");
        }
    }
}
