//! `netcl::rand`, the re-exported `rand`, is all a user needs to make the
//! generators netcl's constructors take; the seed-taking constructors build
//! what their generator-taking twins build from the same seed.
//!
//! These tests name `rand` only through `netcl::rand`.

use netcl::Tensor;
use netcl::nn::{Activation, Linear, Mlp, Module};
use netcl::rand::rngs::StdRng;
use netcl::rand::{Rng, SeedableRng};

fn parameters(model: &impl Module) -> Vec<(String, Vec<f32>)> {
    model
        .named_parameters()
        .into_iter()
        .map(|(name, p)| (name, p.to_vec()))
        .collect()
}

#[test]
fn the_reexported_rng_drives_netcl_constructors() {
    // A generic function bounded by the re-exported trait accepts netcl's
    // constructors' generator: one `rand`, not two versions side by side.
    fn draw(rng: &mut impl Rng) -> Tensor {
        Tensor::rand(&[2, 3], rng)
    }
    let mut rng = StdRng::seed_from_u64(3);
    let a = draw(&mut rng);
    let b = draw(&mut rng);
    assert_eq!(a.shape(), &[2, 3]);
    assert!(a.to_vec().iter().all(|v| (0.0..1.0).contains(v)));
    assert_ne!(a.to_vec(), b.to_vec(), "the generator advanced");
    assert_eq!(a.to_vec(), draw(&mut StdRng::seed_from_u64(3)).to_vec());
}

#[test]
fn linear_seeded_is_new_with_a_seeded_std_rng() {
    let seeded = Linear::seeded(5, 4, 11);
    let explicit = Linear::new(5, 4, &mut StdRng::seed_from_u64(11));
    assert_eq!(parameters(&seeded), parameters(&explicit));
    assert_eq!((seeded.in_features(), seeded.out_features()), (5, 4));
    assert!(seeded.bias().is_some());
    assert!(seeded.weight().requires_grad());
    assert_ne!(parameters(&seeded), parameters(&Linear::seeded(5, 4, 12)));
}

#[test]
fn mlp_seeded_is_new_with_a_seeded_std_rng() {
    let dims = [6, 16, 16, 3];
    let seeded = Mlp::seeded(&dims, Activation::Relu, 99);
    let explicit = Mlp::new(&dims, Activation::Relu, &mut StdRng::seed_from_u64(99));
    assert_eq!(parameters(&seeded), parameters(&explicit));
    assert_eq!(seeded.dims(), &dims);
    assert_ne!(
        parameters(&seeded),
        parameters(&Mlp::seeded(&dims, Activation::Relu, 100))
    );
}

#[test]
#[should_panic(expected = "Linear: sizes must be positive, got 0 -> 4")]
fn linear_seeded_panics_like_new() {
    let _ = Linear::seeded(0, 4, 1);
}

#[test]
#[should_panic(expected = "Mlp: need at least an input and an output width, got [8]")]
fn mlp_seeded_panics_like_new() {
    let _ = Mlp::seeded(&[8], Activation::Relu, 1);
}
