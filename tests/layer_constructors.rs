//! Every layer constructor that can fail has a panicking form and a `try_`
//! twin: `try_new` returns the named error for bad arguments (and never
//! panics, even for sizes too large to allocate), and `new` panics with that
//! error's message.

use std::panic::{AssertUnwindSafe, catch_unwind};

use netcl::nn::{
    BatchNorm1d, BatchNorm2d, Embedding, LayerNorm, Module, MultiheadAttention, RmsNorm,
    TiedLinear, TransformerBlock,
};
use netcl::{Error, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn rng() -> StdRng {
    StdRng::seed_from_u64(0)
}

/// The message `f` panics with (it must panic).
fn panic_message<T>(f: impl FnOnce() -> T) -> String {
    let payload = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(_) => panic!("expected a panic"),
        Err(payload) => payload,
    };
    if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else {
        panic!("a panic without a message")
    }
}

/// `try_new` failed with `err`, and `new` with the same arguments panics
/// with exactly its message.
fn panics_with(err: &Error, new: impl FnOnce()) {
    assert_eq!(panic_message(new), err.to_string());
}

#[test]
fn batch_norm_try_new_rejects_zero_features_and_new_panics() {
    let err = BatchNorm1d::try_new(0).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { op: "BatchNorm1d", ref message } if message.contains("num_features") && message.contains("got 0")),
        "{err}"
    );
    panics_with(&err, || {
        BatchNorm1d::new(0);
    });
    let err = BatchNorm1d::try_without_affine(0).unwrap_err();
    panics_with(&err, || {
        BatchNorm1d::without_affine(0);
    });

    let err = BatchNorm2d::try_new(0).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                op: "BatchNorm2d",
                ..
            }
        ),
        "{err}"
    );
    panics_with(&err, || {
        BatchNorm2d::new(0);
    });
    let err = BatchNorm2d::try_without_affine(0).unwrap_err();
    panics_with(&err, || {
        BatchNorm2d::without_affine(0);
    });

    let err = BatchNorm1d::try_new(usize::MAX).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeTooLarge {
                op: "BatchNorm1d",
                ..
            }
        ),
        "{err}"
    );

    // Good arguments: the two forms build the same layer.
    let (a, b) = (BatchNorm2d::new(3), BatchNorm2d::try_new(3).unwrap());
    assert_eq!(a.named_buffers().len(), b.named_buffers().len());
    assert!(BatchNorm2d::without_affine(3).weight().is_none());
}

#[test]
fn layer_norm_and_rms_norm_try_new_reject_bad_shapes_and_new_panics() {
    for shape in [&[][..], &[4, 0]] {
        let err = LayerNorm::try_new(shape).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { op: "LayerNorm", ref message } if message.contains(&format!("{shape:?}"))),
            "{err}"
        );
        panics_with(&err, || {
            LayerNorm::new(shape);
        });
        let err = LayerNorm::try_without_affine(shape).unwrap_err();
        panics_with(&err, || {
            LayerNorm::without_affine(shape);
        });

        let err = RmsNorm::try_new(shape).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { op: "RmsNorm", .. }),
            "{err}"
        );
        panics_with(&err, || {
            RmsNorm::new(shape);
        });
        let err = RmsNorm::try_without_affine(shape).unwrap_err();
        panics_with(&err, || {
            RmsNorm::without_affine(shape);
        });
    }
    // A shape too large to allocate is an error, not a panic in `try_new`.
    let huge = [usize::MAX / 2, 4];
    let err = LayerNorm::try_new(&huge).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeTooLarge {
                op: "LayerNorm",
                ..
            }
        ),
        "{err}"
    );
    let err = RmsNorm::try_new(&huge).unwrap_err();
    assert!(
        matches!(err, Error::ShapeTooLarge { op: "RmsNorm", .. }),
        "{err}"
    );
    assert!(LayerNorm::without_affine(&[4]).weight().is_none());
    assert!(RmsNorm::without_affine(&[4]).weight().is_none());
}

#[test]
fn embedding_try_new_rejects_bad_sizes_and_new_panics() {
    for (num, dim) in [(0, 4), (10, 0)] {
        let err = Embedding::try_new(num, dim, &mut rng()).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { op: "Embedding", ref message } if message.contains(&format!("{num} x {dim}"))),
            "{err}"
        );
        panics_with(&err, || {
            Embedding::new(num, dim, &mut rng());
        });
    }
    let err = Embedding::try_new(usize::MAX / 2, 4, &mut rng()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeTooLarge {
                op: "Embedding",
                ..
            }
        ),
        "{err}"
    );
    // Same generator, same table, from either form.
    assert_eq!(
        Embedding::new(5, 3, &mut rng()).weight().to_vec(),
        Embedding::try_new(5, 3, &mut rng())
            .unwrap()
            .weight()
            .to_vec()
    );
}

#[test]
fn multihead_attention_try_new_rejects_bad_heads_and_new_panics() {
    for (d, h) in [(0, 1), (8, 0), (10, 4)] {
        let err = MultiheadAttention::try_new(d, h, &mut rng()).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { op: "MultiheadAttention", ref message } if message.contains(&format!("num_heads ({h})")) && message.contains(&format!("embed_dim ({d})"))),
            "{err}"
        );
        panics_with(&err, || {
            MultiheadAttention::new(d, h, &mut rng());
        });
    }
    // [3·d, d] overflows: an error, not a panic.
    let err = MultiheadAttention::try_new(1 << 40, 1, &mut rng()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ShapeTooLarge {
                op: "MultiheadAttention",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        MultiheadAttention::new(8, 2, &mut rng())
            .in_proj_weight()
            .to_vec(),
        MultiheadAttention::try_new(8, 2, &mut rng())
            .unwrap()
            .in_proj_weight()
            .to_vec()
    );
}

#[test]
fn transformer_block_try_new_rejects_bad_sizes_and_new_panics() {
    let err = TransformerBlock::try_new(8, 3, 16, &mut rng()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                op: "MultiheadAttention",
                ..
            }
        ),
        "{err}"
    );
    panics_with(&err, || {
        TransformerBlock::new(8, 3, 16, &mut rng());
    });
    // A zero MLP width is the MLP's Linear's error.
    let err = TransformerBlock::try_new(8, 2, 0, &mut rng()).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { op: "Linear", ref message } if message.contains("8 -> 0")),
        "{err}"
    );
    panics_with(&err, || {
        TransformerBlock::new(8, 2, 0, &mut rng());
    });
    let err = TransformerBlock::try_new(8, 2, usize::MAX / 4, &mut rng()).unwrap_err();
    assert!(matches!(err, Error::ShapeTooLarge { .. }), "{err}");
    assert_eq!(
        TransformerBlock::new(8, 2, 16, &mut rng())
            .parameters()
            .len(),
        TransformerBlock::try_new(8, 2, 16, &mut rng())
            .unwrap()
            .parameters()
            .len()
    );
}

#[test]
fn tied_linear_try_new_rejects_bad_weights_and_biases_and_new_panics() {
    let table = Tensor::zeros(&[5, 2]).requires_grad_(true);
    // A weight that is not 2-D.
    let err = TiedLinear::try_new(&Tensor::zeros(&[10]), None).unwrap_err();
    assert!(
        matches!(err, Error::Rank { op: "TiedLinear", ref shape, .. } if shape == &[10]),
        "{err}"
    );
    panics_with(&err, || {
        TiedLinear::new(&Tensor::zeros(&[10]), None);
    });
    // A bias that is not [out_features]: expected [5], found [2].
    let err = TiedLinear::try_new(&table, Some(Tensor::zeros(&[2]))).unwrap_err();
    assert!(
        matches!(err, Error::ShapeMismatch { op: "TiedLinear", ref lhs, ref rhs } if lhs == &[5] && rhs == &[2]),
        "{err}"
    );
    {
        let table = table.clone();
        panics_with(&err, move || {
            TiedLinear::new(&table, Some(Tensor::zeros(&[2])));
        });
    }
    // A bias computed by a recorded op.
    let computed = &Tensor::zeros(&[5]).requires_grad_(true) * 2.0;
    let err = TiedLinear::try_new(&table, Some(computed.clone())).unwrap_err();
    assert!(matches!(err, Error::NotLeaf { .. }), "{err}");
    {
        let table = table.clone();
        panics_with(&err, move || {
            TiedLinear::new(&table, Some(computed));
        });
    }
    // Good arguments: the weight is shared, not copied.
    assert!(TiedLinear::new(&table, None).weight().same_tensor(&table));
}
