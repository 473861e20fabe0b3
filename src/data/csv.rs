//! Loading labelled samples from CSV text.
//!
//! The [`csv`](::csv) crate splits the text into records (quoting, line
//! endings, line positions); this module checks each record's shape and
//! turns its cells into numbers, reporting every problem as
//! `source:line: what is wrong`.

use std::fs::File;
use std::io::{BufRead, Read};
use std::path::Path;

use crate::data::TensorDataset;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Loads `data/digits.csv` (or a file of the same layout): a header line,
/// then one 8x8 image per line, 64 pixel values in `0..=16` followed by a
/// label in `0..10`.
///
/// Inputs are `[n, 64]` with the raw pixel values (divide by 16 to scale
/// them to `[0, 1]`); targets are `[n]` class indices as `f32`. For the same
/// layout without a header line, use
/// `LabeledCsv::new(64, 10).header(false).load(path)` ([`LabeledCsv`]).
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
/// `0..classes`. [`LabeledCsv`] reads the same format, also without a
/// header line.
///
/// Cells are separated by commas. A cell may be quoted (`"1.5"`, so a
/// quoted comma or line break is part of the cell) and may have spaces
/// around its value or its quotes; the header's cells can be any text, only
/// their number is checked. Blank lines are skipped; lines may end in `\n`,
/// `\r\n` or `\r`.
///
/// # Errors
///
/// - [`Error::Io`] if the file cannot be read;
/// - [`Error::Parse`] naming the file and the line number (the header is
///   line 1) for a header or row with the wrong number of columns (a
///   trailing comma adds an empty column), a cell that is empty, not a
///   number or not a finite number (`NaN`, `inf`, `1e39`), a label that is
///   not an integer in `0..classes`, invalid UTF-8, or a file without
///   samples.
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
    LabeledCsv::new(features, classes).load_as("load_labeled_csv", path.as_ref())
}

/// Parses labelled samples in CSV form from `reader`, as
/// [`load_labeled_csv`] does for a file; `source_name` names the source in
/// errors.
///
/// # Errors
///
/// As [`load_labeled_csv`]; an error reading from `reader` is an
/// [`Error::Io`].
///
/// # Examples
///
/// ```
/// use netcl::data::{Dataset, parse_labeled_csv};
///
/// let text = "x0,x1,label\n0.5, 1.5, 1\n\n\"2\",3,0\n";
/// let ds = parse_labeled_csv(text.as_bytes(), "inline", 2, 2)?;
/// assert_eq!(ds.len(), 2);
/// assert_eq!(ds.inputs().to_vec(), vec![0.5, 1.5, 2.0, 3.0]);
/// assert_eq!(ds.targets().to_vec(), vec![1.0, 0.0]);
///
/// let err = parse_labeled_csv("x0,x1,label\n1,2,7\n".as_bytes(), "inline", 2, 2).unwrap_err();
/// assert_eq!(err.to_string(), "inline:2: label `7` is not a class index in 0..2");
/// let err = parse_labeled_csv("x0,x1,label\n1,NaN,0\n".as_bytes(), "inline", 2, 2).unwrap_err();
/// assert_eq!(err.to_string(), "inline:2: column 2: `NaN` is not a finite number");
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn parse_labeled_csv(
    reader: impl BufRead,
    source_name: &str,
    features: usize,
    classes: usize,
) -> Result<TensorDataset> {
    LabeledCsv::new(features, classes).parse_as("parse_labeled_csv", reader, source_name)
}

/// The layout of a CSV file of labelled samples, and the loader for it:
/// `features` numbers then an integer class label in `0..classes` on each
/// line, after a header line unless [`header(false)`](LabeledCsv::header).
///
/// [`load_labeled_csv`] and [`parse_labeled_csv`] are this with a header;
/// cells, quoting, blank lines and errors are as described there.
///
/// # Examples
///
/// A file without a header line:
///
/// ```
/// use netcl::data::{Dataset, LabeledCsv};
///
/// let csv = LabeledCsv::new(2, 3).header(false);
/// let ds = csv.parse("0.5,1.5,2\n2,3,0\n".as_bytes(), "inline")?;
/// assert_eq!(ds.len(), 2);
/// assert_eq!(ds.targets().to_vec(), vec![2.0, 0.0]);
///
/// // Line 1 is a sample, so a header there is an error.
/// let err = csv.parse("x0,x1,label\n2,3,0\n".as_bytes(), "inline").unwrap_err();
/// assert_eq!(err.to_string(), "inline:1: column 1: `x0` is not a number");
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabeledCsv {
    features: usize,
    classes: usize,
    header: bool,
}

impl LabeledCsv {
    /// The layout of `features` numbers and a label in `0..classes` per
    /// line, after a header line.
    pub fn new(features: usize, classes: usize) -> LabeledCsv {
        LabeledCsv {
            features,
            classes,
            header: true,
        }
    }

    /// Whether the first (non-blank) line is a header to skip; `true` by
    /// default.
    pub fn header(self, header: bool) -> LabeledCsv {
        LabeledCsv { header, ..self }
    }

    /// Loads the samples of the file at `path`.
    ///
    /// # Errors
    ///
    /// As [`load_labeled_csv`]; without a header, a file without samples is
    /// an error at line 1.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::data::{Dataset, LabeledCsv};
    ///
    /// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv");
    /// let digits = LabeledCsv::new(64, 10).load(path)?;
    /// assert_eq!(digits.len(), 1797);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn load(&self, path: impl AsRef<Path>) -> Result<TensorDataset> {
        self.load_as("LabeledCsv::load", path.as_ref())
    }

    /// Parses the samples read from `reader`; `source_name` names the
    /// source in errors.
    ///
    /// # Errors
    ///
    /// As [`load`](LabeledCsv::load); an error reading from `reader` is an
    /// [`Error::Io`].
    pub fn parse(&self, reader: impl Read, source_name: &str) -> Result<TensorDataset> {
        self.parse_as("LabeledCsv::parse", reader, source_name)
    }

    fn load_as(&self, op: &'static str, path: &Path) -> Result<TensorDataset> {
        let file = File::open(path).map_err(|err| Error::Io {
            op,
            path: path.display().to_string(),
            kind: err.kind(),
            message: err.to_string(),
        })?;
        self.parse_as(op, file, &path.display().to_string())
    }

    fn parse_as(
        &self,
        op: &'static str,
        reader: impl Read,
        source_name: &str,
    ) -> Result<TensorDataset> {
        let LabeledCsv {
            features,
            classes,
            header,
        } = *self;
        let columns = features
            .checked_add(1)
            .ok_or_else(|| Error::InvalidArgument {
                op,
                message: format!("{features} features and a label do not fit a usize"),
            })?;
        let parse_error = |line: usize, message: String| Error::Parse {
            source_name: source_name.to_string(),
            line,
            message,
        };
        // The whole text is read first: a record's line is computed from its
        // byte offset (below), and the samples take about as much memory as
        // their text anyway.
        let mut text = Vec::new();
        let mut reader = reader;
        reader.read_to_end(&mut text).map_err(|err| Error::Io {
            op,
            path: source_name.to_string(),
            kind: err.kind(),
            message: err.to_string(),
        })?;
        // No header handling, quoting or trimming by the csv crate: every
        // record comes as raw cells with its offset, and the checks are ours.
        let mut records = ::csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(text.as_slice());
        let mut lines = LineCounter::new(&text);
        let mut record = ::csv::ByteRecord::new();
        let mut inputs = Vec::new();
        let mut targets = Vec::new();
        let mut saw_header = !header;
        loop {
            match records.read_byte_record(&mut record) {
                Ok(true) => {}
                Ok(false) => break,
                // Reading a slice has no I/O errors, and a flexible reader
                // of byte records reports no others; kept as a parse error
                // all the same.
                Err(err) => {
                    let line = err
                        .position()
                        .map_or(lines.line, |p| lines.record_line(p.byte()));
                    return Err(parse_error(line, err.to_string()));
                }
            }
            let line = record
                .position()
                .map_or(lines.line, |p| lines.record_line(p.byte()));
            // The csv crate skips empty lines; a line of spaces is one
            // blank cell.
            if record.len() == 1 && std::str::from_utf8(&record[0]).is_ok_and(is_blank) {
                continue;
            }
            let found = record.len();
            if found != columns {
                let what = if saw_header { "row" } else { "header" };
                return Err(parse_error(
                    line,
                    format!(
                        "expected {columns} columns ({features} features and a label), found {found} in the {what}"
                    ),
                ));
            }
            let cells = record.iter().enumerate().map(|(index, bytes)| {
                std::str::from_utf8(bytes).map(unquoted).map_err(|_| {
                    parse_error(line, format!("invalid UTF-8 in column {}", index + 1))
                })
            });
            if !saw_header {
                saw_header = true;
                // The names are not used, but must be text.
                for cell in cells {
                    cell?;
                }
                continue;
            }
            for (index, cell) in cells.enumerate() {
                let cell = cell?;
                if index < features {
                    let value = number(cell).map_err(|problem| {
                        parse_error(line, format!("column {}: {problem}", index + 1))
                    })?;
                    inputs.push(value);
                } else {
                    let label = number(cell)
                        .ok()
                        .filter(|v| v.fract() == 0.0 && *v >= 0.0 && (*v as usize) < classes)
                        .ok_or_else(|| {
                            parse_error(
                                line,
                                format!(
                                    "label `{}` is not a class index in 0..{classes}",
                                    shown(cell)
                                ),
                            )
                        })?;
                    // `-0` is class 0.
                    targets.push(label.abs());
                }
            }
        }
        if !saw_header {
            return Err(parse_error(1, "missing header line".to_string()));
        }
        if targets.is_empty() {
            return Err(if header {
                parse_error(2, "no samples after the header".to_string())
            } else {
                parse_error(1, "no samples".to_string())
            });
        }
        let n = targets.len();
        TensorDataset::new(
            Tensor::from_vec(inputs, &[n, features])?,
            Tensor::from_vec(targets, &[n])?,
        )
    }
}

/// Line numbers of records from their byte offsets.
///
/// The csv crate's own line count misses the blank lines it skips before a
/// record, and a `\r\n` whose `\n` it consumes with the next record: the
/// offset it gives for a record is where it started reading, before any
/// such line ends. The record's first line is the one of the first byte
/// there that ends no line. A line ends with `\n`, `\r\n` or a lone `\r`,
/// as records do.
struct LineCounter<'a> {
    text: &'a [u8],
    /// A byte offset, never decreasing...
    offset: usize,
    /// ...and the line it is on, from 1.
    line: usize,
}

impl<'a> LineCounter<'a> {
    fn new(text: &'a [u8]) -> LineCounter<'a> {
        LineCounter {
            text,
            offset: 0,
            line: 1,
        }
    }

    /// Whether the byte at `i` ends a line (the `\n` of a `\r\n` does).
    fn ends_line(&self, i: usize) -> bool {
        match self.text[i] {
            b'\n' => true,
            b'\r' => self.text.get(i + 1) != Some(&b'\n'),
            _ => false,
        }
    }

    /// The line of the record the csv reader started reading at `offset`.
    /// Records come in order, so each call scans only bytes after the last.
    fn record_line(&mut self, offset: u64) -> usize {
        let offset = usize::try_from(offset).map_or(self.text.len(), |o| o.min(self.text.len()));
        while self.offset < offset {
            self.line += usize::from(self.ends_line(self.offset));
            self.offset += 1;
        }
        while matches!(self.text.get(self.offset), Some(b'\r' | b'\n')) {
            self.line += usize::from(self.ends_line(self.offset));
            self.offset += 1;
        }
        self.line
    }
}

/// A cell's value: without the spaces around it, and without quotes that
/// spaces kept the csv crate from seeing (it reads quotes only at the very
/// start of a cell, as in `1, "2"`).
fn unquoted(cell: &str) -> &str {
    let cell = cell.trim();
    match cell.strip_prefix('"').and_then(|c| c.strip_suffix('"')) {
        Some(inner) => inner.trim(),
        None => cell,
    }
}

fn is_blank(text: &str) -> bool {
    text.trim().is_empty()
}

/// The finite number in a trimmed `cell`, or what is wrong with it.
fn number(cell: &str) -> std::result::Result<f32, String> {
    if cell.is_empty() {
        return Err("empty cell, expected a number".to_string());
    }
    match cell.parse::<f32>() {
        Ok(value) if value.is_finite() => Ok(value),
        Ok(_) => Err(format!("`{}` is not a finite number", shown(cell))),
        Err(_) => Err(format!("`{}` is not a number", shown(cell))),
    }
}

/// A cell as quoted in a message: at most 40 characters, control characters
/// escaped, so a giant or binary cell cannot flood the message.
fn shown(cell: &str) -> String {
    const MAX: usize = 40;
    let mut text = String::new();
    for (count, c) in cell.chars().enumerate() {
        if count == MAX {
            text.push('…');
            break;
        }
        if c.is_control() {
            text.extend(c.escape_debug());
        } else {
            text.push(c);
        }
    }
    text
}
