//! Whole-corpus round trips for the tokenizers, on the public data files (see
//! `common::data_file`). They are ignored by default; run them with
//! `TINYGPT_DATA=DIR cargo test --release --features server --test tokenizer_roundtrip -- --ignored`.

mod common;

use std::time::Instant;

use tinygpt::tokenizer::{Tokenizer, TokenizerKind};

fn read(name: &str) -> String {
    let path = common::data_file(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

#[test]
#[ignore = "needs the public data files: TINYGPT_DATA=DIR cargo test --release --features server -- --ignored"]
fn bpe_2048_round_trips_shakespeare_and_tang_poems() {
    let shakespeare = read("tinyshakespeare.txt");
    let poems = read("tang_poems.txt");

    let t = Instant::now();
    let tok = Tokenizer::train_bpe(&shakespeare, 2048).unwrap();
    eprintln!("train_bpe(tinyshakespeare, 2048): {:.2?}", t.elapsed());
    assert_eq!(tok.kind(), TokenizerKind::ByteLevelBpe);
    assert_eq!(tok.vocab_size(), 2048);
    assert_eq!(tok.eot_id(), 2047);

    let t = Instant::now();
    let ids = tok.encode(&shakespeare).unwrap();
    eprintln!(
        "encode(tinyshakespeare): {} tokens ({:.2} bytes/token) in {:.2?}",
        ids.len(),
        shakespeare.len() as f64 / ids.len() as f64,
        t.elapsed()
    );
    // Byte-level BPE at 2048 compresses English well beyond one byte per token.
    assert!(ids.len() * 2 < shakespeare.len(), "{} tokens", ids.len());
    // Encoding in chunks (as `encode` does for long texts) gives the ids of the whole text.
    let whole = tok
        .inner()
        .encode_fast(shakespeare.as_str(), false)
        .unwrap();
    assert!(
        whole.get_ids() == ids.as_slice(),
        "chunked encoding differs"
    );
    let t = Instant::now();
    assert!(
        tok.decode(&ids).unwrap() == shakespeare,
        "shakespeare round trip"
    );
    eprintln!("decode(tinyshakespeare): {:.2?}", t.elapsed());

    // Chinese never seen in training: falls back to bytes, still exact.
    let t = Instant::now();
    let ids = tok.encode(&poems).unwrap();
    assert!(tok.decode(&ids).unwrap() == poems, "tang poems round trip");
    eprintln!(
        "round trip tang_poems: {} tokens in {:.2?}",
        ids.len(),
        t.elapsed()
    );

    // Same corpus, same tokenizer.
    let t = Instant::now();
    let again = Tokenizer::train_bpe(&shakespeare, 2048).unwrap();
    eprintln!("train_bpe again: {:.2?}", t.elapsed());
    assert!(
        again.to_json(false).unwrap() == tok.to_json(false).unwrap(),
        "deterministic"
    );
}

/// The Chinese pipeline's tokenizer: byte-level BPE trained on the Tang poems themselves round
/// trips all of them exactly, and so does a character vocabulary.
#[test]
#[ignore = "needs the public data files: TINYGPT_DATA=DIR cargo test --release --features server -- --ignored"]
fn bpe_and_char_trained_on_tang_poems_round_trip_them() {
    let poems = read("tang_poems.txt");
    let t = Instant::now();
    let tok = Tokenizer::train_bpe(&poems, 2048).unwrap();
    let ids = tok.encode(&poems).unwrap();
    eprintln!(
        "train_bpe(tang_poems, 2048) + encode: {} tokens ({:.2} bytes/token) in {:.2?}",
        ids.len(),
        poems.len() as f64 / ids.len() as f64,
        t.elapsed()
    );
    // A character is 3 bytes of UTF-8: merges learned on the poems beat one token per byte.
    assert!(ids.len() * 2 < poems.len(), "{} tokens", ids.len());
    assert!(
        tok.decode(&ids).unwrap() == poems,
        "tang poems BPE round trip"
    );
    let chars = Tokenizer::train_char(&poems).unwrap();
    let ids = chars.encode(&poems).unwrap();
    assert_eq!(ids.len(), poems.chars().count());
    assert!(
        chars.decode(&ids).unwrap() == poems,
        "tang poems char round trip"
    );
    eprintln!(
        "char vocabulary of the poems: {} tokens",
        chars.vocab_size()
    );
}

#[test]
#[ignore = "needs the public data files: TINYGPT_DATA=DIR cargo test --release --features server -- --ignored"]
fn char_round_trips_shakespeare() {
    let shakespeare = read("tinyshakespeare.txt");

    let t = Instant::now();
    let tok = Tokenizer::train_char(&shakespeare).unwrap();
    assert_eq!(tok.kind(), TokenizerKind::Char);
    // nanoGPT shakespeare_char: 65 characters, plus <|endoftext|>.
    assert_eq!(tok.vocab_size(), 66);
    assert_eq!(tok.eot_id(), 65);
    // sorted(set(data)) starts with '\n', ' ', '!' and ends with 'z'.
    assert_eq!(tok.token_to_id("\n"), Some(0));
    assert_eq!(tok.token_to_id(" "), Some(1));
    assert_eq!(tok.token_to_id("!"), Some(2));
    assert_eq!(tok.token_to_id("z"), Some(64));

    let ids = tok.encode(&shakespeare).unwrap();
    assert_eq!(ids.len(), shakespeare.chars().count());
    let whole = tok
        .inner()
        .encode_fast(shakespeare.as_str(), false)
        .unwrap();
    assert!(
        whole.get_ids() == ids.as_slice(),
        "chunked encoding differs"
    );
    // nanoGPT's first ids: "First Citizen" -> [18, 47, 56, 57, 58, 1, 15, 47, 58, 47, 64, 43, 52].
    assert_eq!(
        ids[..13],
        [18, 47, 56, 57, 58, 1, 15, 47, 58, 47, 64, 43, 52]
    );
    assert!(tok.decode(&ids).unwrap() == shakespeare, "char round trip");
    eprintln!("char tokenizer train + round trip: {:.2?}", t.elapsed());
}
