//! The receiver protocol: how a shipper (or an applier) talks to `ublk-target receive`
//! over TCP.
//!
//! A connection opens with [`Hello`] from the client, answered by [`Welcome`]; then the
//! client sends one [`Request`] at a time and reads its [`Response`]. Every message is a
//! frame:
//!
//! | size | field |
//! |---:|---|
//! | 4 | head length `h`, little-endian |
//! | 8 | body length `b`, little-endian |
//! | `h` | head: the message, bincode |
//! | `b` | body: the bytes of a segment or blob, raw |
//!
//! Bytes travel outside bincode so an 8 MiB segment is neither encoded byte by byte nor
//! copied. Limits ([`MAX_HEAD`], [`MAX_BODY`]) are checked before anything is
//! allocated, and a body is read as it arrives, so a peer that lies about lengths costs
//! at most what it really sends.
//!
//! The transport is TCP, or TLS ([`crate::tls`]). Segments are encrypted and
//! authenticated end to end either way, so the network cannot forge, reorder or splice
//! history (I6). The optional token in [`Hello`] keeps strangers from writing into the
//! store; over plain TCP it is not a secret from someone who can read the traffic.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::{self, Read, Write};

/// First bytes of every [`Hello`]: something that is not a ublk-dr client is turned
/// away at once.
pub const MAGIC: [u8; 8] = *b"UBLKDRRX";
/// Protocol version; a receiver answers a version it does not speak with a refusal.
pub const VERSION: u16 = 1;
/// The largest head: names and numbers only.
pub const MAX_HEAD: u32 = 64 << 10;
/// The largest body: a segment of the largest size the format allows, with room for
/// its header and tag.
pub const MAX_BODY: u64 = changelog::segment::MAX_PLAIN_LEN + (1 << 20);

/// The most allocated for a body before its bytes arrive: a segment of the shipper's
/// default size and then some.
const PREALLOCATE_MAX: u64 = 16 << 20;

#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 8],
    pub version: u16,
    /// The receiver's token, or empty.
    pub token: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Welcome {
    Accepted,
    Refused { reason: String },
}

/// One store call. Segment and blob bytes travel in the frame's body.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Put {
        volume: String,
        index: u64,
    },
    Get {
        volume: String,
        index: u64,
    },
    List {
        volume: String,
    },
    PutBlob {
        volume: String,
        name: String,
    },
    GetBlob {
        volume: String,
        name: String,
    },
    DeleteBlob {
        volume: String,
        name: String,
    },
    ListBlobs {
        volume: String,
    },
    /// Last, so the calls above keep their encoding: a receiver from before it drops
    /// the connection, and the recovery side's pruning only logs that.
    Delete {
        volume: String,
        index: u64,
    },
    /// The first `len` bytes of a segment (its header, for the recovery side's sweep);
    /// after `Delete` for the same reason.
    GetHead {
        volume: String,
        index: u64,
        len: u32,
    },
}

impl Request {
    /// The volume the call is about (every call is about one).
    pub fn volume(&self) -> &str {
        match self {
            Request::Put { volume, .. }
            | Request::Get { volume, .. }
            | Request::List { volume }
            | Request::PutBlob { volume, .. }
            | Request::GetBlob { volume, .. }
            | Request::DeleteBlob { volume, .. }
            | Request::ListBlobs { volume }
            | Request::Delete { volume, .. }
            | Request::GetHead { volume, .. } => volume,
        }
    }
}

/// What the call does, for messages: "uploading segment 0000000000000007 of vol0".
impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Put { volume, index } => {
                write!(f, "uploading segment {index:016x} of {volume}")
            }
            Request::Get { volume, index } => write!(f, "reading segment {index:016x} of {volume}"),
            Request::List { volume } => write!(f, "listing segments of {volume}"),
            Request::PutBlob { volume, name } => write!(f, "uploading {volume}/{name}"),
            Request::GetBlob { volume, name } => write!(f, "reading {volume}/{name}"),
            Request::DeleteBlob { volume, name } => write!(f, "deleting {volume}/{name}"),
            Request::ListBlobs { volume } => write!(f, "listing objects of {volume}"),
            Request::Delete { volume, index } => {
                write!(f, "deleting segment {index:016x} of {volume}")
            }
            Request::GetHead { volume, index, .. } => {
                write!(f, "reading the header of segment {index:016x} of {volume}")
            }
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    Done,
    /// The object is in the body.
    Found,
    Absent,
    Indexes(Vec<u64>),
    Names(Vec<String>),
    /// Different bytes are already stored under this segment's name.
    Conflict {
        segment: String,
        store: String,
    },
    /// The receiver's store failed (a full disk, say); worth retrying later.
    Failed {
        message: String,
    },
    /// The request itself is wrong (a bad volume id or blob name); retrying will not help.
    Invalid {
        message: String,
    },
}

fn codec() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new().with_limit(u64::from(MAX_HEAD))
}

/// Writes one frame and flushes. `to` should be buffered: the lengths and the head
/// are small writes of their own.
pub fn write_frame<T: Serialize>(to: &mut impl Write, head: &T, body: &[u8]) -> io::Result<()> {
    use bincode::Options;
    let head = codec().serialize(head).map_err(io::Error::other)?;
    to.write_all(&(head.len() as u32).to_le_bytes())?;
    to.write_all(&(body.len() as u64).to_le_bytes())?;
    to.write_all(&head)?;
    to.write_all(body)?;
    to.flush()
}

/// Reads one frame. `Ok(None)` when the peer closed the connection before its first
/// byte (a clean end between messages).
pub fn read_frame<T: for<'de> Deserialize<'de>>(
    from: &mut impl Read,
) -> io::Result<Option<(T, Vec<u8>)>> {
    use bincode::Options;
    let mut lengths = [0u8; 12];
    let mut got = 0;
    while got < lengths.len() {
        match from.read(&mut lengths[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            // TLS without its closing message (a peer that exited without closing the
            // session) between frames: the same clean end.
            Err(e) if got == 0 && e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let head_len = u32::from_le_bytes(lengths[..4].try_into().expect("4 bytes"));
    let body_len = u64::from_le_bytes(lengths[4..].try_into().expect("8 bytes"));
    if head_len > MAX_HEAD || body_len > MAX_BODY {
        return Err(invalid(format!(
            "frame of {head_len} + {body_len} bytes is over the limits \
             ({MAX_HEAD} + {MAX_BODY}): not a ublk-dr peer, or a damaged stream"
        )));
    }
    let mut head = vec![0u8; head_len as usize];
    from.read_exact(&mut head)?;
    let head = codec()
        .deserialize(&head)
        .map_err(|e| invalid(format!("undecodable message: {e}")))?;
    // Room for a whole segment of the usual size up front (no regrowing and copying
    // as it arrives); a larger claim grows only with the bytes that really come.
    let mut body = Vec::with_capacity(body_len.min(PREALLOCATE_MAX) as usize);
    from.take(body_len).read_to_end(&mut body)?;
    if body.len() as u64 != body_len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some((head, body)))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_their_bodies() {
        let mut wire = Vec::new();
        let body = vec![7u8; 100_000];
        let request = Request::Put {
            volume: "vol0".into(),
            index: 42,
        };
        write_frame(&mut wire, &request, &body).unwrap();
        write_frame(&mut wire, &Response::Names(vec!["a".into()]), &[]).unwrap();
        let mut from = &wire[..];
        let (got, got_body): (Request, _) = read_frame(&mut from).unwrap().unwrap();
        assert!(matches!(got, Request::Put { ref volume, index: 42 } if volume == "vol0"));
        assert_eq!(got_body, body);
        let (got, got_body): (Response, _) = read_frame(&mut from).unwrap().unwrap();
        assert!(matches!(got, Response::Names(ref n) if n == &["a"]));
        assert!(got_body.is_empty());
        assert!(read_frame::<Response>(&mut from).unwrap().is_none());
    }

    #[test]
    fn lies_and_truncation_are_errors() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &Response::Done, &[1, 2, 3]).unwrap();
        // Cut inside the body, inside the head, inside the lengths.
        for cut in [wire.len() - 1, 13, 5] {
            let err = read_frame::<Response>(&mut &wire[..cut]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}");
        }
        // An HTTP request is not a frame: its "lengths" are far over the limits.
        let err = read_frame::<Hello>(&mut &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("not a ublk-dr peer"), "{err}");
        // A head that is not the expected message.
        let mut wire = Vec::new();
        write_frame(&mut wire, &"some string", &[]).unwrap();
        let err = read_frame::<Request>(&mut &wire[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
