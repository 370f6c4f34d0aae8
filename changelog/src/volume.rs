//! Volume identifiers: the name a protected volume has in segment headers and stores.

use crate::error::{Error, Result};
use std::fmt;

/// Maximum length of a volume id; it is stored zero-padded in every segment header.
pub const VOLUME_ID_MAX: usize = 32;

/// A validated volume name: 1–32 bytes of `[A-Za-z0-9._-]`, not starting with `.`, so it
/// is safe as a directory name in any store.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeId(String);

impl VolumeId {
    pub fn new(name: &str) -> Result<VolumeId> {
        let ok = !name.is_empty()
            && name.len() <= VOLUME_ID_MAX
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Ok(VolumeId(name.to_string()))
        } else {
            Err(Error::InvalidVolumeId(name.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The fixed-width header encoding.
    pub(crate) fn to_field(&self) -> [u8; VOLUME_ID_MAX] {
        let mut field = [0u8; VOLUME_ID_MAX];
        field[..self.0.len()].copy_from_slice(self.0.as_bytes());
        field
    }

    /// Decodes the header field; `None` when it is not a valid id.
    pub(crate) fn from_field(field: &[u8; VOLUME_ID_MAX]) -> Option<VolumeId> {
        let end = field.iter().position(|&b| b == 0).unwrap_or(VOLUME_ID_MAX);
        if field[end..].iter().any(|&b| b != 0) {
            return None;
        }
        let name = std::str::from_utf8(&field[..end]).ok()?;
        VolumeId::new(name).ok()
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl TryFrom<String> for VolumeId {
    type Error = Error;
    fn try_from(name: String) -> Result<Self> {
        VolumeId::new(&name)
    }
}

impl From<VolumeId> for String {
    fn from(id: VolumeId) -> String {
        id.0
    }
}

impl std::str::FromStr for VolumeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        VolumeId::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        for good in ["vol0", "a", "db-1.data_x", &"x".repeat(32)] {
            let id = VolumeId::new(good).unwrap();
            assert_eq!(VolumeId::from_field(&id.to_field()), Some(id));
        }
        for bad in ["", ".hidden", "a/b", "..", "sp ace", &"x".repeat(33), "é"] {
            assert!(VolumeId::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
