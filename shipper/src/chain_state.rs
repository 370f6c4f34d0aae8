//! The shipper's position in its volume's chain, kept in the staging directory.
//!
//! `chain.state` (bincode of a [`ChainCursor`]) names the next segment index, the
//! digest it must link to, the protection epoch and the first seq not yet in a segment.
//! It is rewritten after each segment is staged and the ring released, so a crash can
//! leave it one or more segments behind the staged files, never ahead. [`recover`]
//! therefore walks the staged files past the saved position, checking each link, and
//! the reader skips ring records below `next_seq` (they are already in a staged
//! segment whose ring space was not yet released).
//!
//! A dropped staged backlog rewinds the position ([`crate::backlog`]); a drop that a
//! crash interrupted is finished first, before the position is loaded.

use crate::error::{Result, ShipperError};
use changelog::store::{list_segment_dir, segment_file_name};
use changelog::uring::{write_file_atomic, Uring};
use changelog::{ChainCursor, Key, VolumeId};
use std::path::Path;

pub const STATE_FILE: &str = "chain.state";

/// Loads the saved position (or starts a new protection epoch) and rolls it forward
/// over segments already staged.
pub fn recover(dir: &Path, volume: &VolumeId, key: &Key) -> Result<ChainCursor> {
    crate::backlog::finish_interrupted(dir, volume)?;
    let path = dir.join(STATE_FILE);
    let mut cursor = match std::fs::read(&path) {
        Ok(bytes) => {
            let cursor: ChainCursor =
                bincode::deserialize(&bytes).map_err(|e| ShipperError::State {
                    path: path.clone(),
                    what: e.to_string(),
                })?;
            if &cursor.volume != volume {
                return Err(ShipperError::State {
                    path,
                    what: format!("it belongs to volume {}, not {volume}", cursor.volume),
                });
            }
            cursor
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut epoch = [0u8; 8];
            getrandom::getrandom(&mut epoch).map_err(|e| {
                ShipperError::io("random epoch", std::io::Error::other(e.to_string()))
            })?;
            let epoch = u64::from_le_bytes(epoch);
            log::info!("volume {volume}: starting protection epoch {epoch:016x}");
            ChainCursor {
                epoch: Some(epoch),
                ..ChainCursor::start(volume.clone())
            }
        }
        Err(e) => return Err(ShipperError::io(format!("reading {}", path.display()), e)),
    };
    let saved_next = cursor.next_index;
    for index in list_segment_dir(dir)?
        .into_iter()
        .filter(|&i| i >= saved_next)
    {
        let file = dir.join(segment_file_name(index));
        let bytes = std::fs::read(&file)
            .map_err(|e| ShipperError::io(format!("reading {}", file.display()), e))?;
        let name = file.display().to_string();
        let segment = cursor.open_next(bytes, &name, key)?;
        log::info!("volume {volume}: adopting staged segment {index:016x} written before a crash");
        cursor.advance(&segment.header, segment.digest);
    }
    let mut uring = Uring::new(2).map_err(|e| ShipperError::io("io_uring setup", e))?;
    save(&mut uring, dir, &cursor)?;
    Ok(cursor)
}

pub fn save(uring: &mut Uring, dir: &Path, cursor: &ChainCursor) -> Result<()> {
    let bytes = bincode::serialize(cursor).expect("cursor serializes");
    write_file_atomic(uring, dir, STATE_FILE, &bytes)
        .map_err(|e| ShipperError::io(format!("writing {}", dir.join(STATE_FILE).display()), e))
}
