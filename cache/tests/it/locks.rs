//! Two threads and two processes contending on one key: exactly one computes.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use progdiff_cache::{Cache, Digest, hash_bytes};

use super::record;

const CHILD_ROOT: &str = "PROGDIFF_CACHE_TEST_ROOT";
const CHILD_MODE: &str = "PROGDIFF_CACHE_TEST_MODE";

/// The engine's protocol for one stage: lock, re-check, compute if absent, publish. The
/// "computation" appends a line to `counter` and takes a while, so contenders really overlap.
/// Returns whether this caller computed.
fn run_stage(cache: &Cache, key_seed: &str, counter: &Path) -> bool {
    let rec = record(key_seed, &[]);
    let _lock = cache.lock_key(&rec.key).unwrap();
    if cache.record(&rec.key).unwrap().is_some() {
        return false;
    }
    let mut f = OpenOptions::new().create(true).append(true).open(counter).unwrap();
    writeln!(f, "computed by {}", std::process::id()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = cache.put_bytes(format!("output of {key_seed}").as_bytes()).unwrap();
    cache.publish(&record(key_seed, &[("out", out)])).unwrap();
    true
}

fn lines(path: &Path) -> usize {
    fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0)
}

#[test]
fn two_threads_one_computation() {
    let (dir, cache) = super::cache();
    let cache = Arc::new(cache);
    let counter = dir.path().join("counter");
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (cache, counter, barrier) = (cache.clone(), counter.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                run_stage(&cache, "base", &counter)
            })
        })
        .collect();
    let computed: usize = handles.into_iter().map(|h| usize::from(h.join().unwrap())).sum();
    assert_eq!(computed, 1);
    assert_eq!(lines(&counter), 1);
    assert!(cache.record(&hash_bytes(b"base")).unwrap().is_some());
}

/// Spawns this test binary again, running only [`child`] in `mode`.
fn spawn_child(root: &Path, mode: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["locks::child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROOT, root)
        .env(CHILD_MODE, mode)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// Not a test of its own: the body of the child processes (does nothing when run normally).
#[test]
fn child() {
    let (Some(root), Some(mode)) = (std::env::var_os(CHILD_ROOT), std::env::var(CHILD_MODE).ok())
    else {
        return;
    };
    let root = Path::new(&root);
    let cache = Cache::open(root.join("cache")).unwrap();
    match mode.as_str() {
        "stage" => {
            run_stage(&cache, "base", &root.join("counter"));
        }
        "hold" => {
            let _lock = cache.lock_key(&hash_bytes(b"held")).unwrap();
            fs::write(root.join("holding"), b"").unwrap();
            std::thread::sleep(Duration::from_secs(60));
        }
        other => panic!("unknown mode {other}"),
    }
}

#[test]
fn two_processes_one_computation() {
    let dir = tempfile::tempdir().unwrap();
    let children: Vec<_> = (0..3).map(|_| spawn_child(dir.path(), "stage")).collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    assert_eq!(lines(&dir.path().join("counter")), 1);
    let cache = Cache::open(dir.path().join("cache")).unwrap();
    let rec = cache.record(&hash_bytes(b"base")).unwrap().unwrap();
    assert_eq!(cache.read_object(&rec.outputs["out"].digest).unwrap(), b"output of base");
}

#[test]
fn lock_released_when_holder_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_child(dir.path(), "hold");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.path().join("holding").exists() {
        assert!(Instant::now() < deadline, "child never took the lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    let cache = Cache::open(dir.path().join("cache")).unwrap();
    let key: Digest = hash_bytes(b"held");
    assert!(cache.try_lock_key(&key).unwrap().is_none());
    // gc must not touch a key a live process holds
    let report = cache.gc(&Default::default(), false).unwrap();
    assert_eq!(report.skipped_locked, [key]);
    assert!(!report.quiescent);
    child.kill().unwrap(); // SIGKILL: no destructors run
    child.wait().unwrap();
    let lock = cache.try_lock_key(&key).unwrap();
    assert!(lock.is_some(), "the OS releases the lock of a killed process");
}
