//! Checkpoints: a resumed run equals an uninterrupted one bit for bit;
//! corrupted, truncated and foreign files are refused with a clear message;
//! a write that dies half-way leaves the previous checkpoint intact.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use negcache_host::checkpoint::{write_atomically, Checkpoint};
use negcache_host::train::{prepare, train, Run, TrainConfig};

mod common;
use common::tiny_dataset;

fn config(dir: &Path, out: &Path, steps: u64) -> TrainConfig {
    TrainConfig {
        data: dir.to_path_buf(),
        out: out.to_path_buf(),
        steps,
        batch: 8,
        cache_capacity: 64,
        warmup: 3,
        eval_every: 0,
        ..TrainConfig::default()
    }
}

#[test]
fn resuming_gives_the_same_result_as_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    tiny_dataset(&data_dir);
    let cfg = config(&data_dir, &tmp.path().join("a"), 30);
    let data = prepare(&cfg).unwrap();

    let mut whole = Run::start(cfg.clone(), &data).unwrap();
    train(&mut whole, &data, &mut |_, _, _| Ok(())).unwrap();
    let whole_bytes = whole.checkpoint().unwrap().body;

    let mut half_cfg = cfg.clone();
    half_cfg.steps = 13;
    half_cfg.out = tmp.path().join("b");
    let mut half = Run::start(half_cfg, &data).unwrap();
    train(&mut half, &data, &mut |_, _, _| Ok(())).unwrap();
    let ckpt = tmp.path().join("b/checkpoint.ckpt");
    assert!(ckpt.exists());
    let mut resumed = Run::resume(&ckpt, Some(30)).unwrap();
    assert_eq!(resumed.step, 13);
    train(&mut resumed, &data, &mut |_, _, _| Ok(())).unwrap();
    assert_eq!(resumed.step, 30);
    let resumed_bytes = resumed.checkpoint().unwrap().body;
    assert!(whole_bytes == resumed_bytes, "a resumed run differs from the uninterrupted one");
    // And training did change the state.
    let fresh = Run::start(cfg, &data).unwrap().checkpoint().unwrap().body;
    assert!(fresh != whole_bytes);
}

fn small() -> Checkpoint {
    Checkpoint { header: serde_json::json!({"step": 3}), body: (0u8..200).collect() }
}

#[test]
fn corrupted_and_truncated_checkpoints_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("c.ckpt");
    small().save(&p).unwrap();
    assert_eq!(Checkpoint::load(&p).unwrap(), small());
    let good = std::fs::read(&p).unwrap();

    let mut flipped = good.clone();
    flipped[100] ^= 0x40;
    std::fs::write(&p, &flipped).unwrap();
    let e = format!("{:#}", Checkpoint::load(&p).unwrap_err());
    assert!(e.contains("checksum mismatch") && e.contains("c.ckpt"), "{e}");

    std::fs::write(&p, &good[..good.len() - 50]).unwrap();
    let e = format!("{:#}", Checkpoint::load(&p).unwrap_err());
    assert!(e.contains("truncated"), "{e}");

    std::fs::write(&p, &good[..10]).unwrap();
    let e = format!("{:#}", Checkpoint::load(&p).unwrap_err());
    assert!(e.contains("not a negcache checkpoint"), "{e}");

    let mut version = good.clone();
    version[16] = 9;
    std::fs::write(&p, &version).unwrap();
    let e = format!("{:#}", Checkpoint::load(&p).unwrap_err());
    assert!(e.contains("version 9"), "{e}");
}

#[test]
fn a_write_that_dies_half_way_keeps_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("c.ckpt");
    small().save(&p).unwrap();
    let before = std::fs::read(&p).unwrap();
    // The writer fails after writing part of a new checkpoint, as a killed
    // process would stop: the rename never happens.
    let err = write_atomically(&p, |f| {
        f.write_all(b"NEGCACHE-CKPT\0\0\0partial")?;
        anyhow::bail!("killed")
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("previous file is kept"));
    assert_eq!(std::fs::read(&p).unwrap(), before);
    // No temporary file is left beside it.
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn a_checkpoint_from_another_shape_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    tiny_dataset(&data_dir);
    let cfg = config(&data_dir, &tmp.path().join("a"), 1);
    let data = prepare(&cfg).unwrap();
    let mut run = Run::start(cfg, &data).unwrap();
    let mut ck = run.checkpoint().unwrap();
    ck.body.truncate(ck.body.len() / 2);
    let p = tmp.path().join("short.ckpt");
    ck.save(&p).unwrap();
    let e = format!("{:#}", Run::resume(&p, None).unwrap_err());
    assert!(e.contains("cannot restore"), "{e}");
}
