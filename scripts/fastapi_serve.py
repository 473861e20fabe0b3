#!/usr/bin/env python3
"""The digits MLP served by FastAPI + uvicorn + PyTorch: the baseline of
scripts/bench_serve.sh.

It loads the checkpoint netcl-serve saves (safetensors, read here with the
standard library and numpy), answers POST /v1/predict with the same JSON as
netcl-serve, and with --train trains a copy of the model in a background
thread (Adam, batches of 32, over 80% of data/digits.csv) until it exits,
publishing a new version every --publish-every steps by swapping the served
model.

    python3 scripts/fastapi_serve.py --weights model.safetensors --port 8092 [--train]
"""

import argparse
import copy
import json
import struct
import threading
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent


def read_safetensors(path):
    """The tensors of a safetensors file, by name."""
    data = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    base = 8 + length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        array = np.frombuffer(data[base + start : base + end], dtype="<f4")
        tensors[name] = torch.tensor(array.reshape(info["shape"]).copy())
    return tensors


def build_model(weights):
    """netcl's Mlp [64, 128, 10] stores x·W + b weights as [in, out];
    torch.nn.Linear stores [out, in]."""
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    )
    tensors = read_safetensors(weights)
    with torch.no_grad():
        for index in (0, 2):
            model[index].weight.copy_(tensors[f"layers.{index}.weight"].T)
            model[index].bias.copy_(tensors[f"layers.{index}.bias"])
    model.eval()
    return model


class Served:
    """The model being served and its version; replaced whole on publish."""

    def __init__(self, model):
        self.current = (model, 0)


class PredictRequest(BaseModel):
    inputs: list[list[float]]


def make_app(served, max_batch):
    app = FastAPI()

    @app.post("/v1/predict")
    def predict(request: PredictRequest):
        rows = request.inputs
        if not rows or len(rows) > max_batch:
            raise HTTPException(422, f"send 1 to {max_batch} rows")
        if any(len(row) != 64 for row in rows):
            raise HTTPException(422, "each row needs 64 values")
        model, version = served.current
        with torch.no_grad():
            x = torch.tensor(rows, dtype=torch.float32) / 16.0
            logits = model(x)
            probabilities = torch.softmax(logits, dim=-1)
        return {
            "classes": logits.argmax(dim=-1).tolist(),
            "probabilities": probabilities.tolist(),
            "version": version,
        }

    @app.get("/v1/model")
    def model_info():
        return {"version": served.current[1]}

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app


def train_forever(served, publish_every, stop):
    data = np.loadtxt(ROOT / "data" / "digits.csv", delimiter=",", skiprows=1, dtype=np.float32)
    rng = np.random.default_rng(42)
    order = rng.permutation(len(data))
    train = data[order[: int(0.8 * len(data))]]
    x = torch.tensor(train[:, :64] / 16.0)
    y = torch.tensor(train[:, 64], dtype=torch.long)
    model = copy.deepcopy(served.current[0])
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    step = 0
    while not stop.is_set():
        for batch in torch.randperm(len(x)).split(32):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            step += 1
            if step % publish_every == 0:
                snapshot = copy.deepcopy(model).eval()
                served.current = (snapshot, served.current[1] + 1)
            if stop.is_set():
                return


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8092)
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--publish-every", type=int, default=10)
    parser.add_argument("--max-batch", type=int, default=64)
    args = parser.parse_args()
    served = Served(build_model(args.weights))
    stop = threading.Event()
    if args.train:
        threading.Thread(
            target=train_forever, args=(served, args.publish_every, stop), daemon=True
        ).start()
    try:
        uvicorn.run(
            make_app(served, args.max_batch),
            host=args.host,
            port=args.port,
            log_level="warning",
            access_log=False,
        )
    finally:
        stop.set()


if __name__ == "__main__":
    main()
