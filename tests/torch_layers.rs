//! PyTorch `state_dict`s of a small CNN and a one-block transformer
//! (written by `scripts/torch_layers_fixture.py`, committed under
//! `tests/fixtures/`) load into the netcl models that mirror them and give
//! PyTorch's logits within 1e-5 · max|logit|.

use std::collections::HashMap;
use std::path::PathBuf;

use netcl::nn::{
    AttentionMasks, BatchNorm2d, Conv2d, Embedding, Flatten, LayerNorm, Linear, MaxPool2d, Module,
    ReLU, Sequential, TorchLayout, TransformerBlock, eval_mode, train_mode,
};
use netcl::{Result, Tensor, autograd};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn io(name: &str) -> HashMap<String, Tensor> {
    netcl::io::read_tensors(fixture(name))
        .unwrap()
        .into_iter()
        .collect()
}

fn assert_agrees(got: &Tensor, expected: &Tensor, what: &str) {
    assert_eq!(got.shape(), expected.shape(), "{what}");
    let (got, expected) = (got.to_vec(), expected.to_vec());
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("{what}: max |netcl - torch| = {worst:e}, max|logit| = {scale}");
    assert!(worst <= 1e-5 * scale, "{what}: {worst} > 1e-5 · {scale}");
}

fn cnn() -> Sequential {
    Sequential::new()
        .with(Conv2d::zeros(1, 4, 3).unwrap().with_padding(1))
        .with(BatchNorm2d::new(4))
        .with(ReLU::new())
        .with(MaxPool2d::new(2))
        .with(Conv2d::zeros(4, 8, 3).unwrap().with_padding(1))
        .with(BatchNorm2d::new(8))
        .with(ReLU::new())
        .with(MaxPool2d::new(2))
        .with(Flatten::new())
        .with(Linear::zeros(32, 10).unwrap())
}

#[test]
fn a_pytorch_cnn_with_batch_norm_loads_and_gives_pytorchs_logits() {
    let model = cnn();
    netcl::io::load_torch(&model, fixture("torch_cnn.safetensors")).unwrap();
    let io = io("torch_cnn_io.safetensors");
    let _g = autograd::no_grad();
    {
        let _eval = eval_mode();
        let logits = model.forward(&io["input"]).unwrap();
        assert_agrees(&logits, &io["logits"], "cnn eval logits");
    }
    // One training-mode forward: batch statistics, and PyTorch's update
    // of the running statistics.
    let _train = train_mode();
    let out = model.forward(&io["train_input"]).unwrap();
    assert_agrees(&out, &io["train_output"], "cnn train output");
    let buffers: HashMap<String, Tensor> = model.named_buffers().into_iter().collect();
    for i in [1, 5] {
        for stat in ["running_mean", "running_var"] {
            let name = format!("{i}.{stat}");
            assert_agrees(&buffers[&name], &io[&format!("after.{name}")], &name);
        }
        assert_eq!(buffers[&format!("{i}.num_batches_tracked")].item(), 4.0);
    }
}

/// `tok`, `block`, `ln_f`, `head`, as the PyTorch `TinyLm` of the script.
#[derive(Debug)]
struct TinyLm {
    tok: Embedding,
    block: TransformerBlock,
    ln_f: LayerNorm,
    head: Linear,
}

impl TinyLm {
    fn logits(&self, ids: &Tensor, masks: &AttentionMasks) -> Result<Tensor> {
        let x = self.block.forward_masked(&self.tok.forward(ids)?, masks)?;
        self.head.forward(&self.ln_f.forward(&x)?)
    }
}

fn prefixed<T>(prefix: &str, items: Vec<(String, T)>) -> Vec<(String, T)> {
    items
        .into_iter()
        .map(|(n, t)| (format!("{prefix}.{n}"), t))
        .collect()
}

impl Module for TinyLm {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.logits(ids, &AttentionMasks::default())
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut p = prefixed("tok", self.tok.named_parameters());
        p.extend(prefixed("block", self.block.named_parameters()));
        p.extend(prefixed("ln_f", self.ln_f.named_parameters()));
        p.extend(prefixed("head", self.head.named_parameters()));
        p
    }
    fn torch_layouts(&self) -> Vec<(String, TorchLayout)> {
        let mut l = prefixed("block", self.block.torch_layouts());
        l.extend(prefixed("head", self.head.torch_layouts()));
        l
    }
}

#[test]
fn a_pytorch_one_block_transformer_loads_and_gives_pytorchs_logits() {
    let lm = TinyLm {
        tok: Embedding::zeros(11, 8).unwrap(),
        block: TransformerBlock::zeros(8, 2, 16).unwrap(),
        ln_f: LayerNorm::new(&[8]),
        head: Linear::zeros(8, 11).unwrap(),
    };
    netcl::io::load_torch(&lm, fixture("torch_tiny_lm.safetensors")).unwrap();
    let io = io("torch_tiny_lm_io.safetensors");
    let _g = autograd::no_grad();
    let ids = &io["ids"];
    assert_agrees(&lm.forward(ids).unwrap(), &io["plain"], "lm logits");
    let causal = AttentionMasks::causal();
    assert_agrees(
        &lm.logits(ids, &causal).unwrap(),
        &io["causal"],
        "lm causal logits",
    );
    let padded = causal.with_key_padding_mask(io["padding"].clone());
    assert_agrees(
        &lm.logits(ids, &padded).unwrap(),
        &io["causal_padded"],
        "lm causal + padding logits",
    );
}
