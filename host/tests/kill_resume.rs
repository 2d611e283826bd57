//! Fault test: a training run killed with SIGKILL at random points (most of
//! a step here is spent writing its checkpoint) and resumed, over and over
//! on a seeded schedule, ends exactly where an uninterrupted run ends: the
//! same final state, the same log, and no stray file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use negcache_host::checkpoint::{Checkpoint, TEMP_PREFIX};
use negcache_host::train::Run;

mod common;

/// Steps of the run: a checkpoint after every one. Enough that the kill
/// schedule below interrupts the run at least ten times on a quiet
/// machine: a step here (mostly its 25 MB checkpoint) takes about 55 ms,
/// so an attempt killed after 150-900 ms gets a few steps further.
const STEPS: &str = "80";
/// Seed of the kill schedule.
const SCHEDULE_SEED: u64 = 0x5eed_0fc0_ffee;
/// At most this many kills; then the run is let finish.
const MAX_KILLS: usize = 25;

fn args<'a>(data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        data,
        "--out",
        out,
        "--steps",
        STEPS,
        "--batch",
        "8",
        "--cache-capacity",
        "64",
        "--checkpoint-every",
        "1",
        "--eval-every",
        "10",
        "--eval-queries",
        "5",
    ]
}

/// Delays from a 64-bit LCG (Knuth's MMIX constants): reproducible, no
/// dependency.
struct Schedule(u64);

impl Schedule {
    /// The next delay, uniform in [min, max) milliseconds.
    fn next_ms(&mut self, min: u64, max: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        min + (self.0 >> 33) % (max - min)
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn killed_during_checkpoint_writes_and_resumed_the_run_ends_as_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::tiny_dataset(&data);
    let data = data.to_str().unwrap();
    let bin = env!("CARGO_BIN_EXE_negcache");

    let whole = tmp.path().join("whole");
    let st = Command::new(bin)
        .args(args(data, whole.to_str().unwrap()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());

    let out = tmp.path().join("killed");
    let out_s = out.to_str().unwrap();
    let ck = out.join("checkpoint.ckpt");
    let mut schedule = Schedule(SCHEDULE_SEED);
    let (mut kills, mut mid_write, mut last_step) = (0usize, 0usize, 0u64);
    let started = Instant::now();
    loop {
        let mut a = args(data, out_s);
        let resumed = ck.exists();
        let ck_s = ck.to_str().unwrap().to_owned();
        if resumed {
            a = vec!["train", "--resume", &ck_s, "--steps", STEPS];
        }
        let mut child = Command::new(bin).args(&a).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        if kills < MAX_KILLS {
            // Past start-up (about 0.2 s) into the steps, each mostly a
            // checkpoint write.
            std::thread::sleep(Duration::from_millis(schedule.next_ms(150, 900)));
        }
        let finished = match child.try_wait().unwrap() {
            Some(_) => true,
            None if kills < MAX_KILLS => {
                child.kill().unwrap(); // SIGKILL
                kills += 1;
                false
            }
            None => true,
        };
        let status = child.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        if finished && status.success() {
            break;
        }
        assert!(!finished, "the run failed (resumed: {resumed}): {err}");
        assert!(!err.contains("panicked"), "{err}");
        // What the killed process left: a checkpoint that loads (when one
        // was written at all) and no more than the temporary file of the
        // write it was killed in (and perhaps a log or chart's).
        if ck.exists() {
            let run = Run::resume(&ck, None).unwrap_or_else(|e| panic!("after kill {kills}: {e:#}"));
            assert!(run.step >= last_step, "the checkpoint went back from step {last_step} to {}", run.step);
            last_step = run.step;
        }
        let stray: Vec<String> = names(&out).into_iter().filter(|n| n.starts_with(TEMP_PREFIX)).collect();
        assert!(stray.len() <= 2, "temporary files accumulate: {stray:?}");
        mid_write += usize::from(!stray.is_empty());
        assert!(started.elapsed() < Duration::from_secs(120), "the kill loop takes too long ({kills} kills)");
    }
    assert!(kills >= 10, "only {kills} kills: the schedule no longer interrupts the run");
    assert!(mid_write >= 2, "only {mid_write} of {kills} kills landed inside a write");

    let body = |d: &Path| Checkpoint::load(&d.join("checkpoint.ckpt")).unwrap().body;
    assert!(body(&out) == body(&whole), "the resumed run's final state differs from the uninterrupted one's");
    assert_eq!(
        common::log_without_timing(&out.join("metrics.csv")),
        common::log_without_timing(&whole.join("metrics.csv"))
    );
    assert_eq!(names(&out), names(&whole), "stray files are left");
    eprintln!("{kills} kills ({mid_write} inside a write) in {:.1} s", started.elapsed().as_secs_f64());
}
