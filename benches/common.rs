//! What the benches share: the devices to run on, and synchronising before the clock is read.
#![allow(dead_code)]

use tinygpt::candle::Device;

/// CPU always; CUDA too when built with `--features cuda` and a GPU is present.
pub fn devices() -> Vec<(&'static str, Device)> {
    let mut out = vec![("cpu", Device::Cpu)];
    if cfg!(feature = "cuda") {
        match Device::new_cuda(0) {
            Ok(d) => out.push(("cuda", d)),
            Err(e) => eprintln!("no CUDA device, CUDA benches skipped: {e}"),
        }
    }
    out
}

/// Waits for queued device work, so timings cover the work itself.
pub fn sync(device: &Device) {
    if let Err(e) = device.synchronize() {
        eprintln!("synchronize failed: {e}");
    }
}

/// The thread count candle and rayon use, pinned so runs compare (default 2: this project's
/// reference machine). Must run before the first tensor op.
pub fn pin_threads() {
    if std::env::var("RAYON_NUM_THREADS").is_err() {
        // SAFETY: called at the start of main, before any other thread exists.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "2") };
    }
}
