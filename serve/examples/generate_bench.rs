//! Generation speed through HTTP beside the library's own: tokens per
//! second for one stream and for 8 concurrent streams, with the model of
//! `train_charlm` (default sizes, random weights: the speed does not depend
//! on the values). Rounds alternate the two sides so that the machine's
//! load hits both alike.
//!
//! Run with `cargo run --release -p netcl-serve --example generate_bench`.

use std::sync::Arc;
use std::time::Instant;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use netcl::models::{CharLmConfig, CharTransformer, Vocab};
use netcl::rand::SeedableRng;

const TOKENS: usize = 256;
const ROUNDS: usize = 5;

async fn http_generate(addr: std::net::SocketAddr, seed: u64) -> usize {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let body = serde_json::json!({
        "prompt": "In the beginning", "max_tokens": TOKENS, "temperature": 0.8, "seed": seed,
    });
    let request = hyper::Request::post("/v1/models/lm/generate")
        .header("host", addr.to_string())
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    json["tokens"].as_u64().unwrap() as usize
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/kjv.txt"))
        .expect("data/kjv.txt");
    let vocab = Vocab::from_text(&text);
    let config = CharLmConfig::new(vocab.len());
    let model =
        CharTransformer::try_new(config, &mut netcl::rand::rngs::StdRng::seed_from_u64(0)).unwrap();
    let dir = std::env::temp_dir().join(format!("netcl-generate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("charlm.safetensors");
    model.save(&vocab, &path).unwrap();
    let server = netcl_serve::start(netcl_serve::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        models: vec![("lm".to_string(), path)],
        threads: 8,
        request_timeout: std::time::Duration::from_secs(120),
        ..netcl_serve::Config::default()
    })
    .await
    .unwrap();
    let addr = server.local_addr();
    let generator = Arc::new(model.generator().unwrap());
    let prompt = vocab.encode("In the beginning").unwrap();
    let mut rows = Vec::new();
    for round in 0..ROUNDS {
        for streams in [1usize, 8] {
            let start = Instant::now();
            let threads: Vec<_> = (0..streams)
                .map(|s| {
                    let (generator, prompt) = (Arc::clone(&generator), prompt.clone());
                    std::thread::spawn(move || {
                        generator
                            .generate(&prompt, TOKENS, 0.8, None, s as u64)
                            .len()
                    })
                })
                .collect();
            let tokens: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
            let library = tokens as f64 / start.elapsed().as_secs_f64();
            let start = Instant::now();
            let tasks: Vec<_> = (0..streams)
                .map(|s| tokio::spawn(http_generate(addr, s as u64)))
                .collect();
            let mut tokens = 0;
            for task in tasks {
                tokens += task.await.unwrap();
            }
            let http = tokens as f64 / start.elapsed().as_secs_f64();
            println!(
                "round {round} streams {streams}: library {library:.0} tok/s, http {http:.0} tok/s, ratio {:.3}",
                http / library
            );
            rows.push((streams, library, http));
        }
    }
    for streams in [1usize, 8] {
        let mut ratios: Vec<f64> = rows
            .iter()
            .filter(|r| r.0 == streams)
            .map(|r| r.2 / r.1)
            .collect();
        ratios.sort_by(f64::total_cmp);
        let median = |side: fn(&(usize, f64, f64)) -> f64| {
            let mut v: Vec<f64> = rows.iter().filter(|r| r.0 == streams).map(side).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "streams {streams}: library median {:.0} tok/s, http median {:.0} tok/s, http/library ratio median {:.3} (min {:.3}, max {:.3})",
            median(|r| r.1),
            median(|r| r.2),
            ratios[ratios.len() / 2],
            ratios[0],
            ratios[ratios.len() - 1]
        );
    }
    server.shutdown();
    server.wait().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
