//! Atomic, durable checkpoint writes, and directories of numbered versions.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::io_error;
use crate::error::{Error, Result};
use crate::nn::Module;

/// The end of the name of every temporary file the writer creates
/// (`.NAME.XXXXXX.netcl-tmp`, beside the file `NAME` being written).
pub const STALE_TEMPORARY_SUFFIX: &str = ".netcl-tmp";

/// Writes `bytes` to a new temporary file beside `path`, flushes it to
/// disk, renames it over `path` and flushes the directory. The
/// temporary's name is unique (the `tempfile` crate creates it with
/// `O_EXCL`), so concurrent writers never share one; it is deleted if
/// anything fails. A crash (or SIGKILL) before the rename leaves the
/// temporary behind, never a partial `path`.
pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(path.file_name().unwrap_or_default());
    prefix.push(".");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(STALE_TEMPORARY_SUFFIX);
    // The permissions of a file created with `File::create` (0o666 less the
    // umask), not the temporary's private 0o600.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut temp = builder.tempfile_in(dir)?;
    fault::check(fault::Stage::Write, path)?;
    temp.write_all(bytes)?;
    temp.as_file().sync_all()?;
    fault::check(fault::Stage::BeforeRename, path)?;
    temp.persist(path).map_err(|err| err.error)?;
    fault::check(fault::Stage::BeforeDirSync, path)?;
    sync_dir(dir)
}

/// Flushes a directory's entries (a rename in it) to disk. Windows has no
/// such call (a rename there is flushed with the file).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Removes the temporary files that writes into `dir` left behind when
/// their process died between creating and renaming them: every file whose
/// name starts with `.` and ends with [`STALE_TEMPORARY_SUFFIX`]. Returns
/// the files removed.
///
/// Call it when no other process writes into `dir` (at a trainer's
/// start-up): a temporary being written now looks the same as a stale one.
///
/// # Errors
///
/// [`Error::Io`] if `dir` cannot be listed or a temporary cannot be
/// removed (one already gone is not an error).
///
/// # Examples
///
/// ```
/// let dir = std::env::temp_dir().join(format!("netcl-doc-stale-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// std::fs::write(dir.join(".3.safetensors.a1b2c3.netcl-tmp"), b"half a file").unwrap();
/// std::fs::write(dir.join("2.safetensors"), b"kept").unwrap();
///
/// let removed = netcl::io::remove_stale_temporaries(&dir)?;
/// assert_eq!(removed, [dir.join(".3.safetensors.a1b2c3.netcl-tmp")]);
/// assert!(dir.join("2.safetensors").exists());
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn remove_stale_temporaries(dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    const OP: &str = "io::remove_stale_temporaries";
    let dir = dir.as_ref();
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|err| io_error(OP, dir, &err))? {
        let entry = entry.map_err(|err| io_error(OP, dir, &err))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') && name.ends_with(STALE_TEMPORARY_SUFFIX) {
            let path = entry.path();
            match std::fs::remove_file(&path) {
                Ok(()) => removed.push(path),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(io_error(OP, &path, &err)),
            }
        }
    }
    removed.sort();
    Ok(removed)
}

/// The version a file name of a version directory holds: `7.safetensors`
/// is version 7; leading zeros, signs and other names are not versions.
fn version_of(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".safetensors")?;
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    canonical.then(|| digits.parse().ok()).flatten()
}

/// Whether the file at `path` is a whole safetensors file: its length is
/// the one its header declares. Reads the header only.
fn is_complete(path: &Path) -> bool {
    fn check(path: &Path) -> Option<bool> {
        let mut file = std::fs::File::open(path).ok()?;
        let len = file.metadata().ok()?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n).ok()?;
        let n = u64::from_le_bytes(n);
        // safetensors' own limit on a header.
        if n > 100_000_000 || 8 + n > len {
            return Some(false);
        }
        let mut header = vec![0u8; usize::try_from(n).ok()?];
        file.read_exact(&mut header).ok()?;
        let header: serde_json::Value = serde_json::from_slice(&header).ok()?;
        let end = header
            .as_object()?
            .iter()
            .filter(|(name, _)| *name != "__metadata__")
            .map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64())
            .try_fold(0u64, |max, end| Some(max.max(end?)))?;
        Some(8 + n + end == len)
    }
    check(path).unwrap_or(false)
}

/// The highest complete version in the version directory `dir` (see
/// [`CheckpointDir`]) and its file, `None` if there is none.
///
/// Only files named `<version>.safetensors` count, and only those whose
/// length matches their header: the writer's temporaries never match the
/// pattern, and a file truncated by some other writer is skipped (the next
/// lower version is returned instead). A directory that does not exist
/// holds no version.
///
/// # Errors
///
/// [`Error::Io`] if `dir` exists but cannot be listed.
///
/// # Examples
///
/// ```
/// use netcl::nn::Linear;
///
/// let dir = std::env::temp_dir().join(format!("netcl-doc-latest-{}", std::process::id()));
/// assert_eq!(netcl::io::latest_complete_version(&dir)?, None);
///
/// let versions = netcl::io::CheckpointDir::create(&dir)?;
/// versions.save_model(1, &Linear::zeros(2, 2)?)?;
/// versions.save_model(2, &Linear::zeros(2, 2)?)?;
/// std::fs::write(dir.join("3.safetensors"), b"truncated").unwrap();
/// assert_eq!(netcl::io::latest_complete_version(&dir)?, Some((2, dir.join("2.safetensors"))));
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), netcl::Error>(())
/// ```
pub fn latest_complete_version(dir: impl AsRef<Path>) -> Result<Option<(u64, PathBuf)>> {
    const OP: &str = "io::latest_complete_version";
    let dir = dir.as_ref();
    let mut versions = match versions_in(OP, dir) {
        Err(Error::Io {
            kind: std::io::ErrorKind::NotFound,
            ..
        }) => return Ok(None),
        other => other?,
    };
    while let Some(version) = versions.pop() {
        let path = dir.join(format!("{version}.safetensors"));
        if is_complete(&path) {
            return Ok(Some((version, path)));
        }
    }
    Ok(None)
}

/// The versions named in `dir`, ascending.
fn versions_in(op: &'static str, dir: &Path) -> Result<Vec<u64>> {
    let mut versions = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|err| io_error(op, dir, &err))? {
        let entry = entry.map_err(|err| io_error(op, dir, &err))?;
        if let Some(version) = entry.file_name().to_str().and_then(version_of) {
            versions.push(version);
        }
    }
    versions.sort_unstable();
    Ok(versions)
}

/// A directory of numbered checkpoint versions, as TF Serving's model
/// directories: version `v` of the model is the file
/// `DIR/<v>.safetensors` (`v` in decimal, without leading zeros), written
/// by [`save_model`](CheckpointDir::save_model) through a temporary file
/// and a rename, so a file with a version's name is always complete.
///
/// A trainer calls [`remove_stale_temporaries`](CheckpointDir::remove_stale_temporaries)
/// at start-up, resumes from [`latest`](CheckpointDir::latest) and writes
/// [`next_version`](CheckpointDir::next_version)s; a server follows
/// [`latest`](CheckpointDir::latest) (or [`latest_complete_version`]).
///
/// # Examples
///
/// ```
/// use netcl::Tensor;
/// use netcl::nn::{Linear, Module};
///
/// let dir = std::env::temp_dir().join(format!("netcl-doc-versions-{}", std::process::id()));
/// let versions = netcl::io::CheckpointDir::create(&dir)?;
/// versions.remove_stale_temporaries()?;
///
/// let model = Linear::zeros(3, 2)?;
/// let v = versions.next_version()?;
/// assert_eq!(v, 1);
/// versions.save_model(v, &model)?;
///
/// let (latest, path) = versions.latest()?.unwrap();
/// assert_eq!((latest, path), (1, dir.join("1.safetensors")));
/// let served = netcl::io::load_model(dir.join("1.safetensors"))?;
/// assert_eq!(served.forward(&Tensor::ones(&[1, 3]))?.to_vec(), vec![0.0, 0.0]);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), netcl::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    dir: PathBuf,
}

impl CheckpointDir {
    /// The version directory `dir`, created (with its parents) if it does
    /// not exist.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if it cannot be created.
    pub fn create(dir: impl AsRef<Path>) -> Result<CheckpointDir> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)
            .map_err(|err| io_error("io::CheckpointDir::create", dir, &err))?;
        Ok(CheckpointDir {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The file of version `version`: `DIR/<version>.safetensors`.
    pub fn version_path(&self, version: u64) -> PathBuf {
        self.dir.join(format!("{version}.safetensors"))
    }

    /// The versions present, ascending.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the directory cannot be listed.
    pub fn versions(&self) -> Result<Vec<u64>> {
        versions_in("io::CheckpointDir::versions", &self.dir)
    }

    /// The highest complete version and its file ([`latest_complete_version`]).
    ///
    /// # Errors
    ///
    /// As [`latest_complete_version`].
    pub fn latest(&self) -> Result<Option<(u64, PathBuf)>> {
        latest_complete_version(&self.dir)
    }

    /// One more than the highest version present (complete or not), 1 in
    /// an empty directory: a restarted trainer never reuses a version.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the directory cannot be listed,
    /// [`Error::InvalidArgument`] if the highest version is `u64::MAX`.
    pub fn next_version(&self) -> Result<u64> {
        const OP: &str = "io::CheckpointDir::next_version";
        match versions_in(OP, &self.dir)?.last() {
            None => Ok(1),
            Some(&v) => v.checked_add(1).ok_or_else(|| Error::InvalidArgument {
                op: OP,
                message: format!("the directory already holds version {v}, the last one"),
            }),
        }
    }

    /// Removes the temporaries a crashed writer left ([`remove_stale_temporaries`]).
    ///
    /// # Errors
    ///
    /// As [`remove_stale_temporaries`].
    pub fn remove_stale_temporaries(&self) -> Result<Vec<PathBuf>> {
        remove_stale_temporaries(&self.dir)
    }

    /// Writes `model` as version `version` with
    /// [`io::save_model`](crate::io::save_model) (atomic and durable),
    /// returning its file. An existing file of that version is replaced
    /// whole.
    ///
    /// # Errors
    ///
    /// As [`io::save_model`](crate::io::save_model): on a write error (a
    /// full disk) the error is returned, no temporary is left and every
    /// earlier version is intact.
    pub fn save_model<M: Module + ?Sized>(&self, version: u64, model: &M) -> Result<PathBuf> {
        let path = self.version_path(version);
        super::save_model(model, &path)?;
        Ok(path)
    }

    /// [`save_model`](CheckpointDir::save_model) with metadata
    /// ([`io::save_model_with_metadata`](crate::io::save_model_with_metadata)).
    ///
    /// # Errors
    ///
    /// As [`save_model`](CheckpointDir::save_model).
    pub fn save_model_with_metadata<M: Module + ?Sized>(
        &self,
        version: u64,
        model: &M,
        metadata: &std::collections::BTreeMap<String, String>,
    ) -> Result<PathBuf> {
        let path = self.version_path(version);
        super::save_model_with_metadata(model, &path, metadata)?;
        Ok(path)
    }
}

/// Test-only fault injection into the checkpoint writer: pause it or make
/// it fail between its steps, so that a test can kill a writing process
/// at a chosen point or simulate a full disk. Not part of the API's
/// promise.
///
/// Two switches, both consulted at each [`Stage`](fault::Stage) of every atomic write
/// (`io::save`, `io::save_model`, `CheckpointDir::save_model`, ...):
///
/// - in process, the hook set with [`set_hook`](fault::set_hook);
/// - with the cargo feature `fault-injection` only, the environment
///   variable `NETCL_CHECKPOINT_FAULT=<stage>:<action>`, `<stage>` one of
///   `write`, `before-rename`, `before-dir-sync` and `<action>` `pause`
///   (print `netcl-checkpoint-paused <stage> <path>` on stderr, then sleep
///   until killed) or `fail` (fail the write with
///   `ErrorKind::StorageFull`, as a full disk does).
#[doc(hidden)]
pub mod fault {
    use std::path::Path;
    use std::sync::{Arc, RwLock};

    /// A point in an atomic write.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Stage {
        /// The temporary file exists, nothing is written to it yet.
        Write,
        /// The temporary is written and flushed, not yet renamed.
        BeforeRename,
        /// The temporary is renamed over the target, the directory not yet
        /// flushed.
        BeforeDirSync,
    }

    impl Stage {
        /// The stage's name in `NETCL_CHECKPOINT_FAULT`.
        pub fn name(self) -> &'static str {
            match self {
                Stage::Write => "write",
                Stage::BeforeRename => "before-rename",
                Stage::BeforeDirSync => "before-dir-sync",
            }
        }
    }

    /// Called with the stage and the target file; an error fails the
    /// write there (the temporary is then removed, if not yet renamed).
    pub type Hook = Arc<dyn Fn(Stage, &Path) -> std::io::Result<()> + Send + Sync>;

    static HOOK: RwLock<Option<Hook>> = RwLock::new(None);

    /// Sets (or with `None` clears) the process-wide hook. Tests running
    /// in one process at once should act only on their own paths.
    pub fn set_hook(hook: Option<Hook>) {
        *HOOK.write().unwrap_or_else(|p| p.into_inner()) = hook;
    }

    pub(super) fn check(stage: Stage, path: &Path) -> std::io::Result<()> {
        let hook = HOOK.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(hook) = hook {
            hook(stage, path)?;
        }
        #[cfg(feature = "fault-injection")]
        from_env(stage, path)?;
        Ok(())
    }

    #[cfg(feature = "fault-injection")]
    fn from_env(stage: Stage, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let Ok(spec) = std::env::var("NETCL_CHECKPOINT_FAULT") else {
            return Ok(());
        };
        match spec.split_once(':') {
            Some((name, "pause")) if name == stage.name() => {
                let mut stderr = std::io::stderr().lock();
                let _ = writeln!(
                    stderr,
                    "netcl-checkpoint-paused {} {}",
                    stage.name(),
                    path.display()
                );
                let _ = stderr.flush();
                drop(stderr);
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
            Some((name, "fail")) if name == stage.name() => Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!("NETCL_CHECKPOINT_FAULT={spec}: injected failure"),
            )),
            _ => Ok(()),
        }
    }
}
