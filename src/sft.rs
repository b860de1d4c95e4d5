//! Stage two, supervised fine-tuning (SFT): the same next-token loss, on conversations,
//! counted only on what the assistant says.
//!
//! Data is JSONL, one conversation per line, in the chat format of OpenAI and Hugging Face
//! (`{"messages": [{"role": "user", "content": …}, {"role": "assistant", …}]}`), or Alpaca
//! records (`{"instruction", "input", "output"}`, as JSONL or as one JSON array), which become a
//! user turn (`instruction`, then `input` after a blank line) and an assistant turn.
//!
//! A conversation is rendered by [`ChatTemplate`]; the loss is the mean cross-entropy over the
//! tokens its mask marks (assistant content and the `<|end|>` closing each reply). Batches are
//! padded to their longest conversation and padding is masked out. A conversation longer than
//! the context is cut from the left, so long as its last assistant turn still fits whole;
//! otherwise it is dropped. Both are counted.

use std::path::Path;

use candle_core::{Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::chat::{ChatTemplate, Message, Rendered, Role};
use crate::checkpoint::save_model;
use crate::model::{cross_entropy, Gpt};
use crate::tokenizer::Tokenizer;
use crate::train::Objective;
use crate::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Reading data
// ---------------------------------------------------------------------------------------------

/// What reading an SFT file found.
#[derive(Debug, Default)]
pub struct SftData {
    /// The conversations, in file order.
    pub conversations: Vec<Vec<Message>>,
    /// The 1-based line of each conversation (`None` for records of a JSON array).
    pub lines: Vec<Option<usize>>,
    /// Malformed records skipped (only with `skip_bad_lines`), with their errors.
    pub skipped: Vec<Error>,
}

/// One record as it may appear in a file: chat messages or Alpaca fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    messages: Option<Vec<Message>>,
    instruction: Option<String>,
    #[serde(default)]
    input: Option<String>,
    output: Option<String>,
    // Tolerated extra fields of common datasets.
    #[serde(default, rename = "system")]
    _system: Option<serde_json::Value>,
    #[serde(default, rename = "history")]
    _history: Option<serde_json::Value>,
}

impl Record {
    /// Checks the record and turns it into a conversation; the error says what is wrong.
    fn into_messages(self) -> std::result::Result<Vec<Message>, String> {
        let messages = match (self.messages, self.instruction, self.output) {
            (Some(m), None, None) => m,
            (None, Some(instruction), Some(output)) => {
                let input = self.input.unwrap_or_default();
                let user = if input.trim().is_empty() {
                    instruction
                } else {
                    format!("{instruction}\n\n{input}")
                };
                vec![Message::user(user), Message::assistant(output)]
            }
            (None, Some(_), None) => return Err("Alpaca record without `output`".into()),
            (None, None, Some(_)) => return Err("Alpaca record without `instruction`".into()),
            (None, None, None) => {
                return Err("expected `messages` or Alpaca `instruction`/`output`".into())
            }
            (Some(_), _, _) => return Err("has both `messages` and Alpaca fields".into()),
        };
        if messages.is_empty() {
            return Err("`messages` is empty".into());
        }
        if let Some(i) = messages.iter().skip(1).position(|m| m.role == Role::System) {
            return Err(format!(
                "message {} is a system message; only the first may be",
                i + 2
            ));
        }
        if !messages.iter().any(|m| m.role == Role::Assistant) {
            return Err("no assistant message to learn from".into());
        }
        Ok(messages)
    }
}

/// Reads SFT data from a JSONL file (chat `messages` or Alpaca records, one per line) or a JSON
/// array of such records (Alpaca's `.json` files).
///
/// A malformed record (bad JSON, missing fields, unknown role, no assistant turn) is an error
/// naming the file and line; with `skip_bad_lines` it is skipped and recorded in
/// [`SftData::skipped`] instead. So is a line that is not UTF-8 (each line is decoded on its
/// own, see [`crate::data::read_lines`]). Blank lines and a leading byte-order mark are
/// ignored.
///
/// # Errors
/// [`Error::Io`] if the file cannot be read; [`Error::BadFile`] with the line number for a
/// malformed record, or if the file holds no conversation.
pub fn load_sft_file(path: impl AsRef<Path>, skip_bad_lines: bool) -> Result<SftData> {
    let path = path.as_ref();
    let lines = crate::data::read_lines(path)?;
    let mut data = SftData::default();
    let mut accept = |line: Option<usize>, parsed: std::result::Result<Record, String>| match parsed
        .and_then(Record::into_messages)
    {
        Ok(m) => {
            data.conversations.push(m);
            data.lines.push(line);
            Ok(())
        }
        Err(msg) if skip_bad_lines => {
            data.skipped.push(Error::bad_file(path, line, msg));
            Ok(())
        }
        Err(msg) => Err(Error::bad_file(path, line, msg)),
    };
    let is_array = lines.iter().find(|l| !l.is_blank()).is_some_and(|l| {
        l.text
            .as_ref()
            .is_ok_and(|t| t.trim_start().starts_with('['))
    });
    if is_array {
        // A JSON array: line numbers of records come from the parser's positions (the lines
        // are joined back as they were, so its lines are the file's).
        let mut text = String::new();
        for line in &lines {
            match &line.text {
                Ok(t) => text.push_str(t),
                Err(msg) => return Err(Error::bad_file(path, Some(line.number), msg.clone())),
            }
            text.push('\n');
        }
        let values: Vec<serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| Error::json(path, None, &e))?;
        for (i, v) in values.into_iter().enumerate() {
            let parsed =
                serde_json::from_value::<Record>(v).map_err(|e| format!("record {}: {e}", i + 1));
            accept(None, parsed)?;
        }
    } else {
        for line in lines {
            if line.is_blank() {
                continue;
            }
            let parsed = line.text.and_then(|t| {
                serde_json::from_str::<Record>(&t).map_err(|e| crate::error::json_message(&e))
            });
            accept(Some(line.number), parsed)?;
        }
    }
    if data.conversations.is_empty() {
        return Err(Error::bad_file(path, None, "no conversation in the file"));
    }
    Ok(data)
}

impl SftData {
    /// Checks that every message encodes with `tokenizer` (a char-level tokenizer knows only
    /// the characters of its corpus). A conversation that does not is an error naming `path`
    /// and its line; with `skip_bad_lines` it is dropped and recorded in [`SftData::skipped`].
    ///
    /// # Errors
    /// [`Error::BadFile`] for the first conversation that does not encode.
    pub fn check_encodable(
        &mut self,
        path: &Path,
        tokenizer: &Tokenizer,
        skip_bad_lines: bool,
    ) -> Result<()> {
        let mut keep = Vec::with_capacity(self.conversations.len());
        for (conv, line) in self.conversations.iter().zip(&self.lines) {
            let bad = conv.iter().find_map(|m| {
                // Say which message: the line and column are inside its text, not the file.
                let role = format!("{:?}", m.role).to_lowercase();
                (tokenizer.encode_text(&m.content).err())
                    .map(|e| format!("in the text of a {role} message: {e}"))
            });
            match bad {
                None => keep.push(true),
                Some(e) if skip_bad_lines => {
                    self.skipped.push(Error::bad_file(path, *line, e));
                    keep.push(false);
                }
                Some(e) => return Err(Error::bad_file(path, *line, e)),
            }
        }
        let mut flags = keep.iter();
        self.conversations
            .retain(|_| *flags.next().unwrap_or(&true));
        let mut flags = keep.iter();
        self.lines.retain(|_| *flags.next().unwrap_or(&true));
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenised conversations
// ---------------------------------------------------------------------------------------------

/// How conversations were fitted to the context.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FitStats {
    /// Kept whole.
    pub kept: usize,
    /// Cut from the left (the last assistant turn kept whole).
    pub truncated: usize,
    /// Dropped: even the last assistant turn did not fit.
    pub dropped: usize,
}

/// Conversations rendered and fitted to `block_size + 1` tokens (inputs and shifted targets).
#[derive(Debug, Clone, Default)]
pub struct SftDataset {
    examples: Vec<Rendered>,
}

impl SftDataset {
    /// Renders `conversations` with `template` and fits each to `block_size + 1` tokens.
    ///
    /// # Errors
    /// Tokenizer errors (e.g. a character a char tokenizer does not know).
    pub fn new(
        conversations: &[Vec<Message>],
        tokenizer: &Tokenizer,
        template: &ChatTemplate,
        block_size: usize,
    ) -> Result<(Self, FitStats)> {
        let mut stats = FitStats::default();
        let mut examples = Vec::with_capacity(conversations.len());
        for conv in conversations {
            let r = template.render(tokenizer, conv)?;
            match fit(r, block_size + 1, template) {
                Fit::Whole(r) => {
                    stats.kept += 1;
                    examples.push(r);
                }
                Fit::Truncated(r) => {
                    stats.truncated += 1;
                    examples.push(r);
                }
                Fit::Dropped => stats.dropped += 1,
            }
        }
        Ok((Self { examples }, stats))
    }

    /// Number of conversations.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The rendered conversations.
    pub fn examples(&self) -> &[Rendered] {
        &self.examples
    }

    /// Splits off the last `fraction` of the conversations (after a seeded shuffle) as a
    /// held-out set: `(train, val)`.
    pub fn split(mut self, fraction: f64, seed: u64) -> (Self, Self) {
        let val = crate::data::split_off_shuffled(&mut self.examples, fraction, seed);
        (self, Self { examples: val })
    }

    /// A padded batch of the examples at `indices`: inputs `x` (B, T) u32, targets `y` (B, T)
    /// u32 and the loss mask (B, T) f32, with T the longest example minus one. Padding uses
    /// `pad_id` and is masked out.
    ///
    /// # Errors
    /// candle errors on device allocation.
    pub fn batch(
        &self,
        indices: &[usize],
        pad_id: u32,
        device: &candle_core::Device,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let t = indices
            .iter()
            .map(|&i| self.examples[i].ids.len() - 1)
            .max()
            .unwrap_or(1)
            .max(1);
        let b = indices.len();
        let (mut x, mut y, mut m) = (vec![pad_id; b * t], vec![pad_id; b * t], vec![0f32; b * t]);
        for (row, &i) in indices.iter().enumerate() {
            let ex = &self.examples[i];
            let n = ex.ids.len() - 1;
            x[row * t..row * t + n].copy_from_slice(&ex.ids[..n]);
            y[row * t..row * t + n].copy_from_slice(&ex.ids[1..]);
            for j in 0..n {
                m[row * t + j] = f32::from(ex.mask[j + 1]); // the mask of the predicted token
            }
        }
        Ok((
            Tensor::from_vec(x, (b, t), device)?,
            Tensor::from_vec(y, (b, t), device)?,
            Tensor::from_vec(m, (b, t), device)?,
        ))
    }
}

enum Fit {
    Whole(Rendered),
    Truncated(Rendered),
    Dropped,
}

/// Fits a rendered conversation to `max_len` tokens by cutting from the left, keeping the last
/// assistant turn (its role token through its `<|end|>`) whole.
fn fit(r: Rendered, max_len: usize, template: &ChatTemplate) -> Fit {
    if r.ids.len() <= max_len {
        return if r.mask.iter().skip(1).any(|&m| m == 1) {
            Fit::Whole(r)
        } else {
            Fit::Dropped
        };
    }
    let last_reply = r
        .ids
        .iter()
        .rposition(|&id| id == template.role_id(Role::Assistant));
    match last_reply {
        Some(start) if r.ids.len() - start <= max_len => {
            let cut = r.ids.len() - max_len;
            Fit::Truncated(Rendered {
                ids: r.ids[cut..].to_vec(),
                mask: r.mask[cut..].to_vec(),
            })
        }
        _ => Fit::Dropped,
    }
}

// ---------------------------------------------------------------------------------------------
// The objective
// ---------------------------------------------------------------------------------------------

/// The SFT [`Objective`]: masked next-token loss on conversations.
#[derive(Debug)]
pub struct Sft {
    model: Gpt,
    tokenizer: Tokenizer,
    train: SftDataset,
    val: SftDataset,
    batch_size: usize,
}

impl Sft {
    /// The stage's name, [`Objective::stage`]: what `trainer_state.json` records, and the
    /// name of the example that runs it.
    pub const STAGE: &'static str = "sft";

    /// SFT of `model` on `train`, evaluated on `val`, `batch_size` conversations per batch.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `train` is empty or `batch_size` is 0.
    pub fn new(
        model: Gpt,
        tokenizer: Tokenizer,
        train: SftDataset,
        val: SftDataset,
        batch_size: usize,
    ) -> Result<Self> {
        if train.is_empty() || batch_size == 0 {
            return Err(Error::InvalidArgument(format!(
                "SFT needs training conversations and batch_size >= 1 (got {} and {batch_size})",
                train.len()
            )));
        }
        Ok(Self {
            model,
            tokenizer,
            train,
            val,
            batch_size,
        })
    }

    /// The model being trained.
    pub fn model(&self) -> &Gpt {
        &self.model
    }

    /// The tokenizer (with the chat tokens).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Sum of masked losses and the number of masked tokens over the batch `indices`.
    fn batch_loss(
        &self,
        data: &SftDataset,
        indices: &[usize],
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<(Tensor, usize)> {
        let (x, y, m) = data.batch(indices, self.tokenizer.eot_id(), self.model.device())?;
        let logits = match rng {
            Some(rng) => self.model.forward_train(&x, rng)?,
            None => self.model.forward(&x)?,
        }; // (B, T, V)
        let (b, t, v) = logits.dims3()?;
        let m = m.flatten_all()?;
        let n = m.sum_all()?.to_scalar::<f32>()? as usize;
        let loss = cross_entropy(&logits.reshape((b * t, v))?, &y.flatten_all()?, Some(&m))?;
        Ok((loss, n))
    }

    /// Mean masked loss over the first `max_batches` batches of a split, weighting each batch
    /// by its number of trained tokens (the mean over all assistant tokens seen).
    fn mean_loss(&self, data: &SftDataset, max_batches: usize) -> Result<Option<f64>> {
        let (mut sum, mut count) = (0f64, 0usize);
        let indices: Vec<usize> = (0..data.len()).collect();
        for chunk in indices.chunks(self.batch_size).take(max_batches) {
            let (loss, n) = self.batch_loss(data, chunk, None)?;
            if n > 0 {
                sum += loss.to_scalar::<f32>()? as f64 * n as f64;
                count += n;
            }
        }
        Ok((count > 0).then(|| sum / count as f64))
    }
}

impl Objective for Sft {
    fn stage(&self) -> &str {
        Self::STAGE
    }

    fn parameters(&self) -> Result<Vec<(String, Var)>> {
        self.model.vars()
    }

    /// A batch of conversations drawn at random (with replacement, like pre-training's
    /// windows) from the training set.
    fn train_loss(&mut self, rng: &mut ChaCha8Rng) -> Result<(Tensor, usize)> {
        let indices: Vec<usize> = (0..self.batch_size)
            .map(|_| rng.random_range(0..self.train.len()))
            .collect();
        let (loss, _) = self.batch_loss(&self.train, &indices, Some(rng))?;
        let tokens = indices
            .iter()
            .map(|&i| self.train.examples[i].ids.len() - 1)
            .sum();
        Ok((loss, tokens))
    }

    /// Mean loss on assistant tokens over the first `eval_iters` batches of the training and
    /// held-out sets (the same conversations every time): `train_loss`, `val_loss`.
    fn evaluate(&mut self, eval_iters: usize, _rng: &mut ChaCha8Rng) -> Result<Vec<(String, f64)>> {
        let mut out = Vec::new();
        if let Some(l) = self.mean_loss(&self.train, eval_iters)? {
            out.push(("train_loss".to_string(), l));
        }
        if let Some(l) = self.mean_loss(&self.val, eval_iters)? {
            out.push(("val_loss".to_string(), l));
        }
        Ok(out)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        save_model(dir, &self.model, &self.tokenizer)
    }
}

/// How replies to held-out prompts ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplyStats {
    /// Prompts answered.
    pub prompts: usize,
    /// Replies that ended with `<|end|>` within the token budget.
    pub ended: usize,
    /// Mean reply length in tokens (the `<|end|>` not counted).
    pub mean_tokens: f64,
}

impl ReplyStats {
    /// The fraction of replies that ended with `<|end|>`.
    pub fn end_rate(&self) -> f64 {
        self.ended as f64 / self.prompts.max(1) as f64
    }
}

/// Generates a reply to each conversation's prompt (every message before its last assistant
/// turn, then an open `<|assistant|>`) with `params`, and counts the replies that end with
/// `<|end|>` within `params.max_new_tokens`: whether the model has learned to take turns.
///
/// # Errors
/// [`Error::InvalidArgument`] if the tokenizer has no chat tokens; generation errors.
pub fn reply_stats(
    model: &Gpt,
    tokenizer: &Tokenizer,
    conversations: &[Vec<Message>],
    params: &crate::SamplingParams,
) -> Result<ReplyStats> {
    let template = ChatTemplate::new(tokenizer)?;
    let params = params.clone().with_stop_tokens(vec![template.end_id()]);
    let mut stats = ReplyStats::default();
    let mut total_tokens = 0usize;
    for conv in conversations {
        let Some(last) = conv.iter().rposition(|m| m.role == Role::Assistant) else {
            continue;
        };
        let prompt = template.render_prompt(tokenizer, &conv[..last])?;
        let mut generator = crate::sampler::TokenGenerator::new(model, &prompt, &params)?
            .with_vocab_limit(tokenizer.vocab_size());
        for id in generator.by_ref() {
            id?;
        }
        stats.prompts += 1;
        total_tokens += generator.generated().len();
        if generator.finish_reason() == Some(crate::sampler::FinishReason::Stop) {
            stats.ended += 1;
        }
    }
    stats.mean_tokens = total_tokens as f64 / stats.prompts.max(1) as f64;
    Ok(stats)
}

/// Fits a pre-trained model and tokenizer for chat: adds the chat tokens the tokenizer lacks
/// and grows the model's vocabulary to match ([`Gpt::resize_vocab`]). Returns the trainable
/// model, the tokenizer and its template.
///
/// # Errors
/// Tokenizer errors; [`Error::InvalidArgument`] if the model is smaller than the tokenizer.
pub fn prepare_for_chat(
    model: &Gpt,
    mut tokenizer: Tokenizer,
) -> Result<(Gpt, Tokenizer, ChatTemplate)> {
    let template = ChatTemplate::add_tokens(&mut tokenizer)?;
    let vocab = tokenizer.vocab_size().max(model.config().vocab_size);
    let model = model.resize_vocab(vocab, true)?;
    Ok((model, tokenizer, template))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tmp_file(name: &str, text: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("tinygpt-sft-{}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_messages_and_alpaca_and_names_bad_lines() {
        let p = tmp_file(
            "a.jsonl",
            concat!(
                r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}"#,
                "\n",
                "\n",
                r#"{"instruction":"add","input":"1 1","output":"2"}"#,
                "\n",
                r#"{"messages":[{"role":"user","content":"no reply"}]}"#,
                "\n",
                r#"{"messages": oops"#,
                "\n",
            ),
        );
        let e = load_sft_file(&p, false).unwrap_err().to_string();
        assert!(e.ends_with(":4: no assistant message to learn from"), "{e}");
        let d = load_sft_file(&p, true).unwrap();
        assert_eq!(d.conversations.len(), 2);
        assert_eq!(d.skipped.len(), 2);
        assert!(
            d.skipped[1].to_string().contains(":5: "),
            "{}",
            d.skipped[1]
        );
        assert_eq!(d.conversations[1][0], Message::user("add\n\n1 1"));
        let p2 = tmp_file("b.json", r#"[{"instruction":"x","input":"","output":"y"}]"#);
        let d = load_sft_file(&p2, false).unwrap();
        assert_eq!(
            d.conversations[0],
            vec![Message::user("x"), Message::assistant("y")]
        );
        let p3 = tmp_file(
            "c.jsonl",
            r#"{"messages":[{"role":"robot","content":"x"}]}"#,
        );
        assert!(load_sft_file(&p3, false)
            .unwrap_err()
            .to_string()
            .contains(":1: unknown variant `robot`"));
        for p in [p, p2, p3] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn a_bom_is_skipped_and_bad_utf8_names_its_line() {
        let ok =
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}"#;
        let write = |name: &str, parts: &[&[u8]]| {
            let p = std::env::temp_dir().join(format!("tinygpt-sft-{}-{name}", std::process::id()));
            std::fs::write(&p, parts.concat()).unwrap();
            p
        };
        let bom: &[u8] = b"\xEF\xBB\xBF";
        let p1 = write("bom.jsonl", &[bom, ok.as_bytes(), b"\r\n"]);
        assert_eq!(load_sft_file(&p1, false).unwrap().conversations.len(), 1);
        let p2 = write("bom.json", &[bom, br#"[{"instruction":"x","output":"y"}]"#]);
        assert_eq!(load_sft_file(&p2, false).unwrap().conversations.len(), 1);
        let p3 = write(
            "badutf8.jsonl",
            &[
                ok.as_bytes(),
                b"\n{\"messages\": \"\xFF\"}\n",
                ok.as_bytes(),
            ],
        );
        let e = load_sft_file(&p3, false).unwrap_err().to_string();
        assert!(
            e.ends_with("badutf8.jsonl:2: not valid UTF-8 (byte 15 of the line)"),
            "{e}"
        );
        let d = load_sft_file(&p3, true).unwrap();
        assert_eq!((d.conversations.len(), d.skipped.len()), (2, 1));
        assert_eq!(d.lines, vec![Some(1), Some(3)]);
        let p4 = write("badutf8.json", &[b"[\n{\"instruction\":\"\xC3\"}]"]);
        let e = load_sft_file(&p4, false).unwrap_err().to_string();
        assert!(
            e.ends_with("badutf8.json:2: not valid UTF-8 (byte 17 of the line)"),
            "{e}"
        );
        for p in [p1, p2, p3, p4] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn an_unencodable_message_names_the_file_line_and_the_place_in_its_text() {
        let p = tmp_file(
            "enc.jsonl",
            r#"{"messages":[{"role":"user","content":"hi\nab{"},{"role":"assistant","content":"hi"}]}"#,
        );
        let tok = Tokenizer::train_char("hi\nab").unwrap();
        let mut d = load_sft_file(&p, false).unwrap();
        let e = d.check_encodable(&p, &tok, false).unwrap_err().to_string();
        assert!(
            e.ends_with(
                "enc.jsonl:1: in the text of a user message: character '{' (U+007B) at position 5 \
                 (in the text being encoded: line 2, column 3) is not in the tokenizer's vocabulary"
            ),
            "{e}"
        );
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn long_conversations_are_cut_from_the_left_or_dropped() {
        let mut tok = Tokenizer::train_char("abcdefgh").unwrap();
        let t = ChatTemplate::add_tokens(&mut tok).unwrap();
        let conv = vec![
            Message::user("abcdefgh"),
            Message::assistant("abc"),
            Message::user("d"),
            Message::assistant("ef"),
        ];
        // Rendered: 10 + 5 + 3 + 4 = 22 tokens; the last reply is <|assistant|> e f <|end|>.
        let (ds, stats) = SftDataset::new(std::slice::from_ref(&conv), &tok, &t, 21).unwrap();
        assert_eq!(
            stats,
            FitStats {
                kept: 1,
                truncated: 0,
                dropped: 0
            }
        );
        let (ds2, stats) = SftDataset::new(std::slice::from_ref(&conv), &tok, &t, 9).unwrap();
        assert_eq!(
            stats,
            FitStats {
                kept: 0,
                truncated: 1,
                dropped: 0
            }
        );
        assert_eq!(ds2.examples()[0].ids.len(), 10);
        assert_eq!(&ds2.examples()[0].ids[6..], &ds.examples()[0].ids[18..]);
        let (_, stats) = SftDataset::new(&[conv], &tok, &t, 2).unwrap();
        assert_eq!(
            stats,
            FitStats {
                kept: 0,
                truncated: 0,
                dropped: 1
            }
        );
    }

    #[test]
    fn loss_ignores_labels_at_masked_positions() {
        // The loss and its gradients depend only on the masked-in targets.
        let mut tok = Tokenizer::train_char("abcdefgh").unwrap();
        let t = ChatTemplate::add_tokens(&mut tok).unwrap();
        let cfg = crate::GptConfig {
            vocab_size: tok.vocab_size(),
            block_size: 16,
            n_layer: 1,
            n_head: 2,
            n_embd: 8,
            dropout: 0.0,
            bias: true,
            ..Default::default()
        };
        let model = Gpt::init(&cfg, 0, &Device::Cpu).unwrap();
        let conv = vec![Message::user("abc"), Message::assistant("de")];
        let (ds, _) = SftDataset::new(&[conv], &tok, &t, 16).unwrap();
        let (x, y, m) = ds.batch(&[0], tok.eot_id(), &Device::Cpu).unwrap();
        let loss_and_grads = |y: &Tensor| {
            let logits = model.forward(&x).unwrap();
            let (b, tt, v) = logits.dims3().unwrap();
            let loss = cross_entropy(
                &logits.reshape((b * tt, v)).unwrap(),
                &y.flatten_all().unwrap(),
                Some(&m.flatten_all().unwrap()),
            )
            .unwrap();
            let grads = loss.backward().unwrap();
            let g: Vec<Vec<f32>> = model
                .vars()
                .unwrap()
                .iter()
                .map(|(_, v)| {
                    grads
                        .get(v.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect();
            (loss.to_scalar::<f32>().unwrap(), g)
        };
        let (l1, g1) = loss_and_grads(&y);
        // Change every label where the mask is 0.
        let mask = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y2: Vec<u32> = y
            .flatten_all()
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
            .iter()
            .zip(&mask)
            .map(|(&id, &k)| {
                if k == 0.0 {
                    (id + 3) % tok.vocab_size() as u32
                } else {
                    id
                }
            })
            .collect();
        assert!(mask.contains(&0.0) && mask.contains(&1.0));
        let (l2, g2) = loss_and_grads(&Tensor::from_vec(y2, y.shape(), &Device::Cpu).unwrap());
        assert_eq!(l1, l2);
        assert_eq!(g1, g2);
    }
}
