//! The sizes of the core's big types, as stated in their docs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::mem::size_of;

use negcache::{CacheLoss, NegativeCache};

/// A cache of 65,536 items with 64-dimensional embeddings and the loss's
/// working memory for a batch of 32 fit in statics.
static CACHE: NegativeCache<u32, 65536, 64> = NegativeCache::new();
static LOSS: CacheLoss<32, 1> = CacheLoss::new();

#[test]
fn cache_and_loss_sizes_are_as_documented() {
    // Per slot: 64 * 4 (embedding) + 4 (item) + 8 (key) + 4 (age) + 4
    // (stamp) + 1 (occupied) = 277 bytes; plus the 4-byte clock, rounded
    // to the keys' alignment 8.
    assert_eq!(size_of::<NegativeCache<u32, 65536, 64>>(), (65536 * 277 + 4usize).next_multiple_of(8));
    assert_eq!(size_of::<NegativeCache<u32, 65536, 64>>(), 18_153_480);
    assert_eq!(CACHE.capacity(), 65536);
    // The loss state does not depend on the cache size at all. Per query:
    // log-sum-exp 8, picks 12 * NEG + 12 (keys, scores, slots, length,
    // threshold), weights 4 * NEG, the sampling log-sum-exp 8, top-k
    // group 8, six per-query floats 24, the positive's key 8 and the slot
    // where the pass found it 4: 72 + 16 * NEG bytes; plus the batch
    // length (8), alpha (4) and two flags (2): 32 * 88 + 14 = 2830, padded
    // to 8 bytes.
    assert_eq!(size_of::<CacheLoss<32, 1>>(), 2832);
    assert_eq!(LOSS.batch_len(), 0);
}
