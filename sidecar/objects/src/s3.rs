//! The S3 backend, through the `object_store` crate: path-style requests, bounded
//! retries (a store that is down fails an operation in seconds, not minutes: the epoch
//! it serves aborts and the guests run on), and a runtime of its own so that callers
//! stay synchronous.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig};

use crate::{Conditional, Meta, ObjectsError, S3Config};

/// A runtime dropped without waiting, so that an `S3` may be dropped anywhere, even on
/// another runtime's thread.
#[derive(Debug)]
struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A bucket on an S3-compatible server.
#[derive(Debug, Clone)]
pub struct S3 {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    describe: String,
    conditional: Conditional,
    rt: Arc<Runtime>,
}

fn remote(what: &'static str, key: &str, store: &str) -> impl FnOnce(object_store::Error) -> ObjectsError + use<> {
    let (key, store) = (key.to_owned(), store.to_owned());
    move |source| match source {
        object_store::Error::NotFound { .. } => ObjectsError::NotFound { key, store },
        source => ObjectsError::Remote { what, key, store, source: Box::new(source) },
    }
}

impl S3 {
    /// Connects to the bucket of `cfg` and probes create-only writes.
    pub fn open(cfg: &S3Config) -> Result<S3, ObjectsError> {
        cfg.check()?;
        let options = ClientOptions::new()
            .with_allow_http(cfg.endpoint.starts_with("http://"))
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(30));
        let retry = RetryConfig { max_retries: 3, retry_timeout: Duration::from_secs(10), ..RetryConfig::default() };
        let store = AmazonS3Builder::new()
            .with_endpoint(&cfg.endpoint)
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_access_key_id(&cfg.access_key_id)
            .with_secret_access_key(&cfg.secret_access_key)
            .with_virtual_hosted_style_request(false)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_client_options(options)
            .with_retry(retry)
            .build()
            .map_err(|e| ObjectsError::Config(format!("{}: {e}", cfg.describe())))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cutline-s3")
            .enable_all()
            .build()
            .map_err(|source| ObjectsError::Io {
                what: "cannot start the S3 client's runtime for",
                path: cfg.describe(),
                source,
            })?;
        let mut s3 = S3 {
            store: Arc::new(store),
            prefix: cfg.prefix.clone(),
            describe: cfg.describe(),
            conditional: Conditional::Ignored,
            rt: Arc::new(Runtime(Some(rt))),
        };
        s3.conditional = s3.probe()?;
        tracing::info!(store = %s3.describe, conditional = %s3.conditional, "object store opened");
        Ok(s3)
    }

    /// Writes a probe object twice, create-only: a server that takes the second write
    /// ignores `If-None-Match`.
    fn probe(&self) -> Result<Conditional, ObjectsError> {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let key = format!("probe/conditional-{}-{nanos}", std::process::id());
        self.put_new(&key, b"1")?;
        let second = self.put_new(&key, b"2");
        let _ = self.delete(&key);
        match second {
            Ok(()) => Ok(Conditional::Ignored),
            Err(ObjectsError::Exists { .. }) => Ok(Conditional::Honoured),
            Err(e) => Err(e),
        }
    }

    /// Runs `fut` on the client's runtime and waits for it, from any thread.
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, ObjectsError>> + Send + 'static,
    ) -> Result<T, ObjectsError> {
        let Some(rt) = &self.rt.0 else { return Err(ObjectsError::Config("the S3 client is shut down".into())) };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().unwrap_or_else(|_| Err(ObjectsError::Config("the S3 client stopped".into())))
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() { ObjPath::from(key) } else { ObjPath::from(format!("{}/{key}", self.prefix)) }
    }

    pub(crate) fn describe(&self) -> String {
        self.describe.clone()
    }

    pub(crate) fn conditional(&self) -> Conditional {
        self.conditional
    }

    pub(crate) fn put(&self, key: &str, data: &[u8]) -> Result<(), ObjectsError> {
        let (store, path, err) = (self.store.clone(), self.path(key), remote("cannot write", key, &self.describe));
        let payload = PutPayload::from(data.to_vec());
        self.run(async move { store.put(&path, payload).await.map(|_| ()).map_err(err) })
    }

    /// Writes a large object as a multipart upload of 8 MiB parts, 4 in flight.
    pub(crate) fn put_multipart(&self, key: &str, data: &[u8]) -> Result<(), ObjectsError> {
        let (store, path) = (self.store.clone(), self.path(key));
        let (key, describe) = (key.to_owned(), self.describe.clone());
        let data = bytes::Bytes::from(data.to_vec());
        self.run(async move {
            let err = || remote("cannot upload", &key, &describe);
            let upload = store.put_multipart(&path).await.map_err(err())?;
            let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, 8 << 20);
            for part in data.chunks(8 << 20) {
                w.wait_for_capacity(4).await.map_err(err())?;
                w.write(part);
            }
            w.finish().await.map(|_| ()).map_err(err())
        })
    }

    pub(crate) fn put_new(&self, key: &str, data: &[u8]) -> Result<(), ObjectsError> {
        let (store, path, describe) = (self.store.clone(), self.path(key), self.describe.clone());
        let payload = PutPayload::from(data.to_vec());
        let key = key.to_owned();
        self.run(async move {
            let opts = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
            match store.put_opts(&path, payload, opts).await {
                Ok(_) => Ok(()),
                Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                    Err(ObjectsError::Exists { key, store: describe })
                }
                Err(e) => Err(remote("cannot create", &key, &describe)(e)),
            }
        })
    }

    pub(crate) fn get(&self, key: &str) -> Result<Vec<u8>, ObjectsError> {
        let (store, path) = (self.store.clone(), self.path(key));
        let (e1, e2) = (remote("cannot read", key, &self.describe), remote("cannot read", key, &self.describe));
        self.run(async move {
            let got = store.get(&path).await.map_err(e1)?;
            got.bytes().await.map(|b| b.to_vec()).map_err(e2)
        })
    }

    pub(crate) fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, ObjectsError> {
        let (store, path, err) = (self.store.clone(), self.path(key), remote("cannot read", key, &self.describe));
        self.run(async move { store.get_range(&path, range).await.map(|b| b.to_vec()).map_err(err) })
    }

    pub(crate) fn head(&self, key: &str) -> Result<Option<Meta>, ObjectsError> {
        let (store, path, err) = (self.store.clone(), self.path(key), remote("cannot stat", key, &self.describe));
        let key = key.to_owned();
        self.run(async move {
            match store.head(&path).await {
                Ok(m) => Ok(Some(Meta { key, size: m.size, modified: m.last_modified.into() })),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(err(e)),
            }
        })
    }

    pub(crate) fn list(&self, prefix: &str) -> Result<Vec<Meta>, ObjectsError> {
        let store = self.store.clone();
        let base = self.prefix.clone();
        let whole = if base.is_empty() { prefix.to_owned() } else { format!("{base}/{prefix}") };
        let err = remote("cannot list", prefix, &self.describe);
        self.run(async move {
            // object_store lists by path segments: list the directory part, filter the rest.
            let dir = match whole.rfind('/') {
                Some(i) => ObjPath::from(&whole[..i]),
                None => ObjPath::from(""),
            };
            let strip = if base.is_empty() { String::new() } else { format!("{base}/") };
            let metas: Vec<_> = store.list(Some(&dir)).try_collect().await.map_err(err)?;
            Ok(metas
                .into_iter()
                .filter_map(|m| {
                    let full = m.location.to_string();
                    let key = full.strip_prefix(&strip)?.to_owned();
                    full.starts_with(&whole).then(|| Meta { key, size: m.size, modified: m.last_modified.into() })
                })
                .collect())
        })
    }

    pub(crate) fn delete(&self, key: &str) -> Result<(), ObjectsError> {
        let (store, path, err) = (self.store.clone(), self.path(key), remote("cannot delete", key, &self.describe));
        self.run(async move {
            match store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(err(e)),
            }
        })
    }
}
