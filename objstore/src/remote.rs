//! A [`TargetStore`] at a network receiver (`tcp://HOST:PORT`, or `tls://HOST:PORT`
//! over TLS, see [`crate::tls`]): the client end of the protocol in [`crate::wire`],
//! served by [`crate::Receiver`] (`ublk-target receive`).
//!
//! Contract, as for the other stores:
//!
//! * `put` is idempotent for identical bytes and refuses different ones (the receiver
//!   puts into its local directory store, which compares).
//! * A put that returned is durable: the receiver answers after its store's write,
//!   fsync, rename and directory fsync.
//! * Every failure (no route, refused, dropped, timed out, the receiver's disk full)
//!   is a [`changelog::Error::Io`], which the shipper retries on its schedule and
//!   `ublk-target apply --follow` every few seconds; a conflict is
//!   [`changelog::Error::Conflict`].
//!
//! One connection is kept and shared by the calls (one at a time). A call on a
//! connection kept from before is tried once more on a fresh one when it fails: the
//! receiver may have closed an idle connection, and every call is safe to repeat
//! (puts are idempotent, blob puts replace, deleting an absent blob is fine).
//!
//! The token (`UBLK_DR_RECEIVER_TOKEN` in the environment) must match the receiver's.

use crate::tls::{Stream, Transport};
use crate::wire::{self, Hello, Request, Response, Welcome};
use changelog::{TargetStore, VolumeId};
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The environment variable that holds the token a receiver asks for.
pub const TOKEN_ENV: &str = "UBLK_DR_RECEIVER_TOKEN";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole call, an 8 MiB segment included, on a slow link.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

pub struct ReceiverStore {
    /// `HOST:PORT`.
    addr: String,
    /// TLS settings for `tls://`; `None` for plain TCP.
    tls: Option<Arc<rustls::ClientConfig>>,
    token: String,
    connection: Mutex<Option<Transport>>,
}

impl ReceiverStore {
    /// A store at the receiver at `addr` (`HOST:PORT`), over TLS with `tls`. Nothing is
    /// contacted yet.
    pub fn new(addr: &str, tls: Option<Arc<rustls::ClientConfig>>) -> ReceiverStore {
        ReceiverStore {
            addr: addr.to_string(),
            tls,
            token: std::env::var(TOKEN_ENV).unwrap_or_default(),
            connection: Mutex::new(None),
        }
    }

    fn connect(&self) -> io::Result<Transport> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
        for addr in self.addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(stream) => return self.greet(stream),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn greet(&self, tcp: TcpStream) -> io::Result<Transport> {
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(CALL_TIMEOUT))?;
        tcp.set_write_timeout(Some(CALL_TIMEOUT))?;
        let stream = match &self.tls {
            Some(config) => {
                let host = self.addr.rsplit_once(':').map_or(&*self.addr, |(h, _)| h);
                Stream::client(config.clone(), host, tcp)?
            }
            None => Stream::Plain(tcp),
        };
        let mut connection = Transport::new(stream);
        let hello = Hello {
            magic: wire::MAGIC,
            version: wire::VERSION,
            token: self.token.clone(),
        };
        connection.send(&hello, &[])?;
        match wire::read_frame(connection.reader()) {
            Ok(Some((Welcome::Accepted, _))) => Ok(connection),
            Ok(Some((Welcome::Refused { reason }, _))) => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the receiver refused the connection: {reason}"),
            )),
            Ok(None) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the peer closed the connection at once: is it a ublk-dr receiver (one \
                 started with --tls-cert takes tls://)?",
            )),
            Err(e) => Err(match crate::tls::refused_by_alert(&e) {
                Some(refused) => refused,
                None if e.kind() == io::ErrorKind::InvalidData => io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("not a ublk-dr receiver ({e})"),
                ),
                None => e,
            }),
        }
    }

    /// One call: the request, then its response.
    fn call(&self, request: &Request, body: &[u8]) -> changelog::Result<(Response, Vec<u8>)> {
        let mut connection = self.connection.lock().unwrap_or_else(|p| p.into_inner());
        let mut kept = connection.is_some();
        loop {
            let outcome = match connection.as_mut() {
                Some(c) => exchange(c, request, body),
                None => self.connect().and_then(|mut c| {
                    let answer = exchange(&mut c, request, body);
                    *connection = Some(c);
                    answer
                }),
            };
            match outcome {
                Ok(answer) => return Ok(answer),
                Err(e) => {
                    *connection = None;
                    if !std::mem::take(&mut kept) {
                        return Err(self.failed(request, e));
                    }
                    log::debug!(
                        "receiver {}: kept connection failed ({e}); reconnecting",
                        self.addr
                    );
                }
            }
        }
    }

    fn failed(&self, request: &Request, e: io::Error) -> changelog::Error {
        changelog::Error::io(format!("{request} at receiver {}", self.describe()), e)
    }

    /// Any answer but the call's own, as an I/O error the caller retries: the
    /// receiver's store failed, it refused the request, or it speaks another version.
    fn unexpected(&self, request: &Request, response: Response) -> changelog::Error {
        let e = match response {
            Response::Failed { message } => {
                io::Error::other(format!("the receiver's store failed: {message}"))
            }
            Response::Invalid { message } => io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the receiver refused the request: {message}"),
            ),
            other => io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected answer {other:?}: run the same ublk-dr version on both sides"),
            ),
        };
        self.failed(request, e)
    }

    fn done(&self, request: Request, body: &[u8]) -> changelog::Result<()> {
        match self.call(&request, body)? {
            (Response::Done, _) => Ok(()),
            (other, _) => Err(self.unexpected(&request, other)),
        }
    }

    fn object(&self, request: Request) -> changelog::Result<Option<Vec<u8>>> {
        match self.call(&request, &[])? {
            (Response::Found, body) => Ok(Some(body)),
            (Response::Absent, _) => Ok(None),
            (other, _) => Err(self.unexpected(&request, other)),
        }
    }
}

fn exchange(c: &mut Transport, request: &Request, body: &[u8]) -> io::Result<(Response, Vec<u8>)> {
    c.send(request, body)?;
    wire::read_frame(c.reader())?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the receiver closed the connection",
        )
    })
}

impl TargetStore for ReceiverStore {
    fn put(&self, volume: &VolumeId, index: u64, bytes: &[u8]) -> changelog::Result<()> {
        let request = Request::Put {
            volume: volume.to_string(),
            index,
        };
        match self.call(&request, bytes)? {
            (Response::Done, _) => Ok(()),
            (Response::Conflict { segment, .. }, _) => Err(changelog::Error::Conflict {
                segment,
                store: format!("{}/{volume}", self.describe()),
            }),
            (other, _) => Err(self.unexpected(&request, other)),
        }
    }

    fn delete(&self, volume: &VolumeId, index: u64) -> changelog::Result<()> {
        let request = Request::Delete {
            volume: volume.to_string(),
            index,
        };
        self.done(request, &[])
    }

    fn get(&self, volume: &VolumeId, index: u64) -> changelog::Result<Option<Vec<u8>>> {
        self.object(Request::Get {
            volume: volume.to_string(),
            index,
        })
    }

    fn get_head(
        &self,
        volume: &VolumeId,
        index: u64,
        len: usize,
    ) -> changelog::Result<Option<Vec<u8>>> {
        self.object(Request::GetHead {
            volume: volume.to_string(),
            index,
            len: len.min(u32::MAX as usize) as u32,
        })
    }

    fn list(&self, volume: &VolumeId) -> changelog::Result<Vec<u64>> {
        let request = Request::List {
            volume: volume.to_string(),
        };
        match self.call(&request, &[])? {
            (Response::Indexes(indexes), _) => Ok(indexes),
            (other, _) => Err(self.unexpected(&request, other)),
        }
    }

    fn put_blob(&self, volume: &VolumeId, name: &str, bytes: &[u8]) -> changelog::Result<()> {
        let request = Request::PutBlob {
            volume: volume.to_string(),
            name: name.to_string(),
        };
        self.done(request, bytes)
    }

    fn get_blob(&self, volume: &VolumeId, name: &str) -> changelog::Result<Option<Vec<u8>>> {
        self.object(Request::GetBlob {
            volume: volume.to_string(),
            name: name.to_string(),
        })
    }

    fn delete_blob(&self, volume: &VolumeId, name: &str) -> changelog::Result<()> {
        let request = Request::DeleteBlob {
            volume: volume.to_string(),
            name: name.to_string(),
        };
        self.done(request, &[])
    }

    fn list_blobs(&self, volume: &VolumeId) -> changelog::Result<Vec<String>> {
        let request = Request::ListBlobs {
            volume: volume.to_string(),
        };
        match self.call(&request, &[])? {
            (Response::Names(names), _) => Ok(names),
            (other, _) => Err(self.unexpected(&request, other)),
        }
    }

    fn describe(&self) -> String {
        let scheme = if self.tls.is_some() { "tls" } else { "tcp" };
        format!("{scheme}://{}", self.addr)
    }
}
