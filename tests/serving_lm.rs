//! Serving the character-level language model while it trains: 8 threads
//! generate text from the published versions of a `CharTransformer`, in
//! evaluation mode under `no_grad`, each request with its own sampling
//! seed, beside a thread that keeps training the model and publishing new
//! versions through `nn::Published`. Every request's text is then generated
//! again, sequentially, from the same version and seed: it must be the same.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use netcl::models::{CharLmConfig, CharTransformer, Generator, Vocab, lm_batch};
use netcl::nn::{Module, Published, Version};
use netcl::optim::{AdamConfig, AdamW, Optimizer};
use netcl::{Tensor, autograd};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

mod common;
use common::{PATIENCE, StopOnDrop, wait_until, watch_progress};

const READERS: usize = 8;
const REQUESTS: usize = 6;
const TOKENS: usize = 40;

/// One served request: its seed, the version it ran on, and the text.
struct Served {
    seed: u64,
    version: Arc<Version>,
    text: Vec<usize>,
}

#[test]
fn generation_from_8_threads_beside_training_is_deterministic_per_seed_and_version() {
    let text = "And God said, Let there be light: and there was light. ".repeat(30);
    let vocab = Vocab::from_text(&text);
    let ids = vocab.encode(&text).unwrap();
    let config = CharLmConfig::new(vocab.len())
        .with_width(32)
        .with_blocks(2)
        .with_context(16)
        .with_dropout(0.1);
    let model = CharTransformer::new(config, &mut StdRng::seed_from_u64(0));
    let published = Published::new(&model).unwrap();
    let prompt = vocab.encode("And ").unwrap();

    let done = AtomicBool::new(false);
    let steps = AtomicU64::new(0);
    let requests = AtomicU64::new(0);
    let finished = AtomicU64::new(0);
    let served = Mutex::new(Vec::new());

    std::thread::scope(|s| {
        let _stop = StopOnDrop(&done);
        // The trainer: AdamW steps in training mode (dropout on), each
        // published as a new version.
        s.spawn(|| {
            let mut adamw = AdamW::new(model.parameters(), AdamConfig::new(3e-3));
            let mut rng = StdRng::seed_from_u64(1);
            let _train = autograd::train_mode();
            while !done.load(Ordering::SeqCst) {
                let offsets: Vec<usize> = (0..8)
                    .map(|_| rng.random_range(0..ids.len() - 17))
                    .collect();
                let (x, y) = lm_batch(&ids, &offsets, 16).unwrap();
                model.loss(&x, &y).unwrap().backward();
                adamw.step();
                adamw.zero_grad();
                published.publish(&model).unwrap();
                steps.fetch_add(1, Ordering::SeqCst);
            }
        });
        for reader in 0..READERS {
            let (published, prompt, served) = (&published, &prompt, &served);
            let (requests, finished) = (&requests, &finished);
            s.spawn(move || {
                let _no_grad = autograd::no_grad();
                let _eval = autograd::eval_mode();
                let mut last = None;
                for i in 0..REQUESTS {
                    // Every other request waits for a newer version, so
                    // the readers serve many versions, not one.
                    if i % 2 == 1
                        && let Some(last) = last
                    {
                        wait_until(PATIENCE, "a newer published version", || {
                            published.version() > last
                        });
                    }
                    let version = published.load();
                    last = Some(version.number());
                    // Readers 0-3 and 4-7 use the same seeds.
                    let seed = (reader % 4 * 100 + i) as u64;
                    let generator = Generator::from_module(version.model(), &config).unwrap();
                    let text = generator.generate(prompt, TOKENS, 1.0, Some(10), seed);
                    // The cached generation's first choice at temperature 0
                    // is the argmax of the version's own forward.
                    let ids: Vec<f32> = prompt.iter().map(|&i| i as f32).collect();
                    let logits = version
                        .predict(&Tensor::from_vec(ids, &[1, prompt.len()]).unwrap())
                        .unwrap()
                        .to_vec();
                    let last_row = &logits[logits.len() - config.vocab_size..];
                    let best = (0..config.vocab_size)
                        .fold(0, |b, j| if last_row[j] > last_row[b] { j } else { b });
                    assert_eq!(generator.generate(prompt, 1, 0.0, None, seed), [best]);
                    assert!(!netcl::is_grad_enabled());
                    served.lock().unwrap().push(Served {
                        seed,
                        version,
                        text,
                    });
                    requests.fetch_add(1, Ordering::SeqCst);
                }
                finished.fetch_add(1, Ordering::SeqCst);
            });
        }
        watch_progress(
            &[("trainer", &steps), ("readers", &requests)],
            PATIENCE,
            || finished.load(Ordering::SeqCst) == READERS as u64,
        );
        done.store(true, Ordering::SeqCst);
    });

    let served = served.into_inner().unwrap();
    assert_eq!(served.len(), READERS * REQUESTS);
    let mut versions: Vec<u64> = served.iter().map(|r| r.version.number()).collect();
    versions.sort_unstable();
    versions.dedup();
    assert!(
        versions.len() >= REQUESTS / 2,
        "versions served: {versions:?}"
    );
    // Sequentially, on this thread: the same seed on the same version gives
    // the same text.
    for r in &served {
        let generator = Generator::from_module(r.version.model(), &config).unwrap();
        let again = generator.generate(&prompt, TOKENS, 1.0, Some(10), r.seed);
        assert_eq!(
            again,
            r.text,
            "seed {} on version {}",
            r.seed,
            r.version.number()
        );
        assert!(r.text.iter().all(|&c| c < vocab.len()));
    }
    // Two readers that drew the same seed on the same version agree.
    for a in &served {
        for b in &served {
            if a.seed == b.seed && a.version.number() == b.version.number() {
                assert_eq!(a.text, b.text);
            }
        }
    }
    assert!(published.version() >= *versions.last().unwrap());
}
