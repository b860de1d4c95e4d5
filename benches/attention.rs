//! Causal self-attention, forward and forward + backward: plain candle ops
//! ([`causal_attention_reference`]) against the fused CPU op ([`causal_attention`]), in f32 at
//! GPT-2 small's head shape (B 4, nh 12, hs 64) for T = 64, 256 and 1024; then forward +
//! backward at SmolLM2-135M's head shape (B 4, nh 9, hs 64, T 256) with multi-head keys and
//! values (`mha`, nkv 9) and grouped-query ones (`gqa`, nkv 3: each key/value head shared by
//! three query heads, Ainslie et al. 2023).
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench --features bench --bench attention
//! ```
//!
//! The thread count is explicit: `RAYON_NUM_THREADS` (2 when unset) sizes candle's CPU thread
//! pool, which candle's ops and the fused op share (`CANDLE_NUM_THREADS`, if set, wins). The
//! allocator is mimalloc, as in tinygpt's examples. Built with `--features cuda` and with a GPU
//! present, the same cases also run on CUDA (where both names take the plain-op path for now),
//! synchronising the device before the clock is read.
//!
//! Forward+backward is `y.backward()` from `y = attention(q, k, v)` with `q`, `k`, `v` as
//! variables, i.e. an all-ones output gradient, as PyTorch's `y.sum().backward()`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, SamplingMode};
use tinygpt::attention::{causal_attention, causal_attention_reference};
use tinygpt::candle::{Device, Tensor, Var};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const B: usize = 4;
const NH: usize = 12;
const HS: usize = 64;
const TS: [usize; 3] = [64, 256, 1024];
/// SmolLM2-135M's attention: 9 query heads, 3 key/value heads, head size 64.
const SMOL_NH: usize = 9;
const SMOL_NKV: usize = 3;
const SMOL_T: usize = 256;

type Attention = fn(&Tensor, &Tensor, &Tensor, f64) -> tinygpt::Result<Tensor>;

const IMPLS: [(&str, Attention); 2] = [
    ("plain", causal_attention_reference),
    ("fused", causal_attention),
];

/// One forward (and backward) pass, finished on the device before it returns.
fn step(f: Attention, q: &Var, k: &Var, v: &Var, backward: bool, device: &Device) {
    let scale = 1.0 / (HS as f64).sqrt();
    if backward {
        let y = f(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale).expect("attention");
        black_box(y.backward().expect("backward"));
    } else {
        let (q, k, v) = (
            q.as_detached_tensor(),
            k.as_detached_tensor(),
            v.as_detached_tensor(),
        );
        black_box(f(&q, &k, &v, scale).expect("attention"));
    }
    device.synchronize().expect("synchronize");
}

fn bench_device(c: &mut Criterion, device: &Device, label: &str) {
    for (mode, backward) in [("forward", false), ("forward_backward", true)] {
        let mut group = c.benchmark_group(format!("attention_{mode}_{label}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .sampling_mode(SamplingMode::Flat);
        for t in TS {
            let var = || Var::randn(0f32, 1.0, (B, NH, t, HS), device).expect("randn");
            let (q, k, v) = (var(), var(), var());
            for (name, f) in IMPLS {
                group.bench_with_input(BenchmarkId::new(name, t), &t, |bench, _| {
                    bench.iter(|| step(f, &q, &k, &v, backward, device))
                });
            }
        }
        group.finish();
    }
    // Grouped-query attention next to multi-head at the same query heads.
    let mut group = c.benchmark_group(format!("attention_forward_backward_smollm2_{label}"));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sampling_mode(SamplingMode::Flat);
    for (kind, nkv) in [("mha", SMOL_NH), ("gqa", SMOL_NKV)] {
        let var = |nh: usize| Var::randn(0f32, 1.0, (B, nh, SMOL_T, HS), device).expect("randn");
        let (q, k, v) = (var(SMOL_NH), var(nkv), var(nkv));
        for (name, f) in IMPLS {
            let id = BenchmarkId::new(format!("{name}_{kind}"), SMOL_T);
            group.bench_function(id, |bench| bench.iter(|| step(f, &q, &k, &v, true, device)));
        }
    }
    group.finish();
}

fn main() {
    // candle's CPU thread pool, which the fused op runs on too, reads RAYON_NUM_THREADS (unless
    // CANDLE_NUM_THREADS is set) when the first op starts it, i.e. after this.
    let threads = match std::env::var("RAYON_NUM_THREADS") {
        Ok(n) => n,
        Err(_) => {
            std::env::set_var("RAYON_NUM_THREADS", "2");
            "2".to_string()
        }
    };
    let threads = std::env::var("CANDLE_NUM_THREADS").unwrap_or(threads);
    eprintln!("attention bench: {threads} threads, B {B} nh {NH} hs {HS} f32");

    let mut c = Criterion::default().configure_from_args();
    bench_device(&mut c, &Device::Cpu, "cpu");
    #[cfg(feature = "cuda")]
    match Device::new_cuda(0) {
        Ok(device) => bench_device(&mut c, &device, "cuda"),
        Err(e) => eprintln!("no CUDA device ({e}); skipping the CUDA cases"),
    }
    c.final_summary();
}
