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

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e`.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Pins what the runs depend on, before the first tensor op: 2 rayon threads for matmuls and
/// the fused kernels (this project's reference machine; override with `RAYON_NUM_THREADS`),
/// candle's spinning element-wise pool off (`CANDLE_NUM_THREADS=1`, as the examples run), and
/// mimalloc keeping freed pages (as the examples run).
pub fn init() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "2");
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // SAFETY: sets a global option of the allocator this binary links; no pointers involved.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
