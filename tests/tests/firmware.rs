//! The firmware (`firmware/`) trains on a Cortex-M4 under QEMU: the loss
//! falls, recall on its training queries reaches the band in
//! `fixtures/expected/firmware.json`, the image and the RAM it uses fit an
//! nRF52840-class part, and the host running the same library code prints
//! bit-identical results, including the top items the device retrieves for
//! a few queries after training (`topk` lines).
//!
//! The firmware is a crate of its own (another target, another linker
//! script), so this test drives it through cargo and QEMU as a person would:
//! 1. `cargo build --release` of the firmware for `thumbv7em-none-eabihf`;
//! 2. `qemu-system-arm -machine mps2-an386 ... -kernel <elf>`, killed after
//!    the fixture's timeout;
//! 3. `cargo run --release --features host --bin host-sim` for the host;
//! 4. the lines both print with a deterministic prefix are compared
//!    exactly, and the device's figures against the fixture.
//!
//! QEMU missing is a failure (CI installs it) unless `NEGCACHE_SKIP_QEMU=1`,
//! which runs and checks the host side only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TARGET: &str = "thumbv7em-none-eabihf";
/// Lines that must match between host and device (the firmware library's
/// `DETERMINISTIC_PREFIXES`).
const DETERMINISTIC: &[&str] = &["data ", "config ", "recall ", "loss ", "topk ", "checksum "];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn firmware_dir() -> PathBuf {
    root().join("firmware")
}

/// The firmware's own target directory, named explicitly so that a
/// `CARGO_TARGET_DIR` in the environment does not move the ELF.
fn target_dir() -> PathBuf {
    firmware_dir().join("target")
}

fn cargo() -> Command {
    let bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = Command::new(bin);
    c.current_dir(firmware_dir());
    c
}

/// The host's target triple, from rustc: firmware/.cargo/config.toml makes
/// the Cortex-M4 the default target inside firmware/, so host builds name
/// theirs.
fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc).arg("-vV").output().expect("run rustc -vV");
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines().find_map(|l| l.strip_prefix("host: ")).expect("rustc -vV names the host").trim().to_string()
}

fn run_ok(mut c: Command, what: &str) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: could not start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn build_firmware() -> PathBuf {
    let mut c = cargo();
    c.args(["build", "--release", "--bin", "negcache-firmware", "--target", TARGET, "--target-dir"]);
    c.arg(target_dir());
    run_ok(c, &format!("building the firmware (is the {TARGET} target installed? `rustup target add {TARGET}`)"));
    let elf = target_dir().join(TARGET).join("release/negcache-firmware");
    assert!(elf.is_file(), "no firmware image at {}", elf.display());
    elf
}

fn qemu_present() -> bool {
    Command::new("qemu-system-arm")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Boots `elf` on QEMU's mps2-an386 (Cortex-M4) and returns what the
/// firmware printed through semihosting; kills QEMU after `timeout`.
fn run_qemu(elf: &Path, timeout: Duration) -> String {
    let mut child = Command::new("qemu-system-arm")
        .args(["-machine", "mps2-an386", "-cpu", "cortex-m4", "-nographic"])
        .args(["-semihosting-config", "enable=on,target=native", "-kernel"])
        .arg(elf)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-arm");
    // Read the pipes on threads so a chatty firmware cannot block on a full
    // pipe while this thread waits for it to exit.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).map(|_| s)
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > timeout {
            child.kill().unwrap();
            child.wait().unwrap();
            let partial = out.join().unwrap().unwrap_or_default();
            panic!("QEMU did not finish within {timeout:?}; output so far:\n{partial}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap().unwrap(), err.join().unwrap().unwrap());
    assert!(status.success(), "the firmware exited with {status}:\n{out}\n{err}");
    out
}

fn run_host_sim() -> String {
    let mut c = cargo();
    c.args(["run", "--release", "--no-default-features", "--features", "host", "--bin", "host-sim", "--target"]);
    c.arg(host_triple()).arg("--target-dir").arg(target_dir());
    run_ok(c, "running host-sim")
}

fn deterministic_lines(out: &str) -> Vec<&str> {
    out.lines().filter(|l| DETERMINISTIC.iter().any(|p| l.starts_with(p))).collect()
}

/// The value of `key=` in `line`, up to the next space.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let pat = format!("{key}=");
    let at = line.find(&pat).unwrap_or_else(|| panic!("no {key}= in {line:?}")) + pat.len();
    line[at..].split_whitespace().next().unwrap()
}

fn num(line: &str, key: &str) -> f64 {
    field(line, key).parse().unwrap_or_else(|e| panic!("{key} in {line:?}: {e}"))
}

fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{out}"))
}

/// Checks the loss curve and recall of one run's output against the bands.
fn check_training(out: &str, band: &serde_json::Value, who: &str) {
    let b = |k: &str| band[k].as_f64().unwrap_or_else(|| panic!("{k} missing from firmware.json"));
    let losses: Vec<(u32, f64)> = out
        .lines()
        .filter(|l| l.starts_with("loss "))
        .map(|l| (field(l, "step").parse().unwrap(), num(l, "full_ce")))
        .collect();
    assert!(losses.len() >= 3, "{who}: too few loss points:\n{out}");
    let (first, last) = (losses[0].1, losses[losses.len() - 1].1);
    assert!(losses.iter().all(|(_, l)| l.is_finite()), "{who}: non-finite loss in {losses:?}");
    assert!(
        last <= b("full_ce_after_max") && first / last >= b("full_ce_drop_factor_min"),
        "{who}: full-softmax loss {first} -> {last}; band: after <= {}, drop >= {}x",
        b("full_ce_after_max"),
        b("full_ce_drop_factor_min")
    );
    let train = line(out, "recall after train");
    let held = line(out, "recall after heldout");
    let (r1, r10, h10) = (num(train, "r@1"), num(train, "r@10"), num(held, "r@10"));
    println!(
        "{who}: full_ce {first} -> {last} over {} steps; train recall@1 {r1}, @10 {r10}; held-out recall@1 {}, @10 {h10}",
        losses[losses.len() - 1].0,
        num(held, "r@1")
    );
    assert!(
        r1 >= b("train_recall_at_1_min") && r10 >= b("train_recall_at_10_min"),
        "{who}: training recall@1 {r1}, @10 {r10}; band @1 >= {}, @10 >= {}",
        b("train_recall_at_1_min"),
        b("train_recall_at_10_min")
    );
    assert!(h10 >= b("heldout_recall_at_10_min"), "{who}: held-out recall@10 {h10} below the band");
}

/// The queries answered after training (`topk` lines): as many as the
/// fixture says, each with its top items best first (scores non-increasing,
/// distinct items).
fn check_answers<'a>(out: &'a str, band: &serde_json::Value, who: &str) -> Vec<&'a str> {
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("topk ")).collect();
    let (n, k) = (band["answered_queries"].as_u64().unwrap() as usize, band["top_k"].as_u64().unwrap() as usize);
    assert_eq!(lines.len(), n, "{who}: expected {n} answered queries:\n{out}");
    for l in &lines {
        let hits: Vec<(u32, f32)> = field(l, "hits")
            .split(',')
            .map(|h| {
                let parts: Vec<&str> = h.split(':').collect();
                let bits = u32::from_str_radix(parts[2], 16).unwrap();
                (parts[0].parse().unwrap(), f32::from_bits(bits))
            })
            .collect();
        assert_eq!(hits.len(), k, "{who}: {l}");
        assert!(hits.windows(2).all(|w| w[0].1 >= w[1].1 && w[0].0 != w[1].0), "{who}: not best first: {l}");
    }
    lines
}

/// The device's memory lines: flash and RAM within the part's budget.
fn check_memory(out: &str, band: &serde_json::Value) {
    let flash_line = line(out, "mem flash ");
    let ram_line = line(out, "mem ram ");
    let stack_line = line(out, "mem stack ");
    let flash = num(flash_line, "used") as u64;
    let statics = num(ram_line, "static") as u64;
    let stack = num(stack_line, "peak") as u64;
    let total = num(stack_line, "total") as u64;
    println!("device memory: flash {flash} B; RAM {statics} B static + {stack} B peak stack = {total} B");
    assert_eq!(total, statics + stack, "{stack_line}");
    assert!(stack > 0, "the stack was not measured: {stack_line}");
    assert!(flash <= band["flash_bytes_max"].as_u64().unwrap(), "flash {flash} over budget");
    assert!(total <= band["ram_bytes_max"].as_u64().unwrap(), "RAM {total} over budget");
}

#[test]
fn firmware_trains_under_qemu_like_the_host() {
    let t0 = Instant::now();
    let band: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/expected/firmware.json")).expect("read firmware.json"),
    )
    .unwrap();
    assert!(root().join("fixtures/firmware/wordnet-tiny.bin").is_file(), "the prepared data file is missing");

    let skip = std::env::var("NEGCACHE_SKIP_QEMU").is_ok_and(|v| v == "1");
    let device = if qemu_present() {
        let elf = build_firmware();
        let timeout = Duration::from_secs(band["qemu_timeout_seconds"].as_u64().unwrap());
        let t = Instant::now();
        let out = run_qemu(&elf, timeout);
        println!("device run under QEMU: {:.1} s", t.elapsed().as_secs_f64());
        Some(out)
    } else if skip {
        println!("qemu-system-arm not found and NEGCACHE_SKIP_QEMU=1: checking the host side only");
        None
    } else {
        panic!(
            "qemu-system-arm not found: install it (Debian: apt-get install qemu-system-arm) \
             or set NEGCACHE_SKIP_QEMU=1 to check the host side only"
        );
    };

    let host = run_host_sim();
    check_training(&host, &band, "host");
    let host_answers = check_answers(&host, &band, "host");

    if let Some(device) = device {
        assert!(device.lines().any(|l| l == "done"), "the firmware did not finish:\n{device}");
        check_training(&device, &band, "device");
        check_memory(&device, &band);
        // The device answers the same queries with the same items and
        // bit-identical scores (also covered by the line comparison below;
        // asserted on its own for a clear message).
        let device_answers = check_answers(&device, &band, "device");
        assert_eq!(device_answers, host_answers, "the device's top-k differs from the host's");
        let (d, h) = (deterministic_lines(&device), deterministic_lines(&host));
        assert!(!d.is_empty(), "no comparable lines from the device:\n{device}");
        for (i, (dl, hl)) in d.iter().zip(&h).enumerate() {
            if dl != hl {
                let detail = if dl.starts_with("loss ") && hl.starts_with("loss ") {
                    let (a, b) = (num(dl, "full_ce"), num(hl, "full_ce"));
                    format!(" (full_ce relative difference {:.3e})", (a - b).abs() / b.abs().max(1e-30))
                } else {
                    String::new()
                };
                panic!("device and host differ at comparable line {i}{detail}:\n device: {dl}\n host:   {hl}");
            }
        }
        assert_eq!(d.len(), h.len(), "device and host printed different numbers of lines");
        println!("device and host agree bit for bit on {} lines ({})", d.len(), line(&device, "checksum "));
    }
    println!("firmware test: {:.1} s", t0.elapsed().as_secs_f64());
}
