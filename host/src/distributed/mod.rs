//! Data-parallel training over MPI with the negative cache sharded across
//! the processes: `mpirun -np P negcache train --distributed ...`.
//!
//! Every process keeps a full replica of the towers and the optimiser
//! state, draws its B/P queries of a step from its own shard of the
//! training pairs (pair `i` belongs to process `i mod P`), and holds one
//! shard of the cache: N/P slots holding only the items it owns
//! ([`Owners`]: corpus index mod P). One step, with the collective that
//! carries each exchange in brackets:
//!
//! ```text
//!  1. refresh      each shard re-embeds its R/P stalest entries
//!  2. embed        each process embeds its B/P queries and positives
//!  3. [queries]    all-gather: every process gets all B queries and positive items
//!                  (with exact in-batch terms, the positives' embeddings too)
//!  4. score        every shard scores all B queries, the batch's positives hidden
//!                  when they enter exactly: its log-sum-exp Z_s and K independent
//!                  draws per query (the core's CacheLoss, inv_temp 1); with the
//!                  control variate also its candidate mean of stale rows
//!  5. [replies]    all-to-all: per query, each shard's Z_s and draws (slot,
//!                  count, tokens; with the variate, the rows and the mean) go to
//!                  the query's process
//!  6. draw         the query's process merges the Z_s into the global Z, gives
//!                  each of the K draws to shard s with probability Z_s / Z and
//!                  takes that many of s's draws at random: exactly K independent
//!                  draws from the softmax over all N slots; it embeds them afresh
//!  7. loss         the paper's estimator (prob_pos from the global Z) or the exact
//!                  in-batch terms over all B positives plus the sampled remainder;
//!                  gradients of the global-batch mean
//!     [positive gradients]  all-reduce (sum), in-batch terms only: each positive's
//!                  gradient from every process's queries, before back-propagation
//!  8. [touched]    all-reduce (bitwise or): the embedding rows any process touched
//!  9. [gradients]  all-reduce (sum): dense gradients, the touched rows only, and
//!                  the step's loss sums
//! 10. optimiser    the same update on every process, so the replicas stay equal
//! 11. [update]     all-to-all (counts, then records): each fresh negative goes
//!                  back to the shard that holds it (refresh), each positive to
//!                  the shard that owns it (insert)
//! 12. update       each shard: refresh, insert, age (one core update call)
//! ```
//!
//! The draw is restricted to what merges exactly: independent draws,
//! inverse temperature 1 (the shards' log-sum-exps are then the
//! sampling normalisers), all slots as candidates (no top-k), `f32` cache
//! storage, and the objectives `cache` and `cache-in-batch`, with or
//! without the control variate (whose candidate means merge exactly,
//! weighted by Z_s / Z). Process 0 draws from the same generator as a
//! single-process run ([`rank_rng`]), so with P = 1 a distributed run
//! reproduces `negcache train` bit for bit. Checkpoints gather the shards
//! into one cache in the single-process format, so the two kinds of run
//! resume from each other's checkpoints. `docs/distributed.md` has the
//! costs.
//!
//! The step is the core's, driven phase by phase: the refresh is
//! `Trainer::refresh_stalest` on this process's shard, the scoring pass is
//! `CacheLoss::score_and_sample_with`, each query's loss and gradients are
//! `loss::query_terms` (what `CacheLoss::backward` computes per query) or
//! `remainder::in_batch_part_with_remainder` (what the trainer computes
//! for the whole batch), and the cache updates are `CacheMut::refresh` and
//! `CacheMut::update`. What is distributed's own is the order around the
//! exchanges and the merge of the shards' draws.
//!
//! Modules, each importing only from those below it:
//!
//! | module | owns |
//! |---|---|
//! | `run` | the command: set-up, the training loop, the summary |
//! | `worker` | one process's step, checkpoint and restore; the configuration check; each process's generator |
//! | `sampler` | the cross-shard draw (steps 3 to 6) |
//! | `gradients` | the gradient all-reduce over touched rows (steps 8 and 9) |
//! | `exchange` | cache updates between shards (steps 11 and 12) |
//! | `shards` | item owners; a shard split from, or gathered into, one cache |
//! | `replica` | a process's trainer and cache shard (`session::CachedTrainer`), the towers' checksum |
//! | `params` | a model's parameter tensors walked with a closure |
//! | `comm` | the communicator and its meters |

mod comm;
mod exchange;
mod gradients;
mod params;
mod replica;
mod run;
mod sampler;
mod shards;
mod worker;

pub use comm::{Comm, Meter, PerStep};
pub use replica::{model_checksum, Replicated};
pub use run::{train_command, DistributedSummary};
pub use sampler::{choose_shard, merge_draws, Draw, DrawSpec, Pick, ShardedSampler, Taken};
pub use shards::Owners;
pub use worker::{in_batch_part, local_part, rank_rng, shared_part, validate, LocalDraws, SharedBuffers, SharedInputs};
