//! One process's replica: the core's trainer (towers, optimiser, step
//! buffers) and this process's shard of the cache, allocated at the shard's
//! capacity; and the checkpoint body in the single-process format.
//!
//! The body has the sections `session`'s single-process sessions write:
//! `PARM` (every parameter tensor and its optimiser state, in visiting
//! order), `OPTM` (the optimiser's step count) and `CACH` (every slot of
//! the cache, then its clock). `session` keeps its pairing of a trainer
//! with a cache private, so the writer and reader are repeated here; the
//! test below holds them to `session`'s bytes.

use negcache::layers::EmbeddingBag;
use negcache::tower::{Side, TokenModel, TowerConfig, Towers, TwoTower};
use negcache::trainer::{Batch, StepReport, Trainer, TrainerConfig};
use rand_pcg::Pcg64Mcg;

use super::params::each_tensor;
use crate::checkpoint::{Reader, Writer};
use crate::featurize::{ItemTokens, QueryTokens, ITEM_TOKENS};
use crate::memory::boxed;
use crate::session::{Session, BATCH, BUCKETS, DIM, E, H, NEG, S};
use crate::store::OwnedCache;

/// A model a distributed run can train: the standard towers, whose token
/// tables can be reached so that rows another process touched can be
/// marked touched here (see `EmbeddingBag::touch`).
pub trait Replicated: Towers<QueryTokens, ItemTokens, DIM> + TokenModel<DIM> + Send + Sync + Sized + 'static {
    /// Zero parameters with the given settings.
    fn with_config(cfg: TowerConfig) -> Self;
    /// The token tables, in the order `Model::visit` shows them.
    fn tables(&mut self) -> &mut [EmbeddingBag<BUCKETS, E, S>];
}

impl<const T: usize, const M: usize> Replicated for TwoTower<T, M, BUCKETS, E, H, DIM, S> {
    fn with_config(cfg: TowerConfig) -> Self {
        Self::new(cfg)
    }
    fn tables(&mut self) -> &mut [EmbeddingBag<BUCKETS, E, S>] {
        self.tables_mut()
    }
}

/// The trainer of a replica.
pub(super) type Tr<M> = Trainer<M, QueryTokens, ItemTokens, DIM, BATCH, NEG>;

/// A trainer and the cache shard it trains with.
pub(super) struct Replica<M> {
    pub trainer: Box<Tr<M>>,
    pub cache: OwnedCache<ItemTokens, DIM>,
}

impl<M: Replicated> Replica<M> {
    /// A trainer with zero towers and an empty cache of `capacity` slots
    /// (initialised by `Session::init`).
    pub fn new(tower: TowerConfig, cfg: TrainerConfig, capacity: usize) -> anyhow::Result<Self> {
        let trainer = boxed(move || Tr::<M>::new(M::with_config(tower), cfg))?;
        Ok(Self { trainer, cache: OwnedCache::new(capacity)? })
    }
}

/// Writes the `PARM` and `OPTM` sections: the towers, their optimiser
/// state and the optimiser's step count, equal on every process.
pub(super) fn save_model<M: Replicated>(trainer: &mut Tr<M>, w: &mut Writer) {
    w.tag(b"PARM");
    each_tensor(&mut trainer.model, |t| {
        w.f32s(t.value);
        t.state.iter().for_each(|s| w.f32s(s));
    });
    w.tag(b"OPTM");
    w.u64(trainer.optimizer().t as u64);
}

/// Writes the `CACH` section: every slot of `cache`, then its clock.
pub(super) fn save_cache(cache: &mut OwnedCache<ItemTokens, DIM>, w: &mut Writer) {
    w.tag(b"CACH");
    let slots = cache.slots_mut();
    w.f32s(slots.embeddings.as_flattened());
    w.u32s(slots.items.as_flattened());
    w.u32s(&slots.ages.iter().map(|&a| a as u32).collect::<Vec<_>>());
    w.u32s(slots.stamps);
    w.u32s(&slots.occupied.iter().map(|&o| o as u32).collect::<Vec<_>>());
    w.u64(*slots.clock as u64);
}

/// Reads what [`save_model`] wrote.
pub(super) fn load_model<M: Replicated>(trainer: &mut Tr<M>, r: &mut Reader<'_>) -> anyhow::Result<()> {
    r.tag(b"PARM")?;
    let mut read = Ok(());
    each_tensor(&mut trainer.model, |t| {
        if read.is_ok() {
            read = r.f32s_into(t.value).and_then(|()| t.state.iter_mut().try_for_each(|s| r.f32s_into(s)));
        }
    });
    read?;
    r.tag(b"OPTM")?;
    trainer.optimizer_mut().t = u32::try_from(r.u64()?)?;
    Ok(())
}

/// Reads what [`save_cache`] wrote into a cache of the same capacity, and
/// recomputes its keys.
pub(super) fn load_cache(cache: &mut OwnedCache<ItemTokens, DIM>, r: &mut Reader<'_>) -> anyhow::Result<()> {
    r.tag(b"CACH")?;
    let slots = cache.slots_mut();
    r.f32s_into(slots.embeddings.as_flattened_mut())?;
    r.u32s_into(slots.items.as_flattened_mut())?;
    let mut tmp = vec![0u32; slots.ages.len()];
    r.u32s_into(&mut tmp)?;
    slots.ages.iter_mut().zip(&tmp).for_each(|(a, &t)| *a = t as i32);
    r.u32s_into(slots.stamps)?;
    r.u32s_into(&mut tmp)?;
    slots.occupied.iter_mut().zip(&tmp).for_each(|(o, &t)| *o = t != 0);
    *slots.clock = u32::try_from(r.u64()?)?;
    cache.as_mut().rekey();
    Ok(())
}

/// Bytes of the `CACH` section of a cache of `capacity` slots, at the end
/// of a checkpoint body.
pub fn cache_section_bytes(capacity: usize) -> usize {
    4 + (8 + capacity * DIM * 4) + (8 + capacity * ITEM_TOKENS * 4) + 3 * (8 + capacity * 4) + 8
}

/// CRC-32 of a checkpoint body without its cache section (of `capacity`
/// slots, the run's `cache_capacity`): the towers, the optimiser state and
/// step count, which must be identical on every process of a distributed
/// run.
pub fn model_checksum(body: &[u8], capacity: usize) -> u32 {
    crc32fast::hash(&body[..body.len().saturating_sub(cache_section_bytes(capacity))])
}

/// The replica seen as a single-process session over its shard: what
/// evaluation and the run's summary read.
impl<M: Replicated> Session for Replica<M> {
    fn init(&mut self, rng: &mut Pcg64Mcg) -> negcache::Result<()> {
        self.trainer.model.init(rng);
        self.trainer.init()?;
        self.trainer.check_cache(self.cache.capacity())?;
        self.cache.as_mut().clear();
        Ok(())
    }
    fn fill_cache(&mut self, corpus: &[ItemTokens]) -> negcache::Result<u32> {
        self.trainer.fill_cache(&mut self.cache.as_mut(), corpus)
    }
    fn step(
        &mut self,
        batch: &Batch<'_, QueryTokens, ItemTokens>,
        corpus: &[ItemTokens],
        lr: f32,
        rng: &mut Pcg64Mcg,
    ) -> negcache::Result<StepReport> {
        self.trainer.step(&mut self.cache.as_mut(), batch, corpus, lr, rng)
    }
    fn embed(&self, side: Side, tokens: &[u32], out: &mut [f32; DIM]) {
        self.trainer.model.embed(side, tokens, out)
    }
    fn config(&self) -> &TrainerConfig {
        self.trainer.config()
    }
    fn set_control_variate(&mut self, beta: Option<f32>) -> negcache::Result<()> {
        self.trainer.set_control_variate(beta)
    }
    fn save(&mut self, w: &mut Writer) {
        save_model(&mut self.trainer, w);
        save_cache(&mut self.cache, w);
    }
    fn load(&mut self, r: &mut Reader<'_>) -> anyhow::Result<()> {
        load_model(&mut self.trainer, r)?;
        load_cache(&mut self.cache, r)?;
        r.finish()
    }
    fn state_bytes(&self) -> usize {
        size_of::<Tr<M>>() + self.cache.bytes()
    }
    fn non_finite(&mut self) -> Option<&'static str> {
        let (mut values, mut state) = (false, false);
        each_tensor(&mut self.trainer.model, |t| {
            values |= !t.value.iter().all(|x| x.is_finite());
            state |= !t.state.iter().all(|s| s.iter().all(|x| x.is_finite()));
        });
        let cache = !self.cache.as_ref().embeddings().as_flattened().iter().all(|x| x.is_finite());
        [(values, "parameters"), (state, "optimiser state"), (cache, "cache embeddings")]
            .into_iter()
            .find_map(|(bad, part)| bad.then_some(part))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{new_session, Tying};
    use negcache::tower::SharedTokenTowers;
    use rand_core::SeedableRng;

    #[test]
    fn the_body_is_the_single_process_sessions_and_its_cache_section_is_at_the_end() {
        // The same seed, shape and capacity: a replica writes, reads back
        // and writes again exactly what a single-process session writes.
        let (tower, cfg, capacity) = (TowerConfig::DEFAULT, TrainerConfig::DEFAULT, 24);
        let mut single = new_session(Tying::SharedTokens, NEG, capacity, tower, cfg).expect("a session");
        single.init(&mut Pcg64Mcg::seed_from_u64(3)).expect("init");
        type Shared = SharedTokenTowers<BUCKETS, E, H, DIM, S>;
        let mut replica = Replica::<Shared>::new(tower, cfg, capacity).expect("a replica");
        replica.init(&mut Pcg64Mcg::seed_from_u64(3)).expect("init");
        let items: Vec<ItemTokens> = (0..5).map(|j| [j + 1; ITEM_TOKENS]).collect();
        single.fill_cache(&items).expect("fill");
        replica.fill_cache(&items).expect("fill");
        let (mut a, mut b) = (Writer::default(), Writer::default());
        single.save(&mut a);
        replica.save(&mut b);
        assert!(a.0 == b.0, "a replica's body differs from a single-process session's");
        replica.load(&mut Reader::new(&a.0)).expect("load");
        assert_eq!(replica.cache.as_ref().position(&items[3]), Some(3), "keys recomputed on load");
        let mut c = Writer::default();
        replica.save(&mut c);
        assert!(c.0 == a.0, "a body read back is written differently");
        let at = a.0.len() - cache_section_bytes(capacity);
        assert_eq!(&a.0[at..at + 4], b"CACH");
        let mut model = Writer::default();
        save_model(&mut replica.trainer, &mut model);
        assert_eq!(model_checksum(&a.0, capacity), crc32fast::hash(&model.0));
    }
}
