//! Cache storage sized at run time: the host's owner of the slices a
//! [`CacheMut`] views.
//!
//! The core's caches are views over caller-owned memory; on a device that
//! memory is a `static` [`negcache::NegativeCache`], here it is one `Vec`
//! per slot field, allocated at the configured capacity and no larger, with
//! the embeddings in the precision chosen for the run.

use negcache::cache::{CacheMut, CacheRef, SlotsMut};
use negcache::storage::{Precision, Stored, StoredMut};
use negcache::Item;

/// A cache's embeddings in one of the core's precisions.
#[derive(Debug, Clone)]
enum OwnedRows<const DIM: usize> {
    F32(Vec<[f32; DIM]>),
    Bf16(Vec<[u16; DIM]>),
    Int8 { rows: Vec<[i8; DIM]>, scales: Vec<f32> },
}

impl<const DIM: usize> OwnedRows<DIM> {
    fn new(capacity: usize, precision: Precision) -> Self {
        match precision {
            Precision::F32 => OwnedRows::F32(vec![[0.0; DIM]; capacity]),
            Precision::Bf16 => OwnedRows::Bf16(vec![[0; DIM]; capacity]),
            Precision::Int8 => OwnedRows::Int8 { rows: vec![[0; DIM]; capacity], scales: vec![0.0; capacity] },
        }
    }
    fn view(&self) -> Stored<'_, DIM> {
        match self {
            OwnedRows::F32(r) => Stored::F32(r),
            OwnedRows::Bf16(r) => Stored::Bf16(r),
            OwnedRows::Int8 { rows, scales } => Stored::Int8 { rows, scales },
        }
    }
    fn view_mut(&mut self) -> StoredMut<'_, DIM> {
        match self {
            OwnedRows::F32(r) => StoredMut::F32(r),
            OwnedRows::Bf16(r) => StoredMut::Bf16(r),
            OwnedRows::Int8 { rows, scales } => StoredMut::Int8 { rows, scales },
        }
    }
}

/// One `Vec` per slot field, all of length `capacity`.
#[derive(Debug, Clone)]
pub struct OwnedCache<I, const DIM: usize> {
    embeddings: OwnedRows<DIM>,
    items: Vec<I>,
    keys: Vec<u64>,
    ages: Vec<i32>,
    stamps: Vec<u32>,
    occupied: Vec<bool>,
    clock: u32,
}

impl<I: Item, const DIM: usize> OwnedCache<I, DIM> {
    /// An empty cache of `capacity` slots (at least 1, at most
    /// `i32::MAX`), its embeddings stored as `f32`.
    pub fn new(capacity: usize) -> anyhow::Result<Self> {
        Self::with_precision(capacity, Precision::F32)
    }

    /// An empty cache of `capacity` slots whose embeddings are stored in
    /// `precision`.
    pub fn with_precision(capacity: usize, precision: Precision) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (1..=i32::MAX as usize).contains(&capacity),
            "a cache needs between 1 and {} slots, not {capacity}",
            i32::MAX
        );
        Ok(Self {
            embeddings: OwnedRows::new(capacity, precision),
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
        self.items.len()
    }

    /// How the embeddings are stored.
    pub fn precision(&self) -> Precision {
        self.embeddings.view().precision()
    }

    /// Bytes held, counting every field of every slot.
    pub fn bytes(&self) -> usize {
        self.capacity() * Self::bytes_per_slot(self.precision())
    }

    /// Bytes per slot in `precision`: the embedding (with its scale), the
    /// item, its key, age, stamp and flag.
    pub fn bytes_per_slot(precision: Precision) -> usize {
        precision.bytes_per_row(DIM) + size_of::<I>() + 8 + 4 + 4 + 1
    }

    /// The mutable view the trainer works on.
    pub fn as_mut(&mut self) -> CacheMut<'_, I, DIM> {
        // Cannot fail: every field has the same length, within bounds.
        CacheMut::from_slots(self.slots_mut()).expect("cache fields of one length")
    }

    /// A read-only view.
    pub fn as_ref(&self) -> CacheRef<'_, I, DIM> {
        CacheRef::new(
            self.embeddings.view(),
            &self.items,
            &self.keys,
            &self.ages,
            &self.stamps,
            &self.occupied,
            self.clock,
        )
        .expect("cache fields of one length")
    }

    /// Every field, bypassing the update rules (a checkpoint's restore;
    /// call `as_mut().rekey()` after writing items).
    pub fn slots_mut(&mut self) -> SlotsMut<'_, I, DIM> {
        SlotsMut {
            embeddings: self.embeddings.view_mut(),
            items: &mut self.items,
            keys: &mut self.keys,
            ages: &mut self.ages,
            stamps: &mut self.stamps,
            occupied: &mut self.occupied,
            clock: &mut self.clock,
        }
    }
}
