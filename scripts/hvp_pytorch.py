"""PyTorch's side of the Hessian-vector-product benchmark (benches/netcl/hvp.rs):
the 784-256-256-10 tanh MLP with cross-entropy at batch 32, one thread,
float32 on CPU. Prints the median time of one forward+backward and of one
HVP by double backward (torch.autograd.grad(..., create_graph=True), then the
gradient of g . v), and their ratio.

    /work/venv/bin/python scripts/hvp_pytorch.py            # PyTorch alone
    /work/venv/bin/python scripts/hvp_pytorch.py --netcl    # and netcl's rows, interleaved

With `--netcl` the same invocation also runs netcl's rows
(`cargo bench --bench netcl -- hvp`, criterion's median) between two PyTorch
runs, and prints both ratios of the issue's targets: netcl's HVP over its
forward+backward, and netcl's HVP over PyTorch's.
"""

import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
torch.manual_seed(4)

sizes = [784, 256, 256, 10]
params = []
for i, o in zip(sizes[:-1], sizes[1:]):
    params.append((torch.randn(i, o) / i**0.5).requires_grad_())
    params.append(torch.zeros(o).requires_grad_())
x = torch.rand(32, 784)
y = torch.arange(32) % 10
v = [torch.randn_like(p) for p in params]


def loss():
    h = x
    layers = len(params) // 2
    for k in range(layers):
        h = h @ params[2 * k] + params[2 * k + 1]
        if k + 1 < layers:
            h = torch.tanh(h)
    return F.cross_entropy(h, y)


def fwd_bwd():
    return torch.autograd.grad(loss(), params)


def hvp():
    g = torch.autograd.grad(loss(), params, create_graph=True)
    dot = sum((gi * vi).sum() for gi, vi in zip(g, v))
    return torch.autograd.grad(dot, params)


def timed(f, seconds=2.0):
    for _ in range(20):
        f()
    samples = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(10):
            f()
        samples.append((time.perf_counter() - start) / 10)
    return statistics.median(samples), min(samples), max(samples)


def torch_rows():
    a = timed(fwd_bwd)
    b = timed(hvp)
    print(f"torch {torch.__version__} fwd_bwd median {a[0]*1e6:.0f} us (min {a[1]*1e6:.0f}, max {a[2]*1e6:.0f})")
    print(f"torch {torch.__version__} hvp     median {b[0]*1e6:.0f} us (min {b[1]*1e6:.0f}, max {b[2]*1e6:.0f})")
    print(f"torch hvp / fwd_bwd = {b[0]/a[0]:.2f}")
    return b[0]


UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def netcl_rows():
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        ["cargo", "bench", "--bench", "netcl", "--", "hvp"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout
    rows = {}
    for name, value, unit in re.findall(r"hvp/(\w+)\s+time:\s+\[\S+ \S+ (\S+) (\S+) ", out):
        rows[name] = float(value) * UNITS[unit]
    print(f"netcl fwd_bwd median {rows['fwd_bwd_b32_1t']*1e6:.0f} us, hvp median {rows['hvp_b32_1t']*1e6:.0f} us")
    print(f"netcl hvp / fwd_bwd = {rows['hvp_b32_1t']/rows['fwd_bwd_b32_1t']:.2f} (target <= 3.5)")
    return rows["hvp_b32_1t"]


if "--netcl" in sys.argv:
    before = torch_rows()
    ours = netcl_rows()
    after = torch_rows()
    theirs = statistics.median([before, after])
    print(f"netcl hvp / torch hvp = {ours/theirs:.2f} (target <= 0.8; torch: median of the runs before and after)")
else:
    torch_rows()
