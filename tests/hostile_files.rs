//! Hostile files: every loader, fed mutations of valid files, returns a typed error or loads
//! correctly. Never a panic, an allocation beyond a bound, or a hang.
//!
//! The valid files come from the crate's own API: a tiny char-level model trained for two
//! steps (its checkpoint directory: `config.json`, `model.safetensors`, `tokenizer.json`,
//! `optimizer.safetensors`, `trainer_state.json`, `metrics.jsonl`), a byte-level BPE
//! tokenizer, SFT and preference JSONL written here, and the Hugging Face GPT-2 fixture. Each
//! case applies one to three mutations to one of them: bit flips, truncation, inserted or
//! overwritten bytes, and structure-aware edits (a JSON value replaced by a huge, negative,
//! wrongly typed or deeply nested one, removed, or a key added; a safetensors header length set
//! huge or past the end of the file; a tensor's dtype, shape or offsets made inconsistent or
//! huge, or every tensor re-encoded, consistently, in another dtype; a tokenizer's ids, merges,
//! model, padding, truncation, regexes or SentencePiece normalizer replaced by hostile ones).
//! The case writes the files into a directory of its own and runs the loader there on a worker
//! thread (2 MiB of stack, as any spawned thread):
//!
//! * a panic fails the case, naming the mutations (the worker catches it);
//! * so does a result that takes longer than [`TIME_LIMIT`];
//! * a counting global allocator ([`guard`]) measures the bytes the worker holds at its peak;
//!   above [`budget`] (64 MiB + 16 × the bytes of the files the case holds) the case fails.
//!   A single request above [`guard::REFUSE_ABOVE`] (1 GiB) is refused outright: the allocator
//!   prints which case asked and returns null, so the process aborts with Rust's "memory
//!   allocation … failed" instead of taking the machine's memory (a file claiming a 10^12-byte
//!   tensor must be refused before anything is allocated for it);
//! * an error must name the file or directory it is about (the properties of loaders whose
//!   messages are not ours to fix yet check only the three points above).
//!
//! Two failures cannot be caught and end the whole test process instead: a stack overflow, and
//! a refused request as above; `HOSTILE_FILES_LOG=1` names the case that was running. Work a
//! loader hands to other threads is not counted (the readers here run on the worker; the
//! forward pass run on a loaded model may use candle's thread pool).
//!
//! CI runs [`CASES`] cases per property with a fixed seed and writes no failure files. A longer
//! run: `PROPTEST_CASES=5000 cargo test --release --test hostile_files` (and
//! `PROPTEST_RNG_SEED=N` for another seed): `proptest!` applies those variables on top of
//! [`config`]. `HOSTILE_FILES_LOG=1` prints every case and what the loader did (`--nocapture`).

use std::alloc::System;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestCaseError};
use serde_json::Value;
use tinygpt::candle::{Device, Tensor};
use tinygpt::train::TrainerState;
use tinygpt::{
    checkpoint, Gpt, GptConfig, Objective, Pretraining, TokenDataset, Tokenizer, TrainConfig,
    Trainer,
};

mod common;

#[global_allocator]
static ALLOC: guard::Counting = guard::Counting(System);

/// Cases per property in CI (`PROPTEST_CASES` overrides it).
const CASES: u32 = 256;

/// The longest a case may take.
const TIME_LIMIT: Duration = Duration::from_secs(10);

/// The most a case may hold at once: 64 MiB for the model, tokenizer and parser structures of
/// a tiny checkpoint, plus 16 bytes per byte of input (a file read whole, its parsed JSON and
/// the tensors copied out of it fit several times over).
fn budget(input_bytes: usize) -> usize {
    (64 << 20) + 16 * input_bytes
}

/// The proptest settings: [`CASES`] cases, a fixed seed, no failure files in the repository.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x7e57_f11e),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The counting allocator
// ---------------------------------------------------------------------------------------------

/// A global allocator that counts, per thread and only while the thread is armed, the bytes it
/// holds (allocated minus freed) and their peak, and the largest single request. Requests of
/// unarmed threads pass through untouched.
mod guard {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::io::Write;

    /// Armed threads asking for more than this at once are refused (null): see the file docs.
    pub const REFUSE_ABOVE: usize = 1 << 30;

    thread_local! {
        static ARMED: Cell<bool> = const { Cell::new(false) };
        static CURRENT: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
        static LARGEST: Cell<usize> = const { Cell::new(0) };
        static LABEL: Cell<(*const u8, usize)> = const { Cell::new((std::ptr::null(), 0)) };
    }

    /// What an armed stretch allocated.
    #[derive(Debug, Clone, Copy)]
    pub struct Stats {
        /// The most bytes held at once.
        pub peak: usize,
        /// The largest single request, bytes.
        pub largest: usize,
    }

    /// Starts counting on this thread; `label` (kept alive by the caller until [`disarm`])
    /// names the case if a request is refused.
    pub fn arm(label: &str) {
        LABEL.set((label.as_ptr(), label.len()));
        CURRENT.set(0);
        PEAK.set(0);
        LARGEST.set(0);
        ARMED.set(true);
    }

    /// Stops counting on this thread and returns what was counted.
    pub fn disarm() -> Stats {
        ARMED.set(false);
        LABEL.set((std::ptr::null(), 0));
        Stats {
            peak: PEAK.get().max(0) as usize,
            largest: LARGEST.get(),
        }
    }

    fn armed() -> bool {
        ARMED.try_with(Cell::get).unwrap_or(false)
    }

    /// Counts a request of `grow` more bytes of which the largest piece is `request`; false
    /// if it is refused.
    fn take(request: usize, grow: isize) -> bool {
        if !armed() {
            return true;
        }
        LARGEST.set(LARGEST.get().max(request));
        if request > REFUSE_ABOVE {
            refused(request);
            return false;
        }
        let now = CURRENT.get() + grow;
        CURRENT.set(now);
        PEAK.set(PEAK.get().max(now));
        true
    }

    fn give(size: usize) {
        if armed() {
            CURRENT.set(CURRENT.get() - size as isize);
        }
    }

    /// Says on stderr, without allocating, which case asked for `size` bytes.
    fn refused(size: usize) {
        ARMED.set(false);
        let (ptr, len) = LABEL.get();
        // SAFETY: `arm` stored the pointer and length of a `&str` its caller keeps alive until
        // `disarm`, and we are between the two.
        let label = if ptr.is_null() {
            &[][..]
        } else {
            unsafe { std::slice::from_raw_parts(ptr, len) }
        };
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut n = size;
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(b"\nhostile_files: case `");
        let _ = err.write_all(label);
        let _ = err.write_all(b"` asked for ");
        let _ = err.write_all(&digits[i..]);
        let _ = err.write_all(
            b" bytes at once (more than 1 GiB): the loader must refuse the file before \
              allocating for what it declares. Refused; the process aborts now.\n",
        );
        ARMED.set(true);
    }

    /// [`System`], counted.
    pub struct Counting(pub System);

    // SAFETY: every call is forwarded to `System` unchanged, or refused with null, which the
    // `GlobalAlloc` contract allows.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if !take(layout.size(), layout.size() as isize) {
                return std::ptr::null_mut();
            }
            unsafe { self.0.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            if !take(layout.size(), layout.size() as isize) {
                return std::ptr::null_mut();
            }
            unsafe { self.0.alloc_zeroed(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            give(layout.size());
            unsafe { self.0.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            if !take(new_size, new_size as isize - layout.size() as isize) {
                return std::ptr::null_mut();
            }
            unsafe { self.0.realloc(ptr, layout, new_size) }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running one case
// ---------------------------------------------------------------------------------------------

/// What a loader did in a case that passed the guard.
#[derive(Debug)]
enum Outcome {
    /// It loaded.
    Loaded,
    /// It returned this error (its message).
    Refused(String),
}

/// Runs `load` on a worker thread under the guard: fails, naming `label`, on a panic, a result
/// later than `limit`, or a peak above `budget` bytes.
fn run_guarded<T: 'static>(
    label: &str,
    limit: Duration,
    budget: usize,
    load: impl FnOnce() -> tinygpt::Result<T> + Send + 'static,
) -> Result<Outcome, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let worker_label = label.to_string();
    let spawned = std::thread::Builder::new()
        .name("hostile-case".into())
        .spawn(move || {
            guard::arm(&worker_label);
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(load));
            let stats = guard::disarm();
            // What `load` returned is dropped here, unarmed.
            let result = match caught {
                Ok(Ok(_)) => Ok(Outcome::Loaded),
                Ok(Err(e)) => Ok(Outcome::Refused(e.to_string())),
                Err(panic) => Err(panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(a panic without a message)".into())),
            };
            let _ = tx.send((result, stats));
        });
    if let Err(e) = spawned {
        return Err(format!("{label}: cannot start the worker thread: {e}"));
    }
    let (result, stats) = match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            return Err(format!("{label}: no result after {limit:?} (a hang?)"))
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            return Err(format!("{label}: the worker died without a result"))
        }
    };
    let outcome = result.map_err(|msg| format!("{label}: panicked: {msg}"))?;
    if stats.peak > budget {
        return Err(format!(
            "{label}: held {} bytes at its peak (largest single request {} bytes), over the \
             budget of {budget} bytes",
            stats.peak, stats.largest
        ));
    }
    Ok(outcome)
}

/// A fresh, empty directory for one case.
fn case_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("tinygpt-hostile-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes `files` into a fresh directory, runs `load(dir)` under the guard (see
/// [`run_guarded`]; the budget counts every byte written) and removes the directory. With
/// `names` non-empty, an error must mention one of them.
fn run_case<T: 'static>(
    label: &str,
    files: &[(&str, Vec<u8>)],
    names: &[&str],
    load: impl FnOnce(PathBuf) -> tinygpt::Result<T> + Send + 'static,
) -> Result<Outcome, TestCaseError> {
    let dir = case_dir();
    let mut input = 0;
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
        input += bytes.len();
    }
    let log = std::env::var_os("HOSTILE_FILES_LOG").is_some();
    if log {
        eprintln!("hostile_files: {label}");
    }
    let worker_dir = dir.clone();
    let result = run_guarded(label, TIME_LIMIT, budget(input), move || load(worker_dir));
    if !matches!(&result, Err(msg) if msg.contains("no result after")) {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let outcome = result.map_err(TestCaseError::fail)?;
    if log {
        eprintln!("  -> {outcome:?}");
    }
    if let Outcome::Refused(msg) = &outcome {
        if !names.is_empty() && !names.iter().any(|n| msg.contains(n)) {
            return Err(TestCaseError::fail(format!(
                "{label}: the error names none of {names:?}: {msg}"
            )));
        }
    }
    Ok(outcome)
}

// ---------------------------------------------------------------------------------------------
// Mutations
// ---------------------------------------------------------------------------------------------

/// What a file is, for the mutations that understand its structure.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// One JSON document.
    Json,
    /// One JSON document per line.
    Jsonl,
    /// A safetensors file.
    Safetensors,
    /// Plain text.
    Text,
}

/// A position in something of a length not known yet: [`Pick::of`] a length `n` is the
/// value modulo `n`.
#[derive(Debug, Clone, Copy)]
struct Pick(usize);

impl Pick {
    /// A position in `0..n` (`n` at least 1).
    fn of(self, n: usize) -> usize {
        self.0 % n.max(1)
    }
}

impl Arbitrary for Pick {
    type Parameters = ();
    type Strategy = prop::strategy::Map<prop::num::usize::Any, fn(usize) -> Pick>;
    fn arbitrary_with(_: ()) -> Self::Strategy {
        any::<usize>().prop_map(Pick)
    }
}

/// One mutation.
#[derive(Debug, Clone)]
enum Edit {
    /// XOR one byte with a non-zero mask.
    Flip(Pick, u8),
    /// Cut the file at an offset.
    Truncate(Pick),
    /// Insert bytes at an offset.
    Insert(Pick, Vec<u8>),
    /// Overwrite bytes from an offset (the file keeps its length where it can).
    Overwrite(Pick, Vec<u8>),
    /// A structure-aware edit of a JSON document (of one line, in JSONL).
    Json(Pick, Pick, JsonEdit),
    /// A structure-aware edit of a safetensors file.
    Safetensors(StEdit),
    /// Set the node at this JSON pointer (adding it to an existing parent) to this JSON text.
    Set(&'static str, String),
}

/// An edit of one node of a JSON document.
#[derive(Debug, Clone)]
enum JsonEdit {
    /// Replace the node with this JSON text (which need not be valid).
    Replace(String),
    /// Remove the node from its object or array.
    Remove,
    /// Add a key to the node if it is an object, with this JSON text as its value.
    AddKey(String),
    /// Multiply a number by 2^32 (ids past any vocabulary, sizes past any file).
    Times2p32,
    /// Negate a number.
    Negate,
}

/// An edit of a safetensors file.
#[derive(Debug, Clone)]
enum StEdit {
    /// Set the header-length field (the first 8 bytes, u64 LE).
    HeaderLen(HeaderLen),
    /// Edit a node of the header's JSON (see [`JsonEdit`]).
    Header(Pick, JsonEdit),
    /// Set a field of one tensor's entry to this JSON text.
    Field(Pick, &'static str, String),
    /// Make one tensor claim `bytes` bytes, consistently (dtype F32, shape `[bytes / 4]`,
    /// offsets spanning them), with the data absent.
    Claim(Pick, u64),
    /// Re-encode every tensor in this dtype, consistently (shapes kept, data cut or repeated).
    Recode(&'static str),
}

/// A header-length field.
#[derive(Debug, Clone, Copy)]
enum HeaderLen {
    /// This value.
    Value(u64),
    /// The file's length plus this.
    FileLenPlus(i64),
    /// The true header length plus this.
    HeaderPlus(i64),
}

/// JSON texts that break assumptions: huge and negative numbers, wrong types, deep nesting,
/// long strings.
fn hostile_json() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "18446744073709551615",
            "18446744073709551616",
            "9223372036854775807",
            "-1",
            "-9223372036854775808",
            "4294967295",
            "4294967296",
            "1000000000000",
            "1e300",
            "1e999",
            "-0",
            "0",
            "0.5",
            "NaN",
            "null",
            "true",
            "\"\"",
            "\"x\"",
            "\"\\u0000\"",
            "\"\\ud800\"",
            "[]",
            "{}",
            "[1, 2, 3]",
            "[4294967296, 4294967296]",
            "{\"type\": \"BPE\"}",
        ])
        .prop_map(str::to_string),
        1 => (1usize..4000, any::<bool>()).prop_map(|(depth, closed)| {
            let mut s = "[".repeat(depth);
            if closed {
                s.push_str(&"]".repeat(depth));
            }
            s
        }),
        1 => (1usize..300_000).prop_map(|n| format!("\"{}\"", "a".repeat(n))),
        1 => (1usize..20_000, prop::sample::select(vec!["(", "[", "\\\\", "(?:"]))
            .prop_map(|(n, s)| format!("\"{}\"", s.repeat(n))),
    ]
}

fn json_edit() -> impl Strategy<Value = JsonEdit> {
    prop_oneof![
        6 => hostile_json().prop_map(JsonEdit::Replace),
        1 => Just(JsonEdit::Remove),
        1 => hostile_json().prop_map(JsonEdit::AddKey),
        2 => Just(JsonEdit::Times2p32),
        1 => Just(JsonEdit::Negate),
    ]
}

fn st_edit() -> impl Strategy<Value = StEdit> {
    let header_len = prop_oneof![
        prop::sample::select(vec![
            0,
            1,
            7,
            100_000_001,
            1 << 32,
            1_000_000_000_000,
            1 << 63,
            u64::MAX,
        ])
        .prop_map(HeaderLen::Value),
        (-16i64..16).prop_map(HeaderLen::FileLenPlus),
        (-16i64..16).prop_map(HeaderLen::HeaderPlus),
    ];
    let field = prop_oneof![
        prop::sample::select(vec![
            "\"F16\"",
            "\"BF16\"",
            "\"F64\"",
            "\"I64\"",
            "\"I32\"",
            "\"U32\"",
            "\"U16\"",
            "\"U8\"",
            "\"I8\"",
            "\"BOOL\"",
            "\"F8_E4M3\"",
            "\"F8_E5M2\"",
            "\"F4\"",
            "\"F6_E2M3\"",
            "\"F8_E8M0\"",
            "\"C64\"",
            "\"Q4\"",
            "7",
        ])
        .prop_map(|d| ("dtype", d.to_string())),
        prop::sample::select(vec![
            "[4294967296, 4294967296]",
            "[0, 4611686018427387904]",
            "[18446744073709551615]",
            "[]",
            "[0]",
            "[1]",
            "[-1]",
            "[1, 2, 3, 4, 5, 6, 7, 8]",
            "\"x\"",
        ])
        .prop_map(|s| ("shape", s.to_string())),
        prop::sample::select(vec![
            "[0, 1000000000000]",
            "[0, 18446744073709551615]",
            "[18446744073709551615, 0]",
            "[0, 0]",
            "[4, 0]",
            "[1]",
            "null",
        ])
        .prop_map(|s| ("data_offsets", s.to_string())),
    ];
    prop_oneof![
        2 => header_len.prop_map(StEdit::HeaderLen),
        2 => (any::<Pick>(), json_edit()).prop_map(|(i, e)| StEdit::Header(i, e)),
        3 => (any::<Pick>(), field).prop_map(|(i, (f, v))| StEdit::Field(i, f, v)),
        1 => (
            any::<Pick>(),
            prop::sample::select(vec![1u64 << 40, 1_000_000_000_000, 1 << 62])
        )
            .prop_map(|(i, b)| StEdit::Claim(i, b)),
        1 => prop::sample::select(vec![
            "F16", "BF16", "F64", "I64", "U8", "F8_E4M3", "F4", "F6_E2M3", "F8_E8M0", "BOOL",
        ])
        .prop_map(StEdit::Recode),
    ]
}

fn byte_edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<Pick>(), 1u8..=255).prop_map(|(i, m)| Edit::Flip(i, m)),
        2 => any::<Pick>().prop_map(Edit::Truncate),
        2 => (any::<Pick>(), prop::collection::vec(any::<u8>(), 1..24))
            .prop_map(|(i, b)| Edit::Insert(i, b)),
        2 => (any::<Pick>(), prop::collection::vec(any::<u8>(), 1..24))
            .prop_map(|(i, b)| Edit::Overwrite(i, b)),
    ]
}

/// A Precompiled normalizer (SentencePiece's) with this charsmap, as JSON.
fn precompiled(charsmap: &[u8]) -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::new();
    for chunk in charsmap.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            text.push(if i <= chunk.len() {
                B64[(n >> (18 - 6 * i)) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    format!("{{\"type\": \"Precompiled\", \"precompiled_charsmap\": \"{text}\"}}")
}

/// A charsmap declaring a trie of `trie_size` bytes, then a trie of 512 units in which the
/// byte `a` is a leaf (its children at unit `0x61 ^ child_offset`, its replacement at offset
/// `value` of `strings`), then `strings`. With `child_offset` `0x61 ^ 256`, `value` 0 and
/// `strings` `o\0`, it maps `a` to `o`.
fn charsmap(trie_size: u32, child_offset: u32, value: u32, strings: &[u8]) -> Vec<u8> {
    let mut units = vec![0u32; 512];
    units[0x61] = (child_offset << 10) | (1 << 8) | 0x61;
    units[256] = value;
    let mut out = trie_size.to_le_bytes().to_vec();
    for u in units {
        out.extend_from_slice(&u.to_le_bytes());
    }
    out.extend_from_slice(strings);
    out
}

/// Edits of the fields of a `tokenizer.json` that declare sizes or ids.
fn tokenizer_edit() -> impl Strategy<Value = Edit> {
    let valid = charsmap(2048, 0x61 ^ 256, 0, b"b\0");
    prop_oneof![
        (prop::sample::select(vec!["/model/vocab/a", "/model/vocab/t", "/model/vocab/Ġ"]),
         prop::sample::select(vec!["4294967295", "4294967296", "1000000", "300", "-1", "0"]))
            .prop_map(|(p, v)| Edit::Set(p, v.to_string())),
        prop::sample::select(vec!["[\"zz\", \"qq\"]", "\"zz qq\"", "[\"a\"]", "[]", "7"])
            .prop_map(|m| Edit::Set("/model/merges/0", m.to_string())),
        prop::sample::select(vec![
            r#"{"strategy": {"Fixed": 1000000000000}, "direction": "Right", "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "a"}"#,
            r#"{"strategy": "BatchLongest", "direction": "Left", "pad_to_multiple_of": 1000000000000, "pad_id": 4294967295, "pad_type_id": 0, "pad_token": "[PAD]"}"#,
        ])
        .prop_map(|p| Edit::Set("/padding", p.to_string())),
        prop::sample::select(vec![
            r#"{"direction": "Right", "max_length": 1000000000000, "strategy": "LongestFirst", "stride": 0}"#,
            r#"{"direction": "Left", "max_length": 1, "strategy": "OnlyFirst", "stride": 1000000000000}"#,
        ])
        .prop_map(|t| Edit::Set("/truncation", t.to_string())),
        prop::sample::select(vec![
            precompiled(&[0xff, 0xff, 0xff, 0xff]),
            precompiled(&charsmap(2048, 0x61 ^ 256, 0, b"b\0")),
            precompiled(&charsmap(2048, 0x61 ^ 4096, 0, b"b\0")),
            precompiled(&charsmap(2048, 0x61 ^ 256, 7, b"b\0")),
            precompiled(&charsmap(2048, 0x61 ^ 256, 1, "é\0".as_bytes())),
            precompiled(&charsmap(2048, 0x61 ^ 256, 0, b"\xff\0")),
            precompiled(&charsmap(4096, 0x61 ^ 256, 0, b"b\0")),
            precompiled(&charsmap(0, 0, 0, b"")),
            precompiled(&[1, 2]),
            format!("{{\"type\": \"Sequence\", \"normalizers\": [{{\"type\": \"NFC\"}}, {}]}}", precompiled(&valid[..1000])),
            r#"{"type": "Precompiled", "precompiled_charsmap": "!!!"}"#.to_string(),
            r#"{"normalizers": [{"type": "Precompiled", "precompiled_charsmap": "/P///w=="}]}"#.to_string(),
            r#"{"type": "Precompiled", "precompiled_charsmap": "AAA\u0041"}"#.to_string(),
            r#"{"type": "Precompiled"}"#.to_string(),
            r#"{"type": "Replace", "pattern": {"Regex": "(((("}, "content": "x"}"#.to_string(),
        ])
        .prop_map(|n| Edit::Set("/normalizer", n)),
        prop::sample::select(vec![
            r#"{"type": "Split", "pattern": {"Regex": "(a|a?)+$"}, "behavior": "Isolated", "invert": false}"#,
            r#"{"type": "Split", "pattern": {"Regex": "["}, "behavior": "Isolated", "invert": false}"#,
            r#"{"type": "Split", "pattern": {"String": ""}, "behavior": "Removed", "invert": true}"#,
        ])
        .prop_map(|p| Edit::Set("/pre_tokenizer", p.to_string())),
        (1usize..6000, prop::sample::select(vec!["[", "(", "[a", "(?:", "\\["]))
            .prop_map(|(n, s)| Edit::Set("/pre_tokenizer/pattern/Regex", serde_json::to_string(&s.repeat(n)).unwrap())),
        prop::sample::select(vec![
            r###"{"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]], "continuing_subword_prefix": "##"}"###,
            r#"{"type": "BPE", "vocab": {"a": 0, "é": 1, "aé": 2}, "merges": [["a", "é"]], "continuing_subword_prefix": "\u00c3"}"#,
            r#"{"type": "BPE", "vocab": {"a": 0, "bb": 1}, "merges": ["a bb"], "unk_token": "zz", "byte_fallback": true, "dropout": 1.5}"#,
            r###"{"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 0, "vocab": {"a": 0}}"###,
            r#"{"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "", "max_input_chars_per_word": 18446744073709551615, "vocab": {"a": 0, "[UNK]": 1}}"#,
            r#"{"type": "Unigram", "unk_id": 5, "vocab": [["a", 0.0]], "byte_fallback": false}"#,
            r#"{"type": "Unigram", "unk_id": 0, "vocab": [["", -1e300], ["a", 1e300]], "byte_fallback": true}"#,
            r#"{"type": "Unigram", "unk_id": null, "vocab": [], "byte_fallback": false}"#,
            r#"{"type": "WordLevel", "vocab": {}, "unk_token": "x"}"#,
        ])
        .prop_map(|m| Edit::Set("/model", m.to_string())),
        prop::sample::select(vec![
            r#"[{"id": 4294967295, "content": "a", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}]"#,
            r#"[{"id": 0, "content": "", "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true}]"#,
        ])
        .prop_map(|a| Edit::Set("/added_tokens", a.to_string())),
    ]
}

/// One to three mutations fit for a file of `kind`.
fn edits(kind: Kind) -> BoxedStrategy<Vec<Edit>> {
    let one = match kind {
        Kind::Json | Kind::Jsonl => prop_oneof![
            2 => byte_edit(),
            3 => (any::<Pick>(), any::<Pick>(), json_edit())
                .prop_map(|(line, node, e)| Edit::Json(line, node, e)),
        ]
        .boxed(),
        Kind::Safetensors => {
            prop_oneof![2 => byte_edit(), 3 => st_edit().prop_map(Edit::Safetensors)].boxed()
        }
        Kind::Text => byte_edit().boxed(),
    };
    prop::collection::vec(one, 1..=3).boxed()
}

/// `bytes` with `edits` applied in order (an edit that does not apply, such as a JSON edit of
/// bytes that no longer parse, changes nothing).
fn mutate(bytes: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for e in edits {
        match e {
            Edit::Flip(i, mask) => {
                if !b.is_empty() {
                    let at = i.of(b.len());
                    b[at] ^= mask;
                }
            }
            Edit::Truncate(i) => b.truncate(i.of(b.len() + 1)),
            Edit::Insert(i, bytes) => {
                let at = i.of(b.len() + 1);
                b.splice(at..at, bytes.iter().copied());
            }
            Edit::Overwrite(i, bytes) => {
                let at = i.of(b.len() + 1);
                let end = (at + bytes.len()).min(b.len());
                b.splice(at..end, bytes.iter().copied());
            }
            Edit::Json(line, node, edit) => {
                if let Some(edited) = edit_jsonl(&b, line, node, edit) {
                    b = edited;
                }
            }
            Edit::Safetensors(edit) => {
                if let Some(edited) = edit_safetensors(&b, edit) {
                    b = edited;
                }
            }
            Edit::Set(pointer, raw) => {
                if let Some(edited) = set_json(&b, pointer, raw) {
                    b = edited.into_bytes();
                }
            }
        }
    }
    b
}

/// A string no valid file holds, put where a raw JSON text goes.
const PLACEHOLDER: &str = "\u{1}hostile\u{1}";

/// Every node of `v` as a JSON pointer.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let key = k.replace('~', "~0").replace('/', "~1");
                pointers(child, format!("{at}/{key}"), out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                pointers(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

/// `v` serialised with the placeholder string replaced by `raw`.
fn with_raw(v: &Value, raw: &str) -> String {
    let placeholder = serde_json::to_string(PLACEHOLDER).unwrap();
    serde_json::to_string(v).unwrap().replace(&placeholder, raw)
}

/// Applies `edit` to the node `node` of the JSON text `text`; `None` if it does not parse.
fn edit_json(text: &[u8], node: &Pick, edit: &JsonEdit) -> Option<String> {
    let mut v: Value = serde_json::from_slice(text).ok()?;
    let mut all = Vec::new();
    pointers(&v, String::new(), &mut all);
    let at = all[node.of(all.len())].clone();
    match edit {
        JsonEdit::Replace(raw) => {
            *v.pointer_mut(&at)? = Value::String(PLACEHOLDER.into());
            Some(with_raw(&v, raw))
        }
        JsonEdit::Remove => {
            let (parent, key) = at.rsplit_once('/')?;
            let key = key.replace("~1", "/").replace("~0", "~");
            match v.pointer_mut(parent)? {
                Value::Object(m) => {
                    m.remove(&key);
                }
                Value::Array(a) => {
                    let i: usize = key.parse().ok()?;
                    a.remove(i);
                }
                _ => return None,
            }
            Some(v.to_string())
        }
        JsonEdit::AddKey(raw) => {
            let Value::Object(m) = v.pointer_mut(&at)? else {
                return None;
            };
            m.insert("hostile".into(), Value::String(PLACEHOLDER.into()));
            Some(with_raw(&v, raw))
        }
        JsonEdit::Times2p32 | JsonEdit::Negate => {
            let target = v.pointer_mut(&at)?;
            let Value::Number(n) = &*target else {
                return None;
            };
            let text = if let Some(u) = n.as_u64() {
                match edit {
                    JsonEdit::Times2p32 => (u128::from(u) << 32).to_string(),
                    _ => format!("-{u}"),
                }
            } else if let Some(i) = n.as_i64() {
                match edit {
                    JsonEdit::Times2p32 => (i128::from(i) << 32).to_string(),
                    _ => (-i128::from(i)).to_string(),
                }
            } else {
                let f = n.as_f64()?;
                match edit {
                    JsonEdit::Times2p32 => format!("{:e}", f * 4294967296.0),
                    _ => format!("{:e}", -f),
                }
            };
            *target = Value::String(PLACEHOLDER.into());
            Some(with_raw(&v, &text))
        }
    }
}

/// Sets the node at `pointer` of the JSON text `text` to the JSON text `raw`, adding it to
/// its parent object or array if it is not there; `None` if the text does not parse or has
/// no such parent.
fn set_json(text: &[u8], pointer: &str, raw: &str) -> Option<String> {
    let mut v: Value = serde_json::from_slice(text).ok()?;
    let (parent, key) = pointer.rsplit_once('/')?;
    let slot = Value::String(PLACEHOLDER.into());
    match v.pointer_mut(parent)? {
        Value::Object(m) => {
            m.insert(key.replace("~1", "/").replace("~0", "~"), slot);
        }
        Value::Array(a) => match key.parse::<usize>() {
            Ok(i) if i < a.len() => a[i] = slot,
            _ => a.push(slot),
        },
        _ => return None,
    }
    Some(with_raw(&v, raw))
}

/// [`edit_json`] on the whole text if it parses as one document, else on one of its lines.
fn edit_jsonl(b: &[u8], line: &Pick, node: &Pick, edit: &JsonEdit) -> Option<Vec<u8>> {
    if let Some(whole) = edit_json(b, node, edit) {
        return Some(whole.into_bytes());
    }
    let mut lines: Vec<Vec<u8>> = b.split(|&c| c == b'\n').map(<[u8]>::to_vec).collect();
    let i = line.of(lines.len());
    lines[i] = edit_json(&lines[i], node, edit)?.into_bytes();
    Some(lines.join(&b'\n'))
}

/// A safetensors file split into its header (parsed) and its data.
fn split_safetensors(b: &[u8]) -> Option<(serde_json::Map<String, Value>, &[u8])> {
    let n = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
    let header = serde_json::from_slice(b.get(8..8 + n)?).ok()?;
    Some((header, b.get(8 + n..)?))
}

fn join_safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let h = header.to_string();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out
}

/// The tensor names of a header in offset order.
fn tensor_names(header: &serde_json::Map<String, Value>) -> Vec<String> {
    let mut names: Vec<(u64, String)> = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| (v["data_offsets"][0].as_u64().unwrap_or(0), k.clone()))
        .collect();
    names.sort();
    names.into_iter().map(|(_, k)| k).collect()
}

fn bits(dtype: &str) -> u64 {
    match dtype {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 8,
        "F16" | "BF16" | "I16" | "U16" => 16,
        "F64" | "I64" | "U64" | "C64" => 64,
        _ => 32,
    }
}

/// Applies a safetensors edit; `None` if the file no longer parses where the edit needs it.
fn edit_safetensors(b: &[u8], edit: &StEdit) -> Option<Vec<u8>> {
    match edit {
        StEdit::HeaderLen(len) => {
            let true_len = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
            let value = match *len {
                HeaderLen::Value(v) => v,
                HeaderLen::FileLenPlus(d) => (b.len() as u64).wrapping_add_signed(d),
                HeaderLen::HeaderPlus(d) => true_len.wrapping_add_signed(d),
            };
            let mut out = b.to_vec();
            out[..8].copy_from_slice(&value.to_le_bytes());
            Some(out)
        }
        StEdit::Header(node, edit) => {
            let n = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
            let header = edit_json(b.get(8..8 + n)?, node, edit)?;
            let mut out = (header.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(b.get(8 + n..)?);
            Some(out)
        }
        StEdit::Field(i, field, raw) => {
            let (mut header, data) = split_safetensors(b)?;
            let names = tensor_names(&header);
            let name = names.get(i.of(names.len().max(1)))?;
            let entry = header.get_mut(name)?.as_object_mut()?;
            entry.insert((*field).into(), Value::String(PLACEHOLDER.into()));
            let h = with_raw(&Value::Object(header), raw);
            let mut out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(data);
            Some(out)
        }
        StEdit::Claim(i, bytes) => {
            let (mut header, data) = split_safetensors(b)?;
            let names = tensor_names(&header);
            let name = names.get(i.of(names.len().max(1)))?;
            let entry = header.get_mut(name)?.as_object_mut()?;
            let start = entry.get("data_offsets")?.get(0)?.as_u64()?;
            entry.insert("dtype".into(), "F32".into());
            entry.insert("shape".into(), serde_json::json!([bytes / 4]));
            entry.insert(
                "data_offsets".into(),
                serde_json::json!([start, start.saturating_add(*bytes)]),
            );
            Some(join_safetensors(&Value::Object(header), data))
        }
        StEdit::Recode(dtype) => {
            let (mut header, data) = split_safetensors(b)?;
            let mut out = Vec::new();
            for name in tensor_names(&header) {
                let entry = header.get_mut(&name)?.as_object_mut()?;
                let n = entry
                    .get("shape")?
                    .as_array()?
                    .iter()
                    .try_fold(1u64, |n, d| n.checked_mul(d.as_u64().unwrap_or(1)))?;
                let offsets = entry.get("data_offsets")?;
                let (s, e) = (
                    offsets.get(0)?.as_u64()? as usize,
                    offsets.get(1)?.as_u64()? as usize,
                );
                let old = data.get(s..e)?;
                // (A shape made huge by an earlier edit is left for the loader to refuse.)
                let len = usize::try_from(n.checked_mul(bits(dtype))?.div_ceil(8)).ok()?;
                if len > 64 << 20 {
                    return None;
                }
                let start = out.len();
                out.extend((0..len).map(|k| old.get(k % old.len().max(1)).copied().unwrap_or(0)));
                entry.insert("dtype".into(), (*dtype).into());
                entry.insert("data_offsets".into(), serde_json::json!([start, out.len()]));
            }
            Some(join_safetensors(&Value::Object(header), &out))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Valid files
// ---------------------------------------------------------------------------------------------

/// The valid files every case starts from.
struct Fixtures {
    /// A checkpoint directory of a tiny char-level model after two training steps.
    checkpoint: Vec<(&'static str, Vec<u8>)>,
    /// Its model's training settings.
    train_config: TrainConfig,
    /// A byte-level BPE `tokenizer.json`.
    bpe_tokenizer: Vec<u8>,
    /// The corpus both tokenizers were trained on.
    corpus: Vec<u8>,
    /// The char tokenizer.
    char_tokenizer: Tokenizer,
    /// SFT data: chat and Alpaca records as JSONL, and Alpaca records as a JSON array.
    sft_jsonl: Vec<u8>,
    sft_array: Vec<u8>,
    /// Preference pairs as JSONL.
    preference_jsonl: Vec<u8>,
    /// The Hugging Face GPT-2 fixture directory.
    hf: Vec<(&'static str, Vec<u8>)>,
}

fn corpus_text() -> String {
    let words = [
        "the ", "cat ", "sat ", "on ", "a ", "mat.\n", "dog ", "ran ",
    ];
    (0..400)
        .map(|i| words[(i * 7 + i / 3) % words.len()])
        .collect()
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let text = corpus_text();
        let tok = Tokenizer::train_char(&text).unwrap();
        let cfg = GptConfig {
            vocab_size: tok.vocab_size(),
            block_size: 8,
            n_layer: 1,
            n_head: 2,
            n_embd: 8,
            dropout: 0.0,
            bias: true, ..Default::default()
        };
        let model = Gpt::init(&cfg, 0, &Device::Cpu).unwrap();
        let data = TokenDataset::from_tokens(tok.encode(&text).unwrap(), 0.1).unwrap();
        let mut obj = Pretraining::new(model, tok.clone(), data, 2).unwrap();
        let train_config = TrainConfig {
            max_iters: 2,
            eval_interval: 1,
            eval_iters: 1,
            log_interval: 1,
            batch_size: 2,
            warmup_iters: 1,
            lr_decay_iters: 2,
            always_save_checkpoint: true,
            ..Default::default()
        };
        let dir = case_dir().join("ckpt");
        Trainer::new(train_config.clone(), obj.parameters().unwrap())
            .unwrap()
            .with_out_dir(&dir)
            .fit(&mut obj, |_| {})
            .unwrap();
        let checkpoint = [
            checkpoint::files::CONFIG,
            checkpoint::files::MODEL,
            checkpoint::files::TOKENIZER,
            checkpoint::files::OPTIMIZER,
            checkpoint::files::TRAINER_STATE,
            checkpoint::files::METRICS,
        ]
        .map(|f| (f, std::fs::read(dir.join(f)).unwrap()))
        .to_vec();
        std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
        let bpe_tokenizer = Tokenizer::train_bpe(&text, 300)
            .unwrap()
            .to_json(true)
            .unwrap()
            .into_bytes();
        let sft_jsonl = concat!(
            r#"{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat?"}, {"role": "assistant", "content": "sat on a mat."}]}"#,
            "\n",
            r#"{"messages": [{"role": "user", "content": "a dog?"}, {"role": "assistant", "content": "ran."}, {"role": "user", "content": "the dog?"}, {"role": "assistant", "content": "sat."}]}"#,
            "\n\n",
            r#"{"instruction": "the cat", "input": "on a mat", "output": "sat."}"#,
            "\n",
        )
        .as_bytes()
        .to_vec();
        let sft_array = br#"[
  {"instruction": "the cat", "input": "", "output": "sat on a mat."},
  {"instruction": "a dog", "input": "the mat", "output": "ran."}
]
"#
        .to_vec();
        let preference_jsonl = concat!(
            r#"{"prompt": "the cat?", "history": [{"role": "system", "content": "be brief"}], "chosen": "sat.", "rejected": "ran."}"#,
            "\n",
            r#"{"prompt": "a dog?", "chosen": "ran on a mat.", "rejected": "the"}"#,
            "\n",
            r#"{"prompt": "the mat?", "history": [{"role": "user", "content": "a cat?"}, {"role": "assistant", "content": "sat."}], "chosen": "a mat.", "rejected": "dog"}"#,
            "\n",
        )
        .as_bytes()
        .to_vec();
        let hf_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_gpt2/model");
        let hf = ["config.json", "model.safetensors", "vocab.json", "merges.txt"]
            .map(|f| (f, std::fs::read(hf_dir.join(f)).unwrap()))
            .to_vec();
        Fixtures {
            checkpoint,
            train_config,
            bpe_tokenizer,
            corpus: text.into_bytes(),
            char_tokenizer: tok,
            sft_jsonl,
            sft_array,
            preference_jsonl,
            hf,
        }
    })
}

/// The checkpoint's files with `edits` applied to the one named `target`.
fn checkpoint_with(target: &str, edits: &[Edit]) -> Vec<(&'static str, Vec<u8>)> {
    fixtures()
        .checkpoint
        .iter()
        .map(|(name, bytes)| {
            let bytes = if *name == target {
                mutate(bytes, edits)
            } else {
                bytes.clone()
            };
            (*name, bytes)
        })
        .collect()
}

/// A target file and mutations fit for it, `files` naming each candidate and its kind.
fn target_and_edits(
    files: &'static [(&'static str, Kind)],
) -> impl Strategy<Value = (&'static str, Vec<Edit>)> {
    prop::sample::select(files).prop_flat_map(|(name, kind)| (Just(name), edits(kind)))
}

/// Runs a loaded model on two tokens: a model that loads must run (or refuse to, typed).
fn forward_two_tokens(model: &Gpt) -> tinygpt::Result<()> {
    let ids = Tensor::new(&[[0u32, 1]], model.device())?;
    model.forward(&ids)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The properties
// ---------------------------------------------------------------------------------------------

const CHECKPOINT_MODEL_FILES: &[(&str, Kind)] = &[
    ("config.json", Kind::Json),
    ("model.safetensors", Kind::Safetensors),
    ("tokenizer.json", Kind::Json),
];

const CHECKPOINT_TRAINER_FILES: &[(&str, Kind)] = &[
    ("optimizer.safetensors", Kind::Safetensors),
    ("trainer_state.json", Kind::Json),
    ("metrics.jsonl", Kind::Jsonl),
];

const HF_FILES: &[(&str, Kind)] = &[
    ("config.json", Kind::Json),
    ("model.safetensors", Kind::Safetensors),
    ("vocab.json", Kind::Json),
    ("merges.txt", Kind::Text),
];

proptest! {
    #![proptest_config(config())]

    /// `load_model` / `load_trainable` on a checkpoint with one model file mutated; a model
    /// that loads runs. (An error may name another of the three files: a `vocab_size` changed
    /// in `config.json` is a tensor of the wrong shape in `model.safetensors`.)
    #[test]
    fn checkpoint_model_files(
        (target, edits) in target_and_edits(CHECKPOINT_MODEL_FILES),
        trainable in any::<bool>(),
    ) {
        let label = format!("load_model({target}, trainable {trainable}): {edits:?}");
        let files = checkpoint_with(target, &edits);
        let names = ["config.json", "model.safetensors", "tokenizer.json"];
        run_case(&label, &files, &names, move |dir| {
            let (model, tok) = if trainable {
                checkpoint::load_trainable(&dir, &Device::Cpu)?
            } else {
                checkpoint::load_model(&dir, &Device::Cpu)?
            };
            forward_two_tokens(&model)?;
            // A vocabulary that lost a character may not encode this: not the loader's error.
            let _ = tok.encode("the cat");
            Ok(())
        })?;
    }

    /// `load_safetensors` on a mutated `model.safetensors` or `optimizer.safetensors`; what
    /// loads holds no more bytes than the file.
    #[test]
    fn safetensors_files(
        optimizer in any::<bool>(),
        edits in edits(Kind::Safetensors),
    ) {
        let target = if optimizer { "optimizer.safetensors" } else { "model.safetensors" };
        let label = format!("load_safetensors({target}): {edits:?}");
        let files = checkpoint_with(target, &edits);
        let size = files.iter().find(|(n, _)| *n == target).map_or(0, |(_, b)| b.len());
        run_case(&label, &files, &[target], move |dir| {
            let tensors = checkpoint::load_safetensors(dir.join(target), &Device::Cpu)?;
            let bytes: usize = tensors
                .values()
                .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                .sum();
            assert!(bytes <= size, "{bytes} bytes of tensors from a {size}-byte file");
            Ok(())
        })?;
    }

    /// `GptConfig::load` on a mutated `config.json`.
    #[test]
    fn config_json(edits in edits(Kind::Json)) {
        let label = format!("GptConfig::load: {edits:?}");
        let files = checkpoint_with("config.json", &edits);
        run_case(&label, &files, &["config.json"], move |dir| {
            GptConfig::load(dir.join("config.json"))
        })?;
    }

    /// `Tokenizer::from_file` on a mutated char or BPE `tokenizer.json`; a tokenizer that
    /// loads encodes and decodes a short text.
    #[test]
    fn tokenizer_json(
        bpe in any::<bool>(),
        edits in prop_oneof![
            edits(Kind::Json),
            prop::collection::vec(prop_oneof![tokenizer_edit(), byte_edit()], 1..=3),
        ],
    ) {
        let label = format!("Tokenizer::from_file(bpe {bpe}): {edits:?}");
        let f = fixtures();
        let base = if bpe { f.bpe_tokenizer.clone() } else {
            f.checkpoint.iter().find(|(n, _)| *n == "tokenizer.json").unwrap().1.clone()
        };
        let files = [("tokenizer.json", mutate(&base, &edits))];
        run_case(&label, &files, &["tokenizer.json"], move |dir| {
            let tok = Tokenizer::from_file(dir.join("tokenizer.json"))?;
            if let Ok(ids) = tok.encode("the cat sat") {
                assert!(ids.len() <= 64, "{} ids for 11 characters", ids.len());
                tok.decode(&ids)?;
            }
            tok.decode(&[0, tok.eot_id()])?;
            Ok(())
        })?;
    }

    /// `TrainerState::load` on a mutated `trainer_state.json`.
    #[test]
    fn trainer_state_json(edits in edits(Kind::Json)) {
        let label = format!("TrainerState::load: {edits:?}");
        let files = checkpoint_with("trainer_state.json", &edits);
        run_case(&label, &files, &["trainer_state.json"], move |dir| TrainerState::load(&dir))?;
    }

    /// `Trainer::resume_from` with the optimiser state, trainer state or metrics mutated.
    /// (Only the guard's three points are checked: its messages belong to `train.rs`.)
    #[test]
    fn trainer_resume(
        (target, edits) in target_and_edits(CHECKPOINT_TRAINER_FILES),
    ) {
        let label = format!("Trainer::resume_from({target}): {edits:?}");
        let files = checkpoint_with(target, &edits);
        let cfg = fixtures().train_config.clone();
        run_case(&label, &files, &[], move |dir| {
            let (model, _) = checkpoint::load_trainable(&dir, &Device::Cpu)?;
            Trainer::new(cfg, model.vars()?)?.resume_from(&dir)
        })?;
    }

    /// `load_sft_file` on mutated SFT JSONL or a JSON array, skipping bad lines or not.
    #[test]
    fn sft_data(array in any::<bool>(), skip in any::<bool>(), edits in edits(Kind::Jsonl)) {
        let name = if array { "sft.json" } else { "sft.jsonl" };
        let label = format!("load_sft_file({name}, skip {skip}): {edits:?}");
        let f = fixtures();
        let base = if array { &f.sft_array } else { &f.sft_jsonl };
        let files = [(name, mutate(base, &edits))];
        run_case(&label, &files, &[name], move |dir| {
            let data = tinygpt::sft::load_sft_file(dir.join(name), skip)?;
            assert!(!data.conversations.is_empty());
            assert_eq!(data.conversations.len(), data.lines.len());
            Ok(())
        })?;
    }

    /// `load_preference_file` and `load_prompts` on mutated preference JSONL.
    #[test]
    fn preference_data(prompts in any::<bool>(), skip in any::<bool>(), edits in edits(Kind::Jsonl)) {
        let label = format!("preference data (prompts {prompts}, skip {skip}): {edits:?}");
        let files = [("pref.jsonl", mutate(&fixtures().preference_jsonl, &edits))];
        run_case(&label, &files, &["pref.jsonl"], move |dir| {
            let path = dir.join("pref.jsonl");
            if prompts {
                assert!(!tinygpt::rlhf::data::load_prompts(&path)?.is_empty());
            } else {
                assert!(!tinygpt::rlhf::data::load_preference_file(&path, skip)?.pairs.is_empty());
            }
            Ok(())
        })?;
    }

    /// `TokenDataset::from_file` on a mutated corpus.
    #[test]
    fn text_corpus(edits in edits(Kind::Text)) {
        let label = format!("TokenDataset::from_file: {edits:?}");
        let f = fixtures();
        let files = [("corpus.txt", mutate(&f.corpus, &edits))];
        let tok = f.char_tokenizer.clone();
        run_case(&label, &files, &["corpus.txt"], move |dir| {
            TokenDataset::from_file(dir.join("corpus.txt"), &tok, 0.1)
        })?;
    }

    /// `load_model` on a Hugging Face GPT-2 directory with one file mutated; a model that
    /// loads runs.
    #[test]
    fn hugging_face_dir((target, edits) in target_and_edits(HF_FILES)) {
        let label = format!("load_model(Hugging Face {target}): {edits:?}");
        let files: Vec<_> = fixtures()
            .hf
            .iter()
            .map(|(n, b)| (*n, if *n == target { mutate(b, &edits) } else { b.clone() }))
            .collect();
        let names = ["config.json", "model.safetensors", "vocab.json", "merges.txt"];
        run_case(&label, &files, &names, move |dir| {
            let (model, _) = checkpoint::load_model(&dir, &Device::Cpu)?;
            forward_two_tokens(&model)
        })?;
    }
}

// ---------------------------------------------------------------------------------------------
// The harness itself
// ---------------------------------------------------------------------------------------------

#[test]
fn the_guard_reports_panics_hangs_and_big_allocations() {
    let panicked = run_guarded(
        "self-test",
        TIME_LIMIT,
        budget(0),
        || -> tinygpt::Result<()> { panic!("boom {}", 7) },
    );
    assert_eq!(panicked.unwrap_err(), "self-test: panicked: boom 7");

    let hung = run_guarded("self-test", Duration::from_millis(50), budget(0), || {
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    });
    assert_eq!(
        hung.unwrap_err(),
        "self-test: no result after 50ms (a hang?)"
    );

    // 80 MiB held at once is over 64 MiB; ten times 8 MiB, one after the other, is not.
    let big = run_guarded("self-test", TIME_LIMIT, budget(0), || {
        let v = vec![1u8; 80 << 20];
        Ok(std::hint::black_box(v).len())
    });
    let msg = big.unwrap_err();
    assert!(
        msg.starts_with("self-test: held 8388") && msg.contains("over the budget of 67108864"),
        "{msg}"
    );
    let small = run_guarded("self-test", TIME_LIMIT, budget(0), || {
        for _ in 0..10 {
            std::hint::black_box(vec![1u8; 8 << 20]);
        }
        Ok(())
    });
    assert!(matches!(small, Ok(Outcome::Loaded)), "{small:?}");

    let refused = run_guarded("self-test", TIME_LIMIT, budget(0), || {
        Err::<(), _>(tinygpt::Error::InvalidArgument("no".into()))
    });
    assert!(
        matches!(&refused, Ok(Outcome::Refused(m)) if m == "invalid argument: no"),
        "{refused:?}"
    );
}

#[test]
fn the_mutations_do_what_they_say() {
    let idx = Pick;
    assert_eq!(mutate(b"abcd", &[Edit::Flip(idx(1), 0x20)]), b"aBcd");
    assert_eq!(mutate(b"abcd", &[Edit::Truncate(idx(2))]), b"ab");
    assert_eq!(
        mutate(b"abcd", &[Edit::Insert(idx(4), b"xy".to_vec())]),
        b"abcdxy"
    );
    assert_eq!(
        mutate(b"abcd", &[Edit::Overwrite(idx(3), b"xy".to_vec())]),
        b"abcxy"
    );
    let json = br#"{"a": [1, 2], "b": "x"}"#;
    // Pointers, children before parents: /a/0, /a/1, /a, /b, "".
    assert_eq!(
        mutate(json, &[Edit::Json(idx(0), idx(1), JsonEdit::Times2p32)]),
        br#"{"a":[1,8589934592],"b":"x"}"#
    );
    assert_eq!(
        mutate(
            json,
            &[Edit::Json(idx(0), idx(2), JsonEdit::Replace("[[[".into()))]
        ),
        br#"{"a":[[[,"b":"x"}"#
    );
    assert_eq!(
        mutate(json, &[Edit::Json(idx(0), idx(3), JsonEdit::Remove)]),
        br#"{"a":[1,2]}"#
    );
    let jsonl = b"{\"a\": 1}\n{\"a\": 2}\n";
    assert_eq!(
        mutate(jsonl, &[Edit::Json(idx(1), idx(0), JsonEdit::Negate)]),
        b"{\"a\": 1}\n{\"a\":-2}\n"
    );
    // A safetensors file: the header-length field, a claimed 10^12-byte tensor.
    let st = join_safetensors(
        &serde_json::json!({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}),
        &[0; 8],
    );
    let claimed = mutate(
        &st,
        &[Edit::Safetensors(StEdit::Claim(idx(0), 1_000_000_000_000))],
    );
    let (header, data) = split_safetensors(&claimed).unwrap();
    assert_eq!(
        Value::Object(header),
        serde_json::json!({"x": {"dtype": "F32", "shape": [250_000_000_000u64], "data_offsets": [0, 1_000_000_000_000u64]}})
    );
    assert_eq!(data.len(), 8);
    let long = mutate(
        &st,
        &[Edit::Safetensors(StEdit::HeaderLen(
            HeaderLen::FileLenPlus(1),
        ))],
    );
    assert_eq!(
        u64::from_le_bytes(long[..8].try_into().unwrap()),
        st.len() as u64 + 1
    );
    let f4 = mutate(&st, &[Edit::Safetensors(StEdit::Recode("F4"))]);
    let (header, data) = split_safetensors(&f4).unwrap();
    assert_eq!(header["x"]["data_offsets"], serde_json::json!([0, 1]));
    assert_eq!(data.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Known hostile files, each once, with the message it must give
// ---------------------------------------------------------------------------------------------

/// Runs `load` on `files` under the guard (see [`run_case`]) and returns its error message,
/// with the case directory written as `DIR`; fails if it loads, panics, hangs or allocates
/// beyond the budget.
fn refusal<T: 'static>(
    files: &[(&str, Vec<u8>)],
    load: impl FnOnce(PathBuf) -> tinygpt::Result<T> + Send + 'static,
) -> String {
    match run_case("known file", files, &[], load) {
        Ok(Outcome::Refused(msg)) => {
            // The case directory, `…/tinygpt-hostile-PID-N`, is written `DIR`.
            let Some(at) = msg.find("tinygpt-hostile-") else {
                return msg;
            };
            let start = msg[..at].rfind([' ', '`']).map_or(0, |i| i + 1);
            let tail = &msg[at + "tinygpt-hostile-".len()..];
            let end = msg.len()
                - tail
                    .trim_start_matches(|c: char| c.is_ascii_digit() || c == '-')
                    .len();
            format!("{}DIR{}", &msg[..start], &msg[end..])
        }
        Ok(Outcome::Loaded) => panic!("it loaded"),
        Err(e) => panic!("{e}"),
    }
}

/// The checkpoint's `tokenizer.json`, with the JSON edit `(pointer, raw)` applied.
fn tokenizer_with(pointer: &'static str, raw: &str) -> Vec<(&'static str, Vec<u8>)> {
    checkpoint_with("tokenizer.json", &[Edit::Set(pointer, raw.to_string())])
}

fn from_file(dir: PathBuf) -> tinygpt::Result<Tokenizer> {
    Tokenizer::from_file(dir.join("tokenizer.json"))
}

#[test]
fn a_safetensors_header_length_past_the_end_is_refused() {
    let model = |len: HeaderLen| {
        checkpoint_with(
            "model.safetensors",
            &[Edit::Safetensors(StEdit::HeaderLen(len))],
        )
    };
    let size = fixtures().checkpoint[1].1.len();
    let load =
        |dir: PathBuf| checkpoint::load_safetensors(dir.join("model.safetensors"), &Device::Cpu);
    assert_eq!(
        refusal(&model(HeaderLen::Value(u64::MAX)), load),
        format!(
            "DIR/model.safetensors: not a valid safetensors file: the header length field says \
             18446744073709551615 bytes, but only {} bytes follow it (the file has {size})",
            size - 8
        )
    );
    assert_eq!(
        refusal(&model(HeaderLen::FileLenPlus(-7)), load),
        format!(
            "DIR/model.safetensors: not a valid safetensors file: the header length field says \
             {} bytes, but only {} bytes follow it (the file has {size})",
            size - 7,
            size - 8
        )
    );
}

#[test]
fn a_tensor_claiming_a_terabyte_is_refused_before_allocating() {
    let files = checkpoint_with(
        "model.safetensors",
        &[Edit::Safetensors(StEdit::Claim(Pick(0), 1_000_000_000_000))],
    );
    let data =
        files[1].1.len() - 8 - u64::from_le_bytes(files[1].1[..8].try_into().unwrap()) as usize;
    let (header, _) = split_safetensors(&files[1].1).unwrap();
    let first = tensor_names(&header)[0].clone();
    assert_eq!(
        refusal(&files, |dir| checkpoint::load_safetensors(
            dir.join("model.safetensors"),
            &Device::Cpu
        )),
        format!(
            "DIR/model.safetensors: not a valid safetensors file: tensor `{first}` of shape \
             [250000000000] and dtype F32 would take more than the {data} bytes of data in the \
             file"
        )
    );
    // Shapes whose product overflows, or whose bytes do not fit the file.
    let files = checkpoint_with(
        "optimizer.safetensors",
        &[Edit::Safetensors(StEdit::Field(
            Pick(0),
            "shape",
            "[4294967296, 4294967296]".into(),
        ))],
    );
    let (header, _) = split_safetensors(&fixtures().checkpoint[3].1).unwrap();
    let first = tensor_names(&header)[0].clone();
    let data =
        files[3].1.len() - 8 - u64::from_le_bytes(files[3].1[..8].try_into().unwrap()) as usize;
    assert_eq!(
        refusal(&files, |dir| checkpoint::load_safetensors(
            dir.join("optimizer.safetensors"),
            &Device::Cpu
        )),
        format!(
            "DIR/optimizer.safetensors: not a valid safetensors file: tensor `{first}` of shape \
             [4294967296, 4294967296] and dtype F32 would take more than the {data} bytes of data \
             in the file"
        )
    );
}

#[test]
fn weights_in_a_dtype_the_model_cannot_run_are_refused() {
    // candle reads F8_E4M3, but cannot multiply it: it loaded, and failed in the first
    // forward pass ("unsupported dtype F8E4M3 for op matmul", naming no file).
    let files = checkpoint_with(
        "model.safetensors",
        &[Edit::Safetensors(StEdit::Recode("F8_E4M3"))],
    );
    assert_eq!(
        refusal(&files, |dir| checkpoint::load_model(&dir, &Device::Cpu)),
        "DIR/model.safetensors: tensor `transformer.h.0.attn.c_attn.bias` holds F8E4M3 values; \
         tinygpt runs models in F32, F64, F16 or BF16"
    );
    // candle keeps F4 tensors as raw bytes no operation can use ("unsupported dtype F4 for op
    // alloc_uninit" when made trainable): refused on reading.
    let files = checkpoint_with(
        "model.safetensors",
        &[Edit::Safetensors(StEdit::Recode("F4"))],
    );
    let msg = refusal(&files, |dir| checkpoint::load_trainable(&dir, &Device::Cpu));
    assert!(
        msg.starts_with("DIR/model.safetensors: not a valid safetensors file: tensor `")
            && msg.contains("` has dtype F4, which tinygpt does not read (it reads F32, F16, BF16, F64, F8_E4M3, U8, U16, U32, I16, I32, I64)"),
        "{msg}"
    );
    // F64, F16 and BF16 weights load and run.
    for dtype in ["F64", "F16", "BF16"] {
        let files = checkpoint_with(
            "model.safetensors",
            &[Edit::Safetensors(StEdit::Recode(dtype))],
        );
        let loaded = run_case("f16", &files, &[], |dir| {
            let (model, _) = checkpoint::load_model(&dir, &Device::Cpu)?;
            forward_two_tokens(&model)
        });
        assert!(matches!(loaded, Ok(Outcome::Loaded)), "{dtype}: {loaded:?}");
    }
}

#[test]
fn a_config_claiming_a_billion_layers_is_refused_before_listing_them() {
    // The tiny model: 1 layer, 16 tensors.
    // Either check may come first: the memory bound (on a machine with less than the 3.7 TB
    // this model needs) or the count of tensors; both before anything is allocated.
    let files = checkpoint_with("config.json", &[Edit::Set("/n_layer", "1000000000".into())]);
    let msg = refusal(&files, |dir| checkpoint::load_model(&dir, &Device::Cpu));
    assert!(
        msg == "checkpoint DIR: config.json says n_layer 1000000000, but model.safetensors holds \
                only 16 tensors: the config and the weights do not belong together"
            || msg.starts_with(
                "invalid config: DIR/config.json: a model of n_layer 1000000000, n_head 2, \
                 n_embd 8, vocab_size 16, block_size 8 (872.0B parameters) needs about 3725.3 GiB"
            ),
        "{msg}"
    );
    let files = checkpoint_with(
        "config.json",
        &[
            Edit::Set("/n_embd", "4611686018427387904".into()),
            Edit::Set("/n_head", "1".into()),
        ],
    );
    let msg = refusal(&files, |dir| checkpoint::load_trainable(&dir, &Device::Cpu));
    assert!(
        msg.starts_with("checkpoint DIR: config.json says n_embd 4611686018427387904, but model.safetensors holds only ")
            || msg.ends_with("is too large to count: its size in bytes overflows 64 bits, far more memory than any machine has"),
        "{msg}"
    );
    // The same for a Hugging Face directory.
    let files: Vec<_> = fixtures()
        .hf
        .iter()
        .map(|(n, b)| {
            let b = if *n == "config.json" {
                set_json(b, "/n_layer", "9223372036854775807")
                    .unwrap()
                    .into_bytes()
            } else {
                b.clone()
            };
            (*n, b)
        })
        .collect();
    let msg = refusal(&files, |dir| checkpoint::load_model(&dir, &Device::Cpu));
    assert!(
        msg == "checkpoint DIR: config.json says n_layer 9223372036854775807, but \
                model.safetensors holds only 28 tensors: the config and the weights do not \
                belong together"
            || msg.ends_with("far more memory than any machine has"),
        "{msg}"
    );
}

#[test]
fn config_errors_name_the_file() {
    let files = checkpoint_with("config.json", &[Edit::Set("/n_head", "3".into())]);
    assert_eq!(
        refusal(&files, |dir| GptConfig::load(dir.join("config.json"))),
        "invalid config: DIR/config.json: n_embd (8) must be divisible by n_head (3)"
    );
    let files = checkpoint_with(
        "config.json",
        &[Edit::Overwrite(Pick(0), b"{\xff".to_vec())],
    );
    assert_eq!(
        refusal(&files, |dir| GptConfig::load(dir.join("config.json"))),
        "DIR/config.json:1: not valid UTF-8 (byte 2 of the line, byte 2 of the file)"
    );
    // A tokenizer with more tokens than the model has rows names both files.
    let files = checkpoint_with("config.json", &[Edit::Set("/vocab_size", "3".into())]);
    let msg = refusal(&files, |dir| checkpoint::load_model(&dir, &Device::Cpu));
    assert_eq!(
        msg,
        format!(
            "checkpoint DIR: tokenizer.json has {} tokens but the model's vocab_size in \
             config.json is 3",
            fixtures().char_tokenizer.vocab_size()
        )
    );
}

#[test]
fn a_malformed_decoder_in_tokenizer_json_is_an_error_not_a_panic() {
    // The tokenizers crate panics ("Helper") on a syntax error or deep nesting inside
    // `decoder`; the JSON is parsed here first.
    let base = fixtures().checkpoint[2].1.clone();
    let text = String::from_utf8(base).unwrap();
    let at = text.find("\"decoder\"").unwrap();
    let broken = format!(
        "{}\"decoder\": {{\"type\": \"Fuse\",}}, {}",
        &text[..at],
        &text[at..].split_once(",\n").unwrap().1
    );
    let line = broken[..broken.find("\"decoder\"").unwrap()]
        .matches('\n')
        .count()
        + 1;
    let msg = refusal(&[("tokenizer.json", broken.into_bytes())], from_file);
    assert!(
        msg.starts_with(&format!(
            "DIR/tokenizer.json:{line}: not a valid tokenizer.json: trailing comma"
        )),
        "{msg}"
    );
    let deep = format!("{}[1]{}", "[".repeat(200), "]".repeat(200));
    let msg = refusal(&tokenizer_with("/decoder", &deep), from_file);
    assert!(
        msg.starts_with(
            "DIR/tokenizer.json:1: not a valid tokenizer.json: recursion limit exceeded"
        ),
        "{msg}"
    );
}

#[test]
fn a_precompiled_normalizer_is_checked_before_the_crate_reads_it() {
    // Declares a 4 GiB trie in 4 bytes: spm_precompiled would reserve 8 GiB first.
    assert_eq!(
        refusal(
            &tokenizer_with("/normalizer", &precompiled(&[0xfc, 0xff, 0xff, 0xff])),
            from_file
        ),
        "DIR/tokenizer.json: not a valid tokenizer.json: normalizer.precompiled_charsmap: the \
         trie is declared 4294967292 bytes long but only 0 bytes follow its size"
    );
    // Not base64, missing: the crate would panic ("Precompiled").
    assert_eq!(
        refusal(
            &tokenizer_with(
                "/normalizer",
                r#"{"type": "Precompiled", "precompiled_charsmap": "!!!"}"#
            ),
            from_file
        ),
        "DIR/tokenizer.json: not a valid tokenizer.json: normalizer.precompiled_charsmap is not \
         base64"
    );
    assert_eq!(
        refusal(
            &tokenizer_with(
                "/normalizer",
                r#"{"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Precompiled"}]}"#
            ),
            from_file
        ),
        "DIR/tokenizer.json: not a valid tokenizer.json: normalizer.normalizers[1].\
         precompiled_charsmap must be a base64 string"
    );
    // Nested where the crate still reads it: a Sequence without its `type`.
    assert_eq!(
        refusal(
            &tokenizer_with(
                "/normalizer",
                r#"{"normalizers": [{"type": "Precompiled", "precompiled_charsmap": "/P///w=="}]}"#
            ),
            from_file
        ),
        "DIR/tokenizer.json: not a valid tokenizer.json: normalizer.normalizers[0].\
         precompiled_charsmap: the trie is declared 4294967292 bytes long but only 0 bytes follow \
         its size"
    );
    // A trie node whose children lie past the trie, a leaf past the strings: encoding would
    // index out of bounds.
    assert_eq!(
        refusal(
            &tokenizer_with(
                "/normalizer",
                &precompiled(&charsmap(2048, 0x61 ^ 4096, 0, b"b\0"))
            ),
            from_file
        ),
        "DIR/tokenizer.json: not a valid tokenizer.json: normalizer.precompiled_charsmap: a trie \
         node's children start at unit 4096, so input bytes would read up to unit 4351, past the \
         trie's 512 units"
    );
    assert_eq!(
        refusal(
            &tokenizer_with(
                "/normalizer",
                &precompiled(&charsmap(2048, 0x61 ^ 256, 7, b"b\0"))
            ),
            from_file
        ),
        "DIR/tokenizer.json: not a valid tokenizer.json: normalizer.precompiled_charsmap: a trie \
         leaf gives 7, which is not the start of a replacement in the 2 bytes of strings"
    );
    // A valid one (a → o) loads and is used.
    let files = tokenizer_with(
        "/normalizer",
        &precompiled(&charsmap(2048, 0x61 ^ 256, 0, b"o\0")),
    );
    let ids = run_case("valid charsmap", &files, &[], |dir| {
        let tok = from_file(dir)?;
        let (a, o) = (tok.encode("a")?, tok.encode("o")?);
        assert_eq!(a, o);
        assert_eq!(tok.decode(&a)?, "o");
        Ok(())
    });
    assert!(matches!(ids, Ok(Outcome::Loaded)), "{ids:?}");
}

#[test]
fn a_regex_nested_thousands_deep_is_refused_before_oniguruma_compiles_it() {
    // 4000 `[`: Oniguruma's recursive parser overflowed the 2 MiB stack of the thread loading
    // it, which aborts the process.
    let pattern = serde_json::to_string(&"[".repeat(4000)).unwrap();
    assert_eq!(
        refusal(
            &tokenizer_with("/pre_tokenizer/pattern/Regex", &pattern),
            from_file
        ),
        "DIR/tokenizer.json: not a valid tokenizer.json: pre_tokenizer.pattern.Regex nests \
         brackets and parentheses 4000 deep; tinygpt accepts at most 100"
    );
    // Escaped brackets are characters, not nesting: this is a valid (if odd) pattern.
    let pattern = serde_json::to_string(&format!("[\\s\\S]|{}", "\\[".repeat(4000))).unwrap();
    let loaded = run_case(
        "escaped",
        &tokenizer_with("/pre_tokenizer/pattern/Regex", &pattern),
        &[],
        from_file,
    );
    assert!(matches!(loaded, Ok(Outcome::Loaded)), "{loaded:?}");
}

#[test]
fn padding_and_truncation_settings_are_dropped() {
    // A fixed padding of 10^12 would have every encoding allocate 10^12 ids.
    let padding = r#"{"strategy": {"Fixed": 1000000000000}, "direction": "Right", "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "a"}"#;
    let truncation =
        r#"{"direction": "Right", "max_length": 1, "strategy": "LongestFirst", "stride": 0}"#;
    let mut files = tokenizer_with("/padding", padding);
    files[2].1 = set_json(&files[2].1, "/truncation", truncation)
        .unwrap()
        .into_bytes();
    let expected = fixtures().char_tokenizer.encode("the cat").unwrap();
    let loaded = run_case("padding", &files, &[], move |dir| {
        let tok = from_file(dir)?;
        assert_eq!(tok.encode("the cat")?, expected);
        assert!(tok.inner().get_padding().is_none() && tok.inner().get_truncation().is_none());
        Ok(())
    });
    assert!(matches!(loaded, Ok(Outcome::Loaded)), "{loaded:?}");
}

#[test]
fn token_ids_past_the_vocabulary_are_refused() {
    let n = fixtures().char_tokenizer.vocab_size();
    assert_eq!(
        refusal(&tokenizer_with("/model/vocab/a", "4294967295"), from_file),
        format!(
            "DIR/tokenizer.json: token \"a\" has id 4294967295, but the vocabulary has {n} tokens: \
             ids must run from 0 to {} (each is a row of the model's embedding)",
            n - 1
        )
    );
    // BPE merges of tokens the vocabulary lacks. The crate copied each merge into a buffer as
    // long as the longest token before looking it up: "slice index starts at 1 but ends at 0"
    // (a panic) for a merge its continuing_subword_prefix does not fit.
    let bpe = |merge: &str| {
        let json = set_json(&fixtures().bpe_tokenizer, "/model/merges/0", merge).unwrap();
        vec![("tokenizer.json", json.into_bytes())]
    };
    assert_eq!(
        refusal(&bpe(r#"["zz", "qq"]"#), from_file),
        "DIR/tokenizer.json: not a valid tokenizer.json: model.merges[0] (merge 1, \"zz\" + \
         \"qq\"): \"zz\" is not in the vocabulary"
    );
    assert_eq!(
        refusal(&bpe(r#"["t", "h"]"#), from_file),
        "DIR/tokenizer.json: not a valid tokenizer.json: model.merges[0] (merge 1, \"t\" + \"h\"): \
         the merged token \"th\" is not in the vocabulary"
    );
    let prefixed = set_json(
        &fixtures().bpe_tokenizer,
        "/model/continuing_subword_prefix",
        "\"aa\"",
    )
    .unwrap();
    let msg = refusal(&[("tokenizer.json", prefixed.into_bytes())], from_file);
    assert!(
        msg.starts_with(
            "DIR/tokenizer.json: not a valid tokenizer.json: model.merges[0] (merge 1, "
        ) && msg.ends_with("does not start with the continuing_subword_prefix \"aa\""),
        "{msg}"
    );
}

#[test]
fn data_errors_name_the_file_line_and_column() {
    let f = fixtures();
    let mut corpus = f.corpus.clone();
    corpus.splice(30..30, *b"\n~");
    let tok = f.char_tokenizer.clone();
    let line = corpus[..31].iter().filter(|&&b| b == b'\n').count() + 1;
    assert_eq!(
        refusal(&[("corpus.txt", corpus)], move |dir| {
            TokenDataset::from_file(dir.join("corpus.txt"), &tok, 0.1)
        }),
        format!(
            "DIR/corpus.txt:{line}: character '~' (U+007E) at column 1 (character 31 of the file, \
             from 0) is not in the tokenizer's vocabulary"
        )
    );
    let mut vocab = f.hf.clone();
    vocab[2].1.splice(1..1, *b"\n\xC3");
    assert_eq!(
        refusal(&vocab, |dir| Tokenizer::from_gpt2_files(
            dir.join("vocab.json"),
            dir.join("merges.txt")
        )),
        "DIR/vocab.json:2: not valid UTF-8 (byte 1 of the line, byte 3 of the file)"
    );
}

#[test]
#[ignore = "needs the public data files: TINYGPT_DATA=DIR cargo test --release --features server -- --ignored"]
fn openai_gpt2_tokenizer_json_loads_within_the_budget() {
    // The checks before the tokenizers crate parses a file (a JSON value first) must not cost
    // a real tokenizer.json its budget: OpenAI's GPT-2, 50 257 tokens, about 2 MB.
    let tok = Tokenizer::from_gpt2_files(
        common::data_file("gpt2_encoder.json"),
        common::data_file("gpt2_vocab.bpe"),
    )
    .unwrap();
    let json = tok.to_json(false).unwrap().into_bytes();
    let loaded = run_case(
        "GPT-2 tokenizer.json",
        &[("tokenizer.json", json)],
        &[],
        |dir| {
            let tok = from_file(dir)?;
            assert_eq!(tok.vocab_size(), 50257);
            assert_eq!(tok.encode("Hello world")?, [15496, 995]);
            Ok(())
        },
    );
    assert!(matches!(loaded, Ok(Outcome::Loaded)), "{loaded:?}");
}
