//! A trainer of one of the standard model shapes, behind one object-safe
//! trait so that the rest of the host is written once.
//!
//! The shapes are fixed at compile time (the core sizes everything with
//! const generics); what varies at run time is the tying of the towers,
//! which picks one of three types, the cache's capacity, which sizes its
//! storage ([`OwnedCache`]), and every setting of the trainer. A trainer
//! and its cache are a [`CachedTrainer`], which also writes and reads the
//! checkpoint body; a distributed run's replicas are ones too.

use std::sync::Arc;

use negcache::layers::ParamVisitor;
use negcache::storage::{Precision, Stored, StoredMut};
use negcache::tower::{SeparateTowers, SharedTokenTowers, SiameseTowers, Side, TokenModel, TowerConfig, Towers};
use negcache::trainer::{Batch, StepReport, Trainer, TrainerConfig};
use rand_pcg::Pcg64Mcg;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Reader, Writer};
use crate::featurize::{ItemTokens, QueryTokens, ITEM_TOKENS};
use crate::memory::boxed;
use crate::store::OwnedCache;
use crate::threads::{self, Threads};

/// Rows of each token table.
pub const BUCKETS: usize = 1 << 15;
/// Token embedding width.
pub const E: usize = 64;
/// Hidden width of the towers' MLP.
pub const H: usize = 128;
/// Output embedding dimension.
pub const DIM: usize = 64;
/// Optimiser-state slots (enough for Adam).
pub const S: usize = 2;
/// The largest cache capacity a run may ask for (2^24 slots, about 4.6 GB
/// at this shape). The cache is allocated at the configured capacity, not
/// at this bound.
pub const MAX_CAPACITY: usize = 1 << 24;
/// Largest batch.
pub const BATCH: usize = 256;
/// Negatives drawn per query: the paper's one, or two or four (independent
/// draws, or Gumbel-top-m with Horvitz-Thompson weights: see
/// `--sampler`) as other shapes.
pub const NEG: usize = 1;
/// The third shape's negatives per query.
pub const NEG_MANY: usize = 4;
/// The second shape's negatives per query.
pub const NEG_TWO: usize = 2;
/// Every negatives-per-query count a session can be built with.
pub const NEGATIVES: [usize; 3] = [NEG, NEG_TWO, NEG_MANY];

/// How the two towers share parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
pub enum Tying {
    /// Separate query and item towers.
    Separate,
    /// One token table, two MLPs.
    SharedTokens,
    /// One tower for both sides (the default).
    #[default]
    Siamese,
}

/// What the host needs of a trainer, whatever its model type.
pub trait Session: Send + Sync {
    /// Initialises the model from `rng` and the trainer.
    fn init(&mut self, rng: &mut Pcg64Mcg) -> negcache::Result<()>;
    /// Corpus mode: fills the cache with every item.
    fn fill_cache(&mut self, corpus: &[ItemTokens]) -> negcache::Result<u32>;
    /// One step.
    fn step(
        &mut self,
        batch: &Batch<'_, QueryTokens, ItemTokens>,
        corpus: &[ItemTokens],
        lr: f32,
        rng: &mut Pcg64Mcg,
    ) -> negcache::Result<StepReport>;
    /// Runs the following steps' scoring pass (and the full softmax's
    /// corpus embedding and first softmax pass) on `threads` (the result
    /// does not depend on them).
    fn set_threads(&mut self, threads: Arc<Threads>);
    /// Embeds with one tower.
    fn embed(&self, side: Side, tokens: &[u32], out: &mut [f32; DIM]);
    /// The trainer's settings.
    fn config(&self) -> &TrainerConfig;
    /// Sets the cache objective's control variate (see
    /// `negcache::trainer::Trainer::set_control_variate`).
    fn set_control_variate(&mut self, beta: Option<f32>) -> negcache::Result<()>;
    /// Writes parameters, optimiser state and cache.
    fn save(&mut self, w: &mut Writer);
    /// Reads what [`Session::save`] wrote.
    fn load(&mut self, r: &mut Reader<'_>) -> anyhow::Result<()>;
    /// Bytes of trainer state (model, optimiser state, cache, buffers).
    fn state_bytes(&self) -> usize;
    /// The first part of the state holding a NaN or an infinity
    /// ("parameters", "optimiser state", "cache embeddings"), if any.
    fn non_finite(&mut self) -> Option<&'static str>;
}

/// The trainer of the standard shapes, with `N` negatives per query.
pub type TokenTrainer<M, const N: usize> = Trainer<M, QueryTokens, ItemTokens, DIM, BATCH, N>;

type T<M, const N: usize> = TokenTrainer<M, N>;

/// A trainer and the cache it trains with, the latter allocated at the
/// configured capacity: every [`Session`] [`new_session`] builds, and a
/// distributed run's replica (whose cache is its process's shard).
///
/// Its checkpoint body has three sections: `PARM` (every parameter tensor
/// and its optimiser state, in `Model::visit`'s order), `OPTM` (the
/// optimiser's step count), both written by [`CachedTrainer::save_model`],
/// and `CACH` (every slot of the cache, then its clock; [`save_cache`]).
///
/// # Generics
/// - `M`: the towers.
/// - `N`: negatives drawn per query (the core trainer's `NEG`), one of
///   [`NEGATIVES`] for a session.
pub struct CachedTrainer<M, const N: usize> {
    /// The towers, the optimiser and the step's buffers.
    pub trainer: Box<TokenTrainer<M, N>>,
    /// The cache the trainer is lent at every call.
    pub cache: OwnedCache<ItemTokens, DIM>,
    /// The threads the step's scoring pass (and the full softmax's corpus
    /// embedding and first softmax pass) runs on: the process's
    /// ([`threads::shared`], started at the first step) unless set.
    pub threads: Option<Arc<Threads>>,
}

impl<M, const N: usize> std::fmt::Debug for CachedTrainer<M, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedTrainer")
            .field("negatives", &N)
            .field("cache_capacity", &self.cache.capacity())
            .finish_non_exhaustive()
    }
}

impl<M, const N: usize> CachedTrainer<M, N>
where
    M: Towers<QueryTokens, ItemTokens, DIM> + TokenModel<DIM> + Send + Sync,
{
    /// `trainer` with an empty cache of that shape (both initialised by
    /// [`Session::init`]), stepping on the process's threads
    /// ([`threads::shared`]) unless told otherwise.
    pub fn new(trainer: Box<TokenTrainer<M, N>>, cache: CacheShape) -> anyhow::Result<Self> {
        Ok(Self { trainer, cache: OwnedCache::with_precision(cache.capacity, cache.precision)?, threads: None })
    }

    /// Writes the `PARM` and `OPTM` sections: the towers, their optimiser
    /// state and the optimiser's step count.
    pub fn save_model(&mut self, w: &mut Writer) {
        w.tag(b"PARM");
        self.trainer.model.visit(&mut SaveParams(w));
        w.tag(b"OPTM");
        w.u64(self.trainer.optimizer().t as u64);
    }

    /// Reads what [`CachedTrainer::save_model`] wrote.
    pub fn load_model(&mut self, r: &mut Reader<'_>) -> anyhow::Result<()> {
        r.tag(b"PARM")?;
        let mut load = LoadParams { r, err: None };
        self.trainer.model.visit(&mut load);
        if let Some(e) = load.err {
            return Err(e);
        }
        r.tag(b"OPTM")?;
        self.trainer.optimizer_mut().t = u32::try_from(r.u64()?)?;
        Ok(())
    }
}

/// Writes the `CACH` section: every slot of `cache`, field by field, then
/// its clock.
pub fn save_cache(cache: &OwnedCache<ItemTokens, DIM>, w: &mut Writer) {
    let c = cache.as_ref();
    w.tag(cache_tag(c.precision()));
    match c.embeddings() {
        Stored::F32(r) => w.f32s(r.as_flattened()),
        Stored::Bf16(r) => w.bytes(&r.as_flattened().iter().flat_map(|h| h.to_le_bytes()).collect::<Vec<_>>()),
        Stored::Int8 { rows, scales } => {
            w.bytes(&rows.as_flattened().iter().map(|&q| q as u8).collect::<Vec<_>>());
            w.f32s(scales);
        }
    }
    w.u32s(c.items().as_flattened());
    w.u32s(&c.ages().iter().map(|&a| a as u32).collect::<Vec<_>>());
    w.u32s(c.stamps());
    w.u32s(&c.occupied().iter().map(|&o| o as u32).collect::<Vec<_>>());
    w.u64(c.clock() as u64);
}

/// Reads what [`save_cache`] wrote into a cache of the same capacity, and
/// recomputes its keys.
pub fn load_cache(cache: &mut OwnedCache<ItemTokens, DIM>, r: &mut Reader<'_>) -> anyhow::Result<()> {
    r.tag(cache_tag(cache.precision()))?;
    let slots = cache.slots_mut();
    match slots.embeddings {
        StoredMut::F32(e) => r.f32s_into(e.as_flattened_mut())?,
        StoredMut::Bf16(e) => {
            let mut raw = vec![0u8; 2 * e.as_flattened().len()];
            r.bytes_into(&mut raw)?;
            for (h, b) in e.as_flattened_mut().iter_mut().zip(raw.chunks_exact(2)) {
                *h = u16::from_le_bytes([b[0], b[1]]);
            }
        }
        StoredMut::Int8 { rows, scales } => {
            let mut raw = vec![0u8; rows.as_flattened().len()];
            r.bytes_into(&mut raw)?;
            for (q, &b) in rows.as_flattened_mut().iter_mut().zip(&raw) {
                *q = b as i8;
            }
            r.f32s_into(scales)?;
        }
    }
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

/// The cache section's tag: `CACH` for `f32` (the format before other
/// precisions existed), `CAB2` for bf16, `CAI8` for int8, so that a body
/// read with another precision fails at the tag.
fn cache_tag(precision: Precision) -> &'static [u8; 4] {
    match precision {
        Precision::F32 => b"CACH",
        Precision::Bf16 => b"CAB2",
        Precision::Int8 => b"CAI8",
    }
}

/// Bytes of the cache section of a cache of `capacity` slots stored in
/// `precision`, the last section of a checkpoint body.
pub fn cache_section_bytes(capacity: usize, precision: Precision) -> usize {
    // One length-prefixed array of rows (int8: then one of scales).
    let rows = 8 + capacity * precision.bytes_per_row(DIM) + if precision == Precision::Int8 { 8 } else { 0 };
    4 + rows + (8 + capacity * ITEM_TOKENS * 4) + 3 * (8 + capacity * 4) + 8
}

impl<M, const N: usize> Session for CachedTrainer<M, N>
where
    M: Towers<QueryTokens, ItemTokens, DIM> + TokenModel<DIM> + Send + Sync,
{
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
        let threads = self.threads.get_or_insert_with(threads::shared);
        self.trainer.step_on(&**threads, &mut self.cache.as_mut(), batch, corpus, lr, rng)
    }
    fn set_threads(&mut self, threads: Arc<Threads>) {
        self.threads = Some(threads);
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
        self.save_model(w);
        save_cache(&self.cache, w);
    }
    fn load(&mut self, r: &mut Reader<'_>) -> anyhow::Result<()> {
        self.load_model(r)?;
        load_cache(&mut self.cache, r)?;
        r.finish()
    }
    fn state_bytes(&self) -> usize {
        size_of::<T<M, N>>() + self.cache.bytes()
    }
    fn non_finite(&mut self) -> Option<&'static str> {
        let mut check = FiniteCheck::default();
        self.trainer.model.visit(&mut check);
        if check.values {
            return Some("parameters");
        }
        if check.state {
            return Some("optimiser state");
        }
        (!self.cache.as_ref().embeddings().all_finite()).then_some("cache embeddings")
    }
}

/// Finds non-finite parameters and optimiser state.
#[derive(Default)]
struct FiniteCheck {
    values: bool,
    state: bool,
}

impl FiniteCheck {
    fn check(&mut self, value: &[f32], state: &[&mut [f32]]) {
        self.values |= !value.iter().all(|x| x.is_finite());
        self.state |= !state.iter().all(|s| s.iter().all(|x| x.is_finite()));
    }
}

impl ParamVisitor for FiniteCheck {
    fn dense(&mut self, value: &mut [f32], _: &mut [f32], state: &mut [&mut [f32]]) {
        self.check(value, state);
    }
    fn sparse(&mut self, _: usize, value: &mut [f32], _: &mut [f32], state: &mut [&mut [f32]], _: &[bool]) {
        self.check(value, state);
    }
}

/// A cache's size and how it stores its embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    /// Slots.
    pub capacity: usize,
    /// The stored embeddings' precision.
    pub precision: Precision,
}

/// A trainer of the standard shape with the given tying and negatives
/// per query (one of [`NEGATIVES`]), and a cache of that shape.
pub fn new_session(
    tying: Tying,
    negatives: usize,
    cache: CacheShape,
    tower: TowerConfig,
    cfg: TrainerConfig,
) -> anyhow::Result<Box<dyn Session>> {
    type Sep = SeparateTowers<BUCKETS, E, H, DIM, S>;
    type Shared = SharedTokenTowers<BUCKETS, E, H, DIM, S>;
    type Siam = SiameseTowers<BUCKETS, E, H, DIM, S>;
    fn run<M: Towers<QueryTokens, ItemTokens, DIM> + TokenModel<DIM> + Send + Sync + 'static, const N: usize>(
        trainer: Box<T<M, N>>,
        shape: CacheShape,
    ) -> anyhow::Result<Box<dyn Session>> {
        Ok(Box::new(CachedTrainer::new(trainer, shape)?))
    }
    Ok(match (tying, negatives) {
        (Tying::Separate, NEG) => run(boxed(move || T::<_, NEG>::new(Sep::new(tower), cfg))?, cache)?,
        (Tying::SharedTokens, NEG) => run(boxed(move || T::<_, NEG>::new(Shared::new(tower), cfg))?, cache)?,
        (Tying::Siamese, NEG) => run(boxed(move || T::<_, NEG>::new(Siam::new(tower), cfg))?, cache)?,
        (Tying::Separate, NEG_MANY) => run(boxed(move || T::<_, NEG_MANY>::new(Sep::new(tower), cfg))?, cache)?,
        (Tying::SharedTokens, NEG_MANY) => run(boxed(move || T::<_, NEG_MANY>::new(Shared::new(tower), cfg))?, cache)?,
        (Tying::Siamese, NEG_MANY) => run(boxed(move || T::<_, NEG_MANY>::new(Siam::new(tower), cfg))?, cache)?,
        (Tying::Separate, NEG_TWO) => run(boxed(move || T::<_, NEG_TWO>::new(Sep::new(tower), cfg))?, cache)?,
        (Tying::SharedTokens, NEG_TWO) => run(boxed(move || T::<_, NEG_TWO>::new(Shared::new(tower), cfg))?, cache)?,
        (Tying::Siamese, NEG_TWO) => run(boxed(move || T::<_, NEG_TWO>::new(Siam::new(tower), cfg))?, cache)?,
        (_, n) => anyhow::bail!("negatives per query must be one of {NEGATIVES:?}, got {n}"),
    })
}

/// Writes every parameter tensor and its optimiser state.
struct SaveParams<'a>(&'a mut Writer);

impl ParamVisitor for SaveParams<'_> {
    fn dense(&mut self, value: &mut [f32], _: &mut [f32], state: &mut [&mut [f32]]) {
        self.0.f32s(value);
        state.iter().for_each(|s| self.0.f32s(s));
    }
    fn sparse(&mut self, _: usize, value: &mut [f32], _: &mut [f32], state: &mut [&mut [f32]], _: &[bool]) {
        self.0.f32s(value);
        state.iter().for_each(|s| self.0.f32s(s));
    }
}

/// Reads what [`SaveParams`] wrote, keeping the first error.
struct LoadParams<'a, 'b> {
    r: &'a mut Reader<'b>,
    err: Option<anyhow::Error>,
}

impl LoadParams<'_, '_> {
    fn read(&mut self, value: &mut [f32], state: &mut [&mut [f32]]) {
        if self.err.is_some() {
            return;
        }
        let res = self.r.f32s_into(value).and_then(|()| state.iter_mut().try_for_each(|s| self.r.f32s_into(s)));
        if let Err(e) = res {
            self.err = Some(e);
        }
    }
}

impl ParamVisitor for LoadParams<'_, '_> {
    fn dense(&mut self, value: &mut [f32], _: &mut [f32], state: &mut [&mut [f32]]) {
        self.read(value, state);
    }
    fn sparse(&mut self, _: usize, value: &mut [f32], _: &mut [f32], state: &mut [&mut [f32]], _: &[bool]) {
        self.read(value, state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::SeedableRng;

    #[test]
    fn a_body_read_back_is_written_again_byte_for_byte_and_ends_with_its_cache_section() {
        for precision in [Precision::F32, Precision::Bf16, Precision::Int8] {
            body_round_trip(precision);
        }
    }

    fn body_round_trip(precision: Precision) {
        type Sep = SeparateTowers<BUCKETS, E, H, DIM, S>;
        let (tower, cfg, capacity) = (TowerConfig::DEFAULT, TrainerConfig::DEFAULT, 24);
        let new = || {
            let trainer = boxed(move || T::<Sep, NEG>::new(Sep::new(tower), cfg)).expect("a trainer");
            CachedTrainer::new(trainer, CacheShape { capacity, precision }).expect("a cache")
        };
        let mut run = new();
        run.init(&mut Pcg64Mcg::seed_from_u64(3)).expect("init");
        let items: Vec<ItemTokens> = (0..5).map(|j| [j + 1; ITEM_TOKENS]).collect();
        run.fill_cache(&items).expect("fill");
        let mut a = Writer::default();
        run.save(&mut a);
        let mut back = new();
        back.init(&mut Pcg64Mcg::seed_from_u64(4)).expect("init");
        back.load(&mut Reader::new(&a.0)).expect("load");
        assert_eq!(back.cache.as_ref().position(&items[3]), Some(3), "keys recomputed on load");
        let mut b = Writer::default();
        back.save(&mut b);
        assert!(a.0 == b.0, "{precision:?}: a body read back is written differently");
        let e = |c: &OwnedCache<ItemTokens, DIM>| c.as_ref().embeddings().row(2);
        assert_eq!(e(&back.cache), e(&run.cache));
        assert_ne!(e(&back.cache), [0.0; DIM]);
        let mut cache = Writer::default();
        save_cache(&run.cache, &mut cache);
        assert_eq!(cache.0.len(), cache_section_bytes(capacity, precision));
        assert!(a.0.ends_with(&cache.0), "the cache section is not last");
        assert_eq!(&cache.0[..4], cache_tag(precision));
        // A body read with another precision fails at the cache's tag.
        let other = if precision == Precision::Int8 { Precision::F32 } else { Precision::Int8 };
        let trainer = boxed(move || T::<Sep, NEG>::new(Sep::new(tower), cfg)).expect("a trainer");
        let mut wrong = CachedTrainer::new(trainer, CacheShape { capacity, precision: other }).expect("a cache");
        let err = wrong.load(&mut Reader::new(&a.0)).expect_err("another precision");
        assert!(err.to_string().contains("expected section"), "{err}");
    }
}
