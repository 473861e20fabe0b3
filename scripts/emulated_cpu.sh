#!/usr/bin/env bash
# netcl on a CPU without AVX-512: the matrix-kernel, gradcheck and training
# tests run under qemu's user-mode emulation of a Haswell (AVX2 + FMA, no
# AVX-512), after the same accuracy test has run natively. netcl is built
# once, for x86-64 with the `gemm` crate's AVX-512 kernels compiled in;
# gemm picks a kernel at run time (CPUID, once per process). Passing here
# shows that the binary built on an AVX-512 machine falls back to the AVX2
# kernel instead of executing AVX-512 instructions (qemu 7.2 does not
# emulate AVX-512: one would end the process with SIGILL), and that the
# fallback's numbers are right.
#
#   scripts/emulated_cpu.sh              # ~10-20 min under emulation on 2 cores
#   CPU=Skylake-Client scripts/emulated_cpu.sh
#
# Needs qemu-user (Debian: apt-get install qemu-user). Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-x86_64 >/dev/null || { echo "qemu-x86_64 is not installed: apt-get install qemu-user" >&2; exit 1; }
cpu=${CPU:-Haswell}

echo "== native ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'))"
cargo test --release --test matmul_accuracy -- --nocapture kernel_selected_at_run_time 2>&1 \
  | grep -E 'kernel selected|test result'

echo
echo "== emulated: qemu-x86_64 -cpu $cpu ($(qemu-x86_64 --version | head -1))"
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="qemu-x86_64 -cpu $cpu"
# The detection must report the AVX2/FMA kernel, not AVX-512.
export NETCL_EXPECT_ISA=fma
# Products of the accuracy test, the kernel's own unit tests, every
# gradient check and the training tests, on the emulated CPU.
cargo test --release --test matmul_accuracy -- --nocapture 2>&1 \
  | grep -E 'kernel selected|^test |test result'
cargo test --release --lib ops:: 2>&1 | grep -E 'test result|FAILED|panicked'
cargo test --release --test gradcheck 2>&1 | grep -E 'test result|FAILED|panicked'
cargo test --release --test train 2>&1 | grep -E 'test result|FAILED|panicked'
echo "emulated $cpu: all passed"
