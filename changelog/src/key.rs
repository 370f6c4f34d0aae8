//! The AES-256 keys shared by the shipper (sealing) and ublk-target (opening).
//!
//! A key file holds one or more 32-byte random keys, oldest first, and is created with
//! mode 0600. The newest key the recovery side holds seals everything new; the ones
//! before it are *retired*: they only open what they sealed (segments still in staging
//! or in the store). That is how a key is rotated without stopping replication
//! ([`Key::rotate_file`]): the protected side appends a fresh key, the file is copied
//! to the recovery side, and the shipper seals with the new key once the recovery side
//! has proved it holds it (below); the hash chain is keyless, so it runs on across the
//! change. Once nothing sealed with a retired key is left, [`Key::forget_file`]
//! removes it. A retired key is not trusted forever: once a segment under a newer key
//! is applied, the recovery side refuses segments under older ones (a shipper never
//! goes back), so a leaked old key cannot forge history after the rotation.
//!
//! Each key has a public 8-byte id (a SHA-256 of the key under a domain label) written
//! into every segment header, so a segment is opened with the key that sealed it, and
//! one sealed with a key the file lacks is reported as such instead of as corruption.
//!
//! A new key must never seal before the recovery side holds it: a disaster in between
//! would leave segments nobody can open. So the recovery side *proves* each key it
//! holds with a small blob in the store, `key-<id>.held`, sealed with that key
//! ([`Key::seal_proof`]); the shipper seals with the newest key of its file that has a
//! proof that opens ([`Key::proves`]). The store cannot forge a proof without the key.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::OpenOptions;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const KEY_LEN: usize = 32;

/// Most keys one file holds: rotating weekly for over a year; retire old ones with
/// [`Key::forget_file`].
pub const MAX_KEYS: usize = 64;

/// The keys of a key file, oldest first: the newest seals once the recovery side holds it.
#[derive(Clone)]
pub struct Key {
    /// Oldest first; never empty.
    keys: Vec<[u8; KEY_LEN]>,
}

impl Key {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Key {
        Key { keys: vec![bytes] }
    }

    /// Keys in memory, oldest first (the last seals), e.g. to open what an earlier key
    /// sealed. Panics if `keys` is empty.
    pub fn from_keys(keys: Vec<[u8; KEY_LEN]>) -> Key {
        assert!(!keys.is_empty(), "a Key holds at least one key");
        Key { keys }
    }

    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Key> {
        Ok(Key::from_bytes(random_key()?))
    }

    /// The key that seals.
    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        self.keys.last().expect("a Key is never empty")
    }

    /// The key whose id is `id`, sealing or retired.
    pub(crate) fn bytes_for(&self, id: [u8; 8]) -> Option<&[u8; KEY_LEN]> {
        self.keys.iter().find(|k| key_id(k) == id)
    }

    /// Every key, the sealing one first, then the retired ones newest first: the order
    /// in which to try them on something that does not name its key.
    pub(crate) fn newest_first(&self) -> impl Iterator<Item = &[u8; KEY_LEN]> {
        self.keys.iter().rev()
    }

    /// The public identifier of the key that seals, stored in segment headers.
    pub fn id(&self) -> [u8; 8] {
        key_id(self.bytes())
    }

    /// The ids of every key, oldest first (the last one seals).
    pub fn ids(&self) -> Vec<[u8; 8]> {
        self.keys.iter().map(key_id).collect()
    }

    /// Whether the key with id `id` is in this file.
    pub fn has(&self, id: [u8; 8]) -> bool {
        self.bytes_for(id).is_some()
    }

    /// The key with id `id` alone, as the one that seals: to answer in the key the
    /// other side asked for. `None` if this file lacks it.
    pub fn only(&self, id: [u8; 8]) -> Option<Key> {
        self.bytes_for(id).map(|k| Key::from_bytes(*k))
    }

    /// Where the key with id `id` is in the file: 0 for the oldest.
    pub fn position(&self, id: [u8; 8]) -> Option<usize> {
        self.keys.iter().position(|k| key_id(k) == id)
    }

    /// Whether key `id` comes before key `newer` in the file: retired once `newer`
    /// sealed something, as shippers only move forward. `false` if the file lacks
    /// either (it cannot be placed).
    pub fn is_retired_by(&self, id: [u8; 8], newer: [u8; 8]) -> bool {
        match (self.position(id), self.position(newer)) {
            (Some(id), Some(newer)) => id < newer,
            _ => false,
        }
    }

    /// The name of the blob proving the recovery side holds key `id`.
    pub fn proof_name(id: [u8; 8]) -> String {
        format!("key-{}.held", hex(&id))
    }

    /// A proof that this side holds the key `id` for `volume` (sealed with that key),
    /// or `None` if the file lacks it.
    pub fn seal_proof(&self, id: [u8; 8], volume: &str) -> Option<Result<Vec<u8>>> {
        let key = self.only(id)?;
        Some(crate::digests::seal_blob(&key, &proof_aad(id, volume), &id))
    }

    /// Whether `bytes` proves the other side holds key `id` (which this file must have)
    /// for `volume`.
    pub fn proves(&self, id: [u8; 8], volume: &str, bytes: Vec<u8>) -> bool {
        self.only(id).is_some_and(|key| {
            crate::digests::open_blob(&key, &proof_aad(id, volume), "proof", bytes)
                .is_ok_and(|plain| plain == id)
        })
    }

    /// The ids for messages: `"1a2b…, 3c4d… (sealing)"`.
    pub fn describe_ids(&self) -> String {
        let ids = self.ids();
        let last = ids.len() - 1;
        ids.iter()
            .enumerate()
            .map(|(i, id)| match i == last {
                true if last > 0 => format!("{} (sealing)", hex(id)),
                _ => hex(id),
            })
            .collect::<Vec<_>>()
            .join(", ")
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
                    what: "already exists; refusing to overwrite a key (remove it first if you really mean to, or rotate it with `shipper key rotate`)".into(),
                },
                _ => Error::io(format!("creating key file {}", path.display()), e),
            })?;
        file.write_all(key.bytes())
            .and_then(|_| file.sync_all())
            .map_err(|e| Error::io(format!("writing key file {}", path.display()), e))?;
        Ok(key)
    }

    /// Reads a key file: one or more 32-byte keys, at most [`MAX_KEYS`], no key twice.
    pub fn load(path: &Path) -> Result<Key> {
        let key_err = |what: String| Error::Key {
            path: path.into(),
            what,
        };
        let mut file = std::fs::File::open(path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => key_err("does not exist; create one with `shipper keygen --out PATH` and copy it to both sides".into()),
            _ => Error::io(format!("opening key file {}", path.display()), e),
        })?;
        let most = (MAX_KEYS * KEY_LEN) as u64;
        let mut bytes = Vec::with_capacity(KEY_LEN);
        Read::by_ref(&mut file)
            .take(most + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io(format!("reading key file {}", path.display()), e))?;
        if bytes.is_empty() || bytes.len() % KEY_LEN != 0 || bytes.len() as u64 > most {
            let size = file
                .metadata()
                .map(|m| m.len())
                .unwrap_or(bytes.len() as u64);
            return Err(key_err(format!(
                "is {size} bytes; a key file holds 1 to {MAX_KEYS} keys of exactly {KEY_LEN} \
                 bytes each (made by `shipper keygen`, grown by `shipper key rotate`)"
            )));
        }
        let keys: Vec<[u8; KEY_LEN]> = bytes
            .chunks(KEY_LEN)
            .map(|k| k.try_into().expect("whole keys"))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            if let Some(first) = keys[..i].iter().position(|earlier| earlier == k) {
                return Err(key_err(format!(
                    "key {} repeats key {} (id {}); the file is damaged or was pieced \
                     together by hand",
                    i + 1,
                    first + 1,
                    hex(&key_id(k))
                )));
            }
        }
        if let Ok(meta) = file.metadata() {
            if meta.permissions().mode() & 0o077 != 0 {
                log::warn!(
                    "key file {} is readable by group or others; chmod 600 it",
                    path.display()
                );
            }
        }
        Ok(Key { keys })
    }

    /// Appends a fresh key to the key file at `path`, which seals from then on (once
    /// the recovery side proves it holds it); the keys before it stay, retired, to
    /// open what they sealed. The file is replaced atomically (mode 0600): a crash
    /// leaves the old file or the new one. Returns the keys now in the file.
    pub fn rotate_file(path: &Path) -> Result<Key> {
        let path = &real_path(path);
        let _lock = lock_key_file(path)?;
        let mut key = Key::load(path)?;
        if key.keys.len() >= MAX_KEYS {
            return Err(Error::Key {
                path: path.into(),
                what: format!(
                    "holds {MAX_KEYS} keys already; remove retired ones with `shipper key forget` first"
                ),
            });
        }
        key.keys.push(random_key()?);
        key.replace_file(path)?;
        Ok(key)
    }

    /// Removes the retired key with id `id` (hex, or a prefix of at least 4 hex digits)
    /// from the key file at `path`; refuses the key that seals. Returns the keys left.
    pub fn forget_file(path: &Path, id: &str) -> Result<Key> {
        let path = &real_path(path);
        let _lock = lock_key_file(path)?;
        let mut key = Key::load(path)?;
        let key_err = |what: String| Error::Key {
            path: path.into(),
            what,
        };
        let id = id.to_ascii_lowercase();
        if id.len() < 4 {
            return Err(key_err(format!(
                "name the key to forget by at least 4 hex digits of its id, not {id:?}"
            )));
        }
        let matching: Vec<usize> = (0..key.keys.len())
            .filter(|&i| hex(&key_id(&key.keys[i])).starts_with(&id))
            .collect();
        let index = match matching[..] {
            [i] => i,
            [] => {
                return Err(key_err(format!(
                    "has no key with id {id} (it has {})",
                    key.describe_ids()
                )))
            }
            _ => return Err(key_err(format!("more than one key's id starts with {id}"))),
        };
        if index == key.keys.len() - 1 {
            return Err(key_err(format!(
                "key {id} is the newest, the one that seals; rotate first (`shipper key \
                 rotate`), then forget it once nothing sealed with it is left"
            )));
        }
        key.keys.remove(index);
        key.replace_file(path)?;
        Ok(key)
    }

    /// Writes these keys over the file at `path`: a new file beside it, synced, then
    /// renamed over it and the directory synced.
    fn replace_file(&self, path: &Path) -> Result<()> {
        let mut new_name = path.file_name().unwrap_or_default().to_os_string();
        new_name.push(".new");
        let new = path.with_file_name(new_name);
        let io = |what: &str, p: &Path, e| Error::io(format!("{what} {}", p.display()), e);
        // A `.new` left by a crash in the middle of an earlier rotation is garbage (the
        // rename is what commits; the lock keeps out a rotation under way).
        match std::fs::remove_file(&new) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(io("removing the stale", &new, e))
            }
            _ => {}
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&new)
            .map_err(|e| io("creating", &new, e))?;
        file.write_all(&self.keys.concat())
            .and_then(|_| file.sync_all())
            .map_err(|e| io("writing", &new, e))?;
        std::fs::rename(&new, path).map_err(|e| io("renaming over", path, e))?;
        let dir: PathBuf = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.into(),
            _ => ".".into(),
        };
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("syncing directory", &dir, e))
    }
}

/// The file a key path names, through symbolic links: a rotation replaces that file,
/// not the link.
fn real_path(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Holds `PATH.lock` (flock) while a key file is rewritten, so two rotations at once
/// cannot lose one's key.
fn lock_key_file(path: &Path) -> Result<std::fs::File> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    let lock_path = path.with_file_name(name);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| Error::io(format!("opening {}", lock_path.display()), e))?;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    let locked = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) };
    if locked != 0 {
        return Err(Error::io(
            format!("locking {}", lock_path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(file)
}

fn proof_aad(id: [u8; 8], volume: &str) -> Vec<u8> {
    format!("ublk-dr key held v1 {volume} {}", hex(&id)).into_bytes()
}

fn key_id(key: &[u8; KEY_LEN]) -> [u8; 8] {
    let digest = Sha256::new()
        .chain_update(b"ublk-dr key id v1")
        .chain_update(key)
        .finalize();
    digest[..8].try_into().expect("8 bytes")
}

fn random_key() -> Result<[u8; KEY_LEN]> {
    random_bytes()
}

/// `N` bytes from the operating system's random source.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    getrandom::getrandom(&mut bytes).map_err(|e| {
        Error::io(
            "reading the system random source",
            std::io::Error::other(e.to_string()),
        )
    })?;
    Ok(bytes)
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(ids {})", self.describe_ids())
    }
}

/// A key file read again when it changes (its identity, size or time), by the
/// programs that run for long: new keys are handed out only when they load and differ;
/// a file that does not load keeps the keys in force (logged).
pub struct WatchedKeyFile {
    path: PathBuf,
    /// (device, inode, size, mtime in ns) when last read.
    seen: Option<(u64, u64, u64, i128)>,
    keys: Key,
}

impl WatchedKeyFile {
    /// Watches `path`, whose keys `keys` are (as just loaded).
    pub fn new(path: &Path, keys: Key) -> WatchedKeyFile {
        WatchedKeyFile {
            path: path.to_path_buf(),
            seen: file_stamp(path),
            keys,
        }
    }

    pub fn keys(&self) -> &Key {
        &self.keys
    }

    /// The new keys, if the file changed to a loadable one with other keys; `who`
    /// starts the log lines ("volume vol0").
    pub fn changed(&mut self, who: &dyn fmt::Display) -> Option<Key> {
        let now = file_stamp(&self.path);
        if now == self.seen {
            return None;
        }
        self.seen = now;
        match Key::load(&self.path) {
            Ok(keys) if keys.ids() != self.keys.ids() => {
                log::info!(
                    "{who}: key file {} read again: keys {}",
                    self.path.display(),
                    keys.describe_ids()
                );
                self.keys = keys.clone();
                Some(keys)
            }
            Ok(_) => None,
            Err(e) => {
                log::warn!("{who}: keeping the keys in force: {e}");
                None
            }
        }
    }
}

fn file_stamp(path: &Path) -> Option<(u64, u64, u64, i128)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    let mtime = m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128;
    Some((m.dev(), m.ino(), m.size(), mtime))
}

/// A key id from its 16 hex digits (as [`hex`] writes it).
pub fn parse_id(text: &str) -> Option<[u8; 8]> {
    let value = u64::from_str_radix(text, 16)
        .ok()
        .filter(|_| text.len() == 16 && text.bytes().all(|b| b.is_ascii_hexdigit()))?;
    Some(value.to_be_bytes())
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
        let odd = dir.path().join("odd");
        std::fs::write(&odd, [1u8; 33]).unwrap();
        assert!(Key::load(&odd)
            .unwrap_err()
            .to_string()
            .contains("33 bytes"));
        let missing = Key::load(&dir.path().join("none")).unwrap_err().to_string();
        assert!(missing.contains("does not exist"), "{missing}");
    }

    #[test]
    fn rotation_appends_a_sealing_key_and_keeps_the_retired_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let first = Key::generate_file(&path).unwrap();
        // A `.new` left by a crashed rotation does not stop the next one.
        std::fs::write(dir.path().join("k.new"), b"half").unwrap();
        let rotated = Key::rotate_file(&path).unwrap();
        assert_eq!(rotated.ids().len(), 2);
        assert_eq!(rotated.ids()[0], first.id());
        assert_ne!(rotated.id(), first.id());
        assert!(rotated.has(first.id()));
        assert_eq!(rotated.only(first.id()).unwrap().id(), first.id());
        assert_eq!(Key::load(&path).unwrap().ids(), rotated.ids());
        assert!(!dir.path().join("k.new").exists());
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // The sealing key cannot be forgotten; a retired one can, by an id prefix.
        let sealing = hex(&rotated.id());
        let msg = Key::forget_file(&path, &sealing).unwrap_err().to_string();
        assert!(msg.contains("the newest"), "{msg}");
        assert!(Key::forget_file(&path, "ab").is_err());
        let retired = hex(&first.id());
        let left = Key::forget_file(&path, &retired[..6]).unwrap();
        assert_eq!(left.ids(), vec![rotated.id()]);
        assert_eq!(Key::load(&path).unwrap().ids(), vec![rotated.id()]);
        let msg = Key::forget_file(&path, &retired).unwrap_err().to_string();
        assert!(msg.contains("has no key"), "{msg}");
    }

    #[test]
    fn a_proof_opens_only_with_its_key_volume_and_id() {
        let (a, b) = (Key::from_bytes([1; 32]), Key::from_bytes([2; 32]));
        let target = Key::from_keys(vec![[1; 32], [2; 32]]);
        let proof = target.seal_proof(b.id(), "vol0").unwrap().unwrap();
        assert!(target.proves(b.id(), "vol0", proof.clone()));
        assert!(b.proves(b.id(), "vol0", proof.clone()));
        assert!(!b.proves(b.id(), "vol1", proof.clone()), "another volume's");
        assert!(
            !target.proves(a.id(), "vol0", proof.clone()),
            "another key's"
        );
        assert!(
            !a.proves(b.id(), "vol0", proof.clone()),
            "a file without the key"
        );
        let mut flipped = proof;
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(!target.proves(b.id(), "vol0", flipped));
        assert!(a.seal_proof(b.id(), "vol0").is_none());
        assert_eq!(target.position(b.id()), Some(1));
        assert_eq!(Key::proof_name(b.id()).len(), 25);
        assert!(crate::store::valid_blob_name(&Key::proof_name(b.id())));
    }

    #[test]
    fn a_watched_file_hands_out_new_keys_once_and_keeps_them_if_it_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let first = Key::generate_file(&path).unwrap();
        let mut watched = WatchedKeyFile::new(&path, first.clone());
        assert!(watched.changed(&"test").is_none());
        let rotated = Key::rotate_file(&path).unwrap();
        assert_eq!(watched.changed(&"test").unwrap().ids(), rotated.ids());
        assert!(watched.changed(&"test").is_none());
        std::fs::write(&path, b"broken").unwrap();
        assert!(watched.changed(&"test").is_none());
        assert_eq!(watched.keys().ids(), rotated.ids());
    }

    #[test]
    fn a_file_with_a_key_twice_or_too_many_keys_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let twice = dir.path().join("twice");
        std::fs::write(&twice, [[1u8; 32], [2; 32], [1; 32]].concat()).unwrap();
        let msg = Key::load(&twice).unwrap_err().to_string();
        assert!(msg.contains("key 3 repeats key 1"), "{msg}");

        let full = dir.path().join("full");
        let keys: Vec<u8> = (0..MAX_KEYS as u8).flat_map(|i| [i; 32]).collect();
        std::fs::write(&full, &keys).unwrap();
        assert_eq!(Key::load(&full).unwrap().ids().len(), MAX_KEYS);
        let msg = Key::rotate_file(&full).unwrap_err().to_string();
        assert!(msg.contains("shipper key forget"), "{msg}");
        std::fs::write(&full, [keys, vec![99; 32]].concat()).unwrap();
        assert!(Key::load(&full).is_err());
    }
}
