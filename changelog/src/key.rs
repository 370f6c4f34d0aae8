//! The AES-256 key shared by the shipper (sealing) and ublk-target (opening).
//!
//! A key file holds exactly 32 random bytes and is created with mode 0600. Each key has
//! a public 8-byte id (a SHA-256 of the key under a domain label) written into every
//! segment header, so a wrong key is reported as such instead of as corruption.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::OpenOptions;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub const KEY_LEN: usize = 32;

#[derive(Clone)]
pub struct Key {
    bytes: [u8; KEY_LEN],
}

impl Key {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Key {
        Key { bytes }
    }

    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Key> {
        let mut bytes = [0u8; KEY_LEN];
        getrandom::getrandom(&mut bytes).map_err(|e| {
            Error::io(
                "reading the system random source",
                std::io::Error::other(e.to_string()),
            )
        })?;
        Ok(Key { bytes })
    }

    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    /// The public identifier of this key, stored in segment headers.
    pub fn id(&self) -> [u8; 8] {
        let digest = Sha256::new()
            .chain_update(b"ublk-dr key id v1")
            .chain_update(self.bytes)
            .finalize();
        digest[..8].try_into().expect("8 bytes")
    }

    /// Writes a new random key to `path` with mode 0600. Refuses to overwrite a file:
    /// losing the key loses access to every segment sealed with it.
    pub fn generate_file(path: &Path) -> Result<Key> {
        let key = Key::generate()?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                ErrorKind::AlreadyExists => Error::Key {
                    path: path.into(),
                    what: "already exists; refusing to overwrite a key (remove it first if you really mean to)".into(),
                },
                _ => Error::io(format!("creating key file {}", path.display()), e),
            })?;
        file.write_all(&key.bytes)
            .and_then(|_| file.sync_all())
            .map_err(|e| Error::io(format!("writing key file {}", path.display()), e))?;
        Ok(key)
    }

    /// Reads a key file, checking that it is exactly 32 bytes.
    pub fn load(path: &Path) -> Result<Key> {
        let key_err = |what: String| Error::Key {
            path: path.into(),
            what,
        };
        let mut file = std::fs::File::open(path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => key_err("does not exist; create one with `shipper keygen --out PATH` and copy it to both sides".into()),
            _ => Error::io(format!("opening key file {}", path.display()), e),
        })?;
        let mut bytes = Vec::with_capacity(KEY_LEN + 1);
        Read::by_ref(&mut file)
            .take(KEY_LEN as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io(format!("reading key file {}", path.display()), e))?;
        if bytes.len() != KEY_LEN {
            let size = file
                .metadata()
                .map(|m| m.len())
                .unwrap_or(bytes.len() as u64);
            return Err(key_err(format!(
                "is {size} bytes, a key is exactly {KEY_LEN} bytes (made by `shipper keygen`)"
            )));
        }
        if let Ok(meta) = file.metadata() {
            if meta.permissions().mode() & 0o077 != 0 {
                log::warn!(
                    "key file {} is readable by group or others; chmod 600 it",
                    path.display()
                );
            }
        }
        Ok(Key {
            bytes: bytes.try_into().expect("checked length"),
        })
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(id {})", hex(&self.id()))
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_load_and_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = Key::generate_file(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(Key::load(&path).unwrap().id(), key.id());
        assert!(matches!(Key::generate_file(&path), Err(Error::Key { .. })));

        let short = dir.path().join("short");
        std::fs::write(&short, [1u8; 31]).unwrap();
        let msg = Key::load(&short).unwrap_err().to_string();
        assert!(msg.contains("31 bytes"), "{msg}");
        let missing = Key::load(&dir.path().join("none")).unwrap_err().to_string();
        assert!(missing.contains("does not exist"), "{missing}");
    }
}
