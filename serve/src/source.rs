//! Where a watched model's versions come from: a [`VersionSource`] says
//! which version is the newest it offers, and a watcher loads each new one
//! (see [`crate::loader`]) and publishes it if it loads.
//!
//! The one source today, [`PathSource`], is a local checkpoint file or a
//! directory of numbered versions (`N.safetensors`, `N/model.safetensors`,
//! as [`crate::loader::candidates`] lists them).
//!
//! # An object store behind the same trait
//!
//! A source only answers [`VersionSource::latest`]: the newest version's
//! number (if it has one), an identity that changes whenever its content
//! may have, and a local file holding it. An S3 (or GCS, Azure Blob)
//! source implements it with the store's client:
//!
//! 1. list the keys under the model's prefix (`s3://bucket/model/`) and
//!    take the highest `N.safetensors` (an object is complete once
//!    listed: a put is atomic in these stores, so no temporary is needed);
//! 2. its identity is the object's ETag (or version id);
//! 3. when the identity differs from the last one downloaded, download the
//!    object to a temporary file in a local cache directory and rename it
//!    to `CACHE/N.safetensors` (so a crash never leaves a partial file
//!    under a version's name), then return that path.
//!
//! The watcher calls `latest` on a blocking thread every poll interval, so
//! a source may do network I/O there; it should keep the last downloaded
//! file until a newer one replaces it. Nothing else in the server changes.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::loader::candidates;

/// The newest version a [`VersionSource`] offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// A local file holding it.
    pub file: PathBuf,
    /// Its version number, when the source names one (a directory entry's
    /// number, an object key's); else the number stored in the file is
    /// used.
    pub number: Option<u64>,
    /// What changes when its content may have (a file's inode, size and
    /// modification time; an object's ETag). The watcher loads an offer
    /// once per identity.
    pub identity: String,
}

/// A place a watcher follows: see the [module docs](self).
pub trait VersionSource: Send + Sync + fmt::Debug {
    /// The newest version offered now, `None` if there is none (yet) or
    /// it cannot be read now (the watcher tries again next poll).
    fn latest(&self) -> Option<Offer>;
}

/// A local checkpoint file, or a directory of numbered versions (its
/// highest version is offered).
///
/// # Examples
///
/// ```
/// use netcl::nn::Linear;
/// use netcl_serve::source::{PathSource, VersionSource};
///
/// let dir = std::env::temp_dir().join(format!("netcl-serve-doc-source-{}", std::process::id()));
/// let source = PathSource::new(&dir);
/// assert_eq!(source.latest(), None);
///
/// let versions = netcl::io::CheckpointDir::create(&dir)?;
/// versions.save_model(3, &Linear::zeros(2, 2)?)?;
/// let offer = source.latest().unwrap();
/// assert_eq!((offer.number, offer.file), (Some(3), dir.join("3.safetensors")));
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct PathSource {
    path: PathBuf,
}

impl PathSource {
    /// The source at `path` (which need not exist yet).
    pub fn new(path: impl AsRef<Path>) -> PathSource {
        PathSource {
            path: path.as_ref().to_path_buf(),
        }
    }
}

impl VersionSource for PathSource {
    fn latest(&self) -> Option<Offer> {
        let best = candidates(&self.path).ok()?.into_iter().next()?;
        let meta = std::fs::metadata(&best.file).ok()?;
        Some(Offer {
            identity: format!(
                "{}:{}:{}:{}.{}",
                meta.dev(),
                meta.ino(),
                meta.len(),
                meta.mtime(),
                meta.mtime_nsec()
            ),
            file: best.file,
            number: best.number,
        })
    }
}
