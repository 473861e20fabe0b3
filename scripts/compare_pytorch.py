#!/usr/bin/env python3
"""netcl beside PyTorch on this machine, measured side by side.

One invocation builds netcl's workload binary (`benches/workloads`), then for
each workload runs rounds that alternate the two sides, flipping their order
each round: netcl as a subprocess of the workload binary (a short batch of
calls), PyTorch in this process (the same shapes, thread count, model,
optimizer and loss). Each round gives one netcl/PyTorch ratio; the table
reports each side's median over rounds and the median of the per-round
ratios with its spread (the interquartile range, [25th-75th percentile]).
On a shared machine whose speed drifts, only such side-by-side ratios mean
anything; the absolute medians are context.

    python3 scripts/compare_pytorch.py                     # every workload, ~3 min
    python3 scripts/compare_pytorch.py --only tiny,chain   # workloads whose name contains a word
    python3 scripts/compare_pytorch.py --markdown          # the table as Markdown

The same machinery compares two builds of netcl instead (a before/after of
a change, both sides in one run, no PyTorch needed):

    cp target/release/deps/workloads-<hash> /tmp/workloads-before   # before the change
    python3 scripts/compare_pytorch.py --against /tmp/workloads-before

Needs PyTorch for the comparison with PyTorch:
`pip install torch --index-url https://download.pytorch.org/whl/cpu`.
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

INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cpu"

# name: (what it is, calls per netcl batch). A batch takes roughly 20-60 ms
# at netcl's speed when these were chosen; PyTorch's batch size is
# calibrated to the same duration.
WORKLOADS = {
    "tiny_add_grad": ("1-element a + b, both require grad", 100_000),
    "tiny_add_no_grad": ("1-element a + b, no_grad guard per call", 150_000),
    "chain10_fwd_bwd": ("10-op chain, forward + backward", 6_000),
    "mlp_step_b32_1t": ("MLP 784-256-256-10 step, batch 32, 1 thread", 50),
    "mlp_step_b128_1t": ("MLP step, batch 128, 1 thread", 15),
    "mlp_step_b128_2t": ("MLP step, batch 128, 2 threads", 20),
    "mlp_step_b128_2t_shards": (
        "MLP step, batch 128, 2 threads; netcl data-parallel (2 shards)",
        20,
    ),
    "forward_b1_64_128_10": ("no_grad forward 64-128-10, batch 1", 8_000),
    "forward_b8_64_128_10": ("no_grad forward 64-128-10, batch 8", 6_000),
    "forward_b32_64_128_10": ("no_grad forward 64-128-10, batch 32", 4_000),
    "forward_b64_64_128_10": ("no_grad forward 64-128-10, batch 64", 3_000),
    "forward_b256_784": ("no_grad forward 784-256-256-10, batch 256, 1 thread", 20),
    "eval_20k_1t": ("evaluation, 20k samples in batches of 256, 1 thread", 1),
    "eval_20k_2t": ("evaluation, 20k samples, 2 threads", 1),
    "matmul_32x784x256_1t": ("matmul 32x784x256, 1 thread", 150),
    "matmul_32x784x256_2t": ("matmul 32x784x256, 2 threads", 150),
    "matmul_784x32x256_1t": ("matmul 784x32x256, 1 thread", 150),
    "matmul_784x32x256_2t": ("matmul 784x32x256, 2 threads", 150),
    "matmul_32x256x256_1t": ("matmul 32x256x256, 1 thread", 500),
    "matmul_32x256x256_2t": ("matmul 32x256x256, 2 threads", 500),
    "matmul_256x784x256_1t": ("matmul 256x784x256, 1 thread", 25),
    "matmul_256x784x256_2t": ("matmul 256x784x256, 2 threads", 40),
    "bmm_8x4x64x32x64_fwd_bwd_1t": (
        "batched matmul [8,4,64,32] x [8,4,32,64], forward + backward, 1 thread",
        100,
    ),
    "conv2d_fwd_bwd_1t": ("conv2d [32,16,32,32] * 32x3x3 pad 1, fwd + bwd, 1 thread", 3),
    "conv2d_fwd_1t": ("conv2d [32,16,32,32] * 32x3x3 pad 1, no_grad fwd, 1 thread", 8),
    "cnn_step_b64_1t": (
        "digits CNN (conv-BN-ReLU-pool x2, 16/32 ch) Adam step, batch 64, 1 thread",
        200,
    ),
    "cnn_eval_20k_1t": ("digits CNN evaluation, 20k images in batches of 256, 1 thread", 1),
    "cnn_eval_20k_2t": ("digits CNN evaluation, 20k images, 2 threads", 1),
    "sdpa_causal_fwd_bwd_1t": (
        "causal attention [8, 4, 64, 32], forward + backward to q, k, v, 1 thread",
        30,
    ),
    "tanh_mlp_fwd_bwd_b32_1t": ("tanh MLP 784-256-256-10 forward + backward, batch 32, 1 thread", 100),
    "tanh_mlp_hvp_b32_1t": (
        "tanh MLP Hessian-vector product by double backward, batch 32, 1 thread",
        30,
    ),
    "layer_norm_fwd_bwd_1t": (
        "layer_norm [32, 64, 128] with weight and bias, forward + backward, 1 thread",
        60,
    ),
    "matmul_1024x1024x1024_1t": ("matmul 1024x1024x1024, 1 thread", 3),
    "matmul_1024x1024x1024_2t": ("matmul 1024x1024x1024, 2 threads", 4),
    "charlm_step_b32_1t": ("char transformer (818k) AdamW step, batch 32, 1 thread", 3),
    "charlm_step_b32_2t": ("char transformer AdamW step, batch 32, 2 threads", 3),
    "charlm_generate_256_1t": (
        "char transformer, 256 characters at batch 1, KV cache, 1 thread",
        10,
    ),
}

# Timed batches per side per round (after one untimed batch); the side's
# figure for the round is their median.
BATCHES = 3


def build_workloads():
    """Builds benches/workloads (release) and returns the binary's path."""
    out = subprocess.run(
        ["cargo", "bench", "--bench", "workloads", "--no-run", "--message-format=json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    for line in out.stdout.splitlines():
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (
            message.get("reason") == "compiler-artifact"
            and message["target"]["name"] == "workloads"
            and message.get("executable")
        ):
            return message["executable"]
    sys.exit("cargo built no workloads binary")


def workloads_of(binary):
    """The workload names a workload binary knows."""
    out = subprocess.run([binary, "list"], stdout=subprocess.PIPE, text=True, check=True)
    return set(out.stdout.split())


def run_binary(binary, name, reps):
    """Median ns per call of `name` over BATCHES batches of `reps` calls, in a
    fresh process of the workload binary."""
    out = subprocess.run(
        [binary, name, str(reps), str(BATCHES)], stdout=subprocess.PIPE, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["median_ns"]


def time_batches(f, reps):
    """Median ns per call of f over BATCHES batches of `reps` calls, after an
    untimed batch: what the workload binary does for netcl."""
    for _ in range(reps):
        f()
    samples = []
    for _ in range(BATCHES):
        start = time.perf_counter_ns()
        for _ in range(reps):
            f()
        samples.append((time.perf_counter_ns() - start) / reps)
    return statistics.median(samples)


def torch_workload(torch, name):
    """PyTorch's version of a netcl workload: (threads, one call)."""
    nn = torch.nn
    threads = 2 if name.endswith("2t") or name.endswith("2t_shards") else 1

    def mlp(sizes):
        layers = []
        for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if i + 2 < len(sizes):
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    if name.startswith("tiny_add"):
        a = torch.ones(1, requires_grad=True)
        b = torch.ones(1, requires_grad=True)
        if name == "tiny_add_grad":
            return threads, lambda: a + b

        def add_no_grad():
            with torch.no_grad():
                return a + b

        return threads, add_no_grad
    if name == "chain10_fwd_bwd":
        x = torch.full((1,), 0.5, requires_grad=True)
        w = torch.full((1,), 1.01, requires_grad=True)

        def chain():
            y = x
            for i in range(10):
                y = y * w if i % 2 == 0 else y + w
            y.backward()

        return threads, chain
    if name.startswith("mlp_step"):
        batch = int(name.split("_")[2][1:])
        model = mlp([784, 256, 256, 10])
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        xb = torch.rand(batch, 784)
        yb = torch.arange(batch) % 10

        def step():
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.item()

        return threads, step
    if name.startswith("forward"):
        if name == "forward_b256_784":
            sizes, rows = [784, 256, 256, 10], 256
        else:
            sizes, rows = [64, 128, 10], int(name.split("_")[1][1:])
        model = mlp(sizes)
        xb = torch.rand(rows, sizes[0])

        def forward():
            with torch.no_grad():
                return model(xb)

        return threads, forward
    if name.startswith("eval_20k"):
        model = mlp([784, 256, 256, 10])
        batches = [
            (torch.rand(min(256, 20000 - i), 784), torch.arange(min(256, 20000 - i)) % 10)
            for i in range(0, 20000, 256)
        ]

        def evaluate():
            with torch.no_grad():
                return sum((model(xb).argmax(-1) == yb).sum().item() for xb, yb in batches)

        return threads, evaluate
    if name.startswith("tanh_mlp_"):
        torch.manual_seed(4)
        sizes = [784, 256, 256, 10]
        params = []
        for i, o in zip(sizes[:-1], sizes[1:]):
            params.append((torch.randn(i, o) / i**0.5).requires_grad_())
            params.append(torch.zeros(o).requires_grad_())
        x = torch.rand(32, 784)
        y = torch.arange(32) % 10
        v = [torch.randn_like(p) for p in params]

        def tanh_loss():
            h = x
            for layer in range(3):
                h = h @ params[2 * layer] + params[2 * layer + 1]
                if layer < 2:
                    h = torch.tanh(h)
            return nn.functional.cross_entropy(h, y)

        if name == "tanh_mlp_fwd_bwd_b32_1t":
            return threads, lambda: torch.autograd.grad(tanh_loss(), params)

        def tanh_hvp():
            grads = torch.autograd.grad(tanh_loss(), params, create_graph=True)
            dot = sum((g * u).sum() for g, u in zip(grads, v))
            return torch.autograd.grad(dot, params)

        return threads, tanh_hvp
    if name == "bmm_8x4x64x32x64_fwd_bwd_1t":
        lhs = torch.rand(8, 4, 64, 32, requires_grad=True)
        rhs = torch.rand(8, 4, 32, 64, requires_grad=True)

        def bmm_step():
            loss = (lhs @ rhs).sum()
            return torch.autograd.grad(loss, [lhs, rhs])

        return threads, bmm_step
    if name.startswith("matmul_"):
        m, k, n = (int(d) for d in name.split("_")[1].split("x"))
        lhs, rhs = torch.rand(m, k), torch.rand(k, n)
        return threads, lambda: lhs @ rhs
    if name.startswith("conv2d_"):
        x = torch.randn(32, 16, 32, 32)
        w = torch.randn(32, 16, 3, 3) * 0.1
        b = torch.randn(32)
        if name == "conv2d_fwd_1t":

            def conv_forward():
                with torch.no_grad():
                    return nn.functional.conv2d(x, w, b, 1, 1, 1, 1)

            return threads, conv_forward
        leaves = [t.requires_grad_(True) for t in (x, w, b)]

        def conv_step():
            nn.functional.conv2d(x, w, b, 1, 1, 1, 1).sum().backward()
            for leaf in leaves:
                leaf.grad = None

        return threads, conv_step
    if name.startswith("cnn_"):
        # models::digits_cnn of netcl, as the nn.Sequential it mirrors.
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(128, 10),
        )
        if name == "cnn_step_b64_1t":
            model.train()
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            xb = torch.rand(64, 1, 8, 8)
            yb = torch.arange(64) % 10

            def cnn_step():
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                opt.zero_grad()
                return loss.item()

            return threads, cnn_step
        # What Trainer::evaluate does: batches of 256 in eval mode under
        # no_grad, summing the loss and the correct predictions.
        model.eval()
        xs = torch.rand(20000, 1, 8, 8)
        ys = torch.arange(20000) % 10
        batches = [(xs[i : i + 256], ys[i : i + 256]) for i in range(0, 20000, 256)]

        def cnn_evaluate():
            loss, correct = 0.0, 0
            with torch.no_grad():
                for xb, yb in batches:
                    logits = model(xb)
                    loss += nn.functional.cross_entropy(logits, yb).item() * len(yb)
                    correct += (logits.argmax(-1) == yb).sum().item()
            return loss / 20000, correct / 20000

        return threads, cnn_evaluate
    if name == "sdpa_causal_fwd_bwd_1t":
        q, k, v = (torch.randn(8, 4, 64, 32, requires_grad=True) for _ in range(3))

        def attention():
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return torch.autograd.grad(y.sum(), [q, k, v])

        return threads, attention
    if name == "layer_norm_fwd_bwd_1t":
        x = torch.randn(32, 64, 128, requires_grad=True)
        w = torch.randn(128, requires_grad=True)
        b = torch.randn(128, requires_grad=True)

        def layer_norm():
            y = nn.functional.layer_norm(x, [128], w, b, 1e-5)
            return torch.autograd.grad(y.sum(), [x, w, b])

        return threads, layer_norm
    if name.startswith("charlm_"):
        # The model of examples/train_charlm.rs, as scripts/charlm_pytorch.py
        # defines it (with the same key/value-cached generation as netcl's).
        sys.path.insert(0, str(ROOT / "scripts"))
        import charlm_pytorch

        torch.manual_seed(21)
        model = charlm_pytorch.CharTransformer(63)
        if name == "charlm_generate_256_1t":
            model.eval()
            seeds = iter(range(1, 1 << 30))
            return threads, lambda: model.generate_cached([0], 256, 1.0, next(seeds))
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=2e-3, weight_decay=0.1
        )
        ids = torch.randint(0, 63, (32, 65))
        xb, yb = ids[:, :-1], ids[:, 1:]

        def lm_step():
            logits = model(xb)
            loss = nn.functional.cross_entropy(logits.reshape(-1, 63), yb.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()

        return threads, lm_step
    raise KeyError(name)


def load_average(when):
    """The machine's load average: whether other work shared the cores."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return f"load average at {when}: unknown"
    return f"load average at {when} (1, 5, 15 min): {one:.2f} {five:.2f} {fifteen:.2f}, on {os.cpu_count()} cores"


def spread(samples):
    """(median, 25th percentile, 75th percentile)."""
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return median, q1, q3


def shown(ns):
    """A duration in readable units."""
    if ns < 1e4:
        return f"{ns:.0f} ns"
    if ns < 1e7:
        return f"{ns / 1e3:.1f} us"
    return f"{ns / 1e6:.2f} ms"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="rounds per workload (default 9)")
    parser.add_argument("--only", help="comma-separated words; run the workloads whose name contains one")
    parser.add_argument("--binary", help="use this workload binary instead of building one")
    parser.add_argument(
        "--against",
        metavar="BINARY",
        help="compare with another build's workload binary instead of PyTorch",
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2")

    torch = None
    if args.against is None:
        try:
            import torch
        except ImportError:
            print(f"PyTorch is not installed; to compare with it: {INSTALL}")
            return 0

    binary = args.binary or build_workloads()
    known = workloads_of(binary)
    if args.against:
        known &= workloads_of(args.against)
    names = [name for name in WORKLOADS if name in known]
    if args.only:
        words = args.only.split(",")
        names = [name for name in names if any(word in name for word in words)]

    theirs_label = "other build" if args.against else "PyTorch"
    if torch is not None:
        print(
            f"PyTorch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"MKL {'on' if torch.backends.mkl.is_available() else 'off'}), "
            f"netcl {binary}"
        )
    else:
        print(f"this build {binary} against {args.against}")
    print(
        f"{args.rounds} rounds per workload, sides alternating, order flipped each round; "
        f"each side's figure per round is the median of {BATCHES} batches; "
        "spread = interquartile range of the per-round ratios"
    )
    print(load_average("start"))
    rows = []
    header = f"{'workload':<26} {'netcl':>10} {theirs_label:>11} {'netcl/' + theirs_label + ' [spread]':>30}"
    print(header)
    for name in names:
        label, reps = WORKLOADS[name]
        if torch is not None:
            threads, f = torch_workload(torch, name)
            torch.set_num_threads(threads)
            f()
            start = time.perf_counter_ns()
            f()
            once = max(time.perf_counter_ns() - start, 1)
            # PyTorch's batch: about as long as netcl's at the speeds above.
            ours_estimate = run_binary(binary, name, reps)
            their_reps = max(1, round(reps * ours_estimate / once))

            def theirs():
                torch.set_num_threads(threads)
                return time_batches(f, their_reps)
        else:

            def theirs():
                return run_binary(args.against, name, reps)

        ours_ns, theirs_ns, ratios = [], [], []
        for round_index in range(args.rounds):
            if round_index % 2 == 0:
                ours = run_binary(binary, name, reps)
                other = theirs()
            else:
                other = theirs()
                ours = run_binary(binary, name, reps)
            ours_ns.append(ours)
            theirs_ns.append(other)
            ratios.append(ours / other)
        ratio, q1, q3 = spread(ratios)
        ours_median = statistics.median(ours_ns)
        theirs_median = statistics.median(theirs_ns)
        rows.append((name, label, ours_median, theirs_median, ratio, q1, q3))
        print(
            f"{name:<26} {shown(ours_median):>10} {shown(theirs_median):>11} "
            f"{f'{ratio:.2f}x [{q1:.2f}-{q3:.2f}]':>30}",
            flush=True,
        )

    print(load_average("end"))
    if args.markdown:
        print(f"\n| workload | netcl | {theirs_label} | netcl / {theirs_label} [spread] |")
        print("|---|---|---|---|")
        for name, label, ours, other, ratio, q1, q3 in rows:
            print(f"| {label} | {shown(ours)} | {shown(other)} | {ratio:.2f}x [{q1:.2f}-{q3:.2f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
