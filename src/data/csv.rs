//! Loading labelled samples from CSV text.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use crate::data::TensorDataset;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Loads `data/digits.csv` (or a file of the same layout): a header line,
/// then one 8x8 image per line, 64 pixel values in `0..=16` followed by a
/// label in `0..10`.
///
/// Inputs are `[n, 64]` with the raw pixel values (divide by 16 to scale
/// them to `[0, 1]`); targets are `[n]` class indices as `f32`.
///
/// # Errors
///
/// As [`load_labeled_csv`].
///
/// # Examples
///
/// ```
/// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv");
/// let digits = netcl::data::load_digits(path)?;
/// assert_eq!(digits.inputs().shape(), &[1797, 64]);
/// assert_eq!(digits.targets().to_vec()[..3], [0.0, 1.0, 2.0]);
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn load_digits(path: impl AsRef<Path>) -> Result<TensorDataset> {
    load_labeled_csv(path, 64, 10)
}

/// Loads a CSV file of labelled samples: a header line, then one sample per
/// line, `features` numbers followed by an integer class label in
/// `0..classes`.
///
/// Fields are separated by commas and may be surrounded by spaces; blank
/// lines are skipped; quoting is not supported.
///
/// # Errors
///
/// - [`Error::Io`] if the file cannot be read;
/// - [`Error::Parse`] naming the file and the line number (the header is
///   line 1) for a header or row with the wrong number of columns, a value
///   that is not a finite number, a label that is not an integer in
///   `0..classes`, invalid UTF-8, or a file without samples.
///
/// # Examples
///
/// ```
/// use netcl::Error;
///
/// let dir = std::env::temp_dir().join(format!("netcl-doc-csv-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("bad.csv");
/// std::fs::write(&path, "a,b,label\n1,2,0\n3,x,1\n").unwrap();
///
/// let err = netcl::data::load_labeled_csv(&path, 2, 2).unwrap_err();
/// assert!(matches!(err, Error::Parse { line: 3, .. }));
/// assert!(err.to_string().ends_with("bad.csv:3: column 2: `x` is not a number"));
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub fn load_labeled_csv(
    path: impl AsRef<Path>,
    features: usize,
    classes: usize,
) -> Result<TensorDataset> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|err| Error::Io {
        op: "load_labeled_csv",
        path: path.display().to_string(),
        kind: err.kind(),
        message: err.to_string(),
    })?;
    parse_labeled_csv(
        BufReader::new(file),
        &path.display().to_string(),
        features,
        classes,
    )
}

/// Parses labelled samples in CSV form from `reader`, as
/// [`load_labeled_csv`] does for a file; `source_name` names the source in
/// errors.
///
/// # Errors
///
/// As [`load_labeled_csv`].
///
/// # Examples
///
/// ```
/// use netcl::data::{Dataset, parse_labeled_csv};
///
/// let text = "x0,x1,label\n0.5, 1.5, 1\n\n2,3,0\n";
/// let ds = parse_labeled_csv(text.as_bytes(), "inline", 2, 2)?;
/// assert_eq!(ds.len(), 2);
/// assert_eq!(ds.inputs().to_vec(), vec![0.5, 1.5, 2.0, 3.0]);
/// assert_eq!(ds.targets().to_vec(), vec![1.0, 0.0]);
///
/// let err = parse_labeled_csv("x0,x1,label\n1,2,7\n".as_bytes(), "inline", 2, 2).unwrap_err();
/// assert_eq!(err.to_string(), "inline:2: label `7` is not a class index in 0..2");
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn parse_labeled_csv(
    reader: impl BufRead,
    source_name: &str,
    features: usize,
    classes: usize,
) -> Result<TensorDataset> {
    let columns = features + 1;
    let parse_error = |line: usize, message: String| Error::Parse {
        source_name: source_name.to_string(),
        line,
        message,
    };
    let mut inputs = Vec::new();
    let mut targets = Vec::new();
    let mut saw_header = false;
    for (index, line) in reader.lines().enumerate() {
        let number = index + 1;
        let line = line.map_err(|err| match err.kind() {
            std::io::ErrorKind::InvalidData => parse_error(number, "invalid UTF-8".to_string()),
            kind => Error::Io {
                op: "parse_labeled_csv",
                path: source_name.to_string(),
                kind,
                message: err.to_string(),
            },
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let found = line.split(',').count();
        if found != columns {
            let what = if saw_header { "row" } else { "header" };
            return Err(parse_error(
                number,
                format!(
                    "expected {columns} columns ({features} features and a label), found {found} in the {what}"
                ),
            ));
        }
        if !saw_header {
            saw_header = true;
            continue;
        }
        for (column, field) in line.split(',').enumerate() {
            let field = field.trim();
            let value = field.parse::<f32>().ok().filter(|v| v.is_finite());
            if column < features {
                let value = value.ok_or_else(|| {
                    parse_error(
                        number,
                        format!("column {}: `{field}` is not a number", column + 1),
                    )
                })?;
                inputs.push(value);
            } else {
                let label = value
                    .filter(|v| v.fract() == 0.0 && *v >= 0.0 && (*v as usize) < classes)
                    .ok_or_else(|| {
                        parse_error(
                            number,
                            format!("label `{field}` is not a class index in 0..{classes}"),
                        )
                    })?;
                targets.push(label);
            }
        }
    }
    if !saw_header {
        return Err(parse_error(1, "missing header line".to_string()));
    }
    if targets.is_empty() {
        return Err(parse_error(2, "no samples after the header".to_string()));
    }
    let n = targets.len();
    TensorDataset::new(
        Tensor::from_vec(inputs, &[n, features])?,
        Tensor::from_vec(targets, &[n])?,
    )
}
