#!/usr/bin/env python3
"""Writes the PyTorch checkpoint fixture that `cargo test --test torch_checkpoint` loads.

A seeded `nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))`:
its `state_dict()` (names `0.weight`, `0.bias`, `2.weight`, `2.bias`;
`nn.Linear` weights `[out, in]`) goes to
`tests/fixtures/torch_sequential.safetensors` with
`safetensors.torch.save_file`, exactly as a PyTorch user saves one, and a
seeded input with the model's output (float32) to
`tests/fixtures/torch_sequential_io.safetensors`. Both files are committed
(under 1 KB each): `cargo test` reads them without torch.

    /work/venv/bin/python scripts/torch_checkpoint_fixture.py
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def main() -> None:
    torch.manual_seed(21)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    x = torch.randn(6, 5)
    with torch.no_grad():
        y = model(x)
    meta = {"torch": torch.__version__, "script": "scripts/torch_checkpoint_fixture.py"}
    save_file(model.state_dict(), OUT / "torch_sequential.safetensors", metadata=meta)
    save_file({"input": x, "output": y}, OUT / "torch_sequential_io.safetensors", metadata=meta)
    print({k: tuple(v.shape) for k, v in model.state_dict().items()}, "max|y|", y.abs().max().item())


if __name__ == "__main__":
    main()
