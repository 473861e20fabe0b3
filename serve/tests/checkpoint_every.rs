//! `checkpoint_every`: a training server writes numbered versions into its
//! directory while it trains; a restart removes stale temporaries and
//! continues above the highest complete version; a full disk is survived.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{PATIENCE, start, test_config, wait_until};
use netcl::io::fault::{self, Stage};
use netcl_serve::Config;
use netcl_serve::model::read_checkpoint;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("netcl-serve-every-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn trainer(dir: &std::path::Path) -> Config {
    Config {
        train: true,
        weights: Some(dir.to_path_buf()),
        checkpoint_every: Some(Duration::from_millis(100)),
        publish_every: 5,
        ..test_config()
    }
}

fn latest(dir: &std::path::Path) -> u64 {
    netcl::io::latest_complete_version(dir)
        .unwrap()
        .map_or(0, |(v, _)| v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_writes_versions_and_a_restart_continues_above_them() {
    let dir = temp_dir("restart");
    let stale = dir.join(".4.safetensors.x1y2z3.netcl-tmp");
    std::fs::write(&stale, b"half a file").unwrap();
    let server = start(trainer(&dir)).await;
    assert!(!stale.exists(), "the stale temporary was removed at start");
    wait_until(PATIENCE, "two versions written", || latest(&dir) >= 2).await;
    server.shutdown();
    let summary = server.wait().await.unwrap();
    let last = latest(&dir);
    assert_eq!(summary.saved, Some(dir.join(format!("{last}.safetensors"))));
    let steps = read_checkpoint(&dir.join(format!("{last}.safetensors")))
        .unwrap()
        .steps;
    assert!(steps > 0);

    // The restart resumes from `last` (its number and steps) and writes
    // higher numbers.
    let server = start(trainer(&dir)).await;
    let info = server.model().info();
    assert_eq!(info.source, "checkpoint");
    assert_eq!(info.training_steps, steps);
    assert!(info.version >= last, "{info:?} below {last}");
    wait_until(PATIENCE, "a version above the restart's", || {
        latest(&dir) > last
    })
    .await;
    server.shutdown();
    server.wait().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_survived_and_the_last_good_checkpoint_stays() {
    let dir = temp_dir("full");
    let server = start(trainer(&dir)).await;
    wait_until(PATIENCE, "a first version", || latest(&dir) >= 1).await;
    // The disk fills: every write into `dir` fails as a full disk does.
    let failures = Arc::new(AtomicUsize::new(0));
    {
        let (dir, failures) = (dir.clone(), Arc::clone(&failures));
        fault::set_hook(Some(Arc::new(move |stage, path| {
            if stage == Stage::Write && path.starts_with(&dir) {
                failures.fetch_add(1, Ordering::SeqCst);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "no space left (test)",
                ));
            }
            Ok(())
        })));
    }
    // Let a write in progress when the hook was set finish.
    wait_until(PATIENCE, "a failed write", || {
        failures.load(Ordering::SeqCst) >= 1
    })
    .await;
    let good = latest(&dir);
    let good_bytes = std::fs::read(dir.join(format!("{good}.safetensors"))).unwrap();
    let steps_before = server.metrics().training_steps();
    wait_until(PATIENCE, "three failed writes", || {
        failures.load(Ordering::SeqCst) >= 4
    })
    .await;
    let metrics = Arc::clone(server.metrics());
    wait_until(PATIENCE, "training to go on", || {
        metrics.training_steps() > steps_before
    })
    .await;
    assert_eq!(latest(&dir), good, "no version was written");
    assert_eq!(
        std::fs::read(dir.join(format!("{good}.safetensors"))).unwrap(),
        good_bytes,
        "the last good checkpoint is intact"
    );
    read_checkpoint(&dir.join(format!("{good}.safetensors"))).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".netcl-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Space again: the next version lands.
    fault::set_hook(None);
    wait_until(PATIENCE, "a version after the disk has room", || {
        latest(&dir) > good
    })
    .await;
    server.shutdown();
    server.wait().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
