//! Datasets, the prefetching loader (seeded shuffle, coverage, shutdown,
//! grad mode of its thread) and CSV loading with its errors.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netcl::autograd::{self, GradMode, Tape};
use netcl::data::{
    self, Batch, DataLoader, Dataset, LabeledCsv, TensorDataset, load_labeled_csv,
    parse_labeled_csv,
};
use netcl::{Error, Result, Tensor};

mod common;

/// A dataset whose sample `i` has input `i` and target `i % 3`.
fn counting(n: usize) -> TensorDataset {
    let targets = (0..n).map(|i| (i % 3) as f32).collect();
    TensorDataset::new(
        Tensor::arange(0.0, n as f32, 1.0).reshape(&[n, 1]),
        Tensor::from_vec(targets, &[n]).unwrap(),
    )
    .unwrap()
}

/// The sample numbers of each batch of an epoch.
fn epoch_ids<D: Dataset>(loader: &DataLoader<D>, epoch: u64) -> Vec<Vec<usize>> {
    loader
        .epoch(epoch)
        .map(|batch| {
            let batch = batch.unwrap();
            batch.inputs.to_vec().iter().map(|&v| v as usize).collect()
        })
        .collect()
}

fn digits_path() -> String {
    format!("{}/data/digits.csv", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn tensor_dataset_gathers_rows_in_the_order_asked() -> Result<()> {
    let ds = counting(10);
    assert_eq!(ds.len(), 10);
    let batch = ds.get_batch(&[7, 2, 7])?;
    assert_eq!(batch.len(), 3);
    assert_eq!(batch.inputs.shape(), &[3, 1]);
    assert_eq!(batch.inputs.to_vec(), vec![7.0, 2.0, 7.0]);
    assert_eq!(batch.targets.to_vec(), vec![1.0, 2.0, 1.0]);
    let err = ds.get_batch(&[1, 10]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "TensorDataset::get_batch: index 10 is out of range for a dataset of 10 samples"
    );
    Ok(())
}

#[test]
fn split_is_seeded_disjoint_and_complete() -> Result<()> {
    let ds = counting(50);
    let (a1, b1) = ds.split(0.8, 7)?;
    let (a2, _) = ds.split(0.8, 7)?;
    let (a3, _) = ds.split(0.8, 8)?;
    assert_eq!((a1.len(), b1.len()), (40, 10));
    assert_eq!(a1.inputs().to_vec(), a2.inputs().to_vec());
    assert_ne!(a1.inputs().to_vec(), a3.inputs().to_vec());
    let mut all: Vec<usize> = [a1.inputs().to_vec(), b1.inputs().to_vec()]
        .concat()
        .iter()
        .map(|&v| v as usize)
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..50).collect::<Vec<_>>());
    assert!(ds.split(1.5, 0).is_err());
    Ok(())
}

#[test]
fn shuffle_is_seeded_and_covers_every_sample_once_per_epoch() {
    let n = 103;
    let loader = DataLoader::new(counting(n), 10).shuffle(42);
    let other_seed = DataLoader::new(counting(n), 10).shuffle(43);
    let mut epochs = Vec::new();
    for epoch in 0..4 {
        let batches = epoch_ids(&loader, epoch);
        assert_eq!(batches.len(), 11);
        assert!(batches[..10].iter().all(|b| b.len() == 10));
        assert_eq!(batches[10].len(), 3);
        let order: Vec<usize> = batches.concat();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "epoch {epoch}");
        // Same seed and epoch, same order; the order is the documented one.
        assert_eq!(epoch_ids(&loader, epoch).concat(), order);
        assert_eq!(loader.order(epoch), order);
        assert_ne!(epoch_ids(&other_seed, epoch).concat(), order);
        epochs.push(order);
    }
    let distinct: BTreeSet<&Vec<usize>> = epochs.iter().collect();
    assert_eq!(distinct.len(), 4, "each epoch has its own order");
    assert_ne!(epochs[0], (0..n).collect::<Vec<_>>(), "shuffled at all");
}

#[test]
fn without_shuffle_batches_come_in_order() {
    let loader = DataLoader::new(counting(7), 3);
    assert_eq!(
        epoch_ids(&loader, 0),
        vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]
    );
    assert_eq!(epoch_ids(&loader, 5), epoch_ids(&loader, 0));
}

#[test]
fn drop_last_drops_the_short_batch() {
    let loader = DataLoader::new(counting(7), 3).drop_last(true).shuffle(1);
    assert_eq!(loader.len(), 2);
    let batches = epoch_ids(&loader, 0);
    assert_eq!(batches.len(), 2);
    assert!(batches.iter().all(|b| b.len() == 3));
    assert!(DataLoader::new(counting(2), 3).drop_last(true).is_empty());
    assert_eq!(
        DataLoader::new(counting(2), 3)
            .drop_last(true)
            .epoch(0)
            .count(),
        0
    );
}

#[test]
fn iter_moves_to_the_next_epoch_each_time() {
    let loader = DataLoader::new(counting(20), 20).shuffle(3);
    let first: Vec<Vec<usize>> = (0..3)
        .map(|_| {
            let batch = loader.iter().next().unwrap().unwrap();
            batch.inputs.to_vec().iter().map(|&v| v as usize).collect()
        })
        .collect();
    for (epoch, order) in first.iter().enumerate() {
        assert_eq!(*order, loader.order(epoch as u64));
    }
    let mut count = 0;
    for batch in &loader {
        count += batch.unwrap().len();
    }
    assert_eq!(count, 20);
}

/// A slow dataset that counts its reads, to watch the loader's thread.
struct Slow {
    inner: TensorDataset,
    reads: AtomicUsize,
}

impl Dataset for Slow {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(2));
        self.inner.get_batch(indices)
    }
}

#[test]
fn dropping_the_iterator_mid_epoch_ends_its_thread() {
    let dataset = Arc::new(Slow {
        inner: counting(1000),
        reads: AtomicUsize::new(0),
    });
    let loader = DataLoader::new(Arc::clone(&dataset), 1).prefetch(1);
    let handles = || Arc::strong_count(loader.dataset());
    assert_eq!(handles(), 1);
    {
        let mut epoch = loader.epoch(0);
        for _ in 0..3 {
            epoch.next().unwrap().unwrap();
        }
        // The thread holds a second handle while it runs.
        assert_eq!(handles(), 2);
        // It reads ahead until it blocks on the full channel: batch 4 in
        // the channel (capacity 1), batch 5 read and waiting to be sent.
        common::wait_until(common::PATIENCE, "the loader to read ahead", || {
            dataset.reads.load(Ordering::SeqCst) >= 5
        });
    } // dropped mid-epoch, with the thread blocked on a full channel
    // The drop waited for the thread: its handle is gone already, so it
    // can read nothing more...
    assert_eq!(handles(), 1);
    // ...and it read nothing past the batch it was blocked on.
    assert_eq!(dataset.reads.load(Ordering::SeqCst), 5);
}

/// A dataset that records the grad mode and tape its reads run in.
#[derive(Default)]
struct ModeProbe {
    seen: Mutex<Vec<(bool, u64)>>,
}

impl Dataset for ModeProbe {
    fn len(&self) -> usize {
        4
    }
    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        let tape = autograd::current_tape().id();
        self.seen
            .lock()
            .unwrap()
            .push((autograd::is_grad_enabled(), tape));
        Ok(Batch {
            inputs: Tensor::zeros(&[indices.len(), 1]),
            targets: Tensor::zeros(&[indices.len()]),
        })
    }
}

#[test]
fn the_loader_thread_runs_in_the_callers_grad_mode() {
    let probe = Arc::new(ModeProbe::default());
    let loader = DataLoader::new(Arc::clone(&probe), 2);
    let tape = Tape::new();

    GradMode::new(false, tape.clone()).run(|| loader.epoch(0).for_each(drop));
    let seen: Vec<(bool, u64)> = probe.seen.lock().unwrap().drain(..).collect();
    assert_eq!(seen, vec![(false, tape.id()); 2]);

    // Created with grad on: the thread records, into the caller's tape.
    GradMode::new(true, tape.clone()).run(|| loader.epoch(0).for_each(drop));
    let seen: Vec<(bool, u64)> = probe.seen.lock().unwrap().drain(..).collect();
    assert_eq!(seen, vec![(true, tape.id()); 2]);

    // The mode is captured when the iterator is created, not when it is read.
    let epoch = {
        let _guard = autograd::no_grad();
        loader.epoch(1)
    };
    epoch.for_each(drop);
    let seen = probe.seen.lock().unwrap().clone();
    assert!(seen.iter().all(|&(enabled, _)| !enabled));
}

/// Fails on the batch holding sample `bad`; counts reads after that.
struct Failing {
    bad: usize,
    stopped: Arc<AtomicBool>,
    reads_after_error: Arc<AtomicUsize>,
}

impl Dataset for Failing {
    fn len(&self) -> usize {
        10
    }
    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        if self.stopped.load(Ordering::SeqCst) {
            self.reads_after_error.fetch_add(1, Ordering::SeqCst);
        }
        if indices.contains(&self.bad) {
            self.stopped.store(true, Ordering::SeqCst);
            return Err(Error::InvalidArgument {
                op: "Failing",
                message: format!("sample {} is corrupt", self.bad),
            });
        }
        counting(10).get_batch(indices)
    }
}

#[test]
fn a_dataset_error_is_the_last_item() {
    let reads_after_error = Arc::new(AtomicUsize::new(0));
    let loader = DataLoader::new(
        Failing {
            bad: 5,
            stopped: Arc::new(AtomicBool::new(false)),
            reads_after_error: Arc::clone(&reads_after_error),
        },
        2,
    )
    .prefetch(4);
    let items: Vec<Result<Batch>> = loader.epoch(0).collect();
    assert_eq!(items.len(), 3);
    assert!(items[0].is_ok() && items[1].is_ok());
    let err = items[2].as_ref().unwrap_err();
    assert_eq!(err.to_string(), "Failing: sample 5 is corrupt");
    // The thread stopped at the error, with 2 batches of the epoch unread.
    assert_eq!(reads_after_error.load(Ordering::SeqCst), 0);
}

struct Panicking;

impl Dataset for Panicking {
    fn len(&self) -> usize {
        4
    }
    fn get_batch(&self, _indices: &[usize]) -> Result<Batch> {
        panic!("dataset exploded");
    }
}

#[test]
#[should_panic(expected = "dataset exploded")]
fn a_dataset_panic_resumes_in_the_caller() {
    let loader = DataLoader::new(Panicking, 2);
    let _ = loader.epoch(0).next();
}

#[test]
fn batch_size_zero_is_an_error() {
    let err = DataLoader::try_new(counting(3), 0).unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidArgument {
            op: "DataLoader",
            ..
        }
    ));
}

#[test]
fn digits_csv_loads_with_its_labels() -> Result<()> {
    let digits = data::load_digits(digits_path())?;
    assert_eq!(digits.inputs().shape(), &[1797, 64]);
    assert_eq!(digits.targets().shape(), &[1797]);
    let pixels = digits.inputs().to_vec();
    assert!(
        pixels
            .iter()
            .all(|&p| (0.0..=16.0).contains(&p) && p.fract() == 0.0)
    );
    let mut counts = [0; 10];
    for label in digits.targets().to_vec() {
        counts[label as usize] += 1;
    }
    // Every digit appears, about 180 times each.
    assert!(
        counts.iter().all(|&c| (170..=190).contains(&c)),
        "{counts:?}"
    );
    // The first row of the file.
    assert_eq!(&pixels[..8], &[0.0, 0.0, 5.0, 13.0, 9.0, 1.0, 0.0, 0.0]);
    Ok(())
}

fn parse(text: &str) -> Result<TensorDataset> {
    parse_labeled_csv(text.as_bytes(), "test.csv", 3, 4)
}

#[test]
fn malformed_csv_rows_name_their_line_and_problem() {
    let header = "a,b,c,label\n";
    let cases = [
        (
            format!("{header}1,2,3,0\n1,2,0\n"),
            3,
            "expected 4 columns (3 features and a label), found 3 in the row",
        ),
        (
            format!("{header}1,2,3,0\n\n1,2,3,1,5\n"),
            4,
            "expected 4 columns (3 features and a label), found 5 in the row",
        ),
        (
            format!("{header}1,2,3,0\n1,two,3,1\n"),
            3,
            "column 2: `two` is not a number",
        ),
        (
            format!("{header}1,2,NaN,0\n"),
            2,
            "column 3: `NaN` is not a finite number",
        ),
        (
            format!("{header}1,2,3,4\n"),
            2,
            "label `4` is not a class index in 0..4",
        ),
        (
            format!("{header}1,2,3,-1\n"),
            2,
            "label `-1` is not a class index in 0..4",
        ),
        (
            format!("{header}1,2,3,1.5\n"),
            2,
            "label `1.5` is not a class index in 0..4",
        ),
        (
            "a,b,label\n1,2,0\n".to_string(),
            1,
            "expected 4 columns (3 features and a label), found 3 in the header",
        ),
        (String::new(), 1, "missing header line"),
        (header.to_string(), 2, "no samples after the header"),
    ];
    for (text, line, message) in cases {
        let err = parse(&text).unwrap_err();
        assert_eq!(
            err,
            Error::Parse {
                source_name: "test.csv".to_string(),
                line,
                message: message.to_string(),
            },
            "for {text:?}"
        );
        assert_eq!(err.to_string(), format!("test.csv:{line}: {message}"));
    }
}

#[test]
fn csv_accepts_spaces_crlf_and_blank_lines() -> Result<()> {
    let ds = parse("a,b,c,label\r\n 1, 2 ,3,0\r\n\r\n4,5,6, 3\r\n")?;
    assert_eq!(ds.inputs().to_vec(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(ds.targets().to_vec(), vec![0.0, 3.0]);
    Ok(())
}

#[test]
fn csv_file_errors_name_the_file() {
    let dir = std::env::temp_dir().join(format!("netcl-data-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let missing = dir.join("missing.csv");
    let err = load_labeled_csv(&missing, 3, 4).unwrap_err();
    assert!(
        matches!(&err, Error::Io { kind: std::io::ErrorKind::NotFound, path, .. } if path.ends_with("missing.csv")),
        "{err}"
    );

    let bad_utf8 = dir.join("latin1.csv");
    std::fs::write(&bad_utf8, b"a,b,c,label\n1,2,3,0\n\xe9,2,3,0\n").unwrap();
    let err = load_labeled_csv(&bad_utf8, 3, 4).unwrap_err();
    assert!(matches!(err, Error::Parse { line: 3, .. }), "{err}");
    assert!(
        err.to_string().contains("latin1.csv:3: invalid UTF-8"),
        "{err}"
    );

    let truncated = dir.join("digits-truncated.csv");
    let text = std::fs::read_to_string(digits_path()).unwrap();
    let cut = text.lines().take(11).collect::<Vec<_>>().join("\n") + "\n0,0,3";
    std::fs::write(&truncated, cut).unwrap();
    let err = data::load_digits(&truncated).unwrap_err();
    assert!(matches!(err, Error::Parse { line: 12, .. }), "{err}");

    std::fs::remove_dir_all(&dir).unwrap();
}

/// The `Error::Parse` of `text` read as 3 features and labels in `0..4`,
/// as `(line, message)`.
fn parse_error(text: &str) -> (usize, String) {
    match parse(text) {
        Err(Error::Parse {
            source_name,
            line,
            message,
        }) => {
            assert_eq!(source_name, "test.csv");
            (line, message)
        }
        other => panic!("expected a parse error for {text:?}, got {other:?}"),
    }
}

#[test]
fn csv_reads_quoted_cells_and_cells_with_spaces() -> Result<()> {
    // Quoted header names may hold commas; quoted values are numbers.
    let text = "\"a,1\",\"b\",c,label\n\"1\", 2 ,\" 3 \",\"0\"\n  4.5\t, \"-5\"  ,6e1, \" 3\" \n";
    let ds = parse(text)?;
    assert_eq!(ds.inputs().to_vec(), vec![1.0, 2.0, 3.0, 4.5, -5.0, 60.0]);
    assert_eq!(ds.targets().to_vec(), vec![0.0, 3.0]);
    // A quoted comma is inside a cell, not between two.
    let (line, message) = parse_error("a,b,c,label\n\"1,2\",3,0\n");
    assert_eq!(line, 2);
    assert_eq!(
        message,
        "expected 4 columns (3 features and a label), found 3 in the row"
    );
    Ok(())
}

#[test]
fn non_finite_cells_are_not_finite_numbers() -> Result<()> {
    for cell in ["NaN", "nan", "inf", "-inf", "infinity", "1e39", "-1e39"] {
        let (line, message) = parse_error(&format!("a,b,c,label\n1,2,3,0\n1,{cell},3,0\n"));
        assert_eq!(line, 3, "{cell}");
        assert_eq!(
            message,
            format!("column 2: `{cell}` is not a finite number")
        );
    }
    // The largest finite values still load.
    let ds = parse("a,b,c,label\n3.4e38,-3.4e38,1e-45,1\n")?;
    assert!(ds.inputs().to_vec().iter().all(|v| v.is_finite()));
    Ok(())
}

#[test]
fn a_trailing_comma_or_an_empty_cell_is_an_error() {
    let header = "a,b,c,label\n";
    assert_eq!(
        parse_error(&format!("{header}1,2,3,0,\n")),
        (
            2,
            "expected 4 columns (3 features and a label), found 5 in the row".to_string()
        )
    );
    assert_eq!(
        parse_error(&format!("{header}1,,3,0\n")),
        (2, "column 2: empty cell, expected a number".to_string())
    );
    assert_eq!(
        parse_error(&format!("{header}1,2,3, \n")),
        (2, "label `` is not a class index in 0..4".to_string())
    );
    assert_eq!(
        parse_error("a,b,c,label,\n1,2,3,0\n"),
        (
            1,
            "expected 4 columns (3 features and a label), found 5 in the header".to_string()
        )
    );
}

#[test]
fn csv_line_numbers_count_blank_lines_crlf_and_quoted_line_breaks() {
    // Blank lines (also before the header and with CRLF) count as lines.
    assert_eq!(
        parse_error("\r\n\na,b,c,label\r\n\r\n1,2,3,0\r\n\r\n\r\n1,x,3,0\r\n").0,
        8
    );
    // Old Mac line ends (a lone `\r`) end lines too.
    assert_eq!(parse_error("a,b,c,label\r1,2,3,0\r\r1,2,3,0\r1,2\r").0, 5);
    // A line of spaces is blank too.
    assert_eq!(parse_error("a,b,c,label\n   \n\t\n1,2,3,9\n").0, 4);
    // A record with a quoted line break is reported at its first line, and
    // the lines after it are counted.
    let text = "a,b,c,label\n1,2,3,0\n\"1\n2\",2,3,0\n";
    assert_eq!(
        parse_error(text),
        (3, "column 1: `1\\n2` is not a number".to_string())
    );
    let text = "a,b,c,label\n\"1\",2,\"3\n\n\",0\n1,2,3,4\n";
    assert_eq!(
        parse_error(text),
        (5, "label `4` is not a class index in 0..4".to_string())
    );
    // The last line needs no line end.
    assert_eq!(parse_error("a,b,c,label\n1,2,3,0\n1,2,3,x").0, 3);
}

#[test]
fn csv_messages_shorten_giant_cells() {
    let giant = "9".repeat(100_000);
    let (line, message) = parse_error(&format!("a,b,c,label\n1,{giant},3,0\n"));
    assert_eq!(line, 2);
    assert_eq!(
        message,
        format!("column 2: `{}…` is not a finite number", "9".repeat(40))
    );
    let (_, message) = parse_error(&format!("a,b,c,label\n1,2,3,{giant}x\n"));
    assert!(message.len() < 100, "{message}");
}

#[test]
fn a_negative_zero_label_is_class_zero() -> Result<()> {
    let ds = parse("a,b,c,label\n1,2,3,-0\n")?;
    assert_eq!(ds.targets().to_vec()[0].to_bits(), 0.0f32.to_bits());
    Ok(())
}

#[test]
fn headerless_csv_starts_with_a_sample() -> Result<()> {
    let csv = LabeledCsv::new(3, 4).header(false);
    let ds = csv.parse("1,2,3,0\n\n4,5,6,3\n".as_bytes(), "test.csv")?;
    assert_eq!(ds.inputs().to_vec(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(ds.targets().to_vec(), vec![0.0, 3.0]);

    let err = csv
        .parse("a,b,c,label\n1,2,3,0\n".as_bytes(), "test.csv")
        .unwrap_err();
    assert_eq!(err.to_string(), "test.csv:1: column 1: `a` is not a number");
    let err = csv.parse("\n\n".as_bytes(), "test.csv").unwrap_err();
    assert_eq!(err.to_string(), "test.csv:1: no samples");
    let err = csv.parse("1,2,3\n".as_bytes(), "test.csv").unwrap_err();
    assert_eq!(
        err.to_string(),
        "test.csv:1: expected 4 columns (3 features and a label), found 3 in the row"
    );
    // With a header (the default), the same as parse_labeled_csv.
    let text = "a,b,c,label\n1,2,3,0\n";
    let with_header = LabeledCsv::new(3, 4).parse(text.as_bytes(), "test.csv")?;
    assert_eq!(
        with_header.inputs().to_vec(),
        parse(text)?.inputs().to_vec()
    );
    Ok(())
}

#[test]
fn headerless_digits_load_from_a_file() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("netcl-headerless-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(digits_path()).unwrap();
    let body: String = text
        .lines()
        .skip(1)
        .take(20)
        .map(|l| format!("{l}\n"))
        .collect();
    let path = dir.join("digits-no-header.csv");
    std::fs::write(&path, body).unwrap();

    let headerless = LabeledCsv::new(64, 10).header(false).load(&path)?;
    let digits = data::load_digits(digits_path())?;
    assert_eq!(headerless.len(), 20);
    assert_eq!(
        headerless.inputs().to_vec(),
        digits.inputs().to_vec()[..20 * 64]
    );
    assert_eq!(
        headerless.targets().to_vec(),
        digits.targets().to_vec()[..20]
    );
    // Read with a header, its first sample is taken for the header.
    assert_eq!(data::load_digits(&path)?.len(), 19);

    let err = LabeledCsv::new(64, 10)
        .load(dir.join("missing.csv"))
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Io {
                op: "LabeledCsv::load",
                kind: std::io::ErrorKind::NotFound,
                ..
            }
        ),
        "{err:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    Ok(())
}
