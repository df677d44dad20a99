//! A remote cache on object storage: every stage's results shared across machines, people and CI.
//!
//! `--remote URL`, `PROGDIFF_REMOTE` or the profile's `remote:` name it: `s3://bucket/prefix`
//! (AWS S3 and S3-compatible services; endpoint, region and credentials from the standard
//! `AWS_*` variables and files), `gs://bucket/prefix`, `az://container/prefix`, or
//! `http(s)://host/path` (any WebDAV-capable server, e.g. nginx with `dav_methods`). The stores
//! come from the `object_store` crate; credentials are read where it reads them and never
//! written anywhere by progdiff.
//!
//! Layout, as Bazel's remote cache: `<prefix>/cas/<digest>` holds objects (named by the blake3
//! of their bytes), `<prefix>/ac/<key>` a stage's record (the same JSON, with its checksum, as
//! the local cache's record file).
//!
//! Semantics (in `plan` and in the worker):
//! - a local record is a hit; else a remote record whose objects all exist remotely (at their
//!   recorded sizes) is downloaded: each object streamed into the local cache's `tmp/` while
//!   blake3 hashes it, used only if it hashes to its name, then the record published locally:
//!   `hit (remote)`. An object that fails verification is never used: the instance is computed,
//!   and the object is uploaded again over the bad copy;
//! - else the instance runs, then its objects are uploaded (those the remote lacks; large ones
//!   in parts, so an interrupted upload leaves nothing visible) and its record last, created
//!   once: S3 `If-None-Match: *`, on WebDAV a copy with `Overwrite: F` from a unique temporary
//!   name. When another machine's record won, this machine adopts it (downloads its objects and
//!   publishes its record locally).

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use futures::StreamExt as _;
use object_store::path::Path as ObjPath;
use object_store::{
    ObjectStore, ObjectStoreExt as _, PutMode, PutOptions, PutPayload, WriteMultipart,
};
use progdiff_cache::{Cache, Digest, StageRecord, decode_record, encode_record};

/// Objects at least this large are uploaded in parts.
const MULTIPART_MIN: u64 = 16 * 1024 * 1024;
/// Size of one uploaded part.
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts of one object in flight at once.
const PART_CONCURRENCY: usize = 4;

/// The environment variable naming the remote cache.
pub const REMOTE_ENV: &str = "PROGDIFF_REMOTE";

/// How a remote lookup ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Fetched {
    /// The remote had the record and every object; they are now in the local cache.
    Hit(Box<StageRecord>),
    /// The remote has no complete result for the key.
    Miss,
    /// The remote's result could not be used (a corrupt object, an unreadable record): the
    /// instance must be computed (and its objects uploaded over the bad ones).
    Unusable(String),
}

/// How an upload ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Pushed {
    /// The record was created (with `objects` objects and `bytes` bytes uploaded).
    Created {
        /// Objects uploaded (the others were there already).
        objects: usize,
        /// Bytes uploaded.
        bytes: u64,
    },
    /// The remote already had a record for the key; it was adopted locally when it differed.
    Existing {
        /// Whether the local record was replaced by the remote one.
        adopted: bool,
    },
}

/// A remote cache.
pub struct Remote {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    rt: tokio::runtime::Runtime,
    /// Digests found corrupt remotely: uploaded again even though the remote has an object of
    /// that name.
    bad: Mutex<BTreeSet<Digest>>,
    /// For an HTTP (WebDAV) remote: a client and the base URL (ending in `/`), for the streamed
    /// uploads of large objects that object_store's HTTP store cannot do in parts.
    http: Option<(reqwest012::Client, url::Url)>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote({})", self.url)
    }
}

impl Remote {
    /// Opens the remote cache at `url` (see the module documentation for the schemes).
    pub fn open(url: &str) -> anyhow::Result<Remote> {
        let parsed = url::Url::parse(url).map_err(|_| {
            anyhow::anyhow!(
                "remote cache `{}` is not a URL (s3://, gs://, az://, http(s)://)",
                clean(url)
            )
        })?;
        // The URL travels in job descriptions and messages: no secrets in it.
        anyhow::ensure!(
            parsed.username().is_empty() && parsed.password().is_none() && parsed.query().is_none(),
            "remote cache `{}`: the URL carries credentials (`user:password@` or a query); give \
             them the standard way instead (AWS_* variables or ~/.aws for s3://, \
             GOOGLE_APPLICATION_CREDENTIALS for gs://, AZURE_STORAGE_* for az://)",
            clean(url)
        );
        let prefix_of = |u: &url::Url| ObjPath::from(u.path().trim_matches('/'));
        let mut http = None;
        let (store, prefix): (Arc<dyn ObjectStore>, ObjPath) = match parsed.scheme() {
            "s3" | "s3a" => {
                let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(url);
                // Loopback and lab servers (MinIO, Ceph) often speak plain HTTP.
                if std::env::var("AWS_ENDPOINT_URL")
                    .or_else(|_| std::env::var("AWS_ENDPOINT"))
                    .is_ok_and(|e| e.starts_with("http://"))
                {
                    b = b.with_allow_http(true);
                }
                let store = b.build().map_err(|e| anyhow::anyhow!(clean(&e.to_string())))?;
                (Arc::new(store), prefix_of(&parsed))
            }
            "gs" => {
                let store = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| anyhow::anyhow!(clean(&e.to_string())))?;
                (Arc::new(store), prefix_of(&parsed))
            }
            "az" | "azure" | "abfs" | "abfss" | "adl" => {
                let store = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| anyhow::anyhow!(clean(&e.to_string())))?;
                (Arc::new(store), prefix_of(&parsed))
            }
            "http" | "https" => {
                let store = object_store::http::HttpBuilder::new()
                    .with_url(url)
                    .with_client_options(object_store::ClientOptions::new().with_allow_http(true))
                    .build()
                    .map_err(|e| anyhow::anyhow!(clean(&e.to_string())))?;
                let mut base = parsed.clone();
                if !base.path().ends_with('/') {
                    base.set_path(&format!("{}/", base.path()));
                }
                let client = reqwest012::Client::builder()
                    .build()
                    .map_err(|e| anyhow::anyhow!(clean(&e.to_string())))?;
                http = Some((client, base));
                (Arc::new(store), ObjPath::default())
            }
            other => anyhow::bail!(
                "remote cache `{url}`: unknown scheme `{other}`, expected s3://, gs://, az:// or \
                 http(s)://"
            ),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the remote cache's I/O runtime")?;
        Ok(Remote { url: url.to_string(), store, prefix, rt, bad: Mutex::default(), http })
    }

    /// The remote named by `--remote`, `PROGDIFF_REMOTE` or the profile, if any.
    pub fn configured(flag: Option<&str>, profile: Option<&str>) -> anyhow::Result<Option<Remote>> {
        let env = std::env::var(REMOTE_ENV).ok().filter(|s| !s.trim().is_empty());
        match flag.map(String::from).or(env).or(profile.map(String::from)) {
            Some(url) => Ok(Some(Remote::open(url.trim())?)),
            None => Ok(None),
        }
    }

    /// The URL it was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn cas(&self, digest: &Digest) -> ObjPath {
        self.prefix.clone().join("cas").join(digest.to_string().as_str())
    }

    fn ac(&self, key: &Digest) -> ObjPath {
        self.prefix.clone().join("ac").join(key.to_string().as_str())
    }

    /// The remote record of `key`, if there is a readable one.
    pub fn record(&self, key: &Digest) -> anyhow::Result<Option<StageRecord>> {
        self.rt.block_on(self.record_async(key))
    }

    async fn record_async(&self, key: &Digest) -> anyhow::Result<Option<StageRecord>> {
        let bytes = match self.store.get(&self.ac(key)).await {
            Ok(r) => r.bytes().await.map_err(|e| self.err("reading a record", e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err("reading a record", e)),
        };
        match decode_record(&bytes, Some(key)) {
            Ok(r) => Ok(Some(r)),
            Err(why) => {
                tracing::warn!(
                    "the remote record of {} is unusable ({why}); ignoring it",
                    key.short()
                );
                Ok(None)
            }
        }
    }

    /// Whether every object `record` names exists remotely at its recorded size (a deleted or
    /// truncated object makes the record a miss).
    pub fn complete(&self, record: &StageRecord) -> anyhow::Result<bool> {
        self.rt.block_on(self.complete_async(record))
    }

    async fn complete_async(&self, record: &StageRecord) -> anyhow::Result<bool> {
        for o in record.outputs.values() {
            match self.store.head(&self.cas(&o.digest)).await {
                Ok(meta) if meta.size == o.size => {}
                Ok(_) | Err(object_store::Error::NotFound { .. }) => return Ok(false),
                Err(e) => return Err(self.err("checking an object", e)),
            }
        }
        Ok(true)
    }

    /// The keys among `keys` that have no record remotely (`HEAD`s, 16 at a time).
    pub fn missing_records(&self, keys: &[Digest]) -> anyhow::Result<Vec<Digest>> {
        self.rt.block_on(async {
            let checks = futures::stream::iter(keys.iter().map(|k| async move {
                match self.store.head(&self.ac(k)).await {
                    Ok(_) => Ok(None),
                    Err(object_store::Error::NotFound { .. }) => Ok(Some(*k)),
                    Err(e) => Err(self.err("checking a record", e)),
                }
            }))
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
            checks.into_iter().filter_map(Result::transpose).collect()
        })
    }

    /// Whether the remote has a complete result for `key` (for `plan`).
    pub fn has(&self, key: &Digest) -> anyhow::Result<bool> {
        self.rt.block_on(async {
            match self.record_async(key).await? {
                Some(r) => self.complete_async(&r).await,
                None => Ok(false),
            }
        })
    }

    /// Looks `key` up remotely and, when complete, brings its objects (verified) and record into
    /// `cache`. `progress` is told bytes as they arrive.
    pub fn fetch(
        &self,
        cache: &Cache,
        key: &Digest,
        progress: &dyn Fn(u64),
    ) -> anyhow::Result<Fetched> {
        self.rt.block_on(async {
            let Some(record) = self.record_async(key).await? else { return Ok(Fetched::Miss) };
            if !self.complete_async(&record).await? {
                return Ok(Fetched::Miss);
            }
            match self.download_objects(cache, &record, progress).await? {
                Some(why) => Ok(Fetched::Unusable(why)),
                None => {
                    cache.publish(&record).context("publishing a downloaded record")?;
                    Ok(Fetched::Hit(Box::new(record)))
                }
            }
        })
    }

    /// Downloads the objects of `record` the local cache lacks; `Some(reason)` when one is
    /// corrupt remotely (it is remembered, so the next upload replaces it).
    async fn download_objects(
        &self,
        cache: &Cache,
        record: &StageRecord,
        progress: &dyn Fn(u64),
    ) -> anyhow::Result<Option<String>> {
        for (name, o) in &record.outputs {
            if cache.has_object(&o.digest) {
                progress(o.size);
                continue;
            }
            let (file, temp) = cache.download_file()?;
            let mut stream = match self.store.get(&self.cas(&o.digest)).await {
                Ok(r) => r.into_stream(),
                Err(object_store::Error::NotFound { .. }) => {
                    return Ok(Some(format!("object {} of `{name}` vanished", o.digest)));
                }
                Err(e) => return Err(self.err("downloading an object", e)),
            };
            // Hashing and writing run on their own thread, beside the network: a large object
            // costs about its transfer time, not transfer + hash + write + fsync one after another.
            let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(64);
            let writer = std::thread::spawn(move || write_and_hash(file, rx));
            let mut failed = None;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(chunk) => {
                        let n = chunk.len() as u64;
                        if tx.send(chunk).is_err() {
                            break; // the writer failed: its error follows
                        }
                        progress(n);
                    }
                    Err(e) => {
                        failed = Some(self.err("downloading an object", e));
                        break;
                    }
                }
            }
            drop(tx);
            let written =
                writer.join().map_err(|_| anyhow::anyhow!("the download writer panicked"))?;
            if let Some(e) = failed {
                return Err(e);
            }
            let (hasher, size) = written.context("writing a download")?;
            let actual = Digest::from(hasher.finalize());
            if actual != o.digest || size != o.size {
                self.bad.lock().unwrap_or_else(|e| e.into_inner()).insert(o.digest);
                tracing::warn!(
                    "remote object {} (output `{name}` of `{}`) is corrupt: it hashes to {actual}; \
                     not using it",
                    o.digest,
                    record.id
                );
                return Ok(Some(format!("remote object {} of `{name}` is corrupt", o.digest)));
            }
            // Hashed as it arrived: published without reading it again (fsynced on the way).
            cache.put_downloaded(temp, &o.digest).context("storing a downloaded object")?;
        }
        Ok(None)
    }

    /// Uploads `record`'s objects (those the remote lacks, or has corrupt) and then the record,
    /// created once; adopts the remote's record if another machine created it first.
    pub fn push(
        &self,
        cache: &Cache,
        record: &StageRecord,
        progress: &dyn Fn(u64),
    ) -> anyhow::Result<Pushed> {
        self.rt.block_on(async {
            let ours: BTreeSet<Digest> = record.outputs.values().map(|o| o.digest).collect();
            let is_bad =
                |d: &Digest| self.bad.lock().unwrap_or_else(|e| e.into_inner()).contains(d);
            let mut replace = false;
            if let Some(theirs) = self.record_async(&record.key).await?
                && self.complete_async(&theirs).await?
            {
                // The remote's record names an object found corrupt here that this machine
                // cannot repair (its result has other bytes: a stage that is not
                // bit-reproducible): the record is replaced by this machine's.
                replace =
                    theirs.outputs.values().any(|o| is_bad(&o.digest) && !ours.contains(&o.digest));
                if !replace {
                    // Repair what this machine found corrupt and holds sound, then adopt.
                    for o in theirs.outputs.values().filter(|o| is_bad(&o.digest)) {
                        self.upload(
                            &cache.object_path(&o.digest),
                            &self.cas(&o.digest),
                            o.size,
                            progress,
                        )
                        .await?;
                        self.bad.lock().unwrap_or_else(|e| e.into_inner()).remove(&o.digest);
                    }
                    return self.adopt(cache, record, theirs, progress).await;
                }
            }
            let mut objects = 0;
            let mut bytes = 0;
            for o in record.outputs.values() {
                let bad = self.bad.lock().unwrap_or_else(|e| e.into_inner()).contains(&o.digest);
                if !bad {
                    match self.store.head(&self.cas(&o.digest)).await {
                        Ok(meta) if meta.size == o.size => {
                            progress(o.size);
                            continue;
                        }
                        Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(self.err("checking an object", e)),
                    }
                }
                self.upload(&cache.object_path(&o.digest), &self.cas(&o.digest), o.size, progress)
                    .await?;
                self.bad.lock().unwrap_or_else(|e| e.into_inner()).remove(&o.digest);
                objects += 1;
                bytes += o.size;
            }
            let json = encode_record(record)?;
            if replace {
                self.store
                    .put(&self.ac(&record.key), PutPayload::from(json))
                    .await
                    .map_err(|e| self.err("replacing a record", e))?;
                return Ok(Pushed::Created { objects, bytes });
            }
            match self.create(&self.ac(&record.key), json).await? {
                true => Ok(Pushed::Created { objects, bytes }),
                false => {
                    let theirs = self
                        .record_async(&record.key)
                        .await?
                        .context("the remote record that won the race is unreadable")?;
                    self.adopt(cache, record, theirs, progress).await
                }
            }
        })
    }

    async fn adopt(
        &self,
        cache: &Cache,
        ours: &StageRecord,
        theirs: StageRecord,
        progress: &dyn Fn(u64),
    ) -> anyhow::Result<Pushed> {
        if theirs.outputs == ours.outputs {
            return Ok(Pushed::Existing { adopted: false });
        }
        // Another machine computed this key first (with different bytes: not every stage is
        // bit-reproducible across machines): everyone uses the remote's result.
        if let Some(why) = self.download_objects(cache, &theirs, progress).await? {
            anyhow::bail!("the remote result that won the race is unusable: {why}");
        }
        cache.publish(&theirs).context("adopting the remote record")?;
        Ok(Pushed::Existing { adopted: true })
    }

    /// Creates `path` with `bytes` unless it exists; false when it existed.
    async fn create(&self, path: &ObjPath, bytes: Vec<u8>) -> anyhow::Result<bool> {
        let opts = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
        match self.store.put_opts(path, PutPayload::from(bytes.clone()), opts).await {
            Ok(_) => return Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => return Ok(false),
            Err(object_store::Error::NotImplemented { .. }) => {}
            Err(e) => return Err(self.err("creating a record", e)),
        }
        // WebDAV: write a unique temporary name, then copy it without overwriting (`Overwrite:
        // F`). A copy needs the destination's collection: a `PUT` creates it (servers like
        // nginx's `create_full_put_path`), so the first record goes there through a marker.
        self.ensure_collection(path).await?;
        let tmp = self.temporary(path);
        self.store
            .put(&tmp, PutPayload::from(bytes))
            .await
            .map_err(|e| self.err("writing a record", e))?;
        let created = match self.store.copy_if_not_exists(&tmp, path).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.err("creating a record", e)),
        };
        let _ = self.store.delete(&tmp).await;
        created
    }

    /// Makes sure the collection (directory) that will hold `path` exists, for servers where a
    /// `COPY`/`MOVE` needs it: a `PUT` of a small marker creates it (nginx's
    /// `create_full_put_path`).
    async fn ensure_collection(&self, path: &ObjPath) -> anyhow::Result<()> {
        let marker = ObjPath::from_iter(
            path.parts()
                .take(path.parts().count().saturating_sub(1))
                .chain(std::iter::once(object_store::path::PathPart::from(".created"))),
        );
        if self.store.head(&marker).await.is_err() {
            self.store
                .put(&marker, PutPayload::from_static(b"progdiff"))
                .await
                .map_err(|e| self.err("creating a directory", e))?;
        }
        Ok(())
    }

    /// A unique temporary name under `<prefix>/tmp/` for `path`.
    fn temporary(&self, path: &ObjPath) -> ObjPath {
        self.prefix.clone().join("tmp").join(format!(
            "{}.{}.{}",
            path.filename().unwrap_or("object"),
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ))
    }

    /// Uploads a large file to an HTTP (WebDAV) remote as one streamed `PUT` to a temporary
    /// name, then `MOVE`s it into place: an interrupted upload leaves nothing under `cas/`.
    async fn upload_http(
        &self,
        client: &reqwest012::Client,
        base: &url::Url,
        file: &Path,
        path: &ObjPath,
        progress: &dyn Fn(u64),
    ) -> anyhow::Result<()> {
        use std::io::Read as _;
        let net = |what: &str, e: reqwest012::Error| {
            anyhow::anyhow!(
                "remote cache `{}`: {what}: {}",
                self.url,
                clean(&e.without_url().to_string())
            )
        };
        self.ensure_collection(path).await?;
        let tmp = self.temporary(path);
        self.ensure_collection(&tmp).await?;
        let url_of =
            |p: &ObjPath| base.join(p.as_ref()).expect("an object path is a valid URL path");
        let f =
            std::fs::File::open(file).with_context(|| format!("reading `{}`", file.display()))?;
        let (tx, mut rx) = futures::channel::mpsc::unbounded::<u64>();
        let chunks = futures::stream::unfold(Some(f), move |f| {
            let tx = tx.clone();
            async move {
                let mut f = f?;
                let mut buf = vec![0u8; 1 << 20];
                match f.read(&mut buf) {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        let _ = tx.unbounded_send(n as u64);
                        Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), Some(f)))
                    }
                    Err(e) => Some((Err(e), None)),
                }
            }
        });
        let send = client.put(url_of(&tmp)).body(reqwest012::Body::wrap_stream(chunks)).send();
        futures::pin_mut!(send);
        let response = loop {
            match futures::future::select(send, rx.next()).await {
                futures::future::Either::Left((r, _)) => break r,
                futures::future::Either::Right((n, rest)) => {
                    progress(n.unwrap_or(0));
                    send = rest;
                }
            }
        };
        while let Ok(n) = rx.try_recv() {
            progress(n);
        }
        let status = response.map_err(|e| net("uploading an object", e))?.status();
        anyhow::ensure!(
            status.is_success(),
            "remote cache `{}`: uploading an object: the server answered {status}",
            self.url
        );
        let moved = client
            .request(reqwest012::Method::from_bytes(b"MOVE").expect("a method name"), url_of(&tmp))
            .header("Destination", url_of(path).as_str())
            .header("Overwrite", "T")
            .send()
            .await;
        let status = match moved {
            Ok(r) => r.status(),
            Err(e) => {
                let _ = self.store.delete(&tmp).await;
                return Err(net("moving an uploaded object into place", e));
            }
        };
        if !status.is_success() {
            let _ = self.store.delete(&tmp).await;
            anyhow::bail!(
                "remote cache `{}`: moving an uploaded object into place: the server answered \
                 {status}",
                self.url
            );
        }
        Ok(())
    }

    /// Uploads a file: in parts when large (nothing is visible until the last part is in).
    async fn upload(
        &self,
        file: &Path,
        path: &ObjPath,
        size: u64,
        progress: &dyn Fn(u64),
    ) -> anyhow::Result<()> {
        use std::io::Read as _;
        let mut f =
            std::fs::File::open(file).with_context(|| format!("reading `{}`", file.display()))?;
        if size < MULTIPART_MIN {
            let mut buf = Vec::with_capacity(size as usize);
            f.read_to_end(&mut buf)?;
            let n = buf.len() as u64;
            self.store
                .put(path, PutPayload::from(buf))
                .await
                .map_err(|e| self.err("uploading an object", e))?;
            progress(n);
            return Ok(());
        }
        if let Some((client, base)) = &self.http {
            return self.upload_http(client, base, file, path, progress).await;
        }
        let upload =
            self.store.put_multipart(path).await.map_err(|e| self.err("uploading an object", e))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut buf = vec![0u8; PART_SIZE];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            w.wait_for_capacity(PART_CONCURRENCY)
                .await
                .map_err(|e| self.err("uploading an object", e))?;
            w.write(&buf[..n]);
            progress(n as u64);
        }
        w.finish().await.map_err(|e| self.err("uploading an object", e))?;
        Ok(())
    }

    /// Re-hashes every object `record` names remotely; the corrupt or missing ones.
    pub fn verify(&self, record: &StageRecord) -> anyhow::Result<Vec<String>> {
        self.rt.block_on(async {
            let mut problems = Vec::new();
            for (name, o) in &record.outputs {
                let mut stream = match self.store.get(&self.cas(&o.digest)).await {
                    Ok(r) => r.into_stream(),
                    Err(object_store::Error::NotFound { .. }) => {
                        problems.push(format!("`{name}`: object {} is missing", o.digest));
                        continue;
                    }
                    Err(e) => return Err(self.err("reading an object", e)),
                };
                let mut hasher = blake3::Hasher::new();
                while let Some(chunk) = stream.next().await {
                    hasher.update(&chunk.map_err(|e| self.err("reading an object", e))?);
                }
                let actual = Digest::from(hasher.finalize());
                if actual != o.digest {
                    problems.push(format!("`{name}`: object {} hashes to {actual}", o.digest));
                }
            }
            Ok(problems)
        })
    }

    fn err(&self, what: &str, e: object_store::Error) -> anyhow::Error {
        anyhow::anyhow!("remote cache `{}`: {what}: {}", self.url, clean(&e.to_string()))
    }
}

/// Writes and hashes a download's chunks as they come; syncs every 64 MiB so that the final
/// fsync (when the object is published) has little left to flush.
fn write_and_hash(
    mut file: std::fs::File,
    chunks: std::sync::mpsc::Receiver<bytes::Bytes>,
) -> std::io::Result<(blake3::Hasher, u64)> {
    const SYNC_EVERY: u64 = 64 << 20;
    let mut hasher = blake3::Hasher::new();
    let (mut size, mut unsynced) = (0u64, 0u64);
    for chunk in chunks {
        hasher.update(&chunk);
        file.write_all(&chunk)?;
        size += chunk.len() as u64;
        unsynced += chunk.len() as u64;
        if unsynced >= SYNC_EVERY {
            file.sync_data()?;
            unsynced = 0;
        }
    }
    file.flush()?;
    Ok((hasher, size))
}

/// An error message without anything that looks like a credential (object_store does not put
/// them in messages; this is a second line of defence for a URL with userinfo or a query).
fn clean(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for word in message.split_inclusive(char::is_whitespace) {
        let w = word.trim_end();
        if let Ok(mut u) =
            url::Url::parse(w.trim_matches(|c| c == '"' || c == '\'' || c == '`' || c == ','))
            && (!u.username().is_empty() || u.password().is_some() || u.query().is_some())
        {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            out.push_str(u.as_str());
            out.push_str(&word[w.len()..]);
            continue;
        }
        out.push_str(word);
    }
    out
}
