//! Exact top-k retrieval over stored embeddings, without allocation.
//!
//! [`TopK`] keeps the best `k` of a stream of scored candidates in a buffer
//! of `k` [`Hit`]s that the caller owns (a local array on a device, a `Vec`
//! on a server), as a bounded binary heap whose root is the weakest hit
//! kept: a candidate costs one comparison with the root when it does not
//! qualify, O(log k) when it does, and [`TopK::into_sorted`] sorts the
//! buffer in place (heap sort). [`search`] and [`search_by`] run it over a
//! slice of embeddings by dot product, the towers' score up to the scale
//! alpha (which does not change the order).
//!
//! # Order
//! Higher score first; equal scores by key, lower key first; NaN ranks
//! below every number (among NaNs, again by key); `-0.0` and `0.0` are
//! equal. With distinct keys this is a total order, so the result does not
//! depend on the order in which candidates arrive, and the host and a
//! device return the same hits for the same scores.
//!
//! The key is the caller's: the item's index for [`search`], or any
//! ranking of the items for [`search_by`]. To order equal scores as
//! trec_eval does (larger document id first), give each document its
//! position in decreasing id order as its key, as the host's evaluation
//! does.

use crate::error::{Error, Result};
use crate::vector::dot;

/// One retrieved candidate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// The caller's key (an item index unless the caller chose another).
    pub key: u32,
    /// The score.
    pub score: f32,
}

impl Hit {
    /// A placeholder to fill buffers with (`[Hit::EMPTY; K]`); it is never
    /// returned as a hit.
    pub const EMPTY: Self = Self { key: u32::MAX, score: f32::NEG_INFINITY };

    /// Whether `self` ranks strictly before `other` (see the module docs).
    ///
    /// # Examples
    /// ```
    /// use negcache::retrieve::Hit;
    /// let (a, b) = (Hit { key: 7, score: 0.5 }, Hit { key: 3, score: 0.5 });
    /// assert!(b.ranks_before(&a)); // equal scores: lower key first
    /// assert!(Hit { key: 9, score: 0.6 }.ranks_before(&b));
    /// assert!(a.ranks_before(&Hit { key: 0, score: f32::NAN }));
    /// ```
    #[inline]
    pub fn ranks_before(&self, other: &Self) -> bool {
        // The common case first: two numbers that differ. Any comparison
        // with NaN is false and falls through.
        if self.score > other.score {
            return true;
        }
        if self.score < other.score {
            return false;
        }
        match (self.score.is_nan(), other.score.is_nan()) {
            (false, true) => true,
            (true, false) => false,
            _ => self.key < other.key,
        }
    }
}

/// The best `k` of a stream of `(key, score)` candidates, kept in a
/// caller-given buffer of `k` hits.
///
/// Keys should be distinct; then the result is the first `k` candidates in
/// the order of the module docs, whatever order they arrive in.
///
/// # Memory
/// None of its own: the buffer is borrowed, and holds a binary heap
/// (root, the weakest hit kept, at index 0) until [`TopK::into_sorted`]
/// sorts it best first.
///
/// # Examples
/// ```
/// use negcache::retrieve::{Hit, TopK};
/// let mut buf = [Hit::EMPTY; 2];
/// let mut top = TopK::new(&mut buf);
/// for (key, score) in [(0, 0.1), (1, 0.9), (2, 0.5), (3, 0.9)] {
///     top.push(key, score);
/// }
/// let best = top.into_sorted();
/// assert_eq!(best, &[Hit { key: 1, score: 0.9 }, Hit { key: 3, score: 0.9 }]);
/// ```
#[derive(Debug)]
pub struct TopK<'a> {
    buf: &'a mut [Hit],
    len: usize,
}

impl<'a> TopK<'a> {
    /// An empty selection that keeps at most `buf.len()` hits. Whatever
    /// `buf` holds is overwritten.
    pub fn new(buf: &'a mut [Hit]) -> Self {
        Self { buf, len: 0 }
    }

    /// How many hits it keeps at most (the buffer's length).
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// How many hits it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no hit.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every hit, keeping the buffer (to reuse it for the next
    /// query).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// The weakest hit kept: once the buffer is full, the one a new
    /// candidate has to beat.
    pub fn weakest(&self) -> Option<Hit> {
        self.buf[..self.len].first().copied()
    }

    /// Offers a candidate; returns whether it is kept for now (it may be
    /// pushed out by better ones later). A zero-capacity selection keeps
    /// nothing.
    pub fn push(&mut self, key: u32, score: f32) -> bool {
        let hit = Hit { key, score };
        if self.len < self.buf.len() {
            self.buf[self.len] = hit;
            self.sift_up(self.len);
            self.len += 1;
            true
        } else if self.buf.first().is_some_and(|w| hit.ranks_before(w)) {
            self.buf[0] = hit;
            self.sift_down(0, self.len);
            true
        } else {
            false
        }
    }

    /// The hits, best first (sorted in place in the caller's buffer).
    pub fn into_sorted(self) -> &'a [Hit] {
        let Self { buf, len } = self;
        let heap = &mut buf[..len];
        // Heap sort: the root is the weakest, so moving it to the end of
        // the shrinking heap leaves the best at the front.
        for end in (1..heap.len()).rev() {
            heap.swap(0, end);
            sift_down(heap, 0, end);
        }
        &buf[..len]
    }

    fn sift_up(&mut self, mut i: usize) {
        while i > 0 {
            let parent = (i - 1) / 2;
            // A parent must rank after (be weaker than) its children.
            if self.buf[parent].ranks_before(&self.buf[i]) {
                self.buf.swap(parent, i);
                i = parent;
            } else {
                break;
            }
        }
    }

    fn sift_down(&mut self, i: usize, len: usize) {
        sift_down(self.buf, i, len);
    }
}

/// Restores the heap property below `i` in `heap[..len]` (weakest at the
/// root).
fn sift_down(heap: &mut [Hit], mut i: usize, len: usize) {
    loop {
        let left = 2 * i + 1;
        if left >= len {
            break;
        }
        let right = left + 1;
        let weaker = if right < len && heap[left].ranks_before(&heap[right]) { right } else { left };
        if heap[i].ranks_before(&heap[weaker]) {
            heap.swap(i, weaker);
            i = weaker;
        } else {
            break;
        }
    }
}

/// The `out.len()` items that score highest against `query` by dot product
/// ([`crate::vector::dot`], the score the trainer and the host's
/// evaluation compute), best first; keys are item indices, so equal scores
/// go to the lower index. Returns the filled prefix of `out` (shorter when
/// there are fewer items).
///
/// # Errors
/// [`Error::IndexOutOfRange`] if there are more than `u32::MAX` items.
///
/// # Examples
/// ```
/// use negcache::retrieve::{search, Hit};
/// let items = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]];
/// let mut out = [Hit::EMPTY; 2];
/// let hits = search(&[0.0, 1.0], &items, &mut out).unwrap();
/// assert_eq!(hits.iter().map(|h| h.key).collect::<Vec<_>>(), [1, 2]);
/// ```
pub fn search<'a, const DIM: usize>(query: &[f32; DIM], items: &[[f32; DIM]], out: &'a mut [Hit]) -> Result<&'a [Hit]> {
    search_by(query, items, Some, out)
}

/// [`search`] with the caller's keys: `key_of(i)` gives item `i`'s key
/// (which orders equal scores, lower first), or `None` to leave the item
/// out (for example a query's own document). The hits carry those keys.
///
/// # Errors
/// [`Error::IndexOutOfRange`] if there are more than `u32::MAX` items.
///
/// # Examples
/// Item 0 left out, equal scores ordered by decreasing index:
/// ```
/// use negcache::retrieve::{search_by, Hit};
/// let items = [[1.0f32], [1.0], [1.0], [0.5]];
/// let mut out = [Hit::EMPTY; 4];
/// let hits = search_by(&[1.0], &items, |i| (i != 0).then(|| 3 - i), &mut out).unwrap();
/// let indices: Vec<u32> = hits.iter().map(|h| 3 - h.key).collect();
/// assert_eq!(indices, [2, 1, 3]);
/// ```
pub fn search_by<'a, const DIM: usize>(
    query: &[f32; DIM],
    items: &[[f32; DIM]],
    mut key_of: impl FnMut(u32) -> Option<u32>,
    out: &'a mut [Hit],
) -> Result<&'a [Hit]> {
    let n = u32::try_from(items.len()).map_err(|_| Error::IndexOutOfRange {
        what: "item count",
        index: items.len(),
        bound: u32::MAX as usize,
    })?;
    let mut top = TopK::new(out);
    for (i, item) in (0..n).zip(items) {
        if let Some(key) = key_of(i) {
            top.push(key, dot(query, item));
        }
    }
    Ok(top.into_sorted())
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cmp::Ordering;
    use proptest::prelude::*;

    /// Reference: selection sort over all candidates (no allocation, so it
    /// runs under `no_std` tests), with an explicit comparator written
    /// independently of `ranks_before`.
    fn reference(cands: &[(u32, f32)], k: usize, out: &mut [(u32, f32)]) -> usize {
        let cmp = |a: &(u32, f32), b: &(u32, f32)| -> Ordering {
            let by_score = match (a.1.is_nan(), b.1.is_nan()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => b.1.partial_cmp(&a.1).unwrap_or(Ordering::Equal),
            };
            by_score.then(a.0.cmp(&b.0))
        };
        let mut used = [false; 300];
        let m = k.min(cands.len());
        for slot in out.iter_mut().take(m) {
            let mut best: Option<usize> = None;
            for (i, c) in cands.iter().enumerate() {
                if !used[i] && best.is_none_or(|b| cmp(c, &cands[b]) == Ordering::Less) {
                    best = Some(i);
                }
            }
            if let Some(b) = best {
                used[b] = true;
                *slot = cands[b];
            }
        }
        m
    }

    fn same(hits: &[Hit], want: &[(u32, f32)]) -> bool {
        hits.len() == want.len()
            && hits.iter().zip(want).all(|(h, w)| h.key == w.0 && h.score.to_bits() == w.1.to_bits())
    }

    #[test]
    fn small_examples() {
        let cands = [(0, 0.5), (1, 2.0), (2, f32::NAN), (3, 2.0), (4, -1.0)];
        for k in 0..7 {
            let mut buf = [Hit::EMPTY; 7];
            let mut top = TopK::new(&mut buf[..k]);
            cands.iter().for_each(|&(i, s)| {
                top.push(i, s);
            });
            let mut want = [(0, 0.0); 7];
            let m = reference(&cands, k, &mut want);
            assert!(same(top.into_sorted(), &want[..m]), "k = {k}");
        }
        let mut buf = [Hit::EMPTY; 4];
        let mut top = TopK::new(&mut buf);
        for (i, s) in [(0, 0.0), (1, -0.0), (2, f32::NEG_INFINITY), (3, f32::INFINITY)] {
            top.push(i, s);
        }
        let keys: [u32; 4] = core::array::from_fn(|i| top.buf[i].key);
        assert_eq!(top.weakest().map(|h| h.key), Some(2), "heap {keys:?}");
        let got = top.into_sorted();
        assert_eq!(got.iter().map(|h| h.key).collect::<heapless::Vec<u32, 4>>(), [3, 0, 1, 2]);
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let mut top = TopK::new(&mut []);
        assert!(!top.push(1, 1.0));
        assert!(top.is_empty() && top.weakest().is_none() && top.capacity() == 0);
        assert!(top.into_sorted().is_empty());
    }

    #[test]
    fn search_ties_by_key_and_exclusion() {
        // Scores 1, 1, 1, 0.5: ties go to the lower key.
        let items = [[1.0f32, 0.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.0]];
        let mut out = [Hit::EMPTY; 3];
        let hits = search(&[1.0, 0.0], &items, &mut out).unwrap();
        assert_eq!(hits.iter().map(|h| h.key).collect::<heapless::Vec<u32, 3>>(), [0, 1, 2]);
        // trec_eval's order: keys by decreasing index; item 2 excluded.
        let hits = search_by(&[1.0, 0.0], &items, |i| (i != 2).then_some(3 - i), &mut out).unwrap();
        assert_eq!(hits.iter().map(|h| 3 - h.key).collect::<heapless::Vec<u32, 3>>(), [1, 0, 3]);
        // Fewer items than room: the filled prefix.
        let mut big = [Hit::EMPTY; 8];
        assert_eq!(search(&[1.0, 0.0], &items, &mut big).unwrap().len(), 4);
        // Scores are the core's dot product, bit for bit.
        let q = [0.3f32, -0.7];
        let hits = search(&q, &items[3..], &mut out).unwrap();
        assert_eq!(hits[0].score.to_bits(), dot(&q, &items[3]).to_bits());
    }

    #[test]
    fn reuse_after_clear() {
        let mut buf = [Hit::EMPTY; 2];
        let mut top = TopK::new(&mut buf);
        top.push(0, 5.0);
        top.push(1, 6.0);
        top.clear();
        top.push(2, 1.0);
        assert_eq!(top.len(), 1);
        assert_eq!(top.into_sorted(), &[Hit { key: 2, score: 1.0 }]);
    }

    fn score() -> impl Strategy<Value = f32> {
        // Few distinct values so that ties are common, plus NaN, signed
        // zeros, infinities and arbitrary floats.
        prop_oneof![(-3i8..4).prop_map(f32::from), Just(f32::NAN), Just(-0.0f32), any::<f32>()]
    }

    proptest! {
        /// Equal to a full sort, whatever the arrival order (keys are a
        /// shuffled, hence distinct, range).
        #[test]
        fn matches_full_sort(
            scores in prop::collection::vec(score(), 0..300),
            k in 0usize..40,
            rotate in 0usize..300,
        ) {
            let n = scores.len();
            let mut cands = [(0u32, 0.0f32); 300];
            for (i, &s) in scores.iter().enumerate() {
                // A permutation of 0..n as keys: i * 7919 + rotate mod n
                // would not be one for every n, so reverse-and-rotate.
                let key = ((n - 1 - i) + rotate) % n.max(1);
                cands[i] = (key as u32, s);
            }
            let cands = &cands[..n];
            let mut want = [(0u32, 0.0f32); 40];
            let m = reference(cands, k, &mut want);
            let mut buf = [Hit::EMPTY; 40];
            let mut top = TopK::new(&mut buf[..k]);
            for &(key, s) in cands {
                top.push(key, s);
            }
            prop_assert!(same(top.into_sorted(), &want[..m]));
        }
    }
}
