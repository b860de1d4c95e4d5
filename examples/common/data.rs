//! The public data files the README's commands use, fetched on first use.
//!
//! Every file has an entry in [`DATASETS`]: its public upstream URL, pinned at a commit (the
//! provenance of each is in the data README these entries follow), the sha256 of the upstream
//! content, a cap on its size, how it is converted into tinygpt's formats, and the sha256 of
//! the converted file. A fetch checks both hashes, so the file it writes is byte for byte the
//! one the README's numbers were measured on, and writes it atomically (a temporary file, then
//! a rename).
//!
//! A data flag resolves its path with [`resolve`]: a path that exists is used as it is; a
//! missing one whose file name is a known dataset is taken from `$TINYGPT_DATA/NAME` when that
//! is set and holds the file, else fetched into the path. `TINYGPT_DOWNLOAD_MIRROR=DIR` reads
//! the upstream file from `DIR/<upstream file name>` instead of the network (the last segment
//! of the entry's URL: `input.txt`, `encoder.json`, `vocab.bpe`, `train.jsonl`, `test.jsonl`,
//! `seed_tasks.jsonl`, `identity.json`, `alpaca_en_demo.json`, `alpaca_zh_demo.json`,
//! `dpo_en_demo.json`, `dpo_zh_demo.json`, `test.jsonl.gz`); every check still applies.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// One public data file and how to make it from its upstream source.
#[derive(Debug, Clone, Copy)]
pub struct Dataset {
    /// The file name under `data/` (and in `$TINYGPT_DATA`).
    pub name: &'static str,
    /// What it is, in a few words.
    pub about: &'static str,
    /// The upstream file, pinned at a commit.
    pub url: &'static str,
    /// sha256 of the upstream content (for a gzip file, of its decompressed content).
    pub upstream_sha256: &'static str,
    /// The most bytes read from upstream (and, for a gzip file, decompressed).
    pub max_bytes: u64,
    /// How the upstream content becomes the file.
    pub convert: Convert,
    /// sha256 of the converted file.
    pub sha256: &'static str,
}

/// The conversions of the data README, one per upstream format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Convert {
    /// A verbatim copy.
    Verbatim,
    /// GSM8K's JSONL `{"question", "answer"}` → SFT JSONL.
    Gsm8k,
    /// A JSON array of Alpaca `{"instruction", "input", "output"}` → SFT JSONL.
    Alpaca,
    /// self-instruct's seed tasks (one instance each) → SFT JSONL.
    SelfInstruct,
    /// gzipped HH-RLHF `{"chosen", "rejected"}` transcripts → preference JSONL.
    HhRlhf,
    /// LLaMA-Factory's ShareGPT-style DPO pairs → preference JSONL.
    LlamaFactoryDpo,
}

/// A file of `hiyouga/LLaMA-Factory`'s `data/` at the pinned commit.
macro_rules! llama_factory {
    ($file:literal) => {
        concat!(
            "https://raw.githubusercontent.com/hiyouga/LLaMA-Factory/",
            "ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30/data/",
            $file
        )
    };
}

/// A file of `openai/grade-school-math`'s data at the pinned commit.
macro_rules! gsm8k {
    ($file:literal) => {
        concat!(
            "https://raw.githubusercontent.com/openai/grade-school-math/",
            "3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/",
            $file
        )
    };
}

/// Every dataset the examples can fetch.
pub const DATASETS: &[Dataset] = &[
    Dataset {
        name: "tinyshakespeare.txt",
        about: "Tiny Shakespeare (karpathy/char-rnn), the pre-training corpus",
        url: "https://raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt",
        upstream_sha256: "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        max_bytes: 1_115_394,
        convert: Convert::Verbatim,
        sha256: "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    },
    Dataset {
        name: "gpt2_encoder.json",
        about: "OpenAI's GPT-2 vocabulary (encoder.json)",
        url: "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        upstream_sha256: "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
        max_bytes: 1_042_301,
        convert: Convert::Verbatim,
        sha256: "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    },
    Dataset {
        name: "gpt2_vocab.bpe",
        about: "OpenAI's GPT-2 merges (vocab.bpe)",
        url: "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        upstream_sha256: "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        max_bytes: 456_318,
        convert: Convert::Verbatim,
        sha256: "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    },
    Dataset {
        name: "sft_gsm8k_train.jsonl",
        about: "GSM8K train split (openai/grade-school-math) as SFT conversations",
        url: gsm8k!("train.jsonl"),
        upstream_sha256: "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
        max_bytes: 4_166_206,
        convert: Convert::Gsm8k,
        sha256: "a4d7b4887c4d2854d68f549612b7044faae49c18c23d1001a28ee1cfb6340725",
    },
    Dataset {
        name: "sft_gsm8k_test.jsonl",
        about: "GSM8K test split as SFT conversations (held out)",
        url: gsm8k!("test.jsonl"),
        upstream_sha256: "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
        max_bytes: 749_738,
        convert: Convert::Gsm8k,
        sha256: "4cc43e41e8965058f05519d9140ea05d9ee438dec191bb630d6a9a29bef677d9",
    },
    Dataset {
        name: "sft_self_instruct_seed.jsonl",
        about: "self-instruct's 175 human-written seed tasks as SFT conversations",
        url: "https://raw.githubusercontent.com/yizhongw/self-instruct/0b26ccaa415992100fa32df62d41b994cf928e23/data/seed_tasks.jsonl",
        upstream_sha256: "7779004fa198fdf27cf70a159363879d8a26c53329e11b436af17b3941875f48",
        max_bytes: 110_934,
        convert: Convert::SelfInstruct,
        sha256: "19e2b301c75c712cb6d49f77006b02830d73756526e0dfc298f5e947e60cf38b",
    },
    Dataset {
        name: "sft_identity.jsonl",
        about: "LLaMA-Factory's self-identity Q&A ({{name}}, {{author}})",
        url: llama_factory!("identity.json"),
        upstream_sha256: "fd029da7dd3df283ed034c82375d16d125a7b07cf1cb0316d03fb8743057d5f2",
        max_bytes: 20_306,
        convert: Convert::Alpaca,
        sha256: "a61a430b53455e46efd00f53d86d7beda8ef37964775983ef60fa079363236f8",
    },
    Dataset {
        name: "sft_alpaca_en_demo.jsonl",
        about: "LLaMA-Factory's 999 English Alpaca demo instructions (non-commercial)",
        url: llama_factory!("alpaca_en_demo.json"),
        upstream_sha256: "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
        max_bytes: 859_893,
        convert: Convert::Alpaca,
        sha256: "964edf07d8612cf10c6782935af184a92e41365a1bbc4d02e0c1184830dfe6eb",
    },
    Dataset {
        name: "sft_alpaca_zh_demo.jsonl",
        about: "LLaMA-Factory's 1,000 Chinese Alpaca demo instructions (non-commercial)",
        url: llama_factory!("alpaca_zh_demo.json"),
        upstream_sha256: "d5a4be46ae70d23a461ffc16048069324c0865ee9aa0c8730e21ac4b65ea0f08",
        max_bytes: 636_036,
        convert: Convert::Alpaca,
        sha256: "ff7147a8aef64e8f7107e9a9b6e1608a922c3b776d66ece165d42508419a453c",
    },
    Dataset {
        name: "pref_hh_rlhf_harmless_test.jsonl",
        about: "Anthropic HH-RLHF harmless-base test split as preference pairs",
        url: "https://raw.githubusercontent.com/anthropics/hh-rlhf/354e5c3cb8960630860dd5774a6ac2a58313bf4d/harmless-base/test.jsonl.gz",
        upstream_sha256: "14d765196c9f18d84f9bb3a78bac608c8f2915110ebcbd74ec95db7b7198b008",
        max_bytes: 3_280_164,
        convert: Convert::HhRlhf,
        sha256: "edd0a84fc397f0c7df2b5c8bee4477a1762666aa2bd1dda5fcfa52d0091529f3",
    },
    Dataset {
        name: "pref_dpo_en_demo.jsonl",
        about: "LLaMA-Factory's 300 English DPO demo pairs",
        url: llama_factory!("dpo_en_demo.json"),
        upstream_sha256: "b949be2421cfa62744afcf1b479f95b299d643d1a4c1c97d1341b314a1aa5cb3",
        max_bytes: 1_575_286,
        convert: Convert::LlamaFactoryDpo,
        sha256: "509a36992bc901ea0648cf7b141d2d2e97a07293e00e31d6597a9e8818389c01",
    },
    Dataset {
        name: "pref_dpo_zh_demo.jsonl",
        about: "LLaMA-Factory's 300 Chinese DPO demo pairs",
        url: llama_factory!("dpo_zh_demo.json"),
        upstream_sha256: "9ea7206bc1a45df8b7811d1fc02d5555c65379d05905f343da88f221ff145376",
        max_bytes: 853_311,
        convert: Convert::LlamaFactoryDpo,
        sha256: "ed8570eeab56811d4f6633700a06dedc6d7d56763513e76080eac41cc7b1e87d",
    },
];

/// The environment variable naming a directory that holds local copies of the datasets.
pub const DATA_ENV: &str = "TINYGPT_DATA";
/// The environment variable naming a directory to read upstream files from instead of HTTP.
pub const MIRROR_ENV: &str = "TINYGPT_DOWNLOAD_MIRROR";

/// Data files the README uses that `fetch_data` cannot fetch (each is built from several
/// upstream files), with where they come from: [`resolve`] takes them from `$TINYGPT_DATA`
/// or says this.
pub const LOCAL_ONLY: &[(&str, &str)] = &[(
    "tang_poems.txt",
    "it is built from chinese-poetry/chinese-poetry's 全唐诗/poet.tang.0.json, \
     poet.tang.1000.json, … poet.tang.9000.json (10 files) at commit \
     99ebbef7e1345c0985c44b9fd96a3f9e776f117b: one poem per paragraph (its title line, its \
     author line, its lines), 2,384,568 bytes, sha256 \
     282db0f722c7abdb839bd3b3cde8085242cb29428cb8aea87df19e98a5ec85a3",
)];

/// The dataset whose file name is `name`, if any.
pub fn known(name: &str) -> Option<&'static Dataset> {
    DATASETS.iter().find(|d| d.name == name)
}

/// The file a data flag names: `path` itself when it exists; else, when its file name is a
/// known dataset, `$TINYGPT_DATA/NAME` when that is set and holds it, or the dataset fetched
/// into `path`. Anything else missing is an error naming `flag` and the path.
pub fn resolve(flag: &str, path: &Path) -> Result<PathBuf> {
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let name = path.file_name().and_then(|n| n.to_str());
    if let Some((name, source)) = LOCAL_ONLY.iter().find(|(n, _)| Some(*n) == name) {
        if let Some(local) = in_data_env(flag, path, name) {
            return Ok(local);
        }
        bail!(
            "{flag} {}: no such file, and fetch_data cannot fetch {name}: {source}; put it \
             there, or set {DATA_ENV}=DIR to a directory holding it",
            path.display()
        );
    }
    let Some(dataset) = name.and_then(known) else {
        bail!("{flag} {}: no such file", path.display());
    };
    if let Some(local) = in_data_env(flag, path, dataset.name) {
        return Ok(local);
    }
    if let Some(dir) = std::env::var_os(DATA_ENV).filter(|d| !d.is_empty()) {
        eprintln!(
            "{flag} {}: {} is not in {DATA_ENV}={}",
            path.display(),
            dataset.name,
            Path::new(&dir).display()
        );
    }
    fetch(dataset, path).with_context(|| format!("{flag} {}", path.display()))?;
    Ok(path.to_path_buf())
}

/// `$TINYGPT_DATA/name` when that is set and holds it (saying so on stderr).
fn in_data_env(flag: &str, path: &Path, name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os(DATA_ENV).filter(|d| !d.is_empty())?;
    let local = Path::new(&dir).join(name);
    if !local.is_file() {
        return None;
    }
    eprintln!(
        "{flag} {}: using {} ({DATA_ENV})",
        path.display(),
        local.display()
    );
    Some(local)
}

/// [`resolve`] for every path of a flag that takes several.
pub fn resolve_all(flag: &str, paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    paths.iter().map(|p| resolve(flag, p)).collect()
}

/// [`resolve`] for an optional flag.
pub fn resolve_opt(flag: &str, path: Option<&Path>) -> Result<Option<PathBuf>> {
    path.map(|p| resolve(flag, p)).transpose()
}

/// `--data` if given, else `data/tinyshakespeare.txt`, either resolved with [`resolve`].
pub fn corpus(data: Option<&Path>) -> Result<PathBuf> {
    resolve(
        "--data",
        data.unwrap_or_else(|| Path::new("data/tinyshakespeare.txt")),
    )
}

/// OpenAI's GPT-2 tokenizer files in `--gpt2-files DIR` (`gpt2_encoder.json`,
/// `gpt2_vocab.bpe`), each resolved with [`resolve`].
pub fn gpt2_files(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    Ok((
        resolve("--gpt2-files", &dir.join("gpt2_encoder.json"))?,
        resolve("--gpt2-files", &dir.join("gpt2_vocab.bpe"))?,
    ))
}

/// Fetches `dataset` (from `$TINYGPT_DOWNLOAD_MIRROR` when set, else its URL), checks the
/// upstream and converted sha256, and writes it to `dest` atomically.
pub fn fetch(dataset: &Dataset, dest: &Path) -> Result<()> {
    let upstream_name = dataset.url.rsplit('/').next().unwrap_or(dataset.url);
    let raw = match std::env::var_os(MIRROR_ENV).filter(|d| !d.is_empty()) {
        Some(dir) => {
            let file = Path::new(&dir).join(upstream_name);
            eprintln!(
                "fetching {} from {} (mirror: {})",
                dataset.name,
                dataset.url,
                file.display()
            );
            let f = std::fs::File::open(&file).with_context(|| {
                format!(
                    "fetching {} from the mirror {MIRROR_ENV}: cannot read {} (the mirror's copy \
                     of {}); pass a local copy of {} or set {DATA_ENV}=DIR to a directory \
                     holding it",
                    dataset.name,
                    file.display(),
                    dataset.url,
                    dataset.name
                )
            })?;
            read_capped(f, dataset.max_bytes, &file.display().to_string())?
        }
        None => {
            eprintln!("fetching {} from {}", dataset.name, dataset.url);
            download(dataset)?
        }
    };
    let content = if dataset.convert == Convert::HhRlhf {
        let gz = flate2::read::GzDecoder::new(raw.as_slice());
        read_capped(gz, dataset.max_bytes, dataset.url)
            .with_context(|| format!("decompressing {}", dataset.url))?
    } else {
        raw
    };
    let digest = sha256_hex(&content);
    if digest != dataset.upstream_sha256 {
        bail!(
            "{} has sha256 {digest} ({} bytes), expected {}: not the pinned upstream file",
            dataset.url,
            content.len(),
            dataset.upstream_sha256
        );
    }
    let converted = convert(dataset.convert, &content)
        .with_context(|| format!("converting {} into {}", dataset.url, dataset.name))?;
    let digest = sha256_hex(&converted);
    if digest != dataset.sha256 {
        bail!(
            "converting {} gave {} with sha256 {digest}, expected {}",
            dataset.url,
            dataset.name,
            dataset.sha256
        );
    }
    write_atomic(dest, &converted)
}

fn download(dataset: &Dataset) -> Result<Vec<u8>> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into();
    let offline = || {
        format!(
            "fetching {} from {} failed (offline? pass a local copy of {} or set {DATA_ENV}=DIR \
             to a directory holding it)",
            dataset.name, dataset.url, dataset.name
        )
    };
    let response = agent.get(dataset.url).call().with_context(offline)?;
    read_capped(
        response.into_body().into_reader(),
        dataset.max_bytes,
        dataset.url,
    )
    .with_context(offline)
}

/// All of `reader`, refusing more than `max` bytes.
fn read_capped(reader: impl Read, max: u64, what: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader
        .take(max + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {what}"))?;
    if bytes.len() as u64 > max {
        bail!("{what} is larger than expected (over {max} bytes)");
    }
    Ok(bytes)
}

/// Writes `bytes` to a temporary file beside `dest`, then renames it into place.
fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = dest
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a file path", dest.display()))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dest).with_context(|| format!("renaming into {}", dest.display()))
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---- Conversions (the rules of the data README) ----

/// The upstream content converted as `how` says.
pub fn convert(how: Convert, content: &[u8]) -> Result<Vec<u8>> {
    let text = || std::str::from_utf8(content).context("not UTF-8");
    let out = match how {
        Convert::Verbatim => return Ok(content.to_vec()),
        Convert::Gsm8k => {
            #[derive(Deserialize)]
            struct Problem {
                question: String,
                answer: String,
            }
            let mut out = String::new();
            for (line, p) in json_lines::<Problem>(text()?)? {
                out += &sft_line(&p.question, "", &p.answer).with_context(|| line_no(line))?;
            }
            out
        }
        Convert::Alpaca => {
            let records: Vec<AlpacaRecord> = serde_json::from_str(text()?)?;
            let mut out = String::new();
            for r in &records {
                out += &sft_line(&r.instruction, &r.input, &r.output)?;
            }
            out
        }
        Convert::SelfInstruct => {
            #[derive(Deserialize)]
            struct Task {
                instruction: String,
                instances: Vec<AlpacaRecord>,
            }
            let mut out = String::new();
            for (line, task) in json_lines::<Task>(text()?)? {
                let [instance] = task.instances.as_slice() else {
                    bail!(
                        "{}: {} instances, expected one",
                        line_no(line),
                        task.instances.len()
                    );
                };
                out += &sft_line(&task.instruction, &instance.input, &instance.output)?;
            }
            out
        }
        Convert::HhRlhf => hh_rlhf(text()?)?,
        Convert::LlamaFactoryDpo => dpo(text()?)?,
    };
    Ok(out.into_bytes())
}

#[derive(Deserialize)]
struct AlpacaRecord {
    #[serde(default)]
    instruction: String,
    #[serde(default)]
    input: String,
    output: String,
}

fn line_no(i: usize) -> String {
    format!("line {}", i + 1)
}

/// Each non-empty line of `text` parsed as a `T`, with its index.
fn json_lines<T: serde::de::DeserializeOwned>(text: &str) -> Result<Vec<(usize, T)>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| Ok((i, serde_json::from_str(l).with_context(|| line_no(i))?)))
        .collect()
}

/// Python's `str.strip()`: Rust's whitespace plus the separators U+001C..U+001F.
fn strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// A JSON string as Python's `json.dumps(s, ensure_ascii=False)` writes it (serde_json
/// escapes the same characters the same way).
fn js(s: &str) -> Result<String> {
    Ok(serde_json::to_string(s)?)
}

/// A message object as `json.dumps` writes it: `{"role": R, "content": C}`.
fn message(role: &str, content: &str) -> Result<String> {
    Ok(format!(
        "{{\"role\": {}, \"content\": {}}}",
        js(role)?,
        js(content)?
    ))
}

/// One SFT JSONL line: the instruction (with a non-empty input after a blank line) as the
/// user turn, the output as the assistant turn, each trimmed.
fn sft_line(instruction: &str, input: &str, output: &str) -> Result<String> {
    let (instruction, input) = (strip(instruction), strip(input));
    let user = if input.is_empty() {
        instruction.to_string()
    } else {
        format!("{instruction}\n\n{input}")
    };
    Ok(format!(
        "{{\"messages\": [{}, {}]}}\n",
        message("user", &user)?,
        message("assistant", strip(output))?
    ))
}

/// One preference JSONL line; `history` holds (role, content) pairs, already trimmed.
fn pref_line(
    prompt: &str,
    history: &[(&str, &str)],
    chosen: &str,
    rejected: &str,
) -> Result<String> {
    let history = history
        .iter()
        .map(|(role, content)| message(role, content))
        .collect::<Result<Vec<_>>>()?;
    Ok(format!(
        "{{\"prompt\": {}, \"history\": [{}], \"chosen\": {}, \"rejected\": {}}}\n",
        js(prompt)?,
        history.join(", "),
        js(chosen)?,
        js(rejected)?
    ))
}

const HUMAN: &str = "\n\nHuman: ";
const ASSISTANT: &str = "\n\nAssistant: ";

/// An HH-RLHF transcript split into its text before the first turn and its turns (as
/// Python's `re.split` on the two markers does).
fn turns(transcript: &str) -> (&str, Vec<(&'static str, &str)>) {
    let next = |s: &str| {
        [(HUMAN, "user"), (ASSISTANT, "assistant")]
            .into_iter()
            .filter_map(|(marker, role)| s.find(marker).map(|at| (at, at + marker.len(), role)))
            .min_by_key(|&(at, _, _)| at)
    };
    // (marker start, marker end, role of the turn it opens)
    let mut markers = Vec::new();
    let mut from = 0;
    while let Some((start, end, role)) = next(&transcript[from..]) {
        markers.push((from + start, from + end, role));
        from += end;
    }
    let Some(&(first, _, _)) = markers.first() else {
        return (transcript, Vec::new());
    };
    let turns = markers
        .iter()
        .enumerate()
        .map(|(k, &(_, end, role))| {
            let stop = markers.get(k + 1).map_or(transcript.len(), |m| m.0);
            (role, &transcript[end..stop])
        })
        .collect();
    (&transcript[..first], turns)
}

/// HH-RLHF pairs → preference JSONL. The turns both transcripts share become `history` +
/// `prompt`, their last assistant replies `chosen` and `rejected`. Dropped: pairs whose
/// transcripts differ before the last turn, whose turns do not alternate user/assistant from
/// a user turn to an assistant reply, or whose chosen reply is empty.
fn hh_rlhf(text: &str) -> Result<String> {
    #[derive(Deserialize)]
    struct Pair {
        chosen: String,
        rejected: String,
    }
    let mut out = String::new();
    for (_, pair) in json_lines::<Pair>(text)? {
        let (chosen_pre, chosen) = turns(&pair.chosen);
        let (rejected_pre, rejected) = turns(&pair.rejected);
        let (Some(((_, chosen_reply), context)), Some((_, rejected_reply))) =
            (chosen.split_last(), rejected.last())
        else {
            continue;
        };
        let alternating = chosen
            .iter()
            .enumerate()
            .all(|(i, (role, _))| *role == if i % 2 == 0 { "user" } else { "assistant" });
        if !chosen_pre.is_empty()
            || !rejected_pre.is_empty()
            || chosen.len() != rejected.len()
            || context != &rejected[..rejected.len() - 1]
            || !alternating
            || chosen.len() % 2 != 0
            || strip(chosen_reply).is_empty()
        {
            continue;
        }
        let Some(((_, prompt), history)) = context.split_last() else {
            continue;
        };
        let history: Vec<(&str, &str)> = history.iter().map(|&(r, c)| (r, strip(c))).collect();
        out += &pref_line(
            strip(prompt),
            &history,
            strip(chosen_reply),
            strip(rejected_reply),
        )?;
    }
    Ok(out)
}

/// LLaMA-Factory's DPO pairs (`conversations` ending with the human turn, `chosen` and
/// `rejected` replies) → preference JSONL.
fn dpo(text: &str) -> Result<String> {
    #[derive(Deserialize)]
    struct Turn {
        from: String,
        value: String,
    }
    #[derive(Deserialize)]
    struct Pair {
        conversations: Vec<Turn>,
        chosen: Turn,
        rejected: Turn,
    }
    let pairs: Vec<Pair> = serde_json::from_str(text)?;
    let role = |from: &str| match from {
        "human" => Ok("user"),
        "gpt" => Ok("assistant"),
        "system" => Ok("system"),
        other => Err(anyhow!("unknown speaker {other:?}")),
    };
    let mut out = String::new();
    for (i, pair) in pairs.iter().enumerate() {
        let Some((last, earlier)) = pair.conversations.split_last() else {
            bail!("pair {i}: no conversation");
        };
        if last.from != "human" {
            bail!(
                "pair {i}: the conversation ends with {:?}, not the user",
                last.from
            );
        }
        let history = earlier
            .iter()
            .map(|t| Ok((role(&t.from)?, strip(&t.value))))
            .collect::<Result<Vec<_>>>()?;
        out += &pref_line(
            strip(&last.value),
            &history,
            strip(&pair.chosen.value),
            strip(&pair.rejected.value),
        )?;
    }
    Ok(out)
}
