//! Preference data: a conversation, two replies to it, and which one people preferred.
//!
//! Files are JSONL, one pair per line, in the format of `data/pref_*.jsonl` (the files the examples fetch):
//!
//! ```text
//! {"prompt": "…", "history": [{"role": "user", "content": "…"}, …], "chosen": "…", "rejected": "…"}
//! ```
//!
//! `prompt` is the last user message, `history` the earlier turns (oldest first; a `system`
//! message may only come first; the field may be omitted when empty), `chosen` and
//! `rejected` the two candidate assistant replies, the preferred one first.
//!
//! A pair becomes a [`PreferenceExample`]: the prompt ids (`history + prompt` rendered with
//! [`ChatTemplate::render_prompt`], so they end with an open `<|assistant|>`) and each reply's
//! ids followed by `<|end|>`. Batches of `prompt + response` sequences are
//! [`SequenceBatch`]es, whose response mask marks exactly the positions whose *target* is a
//! response token.

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::chat::{ChatTemplate, Message, Role};
use crate::sft::FitStats;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Reading files
// ---------------------------------------------------------------------------------------------

/// One preference record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreferencePair {
    /// The last user message.
    pub prompt: String,
    /// Earlier turns, oldest first (a system message only first).
    #[serde(default)]
    pub history: Vec<Message>,
    /// The preferred assistant reply.
    pub chosen: String,
    /// The other reply.
    pub rejected: String,
}

impl PreferencePair {
    /// The conversation both replies answer: `history`, then `prompt` as a user turn.
    pub fn messages(&self) -> Vec<Message> {
        let mut m = self.history.clone();
        m.push(Message::user(self.prompt.clone()));
        m
    }

    /// Checks the history's roles; the error says what is wrong.
    fn check(&self) -> std::result::Result<(), String> {
        check_history(&self.history)
    }
}

/// A system message may only open a conversation.
fn check_history(messages: &[Message]) -> std::result::Result<(), String> {
    match messages.iter().skip(1).position(|m| m.role == Role::System) {
        Some(i) => Err(format!(
            "history message {} is a system message; only the first may be",
            i + 2
        )),
        None => Ok(()),
    }
}

/// What reading a preference file found.
#[derive(Debug, Default)]
pub struct PreferenceData {
    /// The pairs, in file order.
    pub pairs: Vec<PreferencePair>,
    /// Malformed records skipped (only with `skip_bad_lines`), with their errors.
    pub skipped: Vec<Error>,
}

/// Reads a preference JSONL file (see the module docs). Blank lines and a leading byte-order
/// mark are ignored.
///
/// A malformed record (a line that is not UTF-8, bad JSON, a missing or unknown field, an
/// unknown role, a system message after the first) is an error naming the file and the 1-based line; with
/// `skip_bad_lines` it is skipped and recorded in [`PreferenceData::skipped`] instead.
///
/// # Errors
/// [`Error::Io`] if the file cannot be read; [`Error::BadFile`] with the line for a malformed
/// record, or without one if the file holds no pair.
pub fn load_preference_file(
    path: impl AsRef<Path>,
    skip_bad_lines: bool,
) -> Result<PreferenceData> {
    let path = path.as_ref();
    let mut data = PreferenceData::default();
    for line in crate::data::read_lines(path)? {
        if line.is_blank() {
            continue;
        }
        let parsed = line.text.and_then(|t| {
            serde_json::from_str::<PreferencePair>(&t)
                .map_err(|e| crate::error::json_message(&e))
                .and_then(|p| p.check().map(|()| p))
        });
        match parsed {
            Ok(p) => data.pairs.push(p),
            Err(msg) if skip_bad_lines => {
                data.skipped
                    .push(Error::bad_file(path, Some(line.number), msg))
            }
            Err(msg) => return Err(Error::bad_file(path, Some(line.number), msg)),
        }
    }
    if data.pairs.is_empty() {
        return Err(Error::bad_file(
            path,
            None,
            "no preference pair in the file",
        ));
    }
    Ok(data)
}

/// Reads prompts for PPO from a JSONL file of preference records (a prompt is `history` +
/// `prompt`) or of SFT records `{"messages": […]}` (a prompt is every message before the
/// last assistant turn, or all of them when the last message is a user's). Blank lines and a
/// leading byte-order mark are ignored.
///
/// # Errors
/// [`Error::Io`] if the file cannot be read; [`Error::BadFile`] with the 1-based line for a
/// line that is not UTF-8, a record that is neither, has an unknown role or misplaced system message, or leaves an empty
/// prompt; without a line if the file holds no prompt.
pub fn load_prompts(path: impl AsRef<Path>) -> Result<Vec<Vec<Message>>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Conversation {
        messages: Vec<Message>,
    }
    let path = path.as_ref();
    let mut prompts = Vec::new();
    for line in crate::data::read_lines(path)? {
        if line.is_blank() {
            continue;
        }
        let bad = |msg: String| Error::bad_file(path, Some(line.number), msg);
        let text = line.text.clone().map_err(bad)?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(crate::error::json_message(&e)))?;
        let messages = if value.get("messages").is_some() {
            let c: Conversation =
                serde_json::from_value(value).map_err(|e| bad(crate::error::json_message(&e)))?;
            let mut m = c.messages;
            if let Some(last) = m.iter().rposition(|m| m.role == Role::Assistant) {
                if m[last..].iter().all(|m| m.role == Role::Assistant) {
                    m.truncate(last);
                }
            }
            m
        } else if value.get("prompt").is_some() {
            let p: PreferencePair =
                serde_json::from_value(value).map_err(|e| bad(crate::error::json_message(&e)))?;
            p.messages()
        } else {
            return Err(bad(
                "expected a preference record (`prompt`, …) or an SFT record (`messages`)".into(),
            ));
        };
        check_history(&messages).map_err(bad)?;
        if messages.is_empty() {
            return Err(bad("the prompt is empty".into()));
        }
        prompts.push(messages);
    }
    if prompts.is_empty() {
        return Err(Error::bad_file(path, None, "no prompt in the file"));
    }
    Ok(prompts)
}

// ---------------------------------------------------------------------------------------------
// Rendering and fitting to the context
// ---------------------------------------------------------------------------------------------

/// A preference pair as token ids.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PreferenceExample {
    /// The conversation rendered as a prompt, ending with `<|assistant|>`.
    pub prompt: Vec<u32>,
    /// The preferred reply's tokens and `<|end|>` (possibly cut, see [`PreferenceDataset::new`]).
    pub chosen: Vec<u32>,
    /// The other reply's tokens and `<|end|>`.
    pub rejected: Vec<u32>,
}

/// A reply's response tokens: its content, then `<|end|>`.
///
/// # Errors
/// Tokenizer errors (e.g. a character a char tokenizer does not know).
pub fn render_reply(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    reply: &str,
) -> Result<Vec<u32>> {
    let mut ids = tokenizer.encode_text(reply)?; // a reply is text, never control tokens
    ids.push(template.end_id());
    Ok(ids)
}

/// Rendered preference pairs, each fitted to the model's context.
#[derive(Debug, Clone, Default)]
pub struct PreferenceDataset {
    examples: Vec<PreferenceExample>,
}

impl PreferenceDataset {
    /// Renders `pairs` and fits each so that `prompt + response` has at most `block_size`
    /// tokens for both replies: each reply is cut to its first `max_response_tokens` tokens
    /// (losing its `<|end|>` if cut), then the prompt is cut from the left to fit beside the
    /// longer reply (as TRL's `DPOTrainer` truncates). A pair is dropped when not even one
    /// prompt token fits. The counts come back as [`FitStats`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `max_response_tokens` is 0; tokenizer errors.
    pub fn new(
        pairs: &[PreferencePair],
        tokenizer: &Tokenizer,
        template: &ChatTemplate,
        block_size: usize,
        max_response_tokens: usize,
    ) -> Result<(Self, FitStats)> {
        if max_response_tokens == 0 {
            return Err(Error::InvalidArgument(
                "max_response_tokens must be at least 1".into(),
            ));
        }
        let mut stats = FitStats::default();
        let mut examples = Vec::with_capacity(pairs.len());
        for pair in pairs {
            let mut prompt = template.render_prompt(tokenizer, &pair.messages())?;
            let mut chosen = render_reply(tokenizer, template, &pair.chosen)?;
            let mut rejected = render_reply(tokenizer, template, &pair.rejected)?;
            let mut cut = false;
            for reply in [&mut chosen, &mut rejected] {
                if reply.len() > max_response_tokens {
                    reply.truncate(max_response_tokens);
                    cut = true;
                }
            }
            let response = chosen.len().max(rejected.len());
            let room = block_size.saturating_sub(response);
            if room == 0 {
                stats.dropped += 1;
                continue;
            }
            if prompt.len() > room {
                prompt.drain(..prompt.len() - room);
                cut = true;
            }
            if cut {
                stats.truncated += 1;
            } else {
                stats.kept += 1;
            }
            examples.push(PreferenceExample {
                prompt,
                chosen,
                rejected,
            });
        }
        Ok((Self { examples }, stats))
    }

    /// A dataset of already rendered examples.
    pub fn from_examples(examples: Vec<PreferenceExample>) -> Self {
        Self { examples }
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The rendered pairs.
    pub fn examples(&self) -> &[PreferenceExample] {
        &self.examples
    }

    /// `n` pair indices drawn at random (with replacement), and the tokens of their `2n`
    /// sequences (each pair's prompt counted twice, once before either reply).
    pub(crate) fn sample(&self, n: usize, rng: &mut ChaCha8Rng) -> (Vec<usize>, usize) {
        let indices: Vec<usize> = (0..n).map(|_| rng.random_range(0..self.len())).collect();
        let tokens = indices
            .iter()
            .map(|&i| {
                let ex = &self.examples[i];
                2 * ex.prompt.len() + ex.chosen.len() + ex.rejected.len()
            })
            .sum();
        (indices, tokens)
    }

    /// Splits off the last `fraction` of the pairs (after a seeded shuffle) as a held-out set:
    /// `(train, val)`.
    pub fn split(mut self, fraction: f64, seed: u64) -> (Self, Self) {
        let val = crate::data::split_off_shuffled(&mut self.examples, fraction, seed);
        (self, Self { examples: val })
    }

    /// The pairs at `indices` as one batch of `2B` sequences: rows `0..B` are
    /// `prompt + chosen`, rows `B..2B` are `prompt + rejected`, in the order of `indices`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an index out of range or an empty `indices`.
    pub fn batch(&self, indices: &[usize], pad_id: u32, device: &Device) -> Result<SequenceBatch> {
        let mut rows = Vec::with_capacity(2 * indices.len());
        for side in 0..2 {
            for &i in indices {
                let ex = self.examples.get(i).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "pair index {i} is out of range for {} pairs",
                        self.examples.len()
                    ))
                })?;
                let reply = if side == 0 { &ex.chosen } else { &ex.rejected };
                rows.push((ex.prompt.as_slice(), reply.as_slice()));
            }
        }
        SequenceBatch::new(&rows, pad_id, device)
    }
}

// ---------------------------------------------------------------------------------------------
// Batches of prompt + response sequences
// ---------------------------------------------------------------------------------------------

/// A right-padded batch of `prompt + response` sequences, with what every stage of RLHF reads
/// from it.
///
/// With `T` the longest sequence, row `b` of length `n_b = p_b + r_b` (prompt and response
/// tokens) holds its ids in `ids[b, ..n_b]` and `pad_id` after. Position `t` of the model's
/// output predicts `ids[b, t + 1]`, so:
/// - `targets[b, t] = ids[b, t + 1]` (padding where there is none);
/// - `response_mask[b, t] = 1` exactly when `p_b <= t + 1 < n_b`: the target is a response
///   token (never a prompt token or padding);
/// - `last[b] = n_b − 1`, the last real token, where the reward model reads its score.
///
/// Right padding never changes a real position's output: attention is causal.
#[derive(Debug, Clone)]
pub struct SequenceBatch {
    /// `(B, T)` u32 token ids, right-padded.
    pub ids: Tensor,
    /// `(B, T − 1)` u32: `ids` shifted left by one.
    pub targets: Tensor,
    /// `(B, T − 1)` f32: 1 where the target is a response token, 0 elsewhere.
    pub response_mask: Tensor,
    /// `(B,)` u32: index of each row's last real token.
    pub last: Tensor,
    /// Prompt length of each row, in tokens.
    pub prompt_lens: Vec<usize>,
    /// Total length (prompt + response) of each row, in tokens.
    pub lens: Vec<usize>,
}

impl SequenceBatch {
    /// Builds the batch from `(prompt, response)` pairs of ids.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `rows` is empty or a row has an empty prompt or response.
    pub fn new(rows: &[(&[u32], &[u32])], pad_id: u32, device: &Device) -> Result<Self> {
        if rows.is_empty() {
            return Err(Error::InvalidArgument(
                "a batch needs at least one sequence".into(),
            ));
        }
        if let Some(i) = rows.iter().position(|(p, r)| p.is_empty() || r.is_empty()) {
            return Err(Error::InvalidArgument(format!(
                "sequence {i} has an empty prompt or response ({} and {} tokens)",
                rows[i].0.len(),
                rows[i].1.len()
            )));
        }
        let b = rows.len();
        let t = rows
            .iter()
            .map(|(p, r)| p.len() + r.len())
            .max()
            .unwrap_or(2);
        let mut ids = vec![pad_id; b * t];
        let mut targets = vec![pad_id; b * (t - 1)];
        let mut mask = vec![0f32; b * (t - 1)];
        let mut last = Vec::with_capacity(b);
        let (mut prompt_lens, mut lens) = (Vec::with_capacity(b), Vec::with_capacity(b));
        for (row, (p, r)) in rows.iter().enumerate() {
            let n = p.len() + r.len();
            let seq = &mut ids[row * t..row * t + n];
            seq[..p.len()].copy_from_slice(p);
            seq[p.len()..].copy_from_slice(r);
            targets[row * (t - 1)..row * (t - 1) + n - 1]
                .copy_from_slice(&ids[row * t + 1..row * t + n]);
            for k in p.len() - 1..n - 1 {
                mask[row * (t - 1) + k] = 1.0;
            }
            last.push((n - 1) as u32);
            prompt_lens.push(p.len());
            lens.push(n);
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            targets: Tensor::from_vec(targets, (b, t - 1), device)?,
            response_mask: Tensor::from_vec(mask, (b, t - 1), device)?,
            last: Tensor::from_vec(last, b, device)?,
            prompt_lens,
            lens,
        })
    }

    /// Number of sequences, `B`.
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    /// Whether the batch is empty (never, for a batch built by [`SequenceBatch::new`]).
    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Total number of response tokens (the ones [`SequenceBatch::response_mask`] marks).
    pub fn response_tokens(&self) -> usize {
        self.lens
            .iter()
            .zip(&self.prompt_lens)
            .map(|(n, p)| n - p)
            .sum()
    }

    /// Total number of real (non-padding) tokens.
    pub fn tokens(&self) -> usize {
        self.lens.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_file(name: &str, text: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("tinygpt-pref-{}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_pairs_and_names_bad_lines() {
        let p = tmp_file(
            "a.jsonl",
            concat!(
                r#"{"prompt":"hi","history":[],"chosen":"hello","rejected":"go away"}"#,
                "\n\n",
                r#"{"prompt":"and?","history":[{"role":"system","content":"s"},{"role":"user","content":"u"},{"role":"assistant","content":"a"}],"chosen":"x","rejected":"y"}"#,
                "\n",
                r#"{"prompt":"hi","chosen":"hello"}"#,
                "\n",
                r#"{"prompt":"hi","history":[{"role":"user","content":"u"},{"role":"system","content":"s"}],"chosen":"a","rejected":"b"}"#,
                "\n",
                r#"{"prompt":"hi","chosen":"a","rejected":"b","score":1}"#,
                "\n",
            ),
        );
        let e = load_preference_file(&p, false).unwrap_err().to_string();
        assert!(e.contains(":4: missing field `rejected`"), "{e}");
        let d = load_preference_file(&p, true).unwrap();
        assert_eq!(d.pairs.len(), 2);
        assert_eq!(d.skipped.len(), 3);
        let msgs: Vec<String> = d.skipped.iter().map(|e| e.to_string()).collect();
        assert!(
            msgs[1].contains(":5: history message 2 is a system message"),
            "{msgs:?}"
        );
        assert!(msgs[2].contains(":6: unknown field `score`"), "{msgs:?}");
        assert_eq!(
            d.pairs[1].messages(),
            vec![
                Message::system("s"),
                Message::user("u"),
                Message::assistant("a"),
                Message::user("and?")
            ]
        );
        let empty = tmp_file("b.jsonl", "\n\n");
        let e = load_preference_file(&empty, false).unwrap_err().to_string();
        assert!(e.ends_with("no preference pair in the file"), "{e}");
        for f in [p, empty] {
            std::fs::remove_file(f).unwrap();
        }
    }

    #[test]
    fn preference_and_prompt_files_skip_a_bom_and_name_a_line_that_is_not_utf8() {
        let pair = r#"{"prompt":"hi","chosen":"a","rejected":"b"}"#;
        let write = |name: &str, parts: &[&[u8]]| {
            let p =
                std::env::temp_dir().join(format!("tinygpt-pref-{}-{name}", std::process::id()));
            std::fs::write(&p, parts.concat()).unwrap();
            p
        };
        let bom = write("bom.jsonl", &[b"\xEF\xBB\xBF", pair.as_bytes(), b"\n"]);
        assert_eq!(load_preference_file(&bom, false).unwrap().pairs.len(), 1);
        assert_eq!(load_prompts(&bom).unwrap().len(), 1);
        let bad = write(
            "bad.jsonl",
            &[
                pair.as_bytes(),
                b"\n\n{\"prompt\":\"\xE9\"}\n",
                pair.as_bytes(),
            ],
        );
        let e = load_preference_file(&bad, false).unwrap_err().to_string();
        assert!(
            e.ends_with("bad.jsonl:3: not valid UTF-8 (byte 12 of the line)"),
            "{e}"
        );
        let d = load_preference_file(&bad, true).unwrap();
        assert_eq!((d.pairs.len(), d.skipped.len()), (2, 1));
        let e = load_prompts(&bad).unwrap_err().to_string();
        assert!(
            e.ends_with("bad.jsonl:3: not valid UTF-8 (byte 12 of the line)"),
            "{e}"
        );
        for f in [bom, bad] {
            std::fs::remove_file(f).unwrap();
        }
    }

    #[test]
    fn prompts_come_from_either_format() {
        let p = tmp_file(
            "p.jsonl",
            concat!(
                r#"{"prompt":"hi","history":[],"chosen":"a","rejected":"b"}"#,
                "\n",
                r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#,
                "\n",
                r#"{"messages":[{"role":"user","content":"only"}]}"#,
                "\n",
            ),
        );
        let prompts = load_prompts(&p).unwrap();
        assert_eq!(
            prompts,
            vec![
                vec![Message::user("hi")],
                vec![Message::user("q")],
                vec![Message::user("only")]
            ]
        );
        let bad = tmp_file("q.jsonl", "{\"messages\":[]}\n{\"text\":\"x\"}\n");
        let e = load_prompts(&bad).unwrap_err().to_string();
        assert!(e.contains(":1: the prompt is empty"), "{e}");
        let bad2 = tmp_file("r.jsonl", "{\"text\":\"x\"}\n");
        let e = load_prompts(&bad2).unwrap_err().to_string();
        assert!(e.contains(":1: expected a preference record"), "{e}");
        for f in [p, bad, bad2] {
            std::fs::remove_file(f).unwrap();
        }
    }

    #[test]
    fn batch_masks_exactly_the_response_targets() {
        let prompt_a = [1u32, 2, 3];
        let resp_a = [4u32, 5];
        let prompt_b = [6u32];
        let resp_b = [7u32];
        let b = SequenceBatch::new(
            &[(&prompt_a, &resp_a), (&prompt_b, &resp_b)],
            0,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            b.ids.to_vec2::<u32>().unwrap(),
            vec![vec![1, 2, 3, 4, 5], vec![6, 7, 0, 0, 0]]
        );
        assert_eq!(
            b.targets.to_vec2::<u32>().unwrap(),
            vec![vec![2, 3, 4, 5], vec![7, 0, 0, 0]]
        );
        // Targets 4 and 5 (positions 2, 3) in row 0; target 7 (position 0) in row 1.
        assert_eq!(
            b.response_mask.to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 0.0, 1.0, 1.0], vec![1.0, 0.0, 0.0, 0.0]]
        );
        assert_eq!(b.last.to_vec1::<u32>().unwrap(), vec![4, 1]);
        assert_eq!(b.response_tokens(), 3);
        assert_eq!(b.tokens(), 7);
        let e = SequenceBatch::new(&[(&prompt_a, &[])], 0, &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("empty prompt or response"), "{e}");
    }

    #[test]
    fn pairs_are_fitted_to_the_context() {
        let mut tok = Tokenizer::train_char("abcdefgh").unwrap();
        let t = ChatTemplate::add_tokens(&mut tok).unwrap();
        let pair = PreferencePair {
            prompt: "abcdef".into(),
            history: vec![],
            chosen: "ab".into(),
            rejected: "abcde".into(),
        };
        // prompt: <|user|> a..f <|end|> <|assistant|> = 9; chosen 3, rejected 6 tokens.
        let (ds, stats) =
            PreferenceDataset::new(std::slice::from_ref(&pair), &tok, &t, 15, 8).unwrap();
        assert_eq!((stats.kept, stats.truncated, stats.dropped), (1, 0, 0));
        assert_eq!(ds.examples()[0].prompt.len(), 9);
        assert_eq!(ds.examples()[0].rejected.len(), 6);
        assert_eq!(*ds.examples()[0].chosen.last().unwrap(), t.end_id());
        // Replies cut to 4 tokens, the prompt cut from the left to 12 - 4 = 8.
        let (ds, stats) =
            PreferenceDataset::new(std::slice::from_ref(&pair), &tok, &t, 12, 4).unwrap();
        assert_eq!((stats.kept, stats.truncated, stats.dropped), (0, 1, 0));
        let ex = &ds.examples()[0];
        assert_eq!(ex.rejected, tok.encode("abcd").unwrap());
        assert_eq!(ex.prompt.len(), 8);
        assert_eq!(*ex.prompt.last().unwrap(), t.role_id(Role::Assistant));
        let (_, stats) = PreferenceDataset::new(&[pair], &tok, &t, 4, 4).unwrap();
        assert_eq!(stats.dropped, 1);
        // The batch puts chosen rows first.
        let batch = ds.batch(&[0], tok.eot_id(), &Device::Cpu).unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.lens, vec![8 + 3, 8 + 4]);
    }
}
