//! Ctrl-C (SIGINT) and SIGTERM during `train`: the first one asks the
//! training loop to stop at the next step boundary, where it writes a final
//! checkpoint and returns [`Interrupted`]; a second one ends the process at
//! once (any temporary file it leaves is removed by the next run, see
//! [`crate::checkpoint::remove_stale_temp_files`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Exit status of a run stopped by a signal (128 + SIGINT, as shells use).
pub const EXIT_STATUS: u8 = 130;

/// Installs the handler (once per process; later calls do nothing).
pub fn install() -> anyhow::Result<()> {
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    ctrlc::set_handler(|| {
        if REQUESTED.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: stopping now");
            std::process::exit(i32::from(EXIT_STATUS));
        }
        eprintln!(
            "\ninterrupt: stopping after this step and writing a checkpoint (press Ctrl-C again to stop at once)"
        );
    })
    .map_err(|e| anyhow::anyhow!("cannot install the Ctrl-C handler: {e}"))
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Asks the training loop to stop, as Ctrl-C does (for tests and callers
/// that stop a run themselves).
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// The error a training run returns when it was stopped by a signal after
/// writing its checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interrupted {
    /// The step the run stopped at.
    pub step: u64,
    /// The checkpoint written at that step.
    pub checkpoint: PathBuf,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "interrupted at step {}; wrote {} (continue with --resume {})",
            self.step,
            self.checkpoint.display(),
            self.checkpoint.display()
        )
    }
}

impl std::error::Error for Interrupted {}
