//! Cache integrity end to end (issue 17): a corrupted object is never reused or propagated,
//! records that disagree with their objects are caught, no work area outlives its stage, a
//! read-only cache serves what it holds, and unreadable manifests fail one way everywhere.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::common::*;

/// The path of output `name` of instance `id` in a run summary.
fn output(v: &serde_json::Value, id: &str, name: &str) -> PathBuf {
    let s = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap();
    PathBuf::from(s["outputs"][name].as_str().unwrap_or_else(|| panic!("{id}: no `{name}`: {s}")))
}

fn digest_of(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// Makes a (read-only) object writable and flips one byte in it.
fn flip_byte(path: &Path, at: usize) {
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(path, perms).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

fn run_ok(p: &Project, manifest: &str) -> serde_json::Value {
    let (out, v) = p.json(&["run", "--json", manifest]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    v
}

fn verify(p: &Project, extra: &[&str]) -> Output {
    let mut args = vec!["cache", "verify"];
    args.extend_from_slice(extra);
    p.run(&args)
}

fn record_path(p: &Project, key: &str) -> PathBuf {
    p.cache().join("v1/records").join(&key[..2]).join(format!("{key}.json"))
}

fn key_of(v: &serde_json::Value, id: &str) -> String {
    let s = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap();
    s["key"].as_str().unwrap().to_string()
}

#[test]
fn issue_17_a_recomputed_stage_replaces_a_corrupted_object_instead_of_reusing_it() {
    let p = Project::new();
    p.write("m.yaml", "stages:\n  a: { kind: command, run: 'printf hello > $PROGDIFF_OUT/x' }\n");
    let v = run_ok(&p, "m.yaml");
    let object = output(&v, "a", "x");
    flip_byte(&object, 1);
    // Another stage (another key) producing the same bytes stores them under the same name.
    p.write(
        "m.yaml",
        "stages:\n  a: { kind: command, run: 'printf hello > $PROGDIFF_OUT/x; true' }\n",
    );
    let v = run_ok(&p, "m.yaml");
    assert_eq!(status_of(&v, "a"), "ran");
    assert_eq!(output(&v, "a", "x"), object);
    assert_eq!(std::fs::read(&object).unwrap(), b"hello", "the damaged object was replaced");
    let out = verify(&p, &[]);
    assert!(out.status.success(), "{}", stdout(&out));
}

/// `base` writes its weights; `finetune` reads them; `resumable` fails once after saving resume
/// state computed from them, and completes from that state on the next run.
const CHAIN: &str = "stages:
  base: { kind: command, run: 'printf base-weights > $PROGDIFF_OUT/ema.safetensors' }
  finetune:
    kind: command
    needs: [base]
    run: 'cat $PROGDIFF_INPUT_BASE_EMA_SAFETENSORS > $PROGDIFF_OUT/tuned; echo +tuned >> $PROGDIFF_OUT/tuned'
  resumable:
    kind: command
    needs: [base]
    run: 'if [ -f $PROGDIFF_WORK/state ]; then cp $PROGDIFF_WORK/state $PROGDIFF_OUT/resumed;
          else cat $PROGDIFF_INPUT_BASE_EMA_SAFETENSORS > $PROGDIFF_WORK/state; exit 1; fi'
";

#[test]
fn issue_17_repair_removes_everything_computed_from_a_corrupted_input() {
    // A clean cache: what every output should be.
    let clean = Project::new();
    clean.write("m.yaml", CHAIN);
    let (out, _) = clean.json(&["run", "--json", "m.yaml"]);
    assert_eq!(out.status.code(), Some(1), "`resumable` fails the first time");
    let expected = run_ok(&clean, "m.yaml");

    // The dependents computed from `base`; then one of `base`'s objects goes bad on disk.
    // (A stage reading it now would refuse it: the worker re-hashes its inputs. `repair` must
    // also remove what was computed from it, whenever that was.)
    let p = Project::new();
    p.write("m.yaml", CHAIN);
    let (out, _) = p.json(&["run", "--json", "m.yaml"]);
    assert_eq!(out.status.code(), Some(1), "`resumable` fails the first time, keeping a work dir");
    let (_, v) = p.json(&["run", "--json", "m.yaml", "base"]);
    flip_byte(&output(&v, "base", "ema.safetensors"), 0);

    let out = verify(&p, &["--delete-corrupt"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("corrupt object"), "{text}");
    assert!(
        text.contains(
            "removed 1 corrupt objects, 2 records (1 of them computed from removed ones), 1 work \
             dirs, 0 temp entries"
        ),
        "{text}"
    );
    let out = verify(&p, &[]);
    assert!(out.status.success(), "{}", stdout(&out));

    // Everything runs again from clean bytes and ends as in the clean cache.
    let (_, plan) = p.json(&["plan", "--json", "m.yaml"]);
    for id in ["base", "finetune", "resumable"] {
        assert_eq!(status_of(&plan, id), "run", "{id}");
    }
    let (out, _) = p.json(&["run", "--json", "m.yaml"]);
    assert_eq!(out.status.code(), Some(1), "`resumable` starts over, so it fails once more");
    let v = run_ok(&p, "m.yaml");
    for (id, name) in [("base", "ema.safetensors"), ("finetune", "tuned"), ("resumable", "resumed")]
    {
        assert_eq!(digest_of(&output(&v, id, name)), digest_of(&output(&expected, id, name)));
    }
    assert!(verify(&p, &[]).status.success());
}

#[test]
fn issue_17_verify_flags_records_that_disagree_with_their_objects() {
    let p = Project::new();
    p.write(
        "m.yaml",
        "stages:
  a: { kind: command, run: 'printf aaaa > $PROGDIFF_OUT/x' }
  b: { kind: command, run: 'printf bbbb > $PROGDIFF_OUT/x' }
",
    );
    let v = run_ok(&p, "m.yaml");
    let (a, b) = (key_of(&v, "a"), key_of(&v, "b"));
    let edit = |key: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let path = record_path(&p, key);
        let mut j: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        f(&mut j);
        std::fs::write(&path, serde_json::to_vec_pretty(&j).unwrap()).unwrap();
    };

    // A size that disagrees with the object.
    edit(&a, &|j| j["outputs"]["x"]["size"] = 3.into());
    let out = verify(&p, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("checksum mismatch: it was changed after it was published"));
    edit(&a, &|j| {
        j.as_object_mut().unwrap().remove("checksum");
    });
    let out = verify(&p, &[]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("says output `x` is object"), "{text}");
    assert!(text.contains("of 3 bytes, but that object has 4 bytes"), "{text}");
    let (_, plan) = p.json(&["plan", "--json", "m.yaml"]);
    assert_eq!(status_of(&plan, "a"), "run", "not a hit");

    // `b` pointing at `a`'s object (same size): only the checksum can tell.
    let v = run_ok(&p, "m.yaml");
    let a_object = digest_of(&output(&v, "a", "x"));
    edit(&b, &|j| j["outputs"]["x"]["digest"] = a_object.clone().into());
    let out = verify(&p, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains(&format!("bad record `{}`", record_path(&p, &b).display())));
    let (_, plan) = p.json(&["plan", "--json", "m.yaml"]);
    assert_eq!(status_of(&plan, "b"), "run", "not a hit");
    assert_eq!(verify(&p, &["--delete-corrupt"]).status.code(), Some(1));
    let v = run_ok(&p, "m.yaml");
    assert_eq!(status_of(&v, "b"), "ran");
    assert_eq!(std::fs::read(output(&v, "b", "x")).unwrap(), b"bbbb");
    assert!(verify(&p, &[]).status.success());
}

#[test]
fn issue_17_a_worker_dying_right_after_publishing_completes_its_stage_and_leaves_no_work_dir() {
    let p = Project::new();
    p.write(
        "m.yaml",
        "stages:
  a: { kind: command, run: 'echo partial > $PROGDIFF_WORK/state; printf a > $PROGDIFF_OUT/x' }
  b: { kind: command, needs: [a], run: 'cat $PROGDIFF_INPUT_A_X > $PROGDIFF_OUT/y' }
",
    );
    // A worker that publishes, then dies before it reports or cleans up (as `kill -9` right
    // after the record's rename would leave it): its work area is put back and it kills itself.
    let real = Path::new(env!("CARGO_BIN_EXE_progdiff")).with_file_name("progdiff-worker");
    let wrapper = p.write(
        "worker.sh",
        &format!(
            "#!/bin/sh\n{} \"$@\" > /dev/null\nkey=$(basename \"$2\" .json)\nmkdir -p \
             {cache}/v1/work/$key\necho partial > {cache}/v1/work/$key/state\nkill -9 $$\n",
            real.display(),
            cache = p.cache().display()
        ),
    );
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap();
    let out =
        p.cmd(&["run", "--json", "m.yaml"]).env("PROGDIFF_WORKER", &wrapper).output().unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((status_of(&v, "a"), status_of(&v, "b")), ("ran".into(), "ran".into()));
    assert_eq!(std::fs::read(output(&v, "b", "y")).unwrap(), b"a");
    assert!(stderr(&out).contains("after publishing the stage's record"), "{}", stderr(&out));
    let work = |id: &str| p.cache().join("v1/work").join(key_of(&v, id));
    assert!(work("a").exists() && work("b").exists(), "the wrapper left them");

    // `verify` reports them, the next run removes them.
    let out = verify(&p, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("work dir of a completed stage"), "{}", stdout(&out));
    let v = run_ok(&p, "m.yaml");
    assert!(stage_rows(&v).iter().all(|r| r.1 == "hit"), "{v:#}");
    assert!(!work("a").exists() && !work("b").exists());
    assert!(verify(&p, &[]).status.success());

    // So do `gc` and `verify --delete-corrupt`.
    for command in [&["cache", "gc", "m.yaml"][..], &["cache", "verify", "--delete-corrupt"]] {
        std::fs::create_dir_all(work("a")).unwrap();
        std::fs::write(work("a").join("state"), b"partial").unwrap();
        let out = p.run(command);
        assert!(!work("a").exists(), "{command:?}: {}", stdout(&out));
        assert!(verify(&p, &[]).status.success());
    }
}

/// Every file under `dir` with its size and mtime (what a read-only cache must not change).
fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            out.extend(snapshot(&path));
        }
        out.push((path, meta.len(), meta.modified().unwrap()));
    }
    out.sort();
    out
}

const CACHED: &str = "stages:
  a: { kind: command, run: 'printf a > $PROGDIFF_OUT/x', inputs: [data.txt] }
  b: { kind: command, needs: [a], run: 'cat $PROGDIFF_INPUT_A_X > $PROGDIFF_OUT/y' }
";

/// A project whose cache holds every stage of `m.yaml` (and whose `data.txt` has changed its
/// mtime, so a plan would want to update the file-digest memo).
fn cached_project() -> (Project, serde_json::Value) {
    let p = Project::new();
    p.write("m.yaml", CACHED);
    p.write("data.txt", "data");
    let v = run_ok(&p, "m.yaml");
    // Same content, another (settled) mtime: `plan` hashes it again and would memoise it.
    let data = std::fs::File::open(p.path().join("data.txt")).unwrap();
    data.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600)).unwrap();
    (p, v)
}

/// `run`, `plan` and `verify` of a fully cached manifest against a read-only cache: what they
/// report, with `prefix` (e.g. `unshare ... --`) in front of `progdiff`.
fn check_read_only_serving(p: &Project, first: &serde_json::Value, prefix: &[&str]) {
    let cmd = |args: &[&str]| {
        let mut c = match prefix.split_first() {
            Some((program, rest)) => {
                let mut c = std::process::Command::new(program);
                c.args(rest).arg(env!("CARGO_BIN_EXE_progdiff"));
                c
            }
            None => std::process::Command::new(env!("CARGO_BIN_EXE_progdiff")),
        };
        c.args(args)
            .current_dir(p.path())
            .env("PROGDIFF_CACHE_DIR", p.cache())
            .env("PROGDIFF_THREADS", "1");
        c.output().unwrap()
    };
    let out = cmd(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(stage_rows(&v).iter().all(|r| r.1 == "hit"), "{v:#}");
    assert_eq!(output(&v, "b", "y"), output(first, "b", "y"));
    let out = cmd(&["cache", "verify"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("cache is consistent"));
    let out = cmd(&["plan", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("2 cached, 0 to run"), "{}", stdout(&out));
    let out = cmd(&["cache", "ls"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // What would need a write fails clearly.
    p.write("m2.yaml", &CACHED.replace("printf a", "printf A"));
    let out = cmd(&["run", "--json", "m2.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == "a").unwrap();
    let error = a["error"].as_str().unwrap();
    assert!(error.starts_with("cannot run `a`: the cache `"), "{error}");
    assert!(error.contains("` is read-only, so it can only serve stages it holds"), "{error}");
    assert_eq!(status_of(&v, "b"), "skipped");
    let out = cmd(&["cache", "gc"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot collect garbage: the cache `"), "{}", stderr(&out));
}

#[test]
fn issue_17_a_cache_declared_read_only_serves_a_cached_run_and_verify_and_writes_nothing() {
    let (p, first) = cached_project();
    let before = snapshot(&p.cache());
    // `env` puts the variable in front of progdiff, as a CI job's environment would.
    check_read_only_serving(&p, &first, &["env", "PROGDIFF_CACHE_READ_ONLY=1"]);
    assert_eq!(snapshot(&p.cache()), before, "the cache was written to");
}

/// The same against a real read-only file system: the cache bind-mounted read-only over itself
/// in a private mount namespace (`unshare`; a user namespace where allowed, so root is not
/// needed, and nothing outlives the command). Root ignores permission bits, so `chmod -R a-w`
/// proves nothing where tests run as root (as in CI); a read-only mount stops root too. Where
/// no namespace can be made (a locked-down container), a non-root user falls back to `chmod`,
/// and root has nothing left to try: the test says so and checks the declared mode only.
#[test]
fn issue_17_a_cache_on_a_read_only_mount_serves_a_cached_run_and_verify() {
    let (p, first) = cached_project();
    let mount = "mount --bind \"$0\" \"$0\" && mount -o remount,bind,ro \"$0\" && exec \"$@\"";
    let cache = p.cache().to_string_lossy().into_owned();
    let probe = |userns: bool| {
        let flags = if userns { "-rm" } else { "-m" };
        std::process::Command::new("unshare")
            .args([
                flags,
                "sh",
                "-c",
                mount,
                &cache,
                "sh",
                "-c",
                "! touch \"$0/probe\" 2>/dev/null",
            ])
            .arg(&cache)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let flags = [true, false].into_iter().find(|&userns| probe(userns));
    let before = snapshot(&p.cache());
    match flags {
        Some(userns) => {
            let flags = if userns { "-rm" } else { "-m" };
            check_read_only_serving(&p, &first, &["unshare", flags, "sh", "-c", mount, &cache]);
        }
        None if !running_as_root() => {
            let chmod = |mode: &str| {
                let s = std::process::Command::new("chmod").args(["-R", mode, &cache]).status();
                assert!(s.unwrap().success());
            };
            chmod("a-w");
            check_read_only_serving(&p, &first, &[]);
            chmod("u+w");
        }
        None => {
            eprintln!(
                "skipped: running as root and `unshare` cannot make a mount namespace here, so \
                 no read-only file system can be made (the declared read-only mode is tested)"
            );
            return;
        }
    }
    assert_eq!(snapshot(&p.cache()), before, "the cache was written to");
}

fn running_as_root() -> bool {
    // The owner of a file this process just created is its effective user.
    let f = tempfile::NamedTempFile::new().unwrap();
    std::os::unix::fs::MetadataExt::uid(&f.as_file().metadata().unwrap()) == 0
}

#[test]
fn issue_17_extends_naming_a_fifo_is_a_located_error_not_a_hang() {
    let p = Project::new();
    let fifo = p.path().join("base.yaml");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    p.write("m.yaml", "extends: base.yaml\nstages:\n  a: { kind: command, run: 'true' }\n");
    p.write("dir.yaml", "extends: .\nstages:\n  a: { kind: command, run: 'true' }\n");
    for command in ["validate", "plan"] {
        let mut child = p
            .cmd(&[command, "m.yaml", "dir.yaml"][..if command == "plan" { 2 } else { 3 }])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let t = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            if t.elapsed() > std::time::Duration::from_secs(20) {
                child.kill().unwrap();
                panic!("`{command}` hangs on an `extends:` FIFO");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{command}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(
                "m.yaml:1:10: `extends`: cannot read `./base.yaml`: it is a named pipe (FIFO), \
                 not a regular file"
            ),
            "{command}: {err}"
        );
        if command == "validate" {
            assert!(
                err.contains("dir.yaml:1:10: `extends`: cannot read `./.`: it is a directory"),
                "{err}"
            );
        }
    }
}

#[test]
fn issue_17_an_unreadable_manifest_exits_2_with_its_cause_from_every_command() {
    let p = Project::new();
    std::fs::create_dir(p.path().join("dir.yaml")).unwrap();
    let fifo = p.path().join("fifo.yaml");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let cases = [
        ("missing.yaml", "No such file or directory"),
        ("dir.yaml", "it is a directory, not a regular file"),
        ("fifo.yaml", "it is a named pipe (FIFO), not a regular file"),
    ];
    for (file, cause) in cases {
        for args in [
            &["validate", file][..],
            &["plan", file],
            &["run", file],
            &["graph", file],
            &["report", file],
            &["cache", "gc", file],
        ] {
            let out = p.run(args);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
            let err = stderr(&out);
            assert!(
                err.contains(&format!("error: cannot read manifest `{file}`")),
                "{args:?}: {err}"
            );
            assert!(err.contains(&format!("caused by: {cause}")), "{args:?}: {err}");
        }
    }
}
