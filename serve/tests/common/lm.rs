//! What the generation tests share: a small random language model, the
//! engine's own generation to compare with, a server of it beside a
//! classifier, and a set of requests.

use std::path::Path;

use netcl::models::{CharLmConfig, CharTransformer, Vocab};
use netcl::nn::Linear;
use netcl::rand::SeedableRng;
use netcl::rand::rngs::StdRng;
use serde_json::{Value, json};

/// The text whose characters are the models' vocabulary.
pub const TEXT: &str = "the quick brown fox jumps over the lazy dog.\n";

/// A random language model over [`TEXT`]'s characters, `width` wide with
/// `blocks` blocks (its cost per character grows with both).
pub fn language_model(seed: u64, width: usize, blocks: usize) -> (CharTransformer, Vocab) {
    let vocab = Vocab::from_text(TEXT);
    let config = CharLmConfig::new(vocab.len())
        .with_width(width)
        .with_heads(2)
        .with_blocks(blocks)
        .with_context(16);
    let model = CharTransformer::try_new(config, &mut StdRng::seed_from_u64(seed)).unwrap();
    (model, vocab)
}

/// What the engine generates for one request (its first `tokens`
/// characters, or `max_tokens`).
pub fn expected(
    model: &CharTransformer,
    vocab: &Vocab,
    request: &Value,
    tokens: Option<usize>,
) -> String {
    let prompt = vocab.encode(request["prompt"].as_str().unwrap()).unwrap();
    let ids = model.generator().unwrap().generate(
        &prompt,
        tokens.unwrap_or(request["max_tokens"].as_u64().unwrap() as usize),
        request["temperature"].as_f64().unwrap() as f32,
        request["top_k"].as_u64().map(|k| k as usize),
        request["seed"].as_u64().unwrap(),
    );
    vocab.decode(&ids).unwrap()
}

/// A server of `model` as `lm` and a classifier `clf`, with `config`.
pub async fn serve_lm(
    dir: &Path,
    model: &CharTransformer,
    vocab: &Vocab,
    config: netcl_serve::Config,
) -> netcl_serve::Server {
    let lm_path = dir.join("charlm.safetensors");
    model.save(vocab, &lm_path).unwrap();
    let clf_path = dir.join("clf.safetensors");
    let metadata = std::collections::BTreeMap::from([(
        netcl_serve::loader::INPUT_SHAPE_KEY.to_string(),
        "3".to_string(),
    )]);
    netcl::io::save_model_with_metadata(&Linear::zeros(3, 2).unwrap(), &clf_path, &metadata)
        .unwrap();
    super::start(netcl_serve::Config {
        models: vec![("lm".to_string(), lm_path), ("clf".to_string(), clf_path)],
        ..config
    })
    .await
}

/// Twelve generate requests: four prompts, three temperatures, with and
/// without top-k, seeds shared in pairs.
pub fn requests() -> Vec<Value> {
    (0..12u64)
        .map(|i| {
            let prompt = ["the ", "quick brown", "z", "dog.\n"][i as usize % 4];
            let temperature = [1.0, 0.7, 0.0][i as usize % 3];
            json!({
                "prompt": prompt,
                "max_tokens": 10 + i as usize,
                "temperature": temperature,
                "top_k": if i % 2 == 0 { Value::Null } else { json!(5) },
                "seed": i / 2,
            })
        })
        .collect()
}
