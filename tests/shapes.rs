//! Shapes at the edges (issue 9): zero-size shapes compute as `matmul`
//! does, and shapes too large to exist are errors from the `try_` forms,
//! never panics. Each test was written to fail on the code before its fix.

use netcl::rand::SeedableRng;
use netcl::{Error, Tensor};

fn tensor(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(values.to_vec(), shape).unwrap()
}

#[test]
fn linear_with_no_input_features_gives_the_bias() {
    let x = Tensor::zeros(&[5, 0]).requires_grad_(true);
    let w = Tensor::zeros(&[0, 3]).requires_grad_(true);
    let b = tensor(&[1.0, 2.0, 3.0], &[3]).requires_grad_(true);
    let y = x.try_linear(&w, Some(&b)).unwrap();
    assert_eq!(y.shape(), &[5, 3]);
    assert_eq!(y.to_vec(), [1.0, 2.0, 3.0].repeat(5));
    let y0 = x.try_linear(&w, None).unwrap();
    assert_eq!(y0.shape(), &[5, 3]);
    assert_eq!(y0.to_vec(), vec![0.0; 15]);
    // Matches matmul.
    assert_eq!(y0.to_vec(), x.matmul(&w).to_vec());
    y.sum().backward();
    assert_eq!(x.grad().unwrap().shape(), &[5, 0]);
    assert_eq!(w.grad().unwrap().shape(), &[0, 3]);
    // d/db Σ y = the number of rows.
    assert_eq!(b.grad().unwrap().to_vec(), vec![5.0; 3]);

    // Leading batch axes, one of them empty.
    let x = Tensor::zeros(&[2, 0, 0]);
    assert_eq!(x.try_linear(&w, Some(&b)).unwrap().shape(), &[2, 0, 3]);
}

#[test]
fn linear_with_no_output_features_backpropagates_zero_gradients() {
    let x = Tensor::ones(&[5, 4]).requires_grad_(true);
    let w = Tensor::ones(&[4, 0]).requires_grad_(true);
    let b = Tensor::zeros(&[0]).requires_grad_(true);
    let y = x.try_linear(&w, Some(&b)).unwrap();
    assert_eq!(y.shape(), &[5, 0]);
    y.sum().try_backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec(), vec![0.0; 20]);
    assert_eq!(x.grad().unwrap().shape(), &[5, 4]);
    assert_eq!(w.grad().unwrap().shape(), &[4, 0]);
    assert_eq!(b.grad().unwrap().shape(), &[0]);

    let x = Tensor::ones(&[2, 3, 4]).requires_grad_(true);
    x.linear(&w, None).sum().backward();
    assert_eq!(x.grad().unwrap().to_vec(), vec![0.0; 24]);
}

const HUGE: usize = (1 << 63) + 1;

fn is_too_large(result: netcl::Result<Tensor>, op: &str) {
    match result {
        Err(Error::ShapeTooLarge { op: got, .. }) => assert_eq!(got, op),
        other => panic!("expected ShapeTooLarge from {op}, got {other:?}"),
    }
}

#[test]
fn overflowing_shapes_are_errors() {
    // The product wraps to 2 in release builds and matched the data.
    is_too_large(Tensor::from_vec(vec![1.0, 2.0], &[HUGE, 2]), "from_vec");
    is_too_large(tensor(&[1.0, 2.0], &[2]).try_reshape(&[HUGE, 2]), "reshape");
    // Zero elements, but axes whose other lengths overflow.
    let big = 1 << 62;
    is_too_large(Tensor::from_vec(vec![], &[0, big, big]), "from_vec");
    is_too_large(Tensor::zeros(&[0]).try_reshape(&[big, big, 0]), "reshape");
    let err = Tensor::from_vec(vec![], &[0, big, big]).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "from_vec: shape [0, {big}, {big}] is too large: the product of its non-zero lengths must be at most {}",
            Tensor::MAX_ELEMENTS
        )
    );
    // A zero-size shape with large axes that fit is fine.
    let empty = Tensor::from_vec(vec![], &[0, 1 << 40]).unwrap();
    assert_eq!(empty.numel(), 0);
    assert_eq!(
        empty.try_reshape(&[1 << 40, 0, 3]).unwrap().shape(),
        &[1 << 40, 0, 3]
    );
}

#[test]
fn broadcasts_and_products_of_empty_tensors_with_huge_axes_are_errors() {
    let a = Tensor::zeros(&[0, 1, 1 << 40]);
    let b = Tensor::zeros(&[0, 1 << 40, 1]);
    is_too_large(a.try_add(&b), "add");
    is_too_large(a.try_mul(&b), "mul");
    assert!(matches!(a.try_gt(&b), Err(Error::ShapeTooLarge { .. })));
    // [0, 2^40, 0] · [0, 0, 2^40] = [0, 2^40, 2^40].
    let a = Tensor::zeros(&[0, 1 << 40, 0]);
    let b = Tensor::zeros(&[0, 0, 1 << 40]);
    is_too_large(a.try_matmul(&b), "matmul");
    // [2^31, 0] · [0, 2^31] would hold 2^62 elements.
    let x = Tensor::zeros(&[1 << 31, 0]);
    let w = Tensor::zeros(&[0, 1 << 31]);
    is_too_large(x.try_matmul(&w), "matmul");
    is_too_large(x.try_linear(&w, None), "linear");
}

#[test]
fn arange_past_the_limit_is_an_error() {
    // Before: "capacity overflow".
    for (start, end, step) in [(0.0, 1e10, 1e-10), (0.0, 3e38, 1e-38), (-1e38, 1e38, 1.0)] {
        match Tensor::try_arange(start, end, step) {
            Err(Error::InvalidArgument {
                op: "arange",
                message,
            }) => {
                assert!(message.contains("elements"), "{message}")
            }
            other => panic!("arange({start}, {end}, {step}): {other:?}"),
        }
    }
    assert_eq!(
        Tensor::try_arange(0.0, 3.0, 1.0).unwrap().to_vec(),
        vec![0.0, 1.0, 2.0]
    );
    assert_eq!(Tensor::try_arange(3.0, 0.0, 1.0).unwrap().numel(), 0);
}

#[test]
fn backward_through_empty_tensors_with_huge_axes_gives_zero_gradients() {
    // Before: the broadcast add's backward summed the [0, 2^40] gradient
    // over axis 0 into a [2^40] array and aborted allocating 4 TiB.
    let big = 1 << 40;
    let a = Tensor::zeros(&[0, big]).requires_grad_(true);
    let b = Tensor::ones(&[1]).requires_grad_(true);
    let c = Tensor::ones(&[1, 1]).requires_grad_(true);
    let y = (&(&a + &b) * &c).try_sub(&b).unwrap().try_div(&c).unwrap();
    assert_eq!(y.shape(), &[0, big]);
    y.sum().try_backward().unwrap();
    assert_eq!(a.grad().unwrap().shape(), &[0, big]);
    assert_eq!(b.grad().unwrap().to_vec(), vec![0.0]);
    assert_eq!(c.grad().unwrap().to_vec(), vec![0.0]);

    // A bias broadcast over an empty batch with a huge axis.
    let x = Tensor::zeros(&[0, big, 2]).requires_grad_(true);
    let w = Tensor::ones(&[2, 3]).requires_grad_(true);
    let bias = Tensor::ones(&[3]).requires_grad_(true);
    x.try_linear(&w, Some(&bias))
        .unwrap()
        .sum()
        .try_backward()
        .unwrap();
    assert_eq!(w.grad().unwrap().to_vec(), vec![0.0; 6]);
    assert_eq!(bias.grad().unwrap().to_vec(), vec![0.0; 3]);
    let w = Tensor::ones(&[2, 3]).requires_grad_(true);
    x.try_matmul(&w)
        .unwrap()
        .try_add(&bias)
        .unwrap()
        .sum()
        .try_backward()
        .unwrap();
    assert_eq!(w.grad().unwrap().to_vec(), vec![0.0; 6]);
}

#[test]
fn layers_too_large_to_exist_are_errors() {
    // Before: `Tensor::uniform` / `Tensor::full` panicked inside the
    // constructor.
    let huge = 1 << 32;
    let mut rng = netcl::rand::rngs::StdRng::seed_from_u64(0);
    for result in [
        netcl::nn::Linear::try_new(huge, huge, &mut rng).map(drop),
        netcl::nn::Linear::zeros(huge, huge).map(drop),
        netcl::nn::Mlp::try_new(&[huge, huge], netcl::nn::Activation::Relu, &mut rng).map(drop),
        netcl::nn::Mlp::zeros(&[huge, huge], netcl::nn::Activation::Relu).map(drop),
    ] {
        match result {
            Err(Error::ShapeTooLarge {
                op: "Linear",
                shape,
                ..
            }) => {
                assert_eq!(shape, vec![huge, huge])
            }
            other => panic!("expected ShapeTooLarge from Linear, got {other:?}"),
        }
    }
}

#[test]
fn empty_arrays_with_shapes_too_large_are_errors_not_panics_later() {
    // ndarray accepts an empty [0, 2^62]; as a tensor it used to make
    // `try_sum_axis(0, ..)` panic with "capacity overflow".
    let empty = || ndarray::ArrayD::<f32>::zeros(vec![0, 1 << 62]);
    is_too_large(Tensor::try_from_array(empty()), "from_array");
    let panic = std::panic::catch_unwind(|| Tensor::from_array(empty())).unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(
        message.contains("from_array: shape [0, 4611686018427387904] is too large"),
        "{message}"
    );
    // A custom op's output is checked the same way.
    let x = Tensor::zeros(&[1]).requires_grad_(true);
    let result = netcl::autograd::apply_op("huge_empty", &[&x], empty(), || {
        |_grad: ndarray::ArrayD<f32>, _grads: &mut netcl::autograd::InputGrads| {}
    });
    is_too_large(result, "huge_empty");
    // Within the limit an empty array is fine.
    let t = Tensor::try_from_array(ndarray::ArrayD::<f32>::zeros(vec![0, 1 << 40])).unwrap();
    assert_eq!(t.try_sum_axis(1, false).unwrap().shape(), &[0]);
}
