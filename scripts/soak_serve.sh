#!/usr/bin/env bash
# Soak test of netcl-serve --train: wrk -t2 -c32 for SECONDS (default 600)
# while the server's resident memory is sampled every 10 s. Prints the RSS
# after the first minute and at the end, its growth, and wrk's summary
# (non-2xx responses and socket errors must be 0).
#
#   scripts/soak_serve.sh            # 10 minutes
#   SECONDS_TOTAL=120 scripts/soak_serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."

TOTAL=${SECONDS_TOTAL:-600}
PORT=${PORT:-18282}
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install -y wrk)"; exit 1; }
cargo build --release --quiet -p netcl-serve --bin netcl-serve

TMP=$(mktemp -d)
target/release/netcl-serve --listen "127.0.0.1:$PORT" --train 2>"$TMP/server.log" &
SERVER_PID=$!
trap 'kill -TERM $SERVER_PID 2>/dev/null || true; wait $SERVER_PID 2>/dev/null || true; rm -rf "$TMP"' EXIT
for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
    sleep 0.05
done

rss_kib() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB$/\1/p' "/proc/$SERVER_PID/status"; }

wrk -t2 -c32 -d"${TOTAL}s" --latency -s serve/bench/predict.lua \
    "http://127.0.0.1:$PORT/v1/predict" >"$TMP/wrk.out" &
WRK_PID=$!
start=$(date +%s)
echo "elapsed_s rss_kib version"
while kill -0 "$WRK_PID" 2>/dev/null; do
    sleep 10
    elapsed=$(($(date +%s) - start))
    version=$(curl -sf "http://127.0.0.1:$PORT/v1/model" | sed -n 's/.*"version":\([0-9]*\).*/\1/p')
    echo "$elapsed $(rss_kib) $version" | tee -a "$TMP/rss"
done
wait "$WRK_PID"
first=$(awk '$1 >= 60 { print $2; exit }' "$TMP/rss")
last=$(tail -n 1 "$TMP/rss" | awk '{ print $2 }')
echo "RSS after 1 minute: $first KiB; at the end: $last KiB; growth $(awk -v a="$first" -v b="$last" 'BEGIN { printf "%.2f", 100 * (b - a) / a }')% (goal <= 2%)"
# The samples jitter by a few percent (allocator caches): also compare the
# mean of the second minute with the mean of the last minute.
awk -v total="$TOTAL" '
    $1 >= 60 && $1 < 120 { a += $2; na++ }
    $1 >= total - 60 { b += $2; nb++ }
    END { printf "mean RSS, second minute: %.0f KiB; last minute: %.0f KiB; growth %.2f%%\n", a / na, b / nb, 100 * (b / nb - a / na) / (a / na) }
' "$TMP/rss"
grep -E '^RESULT|Non-2xx|Socket errors' "$TMP/wrk.out" || true
