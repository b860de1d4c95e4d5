//! Hugging Face tokenizers and chat templates, checked against transformers.
//!
//! The fixtures in `tests/fixtures/hf_llama/tokenizers/` come from `scripts/reference.py
//! llama-fixtures` (transformers 5.24, tokenizers 0.23): `llama_bytefallback/` is a
//! Llama-2/TinyLlama-style SentencePiece BPE with byte fallback (`<unk> <s> </s>`, 600 tokens,
//! TinyLlama-Chat's template), `qwen_bytelevel/` a Qwen2.5-style byte-level BPE (603 tokens,
//! `<|endoftext|> <|im_start|> <|im_end|>`, Qwen2.5's template with tools). `expected.json`
//! holds transformers' encodings of tricky texts, `chat.json` its
//! `apply_chat_template` text and ids for conversations, a prompt, tools and tool calls, and
//! a Llama-2 template given inline.

use std::path::PathBuf;

use serde_json::Value;
use tinygpt::chat::Message;
use tinygpt::hf::chat_template::TokenizerConfig;
use tinygpt::hf::load_tokenizer;
use tinygpt::{HfChatTemplate, Role, Tokenizer};

const FIXTURES: [&str; 2] = ["llama_bytefallback", "qwen_bytelevel"];

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf_llama/tokenizers")
        .join(name)
}

fn read(name: &str, file: &str) -> Value {
    let text = std::fs::read_to_string(dir(name).join(file)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenizers_load_at_the_models_size_with_its_eos() {
    for name in FIXTURES {
        let expected = read(name, "expected.json");
        let tok = load_tokenizer(dir(name)).unwrap();
        // Llama's vocabulary has no <|endoftext|>: none is added, </s> ends a text instead.
        assert_eq!(
            tok.vocab_size() as u64,
            expected["vocab_size"].as_u64().unwrap(),
            "{name}"
        );
        let eot = match name {
            // Qwen has <|endoftext|> (its pad token), which stays the document separator.
            "qwen_bytelevel" => tok.token_to_id("<|endoftext|>").unwrap(),
            _ => expected["eos_token_id"].as_u64().unwrap() as u32,
        };
        assert_eq!(tok.eot_id(), eot, "{name}");
    }
    // Without tokenizer_config.json, </s> is still found among the known eos tokens.
    let bare = Tokenizer::from_file(dir("llama_bytefallback").join("tokenizer.json")).unwrap();
    assert_eq!((bare.vocab_size(), bare.eot_id()), (600, 2));
}

#[test]
fn encodings_match_transformers() {
    for name in FIXTURES {
        let tok = load_tokenizer(dir(name)).unwrap();
        let expected = read(name, "expected.json");
        for case in expected["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let got = tok.encode(text).unwrap();
            // transformers' ids without special tokens added (its LlamaTokenizer's Metaspace
            // pre-tokenizer, not the file's normalizer: see `hf::load_tokenizer`).
            let want = ids(&case["input_ids_no_special"]);
            assert_eq!(got, want, "{name}: {text:?}");
            // As transformers decodes them (SentencePiece-style decoding drops the first
            // leading space: " one" decodes to "one").
            let decoded = case["decoded_no_special"].as_str().unwrap();
            assert_eq!(tok.decode(&got).unwrap(), decoded, "{name}: {text:?}");
        }
    }
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn chat_templates_render_as_transformers_does() {
    let mut checked = 0;
    for name in FIXTURES {
        let tok = load_tokenizer(dir(name)).unwrap();
        let config = TokenizerConfig::load(dir(name)).unwrap();
        let own = HfChatTemplate::from_dir(dir(name)).unwrap().unwrap();
        let chat = read(name, "chat.json");
        let raw = std::fs::read_to_string(dir(name).join("chat.json")).unwrap();
        let ordered: minijinja::Value = serde_json::from_str(&raw).unwrap();
        let ordered_cases: Vec<minijinja::Value> = ordered
            .get_attr("conversations")
            .unwrap()
            .try_iter()
            .unwrap()
            .collect();
        for (i, case) in chat["conversations"].as_array().unwrap().iter().enumerate() {
            let label = format!("{name}/{}", case["name"].as_str().unwrap());
            let template = match case.get("chat_template") {
                Some(t) => HfChatTemplate::new(t.as_str().unwrap(), &config).unwrap(),
                None => own.clone(),
            };
            let add = case["add_generation_prompt"].as_bool().unwrap();
            // The case as minijinja values straight from the file, keys in their order (a
            // serde_json::Value would sort them, and `tojson` writes them in order).
            let ordered = &ordered_cases[i];
            let tools = ordered.get_attr("tools").unwrap();
            let tools = (!tools.is_undefined()).then_some(tools);
            let text = template
                .render_value(ordered.get_attr("messages").unwrap(), tools.clone(), add)
                .unwrap();
            assert_eq!(text, case["text"].as_str().unwrap(), "{label}");
            assert_eq!(tok.encode(&text).unwrap(), ids(&case["ids"]), "{label}");
            // Plain messages render the same through the typed API.
            if let Ok(typed) = serde_json::from_value::<Vec<Message>>(case["messages"].clone()) {
                if tools.is_none() {
                    let ids_typed = template.render_ids(&tok, &typed, add).unwrap();
                    assert_eq!(ids_typed, ids(&case["ids"]), "{label}");
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 10);
}

#[test]
fn training_masks_cover_the_assistant_turns() {
    for (name, want) in [
        // TinyLlama's template: "<|assistant|>\n" opens the turn, "</s>\n" closes it.
        ("llama_bytefallback", "Paris. 🗼</s>\n"),
        // Qwen's: "<|im_start|>assistant\n" opens it, "<|im_end|>\n" closes it.
        ("qwen_bytelevel", "Paris. 🗼<|im_end|>\n"),
    ] {
        let tok = load_tokenizer(dir(name)).unwrap();
        let template = HfChatTemplate::from_dir(dir(name)).unwrap().unwrap();
        let chat = read(name, "chat.json");
        let conv = messages(&chat["conversations"][0]["messages"]);
        assert_eq!(conv.last().unwrap().role, Role::Assistant);
        let rendered = template.render_for_training(&tok, &conv).unwrap();
        assert_eq!(
            rendered.ids,
            ids(&chat["conversations"][0]["ids"]),
            "{name}"
        );
        let masked: Vec<u32> = rendered
            .ids
            .iter()
            .zip(&rendered.mask)
            .filter(|(_, &m)| m == 1)
            .map(|(&id, _)| id)
            .collect();
        assert_eq!(tok.decode(&masked).unwrap(), want, "{name}");
        // The masked tokens are one run at the end.
        let first = rendered.mask.iter().position(|&m| m == 1).unwrap();
        assert!(rendered.mask[first..].iter().all(|&m| m == 1), "{name}");
    }
}

#[test]
fn a_template_that_rewrites_earlier_turns_cannot_mark_them() {
    let tok = load_tokenizer(dir("qwen_bytelevel")).unwrap();
    // Like Qwen3's, which drops the reasoning of earlier replies: only the last reply is
    // written whole.
    let source = "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and not loop.last %}(earlier){% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let config = TokenizerConfig {
        source: "qwen3-like".into(),
        ..Default::default()
    };
    let template = HfChatTemplate::new(source, &config).unwrap();
    let conv = [
        Message::user("a"),
        Message::assistant("b"),
        Message::user("c"),
        Message::assistant("d"),
    ];
    match template.render_for_training(&tok, &conv) {
        Err(tinygpt::Error::ChatTemplate { name, msg }) => {
            assert_eq!(name, "qwen3-like");
            assert!(msg.contains("message 1"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}
