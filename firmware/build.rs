//! Links the firmware with cortex-m-rt's `link.x`, and puts `memory.x`
//! where `link.x` finds it: `link.x` does `INCLUDE memory.x`, which the
//! linker resolves along its search path, and the build directory is added
//! to that path here.
//!
//! The `-Tlink.x` argument is given here rather than as `rustflags` in
//! `.cargo/config.toml` because a `RUSTFLAGS` variable in the environment
//! (as CI setups often set) replaces config rustflags entirely, and config
//! is only read when cargo runs inside `firmware/`.

use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::write(out.join("memory.x"), include_bytes!("memory.x")).expect("write memory.x to OUT_DIR");
    println!("cargo:rustc-link-search={}", out.display());
    // Only the bare-metal build: host builds (host-sim, prep) link normally.
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bin=negcache-firmware=-Tlink.x");
    }
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rerun-if-changed=build.rs");
}
