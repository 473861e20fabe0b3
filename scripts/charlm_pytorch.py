#!/usr/bin/env python3
"""The language model of examples/train_charlm.rs in PyTorch: the same
module (its state_dict loads into netcl's CharTransformer with
io::load_torch, and back), the same data, batch order, initialisation and
hyperparameters, to compare the validation loss after 500 AdamW steps.

    # 1. an initial checkpoint, which both sides load
    /work/venv/bin/python scripts/charlm_pytorch.py --write-init /tmp/charlm_init.safetensors
    # 2. PyTorch's run
    /work/venv/bin/python scripts/charlm_pytorch.py --init /tmp/charlm_init.safetensors \
        --batch-order data/charlm_batches.txt --steps 500
    # 3. netcl's run
    cargo run --release --example train_charlm -- --init /tmp/charlm_init.safetensors \
        --batch-order data/charlm_batches.txt --steps 500

Both print `validation loss: X bits per character` over the same 256
validation windows. The module also has a key/value-cached generation
(`generate_cached`), the same algorithm as netcl's `Generator`, which
scripts/compare_pytorch.py times.

Needs torch and safetensors. Not part of CI.
"""

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = 64
LR = 2e-3
BETAS = (0.9, 0.99)
WEIGHT_DECAY = 0.1
CLIP = 1.0
VAL_WINDOWS = 256
EVAL_BATCH = 64


class Block(nn.Module):
    """A pre-norm block: x + attn(ln1(x)), then + mlp(ln2(x)); netcl's
    TransformerBlock, with its names."""

    def __init__(self, d, heads, d_ff):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))

    def qkv(self, a):
        """[N, L, d] -> q, k, v, each [N, heads, L, d / heads]."""
        n, length, d = a.shape
        qkv = F.linear(a, self.attn.in_proj_weight, self.attn.in_proj_bias)
        qkv = qkv.view(n, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def finish(self, x, attended):
        """The rest of the block after attention: out_proj, residuals, MLP."""
        n, _, length, _ = attended.shape
        attended = attended.transpose(1, 2).reshape(n, length, -1)
        x = x + self.attn.out_proj(attended)
        return x + self.mlp(self.ln2(x))

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x))
        return self.finish(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))


class CharTransformer(nn.Module):
    """netcl's models::CharTransformer, parameter for parameter."""

    def __init__(self, vocab, d=128, heads=4, blocks=4, context=CONTEXT, d_ff=512):
        super().__init__()
        self.context = context
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads, d_ff) for _ in range(blocks))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def _run(self, ids, start, cache):
        """The model on ids [1, L] at positions start.., appending each
        block's keys and values to `cache` (and attending over it)."""
        length = ids.shape[1]
        x = self.tok_emb(ids) + self.pos_emb.weight[start : start + length]
        for b, block in enumerate(self.blocks):
            q, k, v = block.qkv(block.ln1(x))
            keys, values = cache[b]
            keys[:, :, start : start + length] = k
            values[:, :, start : start + length] = v
            end = start + length
            attended = F.scaled_dot_product_attention(
                q, keys[:, :, :end], values[:, :, :end], is_causal=length > 1
            )
            x = block.finish(x, attended)
        return self.head(self.ln_f(x[:, -1]))[0]

    @torch.no_grad()
    def generate_cached(self, prompt, max_tokens, temperature=1.0, seed=0):
        """netcl's Generator algorithm: each new token runs the model on one
        position, attending over cached keys and values; a full window
        restarts from its last context // 2 tokens (here as one batched
        prefill, PyTorch's fastest way to fill the cache)."""
        gen = torch.Generator().manual_seed(seed)
        first = self.blocks[0]
        d = first.attn.embed_dim
        shape = (1, first.heads, self.context, d // first.heads)
        cache = [(torch.empty(shape), torch.empty(shape)) for _ in self.blocks]
        tokens = list(prompt)
        start = max(0, len(tokens) - self.context)
        length = len(tokens) - start
        logits = self._run(torch.tensor([tokens[start:]]), 0, cache)
        out = []
        for i in range(max_tokens):
            probs = torch.softmax(logits / temperature, -1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
            tokens.append(nxt)
            out.append(nxt)
            if i + 1 == max_tokens:
                break
            if length == self.context:
                start = len(tokens) - max(self.context // 2, 1)
                length = len(tokens) - start
                logits = self._run(torch.tensor([tokens[start:]]), 0, cache)
            else:
                logits = self._run(torch.tensor([[nxt]]), length, cache)
                length += 1
        return out


def corpus():
    """(sorted characters, training ids, validation ids), as netcl splits."""
    text = (ROOT / "data" / "kjv.txt").read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = len(ids) * 9 // 10
    return chars, ids[:split], ids[split:]


def batch(ids, offsets):
    rows = torch.stack([ids[o : o + CONTEXT + 1] for o in offsets])
    return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def evaluate(model, ids):
    model.eval()
    stride = (len(ids) - CONTEXT - 1) // VAL_WINDOWS
    offsets = [i * stride for i in range(VAL_WINDOWS)]
    total = 0.0
    for i in range(0, len(offsets), EVAL_BATCH):
        x, y = batch(ids, offsets[i : i + EVAL_BATCH])
        logits = model(x)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item() * len(x)
    model.train()
    return total / len(offsets)


def read_batch_order(path):
    lines = Path(path).read_text().splitlines()
    return [[int(w) for w in line.split()] for line in lines if line.strip() and not line.startswith("#")]


def main():
    from safetensors.torch import load_file, save_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-init", metavar="FILE", help="write a seeded initial state_dict and exit")
    parser.add_argument("--init", metavar="FILE", help="start from this state_dict")
    parser.add_argument("--batch-order", default=str(ROOT / "data" / "charlm_batches.txt"))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    chars, train, val = corpus()
    torch.manual_seed(args.seed)
    model = CharTransformer(len(chars))
    if args.write_init:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.write_init)
        print(f"wrote {args.write_init}: {sum(p.numel() for p in model.parameters())} parameters")
        return
    if args.init:
        model.load_state_dict(load_file(args.init))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=BETAS,
        weight_decay=WEIGHT_DECAY,
    )
    order = read_batch_order(args.batch_order)
    start = time.perf_counter()
    for step in range(args.steps):
        x, y = batch(train, order[step])
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        if step % 100 == 0 or step + 1 == args.steps:
            print(f"step {step}: train loss {loss.item() / math.log(2):.4f} bits per character", flush=True)
    seconds = time.perf_counter() - start
    print(f"trained {args.steps} steps in {seconds:.1f} s")
    val_loss = evaluate(model, val)
    print(f"validation loss: {val_loss / math.log(2):.4f} bits per character ({val_loss:.4f} nats)")


if __name__ == "__main__":
    main()
