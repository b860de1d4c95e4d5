//! How many threads the CPU backend uses, set from code without `std::env::set_var`.
//!
//! Two thread pools do tinygpt's CPU work:
//!
//! - **rayon's global pool** runs candle's matrix products (the `gemm` crate) and tinygpt's
//!   fused kernels. candle 0.11 decides how many threads a matmul splits over by reading
//!   `RAYON_NUM_THREADS` at every matmul (`candle::utils::get_num_threads`; when the variable
//!   is unset it counts the physical cores, by parsing `/proc/cpuinfo`, each time), and rayon
//!   sizes its pool from the same variable when the pool starts (on its first use).
//! - **candle's element-wise pool** (`candle::utils::barrier_pool`) is sized once, at the first
//!   element-wise op, from `CANDLE_NUM_THREADS` (default: `RAYON_NUM_THREADS`'s count). Its
//!   workers busy-wait between ops: with the small tensors of tinygpt's models and few cores
//!   that costs more than it gains, and on a loaded machine it can make a training step
//!   several times slower, so tinygpt's recommendation is `CANDLE_NUM_THREADS=1` (no worker:
//!   element-wise ops run on the calling thread).
//!
//! candle 0.11 reads these settings from the environment only; it has no function to set them.
//! So this module sets the two variables for you, soundly: changing the environment while
//! another thread may read it is undefined behaviour on Unix (glibc's `setenv` and `getenv`
//! race; this is why `std::env::set_var` is `unsafe` in edition 2024). [`Threads::apply`]
//! therefore checks, on Linux, that the process has **exactly one thread** (it counts the
//! entries of `/proc/self/task`) and refuses with an error otherwise. With one thread nothing
//! can read the environment concurrently, and no pool has started (each pool starts worker
//! threads), so the values also take effect. On Windows the environment is behind a lock and
//! setting it is always sound. On other platforms the thread count cannot be checked, and
//! [`Threads::apply`] refuses unless the environment already holds the values; there
//! [`Threads::apply_unchecked`] (`unsafe`, with the same contract as `std::env::set_var`) or
//! setting the variables in the shell that starts the program are the ways.
//!
//! Call it first thing in `main`, before any tensor op, and before starting threads (or
//! anything that does: an async runtime, a logger with a background thread, …):
//!
//! ```
//! fn main() -> tinygpt::Result<()> {
//!     // Matmuls on 2 threads, element-wise ops on the calling thread; or
//!     // `tinygpt::threads::init()` for tinygpt's defaults (those of the examples).
//!     match tinygpt::threads::set_num_threads(2) {
//!         Ok(()) => {}
//!         // A process already running other threads, or a platform where that cannot be
//!         // checked: nothing was changed, and the pools keep their defaults.
//!         Err(e) => eprintln!("warning: {e}"),
//!     }
//!     // ... load a model, train, generate ...
//!     Ok(())
//! }
//! ```
//!
//! Values already in the environment are not an error: [`Threads::apply`] returns `Ok` without
//! touching anything when the variables already hold what it would set, however many threads
//! run. Once a pool has started, changing its variable cannot resize it, which is one more
//! reason the check is "one thread": a process with one thread has started neither pool
//! (except an element-wise pool started with one thread, which has no worker to count; a
//! later `candle_num_threads` above 1 then has no effect).

use crate::{Error, Result};

/// rayon's variable, which candle reads at every matmul too.
const RAYON: &str = "RAYON_NUM_THREADS";
/// candle's variable for its element-wise pool.
const CANDLE: &str = "CANDLE_NUM_THREADS";

/// The thread counts of the two CPU pools (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threads {
    /// rayon's global pool: matmuls and tinygpt's fused kernels (`RAYON_NUM_THREADS`), ≥ 1.
    pub num_threads: usize,
    /// candle's element-wise pool (`CANDLE_NUM_THREADS`), ≥ 1; 1 = no worker threads, the
    /// calling thread does the work.
    pub candle_num_threads: usize,
}

impl Threads {
    /// The counts in effect now, as candle reads them: each variable when it holds a number
    /// ≥ 1, else candle's default (the physical cores it may use for `num_threads`, and
    /// `num_threads` for `candle_num_threads`).
    pub fn current() -> Self {
        let num_threads = crate::candle::utils::get_num_threads();
        Self {
            num_threads,
            candle_num_threads: env_count(CANDLE).unwrap_or(num_threads),
        }
    }

    /// tinygpt's recommendation, the settings its examples run with: each variable that is
    /// set is kept, an unset `RAYON_NUM_THREADS` becomes candle's core count (so candle need
    /// not count the cores before every matmul) and an unset `CANDLE_NUM_THREADS` becomes 1
    /// (the element-wise pool's busy-waiting workers cost more than they gain here).
    pub fn recommended() -> Self {
        Self {
            num_threads: crate::candle::utils::get_num_threads(),
            candle_num_threads: env_count(CANDLE).unwrap_or(1),
        }
    }

    /// Sets `RAYON_NUM_THREADS` and `CANDLE_NUM_THREADS` to these counts, if it is sound to
    /// (see the [module docs](self)): when they already hold these values nothing is done;
    /// otherwise, on Linux, only while the process has a single thread, and on Windows always.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a count of 0, when the process already runs more than
    /// one thread (saying how many), when `/proc/self/task` cannot be read, or on a platform
    /// where the thread count cannot be checked. Nothing is changed then.
    pub fn apply(self) -> Result<()> {
        self.check()?;
        if self.is_in_environment() {
            return Ok(());
        }
        single_threaded()?;
        // SAFETY: `single_threaded` found this thread to be the process's only one (or the
        // platform's environment is thread-safe), so no other thread can read or write the
        // environment while it is changed; this thread is inside this function.
        unsafe { self.set_env() };
        Ok(())
    }

    /// Sets the two variables without checking the thread count.
    ///
    /// # Safety
    /// As [`std::env::set_var`]: no other thread may read or write the environment during the
    /// call (including through C code's `getenv`, or a pool of candle's or rayon's starting).
    /// In practice: call it first thing in `main`, before any thread is started.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a count of 0 (nothing is changed then).
    pub unsafe fn apply_unchecked(self) -> Result<()> {
        self.check()?;
        // SAFETY: the caller's contract.
        unsafe { self.set_env() };
        Ok(())
    }

    fn check(&self) -> Result<()> {
        if self.num_threads == 0 || self.candle_num_threads == 0 {
            return Err(Error::InvalidArgument(format!(
                "thread counts must be at least 1, got num_threads {} and candle_num_threads {}",
                self.num_threads, self.candle_num_threads
            )));
        }
        Ok(())
    }

    fn is_in_environment(&self) -> bool {
        env_count(RAYON) == Some(self.num_threads)
            && env_count(CANDLE) == Some(self.candle_num_threads)
    }

    /// # Safety
    /// As [`std::env::set_var`].
    #[allow(unused_unsafe)] // `set_var` is safe in edition 2021, `unsafe` from 2024
    unsafe fn set_env(&self) {
        unsafe {
            std::env::set_var(RAYON, self.num_threads.to_string());
            std::env::set_var(CANDLE, self.candle_num_threads.to_string());
        }
    }
}

/// Matmuls and fused kernels on `n` threads, element-wise ops on the calling thread: the
/// setting tinygpt recommends with an explicit thread count. Shorthand for
/// [`Threads::apply`] with `num_threads: n, candle_num_threads: 1`; call it first thing in
/// `main` (see the [module docs](self)).
///
/// # Errors
/// As [`Threads::apply`]: `n == 0`, or more than one thread already running.
pub fn set_num_threads(n: usize) -> Result<()> {
    Threads {
        num_threads: n,
        candle_num_threads: 1,
    }
    .apply()
}

/// Applies [`Threads::recommended`] (what tinygpt's examples start with) and returns it.
/// Variables already set are kept, so users can still override them from the shell.
///
/// # Errors
/// As [`Threads::apply`].
pub fn init() -> Result<Threads> {
    let threads = Threads::recommended();
    threads.apply()?;
    Ok(threads)
}

/// The variable's value when it is a whole number ≥ 1 (as candle parses it), else `None`.
fn env_count(name: &str) -> Option<usize> {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
}

/// `Ok` when the environment may be changed now: this thread is the process's only one
/// (Linux), or the platform's environment is thread-safe (Windows).
fn single_threaded() -> Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let threads = std::fs::read_dir("/proc/self/task")
            .map_err(|e| {
                Error::InvalidArgument(format!(
                    "cannot count this process's threads (/proc/self/task: {e}), so the thread \
                     settings were not changed; {}",
                    HOW
                ))
            })?
            .count();
        if threads != 1 {
            return Err(Error::InvalidArgument(format!(
                "the thread settings can only be changed while the process has one thread, and \
                 it has {threads}: call tinygpt::threads first thing in main, before any tensor \
                 op and before starting threads; {HOW}"
            )));
        }
        Ok(())
    }
    #[cfg(windows)]
    {
        Ok(())
    }
    #[cfg(not(any(target_os = "linux", target_os = "android", windows)))]
    {
        Err(Error::InvalidArgument(format!(
            "this platform gives no way to check that the process has one thread, so the thread \
             settings were not changed; {HOW}, or use the unsafe Threads::apply_unchecked"
        )))
    }
}

/// The other way to choose the thread counts, for the errors.
const HOW: &str = "or set RAYON_NUM_THREADS and CANDLE_NUM_THREADS in the environment that \
                   starts the program";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_zero_and_a_second_thread_but_accepts_what_is_already_set() {
        let zero = Threads {
            num_threads: 0,
            candle_num_threads: 1,
        };
        assert!(zero.apply().unwrap_err().to_string().contains("at least 1"));

        // A second thread for certain, whatever the test harness does.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || rx.recv().ok());
        let now = Threads::current();
        let different = Threads {
            num_threads: now.num_threads + 7,
            ..now
        };
        let e = different.apply().unwrap_err().to_string();
        if cfg!(target_os = "linux") {
            assert!(
                e.contains("only be changed while the process has one thread"),
                "{e}"
            );
            assert!(e.contains("RAYON_NUM_THREADS"), "{e}");
        }
        assert_eq!(Threads::current(), now, "a refused apply changes nothing");
        // What the environment already holds is fine with any number of threads.
        if env_count(RAYON).is_some() && env_count(CANDLE).is_some() {
            now.apply().unwrap();
        }
        tx.send(()).unwrap();
        other.join().unwrap();
    }
}
