#!/usr/bin/env python3
"""Reference values for tinygpt's Hugging Face GPT-2 support, from PyTorch + transformers.

Optional: CI never runs this; the tests compare against the fixtures it committed.

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

Setup (outside the repository): python3 -m venv /work/venv &&
/work/venv/bin/pip install torch transformers safetensors. Uses 2 threads and fixed seeds,
so it is deterministic. The OpenAI tokenizer files and Tiny Shakespeare are read from
../shared/data (or --data DIR).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import regex
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

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


def seed_everything(seed):
    torch.manual_seed(seed)
    torch.set_num_threads(2)


def hf_gpt2_tokenizer(vocab_json, merges_txt):
    """transformers' GPT-2 tokenizer from a vocab.json + merges.txt pair, loaded the way a
    downloaded model directory is (`from_pretrained` on a directory holding both)."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(vocab_json, Path(tmp) / "vocab.json")
        shutil.copy(merges_txt, Path(tmp) / "merges.txt")
        (Path(tmp) / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
        return AutoTokenizer.from_pretrained(tmp)


class OpenAIEncoder:
    """OpenAI's own GPT-2 BPE (`gpt-2/src/encoder.py`), written out again as the independent
    reference; `<|endoftext|>` in the text is the special token 50256, as in tiktoken."""

    PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, encoder_json, vocab_bpe):
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
            for piece in regex.findall(self.PAT, doc):
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


@torch.no_grad()
def greedy(model, prompt_ids, n):
    """Greedy decoding by recomputing the whole sequence each step (no cache), with the
    top-1/top-2 logit gap of every step (a small gap would make the test fragile)."""
    ids = list(prompt_ids)
    gaps = []
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        top = torch.topk(logits, 2)
        gaps.append(float(top.values[0] - top.values[1]))
        ids.append(int(torch.argmax(logits)))
    return ids[len(prompt_ids):], gaps


def write_fixtures(data_dir):
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


@torch.no_grad()
def check(model_dir, logits_file):
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    fx = sub.add_parser("fixtures")
    fx.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ck = sub.add_parser("check")
    ck.add_argument("dir")
    ck.add_argument("--logits", required=True)
    args = parser.parse_args()
    if args.cmd == "fixtures":
        write_fixtures(args.data)
    else:
        check(args.dir, args.logits)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
