//! Self-describing checkpoints of the character language model: a
//! `CharTransformer` saved with `io::save_model` (or
//! `CharTransformer::save`) loads back with `io::load_model` as a ready
//! model with its vocabulary, and a server gets the vocabulary and a
//! `Generator` from the `Box<dyn Module>` alone. Bad configs, tensors and
//! vocabularies are errors naming them, never panics.

use std::collections::BTreeMap;

use netcl::models::{CharLmConfig, CharTransformer, Generator, Vocab};
use netcl::nn::{Architecture, Linear, Module, Published};
use netcl::{Error, Tensor, autograd, io};
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use safetensors::SafeTensors;

const TEXT: &str = "the quick brown fox jumps over the lazy dog";

fn small() -> (CharTransformer, Vocab) {
    let vocab = Vocab::from_text(TEXT);
    let config = CharLmConfig::new(vocab.len())
        .with_width(16)
        .with_heads(2)
        .with_blocks(2)
        .with_context(12)
        .with_dropout(0.125);
    let model = CharTransformer::try_new(config, &mut StdRng::seed_from_u64(5))
        .unwrap()
        .try_with_vocab(vocab.clone())
        .unwrap();
    (model, vocab)
}

fn ids(vocab: &Vocab, text: &str) -> Tensor {
    let ids = vocab.encode(text).unwrap();
    let n = ids.len();
    Tensor::from_vec(ids.into_iter().map(|i| i as f32).collect(), &[1, n]).unwrap()
}

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "netcl-arch-lm-{name}-{}.safetensors",
        std::process::id()
    ))
}

fn load_err(bytes: &[u8]) -> Error {
    match io::load_model_bytes(bytes) {
        Ok(model) => panic!("loaded {model:?}"),
        Err(err) => err,
    }
}

/// `bytes` with its architecture replaced by `architecture`.
fn with_architecture(bytes: &[u8], architecture: &str) -> Vec<u8> {
    let mut meta = io::metadata_from_bytes(bytes).unwrap();
    meta.insert(io::ARCHITECTURE_KEY.to_string(), architecture.to_string());
    let file = SafeTensors::deserialize(bytes).unwrap();
    safetensors::serialize(file.tensors(), Some(meta.into_iter().collect())).unwrap()
}

/// The model's architecture as JSON, with config entry `key` set to `value`
/// (removed if `None`).
fn edited(model: &CharTransformer, key: &str, value: Option<serde_json::Value>) -> String {
    let mut json = model.architecture().unwrap().to_json();
    let config = json["config"].as_object_mut().unwrap();
    match value {
        Some(value) => config.insert(key.to_string(), value),
        None => config.remove(key),
    };
    json.to_string()
}

#[test]
fn save_model_round_trips_logits_vocabulary_and_generated_text() {
    let (model, vocab) = small();
    let path = temp("round-trip");
    io::save_model(&model, &path).unwrap();
    let checkpoint = io::load_checkpoint(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let loaded = checkpoint.model;

    assert_eq!(checkpoint.architecture.kind(), "CharTransformer");
    assert_eq!(loaded.architecture(), model.architecture());
    assert!(!loaded.is_training());
    assert_eq!(Vocab::of_module(&*loaded).unwrap(), vocab);
    assert_eq!(CharLmConfig::of_module(&*loaded).unwrap(), *model.config());

    let x = ids(&vocab, "the lazy fox");
    let _no_grad = autograd::no_grad();
    model.eval();
    let expected = model.forward(&x).unwrap().to_vec();
    let found = loaded.forward(&x).unwrap().to_vec();
    assert_eq!(
        expected.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        found.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );

    let original = model.generator().unwrap();
    let restored = Generator::of_module(&*loaded).unwrap();
    let prompt = vocab.encode("the ").unwrap();
    let mut texts = Vec::new();
    for seed in 0..4 {
        let a = original.generate(&prompt, 30, 0.9, Some(6), seed);
        let b = restored.generate(&prompt, 30, 0.9, Some(6), seed);
        assert_eq!(a, b, "seed {seed}");
        texts.push(vocab.decode(&b).unwrap());
    }
    assert!(
        texts.windows(2).any(|w| w[0] != w[1]),
        "different seeds sample differently: {texts:?}"
    );
}

#[test]
fn a_published_version_of_a_loaded_model_gives_vocabulary_and_generator() {
    let (model, vocab) = small();
    let loaded = io::load_model_bytes(&io::model_to_bytes(&model).unwrap()).unwrap();
    let published = Published::new(&loaded).unwrap();
    let version = published.load();
    assert_eq!(Vocab::of_module(version.model()).unwrap(), vocab);
    let generator = Generator::of_module(version.model()).unwrap();
    let prompt = vocab.encode("fox").unwrap();
    assert_eq!(
        generator.generate(&prompt, 20, 1.0, None, 9),
        model.generate(&prompt, 20, 1.0, None, 9)
    );
}

#[test]
fn char_transformer_save_writes_a_self_describing_checkpoint_and_load_reads_both() {
    let (model, vocab) = small();
    let plain = CharTransformer::try_new(*model.config(), &mut StdRng::seed_from_u64(5)).unwrap();
    assert!(plain.vocab().is_none());
    let path = temp("save");
    plain.save(&vocab, &path).unwrap();

    // io::load_model needs no code, and the model has the vocabulary.
    let loaded = io::load_model(&path).unwrap();
    assert_eq!(Vocab::of_module(&*loaded).unwrap(), vocab);
    // The older metadata keys are still there.
    let meta = io::read_metadata(&path).unwrap();
    assert_eq!(meta["vocab"], vocab.chars());
    assert_eq!(meta["d_model"], "16");
    let (again, again_vocab) = CharTransformer::load(&path).unwrap();
    assert_eq!(again_vocab, vocab);
    assert_eq!(again.vocab(), Some(&vocab));
    std::fs::remove_file(&path).unwrap();

    // CharTransformer::load reads a plain io::save_model checkpoint too.
    io::save_model(&model, &path).unwrap();
    let (from_save_model, v) = CharTransformer::load(&path).unwrap();
    assert_eq!(v, vocab);
    assert_eq!(from_save_model.architecture(), model.architecture());
    std::fs::remove_file(&path).unwrap();

    // A model without a vocabulary saves and loads, but has no vocabulary.
    let bytes = io::model_to_bytes(&plain).unwrap();
    let loaded = io::load_model_bytes(&bytes).unwrap();
    let err = Vocab::of_module(&*loaded).unwrap_err();
    assert!(err.to_string().contains("no vocabulary"), "{err}");
    assert!(Generator::of_module(&*loaded).is_ok());
}

#[test]
fn with_vocab_refuses_a_vocabulary_of_another_size() {
    let (model, _) = small();
    let err = model
        .try_clone()
        .unwrap()
        .try_with_vocab(Vocab::from_text("abc"))
        .unwrap_err();
    let expected = format!("3 characters, the model {}", model.config().vocab_size);
    assert!(err.to_string().contains(&expected), "{err}");
}

#[test]
fn other_models_are_named_by_their_kind() {
    let linear = Linear::zeros(2, 2).unwrap();
    let err = Vocab::of_module(&linear).unwrap_err();
    assert!(
        err.to_string()
            .contains("`Linear`, not a `CharTransformer`"),
        "{err}"
    );
    assert!(Generator::of_module(&linear).is_err());
    assert!(CharLmConfig::from_architecture(&Architecture::new("ReLU")).is_err());
}

#[test]
fn bad_configs_and_vocabularies_are_errors_naming_them() {
    let (model, _) = small();
    let bytes = io::model_to_bytes(&model).unwrap();
    let size = format!(
        "has 3 characters, `vocab_size` is {}",
        model.config().vocab_size
    );
    let cases: Vec<(&str, Option<serde_json::Value>, &str)> = vec![
        ("d_model", Some(0.into()), "every size must be positive"),
        ("num_blocks", Some(0.into()), "every size must be positive"),
        ("num_heads", Some(3.into()), "num_heads must divide d_model"),
        ("dropout", Some(1.5.into()), "dropout must be in [0, 1)"),
        (
            "context",
            None,
            "config `context` of `CharTransformer` is missing",
        ),
        (
            "vocab_size",
            Some("27".into()),
            "config `vocab_size` of `CharTransformer` should be",
        ),
        ("vocab", Some("abc".into()), &size),
        ("vocab", Some("".into()), "config `vocab`"),
        ("vocab", Some("aab".into()), "must be distinct"),
        (
            "vocab",
            Some(7.into()),
            "config `vocab` of `CharTransformer` should be a string",
        ),
        ("colour", Some("red".into()), "unknown config key `colour`"),
    ];
    for (key, value, expected) in cases {
        let forged = with_architecture(&bytes, &edited(&model, key, value.clone()));
        let err = load_err(&forged);
        assert!(
            matches!(err, Error::Format { .. }),
            "{key}={value:?}: {err:?}"
        );
        assert!(err.to_string().contains(expected), "{key}={value:?}: {err}");
    }
}

#[test]
fn missing_and_mis_shaped_tensors_are_named() {
    let (model, vocab) = small();
    let bytes = io::model_to_bytes(&model).unwrap();

    // A vocab_size (and vocab) one larger than the embedding.
    let mut chars = vocab.chars();
    chars.push('#');
    let mut json = model.architecture().unwrap().to_json();
    json["config"]["vocab_size"] = (vocab.len() + 1).into();
    json["config"]["vocab"] = chars.into();
    let err = load_err(&with_architecture(&bytes, &json.to_string()));
    assert!(
        matches!(&err, Error::ParameterMismatch { name, .. } if ["tok_emb.weight", "head.weight", "head.bias"].contains(&name.as_str())),
        "{err:?}"
    );

    // Three blocks where the file has two.
    let err = load_err(&with_architecture(
        &bytes,
        &edited(&model, "num_blocks", Some(3.into())),
    ));
    match err {
        Error::ParameterNames { missing, .. } => {
            assert!(
                missing.iter().any(|n| n.starts_with("blocks.2.")),
                "{missing:?}"
            )
        }
        err => panic!("{err:?}"),
    }

    // A file without the head's bias.
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let meta = io::metadata_from_bytes(&bytes).unwrap();
    let tensors: Vec<_> = file
        .tensors()
        .into_iter()
        .filter(|(name, _)| name != "head.bias")
        .collect();
    let forged = safetensors::serialize(tensors, Some(meta.into_iter().collect())).unwrap();
    match load_err(&forged) {
        Error::ParameterNames { missing, .. } => assert_eq!(missing, ["head.bias"]),
        err => panic!("{err:?}"),
    }

    // Sizes far beyond the file are refused before allocating.
    let err = load_err(&with_architecture(
        &bytes,
        &edited(&model, "context", Some(1_000_000_000_000u64.into())),
    ));
    assert!(
        err.to_string().contains("larger than the checkpoint"),
        "{err}"
    );
}

#[test]
fn metadata_travels_beside_the_lm_architecture() {
    let (model, _) = small();
    let meta = BTreeMap::from([("step".to_string(), "7".to_string())]);
    let bytes = io::model_to_bytes_with_metadata(&model, &meta).unwrap();
    assert_eq!(io::load_checkpoint_bytes(&bytes).unwrap().metadata, meta);
}

fn sample() -> (Vec<u8>, String) {
    let (model, _) = small();
    (
        io::model_to_bytes(&model).unwrap(),
        model.architecture().unwrap().to_json_string(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Byte-level mangling of a CharTransformer's architecture (flips,
    /// cuts, inserts): an error, or a model whose architecture is the
    /// mangled one parsed, whose vocabulary (if any) has `vocab_size`
    /// characters.
    #[test]
    fn mangled_lm_architecture_never_panics(
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<u8>()), 1..6),
    ) {
        let (bytes, json) = sample();
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
        match io::load_checkpoint_bytes(&with_architecture(&bytes, &text)) {
            Ok(checkpoint) => {
                prop_assert_eq!(Some(checkpoint.architecture.clone()),
                    Architecture::from_json_str(&text).ok());
                prop_assert_eq!(checkpoint.model.architecture(), Some(checkpoint.architecture.clone()));
                let config = CharLmConfig::of_module(&*checkpoint.model).unwrap();
                if let Ok(vocab) = Vocab::of_module(&*checkpoint.model) {
                    prop_assert_eq!(vocab.len(), config.vocab_size);
                }
                prop_assert!(Generator::of_module(&*checkpoint.model).is_ok());
            }
            Err(err) => prop_assert!(!err.to_string().is_empty()),
        }
    }

    /// Random values for the CharTransformer's config keys: never a panic.
    #[test]
    fn random_lm_configs_never_panic(
        key in prop::sample::select(lm_keys()),
        value in prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            (0u64..64).prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            "\\PC{0,40}".prop_map(serde_json::Value::from),
        ],
    ) {
        let (model, _) = small();
        let bytes = io::model_to_bytes(&model).unwrap();
        let text = edited(&model, key, Some(value));
        if let Ok(loaded) = io::load_model_bytes(&with_architecture(&bytes, &text)) {
            prop_assert!(Generator::of_module(&*loaded).is_ok());
        }
    }
}

fn lm_keys() -> Vec<&'static str> {
    vec![
        "vocab_size",
        "d_model",
        "num_heads",
        "num_blocks",
        "context",
        "d_ff",
        "dropout",
        "vocab",
    ]
}
