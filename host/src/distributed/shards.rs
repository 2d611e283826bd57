//! Which shard holds what: the owner of every item, a shard taken from a
//! cache in the single-process layout (a resumed checkpoint), and the
//! shards gathered back into one cache (a checkpoint written).

use std::collections::HashMap;

use anyhow::{bail, ensure};
use negcache::cache::{CacheRef, SlotsMut};
use negcache::Item;

use super::comm::Comm;
use crate::featurize::{ItemTokens, ITEM_TOKENS};
use crate::session::DIM;
use crate::store::OwnedCache;

/// Which process's shard holds an item: its corpus index modulo P.
/// Items with one key (identical tokens: identical text, without the
/// item-id token) count as the first of them, because the in-cache filter
/// and the accidental-hit mask compare keys: every copy must live in one
/// shard for them to see it.
#[derive(Debug)]
pub struct Owners {
    first: HashMap<u64, u32>,
    size: usize,
}

impl Owners {
    /// The owners of `items` (the corpus, in order) among `size` processes.
    pub fn new(items: &[ItemTokens], size: usize) -> Self {
        let mut first = HashMap::with_capacity(items.len());
        for (i, t) in items.iter().enumerate() {
            first.entry(t.key()).or_insert(i as u32);
        }
        Self { first, size }
    }

    /// The process that owns `item`, or `None` if it is not in the corpus.
    pub fn of(&self, item: &ItemTokens) -> Option<usize> {
        self.first.get(&item.key()).map(|&i| i as usize % self.size)
    }
}

/// Words per slot on the wire: embedding, item, age, stamp, occupied.
const SLOT_WORDS: usize = DIM + ITEM_TOKENS + 3;

/// Copies slot `j` of `from` into slot `k` of `to` (its key is left to a
/// `rekey`).
fn copy_slot(from: &CacheRef<'_, ItemTokens, DIM>, j: usize, to: &mut SlotsMut<'_, ItemTokens, DIM>, k: usize) {
    to.embeddings.set(k, &from.embeddings().row(j));
    to.items[k] = from.items()[j];
    to.ages[k] = from.ages()[j];
    to.stamps[k] = from.stamps()[j];
    to.occupied[k] = from.occupied()[j];
}

/// Takes this process's shard out of `all`, a cache in the single-process
/// layout (slots `0..N`), into `shard` (`N/P` slots). With `same_layout`
/// (a checkpoint of a distributed run with as many processes), shard `r`
/// is block `r`, copied as it was. Otherwise the shard takes the occupied
/// slots whose items it owns, in slot order (the youngest `N/P` if it owns
/// more), and its other slots are empty and as old as a never-written
/// slot, so that they fill first. The shard's clock is `all`'s.
pub(super) fn take_shard(
    all: &CacheRef<'_, ItemTokens, DIM>,
    shard: &mut OwnedCache<ItemTokens, DIM>,
    rank: usize,
    owners: &Owners,
    same_layout: bool,
) -> anyhow::Result<()> {
    let n = shard.capacity();
    let picked: Vec<usize> = if same_layout {
        (rank * n..(rank + 1) * n).collect()
    } else {
        let mut owned = Vec::new();
        for j in (0..all.capacity()).filter(|&j| all.occupied()[j]) {
            match owners.of(&all.items()[j]) {
                Some(o) if o == rank => owned.push(j),
                Some(_) => {}
                None => bail!("the checkpoint's cache holds an item (slot {j}) that is not in this dataset"),
            }
        }
        if owned.len() > n {
            owned.sort_by_key(|&j| (all.ages()[j], j));
            owned.truncate(n);
            owned.sort_unstable();
        }
        owned
    };
    let clock = all.clock();
    let mut to = shard.slots_mut();
    for (k, &j) in picked.iter().enumerate() {
        copy_slot(all, j, &mut to, k);
    }
    for k in picked.len()..n {
        to.embeddings.set(k, &[0.0; DIM]);
        to.items[k] = ItemTokens::EMPTY;
        to.ages[k] = clock.min(i32::MAX as u32) as i32;
        to.stamps[k] = 0;
        to.occupied[k] = false;
    }
    *to.clock = clock;
    shard.as_mut().rekey();
    Ok(())
}

/// Gathers every process's shard on process 0 into one cache of
/// `P * N/P` slots, shard `r` in slots `r N/P .. (r + 1) N/P`, with the
/// shards' common clock; `None` on the other processes. Collective.
pub(super) fn gather(
    comm: &mut Comm,
    shard: &CacheRef<'_, ItemTokens, DIM>,
) -> anyhow::Result<Option<OwnedCache<ItemTokens, DIM>>> {
    let n = shard.capacity();
    let mut words = Vec::with_capacity(n * SLOT_WORDS + 1);
    for j in 0..n {
        words.extend(shard.embeddings().row(j).iter().map(|x| x.to_bits()));
        words.extend_from_slice(&shard.items()[j]);
        words.extend([shard.ages()[j] as u32, shard.stamps()[j], shard.occupied()[j] as u32]);
    }
    words.push(shard.clock());
    let Some(all) = comm.gather_to_root("checkpoint", &words) else {
        return Ok(None);
    };
    let block = words.len();
    let clock = shard.clock();
    for r in 0..comm.size() {
        ensure!(all[(r + 1) * block - 1] == clock, "the cache shards' clocks differ");
    }
    let mut global = OwnedCache::new(comm.size() * n)?;
    let mut to = global.slots_mut();
    let records = (0..comm.size()).flat_map(|r| all[r * block..(r + 1) * block - 1].chunks_exact(SLOT_WORDS));
    for (k, w) in records.enumerate() {
        to.embeddings.set(k, &std::array::from_fn(|i| f32::from_bits(w[i])));
        to.items[k] = std::array::from_fn(|i| w[DIM + i]);
        let t = DIM + ITEM_TOKENS;
        to.ages[k] = w[t] as i32;
        to.stamps[k] = w[t + 1];
        to.occupied[k] = w[t + 2] != 0;
    }
    *to.clock = clock;
    global.as_mut().rekey();
    Ok(Some(global))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_follow_the_first_identical_item() {
        let items = [[1u32; ITEM_TOKENS], [2; ITEM_TOKENS], [1; ITEM_TOKENS], [3; ITEM_TOKENS]];
        let o = Owners::new(&items, 2);
        assert_eq!(o.of(&items[0]), Some(0));
        assert_eq!(o.of(&items[1]), Some(1));
        assert_eq!(o.of(&items[2]), Some(0), "a copy lives where the first one does");
        assert_eq!(o.of(&items[3]), Some(1));
        assert_eq!(o.of(&[9; ITEM_TOKENS]), None);
    }

    #[test]
    fn a_shard_takes_its_own_items_youngest_first_and_empty_slots_as_old_as_the_clock() {
        // Six slots holding items 0..5 (item j owned by process j mod 2),
        // slot 4 empty; process 0 takes a shard of two slots: of items 0
        // and 2 (item 4's slot is empty) it keeps both, in slot order.
        let items: Vec<ItemTokens> = (0..6).map(|j| [j + 1; ITEM_TOKENS]).collect();
        let owners = Owners::new(&items, 2);
        let mut all = OwnedCache::<ItemTokens, DIM>::new(6).expect("a cache");
        let mut c = all.as_mut();
        for (j, item) in items.iter().enumerate() {
            c.set_slot(j, &[j as f32; DIM], *item, 10 - j as i32, j != 4).expect("a slot");
        }
        *all.slots_mut().clock = 7;
        let mut shard = OwnedCache::new(2).expect("a shard");
        take_shard(&all.as_ref(), &mut shard, 0, &owners, false).expect("a shard");
        let s = shard.as_ref();
        assert_eq!(s.items(), &[items[0], items[2]]);
        assert_eq!(s.ages(), &[10, 8]);
        assert_eq!(s.clock(), 7);
        assert_eq!(s.position(&items[2]), Some(1), "keys recomputed");
        // Process 1 owns items 1, 3 and 5 for two slots: the youngest two
        // (5 at age 5, 3 at age 7), in slot order.
        let mut shard = OwnedCache::new(2).expect("a shard");
        take_shard(&all.as_ref(), &mut shard, 1, &owners, false).expect("a shard");
        assert_eq!(shard.as_ref().items(), &[items[3], items[5]]);
        // A shard of three for process 0: items 0 and 2, then an empty slot
        // as old as the clock.
        let mut shard = OwnedCache::new(3).expect("a shard");
        take_shard(&all.as_ref(), &mut shard, 0, &owners, false).expect("a shard");
        assert_eq!(shard.as_ref().occupied(), &[true, true, false]);
        assert_eq!(shard.as_ref().ages()[2], 7);
    }
}
