//! The step's scoring pass on several threads computes what it computes on
//! one: the same checkpoint, byte for byte, for every cache objective.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use negcache_host::threads::Threads;
use negcache_host::train::{prepare, train, ObjectiveName, Run, TrainConfig};

mod common;
use common::tiny_dataset;

#[test]
fn every_thread_count_trains_the_same_bits() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    tiny_dataset(&data_dir);
    // A batch of 40 is three tiles of queries (16, 16, 8), so three
    // threads each take a piece and two split it unevenly.
    let base = TrainConfig {
        data: data_dir,
        out: tmp.path().join("out"),
        steps: 12,
        batch: 40,
        cache_capacity: 64,
        warmup: 2,
        eval_every: 0,
        ..TrainConfig::default()
    };
    let data = prepare(&base).unwrap();
    for (objective, negatives) in
        [(ObjectiveName::Cache, 1), (ObjectiveName::CacheInBatch, 4), (ObjectiveName::CacheShared, 1)]
    {
        let cfg = TrainConfig { objective, negatives, ..base.clone() };
        let mut bodies = Vec::new();
        for count in [1, 2, 3] {
            let mut run = Run::start(cfg.clone(), &data).unwrap();
            run.session.set_threads(Arc::new(Threads::new(count).unwrap().with_min_piece_work(0)));
            train(&mut run, &data, &mut |_, _, _| Ok(())).unwrap();
            bodies.push(run.checkpoint().unwrap().body);
        }
        assert!(bodies[0] == bodies[1] && bodies[0] == bodies[2], "{objective:?}: threads changed the result");
        let fresh = Run::start(cfg, &data).unwrap().checkpoint().unwrap().body;
        assert!(fresh != bodies[0], "{objective:?}: training changed nothing");
    }
}
