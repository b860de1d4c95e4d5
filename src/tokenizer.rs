//! Text ⇄ token ids: the first step of the story.
//!
//! A GPT never sees text, only integers. This module turns text into those integers and back,
//! with two tokenizers built on the Hugging Face [`tokenizers`] crate:
//!
//! * **Char-level** ([`Tokenizer::train_char`]): one token per Unicode character, the
//!   vocabulary being the sorted distinct characters of the training text — exactly nanoGPT's
//!   `shakespeare_char` (`chars = sorted(list(set(data)))`). Tiny vocabulary, long sequences,
//!   and it cannot encode a character it has not seen ([`Error::UnknownChar`]).
//! * **Byte-level BPE** ([`Tokenizer::train_bpe`]), as in GPT-2: text is split with GPT-2's
//!   regex, every UTF-8 byte is one of 256 base tokens, and training learns merges of frequent
//!   pairs until the vocabulary has the requested size. Any text round-trips exactly, including
//!   characters never seen in training (they fall back to bytes).
//!
//! The real GPT-2 tokenizer can be rebuilt from OpenAI's `encoder.json`/`vocab.bpe`
//! ([`Tokenizer::from_gpt2_files`]), and every tokenizer is saved and loaded as a Hugging Face
//! `tokenizer.json` made only of standard components (WordLevel/BPE models, Split/ByteLevel
//! pre-tokenizers, Fuse/ByteLevel decoders).
//!
//! Every tokenizer carries the special token [`EOT`] (`<|endoftext|>`), which separates
//! documents. Special tokens written literally in the text are encoded as their single id;
//! chat models add more with [`Tokenizer::add_special_tokens`].
//!
//! ```
//! use tinygpt::tokenizer::{Tokenizer, EOT};
//!
//! let tok = Tokenizer::train_char("hello world\n")?;
//! assert_eq!(tok.vocab_size(), 10); // "\n", " ", d, e, h, l, o, r, w + <|endoftext|>
//! let ids = tok.encode("hello<|endoftext|>")?;
//! assert_eq!(ids, [4, 3, 5, 5, 6, 9]);
//! assert_eq!(tok.decode(&ids)?, format!("hello{EOT}"));
//! # Ok::<(), tinygpt::Error>(())
//! ```

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::Path;

use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::bpe::{BpeTrainerBuilder, Vocab, BPE};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::models::ModelWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{
    AddedToken, DecoderWrapper, Model, NormalizerWrapper, OffsetReferential, OffsetType,
    PostProcessorWrapper, SplitDelimiterBehavior, TokenizerBuilder, TokenizerImpl,
};

use crate::error::{Error, Result};

/// The end-of-text special token that separates documents (GPT-2's, with the same spelling).
pub const EOT: &str = "<|endoftext|>";

/// The eos tokens of Hugging Face tokenizers without [`EOT`] that serve as their end-of-text
/// token, in the order they are tried (see [`Tokenizer::from_inner`]).
pub const KNOWN_EOS: [&str; 4] = ["</s>", "<|end_of_text|>", "<|im_end|>", "<eos>"];

/// The Unicode replacement character: what lossy UTF-8 decoding puts for incomplete bytes.
const REPLACEMENT: char = '\u{FFFD}';

/// Regex (Oniguruma syntax) matching any single character, newlines included.
const ANY_CHAR: &str = r"[\s\S]";

/// Which family a tokenizer belongs to (char tokenizers check every character before encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// One token per character (a `WordLevel` model whose tokens are all single characters).
    Char,
    /// Byte-level BPE as in GPT-2 (a `BPE` model behind a `ByteLevel` pre-tokenizer).
    ByteLevelBpe,
    /// Anything else loaded from a `tokenizer.json` (WordPiece, Unigram, Metaspace BPE, …).
    Other,
}

/// A text tokenizer: a Hugging Face [`tokenizers::Tokenizer`] plus the guarantees tinygpt
/// relies on ([`EOT`] always present, exact round trips, errors instead of silent loss).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner` with special tokens encoded as plain text, for [`Tokenizer::encode_text`].
    plain: std::sync::Arc<tokenizers::Tokenizer>,
    kind: TokenizerKind,
    eot: u32,
}

impl Tokenizer {
    // ----------------------------------------------------------------------------------------
    // Building
    // ----------------------------------------------------------------------------------------

    /// Trains a char-level tokenizer: ids `0..n` are the distinct characters of `text` in
    /// sorted (code point) order, then [`EOT`] gets id `n`.
    ///
    /// Occurrences of `<|endoftext|>` in `text` are special tokens, so their characters do not
    /// enter the vocabulary on their account.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `text` has no characters (besides `<|endoftext|>`).
    pub fn train_char(text: &str) -> Result<Self> {
        let chars: BTreeSet<char> = text.split(EOT).flat_map(str::chars).collect();
        if chars.is_empty() {
            return Err(Error::InvalidArgument(
                "cannot train a char tokenizer on empty text".into(),
            ));
        }
        let vocab: Vocab = chars
            .iter()
            .zip(0u32..)
            .map(|(c, id)| (c.to_string(), id))
            .collect();
        let model = WordLevel::builder().vocab(vocab).build()?;
        let split = Split::new(
            SplitPattern::Regex(ANY_CHAR.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )?;
        let mut inner = tokenizers::Tokenizer::new(model);
        inner
            .with_pre_tokenizer(Some(split))
            .with_decoder(Some(Fuse::new()));
        Self::from_inner(inner)
    }

    /// Trains a GPT-2-style byte-level BPE tokenizer on `text` with `vocab_size` tokens in all:
    /// 256 byte tokens, the learned merges, and [`EOT`] last (id `vocab_size - 1`).
    ///
    /// The vocabulary is smaller when the text runs out of pairs to merge. Training is
    /// deterministic: the same text and size give the same tokenizer. `<|endoftext|>` in the
    /// text is treated as a separator and not learned from. The text is fed to the trainer in
    /// chunks cut only where GPT-2's pre-tokenizer would cut anyway (after a `\n` between two
    /// non-whitespace characters), so chunking does not change what is learned.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `vocab_size < 257` (256 bytes + `<|endoftext|>`);
    /// [`Error::Tokenizer`] if the `tokenizers` trainer fails.
    pub fn train_bpe(text: &str, vocab_size: usize) -> Result<Self> {
        let chunks: Vec<&str> = text
            .split(EOT)
            .flat_map(|doc| PreTokenizerSafeChunks::new(doc, TRAIN_CHUNK_BYTES))
            .collect();
        Self::train_bpe_pieces(chunks.into_iter(), vocab_size)
    }

    /// Like [`Tokenizer::train_bpe`], over a corpus given as many texts (lines, documents,
    /// chunks). Pre-tokenization never crosses from one item to the next, so cut the corpus
    /// where words end (e.g. keep line endings with the line they end).
    ///
    /// # Errors
    /// As [`Tokenizer::train_bpe`].
    pub fn train_bpe_from_iter<I, S>(texts: I, vocab_size: usize) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        let pieces = texts.flat_map(|t| {
            t.as_ref()
                .split(EOT)
                .map(str::to_owned)
                .collect::<Vec<String>>()
        });
        Self::train_bpe_pieces(pieces, vocab_size)
    }

    /// Rebuilds OpenAI's GPT-2 tokenizer from its `encoder.json` (a.k.a. `vocab.json`) and
    /// `vocab.bpe` (a.k.a. `merges.txt`): 50 257 tokens, `<|endoftext|>` = 50256.
    ///
    /// # Errors
    /// [`Error::Io`] if a file cannot be read; [`Error::BadFile`] (with the path, and the line
    /// for merges) if a file is malformed or a merge names a token missing from the vocabulary.
    pub fn from_gpt2_files(
        vocab_json: impl AsRef<Path>,
        merges_txt: impl AsRef<Path>,
    ) -> Result<Self> {
        let (vocab_path, merges_path) = (vocab_json.as_ref(), merges_txt.as_ref());
        let vocab_text = crate::data::read_utf8(vocab_path)?;
        let vocab: HashMap<String, u32> = serde_json::from_str(&vocab_text).map_err(|e| {
            Error::bad_file(
                vocab_path,
                None,
                format!("expected a JSON object token → id: {e}"),
            )
        })?;
        let merges_text = crate::data::read_utf8(merges_path)?;
        let merges = parse_merges(&merges_text, &vocab, merges_path)?;

        let model = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
            .build()
            .map_err(|e| Error::bad_file(merges_path, None, e.to_string()))?;
        Self::from_inner(byte_level_tokenizer(model)).map_err(|e| match e {
            Error::Tokenizer(msg) => Error::bad_file(vocab_path, None, msg),
            e => e,
        })
    }

    /// Loads a Hugging Face `tokenizer.json`. Its end-of-text token ([`Tokenizer::eot_id`]) is
    /// chosen as [`Tokenizer::from_inner`] says: `<|endoftext|>` when the vocabulary has it,
    /// else a model's own eos token (`</s>`, …), else `<|endoftext|>` appended.
    ///
    /// The file is parsed and checked before the `tokenizers` crate sees it (see
    /// [`Tokenizer::from_bytes`]), so a hostile file is an error, never a panic or a huge
    /// allocation.
    ///
    /// # Errors
    /// [`Error::Io`] (naming the path) if the file cannot be read, e.g. does not exist;
    /// [`Error::BadFile`] (naming the path, and the line for malformed JSON) if it is not a
    /// valid `tokenizer.json` or fails the checks of [`Tokenizer::from_inner`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_file_with_eos(path, None)
    }

    /// As [`Tokenizer::from_file`], with `eos` (the `eos_token` of a Hugging Face
    /// `tokenizer_config.json`) as the end-of-text token when the vocabulary has no
    /// `<|endoftext|>` but has `eos` (see [`Tokenizer::from_inner_with_eos`]).
    ///
    /// # Errors
    /// As [`Tokenizer::from_file`].
    pub fn from_file_with_eos(path: impl AsRef<Path>, eos: Option<&str>) -> Result<Self> {
        Self::from_file_adjusted(path.as_ref(), eos, |_| ())
    }

    /// As [`Tokenizer::from_file_with_eos`], with `adjust` applied to the parsed tokenizer
    /// before it is wrapped (Hugging Face tokenizer classes that replace parts of their
    /// `tokenizer.json`, see [`crate::hf::load_tokenizer`]).
    pub(crate) fn from_file_adjusted(
        path: &Path,
        eos: Option<&str>,
        adjust: impl FnOnce(&mut tokenizers::Tokenizer),
    ) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut inner = parse_tokenizer_json(&bytes).map_err(|(line, msg)| {
            Error::bad_file(path, line, format!("not a valid tokenizer.json: {msg}"))
        })?;
        adjust(&mut inner);
        Self::from_inner_with_eos(inner, eos).map_err(|e| match e {
            Error::Tokenizer(msg) => Error::bad_file(path, None, msg),
            e => e,
        })
    }

    /// Parses the contents of a `tokenizer.json` (see [`Tokenizer::from_file`]).
    ///
    /// The JSON is parsed here first (nesting deeper than 128 levels is refused); a
    /// SentencePiece `Precompiled` normalizer is checked whole (its declared trie size against
    /// the bytes it holds, every trie node and replacement inside them), since the `tokenizers`
    /// crate panics on a malformed one, or allocates what its first four bytes declare; and a
    /// regex may nest brackets at most 100 deep (Oniguruma's parser would overflow the stack).
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if `json` is not a valid tokenizer, saying where (the line, or the
    /// field) and what is wrong.
    pub fn from_bytes(json: impl AsRef<[u8]>) -> Result<Self> {
        let inner = parse_tokenizer_json(json.as_ref()).map_err(|(line, msg)| {
            let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
            Error::Tokenizer(format!("not a valid tokenizer.json{at}: {msg}"))
        })?;
        Self::from_inner(inner)
    }

    /// Wraps a `tokenizers::Tokenizer` and chooses its end-of-text token
    /// ([`Tokenizer::eot_id`]: documents are separated by it in pre-training, and generation
    /// stops at it):
    ///
    /// 1. [`EOT`] (`<|endoftext|>`) when the vocabulary has it (every tokenizer tinygpt
    ///    trains, GPT-2's, Qwen's, SmolLM2's), registered as a special token if it is not
    ///    one yet (its id kept);
    /// 2. else the first of [`KNOWN_EOS`] (`</s>` of Llama 2, TinyLlama and Mistral,
    ///    `<|end_of_text|>` of Llama 3, `<|im_end|>`, `<eos>` of Gemma) that the tokenizer
    ///    has as a special token, so that a Hugging Face vocabulary of exactly the model's
    ///    size does not grow by one;
    /// 3. else `<|endoftext|>` is appended at the end of the vocabulary.
    ///
    /// [`Tokenizer::from_inner_with_eos`] puts a given eos token (a `tokenizer_config.json`'s
    /// `eos_token`) before the list of step 2.
    ///
    /// Padding and truncation settings are dropped: tinygpt pads batches itself, and its
    /// encodings are exact (a fixed padding length would also have every encoding allocate
    /// that many ids, whatever it says).
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if a token's id is not below the vocabulary size (tinygpt gives
    /// every id a row of the model's embedding, so ids must run from 0 to the size − 1),
    /// naming the token, its id and the size; or if `<|endoftext|>` cannot be added.
    pub fn from_inner(inner: tokenizers::Tokenizer) -> Result<Self> {
        Self::from_inner_with_eos(inner, None)
    }

    /// As [`Tokenizer::from_inner`], with `eos` tried first when the vocabulary has no
    /// `<|endoftext|>`; an `eos` the vocabulary lacks is passed over.
    ///
    /// # Errors
    /// As [`Tokenizer::from_inner`].
    pub fn from_inner_with_eos(
        mut inner: tokenizers::Tokenizer,
        eos: Option<&str>,
    ) -> Result<Self> {
        inner.with_padding(None);
        inner.with_truncation(None)?;
        let size = inner.get_vocab_size(true);
        let vocab = inner.get_vocab(true);
        if let Some((token, id)) = vocab
            .iter()
            .filter(|(_, &id)| id as usize >= size)
            .max_by_key(|(_, &id)| id)
        {
            return Err(Error::Tokenizer(format!(
                "token {token:?} has id {id}, but the vocabulary has {size} tokens: ids must \
                 run from 0 to {} (each is a row of the model's embedding)",
                size.saturating_sub(1)
            )));
        }
        drop(vocab);
        let added = inner.get_added_vocabulary();
        let is_special = |t: &str| {
            added
                .get_vocab()
                .get(t)
                .and_then(|id| added.get_added_tokens_decoder().get(id))
                .is_some_and(|a| a.special)
        };
        let model_eos = if inner.token_to_id(EOT).is_some() {
            None
        } else {
            eos.filter(|e| inner.token_to_id(e).is_some())
                .or_else(|| KNOWN_EOS.iter().copied().find(|t| is_special(t)))
                .map(str::to_string)
        };
        let eot_token = model_eos.unwrap_or_else(|| EOT.to_string());
        if !added.get_vocab().contains_key(eot_token.as_str()) {
            inner.add_special_tokens([AddedToken::from(eot_token.as_str(), true)])?;
        }
        let eot = inner
            .token_to_id(&eot_token)
            .ok_or_else(|| Error::Tokenizer(format!("{eot_token} could not be added")))?;
        let kind = detect_kind(&inner);
        let plain = std::sync::Arc::new(plain_text_copy(&inner));
        Ok(Self {
            inner,
            plain,
            kind,
            eot,
        })
    }

    // ----------------------------------------------------------------------------------------
    // Saving
    // ----------------------------------------------------------------------------------------

    /// Writes the tokenizer as a Hugging Face `tokenizer.json` (pretty-printed).
    ///
    /// # Errors
    /// [`Error::Io`] (naming the path) if the file cannot be written; [`Error::Tokenizer`] if
    /// serialization fails.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let json = self.to_json(true)?;
        std::fs::write(path, json).map_err(|e| Error::io(path, e))
    }

    /// The `tokenizer.json` text of this tokenizer. Serialization is deterministic.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if serialization fails.
    pub fn to_json(&self, pretty: bool) -> Result<String> {
        Ok(self.inner.to_string(pretty)?)
    }

    // ----------------------------------------------------------------------------------------
    // Encoding and decoding
    // ----------------------------------------------------------------------------------------

    /// Encodes `text` into token ids. No special tokens are added around the text, but
    /// special tokens written in it (e.g. `<|endoftext|>`) become their single id.
    ///
    /// # Errors
    /// [`Error::UnknownChar`] (char tokenizers) for the first character outside the vocabulary,
    /// with its 0-based position and 1-based line and column; [`Error::Tokenizer`] if the
    /// underlying tokenizer fails.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if self.kind == TokenizerKind::Char {
            self.check_known_chars(text, false)?;
        }
        self.encode_with(&self.inner, text)
    }

    /// Encodes `text` as plain text: a special token's spelling written in it (`<|end|>`,
    /// `<|endoftext|>`) is encoded as the characters it is made of, never as the control token,
    /// as Hugging Face's `split_special_tokens=True` does. This is how text that users or data
    /// supply enters a prompt ([`crate::ChatTemplate`] encodes every message so), so no one can
    /// open or close a turn by typing a chat token.
    ///
    /// # Errors
    /// As [`Tokenizer::encode`]; for a char tokenizer the characters of a special token's
    /// spelling must be in the vocabulary like any others.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        if self.kind == TokenizerKind::Char {
            self.check_known_chars(text, true)?;
        }
        self.encode_with(&self.plain, text)
    }

    fn encode_with(&self, inner: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
        if text.len() <= ENCODE_CHUNK_BYTES || self.kind == TokenizerKind::Other {
            return Ok(inner.encode_fast(text, false)?.get_ids().to_vec());
        }
        // A long text (a whole corpus) is encoded in chunks cut where the pre-tokenizer cuts
        // anyway, so the ids are those of the whole text, without holding per-token strings
        // and offsets for all of it at once (hundreds of MB for a 1 MB corpus).
        let mut ids = Vec::with_capacity(text.len() / 2);
        for chunk in PreTokenizerSafeChunks::new(text, ENCODE_CHUNK_BYTES) {
            ids.extend_from_slice(inner.encode_fast(chunk, false)?.get_ids());
        }
        Ok(ids)
    }

    /// Decodes token ids back into text, special tokens included as their text. For the
    /// tokenizers built here, `decode(encode(t)) == t` for every text `t` that encodes.
    /// Byte-level ids that do not form complete UTF-8 decode lossily (U+FFFD).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an id outside the vocabulary, naming the id and the
    /// vocabulary size; [`Error::Tokenizer`] if the underlying decoder fails.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let base = self.inner.get_vocab_size(false);
        let added = self.inner.get_added_vocabulary().get_added_tokens_decoder();
        if let Some(&bad) = ids
            .iter()
            .find(|&&id| id as usize >= base && !added.contains_key(&id))
        {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is out of range for a vocabulary of {} tokens",
                self.vocab_size()
            )));
        }
        Ok(self.inner.decode(ids, false)?)
    }

    /// A streaming decoder for generation: feed it ids one at a time and it returns text as
    /// soon as it forms complete characters. See [`TokenStream`].
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream {
            tokenizer: self,
            pending: Vec::new(),
        }
    }

    // ----------------------------------------------------------------------------------------
    // Vocabulary
    // ----------------------------------------------------------------------------------------

    /// Number of tokens, special tokens included: the number of rows a model's embedding needs.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token given in its vocabulary spelling (byte-level tokens use GPT-2's
    /// byte alphabet, e.g. `"Ġworld"`), or `None` if it is not in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary spelling of token `id` (see [`Tokenizer::token_to_id`]), or `None` if
    /// `id` is out of range.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is a special (control) token such as `<|endoftext|>` or a chat token:
    /// generated text meant for people leaves these out, as Hugging Face's
    /// `skip_special_tokens=True` does.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_vocabulary()
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    /// The id of the end-of-text token: [`EOT`] (`<|endoftext|>`), or for a Hugging Face
    /// tokenizer without it the model's eos token (see [`Tokenizer::from_inner`]).
    pub fn eot_id(&self) -> u32 {
        self.eot
    }

    /// Which family this tokenizer belongs to.
    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// Registers `tokens` as special tokens and returns the id of each, in order. Tokens
    /// already known keep their ids; new ones are appended at the end of the vocabulary.
    /// Special tokens written in a text are encoded as their id and never split.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty token; [`Error::Tokenizer`] if the underlying
    /// tokenizer refuses a token.
    pub fn add_special_tokens(&mut self, tokens: &[&str]) -> Result<Vec<u32>> {
        if tokens.iter().any(|t| t.is_empty()) {
            return Err(Error::InvalidArgument(
                "a special token cannot be empty".into(),
            ));
        }
        let added = self.inner.get_added_vocabulary().get_vocab();
        let missing: Vec<AddedToken> = tokens
            .iter()
            .filter(|t| !added.contains_key(**t))
            .map(|t| AddedToken::from(*t, true))
            .collect();
        if !missing.is_empty() {
            self.inner.add_special_tokens(missing)?;
            self.plain = std::sync::Arc::new(plain_text_copy(&self.inner));
        }
        tokens
            .iter()
            .map(|t| {
                self.inner
                    .token_to_id(t)
                    .ok_or_else(|| Error::Tokenizer(format!("special token {t:?} was not added")))
            })
            .collect()
    }

    /// The wrapped Hugging Face tokenizer, for anything not covered here.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    // ----------------------------------------------------------------------------------------
    // Helpers
    // ----------------------------------------------------------------------------------------

    /// Byte-level BPE training on pieces that contain no `<|endoftext|>`.
    fn train_bpe_pieces<I, S>(pieces: I, vocab_size: usize) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if vocab_size < 257 {
            return Err(Error::InvalidArgument(format!(
                "a byte-level BPE vocabulary needs at least 257 tokens (256 bytes + {EOT}), got {vocab_size}"
            )));
        }
        let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        let mut trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size - 1) // <|endoftext|> is added after training, as the last id
            .initial_alphabet(alphabet)
            .build();
        let mut tokenizer: TokenizerImpl<
            BPE,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        > = TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_pre_tokenizer(Some(byte_level().into()))
            .with_post_processor(Some(byte_level().into()))
            .with_decoder(Some(byte_level().into()))
            .build()?;
        tokenizer.train(&mut trainer, pieces)?;
        Self::from_inner(tokenizer.into())
    }

    /// Checks that a char tokenizer knows every character of `text` outside special tokens
    /// (inside them too when `plain`: the text is then encoded without special tokens).
    fn check_known_chars(&self, text: &str, plain: bool) -> Result<()> {
        let inner = if plain { &*self.plain } else { &self.inner };
        let model = inner.get_model();
        let pieces = inner
            .get_added_vocabulary()
            .extract_and_normalize(inner.get_normalizer(), text);
        let mut buf = [0u8; 4];
        for (piece, (start, _), tokens) in
            pieces.get_splits(OffsetReferential::Original, OffsetType::Byte)
        {
            if tokens.is_some() {
                continue; // a special token
            }
            for (offset, ch) in piece.char_indices() {
                if model.token_to_id(ch.encode_utf8(&mut buf)).is_none() {
                    return Err(unknown_char(text, start + offset, ch));
                }
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.vocab_size())
            .field("eot_id", &self.eot)
            .finish()
    }
}

/// Streaming decoder returned by [`Tokenizer::stream`].
///
/// A byte-level token may hold part of a multi-byte character (half of `中`, a third of
/// `🦀`); the stream keeps the ids since its last output and emits their text only once it
/// ends in a complete character. Concatenating everything [`TokenStream::push`] and
/// [`TokenStream::finish`] return gives `decode(all ids)` whenever that contains no U+FFFD.
///
/// Decoding the held ids on their own is exact for the tokenizers built here: byte-level
/// decoding works byte by byte and char-level decoding character by character.
#[derive(Debug)]
pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    pending: Vec<u32>,
}

impl TokenStream<'_> {
    /// Adds one id; returns the text it completes, or `None` while a character is unfinished.
    ///
    /// # Errors
    /// As [`Tokenizer::decode`] (an id outside the vocabulary is rejected at once).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.pending.push(id);
        let text = match self.tokenizer.decode(&self.pending) {
            Ok(text) => text,
            Err(e) => {
                self.pending.pop();
                return Err(e);
            }
        };
        if text.ends_with(REPLACEMENT) {
            return Ok(None);
        }
        self.pending.clear();
        Ok((!text.is_empty()).then_some(text))
    }

    /// Flushes what is left: the text of held ids, lossily decoded if their bytes never
    /// completed a character; `None` if nothing is held.
    ///
    /// # Errors
    /// As [`Tokenizer::decode`].
    pub fn finish(self) -> Result<Option<String>> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let text = self.tokenizer.decode(&self.pending)?;
        Ok((!text.is_empty()).then_some(text))
    }
}

// --------------------------------------------------------------------------------------------
// Private helpers
// --------------------------------------------------------------------------------------------

/// Texts longer than this are encoded chunk by chunk (see [`Tokenizer::encode`]).
const ENCODE_CHUNK_BYTES: usize = 64 * 1024;

/// Target size of the chunks fed to the BPE trainer (the trainer pre-tokenizes them in
/// parallel).
const TRAIN_CHUNK_BYTES: usize = 16 * 1024;

/// GPT-2's byte-level component: no prefix space, GPT-2 regex, offsets not trimmed. The same
/// value serves as pre-tokenizer, post-processor and decoder.
fn byte_level() -> ByteLevel {
    ByteLevel::new(false, false, true)
}

/// A copy of `inner` that encodes special tokens' spellings as plain text.
fn plain_text_copy(inner: &tokenizers::Tokenizer) -> tokenizers::Tokenizer {
    let mut plain = inner.clone();
    plain.set_encode_special_tokens(true);
    plain
}

/// A byte-level tokenizer (GPT-2 layout) around a BPE model.
fn byte_level_tokenizer(model: BPE) -> tokenizers::Tokenizer {
    let mut inner = tokenizers::Tokenizer::new(model);
    inner
        .with_pre_tokenizer(Some(byte_level()))
        .with_post_processor(Some(byte_level()))
        .with_decoder(Some(byte_level()));
    inner
}

/// Works out the [`TokenizerKind`] of a wrapped tokenizer from its model and pre-tokenizer.
fn detect_kind(inner: &tokenizers::Tokenizer) -> TokenizerKind {
    match inner.get_model() {
        ModelWrapper::WordLevel(model) => {
            let all_chars = model.get_vocab().keys().all(|t| t.chars().count() == 1);
            if all_chars {
                TokenizerKind::Char
            } else {
                TokenizerKind::Other
            }
        }
        ModelWrapper::BPE(_) if has_byte_level(inner.get_pre_tokenizer()) => {
            TokenizerKind::ByteLevelBpe
        }
        _ => TokenizerKind::Other,
    }
}

fn has_byte_level(pre_tokenizer: Option<&PreTokenizerWrapper>) -> bool {
    match pre_tokenizer {
        Some(PreTokenizerWrapper::ByteLevel(_)) => true,
        Some(PreTokenizerWrapper::Sequence(seq)) => seq
            .as_ref()
            .iter()
            .any(|p| matches!(p, PreTokenizerWrapper::ByteLevel(_))),
        _ => false,
    }
}

/// Parses a `tokenizer.json` into a `tokenizers::Tokenizer`, or says why not: the 1-based
/// line, when the JSON itself is malformed, and what is wrong.
///
/// The JSON is parsed here (serde_json refuses nesting deeper than 128 levels) and handed to
/// the crate as a value: the crate's own parser panics on some malformed input (a syntax error
/// or deep nesting inside `decoder`, an invalid `Precompiled` normalizer). Precompiled
/// normalizers are checked by [`check_normalizer`] first.
fn parse_tokenizer_json(
    bytes: &[u8],
) -> std::result::Result<tokenizers::Tokenizer, (Option<usize>, String)> {
    let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        let line = (e.line() > 0).then_some(e.line());
        (line, crate::error::json_message(&e))
    })?;
    if let Some(normalizer) = value.get_mut("normalizer") {
        check_normalizer(normalizer, "normalizer").map_err(|msg| (None, msg))?;
    }
    if let Some(model) = value.get("model") {
        check_bpe_merges(model).map_err(|msg| (None, msg))?;
    }
    for part in ["normalizer", "pre_tokenizer", "decoder", "post_processor"] {
        if let Some(v) = value.get(part) {
            check_regexes(v, part).map_err(|msg| (None, msg))?;
        }
    }
    serde_json::from_value(value).map_err(|e| (None, e.to_string()))
}

/// Checks that every merge of a BPE `model` (any model with a `vocab` object and a `merges`
/// list) joins two tokens of its vocabulary into a third,
/// the right one starting with the `continuing_subword_prefix` (if any) that the merge drops:
/// the `tokenizers` crate slices each merge into a buffer as long as the longest token before
/// looking the result up, so a merge whose tokens are missing panics (or, with a prefix the
/// token lacks, cuts a character in two). Merges in a shape the crate does not read are left
/// to its error.
fn check_bpe_merges(model: &serde_json::Value) -> std::result::Result<(), String> {
    // Whatever its `type` says: without one, the crate tries every model in turn.
    let field = |key: &str| model.get(key);
    let (Some(serde_json::Value::Object(vocab)), Some(serde_json::Value::Array(merges))) =
        (field("vocab"), field("merges"))
    else {
        return Ok(());
    };
    let prefix = field("continuing_subword_prefix")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("");
    let legacy = merges.iter().all(serde_json::Value::is_string);
    let mut rank = 0;
    for (i, merge) in merges.iter().enumerate() {
        let (left, right) = match merge {
            serde_json::Value::String(line) if legacy => {
                if line.starts_with("#version") {
                    continue;
                }
                match line.split_once(' ') {
                    Some((l, r)) if !r.contains(' ') => (l, r),
                    _ => return Ok(()), // the crate reports the line
                }
            }
            serde_json::Value::Array(pair) => match pair.as_slice() {
                [serde_json::Value::String(l), serde_json::Value::String(r)] => {
                    (l.as_str(), r.as_str())
                }
                _ => return Ok(()),
            },
            _ => return Ok(()),
        };
        rank += 1;
        let at = format!("model.merges[{i}] (merge {rank}, {left:?} + {right:?})");
        for token in [left, right] {
            if !vocab.contains_key(token) {
                return Err(format!("{at}: {token:?} is not in the vocabulary"));
            }
        }
        let Some(rest) = right.strip_prefix(prefix) else {
            return Err(format!(
                "{at}: {right:?} does not start with the continuing_subword_prefix {prefix:?}"
            ));
        };
        let merged = format!("{left}{rest}");
        if !vocab.contains_key(&merged) {
            return Err(format!(
                "{at}: the merged token {merged:?} is not in the vocabulary"
            ));
        }
    }
    Ok(())
}

/// The deepest nesting of brackets and parentheses a `tokenizer.json` regex may have; real
/// ones (GPT-2's, Llama's) nest two or three deep.
const MAX_REGEX_NESTING: usize = 100;

/// Checks every regex (`{"Regex": "…"}`, as `Split` and `Replace` spell theirs) in `v`, at the
/// field path `at`: Oniguruma parses nested brackets recursively, so a pattern of a few
/// thousand `[` overflows a thread's stack (an abort, not an error) while being compiled.
fn check_regexes(v: &serde_json::Value, at: &str) -> std::result::Result<(), String> {
    match v {
        serde_json::Value::Object(fields) => {
            for (key, value) in fields {
                let field = format!("{at}.{key}");
                match value {
                    serde_json::Value::String(pattern) if key == "Regex" => {
                        let depth = regex_nesting(pattern);
                        if depth > MAX_REGEX_NESTING {
                            return Err(format!(
                                "{field} nests brackets and parentheses {depth} deep; tinygpt \
                                 accepts at most {MAX_REGEX_NESTING}"
                            ));
                        }
                    }
                    _ => check_regexes(value, &field)?,
                }
            }
            Ok(())
        }
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| check_regexes(item, &format!("{at}[{i}]"))),
        _ => Ok(()),
    }
}

/// The deepest nesting of unescaped `[`/`(` in a regex (counting generously: a `(` inside a
/// character class counts too).
fn regex_nesting(pattern: &str) -> usize {
    let (mut depth, mut deepest, mut escaped) = (0usize, 0, false);
    for c in pattern.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '[' | '(' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ']' | ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Checks every SentencePiece `Precompiled` normalizer in `normalizer` (the field path `at`),
/// wherever it is nested (a `Sequence`'s list, with or without its `type`), with
/// [`check_charsmap`], and rewrites its base64 in the canonical form the `tokenizers` crate
/// decodes.
fn check_normalizer(
    normalizer: &mut serde_json::Value,
    at: &str,
) -> std::result::Result<(), String> {
    match normalizer {
        serde_json::Value::Object(fields) => {
            if fields.get("type").and_then(serde_json::Value::as_str) == Some("Precompiled") {
                let field = format!("{at}.precompiled_charsmap");
                let Some(text) = fields
                    .get("precompiled_charsmap")
                    .and_then(serde_json::Value::as_str)
                else {
                    return Err(format!("{field} must be a base64 string"));
                };
                let bytes = base64_decode(text).ok_or_else(|| format!("{field} is not base64"))?;
                check_charsmap(&bytes).map_err(|msg| format!("{field}: {msg}"))?;
                fields.insert(
                    "precompiled_charsmap".into(),
                    serde_json::Value::String(base64_encode(&bytes)),
                );
                return Ok(());
            }
            for (key, value) in fields.iter_mut() {
                check_normalizer(value, &format!("{at}.{key}"))?;
            }
            Ok(())
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                check_normalizer(item, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Checks a SentencePiece `precompiled_charsmap`, as `spm_precompiled` reads it: a u32 LE trie
/// size in bytes, the trie (a darts-clone double array of u32 units), then NUL-separated
/// replacement strings (UTF-8). Its size must fit the bytes that follow; and every node a
/// lookup can reach, for any input byte, must lie inside the trie, with every leaf's value the
/// start of a replacement (a character boundary inside the strings): `spm_precompiled`
/// indexes without checking, so anything else would panic while encoding.
fn check_charsmap(bytes: &[u8]) -> std::result::Result<(), String> {
    let Some((size, rest)) = bytes.split_first_chunk::<4>() else {
        return Err(format!(
            "{} bytes, too short for the 4-byte trie size",
            bytes.len()
        ));
    };
    let declared = u32::from_le_bytes(*size) as usize;
    let units = declared / 4;
    let Some((trie, strings)) = rest.split_at_checked(units * 4) else {
        return Err(format!(
            "the trie is declared {declared} bytes long but only {} bytes follow its size",
            rest.len()
        ));
    };
    let strings = std::str::from_utf8(strings)
        .map_err(|e| format!("the replacement strings are not UTF-8 ({e})"))?;
    let trie: Vec<usize> = trie
        .chunks_exact(4)
        .map(|c| <[u8; 4]>::try_from(c).map_or(0, u32::from_le_bytes) as usize)
        .collect();
    // darts-clone's unit layout, as spm_precompiled decodes it.
    let has_leaf = |u: usize| (u >> 8) & 1 == 1;
    let value = |u: usize| u & ((1 << 31) - 1);
    let label = |u: usize| u & ((1 << 31) | 0xFF);
    let offset = |u: usize| (u >> 10) << ((u & (1 << 9)) >> 6);
    // A lookup at a node whose children start at `base` reads unit `base ^ byte` for whatever
    // byte comes next, so every such unit must exist.
    let check_base = |base: usize| {
        if base | 0xFF < trie.len() {
            Ok(())
        } else {
            Err(format!(
                "a trie node's children start at unit {base}, so input bytes would read up to \
                 unit {}, past the trie's {} units",
                base | 0xFF,
                trie.len()
            ))
        }
    };
    let Some(&root) = trie.first() else {
        return Err("the trie is empty".into());
    };
    let mut queued = vec![false; trie.len()];
    let mut bases = vec![offset(root)];
    check_base(offset(root))?;
    while let Some(base) = bases.pop() {
        for byte in 1..=0xFFusize {
            let Some(&unit) = trie.get(base ^ byte) else {
                continue;
            };
            if label(unit) != byte {
                continue;
            }
            let child = (base ^ byte) ^ offset(unit);
            check_base(child)?;
            if has_leaf(unit) {
                let start = trie.get(child).map(|&u| value(u));
                if !start.is_some_and(|s| strings.is_char_boundary(s)) {
                    return Err(format!(
                        "a trie leaf gives {}, which is not the start of a replacement in the {} \
                         bytes of strings",
                        start.unwrap_or_default(),
                        strings.len()
                    ));
                }
            }
            if let Some(q) = queued.get_mut(child) {
                if !std::mem::replace(q, true) {
                    bases.push(child);
                }
            }
        }
    }
    Ok(())
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 (padding optional), or `None` for anything else.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3 + 2);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes() {
        let v = BASE64.iter().position(|&b| b == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Standard base64 with padding.
fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Parses GPT-2's `vocab.bpe`: an optional `#version` header, then one `left right` merge per
/// line, both halves (and their concatenation) in `vocab`.
fn parse_merges(
    text: &str,
    vocab: &HashMap<String, u32>,
    path: &Path,
) -> Result<Vec<(String, String)>> {
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.starts_with("#version") || line.is_empty() {
            continue;
        }
        let (left, right) = match line.split_once(' ') {
            Some((l, r)) if !l.is_empty() && !r.is_empty() && !r.contains(' ') => (l, r),
            _ => {
                return Err(Error::bad_file(
                    path,
                    Some(line_no),
                    format!("expected two tokens separated by one space, got {line:?}"),
                ))
            }
        };
        for token in [left, right, &format!("{left}{right}")] {
            if !vocab.contains_key(token) {
                return Err(Error::bad_file(
                    path,
                    Some(line_no),
                    format!("merge token {token:?} is not in the vocabulary"),
                ));
            }
        }
        merges.push((left.to_owned(), right.to_owned()));
    }
    Ok(merges)
}

/// The [`Error::UnknownChar`] for `ch` at byte offset `byte` of `text`.
fn unknown_char(text: &str, byte: usize, ch: char) -> Error {
    let before = text.get(..byte).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_prefix = before.get(line_start..).unwrap_or("");
    Error::UnknownChar {
        ch,
        position: before.chars().count(),
        line: before.matches('\n').count() + 1,
        column: line_prefix.chars().count() + 1,
    }
}

/// Cuts a text into chunks of at least `min_len` bytes, only right after a `\n` that sits
/// between two non-whitespace characters.
///
/// There GPT-2's regex always ends a piece: the `\n` is a piece of its own whether or not the
/// text goes on, and no piece starts with anything before it. So pre-tokenizing the chunks one
/// by one gives exactly the pieces of the whole text.
struct PreTokenizerSafeChunks<'a> {
    rest: &'a str,
    min_len: usize,
}

impl<'a> PreTokenizerSafeChunks<'a> {
    fn new(text: &'a str, min_len: usize) -> Self {
        Self {
            rest: text,
            min_len,
        }
    }
}

impl<'a> Iterator for PreTokenizerSafeChunks<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.rest.is_empty() {
            return None;
        }
        let bytes = self.rest.as_bytes();
        let mut cut = self.rest.len();
        let mut from = self.min_len.max(1);
        while let Some(nl) = bytes
            .get(from..)
            .and_then(|b| b.iter().position(|&c| c == b'\n'))
        {
            let at = from + nl;
            let prev = self.rest.get(..at).and_then(|s| s.chars().next_back());
            let next = self.rest.get(at + 1..).and_then(|s| s.chars().next());
            let solid = |c: Option<char>| c.is_some_and(|c| !c.is_whitespace());
            if solid(prev) && solid(next) {
                cut = at + 1;
                break;
            }
            from = at + 1;
        }
        // `cut` is just after an ASCII '\n' or at the end, so it is a char boundary.
        let (chunk, rest) = self.rest.split_at_checked(cut).unwrap_or((self.rest, ""));
        self.rest = rest;
        Some(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small mixed corpus for byte-level BPE tests.
    const CORPUS: &str = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n\
All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n\
All:\nResolved. resolved.\n\nFirst Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\n\
床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。\n\
The crab 🦀 says hi 👍🏽 — naïve café, 1234 5678.\r\n\tindented\tline  with   spaces  \n";

    /// A public data file: in `$TINYGPT_DATA`, the crate's `data/`, or `../shared/data`; the
    /// test fails, saying where to get it, when none holds it (the tests that need one are
    /// `#[ignore]`d).
    fn data_file(name: &str) -> std::path::PathBuf {
        let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dirs: Vec<std::path::PathBuf> = std::env::var_os("TINYGPT_DATA")
            .filter(|d| !d.is_empty())
            .map(std::path::PathBuf::from)
            .into_iter()
            .chain([crate_dir.join("data"), crate_dir.join("../shared/data")])
            .collect();
        match dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
            Some(found) => found,
            None => panic!(
                "this test needs the public data file {name}, found in none of {dirs:?}: set \
                 TINYGPT_DATA=DIR, or fetch it with `cargo run --release --example fetch_data -- \
                 {name}`"
            ),
        }
    }

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<TokenStream<'static>>();
    }

    #[test]
    fn char_vocab_is_sorted_distinct_chars_then_eot() {
        let tok = Tokenizer::train_char("hello world\n").unwrap();
        assert_eq!(tok.kind(), TokenizerKind::Char);
        // sorted(set("hello world\n")) = ['\n', ' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w']
        let expected = ["\n", " ", "d", "e", "h", "l", "o", "r", "w", EOT];
        assert_eq!(tok.vocab_size(), expected.len());
        for (id, token) in expected.iter().enumerate() {
            assert_eq!(tok.token_to_id(token), Some(id as u32), "{token:?}");
            assert_eq!(tok.id_to_token(id as u32).as_deref(), Some(*token));
        }
        assert_eq!(tok.eot_id(), 9);
        assert_eq!(
            tok.encode("hello world\n").unwrap(),
            [4, 3, 5, 5, 6, 1, 8, 6, 7, 5, 2, 0]
        );
        let text = "world\n\nhello  \nold";
        assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text);
        assert_eq!(tok.encode("").unwrap(), Vec::<u32>::new());
        assert_eq!(tok.decode(&[]).unwrap(), "");
    }

    #[test]
    fn char_eot_in_text_is_one_token() {
        let tok = Tokenizer::train_char("hello world\n").unwrap();
        let ids = tok.encode("he<|endoftext|>lo").unwrap();
        assert_eq!(ids, [4, 3, 9, 5, 6]);
        assert_eq!(tok.decode(&ids).unwrap(), "he<|endoftext|>lo");
        // An incomplete special token is just unknown characters.
        assert!(matches!(
            tok.encode("he<|endof"),
            Err(Error::UnknownChar {
                ch: '<',
                position: 2,
                line: 1,
                column: 3
            })
        ));
    }

    #[test]
    fn char_unknown_char_reports_position_line_column() {
        let tok = Tokenizer::train_char("hello world\n").unwrap();
        // "hello\nwor!d": '!' is char 9; line 2 ("wor!d"), column 4.
        match tok.encode("hello\nwor!d") {
            Err(Error::UnknownChar {
                ch,
                position,
                line,
                column,
            }) => {
                assert_eq!((ch, position, line, column), ('!', 9, 2, 4));
            }
            other => panic!("expected UnknownChar, got {other:?}"),
        }
        // Positions count characters, not bytes; the first unknown one is reported.
        match tok.encode("é<|endoftext|>\nhé") {
            Err(Error::UnknownChar {
                ch,
                position,
                line,
                column,
            }) => {
                assert_eq!((ch, position, line, column), ('é', 0, 1, 1));
            }
            other => panic!("expected UnknownChar, got {other:?}"),
        }
        match tok.encode("he<|endoftext|>\nhé") {
            Err(Error::UnknownChar {
                ch,
                position,
                line,
                column,
            }) => {
                assert_eq!((ch, position, line, column), ('é', 17, 2, 2));
            }
            other => panic!("expected UnknownChar, got {other:?}"),
        }
    }

    #[test]
    fn char_rejects_empty_text_and_keeps_eot_chars_out() {
        assert!(matches!(
            Tokenizer::train_char(""),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Tokenizer::train_char(EOT),
            Err(Error::InvalidArgument(_))
        ));
        let tok = Tokenizer::train_char("ab<|endoftext|>ba").unwrap();
        assert_eq!(tok.vocab_size(), 3);
        assert_eq!(tok.encode("ab<|endoftext|>").unwrap(), [0, 1, 2]);
    }

    #[test]
    fn char_handles_crlf_tabs_and_astral_chars() {
        let text = "a\r\n\tb 🦀\u{2028}中\r";
        let tok = Tokenizer::train_char(text).unwrap();
        assert_eq!(
            tok.vocab_size(),
            text.chars().collect::<BTreeSet<_>>().len() + 1
        );
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids.len(), text.chars().count());
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }

    #[test]
    fn decode_rejects_out_of_range_ids() {
        let tok = Tokenizer::train_char("hello world\n").unwrap();
        match tok.decode(&[0, 10]) {
            Err(Error::InvalidArgument(msg)) => {
                assert!(msg.contains("10") && msg.contains("10 tokens"), "{msg}");
            }
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
        let bpe = Tokenizer::train_bpe(CORPUS, 300).unwrap();
        assert!(bpe.decode(&[bpe.vocab_size() as u32]).is_err());
        assert!(bpe.decode(&[u32::MAX]).is_err());
    }

    #[test]
    fn bpe_round_trips_anything() {
        let tok = Tokenizer::train_bpe(CORPUS, 400).unwrap();
        assert_eq!(tok.kind(), TokenizerKind::ByteLevelBpe);
        let texts = [
            CORPUS,
            "Hello, world! 中文 🦀👍🏽 a    b\tc\r\nd  ",
            "  leading and trailing spaces  ",
            "never seen: Ελληνικά, עברית, 日本語のテキスト, 🧪🧬, \u{0}\u{7f}\u{feff}",
            "\n\n\n",
            " ",
            "",
            "<|endoftext|>",
            "doc one<|endoftext|>doc two<|endoftext|>",
        ];
        for text in texts {
            let ids = tok.encode(text).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text, "{ids:?}");
        }
        // Every id decodes to something, and the special token is one id.
        assert_eq!(tok.encode(EOT).unwrap(), [tok.eot_id()]);
        assert_eq!(
            tok.encode("x<|endoftext|>").unwrap().last(),
            Some(&tok.eot_id())
        );
    }

    #[test]
    fn bpe_vocab_size_and_layout() {
        let tok = Tokenizer::train_bpe(CORPUS, 300).unwrap();
        assert_eq!(tok.vocab_size(), 300);
        assert_eq!(tok.eot_id(), 299);
        // The 256 byte tokens come first, in code-point order of their byte-level spelling.
        assert_eq!(tok.token_to_id("!"), Some(0));
        assert_eq!(
            tok.token_to_id("Ġ"),
            tok.id_to_token(tok.encode(" ").unwrap()[0])
                .and_then(|t| tok.token_to_id(&t))
        );
        // Asking for more than the corpus supports gives fewer tokens, never more.
        let small = Tokenizer::train_bpe("ab ab", 100_000).unwrap();
        assert!(small.vocab_size() < 270, "{}", small.vocab_size());
        assert_eq!(small.eot_id() as usize, small.vocab_size() - 1);
        // Empty corpus: bytes only.
        assert_eq!(Tokenizer::train_bpe("", 1000).unwrap().vocab_size(), 257);
        assert!(matches!(
            Tokenizer::train_bpe(CORPUS, 256),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(Tokenizer::train_bpe(CORPUS, 257).unwrap().vocab_size(), 257);
    }

    #[test]
    fn bpe_training_is_deterministic() {
        let a = Tokenizer::train_bpe(CORPUS, 400)
            .unwrap()
            .to_json(false)
            .unwrap();
        for _ in 0..3 {
            let b = Tokenizer::train_bpe(CORPUS, 400)
                .unwrap()
                .to_json(false)
                .unwrap();
            assert_eq!(a, b);
        }
        // Feeding lines instead of chunks learns the same thing here (no "\n" mid-piece).
        let c = Tokenizer::train_bpe_from_iter(CORPUS.split_inclusive('\n'), 400).unwrap();
        assert_eq!(c.vocab_size(), 400);
    }

    #[test]
    fn safe_chunks_cover_text_and_cut_after_solid_newlines() {
        let text = "ab\ncd\n\nef \ngh\n ij\nkl";
        let chunks: Vec<&str> = PreTokenizerSafeChunks::new(text, 1).collect();
        assert_eq!(chunks.concat(), text);
        assert_eq!(chunks, ["ab\n", "cd\n\nef \ngh\n ij\n", "kl"]);
        let whole: Vec<&str> = PreTokenizerSafeChunks::new(text, 1000).collect();
        assert_eq!(whole, [text]);
        assert_eq!(PreTokenizerSafeChunks::new("", 1).count(), 0);
        let uni = "中\n文\n🦀";
        assert_eq!(
            PreTokenizerSafeChunks::new(uni, 1).collect::<Vec<_>>(),
            ["中\n", "文\n", "🦀"]
        );
    }

    #[test]
    fn save_then_load_gives_same_encodings() {
        let dir = tempfile::tempdir().unwrap();
        // Characters all from CORPUS, so the char tokenizer knows them.
        let text = "First 明月 🦀<|endoftext|>\r\n  speak.";
        for tok in [
            Tokenizer::train_bpe(CORPUS, 350).unwrap(),
            Tokenizer::train_char(CORPUS).unwrap(),
        ] {
            let path = dir.path().join("tokenizer.json");
            tok.save(&path).unwrap();
            let loaded = Tokenizer::from_file(&path).unwrap();
            assert_eq!(loaded.kind(), tok.kind());
            assert_eq!(loaded.vocab_size(), tok.vocab_size());
            assert_eq!(loaded.eot_id(), tok.eot_id());
            assert_eq!(loaded.encode(text).unwrap(), tok.encode(text).unwrap());
            assert_eq!(loaded.encode(CORPUS).unwrap(), tok.encode(CORPUS).unwrap());
            assert_eq!(loaded.to_json(false).unwrap(), tok.to_json(false).unwrap());
            let again = Tokenizer::from_bytes(tok.to_json(false).unwrap()).unwrap();
            assert_eq!(again.encode(text).unwrap(), tok.encode(text).unwrap());
        }
    }

    #[test]
    fn load_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        match Tokenizer::from_file(&missing) {
            Err(Error::Io { path, .. }) => assert_eq!(path, missing),
            other => panic!("expected Io, got {other:?}"),
        }
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"model\": 3}").unwrap();
        match Tokenizer::from_file(&bad) {
            Err(e @ Error::BadFile { .. }) => assert!(e.to_string().contains("bad.json"), "{e}"),
            other => panic!("expected BadFile, got {other:?}"),
        }
        assert!(matches!(
            Tokenizer::from_bytes("not json"),
            Err(Error::Tokenizer(_))
        ));
    }

    #[test]
    fn streaming_waits_for_complete_characters() {
        let tok = Tokenizer::train_bpe(CORPUS, 400).unwrap();
        for text in ["a 中文 🦀 b", "👍🏽👍🏽 naïve", "床前明月光<|endoftext|>x"]
        {
            let ids = tok.encode(text).unwrap();
            let mut stream = tok.stream();
            let mut pieces = Vec::new();
            for &id in &ids {
                if let Some(piece) = stream.push(id).unwrap() {
                    pieces.push(piece);
                }
            }
            if let Some(piece) = stream.finish().unwrap() {
                pieces.push(piece);
            }
            assert_eq!(pieces.concat(), text);
            assert!(
                pieces.iter().all(|p| !p.contains(REPLACEMENT)),
                "{pieces:?}"
            );
        }
        // Byte by byte: "🦀" is 4 byte tokens and only the last one emits.
        let crab = tok.encode("🦀").unwrap();
        let mut stream = tok.stream();
        let outs: Vec<Option<String>> = crab.iter().map(|&id| stream.push(id).unwrap()).collect();
        assert_eq!(outs.last().cloned().flatten().as_deref(), Some("🦀"));
        assert!(outs[..outs.len() - 1].iter().all(Option::is_none));
        // Truly incomplete bytes are flushed lossily by finish.
        let mut stream = tok.stream();
        assert_eq!(stream.push(crab[0]).unwrap(), None);
        assert_eq!(stream.finish().unwrap().as_deref(), Some("\u{FFFD}"));
        // Bad ids are rejected and do not poison the stream.
        let mut stream = tok.stream();
        assert!(stream.push(u32::MAX).is_err());
        assert_eq!(stream.push(tok.eot_id()).unwrap().as_deref(), Some(EOT));
    }

    #[test]
    fn streaming_char_tokenizer_emits_every_char() {
        let tok = Tokenizer::train_char("hello world\n").unwrap();
        let mut stream = tok.stream();
        let out: Vec<_> = tok
            .encode("hello")
            .unwrap()
            .into_iter()
            .map(|id| stream.push(id).unwrap())
            .collect();
        assert_eq!(out, ["h", "e", "l", "l", "o"].map(|s| Some(s.to_string())));
        assert_eq!(stream.finish().unwrap(), None);
    }

    #[test]
    fn add_special_tokens_appends_and_is_matched() {
        let mut tok = Tokenizer::train_bpe(CORPUS, 300).unwrap();
        let before = tok.encode(CORPUS).unwrap();
        let ids = tok
            .add_special_tokens(&["<|user|>", EOT, "<|assistant|>", "<|user|>"])
            .unwrap();
        assert_eq!(ids, [300, 299, 301, 300]);
        assert_eq!(tok.vocab_size(), 302);
        assert_eq!(tok.eot_id(), 299);
        assert_eq!(tok.encode(CORPUS).unwrap(), before);
        let hi = tok.encode("<|user|>hi").unwrap();
        assert_eq!(hi[0], 300);
        assert_eq!(tok.decode(&hi).unwrap(), "<|user|>hi");
        // Adding again changes nothing.
        assert_eq!(tok.add_special_tokens(&["<|assistant|>"]).unwrap(), [301]);
        assert_eq!(tok.vocab_size(), 302);
        assert!(matches!(
            tok.add_special_tokens(&[""]),
            Err(Error::InvalidArgument(_))
        ));

        let mut chars = Tokenizer::train_char("hello world\n").unwrap();
        assert_eq!(chars.add_special_tokens(&["<|user|>"]).unwrap(), [10]);
        assert!(matches!(
            chars.encode("<|user|>hi"),
            Err(Error::UnknownChar {
                ch: 'i',
                position: 9,
                line: 1,
                column: 10
            })
        ));
        assert_eq!(chars.encode("<|user|>he").unwrap(), [10, 4, 3]);
        // The saved file keeps the added tokens.
        let loaded = Tokenizer::from_bytes(chars.to_json(false).unwrap()).unwrap();
        assert_eq!(loaded.encode("<|user|>he").unwrap(), [10, 4, 3]);
    }

    #[test]
    #[ignore = "needs the public data files: TINYGPT_DATA=DIR cargo test --release --features server -- --ignored"]
    fn gpt2_files_match_openai() {
        let tok =
            Tokenizer::from_gpt2_files(data_file("gpt2_encoder.json"), data_file("gpt2_vocab.bpe"))
                .unwrap();
        assert_eq!(tok.kind(), TokenizerKind::ByteLevelBpe);
        assert_eq!(tok.vocab_size(), 50257);
        assert_eq!(tok.eot_id(), 50256);
        assert_eq!(tok.encode("Hello world").unwrap(), [15496, 995]);
        assert_eq!(tok.encode(" Hello").unwrap(), [18435]);
        assert_eq!(tok.encode("<|endoftext|>").unwrap(), [50256]);
        let text = "Hello world<|endoftext|> 中文 🦀\r\n  x";
        assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text);
    }

    #[test]
    fn gpt2_files_errors_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let vocab = dir.path().join("vocab.json");
        let merges = dir.path().join("merges.txt");
        std::fs::write(&vocab, r#"{"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}"#).unwrap();
        std::fs::write(&merges, "#version: 0.2\na b\nab c\n").unwrap();
        match Tokenizer::from_gpt2_files(&vocab, &merges) {
            Err(Error::BadFile { path, line, .. }) => {
                assert_eq!((path, line), (merges.clone(), Some(3)))
            }
            other => panic!("expected BadFile, got {other:?}"),
        }
        std::fs::write(&merges, "#version: 0.2\na b\n").unwrap();
        let tok = Tokenizer::from_gpt2_files(&vocab, &merges).unwrap();
        assert_eq!(tok.eot_id(), 3);
        assert_eq!(tok.vocab_size(), 4);
        assert!(matches!(
            Tokenizer::from_gpt2_files(dir.path().join("missing.json"), &merges),
            Err(Error::Io { .. })
        ));
    }
}
