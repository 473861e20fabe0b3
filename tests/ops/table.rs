//! The sample table: every case of `tests/fixtures/ops_*.json`, written by
//! `scripts/torch_fixtures.py` with PyTorch in float64.

use std::path::{Path, PathBuf};

use netcl::Tensor;
use serde_json::Value;

/// One input of a case.
pub struct Input {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    pub requires_grad: bool,
    /// View transforms applied to the leaf before the op.
    pub prep: Vec<Value>,
}

/// Values PyTorch computed, in float64.
pub struct Expected {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

/// One case of the table.
pub struct Case {
    pub family: String,
    pub name: String,
    pub op: String,
    pub args: Value,
    pub inputs: Vec<Input>,
    pub outputs: Vec<Expected>,
    /// The weighting `r` of each output in `L = Σ r·y` (`None` for an
    /// output without gradient, such as indices).
    pub weights: Vec<Option<Vec<f32>>>,
    /// `∂L/∂input` for the inputs that require grad.
    pub grads: Vec<Option<Expected>>,
    /// Whether central differences apply (no ties or kinks nearby).
    pub fd: bool,
    pub atol: f64,
    pub rtol: f64,
}

impl Case {
    /// `family/name`, for messages.
    pub fn label(&self) -> String {
        format!("{}/{}", self.family, self.name)
    }

    /// Fresh leaves with the case's values, requiring grad as the case
    /// says, or not at all.
    pub fn leaves(&self, grad: bool) -> Vec<Tensor> {
        self.inputs
            .iter()
            .map(|input| {
                Tensor::from_vec(input.data.clone(), &input.shape)
                    .expect("fixture input")
                    .requires_grad_(grad && input.requires_grad)
            })
            .collect()
    }

    /// The op's arguments: `leaves` with each input's view transforms
    /// applied.
    pub fn prepared(&self, leaves: &[Tensor]) -> Vec<Tensor> {
        leaves
            .iter()
            .zip(&self.inputs)
            .map(|(leaf, input)| prep(leaf, &input.prep))
            .collect()
    }
}

fn prep(leaf: &Tensor, steps: &[Value]) -> Tensor {
    let mut t = leaf.clone();
    for step in steps {
        let step = step.as_array().expect("a prep step is a list");
        match step[0].as_str().expect("prep name") {
            "transpose" => t = t.transpose(int(&step[1]) as isize, int(&step[2]) as isize),
            "permute" => {
                let dims: Vec<isize> = step[1]
                    .as_array()
                    .expect("permute dims")
                    .iter()
                    .map(|d| int(d) as isize)
                    .collect();
                t = permute(&t, &dims);
            }
            other => panic!("unknown prep step {other:?}"),
        }
    }
    t
}

/// A permutation as a sequence of transpositions (selection sort), so the
/// table does not depend on a `permute` op to build its inputs.
fn permute(t: &Tensor, dims: &[isize]) -> Tensor {
    let mut order: Vec<isize> = (0..dims.len() as isize).collect();
    let mut t = t.clone();
    for (i, &dim) in dims.iter().enumerate() {
        let j = order.iter().position(|&d| d == dim).expect("a permutation");
        if i != j {
            t = t.transpose(i as isize, j as isize);
            order.swap(i, j);
        }
    }
    t
}

fn int(v: &Value) -> i64 {
    v.as_i64().expect("an integer")
}

fn shape(v: &Value) -> Vec<usize> {
    v.as_array()
        .expect("a shape")
        .iter()
        .map(|d| d.as_u64().expect("a length") as usize)
        .collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    f64s(v).into_iter().map(|x| x as f32).collect()
}

/// A number, or one of the strings "inf", "-inf" and "nan" the generator
/// writes for what JSON cannot hold.
fn number(x: &Value) -> f64 {
    match x {
        Value::String(s) => s.parse().unwrap_or_else(|_| panic!("not a number: {s:?}")),
        _ => x.as_f64().unwrap_or_else(|| panic!("not a number: {x}")),
    }
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().expect("values").iter().map(number).collect()
}

fn expected(v: &Value) -> Expected {
    Expected {
        shape: shape(&v["shape"]),
        data: f64s(&v["data"]),
    }
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Every case of every family's fixture file.
pub fn load() -> Vec<Case> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .expect("tests/fixtures")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ops_") && n.ends_with(".json"))
        })
        .collect();
    files.sort();
    let mut cases = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("fixture file");
        let doc: Value = serde_json::from_str(&text).expect("fixture JSON");
        let family = doc["family"].as_str().expect("family").to_string();
        for c in doc["cases"].as_array().expect("cases") {
            let tol = c["tol"].as_array().expect("tol");
            cases.push(Case {
                family: family.clone(),
                name: c["name"].as_str().expect("name").to_string(),
                op: c["op"].as_str().expect("op").to_string(),
                args: c["args"].clone(),
                inputs: c["inputs"]
                    .as_array()
                    .expect("inputs")
                    .iter()
                    .map(|i| Input {
                        shape: shape(&i["shape"]),
                        data: f32s(&i["data"]),
                        requires_grad: i["requires_grad"].as_bool().expect("requires_grad"),
                        prep: i["prep"].as_array().cloned().unwrap_or_default(),
                    })
                    .collect(),
                outputs: c["outputs"]
                    .as_array()
                    .expect("outputs")
                    .iter()
                    .map(expected)
                    .collect(),
                weights: c["weights"]
                    .as_array()
                    .expect("weights")
                    .iter()
                    .map(|w| (!w.is_null()).then(|| f32s(w)))
                    .collect(),
                grads: c["grads"]
                    .as_array()
                    .expect("grads")
                    .iter()
                    .map(|g| (!g.is_null()).then(|| expected(g)))
                    .collect(),
                fd: c["fd"].as_bool().unwrap_or(true),
                atol: tol[0].as_f64().expect("atol"),
                rtol: tol[1].as_f64().expect("rtol"),
            });
        }
    }
    cases
}

/// Argument accessors for the families' dispatch functions.
#[allow(dead_code, reason = "each family uses the accessors its ops need")]
pub trait Args {
    fn usize(&self, key: &str) -> usize;
    fn isize(&self, key: &str) -> isize;
    fn f32(&self, key: &str) -> f32;
    fn bool(&self, key: &str) -> bool;
    fn usizes(&self, key: &str) -> Vec<usize>;
    fn isizes(&self, key: &str) -> Vec<isize>;
    fn has(&self, key: &str) -> bool;
}

impl Args for Value {
    fn usize(&self, key: &str) -> usize {
        self[key]
            .as_u64()
            .unwrap_or_else(|| panic!("arg {key}: {}", self[key])) as usize
    }
    fn isize(&self, key: &str) -> isize {
        self[key]
            .as_i64()
            .unwrap_or_else(|| panic!("arg {key}: {}", self[key])) as isize
    }
    fn f32(&self, key: &str) -> f32 {
        number(&self[key]) as f32
    }
    fn bool(&self, key: &str) -> bool {
        self[key]
            .as_bool()
            .unwrap_or_else(|| panic!("arg {key}: {}", self[key]))
    }
    fn usizes(&self, key: &str) -> Vec<usize> {
        shape(&self[key])
    }
    fn isizes(&self, key: &str) -> Vec<isize> {
        self[key]
            .as_array()
            .unwrap_or_else(|| panic!("arg {key}: {}", self[key]))
            .iter()
            .map(|d| int(d) as isize)
            .collect()
    }
    fn has(&self, key: &str) -> bool {
        !self[key].is_null()
    }
}
