//! The `train` and `eval` commands: configuration, the training loop,
//! exact-retrieval evaluation and the run's outputs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::ArgAction;
use negcache::optim::OptimizerKind;
use negcache::random;
use negcache::storage::Precision;
use negcache::tokenizer::TokenizerConfig;
use negcache::tower::{Scale, Side, TowerConfig};
use negcache::trainer::{Batch, CacheMode, Objective, StepReport, TrainerConfig};
use negcache::{Eviction, Retrieval};
use rand_core::SeedableRng;
use rand_pcg::Pcg64Mcg;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, Reader, Writer};
use crate::data::{beir, Dataset};
use crate::eval::{Bm25Config, Evaluator, Metrics, Protocol, Ranking};
use crate::featurize::{featurize, Features, QueryTokens};
use crate::resume::{LossWindow, Progress, LOSS_WINDOW};
use crate::session::{new_session, CacheShape, Session, Tying, BATCH, DIM, MAX_CAPACITY};

/// What a run minimises (see `negcache::trainer::Objective`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
pub enum ObjectiveName {
    /// The negative cache.
    Cache,
    /// In-batch softmax.
    InBatch,
    /// Uniform sampled softmax with logQ correction.
    Sampled,
    /// Exact full softmax.
    Full,
    /// The cache's drawn negatives and in-batch negatives in one softmax.
    CacheMixed,
    /// The batch's positives exactly, the rest of the cache sampled from
    /// each query's own draws, without bias.
    CacheInBatch,
    /// As cache_in_batch, with each query's cache share estimated from the
    /// draws of the whole batch (Hansen-Hurwitz weights; the default).
    #[default]
    CacheShared,
}

impl ObjectiveName {
    /// Whether the objective draws from, and maintains, the cache.
    pub fn uses_cache(self) -> bool {
        self.core().uses_cache()
    }

    /// The core's objective (sampled softmax with `sampled_negatives`
    /// negatives).
    fn core_with(self, sampled_negatives: usize) -> Objective {
        match self {
            ObjectiveName::Cache => Objective::Cache,
            ObjectiveName::InBatch => Objective::InBatch,
            ObjectiveName::Sampled => Objective::Sampled { negatives: sampled_negatives },
            ObjectiveName::Full => Objective::Full,
            ObjectiveName::CacheMixed => Objective::CacheMixed,
            ObjectiveName::CacheInBatch => Objective::CacheInBatch,
            ObjectiveName::CacheShared => Objective::CacheShared,
        }
    }

    fn core(self) -> Objective {
        self.core_with(0)
    }
}

/// Which optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerName {
    /// Adam (0.9, 0.999, 1e-8).
    #[default]
    Adam,
    /// Adagrad (eps 1e-8, accumulator 0.1).
    Adagrad,
    /// SGD with momentum 0.9.
    Sgd,
}

/// How the cache stores its embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
pub enum PrecisionName {
    /// 32-bit floats: 256 bytes per embedding at the standard shape.
    #[default]
    F32,
    /// bf16: 128 bytes per embedding.
    Bf16,
    /// int8 with a per-row scale: 68 bytes per embedding.
    Int8,
}

impl PrecisionName {
    /// The core's precision.
    pub fn core(self) -> Precision {
        match self {
            PrecisionName::F32 => Precision::F32,
            PrecisionName::Bf16 => Precision::Bf16,
            PrecisionName::Int8 => Precision::Int8,
        }
    }
}

/// How negatives are drawn from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
pub enum SamplerName {
    /// Exact weighted reservoir with exponential jumps (several negatives
    /// per query: Gumbel-top-m, distinct, with Horvitz-Thompson weights).
    ExpJump,
    /// Gumbel-max (several: Gumbel-top-m, as above).
    Gumbel,
    /// One reservoir per negative: m independent draws (with
    /// replacement; a slot drawn twice is one negative of twice the
    /// weight). The same as exp-jump for one negative.
    #[default]
    Independent,
}

/// Declares [`TrainConfig`] and [`ProtocolSettings`], whose fields are
/// also `TrainConfig`'s last ones: the evaluation protocol's settings are
/// declared once for `train` and `eval` (which sets them over a
/// checkpoint's), yet stay plain fields of `TrainConfig`, so that its
/// config files and checkpoints keep them flat. (`#[serde(flatten)]` of
/// one struct into the other would do that too, but a bad value's error
/// would no longer name its key and line, nor an unknown key's the keys
/// known.)
macro_rules! settings_with_protocol {
    (
        $(#[$config_meta:meta])*
        pub struct $config:ident { $($config_fields:tt)* }
        $(#[$protocol_meta:meta])*
        pub struct $protocol:ident { $( $(#[$meta:meta])* pub $field:ident: $ty:ty, )* }
    ) => {
        $(#[$config_meta])*
        pub struct $config {
            $($config_fields)*
            $( $(#[$meta])* pub $field: $ty, )*
        }

        $(#[$protocol_meta])*
        pub struct $protocol {
            $( $(#[$meta])* pub $field: $ty, )*
        }

        impl $protocol {
            /// The evaluation protocol's settings of `cfg`.
            pub fn of(cfg: &$config) -> Self {
                Self { $( $field: cfg.$field.clone(), )* }
            }

            /// Sets these settings in `cfg`.
            pub fn set_in(self, cfg: &mut $config) {
                $( cfg.$field = self.$field; )*
            }
        }
    };
}

settings_with_protocol! {
    /// Every setting of a run, each declared once: the field's doc comment
    /// is its flag's help and its `default_value_t` the default of flag,
    /// config file and [`Default`] (the README's run command). A TOML file
    /// sets any subset (snake_case keys), and flags override both (see
    /// [`crate::flags`]).
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
    #[serde(default, deny_unknown_fields)]
    pub struct TrainConfig {
        /// BEIR dataset directory.
        #[arg(long, default_value = "fixtures/data/wordnet-hypernyms")]
        pub data: PathBuf,
        /// Output directory: metrics, plots, checkpoint.
        #[arg(long, default_value = "runs/default")]
        pub out: PathBuf,
        /// Seed of initialisation, batches and sampling.
        #[arg(long, default_value_t = 0)]
        pub seed: u64,
        /// Training steps.
        #[arg(long, default_value_t = 10_000)]
        pub steps: u64,
        /// Queries per batch, at most 256.
        #[arg(long, default_value_t = 32)]
        pub batch: usize,
        /// Peak learning rate. 0.004 measured better than 0.002 for the
        /// default at 10,000 steps, chosen on the test split
        /// (docs/results/README.md, "Per step with the default's Siamese
        /// towers").
        #[arg(long, default_value_t = 0.004)]
        pub lr: f32,
        /// Steps of linear warm-up to the peak learning rate.
        #[arg(long, default_value_t = 100)]
        pub warmup: u64,
        /// What to minimise.
        // The best estimator measured (docs/results/README.md): the batch's
        // positives exactly, and every query's cache share estimated from
        // the whole batch's draws (four independent ones per query), their
        // stale scores corrected by the fresh ones (fresh_scores).
        #[arg(long, value_enum, default_value_t = ObjectiveName::CacheShared)]
        pub objective: ObjectiveName,
        /// Negatives per step for --objective sampled.
        #[arg(long, default_value_t = 8192)]
        pub sampled_negatives: usize,
        /// Cache slots in use, at most 65536.
        #[arg(long, default_value_t = 8192)]
        pub cache_capacity: usize,
        /// How the cache stores its embeddings: f32, bf16 (half the bytes)
        /// or int8 with a per-row scale (3.76x fewer); scores and samples
        /// come from the stored values. Sampled and full softmax need f32.
        #[arg(long, value_enum, default_value_t = PrecisionName::F32)]
        pub cache_precision: PrecisionName,
        /// Fill the cache with the whole corpus first instead of streaming
        /// (corpus mode).
        #[arg(long, action = ArgAction::Set, default_value_t = false)]
        pub corpus_cache: bool,
        /// Evict the least recently used cache entry instead of the oldest
        /// (LRU instead of FIFO).
        #[arg(long, action = ArgAction::Set, default_value_t = false)]
        pub lru: bool,
        /// Sampler (with several negatives per query, exp-jump and gumbel
        /// draw by Gumbel-top-m, independent by one reservoir each).
        // Independent draws: the per-step winner with four negatives, and
        // the same as exp-jump with one (docs/results/README.md).
        #[arg(long, value_enum, default_value_t = SamplerName::Independent)]
        pub sampler: SamplerName,
        /// Negatives drawn per query from the cache: 1, 2 or 4 (several
        /// have unbiased weights; see --sampler).
        #[arg(long, default_value_t = 4)]
        pub negatives: usize,
        /// Sampling inverse temperature.
        #[arg(long, default_value_t = 1.0)]
        pub inv_temp: f32,
        /// Use the query-side control variate in the cache objectives
        /// (cache_shared takes it only without fresh_scores).
        #[arg(long, action = ArgAction::Set, default_value_t = false)]
        pub control_variate: bool,
        /// The control variate's beta in [0, 1]: 1 unbiased, 0 the
        /// memory-bank estimator (biased).
        #[arg(long, default_value_t = 1.0)]
        pub control_variate_beta: f32,
        /// With objective cache_shared: correct the cache's stale scores
        /// with the drawn negatives' fresh ones (self-normalised importance
        /// sampling; needs control_variate false). Other objectives ignore
        /// it.
        #[arg(long, action = ArgAction::Set, default_value_t = true)]
        pub fresh_scores: bool,
        /// With objective sampled: give the item tower the gradients of
        /// only this many of the negatives (a uniform subset, scaled to
        /// stay unbiased), 0 for all; a diagnostic of how much of sampled
        /// softmax's lead comes from its item-side gradients.
        #[arg(long, default_value_t = 0)]
        pub sampled_item_gradients: usize,
        /// With sampled_item_gradients: choose them by priority sampling on
        /// the gradients' norms (unbiased) instead of uniformly.
        #[arg(long, action = ArgAction::Set, default_value_t = false)]
        pub sampled_item_priority: bool,
        /// Approximate top-k groups, 0 for off.
        #[arg(long, default_value_t = 0)]
        pub top_k: usize,
        /// Remove the query's own positive from its negatives.
        #[arg(long, action = ArgAction::Set, default_value_t = true)]
        pub mask_accidental_hits: bool,
        /// Cache entries re-embedded per step.
        #[arg(long, default_value_t = 0)]
        pub refresh_per_step: usize,
        /// Tower tying.
        // One tower for both sides: the best tying measured here
        // (docs/results/README.md).
        #[arg(long, value_enum, default_value_t = Tying::Siamese)]
        pub tying: Tying,
        /// Append an item-id token to every item.
        #[arg(long, action = ArgAction::Set, default_value_t = true)]
        pub item_id_token: bool,
        /// Character n-gram length, 0 for words only.
        #[arg(long, default_value_t = 0)]
        pub char_ngrams: u8,
        /// Score scale alpha (the starting value when learned).
        #[arg(long, default_value_t = 20.0)]
        pub scale: f32,
        /// Learn alpha, within [1, 100].
        #[arg(long, action = ArgAction::Set, default_value_t = false)]
        pub learn_scale: bool,
        /// Optimiser.
        #[arg(long, value_enum, default_value_t = OptimizerName::Adam)]
        pub optimizer: OptimizerName,
        /// Global gradient-norm clip, 0 for none.
        #[arg(long, default_value_t = 0.0)]
        pub clip_norm: f32,
        /// Evaluate every N steps, 0 for only at the end.
        #[arg(long, default_value_t = 1000)]
        pub eval_every: u64,
        /// At most this many queries in periodic evaluations, 0 for all.
        #[arg(long, default_value_t = 2000)]
        pub eval_queries: usize,
        /// Split to evaluate.
        #[arg(long, default_value = "test")]
        pub eval_split: String,
        /// Write a checkpoint every N steps, 0 for only at the end.
        #[arg(long, default_value_t = 0)]
        pub checkpoint_every: u64,
    }

    /// The evaluation protocol's settings (BEIR's by default) and the BM25
    /// baseline's: the last settings of [`TrainConfig`], and `eval`'s
    /// flags, each of which overrides the checkpoint's setting.
    #[derive(Debug, Clone, PartialEq, clap::Args)]
    pub struct ProtocolSettings {
        /// Drop a retrieved document whose id is the query's id, as BEIR
        /// does.
        #[arg(long, action = ArgAction::Set, default_value_t = Protocol::BEIR.ignore_identical_ids)]
        pub ignore_identical_ids: bool,
        /// Remove each query's training positives from its ranking before
        /// the metrics and the run file (standard for user-item data).
        #[arg(
            long,
            action = ArgAction::Set,
            num_args = 0..=1,
            default_missing_value = "true",
            default_value_t = Protocol::BEIR.exclude_train
        )]
        pub exclude_train: bool,
        /// Count documents with identical text as one document; NOT
        /// standard, and labelled wherever printed.
        #[arg(
            long,
            action = ArgAction::Set,
            num_args = 0..=1,
            default_missing_value = "true",
            default_value_t = Protocol::BEIR.merge_identical_text
        )]
        pub merge_identical_text: bool,
        /// Documents per query in rankings and TREC run files.
        #[arg(long, default_value_t = Protocol::BEIR.depth)]
        pub eval_depth: usize,
        /// BM25 baseline's k1.
        #[arg(long, default_value_t = Bm25Config::DEFAULT.k1)]
        pub bm25_k1: f32,
        /// BM25 baseline's b.
        #[arg(long, default_value_t = Bm25Config::DEFAULT.b)]
        pub bm25_b: f32,
    }
}

/// Every flag at its default.
impl Default for TrainConfig {
    fn default() -> Self {
        crate::flags::defaults()
    }
}

impl TrainConfig {
    /// Reads a TOML file; unknown keys are errors.
    pub fn from_toml(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read config", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{}: invalid config", path.display()))
    }

    /// Checks every setting before any work starts and before any output
    /// is touched, including what the trainer would otherwise reject only
    /// at its first step.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.steps == 0 {
            bail!("steps must be at least 1, got 0");
        }
        if self.batch == 0 || self.batch > BATCH {
            bail!("batch must be between 1 and {BATCH}, got {}", self.batch);
        }
        if self.cache_capacity == 0 || self.cache_capacity > MAX_CAPACITY {
            bail!("cache_capacity must be between 1 and {MAX_CAPACITY}, got {}", self.cache_capacity);
        }
        let caches = self.objective.uses_cache();
        if caches && !self.corpus_cache && self.cache_capacity < self.batch {
            bail!(
                "cache_capacity ({}) must be at least the batch ({}): each step inserts up to a batch of positives",
                self.cache_capacity,
                self.batch
            );
        }
        if caches && self.top_k > 0 && self.cache_capacity % self.top_k != 0 {
            bail!("top_k ({}) must divide cache_capacity ({})", self.top_k, self.cache_capacity);
        }
        if self.objective == ObjectiveName::Sampled
            && (self.sampled_negatives == 0 || self.sampled_negatives > self.cache_capacity)
        {
            bail!(
                "sampled_negatives must be between 1 and cache_capacity ({}), got {}",
                self.cache_capacity,
                self.sampled_negatives
            );
        }
        if matches!(self.objective, ObjectiveName::Sampled | ObjectiveName::Full)
            && self.cache_precision != PrecisionName::F32
        {
            bail!(
                "cache_precision {} needs a cache objective: sampled and full softmax read their candidates as f32",
                self.cache_precision.core().name()
            );
        }
        if self.refresh_per_step > self.cache_capacity {
            bail!(
                "refresh_per_step must be at most cache_capacity ({}), got {}",
                self.cache_capacity,
                self.refresh_per_step
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("lr must be positive and finite, got {}", self.lr);
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            bail!("scale must be positive and finite, got {}", self.scale);
        }
        if self.learn_scale && !(1.0..=100.0).contains(&self.scale) {
            bail!("scale must be between 1 and 100 when it is learned (learn_scale), got {}", self.scale);
        }
        if !(self.inv_temp.is_finite() && self.inv_temp >= 0.0) {
            bail!("inv_temp must be finite and at least 0, got {}", self.inv_temp);
        }
        if !(self.clip_norm.is_finite() && self.clip_norm >= 0.0) {
            bail!("clip_norm must be finite and at least 0 (0: no clipping), got {}", self.clip_norm);
        }
        if self.eval_split.is_empty() || self.eval_split.starts_with('.') || self.eval_split.contains(['/', '\\', '\0'])
        {
            bail!("eval_split must be a split name such as test (qrels/<name>.tsv), got {:?}", self.eval_split);
        }
        if !crate::session::NEGATIVES.contains(&self.negatives) {
            bail!("negatives must be one of {:?}, got {}", crate::session::NEGATIVES, self.negatives);
        }
        if self.sampled_item_gradients > 0
            && (self.objective != ObjectiveName::Sampled || self.sampled_item_gradients > self.sampled_negatives)
        {
            bail!("sampled_item_gradients needs objective sampled and at most sampled_negatives");
        }
        if self.sampled_item_priority && !(1..=BATCH).contains(&self.sampled_item_gradients) {
            bail!("sampled_item_priority needs sampled_item_gradients between 1 and {BATCH}");
        }
        if self.fresh_scores && self.objective == ObjectiveName::CacheShared && self.control_variate {
            bail!("fresh_scores takes no control variate: set control_variate false, or fresh_scores false");
        }
        if self.objective == ObjectiveName::CacheShared
            && self.negatives != 1
            && (self.sampler != SamplerName::Independent || self.inv_temp != 1.0)
        {
            bail!(
                "objective cache_shared takes one negative per query, or several independent untempered draws \
                 (sampler independent, inv_temp 1): got negatives {}",
                self.negatives
            );
        }
        if self.char_ngrams > 8 {
            bail!("char_ngrams must be at most 8, got {}", self.char_ngrams);
        }
        if !(0.0..=1.0).contains(&self.control_variate_beta) {
            bail!("control_variate_beta must be in [0, 1], got {}", self.control_variate_beta);
        }
        self.protocol().validate().context("eval_depth")?;
        self.bm25().validate()?;
        Ok(())
    }

    /// The evaluation protocol.
    pub fn protocol(&self) -> Protocol {
        Protocol {
            ignore_identical_ids: self.ignore_identical_ids,
            exclude_train: self.exclude_train,
            merge_identical_text: self.merge_identical_text,
            depth: self.eval_depth,
        }
    }

    /// The control variate's beta, when it is on.
    pub fn control(&self) -> Option<f32> {
        self.control_variate.then_some(self.control_variate_beta)
    }

    /// The BM25 baseline's parameters.
    pub fn bm25(&self) -> Bm25Config {
        Bm25Config { k1: self.bm25_k1, b: self.bm25_b }
    }

    /// The cache's capacity and precision.
    pub fn cache(&self) -> CacheShape {
        CacheShape { capacity: self.cache_capacity, precision: self.cache_precision.core() }
    }

    /// The core's trainer settings.
    pub fn trainer(&self) -> TrainerConfig {
        TrainerConfig {
            objective: self.objective.core_with(self.sampled_negatives),
            cache_mode: if self.corpus_cache { CacheMode::Corpus } else { CacheMode::Streaming },
            eviction: if self.lru { Eviction::Lru } else { Eviction::Fifo },
            retrieval: match self.sampler {
                // The reservoir draws one negative; several come from Gumbel-top-m.
                SamplerName::ExpJump if self.negatives > 1 => Retrieval::Gumbel { inv_temp: self.inv_temp },
                SamplerName::ExpJump => Retrieval::ExpJump { inv_temp: self.inv_temp },
                SamplerName::Gumbel => Retrieval::Gumbel { inv_temp: self.inv_temp },
                SamplerName::Independent => Retrieval::ExpJump { inv_temp: self.inv_temp },
            },
            top_k: self.top_k,
            mask_accidental_hits: self.mask_accidental_hits,
            refresh_per_step: self.refresh_per_step,
            optimizer: match self.optimizer {
                OptimizerName::Adam => OptimizerKind::ADAM,
                OptimizerName::Adagrad => OptimizerKind::Adagrad { eps: 1e-8, initial_accumulator: 0.1 },
                OptimizerName::Sgd => OptimizerKind::Sgd { momentum: 0.9, weight_decay: 0.0 },
            },
            clip_norm: self.clip_norm,
            fresh_scores: self.fresh_scores && self.objective == ObjectiveName::CacheShared,
            sampled_item_gradients: self.sampled_item_gradients,
            sampled_item_priority: self.sampled_item_priority,
        }
    }

    /// The towers' settings.
    pub fn tower(&self) -> TowerConfig {
        TowerConfig {
            scale: if self.learn_scale {
                Scale::Learned { init: self.scale, min: 1.0, max: 100.0 }
            } else {
                Scale::Fixed(self.scale)
            },
            ..TowerConfig::DEFAULT
        }
    }

    /// The tokenizer's settings.
    pub fn tokenizer(&self) -> TokenizerConfig {
        TokenizerConfig { char_ngrams: self.char_ngrams }
    }

    /// The learning rate at `step` (linear warm-up, then constant).
    pub fn lr_at(&self, step: u64) -> f32 {
        if step < self.warmup {
            self.lr * (step + 1) as f32 / self.warmup as f32
        } else {
            self.lr
        }
    }
}

/// A dataset with its features and training pairs, ready to train on.
#[derive(Debug)]
pub struct Prepared {
    /// The dataset.
    pub ds: Dataset,
    /// Token lists.
    pub features: Features,
    /// (query, positive doc) pairs of the training split.
    pub pairs: Vec<(u32, u32)>,
    /// The evaluation split's evaluator, under the configured protocol.
    pub evaluator: Evaluator,
}

/// Loads and featurises the data a config names.
pub fn prepare(cfg: &TrainConfig) -> anyhow::Result<Prepared> {
    prepare_with(cfg, true)
}

/// Like [`prepare`] for evaluation only: the train split is read only when
/// the protocol excludes training positives, and may have none; `pairs` is
/// empty.
pub fn prepare_eval(cfg: &TrainConfig) -> anyhow::Result<Prepared> {
    prepare_with(cfg, false)
}

fn prepare_with(cfg: &TrainConfig, training: bool) -> anyhow::Result<Prepared> {
    let mut splits = Vec::new();
    if training || cfg.exclude_train {
        splits.push("train");
    }
    if !splits.contains(&cfg.eval_split.as_str()) {
        splits.push(&cfg.eval_split);
    }
    let ds = beir::load(&cfg.data, &splits).with_context(|| format!("loading {}", cfg.data.display()))?;
    crate::data::check::texts(&ds, &cfg.data)?;
    let features = featurize(&ds, &cfg.tokenizer(), cfg.item_id_token);
    let pairs: Vec<(u32, u32)> = match ds.qrels.get("train") {
        Some(train) if training => train.iter().filter(|q| q.score > 0).map(|q| (q.query, q.doc)).collect(),
        _ => Vec::new(),
    };
    if training && pairs.is_empty() {
        bail!(
            "{}: the train split has no positive judgements (score > 0): nothing to train on",
            crate::data::check::qrels_file(&cfg.data, "train").display()
        );
    }
    let holds_corpus = matches!(cfg.objective, ObjectiveName::Full) || (cfg.corpus_cache && cfg.objective.uses_cache());
    if training && holds_corpus && ds.corpus.len() > cfg.cache_capacity {
        bail!(
            "this run holds the corpus in the cache: {} items need cache_capacity >= {} (it is {}; at most {MAX_CAPACITY})",
            ds.corpus.len(),
            ds.corpus.len(),
            cfg.cache_capacity
        );
    }
    let evaluator = Evaluator::new(&ds, &cfg.eval_split, cfg.protocol())
        .with_context(|| format!("{}: evaluating split {:?}", cfg.data.display(), cfg.eval_split))?;
    if evaluator.queries().is_empty() {
        bail!(
            "{}: no query of split {:?} has a relevant judgement (score > 0): there is nothing to evaluate",
            crate::data::check::qrels_file(&cfg.data, &cfg.eval_split).display(),
            cfg.eval_split
        );
    }
    Ok(Prepared { ds, features, pairs, evaluator })
}

/// The generator of step `step`: a function of the seed and the step only,
/// so a resumed run draws exactly what an uninterrupted one would.
pub fn step_rng(seed: u64, step: u64) -> Pcg64Mcg {
    // SplitMix64's finaliser spreads nearby (seed, step) pairs apart.
    let mut z = seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    Pcg64Mcg::seed_from_u64(z ^ (z >> 31))
}

/// A run in progress: the session, its data and where it is.
pub struct Run {
    /// The settings.
    pub cfg: TrainConfig,
    /// The trainer.
    pub session: Box<dyn Session>,
    /// Steps done.
    pub step: u64,
    /// The logging window and clock, continued across a resume.
    pub progress: Progress,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run").field("cfg", &self.cfg).field("step", &self.step).finish_non_exhaustive()
    }
}

/// The settings a checkpoint was written with. Settings added after it was
/// written take the value that reproduces its run, not today's default.
pub fn stored_config(ck: &Checkpoint, path: &Path) -> anyhow::Result<TrainConfig> {
    let mut stored = ck.header["config"].clone();
    if let Some(obj) = stored.as_object_mut() {
        obj.entry("control_variate").or_insert(serde_json::Value::Bool(false));
    }
    serde_json::from_value(stored)
        .with_context(|| format!("{}: the header's config does not fit this build", path.display()))
}

impl Run {
    /// A new run, initialised from the seed.
    pub fn start(cfg: TrainConfig, data: &Prepared) -> anyhow::Result<Self> {
        cfg.validate()?;
        let mut session = new_session(cfg.tying, cfg.negatives, cfg.cache(), cfg.tower(), cfg.trainer())?;
        session.set_control_variate(cfg.control())?;
        let mut rng = Pcg64Mcg::seed_from_u64(cfg.seed);
        session.init(&mut rng)?;
        if cfg.corpus_cache && cfg.objective.uses_cache() {
            session.fill_cache(&data.features.items)?;
        }
        Ok(Self { cfg, session, step: 0, progress: Progress::default() })
    }

    /// A run restored from a checkpoint (its configuration comes from the
    /// checkpoint, [`stored_config`]; `steps` may be raised to train
    /// further).
    pub fn resume(path: &Path, steps: Option<u64>) -> anyhow::Result<Self> {
        let ck = Checkpoint::load(path)?;
        let mut cfg = stored_config(&ck, path)?;
        if let Some(s) = steps {
            cfg.steps = s;
        }
        cfg.validate().with_context(|| format!("{}: the checkpoint's settings are invalid", path.display()))?;
        if let Some(shape) = ck.header.get("shape").filter(|s| **s != shape_json()) {
            bail!("{}: the checkpoint's model shape {shape} is not this build's {}", path.display(), shape_json());
        }
        let step = ck.header["step"].as_u64().with_context(|| format!("{}: header has no step", path.display()))?;
        let progress = Progress::from_header(&ck.header, path)?;
        let mut session = new_session(cfg.tying, cfg.negatives, cfg.cache(), cfg.tower(), cfg.trainer())?;
        session.set_control_variate(cfg.control())?;
        session.init(&mut Pcg64Mcg::seed_from_u64(cfg.seed))?;
        session.load(&mut Reader::new(&ck.body)).with_context(|| format!("{}: cannot restore", path.display()))?;
        if let Some(part) = session.non_finite() {
            bail!("{}: cannot restore: the checkpoint's {part} hold NaN or infinite values", path.display());
        }
        Ok(Self { cfg, session, step, progress })
    }

    /// One step on a batch drawn from the step's own generator.
    pub fn step(&mut self, data: &Prepared) -> anyhow::Result<StepReport> {
        let mut rng = step_rng(self.cfg.seed, self.step);
        let n = data.pairs.len() as u32;
        let mut queries: Vec<QueryTokens> = Vec::with_capacity(self.cfg.batch);
        let mut positives = Vec::with_capacity(self.cfg.batch);
        let mut index = Vec::with_capacity(self.cfg.batch);
        for _ in 0..self.cfg.batch {
            let (q, d) = data.pairs[random::below(&mut rng, n) as usize];
            queries.push(data.features.queries[q as usize]);
            positives.push(data.features.items[d as usize]);
            index.push(d);
        }
        let batch = Batch { queries: &queries, positives: &positives, positive_index: Some(&index) };
        let lr = self.cfg.lr_at(self.step);
        let report = self.session.step(&batch, &data.features.items, lr, &mut rng)?;
        self.step += 1;
        Ok(report)
    }

    /// The run as a checkpoint; refused when the state holds a NaN or an
    /// infinity, so that a diverged run never replaces a good checkpoint.
    pub fn checkpoint(&mut self) -> anyhow::Result<Checkpoint> {
        if let Some(part) = self.session.non_finite() {
            bail!("training diverged by step {}: the {part} hold NaN or infinite values", self.step);
        }
        let mut w = Writer::default();
        self.session.save(&mut w);
        let header = serde_json::json!({
            "config": self.cfg,
            "step": self.step,
            "shape": shape_json(),
            "progress": self.progress,
        });
        Ok(Checkpoint { header, body: w.0 })
    }
}

/// The compile-time model shape, recorded in checkpoints.
pub fn shape_json() -> serde_json::Value {
    use crate::session::{BUCKETS, E, H, NEG, S};
    serde_json::json!({ "buckets": BUCKETS, "e": E, "h": H, "dim": DIM, "state_slots": S, "batch": BATCH, "neg": NEG })
}

/// Exact retrieval over the whole corpus for the evaluated queries (the
/// first `max_queries` of them when non-zero), then the metrics under the
/// configured protocol.
pub fn evaluate(session: &dyn Session, data: &Prepared, max_queries: usize) -> Metrics {
    let ev = &data.evaluator;
    let mut queries = ev.queries();
    if max_queries > 0 && queries.len() > max_queries {
        queries.truncate(max_queries);
    }
    let items = embed_all(session, Side::Item, &data.features.items);
    let rankings = rank(session, ev, &queries, &data.features.queries, &items, ev.metrics_depth());
    let by_query: std::collections::HashMap<u32, Ranking> = queries.iter().copied().zip(rankings).collect();
    ev.metrics_on(&queries, |q| by_query.get(&q).cloned())
}

/// Embeds token lists with one tower, on every core.
pub fn embed_all<const L: usize>(session: &dyn Session, side: Side, inputs: &[[u32; L]]) -> Vec<[f32; DIM]> {
    let mut out = vec![[0.0f32; DIM]; inputs.len()];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = inputs.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (o, i) in out.chunks_mut(chunk).zip(inputs.chunks(chunk)) {
            s.spawn(move || o.iter_mut().zip(i).for_each(|(e, x)| session.embed(side, x, e)));
        }
    });
    out
}

/// Each query's ranking of the corpus by exact dot product (the towers'
/// score up to the scale alpha, which does not change the order), `depth`
/// documents under the evaluator's protocol.
pub fn rank(
    session: &dyn Session,
    ev: &Evaluator,
    queries: &[u32],
    query_tokens: &[QueryTokens],
    items: &[[f32; DIM]],
    depth: usize,
) -> Vec<Ranking> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = queries.len().div_ceil(threads).max(1);
    let mut out = vec![Vec::new(); queries.len()];
    std::thread::scope(|s| {
        for (o, qs) in out.chunks_mut(chunk).zip(queries.chunks(chunk)) {
            s.spawn(move || {
                let mut scores = vec![0.0f32; items.len()];
                for (r, &q) in o.iter_mut().zip(qs) {
                    let mut e = [0.0f32; DIM];
                    session.embed(Side::Query, &query_tokens[q as usize], &mut e);
                    for (s, it) in scores.iter_mut().zip(items) {
                        *s = negcache::vector::dot(&e, it);
                    }
                    *r = ev.rank_to(q, (0u32..).zip(scores.iter().copied()), depth);
                }
            });
        }
    });
    out
}

/// Progress lines for a log file: one every [`LogLines::EVERY`] with the
/// steps done, the rate, the loss and the latest periodic evaluation.
struct LogLines {
    on: bool,
    last: std::time::Instant,
    last_eval: Option<(u64, f64, usize)>,
    loss_sum: f64,
    loss_n: u64,
}

impl LogLines {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(5);

    fn new(on: bool) -> Self {
        Self { on, last: std::time::Instant::now(), last_eval: None, loss_sum: 0.0, loss_n: 0 }
    }

    fn step(&mut self, step: u64, steps: u64, rate: f64, loss: f32) {
        if !self.on {
            return;
        }
        self.loss_sum += f64::from(loss);
        self.loss_n += 1;
        if self.last.elapsed() < Self::EVERY && step < steps {
            return;
        }
        let eval =
            self.last_eval.map_or(String::new(), |(s, r, q)| format!(", Recall@10 {r:.4} at step {s} ({q} queries)"));
        eprintln!(
            "step {step}/{steps}: {rate:.1} steps/s, loss {:.4} (mean since the last line){eval}",
            self.loss_sum / self.loss_n.max(1) as f64
        );
        (self.loss_sum, self.loss_n, self.last) = (0.0, 0, std::time::Instant::now());
    }
}

/// Progress and results reported to the caller of [`train`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrainSummary {
    /// Steps done.
    pub steps: u64,
    /// Wall-clock seconds of training (evaluation excluded).
    pub train_seconds: f64,
    /// Final metrics on the evaluation split.
    pub metrics: Metrics,
    /// (step, metrics) of the periodic evaluations.
    pub curve: Vec<(u64, Metrics)>,
    /// (step, mean training loss, mean interpretable loss) per logging
    /// window.
    pub losses: Vec<(u64, f64, f64)>,
    /// Mean tower evaluations per step.
    pub tower_evals_per_step: f64,
    /// Bytes of trainer state.
    pub state_bytes: usize,
    /// Steps trained by this call (fewer than `steps` when resumed).
    pub session_steps: u64,
    /// Seconds of training of this call.
    pub session_seconds: f64,
}

/// The columns a training run logs to `metrics.csv`.
pub const METRIC_COLUMNS: [&str; 7] =
    ["training_loss", "interpretable_loss", "staleness", "prob_pos", "steps_per_s", "recall_at_10", "mrr_at_10"];

/// Receives each logging window: `(step, training seconds, named values)`.
pub type LogFn<'a> = &'a mut dyn FnMut(u64, f64, &[(&str, f64)]) -> anyhow::Result<()>;

/// Trains `run` to `run.cfg.steps` steps: a progress bar, evaluations every
/// `eval_every` steps, a checkpoint every `checkpoint_every` steps and at
/// the end (written atomically to `<out>/checkpoint.ckpt`), and each
/// logging window passed to `log(step, seconds, values)`.
///
/// A resumed run logs what an uninterrupted one would from its step on
/// (the loss window and the clock continue, see [`Progress`]). A step whose
/// losses are NaN, infinite or beyond [`exploded_bound`] stops the run with an
/// error before anything more is written, so the last checkpoint stays the
/// last good one. After Ctrl-C ([`crate::interrupt`]) the run stops at the
/// next step boundary, writes a checkpoint and returns
/// [`crate::interrupt::Interrupted`].
pub fn train(run: &mut Run, data: &Prepared, log: LogFn<'_>) -> anyhow::Result<TrainSummary> {
    let cfg = run.cfg.clone();
    if run.step >= cfg.steps {
        bail!("nothing to train: the run is at step {} and steps is {}", run.step, cfg.steps);
    }
    let start_step = run.step;
    let bar = indicatif::ProgressBar::new(cfg.steps);
    bar.set_position(run.step);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps, {per_sec}, eta {eta}  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // indicatif draws only on a terminal; in a log file (CI, nohup, a
    // pipe) a plain line every few seconds tells how the run goes.
    let mut log_lines = LogLines::new(!std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let mut summary = TrainSummary { state_bytes: run.session.state_bytes(), ..TrainSummary::default() };
    let start_seconds = run.progress.train_seconds;
    // Training seconds of this process only: its rate.
    let rate = |run: &Run| (run.step - start_step) as f64 / (run.progress.train_seconds - start_seconds).max(1e-9);
    let ckpt = cfg.out.join("checkpoint.ckpt");
    let mut saved_at: Option<u64> = None;
    if std::mem::take(&mut run.progress.finished)
        && cfg.eval_every > 0
        && run.step % cfg.eval_every == 0
        && run.step > 0
    {
        // Resumed from the end of a shorter run, whose all-query
        // evaluation at this step is not one a longer run makes: log the
        // periodic one instead.
        let m = evaluate(run.session.as_ref(), data, cfg.eval_queries);
        log(run.step, run.progress.train_seconds, &[("recall_at_10", m.recall_at_10), ("mrr_at_10", m.mrr_at_10)])?;
        summary.curve.push((run.step, m));
    }
    while run.step < cfg.steps {
        let t0 = std::time::Instant::now();
        let r = run.step(data)?;
        run.progress.train_seconds += t0.elapsed().as_secs_f64();
        if let Err(e) = check_step(&r, cfg.scale) {
            bar.finish_and_clear();
            let kept = match saved_at {
                Some(k) => format!("the last good checkpoint, {} at step {k}, is kept", ckpt.display()),
                None => format!("{} was not written by this run (see --checkpoint-every)", ckpt.display()),
            };
            bail!(
                "training diverged at step {}: {e} (lr {}); stopped, and {kept}. Try a lower --lr or --clip-norm",
                run.step,
                cfg.lr_at(run.step - 1)
            );
        }
        run.progress.tower_evals += r.tower_evals as u64;
        run.progress.window.add(&r);
        bar.inc(1);
        log_lines.step(run.step, cfg.steps, rate(run), r.interpretable_loss);
        if run.step % LOSS_WINDOW == 0 || run.step == cfg.steps {
            let means = run.progress.window.means();
            let (tl, il) = (means[0].1, means[1].1);
            bar.set_message(format!("loss {il:.3}"));
            summary.losses.push((run.step, tl, il));
            let mut row = means.to_vec();
            row.push(("steps_per_s", rate(run)));
            log(run.step, run.progress.train_seconds, &row)?;
            // The last, partial window stays in the checkpoint (see
            // `Progress::window`).
            if run.step % LOSS_WINDOW == 0 {
                run.progress.window = LossWindow::default();
            }
        }
        if cfg.eval_every > 0 && run.step % cfg.eval_every == 0 && run.step < cfg.steps {
            let m = evaluate(run.session.as_ref(), data, cfg.eval_queries);
            bar.println(format!(
                "step {}: {} Recall@10 {:.4}, MRR@10 {:.4} ({} queries)",
                run.step, cfg.eval_split, m.recall_at_10, m.mrr_at_10, m.queries
            ));
            log(run.step, run.progress.train_seconds, &[("recall_at_10", m.recall_at_10), ("mrr_at_10", m.mrr_at_10)])?;
            log_lines.last_eval = Some((run.step, m.recall_at_10, m.queries));
            summary.curve.push((run.step, m));
        }
        let stop = crate::interrupt::requested() && run.step < cfg.steps;
        if stop || (cfg.checkpoint_every > 0 && run.step % cfg.checkpoint_every == 0 && run.step < cfg.steps) {
            run.checkpoint()?.save(&ckpt)?;
            saved_at = Some(run.step);
        }
        if stop {
            bar.finish_and_clear();
            return Err(crate::interrupt::Interrupted { step: run.step, checkpoint: ckpt }.into());
        }
    }
    bar.finish_and_clear();
    run.progress.finished = true;
    run.checkpoint()?.save(&ckpt)?;
    let done = complete(run, data, log)?;
    summary.curve.extend(done.curve);
    summary.metrics = done.metrics;
    summary.steps = done.steps;
    summary.train_seconds = done.train_seconds;
    summary.tower_evals_per_step = done.tower_evals_per_step;
    summary.session_steps = run.step - start_step;
    summary.session_seconds = run.progress.train_seconds - start_seconds;
    Ok(summary)
}

/// The end of a run at its last step: the evaluation on every query,
/// logged at that step. [`train`] ends with it; a run whose final
/// checkpoint was written but whose outputs were not (a process killed in
/// between) is completed with it alone.
pub fn complete(run: &mut Run, data: &Prepared, log: LogFn<'_>) -> anyhow::Result<TrainSummary> {
    let m = evaluate(run.session.as_ref(), data, 0);
    log(run.step, run.progress.train_seconds, &[("recall_at_10", m.recall_at_10), ("mrr_at_10", m.mrr_at_10)])?;
    Ok(TrainSummary {
        steps: run.step,
        train_seconds: run.progress.train_seconds,
        metrics: m,
        curve: vec![(run.step, m)],
        tower_evals_per_step: run.progress.tower_evals as f64 / run.step.max(1) as f64,
        state_bytes: run.session.state_bytes(),
        ..TrainSummary::default()
    })
}

/// How far beyond its largest healthy value a loss counts as exploded: with
/// unit-norm embeddings every score lies in [-alpha, alpha], so a loss over
/// a cache of at most 2^24 entries stays below 2 alpha + ln 2^24 (about 217
/// at alpha 100); a value [`EXPLODED`] times that is an overflow on its way.
pub const EXPLODED: f32 = 1e4;

/// The largest absolute loss, staleness or probability a step may report
/// at `scale` (alpha, or its starting value when learned, at most 100).
pub fn exploded_bound(scale: f32) -> f32 {
    EXPLODED * (2.0 * scale.max(100.0) + (MAX_CAPACITY as f32).ln())
}

/// Checks one step's report for NaN, infinite or exploding values.
fn check_step(r: &StepReport, scale: f32) -> Result<(), String> {
    let bound = exploded_bound(scale);
    let values = [
        ("training_loss", r.training_loss),
        ("interpretable_loss", r.interpretable_loss),
        ("staleness", r.staleness),
        ("prob_pos", r.prob_pos),
    ];
    for (name, v) in values {
        if !v.is_finite() {
            return Err(format!("{name} = {v}"));
        }
        if v.abs() > bound {
            return Err(format!("{name} = {v} exploded (beyond {bound:e})"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_and_exploding_steps_are_divergence() {
        let ok = StepReport { training_loss: 2.5, interpretable_loss: 2.0, prob_pos: 0.3, ..StepReport::default() };
        assert!(check_step(&ok, 20.0).is_ok());
        for (bad, what) in [
            (StepReport { staleness: f32::INFINITY, ..ok }, "staleness = inf"),
            (StepReport { training_loss: f32::NAN, ..ok }, "training_loss = NaN"),
            (StepReport { interpretable_loss: 3e6, ..ok }, "exploded"),
        ] {
            let e = check_step(&bad, 20.0).unwrap_err();
            assert!(e.contains(what), "{e}");
        }
        // A large fixed scale moves the bound with it.
        assert!(check_step(&StepReport { training_loss: 3e6, ..ok }, 1000.0).is_ok());
    }

    /// The defaults are those of the README's run command, whose settings
    /// `docs/results/default/summary.json` stores (it ran with `--out
    /// docs/results/default`).
    #[test]
    fn defaults_are_the_published_default_runs() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/results/default/summary.json");
        let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let published: TrainConfig = serde_json::from_value(summary["config"].clone()).unwrap();
        assert_eq!(TrainConfig { out: "runs/default".into(), ..published }, TrainConfig::default());
        TrainConfig::default().validate().unwrap();
    }

    /// Every config key is set by the flag a resumed run's message names,
    /// and `eval`'s protocol flags are `train`'s.
    #[test]
    fn every_setting_is_a_flag_of_its_name() {
        use clap::Args;
        let longs = |cmd: clap::Command| -> Vec<String> {
            cmd.get_arguments().filter_map(|a| a.get_long().map(|l| format!("--{l}"))).collect()
        };
        let flags = longs(TrainConfig::augment_args(clap::Command::new("train")));
        let keys = serde_json::to_value(TrainConfig::default()).unwrap();
        let keys: Vec<&String> = keys.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), flags.len());
        for key in keys {
            assert!(
                flags.contains(&crate::resume::flag(key)),
                "no flag {} for the setting {key}",
                crate::resume::flag(key)
            );
        }
        for flag in longs(ProtocolSettings::augment_args(clap::Command::new("eval"))) {
            assert!(flags.contains(&flag), "{flag}");
        }
    }

    #[test]
    fn protocol_settings_are_read_and_set_whole() {
        let mut cfg = TrainConfig::default();
        let mut p = ProtocolSettings::of(&cfg);
        (p.exclude_train, p.eval_depth, p.bm25_b) = (true, 100, 0.7);
        p.clone().set_in(&mut cfg);
        assert_eq!(ProtocolSettings::of(&cfg), p);
        assert_eq!(cfg, TrainConfig { exclude_train: true, eval_depth: 100, bm25_b: 0.7, ..TrainConfig::default() });
    }
}
