//! Self-describing checkpoints (`io::save_model` / `io::load_model`): every
//! built-in layer and nested containers round-trip to a model that computes
//! the same outputs, and every kind of bad checkpoint (unknown kind,
//! missing or mis-shaped tensor, NaN or infinite weight, newer schema,
//! malformed or mangled JSON) is an error naming what is wrong, never a
//! panic and never a model.

use std::collections::BTreeMap;

use netcl::io;
use netcl::nn::{
    ARCHITECTURE_SCHEMA_VERSION, Activation, AdaptiveAvgPool2d, Architecture, AvgPool2d,
    BatchNorm1d, BatchNorm2d, BuildContext, Conv2d, Dropout, Embedding, Flatten, Gelu, LayerNorm,
    Linear, MaxPool2d, Mlp, Module, MultiheadAttention, ReLU, RmsNorm, Sequential, Sigmoid, Silu,
    Tanh, TiedLinear, TransformerBlock,
};
use netcl::{Error, Result, Tensor, autograd};
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Gives every parameter and buffer of `model` random values (running
/// variances positive), so that a round trip that dropped or swapped one
/// would show.
fn randomize(model: &dyn Module, seed: u64) {
    let bytes = io::to_bytes(model).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut rng = rng(seed);
    let values: Vec<(String, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let n: usize = view.shape().iter().product();
            let t = if name.ends_with("running_var") || name.ends_with("num_batches_tracked") {
                Tensor::uniform(&[n], 0.5, 2.0, &mut rng)
            } else {
                Tensor::uniform(&[n], -1.0, 1.0, &mut rng)
            };
            let data = t.to_vec().iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, view.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(&str, TensorView<'_>)> = values
        .iter()
        .map(|(name, shape, data)| {
            (
                name.as_str(),
                TensorView::new(Dtype::F32, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    io::load_bytes(model, &safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Every parameter and buffer by name, as bits.
fn state(model: &dyn Module) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    model
        .named_parameters()
        .into_iter()
        .chain(model.named_buffers())
        .map(|(name, t)| {
            let bits = t.to_vec().iter().map(|v| v.to_bits()).collect();
            (name, t.shape().to_vec(), bits)
        })
        .collect()
}

/// Saves `model` with `io::save_model` (through a file), loads it back,
/// and checks the architecture, every value and the output on `input`
/// (in evaluation mode) are the same. Returns the loaded model.
fn round_trip(model: &dyn Module, input: &Tensor) -> Box<dyn Module> {
    randomize(model, 17);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    io::save_model(model, &path).unwrap();
    let loaded = io::load_model(&path).unwrap();
    assert_eq!(loaded.architecture(), model.architecture());
    assert_eq!(state(&*loaded), state(model));
    let _eval = netcl::nn::eval_mode();
    let _no_grad = autograd::no_grad();
    let expected = model.forward(input).unwrap();
    let found = loaded.forward(input).unwrap();
    assert_eq!(found.shape(), expected.shape());
    let bits = |t: &Tensor| t.to_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&found), bits(&expected), "{model:?}");
    loaded
}

fn input(shape: &[usize], seed: u64) -> Tensor {
    Tensor::uniform(shape, -2.0, 2.0, &mut rng(seed))
}

#[test]
fn linear_round_trips_with_and_without_bias() {
    round_trip(&Linear::new(3, 4, &mut rng(0)), &input(&[2, 3], 1));
    round_trip(&Linear::without_bias(3, 4, &mut rng(0)), &input(&[2, 3], 1));
}

#[test]
fn activations_round_trip() {
    let x = input(&[2, 5], 2);
    round_trip(&ReLU::new(), &x);
    round_trip(&Sigmoid::new(), &x);
    round_trip(&Tanh::new(), &x);
    round_trip(&Silu::new(), &x);
    round_trip(&Gelu::new(), &x);
    let tanh = round_trip(&Gelu::tanh(), &x);
    assert_eq!(
        tanh.architecture().unwrap().str("approximate").unwrap(),
        "tanh"
    );
}

#[test]
fn dropout_round_trips_with_its_seed_and_draws_the_same_masks() {
    let dropout = Dropout::new(0.3, 99);
    let loaded = round_trip(&dropout, &input(&[4, 8], 3));
    // In training mode the masks come from the seed: the loaded layer's
    // first mask on this thread is the original's first.
    let _train = netcl::nn::train_mode();
    let x = Tensor::ones(&[4, 64]);
    assert_eq!(
        loaded.forward(&x).unwrap().to_vec(),
        dropout.forward(&x).unwrap().to_vec()
    );
}

#[test]
fn conv_and_pooling_layers_round_trip() {
    let x = input(&[2, 4, 9, 7], 4);
    let conv = Conv2d::try_grouped(4, 6, (3, 2), 2, true, &mut rng(5))
        .unwrap()
        .with_stride((2, 1))
        .with_padding(1)
        .with_dilation((1, 2));
    round_trip(&conv, &x);
    let no_bias = Conv2d::try_grouped(4, 2, 3, 1, false, &mut rng(6)).unwrap();
    round_trip(&no_bias, &x);
    round_trip(&MaxPool2d::new(3).with_stride(2).with_padding(1), &x);
    round_trip(&MaxPool2d::new((2, 3)), &x);
    round_trip(
        &AvgPool2d::new(2)
            .with_padding(1)
            .with_count_include_pad(false),
        &x,
    );
    round_trip(&AvgPool2d::new(3).with_stride((1, 2)), &x);
    round_trip(&AdaptiveAvgPool2d::new((2, 3)), &x);
    round_trip(&Flatten::new(), &x);
    round_trip(&Flatten::with_dims(-3, -2), &x);
}

#[test]
fn norms_round_trip_with_their_buffers() {
    let bn1 = BatchNorm1d::new(3).with_eps(1e-3).with_momentum(0.25);
    round_trip(&bn1, &input(&[5, 3], 7));
    round_trip(&BatchNorm1d::without_affine(3), &input(&[5, 3, 4], 8));
    round_trip(&BatchNorm2d::new(4).with_eps(0.1), &input(&[2, 4, 3, 3], 9));
    round_trip(
        &LayerNorm::new(&[2, 3]).with_eps(1e-4),
        &input(&[4, 2, 3], 10),
    );
    round_trip(&LayerNorm::without_affine(&[3]), &input(&[4, 3], 11));
    round_trip(&RmsNorm::new(&[4]), &input(&[3, 4], 12));
    round_trip(
        &RmsNorm::without_affine(&[2, 2]).with_eps(1e-6),
        &input(&[3, 2, 2], 13),
    );
}

#[test]
fn embedding_attention_and_transformer_round_trip() {
    let ids = Tensor::from_vec(vec![0.0, 4.0, 2.0, 2.0, 1.0, 3.0], &[2, 3]).unwrap();
    round_trip(&Embedding::new(5, 3, &mut rng(14)), &ids);
    let x = input(&[2, 4, 8], 15);
    round_trip(&MultiheadAttention::new(8, 2, &mut rng(16)), &x);
    round_trip(&TransformerBlock::new(8, 4, 12, &mut rng(17)), &x);
}

#[test]
fn mlp_round_trips_for_each_activation() {
    for activation in [Activation::Relu, Activation::Sigmoid, Activation::Tanh] {
        let mlp = Mlp::new(&[4, 6, 5, 3], activation, &mut rng(18));
        round_trip(&mlp, &input(&[2, 4], 19));
    }
}

#[test]
fn nested_sequentials_round_trip() {
    let mut r = rng(20);
    let model = Sequential::new()
        .with(
            Sequential::new()
                .with(Linear::new(6, 8, &mut r))
                .with(ReLU::new()),
        )
        .with(Sequential::new().with(Sequential::new().with(Linear::new(8, 8, &mut r))))
        .with(Sequential::new())
        .with(Dropout::new(0.5, 1))
        .with(BatchNorm1d::new(8))
        .with(Mlp::new(&[8, 4, 2], Activation::Tanh, &mut r));
    let loaded = round_trip(&model, &input(&[3, 6], 21));
    let names: Vec<String> = loaded
        .named_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names[0], "0.0.weight");
    assert_eq!(names[2], "1.0.0.weight");
}

#[test]
fn a_cnn_round_trips() {
    let mut r = rng(22);
    let cnn = Sequential::new()
        .with(Conv2d::new(1, 4, 3, &mut r).with_padding(1))
        .with(BatchNorm2d::new(4))
        .with(ReLU::new())
        .with(MaxPool2d::new(2))
        .with(Conv2d::new(4, 8, 3, &mut r))
        .with(Silu::new())
        .with(AdaptiveAvgPool2d::new(1))
        .with(Flatten::new())
        .with(Linear::new(8, 10, &mut r));
    round_trip(&cnn, &input(&[2, 1, 8, 8], 23));
}

#[test]
fn the_loaded_model_is_in_evaluation_mode_and_trainable() {
    let model = Sequential::new()
        .with(Linear::new(2, 2, &mut rng(24)))
        .with(Dropout::new(0.5, 0));
    let loaded = io::load_model_bytes(&io::model_to_bytes(&model).unwrap()).unwrap();
    assert!(!loaded.is_training());
    assert!(loaded.parameters().iter().all(Tensor::requires_grad));
    loaded
        .forward(&Tensor::ones(&[1, 2]))
        .unwrap()
        .sum()
        .backward();
    assert!(loaded.parameters()[0].grad().is_some());
}

#[test]
fn metadata_travels_beside_the_architecture_and_netcl_keys_are_reserved() {
    let model = Linear::zeros(2, 3).unwrap();
    let metadata = BTreeMap::from([
        ("vocab".to_string(), "abc".to_string()),
        ("step".to_string(), "1200".to_string()),
    ]);
    let bytes = io::model_to_bytes_with_metadata(&model, &metadata).unwrap();
    let checkpoint = io::load_checkpoint_bytes(&bytes).unwrap();
    assert_eq!(checkpoint.metadata, metadata);
    assert_eq!(Some(checkpoint.architecture), model.architecture());
    // Plain readers see netcl's keys too.
    let raw = io::metadata_from_bytes(&bytes).unwrap();
    assert_eq!(
        raw[io::SCHEMA_VERSION_KEY],
        ARCHITECTURE_SCHEMA_VERSION.to_string()
    );
    // And the weights still load into a model built in code.
    io::load_bytes(&Linear::zeros(2, 3).unwrap(), &bytes).unwrap();

    let reserved = BTreeMap::from([("netcl.mine".to_string(), String::new())]);
    let err = io::model_to_bytes_with_metadata(&model, &reserved).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { .. }) && err.to_string().contains("netcl.mine"),
        "{err}"
    );
}

#[test]
fn a_model_without_an_architecture_is_refused_at_save() {
    let emb = Embedding::zeros(4, 3).unwrap();
    let tied = TiedLinear::new(emb.weight(), None);
    let model = Sequential::new().with(emb.clone()).with(tied);
    let err = io::model_to_bytes(&model).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("Module::architecture"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    assert!(io::save_model(&model, &path).is_err());
    assert!(!path.exists());
}

// ---------------------------------------------------------------------------
// Bad checkpoints.

/// A checkpoint with `model`'s tensors and the given netcl metadata.
fn forged(model: &dyn Module, version: &str, architecture: &str) -> Vec<u8> {
    let metadata = BTreeMap::from([
        (io::SCHEMA_VERSION_KEY.to_string(), version.to_string()),
        (io::ARCHITECTURE_KEY.to_string(), architecture.to_string()),
    ]);
    io::to_bytes_with_metadata(model, &metadata).unwrap()
}

fn load_err(bytes: &[u8]) -> Error {
    match io::load_model_bytes(bytes) {
        Ok(model) => panic!("loaded {model:?}"),
        Err(err) => err,
    }
}

#[test]
fn an_unknown_layer_kind_is_named_with_its_position() {
    let arch = r#"{"kind":"Sequential","children":[{"kind":"ReLU"},{"kind":"Sequential","children":[{"kind":"Conv3d","config":{}}]}]}"#;
    let err = load_err(&forged(&Sequential::new(), "1", arch));
    assert!(matches!(err, Error::Format { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("unknown layer kind `Conv3d`"), "{message}");
    assert!(message.contains("layer `1.0`"), "{message}");
}

#[test]
fn a_missing_tensor_is_named() {
    let without_bias = Linear::from_parts(Tensor::zeros(&[3, 2]), None).unwrap();
    let with_bias = Linear::zeros(3, 2).unwrap().architecture().unwrap();
    let err = load_err(&forged(&without_bias, "1", &with_bias.to_json_string()));
    match err {
        Error::ParameterNames {
            missing,
            unexpected,
            ..
        } => {
            assert_eq!(missing, ["bias"]);
            assert!(unexpected.is_empty());
        }
        err => panic!("{err}"),
    }
}

#[test]
fn a_mis_shaped_tensor_is_named_with_both_shapes() {
    let stored = Linear::zeros(3, 2).unwrap();
    let claimed = Linear::zeros(4, 2).unwrap().architecture().unwrap();
    let err = load_err(&forged(&stored, "1", &claimed.to_json_string()));
    assert_eq!(
        err.to_string(),
        "io::load_model: parameter `weight` is stored as F32 [3, 2], the model expects F32 [4, 2]"
    );
    // A buffer too.
    let stored = BatchNorm1d::new(3);
    let claimed = r#"{"kind":"BatchNorm1d","config":{"num_features":3,"eps":1e-5,"momentum":0.1,"affine":false}}"#;
    let err = load_err(&forged(&stored, "1", claimed));
    assert!(matches!(err, Error::ParameterNames { .. }), "{err}");
}

#[test]
fn an_architecture_far_larger_than_the_file_is_refused_before_allocating() {
    let claimed = r#"{"kind":"Linear","config":{"in_features":1000000000,"out_features":1000000000,"bias":true}}"#;
    let err = load_err(&forged(&Linear::zeros(2, 2).unwrap(), "1", claimed));
    let message = err.to_string();
    assert!(message.contains("layer `(root)` (Linear)"), "{message}");
    assert!(message.contains("[1000000000, 1000000000]"), "{message}");
    let overflow = r#"{"kind":"Embedding","config":{"num_embeddings":18446744073709551615,"embedding_dim":3}}"#;
    load_err(&forged(&Linear::zeros(2, 2).unwrap(), "1", overflow));
}

#[test]
fn non_finite_weights_are_refused_and_named() {
    for (bad, shown) in [
        (f32::NAN, "NaN"),
        (f32::INFINITY, "inf"),
        (f32::NEG_INFINITY, "-inf"),
    ] {
        let weight = Tensor::from_vec(vec![0.5, 1.0, bad, 2.0], &[2, 2]).unwrap();
        let model = Sequential::new()
            .with(Linear::zeros(2, 2).unwrap())
            .with(Linear::from_parts(weight, None).unwrap());
        let err = load_err(&io::model_to_bytes(&model).unwrap());
        assert!(matches!(err, Error::Format { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains(&format!("tensor `1.weight` holds {shown} at index 2")),
            "{message}"
        );
    }
}

#[test]
fn a_newer_schema_is_refused_naming_both_versions() {
    let arch = Linear::zeros(2, 2).unwrap().architecture().unwrap();
    let newer = (ARCHITECTURE_SCHEMA_VERSION + 1).to_string();
    let err = load_err(&forged(
        &Linear::zeros(2, 2).unwrap(),
        &newer,
        &arch.to_json_string(),
    ));
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&format!("schema version is {newer}")),
        "{message}"
    );
    assert!(
        message.contains(&format!("version {ARCHITECTURE_SCHEMA_VERSION}")),
        "{message}"
    );
    for bad in ["0", "-1", "one", ""] {
        let err = load_err(&forged(
            &Linear::zeros(2, 2).unwrap(),
            bad,
            &arch.to_json_string(),
        ));
        assert!(matches!(err, Error::Format { .. }), "{bad}: {err}");
    }
}

#[test]
fn malformed_json_and_bad_nodes_are_format_errors() {
    let model = Linear::zeros(2, 2).unwrap();
    let cases = [
        (r#"{"kind":"Linear""#, "malformed JSON"),
        ("[]", "expected an object"),
        (r#"{"config":{}}"#, "`kind` is missing"),
        (r#"{"kind":3}"#, "`kind` should be a string"),
        (
            r#"{"kind":"Linear","config":[]}"#,
            "`config` should be an object",
        ),
        (
            r#"{"kind":"Sequential","children":{}}"#,
            "`children` should be an array",
        ),
        (
            r#"{"kind":"Linear","config":{"in_features":2,"out_features":2}}"#,
            "config `bias` of `Linear` is missing",
        ),
        (
            r#"{"kind":"Linear","config":{"in_features":-2,"out_features":2,"bias":true}}"#,
            "config `in_features` of `Linear` should be a non-negative integer, found -2",
        ),
        (
            r#"{"kind":"Linear","config":{"in_features":2,"out_features":2,"bias":true,"strides":1}}"#,
            "unknown config key `strides` (`Linear` has `in_features`, `out_features`, `bias`)",
        ),
        (
            r#"{"kind":"Mlp","config":{"dims":[2,2],"activation":"swish"}}"#,
            "config `activation` of `Mlp`",
        ),
    ];
    for (json, expected) in cases {
        let err = load_err(&forged(&model, "1", json));
        assert!(matches!(err, Error::Format { .. }), "{json}: {err}");
        assert!(err.to_string().contains(expected), "{json}: {err}");
    }
    // Nesting deeper than the JSON parser's limit is an error, not a stack
    // overflow.
    let deep = r#"{"kind":"Sequential","children":["#.repeat(10_000);
    load_err(&forged(&model, "1", &deep));
}

#[test]
fn a_plain_or_garbage_file_is_refused() {
    let plain = io::to_bytes(&Linear::zeros(2, 2).unwrap()).unwrap();
    assert!(matches!(load_err(&plain), Error::Format { .. }));
    assert!(matches!(load_err(b"garbage"), Error::Format { .. }));
    let err = io::load_model("/no/such/dir/m.safetensors").unwrap_err();
    assert!(
        matches!(
            err,
            Error::Io {
                op: "io::load_model",
                ..
            }
        ),
        "{err}"
    );
}

// ---------------------------------------------------------------------------
// Registered kinds.

/// A model of its own: two Linears sharing nothing, described as one node.
#[derive(Debug)]
struct TwoTowers {
    left: Linear,
    right: Linear,
    label: String,
}

impl Module for TwoTowers {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.left.forward(x)?.try_add(&self.right.forward(x)?)
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut params: Vec<(String, Tensor)> = Vec::new();
        for (prefix, layer) in [("left", &self.left), ("right", &self.right)] {
            for (name, p) in layer.named_parameters() {
                params.push((format!("{prefix}.{name}"), p));
            }
        }
        params
    }
    fn architecture(&self) -> Option<Architecture> {
        Some(
            Architecture::new("test.TwoTowers")
                .with("label", self.label.clone())
                .with_child(self.left.architecture()?)
                .with_child(self.right.architecture()?),
        )
    }
}

fn build_two_towers(arch: &Architecture, cx: &BuildContext) -> Result<Box<dyn Module>> {
    // The children are built as Linears, then taken apart: rebuild them
    // from their configs.
    let [left, right] = arch.children() else {
        return Err(Error::InvalidArgument {
            op: "TwoTowers",
            message: "expected two children".to_string(),
        });
    };
    let linear = |a: &Architecture| -> Result<Linear> {
        cx.build_child("tower", a)?; // checks the node and the budget
        Linear::from_parts(
            Tensor::zeros(&[a.usize("in_features")?, a.usize("out_features")?]),
            Some(Tensor::zeros(&[a.usize("out_features")?])),
        )
    };
    Ok(Box::new(TwoTowers {
        left: linear(left)?,
        right: linear(right)?,
        label: arch.str("label")?.to_string(),
    }))
}

#[test]
fn a_registered_kind_loads_and_an_unregistered_one_is_named() {
    let model = TwoTowers {
        left: Linear::new(3, 2, &mut rng(30)),
        right: Linear::new(3, 2, &mut rng(31)),
        label: "towers".to_string(),
    };
    let bytes = io::model_to_bytes(&model).unwrap();
    let kind_name = |err: Error| {
        err.to_string()
            .contains("unknown layer kind `test.TwoTowers`")
    };
    // Another test of this binary may have registered it already: only
    // check the error before registering if it is not known yet.
    if !netcl::nn::known_kinds()
        .iter()
        .any(|k| k == "test.TwoTowers")
    {
        assert!(kind_name(load_err(&bytes)));
    }
    netcl::nn::register_kind("test.TwoTowers", build_two_towers).unwrap();
    let loaded = io::load_model_bytes(&bytes).unwrap();
    let x = input(&[2, 3], 32);
    assert_eq!(
        loaded.forward(&x).unwrap().to_vec(),
        model.forward(&x).unwrap().to_vec()
    );
    assert_eq!(loaded.architecture(), model.architecture());
}

// ---------------------------------------------------------------------------
// Fuzzing: mangled architectures never panic and never load a wrong model.

/// A valid checkpoint of a small CNN-and-MLP model.
fn sample_bytes() -> (Vec<u8>, String) {
    let mut r = rng(40);
    let model = Sequential::new()
        .with(Conv2d::new(1, 2, 3, &mut r))
        .with(BatchNorm2d::new(2))
        .with(MaxPool2d::new(2))
        .with(Flatten::new())
        .with(Linear::new(2, 3, &mut r))
        .with(LayerNorm::new(&[3]))
        .with(Dropout::new(0.1, 3));
    let json = model.architecture().unwrap().to_json_string();
    (io::model_to_bytes(&model).unwrap(), json)
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        (0u64..8).prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        "[a-z]{0,6}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A node of a random built-in kind with random config values under its
/// real keys (and some random ones).
fn random_node() -> impl Strategy<Value = serde_json::Value> {
    let keys = [
        "in_features",
        "out_features",
        "bias",
        "dims",
        "activation",
        "approximate",
        "p",
        "seed",
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "count_include_pad",
        "output_size",
        "start_dim",
        "end_dim",
        "num_features",
        "eps",
        "momentum",
        "affine",
        "normalized_shape",
        "num_embeddings",
        "embedding_dim",
        "embed_dim",
        "num_heads",
        "d_model",
        "d_ff",
    ];
    let kinds = netcl::nn::known_kinds();
    (
        prop::sample::select(kinds),
        prop::collection::btree_map(prop::sample::select(keys.to_vec()), json_value(), 0..12),
    )
        .prop_map(|(kind, config)| {
            serde_json::json!({
                "kind": kind,
                "config": config.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<serde_json::Map<_, _>>(),
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Byte-level mangling of a valid architecture (flips, cuts, inserts):
    /// an error, or a model whose architecture is the mangled one parsed.
    #[test]
    fn mangled_architecture_text_never_panics(
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<u8>()), 1..6),
    ) {
        let (bytes, json) = sample_bytes();
        let mut text = json.into_bytes();
        for (at, op, byte) in edits {
            let i = at.index(text.len().max(1)).min(text.len());
            match op {
                0 if i < text.len() => text[i] = byte,
                1 => text.truncate(i),
                _ => text.insert(i, byte),
            }
        }
        let text = String::from_utf8_lossy(&text).into_owned();
        let mut meta = io::metadata_from_bytes(&bytes).unwrap();
        meta.insert(io::ARCHITECTURE_KEY.to_string(), text.clone());
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let views: Vec<(String, TensorView<'_>)> = file.tensors();
        let forged = safetensors::serialize(views, Some(meta.into_iter().collect())).unwrap();
        match io::load_checkpoint_bytes(&forged) {
            Ok(checkpoint) => {
                prop_assert_eq!(Some(checkpoint.architecture.clone()),
                    Architecture::from_json_str(&text).ok());
                prop_assert_eq!(checkpoint.model.architecture(), Some(checkpoint.architecture));
            }
            Err(err) => prop_assert!(!err.to_string().is_empty()),
        }
    }

    /// Random nodes of the built-in kinds with random config values:
    /// building never panics, and loading against a file it does not
    /// match is an error; a node that builds describes itself back.
    #[test]
    fn random_nodes_never_panic(node in random_node(), children in prop::collection::vec(random_node(), 0..3)) {
        let mut node = node;
        if !children.is_empty() {
            node["children"] = serde_json::Value::from(children);
        }
        let text = node.to_string();
        let (bytes, _) = sample_bytes();
        let mut meta = io::metadata_from_bytes(&bytes).unwrap();
        meta.insert(io::ARCHITECTURE_KEY.to_string(), text.clone());
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let forged = safetensors::serialize(file.tensors(), Some(meta.into_iter().collect())).unwrap();
        // The sample's tensors belong to a 7-layer Sequential: no random
        // node is that model.
        prop_assert!(io::load_model_bytes(&forged).is_err());
        if let Ok(arch) = Architecture::from_json_str(&text) {
            // Building with no file is allowed anything the budget of a
            // small file allows: use a checkpoint of nothing.
            let empty = forged_empty(&text);
            if let Ok(model) = io::load_model_bytes(&empty) {
                prop_assert_eq!(model.num_parameters(), 0);
                let _ = model.forward(&Tensor::ones(&[2, 3, 4, 4]));
                prop_assert!(model.architecture().is_some(), "{}", arch.kind());
            }
        }
    }
}

/// A checkpoint with no tensors and the given architecture.
fn forged_empty(architecture: &str) -> Vec<u8> {
    forged(&Sequential::new(), "1", architecture)
}

#[test]
fn a_loaded_model_is_published_and_replaced_by_a_newer_checkpoint() {
    let v1 = Linear::from_parts(Tensor::full(&[2, 1], 1.0), None).unwrap();
    let v2 = Linear::from_parts(Tensor::full(&[2, 1], 2.0), None).unwrap();
    let loaded = io::load_model_bytes(&io::model_to_bytes(&v1).unwrap()).unwrap();
    let published = netcl::nn::Published::new(&loaded).unwrap();
    let x = Tensor::ones(&[1, 2]);
    assert_eq!(published.load().forward(&x).unwrap().to_vec(), [2.0]);
    // What a server following a checkpoint directory does.
    let newer = io::load_model_bytes(&io::model_to_bytes(&v2).unwrap()).unwrap();
    published.publish_model(newer);
    assert_eq!(published.load().forward(&x).unwrap().to_vec(), [4.0]);
    assert_eq!(
        published.load().architecture(),
        v2.architecture(),
        "a published version describes itself"
    );
}
