//! Report cards: what a training run did, in markdown a person reads.
//!
//! nanochat ends every stage by appending its section to one `report.md`: the settings, the
//! model's size, the compute spent, the evaluations and a few samples, so that a run can be
//! judged (and compared with the next one) without reading logs. This module is that report
//! as plain data → markdown, with no dependency beyond the crate's own:
//!
//! - [`Section`]: a `##` heading and blocks (paragraphs, tables, images, code), built with
//!   chained calls and rendered by [`Section::to_markdown`]; [`Section::append_to`] adds it to
//!   a report file atomically (the whole file is rewritten through a temporary sibling, so a
//!   crash leaves the old report or the new one, never half a section).
//! - [`RunCard`]: the facts of one training run ([`TrainConfig`], [`GptConfig`],
//!   [`TrainSummary`], the evaluations of its `metrics.jsonl`, plots and samples) as a
//!   [`Section`], the one every training example appends to `OUT/report.md`.
//! - [`Report`]: a whole document, `#` title and sections, for the whole story (`chatgpt`):
//!   an [`Environment`] header (machine, crate version, git commit, rustc, date) and a
//!   [`Scorecard`], the evaluations by stage (metric rows × stage columns).
//! - [`flops_per_token`]: the compute of one training token, nanoGPT's `estimate_mfu` (the
//!   PaLM paper's appendix B): `6N` for the matrix products of the forward and backward
//!   passes plus `12·L·H·hs·T` (`12·L·C·T` when `H·hs = C`) for attention's scores and
//!   weighted sums.
//!
//! The report's images and the report itself live beside a checkpoint's files; a new
//! checkpoint of the same run carries them over ([`crate::checkpoint::files::is_report_file`]).
//!
//! ```
//! use tinygpt::report::Section;
//! let md = Section::new("Pre-training")
//!     .facts([("parameters", "0.80M")])
//!     .image("loss", "loss.png")
//!     .to_markdown();
//! assert!(md.starts_with("## Pre-training\n\n| what | value |"));
//! assert!(md.ends_with("![loss](loss.png)\n"));
//! ```

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::model::{Arch, GptConfig};
use crate::train::{TrainConfig, TrainSummary};
use crate::{Error, Result};

/// The report's file name in an output directory.
pub const REPORT_FILE: &str = crate::checkpoint::files::REPORT;

/// At most this many evaluation rows go into a [`RunCard`]'s table (the first, the last and
/// evenly spaced ones between); `metrics.jsonl` keeps them all.
pub const MAX_EVAL_ROWS: usize = 12;

/// The fields the trainer adds to every evaluation row (the objective's come besides).
const TRAINER_FIELDS: [&str; 3] = ["lr", "tokens_per_sec", "elapsed_s"];

/// One block of a [`Section`].
#[derive(Debug, Clone, PartialEq)]
enum Block {
    Heading(String),
    Paragraph(String),
    Table {
        header: Vec<String>,
        rows: Vec<Vec<String>>,
    },
    Image {
        alt: String,
        path: String,
    },
    Code(String),
}

/// A report section: a `##` heading and its blocks, in the order they were added.
///
/// Table cells are escaped (`|` → `\|`, line breaks → spaces); code blocks take a fence
/// longer than any run of backticks in their text, so model output cannot break the page.
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    title: String,
    blocks: Vec<Block>,
}

impl Section {
    /// An empty section titled `title`.
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            blocks: Vec::new(),
        }
    }

    /// A `###` sub-heading.
    pub fn heading(mut self, text: impl Into<String>) -> Self {
        self.blocks.push(Block::Heading(text.into()));
        self
    }

    /// A paragraph of markdown, as given.
    pub fn paragraph(mut self, text: impl Into<String>) -> Self {
        self.blocks.push(Block::Paragraph(text.into()));
        self
    }

    /// A two-column table, `what | value`, one row a fact. Nothing is added for no facts.
    pub fn facts<K: Into<String>, V: Into<String>>(
        self,
        facts: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let rows: Vec<Vec<String>> = facts
            .into_iter()
            .map(|(k, v)| vec![k.into(), v.into()])
            .collect();
        if rows.is_empty() {
            return self;
        }
        self.table(["what", "value"], rows)
    }

    /// A table: `header` and rows of cells (a short row is padded with empty cells).
    pub fn table<H: Into<String>>(
        mut self,
        header: impl IntoIterator<Item = H>,
        rows: Vec<Vec<String>>,
    ) -> Self {
        self.blocks.push(Block::Table {
            header: header.into_iter().map(Into::into).collect(),
            rows,
        });
        self
    }

    /// The fields of `value` (a struct that serializes to a JSON object, e.g. a
    /// [`TrainConfig`] or a [`GptConfig`]) as a compact table, `per_row` name/value pairs a
    /// row, in the struct's order. Numbers are written as serde writes them (`0.001`, `1e-8`),
    /// `null` as `—`, nested values as compact JSON.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `value` does not serialize to a JSON object.
    pub fn settings(self, value: &impl Serialize, per_row: usize) -> Result<Self> {
        // Through the text, not `serde_json::Value`: its map sorts the keys, and an f32 would
        // show its f64 digits (0.20000000298023224).
        let bad =
            |e: serde_json::Error| Error::InvalidArgument(format!("settings for a report: {e}"));
        let text = serde_json::to_string(value).map_err(bad)?;
        let Ordered(map) = serde_json::from_str(&text).map_err(bad)?;
        let per_row = per_row.max(1);
        let pairs: Vec<(String, String)> =
            map.iter().map(|(k, v)| (k.clone(), json_cell(v))).collect();
        let header: Vec<&str> = (0..per_row).flat_map(|_| ["setting", "value"]).collect();
        let rows = pairs
            .chunks(per_row)
            .map(|chunk| {
                chunk
                    .iter()
                    .flat_map(|(k, v)| [format!("`{k}`"), v.clone()])
                    .collect()
            })
            .collect();
        Ok(self.table(header, rows))
    }

    /// An image, `![alt](path)`; `path` relative to the report file.
    pub fn image(mut self, alt: impl Into<String>, path: impl Into<String>) -> Self {
        self.blocks.push(Block::Image {
            alt: alt.into(),
            path: path.into(),
        });
        self
    }

    /// A fenced block of plain text (samples, prompts), shown verbatim.
    pub fn code(mut self, text: impl Into<String>) -> Self {
        self.blocks.push(Block::Code(text.into()));
        self
    }

    /// The section's title.
    pub fn title(&self) -> &str {
        &self.title
    }

    /// The section as markdown: `## title`, then each block, a blank line between them,
    /// ending in one newline.
    pub fn to_markdown(&self) -> String {
        let mut parts = vec![format!("## {}", self.title.trim())];
        parts.extend(self.blocks.iter().map(block_markdown));
        let mut md = parts.join("\n\n");
        md.push('\n');
        md
    }

    /// Appends the section to the report at `path` (created if missing), a blank line after
    /// what is there. The file is replaced whole through a temporary sibling and fsynced, so a
    /// crash leaves the old report or the new one.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file.
    pub fn append_to(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut text = match std::fs::read(path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(path, e)),
        };
        separate(&mut text);
        text.push_str(&self.to_markdown());
        write_atomic(path, text.as_bytes())
    }
}

/// A JSON object's fields in the order of the text.
struct Ordered(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Ordered {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Ordered, A::Error> {
                let mut fields = Vec::new();
                while let Some(field) = map.next_entry::<String, serde_json::Value>()? {
                    fields.push(field);
                }
                Ok(Ordered(fields))
            }
        }
        d.deserialize_map(Fields)
    }
}

/// Ends `text` with a blank line unless it is empty.
fn separate(text: &mut String) {
    if text.is_empty() {
        return;
    }
    while !text.ends_with("\n\n") {
        text.push('\n');
    }
}

fn block_markdown(block: &Block) -> String {
    match block {
        Block::Heading(t) => format!("### {}", t.trim()),
        Block::Paragraph(t) => t.trim().to_string(),
        Block::Table { header, rows } => {
            let width = rows
                .iter()
                .map(Vec::len)
                .chain([header.len()])
                .max()
                .unwrap_or(0);
            let line = |cells: &[String]| {
                let mut s = String::from("|");
                for i in 0..width {
                    let cell = cells.get(i).map(|c| escape_cell(c)).unwrap_or_default();
                    s.push(' ');
                    s.push_str(&cell);
                    s.push_str(" |");
                }
                s
            };
            let mut lines = vec![line(header), format!("|{}", " --- |".repeat(width))];
            lines.extend(rows.iter().map(|r| line(r)));
            lines.join("\n")
        }
        Block::Image { alt, path } => {
            let alt = alt.replace('[', "\\[").replace(']', "\\]");
            if path.contains([' ', '(', ')']) {
                format!("![{alt}](<{path}>)")
            } else {
                format!("![{alt}]({path})")
            }
        }
        Block::Code(text) => {
            let longest = longest_run(text, '`');
            let fence = "`".repeat(longest.max(2) + 1);
            format!("{fence}text\n{}\n{fence}", text.trim_end_matches('\n'))
        }
    }
}

/// The longest run of `c` in `text`.
fn longest_run(text: &str, c: char) -> usize {
    let (mut best, mut now) = (0, 0);
    for ch in text.chars() {
        now = if ch == c { now + 1 } else { 0 };
        best = best.max(now);
    }
    best
}

/// A table cell: `|` escaped, line breaks as spaces.
fn escape_cell(text: &str) -> String {
    text.trim()
        .replace('|', "\\|")
        .replace("\r\n", " ")
        .replace(['\n', '\r'], " ")
}

/// A JSON value as a settings cell.
fn json_cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "—".into(),
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// Writes `bytes` to `path` atomically (a temporary sibling, fsync, rename), as the report
/// is written: for the images that go with it.
///
/// # Errors
/// [`Error::Io`] naming the file.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    crate::durable::write_atomic(path.as_ref(), bytes)
}

/// A whole report: a `#` title and sections (for the whole story, `chatgpt`'s
/// `OUT/report.md`).
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    title: String,
    sections: Vec<Section>,
}

impl Report {
    /// An empty report titled `title`.
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            sections: Vec::new(),
        }
    }

    /// Adds a section at the end.
    pub fn section(mut self, section: Section) -> Self {
        self.sections.push(section);
        self
    }

    /// The sections so far.
    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    /// The report as markdown: `# title`, then each section, a blank line between them.
    pub fn to_markdown(&self) -> String {
        let mut md = format!("# {}\n", self.title.trim());
        for s in &self.sections {
            md.push('\n');
            md.push_str(&s.to_markdown());
        }
        md
    }

    /// Writes the report to `path`, replacing what is there, atomically.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file.
    pub fn write_to(&self, path: impl AsRef<Path>) -> Result<()> {
        write_atomic(path, self.to_markdown().as_bytes())
    }
}

/// Evaluations by stage: metric rows × stage columns (`base`, `SFT`, `RLHF`, …); a metric a
/// stage did not measure is shown as `—`.
///
/// ```
/// use tinygpt::report::Scorecard;
/// let mut card = Scorecard::new(["base", "SFT", "RLHF"]);
/// card.set("held-out assistant loss", "base", "3.10");
/// card.set("held-out assistant loss", "SFT", "1.20");
/// let md = card.section("Summary").to_markdown();
/// assert!(md.contains("| held-out assistant loss | 3.10 | 1.20 | — |"));
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scorecard {
    stages: Vec<String>,
    rows: Vec<(String, Vec<Option<String>>)>,
}

impl Scorecard {
    /// A scorecard with these stage columns, in order.
    pub fn new<S: Into<String>>(stages: impl IntoIterator<Item = S>) -> Self {
        Self {
            stages: stages.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Sets `metric` of `stage` (a new metric becomes the last row; a stage not given to
    /// [`Scorecard::new`] becomes the last column).
    pub fn set(&mut self, metric: &str, stage: &str, value: impl Into<String>) -> &mut Self {
        let col = match self.stages.iter().position(|s| s == stage) {
            Some(i) => i,
            None => {
                self.stages.push(stage.to_string());
                self.stages.len() - 1
            }
        };
        let row = match self.rows.iter().position(|(m, _)| m == metric) {
            Some(i) => i,
            None => {
                self.rows.push((metric.to_string(), Vec::new()));
                self.rows.len() - 1
            }
        };
        if let Some((_, cells)) = self.rows.get_mut(row) {
            if cells.len() <= col {
                cells.resize(col + 1, None);
            }
            if let Some(cell) = cells.get_mut(col) {
                *cell = Some(value.into());
            }
        }
        self
    }

    /// Whether no metric was set.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The scorecard as a section titled `title`: one table, `metric | stage…`.
    pub fn section(&self, title: impl Into<String>) -> Section {
        let header: Vec<String> = std::iter::once("metric".to_string())
            .chain(self.stages.iter().cloned())
            .collect();
        let rows = self
            .rows
            .iter()
            .map(|(metric, cells)| {
                std::iter::once(metric.clone())
                    .chain((0..self.stages.len()).map(|i| {
                        cells
                            .get(i)
                            .cloned()
                            .flatten()
                            .unwrap_or_else(|| "—".into())
                    }))
                    .collect()
            })
            .collect();
        Section::new(title).table(header, rows)
    }
}

/// The compute of one training token (forward and backward), nanoGPT's `estimate_mfu` and
/// nanochat's `estimate_flops` (after the PaLM paper, appendix B).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flops {
    /// `N`: the parameters that take part in matrix products, i.e. all of them but the
    /// position table (GPT-2's `wpe`, a lookup) and, when the head is not tied to it, the
    /// token embedding (a lookup too; the head is counted). nanoGPT leaves out `wpe`, nanochat
    /// the untied `wte`; a tied `wte` is the head's matrix and counts.
    pub matmul_params: u64,
    /// `6N`: 2 FLOPs (a multiply and an add) per parameter in the forward pass, 4 in the
    /// backward.
    pub dense: u64,
    /// `12·L·H·hs·T`: attention's `QKᵀ` and its weighted sum of `V` over a context of `T`
    /// tokens, forward and backward (counted over the whole context, as nanoGPT does, not the
    /// causal half).
    pub attention: u64,
}

impl Flops {
    /// `6N + 12·L·H·hs·T`.
    pub fn per_token(&self) -> u64 {
        self.dense.saturating_add(self.attention)
    }

    /// The FLOPs of training on `tokens` tokens.
    pub fn total(&self, tokens: u64) -> f64 {
        self.per_token() as f64 * tokens as f64
    }
}

/// [`Flops`] of a model of `cfg` trained on sequences of `seq_len` tokens (`T`; the context,
/// `block_size`, for pre-training).
///
/// ```
/// use tinygpt::GptConfig;
/// let f = tinygpt::report::flops_per_token(&GptConfig::gpt2(), 1024);
/// // nanoGPT's numbers for GPT-2 small: N = 124.3M without wpe, 12·12·768·1024 for attention.
/// assert_eq!(f.matmul_params, 124_439_808 - 1024 * 768);
/// assert_eq!(f.attention, 12 * 12 * 768 * 1024);
/// ```
pub fn flops_per_token(cfg: &GptConfig, seq_len: usize) -> Flops {
    let c = cfg.n_embd as u64;
    let mut n = cfg.num_parameters() as u64;
    if cfg.arch == Arch::Gpt2 {
        n = n.saturating_sub((cfg.block_size as u64).saturating_mul(c)); // wpe
    }
    if !cfg.tie_word_embeddings {
        n = n.saturating_sub((cfg.vocab_size as u64).saturating_mul(c)); // the wte lookup
    }
    let attention = [
        12,
        cfg.n_layer as u64,
        cfg.n_head as u64,
        cfg.head_size() as u64,
        seq_len as u64,
    ]
    .iter()
    .fold(1u64, |acc, x| acc.saturating_mul(*x));
    Flops {
        matmul_params: n,
        dense: n.saturating_mul(6),
        attention,
    }
}

/// Bits per byte of text from a loss in nats per token over `tokens` tokens that decode to
/// `bytes` bytes of UTF-8: `loss / ln 2 · tokens / bytes`, which does not depend on the
/// tokenizer (nanochat's `bpb`). `None` without bytes.
pub fn bpb_from_loss(loss_nats_per_token: f64, tokens: usize, bytes: usize) -> Option<f64> {
    (bytes > 0).then(|| loss_nats_per_token / std::f64::consts::LN_2 * tokens as f64 / bytes as f64)
}

/// One row of a `metrics.jsonl` (see [`crate::train`]): its kind, step, numbers and strings.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsRow {
    /// `"eval"`, `"train"` or `"skip"` (rows written before the field existed are `"eval"`).
    pub kind: String,
    /// The step.
    pub step: usize,
    /// The numeric fields in the file's order (`null`s, non-finite values, left out).
    pub values: Vec<(String, f64)>,
    /// The string fields (a skipped step's `reason`).
    pub text: Vec<(String, String)>,
}

impl MetricsRow {
    /// The value of `key`, if the row has a number there.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.values.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// Whether it is an evaluation row.
    pub fn is_eval(&self) -> bool {
        self.kind == "eval"
    }
}

/// Reads a `metrics.jsonl`. A last line without its newline (cut off by a crash while it was
/// appended) and blank lines are skipped.
///
/// # Errors
/// [`Error::Io`] if the file cannot be read, [`Error::BadFile`] naming the line that is not a
/// JSON object with a `step`.
pub fn read_metrics(path: impl AsRef<Path>) -> Result<Vec<MetricsRow>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<(usize, &str)> = text.lines().enumerate().collect();
    if !text.ends_with('\n') {
        lines.pop();
    }
    let mut rows = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        // In the line's order (a `serde_json::Value` map would sort the keys).
        let Ordered(map) =
            serde_json::from_str(line).map_err(|e| Error::json(path, Some(i + 1), &e))?;
        let field = |name: &str| map.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        let step = field("step")
            .and_then(|s| s.as_u64())
            .ok_or_else(|| Error::bad_file(path, Some(i + 1), "no integer `step`"))?;
        let mut row = MetricsRow {
            kind: field("kind")
                .and_then(|k| k.as_str())
                .unwrap_or("eval")
                .to_string(),
            step: step as usize,
            values: Vec::new(),
            text: Vec::new(),
        };
        for (k, v) in &map {
            if k == "kind" || k == "step" {
                continue;
            }
            match v {
                serde_json::Value::Number(n) => {
                    if let Some(x) = n.as_f64().filter(|x| x.is_finite()) {
                        row.values.push((k.clone(), x));
                    }
                }
                serde_json::Value::String(s) => row.text.push((k.clone(), s.clone())),
                _ => {}
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

/// The facts of one training run, rendered as the [`Section`] a training example appends to
/// its `report.md` ([`RunCard::section`]): what was trained (parameters, settings), what it
/// cost (tokens, FLOPs, time) and what came of it (best validation loss, bits per byte, the
/// evaluations, plots, samples).
///
/// Fill the fields [`RunCard::new`] leaves empty as the stage knows them.
#[derive(Debug, Clone)]
pub struct RunCard {
    /// The section's title (`"Pre-training"`).
    pub title: String,
    /// Where the run's checkpoints are, shown under the title.
    pub dir: Option<PathBuf>,
    /// When it finished, shown under the title ([`utc_now`] by default).
    pub date: String,
    /// The model trained.
    pub model: GptConfig,
    /// Its training settings.
    pub train: TrainConfig,
    /// What [`crate::Trainer::fit`] returned.
    pub summary: TrainSummary,
    /// The step this run started from (0, or where a resumed run went on).
    pub first_step: usize,
    /// `T` of the FLOPs' attention term: the length of the sequences trained on (the context,
    /// `block_size`, by default: an upper bound where sequences are shorter).
    pub seq_len: usize,
    /// Wall time of the whole command, seconds (loading, evaluations and sampling included).
    pub wall_s: Option<f64>,
    /// Bits per byte of the held-out text at the best validation loss, where the stage can
    /// count its bytes ([`bpb_from_loss`]).
    pub bits_per_byte: Option<f64>,
    /// More rows for the facts table (a stage's own results).
    pub facts: Vec<(String, String)>,
    /// The evaluation rows of the run's `metrics.jsonl` (others are ignored).
    pub evals: Vec<MetricsRow>,
    /// Images, `(alt, path relative to the report)`.
    pub images: Vec<(String, String)>,
    /// Samples of the trained model, shown verbatim.
    pub samples: Vec<String>,
}

impl RunCard {
    /// A card for a run of `model` with `train`, finished with `summary`; the date is now and
    /// `seq_len` the model's context.
    pub fn new(
        title: impl Into<String>,
        model: &GptConfig,
        train: &TrainConfig,
        summary: &TrainSummary,
    ) -> Self {
        Self {
            title: title.into(),
            dir: None,
            date: utc_now(),
            model: model.clone(),
            train: train.clone(),
            summary: summary.clone(),
            first_step: 0,
            seq_len: model.block_size,
            wall_s: None,
            bits_per_byte: None,
            facts: Vec::new(),
            evals: Vec::new(),
            images: Vec::new(),
            samples: Vec::new(),
        }
    }

    /// The FLOPs of one training token of this run.
    pub fn flops(&self) -> Flops {
        flops_per_token(&self.model, self.seq_len)
    }

    /// The card as a section: a line with the date, directory and steps; the facts table;
    /// the evaluations (at most [`MAX_EVAL_ROWS`]); the images; the samples; the model's and
    /// the training settings.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if a config does not serialize (it always does).
    pub fn section(&self) -> Result<Section> {
        let s = &self.summary;
        let mut line = vec![self.date.clone()];
        if let Some(dir) = &self.dir {
            line.push(format!("`{}`", dir.display()));
        }
        line.push(if self.first_step > 0 {
            format!("steps {} → {} (resumed)", self.first_step, s.steps)
        } else {
            format!("{} steps", s.steps)
        });
        let flops = self.flops();
        let n = self.model.num_parameters();
        let mut facts = vec![
            (
                "parameters".to_string(),
                format!("{} ({})", si(n as f64), thousands(n as u64)),
            ),
            ("tokens seen".into(), si(s.tokens_seen as f64)),
            (
                "FLOPs per token".into(),
                format!(
                    "{} = 6N {} + attention 12·L·H·hs·T {} (N = {} parameters in matrix \
                     products, T = {}; nanoGPT's estimate_mfu)",
                    si(flops.per_token() as f64),
                    si(flops.dense as f64),
                    si(flops.attention as f64),
                    si(flops.matmul_params as f64),
                    self.seq_len
                ),
            ),
            (
                "FLOPs in all".into(),
                format!(
                    "{} (per token × tokens seen; training steps only)",
                    si(flops.total(s.tokens_seen))
                ),
            ),
            (
                "training time".into(),
                format!(
                    "{} (optimiser steps; evaluations excluded)",
                    duration(s.elapsed_s)
                ),
            ),
        ];
        if let Some(w) = self.wall_s {
            facts.push((
                "wall time".into(),
                format!(
                    "{} (this command: loading, evaluations and samples included)",
                    duration(w)
                ),
            ));
        }
        facts.push((
            "throughput".into(),
            format!("{} tokens/s", si(s.tokens_per_sec)),
        ));
        if let Some(v) = s.best_val_loss {
            facts.push(("best val loss".into(), format!("{v:.4}")));
        }
        if let Some(b) = self.bits_per_byte {
            facts.push((
                "bits per byte".into(),
                format!("{b:.4} (held-out text, at the best val loss)"),
            ));
        }
        facts.extend(self.facts.iter().cloned());
        let mut section = Section::new(&self.title)
            .paragraph(line.join(" · "))
            .facts(facts);
        // Evaluations that measured something (PPO's before its first iteration has only the
        // trainer's own fields).
        let evals: Vec<&MetricsRow> = self
            .evals
            .iter()
            .filter(|r| r.is_eval())
            .filter(|r| {
                r.values
                    .iter()
                    .any(|(k, _)| !TRAINER_FIELDS.contains(&k.as_str()))
            })
            .collect();
        if !evals.is_empty() {
            let (header, rows) = eval_table(&evals);
            section = section.heading("Evaluations").table(header, rows);
            if evals.len() > MAX_EVAL_ROWS {
                section = section.paragraph(format!(
                    "{MAX_EVAL_ROWS} of {} evaluations shown; `metrics.jsonl` has them all.",
                    evals.len()
                ));
            }
        }
        if !self.images.is_empty() {
            section = section.heading("Plots");
            for (alt, path) in &self.images {
                section = section.image(alt, path);
            }
        }
        if !self.samples.is_empty() {
            section = section.heading("Samples");
            for sample in &self.samples {
                section = section.code(sample);
            }
        }
        section
            .heading("Settings")
            .paragraph("Model (`config.json`):")
            .settings(&self.model, 4)?
            .paragraph("Training (`TrainConfig`):")
            .settings(&self.train, 4)
    }
}

/// The evaluation table: `step` and every metric the rows have (throughput and time left
/// out: the facts give them), thinned to [`MAX_EVAL_ROWS`].
fn eval_table(evals: &[&MetricsRow]) -> (Vec<String>, Vec<Vec<String>>) {
    let mut keys: Vec<&str> = Vec::new();
    for row in evals {
        for (k, _) in &row.values {
            if !matches!(k.as_str(), "tokens_per_sec" | "elapsed_s") && !keys.contains(&k.as_str())
            {
                keys.push(k);
            }
        }
    }
    // The learning rate last: the metrics first (the file's keys are in alphabetical order).
    if let Some(i) = keys.iter().position(|k| *k == "lr") {
        let lr = keys.remove(i);
        keys.push(lr);
    }
    let header = std::iter::once("step".to_string())
        .chain(keys.iter().map(|k| k.replace('_', " ")))
        .collect();
    let rows = thin(evals.len(), MAX_EVAL_ROWS)
        .into_iter()
        .filter_map(|i| evals.get(i))
        .map(|row| {
            std::iter::once(row.step.to_string())
                .chain(
                    keys.iter()
                        .map(|k| row.get(k).map(|v| metric_cell(k, v)).unwrap_or_default()),
                )
                .collect()
        })
        .collect();
    (header, rows)
}

/// Indices of at most `max` of `n` rows: the first, the last and evenly spaced ones between.
fn thin(n: usize, max: usize) -> Vec<usize> {
    match max {
        _ if n <= max => (0..n).collect(),
        0 => Vec::new(),
        1 => vec![n - 1],
        _ => {
            let mut v: Vec<usize> = (0..max)
                .map(|i| ((i as f64) * (n - 1) as f64 / (max - 1) as f64).round() as usize)
                .collect();
            v.dedup();
            v
        }
    }
}

/// A metric for a table: counts as integers, learning rates in scientific notation, the
/// rest with four decimals.
fn metric_cell(key: &str, v: f64) -> String {
    match key {
        "iteration" | "epoch" | "pairs" => format!("{v:.0}"),
        k if k == "lr" || k.ends_with("_lr") || k.ends_with("coef") => format!("{v:.2e}"),
        k if k.ends_with("length") || k.ends_with("_tokens") => format!("{v:.1}"),
        _ => format!("{v:.4}"),
    }
}

/// 804224 → `804k`, 5169408 → `5.17M`, 6.4e12 → `6.40T`: three significant digits and an SI
/// prefix.
pub fn si(x: f64) -> String {
    const UNITS: [(f64, &str); 5] = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];
    if !x.is_finite() {
        return x.to_string();
    }
    let (v, unit) = UNITS
        .iter()
        .find(|(scale, _)| x.abs() >= *scale)
        .map(|(scale, u)| (x / scale, *u))
        .unwrap_or((x, ""));
    if unit.is_empty() {
        return match x.abs() {
            _ if x.fract() == 0.0 => format!("{x:.0}"),
            a if a >= 99.95 => format!("{x:.0}"),
            a if a >= 9.995 => format!("{x:.1}"),
            _ => format!("{x:.2}"),
        };
    }
    let decimals = match v.abs() {
        a if a >= 99.95 => 0,
        a if a >= 9.995 => 1,
        _ => 2,
    };
    format!("{v:.decimals$}{unit}")
}

/// 804224 → `804,224`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// 83.4 → `1m23s`, 3725 → `1h02m`, 9.2 → `9.2s`.
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 60.0 {
        return format!("{s:.1}s");
    }
    let s = s.round() as u64;
    if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    }
}

/// The machine and build a report was made on: its header in the whole-story report.
#[derive(Debug, Clone, PartialEq)]
pub struct Environment {
    /// The CPU's model name (`/proc/cpuinfo`), or `unknown`.
    pub cpu: String,
    /// Logical CPUs the process may use.
    pub cpus: usize,
    /// Total memory in bytes (`/proc/meminfo`'s `MemTotal`), where known.
    pub memory_bytes: Option<u64>,
    /// The tinygpt crate's version.
    pub crate_version: String,
    /// The git commit of tinygpt's source tree (`git rev-parse`, with `-dirty` when tracked
    /// files changed), or `unknown` (no git, or the crate is not a checkout).
    pub git_commit: String,
    /// The compiler that built tinygpt (`rustc --version`, read by the build script: the
    /// binary's own compiler, which a `rustc` found at run time need not be, or be at all).
    pub rustc: String,
    /// When the report was made, UTC.
    pub date: String,
}

impl Environment {
    /// Reads the machine (Linux's `/proc`; `unknown` elsewhere), runs `git` in the crate's
    /// source directory, and takes the rest from the build. Never fails: what cannot be found
    /// is `unknown`.
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cpu: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".into()),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            memory_bytes: mem_total_bytes(&meminfo),
            crate_version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: git_commit(Path::new(env!("CARGO_MANIFEST_DIR")))
                .unwrap_or_else(|| "unknown".into()),
            rustc: option_env!("TINYGPT_RUSTC_VERSION")
                .unwrap_or("unknown")
                .to_string(),
            date: utc_now(),
        }
    }

    /// The environment as a section (`title`): one facts table.
    pub fn section(&self, title: impl Into<String>) -> Section {
        let memory = self
            .memory_bytes
            .map(|b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64))
            .unwrap_or_else(|| "unknown".into());
        Section::new(title).facts([
            ("date", self.date.clone()),
            ("CPU", self.cpu.clone()),
            ("logical CPUs", self.cpus.to_string()),
            ("memory", memory),
            ("tinygpt", self.crate_version.clone()),
            ("git commit", self.git_commit.clone()),
            ("rustc", self.rustc.clone()),
        ])
    }
}

/// The first `model name` of a `/proc/cpuinfo` (x86; `Model` or `CPU part` lines elsewhere
/// are not read).
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "model name")
            .then(|| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|v| !v.is_empty())
    })
}

/// `MemTotal` of a `/proc/meminfo`, in bytes.
pub fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemTotal:")?;
        let mut parts = rest.split_whitespace();
        let n: u64 = parts.next()?.parse().ok()?;
        match parts.next() {
            Some("kB") | None => n.checked_mul(1024),
            Some(_) => None,
        }
    })
}

/// The commit of the git checkout at `dir` (12 hex digits, `-dirty` when tracked files
/// changed), if `git` runs and `dir` is the top of a checkout (not merely inside another
/// repository).
fn git_commit(dir: &Path) -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let top = git(&["rev-parse", "--show-toplevel"])?;
    let same = match (std::fs::canonicalize(&top), std::fs::canonicalize(dir)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same {
        return None;
    }
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    })
}

/// Now, UTC, as `2026-12-02 16:05:09 UTC`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc_date(secs)
}

/// Seconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC` (the proleptic Gregorian
/// calendar; Howard Hinnant's `civil_from_days`).
pub fn utc_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March first
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> TrainSummary {
        TrainSummary {
            steps: 200,
            best_val_loss: Some(1.9),
            elapsed_s: 83.4,
            tokens_per_sec: 15_360.0,
            tokens_seen: 200 * 12 * 64,
            last_metrics: Vec::new(),
        }
    }

    #[test]
    fn report_section_markdown_is_exact() {
        let md = Section::new("Pre-training")
            .paragraph("A run.")
            .facts([("parameters", "0.80M"), ("note", "a | b\nc")])
            .heading("Evaluations")
            .table(
                ["step", "val loss"],
                vec![vec!["0".into(), "4.17".into()], vec!["50".into()]],
            )
            .image("loss", "loss.png")
            .image("a [b]", "my plots/kl.png")
            .code("to be | or not\n")
            .code("```\nquoted\n```")
            .to_markdown();
        let want = "## Pre-training\n\
            \n\
            A run.\n\
            \n\
            | what | value |\n\
            | --- | --- |\n\
            | parameters | 0.80M |\n\
            | note | a \\| b c |\n\
            \n\
            ### Evaluations\n\
            \n\
            | step | val loss |\n\
            | --- | --- |\n\
            | 0 | 4.17 |\n\
            | 50 |  |\n\
            \n\
            ![loss](loss.png)\n\
            \n\
            ![a \\[b\\]](<my plots/kl.png>)\n\
            \n\
            ```text\n\
            to be | or not\n\
            ```\n\
            \n\
            ````text\n\
            ```\n\
            quoted\n\
            ```\n\
            ````\n";
        assert_eq!(md, want);
    }

    #[test]
    fn report_settings_are_a_compact_table() {
        #[derive(Serialize)]
        struct S {
            lr: f64,
            eps: f64,
            name: &'static str,
            n: Option<usize>,
            bias: bool,
            p: f32,
        }
        let s = S {
            lr: 0.001,
            eps: 1e-8,
            name: "x",
            n: None,
            bias: true,
            p: 0.2,
        };
        let md = Section::new("S").settings(&s, 2).unwrap().to_markdown();
        assert_eq!(
            md,
            "## S\n\n\
             | setting | value | setting | value |\n\
             | --- | --- | --- | --- |\n\
             | `lr` | 0.001 | `eps` | 1e-8 |\n\
             | `name` | x | `n` | — |\n\
             | `bias` | true | `p` | 0.2 |\n"
        );
        assert!(Section::new("S").settings(&3, 2).is_err());
        let md = Section::new("S").settings(&s, 5).unwrap().to_markdown();
        assert!(md.ends_with("| `lr` | 0.001 | `eps` | 1e-8 | `name` | x | `n` | — | `bias` | true |\n| `p` | 0.2 |  |  |  |  |  |  |  |  |\n"), "{md}");
    }

    #[test]
    fn report_flops_of_the_cpu_recipe_are_the_hand_count() {
        // shakespeare_char_cpu(66): 4 layers, 4 heads, C = 128, T = 64, no biases, tied head.
        let cfg = GptConfig::shakespeare_char_cpu(66);
        let per_layer = 128 + 128 * 384 + 128 * 128 + 128 + 128 * 512 + 512 * 128; // 196,864
        let wte = 66 * 128;
        let wpe = 64 * 128;
        assert_eq!(cfg.num_parameters(), wte + wpe + 4 * per_layer + 128);
        let f = flops_per_token(&cfg, 64);
        assert_eq!(f.matmul_params, 796_032); // 804,224 less wpe's 8,192
        assert_eq!(f.dense, 4_776_192); // 6N
        assert_eq!(f.attention, 393_216); // 12 · 4 · 128 · 64
        assert_eq!(f.per_token(), 5_169_408);
        assert_eq!(f.total(1000), 5_169_408_000.0);
        // Untied, the token table is a lookup and the head counts instead: N is unchanged
        // for Llama, which has no position table.
        let llama = GptConfig {
            tie_word_embeddings: false,
            ..GptConfig::llama_tiny(66)
        };
        let f = flops_per_token(&llama, 64);
        assert_eq!(f.matmul_params as usize, llama.num_parameters() - 66 * 128);
    }

    #[test]
    fn report_bits_per_byte() {
        // ln 2 nats a token, two bytes a token: half a bit a byte.
        let b = bpb_from_loss(std::f64::consts::LN_2, 10, 20).unwrap();
        assert!((b - 0.5).abs() < 1e-12);
        assert_eq!(bpb_from_loss(1.0, 10, 0), None);
    }

    #[test]
    fn report_run_card_has_the_facts() {
        let cfg = GptConfig::shakespeare_char_cpu(66);
        let train = TrainConfig {
            max_iters: 200,
            ..TrainConfig::default()
        };
        let mut card = RunCard::new("Pre-training", &cfg, &train, &summary());
        card.date = "2026-12-02 16:05:09 UTC".into();
        card.dir = Some("out/pre".into());
        card.wall_s = Some(100.0);
        card.bits_per_byte = Some(2.5);
        card.evals = (0..30)
            .map(|i| MetricsRow {
                kind: "eval".into(),
                step: i * 10,
                values: vec![
                    ("elapsed_s".into(), i as f64),
                    ("lr".into(), 1e-3),
                    ("train_loss".into(), 4.0 - i as f64 * 0.1),
                    ("val_loss".into(), 4.1 - i as f64 * 0.1),
                ],
                text: vec![],
            })
            .chain([
                MetricsRow {
                    kind: "train".into(),
                    step: 1,
                    values: vec![("loss".into(), 9.0)],
                    text: vec![],
                },
                MetricsRow {
                    kind: "eval".into(),
                    step: 5000,
                    values: vec![("lr".into(), 1e-3), ("elapsed_s".into(), 1.0)],
                    text: vec![],
                },
            ])
            .collect();
        card.images.push(("loss".into(), "loss.png".into()));
        card.samples.push("ROMEO: hi".into());
        let md = card.section().unwrap().to_markdown();
        for want in [
            "## Pre-training\n\n2026-12-02 16:05:09 UTC · `out/pre` · 200 steps\n",
            "| parameters | 804k (804,224) |",
            "| tokens seen | 154k |",
            "| FLOPs per token | 5.17M = 6N 4.78M + attention 12·L·H·hs·T 393k (N = 796k",
            "T = 64; nanoGPT's estimate_mfu) |",
            "| FLOPs in all | 794G (per token × tokens seen; training steps only) |",
            "| training time | 1m23s (optimiser steps; evaluations excluded) |",
            "| wall time | 1m40s",
            "| throughput | 15.4k tokens/s |",
            "| best val loss | 1.9000 |",
            "| bits per byte | 2.5000",
            "| step | train loss | val loss | lr |",
            "| 0 | 4.0000 | 4.1000 | 1.00e-3 |",
            "| 290 | 1.1000 | 1.2000 | 1.00e-3 |",
            "12 of 30 evaluations shown",
            "### Plots\n\n![loss](loss.png)",
            "### Samples\n\n```text\nROMEO: hi\n```",
            "| `vocab_size` | 66 | `block_size` | 64 |",
            "| `max_iters` | 200 |",
        ] {
            assert!(md.contains(want), "missing {want:?} in\n{md}");
        }
        assert!(!md.contains("9.0000"), "a train row went into the table");
        assert!(
            !md.contains("| 5000 |"),
            "an evaluation that measured nothing"
        );
    }

    #[test]
    fn report_thins_rows_keeping_the_ends() {
        assert_eq!(thin(3, 12), vec![0, 1, 2]);
        assert_eq!(thin(30, 12).len(), 12);
        assert_eq!(thin(30, 12).first(), Some(&0));
        assert_eq!(thin(30, 12).last(), Some(&29));
        assert_eq!(thin(0, 12), Vec::<usize>::new());
    }

    #[test]
    fn report_appends_and_writes_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REPORT_FILE);
        Section::new("One").paragraph("a").append_to(&path).unwrap();
        Section::new("Two").paragraph("b").append_to(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "## One\n\na\n\n## Two\n\nb\n"
        );
        let mut card = Scorecard::new(["base", "SFT", "RLHF"]);
        card.set("val loss", "base", "1.5")
            .set("assistant loss", "SFT", "1.2")
            .set("assistant loss", "base", "3.0")
            .set("win rate", "GRPO", "60%");
        let report = Report::new("tinygpt")
            .section(Section::new("Env").paragraph("x"))
            .section(card.section("Summary"));
        report.write_to(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "# tinygpt\n\n## Env\n\nx\n\n## Summary\n\n\
             | metric | base | SFT | RLHF | GRPO |\n\
             | --- | --- | --- | --- | --- |\n\
             | val loss | 1.5 | — | — | — |\n\
             | assistant loss | 3.0 | 1.2 | — | — |\n\
             | win rate | — | — | — | 60% |\n"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn report_reads_metrics_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(
            &path,
            "{\"step\":0,\"val_loss\":4.2}\n\
             {\"kind\":\"train\",\"step\":10,\"loss\":3.5,\"grad_norm\":null}\n\
             \n\
             {\"kind\":\"skip\",\"step\":11,\"reason\":\"loss is NaN\",\"loss\":null}\n\
             {\"kind\":\"eval\",\"st",
        )
        .unwrap();
        let rows = read_metrics(&path).unwrap();
        assert_eq!(rows.len(), 3);
        assert!(rows[0].is_eval() && rows[0].get("val_loss") == Some(4.2));
        std::fs::write(&path, "{\"step\":0,\"val_loss\":4.2,\"lr\":0.1}\n").unwrap();
        let keys: Vec<String> = read_metrics(&path).unwrap()[0]
            .values
            .iter()
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(keys, ["val_loss", "lr"], "the file's order");
        std::fs::write(
            &path,
            "{\"step\":0,\"val_loss\":4.2}\n\
             {\"kind\":\"train\",\"step\":10,\"loss\":3.5,\"grad_norm\":null}\n\
             \n\
             {\"kind\":\"skip\",\"step\":11,\"reason\":\"loss is NaN\",\"loss\":null}\n\
             {\"kind\":\"eval\",\"st",
        )
        .unwrap();
        let rows = read_metrics(&path).unwrap();
        assert_eq!(rows[1].kind, "train");
        assert_eq!(rows[1].values, vec![("loss".to_string(), 3.5)]);
        assert_eq!(rows[2].text, vec![("reason".into(), "loss is NaN".into())]);
        std::fs::write(&path, "{\"step\":0}\nnot json\n").unwrap();
        let e = read_metrics(&path).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl:2:"), "{e}");
        std::fs::write(&path, "[1]\n").unwrap();
        let e = read_metrics(&path).unwrap_err().to_string();
        assert!(e.contains(":1: invalid type"), "{e}");
        std::fs::write(&path, "{\"loss\":1}\n").unwrap();
        let e = read_metrics(&path).unwrap_err().to_string();
        assert!(e.contains(":1: no integer `step`"), "{e}");
    }

    #[test]
    fn report_environment_parsers() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC  7B13 64-Core Processor\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n";
        assert_eq!(
            cpu_model(cpuinfo).as_deref(),
            Some("AMD EPYC 7B13 64-Core Processor")
        );
        assert_eq!(cpu_model("processor : 0\n"), None);
        let meminfo = "MemTotal:       24568000 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total_bytes(meminfo), Some(24_568_000 * 1024));
        assert_eq!(mem_total_bytes("MemFree: 1 kB\n"), None);
        assert_eq!(utc_date(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00 UTC");
        let env = Environment::detect();
        assert_eq!(env.crate_version, env!("CARGO_PKG_VERSION"));
        assert!(env.cpus >= 1);
        let md = env.section("Environment").to_markdown();
        assert!(
            md.contains("| git commit | ") && md.contains("| rustc | "),
            "{md}"
        );
    }

    #[test]
    fn report_number_formats() {
        assert_eq!(si(804_224.0), "804k");
        assert_eq!(si(5_169_408.0), "5.17M");
        assert_eq!(si(15_360.0), "15.4k");
        assert_eq!(si(6.4e12), "6.40T");
        assert_eq!(si(999.0), "999");
        assert_eq!(si(0.5), "0.50");
        assert_eq!(si(896.37), "896");
        assert_eq!(si(12.34), "12.3");
        assert_eq!(si(99_960.0), "100k");
        assert_eq!(thousands(804_224), "804,224");
        assert_eq!(thousands(12), "12");
        assert_eq!(duration(9.24), "9.2s");
        assert_eq!(duration(83.4), "1m23s");
        assert_eq!(duration(3725.0), "1h02m");
    }
}
