#!/usr/bin/env bash
# Runs the README's test command (`cargo test --workspace`, debug, as CI
# does) COUNT times in a row while two CPU-bound processes load the cores,
# then the loom suite once, and reports how many runs failed. A test that
# assumes another thread was scheduled in time fails here.
#
#   scripts/stress_tests.sh [COUNT]     # COUNT defaults to 10
#
# The CPU hogs are `stress-ng --cpu 2` (installed with apt-get if missing
# and possible), or else two `yes > /dev/null`; they are stopped however the
# script ends. Each run's output is logged to target/stress-logs/<time>/.
# Exits non-zero if any run failed.
set -euo pipefail
cd "$(dirname "$0")/.."

count=${1:-10}
if ! [[ $count =~ ^[0-9]+$ ]] || ((count < 1)); then
    echo "usage: $0 [COUNT]  (COUNT >= 1, default 10)" >&2
    exit 2
fi

export CARGO_TERM_COLOR=never
logs="target/stress-logs/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$logs"

hogs=()
stop_hogs() {
    local pid
    for pid in "${hogs[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${hogs[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    hogs=()
}
trap stop_hogs EXIT
trap 'stop_hogs; exit 130' INT
trap 'stop_hogs; exit 143' TERM

loom=(env RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p loom-tests --release)

# Build first, unloaded: the runs below then time the tests, not rustc.
echo "building the tests (log: $logs/build.log)"
if ! { cargo test --workspace --no-run && "${loom[@]}" --no-run; } >"$logs/build.log" 2>&1; then
    tail -n 30 "$logs/build.log" >&2
    echo "error: the tests do not build" >&2
    exit 1
fi

if ! command -v stress-ng >/dev/null 2>&1; then
    sudo=()
    if ((EUID != 0)) && command -v sudo >/dev/null 2>&1; then
        sudo=(sudo -n)
    fi
    if command -v apt-get >/dev/null 2>&1; then
        echo "installing stress-ng"
        "${sudo[@]}" apt-get install -y stress-ng >"$logs/apt.log" 2>&1 || true
    fi
fi
if command -v stress-ng >/dev/null 2>&1; then
    stress-ng --cpu 2 --quiet >/dev/null 2>&1 &
    hogs+=($!)
    load="stress-ng --cpu 2"
else
    for _ in 1 2; do
        yes >/dev/null &
        hogs+=($!)
    done
    load="two yes > /dev/null"
fi
echo "load: $load (pids ${hogs[*]}); logs: $logs"

failed=0
results=()
run() {
    local name=$1 log=$2
    shift 2
    local start=$SECONDS status=ok
    if ! "$@" >"$log" 2>&1; then
        status=FAILED
        failed=$((failed + 1))
    fi
    local line
    line=$(printf '%-10s %-6s %4ds  %s' "$name" "$status" $((SECONDS - start)) "$log")
    if [[ $status == FAILED ]]; then
        # Name the failing tests.
        local which
        which=$(grep -E '^    [A-Za-z_:0-9]+$|^test .* FAILED$|panicked at' "$log" | sort -u | head -n 8 | tr '\n' ' ' || true)
        line+="  ($which)"
    fi
    results+=("$line")
    echo "$line"
}

for i in $(seq 1 "$count"); do
    run "run $i" "$logs/run-$i.log" cargo test --workspace
done
run "loom" "$logs/loom.log" "${loom[@]}"
stop_hogs

echo
echo "== stress_tests.sh: $count runs of 'cargo test --workspace' + loom, under $load"
printf '%s\n' "${results[@]}"
echo "failed runs: $failed of $((count + 1))"
((failed == 0))
