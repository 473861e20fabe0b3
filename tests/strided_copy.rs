//! Copies of strided views into row-major order (the fast path of
//! `reshape` after a `permute`/`transpose`, of `to_vec`, of ops on a
//! slice) compared with a copy computed element by element from the
//! original values and the index arithmetic of the view.

use netcl::Tensor;
use proptest::prelude::*;

/// Values whose bit patterns are all distinct, with NaNs of different
/// payloads and signed zeros among them.
fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| match i % 7 {
            3 => f32::from_bits(0x7fc0_0000 | (i as u32 & 0x3f_ffff)),
            5 => f32::from_bits(0xffa0_0000 | (i as u32 & 0x1f_ffff)),
            6 if i % 2 == 0 => -0.0,
            _ => i as f32 * 0.5 - 3.0,
        })
        .collect()
}

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The elements of `src` (row-major, of `shape`) read through axes
/// permuted by `perm`, one index at a time.
fn naive_permute(src: &[f32], shape: &[usize], perm: &[usize]) -> Vec<f32> {
    let old = strides(shape);
    let new_shape: Vec<usize> = perm.iter().map(|&a| shape[a]).collect();
    let n: usize = new_shape.iter().product();
    let mut out = Vec::with_capacity(n);
    for flat in 0..n {
        let mut rest = flat;
        let mut offset = 0;
        for i in (0..new_shape.len()).rev() {
            let idx = rest % new_shape[i];
            rest /= new_shape[i];
            offset += idx * old[perm[i]];
        }
        out.push(src[offset]);
    }
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A shape of 1 to 5 axes of length 0 to 5 (unit axes likely) and a
/// permutation of its axes.
fn shape_and_perm() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    prop::collection::vec(0usize..6, 1..=5).prop_flat_map(|shape| {
        let rank = shape.len();
        (
            Just(shape),
            Just((0..rank).collect::<Vec<_>>()).prop_shuffle(),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_permuted_view_reshaped_copies_every_bit((shape, perm) in shape_and_perm()) {
        let n: usize = shape.iter().product();
        let src = values(n);
        let t = Tensor::from_vec(src.clone(), &shape).unwrap();
        let dims: Vec<isize> = perm.iter().map(|&a| a as isize).collect();
        let p = t.permute(&dims);
        let expected = naive_permute(&src, &shape, &perm);
        prop_assert_eq!(bits(&p.to_vec()), bits(&expected));
        let flat = p.reshape(&[n]);
        prop_assert_eq!(bits(&flat.to_vec()), bits(&expected));
        // Reshaped to another grouping of the same values, then back.
        let permuted: Vec<usize> = perm.iter().map(|&a| shape[a]).collect();
        if let Some((&first, rest)) = permuted.split_first() {
            let rest: usize = rest.iter().product();
            let two = p.reshape(&[first, rest]);
            prop_assert_eq!(two.shape(), &[first, rest][..]);
            prop_assert_eq!(bits(&two.to_vec()), bits(&expected));
        }
    }

    #[test]
    fn a_permuted_slice_copies_every_bit(
        (shape, perm) in shape_and_perm(),
        axis in 0usize..5,
        start in 0usize..6,
        len in 0usize..6,
    ) {
        let axis = axis % shape.len();
        let start = start.min(shape[axis]);
        let len = len.min(shape[axis] - start);
        let n: usize = shape.iter().product();
        let src = values(n);
        let t = Tensor::from_vec(src.clone(), &shape).unwrap();
        let narrowed = t.narrow(axis as isize, start as isize, len);
        let mut sliced_shape = shape.clone();
        sliced_shape[axis] = len;
        // The expected slice, element by element.
        let old = strides(&shape);
        let m: usize = sliced_shape.iter().product();
        let sliced: Vec<f32> = (0..m)
            .map(|flat| {
                let mut rest = flat;
                let mut offset = 0;
                for i in (0..shape.len()).rev() {
                    let mut idx = rest % sliced_shape[i];
                    rest /= sliced_shape[i];
                    if i == axis {
                        idx += start;
                    }
                    offset += idx * old[i];
                }
                src[offset]
            })
            .collect();
        prop_assert_eq!(bits(&narrowed.to_vec()), bits(&sliced));
        let dims: Vec<isize> = perm.iter().map(|&a| a as isize).collect();
        let p = narrowed.permute(&dims).reshape(&[m]);
        prop_assert_eq!(bits(&p.to_vec()), bits(&naive_permute(&sliced, &sliced_shape, &perm)));
    }

    #[test]
    fn a_strided_map_keeps_the_order(rows in 0usize..7, cols in 0usize..7) {
        // exp of a transpose: an op on a strided view.
        let src: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.01).collect();
        let t = Tensor::from_vec(src.clone(), &[rows, cols]).unwrap().t();
        let got = (&t * 2.0).to_vec();
        let expected: Vec<f32> = naive_permute(&src, &[rows, cols], &[1, 0])
            .into_iter()
            .map(|v| v * 2.0)
            .collect();
        prop_assert_eq!(bits(&got), bits(&expected));
    }
}

#[test]
fn attention_head_split_and_merge_round_trip() {
    // The layout changes of multi-head attention: [N, L, H, Dh] ->
    // [N, H, L, Dh] -> back, with gradients through the copies.
    let (n, l, h, dh) = (2, 5, 3, 4);
    let src = values(n * l * h * dh);
    let x = Tensor::from_vec(src.clone(), &[n, l, h * dh])
        .unwrap()
        .requires_grad_(true);
    let heads = x.reshape(&[n, l, h, dh]).permute(&[0, 2, 1, 3]);
    let merged = heads.permute(&[0, 2, 1, 3]).reshape(&[n, l, h * dh]);
    assert_eq!(bits(&merged.to_vec()), bits(&src));
    let w = Tensor::from_vec((0..src.len()).map(|i| i as f32).collect(), &[n, h, l, dh]).unwrap();
    (&heads.reshape(&[n, h, l, dh]) * &w).sum().backward();
    let grad = x.grad().unwrap().to_vec();
    let expected = naive_permute(&w.to_vec(), &[n, h, l, dh], &[0, 2, 1, 3]);
    assert_eq!(bits(&grad), bits(&expected));
}
