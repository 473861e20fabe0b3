//! The digits CNN: two blocks of conv, batch norm, ReLU and max pooling,
//! then a linear head.

use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::error::{Result, or_panic};
use crate::nn::{BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential};

/// The channels of the two convolution blocks of [`digits_cnn`].
pub const DIGITS_CNN_CHANNELS: [usize; 2] = [16, 32];

/// A CNN for `[N, 1, 8, 8]` images (the 8x8 digits of `data/digits.csv`)
/// and 10 classes, initialised from `seed`.
///
/// # Panics
///
/// Never in practice (the sizes are fixed and valid); see
/// [`try_digits_cnn`].
#[track_caller]
pub fn digits_cnn(seed: u64) -> Sequential {
    or_panic(try_digits_cnn(seed))
}

/// A CNN for `[N, 1, 8, 8]` images and 10 classes, initialised from `seed`
/// with PyTorch's default initialisation (uniform in `±1/√fan_in` for the
/// convolutions' and the head's weights and biases; batch norm scale 1,
/// shift 0): the PyTorch model
///
/// ```text
/// nn.Sequential(
///     nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),   # 16x4x4
///     nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 32x2x2
///     nn.Flatten(), nn.Linear(128, 10),
/// )
/// ```
///
/// with its names (`0.weight`, `1.running_mean`, `9.bias`, ...), so that
/// model's `state_dict` (saved with safetensors) loads with
/// [`io::load_torch`](crate::io::load_torch). The output is the logits,
/// `[N, 10]`. Batch norm uses batch statistics in training mode and its
/// running statistics in eval mode ([`nn::eval_mode`](crate::nn::eval_mode),
/// or [`train::evaluate`](crate::train::evaluate), which evaluates in eval
/// mode).
///
/// # Errors
///
/// None in practice: the `Result` carries the layers' constructors'
/// errors, which fixed valid sizes never produce.
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::models;
/// use netcl::nn::Module;
///
/// let model = models::try_digits_cnn(0)?;
/// let logits = model.forward(&Tensor::zeros(&[5, 1, 8, 8]))?;
/// assert_eq!(logits.shape(), &[5, 10]);
///
/// let names: Vec<String> = model.named_parameters().into_iter().map(|(n, _)| n).collect();
/// assert_eq!(names[..4], ["0.weight", "0.bias", "1.weight", "1.bias"]);
/// assert_eq!(names.last().unwrap(), "9.bias");
/// let buffers: Vec<String> = model.named_buffers().into_iter().map(|(n, _)| n).collect();
/// assert_eq!(buffers[..3], ["1.running_mean", "1.running_var", "1.num_batches_tracked"]);
/// // 16·9 + 16, 2·16, 32·16·9 + 32, 2·32, 128·10 + 10.
/// let count: usize = model.parameters().iter().map(|p| p.numel()).sum();
/// assert_eq!(count, 160 + 32 + 4640 + 64 + 1290);
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn try_digits_cnn(seed: u64) -> Result<Sequential> {
    let mut rng = StdRng::seed_from_u64(seed);
    let [c1, c2] = DIGITS_CNN_CHANNELS;
    Ok(Sequential::new()
        .with(Conv2d::try_new(1, c1, 3, &mut rng)?.with_padding(1))
        .with(BatchNorm2d::try_new(c1)?)
        .with(ReLU::new())
        .with(MaxPool2d::new(2))
        .with(Conv2d::try_new(c1, c2, 3, &mut rng)?.with_padding(1))
        .with(BatchNorm2d::try_new(c2)?)
        .with(ReLU::new())
        .with(MaxPool2d::new(2))
        .with(Flatten::new())
        .with(Linear::try_new(c2 * 2 * 2, 10, &mut rng)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tensor;
    use crate::nn::Module;

    #[test]
    fn the_same_seed_gives_the_same_model_and_another_seed_another() {
        let values = |m: &Sequential| -> Vec<Vec<f32>> {
            m.parameters().iter().map(Tensor::to_vec).collect()
        };
        assert_eq!(values(&digits_cnn(3)), values(&digits_cnn(3)));
        assert_ne!(values(&digits_cnn(3)), values(&digits_cnn(4)));
    }

    #[test]
    fn a_pytorch_state_dict_of_it_loads_into_another_and_gives_its_logits() {
        // Written in PyTorch's names and layouts (conv OIHW, linear
        // [out, in]), read back into a model initialised differently,
        // after a training forward moved the running statistics.
        let (trained, fresh) = (digits_cnn(1), digits_cnn(2));
        let x = Tensor::rand(&[6, 1, 8, 8], &mut StdRng::seed_from_u64(3));
        {
            let _train = crate::nn::train_mode();
            trained.forward(&x).unwrap();
        }
        let bytes = crate::io::to_torch_bytes(&trained).unwrap();
        crate::io::load_torch_bytes(&fresh, &bytes).unwrap();
        let _eval = crate::nn::eval_mode();
        let _no_grad = crate::no_grad();
        assert_eq!(
            fresh.forward(&x).unwrap().to_vec(),
            trained.forward(&x).unwrap().to_vec()
        );
    }

    #[test]
    fn wrong_input_shapes_are_errors_not_panics() {
        let model = digits_cnn(0);
        for shape in [&[2, 64][..], &[2, 3, 8, 8], &[2, 1, 6, 6]] {
            assert!(model.forward(&Tensor::zeros(shape)).is_err(), "{shape:?}");
        }
    }
}
