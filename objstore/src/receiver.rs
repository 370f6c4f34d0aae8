//! The network receiver: the recovery site's end of a `tcp://` or `tls://` store. Shippers on
//! many protected hosts upload into one directory store here, which `ublk-target
//! apply --store DIR` applies from (the process-server role of the design).
//!
//! Contract:
//!
//! * Every call is carried out on a [`LocalDirStore`] over `root` and answered only
//!   after it returned, so a put that was answered `Done` is durable and a conflicting
//!   put is refused exactly as on the directory itself.
//! * A connection must open with a [`Hello`] of this protocol version carrying the
//!   token (when one is set); anything else is refused and closed before any store
//!   call. Names are checked by the store (volume ids, blob names), so a client cannot
//!   reach outside `root`.
//! * A client that misbehaves (a frame over the limits, an undecodable message, a
//!   dropped connection) loses its connection and nothing else: what was stored stays,
//!   a half-received segment was never handed to the store.
//! * At most [`MAX_CONNECTIONS`] are served at once; more are refused with a reason.
//! * With TLS settings ([`crate::tls`]) every connection must be TLS: a plain client's
//!   Hello is answered, in plain, with a refusal that says to use `tls://`. Without
//!   them a TLS client is turned away at its first byte (and its handshake fails).
//! * With [`ClientVolumes`] ([`Admission::clients`]) a client reaches only the
//!   volumes listed for the names its certificate is valid for: one without such a
//!   certificate is refused at its Hello, and a call about another volume is refused
//!   ([`Response::Invalid`]) before the store sees it.
//! * The [`Admission`] (token, TLS, client volumes) can be replaced while the receiver
//!   serves ([`AdmissionSwitch::replace`], `ublk-target receive` on SIGHUP). New
//!   connections get the new one; each open connection is checked against it before
//!   its next call — token, TLS or not, certificate (a revocation list now naming it),
//!   volumes — and, if refused, gets the reason as the answer to that call and is
//!   closed. A connection still admitted goes on untouched.

use crate::clients::{Access, ClientVolumes};
use crate::tls::{starts_tls, ServerTls, Stream, Transport};
use crate::wire::{self, Hello, Request, Response, Welcome};
use crate::Error;
use changelog::{LocalDirStore, TargetStore, VolumeId};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub const MAX_CONNECTIONS: usize = 256;
/// A connection with no call for this long is closed (clients reconnect on their
/// next call), so peers that vanished without a FIN do not hold threads forever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Who a receiver lets in and what each client may reach.
pub struct Admission {
    /// The token every Hello must carry; empty: any client that reaches the port.
    pub token: String,
    /// Serve TLS only, with these settings (and client certificates, if they ask).
    pub tls: Option<ServerTls>,
    /// Give each client certificate only its own volumes.
    pub clients: Option<ClientVolumes>,
}

/// The receiver's [`Admission`], replaceable while it serves.
pub struct AdmissionSwitch {
    current: RwLock<Arc<Admission>>,
    /// Bumped after each replacement: connections compare it before each call.
    generation: AtomicU64,
}

impl AdmissionSwitch {
    /// Takes up `admission` for new connections, and for open ones from their next
    /// call.
    pub fn replace(&self, admission: Admission) {
        *self.current.write().expect("admission lock") = Arc::new(admission);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The generation and the admission of at least that generation.
    fn current(&self) -> (u64, Arc<Admission>) {
        let generation = self.generation.load(Ordering::Acquire);
        let admission = self.current.read().expect("admission lock").clone();
        (generation, admission)
    }
}

pub struct Receiver {
    listener: TcpListener,
    /// Where `listener` is bound (the port the system chose for port 0).
    local_addr: SocketAddr,
    root: PathBuf,
    admission: Arc<AdmissionSwitch>,
}

impl Receiver {
    /// Listens on `addr` for clients of the store directory `root`, which must exist,
    /// letting in those `admission` admits.
    pub fn bind(addr: &str, root: &Path, admission: Admission) -> Result<Receiver, Error> {
        if !root.is_dir() {
            return Err(Error::NoStoreDir(root.to_path_buf()));
        }
        let listening = |source| Error::Listen {
            addr: addr.to_string(),
            source,
        };
        let listener = TcpListener::bind(addr).map_err(listening)?;
        Ok(Receiver {
            local_addr: listener.local_addr().map_err(listening)?,
            listener,
            root: root.to_path_buf(),
            admission: Arc::new(AdmissionSwitch {
                current: RwLock::new(Arc::new(admission)),
                generation: AtomicU64::new(0),
            }),
        })
    }

    /// The switch through which the admission is replaced while serving.
    pub fn admission(&self) -> Arc<AdmissionSwitch> {
        self.admission.clone()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves clients until accepting fails; each connection on its own thread.
    pub fn serve(self) -> Result<(), Error> {
        let shared = Arc::new(Shared {
            store: LocalDirStore::new(&self.root),
            admission: self.admission,
            active: AtomicUsize::new(0),
        });
        loop {
            let (stream, peer) = match self.listener.accept() {
                Ok(accepted) => accepted,
                // The client gave up between SYN and accept, or descriptors ran out
                // for a moment: not a reason to stop serving the others.
                Err(e) if is_transient(&e) => {
                    log::warn!("receiver: accepting a connection failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Err(source) => {
                    return Err(Error::Listen {
                        addr: self.local_addr.to_string(),
                        source,
                    })
                }
            };
            let shared = shared.clone();
            let slot = Slot::take(&shared);
            std::thread::spawn(move || {
                match serve_connection(&shared, stream, slot.is_some()) {
                    Ok(()) => log::debug!("receiver: {peer} closed its connection"),
                    Err(e) => log::warn!("receiver: connection from {peer} ended: {e}"),
                }
                drop(slot);
            });
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

struct Shared {
    store: LocalDirStore,
    admission: Arc<AdmissionSwitch>,
    active: AtomicUsize,
}

/// One of the [`MAX_CONNECTIONS`] places, given back on drop.
struct Slot(Arc<Shared>);

impl Slot {
    fn take(shared: &Arc<Shared>) -> Option<Slot> {
        let before = shared.active.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(shared.clone());
        (before < MAX_CONNECTIONS).then_some(slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

fn serve_connection(shared: &Shared, tcp: TcpStream, has_slot: bool) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let peer = tcp.peer_addr()?;
    let Some(first) = peek_start(&tcp)? else {
        return Ok(());
    };
    let tls_client = starts_tls(&first);
    let (mut generation, admission) = shared.admission.current();
    let stream =
        match (&admission.tls, tls_client) {
            (Some(tls), true) => Stream::server(tls.config.clone(), tcp)?,
            (None, true) => return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a TLS client, but this receiver has no --tls-cert (the client must use tcp://)",
            )),
            (_, false) => Stream::Plain(tcp),
        };
    let mut connection = Transport::new(stream);
    let Some((hello, _)) = wire::read_frame::<Hello>(connection.reader())? else {
        return Ok(());
    };
    let admitted = match refusal(&admission, &hello, tls_client, has_slot) {
        Some(reason) => Err(reason),
        None => access(&admission, &connection),
    };
    let mut access = match admitted {
        Ok(access) => access,
        Err(reason) => {
            log::warn!("receiver: refused {peer}: {reason}");
            return connection.send(&Welcome::Refused { reason }, &[]);
        }
    };
    connection.send(&Welcome::Accepted, &[])?;
    match &access {
        Some(access) => log::info!("receiver: {peer} connected as {}", access.who()),
        None => log::info!("receiver: {peer} connected"),
    }
    // Volumes refused on this connection: a client retrying logs a warning once.
    let mut refused_volumes = std::collections::BTreeSet::new();
    while let Some((request, body)) = wire::read_frame::<Request>(connection.reader())? {
        let (now, admission) = shared.admission.current();
        if now != generation {
            generation = now;
            match still_admitted(&admission, &hello, tls_client, &connection) {
                Ok(renewed) => access = renewed,
                Err(reason) => {
                    log::warn!(
                        "receiver: closing the connection of {peer}: the receiver's new \
                         settings refuse it: {reason}"
                    );
                    let message = format!(
                        "the receiver's settings changed and refuse this client now: {reason}"
                    );
                    return connection.send(&Response::Invalid { message }, &[]);
                }
            }
        }
        let refused = access.as_ref().and_then(|a| a.refusal(request.volume()));
        let (response, found) = match refused {
            Some(message) => {
                if refused_volumes.insert(request.volume().to_string()) {
                    log::warn!("receiver: refused {request} from {peer}: {message}");
                } else {
                    log::debug!("receiver: refused {request} from {peer} again");
                }
                (Response::Invalid { message }, None)
            }
            None => handle(&shared.store, request, &body),
        };
        connection.send(&response, found.as_deref().unwrap_or(&[]))?;
    }
    Ok(())
}

/// What the client on `connection` may reach under `admission`'s client volumes
/// (`None`: everything).
fn access(admission: &Admission, connection: &Transport) -> Result<Option<Access>, String> {
    let certificate = connection.peer_certificates().and_then(|c| c.first());
    admission
        .clients
        .as_ref()
        .map(|clients| clients.access(certificate))
        .transpose()
}

/// Whether a connection admitted under earlier settings, with `hello`, over TLS or not
/// (`over_tls`), is still admitted under `admission`, and what it may reach then.
fn still_admitted(
    admission: &Admission,
    hello: &Hello,
    over_tls: bool,
    connection: &Transport,
) -> Result<Option<Access>, String> {
    if let Some(reason) = refusal(admission, hello, over_tls, true) {
        return Err(reason);
    }
    match (&admission.tls, over_tls) {
        (Some(tls), true) => tls.accepts_client(connection.peer_certificates())?,
        (None, true) => return Err("this receiver serves plain TCP now: use tcp://".into()),
        (_, false) => {}
    }
    access(admission, connection)
}

/// The connection's first three bytes, left unread; `None` when the peer closed first.
fn peek_start(tcp: &TcpStream) -> io::Result<Option<[u8; 3]>> {
    let mut first = [0u8; 3];
    for _ in 0..100 {
        match tcp.peek(&mut first)? {
            0 => return Ok(None),
            3 => return Ok(Some(first)),
            // Fewer bytes arrived so far: the rest is on its way.
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "the client sent less than 3 bytes in a second",
    ))
}

/// Why `hello`, which came over TLS or not (`over_tls`), is refused, if it is.
fn refusal(admission: &Admission, hello: &Hello, over_tls: bool, has_slot: bool) -> Option<String> {
    if admission.tls.is_some() && !over_tls {
        Some(format!(
            "this receiver takes TLS only: use tls://HOST:PORT, with the receiver's CA \
             certificate in {}",
            crate::tls::CA_ENV
        ))
    } else if hello.magic != wire::MAGIC {
        Some("not a ublk-dr client".into())
    } else if hello.version != wire::VERSION {
        Some(format!(
            "the client speaks protocol version {}, this receiver {}: run the same ublk-dr \
             version on both sides",
            hello.version,
            wire::VERSION
        ))
    } else if !tokens_match(&hello.token, &admission.token) {
        Some(format!(
            "wrong or missing token: set {} on the client to the receiver's token",
            crate::remote::TOKEN_ENV
        ))
    } else if !has_slot {
        Some(format!(
            "busy: {MAX_CONNECTIONS} connections are open; try again later"
        ))
    } else {
        None
    }
}

/// Compares without stopping at the first difference, so the time taken does not tell
/// how much of a guess was right.
fn tokens_match(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Carries out one call; the bytes of a found object go in the response's body.
fn handle(store: &LocalDirStore, request: Request, body: &[u8]) -> (Response, Option<Vec<u8>>) {
    let volume = match VolumeId::new(request.volume()) {
        Ok(volume) => volume,
        Err(e) => {
            let message = e.to_string();
            return (Response::Invalid { message }, None);
        }
    };
    let done = |()| (Response::Done, None);
    let result = match request {
        Request::Put { index, .. } => store.put(&volume, index, body).map(done),
        Request::Get { index, .. } => store.get(&volume, index).map(found),
        Request::List { .. } => store.list(&volume).map(|i| (Response::Indexes(i), None)),
        Request::PutBlob { name, .. } => store.put_blob(&volume, &name, body).map(done),
        Request::GetBlob { name, .. } => store.get_blob(&volume, &name).map(found),
        Request::DeleteBlob { name, .. } => store.delete_blob(&volume, &name).map(done),
        Request::Delete { index, .. } => store.delete(&volume, index).map(done),
        Request::GetHead { index, len, .. } => {
            store.get_head(&volume, index, len as usize).map(found)
        }
        Request::ListBlobs { .. } => store
            .list_blobs(&volume)
            .map(|n| (Response::Names(n), None)),
    };
    result.unwrap_or_else(|e| (failure(e), None))
}

fn found(object: Option<Vec<u8>>) -> (Response, Option<Vec<u8>>) {
    match object {
        Some(bytes) => (Response::Found, Some(bytes)),
        None => (Response::Absent, None),
    }
}

/// A store error as the client should see it: a conflict, a request that can never
/// succeed (a bad blob name), or a failure worth retrying.
fn failure(e: changelog::Error) -> Response {
    match e {
        changelog::Error::Conflict { segment, store } => Response::Conflict { segment, store },
        changelog::Error::Io { context, source }
            if source.kind() == io::ErrorKind::InvalidInput =>
        {
            Response::Invalid {
                message: format!("{context}: {source}"),
            }
        }
        e => Response::Failed {
            message: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(tokens_match("", ""));
        assert!(tokens_match("s3cret", "s3cret"));
        assert!(!tokens_match("s3cret", "s3cre"));
        assert!(!tokens_match("s3creT", "s3cret"));
        assert!(!tokens_match("", "s3cret"));
    }

    #[test]
    fn names_are_checked_before_the_store_sees_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::new(dir.path());
        let put = |volume: &str| Request::Put {
            volume: volume.into(),
            index: 0,
        };
        for volume in ["../escape", "", "a/b"] {
            let (response, _) = handle(&store, put(volume), b"x");
            assert!(
                matches!(response, Response::Invalid { .. }),
                "{volume}: {response:?}"
            );
        }
        let blob = Request::PutBlob {
            volume: "vol0".into(),
            name: "../../etc/passwd".into(),
        };
        assert!(matches!(
            handle(&store, blob, b"x").0,
            Response::Invalid { .. }
        ));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing written"
        );
        assert!(matches!(
            handle(&store, put("vol0"), b"x").0,
            Response::Done
        ));
        assert!(matches!(
            handle(&store, put("vol0"), b"y").0,
            Response::Conflict { .. }
        ));
    }
}
