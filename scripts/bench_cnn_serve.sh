#!/usr/bin/env bash
# The digits CNN through HTTP: netcl-serve against FastAPI + uvicorn +
# PyTorch serving the same checkpoint, under the same wrk command, in
# alternating rounds in this one invocation (only one server runs at a
# time). Prints each round's throughput, p50 and p99, and the server's CPU
# time per request (all its processes and threads, from /proc), the ratio
# of netcl-serve's throughput to FastAPI's per round, and their median;
# and the same for requests per CPU-second of the server.
#
#   scripts/bench_cnn_serve.sh                      # 3 rounds of wrk -t2 -c32 -d15s --latency
#   PYTHON=/path/to/venv/bin/python scripts/bench_cnn_serve.sh
#   ROUNDS=5 DURATION=30s scripts/bench_cnn_serve.sh
#   SERVE_FLAGS="--threads 2" scripts/bench_cnn_serve.sh   # netcl-serve flags beyond its defaults
#   WORKERS=1 scripts/bench_cnn_serve.sh            # uvicorn worker processes (default 2)
#   CNN=digits_cnn.safetensors scripts/bench_cnn_serve.sh  # an existing checkpoint
#   NO_BUILD=1 scripts/bench_cnn_serve.sh           # use target/release as it is
#   SERVE_FLAGS_B="--threads 2 --inline-forwards" scripts/bench_cnn_serve.sh
#       # a second netcl-serve configuration in each round ("netcl-serve B")
#   CEILING=1 scripts/bench_cnn_serve.sh            # and the bare axum ceiling
#       # (serve/examples/ceiling.rs: parses the body, answers a fixed
#       # prediction, computes nothing): what HTTP alone allows here
#
# netcl-serve runs with its defaults (micro-batching: --max-batch 64
# --max-wait-us 0 --threads 1 model thread, --http-threads 2) plus
# SERVE_FLAGS; FastAPI is scripts/fastapi_cnn.py (uvicorn, WORKERS
# processes, torch.set_num_threads(1) in each). Both get the same request
# (serve/bench/predict.lua: one digit, 64 raw pixels) on
# /v1/models/cnn/predict, and must give the same classes for the first 50
# digits before anything is measured. The checkpoint is trained with
# `cargo run --release --example train_cnn -- --save` unless CNN names one.
#
# Needs wrk (apt-get install -y wrk), curl, and a Python with torch,
# safetensors, fastapi and uvicorn (pip install torch safetensors fastapi
# "uvicorn[standard]"); PYTHON names it (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-15s}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-32}
WRK_THREADS=${WRK_THREADS:-2}
ROUNDS=${ROUNDS:-3}
SERVE_FLAGS=${SERVE_FLAGS:-}
WORKERS=${WORKERS:-2}
PYTHON=${PYTHON:-python3}
PORT=${PORT:-18191}
LUA=serve/bench/predict.lua
ROUTE=/v1/models/cnn/predict

for tool in wrk curl; do
    command -v "$tool" >/dev/null || { echo "$tool is not installed (apt-get install -y $tool)"; exit 1; }
done
if ! "$PYTHON" -c 'import torch, safetensors, fastapi, uvicorn' 2>/dev/null; then
    echo "$PYTHON cannot import torch, safetensors, fastapi and uvicorn: install them or set PYTHON"
    exit 1
fi
if [[ -z "${NO_BUILD:-}" ]]; then
    cargo build --release --quiet -p netcl-serve --bin netcl-serve --example ceiling
fi
BIN=target/release/netcl-serve
CEILING_BIN=target/release/examples/ceiling
SERVE_FLAGS_B=${SERVE_FLAGS_B:-}

TMP=$(mktemp -d)
SERVER_PID=""
stop_server() {
    if [[ -n "$SERVER_PID" ]]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}
trap 'stop_server; rm -rf "$TMP"' EXIT

if [[ -z "${CNN:-}" ]]; then
    CNN=$TMP/digits_cnn.safetensors
    [[ -n "${NO_BUILD:-}" ]] || cargo build --release --quiet -p netcl --example train_cnn
    target/release/examples/train_cnn --save "$CNN" | tail -1
fi

wait_up() {
    for _ in $(seq 1200); do
        curl -sf "$1" >/dev/null 2>&1 && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "the server exited; its log:"; cat "$2"; exit 1; }
        sleep 0.05
    done
    echo "no answer from $1"
    exit 1
}

start_netcl() { # [FLAGS]: netcl-serve with FLAGS (default SERVE_FLAGS)
    # shellcheck disable=SC2086
    "$BIN" --listen "127.0.0.1:$PORT" --model "cnn=$CNN" ${1-$SERVE_FLAGS} 2>"$TMP/netcl.log" &
    SERVER_PID=$!
    wait_up "http://127.0.0.1:$PORT/healthz" "$TMP/netcl.log"
}

start_ceiling() {
    "$CEILING_BIN" "127.0.0.1:$PORT" 2>"$TMP/ceiling.log" &
    SERVER_PID=$!
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "the ceiling did not start; its log:"
    cat "$TMP/ceiling.log"
    exit 1
}

start_fastapi() {
    "$PYTHON" scripts/fastapi_cnn.py --port "$PORT" --workers "$WORKERS" --weights "$CNN" \
        2>"$TMP/fastapi.log" &
    SERVER_PID=$!
    wait_up "http://127.0.0.1:$PORT/healthz" "$TMP/fastapi.log"
}

# The first N digits of data/digits.csv as a predict body (raw pixels).
digits_body() {
    awk -F, -v n="$1" 'NR > 1 && NR <= n + 1 {
        row = $1; for (i = 2; i <= 64; i++) row = row "," $i
        rows = rows (NR > 2 ? "," : "") "[" row "]"
    } END { print "{\"inputs\": [" rows "]}" }' data/digits.csv
}

classes() {
    curl -sf "http://127.0.0.1:$PORT$ROUTE" -H 'content-type: application/json' \
        --data-binary @"$TMP/rows.json" | sed -n 's/.*"classes":\[\([0-9,]*\)\].*/\1/p'
}

# The server process and every process below it (uvicorn's workers).
descendants() {
    echo "$1"
    local child
    for child in $(pgrep -P "$1"); do descendants "$child"; done
}

# CPU time (user + system, clock ticks) of the server's process tree.
server_ticks() {
    local pid
    for pid in $(descendants "$SERVER_PID"); do
        # The fields after the command name: utime and stime are the 12th and 13th.
        [[ -r /proc/$pid/stat ]] && sed 's/.*) //' "/proc/$pid/stat"
    done | awk '{ s += $12 + $13 } END { print s + 0 }'
}
TICKS_PER_S=$(getconf CLK_TCK)

# run_wrk NAME: a warm-up, then the measured wrk run; its RESULT line, with
# the server's CPU time per request (cpu_us, all its processes and threads)
# added, goes to $TMP/NAME.
run_wrk() {
    wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$WARMUP" -s "$LUA" "http://127.0.0.1:$PORT$ROUTE" >/dev/null
    local before after requests
    before=$(server_ticks)
    wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$LUA" \
        "http://127.0.0.1:$PORT$ROUTE" >"$TMP/$1.out"
    after=$(server_ticks)
    requests=$(sed -n 's/^RESULT .*requests=\([0-9]*\).*/\1/p' "$TMP/$1.out")
    echo "$(grep '^RESULT' "$TMP/$1.out" | sed 's/^RESULT //')" \
        "cpu_us=$(awk -v t=$((after - before)) -v hz="$TICKS_PER_S" -v r="$requests" \
            'BEGIN { printf "%.1f", r ? t * 1e6 / hz / r : 0 }')" >"$TMP/$1"
}

field() { tr ' ' '\n' <"$TMP/$1" | sed -n "s/^$2=//p"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a / b }'; }

# Both servers must give the same answers before they are compared.
digits_body 50 >"$TMP/rows.json"
start_netcl
netcl_classes=$(classes)
stop_server
start_fastapi
fastapi_classes=$(classes)
stop_server
if [[ -z "$netcl_classes" || "$netcl_classes" != "$fastapi_classes" ]]; then
    echo "the servers disagree on the first 50 digits:"
    echo "  netcl-serve: [$netcl_classes]"
    echo "  FastAPI:     [$fastapi_classes]"
    exit 1
fi
echo "same classes from both for the first 50 digits: [$netcl_classes]"

echo "CPU: $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1), $(nproc) vCPUs"
echo "wrk -t$WRK_THREADS -c$CONNECTIONS -d$DURATION --latency -s $LUA (after a $WARMUP warm-up) on $ROUTE"
echo "netcl-serve flags: --model cnn=CHECKPOINT ${SERVE_FLAGS:-(defaults)}; FastAPI: uvicorn --workers $WORKERS, torch threads 1"
[[ -z "$SERVE_FLAGS_B" ]] || echo "netcl-serve B flags: --model cnn=CHECKPOINT $SERVE_FLAGS_B"
echo "load before: $(uptime)"
sides=(netcl)
[[ -z "$SERVE_FLAGS_B" ]] || sides+=(netclB)
[[ -z "${CEILING:-}" ]] || sides+=(ceiling)
label() {
    case $1 in
    netcl) echo "netcl-serve" ;;
    netclB) echo "netcl-serve B" ;;
    ceiling) echo "bare axum ceiling" ;;
    fastapi) echo "FastAPI+PyTorch" ;;
    esac
}
declare -A ratios cpu_ratios
for round in $(seq "$ROUNDS"); do
    for side in "${sides[@]}" fastapi; do
        case $side in
        netcl) start_netcl ;;
        netclB) start_netcl "$SERVE_FLAGS_B" ;;
        ceiling) start_ceiling ;;
        fastapi) start_fastapi ;;
        esac
        run_wrk "$side$round"
        stop_server
        echo "round $round: $(label "$side") $(cat "$TMP/$side$round")"
    done
    for side in "${sides[@]}"; do
        r=$(ratio "$(field "$side$round" rps)" "$(field "fastapi$round" rps)")
        ratios[$side]+="$r "
        echo "round $round: $(label "$side") / FastAPI req/s ${r}x"
        c=$(ratio "$(field "fastapi$round" cpu_us)" "$(field "$side$round" cpu_us)")
        cpu_ratios[$side]+="$c "
        echo "round $round: $(label "$side") serves ${c}x FastAPI's requests per CPU-second"
    done
done
echo "load after: $(uptime)"

echo
printf '%-6s %-20s %10s %9s %9s %8s %12s\n' round server "req/s" "p50 ms" "p99 ms" non-2xx "CPU us/req"
for round in $(seq "$ROUNDS"); do
    for side in "${sides[@]}" fastapi; do
        printf '%-6s %-20s %10s %9s %9s %8s %12s\n' "$round" "$(label "$side")" "$(field "$side$round" rps)" \
            "$(field "$side$round" p50_ms)" "$(field "$side$round" p99_ms)" "$(field "$side$round" non2xx)" \
            "$(field "$side$round" cpu_us)"
    done
done
echo
median() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
for side in "${sides[@]}"; do
    echo "$(label "$side") / FastAPI+PyTorch req/s: median $(echo "${ratios[$side]}" | median)x" \
        "(rounds: ${ratios[$side]% }; goal >= 20)"
done
# wrk runs on the same cores: the faster a server, the more CPU wrk takes
# from it. The server's own CPU per request is what a deployment with its
# clients elsewhere pays.
for side in "${sides[@]}"; do
    echo "$(label "$side") requests per server CPU-second / FastAPI+PyTorch's: median" \
        "$(echo "${cpu_ratios[$side]}" | median)x (rounds: ${cpu_ratios[$side]% })"
done
