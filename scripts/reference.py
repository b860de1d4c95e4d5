#!/usr/bin/env python3
"""Reference values for tinygpt's Hugging Face GPT-2 support, from PyTorch + transformers.

Optional: CI never runs this; the tests compare against the fixtures it committed. Only
`fixtures` and `check` need PyTorch; the other subcommands need numpy, safetensors and
transformers (tokenizer and config classes) only.

    python scripts/reference.py fixtures
        Builds a small random GPT-2 (2 layers, n_embd 64, 4 heads, vocab 1000, n_positions 128)
        with non-zero biases and LayerNorm parameters, and writes under tests/fixtures/hf_gpt2/:
          model/                 config.json + model.safetensors (save_pretrained) and a
                                 1000-token GPT-2 tokenizer (vocab.json + merges.txt: OpenAI's
                                 first 999 tokens and 743 merges, then <|endoftext|> = 999)
          logits.safetensors     input ids and transformers' logits: batch 2 x 16 tokens and
                                 batch 1 x 128 tokens (the whole context)
          greedy.json            a prompt and transformers' 20-token greedy continuation
          gpt2_tokenizer.json    GPT-2 tokenizer ids (OpenAI's files) of a mixed text and of
                                 the first 10,000 characters of Tiny Shakespeare

    python scripts/reference.py check DIR --logits FILE
        Loads DIR (written by tinygpt's `Gpt::save_hf_dir`) with
        transformers.GPT2LMHeadModel.from_pretrained, runs FILE's `input_ids` and prints the
        max abs difference to FILE's `logits` (tinygpt's). FILE is what
        `cargo run --release --example hf_export -- ... --logits FILE` writes. If DIR has a
        tokenizer, AutoTokenizer must load it and encode FILE's text as tinygpt did.

    python scripts/reference.py random-124m DIR [--seed 1337] [--data DATA]
        Writes a Hugging Face GPT-2 124M directory with random weights (GPT2Config()
        defaults; GPT-2's initialisation: weights N(0, 0.02), the residual projections
        N(0, 0.02 / sqrt(2 n_layer)), biases 0, LayerNorm 1 and 0; numpy, seeded) and OpenAI's
        tokenizer (tokenizer.json, vocab.json, merges.txt), without PyTorch: a real GPT-2's
        layout to fine-tune (`sft --base DIR`) or sample (`generate --ckpt DIR`) offline.

    python scripts/reference.py chat-template [--export DIR --ids FILE]
        Exports the fixture model with the chat tokens added (`hf_export --ckpt
        tests/fixtures/hf_gpt2/model --add-chat-tokens --chat-ids FILE`, run through cargo
        unless --export and --ids name such an export), checks that transformers'
        `apply_chat_template` gives tinygpt's ids, and writes transformers' ids to
        tests/fixtures/hf_gpt2/chat_template.json.

    python scripts/reference.py check-chat DIR --ids FILE
        The same check on any export: FILE is what `hf_export --chat-ids FILE` wrote;
        AutoTokenizer.from_pretrained(DIR).apply_chat_template on each of its conversations
        must give tinygpt's ids, and `<|end|>` must end generation (generation_config.json).
        Exits 1 on a mismatch.

    python scripts/reference.py llama-fixtures [--data DATA]
        Writes tests/fixtures/hf_llama/: three random f32 models in Hugging Face layout
        (save_pretrained: config.json, model.safetensors, generation_config.json with the eos
        ids), RMSNorm weights 1 + 0.2 randn, biases 0.1 randn, other weights 0.15 randn:
          llama/   LlamaForCausalLM: vocab 97, hidden 48, 2 layers, 4 heads, 2 kv heads (GQA),
                   intermediate 88, rope_theta 5000, untied lm_head, eos [2, 3], bos 1
          qwen2/   Qwen2ForCausalLM: vocab 101, hidden 32, 4 heads, 2 kv heads, intermediate 56,
                   rope_theta 1e6, q/k/v biases, tied embeddings; saved in 3 shards
                   (model.safetensors.index.json + model-0000i-of-00003.safetensors)
          qwen3/   Qwen3ForCausalLM: vocab 83, hidden 48, 4 heads x head_dim 16 (64 != 48),
                   2 kv heads, intermediate 72, rope_theta 20000, q_norm/k_norm, tied
        and in each: expected.safetensors (input_ids (2, 11) with the eager forward's logits
        (2, 11, V); input_long (1, 64), the whole context, with logits_long) and greedy.json (a
        5-id prompt, its 20-token greedy continuation recomputing the whole sequence each
        step, equal to model.generate's, without eos ids, and the smallest top-1/top-2 gap).
        Then two small tokenizers under tokenizers/, trained (tokenizers library) on Tiny
        Shakespeare's first 200 kB and a few lines of tang_poems.txt (from --data, else data/,
        else ../shared/data):
          llama_bytefallback/  Llama-2 / TinyLlama layout: <unk> <s> </s>, <0x00>..<0xFF>, BPE
                   with byte_fallback (600 tokens), normalizer Prepend("▁") + Replace(" ", "▁"),
                   decoder Replace + ByteFallback + Fuse + Strip; tokenizer_config.json
                   (LlamaTokenizer, add_bos_token, TinyLlama-chat's template), special_tokens_map.json
          qwen_bytelevel/      Qwen2 layout: NFC, Qwen2's split regex + ByteLevel, byte-level BPE
                   (600) + <|endoftext|> <|im_start|> <|im_end|>; tokenizer_config.json
                   (Qwen2Tokenizer, Qwen2.5-Instruct's ChatML template, eos <|im_end|>)
        each with expected.json (AutoTokenizer's ids of a few texts with and without special
        tokens, tokens, decodes; tokenizers_ids: what the bare tokenizers library makes of
        tokenizer.json, which transformers 5's LlamaTokenizer does not follow: it rebuilds
        its own Metaspace pre-tokenizer) and chat.json (apply_chat_template's text and ids).

    python scripts/reference.py check-llama DIR --expected FILE
        Loads DIR (written by tinygpt's `save_hf_dir`) with AutoModelForCausalLM
        (attn_implementation="eager"), runs FILE's `input_ids` (and `input_long` if present)
        and prints the max abs difference to FILE's `logits` (`logits_long`); exits 1 above
        1e-4. FILE is a safetensors file with tinygpt's logits.

    python scripts/reference.py lora-fixture
        Writes tests/fixtures/hf_llama/lora/ (after llama-fixtures: it adapts llama/): a PEFT
        LoRA adapter, LoraConfig(r=4, lora_alpha=8, lora_dropout=0, every q/k/v/o/gate/up/down
        projection), lora_A and lora_B set to 0.2 randn (PEFT starts lora_B at 0), written by
        save_pretrained (adapter_config.json, adapter_model.safetensors), and
        expected.safetensors: llama/'s input_ids with logits (through the adapter),
        logits_merged (after merge_and_unload) and logits_base (without it). Then check-lora.

    python scripts/reference.py check-lora BASE ADAPTER --expected FILE
        Loads BASE with AutoModelForCausalLM, applies the PEFT adapter directory ADAPTER
        (written by tinygpt: adapter_config.json + adapter_model.safetensors) with
        PeftModel.from_pretrained, runs FILE's `input_ids` and compares with FILE's `logits`,
        then merge_and_unload() and compares again; exits 1 above 1e-4.

Setup (outside the repository): python3 -m venv /work/venv &&
/work/venv/bin/pip install torch transformers safetensors (numpy transformers safetensors
without torch for the subcommands that need no model). Uses 2 threads and fixed seeds, so it
is deterministic. The OpenAI tokenizer files (gpt2_encoder.json, gpt2_vocab.bpe) and Tiny
Shakespeare are read from --data DIR if given, else the repository's data/ (where
`cargo run --release --example fetch_data -- gpt2_encoder.json gpt2_vocab.bpe` puts them),
else ../shared/data; a subcommand that finds none of them exits before writing anything.
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "hf_gpt2"
EOT = "<|endoftext|>"

# The mixed text of the tokenizer check: English with leading spaces, code, Chinese, emoji,
# runs of spaces and newlines, and the special token.
MIXED_TEXT = (
    "Hello world! It's a test: don't panic, we'll see.  Two  spaces, three   spaces.\n"
    "   Leading spaces and a tab\there.\n\n\n"
    "def greet(name):\n    return f\"Hello, {name}!\"  # code, 4-space indent\n\n"
    "中文分词测试：床前明月光，疑是地上霜。\n"
    "Emoji 🦀👍🏽 and 👨‍👩‍👧 family; accents: naïve café Ελληνικά.\n"
    "numbers 12345 67.89 and CAPS LOCK\r\n"
    "end of doc one<|endoftext|>doc two starts     \n\n  \n"
    "trailing spaces   "
)
SHAKESPEARE_CHARS = 10_000
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_FIXTURE = FIXTURES / "chat_template.json"


TOKENIZER_FILES = ("gpt2_encoder.json", "gpt2_vocab.bpe")


def find_data(given, names):
    """The directory holding every file in `names`: `given` (--data) if set, else the
    repository's data/, else ../shared/data. Exits with how to fetch them if none has them."""
    dirs = [given] if given is not None else [ROOT / "data", ROOT.parent / "shared" / "data"]
    for d in dirs:
        if all((d / n).is_file() for n in names):
            return d
    sys.exit(
        f"error: {', '.join(names)}: not all found in {' or '.join(str(d) for d in dirs)}. "
        f"Fetch them into the repository's data/ with\n"
        f"  cargo run --release --example fetch_data -- {' '.join(names)}\n"
        f"(run in {ROOT}), or pass --data DIR naming a directory that has them.")


def seed_everything(seed):
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(2)


def hf_gpt2_tokenizer(vocab_json, merges_txt):
    """transformers' GPT-2 tokenizer from a vocab.json + merges.txt pair, loaded the way a
    downloaded model directory is (`from_pretrained` on a directory holding both)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(vocab_json, Path(tmp) / "vocab.json")
        shutil.copy(merges_txt, Path(tmp) / "merges.txt")
        (Path(tmp) / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
        return AutoTokenizer.from_pretrained(tmp)


class OpenAIEncoder:
    """OpenAI's own GPT-2 BPE (`gpt-2/src/encoder.py`), written out again as the independent
    reference; `<|endoftext|>` in the text is the special token 50256, as in tiktoken."""

    def __init__(self, encoder_json, vocab_bpe):
        import regex

        self.regex = regex
        self.PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
        self.encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")[1:]
        self.ranks = {tuple(l.split(" ")): i for i, l in enumerate(l for l in lines if l)}
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        self.byte_encoder = dict(zip(bs, map(chr, cs)))

    @lru_cache(maxsize=None)
    def bpe(self, token):
        word = tuple(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text):
        ids = []
        for k, doc in enumerate(text.split(EOT)):
            if k > 0:
                ids.append(self.encoder[EOT])
            for piece in self.regex.findall(self.PAT, doc):
                mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                ids.extend(self.encoder[t] for t in self.bpe(mapped))
        return ids


def tiny_gpt2_tokenizer_files(data_dir, out_dir, vocab_size=1000):
    """OpenAI's GPT-2 vocabulary cut to its first vocab_size - 1 tokens (256 bytes + merges,
    each merge's result has id 256 + its rank) plus <|endoftext|> as the last id."""
    encoder = json.loads((data_dir / "gpt2_encoder.json").read_text(encoding="utf-8"))
    lines = (data_dir / "gpt2_vocab.bpe").read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#version")
    merges = [tuple(l.split(" ")) for l in lines[1:] if l]
    n_merges = vocab_size - 1 - 256
    by_id = {i: t for t, i in encoder.items()}
    vocab = {by_id[i]: i for i in range(vocab_size - 1)}
    for rank, (a, b) in enumerate(merges[:n_merges]):
        assert encoder[a + b] == 256 + rank, (a, b, rank)
        assert a in vocab and b in vocab
    vocab[EOT] = vocab_size - 1
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges[:n_merges])
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")
    return hf_gpt2_tokenizer(out_dir / "vocab.json", out_dir / "merges.txt")


def random_gpt2(seed):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    seed_everything(seed)
    cfg = GPT2Config(
        vocab_size=1000,
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=999,
        eos_token_id=999,
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                else:
                    p.copy_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("wte.weight"):
                p.copy_(0.2 * torch.randn_like(p))
            else:  # wpe, c_attn, c_proj, c_fc weights
                p.copy_(0.15 * torch.randn_like(p))
    model.eval()
    return model


def greedy(model, prompt_ids, n):
    """Greedy decoding by recomputing the whole sequence each step (no cache), with the
    top-1/top-2 logit gap of every step (a small gap would make the test fragile)."""
    import torch

    torch.set_grad_enabled(False)
    ids = list(prompt_ids)
    gaps = []
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        top = torch.topk(logits, 2)
        gaps.append(float(top.values[0] - top.values[1]))
        ids.append(int(torch.argmax(logits)))
    return ids[len(prompt_ids):], gaps


def write_fixtures(data_dir):
    import torch
    from safetensors.torch import save_file

    model_dir = FIXTURES / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = tiny_gpt2_tokenizer_files(data_dir, model_dir)
    model = random_gpt2(seed=1234)
    model.save_pretrained(model_dir, safe_serialization=True)
    gen_cfg = model_dir / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()  # not needed by tinygpt or the tests

    # Logits for fixed inputs: a batch of 2, and the whole context.
    g = torch.Generator().manual_seed(42)
    input_a = torch.randint(0, 1000, (2, 16), generator=g)
    input_b = torch.randint(0, 1000, (1, 128), generator=g)
    with torch.no_grad():
        logits_a = model(input_a).logits.contiguous()
        logits_b = model(input_b).logits.contiguous()
    save_file(
        {"input_a": input_a, "logits_a": logits_a, "input_b": input_b, "logits_b": logits_b},
        FIXTURES / "logits.safetensors",
        metadata={"format": "pt", "source": "scripts/reference.py fixtures"},
    )

    prompt = "The meaning of life is"
    prompt_ids = tok(prompt)["input_ids"]
    continuation, gaps = greedy(model, prompt_ids, 20)
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=20,
            min_new_tokens=20,
            pad_token_id=0,
        )[0, len(prompt_ids):].tolist()
    assert generated == continuation, (generated, continuation)
    (FIXTURES / "greedy.json").write_text(
        json.dumps(
            {
                "prompt": prompt,
                "prompt_ids": prompt_ids,
                "continuation_ids": continuation,
                "min_top2_gap": min(gaps),
            },
            indent=1,
        )
        + "\n"
    )

    # The real GPT-2 tokenizer from OpenAI's files: transformers' and OpenAI's encoder agree.
    fast = hf_gpt2_tokenizer(data_dir / "gpt2_encoder.json", data_dir / "gpt2_vocab.bpe")
    slow = OpenAIEncoder(data_dir / "gpt2_encoder.json", data_dir / "gpt2_vocab.bpe")
    assert len(fast) == 50257 and fast.convert_tokens_to_ids(EOT) == 50256
    shakespeare = (data_dir / "tinyshakespeare.txt").read_bytes().decode("utf-8")[:SHAKESPEARE_CHARS]
    ids = {}
    for key, text in [("mixed", MIXED_TEXT), ("shakespeare", shakespeare)]:
        a, b = fast(text)["input_ids"], slow.encode(text)
        assert a == b, key
        assert fast.decode(a) == text, key
        ids[key] = a
    assert ids["mixed"].count(50256) == 1
    (FIXTURES / "gpt2_tokenizer.json").write_text(
        json.dumps(
            {
                "mixed_text": MIXED_TEXT,
                "mixed_ids": ids["mixed"],
                "shakespeare_chars": SHAKESPEARE_CHARS,
                "shakespeare_ids": ids["shakespeare"],
            },
            ensure_ascii=False,
        )
        + "\n",
        encoding="utf-8",
    )

    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    print(f"fixtures in {FIXTURES.relative_to(ROOT)}: {total / 1e6:.2f} MB")
    print(f"greedy continuation {continuation}, smallest top-1/top-2 logit gap {min(gaps):.4f}")
    print(f"tokenizer: mixed text {len(ids['mixed'])} ids, shakespeare {len(ids['shakespeare'])} ids")


def check(model_dir, logits_file):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, GPT2LMHeadModel

    torch.set_grad_enabled(False)
    torch.set_num_threads(2)
    model = GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation="eager")
    model.eval()
    ref = load_file(logits_file)
    ours = ref["logits"]
    theirs = model(ref["input_ids"].long()).logits
    diff = (theirs - ours).abs().max().item()
    print(f"{model_dir}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"input {tuple(ref['input_ids'].shape)}")
    print(f"max |transformers - tinygpt| logits = {diff:.3e}")
    ok = diff <= 1e-4
    if (Path(model_dir) / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(model_dir)
        meta = json.loads((Path(logits_file).with_suffix(".json")).read_text(encoding="utf-8"))
        got = tok(meta["text"])["input_ids"]
        same = got == meta["ids"]
        print(f"AutoTokenizer ({type(tok).__name__}) ids equal tinygpt's on {len(meta['ids'])} tokens: {same}")
        ok = ok and same
    if not ok:
        sys.exit(1)


def write_random_124m(out, data_dir, seed):
    """GPT-2 124M in Hugging Face layout with GPT-2's random initialisation, without torch."""
    import numpy as np
    from safetensors.numpy import save_file
    from transformers import GenerationConfig, GPT2Config

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        sys.exit(f"{out} is not empty: choose a new directory")
    # Written into a temporary sibling and renamed at the end: a failure leaves no half-written
    # DIR behind.
    out.parent.mkdir(parents=True, exist_ok=True)
    final, out = out, Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        n = _write_random_124m(out, data_dir, seed, np, save_file, GenerationConfig, GPT2Config)
        if final.exists():
            final.rmdir()  # empty, checked above
        os.chmod(out, 0o755)  # mkdtemp makes it owner-only
        out.rename(final)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    print(f"{final}: random GPT-2 124M ({n:,} parameters, seed {seed}), OpenAI's tokenizer; "
          f"files: {', '.join(sorted(p.name for p in final.iterdir()))}")


def _write_random_124m(out, data_dir, seed, np, save_file, GenerationConfig, GPT2Config):
    cfg = GPT2Config()
    cfg.architectures = ["GPT2LMHeadModel"]
    rng = np.random.default_rng(seed)
    std = cfg.initializer_range
    proj_std = std / math.sqrt(2 * cfg.n_layer)  # GPT-2's scaled residual projections
    c, inner = cfg.n_embd, 4 * cfg.n_embd

    def normal(shape, s):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(s)

    zeros, ones = (lambda n: np.zeros(n, np.float32)), (lambda n: np.ones(n, np.float32))
    t = {
        "transformer.wte.weight": normal((cfg.vocab_size, c), std),
        "transformer.wpe.weight": normal((cfg.n_positions, c), std),
    }
    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}."
        t[h + "ln_1.weight"], t[h + "ln_1.bias"] = ones(c), zeros(c)
        t[h + "attn.c_attn.weight"], t[h + "attn.c_attn.bias"] = normal((c, 3 * c), std), zeros(3 * c)
        t[h + "attn.c_proj.weight"], t[h + "attn.c_proj.bias"] = normal((c, c), proj_std), zeros(c)
        t[h + "ln_2.weight"], t[h + "ln_2.bias"] = ones(c), zeros(c)
        t[h + "mlp.c_fc.weight"], t[h + "mlp.c_fc.bias"] = normal((c, inner), std), zeros(inner)
        t[h + "mlp.c_proj.weight"], t[h + "mlp.c_proj.bias"] = normal((inner, c), proj_std), zeros(c)
    t["transformer.ln_f.weight"], t["transformer.ln_f.bias"] = ones(c), zeros(c)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(out)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id).save_pretrained(out)
    os.chmod(out / "model.safetensors", 0o644)  # safetensors writes it for its owner only
    shutil.copyfile(data_dir / "gpt2_encoder.json", out / "vocab.json")
    shutil.copyfile(data_dir / "gpt2_vocab.bpe", out / "merges.txt")
    tok = hf_gpt2_tokenizer(out / "vocab.json", out / "merges.txt")
    assert len(tok) == 50257 and tok.convert_tokens_to_ids(EOT) == 50256
    tok.save_pretrained(out)
    return sum(a.size for a in t.values())


def chat_ids(tok, messages, add_generation_prompt):
    """transformers' ids of a conversation, as a plain list (transformers 4 returns a list,
    5 a BatchEncoding)."""
    out = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(i) for i in out]


def compare_chat(export_dir, ids_file):
    """Checks export_dir's chat template against tinygpt's ids in ids_file; returns
    (ok, transformers' cases)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(export_dir)
    want = json.loads(Path(ids_file).read_text(encoding="utf-8"))
    ok = True
    special = {t: tok.convert_tokens_to_ids(t) for t in CHAT_TOKENS + [EOT]}
    not_special = [t for t in special if t not in tok.all_special_tokens]
    print(f"{export_dir}: {type(tok).__name__}, {len(tok)} tokens; special tokens {special}")
    if not_special:
        print(f"  not special tokens for transformers: {not_special}")
        ok = False
    # What `generate` stops at: the directory's generation config (or config.json's ids).
    try:
        eos = GenerationConfig.from_pretrained(export_dir).eos_token_id
    except OSError:
        eos = GenerationConfig.from_model_config(AutoConfig.from_pretrained(export_dir)).eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    print(f"  generate stops at eos_token_id {eos}")
    if special["<|end|>"] not in eos:
        print(f"  eos_token_id {eos} lacks <|end|> = {special['<|end|>']}: generate would not stop at it")
        ok = False
    cases = []
    for i, case in enumerate(want["conversations"]):
        got = chat_ids(tok, case["messages"], case["add_generation_prompt"])
        same = got == case["ids"]
        roles = "+".join(m["role"] for m in case["messages"])
        print(f"  conversation {i} ({roles}, add_generation_prompt={case['add_generation_prompt']}): "
              f"{len(got)} ids, equal to tinygpt's: {same}")
        if not same:
            first = next((k for k, (a, b) in enumerate(zip(got, case["ids"])) if a != b), min(len(got), len(case["ids"])))
            print(f"    first difference at {first}: transformers {got[first:first + 8]}, tinygpt {case['ids'][first:first + 8]}")
            print(f"    transformers' text: {tok.decode(got)!r}")
            ok = False
        cases.append({**case, "ids": got, "text": tok.decode(got)})
    print("check-chat: " + ("OK" if ok else "MISMATCH"))
    return ok, cases


def write_chat_fixture(export_dir, ids_file):
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        if export_dir is None:
            export_dir, ids_file = Path(tmp) / "export", Path(tmp) / "chat_ids.json"
            cmd = ["cargo", "run", "--release", "--features", "server", "--example", "hf_export", "--",
                   "--ckpt", str(FIXTURES / "model"), "--add-chat-tokens", "--out", str(export_dir),
                   "--chat-ids", str(ids_file)]
            print(" ".join(cmd))
            subprocess.run(cmd, cwd=ROOT, check=True)
        ok, cases = compare_chat(export_dir, ids_file)
        if not ok:
            sys.exit(1)
    text = json.dumps(
        {
            "source": "scripts/reference.py chat-template: transformers' apply_chat_template on "
                      "tinygpt's export of tests/fixtures/hf_gpt2/model with the chat tokens added",
            "transformers_version": transformers.__version__,
            "conversations": cases,
        },
        indent=1,
        ensure_ascii=False,
    )
    # Each id list on one line.
    text = re.sub(r"\[[\d,\s]+\]", lambda m: json.dumps(json.loads(m.group(0))), text)
    CHAT_FIXTURE.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {CHAT_FIXTURE.relative_to(ROOT)}")



LLAMA_FIXTURES = ROOT / "tests" / "fixtures" / "hf_llama"

# The three families of `llama-fixtures`: odd sizes (vocab not a multiple of 64, GQA, an
# untied lm_head for llama, q/k/v biases for qwen2, head_dim * n_head != hidden for qwen3).
LLAMA_FAMILIES = {
    "llama": dict(
        cls="Llama", seed=2024, shard=None,
        config=dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=88, rope_theta=5000.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, max_position_embeddings=64, attention_bias=False,
                    mlp_bias=False, bos_token_id=1, eos_token_id=[2, 3])),
    "qwen2": dict(
        cls="Qwen2", seed=2025, shard="40KB",
        config=dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=56, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=True, use_sliding_window=False, max_position_embeddings=64,
                    bos_token_id=99, eos_token_id=[100, 99])),
    "qwen3": dict(
        cls="Qwen3", seed=2026, shard=None,
        config=dict(vocab_size=83, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, intermediate_size=72, rope_theta=20000.0,
                    rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
                    max_position_embeddings=64, bos_token_id=None, eos_token_id=82)),
}
LLAMA_TOLERANCE = 1e-4


def random_llama(family, seed):
    """A random model of `family` (a LLAMA_FAMILIES key) with informative weights: RMSNorm
    weights 1 + 0.2 randn, biases 0.1 randn, every other weight 0.15 randn (logits O(1-5))."""
    import torch
    import transformers

    spec = LLAMA_FAMILIES[family]
    seed_everything(seed)
    cfg = getattr(transformers, spec["cls"] + "Config")(**spec["config"])
    model = getattr(transformers, spec["cls"] + "ForCausalLM")(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.eval()
    return model


def eos_list(model):
    eos = model.generation_config.eos_token_id
    return [] if eos is None else (eos if isinstance(eos, list) else [eos])


def greedy_case(model, seed, n=20, prompt_len=5, min_gap=1e-3, min_distinct=6, tries=200):
    """A prompt of `prompt_len` random ids (no bos/eos ids) whose `n`-token greedy continuation
    (whole sequence recomputed each step) has no eos id, at least `min_distinct` different ids
    (not one id repeated) and a top-1/top-2 gap >= min_gap at every step, checked against
    `model.generate`. Tries seeds seed, seed + 1, ..."""
    import torch

    vocab = model.config.vocab_size
    avoid = set(eos_list(model)) | {model.config.bos_token_id}
    for k in range(tries):
        g = torch.Generator().manual_seed(seed + k)
        prompt = [int(i) for i in torch.randperm(vocab, generator=g).tolist() if i not in avoid][:prompt_len]
        continuation, gaps = greedy(model, prompt, n)
        if min(gaps) < min_gap or avoid & set(continuation) or len(set(continuation)) < min_distinct:
            continue
        with torch.no_grad():
            generated = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=0,
            )[0, len(prompt):].tolist()
        assert generated == continuation, (generated, continuation)
        return {"prompt_seed": seed + k, "prompt_ids": prompt, "continuation_ids": continuation,
                "min_top2_gap": min(gaps)}
    sys.exit(f"no greedy prompt with a top-2 gap >= {min_gap}, no eos and {min_distinct} distinct ids "
             f"in {tries} tries")


def write_llama_models():
    import torch
    from safetensors.torch import save_file

    for family, spec in LLAMA_FAMILIES.items():
        out = LLAMA_FIXTURES / family
        if out.exists():
            shutil.rmtree(out)
        model = random_llama(family, spec["seed"])
        cfg = model.config
        kwargs = {"max_shard_size": spec["shard"]} if spec["shard"] else {}
        model.save_pretrained(out, safe_serialization=True, **kwargs)
        for f in out.iterdir():
            os.chmod(f, 0o644)  # safetensors writes its files for their owner only
        # The eager forward (the attention tinygpt computes), reloaded from the files written.
        model = getattr(__import__("transformers"), spec["cls"] + "ForCausalLM").from_pretrained(
            out, attn_implementation="eager")
        model.eval()
        g = torch.Generator().manual_seed(spec["seed"] + 1)
        input_ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=g)
        input_long = torch.randint(0, cfg.vocab_size, (1, cfg.max_position_embeddings), generator=g)
        with torch.no_grad():
            logits = model(input_ids).logits.contiguous()
            logits_long = model(input_long).logits.contiguous()
        save_file(
            {"input_ids": input_ids, "logits": logits, "input_long": input_long, "logits_long": logits_long},
            out / "expected.safetensors",
            metadata={"format": "pt"},  # one key: safetensors writes a map's keys in random order
        )
        os.chmod(out / "expected.safetensors", 0o644)
        case = greedy_case(model, spec["seed"] + 2)
        (out / "greedy.json").write_text(json.dumps(case, indent=1) + "\n")
        n = sum(p.numel() for p in model.parameters())
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"{family}: {type(model).__name__}, {n:,} parameters, {size / 1e3:.0f} kB in "
              f"{len(list(out.iterdir()))} files; max |logit| {logits.abs().max():.2f} "
              f"(long {logits_long.abs().max():.2f}); greedy {case['continuation_ids']}, "
              f"smallest top-2 gap {case['min_top2_gap']:.4f}")


def check_llama(model_dir, expected_file):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    model.eval()
    ref = load_file(expected_file)
    print(f"{model_dir}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters")
    ok = True
    for ids_key, logits_key in [("input_ids", "logits"), ("input_long", "logits_long")]:
        if ids_key not in ref:
            continue
        theirs = model(ref[ids_key].long()).logits
        if theirs.shape != ref[logits_key].shape:
            print(f"  {ids_key} {tuple(ref[ids_key].shape)}: transformers' logits {tuple(theirs.shape)}, "
                  f"FILE's {tuple(ref[logits_key].shape)}")
            ok = False
            continue
        diff = (theirs - ref[logits_key].float()).abs().max().item()
        print(f"  {ids_key} {tuple(ref[ids_key].shape)}: max |transformers - FILE| logits = {diff:.3e}")
        ok = ok and diff <= LLAMA_TOLERANCE
    print("check-llama: " + ("OK" if ok else f"MISMATCH (tolerance {LLAMA_TOLERANCE})"))
    if not ok:
        sys.exit(1)


TOKENIZER_FIXTURES = LLAMA_FIXTURES / "tokenizers"
TOKENIZER_TRAIN_BYTES = 200_000

# TinyLlama-1.1B-Chat-v1.0's chat template (Zephyr style); transformers renders it with
# trim_blocks and lstrip_blocks, so the newlines after its tags are not in the output.
TINYLLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)

# Llama-2-chat's template ([INST] / <<SYS>>, bos_token in the text, raise_exception, .strip()).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Qwen2.5-Instruct's chat template (ChatML, the default system prompt, tools and tool calls).
QWEN25_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen2's pre-tokenizer split (its tokenizer.json), then byte-level without a regex.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

TOKENIZER_TEXTS = [
    "Hello world! It's a test: don't panic, we'll see.",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "床前明月光，疑是地上霜。",
    "Emoji 🦀👍🏽 and 👨‍👩‍👧 family",
    "naïve café Ελληνικά ß — “quotes” ~ {braces} | \\ ` @ # $ % ^",
    "   leading and trailing spaces   ",
    " one leading space",
    "line one\n\nline two\r\n\ttabbed\n",
    "numbers 12345 67.89 and CAPS",
    "",
    " ",
]
CHAT_MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France? 床前明月光"},
    {"role": "assistant", "content": "Paris. 🗼"},
]
QWEN_TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city, e.g. \"Paris\" <now> & later",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市"}},
                       "required": ["city"]},
    },
}]
QWEN_TOOL_CALL = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
]


def tokenizer_corpus(data_dir):
    """The training text: Tiny Shakespeare's first TOKENIZER_TRAIN_BYTES bytes as lines, then
    the first 10 lines of tang_poems.txt and its lines with 明月光 (so 明月光 are in the
    vocabulary, 床前 are not)."""
    text = (data_dir / "tinyshakespeare.txt").read_bytes()[:TOKENIZER_TRAIN_BYTES].decode("utf-8", errors="ignore")
    tang = (data_dir / "tang_poems.txt").read_text(encoding="utf-8").splitlines()
    return text.splitlines() + tang[:10] + [l for l in tang if "明月光" in l]


def added_token(content, id_, normalized=False):
    return {"id": id_, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": normalized, "special": True}


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_llama_tokenizer(lines, out):
    """Llama-2 / TinyLlama layout: <unk> <s> </s>, the 256 <0xNN> byte tokens, then BPE pieces
    (trained with ▁ word starts, as SentencePiece); normalizer Prepend("▁") + Replace(" ",
    "▁"), no pre-tokenizer, byte_fallback, decoder Replace + ByteFallback + Fuse + Strip."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    # The 100 most frequent characters (ties by code point; the trainer's own limit_alphabet
    # breaks ties in hash order), the others left out of the training text: byte fallback.
    counts = {}
    for line in lines:
        for c in line:
            counts[c] = counts.get(c, 0) + 1
    keep = set(sorted(counts, key=lambda c: (-counts[c], c))[:100]) | {" "}
    lines = ["".join(c if c in keep else " " for c in line) for line in lines]
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer_tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=341, special_tokens=[], show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    tok_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added_token(t, i) for i, t in enumerate(specials)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": trained["merges"]},
    }
    Tokenizer.from_str(json.dumps(tok_json))  # must load
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "tokenizer.json", tok_json)
    tok_entry = lambda t: {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    write_json(out / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {k: v for k, v in added_token(t, i).items() if k != "id"}
                                 for i, t in enumerate(specials)},
        "bos_token": "<s>",
        "chat_template": TINYLLAMA_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 2048,
        "pad_token": "</s>",
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    })
    write_json(out / "special_tokens_map.json", {
        "bos_token": tok_entry("<s>"), "eos_token": tok_entry("</s>"), "pad_token": tok_entry("</s>"),
        "unk_token": tok_entry("<unk>")})
    return len(vocab)


def build_qwen_tokenizer(lines, out):
    """Qwen2 layout: NFC, Split(Qwen2's regex, Isolated) + ByteLevel(use_regex=False), byte-level
    BPE (256 byte symbols + merges, 600 in all), ByteLevel post-processor (no bos) and decoder;
    <|endoftext|> <|im_start|> <|im_end|> added after the vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
        show_progress=False))
    n = tok.get_vocab_size()
    tok_json = json.loads(tok.to_str())
    tok_json["model"].update({"dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                              "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                              "ignore_merges": False})
    tok_json["added_tokens"] = [added_token(t, n + i) for i, t in enumerate(QWEN_SPECIAL)]
    Tokenizer.from_str(json.dumps(tok_json))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "tokenizer.json", tok_json)
    write_json(out / "tokenizer_config.json", {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(n + i): {k: v for k, v in added_token(t, n + i).items() if k != "id"}
                                 for i, t in enumerate(QWEN_SPECIAL)},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN25_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    return n + len(QWEN_SPECIAL)


def ids_of(out):
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(i) for i in out]


def tokenizer_expectations(out, texts, chat_cases):
    """expected.json (transformers' AutoTokenizer ids of `texts` with and without special
    tokens, the tokens, the decode round trip, and what the bare `tokenizers` library makes of
    tokenizer.json) and chat.json (apply_chat_template's text and ids of `chat_cases`)."""
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    raw = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    cases, differ = [], 0
    for text in texts:
        ids = ids_of(tok(text)["input_ids"])
        plain = ids_of(tok(text, add_special_tokens=False)["input_ids"])
        raw_ids = raw.encode(text).ids
        differ += raw_ids != ids
        cases.append({
            "text": text,
            "input_ids": ids,
            "input_ids_no_special": plain,
            "tokens": tok.convert_ids_to_tokens(ids),
            "decoded": tok.decode(ids),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            "decoded_no_special": tok.decode(plain),
            "tokenizers_ids": raw_ids,
            "tokenizers_decoded": raw.decode(plain, skip_special_tokens=False),
        })
    info = {
        "source": "scripts/reference.py llama-fixtures: transformers' AutoTokenizer.from_pretrained(dir); "
                  "tokenizers_* are tokenizers.Tokenizer.from_file(tokenizer.json)",
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "tokenizer_class": type(tok).__name__,
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "unk_token_id": tok.unk_token_id,
    }
    text = json.dumps({**info, "cases": cases}, indent=1, ensure_ascii=False)
    text = re.sub(r"\[[\d,\s]*\]", lambda m: json.dumps(json.loads(m.group(0))), text)
    (out / "expected.json").write_text(text + "\n", encoding="utf-8")
    chats = []
    for case in chat_cases:
        kw = {k: case[k] for k in ("tools", "chat_template") if k in case}
        rendered = tok.apply_chat_template(case["messages"], tokenize=False,
                                           add_generation_prompt=case["add_generation_prompt"], **kw)
        ids = ids_of(tok.apply_chat_template(case["messages"], tokenize=True,
                                             add_generation_prompt=case["add_generation_prompt"], **kw))
        # apply_chat_template tokenizes the rendered text without adding special tokens.
        assert ids == ids_of(tok(rendered, add_special_tokens=False)["input_ids"]), case["name"]
        chats.append({**case, "text": rendered, "ids": ids})
    text = json.dumps({**info, "conversations": chats}, indent=1, ensure_ascii=False)
    text = re.sub(r"\[[\d,\s]*\]", lambda m: json.dumps(json.loads(m.group(0))), text)
    (out / "chat.json").write_text(text + "\n", encoding="utf-8")
    return tok, differ


def write_tokenizer_fixtures(data_dir):
    lines = tokenizer_corpus(data_dir)
    if TOKENIZER_FIXTURES.exists():
        shutil.rmtree(TOKENIZER_FIXTURES)
    base = [
        {"name": "conversation", "messages": CHAT_MESSAGES, "add_generation_prompt": False},
        {"name": "prompt", "messages": CHAT_MESSAGES[:2], "add_generation_prompt": True},
    ]
    out = TOKENIZER_FIXTURES / "llama_bytefallback"
    n = build_llama_tokenizer(lines, out)
    tok, differ = tokenizer_expectations(
        out, TOKENIZER_TEXTS + ["Hi</s><s>there <unk> end", "<s> after bos"],
        base + [
            {"name": "no_system_prompt", "messages": CHAT_MESSAGES[1:2], "add_generation_prompt": True},
            {"name": "llama2_conversation", "messages": CHAT_MESSAGES, "add_generation_prompt": False,
             "chat_template": LLAMA2_CHAT_TEMPLATE},
            {"name": "llama2_prompt", "messages": CHAT_MESSAGES[:2], "add_generation_prompt": True,
             "chat_template": LLAMA2_CHAT_TEMPLATE},
        ])
    print(f"{out.relative_to(ROOT)}: {type(tok).__name__}, {n} tokens; the bare tokenizers library "
          f"differs from transformers on {differ} texts")
    out = TOKENIZER_FIXTURES / "qwen_bytelevel"
    n = build_qwen_tokenizer(lines, out)
    tok, differ = tokenizer_expectations(
        out, TOKENIZER_TEXTS + ["<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "I'LL see you're 10000 km"],
        base + [
            {"name": "default_system_prompt", "messages": CHAT_MESSAGES[1:2], "add_generation_prompt": True},
            {"name": "tools", "messages": CHAT_MESSAGES[1:2], "add_generation_prompt": True, "tools": QWEN_TOOLS},
            {"name": "tool_call", "messages": QWEN_TOOL_CALL, "add_generation_prompt": True, "tools": QWEN_TOOLS},
        ])
    print(f"{out.relative_to(ROOT)}: {type(tok).__name__}, {n} tokens; the bare tokenizers library "
          f"differs from transformers on {differ} texts")


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_lora_fixture():
    """A PEFT LoRA adapter (r 4, alpha 8, every projection) on the llama/ fixture, lora_A and
    lora_B both 0.2 randn (PEFT starts B at 0, which would hide a bug), saved with
    save_pretrained; expected.safetensors: llama/'s input_ids, the base logits, the logits
    through the adapter and after merge_and_unload."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    base_dir, out = LLAMA_FIXTURES / "llama", LLAMA_FIXTURES / "lora"
    if out.exists():
        shutil.rmtree(out)
    seed_everything(77)
    torch.set_grad_enabled(False)
    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    base.eval()
    input_ids = load_file(base_dir / "expected.safetensors")["input_ids"]
    logits_base = base(input_ids).logits.contiguous()
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    model.peft_config["default"].base_model_name_or_path = "../llama"  # not this machine's path
    for name, p in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.copy_(0.2 * torch.randn_like(p))
    model.eval()
    logits = model(input_ids).logits.contiguous()
    model.save_pretrained(out, safe_serialization=True)
    merged = model.merge_and_unload()
    logits_merged = merged(input_ids).logits.contiguous()
    save_file({"input_ids": input_ids, "logits": logits, "logits_merged": logits_merged,
               "logits_base": logits_base}, out / "expected.safetensors", metadata={"format": "pt"})
    # PEFT writes target_modules from a set, in hash order: sorted, so the bytes are the same.
    conf = json.loads((out / "adapter_config.json").read_text())
    conf["target_modules"] = sorted(conf["target_modules"])
    (out / "adapter_config.json").write_text(json.dumps(conf, indent=2, sort_keys=True))
    for f in out.iterdir():
        os.chmod(f, 0o644)
    if (out / "README.md").exists():
        (out / "README.md").unlink()  # PEFT's model card template
    names = load_file(out / "adapter_model.safetensors")
    print(f"{out.relative_to(ROOT)}: {len(names)} tensors, e.g. "
          + ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(names.items())[:2]))
    print(f"  max |adapter - base| logits {(logits - logits_base).abs().max():.3f}, "
          f"max |merged - adapter| {(logits_merged - logits).abs().max():.2e}")
    check_lora(base_dir, out, out / "expected.safetensors")


def check_lora(base_dir, adapter_dir, expected_file):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    torch.set_num_threads(2)
    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    ref = load_file(expected_file)
    input_ids, want = ref["input_ids"].long(), ref["logits"].float()
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    print(f"{base_dir} + {adapter_dir}: {type(base).__name__}, {n_lora:,} LoRA parameters, "
          f"input {tuple(input_ids.shape)}")
    with_adapter = model(input_ids).logits
    merged = model.merge_and_unload()(input_ids).logits
    ok = with_adapter.shape == want.shape
    for what, got in [("PeftModel", with_adapter), ("merge_and_unload", merged)]:
        if got.shape != want.shape:
            print(f"  {what}: logits {tuple(got.shape)}, FILE's {tuple(want.shape)}")
            continue
        diff = (got - want).abs().max().item()
        print(f"  {what}: max |transformers+peft - FILE| logits = {diff:.3e}")
        ok = ok and diff <= LLAMA_TOLERANCE
    print("check-lora: " + ("OK" if ok else f"MISMATCH (tolerance {LLAMA_TOLERANCE})"))
    if not ok:
        sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    fx = sub.add_parser("fixtures")
    fx.add_argument("--data", type=Path, help="data/ of the repository, else ../shared/data")
    ck = sub.add_parser("check")
    ck.add_argument("dir")
    ck.add_argument("--logits", required=True)
    rnd = sub.add_parser("random-124m")
    rnd.add_argument("dir")
    rnd.add_argument("--data", type=Path, help="data/ of the repository, else ../shared/data")
    rnd.add_argument("--seed", type=int, default=1337)
    ct = sub.add_parser("chat-template")
    ct.add_argument("--export", type=Path)
    ct.add_argument("--ids", type=Path)
    cc = sub.add_parser("check-chat")
    cc.add_argument("dir")
    cc.add_argument("--ids", required=True)
    lf = sub.add_parser("llama-fixtures")
    lf.add_argument("--data", type=Path, help="data/ of the repository, else ../shared/data")
    cl = sub.add_parser("check-llama")
    cl.add_argument("dir")
    cl.add_argument("--expected", required=True)
    sub.add_parser("lora-fixture")
    cr = sub.add_parser("check-lora")
    cr.add_argument("base")
    cr.add_argument("adapter")
    cr.add_argument("--expected", required=True)
    args = parser.parse_args()
    if args.cmd == "fixtures":
        write_fixtures(find_data(args.data, TOKENIZER_FILES + ("tinyshakespeare.txt",)))
    elif args.cmd == "check":
        check(args.dir, args.logits)
    elif args.cmd == "random-124m":
        write_random_124m(args.dir, find_data(args.data, TOKENIZER_FILES), args.seed)
    elif args.cmd == "chat-template":
        if (args.export is None) != (args.ids is None):
            parser.error("chat-template: give both --export and --ids, or neither")
        write_chat_fixture(args.export, args.ids)
    elif args.cmd == "llama-fixtures":
        data_dir = find_data(args.data, ("tinyshakespeare.txt", "tang_poems.txt"))
        write_llama_models()
        write_tokenizer_fixtures(data_dir)
    elif args.cmd == "lora-fixture":
        write_lora_fixture()
    elif args.cmd == "check-lora":
        check_lora(args.base, args.adapter, args.expected)
    elif args.cmd == "check-llama":
        check_llama(args.dir, args.expected)
    else:
        ok, _ = compare_chat(args.dir, args.ids)
        if not ok:
            sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
