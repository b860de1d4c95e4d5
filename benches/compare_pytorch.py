#!/usr/bin/env python3
"""The benches' rows in PyTorch, side by side with ours.

Runs the same shapes and the same training config in PyTorch with the same thread count, reads
tinygpt's criterion results from target/criterion, and prints one row per measurement with the
ratio ours / theirs in speed (> 1 means tinygpt is faster).

    cargo bench --features bench --bench matmul --bench attention --bench train_step --bench generate
    python3 benches/compare_pytorch.py --data ../shared/data/tinyshakespeare.txt

Needs torch (and transformers for the decoding row). Optional: never run by CI.
"""
import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--threads", type=int, default=int(os.environ.get("RAYON_NUM_THREADS", "2")))
parser.add_argument("--data", default="../shared/data/tinyshakespeare.txt", help="corpus for the training row")
parser.add_argument("--criterion", default="target/criterion", help="where cargo bench wrote its results")
parser.add_argument("--train-bench", default="../shared/bench/torch_train_bench.py",
                    help="PyTorch twin of the default pre-training config")
parser.add_argument("--train-steps", type=int, default=200)
parser.add_argument("--skip", nargs="*", default=[], help="rows to skip: matmul attention train generate")
args = parser.parse_args()

import torch  # noqa: E402

torch.set_num_threads(args.threads)
torch.manual_seed(0)


def timeit(fn, min_time=1.0, warmup=2):
    """Median seconds per call of fn over at least min_time."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def ours():
    """{(group, function): (median seconds, throughput elements or None)} from criterion."""
    out = {}
    for path in glob.glob(os.path.join(args.criterion, "**", "new", "benchmark.json"), recursive=True):
        with open(path) as f:
            bench = json.load(f)
        with open(os.path.join(os.path.dirname(path), "estimates.json")) as f:
            est = json.load(f)
        parts = [x for x in (bench.get("function_id"), bench.get("value_str")) if x]
        key = (bench["group_id"], "/".join(parts))
        thr = bench.get("throughput") or {}
        elements = thr.get("Elements") or thr.get("elements")
        out[key] = (est["median"]["point_estimate"] * 1e-9, elements)
    return out


OURS = ours()
rows = []


def row(name, ours_key, theirs_s, unit_per_call=None, unit=""):
    """Records ours vs theirs; speed ratio = theirs_time / ours_time."""
    mine = OURS.get(ours_key)
    if mine is None:
        rows.append((name, None, theirs_s, None, unit_per_call, unit))
        return
    rows.append((name, mine[0], theirs_s, theirs_s / mine[0], unit_per_call, unit))


if "matmul" not in args.skip:
    shapes = [
        ("gpt2/c_attn", 1024, 768, 2304), ("gpt2/c_fc", 1024, 768, 3072),
        ("gpt2/mlp_c_proj", 1024, 3072, 768), ("gpt2/lm_head", 1024, 768, 50257),
        ("small/c_attn", 768, 128, 384), ("small/c_fc", 768, 128, 512),
        ("small/mlp_c_proj", 768, 512, 128), ("small/lm_head", 768, 128, 70),
    ]
    for name, m, k, n in shapes:
        a, b = torch.rand(m, k) * 0.01, torch.rand(k, n) * 0.01
        s = timeit(lambda: a @ b)
        row(f"matmul {name} f32", ("matmul/cpu/F32", name), s, 2 * m * k * n / 1e9, "GFLOP")

if "attention" not in args.skip:
    import torch.nn.functional as F
    for t in (64, 256, 1024):
        q, k, v = (torch.randn(4, 12, t, 64, requires_grad=True) for _ in range(3))
        def fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
        def fwd_bwd():
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y.sum().backward()
        row(f"attention fwd T={t}", ("attention_forward_cpu", f"fused/{t}"), timeit(fwd))
        row(f"attention fwd+bwd T={t}", ("attention_forward_backward_cpu", f"fused/{t}"), timeit(fwd_bwd))

if "train" not in args.skip and os.path.exists(args.train_bench):
    env = dict(os.environ, THREADS=str(args.threads))
    res = subprocess.run([sys.executable, args.train_bench, args.data, str(args.train_steps)],
                         capture_output=True, text=True, env=env, check=True)
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    # The PyTorch twin has biases (nn.Linear's default); nanoGPT's recipe, our default, has none.
    row("train step, default config, both with biases", ("train_step/cpu", "default_config_bias"),
        theirs["ms_per_step"] / 1e3, 768, "tokens")
    row("train step, default config (ours without biases)", ("train_step/cpu", "default_config"),
        theirs["ms_per_step"] / 1e3, 768, "tokens")

# The Llama-style default (`pretrain --arch llama`): ours from `TINYGPT_ARCH=llama cargo bench
# --bench train_step`, theirs from the eager twin beside this file.
llama_twin = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_llama_train.py")
if "train" not in args.skip and os.path.exists(llama_twin):
    env = dict(os.environ, THREADS=str(args.threads), STEPS=str(args.train_steps))
    res = subprocess.run([sys.executable, llama_twin, args.data], capture_output=True, text=True,
                         env=env, check=True)
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    row("train step, Llama-style default (RoPE, RMSNorm, SwiGLU, GQA 4/2)",
        ("train_step/cpu", "llama_default_config"), theirs["ms_per_step"] / 1e3, 768, "tokens")

if "generate" not in args.skip:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
        model = GPT2LMHeadModel(GPT2Config()).eval()
        prompt, new = 16, 16
        ids = torch.arange(prompt).unsqueeze(0) * 997 % 50257

        @torch.no_grad()
        def decode():
            out = model(ids, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(new):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        row("decode gpt2-124M f32, KV cache (16+16 tokens)", ("generate/cpu/gpt2-124M", "kv_cache/F32"),
            timeit(decode, min_time=3.0, warmup=1), new, "tokens")
    except ImportError:
        print("transformers not installed: decoding row skipped", file=sys.stderr)

print(f"threads: {args.threads}; speed ratio = PyTorch time / tinygpt time (> 1: tinygpt faster)")
print(f"{'row':52} {'tinygpt':>12} {'PyTorch':>12} {'ratio':>7}")
for name, mine, theirs, ratio, per_call, unit in rows:
    def fmt(s):
        if s is None:
            return "-"
        if per_call:
            return f"{per_call / s:,.1f} {unit}/s" if per_call / s < 1e4 else f"{per_call / s:,.0f} {unit}/s"
        return f"{s * 1e3:.2f} ms"
    print(f"{name:52} {fmt(mine):>12} {fmt(theirs):>12} {('%.2f' % ratio) if ratio else '-':>7}")
