//! Helpers the integration tests share.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use tinygpt::candle::{DType, Tensor};

/// `tests/fixtures/hf_gpt2`: the tiny GPT-2 and transformers' outputs `scripts/reference.py`
/// wrote.
pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hf_gpt2"
    ))
}

/// The fixture's Hugging Face GPT-2 directory.
pub fn model_dir() -> PathBuf {
    fixtures().join("model")
}

/// A JSON file, parsed.
pub fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A JSON array of token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// max |a − b| over all elements, as f32; the shapes must agree.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_dtype(DType::F32))
        .and_then(|d| d.to_scalar::<f32>())
        .unwrap()
}

/// Where a test finds the public data file `name` (`tinyshakespeare.txt`, `gpt2_encoder.json`,
/// …): `$TINYGPT_DATA`, then the crate's `data/` (where the examples fetch them), then
/// `../shared/data`. Tests that call it are `#[ignore]`d, so only `-- --ignored` reaches
/// here; a file found in none of those fails the test, saying where to get it.
pub fn data_file(name: &str) -> std::path::PathBuf {
    let crate_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("TINYGPT_DATA")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .into_iter()
        .collect();
    dirs.push(crate_dir.join("data"));
    dirs.push(crate_dir.join("../shared/data"));
    if let Some(found) = dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
        return found;
    }
    let dirs = dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    // Files `fetch_data` does not know: where they come from.
    let source = match name {
        "tang_poems.txt" => Some(
            "it is built from chinese-poetry/chinese-poetry's 全唐诗/poet.tang.0.json, \
             poet.tang.1000.json, … poet.tang.9000.json (10 files) at commit \
             99ebbef7e1345c0985c44b9fd96a3f9e776f117b (one poem per paragraph: title line, \
             author line, its lines; see the data README)",
        ),
        _ => None,
    };
    match source {
        Some(source) => panic!(
            "this test needs the data file {name}, found in none of {dirs}; `fetch_data` cannot \
             fetch it: {source}. Set TINYGPT_DATA=DIR to a directory holding it"
        ),
        None => panic!(
            "this test needs the public data file {name}, found in none of {dirs}: set \
             TINYGPT_DATA=DIR to a directory holding it, or fetch it into data/ with `cargo run \
             --release --example fetch_data -- {name}`"
        ),
    }
}

/// The model's weights as fresh copies (new storage), for a frozen reference that training
/// the model cannot move.
pub fn copies(model: &tinygpt::Gpt) -> std::collections::HashMap<String, Tensor> {
    model
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, t.copy().unwrap()))
        .collect()
}
