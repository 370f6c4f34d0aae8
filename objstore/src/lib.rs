//! Target stores by location: [`open`] turns a [`StoreLocation`] (a directory path, an
//! `az://` / `s3://` URL or a receiver's `tcp://HOST:PORT` or `tls://HOST:PORT`) into the [`TargetStore`] the
//! shipper uploads to and ublk-target applies from.
//!
//! The local directory is the embedded default ([`changelog::LocalDirStore`]); object
//! storage goes through the `object_store` crate ([`ObjectTargetStore`]); a network
//! receiver ([`Receiver`], `ublk-target receive`) keeps a directory store at the
//! recovery site for shippers elsewhere ([`ReceiverStore`], protocol in [`wire`]). All
//! keep the same layout (`PREFIX/<volume>/<index:016x>.seg` and `PREFIX/<volume>/<blob>`) and
//! the same contract ([`TargetStore`]): puts are idempotent for identical bytes and
//! refuse different bytes under an existing name, and every error of the store is an
//! I/O error that the callers retry (segments are authenticated end to end, so the
//! store is not trusted with anything but keeping bytes).

pub mod clients;
mod location;
mod object;
mod receiver;
mod remote;
pub mod tls;
pub mod wire;

pub use clients::ClientVolumes;
pub use location::{Service, StoreLocation};
pub use object::ObjectTargetStore;
pub use receiver::{Admission, AdmissionSwitch, Receiver};
pub use remote::{ReceiverStore, TOKEN_ENV};

use changelog::{LocalDirStore, TargetStore};
use std::sync::Arc;

/// What can go wrong setting a store up (its operations return [`changelog::Error`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store {location}: {source}; {hint}")]
    Setup {
        location: String,
        #[source]
        source: object_store::Error,
        hint: &'static str,
    },
    #[error("store directory {} does not exist: create it first", .0.display())]
    NoStoreDir(std::path::PathBuf),
    #[error("receiver on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store {location}: {what}")]
    Tls { location: String, what: String },
    #[error("store {location}: starting the I/O runtime: {source}")]
    Runtime {
        location: String,
        #[source]
        source: std::io::Error,
    },
}

/// Opens the store at `location`. Nothing is contacted yet: an unreachable service
/// shows as I/O errors of the first operations, which callers retry.
pub fn open(location: &StoreLocation) -> Result<Arc<dyn TargetStore>, Error> {
    match location {
        StoreLocation::Dir(dir) => Ok(Arc::new(LocalDirStore::new(dir))),
        StoreLocation::Object { .. } => Ok(Arc::new(ObjectTargetStore::open(location)?)),
        StoreLocation::Receiver { addr, tls } => {
            let tls = tls
                .then(tls::client_config_from_env)
                .transpose()
                .map_err(|what| Error::Tls {
                    location: location.to_string(),
                    what,
                })?;
            Ok(Arc::new(ReceiverStore::new(addr, tls)))
        }
    }
}
