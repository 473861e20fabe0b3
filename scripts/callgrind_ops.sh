#!/usr/bin/env bash
# Instructions per small op, counted by callgrind: repeatable on a shared
# machine where timings drift. Prints one line per workload.
#
#   scripts/callgrind_ops.sh            # this checkout
#
# Needs valgrind (apt-get install valgrind).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is not installed: apt-get install valgrind"; exit 0; }

binary=$(cargo bench --bench instructions --no-run --message-format=json 2>/dev/null \
  | grep -o '"executable":"[^"]*instructions[^"]*"' | tail -1 | cut -d'"' -f4)
n=${OPS:-100000}
# The chain (10 ops and a backward pass) and the batch-1 MLP forward are
# larger: fewer repetitions.
chain_n=$(( n / 10 ))
count() {
  local out
  out=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null "$binary" "$1" "$2" 2>&1)
  echo "$out" | grep -o 'Collected : [0-9]*' | grep -o '[0-9]*'
}
for workload in add_recorded add_no_grad add_raw_ndarray chain10 mlp_forward_batch1 mlp_forward_batch1_raw; do
  reps=$n
  case "$workload" in chain10 | mlp_forward_batch1*) reps=$chain_n ;; esac
  base=$(count "$workload" 0)
  full=$(count "$workload" "$reps")
  echo "$workload: $(( (full - base) / reps )) instructions per call ($reps calls)"
done
