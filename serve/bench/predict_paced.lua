-- wrk script for the soak at a fixed fraction of full load
-- (scripts/soak_serve.sh with LOAD=half): the request of predict.lua, and
-- each connection waits WRK_DELAY_MS milliseconds (default 2) before its next
-- request, so the rate is about connections / (delay + latency).
--
--   WRK_DELAY_MS=2 wrk -t2 -c64 -d60s --latency -s serve/bench/predict_paced.lua \
--       http://127.0.0.1:8080/v1/predict

local delay_ms = tonumber(os.getenv("WRK_DELAY_MS") or "2")

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"inputs": [[0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,' ..
  '0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]]}'

function delay()
  return delay_ms
end

done = function(summary, latency, requests)
  local seconds = summary.duration / 1e6
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.timeout
  io.write(string.format(
    "RESULT rps=%.1f p50_ms=%.3f p99_ms=%.3f max_ms=%.3f requests=%d non2xx=%d socket_errors=%d\n",
    summary.requests / seconds, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, summary.requests, summary.errors.status, errors))
end
