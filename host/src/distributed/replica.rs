//! One process's replica: a [`CachedTrainer`] of the standard shape whose
//! cache is this process's shard, allocated at the shard's capacity. Its
//! checkpoint body is `session`'s: the same code writes and reads it for
//! both kinds of run.

use negcache::layers::EmbeddingBag;
use negcache::storage::Precision;
use negcache::tower::{TokenModel, TowerConfig, Towers, TwoTower};
use negcache::trainer::TrainerConfig;

use crate::featurize::{ItemTokens, QueryTokens};
use crate::memory::boxed;
use crate::session::{cache_section_bytes, CacheShape, CachedTrainer, TokenTrainer, BUCKETS, DIM, E, H, NEG, S};

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

/// A trainer and the cache shard it trains with. The trainer's own
/// negatives-per-query shape is one, as it only refreshes entries and
/// holds the towers and optimiser; the worker draws and weighs the step's
/// negatives itself.
pub(super) type Replica<M> = CachedTrainer<M, NEG>;

/// A replica with zero towers and an empty cache of `capacity` slots
/// (initialised by `Session::init`).
pub(super) fn new_replica<M: Replicated>(
    tower: TowerConfig,
    cfg: TrainerConfig,
    capacity: usize,
) -> anyhow::Result<Replica<M>> {
    let trainer = boxed(move || TokenTrainer::<M, NEG>::new(M::with_config(tower), cfg))?;
    CachedTrainer::new(trainer, CacheShape { capacity, precision: Precision::F32 })
}

/// CRC-32 of a checkpoint body without its cache section (of `capacity`
/// slots, the run's `cache_capacity`): the towers, the optimiser state and
/// step count, which must be identical on every process of a distributed
/// run.
pub fn model_checksum(body: &[u8], capacity: usize) -> u32 {
    crc32fast::hash(&body[..body.len().saturating_sub(cache_section_bytes(capacity, Precision::F32))])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{Reader, Writer};
    use crate::featurize::ITEM_TOKENS;
    use crate::session::{new_session, CacheShape, Session, Tying};
    use negcache::tower::SharedTokenTowers;
    use rand_core::SeedableRng;
    use rand_pcg::Pcg64Mcg;

    #[test]
    fn a_replica_writes_a_single_process_sessions_body_and_the_checksum_skips_its_cache() {
        // The same seed, shape and capacity: a replica built through
        // `Replicated` (as a distributed run builds it) writes what a
        // single-process session writes, so either run resumes the other's
        // checkpoints and one process reproduces `negcache train`.
        let (tower, cfg, capacity) = (TowerConfig::DEFAULT, TrainerConfig::DEFAULT, 24);
        let mut single =
            new_session(Tying::SharedTokens, NEG, CacheShape { capacity, precision: Precision::F32 }, tower, cfg)
                .expect("a session");
        single.init(&mut Pcg64Mcg::seed_from_u64(3)).expect("init");
        type Shared = SharedTokenTowers<BUCKETS, E, H, DIM, S>;
        let mut replica = new_replica::<Shared>(tower, cfg, capacity).expect("a replica");
        replica.init(&mut Pcg64Mcg::seed_from_u64(3)).expect("init");
        let items: Vec<ItemTokens> = (0..5).map(|j| [j + 1; ITEM_TOKENS]).collect();
        single.fill_cache(&items).expect("fill");
        replica.fill_cache(&items).expect("fill");
        let (mut a, mut b) = (Writer::default(), Writer::default());
        single.save(&mut a);
        replica.save(&mut b);
        assert!(a.0 == b.0, "a replica's body differs from a single-process session's");
        // The checksum covers exactly what `save_model` writes, and what
        // every process's `checksums` hashes.
        let mut model = Writer::default();
        replica.save_model(&mut model);
        assert_eq!(model_checksum(&a.0, capacity), crc32fast::hash(&model.0));
        // A replica reads a session's body back.
        let mut other = new_replica::<Shared>(tower, cfg, capacity).expect("a replica");
        other.load(&mut Reader::new(&a.0)).expect("load");
        assert_eq!(other.cache.as_ref().position(&items[3]), Some(3), "keys recomputed on load");
    }
}
