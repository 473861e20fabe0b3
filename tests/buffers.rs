//! Buffers under the per-thread rules: a stateful layer's running
//! statistics (`nn::BufferState`) read as one consistent state, frozen in
//! published versions, carried by forks and checkpoints, and never losing
//! an update when threads train one layer at once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use netcl::nn::{BufferState, Buffers, Linear, Module, Published, Sequential, train_mode};
use netcl::{Error, Result, Tensor};

mod common;
use common::{PATIENCE, StopOnDrop, wait_until};

/// A test-only stateful layer, shaped like BatchNorm: in training mode
/// (on this thread) it adds each batch's column sums and row count to its
/// buffers; it always returns `x - running_sum / num_samples`, reading both
/// buffers from one snapshot.
#[derive(Debug)]
struct RunningMean {
    state: BufferState,
}

impl RunningMean {
    /// Starts from one sample of value 1 in every column: mean 1.
    fn new(features: usize) -> RunningMean {
        let buffers = Buffers::new([
            ("running_sum", Tensor::ones(&[features])),
            ("num_samples", Tensor::scalar(1.0)),
        ])
        .unwrap();
        RunningMean {
            state: BufferState::new(buffers),
        }
    }

    fn mean_of(buffers: &Buffers) -> Tensor {
        let sum = buffers.get("running_sum").unwrap();
        let n = buffers.get("num_samples").unwrap();
        sum.try_div(&n).unwrap()
    }
}

impl Module for RunningMean {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let snapshot = self.state.load();
        let y = x.try_sub(&RunningMean::mean_of(&snapshot))?;
        if self.effective_training() {
            // The batch's statistics are computed once, outside the update.
            let batch_sum = x.try_sum_axis(0, false)?.detach();
            let rows = x.shape()[0] as f32;
            self.state.update(|old| {
                let sum = old.get("running_sum").unwrap().try_add(&batch_sum)?;
                let n = old.get("num_samples").unwrap() + rows;
                Ok(vec![sum, n])
            })?;
        }
        Ok(y)
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    fn named_buffer_states(&self) -> Vec<(String, &BufferState)> {
        vec![(String::new(), &self.state)]
    }

    fn try_fork(&self) -> Result<Box<dyn Module>> {
        Ok(Box::new(RunningMean {
            state: self.state.fork(),
        }))
    }
}

fn model() -> Sequential {
    let w = Tensor::from_vec(vec![1.0, 0.0, 0.0, 1.0], &[2, 2]).unwrap();
    Sequential::new()
        .with(Linear::from_parts(w, None).unwrap())
        .with(RunningMean::new(2))
}

fn buffer(model: &dyn Module, name: &str) -> Vec<f32> {
    model
        .named_buffers()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no buffer {name}"))
        .1
        .to_vec()
}

#[test]
fn containers_name_buffers_beside_parameters() {
    let model = model();
    let names: Vec<String> = model.named_buffers().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["1.running_sum", "1.num_samples"]);
    let params: Vec<String> = model
        .named_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(params, ["0.weight"], "buffers are not parameters");
    assert!(Linear::zeros(2, 2).unwrap().named_buffers().is_empty());
}

#[test]
fn a_training_forward_updates_the_buffers_and_an_eval_forward_does_not() {
    let model = model();
    let x = Tensor::from_vec(vec![3.0, 5.0, 5.0, 7.0], &[2, 2]).unwrap();
    // mean 1 before: y = x - 1; then sum = 1 + (3+5, 5+7) = (9, 13), n = 3.
    assert_eq!(model.forward(&x).unwrap().to_vec(), [2.0, 4.0, 4.0, 6.0]);
    assert_eq!(buffer(&model, "1.running_sum"), [9.0, 13.0]);
    assert_eq!(buffer(&model, "1.num_samples"), [3.0]);
    {
        let _eval = netcl::nn::eval_mode();
        let y = model.forward(&Tensor::zeros(&[1, 2])).unwrap();
        assert_eq!(y.to_vec(), [-3.0, -13.0 / 3.0]);
    }
    assert_eq!(buffer(&model, "1.num_samples"), [3.0], "eval left it");
}

#[test]
fn an_update_of_the_wrong_shape_is_an_error_naming_the_buffer_and_changes_nothing() {
    let layer = RunningMean::new(2);
    let err = layer
        .state
        .update(|_| Ok(vec![Tensor::zeros(&[3]), Tensor::scalar(0.0)]))
        .unwrap_err();
    assert!(matches!(err, Error::ParameterMismatch { ref name, .. } if name == "running_sum"));
    assert!(err.to_string().contains("[3]"), "{err}");
    let err = layer.state.update(|_| Ok(vec![])).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }));
    assert_eq!(buffer(&layer, "num_samples"), [1.0]);
}

#[test]
fn a_fork_carries_the_buffers_and_then_trains_on_its_own() {
    let model = model();
    model.forward(&Tensor::ones(&[2, 2])).unwrap();
    let fork = model.try_fork().unwrap();
    assert_eq!(buffer(&*fork, "1.num_samples"), [3.0]);
    fork.forward(&Tensor::ones(&[4, 2])).unwrap();
    assert_eq!(buffer(&*fork, "1.num_samples"), [7.0]);
    assert_eq!(buffer(&model, "1.num_samples"), [3.0]);
}

#[test]
fn checkpoints_save_and_load_buffers_by_name() {
    let model = model();
    model.forward(&Tensor::ones(&[2, 2])).unwrap();
    let bytes = netcl::io::to_bytes(&model).unwrap();
    let names: Vec<String> = {
        let path = std::env::temp_dir().join(format!("netcl-buffers-{}.st", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let tensors = netcl::io::read_tensors(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        tensors.into_iter().map(|(n, _)| n).collect()
    };
    assert_eq!(names, ["0.weight", "1.num_samples", "1.running_sum"]);

    let fresh = self::model();
    netcl::io::load_bytes(&fresh, &bytes).unwrap();
    assert_eq!(buffer(&fresh, "1.running_sum"), [3.0, 3.0]);
    assert_eq!(buffer(&fresh, "1.num_samples"), [3.0]);

    // A checkpoint without the buffers is missing them, by name.
    let params_only = netcl::io::to_bytes(&Linear::zeros(2, 2).unwrap()).unwrap();
    let err = netcl::io::load_bytes(&RunningMean::new(2), &params_only).unwrap_err();
    match err {
        Error::ParameterNames {
            missing,
            unexpected,
            ..
        } => {
            assert_eq!(missing, ["num_samples", "running_sum"]);
            assert_eq!(unexpected, ["bias", "weight"]);
        }
        other => panic!("{other}"),
    }
    // A buffer of the wrong shape names it, with both shapes.
    let wide = netcl::io::to_bytes(&RunningMean::new(3)).unwrap();
    let err = netcl::io::load_bytes(&RunningMean::new(2), &wide).unwrap_err();
    assert_eq!(
        err.to_string(),
        "io::load: parameter `running_sum` is stored as F32 [3], the model expects F32 [2]"
    );
}

#[test]
fn a_published_version_never_sees_its_statistics_change() {
    let model = model();
    let published = Published::new(&model).unwrap();
    let version = published.load();
    let x = Tensor::from_vec(vec![4.0, 4.0], &[1, 2]).unwrap();
    let before = version.predict(&x).unwrap().to_vec();
    assert_eq!(before, [3.0, 3.0]);

    // The live model trains; a reader even runs the version in training mode.
    for _ in 0..3 {
        model.forward(&Tensor::full(&[2, 2], 10.0)).unwrap();
    }
    {
        let _train = train_mode();
        version.forward(&Tensor::full(&[2, 2], 10.0)).unwrap();
    }
    assert_eq!(buffer(&**version, "1.num_samples"), [1.0]);
    assert_eq!(version.predict(&x).unwrap().to_vec(), before);
    assert_eq!(buffer(&model, "1.num_samples"), [7.0]);

    // Loading a checkpoint into a version is refused, and changes nothing.
    let bytes = netcl::io::to_bytes(&model).unwrap();
    let err = netcl::io::load_bytes(&**version, &bytes).unwrap_err();
    assert!(err.to_string().contains("frozen"), "{err}");
    assert_eq!(buffer(&**version, "1.num_samples"), [1.0]);

    // The next version carries the trained statistics.
    published.publish(&model).unwrap();
    assert_eq!(buffer(&**published.load(), "1.num_samples"), [7.0]);
}

/// Writers train one layer from several threads while readers loop over
/// snapshots and eval forwards: every snapshot is consistent (the sum of
/// every column equals the sample count, as every batch is all ones), every
/// eval forward gives exactly the mean 1, and no update is lost (the final
/// count is the initial 1 plus 2 rows per training forward). A deadline
/// fails the test instead of hanging it if writers stop making progress.
#[test]
fn concurrent_training_loses_no_update_and_readers_see_whole_states() {
    const WRITERS: usize = 3;
    const READERS: usize = 3;
    const STEPS: usize = 2_000;
    let layer = RunningMean::new(4);
    let done = AtomicBool::new(false);
    let reads = AtomicUsize::new(0);
    let retries = AtomicUsize::new(0);
    let deadline = Instant::now() + Duration::from_secs(120);
    std::thread::scope(|s| {
        for _ in 0..READERS {
            s.spawn(|| {
                let _eval = netcl::nn::eval_mode();
                let _no_grad = netcl::no_grad();
                let mut last = 0.0;
                while !done.load(Ordering::Acquire) {
                    let snapshot = layer.state.load();
                    let n = snapshot.get("num_samples").unwrap().item();
                    let sum = snapshot.get("running_sum").unwrap().to_vec();
                    assert!(sum.iter().all(|&v| v == n), "torn state: {sum:?} vs {n}");
                    assert!(n >= last, "the count went back: {n} < {last}");
                    last = n;
                    let y = layer.forward(&Tensor::full(&[1, 4], 1.0)).unwrap();
                    assert_eq!(y.to_vec(), vec![0.0; 4], "a forward mixed two states");
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                s.spawn(|| {
                    let _train = train_mode();
                    let _no_grad = netcl::no_grad();
                    let batch = Tensor::ones(&[2, 4]);
                    for _ in 0..STEPS {
                        assert!(Instant::now() < deadline, "writers made no progress");
                        layer.forward(&batch).unwrap();
                    }
                    // The same update through the state directly, counting
                    // the attempts compare-and-swap needed.
                    for _ in 0..STEPS {
                        let mut attempts = 0;
                        layer
                            .state
                            .update(|old| {
                                attempts += 1;
                                let sum = old.get("running_sum").unwrap() + 2.0;
                                let n = old.get("num_samples").unwrap() + 2.0;
                                Ok(vec![sum, n])
                            })
                            .unwrap();
                        retries.fetch_add(attempts - 1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, Ordering::Release);
    });
    let expected = 1.0 + (WRITERS * STEPS * 2 * 2) as f32;
    let reads = reads.into_inner();
    println!(
        "buffers: {WRITERS} writers x {} updates, {} reads by {READERS} readers, {} CAS retries, final count {}",
        2 * STEPS,
        reads,
        retries.into_inner(),
        buffer(&layer, "num_samples")[0]
    );
    assert_eq!(
        buffer(&layer, "num_samples"),
        [expected],
        "an update was lost"
    );
    assert_eq!(buffer(&layer, "running_sum"), vec![expected; 4]);
    assert!(reads > 0, "the readers ran");
}

/// A safetensors file by hand: an 8-byte header length, the JSON header,
/// then the data.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

#[test]
fn a_pytorch_int64_counter_loads_into_a_buffer() {
    // PyTorch saves BatchNorm's num_batches_tracked as a 0-d int64.
    let header = r#"{"num_samples":{"dtype":"I64","shape":[],"data_offsets":[0,8]},"running_sum":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;
    let mut data = 12i64.to_le_bytes().to_vec();
    for v in [3.0f32, 6.0] {
        data.extend_from_slice(&v.to_le_bytes());
    }
    let layer = RunningMean::new(2);
    netcl::io::load_torch_bytes(&layer, &safetensors(header, &data)).unwrap();
    assert_eq!(buffer(&layer, "num_samples"), [12.0]);
    assert_eq!(buffer(&layer, "running_sum"), [3.0, 6.0]);

    // A parameter stays F32-only.
    let header = r#"{"weight":{"dtype":"I64","shape":[1,1],"data_offsets":[0,8]}}"#;
    let linear = Linear::from_parts(Tensor::zeros(&[1, 1]), None).unwrap();
    let err = netcl::io::load_bytes(&linear, &safetensors(header, &data[..8])).unwrap_err();
    assert!(err.to_string().contains("I64"), "{err}");
}

/// The torn-read detector with a stateful layer: a trainer moves the
/// weight `w` and the running mean together to state `k` (w = k, mean = k)
/// and publishes version `k`, while readers serve published versions. For
/// x = 2 a version's output is `2w - mean`, so `k` for a whole version and
/// anything else for a mix (a weight of one state with the statistics of
/// another): every read must give exactly the version's number.
#[test]
fn published_versions_carry_parameters_and_buffers_together() {
    const VERSIONS: u64 = 300;
    let model = Sequential::new()
        .with(Linear::from_parts(Tensor::zeros(&[1, 1]), None).unwrap())
        .with(RunningMean::new(1));
    model.named_buffer_states()[0]
        .1
        .store(vec![Tensor::zeros(&[1]), Tensor::scalar(1.0)])
        .unwrap();
    let published = Published::new(&model).unwrap();
    let done = AtomicBool::new(false);
    let (reads, torn) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(120);
    std::thread::scope(|s| {
        // The readers stop even if the writer's loop panics.
        let _stop = StopOnDrop(&done);
        for _ in 0..3 {
            s.spawn(|| {
                let x = Tensor::full(&[1, 1], 2.0);
                while !done.load(Ordering::Acquire) {
                    let version = published.load();
                    let y = version.predict(&x).unwrap().item();
                    if y != version.number() as f32 {
                        torn.fetch_add(1, Ordering::Relaxed);
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        for k in 1..=VERSIONS {
            assert!(Instant::now() < deadline, "the trainer made no progress");
            // Every 30 versions, wait for a read completed since the last
            // wait: the readers overlap the writes however the threads are
            // scheduled (before, all 300 versions could be published before
            // a reader was first scheduled).
            if k % 30 == 1 {
                let seen = reads.load(Ordering::Relaxed);
                wait_until(PATIENCE, "a reader to read a version", || {
                    reads.load(Ordering::Relaxed) > seen
                });
            }
            let k = k as f32;
            model.parameters()[0].with_data_mut(|mut w| w.fill(k));
            model.named_buffer_states()[0]
                .1
                .store(vec![Tensor::full(&[1], k), Tensor::scalar(1.0)])
                .unwrap();
            published.publish(&model).unwrap();
        }
        done.store(true, Ordering::Release);
    });
    let (reads, torn) = (reads.into_inner(), torn.into_inner());
    println!("published buffers: {VERSIONS} versions, {reads} reads, {torn} torn");
    assert_eq!(
        torn, 0,
        "a version mixed a weight and statistics of two states"
    );
    assert!(reads > 0);
    assert_eq!(published.version(), VERSIONS);
}
