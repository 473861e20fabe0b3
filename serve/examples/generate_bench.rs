//! Generation speed through HTTP beside the library's own: tokens per
//! second for one request and for 8 concurrent requests, each as one JSON
//! answer and as a server-sent event stream (`"stream": true`, one event
//! per character, read as they come), with the model of `train_charlm`
//! (default sizes, random weights: the speed does not depend on the
//! values). Rounds alternate the three sides so that the machine's load
//! hits them alike.
//!
//! Run with `cargo run --release -p netcl-serve --example generate_bench`;
//! `-- shared` serves from the caller's runtime ([`HttpLayout::Shared`])
//! instead of connection threads.
//!
//! [`HttpLayout::Shared`]: netcl_serve::HttpLayout::Shared

use std::sync::Arc;
use std::time::Instant;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use netcl::models::{CharLmConfig, CharTransformer, Vocab};
use netcl::rand::SeedableRng;

const TOKENS: usize = 256;
const ROUNDS: usize = 9;

async fn http_generate(addr: std::net::SocketAddr, seed: u64, stream: bool) -> usize {
    let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(socket))
            .await
            .unwrap();
    tokio::spawn(connection);
    let body = serde_json::json!({
        "prompt": "In the beginning", "max_tokens": TOKENS, "temperature": 0.8, "seed": seed,
        "stream": stream,
    });
    let request = hyper::Request::post("/v1/models/lm/generate")
        .header("host", addr.to_string())
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    if stream {
        // Events as they come: count the token events, check the last.
        let mut body = response.into_body();
        let (mut pending, mut tokens, mut done) = (Vec::new(), 0, None);
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                pending.extend_from_slice(&data);
            }
            while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = pending.drain(..end + 2).collect();
                if event.starts_with(b"event: token\n") {
                    tokens += 1;
                } else if let Some(data) = event.strip_prefix(b"event: done\ndata: ") {
                    done = Some(serde_json::from_slice::<serde_json::Value>(data).unwrap());
                }
            }
        }
        let done = done.expect("a done event");
        assert_eq!(done["tokens"].as_u64().unwrap() as usize, tokens);
        return tokens;
    }
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
        http_layout: std::env::args()
            .nth(1)
            .map(|layout| layout.parse().expect("per-thread or shared"))
            .unwrap_or_default(),
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
            // library, http json, http sse; the order turns each round.
            let mut speeds = [0.0; 3];
            for turn in 0..3 {
                let side = (turn + round) % 3;
                let start = Instant::now();
                let tokens = if side == 0 {
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
                    threads.into_iter().map(|t| t.join().unwrap()).sum()
                } else {
                    let tasks: Vec<_> = (0..streams)
                        .map(|s| tokio::spawn(http_generate(addr, s as u64, side == 2)))
                        .collect();
                    let mut tokens = 0;
                    for task in tasks {
                        tokens += task.await.unwrap();
                    }
                    tokens
                };
                speeds[side] = tokens as f64 / start.elapsed().as_secs_f64();
            }
            let [library, json, sse] = speeds;
            println!(
                "round {round} streams {streams}: library {library:.0} tok/s, http json {json:.0} \
                 tok/s (ratio {:.3}), http sse {sse:.0} tok/s (ratio {:.3})",
                json / library,
                sse / library
            );
            rows.push((streams, library, json, sse));
        }
    }
    type Row = (usize, f64, f64, f64);
    for streams in [1usize, 8] {
        let of = |side: fn(&Row) -> f64| {
            let mut v: Vec<f64> = rows.iter().filter(|r| r.0 == streams).map(side).collect();
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2], v[0], v[v.len() - 1])
        };
        let (library, _, _) = of(|r| r.1);
        let (json, _, _) = of(|r| r.2);
        let (sse, _, _) = of(|r| r.3);
        let (json_ratio, json_min, json_max) = of(|r| r.2 / r.1);
        let (sse_ratio, sse_min, sse_max) = of(|r| r.3 / r.1);
        println!(
            "streams {streams}: library median {library:.0} tok/s; http json median {json:.0} tok/s, \
             ratio median {json_ratio:.3} ({json_min:.3} to {json_max:.3}); http sse median \
             {sse:.0} tok/s, ratio median {sse_ratio:.3} ({sse_min:.3} to {sse_max:.3})"
        );
    }
    server.shutdown();
    server.wait().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
