//! Ctrl-C and SIGTERM during training: finish the step, save, say how to continue.
//!
//! ```no_run
//! # fn main() -> tinygpt::Result<()> {
//! # let (cfg, params) = (tinygpt::TrainConfig::default(), Vec::new());
//! let stop = tinygpt::signals::StopSignal::install()?;
//! let trainer = tinygpt::Trainer::new(cfg, params)?.with_stop_flag(stop.flag());
//! // … trainer.fit(…) returns Error::Interrupted after saving; exit with stop.exit_code().
//! # Ok(()) }
//! ```
//!
//! The first signal only raises a flag, which [`crate::Trainer::fit`] reads between optimiser
//! steps: it finishes the step it is in, writes the latest state (marked interrupted) and
//! returns [`crate::Error::Interrupted`]. A second signal ends the process at once, with the
//! shell's code for the signal (130 for SIGINT, 143 for SIGTERM); the checkpoints on disk are
//! then the last complete ones (every write is atomic, see [`crate::checkpoint`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::Result;

/// A stop request from SIGINT (Ctrl-C) or SIGTERM.
#[derive(Debug, Clone)]
pub struct StopSignal {
    flag: Arc<AtomicBool>,
    signal: Arc<AtomicUsize>,
}

impl StopSignal {
    /// Installs the handlers for SIGINT and SIGTERM (on Unix; elsewhere the flag is never
    /// raised). Call it once, early in `main`.
    ///
    /// # Errors
    /// [`crate::Error::IoUnnamed`] if a handler cannot be registered.
    pub fn install() -> Result<Self> {
        let this = Self {
            flag: Arc::new(AtomicBool::new(false)),
            signal: Arc::new(AtomicUsize::new(0)),
        };
        #[cfg(unix)]
        {
            use signal_hook::consts::{SIGINT, SIGTERM};
            for sig in [SIGINT, SIGTERM] {
                // Registered first, so it runs first: exits only if the flag is already up,
                // i.e. on the second signal.
                signal_hook::flag::register_conditional_shutdown(
                    sig,
                    128 + sig,
                    Arc::clone(&this.flag),
                )?;
                signal_hook::flag::register_usize(sig, Arc::clone(&this.signal), sig as usize)?;
                signal_hook::flag::register(sig, Arc::clone(&this.flag))?;
            }
        }
        Ok(this)
    }

    /// The flag to hand to [`crate::Trainer::with_stop_flag`].
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.flag)
    }

    /// Whether a signal has arrived.
    pub fn raised(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The signal that arrived (2 for SIGINT, 15 for SIGTERM), if any.
    pub fn signal(&self) -> Option<i32> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            s => i32::try_from(s).ok(),
        }
    }

    /// The exit code a shell gives a process that the signal ended: 128 + the signal number
    /// (130 for Ctrl-C, 143 for SIGTERM); 130 if none arrived.
    pub fn exit_code(&self) -> i32 {
        128 + self.signal().unwrap_or(2)
    }

    /// The signal's name, for messages (`"SIGINT"`, `"SIGTERM"`).
    pub fn name(&self) -> &'static str {
        match self.signal() {
            Some(15) => "SIGTERM",
            _ => "SIGINT",
        }
    }
}
