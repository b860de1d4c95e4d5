#!/usr/bin/env bash
# Black-box checks of the OpenAI-compatible server (`--features server --example serve`).
#
#   scripts/serve_checks.sh [CKPT] [PLAIN_CKPT]
#
# Builds nothing: run `cargo build --release --features server --example serve` first.
# CKPT is a chat (SFT) checkpoint (default /work/ckpt/sft); PLAIN_CKPT a plain one without a
# chat template (default /work/ckpt/bpe; skipped when the folder is missing). Starts the servers
# on free ports (`--port 0`, the address read from their `listening on http://ADDR` line):
#   A  CKPT, default settings         check_openai_client.py, then fuzz_server.py (RSS sampled)
#   B  CKPT, --max-batch 1 --max-queue 16 --api-key K
#                                     check_openai_client.py with the key, fuzz's concurrency
#   C  PLAIN_CKPT                     check_openai_client.py (the completions API)
# and finally sends each SIGTERM and checks that it exits with status 0 (B with an idle
# connection and a half-sent request open, which must not hold it past 10 s). Servers still
# running when the script ends (any way) are killed.
#
# Environment: PYTHON (default /work/venv/bin/python, with `openai` installed), SERVE_BIN
# (default target/release/examples/serve), FUZZ_CASES (2000), FUZZ_SEED (0), START_TIMEOUT (s,
# 180). Prints one PASS/FAIL line per step and `serve_checks: N passed, N failed`; exits 0 only
# when nothing failed.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-/work/venv/bin/python}
CKPT=${1:-/work/ckpt/sft}
PLAIN=${2:-/work/ckpt/bpe}
BIN=${SERVE_BIN:-target/release/examples/serve}
CASES=${FUZZ_CASES:-2000}
SEED=${FUZZ_SEED:-0}
START_TIMEOUT=${START_TIMEOUT:-180}
KEY="serve-checks-key-$$"

TMP=$(mktemp -d)
declare -A PID_OF=()
PASSED=0
FAILED=0

cleanup() {
    for name in "${!PID_OF[@]}"; do
        kill -KILL "${PID_OF[$name]}" 2>/dev/null
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pass() { PASSED=$((PASSED + 1)); echo "PASS $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL $*"; }

for f in "$BIN" "$PY"; do
    if [[ ! -x $f ]]; then
        echo "FAIL $f is missing (build with: cargo build --release --features server --example serve;"
        echo "     python: python3 -m venv /work/venv && /work/venv/bin/pip install openai)"
        exit 1
    fi
done
if [[ ! -d $CKPT ]]; then
    echo "FAIL checkpoint $CKPT is missing"
    exit 1
fi

# start_server NAME ARGS...: starts the binary, waits for its address; sets ADDR.
start_server() {
    local name=$1
    shift
    "$BIN" --port 0 "$@" >"$TMP/$name.out" 2>"$TMP/$name.err" &
    local pid=$!
    PID_OF[$name]=$pid
    local t0=$SECONDS line=""
    while ((SECONDS - t0 < START_TIMEOUT)); do
        line=$(grep -m1 -o 'listening on http://[^[:space:]]*' "$TMP/$name.out" 2>/dev/null)
        [[ -n $line ]] && break
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid"
            fail "server $name ($*) exited with status $? before listening; stderr:"
            tail -20 "$TMP/$name.err"
            unset "PID_OF[$name]"
            return 1
        fi
        sleep 0.2
    done
    if [[ -z $line ]]; then
        fail "server $name printed no 'listening on http://ADDR' within ${START_TIMEOUT}s"
        tail -20 "$TMP/$name.err"
        return 1
    fi
    ADDR=${line#listening on }
    # A wildcard bind is reached through loopback.
    ADDR=${ADDR/0.0.0.0/127.0.0.1}
    ADDR=${ADDR/\[::\]/127.0.0.1}
    ADDR=${ADDR%/}
    pass "server $name started in $((SECONDS - t0))s: $ADDR (pid $pid; $*)"
}

# stop_server NAME [ADDR]: SIGTERM, then its exit status must be 0 (within 45 s: the drain
# timeout is 30 s). With ADDR, an idle connection and a half-sent request are held open to it
# meanwhile, and the server must be gone within 10 s all the same: idle clients must not
# delay a shutdown.
stop_server() {
    local name=$1 pid=${PID_OF[$1]:-} addr=${2:-} holder=""
    [[ -z $pid ]] && return
    if [[ -n $addr ]]; then
        local hp=${addr#http://}
        "$PY" -c '
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
idle = socket.create_connection((host, int(port)))
half = socket.create_connection((host, int(port)))
half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
print("held", flush=True)
time.sleep(60)' "$hp" >"$TMP/holder.out" 2>&1 &
        holder=$!
        for _ in $(seq 50); do grep -q held "$TMP/holder.out" && break; sleep 0.1; done
    fi
    kill -TERM "$pid" 2>/dev/null
    local t0=$SECONDS
    while kill -0 "$pid" 2>/dev/null && ((SECONDS - t0 < 45)); do
        # A zombie (exited, not yet reaped) still answers kill -0.
        [[ $(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null) == Z ]] && break
        sleep 0.2
    done
    if [[ $(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null) =~ ^[RSD]$ ]]; then
        fail "server $name still running 45 s after SIGTERM (killed)"
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    else
        wait "$pid"
        local rc=$? took=$((SECONDS - t0))
        if ((rc == 0)); then
            pass "server $name exited 0 on SIGTERM (after ${took}s)"
        else
            fail "server $name exited with status $rc on SIGTERM; stderr tail:"
            tail -10 "$TMP/$name.err"
        fi
        if [[ -n $holder ]]; then
            if ((took <= 10)); then
                pass "server $name shut down in ${took}s with an idle connection and a half-sent request open"
            else
                fail "server $name took ${took}s to shut down with an idle connection and a half-sent request open (want <= 10 s)"
            fi
        fi
    fi
    [[ -n $holder ]] && kill "$holder" 2>/dev/null && wait "$holder" 2>/dev/null
    unset "PID_OF[$name]"
}

# step NAME CMD...: runs a check script, its output indented.
step() {
    local name=$1
    shift
    local t0=$SECONDS
    "$@" 2>&1 | sed 's/^/    /'
    local rc=${PIPESTATUS[0]}
    if ((rc == 0)); then
        pass "$name ($((SECONDS - t0))s)"
    else
        fail "$name (exit $rc, $((SECONDS - t0))s)"
    fi
}

ADDR=""
if start_server A --ckpt "$CKPT"; then
    A_ADDR=$ADDR
    step "openai client against A ($CKPT)" \
        "$PY" scripts/check_openai_client.py --base-url "$A_ADDR/v1"
fi
if start_server B --ckpt "$CKPT" --max-batch 1 --max-queue 16 --api-key "$KEY"; then
    B_ADDR=$ADDR
    step "openai client against B (--api-key)" \
        "$PY" scripts/check_openai_client.py --base-url "$B_ADDR/v1" --api-key "$KEY"
fi
if [[ -n ${PID_OF[A]:-} ]]; then
    conc=()
    [[ -n ${PID_OF[B]:-} ]] && conc=(--conc-url "$B_ADDR" --conc-api-key "$KEY")
    step "fuzz A ($CASES cases, seed $SEED)$([[ -n ${conc[*]} ]] && echo ', concurrency on B')" \
        "$PY" scripts/fuzz_server.py --url "$A_ADDR" --cases "$CASES" --seed "$SEED" \
        --pid "${PID_OF[A]}" "${conc[@]}"
fi
if [[ -d $PLAIN ]]; then
    if start_server C --ckpt "$PLAIN"; then
        step "openai client against C (plain model $PLAIN)" \
            "$PY" scripts/check_openai_client.py --base-url "$ADDR/v1"
        stop_server C
    fi
else
    echo "SKIP plain-model checks: $PLAIN is missing"
fi
stop_server A
stop_server B "${B_ADDR:-}"

echo "serve_checks: $PASSED passed, $FAILED failed"
((FAILED == 0))
