#!/usr/bin/env python3
"""Writes data/charlm_batches.txt: the batch order of the language-model
comparison between netcl (examples/train_charlm.rs --batch-order) and
PyTorch (scripts/charlm_pytorch.py).

One line per optimisation step, each the start offsets of the step's
sequences (whitespace-separated) into the training ids: the first 90% of
data/kjv.txt, one id per character. A sequence at offset o reads ids
o..o+65 (64 inputs, and the 64 next characters as targets), so every
offset is at most len(train) - 65. Drawn with Python's own generator,
seeded, so the file is reproducible without numpy or torch.

    python3 scripts/charlm_batches.py [--steps 500] [--batch 32] [--seed 0]
"""

import argparse
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = 64


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "charlm_batches.txt")
    args = parser.parse_args()

    text = (ROOT / "data" / "kjv.txt").read_text(encoding="utf-8")
    train_len = len(text) * 9 // 10
    max_offset = train_len - CONTEXT - 1
    rng = random.Random(args.seed)
    lines = [
        f"# charlm batch order: {args.steps} steps x {args.batch} start offsets into the training ids",
        f"# (the first {train_len} characters of data/kjv.txt), each at most {max_offset};",
        f"# written by scripts/charlm_batches.py --steps {args.steps} --batch {args.batch} --seed {args.seed}",
    ]
    for _ in range(args.steps):
        lines.append(" ".join(str(rng.randint(0, max_offset)) for _ in range(args.batch)))
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {args.steps} steps of {args.batch}")


if __name__ == "__main__":
    main()
