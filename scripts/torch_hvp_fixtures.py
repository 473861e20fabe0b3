#!/usr/bin/env python3
"""Writes the second-derivative fixtures that `cargo test --test ops`
(`tests/ops/second.rs`) compares netcl's double backward with.

For every case of a family's sample table (`scripts/fixtures/<family>.py`,
the cases of `tests/fixtures/ops_<family>.json`, whose inputs and output
weightings `r` are read from that committed file) where finite differences
apply, torch computes in float64 the Hessian-vector product of

    L2 = sum_k r_k * y_k**2

along a seeded direction `v` (one per input that requires grad) by double
backward: `g = grad(L2, inputs, create_graph=True)`, then `grad(g . v)`.
The result goes to `tests/fixtures/hvp_<family>.json` with `v`, the torch
version and the SHA-256 of this driver, of the family's module and of the
table file it read.
Run it after `torch_fixtures.py` (it reads that script's output):

    /work/venv/bin/python scripts/torch_hvp_fixtures.py          # every family
    /work/venv/bin/python scripts/torch_hvp_fixtures.py core     # some
"""

import hashlib
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
OUT = ROOT / "tests" / "fixtures"
FAMILIES = sorted(p.stem for p in (HERE / "fixtures").glob("*.py") if p.stem != "common")

sys.path.insert(0, str(HERE / "fixtures"))
sys.path.insert(0, str(HERE))

from torch_fixtures import flat, prep  # noqa: E402


def value(v):
    return float(v)


def hvp_case(case, record, seed):
    rng = np.random.default_rng(seed)
    leaves, args = [], []
    for inp in record["inputs"]:
        data = np.asarray([value(v) for v in inp["data"]], dtype=np.float32).astype(np.float64)
        leaf = torch.tensor(data.reshape(inp["shape"])).requires_grad_(inp["requires_grad"])
        leaves.append(leaf)
        args.append(prep(leaf, inp["prep"]))
    out = case["torch"](args, record["args"])
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    loss = 0
    for y, r in zip(outs, record["weights"]):
        if r is not None and y.requires_grad:
            r = torch.tensor([value(v) for v in r], dtype=torch.float64).reshape(y.shape)
            loss = loss + (y * y * r).sum()
    wrt = [leaf for leaf in leaves if leaf.requires_grad]
    if not wrt or not torch.is_tensor(loss):
        return None
    vs = [torch.tensor(rng.standard_normal(tuple(w.shape)).astype(np.float32).astype(np.float64)) for w in wrt]
    grads = torch.autograd.grad(loss, wrt, create_graph=True, allow_unused=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vs) if g is not None)
    if torch.is_tensor(dot) and dot.requires_grad:
        hv = torch.autograd.grad(dot, wrt, allow_unused=True)
    else:
        hv = [None] * len(wrt)
    hv = [torch.zeros_like(w) if h is None else h for w, h in zip(wrt, hv)]
    hv, vs = iter(hv), iter(vs)
    return {
        "name": record["name"],
        "v": [flat(next(vs)) if leaf.requires_grad else None for leaf in leaves],
        "hvp": [flat(next(hv)) if leaf.requires_grad else None for leaf in leaves],
    }


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main():
    families = sys.argv[1:] or FAMILIES
    for family in families:
        module = importlib.import_module(family)
        cases = {c["name"]: c for c in module.cases()}
        table_path = OUT / f"ops_{family}.json"
        table = json.loads(table_path.read_text())
        records = []
        skipped = []
        for i, record in enumerate(table["cases"]):
            if not record["fd"]:
                continue
            try:
                result = hvp_case(cases[record["name"]], record, seed=2000 + i)
            except RuntimeError as err:
                # PyTorch has no double backward for some ops on CPU (its
                # fused attention): such a case gets no fixture.
                skipped.append(f"{record['name']}: {str(err).splitlines()[0]}")
                continue
            if result is not None:
                records.append(result)
        doc = {
            "family": family,
            "torch_version": torch.__version__,
            "generator_sha256": sha256(Path(__file__)),
            "family_sha256": sha256(HERE / "fixtures" / f"{family}.py"),
            "table_sha256": sha256(table_path),
            "cases": records,
        }
        path = OUT / f"hvp_{family}.json"
        path.write_text(json.dumps(doc, separators=(",", ":"), allow_nan=False) + "\n")
        print(f"{path.relative_to(ROOT)}: {len(records)} cases")
        for line in skipped:
            print(f"  skipped {line}")


if __name__ == "__main__":
    main()
