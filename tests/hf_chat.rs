//! Hugging Face directories as checkpoints, and chat models exported with their chat template.
//!
//! `tests/fixtures/hf_gpt2/chat_template.json` comes from `scripts/reference.py
//! chat-template`: transformers' `apply_chat_template` (transformers 5.24, the template
//! tinygpt wrote into `tokenizer_config.json`) on tinygpt's export of the fixture GPT-2
//! (`tests/fixtures/hf_gpt2/model`) with the chat tokens added, for a system message and three
//! turns with `add_generation_prompt=True`, the same without the system message, and a whole
//! conversation without the generation prompt.

mod common;
use common::{fixtures, ids, json, max_abs_diff, model_dir};
use std::path::Path;

use tinygpt::candle::{Device, Tensor};
use tinygpt::chat::{Message, ASSISTANT, END, SYSTEM, USER};
use tinygpt::tokenizer::EOT;
use tinygpt::{checkpoint, sft, ChatTemplate, Gpt, Tokenizer};

/// The fixture GPT-2 with the chat tokens added (as SFT adds them), exported by tinygpt into
/// `dir`. Returns the model and tokenizer that were exported.
fn export_chat_model(dir: &Path) -> (Gpt, Tokenizer) {
    let (base, tokenizer) = checkpoint::load_model(model_dir(), &Device::Cpu).unwrap();
    let (model, tokenizer, _) = sft::prepare_for_chat(&base, tokenizer).unwrap();
    model.save_hf_dir_with_tokenizer(dir, &tokenizer).unwrap();
    (model, tokenizer)
}

#[test]
fn exported_chat_template_gives_transformers_ids() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("chat-hf");
    let (_, exported) = export_chat_model(&dir);
    // The export loads back as a chat model, through the checkpoint loader.
    let (_, tokenizer) = checkpoint::load_model(&dir, &Device::Cpu).unwrap();
    let template = ChatTemplate::new(&tokenizer).unwrap();
    assert_eq!(template, ChatTemplate::new(&exported).unwrap());
    let want = json(&fixtures().join("chat_template.json"));
    let cases = want["conversations"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    let mut with_system = false;
    for (i, case) in cases.iter().enumerate() {
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        with_system |= messages[0].role == tinygpt::Role::System;
        let got = if case["add_generation_prompt"].as_bool().unwrap() {
            template.render_prompt(&tokenizer, &messages).unwrap()
        } else {
            template.render(&tokenizer, &messages).unwrap().ids
        };
        assert_eq!(got, ids(&case["ids"]), "conversation {i}");
        assert_eq!(
            tokenizer.decode(&got).unwrap(),
            case["text"].as_str().unwrap(),
            "conversation {i}"
        );
    }
    assert!(with_system);
    // As `--sft` of the preference stages: a reward model's backbone, a trainable policy.
    let (_, reward_tok) = tinygpt::RewardModel::from_sft(&dir, &Device::Cpu).unwrap();
    assert_eq!(ChatTemplate::new(&reward_tok).unwrap(), template);
    let (policy, _) = checkpoint::load_trainable(&dir, &Device::Cpu).unwrap();
    assert_eq!(policy.config().vocab_size, 1004);
    // The first case is system + user + assistant + user with the open assistant turn.
    let first = ids(&cases[0]["ids"]);
    let role = |r| template.role_id(r);
    assert_eq!(first[0], role(tinygpt::Role::System));
    assert_eq!(first.last(), Some(&role(tinygpt::Role::Assistant)));
    assert_eq!(
        first.iter().filter(|&&id| id == template.end_id()).count(),
        4
    );
}

#[test]
fn export_carries_the_chat_template_and_special_tokens() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("chat-hf");
    let (model, tokenizer) = export_chat_model(&dir);
    assert_eq!(model.config().vocab_size, 1004); // 1000 + 4 new rows
    let id = |t: &str| tokenizer.token_to_id(t).unwrap();
    let specials = [
        (EOT, 999),
        (SYSTEM, 1000),
        (USER, 1001),
        (ASSISTANT, 1002),
        (END, 1003),
    ];
    for (token, want) in specials {
        assert_eq!(id(token), want, "{token}");
    }

    let config = json(&dir.join("tokenizer_config.json"));
    assert_eq!(config["chat_template"], ChatTemplate::JINJA);
    assert_eq!(config["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(config["bos_token"], EOT);
    assert_eq!(config["eos_token"], END);
    assert_eq!(
        config["additional_special_tokens"],
        serde_json::json!([SYSTEM, USER, ASSISTANT, END])
    );
    let decoder = config["added_tokens_decoder"].as_object().unwrap();
    assert_eq!(decoder.len(), 5);
    for (token, want) in specials {
        let entry = &decoder[&want.to_string()];
        assert_eq!(entry["content"], token);
        assert_eq!(entry["special"], true, "{token}");
        assert_eq!(entry["normalized"], false, "{token}");
    }

    let tok_json = json(&dir.join("tokenizer.json"));
    let added = tok_json["added_tokens"].as_array().unwrap();
    for (token, want) in specials {
        let entry = added
            .iter()
            .find(|t| t["content"] == token)
            .unwrap_or_else(|| panic!("{token} not in added_tokens"));
        assert_eq!(entry["id"], want);
        assert_eq!(entry["special"], true, "{token}");
    }
    // The rewritten tokenizer.json is the same tokenizer.
    let back = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let text = "Hello<|user|>world<|end|> 42";
    assert_eq!(back.encode(text).unwrap(), tokenizer.encode(text).unwrap());
    assert!(back.is_special(1003) && back.is_special(999));

    // Generation stops at <|end|> (and <|endoftext|>) in transformers.
    let generation = json(&dir.join("generation_config.json"));
    assert_eq!(generation["eos_token_id"], serde_json::json!([1003, 999]));
    assert_eq!(generation["bos_token_id"], 999);
    assert_eq!(generation["pad_token_id"], 999);
    assert_eq!(
        json(&dir.join("config.json"))["eos_token_id"],
        serde_json::json!([1003, 999])
    );

    // A model without chat tokens gets no template, and <|endoftext|> ends generation.
    let (base, plain) = Gpt::from_hf_dir_with_tokenizer(model_dir(), &Device::Cpu).unwrap();
    let plain_dir = out.path().join("plain-hf");
    base.save_hf_dir_with_tokenizer(&plain_dir, &plain).unwrap();
    let config = json(&plain_dir.join("tokenizer_config.json"));
    assert!(config.get("chat_template").is_none());
    assert!(config.get("additional_special_tokens").is_none());
    assert_eq!(config["eos_token"], EOT);
    assert_eq!(config["added_tokens_decoder"]["999"]["special"], true);
    assert_eq!(
        json(&plain_dir.join("generation_config.json"))["eos_token_id"],
        999
    );
    assert_eq!(json(&plain_dir.join("config.json"))["eos_token_id"], 999);
}

#[test]
fn checkpoint_loaders_accept_hugging_face_dirs() {
    let reference = Gpt::from_hf_dir(model_dir(), &Device::Cpu).unwrap();
    let input = Tensor::new(&[[1u32, 7, 3, 999, 0, 12, 500]], &Device::Cpu).unwrap();
    let want = reference.forward(&input).unwrap();
    assert!(tinygpt::hf::is_hf_dir(model_dir()));

    let (model, tokenizer) = checkpoint::load_model(model_dir(), &Device::Cpu).unwrap();
    assert_eq!(model.config(), reference.config());
    assert_eq!(max_abs_diff(&model.forward(&input).unwrap(), &want), 0.0);
    assert!(model.vars().is_err(), "load_model gives constant weights");
    // vocab.json + merges.txt: GPT-2's first 999 tokens and <|endoftext|>.
    assert_eq!((tokenizer.vocab_size(), tokenizer.eot_id()), (1000, 999));

    let (trainable, tokenizer) = checkpoint::load_trainable(model_dir(), &Device::Cpu).unwrap();
    assert_eq!(
        trainable.vars().unwrap().len(),
        model.named_parameters().len()
    );
    assert_eq!(
        max_abs_diff(&trainable.forward(&input).unwrap(), &want),
        0.0
    );

    // An SFT base from a Hugging Face directory gets the chat tokens: an imported GPT-2 has
    // no reserved rows, so it grows four, and the old tokens' logits stay as they were.
    assert!(ChatTemplate::new(&tokenizer).is_err());
    let (chat, chat_tok, template) = sft::prepare_for_chat(&trainable, tokenizer).unwrap();
    assert_eq!(chat_tok.vocab_size(), 1004);
    assert_eq!(chat.config().vocab_size, 1004);
    assert_eq!(template, ChatTemplate::new(&chat_tok).unwrap());
    assert_eq!(template.end_id(), 1003);
    let logits = chat.forward(&input).unwrap().narrow(2, 0, 1000).unwrap();
    assert_eq!(max_abs_diff(&logits, &want), 0.0);
    let prompt = template
        .render_prompt(&chat_tok, &[Message::user("Who are you?")])
        .unwrap();
    assert_eq!(prompt.first(), Some(&1001));
    assert_eq!(prompt.last(), Some(&1002));
}

#[test]
fn a_directory_that_is_neither_layout_names_what_it_lacks() {
    let dir = tempfile::tempdir().unwrap();
    // A Hugging Face config with weights but no tokenizer.
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(model_dir().join(name), dir.path().join(name)).unwrap();
    }
    let e = checkpoint::load_model(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&*dir.path().to_string_lossy())
            && e.contains("no tokenizer: expected tokenizer.json or vocab.json + merges.txt"),
        "{e}"
    );
    // A tokenizer but no weights.
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    for name in ["vocab.json", "merges.txt"] {
        std::fs::copy(model_dir().join(name), dir.path().join(name)).unwrap();
    }
    let e = checkpoint::load_trainable(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing model.safetensors"), "{e}");
    // No config at all: both layouts are described.
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = checkpoint::load_model(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing config.json") && e.contains("a Hugging Face GPT-2 directory"),
        "{e}"
    );
}
