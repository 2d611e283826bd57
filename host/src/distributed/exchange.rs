//! Cache updates between shards (steps 11 and 12 of the module docs):
//! each fresh negative goes back to the shard that holds it, each positive
//! to the shard that owns it, and each shard applies them with the core's
//! `CacheMut::refresh` and `CacheMut::update`, in the order one cache
//! applies them.

use anyhow::{bail, ensure, Context};
use negcache::cache::Update;
use negcache::loss::relative_staleness;
use negcache::{Eviction, Item};

use super::comm::{count, Comm};
use super::sampler::Draw;
use super::shards::Owners;
use crate::featurize::ItemTokens;
use crate::session::DIM;
use crate::store::OwnedCache;

const KIND_REFRESH: u32 = 0;
const KIND_INSERT: u32 = 1;
/// Words per record: kind, slot or global query, embedding.
const WORDS: usize = 2 + DIM;

/// One step's records of this process's queries.
pub(super) struct Outgoing<'a> {
    /// The draws of the local queries.
    pub draws: &'a [Draw],
    /// Their picks' fresh embeddings: row `b * neg + i` for pick `i` of
    /// query `b` (rows past a query's picks are ignored).
    pub fresh: &'a [[f32; DIM]],
    /// Rows of `fresh` per query.
    pub neg: usize,
    /// Their positives' items and fresh embeddings.
    pub positives: &'a [ItemTokens],
    /// See `positives`.
    pub positive_rows: &'a [[f32; DIM]],
    /// The global index of the first local query.
    pub first_query: usize,
}

/// The buffers of the exchange.
#[derive(Debug, Default)]
pub(super) struct Exchange {
    words: Vec<u32>,
    words_in: Vec<u32>,
    refresh_slots: Vec<usize>,
    refresh_rows: Vec<[f32; DIM]>,
    cached_slots: Vec<usize>,
    cached_rows: Vec<[f32; DIM]>,
    new_items: Vec<ItemTokens>,
    new_rows: Vec<[f32; DIM]>,
    seen: Vec<u64>,
}

impl Exchange {
    /// Sends this process's records to their shards and applies the
    /// records sent to this one to `shard`. `all_positives` are the step's
    /// positives of every process in global query order (what the draw
    /// gathered). Returns this shard's staleness sum and count over the
    /// negatives it refreshed. Collective.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        comm: &mut Comm,
        shard: &mut OwnedCache<ItemTokens, DIM>,
        owners: &Owners,
        out: Outgoing<'_>,
        all_positives: &[ItemTokens],
        streaming: bool,
        eviction: Eviction,
    ) -> anyhow::Result<(f32, f32)> {
        // Each positive's owner, looked up once rather than once per shard:
        // the shard that holds it (then refreshed, as the single-process
        // trainer refreshes cached positives) or would insert it.
        let owner: Vec<Option<usize>> = out.positives.iter().map(|y| owners.of(y)).collect();
        self.words.clear();
        let mut counts = vec![0; comm.size()];
        for (dest, c) in counts.iter_mut().enumerate() {
            let start = self.words.len();
            for (b, own) in owner.iter().enumerate() {
                for (i, pick) in out.draws[b].picks().iter().enumerate().filter(|(_, k)| k.shard == dest) {
                    self.words.extend([KIND_REFRESH, pick.slot]);
                    self.words.extend(out.fresh[b * out.neg + i].iter().map(|x| x.to_bits()));
                }
                if *own == Some(dest) {
                    self.words.extend([KIND_INSERT, (out.first_query + b) as u32]);
                    self.words.extend(out.positive_rows[b].iter().map(|x| x.to_bits()));
                }
            }
            *c = count(self.words.len() - start);
        }
        comm.all_to_all_v("update", &self.words, &counts, &mut self.words_in);

        // Records arrive by sending process, each in its query order: global
        // query order, the order one cache applies them in.
        self.refresh_slots.clear();
        self.refresh_rows.clear();
        self.cached_slots.clear();
        self.cached_rows.clear();
        self.new_items.clear();
        self.new_rows.clear();
        self.seen.clear();
        let (mut stale_sum, mut stale_count) = (0.0f32, 0.0f32);
        let cache = shard.as_ref();
        let n = cache.capacity();
        for r in self.words_in.chunks_exact(WORDS) {
            let e: [f32; DIM] = std::array::from_fn(|i| f32::from_bits(r[2 + i]));
            match r[0] {
                KIND_REFRESH => {
                    let slot = r[1] as usize;
                    ensure!(slot < n, "a refresh of slot {slot} of a shard of {n}");
                    stale_sum += relative_staleness(&cache.embeddings().row(slot), &e);
                    stale_count += 1.0;
                    self.refresh_slots.push(slot);
                    self.refresh_rows.push(e);
                }
                KIND_INSERT => {
                    let item = *all_positives.get(r[1] as usize).context("an insert for an unknown query")?;
                    let key = item.key();
                    if let Some(slot) = cache.position_of_key(key) {
                        self.cached_slots.push(slot);
                        self.cached_rows.push(e);
                    } else if streaming && !self.seen.contains(&key) {
                        self.new_items.push(item);
                        self.new_rows.push(e);
                    }
                    self.seen.push(key);
                }
                k => bail!("unknown update record kind {k}"),
            }
        }
        // First the cached positives (a refresh, no ageing), then the drawn
        // negatives and the inserts: the single-process order.
        let mut cache = shard.as_mut();
        let positives =
            Update { refresh_indices: &self.cached_slots, refresh_embeddings: &self.cached_rows, ..Update::default() };
        cache.refresh(&positives, eviction)?;
        let up = Update {
            refresh_indices: &self.refresh_slots,
            refresh_embeddings: &self.refresh_rows,
            refresh_mask: None,
            new_embeddings: &self.new_rows,
            new_items: &self.new_items,
            new_mask: None,
        };
        cache.update(&up, eviction)?;
        Ok((stale_sum, stale_count))
    }
}
