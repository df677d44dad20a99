//! Hostile input never crashes, hangs or misleads: a corpus of alias bombs, huge numbers, long
//! strings, deep nesting, binary garbage and mutations of every bundled manifest through
//! `validate` and `plan` (no panic, no abort, none past 2 s, every error located); a corrupt
//! upstream object is never used; targets, `--force` and `--downstream`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::*;

/// Runs `progdiff <args>` with a 2-second limit; (exit code, stderr).
fn bounded(p: &Project, args: &[&str]) -> (Option<i32>, String, Duration) {
    let mut child = p.cmd(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            use std::os::unix::process::ExitStatusExt;
            if let Some(sig) = status.signal() {
                panic!("`progdiff {}` died of signal {sig}:\n{err}", args.join(" "));
            }
            return (status.code(), err, t.elapsed());
        }
        if t.elapsed() > Duration::from_secs(2) {
            let _ = child.kill();
            panic!("`progdiff {}` ran past 2 s", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn bundled() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for dir in ["manifests", "manifests/ci", "manifests/cpu", "manifests/paper"] {
        for e in std::fs::read_dir(repo().join(dir)).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "yaml") {
                out.push((e.path(), std::fs::read_to_string(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Hostile documents: hand-made and mutations of the bundled manifests.
fn corpus(rng: &mut ChaCha8Rng) -> Vec<(String, Vec<u8>)> {
    let mut c: Vec<(String, Vec<u8>)> = Vec::new();
    // Billion laughs.
    let mut bomb = vec!["a0: &a0 [x, x, x, x, x, x, x, x, x, x]".to_string()];
    for i in 1..10 {
        bomb.push(format!("a{i}: &a{i} [{}]", vec![format!("*a{}", i - 1); 10].join(", ")));
    }
    bomb.push("stages: { s: { kind: command, run: *a9 } }".into());
    c.push(("bomb".into(), bomb.join("\n").into_bytes()));
    c.push((
        "deep-seq".into(),
        format!("stages: {}{}", "[".repeat(50_000), "]".repeat(50_000)).into_bytes(),
    ));
    c.push((
        "deep-map".into(),
        format!("stages: {}x{}", "{a: ".repeat(5_000), "}".repeat(5_000)).into_bytes(),
    ));
    c.push((
        "long-key".into(),
        format!("stages:\n  {}: {{ kind: command, run: 'true' }}\n", "k".repeat(200_000))
            .into_bytes(),
    ));
    c.push((
        "long-value".into(),
        format!(
            "name: {}\nstages: {{ a: {{ kind: command, run: 'true' }} }}\n",
            "n".repeat(300_000)
        )
        .into_bytes(),
    ));
    c.push(("long-variant".into(), format!("stages: {{ a: {{ kind: command, run: 'true' }} }}\nsweep: {{ variants: [ {{ name: {}, a.run: 'false' }} ] }}\n", "v".repeat(100_000)).into_bytes()));
    c.push(("steps".into(), b"diffusion: { steps: 1000000000 }\nstages: { a: { kind: snr-allocate, groups: 1000000000 } }\n".to_vec()));
    c.push(("respacing".into(), b"diffusion: { steps: 4000, sample_steps: '999999999999' }\nstages: { a: { kind: snr-allocate } }\n".to_vec()));
    c.push(("model".into(), b"model: { image_size: 1048576, channels: 1073741824, channel_mult: [1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1] }\nstages: { a: { kind: snr-allocate } }\n".to_vec()));
    c.push(("binary".into(), (0..4096).map(|_| rng.r#gen::<u8>()).collect()));
    c.push(("not-utf8".into(), b"stages:\n  a: { kind: command, run: \"\xff\xfe\" }\n".to_vec()));
    c.push(("nul".into(), b"stages:\0\n  a: {}\n".to_vec()));
    // Mutations of every bundled manifest.
    let huge = ["1000000000", "-1", "1e308", "99999999999999999999999", ".nan", "0", "1.5"];
    for (path, text) in bundled() {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        for m in 0..8 {
            let mut t = text.clone().into_bytes();
            match m {
                // Every number at once replaced by a hostile one.
                0..=2 => {
                    let s = String::from_utf8(t).unwrap();
                    let h = huge[rng.gen_range(0..huge.len())];
                    let mut out = String::new();
                    let mut prev_digit = false;
                    for ch in s.chars() {
                        if ch.is_ascii_digit() {
                            if !prev_digit && rng.gen_bool(0.5) {
                                out.push_str(h);
                            } else if !prev_digit {
                                out.push(ch);
                            }
                            prev_digit = true;
                            continue;
                        }
                        prev_digit = false;
                        out.push(ch);
                    }
                    t = out.into_bytes();
                }
                // Truncated anywhere.
                3 => t.truncate(rng.gen_range(0..t.len().max(1))),
                // Random bytes flipped.
                4 => {
                    for _ in 0..8 {
                        let i = rng.gen_range(0..t.len());
                        t[i] ^= 1 << rng.gen_range(0..8);
                    }
                }
                // A line duplicated, a line deleted.
                5 => {
                    let s = String::from_utf8(t).unwrap();
                    let lines: Vec<&str> = s.lines().collect();
                    let i = rng.gen_range(0..lines.len());
                    let j = rng.gen_range(0..lines.len());
                    let mut v: Vec<&str> = lines.clone();
                    v.insert(i, lines[j]);
                    v.remove(rng.gen_range(0..v.len()));
                    t = v.join("\n").into_bytes();
                }
                // Indentation shuffled.
                6 => {
                    let s = String::from_utf8(t).unwrap();
                    t = s
                        .lines()
                        .map(|l| if rng.gen_bool(0.2) { format!(" {l}") } else { l.to_string() })
                        .collect::<Vec<_>>()
                        .join("\n")
                        .into_bytes();
                }
                // Anchors and aliases spliced in.
                _ => {
                    let s = String::from_utf8(t).unwrap();
                    t = format!(
                        "x: &x [{}]\n{}",
                        "*x, ".repeat(0) + "1, 2, 3",
                        s.replacen(": ", ": *x #", 1)
                    )
                    .into_bytes();
                }
            }
            c.push((format!("{name}-{m}"), t));
        }
    }
    c
}

#[test]
fn hostile_manifests_never_crash_hang_or_go_unlocated() {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let corpus = corpus(&mut rng);
    let p = Project::new();
    let mut slowest = Duration::ZERO;
    let mut located = 0;
    for (name, bytes) in &corpus {
        let file = format!("{name}.yaml");
        std::fs::write(p.path().join(&file), bytes).unwrap();
        for cmd in ["validate", "plan"] {
            let (code, err, took) = bounded(&p, &[cmd, &file]);
            slowest = slowest.max(took);
            match code {
                Some(0) => {}
                Some(2) => {
                    // Every error names its place: `file:line:col: ...`.
                    let first = err.lines().next().unwrap_or("");
                    let prefix = format!("{file}:");
                    let rest = first
                        .strip_prefix(&prefix)
                        .unwrap_or_else(|| panic!("`{cmd} {file}`: unlocated error:\n{err}"));
                    let mut parts = rest.splitn(3, ':');
                    let (l, c) = (parts.next().unwrap(), parts.next().unwrap());
                    assert!(l.parse::<usize>().is_ok() && c.parse::<usize>().is_ok(), "{err}");
                    located += 1;
                }
                other => panic!("`{cmd} {file}` exited {other:?}:\n{err}"),
            }
        }
    }
    assert!(located > corpus.len(), "most of the corpus is invalid: {located} located errors");
    eprintln!("{} documents, slowest command {slowest:?}", corpus.len());
}

const PIPE: &str = "name: pipe
seed: 1
data: { kind: synthetic, n: 16, image_size: 8, channels: gray }
model: { image_size: 8, in_channels: 1, channels: 32, channel_mult: [1], res_blocks: 1,
         attention_resolutions: [], heads: 1 }
diffusion: { steps: 40, schedule: cosine }
stages:
  base: { kind: train, steps: 4, batch_size: 2, log_every: 2 }
  allocate: { kind: snr-allocate, groups: 2, k: 0.5 }
  finetune: { kind: train, needs: [base, allocate], for_each: group, steps: 2, batch_size: 2, log_every: 1 }
  other: { kind: command, run: 'echo x > $PROGDIFF_OUT/x' }
";

fn ran(v: &serde_json::Value) -> Vec<String> {
    let mut ids: Vec<String> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "ran")
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

#[test]
fn targets_force_and_downstream() {
    let p = Project::new();
    p.write("m.yaml", PIPE);
    let (out, v) = p.json(&["run", "--json", "m.yaml", "finetune[1]"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(ran(&v), ["allocate", "base", "finetune[1]"], "the target and what it needs");
    let (_, plan) = p.json(&["plan", "--json", "m.yaml"]);
    assert_eq!(status_of(&plan, "finetune[0]"), "run");
    assert_eq!(status_of(&plan, "other"), "run");

    // A glob and a stage name.
    let (out, v) = p.json(&["run", "--json", "m.yaml", "fine*"]);
    assert!(out.status.success());
    assert_eq!(ran(&v), ["finetune[0]"]);
    let (_, plan) = p.json(&["plan", "--json", "m.yaml", "other"]);
    assert_eq!(plan["stages"].as_array().unwrap().len(), 1);

    // `--force` recomputes exactly the target.
    let (out, v) = p.json(&["run", "--json", "m.yaml", "--force", "allocate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(ran(&v), ["allocate", "other"], "the forced instance, and what had never run");
    let (out, v) = p.json(&["run", "--json", "m.yaml", "--force", "finetune[0]"]);
    assert!(out.status.success());
    assert_eq!(ran(&v), ["finetune[0]"]);

    // What a change to `allocate` touches.
    let (_, v) = p.json(&["plan", "--json", "--downstream", "m.yaml", "allocate"]);
    let ids: Vec<&str> =
        v["stages"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["allocate", "finetune[0]", "finetune[1]"]);

    // A target that names nothing.
    let out = p.run(&["plan", "m.yaml", "finetuen"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out)
            .contains("no stage instance matches `finetuen`\nhint: did you mean `finetune`?"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_corrupt_upstream_object_is_never_used() {
    let p = Project::new();
    p.write("m.yaml", PIPE);
    let (out, v) = p.json(&["run", "--json", "m.yaml", "base", "allocate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ema = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == "base").unwrap()["outputs"]
        ["ema.safetensors"]
        .as_str()
        .unwrap()
        .to_string();
    flip_a_byte(Path::new(&ema));
    let (out, v) = p.json(&["run", "--json", "m.yaml", "finetune[0]"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let s = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == "finetune[0]").unwrap();
    assert_eq!(s["status"], "failed");
    let error = s["error"].as_str().unwrap();
    assert!(
        error.contains("output `ema.safetensors` of upstream `base` is corrupt")
            && error.contains(&ema),
        "{error}"
    );
    // The next run computes the upstream again, then the downstream.
    let (_, plan) = p.json(&["plan", "--json", "m.yaml"]);
    assert_eq!(status_of(&plan, "base"), "run", "the corrupt record was dropped");
    let (out, v) = p.json(&["run", "--json", "m.yaml", "finetune[0]"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(ran(&v), ["base", "finetune[0]"]);
}

fn flip_a_byte(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    perms.set_mode(0o644);
    std::fs::set_permissions(path, perms).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() - 10;
    bytes[i] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_run_on_a_gpu_this_machine_lacks_stops_before_any_work() {
    if Path::new("/dev/nvidia7").exists() {
        return;
    }
    let p = Project::new();
    p.write("m.yaml", "stages: { a: { kind: command, run: 'true' } }\n");
    let t = Instant::now();
    let out = p.run(&["run", "--devices", "cuda:7", "m.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("device `cuda:7`: this machine has"), "{}", stderr(&out));
    assert!(!p.cache().exists(), "nothing was opened");
    assert!(t.elapsed() < Duration::from_secs(5));
    let _ = Command::new("true");
}
