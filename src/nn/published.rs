//! [`Published`]: the versions of a model that readers serve while a
//! trainer changes it.

use std::fmt;
use std::ops::Deref;
use std::time::Instant;

use crate::autograd::{eval_mode, no_grad};
use crate::error::Error;
use crate::error::Result;
use crate::nn::{Module, fork_scope};
use crate::sync::{Arc, AtomicArc, Mutex};
use crate::tensor::Tensor;

/// The published versions of a model: a trainer publishes its whole
/// parameter set as one immutable [`Version`], and any number of threads
/// run forwards against the current version, never a mix of two.
///
/// An optimizer updates a model's parameters one at a time, so a forward
/// running beside a training step on the *live* model can see layer 0
/// after the step and layer 1 before it. A version is a fork of the model
/// ([`Module::try_fork`]): new parameter tensors sharing the values the
/// model had when it was published (copy-on-write, so publishing copies
/// no values: O(1) per parameter, and the trainer's next update of each
/// parameter writes into a new buffer instead of the one the version
/// holds).
///
/// A version carries the model's buffers too
/// ([`Module::named_buffer_states`]): a fork's buffer states start from the
/// model's current snapshots and are frozen, so a version's running
/// statistics never change, even under a reader in training mode.
///
/// # Readers never block the trainer, the trainer never blocks readers
///
/// [`load`](Published::load) takes no lock at all: the current version is
/// an `Arc` swapped whole by [`publish`](Published::publish)
/// (read-copy-update, with `arc-swap`), so a reader never waits, not even
/// for a publisher the operating system descheduled mid-publish (a
/// background-priority trainer can be). A reader keeps its version for as
/// long as it likes while newer ones are published, and a version is freed
/// when its last reader drops it. Publishers take turns among themselves.
///
/// # Batches and bits
///
/// A version computes the same function for every reader, but a row's
/// result can differ in the last bits with the batch it is computed in
/// (the matrix kernel blocks a product by its shape): compare predictions
/// of one row made in different batches to a rounding tolerance.
///
/// # Versions are frozen and in evaluation mode
///
/// A version's parameters do not require grad, so a forward on it records
/// nothing whatever the thread's grad mode, and its modules' own flags are
/// set to evaluation mode (a thread that enters
/// [`train_mode`](crate::autograd::train_mode) still gets training
/// behaviour). [`Version::predict`] runs a forward under `no_grad` and
/// [`eval_mode`](crate::autograd::eval_mode).
///
/// # Examples
///
/// A trainer publishes after every step while four threads serve:
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
///
/// use netcl::Tensor;
/// use netcl::nn::{Activation, Mlp, Module, Published};
/// use netcl::optim::{Optimizer, Sgd, SgdConfig};
/// use netcl::rand::SeedableRng;
///
/// let mut rng = netcl::rand::rngs::StdRng::seed_from_u64(0);
/// let model = Mlp::new(&[4, 8, 3], Activation::Relu, &mut rng);
/// let published = Published::new(&model)?;
/// let done = AtomicBool::new(false);
///
/// std::thread::scope(|s| {
///     for _ in 0..4 {
///         s.spawn(|| {
///             let mut last = 0;
///             while !done.load(Ordering::Relaxed) {
///                 let version = published.load();
///                 assert!(version.number() >= last, "versions only move forward");
///                 last = version.number();
///                 let logits = version.predict(&Tensor::ones(&[2, 4])).unwrap();
///                 assert_eq!(logits.shape(), &[2, 3]);
///             }
///         });
///     }
///     let mut sgd = Sgd::new(model.parameters(), SgdConfig::new(0.1));
///     let x = Tensor::rand(&[16, 4], &mut rng);
///     let y = Tensor::zeros(&[16]);
///     for _ in 0..20 {
///         sgd.zero_grad();
///         model.forward(&x).unwrap().cross_entropy(&y).backward();
///         sgd.step();
///         published.publish(&model).unwrap();
///     }
///     done.store(true, Ordering::Relaxed);
/// });
/// assert_eq!(published.version(), 20);
/// # Ok::<(), netcl::Error>(())
/// ```
pub struct Published {
    /// The current version, loaded without a lock.
    current: AtomicArc<Version>,
    /// Serialises publishers, so that version numbers are given in order.
    publishing: Mutex<()>,
}

/// One published version of a model: an immutable fork of it, with its
/// version number. Dereferences to the model.
///
/// Obtained from [`Published::load`]; keep the `Arc` for as long as a
/// request needs one consistent model.
pub struct Version {
    model: Box<dyn Module>,
    number: u64,
    published_at: Instant,
}

impl Published {
    /// Publishes `model` as version 0.
    ///
    /// # Errors
    ///
    /// The error of [`Module::try_fork`] (a custom module that cannot be
    /// forked).
    pub fn new<M: Module + ?Sized>(model: &M) -> Result<Published> {
        Published::with_version(model, 0)
    }

    /// Publishes `model` as version `number`; later versions count on from
    /// it (for example from the number stored in a checkpoint, so that
    /// versions keep increasing across restarts).
    ///
    /// # Errors
    ///
    /// As [`new`](Published::new).
    pub fn with_version<M: Module + ?Sized>(model: &M, number: u64) -> Result<Published> {
        let version = Version::freeze(fork_scope(|| model.try_fork())?, number);
        Ok(Published {
            current: AtomicArc::new(Arc::new(version)),
            publishing: Mutex::new(()),
        })
    }

    /// The current version, without taking any lock.
    ///
    /// # Examples
    ///
    /// A reader keeps the version it loaded, unchanged, while newer ones
    /// are published:
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::nn::{Linear, Published};
    ///
    /// let model = Linear::from_parts(Tensor::from_vec(vec![2.0], &[1, 1])?, None)?;
    /// let published = Published::new(&model)?;
    /// let held = published.load();
    ///
    /// model.weight().with_data_mut(|mut w| w.fill(3.0));
    /// published.publish(&model)?;
    ///
    /// let x = Tensor::ones(&[1, 1]);
    /// assert_eq!((held.number(), held.predict(&x)?.to_vec()), (0, vec![2.0]));
    /// let current = published.load();
    /// assert_eq!((current.number(), current.predict(&x)?.to_vec()), (1, vec![3.0]));
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn load(&self) -> Arc<Version> {
        self.current.load()
    }

    /// The current version's number.
    pub fn version(&self) -> u64 {
        self.current.load().number
    }

    /// Publishes the current values of `model`'s parameters as the next
    /// version and returns its number (the previous one plus one).
    ///
    /// Call it from the thread that updates the model, between updates
    /// (for example from a [`Trainer::on_step`](crate::train::Trainer::on_step)
    /// hook): the version is then a consistent parameter set. Publishing
    /// while another thread is in the middle of an optimizer step would
    /// capture that step half done.
    ///
    /// # Errors
    ///
    /// The error of [`Module::try_fork`]. Nothing is published then.
    ///
    /// # Examples
    ///
    /// The version holds the values the model had when it was published,
    /// frozen; the model itself still trains:
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::nn::{Linear, Module, Published};
    ///
    /// let model = Linear::from_parts(Tensor::from_vec(vec![1.0, 2.0], &[1, 2])?, None)?;
    /// let published = Published::new(&model)?;
    ///
    /// model.weight().with_data_mut(|mut w| w.fill(5.0));
    /// assert_eq!(published.publish(&model)?, 1);
    /// model.weight().with_data_mut(|mut w| w.fill(0.0));
    ///
    /// let version = published.load();
    /// assert_eq!(version.parameters()[0].to_vec(), vec![5.0, 5.0]);
    /// assert!(!version.parameters()[0].requires_grad());
    /// assert!(model.weight().requires_grad());
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn publish<M: Module + ?Sized>(&self, model: &M) -> Result<u64> {
        Ok(self.publish_model(fork_scope(|| model.try_fork())?))
    }

    /// Publishes `model` itself as the next version (it is frozen and set
    /// to evaluation mode first) and returns its number. For a model built
    /// or loaded apart from the one being trained, such as a checkpoint
    /// read from disk: load it into a fresh model, then publish that.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::{Activation, Mlp, Module, Published};
    /// use netcl::rand::SeedableRng;
    ///
    /// let mut rng = netcl::rand::rngs::StdRng::seed_from_u64(0);
    /// let live = Mlp::new(&[4, 2], Activation::Relu, &mut rng);
    /// let published = Published::new(&live)?;
    ///
    /// let bytes = netcl::io::to_bytes(&Mlp::new(&[4, 2], Activation::Relu, &mut rng))?;
    /// let reloaded = Mlp::zeros(&[4, 2], Activation::Relu)?;
    /// netcl::io::load_bytes(&reloaded, &bytes)?;
    /// assert_eq!(published.publish_model(Box::new(reloaded)), 1);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn publish_model(&self, model: Box<dyn Module>) -> u64 {
        let mut version = Version::freeze(model, 0);
        let _turn = self.publishing.lock();
        version.number = self.current.load().number + 1;
        let number = version.number;
        // The previous version is dropped here if no reader holds it.
        drop(self.current.swap(Arc::new(version)));
        number
    }

    /// Publishes `model` itself as version `number`, which must be above
    /// the current one: for a version that has a number already, such as a
    /// checkpoint saved by another process with its version in the file's
    /// metadata, so that replicas following it show the same numbers.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if `number` is not above the current
    /// version's; nothing is published then.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::{Activation, Mlp, Published};
    ///
    /// let published = Published::new(&Mlp::zeros(&[4, 2], Activation::Relu)?)?;
    /// let from_file = Mlp::zeros(&[4, 2], Activation::Relu)?;
    /// published.publish_model_as(Box::new(from_file), 41)?;
    /// assert_eq!(published.version(), 41);
    /// let stale = Mlp::zeros(&[4, 2], Activation::Relu)?;
    /// assert!(published.publish_model_as(Box::new(stale), 40).is_err());
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn publish_model_as(&self, model: Box<dyn Module>, number: u64) -> Result<u64> {
        let version = Version::freeze(model, number);
        let _turn = self.publishing.lock();
        let current = self.current.load().number;
        if number <= current {
            return Err(Error::InvalidArgument {
                op: "Published::publish_model_as",
                message: format!(
                    "version {number} is not above the current version {current}: versions only move forward"
                ),
            });
        }
        drop(self.current.swap(Arc::new(version)));
        Ok(number)
    }
}

impl fmt::Debug for Published {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Published")
            .field("version", &self.version())
            .finish()
    }
}

impl Version {
    fn freeze(model: Box<dyn Module>, number: u64) -> Version {
        for (_, p) in model.named_parameters() {
            // Forked parameters are leaves, so this cannot fail.
            let _ = p.try_requires_grad_(false);
        }
        // A served version's running statistics never change, whatever
        // mode a reader's thread is in.
        for (_, state) in model.named_buffer_states() {
            state.freeze();
        }
        model.eval();
        Version {
            model,
            number,
            published_at: Instant::now(),
        }
    }

    /// The version number: 0 (or the number given to
    /// [`Published::with_version`]) for the first, one more for each
    /// publish after it.
    ///
    /// # Examples
    ///
    /// ```
    /// use netcl::nn::{Linear, Published};
    ///
    /// let model = Linear::zeros(2, 1)?;
    /// let published = Published::with_version(&model, 7)?;
    /// assert_eq!(published.load().number(), 7);
    /// published.publish(&model)?;
    /// assert_eq!(published.load().number(), 8);
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn number(&self) -> u64 {
        self.number
    }

    /// When this version was published.
    pub fn published_at(&self) -> Instant {
        self.published_at
    }

    /// The model of this version.
    pub fn model(&self) -> &dyn Module {
        &*self.model
    }

    /// The model's output for `input`, computed under `no_grad` and in
    /// evaluation mode on this thread, whatever the thread's own modes.
    ///
    /// # Errors
    ///
    /// The error of the model's forward.
    ///
    /// # Examples
    ///
    /// [`Dropout`](crate::nn::Dropout) is off and nothing records, even on
    /// a thread in training mode with grad enabled:
    ///
    /// ```
    /// use netcl::Tensor;
    /// use netcl::nn::{Dropout, Linear, Published, Sequential, train_mode};
    ///
    /// let weight = Tensor::from_vec(vec![1.0, 1.0], &[1, 2])?;
    /// let model = Sequential::new()
    ///     .with(Linear::from_parts(weight, None)?)
    ///     .with(Dropout::new(0.5, 0));
    /// let published = Published::new(&model)?;
    ///
    /// let _train = train_mode();
    /// assert!(netcl::is_grad_enabled());
    /// let y = published.load().predict(&Tensor::ones(&[4, 1]))?;
    /// assert_eq!(y.to_vec(), vec![1.0; 8]);
    /// assert!(!y.requires_grad());
    /// # Ok::<(), netcl::Error>(())
    /// ```
    pub fn predict(&self, input: &Tensor) -> Result<Tensor> {
        let _no_grad = no_grad();
        let _eval = eval_mode();
        self.model.forward(input)
    }
}

impl Deref for Version {
    type Target = dyn Module;

    fn deref(&self) -> &(dyn Module + 'static) {
        &*self.model
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Version")
            .field("number", &self.number)
            .field("model", &self.model)
            .finish()
    }
}
