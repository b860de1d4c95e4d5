//! One error type for the whole crate.
//!
//! Every fallible function in tinygpt returns [`Result<T>`]. Messages say *what* was wrong,
//! *where* (file, line, tensor name, character position) and, where it helps, what was expected,
//! so a user can fix their input without reading our source.

use std::path::{Path, PathBuf};

/// `Result<T, tinygpt::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in tinygpt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation failed inside candle (shape mismatch in an op, device error, …).
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),

    /// Reading or writing a file failed.
    #[error("{path}: {error}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying OS error (shown in this error's message, so not also as its
        /// `source()`, which would print it twice).
        error: std::io::Error,
    },

    /// Reading or writing failed where there is no file to name: standard input or output, a
    /// pipe, a socket, or `?` on a [`std::io::Error`] in the caller's code (this is the
    /// variant `From<std::io::Error>` makes). Errors on a file tinygpt opens are
    /// [`Error::Io`], which names the file.
    #[error("I/O error: {0}")]
    IoUnnamed(std::io::Error),

    /// A data or config file is empty, malformed or otherwise unusable.
    #[error("{path}{}: {msg}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    BadFile {
        /// The offending file.
        path: PathBuf,
        /// 1-based line number, when the problem is on one line.
        line: Option<usize>,
        /// What is wrong.
        msg: String,
    },

    /// A GGUF file is malformed, hostile or describes a model tinygpt does not read (the
    /// magic, the version, a count or length past the end of the file, an unknown tensor type,
    /// an architecture other than gpt2, …).
    #[error("{path}: GGUF: {msg}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key or tensor.
        msg: String,
    },

    /// A chat template (Jinja, from a `tokenizer_config.json`) failed to compile or render, or
    /// raised an exception itself (`raise_exception`), e.g. for a role it does not know.
    #[error("chat template {name}: {msg}")]
    ChatTemplate {
        /// Where the template came from (a file, and the template's name if it has several).
        name: String,
        /// What went wrong, with the template line when known.
        msg: String,
    },

    /// A configuration value is out of range or inconsistent (e.g. `n_embd % n_head != 0`).
    #[error("invalid config: {0}")]
    Config(String),

    /// Text contains a character the (char-level) tokenizer has never seen.
    #[error(
        "character {ch:?} (U+{:04X}) at position {position} (in the text being encoded: line {line}, column {column}) is not in the tokenizer's vocabulary",
        *ch as u32
    )]
    UnknownChar {
        /// The character.
        ch: char,
        /// 0-based index of the character in the text (in characters, not bytes).
        position: usize,
        /// 1-based line of the character.
        line: usize,
        /// 1-based column of the character (in characters).
        column: usize,
    },

    /// The `tokenizers` crate reported an error.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A tensor in a checkpoint has the wrong shape.
    #[error(
        "tensor `{name}` has shape {got:?}, expected {expected:?}{}",
        path_suffix(path)
    )]
    ShapeMismatch {
        /// Tensor name, e.g. `transformer.h.0.attn.c_attn.weight`.
        name: String,
        /// Shape implied by the config.
        expected: Vec<usize>,
        /// Shape found in the file.
        got: Vec<usize>,
        /// The file it came from, when known.
        path: Option<PathBuf>,
    },

    /// A tensor the model needs is absent from a checkpoint.
    #[error("tensor `{name}` is missing{}", path_suffix(path))]
    MissingTensor {
        /// Tensor name.
        name: String,
        /// The file that lacked it, when known.
        path: Option<PathBuf>,
    },

    /// A checkpoint directory is incomplete or inconsistent.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },

    /// A caller passed an argument outside its documented range (empty prompt, bad shape, …).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Training stopped because it was asked to ([`crate::Trainer::with_stop_flag`]: Ctrl-C,
    /// SIGTERM), after finishing an optimiser step and saving its state.
    #[error(
        "training interrupted after step {step}{}",
        saved.as_ref().map(|p| format!("; its state is saved in {}", p.display())).unwrap_or_default()
    )]
    Interrupted {
        /// Optimiser steps done.
        step: usize,
        /// The latest state written (`OUT/checkpoint-STEP`, or `OUT` itself when the best
        /// checkpoint is of that step); `None` without an output directory.
        saved: Option<PathBuf>,
    },

    /// Training cannot go on: e.g. `max_bad_steps` steps in a row had a non-finite loss or
    /// gradient. Nothing was saved for those steps.
    #[error("training stopped: {0}")]
    Training(String),
}

/// serde_json's message without its trailing "at line L column C" (the line is reported by
/// [`Error::BadFile`]); the column, when known, is kept in parentheses.
pub(crate) fn json_message(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match msg.strip_suffix(&suffix) {
        Some(m) if e.column() > 0 => format!("{m} (column {})", e.column()),
        Some(m) => m.to_string(),
        None => msg,
    }
}

fn path_suffix(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            error: source,
        }
    }

    /// An [`Error::BadFile`] for a JSON error in `path`, at the parser's line. `line_in_file`
    /// overrides the line when `e` comes from parsing one line of a JSONL file.
    pub(crate) fn json(
        path: impl AsRef<Path>,
        line_in_file: Option<usize>,
        e: &serde_json::Error,
    ) -> Self {
        let line = line_in_file.or((e.line() > 0).then_some(e.line()));
        Error::bad_file(path, line, json_message(e))
    }

    /// An [`Error::BadFile`] for `path`, optionally at a 1-based `line`.
    pub(crate) fn bad_file(
        path: impl AsRef<Path>,
        line: Option<usize>,
        msg: impl Into<String>,
    ) -> Self {
        Error::BadFile {
            path: path.as_ref().to_path_buf(),
            line,
            msg: msg.into(),
        }
    }

    /// An [`Error::Checkpoint`] for `path`.
    pub(crate) fn checkpoint(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
}

/// For `?` on I/O that has no path to report (standard streams, sockets, an embedder's own
/// code): [`Error::IoUnnamed`], whose message is `I/O error: ` and the OS's. Where a path is
/// known, [`Error::Io`] (which names it) is the better error.
impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::IoUnnamed(e)
    }
}

impl From<tokenizers::Error> for Error {
    fn from(e: tokenizers::Error) -> Self {
        Error::Tokenizer(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_where() {
        let e = Error::bad_file("data.jsonl", Some(3), "expected `messages`");
        assert_eq!(e.to_string(), "data.jsonl:3: expected `messages`");
        let e = Error::ShapeMismatch {
            name: "transformer.wte.weight".into(),
            expected: vec![65, 128],
            got: vec![64, 128],
            path: Some("m.safetensors".into()),
        };
        assert_eq!(
            e.to_string(),
            "tensor `transformer.wte.weight` has shape [64, 128], expected [65, 128] in m.safetensors"
        );
        let e = Error::UnknownChar {
            ch: 'é',
            position: 4,
            line: 1,
            column: 5,
        };
        assert!(e
            .to_string()
            .contains("'é' (U+00E9) at position 4 (in the text being encoded: line 1, column 5)"));
    }

    #[test]
    fn io_errors_convert_with_and_without_a_path() {
        fn read_stdin_like() -> Result<()> {
            Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "pipe closed",
            ))?;
            Ok(())
        }
        let e = read_stdin_like().unwrap_err();
        assert!(matches!(&e, Error::IoUnnamed(io) if io.kind() == std::io::ErrorKind::BrokenPipe));
        assert_eq!(e.to_string(), "I/O error: pipe closed");
        // The OS error is in the message, not also the source (it would print twice).
        assert!(std::error::Error::source(&e).is_none());
        let e = Error::io(
            "out/ckpt/config.json",
            std::io::Error::new(std::io::ErrorKind::NotFound, "not found"),
        );
        assert_eq!(e.to_string(), "out/ckpt/config.json: not found");
    }
}
