//! Leases: per-key locks that hold across the machines of a shared filesystem.
//!
//! `flock` does not reach across NFS clients, so a worker on one node cannot see a lock taken on
//! another. A lease is a file created exclusively (`O_CREAT | O_EXCL`, atomic on NFSv3+ and
//! every local filesystem) at `<root>/v1/leases/ab/<key>.lease`, holding its owner (host, pid,
//! Slurm job id when there is one) and an expiry that a heartbeat thread pushes forward while the
//! owner lives. Another process may break a lease only when it has expired *and* its owner is
//! known to be gone: a process on this host that no longer exists, or a Slurm job no longer in
//! the queue (asked through the caller's [`OwnerCheck`]). An owner on another host without a
//! Slurm job is taken for gone once the lease has expired, since nothing else can be asked.
//!
//! Breakers exclude each other (a `.breaking` file created exclusively) and judge the lease again
//! under that guard, so two processes cannot both break the same lease and both take the key.
//!
//! The engine's protocol (in the worker) is: take the key's `flock` (same-host exclusion, freed
//! by the kernel when the process dies), then its lease (cross-host exclusion), re-check the
//! record, compute, publish, release both.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::error::{Result, io_err};
use crate::{Cache, Digest};

/// Who holds a lease, and until when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseOwner {
    /// Host name.
    pub host: String,
    /// Process id on that host.
    pub pid: u32,
    /// The Slurm job (`123` or `123_4`) the owner runs in, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_job: Option<String>,
    /// Seconds since the Unix epoch after which the lease lapses unless refreshed.
    pub expires: u64,
}

/// Whether a lease's owner is still alive, for owners this process cannot see (a Slurm job on
/// another node): `Some(true)` alive, `Some(false)` gone, `None` unknown.
pub type OwnerCheck = dyn Fn(&LeaseOwner) -> Option<bool> + Send + Sync;

/// A held lease: refreshed every third of its time to live by a thread, removed on drop.
pub struct Lease {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    owner: Arc<Mutex<LeaseOwner>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("path", &self.path).finish()
    }
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Cache {
    /// Where the lease of `key` lives.
    pub fn lease_path(&self, key: &Digest) -> PathBuf {
        self.sharded("leases", key, ".lease")
    }

    /// The current owner of `key`'s lease, if any (an unreadable lease file reads as `None`).
    pub fn lease_owner(&self, key: &Digest) -> Option<LeaseOwner> {
        let bytes = fs::read(self.lease_path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Takes `key`'s lease for `ttl`, breaking a stale one; `None` when another owner holds it.
    pub fn try_lease(
        &self,
        key: &Digest,
        slurm_job: Option<String>,
        ttl: Duration,
        check: &OwnerCheck,
    ) -> Result<Option<Lease>> {
        let path = self.lease_path(key);
        let dir = path.parent().expect("sharded paths have a parent").to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let owner = LeaseOwner {
            host: crate::host_name(),
            pid: std::process::id(),
            slurm_job,
            expires: now_s() + ttl.as_secs().max(1),
        };
        for _ in 0..2 {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    let bytes = serde_json::to_vec(&owner).expect("owners serialise");
                    f.write_all(&bytes)
                        .and_then(|_| f.sync_all())
                        .map_err(io_err("write", &path))?;
                    return Ok(Some(self.start_heartbeat(path, owner, ttl)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if !self.break_if_stale(&path, owner.slurm_job.as_deref(), check)? {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(io_err("create", &path)(e)),
            }
        }
        Ok(None)
    }

    /// Removes the lease at `path` when it has expired and its owner is gone; true when it did
    /// (or the file vanished meanwhile). Breakers exclude each other with a `.breaking` file
    /// created exclusively, and judge the lease again while holding it, so a fresh lease that
    /// replaced a stale one is never removed by a second breaker.
    fn break_if_stale(
        &self,
        path: &std::path::Path,
        own_job: Option<&str>,
        check: &OwnerCheck,
    ) -> Result<bool> {
        let guard = path.with_extension("lease.breaking");
        match OpenOptions::new().write(true).create_new(true).open(&guard) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Another breaker is at it; one that died long ago leaves a stale guard.
                if age(&guard).is_some_and(|a| a > Duration::from_secs(60)) {
                    let _ = fs::remove_file(&guard);
                }
                return Ok(false);
            }
            Err(e) => return Err(io_err("create", &guard)(e)),
        }
        let result = self.judge_and_remove(path, own_job, check);
        let _ = fs::remove_file(&guard);
        result
    }

    fn judge_and_remove(
        &self,
        path: &std::path::Path,
        own_job: Option<&str>,
        check: &OwnerCheck,
    ) -> Result<bool> {
        let owner: Option<LeaseOwner> =
            fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let stale = match owner {
            // Vanished, or being written right now (created but not yet filled): an empty or
            // garbled file older than a minute is stale.
            None => age(path).is_none_or(|a| a > Duration::from_secs(60)),
            // An earlier run of this very Slurm job (requeued after its worker was killed
            // before it could let go): Slurm runs one incarnation of a job at a time, so that
            // holder is dead, although its job is in the queue (it is this one).
            Some(owner)
                if own_job.is_some()
                    && owner.slurm_job.as_deref() == own_job
                    && (owner.host != crate::host_name() || owner.pid != std::process::id()) =>
            {
                warn!(
                    path = %path.display(),
                    job = ?owner.slurm_job,
                    pid = owner.pid,
                    "breaking the lease of an earlier run of this Slurm job"
                );
                true
            }
            Some(owner) if owner.expires > now_s() => false,
            Some(owner) => {
                let alive = if owner.host == crate::host_name() && owner.slurm_job.is_none() {
                    Some(pid_alive(owner.pid))
                } else {
                    check(&owner)
                };
                let gone = alive != Some(true);
                if gone {
                    warn!(
                        path = %path.display(),
                        host = %owner.host,
                        pid = owner.pid,
                        job = ?owner.slurm_job,
                        "breaking an expired lease whose owner is gone"
                    );
                }
                gone
            }
        };
        if !stale {
            return Ok(false);
        }
        match fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(io_err("remove", path)(e)),
        }
    }

    fn start_heartbeat(&self, path: PathBuf, owner: LeaseOwner, ttl: Duration) -> Lease {
        let stop = Arc::new(AtomicBool::new(false));
        let owner = Arc::new(Mutex::new(owner));
        let (p, s, o) = (path.clone(), stop.clone(), owner.clone());
        let period = (ttl / 3).max(Duration::from_millis(100));
        let thread = std::thread::spawn(move || {
            let mut waited = Duration::ZERO;
            while !s.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
                waited += Duration::from_millis(50);
                if waited < period {
                    continue;
                }
                waited = Duration::ZERO;
                let mut owner = o.lock().unwrap_or_else(|e| e.into_inner());
                owner.expires = now_s() + ttl.as_secs().max(1);
                // Rewritten in place: the file is ours, and a reader that sees a partial write
                // treats it as unreadable (not stale) for a minute.
                if let Err(e) =
                    fs::write(&p, serde_json::to_vec(&*owner).expect("owners serialise"))
                {
                    warn!(path = %p.display(), "refreshing a lease: {e}");
                }
            }
        });
        debug!(path = %path.display(), "took lease");
        Lease { path, stop, thread: Some(thread), owner }
    }
}

impl Lease {
    /// The lease's owner record as last written.
    pub fn owner(&self) -> LeaseOwner {
        self.owner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = fs::remove_file(&self.path);
    }
}

/// How long ago `path` was modified (`None` when it cannot be read).
pub(crate) fn age(path: &std::path::Path) -> Option<Duration> {
    fs::metadata(path).and_then(|m| m.modified()).ok().map(|t| t.elapsed().unwrap_or_default())
}

/// Whether process `pid` exists on this host.
fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}
