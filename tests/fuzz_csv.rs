//! Fuzzing the CSV loader: mutated excerpts of `data/digits.csv` (bit flips,
//! truncations, cell edits, giant values, odd quoting, very long lines,
//! invalid UTF-8, line-structure edits) must give either a valid dataset or
//! an `Error::Parse` naming the source and a line of the text; never a
//! panic, never another error.
//!
//! Some cases make one edit whose outcome is known (a `NaN` cell at a given
//! line, a trailing comma, a truncation at a line end, quoting every cell)
//! and check exactly that outcome.
//!
//! The default run is short. The long run, and replaying one case:
//!
//! ```text
//! NETCL_FUZZ_CASES=100000 cargo test --release --test fuzz_csv -- --nocapture
//! NETCL_FUZZ_SEED=<seed> NETCL_FUZZ_ONLY=<case> cargo test --test fuzz_csv
//! ```

use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};

use netcl::data::{Dataset, LabeledCsv, TensorDataset, parse_labeled_csv};
use netcl::rand::rngs::StdRng;
use netcl::rand::{RngExt, SeedableRng};
use netcl::{Error, Result};

/// Cases in the default run: a few seconds in a debug build.
const DEFAULT_CASES: u64 = 1_000;
const DEFAULT_SEED: u64 = 0x6e65_7463_6c5f_6373;
const SOURCE: &str = "fuzz.csv";
/// The most bytes one mutation adds (giant cells, repeated lines).
const MAX_GROWTH: usize = 200_000;

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

/// The digits file as its header and rows of numbers.
struct Digits {
    header: String,
    rows: Vec<Vec<f32>>,
}

impl Digits {
    fn load() -> Digits {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv");
        let text = std::fs::read_to_string(path).expect("data/digits.csv");
        let mut lines = text.lines();
        let header = lines.next().expect("a header").to_string();
        let rows = lines
            .map(|line| line.split(',').map(|v| v.parse().unwrap()).collect())
            .collect();
        Digits { header, rows }
    }
}

/// A valid excerpt: the header (unless headerless), then consecutive rows.
struct Excerpt {
    header: bool,
    crlf: bool,
    rows: Vec<Vec<f32>>,
    header_line: String,
}

impl Excerpt {
    fn new(digits: &Digits, rng: &mut StdRng) -> Excerpt {
        let count = rng.random_range(1..=12);
        let start = rng.random_range(0..=digits.rows.len() - count);
        Excerpt {
            header: rng.random_bool(0.8),
            crlf: rng.random_bool(0.2),
            rows: digits.rows[start..start + count].to_vec(),
            header_line: digits.header.clone(),
        }
    }

    fn end(&self) -> &'static str {
        if self.crlf { "\r\n" } else { "\n" }
    }

    /// The text, each row's cells written by `cell(value)`.
    fn text_with(&self, cell: impl Fn(f32) -> String) -> String {
        let mut text = String::new();
        if self.header {
            text.push_str(&self.header_line);
            text.push_str(self.end());
        }
        for row in &self.rows {
            let cells: Vec<String> = row.iter().map(|&v| cell(v)).collect();
            text.push_str(&cells.join(","));
            text.push_str(self.end());
        }
        text
    }

    fn text(&self) -> String {
        self.text_with(|v| v.to_string())
    }

    /// The line of row `i` (from 0).
    fn line_of_row(&self, i: usize) -> usize {
        i + 1 + usize::from(self.header)
    }

    fn csv(&self, features: usize, classes: usize) -> LabeledCsv {
        LabeledCsv::new(features, classes).header(self.header)
    }
}

/// Checks `ds` holds exactly `rows` (64 features and a label each).
fn assert_rows(ds: &TensorDataset, rows: &[Vec<f32>]) {
    assert_eq!(ds.len(), rows.len());
    let inputs: Vec<f32> = rows.iter().flat_map(|r| r[..64].to_vec()).collect();
    let targets: Vec<f32> = rows.iter().map(|r| r[64]).collect();
    assert_eq!(ds.inputs().to_vec(), inputs);
    assert_eq!(ds.targets().to_vec(), targets);
}

/// The parse error of `result`, as `(line, message)`.
fn parse_error(result: Result<TensorDataset>) -> (usize, String) {
    match result {
        Err(Error::Parse {
            source_name,
            line,
            message,
        }) => {
            assert_eq!(source_name, SOURCE);
            (line, message)
        }
        Err(other) => panic!("expected a parse error, got {other:?}"),
        Ok(ds) => panic!("expected a parse error, got {} samples", ds.len()),
    }
}

/// One edit whose outcome is known, checked exactly.
fn known_outcome(excerpt: &Excerpt, rng: &mut StdRng, log: &mut Vec<String>) {
    let csv = excerpt.csv(64, 10);
    let row = rng.random_range(0..excerpt.rows.len());
    let line = excerpt.line_of_row(row);
    match rng.random_range(0..6) {
        0 => {
            // A non-finite feature.
            let token =
                ["NaN", "nan", "inf", "-inf", "infinity", "1e39", "-4e38"][rng.random_range(0..7)];
            let column = rng.random_range(0..64);
            log.push(format!("row {row} column {column} = {token}"));
            let mut lines: Vec<String> = excerpt.text().lines().map(String::from).collect();
            let mut cells: Vec<&str> = lines[line - 1].split(',').collect();
            cells[column] = token;
            lines[line - 1] = cells.join(",");
            let text = lines.join(excerpt.end());
            let err = parse_error(csv.parse(text.as_bytes(), SOURCE));
            let expected = format!("column {}: `{token}` is not a finite number", column + 1);
            assert_eq!(err, (line, expected));
        }
        1 => {
            // A trailing comma.
            log.push(format!("row {row} trailing comma"));
            let mut lines: Vec<String> = excerpt.text().lines().map(String::from).collect();
            lines[line - 1].push(',');
            let text = lines.join(excerpt.end());
            let err = parse_error(csv.parse(text.as_bytes(), SOURCE));
            let expected =
                "expected 65 columns (64 features and a label), found 66 in the row".to_string();
            assert_eq!(err, (line, expected));
        }
        2 => {
            // A label out of range.
            let label = ["10", "-1", "2.5", "", "x"][rng.random_range(0..5)];
            log.push(format!("row {row} label = {label:?}"));
            let mut lines: Vec<String> = excerpt.text().lines().map(String::from).collect();
            let mut cells: Vec<&str> = lines[line - 1].split(',').collect();
            cells[64] = label;
            lines[line - 1] = cells.join(",");
            let text = lines.join(excerpt.end());
            let err = parse_error(csv.parse(text.as_bytes(), SOURCE));
            assert_eq!(
                err,
                (
                    line,
                    format!("label `{label}` is not a class index in 0..10")
                )
            );
        }
        3 => {
            // Truncated at a line end: the rows before it.
            let keep = rng.random_range(1..=excerpt.rows.len());
            log.push(format!("keep {keep} rows"));
            let text = excerpt.text();
            let lines: Vec<&str> = text.split_inclusive('\n').collect();
            let cut: String = lines[..keep + usize::from(excerpt.header)].concat();
            let ds = csv.parse(cut.as_bytes(), SOURCE).unwrap();
            assert_rows(&ds, &excerpt.rows[..keep]);
        }
        4 => {
            // Every cell quoted and padded: the same samples.
            log.push("quote and pad every cell".to_string());
            let text = excerpt.text_with(|v| format!(" \"{v}\"\t"));
            let ds = csv.parse(text.as_bytes(), SOURCE).unwrap();
            assert_rows(&ds, &excerpt.rows);
        }
        _ => {
            // Blank and space-only lines: the same samples, later lines.
            log.push(format!("blank lines before row {row}"));
            let text = excerpt.text();
            let mut lines: Vec<&str> = text.split_inclusive('\n').collect();
            let at = line - 1;
            lines.splice(at..at, ["\n", "   \n", "\r\n"]);
            let text = lines.concat();
            let ds = csv.parse(text.as_bytes(), SOURCE).unwrap();
            assert_rows(&ds, &excerpt.rows);
            // A bad row after them is reported 3 lines further down.
            lines[at + 3] = "x\n";
            let bad = lines.concat();
            let (bad_line, message) = parse_error(csv.parse(bad.as_bytes(), SOURCE));
            assert_eq!(bad_line, line + 3, "{message}");
        }
    }
}

/// A random position in `bytes`, ends included.
fn position(bytes: &[u8], rng: &mut StdRng) -> usize {
    rng.random_range(0..=bytes.len())
}

/// The `(start, end)` of each line (without its `\n`).
fn lines(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' {
            spans.push((start, i));
            start = i + 1;
        }
    }
    spans.push((start, bytes.len()));
    spans
}

/// Replaces a random cell of a random line with `new`.
fn edit_cell(bytes: &mut Vec<u8>, new: &[u8], rng: &mut StdRng) {
    let spans = lines(bytes);
    let (start, end) = spans[rng.random_range(0..spans.len())];
    let commas: Vec<usize> = (start..end).filter(|&i| bytes[i] == b',').collect();
    let cell = rng.random_range(0..=commas.len());
    let from = if cell == 0 {
        start
    } else {
        commas[cell - 1] + 1
    };
    let to = commas.get(cell).copied().unwrap_or(end);
    bytes.splice(from..to, new.iter().copied());
}

fn giant_value(rng: &mut StdRng) -> Vec<u8> {
    let len = rng.random_range(50..MAX_GROWTH);
    match rng.random_range(0..5) {
        0 => vec![b'9'; len],
        1 => [b"0.".as_slice(), &vec![b'0'; len], b"1"].concat(),
        2 => format!("1e{}", "9".repeat(len.min(40))).into_bytes(),
        3 => [b"-".as_slice(), &vec![b'7'; len], b".5e-3"].concat(),
        _ => vec![b' '; len],
    }
}

const ODD_CELLS: &[&[u8]] = &[
    b"",
    b" ",
    b"\"",
    b"\"\"",
    b"\"\"\"",
    b"\"1",
    b"1\"",
    b"\"1\"2",
    b" \"3\" ",
    b"\"1,2\"",
    b"\"1\n2\"",
    b"\"\r\n\"",
    b"'5'",
    b"NaN",
    b"-inf",
    b"1e39",
    b"-0",
    b"+5",
    b"5.",
    b".5",
    b"0x10",
    b"1_000",
    b"1e-50",
    b"\xd9\xa1",
    b"\t7\t",
    b"\0",
    b"\xff",
    b"16\xc3",
];

/// One random mutation, logged.
fn mutate(bytes: &mut Vec<u8>, rng: &mut StdRng, log: &mut Vec<String>) {
    match rng.random_range(0..12) {
        0 => {
            let count = rng.random_range(1..=8);
            for _ in 0..count {
                if bytes.is_empty() {
                    break;
                }
                let at = rng.random_range(0..bytes.len());
                let bit = rng.random_range(0..8);
                bytes[at] ^= 1 << bit;
            }
            log.push(format!("flip {count} bits"));
        }
        1 => {
            let at = position(bytes, rng);
            bytes.truncate(at);
            log.push(format!("truncate at {at}"));
        }
        2 => {
            let cell = ODD_CELLS[rng.random_range(0..ODD_CELLS.len())];
            log.push(format!("cell = {:?}", String::from_utf8_lossy(cell)));
            edit_cell(bytes, cell, rng);
        }
        3 => {
            let value = giant_value(rng);
            log.push(format!("giant cell of {} bytes", value.len()));
            edit_cell(bytes, &value, rng);
        }
        4 => {
            // Odd quoting: a quote anywhere, or around a whole line.
            if rng.random_bool(0.5) {
                let at = position(bytes, rng);
                bytes.insert(at, b'"');
                log.push(format!("quote at {at}"));
            } else {
                let spans = lines(bytes);
                let (start, end) = spans[rng.random_range(0..spans.len())];
                bytes.insert(end, b'"');
                bytes.insert(start, b'"');
                log.push(format!("quote line at {start}"));
            }
        }
        5 => {
            // A very long line: many lines joined, or one repeated.
            if rng.random_bool(0.5) {
                for b in bytes.iter_mut() {
                    if *b == b'\n' {
                        *b = b',';
                    }
                }
                log.push("join all lines".to_string());
            } else {
                let spans = lines(bytes);
                let (start, end) = spans[rng.random_range(0..spans.len())];
                let line = bytes[start..end].to_vec();
                // At most about MAX_GROWTH bytes more.
                let most = (MAX_GROWTH / (line.len() + 1)).clamp(2, 2_000);
                let times = rng.random_range(2..=most);
                let long: Vec<u8> = (0..times)
                    .flat_map(|_| line.iter().copied().chain([b',']))
                    .collect();
                bytes.splice(start..end, long);
                log.push(format!("line repeated {times} times"));
            }
        }
        6 => {
            let bad: &[&[u8]] = &[
                b"\xff",
                b"\xc3",
                b"\xed\xa0\x80",
                b"\xf4\x90\x80\x80",
                b"\x80",
            ];
            let seq = bad[rng.random_range(0..bad.len())];
            let at = position(bytes, rng);
            bytes.splice(at..at, seq.iter().copied());
            log.push(format!("invalid UTF-8 {seq:?} at {at}"));
        }
        7 => {
            // Delete, duplicate or blank a line.
            let spans = lines(bytes);
            let (start, end) = spans[rng.random_range(0..spans.len())];
            match rng.random_range(0..3) {
                0 => {
                    bytes.drain(start..(end + 1).min(bytes.len()));
                }
                1 => {
                    let line: Vec<u8> = bytes[start..end].iter().copied().chain([b'\n']).collect();
                    bytes.splice(start..start, line);
                }
                _ => bytes.splice(start..end, *b"  \t ").for_each(drop),
            }
            log.push(format!("line edit at {start}"));
        }
        8 => {
            // Other line ends.
            let end: &[u8] =
                [b"\r".as_slice(), b"\r\n", b"\n\n", b"\r\r\n"][rng.random_range(0..4)];
            let mut out = Vec::with_capacity(bytes.len());
            for &b in bytes.iter() {
                if b == b'\n' {
                    out.extend_from_slice(end);
                } else {
                    out.push(b);
                }
            }
            *bytes = out;
            log.push(format!("line ends {end:?}"));
        }
        9 => {
            let count = rng.random_range(1..16);
            let at = position(bytes, rng);
            let junk: Vec<u8> = (0..count).map(|_| rng.random()).collect();
            bytes.splice(at..at, junk);
            log.push(format!("{count} random bytes at {at}"));
        }
        10 => {
            // Trailing or doubled commas.
            let spans = lines(bytes);
            let (_, end) = spans[rng.random_range(0..spans.len())];
            let at = if rng.random_bool(0.5) {
                end
            } else {
                position(bytes, rng)
            };
            bytes.insert(at, b',');
            log.push(format!("comma at {at}"));
        }
        _ => {
            let from = position(bytes, rng);
            let to = rng.random_range(from..=bytes.len());
            bytes.drain(from..to);
            log.push(format!("delete {from}..{to}"));
        }
    }
}

/// What any input must give: a valid dataset or a parse error naming the
/// source and a line of the text.
fn check_outcome(
    bytes: &[u8],
    result: &Result<TensorDataset>,
    source: &str,
    features: usize,
    classes: usize,
) {
    // Lines end with `\n`, `\r\n` or a lone `\r`.
    let lines = 1 + bytes
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\n' || (b == b'\r' && bytes.get(i + 1) != Some(&b'\n')))
        .count();
    match result {
        Ok(ds) => {
            let n = ds.len();
            assert!(n >= 1, "an empty dataset");
            assert!(n <= lines, "{n} samples from {lines} lines");
            assert_eq!(ds.inputs().shape(), &[n, features]);
            assert_eq!(ds.targets().shape(), &[n]);
            assert!(ds.inputs().to_vec().iter().all(|v| v.is_finite()));
            assert!(
                ds.targets()
                    .to_vec()
                    .iter()
                    .all(|&t| t.fract() == 0.0 && t.is_sign_positive() && (t as usize) < classes)
            );
        }
        Err(
            err @ Error::Parse {
                source_name,
                line,
                message,
            },
        ) => {
            assert_eq!(source_name, source);
            // "No samples after the header" names the line after a lone
            // header.
            assert!(
                (1..=lines.max(2)).contains(line),
                "line {line} of {lines}: {message}"
            );
            assert!(!message.is_empty());
            assert!(message.len() <= 200, "a long message: {message}");
            assert_eq!(err.to_string(), format!("{source}:{line}: {message}"));
        }
        Err(other) => panic!("not a parse error: {other:?}"),
    }
}

/// A dataset's shape and values, or the error, to compare two outcomes.
type Contents = std::result::Result<(Vec<usize>, Vec<f32>, Vec<f32>), Error>;

fn contents(result: &Result<TensorDataset>) -> Contents {
    match result {
        Ok(ds) => Ok((
            ds.inputs().shape().to_vec(),
            ds.inputs().to_vec(),
            ds.targets().to_vec(),
        )),
        Err(err) => Err(err.clone()),
    }
}

/// What a case ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// An edit with a known outcome, which it had.
    Known,
    /// Random mutations that left a valid dataset.
    Dataset,
    /// Random mutations reported as a parse error.
    ParseError,
}

/// Runs case `case` of the run seeded by `seed`.
fn run_case(digits: &Digits, seed: u64, case: u64, log: &mut Vec<String>) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed ^ case.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let excerpt = Excerpt::new(digits, &mut rng);
    log.push(format!(
        "{} rows, header {}, crlf {}",
        excerpt.rows.len(),
        excerpt.header,
        excerpt.crlf
    ));
    if rng.random_bool(0.2) {
        known_outcome(&excerpt, &mut rng, log);
        return Outcome::Known;
    }
    // Mostly the digits layout; sometimes a layout the text does not have.
    let (features, classes) = match rng.random_range(0..10) {
        0 => (63, 10),
        1 => (65, 10),
        2 => (64, rng.random_range(0..10)),
        3 => (0, 1),
        _ => (64, 10),
    };
    let mut bytes = excerpt.text().into_bytes();
    for _ in 0..rng.random_range(1..=4) {
        mutate(&mut bytes, &mut rng, log);
    }
    let csv = excerpt.csv(features, classes);
    let result = csv.parse(bytes.as_slice(), SOURCE);
    check_outcome(&bytes, &result, SOURCE, features, classes);
    if excerpt.header {
        // The old entry point reads the same way.
        let old = parse_labeled_csv(bytes.as_slice(), SOURCE, features, classes);
        assert_eq!(contents(&old), contents(&result));
    }
    if case.is_multiple_of(100) {
        // Now and then through a file: the same outcome, under its path.
        let path =
            std::env::temp_dir().join(format!("netcl-fuzz-{}-{case}.csv", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let loaded = csv.load(&path);
        std::fs::remove_file(&path).unwrap();
        let name = path.display().to_string();
        check_outcome(&bytes, &loaded, &name, features, classes);
        let rename = |r: Result<TensorDataset>| match r {
            Err(Error::Parse { line, message, .. }) => Err(Error::Parse {
                source_name: SOURCE.to_string(),
                line,
                message,
            }),
            other => other,
        };
        assert_eq!(contents(&rename(loaded)), contents(&result));
    }
    if result.is_ok() {
        Outcome::Dataset
    } else {
        Outcome::ParseError
    }
}

#[test]
fn mutated_csv_gives_a_dataset_or_a_parse_error() {
    let digits = Digits::load();
    let seed = env_u64("NETCL_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let cases: Vec<u64> = match env_u64("NETCL_FUZZ_ONLY") {
        Some(case) => vec![case],
        None => (0..env_u64("NETCL_FUZZ_CASES").unwrap_or(DEFAULT_CASES)).collect(),
    };
    let mut outcomes = BTreeMap::new();
    for &case in &cases {
        let mut log = Vec::new();
        let outcome =
            panic::catch_unwind(AssertUnwindSafe(|| run_case(&digits, seed, case, &mut log)));
        if let Err(payload) = &outcome {
            let what = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            panic!(
                "case {case} failed: {what}\nmutations: {log:?}\nreplay: NETCL_FUZZ_SEED={seed} NETCL_FUZZ_ONLY={case} cargo test --test fuzz_csv"
            );
        }
        *outcomes.entry(outcome.unwrap()).or_insert(0) += 1;
    }
    println!(
        "{} CSV fuzz cases passed (seed {seed}): {outcomes:?}",
        cases.len()
    );
    if cases.len() >= 1000 {
        // The mutations are neither all fatal nor all harmless.
        for kind in [Outcome::Known, Outcome::Dataset, Outcome::ParseError] {
            let share = outcomes.get(&kind).copied().unwrap_or(0) as f64 / cases.len() as f64;
            assert!(share > 0.005, "{kind:?}: {outcomes:?}");
        }
    }
}
