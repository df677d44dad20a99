//! The remote cache (issue 12) against real servers the tests start: an S3 API (moto's server,
//! from the venv `scripts/test` installs) and a WebDAV server (nginx with `dav_methods`).
//! Without them the tests skip, saying so, unless `PROGDIFF_TEST_REMOTE=required` (CI).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// The secret every S3 test runs with: it must appear in no file, log or output.
const CANARY: &str = "canary-SECRET-4f1c9e2a7d";

/// A tiny pipeline: a train stage (weights), a command reading them, and a command writing
/// `size` bytes (a large object when `size` is large).
fn manifest(size: usize) -> String {
    format!(
        "data: {{ kind: synthetic, n: 16, image_size: 8, channels: gray, seed: 1 }}
model: {{ image_size: 8, in_channels: 1, channels: 32, channel_mult: [1], res_blocks: 1,
         attention_resolutions: [], heads: 1, dropout: 0.0, learn_sigma: false }}
diffusion: {{ steps: 10, schedule: cosine, loss: simple, sample_steps: \"5\" }}
stages:
  base: {{ kind: train, steps: 2, batch_size: 4, log_every: 1, checkpoint_every: 0 }}
  summary:
    kind: command
    needs: [base]
    run: 'wc -c < $PROGDIFF_INPUT_BASE_EMA_SAFETENSORS > $PROGDIFF_OUT/size'
  blob: {{ kind: command, run: 'yes progdiff | head -c {size} > $PROGDIFF_OUT/blob' }}
"
    )
}

fn required() -> bool {
    std::env::var("PROGDIFF_TEST_REMOTE").is_ok_and(|v| v == "required")
}

fn skip(what: &str) -> Option<Server> {
    assert!(!required(), "PROGDIFF_TEST_REMOTE=required but {what}");
    eprintln!("skipping: {what} (scripts/test installs it)");
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One raw HTTP/1.1 request (no client library in the tests); the status code and body.
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out);
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let at = out.windows(4).position(|w| w == b"\r\n\r\n").map_or(out.len(), |i| i + 4);
    Ok((code, out[at..].to_vec()))
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    port: u16,
    /// nginx's document root (the remote's files).
    root: Option<tempfile::TempDir>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn wait_ready(&self) {
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(60), "the server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// moto's S3 server with a bucket `bucket`.
    fn s3() -> Option<Server> {
        let home = std::env::var("PROGDIFF_HOME").map(PathBuf::from).unwrap_or_else(|_| {
            std::env::var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"))
                .join("progdiff")
        });
        let bin = home.join("moto-venv/bin/moto_server");
        if !bin.exists() {
            return skip(&format!("no S3 test server at {}", bin.display()));
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("moto.log")).unwrap())
            .spawn()
            .unwrap();
        let server = Server { child, port, root: None, _dir: dir };
        server.wait_ready();
        let t = Instant::now();
        loop {
            match http(port, "PUT", "/bucket", b"") {
                Ok((200, _)) => break,
                r => {
                    assert!(t.elapsed() < Duration::from_secs(60), "creating the bucket: {r:?}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        Some(server)
    }

    /// nginx serving a WebDAV root.
    fn webdav() -> Option<Server> {
        let Ok(nginx) = which("nginx") else { return skip("nginx is not installed") };
        let dir = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let port = free_port();
        let d = dir.path().display();
        let conf = format!(
            "daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{}}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  server {{
    listen 127.0.0.1:{port};
    root {};
    client_max_body_size 0;
    location / {{
      dav_methods PUT DELETE MKCOL COPY MOVE;
      create_full_put_path on;
      dav_access user:rw group:r all:r;
    }}
  }}
}}
",
            root.path().display()
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = Command::new(nginx)
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Server { child, port, root: Some(root), _dir: dir };
        server.wait_ready();
        Some(server)
    }

    fn s3_url(&self) -> String {
        "s3://bucket/lab".into()
    }

    fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}/cache", self.port)
    }

    /// The remote's file for `rel` (WebDAV).
    fn file(&self, rel: &str) -> PathBuf {
        self.root.as_ref().unwrap().path().join("cache").join(rel)
    }
}

fn which(name: &str) -> Result<PathBuf, ()> {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin", "/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(())
}

/// A machine: its own project directory and cache, talking to `server`.
struct Machine {
    p: Project,
    remote: String,
    port: u16,
}

impl Machine {
    fn new(server: &Server, remote: String, text: &str) -> Machine {
        let p = Project::new();
        p.write("m.yaml", text);
        Machine { p, remote, port: server.port }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.p.cmd(args);
        c.env("PROGDIFF_REMOTE", &self.remote)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", CANARY)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.port))
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().unwrap();
        for text in [stdout(&out), stderr(&out)] {
            assert!(!text.contains(CANARY), "the secret was printed:\n{text}");
        }
        out
    }

    fn json(&self, args: &[&str]) -> (Output, serde_json::Value) {
        let out = self.run(args);
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("stdout is not JSON ({e}):\n{}\nstderr:\n{}", stdout(&out), stderr(&out))
        });
        (out, v)
    }

    fn run_ok(&self, args: &[&str]) -> serde_json::Value {
        let (out, v) = self.json(args);
        assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
        v
    }
}

/// (id, status, remote, key) per instance of a run summary.
fn outcomes(v: &serde_json::Value) -> Vec<(String, String, bool, String)> {
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().into(),
                s["status"].as_str().unwrap().into(),
                s["remote"].as_bool().unwrap_or(false),
                s["key"].as_str().unwrap().into(),
            )
        })
        .collect()
}

/// An instance's output files: (name, bytes).
type Files = Vec<(String, Vec<u8>)>;

/// Output name -> bytes, per instance.
fn outputs(v: &serde_json::Value) -> Vec<(String, Files)> {
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let files = s["outputs"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(name, path)| (name.clone(), std::fs::read(path.as_str().unwrap()).unwrap()))
                .collect();
            (s["id"].as_str().unwrap().to_string(), files)
        })
        .collect()
}

/// Every file under `dir` (recursively) that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            found.extend(files_containing(&p, needle));
        } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
            found.push(p);
        }
    }
    found
}

/// Machine A computes and uploads; machine B, with an empty cache, plans `remote` for every
/// instance and gets every one as `hit (remote)`, byte for byte what A computed. The secret is
/// in no file of either cache.
fn a_then_b(server: &Server, url: String, size: usize) -> (Machine, Machine) {
    let text = manifest(size);
    let a = Machine::new(server, url.clone(), &text);
    let va = a.run_ok(&["run", "--json", "m.yaml"]);
    assert!(outcomes(&va).iter().all(|o| o.1 == "ran"), "{va:#}");

    let b = Machine::new(server, url, &text);
    let plan = b.run_ok(&["plan", "--json", "m.yaml"]);
    let statuses: Vec<String> = stage_rows(&plan).into_iter().map(|r| r.1).collect();
    assert_eq!(statuses, ["remote"; 3], "{plan:#}");
    let vb = b.run_ok(&["run", "--json", "m.yaml"]);
    for (id, status, remote, _) in outcomes(&vb) {
        assert!(status == "hit" && remote, "{id}: {status} (remote: {remote})\n{vb:#}");
    }
    assert_eq!(outputs(&va), outputs(&vb), "B's results are A's, byte for byte");
    let human = stdout(&b.run(&["run", "m.yaml"]));
    assert!(human.contains("0 ran, 3 hit"), "{human}");
    for m in [&a, &b] {
        let leaked = files_containing(m.p.path(), CANARY.as_bytes());
        assert!(leaked.is_empty(), "the secret is on disk: {leaked:?}");
    }
    (a, b)
}

#[test]
fn s3_a_second_machine_gets_every_result_as_a_verified_remote_hit() {
    let Some(s3) = Server::s3() else { return };
    // 20 MB: the blob goes up in parts (multipart upload) and comes down streamed.
    a_then_b(&s3, s3.s3_url(), 20 << 20);
}

#[test]
fn webdav_a_second_machine_gets_every_result_as_a_verified_remote_hit() {
    let Some(dav) = Server::webdav() else { return };
    let (_, b) = a_then_b(&dav, dav.http_url(), 20 << 20);
    // Bazel's layout; the large blob was streamed to a temporary name and moved into place.
    let v = b.run_ok(&["run", "--json", "m.yaml"]);
    for (_, files) in outputs(&v) {
        assert!(!files.is_empty());
    }
    let cas: Vec<_> = std::fs::read_dir(dav.file("cas")).unwrap().flatten().collect();
    assert!(cas.len() >= 5, "{cas:?}");
    let tmp = std::fs::read_dir(dav.file("tmp")).map(|d| d.count()).unwrap_or(0);
    assert!(tmp <= 1, "temporary uploads left behind: {tmp}"); // the `.created` marker
    let leaked = files_containing(dav.root.as_ref().unwrap().path(), CANARY.as_bytes());
    assert!(leaked.is_empty(), "the secret is on the remote: {leaked:?}");
}

/// Flips one byte of a remote object. The next machine must not use it: the instance is
/// computed instead (with a warning), and its upload replaces the bad object.
#[test]
fn a_corrupt_remote_object_is_never_used_and_is_uploaded_again() {
    let Some(dav) = Server::webdav() else { return };
    let text = manifest(64);
    let a = Machine::new(&dav, dav.http_url(), &text);
    let va = a.run_ok(&["run", "--json", "m.yaml"]);
    let blob = va["stages"].as_array().unwrap().iter().find(|s| s["id"] == "blob").unwrap();
    let digest = Path::new(blob["outputs"]["blob"].as_str().unwrap())
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let remote_object = dav.file(&format!("cas/{digest}"));
    let mut bytes = std::fs::read(&remote_object).unwrap();
    bytes[3] ^= 0x40;
    std::fs::write(&remote_object, &bytes).unwrap();

    let b = Machine::new(&dav, dav.http_url(), &text);
    let (out, vb) = b.json(&["run", "--json", "m.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let by_id = |id: &str| outcomes(&vb).into_iter().find(|o| o.0 == id).unwrap();
    assert_eq!(by_id("blob").1, "ran", "a corrupt object is not a hit: {vb:#}");
    assert!(by_id("base").2 && by_id("summary").2, "the sound results are still remote hits");
    let log = stdout(&b.run(&["log", "m.yaml", "blob"]));
    assert!(log.contains("is corrupt"), "{log}");
    // The recomputed object was uploaded over the bad one.
    let sound = std::fs::read(blob["outputs"]["blob"].as_str().unwrap()).unwrap();
    assert_eq!(std::fs::read(&remote_object).unwrap(), sound, "the remote object was repaired");
    let c = Machine::new(&dav, dav.http_url(), &text);
    let vc = c.run_ok(&["run", "--json", "m.yaml"]);
    assert!(outcomes(&vc).iter().all(|o| o.1 == "hit" && o.2), "{vc:#}");
    // `cache verify --remote-of` re-hashes the remote: all sound.
    let out = b.run(&["cache", "verify", "--remote-of", "m.yaml"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains(": 0 problems"), "{}", stdout(&out));
    // ... and finds a bad byte.
    std::fs::write(&remote_object, &bytes).unwrap();
    let out = b.run(&["cache", "verify", "--remote-of", "m.yaml"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains(&digest), "{}", stdout(&out));
}

#[test]
fn a_deleted_remote_object_makes_its_record_a_miss() {
    let Some(dav) = Server::webdav() else { return };
    let text = manifest(64);
    let a = Machine::new(&dav, dav.http_url(), &text);
    let va = a.run_ok(&["run", "--json", "m.yaml"]);
    let blob = va["stages"].as_array().unwrap().iter().find(|s| s["id"] == "blob").unwrap();
    let name = Path::new(blob["outputs"]["blob"].as_str().unwrap()).file_name().unwrap();
    std::fs::remove_file(dav.file(&format!("cas/{}", name.to_string_lossy()))).unwrap();

    let b = Machine::new(&dav, dav.http_url(), &text);
    let plan = b.run_ok(&["plan", "--json", "m.yaml"]);
    let rows = stage_rows(&plan);
    let status = |id: &str| rows.iter().find(|r| r.0 == id).unwrap().1.clone();
    assert_eq!(status("blob"), "run", "{plan:#}");
    assert_eq!(status("base"), "remote", "{plan:#}");
    let vb = b.run_ok(&["run", "--json", "m.yaml"]);
    let o = outcomes(&vb);
    assert_eq!(o.iter().find(|o| o.0 == "blob").unwrap().1, "ran", "{vb:#}");
}

/// Two machines compute the same non-deterministic instance at the same time: the remote
/// record is created once, and both end up with that one result.
#[test]
fn concurrent_runs_create_the_record_once_and_both_adopt_it() {
    let Some(s3) = Server::s3() else { return };
    let text = "stages:\n  r: { kind: command, run: 'sleep 1; head -c 4096 /dev/urandom > $PROGDIFF_OUT/r' }\n";
    let a = Machine::new(&s3, s3.s3_url(), text);
    let b = Machine::new(&s3, s3.s3_url(), text);
    let ca = a.cmd(&["run", "--json", "m.yaml"]).stdout(Stdio::piped()).spawn().unwrap();
    let cb = b.cmd(&["run", "--json", "m.yaml"]).stdout(Stdio::piped()).spawn().unwrap();
    let (oa, ob) = (ca.wait_with_output().unwrap(), cb.wait_with_output().unwrap());
    assert!(oa.status.success() && ob.status.success());
    // Both ran it (neither had it when it started) ...
    let va = a.run_ok(&["run", "--json", "m.yaml"]);
    let vb = b.run_ok(&["run", "--json", "m.yaml"]);
    // ... and both now hold the remote's one result.
    assert_eq!(outputs(&va), outputs(&vb), "both machines use the one remote record");
    // Exactly one of them won the record's creation; the other adopted it.
    let adopted: Vec<bool> = [&a, &b]
        .iter()
        .map(|m| stdout(&m.run(&["log", "m.yaml", "r"])).contains("published this key first"))
        .collect();
    assert_eq!(adopted.iter().filter(|x| **x).count(), 1, "{adopted:?}");
    let c = Machine::new(&s3, s3.s3_url(), text);
    let vc = c.run_ok(&["run", "--json", "m.yaml"]);
    assert!(outcomes(&vc)[0].2, "{vc:#}");
    assert_eq!(outputs(&vc), outputs(&va));
}

/// `push` killed in the middle of a large upload leaves no remote record (and no visible
/// object); the next `push` completes and another machine gets the results.
#[test]
fn a_push_killed_mid_upload_leaves_no_record_and_the_next_push_works() {
    for server in [Server::s3(), Server::webdav()].into_iter().flatten() {
        let url = if server.root.is_some() { server.http_url() } else { server.s3_url() };
        let text = manifest(200 << 20);
        let a = Machine::new(&server, url.clone(), &text);
        let v = a.run_ok(&["run", "--no-upload", "--json", "m.yaml"]);
        assert!(outcomes(&v).iter().all(|o| o.1 == "ran"));
        let probe = Machine::new(&server, url.clone(), &text);
        let nothing = probe.run_ok(&["plan", "--json", "m.yaml"]);
        assert!(stage_rows(&nothing).iter().all(|r| r.1 == "run"), "--no-upload uploads nothing");

        // One object at a time, so the kill lands in the middle of the 200 MB blob's upload.
        let mut push = a.cmd(&["push", "m.yaml", "blob", "--parallel", "1"]);
        let mut child = push.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        // Kill it as soon as the blob's upload is under way: its first part (S3) or its
        // temporary name's directory (WebDAV) has reached the server.
        let started = || match &server.root {
            Some(_) => server.file("tmp").exists(),
            None => std::fs::read_to_string(server._dir.path().join("moto.log"))
                .is_ok_and(|l| l.contains("partNumber")),
        };
        let t = Instant::now();
        while !started() {
            assert!(t.elapsed() < Duration::from_secs(60), "the upload never started");
            assert!(child.try_wait().unwrap().is_none(), "push ended before the upload began");
            std::thread::sleep(Duration::from_millis(2));
        }
        nix_kill(child.id());
        let _ = child.wait();
        let plan = probe.run_ok(&["plan", "--json", "m.yaml", "blob"]);
        assert_eq!(stage_rows(&plan)[0].1, "run", "no record after a killed push: {plan:#}");
        if server.root.is_some() {
            let visible = std::fs::read_dir(server.file("cas"))
                .map(|d| d.flatten().filter(|e| e.metadata().unwrap().len() > 1 << 20).count())
                .unwrap_or(0);
            assert_eq!(visible, 0, "a partial object is visible under cas/");
        }

        // The next run (all local hits) uploads what the remote lacks.
        let out = a.run(&["run", "m.yaml"]);
        assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
        assert!(stderr(&out).contains("uploaded 3 cached results"), "{}", stderr(&out));
        let out = a.run(&["push", "m.yaml", "--stage", "blob"]);
        assert!(stdout(&out).contains("there   blob"), "{}", stdout(&out));
        let pull = probe.run(&["pull", "m.yaml"]);
        assert!(pull.status.success(), "{}\n{}", stdout(&pull), stderr(&pull));
        let vp = probe.run_ok(&["run", "--json", "m.yaml"]);
        assert!(outcomes(&vp).iter().all(|o| o.1 == "hit"), "{vp:#}");
        assert_eq!(outputs(&vp), outputs(&v));
    }
}

fn nix_kill(pid: u32) {
    let status = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(status.success());
}

#[test]
fn credentials_never_reach_an_error_message_or_a_file() {
    let Some(s3) = Server::s3() else { return };
    // A bucket that does not exist: the error names the remote, not the secret.
    let m = Machine::new(&s3, "s3://no-such-bucket/x".into(), &manifest(8));
    let v = m.run_ok(&["run", "--no-upload", "--json", "m.yaml"]);
    assert!(outcomes(&v).iter().all(|o| o.1 == "ran"));
    let out = m.run(&["push", "m.yaml"]);
    assert!(!out.status.success());
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(text.contains("no-such-bucket"), "{text}");
    // Credentials in the URL are refused, without repeating them.
    let m = Machine::new(&s3, format!("http://user:{CANARY}@127.0.0.1:1/cache"), &manifest(8));
    let out = m.run(&["plan", "m.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("carries credentials"), "{}", stderr(&out));
    let leaked = files_containing(m.p.path(), CANARY.as_bytes());
    assert!(leaked.iter().all(|p| p.ends_with("m.yaml")), "{leaked:?}");
}
