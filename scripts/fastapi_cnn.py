#!/usr/bin/env python3
"""The digits CNN served by FastAPI + uvicorn + PyTorch: the baseline of
scripts/bench_cnn_serve.sh.

It serves the checkpoint `cargo run --release --example train_cnn -- --save
PATH` writes, the same file netcl-serve serves with `--model cnn=PATH`: the
PyTorch model of `netcl::models::digits_cnn`

    nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128, 10),
    )

with netcl's weights. netcl names its parameters and buffers as PyTorch
does (`0.weight`, `1.running_mean`, `9.bias`, ...) and stores convolution
and batch norm tensors in PyTorch's layout; the one difference is a Linear
weight, [in, out] in netcl and [out, in] in PyTorch, which is transposed
here (the conversion `netcl::io::to_torch_bytes` documents). The state dict
is loaded strictly: a missing, extra or mis-shaped tensor is an error.

It answers the requests netcl-serve's predict route answers, with the same
JSON: POST /v1/predict and POST /v1/models/cnn/predict take
{"inputs": [[64 raw pixels in 0..16], ...]} (1 to --max-batch rows), divide
the pixels by 16, shape them as [rows, 1, 8, 8], and answer
{"classes": [...], "probabilities": [[10 numbers], ...], "version": 0}.
A row of the wrong length or a pixel outside 0..16 is a 422.

Deployment: uvicorn with --workers processes (default 2, one per core of a
2-core machine, uvicorn's multi-process mode), each with the whole model and
torch.set_num_threads(1) (so two workers do not fight over two cores); the
endpoint is a plain `def`, which FastAPI runs in its thread pool, as the
FastAPI docs advise for blocking calls such as a model's forward; the
forward runs under torch.inference_mode(). uvicorn uses uvloop and
httptools when installed (`pip install "uvicorn[standard]"`).

    python3 scripts/fastapi_cnn.py --weights digits_cnn.safetensors --port 8093 [--workers 2]
    python3 scripts/fastapi_cnn.py --weights digits_cnn.safetensors --print-classes 20
"""

import argparse
import json
import os
import struct
import sys
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from safetensors.torch import load_file

WEIGHTS_ENV = "NETCL_FASTAPI_CNN_WEIGHTS"
MAX_BATCH_ENV = "NETCL_FASTAPI_CNN_MAX_BATCH"
PIXELS = 64
PIXEL_MAX = 16.0


def digits_cnn():
    """The PyTorch model netcl::models::digits_cnn mirrors."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128, 10),
    )


def read_metadata(path):
    """The safetensors metadata of `path`."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)).get("__metadata__", {})


def load_netcl_checkpoint(path):
    """The digits CNN with the weights of netcl's checkpoint at `path`, in
    eval mode."""
    metadata = read_metadata(path)
    shape = metadata.get("netcl-serve.input_shape")
    if shape is not None and shape.replace(" ", "") != "1,8,8":
        raise SystemExit(f"{path}: netcl-serve.input_shape = {shape!r}, expected '1,8,8'")
    model = digits_cnn()
    linear_weights = {
        f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
    }
    expected = model.state_dict()
    tensors = load_file(path)
    state = {}
    for name, tensor in tensors.items():
        if name in linear_weights:
            tensor = tensor.T  # netcl's [in, out] -> nn.Linear's [out, in]
        if name in expected:
            tensor = tensor.to(expected[name].dtype)  # num_batches_tracked: int64
        state[name] = tensor.contiguous()
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


class PredictRequest(BaseModel):
    inputs: list[list[float]]


def make_app(model, max_batch):
    """The FastAPI app serving `model`."""
    app = FastAPI()

    def predict(request: PredictRequest):
        rows = request.inputs
        if not rows or len(rows) > max_batch:
            raise HTTPException(422, f"send 1 to {max_batch} rows, got {len(rows)}")
        for i, row in enumerate(rows):
            if len(row) != PIXELS:
                raise HTTPException(422, f"inputs[{i}] has {len(row)} values, expected {PIXELS}")
        x = torch.tensor(rows, dtype=torch.float32)
        if not bool(((x >= 0) & (x <= PIXEL_MAX)).all()):
            raise HTTPException(422, f"pixels must be in 0..{PIXEL_MAX:g}")
        with torch.inference_mode():
            logits = model((x / PIXEL_MAX).reshape(-1, 1, 8, 8))
            probabilities = torch.softmax(logits, dim=-1)
        return {
            "classes": logits.argmax(dim=-1).tolist(),
            "probabilities": probabilities.tolist(),
            "version": 0,
        }

    app.post("/v1/predict")(predict)
    app.post("/v1/models/cnn/predict")(predict)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app


def create_app():
    """The app factory each uvicorn worker process calls: one thread of
    torch per worker, the model read from the environment's path."""
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    model = load_netcl_checkpoint(os.environ[WEIGHTS_ENV])
    return make_app(model, int(os.environ.get(MAX_BATCH_ENV, "64")))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="the checkpoint train_cnn --save wrote")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8093)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument(
        "--print-classes",
        type=int,
        metavar="N",
        help="print the classes of the first N digits of data/digits.csv and exit",
    )
    args = parser.parse_args()
    # Fails here, before the workers start, if the file does not load.
    model = load_netcl_checkpoint(args.weights)
    if args.print_classes is not None:
        root = Path(__file__).resolve().parent.parent
        lines = (root / "data" / "digits.csv").read_text().splitlines()[1 : 1 + args.print_classes]
        rows = [[float(v) for v in line.split(",")[:PIXELS]] for line in lines]
        with torch.inference_mode():
            x = torch.tensor(rows) / PIXEL_MAX
            print(json.dumps(model(x.reshape(-1, 1, 8, 8)).argmax(dim=-1).tolist()))
        return
    os.environ[WEIGHTS_ENV] = str(Path(args.weights).resolve())
    os.environ[MAX_BATCH_ENV] = str(args.max_batch)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import uvicorn

    uvicorn.run(
        "fastapi_cnn:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=os.environ.get("NETCL_FASTAPI_LOG", "warning"),
        access_log=False,
        # A worker must answer the supervisor's ping within this many
        # seconds; importing torch alone can take longer than uvicorn's 5 s
        # on a busy machine, and the supervisor would then kill and restart
        # workers forever.
        timeout_worker_healthcheck=120,
    )


if __name__ == "__main__":
    main()
