//! Loader fuzzing: mutations of valid safetensors files (bit flips,
//! truncations, header edits, giant shapes, lengths and offsets, other
//! dtypes, inserted garbage) fed to `io::load_bytes` and `io::read_tensors`.
//! Neither may panic; a load either fails and leaves the model exactly as it
//! was, or succeeds and leaves every parameter holding the file's values:
//! never a model left half-loaded.
//!
//! `cargo test --test fuzz_io` runs 1,000 mutations. The long run
//! (100,000 or more; the seed varies the mutations):
//!
//! ```sh
//! NETCL_FUZZ_CASES=100000 cargo test --release --test fuzz_io -- --nocapture
//! NETCL_FUZZ_CASES=100000 NETCL_FUZZ_SEED=2 cargo test --release --test fuzz_io
//! ```

use std::panic::{AssertUnwindSafe, catch_unwind};

use netcl::io;
use netcl::nn::{Activation, Linear, Mlp, Module};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        })
        .unwrap_or(default)
}

/// Every parameter's values as bits, by name.
fn snapshot(model: &dyn Module) -> Vec<(String, Vec<u32>)> {
    let mut params: Vec<(String, Vec<u32>)> = model
        .named_parameters()
        .into_iter()
        .map(|(name, p)| (name, p.to_vec().iter().map(|v| v.to_bits()).collect()))
        .collect();
    params.sort();
    params
}

/// A tensor's name, shape and values as bits.
type Stored = (String, Vec<usize>, Vec<u32>);

/// The F32 tensors of a file as safetensors itself decodes them, by name.
fn decoded(bytes: &[u8]) -> Option<Vec<Stored>> {
    let file = SafeTensors::deserialize(bytes).ok()?;
    let mut tensors: Vec<_> = file
        .tensors()
        .into_iter()
        .filter(|(_, view)| view.dtype() == Dtype::F32)
        .map(|(name, view)| {
            let bits = view
                .data()
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, view.shape().to_vec(), bits)
        })
        .collect();
    tensors.sort();
    Some(tensors)
}

/// Valid files to mutate: two models' checkpoints and a file of mixed
/// dtypes and zero-size tensors.
fn seeds() -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(1);
    let mlp = Mlp::new(&[4, 3, 2], Activation::Relu, &mut rng);
    let linear = Linear::new(3, 2, &mut rng);
    let f64s = vec![0u8; 2 * 2 * 8];
    let f16s = vec![0u8; 3 * 2];
    let f32s: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let mixed = safetensors::serialize(
        vec![
            ("a", TensorView::new(Dtype::F64, vec![2, 2], &f64s).unwrap()),
            ("b", TensorView::new(Dtype::F16, vec![3], &f16s).unwrap()),
            ("c", TensorView::new(Dtype::F32, vec![2, 3], &f32s).unwrap()),
            ("d", TensorView::new(Dtype::F32, vec![0, 5], &[]).unwrap()),
        ],
        None,
    )
    .unwrap();
    vec![
        io::to_bytes(&mlp).unwrap(),
        io::to_bytes(&linear).unwrap(),
        mixed,
    ]
}

const NUMBERS: &[&str] = &[
    "0",
    "1",
    "3",
    "4",
    "7",
    "4294967296",
    "4611686018427387904",
    "9223372036854775807",
    "9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999999",
    "-1",
    "1e30",
    "0.5",
    "",
];

const DTYPES: &[&str] = &[
    "F16", "BF16", "F64", "I8", "U8", "I32", "I64", "U64", "BOOL", "F8_E4M3", "f32", "F3", "",
];

const SHAPES: &[&str] = &[
    "[0,4611686018427387904,4611686018427387904]",
    "[4611686018427387904,4611686018427387904,0]",
    "[4294967296,4294967296]",
    "[18446744073709551615]",
    "[0,18446744073709551615,2]",
    "[]",
    "[0]",
    "[1,1,1,1,1,1,1,1,1,1]",
    "[-1]",
    "[2,",
    "3",
];

/// The byte range of the JSON header, if the length prefix is sane.
fn header_range(bytes: &[u8]) -> std::ops::Range<usize> {
    if bytes.len() < 8 {
        return 0..0;
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let end = usize::try_from(n).map_or(bytes.len(), |n| (8 + n.min(bytes.len())).min(bytes.len()));
    8..end
}

/// Replaces the `index`-th match of `pattern` in the header (wrapping).
fn replace_in_header(
    bytes: &mut Vec<u8>,
    find: impl Fn(&[u8]) -> Vec<(usize, usize)>,
    pick: usize,
    with: &[u8],
) {
    let range = header_range(bytes);
    let spans = find(&bytes[range.clone()]);
    if spans.is_empty() {
        return;
    }
    let (start, end) = spans[pick % spans.len()];
    let (start, end) = (range.start + start, range.start + end);
    let old_len = end - start;
    bytes.splice(start..end, with.iter().copied());
    // Keep the length prefix consistent half of the time, so the parser
    // reaches the edited JSON.
    if pick.is_multiple_of(2) {
        let header_len = (range.end - range.start) as i64 + with.len() as i64 - old_len as i64;
        bytes[..8].copy_from_slice(&(header_len.max(0) as u64).to_le_bytes());
    }
}

/// Spans of ASCII digit runs.
fn numbers(header: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut i = 0;
    while i < header.len() {
        if header[i].is_ascii_digit() {
            let start = i;
            while i < header.len() && header[i].is_ascii_digit() {
                i += 1;
            }
            spans.push((start, i));
        } else {
            i += 1;
        }
    }
    spans
}

/// Spans of the values following `"key":`, up to the next `,"`, `}` or `]`
/// closing them.
fn values_of(key: &'static str) -> impl Fn(&[u8]) -> Vec<(usize, usize)> {
    move |header: &[u8]| {
        let needle = format!("\"{key}\":");
        let text = String::from_utf8_lossy(header);
        let mut spans = Vec::new();
        let mut from = 0;
        while let Some(at) = text[from..].find(&needle) {
            let start = from + at + needle.len();
            let end = if text[start..].starts_with('[') {
                text[start..]
                    .find(']')
                    .map_or(text.len(), |e| start + e + 1)
            } else {
                text[start..]
                    .find([',', '}'])
                    .map_or(text.len(), |e| start + e)
            };
            if end <= header.len() {
                spans.push((start, end));
            }
            from = start;
        }
        spans
    }
}

/// One random mutation of `bytes`.
fn mutate(bytes: &mut Vec<u8>, rng: &mut StdRng) {
    let pick = rng.random_range(0..1000usize);
    match rng.random_range(0..10) {
        // Bit flips anywhere.
        0 => {
            for _ in 0..rng.random_range(1..=8) {
                if !bytes.is_empty() {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] ^= 1 << rng.random_range(0..8);
                }
            }
        }
        // Truncation.
        1 => {
            let len = rng.random_range(0..=bytes.len());
            bytes.truncate(len);
        }
        // A header byte replaced by JSON punctuation, a digit or anything.
        2 => {
            let range = header_range(bytes);
            if !range.is_empty() {
                let at = rng.random_range(range);
                const BYTES: &[u8] = b"0123456789\"'{}[]:,- eE.\\\0";
                bytes[at] = if rng.random_bool(0.8) {
                    BYTES[pick % BYTES.len()]
                } else {
                    rng.random()
                };
            }
        }
        // A number of the header (a length, an offset) replaced.
        3 => {
            let with = NUMBERS[rng.random_range(0..NUMBERS.len())];
            replace_in_header(bytes, numbers, pick, with.as_bytes());
        }
        // Another dtype.
        4 => {
            let with = format!("\"{}\"", DTYPES[rng.random_range(0..DTYPES.len())]);
            replace_in_header(bytes, values_of("dtype"), pick, with.as_bytes());
        }
        // A giant or malformed shape.
        5 => {
            let with = SHAPES[rng.random_range(0..SHAPES.len())];
            replace_in_header(bytes, values_of("shape"), pick, with.as_bytes());
        }
        // Giant, swapped or overlapping offsets.
        6 => {
            let a = NUMBERS[rng.random_range(0..NUMBERS.len())];
            let b = NUMBERS[rng.random_range(0..NUMBERS.len())];
            let with = format!("[{a},{b}]");
            replace_in_header(bytes, values_of("data_offsets"), pick, with.as_bytes());
        }
        // The header length prefix.
        7 => {
            if bytes.len() >= 8 {
                let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
                let new = match pick % 4 {
                    0 => rng.random(),
                    1 => u64::MAX - rng.random_range(0..16),
                    2 => n.wrapping_add(rng.random_range(1..16)),
                    _ => n.wrapping_sub(rng.random_range(1..16)),
                };
                bytes[..8].copy_from_slice(&new.to_le_bytes());
            }
        }
        // Garbage inserted, or a segment duplicated.
        8 => {
            let at = rng.random_range(0..=bytes.len());
            let insert: Vec<u8> = if pick % 2 == 0 || bytes.is_empty() {
                (0..rng.random_range(1..32)).map(|_| rng.random()).collect()
            } else {
                let start = rng.random_range(0..bytes.len());
                let end = rng.random_range(start..=bytes.len().min(start + 64));
                bytes[start..end].to_vec()
            };
            bytes.splice(at..at, insert);
        }
        // A tensor entry duplicated in the header (a repeated key).
        _ => {
            let range = header_range(bytes);
            let header = &bytes[range.clone()];
            if let (Some(open), Some(close)) = (
                header.iter().position(|&b| b == b'{').and_then(|o| {
                    header[o + 1..]
                        .iter()
                        .position(|&b| b == b'{')
                        .map(|p| o + 1 + p)
                }),
                header.iter().position(|&b| b == b'}'),
            ) {
                let name_start = header[..open].iter().rposition(|&b| b == b',' || b == b'{');
                if let Some(name_start) = name_start
                    && name_start < close
                {
                    let entry = header[name_start + 1..=close].to_vec();
                    let at = range.start + close + 1;
                    let mut insert = vec![b','];
                    insert.extend(entry);
                    bytes.splice(at..at, insert);
                }
            }
        }
    }
}

#[test]
fn mutated_checkpoints_never_panic_and_never_half_load() {
    let cases = env_number("NETCL_FUZZ_CASES", 1000);
    let seed = env_number("NETCL_FUZZ_SEED", 0);
    let seeds = seeds();
    let mut rng = StdRng::seed_from_u64(0xF022 ^ seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.safetensors");

    // The models the checkpoints load into, with the state each holds.
    let mut model_rng = StdRng::seed_from_u64(7);
    let mlp = Mlp::new(&[4, 3, 2], Activation::Relu, &mut model_rng);
    let linear = Linear::new(3, 2, &mut model_rng);
    let models: [&dyn Module; 2] = [&mlp, &linear];

    let (mut loaded, mut rejected, mut read, mut read_rejected) = (0u64, 0u64, 0u64, 0u64);
    for case in 0..cases {
        let origin = rng.random_range(0..seeds.len());
        let mut bytes = seeds[origin].clone();
        for _ in 0..rng.random_range(1..=3) {
            mutate(&mut bytes, &mut rng);
        }
        let context = || {
            format!(
                "case {case} (NETCL_FUZZ_SEED={seed}), {} bytes: {:?}",
                bytes.len(),
                String::from_utf8_lossy(&bytes[..bytes.len().min(400)])
            )
        };

        let model = models[origin % 2];
        let before = snapshot(model);
        let result = catch_unwind(AssertUnwindSafe(|| io::load_bytes(model, &bytes)))
            .unwrap_or_else(|_| panic!("io::load_bytes panicked on {}", context()));
        let after = snapshot(model);
        match result {
            Err(_) => {
                rejected += 1;
                assert_eq!(
                    after,
                    before,
                    "a failed load changed the model: {}",
                    context()
                );
            }
            Ok(()) => {
                loaded += 1;
                // Every parameter holds the file's values.
                let file = decoded(&bytes).expect("a loaded file decodes");
                let from_file: Vec<(String, Vec<u32>)> = file
                    .into_iter()
                    .map(|(name, _, bits)| (name, bits))
                    .collect();
                assert_eq!(after, from_file, "loaded values differ: {}", context());
            }
        }

        std::fs::write(&path, &bytes).unwrap();
        let result = catch_unwind(|| io::read_tensors(&path))
            .unwrap_or_else(|_| panic!("io::read_tensors panicked on {}", context()));
        match result {
            Err(_) => read_rejected += 1,
            Ok(tensors) => {
                read += 1;
                let got: Vec<Stored> = tensors
                    .iter()
                    .map(|(name, t)| {
                        (
                            name.clone(),
                            t.shape().to_vec(),
                            t.to_vec().iter().map(|v| v.to_bits()).collect(),
                        )
                    })
                    .collect();
                assert_eq!(
                    Some(got),
                    decoded(&bytes),
                    "read_tensors differs: {}",
                    context()
                );
            }
        }
    }
    println!(
        "{cases} mutations: load_bytes loaded {loaded}, rejected {rejected}; read_tensors read {read}, rejected {read_rejected}"
    );
    // The mutations reach both outcomes (a fuzzer that only produces
    // garbage tests little).
    assert!(rejected > 0 && read_rejected > 0);
    assert!(
        cases < 1000 || (loaded > 0 && read > 0),
        "{loaded} loaded, {read} read"
    );
}
