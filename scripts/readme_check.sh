#!/usr/bin/env bash
# A fresh clone with no ../shared beside it: every `cargo run` command of README.md runs as
# written (with short-run flags appended, so each takes seconds) and exits 0.
#
#   bash scripts/readme_check.sh             # checks the committed HEAD (a `git clone`)
#   bash scripts/readme_check.sh --worktree  # checks the working tree as it is (uncommitted
#                                            # changes included; ignored files left out)
#
# The data files come from their upstream names in a mirror directory built from
# ../shared/data (TINYGPT_DOWNLOAD_MIRROR), so no network is needed and every fetch still
# checks both sha256 and converts. Builds go to this checkout's target dir (CARGO_TARGET_DIR),
# so dependencies are not rebuilt; the clone's package version gets a `-readme-check` suffix
# so that its tinygpt artifacts never stand in for this checkout's (cargo judges freshness by
# file times, and the clone's files are newer). Needs git, python3, gzip and curl; with
# PYTHON=path/to/python (one with transformers, numpy and safetensors) the commands that name
# ~/models/gpt2 run too, on a random GPT-2 124M that scripts/reference.py writes elsewhere.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [[ -n ${PYTHON:-} ]]; then PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON"); fi
SHARED=$ROOT/../shared/data
MODE=clone
if [[ ${1:-} == --worktree ]]; then MODE=worktree; fi
TMP=$(mktemp -d)
SERVER_PID=
cleanup() {
    if [[ -n $SERVER_PID ]]; then kill "$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

say() { printf '\n== %s\n' "$*"; }
die() { printf '\nreadme_check: FAILED: %s\n' "$*" >&2; exit 1; }

# ---- 1. The clone -----------------------------------------------------------------------
CLONE=$TMP/tinygpt
if [[ $MODE == clone ]]; then
    git clone -q "$ROOT" "$CLONE"
else
    mkdir -p "$CLONE"
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done \
        | tar --null -cf - -T -) | tar -xf - -C "$CLONE"
fi
[[ -e $TMP/shared ]] && die "$TMP/shared exists"
sed -i '0,/^version = "\([^"]*\)"/s//version = "\1-readme-check"/' "$CLONE/Cargo.toml"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
unset TINYGPT_DATA
say "checking $MODE of $ROOT in $CLONE (target dir $CARGO_TARGET_DIR)"

# ---- 2. The download mirror: upstream files under their upstream names ------------------
MIRROR=$TMP/mirror
mkdir -p "$MIRROR"
[[ -d $SHARED ]] || die "$SHARED not found: the mirror is built from it"
NOTES=()
cp "$SHARED/tinyshakespeare.txt" "$MIRROR/input.txt"
cp "$SHARED/gpt2_encoder.json" "$MIRROR/encoder.json"
cp "$SHARED/gpt2_vocab.bpe" "$MIRROR/vocab.bpe"
cp "$SHARED/raw/gsm8k_test.jsonl" "$MIRROR/test.jsonl"
cp "$SHARED/raw/self_instruct_seed_tasks.jsonl" "$MIRROR/seed_tasks.jsonl"
for f in identity alpaca_en_demo alpaca_zh_demo dpo_en_demo; do
    cp "$SHARED/raw/llamafactory_$f.json" "$MIRROR/$f.json"
done
gzip -c "$SHARED/raw/hh_rlhf_harmless_base_test.jsonl" >"$MIRROR/test.jsonl.gz"
# GSM8K's train.jsonl is not under raw/: its upstream bytes are rebuilt from the converted
# file (json.dumps of question/answer), kept only if that gives the upstream sha256.
python3 - "$SHARED/sft_gsm8k_train.jsonl" "$MIRROR/train.jsonl" <<'EOF'
import json, sys
with open(sys.argv[1], encoding="utf-8") as f, open(sys.argv[2], "w", encoding="utf-8", newline="\n") as out:
    for line in f:
        m = json.loads(line)["messages"]
        out.write(json.dumps({"question": m[0]["content"], "answer": m[1]["content"]}) + "\n")
EOF
if [[ $(sha256sum "$MIRROR/train.jsonl" | cut -d' ' -f1) != 17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465 ]]; then
    rm "$MIRROR/train.jsonl"
    NOTES+=("gsm8k train.jsonl could not be rebuilt byte for byte: left out of the mirror")
fi
export TINYGPT_DOWNLOAD_MIRROR=$MIRROR
say "mirror: $(cd "$MIRROR" && ls | tr '\n' ' ')"

# ---- 3. The README's commands -------------------------------------------------------------
# Every line of the ```sh blocks, `\` continuations joined, `# comments` dropped.
mapfile -d '' COMMANDS < <(python3 - "$CLONE/README.md" <<'EOF'
import shlex, sys
def strip_comment(line):
    quote = None
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()
block, joined = False, ""
for raw in open(sys.argv[1], encoding="utf-8"):
    line = raw.rstrip("\n")
    if line.startswith("```"):
        block = line.strip() == "```sh" and not block
        continue
    if not block:
        continue
    if line.endswith("\\"):
        joined += line[:-1].rstrip() + " "
        continue
    cmd = strip_comment(joined + line).strip()
    joined = ""
    if cmd:
        sys.stdout.write(cmd + "\0")
EOF
)
[[ ${#COMMANDS[@]} -gt 0 ]] || die "no commands found in README.md's sh blocks"

# Flags that make each example's run a few seconds long (they win over the command's own:
# the examples parse with `args_override_self`).
short_flags() {
    case $1 in
        pretrain) echo "--max-iters 4 --eval-interval 2 --eval-iters 1 --sample-chars 20 --always-save-checkpoint" ;;
        generate) echo "--max-new-tokens 20" ;;
        sft) echo "--max-iters 2 --batch-size 2 --eval-interval 1 --eval-iters 1 --eval-replies 1 --max-new-tokens 8 --always-save-checkpoint" ;;
        chat) echo "--max-new-tokens 8" ;;
        chatgpt) echo "--pretrain-iters 4 --sft-iters 2 --max-new-tokens 8" ;;
        rule_task) echo "--quick" ;;
        gpt2) echo "--max-new-tokens 5" ;;
        reward | dpo) echo "--max-iters 2 --eval-interval 1 --eval-iters 1 --always-save-checkpoint" ;;
        ppo) echo "--iterations 2" ;;
        eval) echo "-n 4 --max-new-tokens 8" ;;
        grpo) echo "--sft-iters 4 --iterations 1 --eval-n 4 --prompts-per-iteration 2 --num-generations 2 --minibatch-size 4" ;;
        serve) echo "--port $PORT" ;;
        *) echo "" ;;
    esac
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

RAN=()
SKIPPED=()
GPT2_DIR=
LOG=$TMP/log
cd "$CLONE"
# Build every example in two cargo runs (in parallel, instead of one link after another as the
# commands come); the commands' own `cargo run` then find them built.
say "building the examples"
cargo build -q --release --examples || die "cargo build --release --examples"
cargo build -q --release --features server --example serve \
    || die "cargo build --release --features server --example serve"
for cmd in "${COMMANDS[@]}"; do
    if [[ $cmd != *"cargo run "* ]]; then
        case $cmd in
            "cargo test"*) why="the test suite (CI runs it on its own)" ;;
            curl*) why="a client call (the server is checked through /health instead)" ;;
            python*) why="needs Python packages (transformers, openai)" ;;
            *) why="not a cargo run command" ;;
        esac
        SKIPPED+=("$cmd  [$why]")
        continue
    fi
    if [[ $cmd == *"~/models/gpt2"* ]]; then
        # The README's stand-in for a downloaded GPT-2: a random GPT-2 124M written by
        # transformers' classes (scripts/reference.py random-124m, no torch), in a temporary
        # directory instead of ~/models/gpt2. OpenAI's tokenizer for it is fetched aside, so
        # that the clone's data/ still starts empty for the README's own fetches.
        if [[ -z $GPT2_DIR ]]; then
            if [[ -z ${PYTHON:-} ]] || ! "$PYTHON" -c 'import transformers, numpy, safetensors' 2>/dev/null; then
                SKIPPED+=("$cmd  [~/models/gpt2: set PYTHON to a python with transformers, numpy and safetensors to make one]")
                continue
            fi
            say "a random GPT-2 124M for ~/models/gpt2"
            cargo run -q --release --example fetch_data -- --dir "$TMP/gpt2-tokenizer" \
                gpt2_encoder.json gpt2_vocab.bpe || die "fetch_data gpt2_encoder.json gpt2_vocab.bpe"
            "$PYTHON" scripts/reference.py random-124m "$TMP/models/gpt2" --data "$TMP/gpt2-tokenizer" \
                || die "scripts/reference.py random-124m"
            GPT2_DIR=$TMP/models/gpt2
        fi
        cmd=${cmd//"~/models/gpt2"/$GPT2_DIR}
    elif [[ $cmd == *"~/"* ]]; then
        SKIPPED+=("$cmd  [names a file of the user's own (~/...)]")
        continue
    fi
    example=$(sed -n 's/.*--example \([A-Za-z0-9_]*\).*/\1/p' <<<"$cmd")
    [[ -n $example ]] || die "no --example in: $cmd"
    PORT=
    [[ $example == serve ]] && PORT=$(free_port)
    extra=$(short_flags "$example")
    full=$cmd
    if [[ -n $extra ]]; then
        if [[ $full == *" -- "* ]]; then full="$full $extra"; else full="$full -- $extra"; fi
    fi
    # tang_poems.txt cannot be fetched (it is built from 10 upstream files, of which the
    # mirror has one): the commands naming it read it from ../shared/data, as TINYGPT_DATA.
    if [[ $full == *tang_poems.txt* ]]; then full="TINYGPT_DATA=$SHARED $full"; fi
    say "$full"
    if [[ $example == serve ]]; then
        # Start, wait for /health, SIGTERM, expect a clean exit.
        bash -c "exec $full" >"$LOG" 2>&1 &
        SERVER_PID=$!
        up=
        for _ in $(seq 1 1800); do
            if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then up=1; break; fi
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 1
        done
        if [[ -z $up ]]; then
            tail -n 30 "$LOG" >&2
            die "the server never answered /health: $full"
        fi
        kill -TERM "$SERVER_PID"
        rc=0
        wait "$SERVER_PID" || rc=$?
        SERVER_PID=
        tail -n 5 "$LOG"
        [[ $rc -eq 0 ]] || { tail -n 30 "$LOG" >&2; die "exit $rc after SIGTERM: $full"; }
    else
        input=/dev/null
        if [[ $example == chat && $full != *"--prompt"* ]]; then
            printf '/quit\n' >"$TMP/stdin"
            input=$TMP/stdin
        fi
        rc=0
        bash -c "$full" <"$input" >"$LOG" 2>&1 || rc=$?
        if [[ $rc -ne 0 ]]; then
            tail -n 40 "$LOG" >&2
            die "exit $rc: $full"
        fi
        grep -v '^\s*Compiling\|^\s*Blocking' "$LOG" | tail -n 4 || true
    fi
    RAN+=("$full")
done

# ---- 4. Failures are clear ----------------------------------------------------------------
say "a fetch from an unreachable mirror fails clearly"
rc=0
RUST_BACKTRACE=0 TINYGPT_DOWNLOAD_MIRROR=$TMP/no-such-mirror cargo run -q --release --example fetch_data -- \
    --dir "$TMP/unreachable" sft_identity.jsonl >"$LOG" 2>&1 || rc=$?
grep -v '^\s*Compiling\|^\s*Blocking' "$LOG" | head -n 8 || true
[[ $rc -ne 0 ]] || die "fetch_data from an unreachable mirror exited 0"
for want in "sft_identity.jsonl" "https://raw.githubusercontent.com/hiyouga/LLaMA-Factory/" \
    "TINYGPT_DATA" "no-such-mirror"; do
    grep -qF "$want" "$LOG" || die "the unreachable-mirror error does not mention $want"
done
[[ ! -e $TMP/unreachable/sft_identity.jsonl ]] || die "a failed fetch left a file behind"

say "a missing file that is no known dataset is an error naming the flag"
rc=0
RUST_BACKTRACE=0 cargo run -q --release --example pretrain -- --data no/such/file.txt --out "$TMP/out-none" \
    >"$LOG" 2>&1 || rc=$?
grep -v '^\s*Compiling\|^\s*Blocking' "$LOG" | head -n 3 || true
[[ $rc -ne 0 ]] || die "pretrain --data no/such/file.txt exited 0"
grep -qF -- "--data no/such/file.txt: no such file" "$LOG" \
    || { cat "$LOG" >&2; die "the missing-file error does not name --data and the path"; }

# ---- 5. Summary ---------------------------------------------------------------------------
say "summary"
echo "ran ${#RAN[@]} README commands, all exit 0:"
printf '  %s\n' "${RAN[@]}"
echo "skipped ${#SKIPPED[@]}:"
printf '  %s\n' "${SKIPPED[@]}"
for n in "${NOTES[@]}"; do echo "note: $n"; done
echo "data fetched into the clone's data/ (all from the mirror, sha256-checked):"
ls "$CLONE/data" | sed 's/^/  /'
echo "readme_check: OK"
