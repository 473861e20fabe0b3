#!/usr/bin/env python3
"""Writes the PyTorch fixtures that `cargo test --test ops` compares netcl with.

Each family of ops has a module in `scripts/fixtures/` (`core.py`,
`shape.py`, ...) whose `cases()` returns its sample table: for every case
the op, its arguments, its inputs and a PyTorch function computing it. This
driver evaluates every case in float64 with torch, draws a seeded weighting
`r` for each output, and records the outputs and the gradients of
`L = sum_k r_k y_k` with respect to every input that requires grad. The
result goes to `tests/fixtures/ops_<family>.json`, with the torch version and
the SHA-256 of this driver and of the family's module, so a stale fixture is
visible. The fixtures are committed: `cargo test` reads them without torch.

    python3 -m venv V && V/bin/pip install torch numpy
    V/bin/python scripts/torch_fixtures.py            # every family
    V/bin/python scripts/torch_fixtures.py shape conv # some families

A case (what a family's `cases()` returns, one dict each):

    name        unique within the family
    op          the netcl op the Rust harness dispatches on (tests/ops/)
    args        JSON-able arguments, passed to both sides
    inputs      list of Input(...)
    torch       fn(list of torch tensors, args) -> tensor or tuple of tensors
    fd          False where finite differences do not apply (ties, kinks)
    tol         optional [atol, rtol] for the netcl-vs-torch comparison

Input values are drawn as float32 (so both sides start from the same
numbers) and computed in float64 by torch. An input's `prep` is a list of
view transforms applied to the leaf before the op on both sides (to feed
non-contiguous tensors): ["permute", [..]], ["transpose", a, b].
"""

import hashlib
import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
OUT = ROOT / "tests" / "fixtures"
FAMILIES = sorted(p.stem for p in (HERE / "fixtures").glob("*.py") if p.stem != "common")

sys.path.insert(0, str(HERE / "fixtures"))


def prep(t, steps):
    for step in steps:
        if step[0] == "permute":
            t = t.permute(*step[1])
        elif step[0] == "transpose":
            t = t.transpose(step[1], step[2])
        else:
            raise ValueError(f"unknown prep {step!r}")
    return t


def num(v):
    """A JSON number, or the string "inf", "-inf" or "nan" (JSON has none)."""
    v = float(v)
    return v if math.isfinite(v) else repr(v)


def flat(t):
    return [num(v) for v in t.detach().reshape(-1).tolist()]


def run_case(case, seed):
    rng = np.random.default_rng(seed)
    leaves, args = [], []
    for inp in case["inputs"]:
        value = torch.tensor(np.asarray(inp.values, dtype=np.float32).astype(np.float64))
        leaf = value.clone().requires_grad_(inp.requires_grad)
        leaves.append(leaf)
        args.append(prep(leaf, inp.prep))
    out = case["torch"](args, case.get("args", {}))
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    weights, loss = [], 0
    for y in outs:
        if y.dtype.is_floating_point:
            r = torch.tensor(rng.standard_normal(tuple(y.shape)).astype(np.float32).astype(np.float64))
        else:
            r = None
        # An output without gradient (an index, a running statistic) gets
        # no weighting: it is compared by value only, and stays out of the
        # finite-difference L, which would otherwise count it.
        r = r if y.requires_grad else None
        weights.append(r)
        if r is not None:
            loss = loss + (y * r).sum()
    wrt = [leaf for leaf in leaves if leaf.requires_grad]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True) if wrt and torch.is_tensor(loss) else []
    grads = iter(grads)
    record_grads = []
    for leaf in leaves:
        if leaf.requires_grad:
            g = next(grads)
            g = torch.zeros_like(leaf) if g is None else g
            record_grads.append({"shape": list(g.shape), "data": flat(g)})
        else:
            record_grads.append(None)
    return {
        "name": case["name"],
        "op": case["op"],
        "args": case.get("args", {}),
        "inputs": [
            {
                "shape": list(np.asarray(inp.values).shape),
                "data": [num(v) for v in np.asarray(inp.values, dtype=np.float32).reshape(-1)],
                "requires_grad": inp.requires_grad,
                "prep": inp.prep,
            }
            for inp in case["inputs"]
        ],
        "outputs": [{"shape": list(y.shape), "data": flat(y.to(torch.float64))} for y in outs],
        "weights": [None if r is None else flat(r) for r in weights],
        "grads": record_grads,
        "fd": case.get("fd", True),
        "tol": case.get("tol", [1e-4, 1e-4]),
    }


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main():
    torch.manual_seed(0)
    families = sys.argv[1:] or FAMILIES
    OUT.mkdir(parents=True, exist_ok=True)
    for family in families:
        module = importlib.import_module(family)
        cases = module.cases()
        names = [c["name"] for c in cases]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise SystemExit(f"{family}: duplicate case names {sorted(dup)}")
        records = [run_case(c, seed=1000 + i) for i, c in enumerate(cases)]
        doc = {
            "family": family,
            "torch_version": torch.__version__,
            "generator_sha256": sha256(Path(__file__)),
            "family_sha256": sha256(HERE / "fixtures" / f"{family}.py"),
            "common_sha256": sha256(HERE / "fixtures" / "common.py"),
            "cases": records,
        }
        path = OUT / f"ops_{family}.json"
        path.write_text(json.dumps(doc, separators=(",", ":"), allow_nan=False) + "\n")
        print(f"{path.relative_to(ROOT)}: {len(records)} cases")


if __name__ == "__main__":
    main()
