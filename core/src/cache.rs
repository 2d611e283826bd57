//! The negative cache: N slots of (embedding, item, key, age, stamp,
//! occupied).
//!
//! [`NegativeCache`] owns its storage in fixed arrays sized by const
//! generics, so it can live in a `static`. All logic lives on the borrowed
//! views [`CacheRef`] and [`CacheMut`], which any storage of equal-length
//! slices can provide: the host uses them for caches sized at run time, and
//! verification uses them for reference cases of any size.
//!
//! Update semantics follow `shared/spec/reference-cases.md`, kind
//! `cache_update`: one [`CacheMut::update`] call refreshes, inserts, then
//! ages every slot by one.

use crate::error::{check_len, Error, Result};
use crate::item::Item;
use crate::storage::{F32Store, Precision, Store, Stored, StoredMut};
use crate::vector;

/// How inserted items choose their slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Eviction {
    /// First in, first out: a slot's age counts steps since its insertion;
    /// refreshing does not make it younger.
    #[default]
    Fifo,
    /// Least recently used: refreshing an entry resets its age, so entries
    /// that keep being drawn as negatives stay in the cache.
    Lru,
}

/// A negative cache with `CAP` slots of `DIM`-dimensional embeddings.
///
/// # Generics
/// - `I`: the item type (see [`Item`]).
/// - `CAP`: the number of slots.
/// - `DIM`: the embedding dimension.
/// - `S`: how the embeddings are stored ([`crate::storage`]): `f32` by
///   default, or [`crate::storage::Int8Store`] (`DIM + 4` bytes per row) or
///   [`crate::storage::Bf16Store`] (`2 * DIM`).
///
/// # Memory
/// `CAP * (4 * DIM + size_of::<I>() + 8 + 4 + 4 + 1)` bytes plus padding
/// with `f32` storage:
/// embeddings are stored row-major, one `[f32; DIM]` per slot, then the
/// items, their keys (`u64`, [`Item::key`], compared by masking and the
/// in-cache filter), the ages (`i32`), the write stamps (`u32`, the step at
/// which the slot's embedding was last written) and the occupancy flags.
/// For `NegativeCache<u32, 65536, 64>` that is 18,153,472 bytes.
///
/// ```
/// use negcache::NegativeCache;
/// // 65,536 cached items of 64 floats in static memory (17.6 MB of .bss).
/// static CACHE: NegativeCache<u32, 65536, 64> = NegativeCache::new();
/// assert_eq!(CACHE.len(), 0);
/// ```
///
/// The same number of slots in int8, 3.76 times smaller per embedding:
///
/// ```
/// use negcache::storage::{Int8Store, Precision};
/// use negcache::NegativeCache;
/// type Small = NegativeCache<u32, 65536, 64, Int8Store<65536, 64>>;
/// static CACHE: Small = Small::new();
/// assert_eq!(CACHE.view().embeddings().precision(), Precision::Int8);
/// // Per slot: 64 + 4 (int8 row, scale), 4 + 8 (item, key), 4 + 4 + 1 (age,
/// // stamp, flag); then the clock, padded to 8.
/// assert_eq!(size_of::<Small>(), 65536 * (68 + 4 + 8 + 4 + 4 + 1) + 8);
/// ```
#[derive(Debug, Clone)]
pub struct NegativeCache<I, const CAP: usize, const DIM: usize, S = F32Store<CAP, DIM>> {
    embeddings: S,
    items: [I; CAP],
    keys: [u64; CAP],
    ages: [i32; CAP],
    stamps: [u32; CAP],
    occupied: [bool; CAP],
    clock: u32,
}

impl<I: Item, const CAP: usize, const DIM: usize, S: Store<CAP, DIM>> NegativeCache<I, CAP, DIM, S> {
    /// An empty cache: zero embeddings, empty items, every age 0.
    pub const fn new() -> Self {
        const { assert!(CAP > 0 && CAP <= i32::MAX as usize, "CAP must be in 1..=i32::MAX") };
        const { assert!(DIM > 0, "DIM must be positive") };
        Self {
            embeddings: S::ZERO,
            items: [I::EMPTY; CAP],
            keys: [0; CAP],
            ages: [0; CAP],
            stamps: [0; CAP],
            occupied: [false; CAP],
            clock: 0,
        }
    }

    /// The number of slots.
    pub const fn capacity(&self) -> usize {
        CAP
    }

    /// The number of occupied slots.
    pub fn len(&self) -> usize {
        self.occupied.iter().filter(|&&o| o).count()
    }

    /// Whether no slot is occupied.
    pub fn is_empty(&self) -> bool {
        !self.occupied.iter().any(|&o| o)
    }

    /// Empties every slot and resets the ages and the clock.
    pub fn clear(&mut self) {
        self.as_mut().clear();
        self.clock = 0;
    }

    /// A read-only view of every slot.
    pub fn as_ref(&self) -> CacheRef<'_, I, DIM> {
        self.prefix(CAP)
    }

    /// A read-only view of the first `n` slots (all of them when `n` is 0
    /// or above `CAP`): a cache whose capacity is chosen at run time.
    pub fn prefix(&self, n: usize) -> CacheRef<'_, I, DIM> {
        let n = if n == 0 { CAP } else { n.min(CAP) };
        CacheRef {
            embeddings: self.embeddings.stored(n),
            items: &self.items[..n],
            keys: &self.keys[..n],
            ages: &self.ages[..n],
            stamps: &self.stamps[..n],
            occupied: &self.occupied[..n],
            clock: self.clock,
        }
    }

    /// A mutable view of the first `n` slots (see [`Self::prefix`]).
    pub fn prefix_mut(&mut self, n: usize) -> CacheMut<'_, I, DIM> {
        let n = if n == 0 { CAP } else { n.min(CAP) };
        CacheMut {
            embeddings: self.embeddings.stored_mut(n),
            items: &mut self.items[..n],
            keys: &mut self.keys[..n],
            ages: &mut self.ages[..n],
            stamps: &mut self.stamps[..n],
            occupied: &mut self.occupied[..n],
            clock: &mut self.clock,
        }
    }

    /// Every field, mutably, bypassing the update rules: for restoring a
    /// checkpoint.
    pub fn slots_mut(&mut self) -> SlotsMut<'_, I, DIM> {
        SlotsMut {
            embeddings: self.embeddings.stored_mut(CAP),
            items: &mut self.items,
            keys: &mut self.keys,
            ages: &mut self.ages,
            stamps: &mut self.stamps,
            occupied: &mut self.occupied,
            clock: &mut self.clock,
        }
    }

    /// A mutable view of every slot.
    pub fn as_mut(&mut self) -> CacheMut<'_, I, DIM> {
        self.prefix_mut(CAP)
    }

    /// The same as [`Self::as_mut`], under a name that a `Box`'s `AsMut`
    /// does not shadow: `boxed_cache.view_mut()` is the cache's view.
    pub fn view_mut(&mut self) -> CacheMut<'_, I, DIM> {
        self.prefix_mut(CAP)
    }

    /// The same as [`Self::as_ref`], under a name that a `Box`'s `AsRef`
    /// does not shadow.
    pub fn view(&self) -> CacheRef<'_, I, DIM> {
        self.prefix(CAP)
    }
}

impl<I: Item, const CAP: usize, const DIM: usize, S: Store<CAP, DIM>> Default for NegativeCache<I, CAP, DIM, S> {
    fn default() -> Self {
        Self::new()
    }
}

/// A read-only view of a cache's slots (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct CacheRef<'a, I, const DIM: usize> {
    embeddings: Stored<'a, DIM>,
    items: &'a [I],
    keys: &'a [u64],
    ages: &'a [i32],
    stamps: &'a [u32],
    occupied: &'a [bool],
    clock: u32,
}

/// A mutable view of a cache's slots (see the module docs).
#[derive(Debug)]
pub struct CacheMut<'a, I, const DIM: usize> {
    embeddings: StoredMut<'a, DIM>,
    items: &'a mut [I],
    keys: &'a mut [u64],
    ages: &'a mut [i32],
    stamps: &'a mut [u32],
    occupied: &'a mut [bool],
    clock: &'a mut u32,
}

/// The storage a [`CacheMut`] is built from: one slice per slot field, all
/// of the same length.
#[derive(Debug)]
pub struct SlotsMut<'a, I, const DIM: usize> {
    /// One embedding per slot, in any [`Precision`].
    pub embeddings: StoredMut<'a, DIM>,
    /// One item per slot.
    pub items: &'a mut [I],
    /// Each slot's [`Item::key`] (0 in an empty slot; only occupied slots'
    /// keys are compared). Code that writes `items` directly must write the
    /// keys too, or call [`CacheMut::rekey`] afterwards: a wrong key also
    /// survives [`CacheMut::set_slot`] of the same item, which keeps an
    /// occupied slot's key.
    pub keys: &'a mut [u64],
    /// One age per slot.
    pub ages: &'a mut [i32],
    /// The step at which each slot's embedding was last written.
    pub stamps: &'a mut [u32],
    /// Whether each slot holds an item.
    pub occupied: &'a mut [bool],
    /// The number of update calls so far.
    pub clock: &'a mut u32,
}

/// One update call (spec `cache_update`): a refresh of existing slots and
/// an insertion of new items, either of which may be empty.
#[derive(Debug, Clone, Copy)]
pub struct Update<'a, I, const DIM: usize> {
    /// Slots whose embeddings are refreshed.
    pub refresh_indices: &'a [usize],
    /// Their new embeddings, one per index.
    pub refresh_embeddings: &'a [[f32; DIM]],
    /// Which refreshes apply (`None`: all).
    pub refresh_mask: Option<&'a [bool]>,
    /// Embeddings of the items to insert.
    pub new_embeddings: &'a [[f32; DIM]],
    /// The items to insert, one per embedding.
    pub new_items: &'a [I],
    /// Which new items are inserted (`None`: all). Masked items still count
    /// towards the number of slots taken for insertion, as the spec says.
    pub new_mask: Option<&'a [bool]>,
}

impl<I, const DIM: usize> Default for Update<'_, I, DIM> {
    fn default() -> Self {
        Self {
            refresh_indices: &[],
            refresh_embeddings: &[],
            refresh_mask: None,
            new_embeddings: &[],
            new_items: &[],
            new_mask: None,
        }
    }
}

impl<'a, I: Item, const DIM: usize> CacheRef<'a, I, DIM> {
    /// A read-only view over caller-owned slices (see [`SlotsMut`] for
    /// what each holds); their lengths must agree.
    pub fn new(
        embeddings: Stored<'a, DIM>,
        items: &'a [I],
        keys: &'a [u64],
        ages: &'a [i32],
        stamps: &'a [u32],
        occupied: &'a [bool],
        clock: u32,
    ) -> Result<Self> {
        let n = embeddings.len();
        embeddings.check()?;
        check_len("items", n, items.len())?;
        check_len("keys", n, keys.len())?;
        check_len("ages", n, ages.len())?;
        check_len("stamps", n, stamps.len())?;
        check_len("occupied", n, occupied.len())?;
        Ok(Self { embeddings, items, keys, ages, stamps, occupied, clock })
    }
    /// The number of slots.
    pub fn capacity(&self) -> usize {
        self.embeddings.len()
    }
    /// All slot embeddings, in their stored precision
    /// ([`Stored::row`] decodes one).
    pub fn embeddings(&self) -> Stored<'a, DIM> {
        self.embeddings
    }
    /// How the embeddings are stored.
    pub fn precision(&self) -> Precision {
        self.embeddings.precision()
    }
    /// All slot items.
    pub fn items(&self) -> &'a [I] {
        self.items
    }
    /// Each slot's item key ([`Item::key`]).
    pub fn keys(&self) -> &'a [u64] {
        self.keys
    }
    /// All slot ages.
    pub fn ages(&self) -> &'a [i32] {
        self.ages
    }
    /// The step at which each slot's embedding was last written.
    pub fn stamps(&self) -> &'a [u32] {
        self.stamps
    }
    /// Which slots hold an item.
    pub fn occupied(&self) -> &'a [bool] {
        self.occupied
    }
    /// The number of update calls made so far.
    pub fn clock(&self) -> u32 {
        self.clock
    }

    /// In-cache filter (spec `in_cache_filter`): `keep[m]` is set to true
    /// where no occupied slot holds an item equal to `new_items[m]`.
    pub fn filter_new(&self, new_items: &[I], keep: &mut [bool]) -> Result<()> {
        check_len("keep", new_items.len(), keep.len())?;
        for (k, item) in keep.iter_mut().zip(new_items) {
            *k = !self.contains(item);
        }
        Ok(())
    }

    /// Whether an occupied slot holds `item`.
    pub fn contains(&self, item: &I) -> bool {
        self.position(item).is_some()
    }

    /// The lowest occupied slot holding `item`, if any.
    pub fn position(&self, item: &I) -> Option<usize> {
        self.position_of_key(item.key())
    }

    /// The lowest occupied slot holding the item with key `key`, if any.
    pub fn position_of_key(&self, key: u64) -> Option<usize> {
        self.keys.iter().zip(self.occupied).position(|(&k, &o)| o && k == key)
    }

    /// The `out.len()` slots whose embeddings were written longest ago
    /// (lowest stamp, ties to the lower index), stalest first; only occupied
    /// slots count. Returns how many were found.
    pub fn stalest(&self, out: &mut [usize]) -> usize {
        let key = |j: usize| (core::cmp::Reverse(self.stamps[j]), core::cmp::Reverse(j));
        select_top(self.capacity(), out, None, |j| self.occupied[j].then(|| key(j)), |_, _| false).0
    }
}

/// Indices per block in [`select_top`]'s skip test.
const SKIP_BLOCK: usize = 64;

/// Writes into `out` the indices `j` in `0..n` with the largest `key(j)`
/// among those strictly below `below` (indices whose key is `None` are
/// skipped), largest first. Returns how many were written and the smallest
/// key written, which, passed back as `below`, continues the ranking.
///
/// Keys must be distinct (include the index). Works in passes of a
/// fixed-size sorted buffer, so it needs no allocation, and for `out.len()`
/// up to the buffer size it reads every index once.
///
/// `skip(start, k)` may answer true only when no index of the block
/// `start..start + SKIP_BLOCK` has a key above `k`: once the buffer is
/// full, such a block is passed over without reading its keys one by one
/// (a cheaper, vectorisable test; `|_, _| false` reads every key). It
/// changes the speed, not the result.
fn select_top<K: Ord + Copy>(
    n: usize,
    out: &mut [usize],
    below: Option<K>,
    key: impl Fn(usize) -> Option<K>,
    skip: impl Fn(usize, K) -> bool,
) -> (usize, Option<K>) {
    const CHUNK: usize = 64;
    let mut done = 0;
    let mut bound = below;
    while done < out.len() {
        let want = (out.len() - done).min(CHUNK);
        let mut buf: heapless::Vec<(K, usize), CHUNK> = heapless::Vec::new();
        let mut j = 0;
        while j < n {
            if j % SKIP_BLOCK == 0 && buf.len() == want && buf.last().is_some_and(|&(last, _)| skip(j, last)) {
                j += SKIP_BLOCK;
                continue;
            }
            let index = j;
            j += 1;
            let Some(k) = key(index) else { continue };
            if bound.is_some_and(|b| k >= b) {
                continue;
            }
            if buf.len() == want {
                // Full: only a key above the current smallest gets in.
                if buf.last().is_some_and(|&(last, _)| k <= last) {
                    continue;
                }
                buf.pop();
            }
            let pos = buf.iter().position(|&(bk, _)| k > bk).unwrap_or(buf.len());
            // Cannot fail: the buffer holds at most `want <= CHUNK` entries.
            let _ = buf.insert(pos, (k, index));
        }
        for &(_, j) in &buf {
            out[done] = j;
            done += 1;
        }
        if buf.len() < want {
            if let Some(&(k, _)) = buf.last() {
                bound = Some(k);
            }
            break;
        }
        bound = buf.last().map(|&(k, _)| k);
    }
    (done, bound)
}

impl<'a, I: Item, const DIM: usize> CacheMut<'a, I, DIM> {
    /// A view over caller-owned slices; their lengths must agree.
    pub fn from_slots(slots: SlotsMut<'a, I, DIM>) -> Result<Self> {
        let n = slots.embeddings.len();
        slots.embeddings.check()?;
        check_len("items", n, slots.items.len())?;
        check_len("keys", n, slots.keys.len())?;
        check_len("ages", n, slots.ages.len())?;
        check_len("stamps", n, slots.stamps.len())?;
        check_len("occupied", n, slots.occupied.len())?;
        if n == 0 || n > i32::MAX as usize {
            return Err(Error::InvalidConfig { what: "a cache needs between 1 and i32::MAX slots" });
        }
        Ok(Self {
            embeddings: slots.embeddings,
            items: slots.items,
            keys: slots.keys,
            ages: slots.ages,
            stamps: slots.stamps,
            occupied: slots.occupied,
            clock: slots.clock,
        })
    }

    /// The number of slots.
    pub fn capacity(&self) -> usize {
        self.embeddings.len()
    }

    /// How the embeddings are stored.
    pub fn precision(&self) -> Precision {
        self.embeddings.as_ref().precision()
    }

    /// The embeddings of an `f32` cache, for writing in place, bypassing
    /// the slots' other fields: a corpus embedded straight into its slots
    /// (`Trainer::fill_cache_on`), which then sets each slot with
    /// [`Self::set_slot_in_place`].
    pub(crate) fn f32_rows_mut(&mut self) -> Option<&mut [[f32; DIM]]> {
        match &mut self.embeddings {
            StoredMut::F32(rows) => Some(rows),
            _ => None,
        }
    }

    /// A read-only view of the same slots.
    pub fn as_ref(&self) -> CacheRef<'_, I, DIM> {
        CacheRef {
            embeddings: self.embeddings.as_ref(),
            items: self.items,
            keys: self.keys,
            ages: self.ages,
            stamps: self.stamps,
            occupied: self.occupied,
            clock: *self.clock,
        }
    }

    /// Empties every slot and resets the ages and the clock.
    pub fn clear(&mut self) {
        self.clear_past(0);
    }

    /// Empties slots `from..` and resets the clock; the slots before `from`
    /// keep their contents. Writing every slot before `from` with
    /// [`Self::set_slot`] then gives the state [`Self::clear`] and the same
    /// writes give, and a slot that already holds its item keeps that
    /// item's key instead of computing it again.
    pub fn clear_past(&mut self, from: usize) {
        let from = from.min(self.items.len());
        self.embeddings.clear_past(from);
        self.items[from..].fill(I::EMPTY);
        self.keys[from..].fill(0);
        self.ages[from..].fill(0);
        self.stamps[from..].fill(0);
        self.occupied[from..].fill(false);
        *self.clock = 0;
    }

    /// Sets a slot directly (used to load a cache from a checkpoint or from
    /// a reference case, and to write a corpus into it). Not part of the
    /// update semantics. An occupied slot that already holds `item`
    /// ([`Item::same`]) keeps its key.
    pub fn set_slot(&mut self, j: usize, embedding: &[f32; DIM], item: I, age: i32, occupied: bool) -> Result<()> {
        let n = self.embeddings.len();
        if j >= n {
            return Err(Error::IndexOutOfRange { what: "slot", index: j, bound: n });
        }
        if !vector::all_finite(embedding) {
            return Err(Error::NonFinite { what: "slot embedding" });
        }
        self.embeddings.set(j, embedding);
        self.set_fields(j, item, age, occupied);
        Ok(())
    }

    /// [`Self::set_slot`] for an `f32` row already written in place
    /// (through [`Self::f32_rows_mut`]): checks the stored row and sets the
    /// slot's other fields.
    pub(crate) fn set_slot_in_place(&mut self, j: usize, item: I, age: i32, occupied: bool) -> Result<()> {
        let n = self.embeddings.len();
        let row = match &self.embeddings {
            StoredMut::F32(rows) => rows.get(j),
            _ => None,
        };
        let row = row.ok_or(Error::IndexOutOfRange { what: "slot", index: j, bound: n })?;
        if !vector::all_finite(row) {
            return Err(Error::NonFinite { what: "slot embedding" });
        }
        self.set_fields(j, item, age, occupied);
        Ok(())
    }

    /// Slot `j`'s fields besides its embedding; `j` is in range. An
    /// occupied slot given the item it holds keeps its key.
    fn set_fields(&mut self, j: usize, item: I, age: i32, occupied: bool) {
        if !(self.occupied[j] && self.items[j].same(&item)) {
            self.items[j] = item;
            self.keys[j] = item.key();
        }
        self.ages[j] = age;
        self.occupied[j] = occupied;
        self.stamps[j] = *self.clock;
    }

    /// Recomputes every slot's key from its item: after items were written
    /// through [`SlotsMut`] (a checkpoint's restore).
    pub fn rekey(&mut self) {
        for (k, item) in self.keys.iter_mut().zip(self.items.iter()) {
            *k = item.key();
        }
    }

    /// Marks slot `j` occupied or empty, keeping its contents: hides a
    /// slot from a scoring pass (which skips empty slots) and restores it.
    pub fn set_occupied(&mut self, j: usize, occupied: bool) -> Result<()> {
        let n = self.occupied.len();
        *self.occupied.get_mut(j).ok_or(Error::IndexOutOfRange { what: "slot", index: j, bound: n })? = occupied;
        Ok(())
    }

    /// Refreshes slots without inserting or ageing: step 1 of
    /// [`Self::update`] alone, for re-embedding entries outside the
    /// update call. `up`'s insertion fields must be empty.
    pub fn refresh(&mut self, up: &Update<'_, I, DIM>, eviction: Eviction) -> Result<()> {
        if !up.new_embeddings.is_empty() || !up.new_items.is_empty() {
            return Err(Error::InvalidConfig { what: "refresh takes no new items; use update" });
        }
        self.check_refresh(up)?;
        self.apply_refresh(up, eviction);
        Ok(())
    }

    fn check_refresh(&self, up: &Update<'_, I, DIM>) -> Result<()> {
        let n = self.embeddings.len();
        check_len("refresh_embeddings", up.refresh_indices.len(), up.refresh_embeddings.len())?;
        if let Some(m) = up.refresh_mask {
            check_len("refresh_mask", up.refresh_indices.len(), m.len())?;
        }
        for (u, &j) in up.refresh_indices.iter().enumerate() {
            let active = up.refresh_mask.is_none_or(|m| m[u]);
            if active && j >= n {
                return Err(Error::IndexOutOfRange { what: "refresh index", index: j, bound: n });
            }
            if active && !vector::all_finite(&up.refresh_embeddings[u]) {
                return Err(Error::NonFinite { what: "refresh embedding" });
            }
        }
        Ok(())
    }

    fn apply_refresh(&mut self, up: &Update<'_, I, DIM>, eviction: Eviction) {
        let now = *self.clock;
        for (u, &j) in up.refresh_indices.iter().enumerate() {
            if up.refresh_mask.is_none_or(|m| m[u]) {
                self.embeddings.set(j, &up.refresh_embeddings[u]);
                self.stamps[j] = now;
                if eviction == Eviction::Lru {
                    self.ages[j] = -1;
                }
            }
        }
    }

    /// One update call: refresh, insert, then age every slot by one (spec
    /// `cache_update`). Validates everything before changing anything, so
    /// an error leaves the cache as it was.
    pub fn update(&mut self, up: &Update<'_, I, DIM>, eviction: Eviction) -> Result<()> {
        let n = self.embeddings.len();
        self.check_refresh(up)?;
        check_len("new_items", up.new_embeddings.len(), up.new_items.len())?;
        if let Some(m) = up.new_mask {
            check_len("new_mask", up.new_embeddings.len(), m.len())?;
        }
        if up.new_embeddings.len() > n {
            return Err(Error::CapacityExceeded { requested: up.new_embeddings.len(), capacity: n });
        }
        for (m, e) in up.new_embeddings.iter().enumerate() {
            if up.new_mask.is_none_or(|mask| mask[m]) && !vector::all_finite(e) {
                return Err(Error::NonFinite { what: "new embedding" });
            }
        }

        // 1. Refresh.
        self.apply_refresh(up, eviction);
        let now = *self.clock;
        // 2. Insert: the j-th unmasked item goes to the j-th slot in the
        // order (age descending, index ascending). Ages stay as they are
        // until every item is placed, so the order cannot shift under us;
        // slots are chosen in chunks that continue from the last key.
        let ages = &*self.ages;
        let age_key = |j: usize| Some((ages[j], core::cmp::Reverse(j)));
        let mut incoming = up
            .new_embeddings
            .iter()
            .zip(up.new_items)
            .enumerate()
            .filter(|(m, _)| up.new_mask.is_none_or(|mask| mask[*m]))
            .map(|(_, pair)| pair);
        let total = up.new_mask.map_or(up.new_items.len(), |m| m.iter().filter(|&&x| x).count());
        let mut placed = 0;
        let mut bound = None;
        let mut chosen = [0usize; 64];
        while placed < total {
            let want = (total - placed).min(chosen.len());
            // A block whose oldest slot is no older than the buffer's
            // youngest cannot enter it: at an equal age the lower index
            // ranks first, and the block's indices are all higher.
            let skip = |start: usize, (age, _): (i32, core::cmp::Reverse<usize>)| {
                ages[start..n.min(start + SKIP_BLOCK)].iter().fold(i32::MIN, |m, &a| m.max(a)) <= age
            };
            let (got, next) = select_top(n, &mut chosen[..want], bound, age_key, skip);
            for &slot in &chosen[..got] {
                if let Some((e, item)) = incoming.next() {
                    self.embeddings.set(slot, e);
                    self.items[slot] = *item;
                    self.keys[slot] = item.key();
                    self.occupied[slot] = true;
                    self.stamps[slot] = now;
                    placed += 1;
                }
            }
            bound = next;
            if got < want {
                break;
            }
        }
        // 3. Age every slot by one; the placed slots, exactly those ranked
        // at or above `bound`, start again at 0. One pass, no branch.
        let (any, last_age, last_index) = match bound {
            Some((age, core::cmp::Reverse(j))) if placed > 0 => (true, age, j),
            _ => (false, 0, 0),
        };
        for (j, a) in self.ages.iter_mut().enumerate() {
            let was_placed = any && (*a > last_age || (*a == last_age && j <= last_index));
            *a = if was_placed { 0 } else { a.saturating_add(1) };
        }
        *self.clock = now.wrapping_add(1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert(c: &mut CacheMut<'_, u32, 1>, items: &[u32], mask: Option<&[bool]>, ev: Eviction) -> Result<()> {
        let emb: heapless::Vec<[f32; 1], 16> = items.iter().map(|&i| [i as f32]).collect();
        c.update(&Update { new_embeddings: &emb, new_items: items, new_mask: mask, ..Update::default() }, ev)
    }

    /// A corpus written over a cache that already holds some of it (as a
    /// full-softmax step writes its corpus each step) gives every field the
    /// bits a cleared cache and the same writes give, keys included.
    #[test]
    fn a_corpus_written_again_gives_the_cleared_caches_state() {
        type Big = NegativeCache<[f32; 3], 6, 2>;
        let corpus = [[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0], [0.0, 1.0, 1.0], [-0.0, 7.0, 8.0], [0.0; 3]];
        let mut old = Big::new();
        let mut o = old.as_mut();
        // Slot 0: the same item; 1: the same item, emptied; 2: another
        // item; 3: an item equal to its corpus item as numbers, not as
        // bits; 4: empty (its item is EMPTY, the corpus item's value);
        // 5: past the corpus.
        let new = [[9.0f32, 9.0, 9.0], [0.0, 7.0, 8.0]];
        o.update(
            &Update { new_embeddings: &[[0.5, 0.5], [0.25, 1.0]], new_items: &new, ..Update::default() },
            Eviction::Fifo,
        )
        .unwrap();
        o.set_slot(0, &[1.0, 1.0], corpus[0], 3, true).unwrap();
        o.set_slot(1, &[1.0, 2.0], corpus[1], 1, true).unwrap();
        o.set_occupied(1, false).unwrap();
        o.set_slot(2, &[2.0, 2.0], new[0], 2, true).unwrap();
        o.set_slot(3, &[3.0, 3.0], new[1], 2, true).unwrap();
        o.set_slot(5, &[4.0, 4.0], new[0], 7, true).unwrap();
        assert!(o.as_ref().clock() > 0);
        let mut fresh = Big::new();
        let mut f = fresh.as_mut();
        f.clear();
        o.clear_past(corpus.len());
        for (j, item) in corpus.iter().enumerate() {
            let e = [j as f32, -(j as f32)];
            o.set_slot(j, &e, *item, 0, true).unwrap();
            f.set_slot(j, &e, *item, 0, true).unwrap();
        }
        let (o, f) = (o.as_ref(), f.as_ref());
        let bits = |c: &CacheRef<'_, [f32; 3], 2>| {
            let e = c.embeddings().as_f32().unwrap().iter().flatten().map(|x| x.to_bits());
            let items = c.items().iter().flatten().map(|x| x.to_bits());
            e.chain(items).collect::<heapless::Vec<u32, 64>>()
        };
        assert_eq!(bits(&o), bits(&f));
        assert_eq!(o.keys(), f.keys());
        assert_eq!(o.ages(), f.ages());
        assert_eq!(o.stamps(), f.stamps());
        assert_eq!(o.occupied(), f.occupied());
        assert_eq!(o.clock(), f.clock());
        for (j, item) in corpus.iter().enumerate() {
            assert_eq!(o.keys()[j], item.key(), "slot {j}");
        }
    }

    #[test]
    fn fifo_fills_empty_slots_then_replaces_the_oldest() {
        let mut cache = NegativeCache::<u32, 3, 1>::new();
        let mut c = cache.as_mut();
        insert(&mut c, &[10, 11], None, Eviction::Fifo).unwrap();
        // Worked by hand from the spec: all ages 0, so slots 0 and 1 (ties
        // to the lower index); after ageing 0, 0, 1.
        assert_eq!(c.as_ref().items(), &[10, 11, 0]);
        assert_eq!(c.as_ref().ages(), &[0, 0, 1]);
        assert_eq!(c.as_ref().occupied(), &[true, true, false]);
        insert(&mut c, &[12, 13], None, Eviction::Fifo).unwrap();
        // Highest age first: slot 2 (age 1), then slot 0 (age 0, lower index).
        assert_eq!(c.as_ref().items(), &[13, 11, 12]);
        assert_eq!(c.as_ref().ages(), &[0, 1, 0]);
        assert_eq!(c.as_ref().embeddings().as_f32().unwrap(), &[[13.0], [11.0], [12.0]]);
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn lru_refresh_protects_an_entry_and_fifo_does_not() {
        for (ev, want_slot) in [(Eviction::Lru, 1), (Eviction::Fifo, 0)] {
            let mut cache = NegativeCache::<u32, 2, 1>::new();
            let mut c = cache.as_mut();
            c.set_slot(0, &[1.0], 1, 5, true).unwrap();
            c.set_slot(1, &[2.0], 2, 3, true).unwrap();
            let up = Update {
                refresh_indices: &[0],
                refresh_embeddings: &[[7.0]],
                new_embeddings: &[[9.0]],
                new_items: &[9],
                ..Update::default()
            };
            c.update(&up, ev).unwrap();
            let r = c.as_ref();
            assert_eq!(r.items()[want_slot], 9, "{ev:?}");
            assert_eq!(r.embeddings().row(0), if want_slot == 0 { [9.0] } else { [7.0] });
            let want_ages: [i32; 2] = if ev == Eviction::Lru { [0, 0] } else { [0, 4] };
            assert_eq!(r.ages(), &want_ages, "{ev:?}");
        }
    }

    #[test]
    fn masked_items_count_but_are_not_written() {
        let mut cache = NegativeCache::<u32, 4, 1>::new();
        let mut c = cache.as_mut();
        for (j, age) in [0, 3, 2, 1].into_iter().enumerate() {
            c.set_slot(j, &[0.0], 100 + j as u32, age, true).unwrap();
        }
        insert(&mut c, &[1, 2, 3], Some(&[false, true, true]), Eviction::Fifo).unwrap();
        // Slot order by age: 1, 2, 3, 0. The unmasked items 2 and 3 go to
        // the first two of those.
        assert_eq!(c.as_ref().items(), &[100, 2, 3, 103]);
        assert_eq!(c.as_ref().ages(), &[1, 0, 0, 2]);
    }

    #[test]
    fn too_many_items_is_an_error_and_changes_nothing() {
        let mut cache = NegativeCache::<u32, 2, 1>::new();
        let mut c = cache.as_mut();
        let err = insert(&mut c, &[1, 2, 3], Some(&[false, false, true]), Eviction::Fifo);
        assert_eq!(err, Err(Error::CapacityExceeded { requested: 3, capacity: 2 }));
        let bad = Update { refresh_indices: &[5], refresh_embeddings: &[[1.0]], ..Update::default() };
        assert!(matches!(c.update(&bad, Eviction::Lru), Err(Error::IndexOutOfRange { .. })));
        let nan = Update { new_embeddings: &[[f32::NAN]], new_items: &[1], ..Update::default() };
        assert_eq!(c.update(&nan, Eviction::Lru), Err(Error::NonFinite { what: "new embedding" }));
        assert!(cache.is_empty());
        assert_eq!(cache.as_ref().ages(), &[0, 0]);
    }

    #[test]
    fn filter_ignores_empty_slots() {
        let mut cache = NegativeCache::<[u32; 2], 3, 1>::new();
        let mut c = cache.as_mut();
        c.set_slot(1, &[0.0], [4, 5], 0, true).unwrap();
        let mut keep = [false; 4];
        c.as_ref().filter_new(&[[4, 5], [4, 6], [0, 0], [5, 4]], &mut keep).unwrap();
        // [0, 0] equals the empty slots' filler but they hold nothing.
        assert_eq!(keep, [false, true, true, true]);
    }

    #[test]
    fn stalest_are_the_oldest_writes() {
        let mut cache = NegativeCache::<u32, 4, 1>::new();
        let mut c = cache.as_mut();
        insert(&mut c, &[1, 2], None, Eviction::Fifo).unwrap(); // written at 0
        insert(&mut c, &[3, 4], None, Eviction::Fifo).unwrap(); // written at 1
        let up = Update { refresh_indices: &[0], refresh_embeddings: &[[5.0]], ..Update::default() };
        c.update(&up, Eviction::Fifo).unwrap(); // slot 0 rewritten at 2
        let mut out = [0usize; 3];
        assert_eq!(c.as_ref().stalest(&mut out), 3);
        assert_eq!(out, [1, 2, 3]);
    }

    #[test]
    fn large_inserts_take_several_selection_passes() {
        // 150 items into 200 slots: three chunks of up to 64.
        let mut cache = NegativeCache::<u32, 200, 1>::new();
        let mut c = cache.as_mut();
        let items: [u32; 150] = core::array::from_fn(|i| i as u32 + 1);
        let emb: [[f32; 1]; 150] = core::array::from_fn(|i| [i as f32]);
        let up = Update { new_embeddings: &emb, new_items: &items, ..Update::default() };
        c.update(&up, Eviction::Fifo).unwrap();
        let r = c.as_ref();
        assert!((0..150).all(|j| r.items()[j] == j as u32 + 1 && r.ages()[j] == 0));
        assert!((150..200).all(|j| !r.occupied()[j] && r.ages()[j] == 1));
        // The next 100 go to the 50 empty slots, then to slots 0..50.
        let up = Update { new_embeddings: &emb[..100], new_items: &items[..100], ..Update::default() };
        c.update(&up, Eviction::Fifo).unwrap();
        let r = c.as_ref();
        assert!((150..200).all(|j| r.items()[j] == j as u32 - 149));
        assert!((0..50).all(|j| r.items()[j] == j as u32 + 51));
        assert_eq!(r.ages()[50], 1);
    }
}
