#!/usr/bin/env bash
# Soak test of netcl-serve --train: wrk -t2 -c32 for SECONDS (default 600)
# while the server's resident memory is sampled every 10 s. Prints the RSS
# after the first minute and at the end, its growth, and wrk's summary
# (non-2xx responses and socket errors must be 0).
#
#   scripts/soak_serve.sh            # 10 minutes at full load
#   SECONDS_TOTAL=120 scripts/soak_serve.sh
#   LOAD=half SECONDS_TOTAL=3600 scripts/soak_serve.sh   # one hour at half load
#
# LOAD=half first measures the full-load rate for 20 s, then paces each
# connection (serve/bench/predict_paced.lua, a 2 ms wait between requests)
# with as many connections as reach half that rate in two 15 s
# calibration runs; the run's own rate is printed beside the probe's. The
# growth is also measured from minute 5 (the allocator's caches settle in
# the first minutes).
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

if [ "${LOAD:-full}" = half ]; then
    wrk -t2 -c32 -d20s --latency -s serve/bench/predict.lua \
        "http://127.0.0.1:$PORT/v1/predict" >"$TMP/probe.out"
    full=$(sed -n 's/^RESULT rps=\([0-9.]*\).*/\1/p' "$TMP/probe.out")
    # rate per connection ~ 1000 / (delay + ~0.3 ms of latency): a first
    # guess, then two 15 s paced calibrations scale it to what the
    # connections really reach (the guess reached 0.38 of the probe in one
    # hour-long run).
    conns=$(awk -v r="$full" 'BEGIN { c = int(r / 2 * 2.3 / 1000 + 0.5); if (c < 2) c = 2; print c }')
    for _ in 1 2; do
        WRK_DELAY_MS=2 wrk -t2 -c"$conns" -d15s --latency -s serve/bench/predict_paced.lua \
            "http://127.0.0.1:$PORT/v1/predict" >"$TMP/calibrate.out"
        reached=$(sed -n 's/^RESULT rps=\([0-9.]*\).*/\1/p' "$TMP/calibrate.out")
        conns=$(awk -v r="$full" -v got="$reached" -v c="$conns" \
            'BEGIN { n = int(c * (r / 2) / (got > 0 ? got : r / 2) + 0.5); if (n < 2) n = 2; if (n > 4 * c) n = 4 * c; print n }')
    done
    echo "full-load probe: $full req/s; calibration reached $reached req/s; half load: $conns connections with a 2 ms pause"
    WRK_DELAY_MS=2 wrk -t2 -c"$conns" -d"${TOTAL}s" --latency -s serve/bench/predict_paced.lua \
        "http://127.0.0.1:$PORT/v1/predict" >"$TMP/wrk.out" &
else
    wrk -t2 -c32 -d"${TOTAL}s" --latency -s serve/bench/predict.lua \
        "http://127.0.0.1:$PORT/v1/predict" >"$TMP/wrk.out" &
fi
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
if [ "$TOTAL" -gt 360 ]; then
    awk '
        $1 >= 300 && !s { s = $2; m = $2 }
        s && $2 > m { m = $2 }
        { last = $2 }
        END { printf "from minute 5: RSS %d KiB; at the end %d KiB (%+.1f MiB); highest after minute 5 %d KiB (%+.1f MiB) (goal <= +8 MiB)\n", s, last, (last - s) / 1024, m, (m - s) / 1024 }
    ' "$TMP/rss"
fi
[ "${LOAD:-full}" = half ] && echo "full-load probe: $full req/s"
grep -E '^RESULT|Non-2xx|Socket errors' "$TMP/wrk.out" || true
