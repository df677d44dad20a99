//! `hash_file` throughput against the `b3sum` tool on the same file.
//!
//! ```text
//! cargo bench -p progdiff-cache --bench hash              # 1 GiB
//! PROGDIFF_BENCH_HASH_MIB=256 cargo bench -p progdiff-cache --bench hash
//! ```
//!
//! The file is hashed once before timing so both contenders read from a warm page cache; each
//! figure is the best of [`RUNS`] runs. `b3sum` times include its process start-up (a few ms).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use progdiff_cache::hash_file;

const RUNS: usize = 5;
const B3SUM: &str = "/usr/bin/b3sum";

fn main() {
    let mib: u64 =
        std::env::var("PROGDIFF_BENCH_HASH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("blob.bin");
    write_pseudo_random(&path, mib);
    let gib = mib as f64 / 1024.0;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("file: {mib} MiB, {threads} hardware threads, best of {RUNS} runs, warm page cache");

    let expected = hash_file(&path).expect("hash"); // warm-up
    let ours = best_of(|| {
        assert_eq!(hash_file(&path).expect("hash"), expected);
    });
    let ours_rate = gib / ours.as_secs_f64();
    println!("hash_file: {:>8.3} s  {ours_rate:>6.2} GiB/s", ours.as_secs_f64());

    if !Path::new(B3SUM).exists() {
        println!("b3sum: `{B3SUM}` not found; skipping the comparison");
        return;
    }
    let theirs = best_of(|| {
        let out = Command::new(B3SUM).arg("--no-names").arg(&path).output().expect("run b3sum");
        assert!(out.status.success(), "b3sum failed");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected.to_hex());
    });
    let theirs_rate = gib / theirs.as_secs_f64();
    println!("b3sum:     {:>8.3} s  {theirs_rate:>6.2} GiB/s", theirs.as_secs_f64());
    println!("hash_file / b3sum throughput: {:.2}", ours_rate / theirs_rate);
}

fn best_of(mut f: impl FnMut()) -> Duration {
    (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .expect("RUNS > 0")
}

/// Writes `mib` MiB of xorshift output (incompressible, not sparse).
fn write_pseudo_random(path: &Path, mib: u64) {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&chunk).expect("write");
    }
    file.flush().expect("flush");
}
