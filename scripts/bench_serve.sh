#!/usr/bin/env bash
# Load test of netcl-serve beside its baselines, with wrk, one after the
# other on this machine: netcl-serve with and without online training, a bare
# axum server that parses the same JSON and computes nothing (the ceiling),
# and FastAPI + uvicorn + PyTorch serving the same MLP with and without
# training (skipped where torch, fastapi or uvicorn is missing).
#
#   scripts/bench_serve.sh                  # wrk -t2 -c32 -d10s --latency
#   DURATION=30s scripts/bench_serve.sh
#   SERVE_FLAGS="--max-wait-us 100" ONLY=netcl scripts/bench_serve.sh
#   ONLY=netcl-train scripts/bench_serve.sh   # netcl-serve --train alone
#   ONLY=train-ceiling ROUNDS=3 BASELINE_BIN=/tmp/old/netcl-serve scripts/bench_serve.sh
#       # rounds of: [the baseline binary --train,] netcl-serve --train, the
#       # ceiling, one after the other; ratios to the ceiling per round
#
# Needs wrk (apt-get install -y wrk) and curl.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
WRK_THREADS=${WRK_THREADS:-2}
SERVE_FLAGS=${SERVE_FLAGS:-}
ONLY=${ONLY:-all}
PORT=${PORT:-18181}
LUA=serve/bench/predict.lua

for tool in wrk curl; do
    command -v "$tool" >/dev/null || { echo "$tool is not installed (apt-get install -y $tool)"; exit 1; }
done
cargo build --release --quiet -p netcl-serve --bin netcl-serve --example ceiling
BIN=target/release/netcl-serve
CEILING=target/release/examples/ceiling

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

wait_up() {
    for _ in $(seq 600); do
        curl -sf "$1" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "no answer from $1"
    exit 1
}

model_version() {
    curl -sf "http://127.0.0.1:$PORT/v1/model" | sed -n 's/.*"version":\([0-9]*\).*/\1/p'
}

training_steps() {
    curl -sf "http://127.0.0.1:$PORT/metrics" | sed -n 's/^netcl_serve_training_steps_total \([0-9]*\)$/\1/p'
}

# run_wrk NAME: wrk against the server on $PORT; the RESULT line goes to $TMP/NAME.
run_wrk() {
    wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$LUA" \
        "http://127.0.0.1:$PORT/v1/predict" >"$TMP/$1.out"
    grep '^RESULT' "$TMP/$1.out" | sed 's/^RESULT //' >"$TMP/$1"
}

field() { tr ' ' '\n' <"$TMP/$1" | sed -n "s/^$2=//p"; }

bench_netcl() { # NAME FLAGS...
    local name=$1
    shift
    # shellcheck disable=SC2086
    "${SERVE_BIN:-$BIN}" --listen "127.0.0.1:$PORT" --weights "$TMP/model.safetensors" "$@" $SERVE_FLAGS \
        2>"$TMP/$name.log" &
    SERVER_PID=$!
    wait_up "http://127.0.0.1:$PORT/healthz"
    sleep 1
    local v0 s0 v1 s1 t0 t1
    v0=$(model_version)
    s0=$(training_steps)
    t0=$(date +%s.%N)
    run_wrk "$name"
    t1=$(date +%s.%N)
    v1=$(model_version)
    s1=$(training_steps)
    stop_server
    echo " versions=$((v1 - v0)) first_version=$v0 last_version=$v1" >>"$TMP/$name"
    echo " steps_per_s=$(awk -v a="$s0" -v b="$s1" -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.0f", (b - a) / (t1 - t0) }')" >>"$TMP/$name"
    tr '\n' ' ' <"$TMP/$name" >"$TMP/$name.1" && mv "$TMP/$name.1" "$TMP/$name"
}

bench_ceiling() {
    "$CEILING" "127.0.0.1:$PORT" 2>"$TMP/ceiling.log" &
    SERVER_PID=$!
    sleep 0.5
    run_wrk ceiling
    stop_server
}

bench_fastapi() { # NAME FLAGS...
    local name=$1
    shift
    python3 scripts/fastapi_serve.py --port "$PORT" --weights "$TMP/model.safetensors" "$@" \
        2>"$TMP/$name.log" &
    SERVER_PID=$!
    wait_up "http://127.0.0.1:$PORT/healthz"
    sleep 1
    local v0 v1
    v0=$(model_version)
    run_wrk "$name"
    v1=$(model_version)
    stop_server
    echo " versions=$((v1 - v0))" >>"$TMP/$name"
    tr '\n' ' ' <"$TMP/$name" >"$TMP/$name.1" && mv "$TMP/$name.1" "$TMP/$name"
}

echo "wrk -t$WRK_THREADS -c$CONNECTIONS -d$DURATION --latency -s $LUA (netcl-serve flags: ${SERVE_FLAGS:-defaults})"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
if [[ "$ONLY" == train-ceiling ]]; then
    uptime
    ROUNDS=${ROUNDS:-3}
    for round in $(seq "$ROUNDS"); do
        if [[ -n "${BASELINE_BIN:-}" ]]; then
            SERVE_BIN=$BASELINE_BIN bench_netcl baseline_train --train
            echo "round $round baseline --train: $(cat "$TMP/baseline_train")"
        fi
        bench_netcl netcl_train --train
        echo "round $round netcl-serve --train: $(cat "$TMP/netcl_train")"
        bench_ceiling
        echo "round $round ceiling: $(cat "$TMP/ceiling")"
        for name in ${BASELINE_BIN:+baseline_train} netcl_train; do
            rps_ratio=$(ratio "$(field $name rps)" "$(field ceiling rps)")
            p99_ratio=$(ratio "$(field $name p99_ms)" "$(field ceiling p99_ms)")
            echo "round $round $name / ceiling: req/s ${rps_ratio}x, p99 ${p99_ratio}x"
            echo "$rps_ratio" >>"$TMP/$name.rps_ratios"
            echo "$p99_ratio" >>"$TMP/$name.p99_ratios"
        done
    done
    uptime
    median() { sort -n "$1" | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
    for name in ${BASELINE_BIN:+baseline_train} netcl_train; do
        echo "$name / ceiling, median of $ROUNDS rounds: req/s $(median "$TMP/$name.rps_ratios")x (goal >= 0.8), p99 $(median "$TMP/$name.p99_ratios")x (goal <= 1.5)"
    done
    exit 0
fi
bench_netcl netcl_train --train
echo "netcl-serve --train: $(cat "$TMP/netcl_train")"
if [[ "$ONLY" == netcl-train ]]; then
    exit 0
fi
bench_netcl netcl
echo "netcl-serve:         $(cat "$TMP/netcl")"
if [[ "$ONLY" == netcl ]]; then
    exit 0
fi
bench_ceiling
echo "ceiling (bare axum): $(cat "$TMP/ceiling")"
have_torch=no
if python3 -c 'import torch, fastapi, uvicorn, numpy' 2>/dev/null; then
    have_torch=yes
    bench_fastapi fastapi_train --train
    echo "FastAPI --train:     $(cat "$TMP/fastapi_train")"
    bench_fastapi fastapi
    echo "FastAPI:             $(cat "$TMP/fastapi")"
else
    echo "FastAPI + PyTorch: skipped (python3 cannot import torch, fastapi, uvicorn and numpy)"
fi

echo
printf '%-26s %10s %9s %9s %8s %9s\n' server "req/s" "p50 ms" "p99 ms" non-2xx versions
row() { # LABEL NAME
    printf '%-26s %10s %9s %9s %8s %9s\n' "$1" "$(field "$2" rps)" "$(field "$2" p50_ms)" \
        "$(field "$2" p99_ms)" "$(field "$2" non2xx)" "$(field "$2" versions)"
}
row "netcl-serve --train" netcl_train
row "netcl-serve" netcl
row "bare axum (ceiling)" ceiling
if [[ $have_torch == yes ]]; then
    row "FastAPI+PyTorch --train" fastapi_train
    row "FastAPI+PyTorch" fastapi
fi
echo
rps=$(field netcl_train rps)
echo "training steps/s under load: $(field netcl_train steps_per_s)"
echo "netcl-serve --train / ceiling: req/s $(ratio "$rps" "$(field ceiling rps)")x (goal >= 0.8), p99 $(ratio "$(field netcl_train p99_ms)" "$(field ceiling p99_ms)")x (goal <= 1.5)"
if [[ $have_torch == yes ]]; then
    echo "netcl-serve --train / FastAPI+PyTorch --train: req/s $(ratio "$rps" "$(field fastapi_train rps)")x (goal >= 40)"
    echo "netcl-serve / FastAPI+PyTorch (no training): req/s $(ratio "$(field netcl rps)" "$(field fastapi rps)")x"
fi
