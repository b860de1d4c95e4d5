//! SFT and chat end to end on small generated data.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tinygpt::candle::{Device, Tensor};
use tinygpt::chat::{ChatTemplate, Message};
use tinygpt::sft::{prepare_for_chat, reply_stats, Sft, SftDataset};
use tinygpt::{
    model::cross_entropy, Arch, ChatSession, Gpt, GptConfig, Objective, SamplingParams, Tokenizer,
    TrainConfig, TrainEvent, Trainer,
};

const ALPHABET: &str = "abcdefghij +=0123456789\n";

/// A tiny model of `arch`. The Llama one has grouped-query attention (4 query heads sharing 2
/// key/value heads of 8) and an untied head, so growing the vocabulary for the chat tokens
/// grows `lm_head.weight` as well as the embedding.
fn cfg(arch: Arch, vocab_size: usize, block_size: usize) -> GptConfig {
    match arch {
        Arch::Gpt2 => GptConfig {
            vocab_size,
            block_size,
            n_layer: 2,
            n_head: 2,
            n_embd: 32,
            dropout: 0.0,
            bias: true,
            ..Default::default()
        },
        Arch::Llama => GptConfig {
            n_kv_head: Some(2),
            intermediate_size: Some(64),
            tie_word_embeddings: false,
            ..GptConfig::llama(vocab_size, block_size, 2, 4, 32)
        },
    }
}

/// Conversations with a rule a tiny model can learn: the assistant repeats the user's letters
/// reversed.
fn conversations(n: usize, seed: u64) -> Vec<Vec<Message>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(2..6);
            let q: String = (0..len)
                .map(|_| (b'a' + rng.random_range(0..10u8)) as char)
                .collect();
            let a: String = q.chars().rev().collect();
            vec![Message::user(q), Message::assistant(a)]
        })
        .collect()
}

fn plain_loss(model: &Gpt, ids: &[u32]) -> f32 {
    let t = model.config().block_size;
    let x = Tensor::from_slice(&ids[..t], (1, t), &Device::Cpu).unwrap();
    let y = Tensor::from_slice(&ids[1..t + 1], (t,), &Device::Cpu).unwrap();
    let logits = model.forward(&x).unwrap().squeeze(0).unwrap();
    cross_entropy(&logits, &y, None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn adding_chat_tokens_leaves_plain_text_loss_unchanged() {
    check_adding_chat_tokens_leaves_plain_text_loss_unchanged(Arch::Gpt2);
}

#[test]
fn llama_adding_chat_tokens_leaves_plain_text_loss_unchanged() {
    check_adding_chat_tokens_leaves_plain_text_loss_unchanged(Arch::Llama);
}

fn check_adding_chat_tokens_leaves_plain_text_loss_unchanged(arch: Arch) {
    let tok = Tokenizer::train_char(ALPHABET).unwrap();
    let text: String = "abc def 12+3=15\n".repeat(4);
    let ids = tok.encode(&text).unwrap();
    // A model with rows reserved for the chat tokens (what the pretrain example builds).
    let reserved = Gpt::init(&cfg(arch, tok.vocab_size() + 4, 32), 1, &Device::Cpu).unwrap();
    let (chat, chat_tok, _) = prepare_for_chat(&reserved, tok.clone()).unwrap();
    assert_eq!(chat.config().vocab_size, reserved.config().vocab_size); // no growth needed
    assert_eq!(chat_tok.encode(&text).unwrap(), ids);
    let (before, after) = (plain_loss(&reserved, &ids), plain_loss(&chat, &ids));
    assert!((before - after).abs() <= 1e-6, "{before} vs {after}");

    // A model without room grows: logits of old ids are bit-identical.
    let tight = Gpt::init(&cfg(arch, tok.vocab_size(), 32), 1, &Device::Cpu).unwrap();
    let (grown, grown_tok, _) = prepare_for_chat(&tight, tok.clone()).unwrap();
    assert_eq!(grown.config().vocab_size, tok.vocab_size() + 4);
    assert_eq!(grown_tok.vocab_size(), tok.vocab_size() + 4);
    let x = Tensor::from_slice(&ids[..32], (1, 32), &Device::Cpu).unwrap();
    let old = tight.forward(&x).unwrap();
    let new = grown
        .forward(&x)
        .unwrap()
        .narrow(2, 0, tok.vocab_size())
        .unwrap();
    let diff = (old - new)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    // An untied head grows with the embedding.
    let names = grown.tensors();
    if !grown.config().tie_word_embeddings {
        assert_eq!(names["lm_head.weight"].dims(), &[tok.vocab_size() + 4, 32]);
    }
    assert_eq!(
        names[grown.config().embedding_name()].dims(),
        &[tok.vocab_size() + 4, 32]
    );
}

#[test]
fn sft_lowers_held_out_assistant_loss_and_learns_to_stop() {
    check_sft_lowers_held_out_assistant_loss_and_learns_to_stop(Arch::Gpt2);
}

#[test]
fn llama_sft_lowers_held_out_assistant_loss_and_learns_to_stop() {
    check_sft_lowers_held_out_assistant_loss_and_learns_to_stop(Arch::Llama);
}

fn check_sft_lowers_held_out_assistant_loss_and_learns_to_stop(arch: Arch) {
    let tok = Tokenizer::train_char(ALPHABET).unwrap();
    // A tied head: a random untied one (the other tests' Llama) makes some token the greedy
    // choice whatever the input, often a chat token, so replies would end before any training.
    let cfg = GptConfig {
        tie_word_embeddings: true,
        ..cfg(arch, tok.vocab_size() + 4, 32)
    };
    let base = Gpt::init(&cfg, 3, &Device::Cpu).unwrap();
    let (model, tok, template) = prepare_for_chat(&base, tok).unwrap();
    let train_convs = conversations(400, 1);
    let val_convs = conversations(40, 2);
    let (train, _) = SftDataset::new(&train_convs, &tok, &template, 32).unwrap();
    let (val, _) = SftDataset::new(&val_convs, &tok, &template, 32).unwrap();
    let mut sft = Sft::new(model, tok, train, val, 16).unwrap();
    let params = SamplingParams::greedy().with_max_new_tokens(12);
    let before = reply_stats(sft.model(), sft.tokenizer(), &val_convs[..10], &params).unwrap();
    let train_cfg = TrainConfig {
        max_iters: 300,
        eval_interval: 300,
        eval_iters: 3,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_iters: 10,
        lr_decay_iters: 300,
        weight_decay: 0.0,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(train_cfg, sft.parameters().unwrap()).unwrap();
    let mut val_losses = vec![];
    trainer
        .fit(&mut sft, |e| {
            if let TrainEvent::Eval { metrics, .. } = e {
                val_losses.extend(
                    metrics
                        .iter()
                        .filter(|(k, _)| k == "val_loss")
                        .map(|(_, v)| *v),
                );
            }
        })
        .unwrap();
    assert_eq!(val_losses.len(), 2); // before (step 0) and after (step 300)
    assert!(
        val_losses[1] < 0.5 * val_losses[0],
        "held-out loss {val_losses:?}"
    );
    let after = reply_stats(sft.model(), sft.tokenizer(), &val_convs[..10], &params).unwrap();
    assert_eq!(before.ended, 0);
    assert_eq!(after.ended, 10, "{after:?}");
}

#[test]
fn chat_session_keeps_working_past_the_context() {
    check_chat_session_keeps_working_past_the_context(Arch::Gpt2);
}

#[test]
fn llama_chat_session_keeps_working_past_the_context() {
    check_chat_session_keeps_working_past_the_context(Arch::Llama);
}

fn check_chat_session_keeps_working_past_the_context(arch: Arch) {
    let mut tok = Tokenizer::train_char(ALPHABET).unwrap();
    ChatTemplate::add_tokens(&mut tok).unwrap();
    let model = Gpt::init(&cfg(arch, tok.vocab_size(), 24), 5, &Device::Cpu).unwrap();
    let params = SamplingParams::default()
        .with_max_new_tokens(8)
        .with_seed(3);
    let mut session = ChatSession::new(&model, &tok, params).unwrap();
    session.set_system(Some("be cheap".replace("p", "")));
    let mut streamed = String::new();
    for turn in 0..12 {
        streamed.clear();
        let reply = session
            .send(&format!("ab {turn}"), |p| streamed.push_str(p))
            .unwrap();
        assert_eq!(reply, streamed);
    }
    // The history was trimmed to fit 24 tokens; the newest exchange is always kept.
    let h = session.history();
    assert!(h.len() < 24, "{}", h.len());
    assert_eq!(h[h.len() - 2], Message::user("ab 11"));
    // A char the tokenizer does not know is an error, and the history is unchanged.
    let n = session.history().len();
    assert!(session.send("ZZZ", |_| {}).is_err());
    assert_eq!(session.history().len(), n);
}

/// SFT stopped by its stop flag (what Ctrl-C raises) during step 7 and resumed from the state it
/// saved ends with the uninterrupted run's weights and moments, bit for bit; dropout on, so
/// the RNG's state is part of what must come back.
#[test]
fn sft_interrupted_resumes_bit_for_bit() {
    check_sft_interrupted_resumes_bit_for_bit(Arch::Gpt2);
}

#[test]
fn llama_sft_interrupted_resumes_bit_for_bit() {
    check_sft_interrupted_resumes_bit_for_bit(Arch::Llama);
}

fn check_sft_interrupted_resumes_bit_for_bit(arch: Arch) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tinygpt::checkpoint;
    let root = tempfile::tempdir().unwrap();
    let tok = Tokenizer::train_char(ALPHABET).unwrap();
    let base_cfg = GptConfig {
        dropout: 0.1,
        ..cfg(arch, tok.vocab_size() + 4, 32)
    };
    let base = Gpt::init(&base_cfg, 3, &Device::Cpu).unwrap();
    let (model, tok, template) = prepare_for_chat(&base, tok).unwrap();
    let (train, _) = SftDataset::new(&conversations(100, 1), &tok, &template, 32).unwrap();
    let (val, _) = SftDataset::new(&conversations(20, 2), &tok, &template, 32).unwrap();
    let train_cfg = TrainConfig {
        max_iters: 16,
        eval_interval: 5,
        eval_iters: 2,
        log_interval: 1,
        warmup_iters: 2,
        lr_decay_iters: 16,
        ..TrainConfig::default()
    };
    let run = |out: &std::path::Path, from: Option<&std::path::Path>, stop_after: Option<usize>| {
        let (model, tok) = match from {
            Some(from) => checkpoint::load_trainable(from, &Device::Cpu).unwrap(),
            None => (
                Gpt::from_tensors(model.config(), model.tensors(), true).unwrap(),
                tok.clone(),
            ),
        };
        let mut sft = Sft::new(model, tok, train.clone(), val.clone(), 4).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut trainer = Trainer::new(train_cfg.clone(), sft.parameters().unwrap())
            .unwrap()
            .with_out_dir(out)
            .with_stop_flag(stop.clone());
        if let Some(from) = from {
            trainer = trainer.resume_from(from).unwrap();
        }
        trainer
            .fit(&mut sft, |e| {
                if let TrainEvent::Step { step, .. } = e {
                    if Some(*step) == stop_after {
                        stop.store(true, Ordering::SeqCst);
                    }
                }
            })
            .err()
    };
    let full = root.path().join("full");
    assert!(run(&full, None, None).is_none());
    let out = root.path().join("stopped");
    let e = run(&out, None, Some(7)).unwrap();
    assert!(
        matches!(&e, tinygpt::Error::Interrupted { step: 7, saved: Some(p) } if p == &out.join("checkpoint-7")),
        "{e}"
    );
    let from = checkpoint::latest_state(&out).unwrap();
    assert!(run(&out, Some(&from), None).is_none());
    let (a, b) = (
        checkpoint::latest_state(&full).unwrap(),
        checkpoint::latest_state(&out).unwrap(),
    );
    for f in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{f} differs from the uninterrupted run's"
        );
    }
}

/// The logits of `model` on a fixed sequence, as a flat vector.
fn logits(model: &Gpt) -> Vec<f32> {
    let x = Tensor::from_slice(&[1u32, 5, 2, 7, 3, 9, 4, 4], (1, 8), &Device::Cpu).unwrap();
    let l = model.forward(&x).unwrap();
    l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// A Llama checkpoint (GQA, untied head, q/k norms) saves and loads, for inference and for
/// training, to the same logits bit for bit, its `config.json` naming the new fields; a
/// `config.json` of before `arch` existed (no new fields) still loads as the GPT-2 it was.
#[test]
fn llama_checkpoint_round_trip_and_old_configs_load_as_gpt2() {
    use tinygpt::checkpoint;
    let root = tempfile::tempdir().unwrap();
    let tok = Tokenizer::train_char(ALPHABET).unwrap();
    let cfg_llama = GptConfig {
        qk_norm: true,
        ..cfg(Arch::Llama, tok.vocab_size(), 16)
    };
    let model = Gpt::init(&cfg_llama, 7, &Device::Cpu).unwrap();
    let dir = root.path().join("llama");
    std::fs::create_dir_all(&dir).unwrap();
    checkpoint::save_model(&dir, &model, &tok).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["arch"], "llama");
    assert_eq!(config["n_kv_head"], 2);
    assert_eq!(config["tie_word_embeddings"], false);
    assert_eq!(config["qk_norm"], true);
    let want = logits(&model);
    for trainable in [false, true] {
        let (loaded, loaded_tok) = if trainable {
            checkpoint::load_trainable(&dir, &Device::Cpu).unwrap()
        } else {
            checkpoint::load_model(&dir, &Device::Cpu).unwrap()
        };
        assert_eq!(loaded.config(), &cfg_llama);
        assert_eq!(loaded_tok.vocab_size(), tok.vocab_size());
        assert_eq!(loaded.vars().is_ok(), trainable);
        assert!(logits(&loaded) == want, "trainable {trainable}");
        let mut names: Vec<String> = loaded.tensors().into_keys().collect();
        names.sort();
        assert!(names.contains(&"lm_head.weight".to_string()));
        assert!(names.contains(&"model.layers.1.self_attn.k_norm.weight".to_string()));
    }

    // An old GPT-2 config.json: only the fields there were before `arch`.
    let gpt2 = Gpt::init(&cfg(Arch::Gpt2, tok.vocab_size(), 16), 7, &Device::Cpu).unwrap();
    let old = root.path().join("gpt2");
    std::fs::create_dir_all(&old).unwrap();
    checkpoint::save_model(&old, &gpt2, &tok).unwrap();
    let c = gpt2.config();
    let text = format!(
        "{{\"vocab_size\": {}, \"block_size\": {}, \"n_layer\": {}, \"n_head\": {}, \
         \"n_embd\": {}, \"dropout\": 0.0, \"bias\": true}}",
        c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd
    );
    std::fs::write(old.join("config.json"), text).unwrap();
    let (loaded, _) = checkpoint::load_model(&old, &Device::Cpu).unwrap();
    assert_eq!(loaded.config(), c);
    assert_eq!(loaded.config().arch, Arch::Gpt2);
    assert!(logits(&loaded) == logits(&gpt2));
}
