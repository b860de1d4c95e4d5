#!/usr/bin/env bash
# tinygpt's GGUF files in llama.cpp, the real client: builds llama.cpp from the source PyPI's
# llama-cpp-python 0.3.36 sdist vendors (cmake, GGML_NATIVE=ON), exports a char model, a BPE
# chat model and a random GPT-2 124M in F32, F16 and Q8_0, and checks (scripts/check_gguf.py):
#   - llama-server's greedy 32 tokens after fixed prompt ids equal tinygpt's (F32, F16), or
#     agree on >= 30 of 32 (Q8_0: llama.cpp also rounds the activations to 8 bits; where a
#     near-tie sends the two down different texts, 30 of llama.cpp's 32 tokens must be
#     tinygpt's next token after llama.cpp's own prefix);
#   - llama-server's chat template gives tinygpt's prompt ids for the SFT model's turns;
#   - from_gguf of llama.cpp's own convert_hf_to_gguf.py output (a random HF GPT-2) gives
#     transformers' logits within 1e-4 (needs torch: $TORCH_PY, a python with torch and
#     transformers; skipped with a message without it).
# With `bench` as the first argument it also races decoding: llama-bench -t 2 (pp16, tg128)
# against tinygpt's `gguf bench` on the same GPT-2 124M files, alternated, five rounds.
#
#   bash scripts/check-gguf.sh [bench]
#
# LLAMA_DIR (default target/llama.cpp) keeps the download and the build between runs. Needs
# cmake (Debian's, or PyPI's `cmake` wheel), a C++ compiler, python3 and internet access to
# PyPI (the first run only).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-check}
LLAMA_DIR=${LLAMA_DIR:-target/llama.cpp}
LLAMA_VERSION=0.3.36
OUT=${OUT:-target/gguf-check}
export RUST_BACKTRACE=0 RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
DATA=${DATA:-../shared/data}
export TINYGPT_DATA=${TINYGPT_DATA:-$DATA}

# 1. llama.cpp from the sdist.
SRC="$LLAMA_DIR/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp"
BIN="$SRC/build/bin"
if [ ! -x "$BIN/llama-server" ] || [ ! -x "$BIN/llama-bench" ]; then
    mkdir -p "$LLAMA_DIR"
    if [ ! -d "$SRC" ]; then
        # The sdist straight from PyPI's simple index (`pip download --no-binary :all:` would
        # build the sdist's build requirements, cmake among them, from source to read its
        # metadata), its sha256 checked against the index's.
        python3 - "$LLAMA_VERSION" "$LLAMA_DIR" <<'PY'
import hashlib, re, sys, urllib.request
version, out = sys.argv[1], sys.argv[2]
name = f"llama_cpp_python-{version}.tar.gz"
index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/").read().decode()
url, sha = re.search(rf'href="([^"#]*/{re.escape(name)})#sha256=([0-9a-f]+)"', index).groups()
data = urllib.request.urlopen(url).read()
if hashlib.sha256(data).hexdigest() != sha:
    sys.exit(f"{name}: sha256 differs from PyPI's index")
open(f"{out}/{name}", "wb").write(data)
PY
        tar xzf "$LLAMA_DIR/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$LLAMA_DIR"
    fi
    cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
    cmake --build "$SRC/build" -j "$(nproc)" --target llama-server llama-bench >/dev/null
fi
echo "check-gguf: llama.cpp $(cd "$SRC" && git log -1 --format=%h 2>/dev/null || echo "from llama-cpp-python $LLAMA_VERSION")"

# 2. tinygpt's models and exports.
cargo build --release --features server --example pretrain --example sft --example gguf \
    --example hf_export
EX=target/release/examples
rm -rf "$OUT" && mkdir -p "$OUT"
$EX/pretrain --data "$DATA/tinyshakespeare.txt" --out "$OUT/char" --n-layer 2 --n-head 4 \
    --n-embd 128 --block-size 64 --max-iters 150 --eval-interval 150 --eval-iters 2 \
    --sample-chars 0 >/dev/null
$EX/pretrain --data "$DATA/tinyshakespeare.txt" --out "$OUT/bpe" --tokenizer bpe \
    --vocab-size 512 --n-layer 2 --n-head 4 --n-embd 128 --block-size 128 --max-iters 100 \
    --eval-interval 100 --eval-iters 2 --sample-chars 0 >/dev/null
$EX/sft --base "$OUT/bpe" --data "$DATA/sft_identity.jsonl" --out "$OUT/sft" --max-iters 100 \
    --eval-interval 100 --eval-iters 2 --eval-replies 0 --always-save-checkpoint >/dev/null
$EX/pretrain --data "$DATA/tinyshakespeare.txt" --out "$OUT/llama" --arch llama --tokenizer bpe \
    --vocab-size 512 --n-layer 2 --n-embd 64 --block-size 128 --max-iters 400 --warmup-iters 20 \
    --eval-interval 400 --eval-iters 2 --sample-chars 0 >/dev/null
$EX/hf_export --ckpt "$OUT/sft" --out "$OUT/sft-hf" --chat-ids "$OUT/sft-chat-ids.json" >/dev/null
for t in f32 f16 q8_0; do
    $EX/gguf export --ckpt "$OUT/char" --out "$OUT/char-$t.gguf" --type $t
    $EX/gguf export --ckpt "$OUT/sft" --out "$OUT/sft-$t.gguf" --type $t
    $EX/gguf export --ckpt "$OUT/llama" --out "$OUT/llama-$t.gguf" --type $t
    $EX/gguf export --random-124m --gpt2-files "$DATA" --out "$OUT/gpt2-$t.gguf" --type $t
done

# 3. The checks.
python3 scripts/check_gguf.py --bin "$BIN" --out "$OUT" --tinygpt "$EX/gguf"

# 4. llama.cpp's converter on a random Hugging Face GPT-2, read by from_gguf.
TORCH_PY=${TORCH_PY:-}
if [ -n "$TORCH_PY" ] && "$TORCH_PY" -c "import torch, transformers" 2>/dev/null; then
    "$TORCH_PY" scripts/reference.py random-124m "$OUT/hf-random" --data "$DATA" >/dev/null
    "$TORCH_PY" -m pip install --quiet "$SRC/gguf-py" 2>/dev/null || true
    # transformers 5 writes GPT-2's context as n_positions only; the converter reads n_ctx
    # (which the Hub's gpt2/config.json has).
    "$TORCH_PY" -c "import json, sys; p = sys.argv[1]; c = json.load(open(p)); \
c.setdefault('n_ctx', c['n_positions']); json.dump(c, open(p, 'w'), indent=2)" "$OUT/hf-random/config.json"
    "$TORCH_PY" "$SRC/convert_hf_to_gguf.py" "$OUT/hf-random" --outtype f32 \
        --outfile "$OUT/hf-random-f32.gguf" >/dev/null 2>&1
    $EX/gguf logits --model "$OUT/hf-random-f32.gguf" --out "$OUT/hf-random-logits.safetensors"
    "$TORCH_PY" scripts/reference.py check "$OUT/hf-random" --logits "$OUT/hf-random-logits.safetensors"
else
    echo "check-gguf: convert_hf_to_gguf.py check skipped: set TORCH_PY to a python with torch and transformers"
fi

if [ "$MODE" = bench ]; then
    python3 scripts/check_gguf.py --bin "$BIN" --out "$OUT" --tinygpt "$EX/gguf" --bench
fi
echo "check-gguf: all checks passed"
