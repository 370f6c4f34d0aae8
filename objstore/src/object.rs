//! A [`TargetStore`] on object storage (Azure Blob, S3) through the `object_store`
//! crate, driven from the callers' plain threads by a private tokio runtime.
//!
//! Contract, as for the local directory store:
//!
//! * `put` is idempotent for identical bytes and refuses different ones. It is a
//!   conditional create (`If-None-Match: *`); when the name is taken — a re-upload
//!   after a crash, or a retry whose first response was lost on the way back — the
//!   stored object is read and compared. A segment is never overwritten.
//! * A put that returned is durable (object stores acknowledge after storing).
//! * Every failure is a [`changelog::Error::Io`], which the shipper retries on its
//!   schedule and `ublk-target apply --follow` every few seconds. The client's own
//!   retries are kept short ([`RETRIES`], [`RETRY_TIMEOUT`]) so an outage reaches the
//!   status file within seconds instead of hiding inside one call for minutes.
//!
//! Credentials and endpoints come from the environment, as the `object_store` crate
//! reads them: `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY` (or a SAS
//! token, or `AZURE_STORAGE_USE_EMULATOR=true` for azurite, whose address
//! `AZURITE_BLOB_STORAGE_URL` overrides); `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION`, `AWS_ENDPOINT` and `AWS_ALLOW_HTTP` for S3-compatible stores.

use crate::location::{Service, StoreLocation};
use crate::Error;
use changelog::{
    parse_segment_file_name, segment_file_name, valid_blob_name, TargetStore, VolumeId,
};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::path::Path;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, PutMode, PutPayload, RetryConfig};
use std::future::Future;
use std::time::Duration;

/// The client's own retries of one call before it reports the failure.
const RETRIES: usize = 2;
/// The longest one call keeps retrying.
const RETRY_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole request, an 8 MiB segment included, on a slow link.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct ObjectTargetStore {
    store: Box<dyn ObjectStore>,
    /// Where volumes live inside the container or bucket.
    prefix: Path,
    /// The location as the user wrote it, for messages.
    location: String,
    /// `az://CONTAINER` or `s3://BUCKET`: object paths (prefix included) follow it.
    root: String,
    runtime: tokio::runtime::Runtime,
}

impl ObjectTargetStore {
    /// Sets up the client for an `az://` or `s3://` location.
    pub fn open(location: &StoreLocation) -> Result<ObjectTargetStore, Error> {
        let StoreLocation::Object {
            service,
            bucket,
            prefix,
        } = location
        else {
            panic!("ObjectTargetStore::open needs an object location, got {location}");
        };
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: RETRIES,
            retry_timeout: RETRY_TIMEOUT,
        };
        // Set key by key: a whole ClientOptions would replace what the environment
        // configured (AWS_ALLOW_HTTP, proxies).
        let timeouts = [
            (ClientConfigKey::Timeout, REQUEST_TIMEOUT),
            (ClientConfigKey::ConnectTimeout, CONNECT_TIMEOUT),
        ]
        .map(|(key, value)| (key, format!("{}s", value.as_secs())));
        let (built, hint): (object_store::Result<Box<dyn ObjectStore>>, _) = match service {
            Service::Azure => (
                timeouts
                    .iter()
                    .fold(MicrosoftAzureBuilder::from_env(), |b, (key, value)| {
                        b.with_config(AzureConfigKey::Client(*key), value)
                    })
                    .with_container_name(bucket)
                    .with_retry(retry)
                    .build()
                    .map(|s| Box::new(s) as _),
                "set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or \
                 AZURE_STORAGE_USE_EMULATOR=true for azurite)",
            ),
            Service::S3 => (
                timeouts
                    .iter()
                    .fold(AmazonS3Builder::from_env(), |b, (key, value)| {
                        b.with_config(AmazonS3ConfigKey::Client(*key), value)
                    })
                    .with_bucket_name(bucket)
                    .with_conditional_put(S3ConditionalPut::ETagMatch)
                    .with_retry(retry)
                    .build()
                    .map(|s| Box::new(s) as _),
                "set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION (and \
                 AWS_ENDPOINT for a store other than AWS)",
            ),
        };
        let store = built.map_err(|source| Error::Setup {
            location: location.to_string(),
            source,
            hint,
        })?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| Error::Runtime {
                location: location.to_string(),
                source,
            })?;
        Ok(ObjectTargetStore {
            store,
            prefix: Path::from(prefix.as_str()),
            location: location.to_string(),
            root: StoreLocation::Object {
                service: *service,
                bucket: bucket.clone(),
                prefix: String::new(),
            }
            .to_string(),
            runtime,
        })
    }

    fn volume_path(&self, volume: &VolumeId) -> Path {
        self.prefix.child(volume.as_str())
    }

    fn object_path(&self, volume: &VolumeId, name: &str) -> Path {
        self.volume_path(volume).child(name)
    }

    /// Runs one client call to its end on this thread. Several threads may do so at
    /// once: a current-thread runtime lets them share its I/O driver.
    fn run<T>(&self, call: impl Future<Output = T>) -> T {
        self.runtime.block_on(call)
    }

    fn error(&self, doing: &str, path: &Path, e: object_store::Error) -> changelog::Error {
        changelog::Error::io(
            format!("{doing} {}/{path}", self.root),
            std::io::Error::other(e),
        )
    }

    fn get_object(&self, path: &Path) -> changelog::Result<Option<Vec<u8>>> {
        let got = self.run(async { self.store.get(path).await?.bytes().await });
        match got {
            Ok(bytes) => Ok(Some(bytes.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("reading", path, e)),
        }
    }

    /// Deletes the object at `path`; absent is fine.
    fn delete_object(&self, path: &Path) -> changelog::Result<()> {
        match self.run(self.store.delete(path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("deleting", path, e)),
        }
    }

    /// The file names directly under `volume`'s path, sorted.
    fn names(&self, volume: &VolumeId) -> changelog::Result<Vec<String>> {
        let dir = self.volume_path(volume);
        let listed = self
            .run(self.store.list_with_delimiter(Some(&dir)))
            .map_err(|e| self.error("listing", &dir, e))?;
        let mut names: Vec<String> = listed
            .objects
            .iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .collect();
        names.sort_unstable();
        Ok(names)
    }
}

fn check_blob_name(name: &str) -> changelog::Result<()> {
    if valid_blob_name(name) {
        Ok(())
    } else {
        Err(changelog::Error::io(
            format!("store object name {name:?}"),
            std::io::ErrorKind::InvalidInput.into(),
        ))
    }
}

impl TargetStore for ObjectTargetStore {
    fn put(&self, volume: &VolumeId, index: u64, bytes: &[u8]) -> changelog::Result<()> {
        let path = self.object_path(volume, &segment_file_name(index));
        let payload = PutPayload::from(bytes.to_vec());
        match self.run(self.store.put_opts(&path, payload, PutMode::Create.into())) {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => {
                match self.get_object(&path)? {
                    Some(existing) if existing == bytes => Ok(()),
                    // Deleted between the two calls: not ours to decide; try again later.
                    None => Err(changelog::Error::io(
                        format!("uploading {}/{path}", self.root),
                        std::io::Error::other("the object existed, then vanished"),
                    )),
                    Some(_) => Err(changelog::Error::Conflict {
                        segment: segment_file_name(index),
                        store: format!("{}/{volume}", self.location),
                    }),
                }
            }
            Err(e) => Err(self.error("uploading", &path, e)),
        }
    }

    fn delete(&self, volume: &VolumeId, index: u64) -> changelog::Result<()> {
        self.delete_object(&self.object_path(volume, &segment_file_name(index)))
    }

    fn get(&self, volume: &VolumeId, index: u64) -> changelog::Result<Option<Vec<u8>>> {
        self.get_object(&self.object_path(volume, &segment_file_name(index)))
    }

    fn get_head(
        &self,
        volume: &VolumeId,
        index: u64,
        len: usize,
    ) -> changelog::Result<Option<Vec<u8>>> {
        let path = self.object_path(volume, &segment_file_name(index));
        let range = object_store::GetOptions {
            range: Some((0..len as u64).into()),
            ..Default::default()
        };
        let got = self.run(async { self.store.get_opts(&path, range).await?.bytes().await });
        match got {
            Ok(bytes) => Ok(Some(bytes.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("reading the head of", &path, e)),
        }
    }

    fn list(&self, volume: &VolumeId) -> changelog::Result<Vec<u64>> {
        let mut indexes: Vec<u64> = self
            .names(volume)?
            .iter()
            .filter_map(|n| parse_segment_file_name(n))
            .collect();
        indexes.sort_unstable();
        Ok(indexes)
    }

    fn put_blob(&self, volume: &VolumeId, name: &str, bytes: &[u8]) -> changelog::Result<()> {
        check_blob_name(name)?;
        let path = self.object_path(volume, name);
        let payload = PutPayload::from(bytes.to_vec());
        self.run(
            self.store
                .put_opts(&path, payload, PutMode::Overwrite.into()),
        )
        .map(|_| ())
        .map_err(|e| self.error("uploading", &path, e))
    }

    fn get_blob(&self, volume: &VolumeId, name: &str) -> changelog::Result<Option<Vec<u8>>> {
        check_blob_name(name)?;
        self.get_object(&self.object_path(volume, name))
    }

    fn delete_blob(&self, volume: &VolumeId, name: &str) -> changelog::Result<()> {
        check_blob_name(name)?;
        self.delete_object(&self.object_path(volume, name))
    }

    fn list_blobs(&self, volume: &VolumeId) -> changelog::Result<Vec<String>> {
        let mut names = self.names(volume)?;
        names.retain(|n| valid_blob_name(n));
        Ok(names)
    }

    fn describe(&self) -> String {
        self.location.clone()
    }
}
