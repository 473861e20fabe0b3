//! Saving and loading parameters in safetensors format: bit-exact round
//! trips, and a clear error (never a panic, never a half-loaded model) for
//! truncated, corrupted and mismatched files.

use std::path::PathBuf;

use netcl::io;
use netcl::nn::{Activation, Linear, Mlp, Module, Sequential};
use netcl::{Error, Tensor};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

fn mlp(seed: u64) -> Mlp {
    Mlp::new(
        &[6, 5, 3],
        Activation::Relu,
        &mut StdRng::seed_from_u64(seed),
    )
}

/// Every parameter's values as bits, by name.
fn snapshot(model: &dyn Module) -> Vec<(String, Vec<u32>)> {
    model
        .named_parameters()
        .into_iter()
        .map(|(name, p)| (name, p.to_vec().iter().map(|v| v.to_bits()).collect()))
        .collect()
}

/// A fresh directory for one test's files, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("netcl-io-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn save_then_load_is_bit_exact() -> netcl::Result<()> {
    let dir = TempDir::new("roundtrip");
    let model = mlp(1);
    // Values that a lossy or text encoding would not keep.
    model.parameters()[1].with_data_mut(|mut b| {
        let special = [
            f32::NAN,
            -0.0,
            f32::MIN_POSITIVE / 8.0,
            f32::INFINITY,
            f32::from_bits(0x7fc0_1234),
        ];
        for (v, s) in b.iter_mut().zip(special) {
            *v = s;
        }
    });
    let path = dir.file("model.safetensors");
    io::save(&model, &path)?;

    let fresh = mlp(2);
    // A handle taken before loading (as an optimizer holds) sees the values:
    // loading updates the parameters in place.
    let handle: Tensor = fresh.parameters()[0].clone();
    assert_ne!(snapshot(&fresh), snapshot(&model));
    io::load(&fresh, &path)?;
    assert_eq!(snapshot(&fresh), snapshot(&model));
    assert_eq!(handle.to_vec(), model.parameters()[0].to_vec());

    // No temporary file is left beside the checkpoint.
    let files: Vec<_> = std::fs::read_dir(&dir.0).unwrap().collect();
    assert_eq!(files.len(), 1);
    Ok(())
}

#[test]
fn the_file_is_standard_safetensors_by_parameter_name() -> netcl::Result<()> {
    let model = mlp(3);
    let bytes = io::to_bytes(&model)?;
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let mut names = file.names();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "layers.0.bias",
            "layers.0.weight",
            "layers.2.bias",
            "layers.2.weight"
        ]
    );
    let weight = file.tensor("layers.0.weight").unwrap();
    assert_eq!(weight.dtype(), Dtype::F32);
    assert_eq!(weight.shape(), &[6, 5]);
    let first = f32::from_le_bytes(weight.data()[..4].try_into().unwrap());
    assert_eq!(first, model.parameters()[0].to_vec()[0]);
    Ok(())
}

#[test]
fn read_tensors_lists_a_checkpoint() -> netcl::Result<()> {
    let dir = TempDir::new("read");
    let model = mlp(4);
    let path = dir.file("m.safetensors");
    io::save(&model, &path)?;
    let tensors = io::read_tensors(&path)?;
    let mut expected = snapshot(&model);
    expected.sort();
    let got: Vec<(String, Vec<u32>)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.to_vec().iter().map(|v| v.to_bits()).collect()))
        .collect();
    assert_eq!(got, expected);
    Ok(())
}

#[test]
fn every_truncation_is_a_format_error() -> netcl::Result<()> {
    let bytes = io::to_bytes(&mlp(5))?;
    let model = mlp(6);
    let original = snapshot(&model);
    for len in 0..bytes.len() {
        match io::load_bytes(&model, &bytes[..len]) {
            Err(Error::Format {
                format: "safetensors",
                ..
            }) => {}
            other => panic!("truncated to {len} bytes: {other:?}"),
        }
    }
    assert_eq!(snapshot(&model), original, "the model is untouched");

    let dir = TempDir::new("truncated");
    let path = dir.file("cut.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = io::load(&model, &path).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "io::load: {} is not a valid safetensors file",
            path.display()
        )),
        "{err}"
    );
    Ok(())
}

#[test]
fn random_bytes_are_rejected_without_panic() {
    let model = mlp(7);
    let original = snapshot(&model);
    let mut rng = StdRng::seed_from_u64(8);
    for round in 0..2000 {
        let len = rng.random_range(0..300);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if round % 2 == 0 && len >= 8 {
            // A plausible header length, so the parser reaches the JSON.
            let header = rng.random_range(0..len as u64 - 7);
            bytes[..8].copy_from_slice(&header.to_le_bytes());
        }
        assert!(io::load_bytes(&model, &bytes).is_err(), "round {round}");
    }
    assert_eq!(snapshot(&model), original);
}

#[test]
fn corrupted_headers_are_rejected_without_panic() -> netcl::Result<()> {
    let bytes = io::to_bytes(&mlp(9))?;
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let model = mlp(10);
    let original = snapshot(&model);
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..2000 {
        let mut corrupted = bytes.clone();
        let at = rng.random_range(0..8 + header_len);
        corrupted[at] = rng.random();
        if corrupted == bytes {
            continue;
        }
        match io::load_bytes(&model, &corrupted) {
            // A flipped digit can make another valid-looking header (a
            // different name or shape); it must not load then either.
            Err(Error::Format { .. })
            | Err(Error::ParameterNames { .. })
            | Err(Error::ParameterMismatch { .. }) => {}
            // Spaces and equivalent JSON spellings are harmless changes.
            Ok(()) => {}
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    // Whatever loaded was the checkpoint's own values.
    let reference = mlp(9);
    let now = snapshot(&model);
    assert!(now == original || now == snapshot(&reference));
    Ok(())
}

#[test]
fn wrong_shapes_are_named() -> netcl::Result<()> {
    let mut rng = StdRng::seed_from_u64(0);
    let bytes = io::to_bytes(&Linear::new(3, 2, &mut rng))?;
    let wider = Linear::new(3, 4, &mut rng);
    let before = snapshot(&wider);
    let err = io::load_bytes(&wider, &bytes).unwrap_err();
    assert_eq!(
        err,
        Error::ParameterMismatch {
            op: "io::load",
            name: "bias".to_string(),
            expected: vec![4],
            found: vec![2],
            found_dtype: "F32".to_string(),
        }
    );
    assert_eq!(
        err.to_string(),
        "io::load: parameter `bias` is stored as F32 [2], the model expects F32 [4]"
    );
    assert_eq!(snapshot(&wider), before, "nothing was loaded");
    Ok(())
}

#[test]
fn wrong_names_list_missing_and_unexpected() -> netcl::Result<()> {
    let mut rng = StdRng::seed_from_u64(0);
    // The same layers in a Sequential are named `0.weight`, not `layers.0.weight`.
    let chain = Sequential::new()
        .with(Linear::new(6, 5, &mut rng))
        .with(Linear::new(5, 3, &mut rng));
    let bytes = io::to_bytes(&chain)?;
    let err = io::load_bytes(&mlp(0), &bytes).unwrap_err();
    assert_eq!(
        err,
        Error::ParameterNames {
            op: "io::load",
            missing: vec![
                "layers.0.bias".into(),
                "layers.0.weight".into(),
                "layers.2.bias".into(),
                "layers.2.weight".into()
            ],
            unexpected: vec![
                "0.bias".into(),
                "0.weight".into(),
                "1.bias".into(),
                "1.weight".into()
            ],
        }
    );

    // A checkpoint with one parameter fewer: only `missing`.
    let no_bias = Linear::without_bias(3, 2, &mut rng);
    let with_bias = Linear::new(3, 2, &mut rng);
    let err = io::load_bytes(&with_bias, &io::to_bytes(&no_bias)?).unwrap_err();
    assert_eq!(
        err.to_string(),
        "io::load: checkpoint does not match the model's parameters (missing: [\"bias\"]; unexpected: [])"
    );
    // One more: only `unexpected`.
    let err = io::load_bytes(&no_bias, &io::to_bytes(&with_bias)?).unwrap_err();
    assert!(
        matches!(&err, Error::ParameterNames { missing, unexpected, .. } if missing.is_empty() && unexpected == &["bias"]),
        "{err}"
    );
    Ok(())
}

#[test]
fn wrong_dtype_is_named() -> netcl::Result<()> {
    // A valid file whose `weight` is F64: same shape, 8 bytes per value.
    let weight = vec![0u8; 3 * 2 * 8];
    let bias = vec![0u8; 2 * 4];
    let views = vec![
        (
            "weight",
            TensorView::new(Dtype::F64, vec![3, 2], &weight).unwrap(),
        ),
        ("bias", TensorView::new(Dtype::F32, vec![2], &bias).unwrap()),
    ];
    let bytes = safetensors::serialize(views, None).unwrap();
    let layer = Linear::new(3, 2, &mut StdRng::seed_from_u64(0));
    let err = io::load_bytes(&layer, &bytes).unwrap_err();
    assert_eq!(
        err.to_string(),
        "io::load: parameter `weight` is stored as F64 [3, 2], the model expects F32 [3, 2]"
    );

    let dir = TempDir::new("dtype");
    let path = dir.file("f64.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        io::read_tensors(&path),
        Err(Error::ParameterMismatch { ref found_dtype, .. }) if found_dtype == "F64"
    ));
    Ok(())
}

#[test]
fn file_system_errors_name_the_path() {
    let dir = TempDir::new("fs");
    let missing = dir.file("nope.safetensors");
    let err = io::load(&mlp(0), &missing).unwrap_err();
    assert!(matches!(
        &err,
        Error::Io { op: "io::load", kind: std::io::ErrorKind::NotFound, path, .. } if path.ends_with("nope.safetensors")
    ));

    let nested = dir.file("no/such/dir/model.safetensors");
    let err = io::save(&mlp(0), &nested).unwrap_err();
    assert!(matches!(err, Error::Io { op: "io::save", .. }), "{err}");
}

#[test]
fn concurrent_saves_to_one_path_both_succeed_and_leave_one_complete_file() {
    // Before: both saves wrote `<file>.<pid>.tmp`; one failed in most
    // rounds, and the file often held the data of the save that failed.
    let dir = TempDir::new("concurrent");
    let path = dir.file("model.safetensors");
    let models = [mlp(21), mlp(22)];
    let expected = [snapshot(&models[0]), snapshot(&models[1])];
    let reader = mlp(23);
    for round in 0..100 {
        let barrier = std::sync::Barrier::new(2);
        let results: Vec<netcl::Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = models
                .iter()
                .map(|model| {
                    let (barrier, path) = (&barrier, &path);
                    s.spawn(move || {
                        barrier.wait();
                        io::save(model, path)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for result in &results {
            assert!(result.is_ok(), "round {round}: {result:?}");
        }
        io::load(&reader, &path).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let loaded = snapshot(&reader);
        assert!(
            loaded == expected[0] || loaded == expected[1],
            "round {round}: the file holds neither save"
        );
    }
    // No temporary file is left behind.
    let files: Vec<_> = std::fs::read_dir(&dir.0).unwrap().collect();
    assert_eq!(files.len(), 1, "{files:?}");
}

/// A safetensors file whose header is `header` (JSON) followed by `data`.
fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

#[test]
fn read_tensors_rejects_a_zero_size_shape_too_large_to_exist() {
    // Zero elements (safetensors accepts it), but 2^62 · 2^62 overflows:
    // from_vec panicked.
    let big = 1u64 << 62;
    let header =
        format!(r#"{{"x":{{"dtype":"F32","shape":[0,{big},{big}],"data_offsets":[0,0]}}}}"#);
    let bytes = raw_safetensors(&header, &[]);
    assert!(safetensors::SafeTensors::deserialize(&bytes).is_ok());
    let dir = TempDir::new("huge");
    let path = dir.file("huge.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    match io::read_tensors(&path) {
        Err(Error::Format { message, .. }) => {
            assert!(
                message.contains("`x`") && message.contains("too large"),
                "{message}"
            )
        }
        other => panic!("{other:?}"),
    }
    // A zero-size tensor whose shape fits reads fine.
    let header = r#"{"e":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]}}"#;
    std::fs::write(&path, raw_safetensors(header, &[])).unwrap();
    let tensors = io::read_tensors(&path).unwrap();
    assert_eq!(tensors[0].1.shape(), &[0, 3]);
}
