//! The hand-written training step allocates no activation-sized buffer once it runs: its
//! buffers, the attention's head-major copies and their gradients among them, are made at
//! the first step and reused (issue 16). A counting global allocator watches every thread
//! (the step's shards run on rayon's) over steady-state steps and records each request whose
//! size is that of a `(rows, C)`, `(rows, 3C)` or `(rows, 4C)` f32 buffer of a shard or of
//! the whole batch, made anywhere but inside the gemm crate (which packs its operands into
//! buffers of its own on every product, some of an operand's size).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tinygpt::candle::Device;
use tinygpt::{Gpt, GptConfig, Objective, Pretraining, TokenDataset, Tokenizer};

/// Counts requests while [`ARMED`]: all of them, and those of a size in [`WATCHED`].
struct Counting;

static ARMED: AtomicBool = AtomicBool::new(false);
static COUNT: AtomicUsize = AtomicUsize::new(0);
static HITS: AtomicUsize = AtomicUsize::new(0);
static LAST_HIT: AtomicUsize = AtomicUsize::new(0);
/// Watched sizes in bytes (0: unused).
static WATCHED: [AtomicUsize; 8] = [const { AtomicUsize::new(0) }; 8];

thread_local! {
    /// This thread is taking a backtrace: its own requests are not counted.
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
}

fn note(size: usize) {
    if !ARMED.load(Ordering::Relaxed) || CAPTURING.with(Cell::get) {
        return;
    }
    COUNT.fetch_add(1, Ordering::Relaxed);
    if WATCHED.iter().any(|w| w.load(Ordering::Relaxed) == size) {
        CAPTURING.with(|c| c.set(true));
        let trace = std::backtrace::Backtrace::force_capture().to_string();
        CAPTURING.with(|c| c.set(false));
        if !trace.contains("gemm_f32::") && !trace.contains("gemm_common::") {
            HITS.fetch_add(1, Ordering::Relaxed);
            LAST_HIT.store(size, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call forwards to the system allocator unchanged; counting touches atomics only.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's guarantees, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn steady_state_steps_allocate_no_activation_buffer() {
    let text: String = (0..6000)
        .map(|i| ["to be ", "or not ", "that is ", "the question "][(i * 7 + i / 5) % 4])
        .collect();
    let tok = Tokenizer::train_char(&text).unwrap();
    // n_embd 96 over 2 heads of 48: activation sizes no cache-blocked buffer shares.
    let cfg = GptConfig {
        vocab_size: tok.vocab_size(),
        block_size: 32,
        n_layer: 2,
        n_head: 2,
        n_embd: 96,
        dropout: 0.0,
        bias: true,
        ..Default::default()
    };
    let (b, t, c) = (4, cfg.block_size, cfg.n_embd);
    let mut sizes = vec![];
    for rows in [b / 2 * t, b * t] {
        sizes.extend([rows * c * 4, rows * 3 * c * 4, rows * 4 * c * 4]);
    }
    for (w, s) in WATCHED.iter().zip(&sizes) {
        w.store(*s, Ordering::Relaxed);
    }
    let model = Gpt::init(&cfg, 3, &Device::Cpu).unwrap();
    let data = TokenDataset::from_tokens(tok.encode(&text).unwrap(), 0.1).unwrap();
    let mut obj = Pretraining::new(model, tok, data, b).unwrap();
    assert!(obj.has_owned_step());
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut step = |rng: &mut ChaCha8Rng| {
        let (loss, tokens) = obj.train_step_owned(rng, 1.0, true).unwrap().unwrap();
        assert!(loss.is_finite() && tokens == b * t);
    };
    for _ in 0..3 {
        step(&mut rng); // buffers sized, threads started
    }
    ARMED.store(true, Ordering::Relaxed);
    for _ in 0..5 {
        step(&mut rng);
    }
    ARMED.store(false, Ordering::Relaxed);
    let (count, hits) = (COUNT.load(Ordering::Relaxed), HITS.load(Ordering::Relaxed));
    eprintln!("5 steps: {count} allocations, {hits} of an activation's size");
    assert!(count > 0, "the allocator counted nothing");
    assert_eq!(
        hits,
        0,
        "{hits} activation-sized requests ({} bytes the last) in 5 steady-state steps",
        LAST_HIT.load(Ordering::Relaxed)
    );
}
