//! Job descriptions and job logs: the files a coordinator and its workers share through the
//! cache (so a worker on another node of a shared filesystem finds them too).
//!
//! ```text
//! <root>/v1/jobs/ab/<key>.json   the last job description written for a key
//! <root>/v1/logs/ab/<key>.log    the worker's log for a key, every attempt appended
//! ```
//!
//! Both are kept after the job ends (a failed job's log is what its summary points at; a
//! description can be run again by hand with `progdiff-worker exec`); `gc` removes those of keys
//! it collects.

use std::fs::{self, File, OpenOptions};
use std::path::PathBuf;

use crate::atomic::FILE_MODE;
use crate::error::{Result, io_err};
use crate::{Cache, Digest};

impl Cache {
    /// Where the job description of `key` is written.
    pub fn job_path(&self, key: &Digest) -> PathBuf {
        self.sharded("jobs", key, ".json")
    }

    /// Writes the job description of `key` atomically; returns its path.
    pub fn write_job(&self, key: &Digest, description: &[u8]) -> Result<PathBuf> {
        let path = self.job_path(key);
        self.write_atomic(&path, description, FILE_MODE)?;
        Ok(path)
    }

    /// Where the worker log of `key` goes.
    pub fn log_path(&self, key: &Digest) -> PathBuf {
        self.sharded("logs", key, ".log")
    }

    /// The log of `key` opened for appending (created with its shard directory if needed).
    pub fn open_log(&self, key: &Digest) -> Result<File> {
        self.writable("write a job log")?;
        let path = self.log_path(key);
        let dir = path.parent().expect("sharded paths have a parent");
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        OpenOptions::new().create(true).append(true).open(&path).map_err(io_err("open", &path))
    }
}
