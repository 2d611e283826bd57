//! Cache storage sized at run time: the host's owner of the slices a
//! [`CacheMut`] views.
//!
//! The core's caches are views over caller-owned memory; on a device that
//! memory is a `static` [`negcache::NegativeCache`], here it is one `Vec`
//! per slot field, allocated at the configured capacity and no larger.

use negcache::cache::{CacheMut, CacheRef, SlotsMut};
use negcache::Item;

/// One `Vec` per slot field, all of length `capacity`.
#[derive(Debug, Clone)]
pub struct OwnedCache<I, const DIM: usize> {
    embeddings: Vec<[f32; DIM]>,
    items: Vec<I>,
    keys: Vec<u64>,
    ages: Vec<i32>,
    stamps: Vec<u32>,
    occupied: Vec<bool>,
    clock: u32,
}

impl<I: Item, const DIM: usize> OwnedCache<I, DIM> {
    /// An empty cache of `capacity` slots (at least 1, at most
    /// `i32::MAX`).
    pub fn new(capacity: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (1..=i32::MAX as usize).contains(&capacity),
            "a cache needs between 1 and {} slots, not {capacity}",
            i32::MAX
        );
        Ok(Self {
            embeddings: vec![[0.0; DIM]; capacity],
            items: vec![I::EMPTY; capacity],
            keys: vec![0; capacity],
            ages: vec![0; capacity],
            stamps: vec![0; capacity],
            occupied: vec![false; capacity],
            clock: 0,
        })
    }

    /// The number of slots.
    pub fn capacity(&self) -> usize {
        self.embeddings.len()
    }

    /// Bytes held, counting every field of every slot.
    pub fn bytes(&self) -> usize {
        self.capacity() * (size_of::<[f32; DIM]>() + size_of::<I>() + 8 + 4 + 4 + 1)
    }

    /// The mutable view the trainer works on.
    pub fn as_mut(&mut self) -> CacheMut<'_, I, DIM> {
        // Cannot fail: every field has the same length, within bounds.
        CacheMut::from_slots(self.slots_mut()).expect("cache fields of one length")
    }

    /// A read-only view.
    pub fn as_ref(&self) -> CacheRef<'_, I, DIM> {
        CacheRef::new(&self.embeddings, &self.items, &self.keys, &self.ages, &self.stamps, &self.occupied, self.clock)
            .expect("cache fields of one length")
    }

    /// Every field, bypassing the update rules (a checkpoint's restore;
    /// call `as_mut().rekey()` after writing items).
    pub fn slots_mut(&mut self) -> SlotsMut<'_, I, DIM> {
        SlotsMut {
            embeddings: &mut self.embeddings,
            items: &mut self.items,
            keys: &mut self.keys,
            ages: &mut self.ages,
            stamps: &mut self.stamps,
            occupied: &mut self.occupied,
            clock: &mut self.clock,
        }
    }
}
