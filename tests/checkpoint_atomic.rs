//! Atomic checkpoint writes: a writer killed (SIGKILL) at any point leaves
//! a version directory holding only complete checkpoints (and at most a
//! temporary, which `remove_stale_temporaries` clears), a restarted writer
//! continues with a higher version, and a failing write (a full disk)
//! returns its error and leaves the previous file intact.
//!
//! The kill tests run this test binary again as the writer (the ignored
//! test `child_writer`): it pauses between write and rename, or between
//! rename and the directory's flush, through `io::fault::set_hook`,
//! announces it on stderr, and the parent kills it there. With the cargo
//! feature `fault-injection`, one more test pauses it through the
//! `NETCL_CHECKPOINT_FAULT` environment variable instead.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netcl::io::{self, CheckpointDir, fault};
use netcl::nn::{Linear, Module};
use netcl::{Error, Tensor};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// The model of version `v`: every value is `v`.
fn model(v: u64) -> Linear {
    let v = v as f32;
    Linear::from_parts(Tensor::full(&[128, 64], v), Some(Tensor::full(&[64], v))).unwrap()
}

/// Checks that `dir` holds only complete versions (each loading as the
/// model of its version) and temporaries; returns the versions and the
/// number of temporaries.
fn check_dir(dir: &Path) -> (Vec<u64>, usize) {
    let mut versions = Vec::new();
    let mut temporaries = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.starts_with('.') && name.ends_with(io::STALE_TEMPORARY_SUFFIX) {
            temporaries += 1;
            continue;
        }
        let v: u64 = name
            .strip_suffix(".safetensors")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("unexpected file {name}"));
        let loaded = io::load_model(dir.join(&name))
            .unwrap_or_else(|err| panic!("version {v} does not load: {err}"));
        assert!(
            loaded
                .parameters()
                .iter()
                .all(|p| p.to_vec().iter().all(|&x| x == v as f32)),
            "version {v} holds another version's values"
        );
        versions.push(v);
    }
    versions.sort_unstable();
    (versions, temporaries)
}

/// The number of temporaries in `dir`.
fn temporaries(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name().into_string().unwrap();
            name.starts_with('.') && name.ends_with(io::STALE_TEMPORARY_SUFFIX)
        })
        .count()
}

/// Starts this test binary as the writer of `dir`, writing `count`
/// versions (pausing at version `pause.1` at stage `pause.0` if given).
fn spawn_writer(dir: &Path, count: u64, pause: Option<(&str, u64)>, env_fault: bool) -> Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", "child_writer", "--ignored", "--nocapture"])
        .env("NETCL_TEST_CHILD_DIR", dir)
        .env("NETCL_TEST_CHILD_COUNT", count.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some((stage, version)) = pause {
        if env_fault {
            command.env("NETCL_CHECKPOINT_FAULT", format!("{stage}:pause"));
        } else {
            command.env("NETCL_TEST_CHILD_PAUSE", format!("{stage}:{version}"));
        }
    }
    command.spawn().unwrap()
}

/// Waits (at most a minute) for the child to announce its pause at
/// `stage`.
fn wait_for_pause(child: &mut Child, stage: &str) {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("netcl-checkpoint-paused") {
                let _ = tx.send(line);
                break;
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the writer never paused");
    assert!(line.contains(stage), "{line}");
}

/// Runs the child writer: see the module docs.
#[test]
#[ignore = "the writer process of the kill tests, run by them"]
fn child_writer() {
    let Ok(dir) = std::env::var("NETCL_TEST_CHILD_DIR") else {
        return;
    };
    let count: u64 = std::env::var("NETCL_TEST_CHILD_COUNT")
        .unwrap()
        .parse()
        .unwrap();
    let versions = CheckpointDir::create(&dir).unwrap();
    versions.remove_stale_temporaries().unwrap();
    if let Ok(pause) = std::env::var("NETCL_TEST_CHILD_PAUSE") {
        let (stage, version) = pause.split_once(':').unwrap();
        let stage = [
            fault::Stage::Write,
            fault::Stage::BeforeRename,
            fault::Stage::BeforeDirSync,
        ]
        .into_iter()
        .find(|s| s.name() == stage)
        .unwrap();
        let target = versions.version_path(version.parse().unwrap());
        fault::set_hook(Some(Arc::new(move |at, path| {
            if at == stage && path == target {
                // Written directly: the test harness captures eprintln!.
                let mut stderr = std::io::stderr().lock();
                writeln!(
                    stderr,
                    "netcl-checkpoint-paused {} {}",
                    at.name(),
                    path.display()
                )?;
                stderr.flush()?;
                drop(stderr);
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            Ok(())
        })));
    }
    let start = versions.next_version().unwrap();
    for v in start..start + count {
        versions.save_model(v, &model(v)).unwrap();
    }
}

/// Kills a writer paused at `stage` `rounds` times, restarting it each
/// time on the same directory.
fn kill_at(stage: &str, rounds: usize, env_fault: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut latest = 0;
    for round in 0..rounds {
        // The restarted writer cleans up, writes one version whole, and is
        // killed at the given stage of the next.
        let pause_at = latest + 2;
        let mut child = spawn_writer(dir.path(), 2, Some((stage, pause_at)), env_fault);
        wait_for_pause(&mut child, stage);
        child.kill().unwrap();
        child.wait().unwrap();

        let (versions, temporaries) = check_dir(dir.path());
        let expected_latest = match stage {
            // Not renamed: the version does not exist, its temporary does.
            "before-rename" => {
                assert_eq!(temporaries, 1, "round {round}");
                latest + 1
            }
            // Renamed: the version is complete, no temporary is left.
            _ => {
                assert_eq!(temporaries, 0, "round {round}");
                latest + 2
            }
        };
        assert_eq!(versions.last(), Some(&expected_latest), "round {round}");
        let (v, path) = io::latest_complete_version(dir.path()).unwrap().unwrap();
        assert_eq!(v, expected_latest);
        io::load_model(path).unwrap();
        latest = expected_latest;
    }
    // A last clean run continues above every version written.
    let mut child = spawn_writer(dir.path(), 1, None, false);
    assert!(child.wait().unwrap().success());
    let (versions, temporaries) = check_dir(dir.path());
    assert_eq!(
        temporaries, 0,
        "the restarted writer removed the stale temporaries"
    );
    assert_eq!(versions.last(), Some(&(latest + 1)));
}

#[test]
fn a_writer_killed_between_write_and_rename_leaves_only_complete_versions() {
    kill_at("before-rename", 10, false);
}

#[test]
fn a_writer_killed_between_rename_and_directory_flush_leaves_only_complete_versions() {
    kill_at("before-dir-sync", 10, false);
}

/// The environment switch pauses a writer (at its first write) without
/// any code in it: what a test of a trainer binary uses.
#[cfg(feature = "fault-injection")]
#[test]
fn the_environment_switch_pauses_the_writer_for_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    for round in 1..=3u64 {
        let mut child = spawn_writer(dir.path(), 1, Some(("before-rename", 0)), true);
        wait_for_pause(&mut child, "before-rename");
        child.kill().unwrap();
        child.wait().unwrap();
        let (versions, temporaries) = check_dir(dir.path());
        assert_eq!(
            versions.len() as u64,
            round - 1,
            "the paused version is absent"
        );
        assert_eq!(temporaries, 1);
        // A clean writer removes the temporary and writes the next version.
        assert!(
            spawn_writer(dir.path(), 1, None, false)
                .wait()
                .unwrap()
                .success()
        );
        assert_eq!(check_dir(dir.path()), ((1..=round).collect::<Vec<_>>(), 0));
    }
}

#[test]
fn writers_killed_at_random_moments_leave_only_complete_versions() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let mut latest = 0;
    for _ in 0..10 {
        let mut child = spawn_writer(dir.path(), 1_000, None, false);
        std::thread::sleep(Duration::from_millis(rng.random_range(0..60)));
        child.kill().unwrap();
        child.wait().unwrap();
        let (versions, _) = check_dir(dir.path());
        let now = versions.last().copied().unwrap_or(0);
        assert!(
            now >= latest,
            "versions never go down: {now} after {latest}"
        );
        latest = now;
    }
}

// ---------------------------------------------------------------------------
// Failing writes, in process. The hook is process-wide: these tests take
// turns.

static HOOK_USERS: Mutex<()> = Mutex::new(());

/// Runs `f` with a hook failing at `stage` for files in `dir`, as a full
/// disk does.
fn with_failure<R>(dir: &Path, stage: fault::Stage, f: impl FnOnce() -> R) -> R {
    let _turn = HOOK_USERS.lock().unwrap_or_else(|p| p.into_inner());
    let dir = dir.to_path_buf();
    fault::set_hook(Some(Arc::new(move |at, path| {
        if at == stage && path.starts_with(&dir) {
            Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "no space left on device (injected)",
            ))
        } else {
            Ok(())
        }
    })));
    let result = f();
    fault::set_hook(None);
    result
}

#[test]
fn a_full_disk_returns_the_error_and_keeps_the_previous_file() {
    for stage in [fault::Stage::Write, fault::Stage::BeforeRename] {
        let dir = tempfile::tempdir().unwrap();
        let versions = CheckpointDir::create(dir.path()).unwrap();
        let path = versions.save_model(1, &model(1)).unwrap();
        let before = std::fs::read(&path).unwrap();

        // Overwriting version 1, and writing version 2, both fail.
        let err =
            with_failure(dir.path(), stage, || versions.save_model(1, &model(5))).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Io {
                    op: "io::save_model",
                    kind: std::io::ErrorKind::StorageFull,
                    ..
                }
            ),
            "{err}"
        );
        let err = with_failure(dir.path(), stage, || versions.save_model(2, &model(2)));
        assert!(err.is_err());

        assert_eq!(std::fs::read(&path).unwrap(), before, "{stage:?}");
        let (listed, temporaries) = check_dir(dir.path());
        assert_eq!(listed, [1]);
        assert_eq!(temporaries, 0, "no temporary is left after a failure");
        assert_eq!(versions.latest().unwrap().unwrap().0, 1);
        // The disk has room again: the next write succeeds.
        versions.save_model(2, &model(2)).unwrap();
        assert_eq!(versions.latest().unwrap().unwrap().0, 2);
    }
}

#[test]
fn a_failure_after_the_rename_reports_the_error_with_the_new_file_complete() {
    let dir = tempfile::tempdir().unwrap();
    let versions = CheckpointDir::create(dir.path()).unwrap();
    let result = with_failure(dir.path(), fault::Stage::BeforeDirSync, || {
        versions.save_model(1, &model(1))
    });
    assert!(result.is_err());
    // The rename happened: the file is whole, only its durability is in
    // doubt, which the error says.
    assert_eq!(check_dir(dir.path()), (vec![1], 0));
}

#[cfg(unix)]
#[test]
fn a_read_only_directory_is_an_error_and_keeps_the_previous_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let versions = CheckpointDir::create(dir.path()).unwrap();
    let path = versions.save_model(1, &model(1)).unwrap();
    let before = std::fs::read(&path).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
    let result = versions.save_model(1, &model(3));
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Root writes anyway; everyone else gets the error.
    if let Err(err) = result {
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }
    assert_eq!(temporaries(dir.path()), 0);
}

#[test]
fn stale_temporaries_are_removed_and_other_files_kept() {
    let dir = tempfile::tempdir().unwrap();
    let versions = CheckpointDir::create(dir.path()).unwrap();
    versions.save_model(4, &model(4)).unwrap();
    for name in [
        ".5.safetensors.AbC123.netcl-tmp",
        ".model.safetensors.xyz.netcl-tmp",
    ] {
        std::fs::write(dir.path().join(name), b"partial").unwrap();
    }
    std::fs::write(dir.path().join("notes.txt"), b"kept").unwrap();
    std::fs::write(dir.path().join("5.netcl-tmp"), b"kept: no leading dot").unwrap();
    let removed = versions.remove_stale_temporaries().unwrap();
    assert_eq!(removed.len(), 2);
    assert!(dir.path().join("notes.txt").exists());
    assert!(dir.path().join("5.netcl-tmp").exists());
    assert_eq!(versions.versions().unwrap(), [4]);
    assert_eq!(versions.next_version().unwrap(), 5);
}

#[test]
fn latest_complete_version_skips_truncated_and_misnamed_files() {
    let dir = tempfile::tempdir().unwrap();
    let versions = CheckpointDir::create(dir.path()).unwrap();
    assert_eq!(versions.latest().unwrap(), None);
    assert_eq!(versions.next_version().unwrap(), 1);
    versions.save_model(3, &model(3)).unwrap();
    versions.save_model(10, &model(10)).unwrap();
    // A truncated higher version (written by something else than netcl),
    // names that are not versions.
    let whole = std::fs::read(versions.version_path(10)).unwrap();
    std::fs::write(versions.version_path(12), &whole[..whole.len() - 1]).unwrap();
    std::fs::write(dir.path().join("011.safetensors"), &whole).unwrap();
    std::fs::write(dir.path().join("+13.safetensors"), &whole).unwrap();
    std::fs::write(dir.path().join("14.safetensors.bak"), &whole).unwrap();
    assert_eq!(versions.versions().unwrap(), [3, 10, 12]);
    assert_eq!(
        versions.latest().unwrap(),
        Some((10, versions.version_path(10)))
    );
    // Versions are numbers, not strings: 10 is above 3 and 9.
    versions.save_model(9, &model(9)).unwrap();
    assert_eq!(versions.latest().unwrap().unwrap().0, 10);
    assert_eq!(versions.next_version().unwrap(), 13);
    assert_eq!(
        io::latest_complete_version(dir.path().join("absent")).unwrap(),
        None
    );
}

#[test]
fn concurrent_saves_to_one_version_leave_one_whole_file() {
    let dir = tempfile::tempdir().unwrap();
    let versions = CheckpointDir::create(dir.path()).unwrap();
    std::thread::scope(|s| {
        for t in 1..=4u64 {
            let versions = versions.clone();
            s.spawn(move || {
                for _ in 0..5 {
                    versions.save_model(1, &model(t)).unwrap();
                }
            });
        }
    });
    let loaded = io::load_model(versions.version_path(1)).unwrap();
    let first = loaded.parameters()[0].to_vec()[0];
    assert!((1.0..=4.0).contains(&first));
    assert!(
        loaded
            .parameters()
            .iter()
            .all(|p| p.to_vec().iter().all(|&x| x == first))
    );
    assert_eq!(temporaries(dir.path()), 0);
}
