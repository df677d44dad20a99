//! A job: one stage instance as data, and how a worker runs it.
//!
//! The coordinator writes a [`Job`] into the cache (`v1/jobs/ab/<key>.json`) and starts a worker
//! on it (`progdiff-worker exec <job.json>`); a cluster backend does the same on another node of
//! a shared filesystem. The description holds everything the instance needs and nothing the
//! coordinator keeps in memory: the kind's inputs (exactly what the key was computed from),
//! the upstream instances by key (their outputs are found through the cache's records), the
//! device and thread count. The worker re-derives the key from the description and refuses a
//! mismatch, so an edited description or an input file changed since planning never publishes
//! results under a key that does not describe them.
//!
//! [`execute`] is the worker's protocol: hit if the cache already has the key; else resolve the
//! upstream outputs, take the key's lock, check again, run into a staging directory, publish the
//! outputs and then the record (atomically), and clear the work area.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use progdiff_cache::{Cache, Digest, RecordMeta, StageRecord};
use progdiff_kinds::context::{CancelToken, Reporter, StageContext, UpstreamOutputs};
use progdiff_kinds::fast::FastPaths;
use progdiff_kinds::kind::{Prepared, key_values};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fingerprint::{FINGERPRINT_FORMAT, Fingerprint};
use crate::plan::{MISSING_INPUT, Plan, stage_name};

/// Version of the job description format.
pub const JOB_FORMAT: u32 = 1;

/// What the worker logs when it took the result from the remote cache (the Slurm backend reads
/// it back from the log to report `hit (remote)`).
pub const DOWNLOADED: &str = "downloaded from the remote cache";

/// One stage instance, as a worker runs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// [`JOB_FORMAT`].
    pub format: u32,
    /// The key the coordinator computed.
    pub key: Digest,
    /// The instance id in its manifest's graph (`finetune[2]`): what the stage sees.
    pub id: String,
    /// The stage's name in the manifest (its parameters' prefix in the key).
    pub stage: String,
    /// Stage kind.
    pub kind: String,
    /// Group index of a fanned-out instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<usize>,
    /// The kind's inputs (see `progdiff_kinds::kind`): everything but `at` is hashed.
    pub inputs: Value,
    /// The instances it needs, by key.
    #[serde(default)]
    pub upstream: Vec<Upstream>,
    /// `cpu` or `cuda:N` (as the worker sees the devices: a coordinator that sets
    /// `CUDA_VISIBLE_DEVICES` for the job says `cuda:0`).
    pub device: String,
    /// Intra-op threads (libtorch, rayon).
    pub threads: usize,
    /// The cache to resolve upstream outputs from and publish to.
    pub cache: PathBuf,
    /// Recompute even when the cache holds the key (`run --force`); the old record stays
    /// until the new one replaces it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    /// The remote cache to look the key up in before computing it (`--remote`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    /// Upload the result to the remote cache once computed (not with `--no-upload`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub upload: bool,
    /// Opt-in GPU fast paths (`run --fast`): not part of the key.
    #[serde(default, skip_serializing_if = "FastPaths::is_none")]
    pub fast: FastPaths,
}

/// An upstream instance of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Upstream {
    /// Its id in the job's manifest graph.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// Its group index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<usize>,
    /// Its key: the worker finds its outputs through the cache's record of this key.
    pub key: Digest,
}

impl Job {
    /// The job of instance `index` of `plan`, to run on `device` (`cpu` or `cuda:N`: the job
    /// says `cuda:0`, the coordinator sets `CUDA_VISIBLE_DEVICES`) with `threads`.
    pub fn for_stage(
        plan: &Plan,
        index: usize,
        cache: &Cache,
        device: &str,
        threads: usize,
    ) -> Job {
        let stage = &plan.stages[index];
        let upstream = stage
            .needs
            .iter()
            .filter_map(|id| plan.stages.iter().find(|s| &s.id == id))
            .map(|up| Upstream {
                id: up.local_id.clone(),
                kind: up.kind.clone(),
                group: up.group,
                key: up.key,
            })
            .collect();
        Job {
            format: JOB_FORMAT,
            key: stage.key,
            id: stage.local_id.clone(),
            stage: stage_name(&stage.local_id).to_string(),
            kind: stage.kind.clone(),
            group: stage.group,
            inputs: stage.inputs.clone(),
            upstream,
            device: if device == "cpu" { "cpu".into() } else { "cuda:0".into() },
            threads,
            cache: std::path::absolute(cache.root()).unwrap_or_else(|_| cache.root().to_path_buf()),
            force: stage.forced,
            remote: None,
            upload: false,
            fast: FastPaths::default(),
        }
    }

    /// Reads a job description file.
    pub fn read(path: &Path) -> anyhow::Result<Job> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading the job description `{}`", path.display()))?;
        let job: Job = serde_json::from_slice(&bytes)
            .with_context(|| format!("`{}` is not a job description", path.display()))?;
        anyhow::ensure!(
            job.format == JOB_FORMAT,
            "`{}` is a job description of format {}, this worker reads format {JOB_FORMAT}",
            path.display(),
            job.format
        );
        Ok(job)
    }

    /// The fingerprint of this job with its kind's inputs in canonical form (`prepared`):
    /// external files are hashed now (through the cache's memo).
    pub fn fingerprint(&self, prepared: &Prepared, cache: &Cache) -> anyhow::Result<Fingerprint> {
        let mut inputs = BTreeMap::new();
        for (label, path) in progdiff_kinds::kind::external_files(&prepared.inputs) {
            let digest = if path.exists() {
                cache
                    .file_digest(&path)
                    .with_context(|| format!("hashing input `{label}` (`{}`)", path.display()))?
                    .to_string()
            } else {
                MISSING_INPUT.to_string()
            };
            inputs.insert(label, digest);
        }
        Ok(Fingerprint {
            format: FINGERPRINT_FORMAT,
            kind: self.kind.clone(),
            version: prepared.version,
            params: key_values(&self.stage, &prepared.inputs),
            group: self.group,
            upstream: self.upstream.iter().map(|u| (u.id.clone(), u.key.to_string())).collect(),
            inputs,
        })
    }
}

/// How a job ended, when it did not fail.
#[derive(Clone, Debug, PartialEq)]
pub struct Done {
    /// Found in the cache (`true`) or computed.
    pub hit: bool,
    /// Found in the remote cache (and downloaded).
    pub remote: bool,
    /// Output name -> path of the cached object.
    pub outputs: BTreeMap<String, PathBuf>,
    /// Seconds the stage ran (0 for a hit).
    pub seconds: f64,
}

/// Output name -> cached object path of `record`.
pub fn outputs_of(cache: &Cache, record: &StageRecord) -> BTreeMap<String, PathBuf> {
    record.outputs.iter().map(|(k, o)| (k.clone(), cache.object_path(&o.digest))).collect()
}

/// The record of `key` when the cache holds it with every object (see
/// [`Cache::complete_record`]).
pub fn complete_record(cache: &Cache, key: &Digest) -> anyhow::Result<Option<StageRecord>> {
    Ok(cache.complete_record(key)?)
}

/// Removes the work area of `key`, whose record is published: a failure (a full disk, a
/// read-only file) is only a warning, since the stage's result is complete and the next
/// `progdiff run`, `gc` or `cache verify --delete-corrupt` removes what is left.
fn clear_work_dir(cache: &Cache, key: &Digest, id: &str) {
    if let Err(e) = cache.remove_work_dir(key) {
        tracing::warn!(
            stage = %id,
            "could not remove the work area of the completed stage (the next run removes it): {e}"
        );
    }
}

/// Checks every object of an upstream record against its digest before the stage reads it
/// (blake3 hashes a 200 MB checkpoint in well under a second). A corrupt object is never used:
/// it is deleted with the upstream's record, so the next run recomputes it, and this job fails
/// naming the object.
fn verify_outputs(cache: &Cache, up: &Upstream, record: &StageRecord) -> anyhow::Result<()> {
    for (name, o) in &record.outputs {
        let path = cache.object_path(&o.digest);
        let actual = progdiff_cache::hash_file(&path)
            .with_context(|| format!("reading output `{name}` of upstream `{}`", up.id))?;
        if actual != o.digest {
            // The object goes (no record may use it again, and a recomputation stores a good
            // copy under its name), and so does the upstream's record.
            let _ = std::fs::remove_file(&path);
            let dropped = match cache.try_lock_key(&up.key) {
                Ok(Some(_lock)) => cache.remove_record(&up.key).is_ok(),
                _ => false,
            };
            anyhow::bail!(
                "output `{name}` of upstream `{}` is corrupt: object `{}` hashes to {actual}, not \
                 {}; {}",
                up.id,
                path.display(),
                o.digest,
                if dropped {
                    "its record was dropped, so the next run computes it again"
                } else {
                    "run `progdiff cache verify --delete-corrupt`, then run again"
                }
            );
        }
    }
    Ok(())
}

/// How long a lease lives without a heartbeat: `PROGDIFF_LEASE_TTL_S`, default 120 s.
fn lease_ttl() -> Duration {
    std::env::var("PROGDIFF_LEASE_TTL_S")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| *s >= 1.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(120))
}

/// Runs `job` whose inputs `prepared` holds: checks its key, resolves its upstream outputs,
/// and publishes its outputs and record, or finds them in the cache.
pub fn execute(
    job: &Job,
    prepared: Prepared,
    cache: &Cache,
    report: &Reporter,
    cancel: &CancelToken,
    slurm_job: Option<&str>,
) -> anyhow::Result<Done> {
    let fingerprint = job.fingerprint(&prepared, cache)?;
    let key = fingerprint.key();
    if key != job.key {
        anyhow::bail!(
            "refusing to run `{}`: its description hashes to key {key}, not to the key {} it \
             was planned with (an input file changed since planning, or the description was \
             edited)\nhint: run `progdiff run` again to plan with the current inputs",
            job.id,
            job.key
        );
    }
    let cached = |cache: &Cache| -> anyhow::Result<Option<StageRecord>> {
        if job.force { Ok(None) } else { complete_record(cache, &key) }
    };
    if let Some(r) = cached(cache)? {
        return Ok(Done { hit: true, remote: false, outputs: outputs_of(cache, &r), seconds: 0.0 });
    }
    let mut inputs = Vec::with_capacity(job.upstream.len());
    for up in &job.upstream {
        let record = complete_record(cache, &up.key)?.with_context(|| {
            format!(
                "upstream `{}` (key {}) has no complete record in the cache `{}`: run it first",
                up.id,
                up.key.short(),
                cache.root().display()
            )
        })?;
        verify_outputs(cache, up, &record)?;
        inputs.push(UpstreamOutputs {
            id: up.id.clone(),
            kind: up.kind.clone(),
            group: up.group,
            files: outputs_of(cache, &record),
        });
    }
    // Wait for the key: its `flock` (this host) and its lease (every host of a shared
    // filesystem), staying responsive to Ctrl-C; another process may publish it meanwhile.
    let ttl = lease_ttl();
    let mut waited = false;
    let (_lock, _lease) = loop {
        if let Some(lock) = cache.try_lock_key(&key)? {
            let check = |o: &progdiff_cache::LeaseOwner| {
                o.slurm_job.as_deref().and_then(crate::slurm::job_alive)
            };
            if let Some(lease) = cache.try_lease(&key, slurm_job.map(String::from), ttl, &check)? {
                break (lock, lease);
            }
        }
        if !waited {
            waited = true;
            let owner = cache.lease_owner(&key).map(|o| {
                format!(
                    " (held by {} pid {}{})",
                    o.host,
                    o.pid,
                    o.slurm_job.map(|j| format!(", Slurm job {j}")).unwrap_or_default()
                )
            });
            tracing::info!(stage = %job.id, "waiting for another process computing this key{}", owner.unwrap_or_default());
        }
        cancel.check()?;
        std::thread::sleep(Duration::from_millis(200));
        if let Some(r) = cached(cache)? {
            tracing::info!(stage = %job.id, "computed by another process meanwhile");
            return Ok(Done {
                hit: true,
                remote: false,
                outputs: outputs_of(cache, &r),
                seconds: 0.0,
            });
        }
    };
    if let Some(r) = cached(cache)? {
        tracing::info!(stage = %job.id, "computed by another process meanwhile");
        clear_work_dir(cache, &key, &job.id);
        return Ok(Done { hit: true, remote: false, outputs: outputs_of(cache, &r), seconds: 0.0 });
    }
    // The remote cache, holding the key's lock: one process downloads, the others find the
    // local record.
    let remote = match &job.remote {
        Some(url) => Some(crate::remote::Remote::open(url)?),
        None => None,
    };
    if let Some(remote) = remote.as_ref().filter(|_| !job.force) {
        let t = Instant::now();
        let bytes = std::sync::atomic::AtomicU64::new(0);
        let count = |n: u64| {
            bytes.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        };
        match remote.fetch(cache, &key, &count)? {
            crate::remote::Fetched::Hit(r) => {
                let n = bytes.load(std::sync::atomic::Ordering::Relaxed);
                tracing::info!(
                    stage = %job.id,
                    "{DOWNLOADED} ({n} bytes in {:.1}s)",
                    t.elapsed().as_secs_f64()
                );
                clear_work_dir(cache, &key, &job.id);
                return Ok(Done {
                    hit: true,
                    remote: true,
                    outputs: outputs_of(cache, &r),
                    seconds: 0.0,
                });
            }
            crate::remote::Fetched::Miss => {}
            crate::remote::Fetched::Unusable(why) => {
                tracing::warn!(stage = %job.id, "not using the remote result: {why}; computing it");
            }
        }
    }
    let staging = cache.staging_dir()?;
    let ctx = StageContext {
        id: job.id.clone(),
        group: job.group,
        device: job.device.clone(),
        inputs,
        out_dir: staging.path().to_path_buf(),
        work_dir: cache.work_dir(&key)?,
        cancel: cancel.clone(),
        report: report.clone(),
    };
    tracing::info!(stage = %job.id, key = %key.short(), device = %job.device, "running");
    let started_at = SystemTime::now();
    let t0 = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| prepared.run(&ctx)));
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            anyhow::bail!("stage panicked: {msg}");
        }
    }
    cancel.check()?;
    let duration_s = t0.elapsed().as_secs_f64();
    let mut outputs = BTreeMap::new();
    let mut entries: Vec<_> = std::fs::read_dir(staging.path())?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if e.file_type()?.is_file() {
            let name = e.file_name().to_string_lossy().into_owned();
            outputs.insert(name, cache.put_file(&e.path())?);
        }
    }
    let record = StageRecord {
        key,
        id: job.id.clone(),
        kind: job.kind.clone(),
        outputs,
        fingerprint: serde_json::to_value(&fingerprint)?,
        meta: RecordMeta {
            duration_s,
            device: job.device.clone(),
            versions: [(job.kind.clone(), fingerprint.version.to_string())].into(),
            ..RecordMeta::timed(started_at, SystemTime::now())
        },
    };
    cache.publish(&record)?;
    // Published: from here on nothing may turn the stage's success into a failure.
    clear_work_dir(cache, &key, &job.id);
    let mut outputs = outputs_of(cache, &record);
    if let Some(remote) = remote.filter(|_| job.upload) {
        match remote.push(cache, &record, &|_| {}) {
            Ok(crate::remote::Pushed::Created { objects, bytes }) => tracing::info!(
                stage = %job.id,
                "uploaded to the remote cache ({objects} objects, {bytes} bytes)"
            ),
            Ok(crate::remote::Pushed::Existing { adopted }) => {
                tracing::info!(
                    stage = %job.id,
                    "another machine published this key first{}",
                    if adopted { "; using its result" } else { "" }
                );
                if let Ok(Some(r)) = complete_record(cache, &key) {
                    outputs = outputs_of(cache, &r);
                }
            }
            Err(e) => {
                tracing::warn!(stage = %job.id, "uploading to the remote cache failed: {e:#}")
            }
        }
    }
    Ok(Done { hit: false, remote: false, outputs, seconds: duration_s })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Experiment;

    /// The key a worker re-derives from a job equals the key the coordinator planned, for every
    /// kind (external files included), and an edited description does not.
    #[test]
    fn the_worker_derives_the_planned_key_for_every_kind() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("w.safetensors"), b"weights").unwrap();
        std::fs::write(dir.path().join("ext.pt"), b"module").unwrap();
        std::fs::write(dir.path().join("in.txt"), b"input").unwrap();
        let text = "
name: keys
seed: 5
data: { kind: synthetic, n: 16, image_size: 8, channels: gray }
model: { image_size: 8, in_channels: 1, channels: 32, channel_mult: [1], res_blocks: 1,
         attention_resolutions: [], heads: 1 }
diffusion: { steps: 40, schedule: cosine, sample_steps: '10' }
stages:
  imp: { kind: import, path: w.safetensors }
  base: { kind: train, steps: 3, batch_size: 2 }
  allocate: { kind: snr-allocate, groups: 2, k: 0.5 }
  prune: { kind: prune, needs: [base, allocate], for_each: group, proxy: { kind: magnitude } }
  ft: { kind: train, needs: [prune, allocate], for_each: group, steps: 2 }
  feats: { kind: fid-extractor, steps: 3 }
  feats2: { kind: fid-extractor, extractor: torchscript, path: ext.pt }
  ev: { kind: evaluate, needs: [ft, allocate, feats], samples: 4, label: a row }
  cmd: { kind: command, run: 'true', inputs: [in.txt] }
";
        let exp = Experiment::parse(text, "keys.yaml", dir.path(), "keys").unwrap();
        let cache = Cache::open(dir.path().join("cache")).unwrap();
        let plan = crate::plan::plan_experiment(&exp, &cache).unwrap();
        assert_eq!(plan.stages.len(), 11);
        let prepared = |job: &Job| {
            let (version, inputs) =
                progdiff_kinds::kind::canonical_of(&job.kind, &job.inputs).unwrap();
            Prepared::new(version, inputs, Box::new(|_| Ok(())))
        };
        for i in 0..plan.stages.len() {
            let job = Job::for_stage(&plan, i, &cache, "cpu", 1);
            // Through the description file, as a worker reads it.
            let path = cache.write_job(&job.key, &serde_json::to_vec(&job).unwrap()).unwrap();
            let read = Job::read(&path).unwrap();
            assert_eq!(read, job);
            let fp = read.fingerprint(&prepared(&read), &cache).unwrap();
            assert_eq!(fp.key(), plan.stages[i].key, "`{}`", job.id);
            assert_eq!(fp, plan.stages[i].fingerprint, "`{}`", job.id);
        }
        // A changed external file changes the re-derived key (the worker refuses the job).
        let imp = plan.stages.iter().position(|s| s.id == "imp").unwrap();
        let job = Job::for_stage(&plan, imp, &cache, "cpu", 1);
        std::fs::write(dir.path().join("w.safetensors"), b"other weights").unwrap();
        assert_ne!(job.fingerprint(&prepared(&job), &cache).unwrap().key(), job.key);
    }
}
