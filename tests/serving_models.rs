//! The torn-read detector of `tests/serving.rs`, extended to the models of
//! issue 21: a CNN with BatchNorm (parameters *and* running statistics) and
//! a transformer (embedding, attention, layer norms). A trainer thread
//! trains each model for real (Adam steps; BatchNorm in training mode
//! updating its running statistics) and publishes a version after every
//! step, while 8 reader threads run evaluation-mode forwards on the
//! versions they load.
//!
//! Every version is made checkable by a record the trainer writes before
//! publishing it, from the live model at that moment: a fingerprint of each
//! parameter and each buffer, and the output of a sequential forward on the
//! readers' input. A read is torn if the version a reader loaded holds one
//! tensor that is not the one of its version number, or if the reader's
//! forward differs in a single bit from the recorded one. The trainer checks
//! that each version differs from the one before in *every* parameter and
//! buffer, so a version mixing two (parameters of one step with running
//! statistics of the next, say) cannot pass; and a hand-made mix of two
//! versions is shown to be flagged.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use netcl::Tensor;
use netcl::autograd;
use netcl::nn::{
    BatchNorm2d, Conv2d, Embedding, Flatten, LayerNorm, Linear, MaxPool2d, Module, Published, ReLU,
    Sequential, TransformerBlock, eval_mode, train_mode,
};
use netcl::optim::{Adam, AdamConfig, Optimizer};
use rand::SeedableRng;
use rand::rngs::StdRng;

mod common;
use common::{PATIENCE, StopOnDrop, watch_progress};

const READERS: usize = 8;
/// Each reader must see at least this many versions.
const SEVERAL: u64 = 5;
/// The trainer publishes at least this many versions.
const MIN_VERSIONS: u64 = 100;

/// A model, the batch it trains on, and the input the readers serve.
struct Case {
    name: &'static str,
    model: Sequential,
    x_train: Tensor,
    y_train: Tensor,
    x_serve: Tensor,
}

/// Conv (no bias, as before a norm) + BatchNorm2d + ReLU + max-pool, twice,
/// then flatten and a linear head: 1x8x8 images, 3 classes.
fn cnn_case() -> Case {
    let mut rng = StdRng::seed_from_u64(1);
    let model = Sequential::new()
        .with(
            Conv2d::try_grouped(1, 4, 3, 1, false, &mut rng)
                .unwrap()
                .with_padding(1),
        )
        .with(BatchNorm2d::new(4))
        .with(ReLU::new())
        .with(MaxPool2d::new(2))
        .with(
            Conv2d::try_grouped(4, 8, 3, 1, false, &mut rng)
                .unwrap()
                .with_padding(1),
        )
        .with(BatchNorm2d::new(8))
        .with(ReLU::new())
        .with(MaxPool2d::new(2))
        .with(Flatten::new())
        .with(Linear::new(8 * 2 * 2, 3, &mut rng));
    let labels: Vec<f32> = (0..16).map(|i| (i % 3) as f32).collect();
    Case {
        name: "cnn (conv + batch norm)",
        model,
        x_train: Tensor::rand(&[16, 1, 8, 8], &mut rng),
        y_train: Tensor::from_vec(labels, &[16]).unwrap(),
        x_serve: Tensor::rand(&[4, 1, 8, 8], &mut rng),
    }
}

const VOCAB: usize = 12;

/// Token ids `[n, len]` covering the whole vocabulary.
fn ids(n: usize, len: usize, offset: usize) -> Tensor {
    let values = (0..n * len)
        .map(|i| ((i * 5 + offset) % VOCAB) as f32)
        .collect();
    Tensor::from_vec(values, &[n, len]).unwrap()
}

/// Embedding + a pre-norm transformer block (layer norms, multi-head
/// attention, GELU MLP) + a final layer norm + a linear head over the
/// vocabulary.
fn transformer_case() -> Case {
    let mut rng = StdRng::seed_from_u64(2);
    let model = Sequential::new()
        .with(Embedding::new(VOCAB, 16, &mut rng))
        .with(TransformerBlock::new(16, 4, 32, &mut rng))
        .with(LayerNorm::new(&[16]))
        .with(Linear::new(16, VOCAB, &mut rng));
    let x_train = ids(8, 6, 0);
    // Predict the next id of the cycle.
    let y_train: Vec<f32> = x_train
        .to_vec()
        .iter()
        .map(|&i| (i + 1.0) % VOCAB as f32)
        .collect();
    Case {
        name: "transformer (embedding + attention + layer norm)",
        model,
        y_train: Tensor::from_vec(y_train, &[48]).unwrap(),
        x_train,
        x_serve: ids(2, 5, 3),
    }
}

/// One real training step: a forward in training mode (BatchNorm normalises
/// with the batch and updates its running statistics), a backward and an
/// Adam step.
fn train_step(case: &Case, adam: &mut Adam) {
    let _train = train_mode();
    let logits = case.model.forward(&case.x_train).unwrap();
    let classes = *logits.shape().last().unwrap();
    let logits = logits.reshape(&[logits.numel() / classes, classes]);
    adam.zero_grad();
    logits.cross_entropy(&case.y_train).backward();
    adam.step();
}

fn fingerprint(t: &Tensor) -> u64 {
    let mut h = DefaultHasher::new();
    t.shape().hash(&mut h);
    for v in t.to_vec() {
        v.to_bits().hash(&mut h);
    }
    h.finish()
}

/// What a model holds and computes: a fingerprint of every parameter and
/// every buffer, by name, and the bits of its evaluation-mode output on
/// the serving input.
#[derive(Debug, PartialEq)]
struct Record {
    params: Vec<(String, u64)>,
    buffers: Vec<(String, u64)>,
    output: Vec<u32>,
}

/// How a read differs from its version's record.
#[derive(Debug, Default)]
struct Verdict {
    /// The parameters and buffers that are not the version's.
    mismatched: Vec<String>,
    /// Whether the output differs from the version's.
    output_differs: bool,
}

impl Verdict {
    fn torn(&self) -> bool {
        !self.mismatched.is_empty() || self.output_differs
    }
}

/// The record of `model` as it is now: an evaluation-mode forward under
/// `no_grad`, on this thread.
fn inspect(model: &dyn Module, x: &Tensor) -> Record {
    let _no_grad = autograd::no_grad();
    let _eval = eval_mode();
    let output = model.forward(x).unwrap();
    let tensors = |named: Vec<(String, Tensor)>| {
        named
            .into_iter()
            .map(|(n, t)| (n, fingerprint(&t)))
            .collect::<Vec<_>>()
    };
    Record {
        params: tensors(model.named_parameters()),
        buffers: tensors(model.named_buffers()),
        output: output.to_vec().iter().map(|v| v.to_bits()).collect(),
    }
}

impl Record {
    /// How `read` differs from this record.
    fn verdict(&self, read: &Record) -> Verdict {
        let mismatched = |want: &[(String, u64)], got: &[(String, u64)]| {
            assert_eq!(want.len(), got.len(), "the same model structure");
            want.iter()
                .zip(got)
                .filter(|(w, g)| w != g)
                .map(|(w, _)| w.0.clone())
                .collect::<Vec<_>>()
        };
        let mut names = mismatched(&self.params, &read.params);
        names.extend(mismatched(&self.buffers, &read.buffers));
        Verdict {
            mismatched: names,
            output_differs: self.output != read.output,
        }
    }

    /// The names of the tensors that are the same in `self` and `other`.
    fn unchanged(&self, other: &Record) -> Vec<String> {
        self.params
            .iter()
            .chain(&self.buffers)
            .zip(other.params.iter().chain(&other.buffers))
            .filter(|(a, b)| a == b)
            .map(|(a, _)| a.0.clone())
            .collect()
    }
}

/// Counts of one run of the detector.
struct Run {
    versions: u64,
    reads: u64,
    torn: u64,
    fewest_versions_seen: u64,
    unchanged: Vec<(u64, Vec<String>)>,
    live_reads: usize,
    live_torn: usize,
}

/// The trainer trains `case.model` and publishes a version after every
/// step, recording each version first; 8 readers load versions, run
/// evaluation-mode forwards under `no_grad` and check each read against its
/// version's record, until every reader has seen `SEVERAL` versions and
/// `MIN_VERSIONS` have been published (a watchdog fails the test if the
/// trainer or any reader stops making progress).
fn serve_while_training(case: &Case) -> Run {
    // records[v]: the record of version v, written before v is published.
    let records = RwLock::new(vec![Arc::new(inspect(&case.model, &case.x_serve))]);
    let published = Published::new(&case.model).unwrap();
    let stop = AtomicBool::new(false);
    let versions = AtomicU64::new(0);
    let reads: Vec<AtomicU64> = (0..READERS).map(|_| AtomicU64::new(0)).collect();
    let seen: Vec<AtomicU64> = (0..READERS).map(|_| AtomicU64::new(0)).collect();
    let torn = AtomicU64::new(0);
    let mut unchanged = Vec::new();
    // Reads of the live model: the versions published before and after
    // each, and what it read.
    let live = Mutex::new(Vec::<(u64, u64, Record)>::new());
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        for r in 0..READERS {
            let (published, records, stop) = (&published, &records, &stop);
            let (reads, seen, torn, live) = (&reads[r], &seen[r], &torn, &live);
            s.spawn(move || {
                let _stop = StopOnDrop(stop);
                let _no_grad = autograd::no_grad();
                let _eval = eval_mode();
                let mut last = None;
                while !stop.load(Ordering::Relaxed) {
                    let version = published.load();
                    let number = version.number();
                    if last != Some(number) {
                        assert!(last < Some(number), "versions only move forward");
                        last = Some(number);
                        seen.fetch_add(1, Ordering::Relaxed);
                    }
                    let read = inspect(&**version, &case.x_serve);
                    let record = Arc::clone(&records.read().unwrap()[number as usize]);
                    let verdict = record.verdict(&read);
                    if verdict.torn() {
                        eprintln!("{}: torn read of version {number}: {verdict:?}", case.name);
                        torn.fetch_add(1, Ordering::Relaxed);
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                    // Reader 0 also reads the live model, for comparison:
                    // the trainer changes it one tensor at a time, so these
                    // reads can be torn (checked after the run).
                    if r == 0 {
                        let before = published.version();
                        let read = inspect(&case.model, &case.x_serve);
                        live.lock()
                            .unwrap()
                            .push((before, published.version(), read));
                    }
                }
            });
        }
        // The trainer.
        {
            let (published, records, stop, versions) = (&published, &records, &stop, &versions);
            let unchanged = &mut unchanged;
            s.spawn(move || {
                let _stop = StopOnDrop(stop);
                let mut adam = Adam::new(case.model.parameters(), AdamConfig::new(1e-2));
                while !stop.load(Ordering::Relaxed) {
                    train_step(case, &mut adam);
                    let record = Arc::new(inspect(&case.model, &case.x_serve));
                    let mut records = records.write().unwrap();
                    let same = records.last().unwrap().unchanged(&record);
                    let number = records.len() as u64;
                    if !same.is_empty() {
                        unchanged.push((number, same));
                    }
                    records.push(record);
                    drop(records);
                    assert_eq!(published.publish(&case.model).unwrap(), number);
                    versions.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let names: Vec<String> = (0..READERS)
            .map(|r| format!("reader {r} (reads)"))
            .collect();
        let mut sides: Vec<(&str, &AtomicU64)> = vec![("the trainer (versions)", &versions)];
        sides.extend(names.iter().map(String::as_str).zip(&reads));
        watch_progress(&sides, PATIENCE, || {
            versions.load(Ordering::Relaxed) >= MIN_VERSIONS
                && seen.iter().all(|s| s.load(Ordering::Relaxed) >= SEVERAL)
        });
    });
    // A live read is whole if it matches one version from the one
    // published before it to the one after the one published after it
    // (the trainer steps before it records and publishes).
    let records = records.into_inner().unwrap();
    let live = live.into_inner().unwrap();
    let live_torn = live
        .iter()
        .filter(|(before, after, read)| {
            let candidates = &records[*before as usize..records.len().min(*after as usize + 2)];
            candidates.iter().all(|record| record.verdict(read).torn())
        })
        .count();
    Run {
        live_reads: live.len(),
        live_torn,
        versions: versions.into_inner(),
        reads: reads.iter().map(|r| r.load(Ordering::Relaxed)).sum(),
        torn: torn.into_inner(),
        fewest_versions_seen: seen
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .min()
            .unwrap(),
        unchanged,
    }
}

fn check_run(case: Case) {
    let run = serve_while_training(&case);
    println!(
        "{}: {} versions, {} reads, {} torn (every reader saw at least {} versions; \
         the live model, read beside them: {} of {} reads torn)",
        case.name,
        run.versions,
        run.reads,
        run.torn,
        run.fewest_versions_seen,
        run.live_torn,
        run.live_reads
    );
    assert_eq!(
        run.unchanged,
        Vec::new(),
        "versions that did not change every parameter and buffer (a mix would go unseen)"
    );
    assert_eq!(run.torn, 0);
    assert!(run.versions >= MIN_VERSIONS);
    assert!(run.fewest_versions_seen >= SEVERAL);
}

#[test]
fn a_cnn_with_batch_norm_is_served_untorn_while_it_trains() {
    let case = cnn_case();
    assert_eq!(case.model.named_buffers().len(), 6, "two BatchNorm2d");
    check_run(case);
}

#[test]
fn a_transformer_is_served_untorn_while_it_trains() {
    check_run(transformer_case());
}

/// Replaces the tensor `name` (a parameter or a buffer) of `model` with the
/// value `source` holds: half of one version, half of another.
fn take_tensor(model: &dyn Module, source: &dyn Module, name: &str) {
    if let Some((_, p)) = model
        .named_parameters()
        .into_iter()
        .find(|(n, _)| n == name)
    {
        let (_, from) = source
            .named_parameters()
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap();
        let values = from.to_vec();
        p.with_data_mut(|mut d| d.iter_mut().zip(values).for_each(|(d, v)| *d = v));
        return;
    }
    let from = source
        .named_buffers()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap()
        .1;
    for (prefix, state) in model.named_buffer_states() {
        let entries = state.load().to_vec();
        let full = |n: &str| {
            if prefix.is_empty() {
                n.to_string()
            } else {
                format!("{prefix}.{n}")
            }
        };
        if entries.iter().any(|(n, _)| full(n) == name) {
            let values = entries
                .into_iter()
                .map(|(n, t)| if full(&n) == name { from.clone() } else { t })
                .collect();
            state.store(values).unwrap();
            return;
        }
    }
    panic!("no tensor named {name}");
}

/// The detector detects: a model holding version A's tensors but one of
/// version B's (each parameter and each buffer in turn, BatchNorm's
/// running mean without its variance included), or A's parameters with
/// B's running statistics, is flagged by its fingerprints; its output
/// differs from A's too, except where the tensor does not enter an
/// evaluation forward (`num_batches_tracked`).
fn check_the_detector_flags_mixed_versions(case: Case) {
    let mut adam = Adam::new(case.model.parameters(), AdamConfig::new(1e-2));
    train_step(&case, &mut adam);
    let a = case.model.try_fork().unwrap();
    let record_a = inspect(&case.model, &case.x_serve);
    train_step(&case, &mut adam);
    let record_b = inspect(&case.model, &case.x_serve);
    // Whole versions pass as themselves and fail as each other.
    assert!(!record_a.verdict(&inspect(&*a, &case.x_serve)).torn());
    assert!(
        !record_b
            .verdict(&inspect(&case.model, &case.x_serve))
            .torn()
    );
    let crossed = record_b.verdict(&inspect(&*a, &case.x_serve));
    assert!(crossed.torn() && crossed.output_differs);

    let names: Vec<String> = record_a
        .params
        .iter()
        .chain(&record_a.buffers)
        .map(|(n, _)| n.clone())
        .collect();
    let mut silent_outputs = Vec::new();
    for name in &names {
        let mixed = a.try_fork().unwrap();
        take_tensor(&*mixed, &case.model, name);
        let verdict = record_a.verdict(&inspect(&*mixed, &case.x_serve));
        assert_eq!(
            verdict.mismatched,
            std::slice::from_ref(name),
            "{}: {name}",
            case.name
        );
        if !verdict.output_differs {
            silent_outputs.push(name.clone());
        }
    }
    assert!(
        silent_outputs
            .iter()
            .all(|n| n.ends_with("num_batches_tracked")),
        "{}: a mix in {silent_outputs:?} leaves the output as it was",
        case.name
    );

    // A's parameters, B's running statistics.
    let buffers: Vec<String> = record_a.buffers.iter().map(|(n, _)| n.clone()).collect();
    if !buffers.is_empty() {
        let mixed = a.try_fork().unwrap();
        for name in &buffers {
            take_tensor(&*mixed, &case.model, name);
        }
        let verdict = record_a.verdict(&inspect(&*mixed, &case.x_serve));
        assert_eq!(verdict.mismatched, buffers);
        assert!(verdict.output_differs);
    }
    println!(
        "{}: {} single-tensor mixes of two versions, all flagged ({} by fingerprint only: {silent_outputs:?})",
        case.name,
        names.len(),
        silent_outputs.len()
    );
}

#[test]
fn the_detector_flags_a_cnn_mixing_two_versions() {
    check_the_detector_flags_mixed_versions(cnn_case());
}

#[test]
fn the_detector_flags_a_transformer_mixing_two_versions() {
    check_the_detector_flags_mixed_versions(transformer_case());
}
