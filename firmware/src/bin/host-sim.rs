//! The firmware's training run on the host: the same library code, the
//! same settings and the same statics, printing the same lines to stdout,
//! so that its output can be compared with the device's line by line.
//!
//! ```text
//! cd firmware
//! cargo run --release --no-default-features --features host --target x86_64-unknown-linux-gnu --bin host-sim
//! ```
//!
//! `--lr X`, `--steps N` and `--seed S` override the shared settings, for
//! tuning on the host (the comparison with the device uses none of them).

use std::io::Write as _;
use std::process::ExitCode;

use negcache_firmware::{run, write_sizes, Settings, SCRATCH, SETTINGS, TRAINER};

/// `core::fmt::Write` over stdout.
struct Stdout(std::io::Stdout);

impl core::fmt::Write for Stdout {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.0.write_all(s.as_bytes()).map_err(|_| core::fmt::Error)
    }
}

fn settings() -> Result<Settings, String> {
    let mut s = SETTINGS;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {v}: {e}");
        match flag.as_str() {
            "--lr" => s.lr = v.parse().map_err(|e| bad(&e))?,
            "--steps" => s.steps = v.parse().map_err(|e| bad(&e))?,
            "--seed" => s.seed = v.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(s)
}

fn main() -> ExitCode {
    let s = match settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("host-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = Stdout(std::io::stdout());
    println!("negcache-firmware host-sim ({})", std::env::consts::ARCH);
    if write_sizes(&mut out).is_err() {
        return ExitCode::FAILURE;
    }
    match run(TRAINER.take(), SCRATCH.take(), &s, &mut out) {
        Ok(_) => {
            println!("done");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("host-sim: {e}");
            ExitCode::FAILURE
        }
    }
}
