//! Helpers shared by the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A temporary project: a directory with manifests and its own cache.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new() -> Self {
        Project { dir: tempfile::tempdir().unwrap() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn cache(&self) -> PathBuf {
        self.path().join("cache")
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `progdiff <args>` in the project directory with the project's cache.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_progdiff"));
        c.args(args)
            .current_dir(self.path())
            .env("PROGDIFF_CACHE_DIR", self.cache())
            // The test runner runs tests side by side: one libtorch thread per progdiff keeps
            // OpenMP threads from spinning against each other (a tenfold slowdown).
            .env("PROGDIFF_THREADS", "1")
            .env_remove("PROGDIFF_LOG");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs and parses stdout as JSON.
    pub fn json(&self, args: &[&str]) -> (Output, serde_json::Value) {
        let out = self.run(args);
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("stdout is not JSON ({e}):\n{}\nstderr:\n{}", stdout(&out), stderr(&out))
        });
        (out, v)
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `stages` of a plan/run JSON as (id, status, reasons).
pub fn stage_rows(v: &serde_json::Value) -> Vec<(String, String, Vec<String>)> {
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
                s["reasons"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

/// Status of instance `id`.
pub fn status_of(v: &serde_json::Value, id: &str) -> String {
    stage_rows(v).into_iter().find(|r| r.0 == id).unwrap_or_else(|| panic!("no stage `{id}`")).1
}
