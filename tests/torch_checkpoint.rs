//! PyTorch checkpoints: a `state_dict` saved by PyTorch
//! (`scripts/torch_checkpoint_fixture.py`, committed under
//! `tests/fixtures/`) loads into the netcl model that mirrors it, with
//! `nn.Linear`'s `[out, in]` weights transposed in `io::load_torch`, and
//! gives PyTorch's outputs; `io::save_torch` writes the same file back.

use std::path::PathBuf;

use netcl::nn::{Activation, Linear, Mlp, Module, ReLU, Sequential};
use netcl::{Error, Tensor};
use rand::SeedableRng;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The fixture's input and PyTorch's output for it.
fn io() -> (Tensor, Tensor) {
    let tensors = netcl::io::read_tensors(fixture("torch_sequential_io.safetensors")).unwrap();
    let get = |name: &str| tensors.iter().find(|(n, _)| n == name).unwrap().1.clone();
    (get("input"), get("output"))
}

/// `nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))`, zeroed.
fn mirror() -> Sequential {
    Sequential::new()
        .with(Linear::zeros(5, 4).unwrap())
        .with(ReLU::new())
        .with(Linear::zeros(4, 3).unwrap())
}

/// max|a - b| ≤ 1e-5 · max|b|.
fn assert_agrees(got: &Tensor, expected: &Tensor) {
    assert_eq!(got.shape(), expected.shape());
    let (got, expected) = (got.to_vec(), expected.to_vec());
    let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let delta = got
        .iter()
        .zip(&expected)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    println!("max|Δ| = {delta:e}, max|y| = {scale}");
    assert!(delta <= 1e-5 * scale, "max|Δ| {delta} > 1e-5 · {scale}");
}

#[test]
fn a_pytorch_sequential_state_dict_loads_and_gives_pytorchs_outputs() {
    let model = mirror();
    netcl::io::load_torch(&model, fixture("torch_sequential.safetensors")).unwrap();
    let (x, y) = io();
    assert_agrees(&model.forward(&x).unwrap(), &y);
}

#[test]
fn an_mlps_layers_load_a_bare_sequential() {
    let mlp = Mlp::zeros(&[5, 4, 3], Activation::Relu).unwrap();
    netcl::io::load_torch(mlp.layers(), fixture("torch_sequential.safetensors")).unwrap();
    let (x, y) = io();
    assert_agrees(&mlp.forward(&x).unwrap(), &y);
    // The Mlp itself is a module holding `layers`: its names say so.
    let err = netcl::io::load_torch(&mlp, fixture("torch_sequential.safetensors")).unwrap_err();
    assert!(matches!(err, Error::ParameterNames { .. }), "{err}");
}

#[test]
fn save_torch_writes_pytorchs_layout_back() {
    let model = mirror();
    netcl::io::load_torch(&model, fixture("torch_sequential.safetensors")).unwrap();
    let path = std::env::temp_dir().join(format!("netcl-torch-{}.safetensors", std::process::id()));
    netcl::io::save_torch(&model, &path).unwrap();
    let written = netcl::io::read_tensors(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let original = netcl::io::read_tensors(fixture("torch_sequential.safetensors")).unwrap();
    assert_eq!(written.len(), original.len());
    for ((n1, t1), (n2, t2)) in written.iter().zip(&original) {
        assert_eq!(n1, n2);
        assert_eq!(t1.shape(), t2.shape(), "{n1}");
        assert_eq!(t1.to_vec(), t2.to_vec(), "{n1}");
    }
    // netcl's own checkpoints keep netcl's layout.
    let own = netcl::io::to_bytes(&model).unwrap();
    let fresh = mirror();
    netcl::io::load_bytes(&fresh, &own).unwrap();
    assert_eq!(fresh.parameters()[0].shape(), &[5, 4]);
}

#[test]
fn a_shape_mismatch_names_the_parameter_and_both_shapes() {
    // The last layer has 2 outputs here, 3 in the file.
    let model = Sequential::new()
        .with(Linear::zeros(5, 4).unwrap())
        .with(ReLU::new())
        .with(Linear::zeros(4, 2).unwrap());
    let before = model.parameters()[0].to_vec();
    let err = netcl::io::load_torch(&model, fixture("torch_sequential.safetensors")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "io::load_torch: parameter `2.bias` is stored as F32 [3], the model expects F32 [2]"
    );
    assert_eq!(model.parameters()[0].to_vec(), before, "nothing loaded");

    let model = Sequential::new()
        .with(Linear::zeros(5, 4).unwrap())
        .with(ReLU::new())
        .with(Linear::without_bias(
            4,
            2,
            &mut rand::rngs::StdRng::from_seed([0; 32]),
        ));
    let bytes = std::fs::read(fixture("torch_sequential.safetensors")).unwrap();
    match netcl::io::load_torch_bytes(&model, &bytes).unwrap_err() {
        Error::ParameterNames { unexpected, .. } => assert_eq!(unexpected, ["2.bias"]),
        other => panic!("{other}"),
    }
    let model = Sequential::new()
        .with(Linear::zeros(5, 4).unwrap())
        .with(ReLU::new())
        .with(Linear::from_parts(Tensor::zeros(&[5, 3]), Some(Tensor::zeros(&[3]))).unwrap());
    match netcl::io::load_torch_bytes(&model, &bytes).unwrap_err() {
        Error::ParameterMismatch {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, "2.weight");
            assert_eq!(expected, [3, 5], "PyTorch's [out, in]");
            assert_eq!(found, [3, 4]);
        }
        other => panic!("{other}"),
    }
}
