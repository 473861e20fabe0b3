#!/usr/bin/env python3
"""Side-by-side timings of netcl and PyTorch on the workloads of BENCHMARKS.md.

netcl's figures come from its criterion benchmarks (run here, or read from a
previous run with --no-run); PyTorch's are measured by this script on the
same machine, on CPU, with the same shapes, batch sizes and thread counts.

    python3 scripts/compare_pytorch.py            # runs `cargo bench --bench netcl` first
    python3 scripts/compare_pytorch.py --no-run   # reuses target/criterion

Needs Python 3 with torch installed (for example
`pip install torch --index-url https://download.pytorch.org/whl/cpu`).
Not part of CI.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def netcl_medians(run: bool) -> dict:
    """Median time in ns of every netcl benchmark, by criterion's full id."""
    if run:
        env = dict(os.environ, MATMUL_NUM_THREADS="1")
        subprocess.run(["cargo", "bench", "--bench", "netcl"], cwd=ROOT, env=env, check=True)
    medians = {}
    for bench in (ROOT / "target" / "criterion").glob("**/new/benchmark.json"):
        estimates = bench.with_name("estimates.json")
        if estimates.exists():
            full_id = json.loads(bench.read_text())["full_id"]
            medians[full_id] = json.loads(estimates.read_text())["median"]["point_estimate"]
    return medians


def median_ns(f, min_time=1.0, warmup=3):
    """Median ns per call of f over batches lasting about min_time in total."""
    for _ in range(warmup):
        f()
    start = time.perf_counter()
    f()
    once = max(time.perf_counter() - start, 1e-7)
    per_batch = max(1, int(0.05 / once))
    samples = []
    deadline = time.perf_counter() + min_time
    while time.perf_counter() < deadline or len(samples) < 5:
        start = time.perf_counter()
        for _ in range(per_batch):
            f()
        samples.append((time.perf_counter() - start) / per_batch * 1e9)
    return statistics.median(samples)


def torch_workloads(torch):
    nn = torch.nn
    results = {}

    torch.set_num_threads(1)
    a = torch.ones(1, requires_grad=True)
    b = torch.ones(1, requires_grad=True)
    results["tiny/add/grad"] = median_ns(lambda: a + b)
    with torch.no_grad():
        results["tiny/add/no_grad"] = median_ns(lambda: a + b)

    x = torch.full((1,), 0.5, requires_grad=True)
    w = torch.full((1,), 1.01, requires_grad=True)

    def chain():
        y = x
        for i in range(10):
            y = y * w if i % 2 == 0 else y + w
        y.backward()

    results["chain10/forward_backward"] = median_ns(chain)

    def mlp(sizes):
        layers = []
        for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if i + 2 < len(sizes):
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    for batch in (32, 128):
        xb = torch.rand(batch, 784)
        yb = torch.arange(batch) % 10
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model = mlp([784, 256, 256, 10])
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)

            def step():
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                opt.zero_grad()

            results[f"mlp_step/batch{batch}/{threads}t"] = median_ns(step)

    model = mlp([784, 256, 256, 10])
    batches = [(torch.rand(min(256, 20000 - i), 784), torch.arange(min(256, 20000 - i)) % 10)
               for i in range(0, 20000, 256)]
    for threads in (1, 2):
        torch.set_num_threads(threads)

        def evaluate():
            with torch.no_grad():
                return sum((model(xb).argmax(-1) == yb).sum().item() for xb, yb in batches)

        results[f"eval/mlp784_20k/{threads}t"] = median_ns(evaluate, min_time=3.0, warmup=1)

    torch.set_num_threads(1)
    model = mlp([784, 256, 256, 10])
    xb = torch.rand(256, 784)
    with torch.no_grad():
        results["forward/mlp784_b256/no_grad"] = median_ns(lambda: model(xb))

    for m, k, n in [(32, 784, 256), (784, 32, 256), (32, 256, 256), (256, 784, 256), (1024, 1024, 1024)]:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            lhs, rhs = torch.rand(m, k), torch.rand(k, n)
            results[f"matmul/netcl/{threads}t/{m}x{k}x{n}"] = median_ns(lambda: lhs @ rhs)
    return results


def shown(ns):
    """A duration in readable units."""
    if ns < 1e4:
        return f"{ns:.0f} ns"
    if ns < 1e7:
        return f"{ns / 1e3:.1f} us"
    return f"{ns / 1e6:.2f} ms"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="reuse target/criterion results")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("PyTorch is not installed: pip install torch --index-url https://download.pytorch.org/whl/cpu")

    netcl = netcl_medians(run=not args.no_run)
    theirs = torch_workloads(torch)
    print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads available")
    print(f"{'workload':<42} {'PyTorch':>12} {'netcl':>12} {'netcl/PyTorch':>14}")
    for name, torch_ns in theirs.items():
        ours = netcl.get(name)
        ours_shown = "n/a" if ours is None else shown(ours)
        ratio = "n/a" if ours is None else f"{ours / torch_ns:.2f}x"
        print(f"{name:<42} {shown(torch_ns):>12} {ours_shown:>12} {ratio:>14}")


if __name__ == "__main__":
    main()
