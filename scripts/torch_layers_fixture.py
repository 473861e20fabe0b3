#!/usr/bin/env python3
"""Writes the PyTorch fixtures that `cargo test --test torch_layers` loads.

- A small CNN, `nn.Sequential(Conv2d(1, 4, 3, padding=1), BatchNorm2d(4),
  ReLU(), MaxPool2d(2), Conv2d(4, 8, 3, padding=1), BatchNorm2d(8), ReLU(),
  MaxPool2d(2), Flatten(), Linear(32, 10))`, trained for nothing but three
  training-mode forwards (so its running statistics are not the initial
  ones): its `state_dict()` to `tests/fixtures/torch_cnn.safetensors`; an
  input with the eval-mode logits, then one more training-mode forward's
  output and the running statistics after it, to `torch_cnn_io.safetensors`.
- A one-block pre-norm transformer (`tok` embedding, `block` with `ln1`,
  `attn` (`nn.MultiheadAttention(batch_first=True)`), `ln2`, `mlp`
  (Linear, GELU, Linear), `ln_f`, `head`): its `state_dict()` to
  `torch_tiny_lm.safetensors`; token ids with the logits without masks,
  causal, and causal with a key padding mask, to `torch_tiny_lm_io.safetensors`.

All files are small and committed: `cargo test` reads them without torch.

    /work/venv/bin/python scripts/torch_layers_fixture.py
"""

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
META = {"torch": torch.__version__, "script": "scripts/torch_layers_fixture.py"}


class Block(nn.Module):
    def __init__(self, d, h, ff):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, h, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))

    def forward(self, x, attn_mask=None, key_padding_mask=None):
        a = self.ln1(x)
        x = x + self.attn(a, a, a, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                          need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyLm(nn.Module):
    def __init__(self, vocab, d, h, ff):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.block = Block(d, h, ff)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids, attn_mask=None, key_padding_mask=None):
        x = self.block(self.tok(ids), attn_mask, key_padding_mask)
        return self.head(self.ln_f(x))


def cnn_fixture():
    torch.manual_seed(21)
    cnn = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32, 10),
    )
    with torch.no_grad():
        cnn.train()
        for _ in range(3):
            cnn(torch.randn(5, 1, 8, 8) * 2 + 0.5)
        cnn.eval()
        x = torch.randn(3, 1, 8, 8)
        logits = cnn(x)
        save_file({k: v.contiguous() for k, v in cnn.state_dict().items()},
                  OUT / "torch_cnn.safetensors", metadata=META)
        cnn.train()
        x_train = torch.randn(4, 1, 8, 8)
        train_out = cnn(x_train)
    io = {"input": x, "logits": logits, "train_input": x_train, "train_output": train_out}
    for i in (1, 5):
        io[f"after.{i}.running_mean"] = cnn[i].running_mean.clone()
        io[f"after.{i}.running_var"] = cnn[i].running_var.clone()
    save_file(io, OUT / "torch_cnn_io.safetensors", metadata=META)
    print("cnn max|logit|", logits.abs().max().item())


def lm_fixture():
    torch.manual_seed(22)
    lm = TinyLm(11, 8, 2, 16).eval()
    ids = torch.randint(0, 11, (2, 5))
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True: not attended
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():
        plain = lm(ids)
        causal_out = lm(ids, attn_mask=causal)
        padded_out = lm(ids, attn_mask=causal, key_padding_mask=padding)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()},
              OUT / "torch_tiny_lm.safetensors", metadata=META)
    save_file({"ids": ids.float(), "padding": padding.float(), "plain": plain,
               "causal": causal_out, "causal_padded": padded_out},
              OUT / "torch_tiny_lm_io.safetensors", metadata=META)
    print("lm keys", list(lm.state_dict()), "max|logit|", plain.abs().max().item())


if __name__ == "__main__":
    cnn_fixture()
    lm_fixture()
