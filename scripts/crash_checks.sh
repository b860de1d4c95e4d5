#!/usr/bin/env bash
# Crash checks of the training examples, black-box, on the release binaries: a run stopped by
# Ctrl-C (SIGINT) or SIGTERM saves its state, says how to continue, and the continued run ends
# with the weights and optimiser moments of an uninterrupted one, bit for bit (pretrain, sft,
# ppo); a second Ctrl-C exits at once and leaves a loadable directory; a second run into the
# same --out is refused at once; NaN steps are skipped and stop the run with the checkpoint
# untouched; a model too large for memory is refused before it is built.
#
#   cargo build --release --features server --examples
#   bash scripts/crash_checks.sh             # about a minute on 2 cores
#
# Data: $TINYGPT_DATA (default ../shared/data): tinyshakespeare.txt, sft_identity.jsonl.
# Scratch files go to a temporary directory, removed at the end (KEEP=1 keeps it); CHECKS=REGEX
# runs only the checks whose names match (e.g. CHECKS=ppo).
# Prints a table of results; exits 1 if any check failed.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=target/release/examples
export TINYGPT_DATA=${TINYGPT_DATA:-../shared/data}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
export RUST_BACKTRACE=0
TEXT=$TINYGPT_DATA/tinyshakespeare.txt
SFT_DATA=$TINYGPT_DATA/sft_identity.jsonl
for f in "$TEXT" "$SFT_DATA"; do
    [ -f "$f" ] || { echo "crash_checks: $f is missing: set TINYGPT_DATA to a directory holding it" >&2; exit 2; }
done
for b in pretrain sft ppo rule_task generate; do
    [ -x "$BIN/$b" ] || {
        echo "crash_checks: $BIN/$b is missing: build with cargo build --release --features server --examples" >&2
        exit 2
    }
done
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tinygpt-crash.XXXXXX")
PIDS=()
cleanup() {
    local p m
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    # The checks run in subshells: find their mounts under $WORK.
    for m in $(awk -v w="$WORK" 'index($2, w) == 1 {print $2}' /proc/mounts 2>/dev/null); do
        umount "$m" 2>/dev/null || true
    done
    if [ "${KEEP:-0}" = 1 ]; then echo "scratch files kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
STARTED=$SECONDS

# --- results -------------------------------------------------------------------------------
NAMES=() RESULTS=() DETAILS=()
record() { # NAME PASS|FAIL DETAIL
    NAMES+=("$1") RESULTS+=("$2") DETAILS+=("$3")
    printf '== %-20s %s  %s\n' "$1" "$2" "$3"
}
# Each check runs in a subshell that prints its failures ("FAIL: why") and the detail line
# ("OK: what"); the last line decides.
check() { # NAME FUNCTION
    local name=$1 out status
    shift
    [[ $name == setup || $name =~ ${CHECKS:-.} ]] || return 0
    out=$("$@" 2>&1) && status=0 || status=$?
    if [ $status -eq 0 ] && ! grep -q '^FAIL: ' <<<"$out"; then
        record "$name" PASS "$(grep '^OK: ' <<<"$out" | tail -1 | cut -c5-)"
    else
        echo "$out" | sed 's/^/    /'
        local why
        why=$(grep '^FAIL: ' <<<"$out" | head -1 | cut -c7-)
        record "$name" FAIL "${why:-exit status $status}"
    fi
}
fail() { echo "FAIL: $*"; return 1; }

# --- helpers -------------------------------------------------------------------------------
# The step of a state directory (trainer_state.json's top-level "step").
step_of() { sed -n 's/^  "step": \([0-9]*\),\{0,1\}$/\1/p' "$1/trainer_state.json" | head -1; }
# The newest state of a run directory: the newest of DIR and DIR/checkpoint-*, by step.
latest_state() {
    local best="" best_step=-1 d s
    for d in "$1" "$1"/checkpoint-*; do
        [ -f "$d/trainer_state.json" ] || continue
        s=$(step_of "$d")
        if [ "${s:-0}" -gt "$best_step" ]; then best=$d best_step=$s; fi
    done
    echo "$best"
}
# The highest "step N/M" progress line in a log so far (0 if none).
last_step() { grep -oE '^step +[0-9]+/' "$1" 2>/dev/null | tail -1 | grep -oE '[0-9]+' || echo 0; }
# Runs CMD… in the background with its output in LOG; once the log shows step MIN done (or
# PATTERN, when MIN is not a number), sends SIG (one or more, space separated, GAP seconds
# apart); waits and sets RC to the exit status.
run_and_signal() { # LOG MIN|PATTERN "SIG [SIG…]" GAP CMD…
    local log=$1 when=$2 sigs=$3 gap=$4 pid deadline s first=1
    shift 4
    "$@" >"$log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    deadline=$((SECONDS + 120))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do
        if [[ $when =~ ^[0-9]+$ ]]; then
            [ "$(last_step "$log")" -ge "$when" ] && break
        else
            grep -qE "$when" "$log" && break
        fi
        sleep 0.02
    done
    for s in $sigs; do
        [ $first = 1 ] || sleep "$gap"
        first=0
        kill -s "$s" "$pid" 2>/dev/null || true
    done
    RC=0
    wait "$pid" || RC=$?
}
# The continue command an interrupted run printed, run with the binaries here.
resume_as_printed() { # LOG OUTLOG
    local cmd
    cmd=$(sed -n 's/.*; continue with: cargo run --release --example \(.*\)$/\1/p' "$1" | tail -1)
    [ -n "$cmd" ] || { fail "no 'continue with:' command in $1"; return 1; }
    # "pretrain -- --resume DIR …" → "$BIN/pretrain --resume DIR …" (the words are shell-quoted)
    if ! eval "\"$BIN/${cmd%% -- *}\" ${cmd#* -- }" >"$2" 2>&1; then
        tail -5 "$2"
        fail "the printed command failed: $cmd"
        return 1
    fi
}
# Asserts an interrupted run: exit code, message, command, and the interrupted state on disk.
# Prints the step it stopped after.
assert_interrupted() { # LOG RC WANT_RC SIGNAME EXAMPLE OUT
    local log=$1 rc=$2 want=$3 sig=$4 ex=$5 out=$6 step
    [ "$rc" -eq "$want" ] || { tail -5 "$log"; fail "exit status $rc, expected $want"; return 1; }
    step=$(sed -n "s/^interrupted by $sig after step \([0-9]*\): .*/\1/p" "$log" | tail -1)
    [ -n "$step" ] || { tail -5 "$log"; fail "no 'interrupted by $sig after step N' line"; return 1; }
    grep -qF "interrupted by $sig after step $step: the state is saved in $out/checkpoint-$step; continue with: cargo run --release --example $ex -- --resume $out" "$log" ||
        { grep '^interrupted' "$log"; fail "the message does not name $out/checkpoint-$step and the resume command"; return 1; }
    [ -d "$out/checkpoint-$step" ] || { fail "$out/checkpoint-$step does not exist"; return 1; }
    grep -q '^  "kind": "interrupted"' "$out/checkpoint-$step/trainer_state.json" ||
        { fail "$out/checkpoint-$step/trainer_state.json is not \"kind\": \"interrupted\""; return 1; }
    [ "$(step_of "$out/checkpoint-$step")" = "$step" ] || { fail "checkpoint-$step holds step $(step_of "$out/checkpoint-$step")"; return 1; }
    echo "$step"
}
# Compares the newest states of two runs, file by file.
same_final_state() { # A B FILE…
    local a b f
    a=$(latest_state "$1") b=$(latest_state "$2")
    shift 2
    [ -n "$a" ] && [ -n "$b" ] || { fail "no state in one of the runs"; return 1; }
    [ "$(step_of "$a")" = "$(step_of "$b")" ] || { fail "steps differ: $a $(step_of "$a"), $b $(step_of "$b")"; return 1; }
    for f in "$@"; do
        cmp -s "$a/$f" "$b/$f" || { fail "$f differs: $a vs $b"; return 1; }
    done
    echo "${a#"$WORK"/} = ${b#"$WORK"/} (step $(step_of "$a"))"
}

# --- settings: tiny models, a few seconds a run ----------------------------------------------
# Pre-training: 300 steps of a 0.11M-parameter char model (~3 s), a line every 5 steps.
PRE=(--data "$TEXT" --n-layer 2 --n-head 2 --n-embd 64 --block-size 64 --batch-size 8
    --max-iters 300 --eval-interval 100 --eval-iters 2 --warmup-iters 10 --log-interval 5
    --sample-chars 0)
RULE=$WORK/rule # rule_task --quick: the BPE base for SFT, the SFT and reward models for PPO
SFT=(--base "$RULE/pretrain" --data "$SFT_DATA" --max-iters 200 --eval-interval 50 --eval-iters 2
    --batch-size 4 --log-interval 1)
PPO=(--sft "$RULE/sft" --reward "$RULE/reward" --data "$RULE/prompts_train.jsonl"
    --iterations 30 --rollout-size 8 --minibatch-size 4 --ppo-epochs 2 --max-new-tokens 8
    --log-interval 1)

setup() {
    RAYON_NUM_THREADS=1 "$BIN/rule_task" --data "$TEXT" --out "$RULE" --quick >"$WORK/rule.log" 2>&1 ||
        { tail -5 "$WORK/rule.log"; fail "rule_task --quick failed"; return 1; }
    echo "OK: rule_task --quick in $((SECONDS - STARTED)) s: base, SFT and reward models for sft and ppo"
}

# Uninterrupted run into A, interrupted into B and continued; the same final state.
interrupt_and_resume() { # EXAMPLE SIG SIGNAME WANT_RC AFTER_STEP FILES ARGS…
    local ex=$1 sig=$2 name=$3 want=$4 after=$5 files=$6 step
    shift 6
    local a=$WORK/$ex-A b=$WORK/$ex-B-$name
    if [ ! -d "$a" ]; then
        "$BIN/$ex" "$@" --out "$a" >"$a.log" 2>&1 || { tail -5 "$a.log"; fail "the uninterrupted run failed"; return 1; }
    fi
    run_and_signal "$b.log" "$after" "$sig" 0 "$BIN/$ex" "$@" --out "$b"
    step=$(assert_interrupted "$b.log" "$RC" "$want" "$name" "$ex" "$b") || { echo "$step"; return 1; }
    resume_as_printed "$b.log" "$b.resume.log" || return 1
    grep -q "^resuming $b from its latest state, step $step ($b/checkpoint-$step, saved on an interrupt)" "$b.resume.log" ||
        { head -3 "$b.resume.log"; fail "the resumed run does not say it continues from checkpoint-$step"; return 1; }
    local same
    # shellcheck disable=SC2086
    same=$(same_final_state "$a" "$b" $files) || { echo "$same"; return 1; }
    echo "OK: exit $RC after step $step, continued: $same, bit for bit ($files)"
}

pretrain_int() { interrupt_and_resume pretrain INT SIGINT 130 100 "model.safetensors optimizer.safetensors" "${PRE[@]}"; }
sft_int() { interrupt_and_resume sft INT SIGINT 130 60 "model.safetensors optimizer.safetensors" "${SFT[@]}"; }
# PPO's state (iteration, KL coefficient, score moments) is JSON: equal to 14 significant
# digits is accepted, and said (the library parses JSON floats with serde_json's default
# parser, which may be one ulp off; with its `float_roundtrip` feature it is exact).
ppo_int() {
    local out a b
    out=$(interrupt_and_resume ppo INT SIGINT 130 40 \
        "model.safetensors optimizer.safetensors value_head.safetensors" "${PPO[@]}") || { echo "$out"; return 1; }
    a=$(latest_state "$WORK/ppo-A")/ppo_state.json b=$(latest_state "$WORK/ppo-B-SIGINT")/ppo_state.json
    if cmp -s "$a" "$b"; then
        echo "$out, ppo_state.json identical"
    elif paste <(grep -oE -- '-?[0-9][0-9.e+-]*' "$a") <(grep -oE -- '-?[0-9][0-9.e+-]*' "$b") |
        awk -F'\t' '{ d = $1 - $2; if (d < 0) d = -d; m = $1 < 0 ? -$1 : $1;
                      if ($2 == "" || d > 1e-14 * m) bad = 1 } END { exit bad }'; then
        echo "$out, ppo_state.json equal to 14 digits, not bit for bit ($(diff "$a" "$b" | grep -c '^<') lines differ in the last digits)"
    else
        diff "$a" "$b"
        fail "ppo_state.json differs"
    fi
}
# SIGTERM, with periodic latest states on: they change nothing in training, and only the
# newest --keep-last are left.
pretrain_term() {
    local out n
    out=$(interrupt_and_resume pretrain TERM SIGTERM 143 150 "model.safetensors optimizer.safetensors" \
        "${PRE[@]}" --save-interval 40 --keep-last 2) || { echo "$out"; return 1; }
    echo "$out" | grep -v '^OK: '
    n=$(find "$WORK/pretrain-B-SIGTERM" -maxdepth 1 -name 'checkpoint-*' -type d | wc -l)
    [ "$n" -ge 1 ] && [ "$n" -le 2 ] || fail "$n latest states left with --keep-last 2"
    echo "${out#OK: }" | sed "s/^/OK: /; s/\$/; $n latest states left (--save-interval 40 --keep-last 2)/"
}

# Ctrl-C twice, the second while the step the first waits for is running: the process ends at
# once with 130, and what is on disk loads and continues.
double_int() {
    local d=$WORK/double step
    run_and_signal "$d.log" "saved checkpoint to" "INT INT" 0.05 \
        "$BIN/pretrain" --data "$TEXT" --out "$d" --n-layer 2 --n-head 2 --n-embd 128 --block-size 128 \
        --batch-size 16 --max-iters 12 --eval-interval 2 --eval-iters 1 --log-interval 1 --sample-chars 0
    [ "$RC" -eq 130 ] || { tail -3 "$d.log"; fail "exit status $RC, expected 130"; return 1; }
    local how="at once (no state saved for the interrupt)"
    grep -q '^interrupted by SIGINT' "$d.log" && how="after saving (both signals came before the step ended)"
    "$BIN/generate" --ckpt "$d" --prompt "ROMEO:" --max-new-tokens 5 >"$d.gen.log" 2>&1 ||
        { tail -3 "$d.gen.log"; fail "generate --ckpt $d failed after the second Ctrl-C"; return 1; }
    "$BIN/pretrain" --resume "$d" --sample-chars 0 >"$d.resume.log" 2>&1 ||
        { tail -3 "$d.resume.log"; fail "pretrain --resume $d failed after the second Ctrl-C"; return 1; }
    step=$(step_of "$(latest_state "$d")")
    [ "$step" = 12 ] || fail "the continued run ended at step $step, not 12"
    echo "OK: exit 130 $how; generate --ckpt loads it, --resume finishes it (step $step)"
}

# A second run into the --out of a live one is refused at once.
lock() {
    local c=$WORK/locked pid t0 rc=0 ms
    "$BIN/pretrain" "${PRE[@]}" --out "$c" >"$c.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    until [ "$(last_step "$c.log")" -ge 20 ] || ! kill -0 $pid 2>/dev/null; do sleep 0.02; done
    kill -0 $pid 2>/dev/null || { fail "the first run ended before the second started"; return 1; }
    t0=$(date +%s%N)
    "$BIN/pretrain" "${PRE[@]}" --out "$c" >"$c.second.log" 2>&1 || rc=$?
    ms=$((($(date +%s%N) - t0) / 1000000))
    kill -INT $pid 2>/dev/null || true
    wait $pid || true
    [ $rc -ne 0 ] || { fail "the second run into $c succeeded"; return 1; }
    grep -q "another run (pid $pid) is writing checkpoints into it" "$c.second.log" ||
        { cat "$c.second.log"; fail "the refusal does not say another run (pid $pid) is writing there"; return 1; }
    [ $ms -lt 5000 ] || fail "refused only after $ms ms"
    echo "OK: refused in $ms ms, exit $rc: $(sed 's/^Error: //; s/ (lock file.*//' "$c.second.log" | head -1)"
}

# NaN: a learning rate of 1e30 makes the second step's gradients NaN; the run skips the steps,
# stops after --max-bad-steps in a row with exit 1, and the checkpoint it resumed is unchanged.
nan() {
    local n=$WORK/nan rc=0 f skipped
    cp -r "$WORK/pretrain-A" "$n"
    cp -r "$n" "$n.before"
    "$BIN/pretrain" --resume "$n" --max-iters 340 --lr 1e30 --max-bad-steps 3 --sample-chars 0 >"$n.log" 2>&1 || rc=$?
    [ $rc -eq 1 ] || { tail -3 "$n.log"; fail "exit status $rc, expected 1"; return 1; }
    grep -q '^--lr: 0.001 (saved) -> 1e+30 from step 300' "$n.log" || fail "no '--lr: 0.001 (saved) -> 1e+30 from step 300' line"
    skipped=$(grep -c '^step  *[0-9]*: skipped (' "$n.log" || true)
    [ "$skipped" -eq 3 ] || fail "$skipped 'skipped' lines, expected 3"
    grep -q '^Error: training stopped: 3 steps in a row were skipped .*raise --max-bad-steps' "$n.log" ||
        { tail -2 "$n.log"; fail "no 'training stopped: 3 steps in a row were skipped … raise --max-bad-steps' error"; }
    # Every file as it was (metrics.jsonl, a log, gets the skipped steps' rows).
    diff -r -x metrics.jsonl "$n.before" "$n" >"$n.diff" 2>&1 || { cat "$n.diff"; fail "the checkpoint directory changed"; }
    echo "OK: $skipped steps skipped, exit 1, checkpoint unchanged: $(grep '^Error:' "$n.log" | cut -c8-90)…"
}

# A model that cannot fit in memory is refused before anything is allocated.
memory() {
    local m=$WORK/huge rc=0 t0 ms
    t0=$(date +%s%N)
    timeout 60 "$BIN/pretrain" --data "$TEXT" --out "$m" --n-embd 100000000 --n-head 1 --max-iters 1 \
        --sample-chars 0 >"$m.log" 2>&1 || rc=$?
    ms=$((($(date +%s%N) - t0) / 1000000))
    [ $rc -eq 1 ] || { tail -3 "$m.log"; fail "exit status $rc, expected 1"; return 1; }
    grep -qiE 'memory|GiB' "$m.log" || { tail -3 "$m.log"; fail "the error does not mention memory"; return 1; }
    [ $ms -lt 10000 ] || fail "refused only after $ms ms"
    [ ! -e "$m" ] || fail "$m was created"
    echo "OK: refused in $ms ms: $(grep '^Error:' "$m.log" | cut -c8-100)…"
}

# A full disk and a read-only --out, on small tmpfs mounts (skipped where this user cannot
# mount): the run is refused before its first step, naming the path and the bytes needed, and
# the checkpoint already there is unchanged.
mount_tmpfs() { # DIR SIZE
    mkdir -p "$1"
    mount -t tmpfs -o "size=$2" tmpfs "$1" 2>/dev/null || return 1
    MOUNTS+=("$1")
}
disk_full() {
    local d=$WORK/full rc=0 free
    mount_tmpfs "$d" 4m || { echo "OK: skipped (cannot mount a tmpfs here)"; return 0; }
    "$BIN/pretrain" --data "$TEXT" --out "$d/out" --n-layer 2 --n-head 2 --n-embd 64 --max-iters 20 \
        --eval-interval 10 --eval-iters 2 --sample-chars 0 >"$d.first.log" 2>&1 ||
        { tail -3 "$d.first.log"; fail "the first run did not fit in 4 MB"; return 1; }
    cp -r "$d/out" "$WORK/full-before"
    # Fill the disk but for 200 kB.
    free=$(df --output=avail -B1 "$d" | tail -1)
    head -c $((free - 200000)) /dev/zero >"$d/filler" 2>/dev/null || true
    "$BIN/pretrain" --resume "$d/out" --max-iters 40 --sample-chars 0 >"$d.log" 2>&1 || rc=$?
    [ $rc -eq 1 ] || { tail -3 "$d.log"; fail "exit status $rc, expected 1"; return 1; }
    grep -q 'a checkpoint needs .* bytes) and the file system holding it has .* free' "$d.log" ||
        { tail -3 "$d.log"; fail "no 'a checkpoint needs … free' error"; return 1; }
    diff -r "$WORK/full-before" "$d/out" >"$d.diff" 2>&1 || { cat "$d.diff"; fail "the checkpoint changed"; }
    [ -z "$(ls -A "$d" | grep -v '^out$\|^filler$')" ] || fail "left behind: $(ls -A "$d")"
    echo "OK: exit 1, checkpoint unchanged: $(grep '^Error:' "$d.log" | sed 's/^Error: //' | cut -c1-150)…"
}
read_only() {
    local d=$WORK/ro rc=0
    mount_tmpfs "$d" 4m || { echo "OK: skipped (cannot mount a tmpfs here)"; return 0; }
    cp -r "$WORK/pretrain-A" "$d/out"
    mount -o remount,ro "$d" || { echo "OK: skipped (cannot remount read-only)"; return 0; }
    "$BIN/pretrain" --resume "$d/out" --max-iters 340 --sample-chars 0 >"$d.log" 2>&1 || rc=$?
    [ $rc -eq 1 ] || { tail -3 "$d.log"; fail "exit status $rc, expected 1"; return 1; }
    grep -q 'Read-only file system' "$d.log" || { tail -3 "$d.log"; fail "no 'Read-only file system' error"; return 1; }
    diff -r "$WORK/pretrain-A" "$d/out" >"$d.diff" 2>&1 || { cat "$d.diff"; fail "the checkpoint changed"; }
    echo "OK: exit 1: $(grep '^Error:' "$d.log" | sed 's/^Error: //' | cut -c1-150)"
}

check setup setup
if [ "${RESULTS[0]}" = PASS ]; then
    check "pretrain SIGINT" pretrain_int
    check "sft SIGINT" sft_int
    check "ppo SIGINT" ppo_int
    check "pretrain SIGTERM" pretrain_term
    check "second Ctrl-C" double_int
    check "lock" lock
    if [ -d "$WORK/pretrain-A" ]; then check "NaN steps" nan; fi
    check "memory" memory
    check "disk full" disk_full
    if [ -d "$WORK/pretrain-A" ]; then check "read-only --out" read_only; fi
fi

echo
printf '%-18s %-6s %s\n' check result detail
printf '%-18s %-6s %s\n' ------------------ ------ ------
failed=0
for i in "${!NAMES[@]}"; do
    printf '%-18s %-6s %s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${DETAILS[$i]}"
    [ "${RESULTS[$i]}" = PASS ] || failed=$((failed + 1))
done
echo "crash_checks: ${#NAMES[@]} checks, $failed failed, $((SECONDS - STARTED)) s"
[ $failed -eq 0 ]
