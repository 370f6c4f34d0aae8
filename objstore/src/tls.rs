//! TLS for the receiver protocol: `tls://HOST:PORT` on the client, `ublk-target receive
//! --tls-cert CERT --tls-key KEY` on the receiver (rustls, its `ring` provider, TLS 1.2
//! and 1.3).
//!
//! Segments are encrypted and authenticated end to end whatever the transport, so TLS
//! is not what keeps history safe. It keeps two other things: the token, which plain
//! TCP carries in clear, and the answers. Over plain TCP anything on the path can
//! answer "stored" for a segment it drops, and the shipper then frees the ring records
//! behind it; over TLS only the holder of a key whose certificate chains to the CA in
//! [`CA_ENV`] can, and its name must be the HOST the client connects to.
//!
//! With `--tls-client-ca`, the receiver also asks every client for a certificate that
//! chains to that CA ([`CLIENT_CERT_ENV`], [`CLIENT_KEY_ENV`]): each protected host then
//! holds a credential of its own instead of sharing one token.
//!
//! [`Stream`] is what the protocol runs over: plain TCP or either end of TLS. A
//! [`Transport`] is a connection's stream with a read buffer; frames are written
//! through it ([`Transport::send`]) and read from it ([`Transport::reader`]).

use crate::wire;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use serde::Serialize;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

/// The environment variable naming the PEM file of the CA certificate(s) a
/// `tls://` client trusts for the receiver.
pub const CA_ENV: &str = "UBLK_DR_RECEIVER_CA";
/// The client's own certificate (chain) and key, PEM files, for a receiver that asks
/// for one (`--tls-client-ca`).
pub const CLIENT_CERT_ENV: &str = "UBLK_DR_RECEIVER_CLIENT_CERT";
pub const CLIENT_KEY_ENV: &str = "UBLK_DR_RECEIVER_CLIENT_KEY";

/// Whether a connection's first bytes start a TLS handshake record (type 0x16, version
/// 3.x): how a receiver tells a TLS client from a plain one before reading anything. A
/// plain client's first bytes are its Hello's head length, little-endian; one that
/// began 0x16 0x03 0x01..=0x04 would be over [`wire::MAX_HEAD`].
pub(crate) fn starts_tls(first: &[u8; 3]) -> bool {
    matches!(first, [0x16, 0x03, 0x01..=0x04])
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Who a receiver serves over TLS: with `ca`, only clients presenting a certificate
/// that chains to a CA in that PEM file (mutual TLS), and none whose certificate a
/// revocation list in the PEM file `crl` names.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientAuth<'a> {
    pub ca: Option<&'a Path>,
    pub crl: Option<&'a Path>,
}

/// A receiver's TLS: the rustls settings, and the check of client certificates they
/// use, kept to check connected clients again when the settings are replaced.
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
}

impl ServerTls {
    /// Whether a new client presenting `chain` (its certificate, then intermediates;
    /// `None`: none) would be let in now; the error says why not.
    pub(crate) fn accepts_client(
        &self,
        chain: Option<&[CertificateDer<'static>]>,
    ) -> Result<(), String> {
        let Some(verifier) = &self.client_verifier else {
            return Ok(());
        };
        let Some((end_entity, intermediates)) = chain.and_then(|c| c.split_first()) else {
            return Err(
                "this receiver now wants a client certificate, and this client \
                        connected without one"
                    .into(),
            );
        };
        verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked) => {
                    "its certificate was revoked (the receiver's --tls-client-crl lists it): \
                     issue it a new one"
                        .to_string()
                }
                e => format!("its certificate is not accepted any more: {e}"),
            })
    }
}

/// The receiver's TLS settings from its certificate chain and key (PEM files) and
/// [`ClientAuth`].
pub fn server_config(cert: &Path, key: &Path, clients: ClientAuth) -> Result<ServerTls, String> {
    let (chain, key) = identity(cert, key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let (builder, client_verifier) = match clients.ca {
        Some(ca) => {
            let roots = Arc::new(roots(ca, "--tls-client-ca")?);
            let mut verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider());
            if let Some(crl) = clients.crl {
                verifier = verifier
                    .with_crls(revocation_lists(crl)?)
                    .only_check_end_entity_revocation();
            }
            let verifier = verifier
                .build()
                .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
            (
                builder.with_client_cert_verifier(verifier.clone()),
                Some(verifier),
            )
        }
        None if clients.crl.is_some() => {
            return Err("a revocation list needs the client CA it is for (--tls-client-ca)".into())
        }
        None => (builder.with_no_client_auth(), None),
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "certificate {} and key do not make a TLS identity: {e}",
            cert.display()
        )
    })?;
    Ok(ServerTls {
        config: Arc::new(config),
        client_verifier,
    })
}

/// A client's TLS settings from the environment: trust the CA certificate(s) in the
/// PEM file [`CA_ENV`] names, and present the certificate and key [`CLIENT_CERT_ENV`]
/// and [`CLIENT_KEY_ENV`] name, if set (for a receiver with `--tls-client-ca`).
pub fn client_config_from_env() -> Result<Arc<ClientConfig>, String> {
    let Some(ca) = std::env::var_os(CA_ENV) else {
        return Err(format!(
            "{CA_ENV} is not set: point it at the PEM file of the CA that signed the \
             receiver's certificate"
        ));
    };
    let cert = std::env::var_os(CLIENT_CERT_ENV);
    let key = std::env::var_os(CLIENT_KEY_ENV);
    let identity = match (&cert, &key) {
        (Some(cert), Some(key)) => Some((Path::new(cert), Path::new(key))),
        (None, None) => None,
        _ => {
            return Err(format!(
                "set both {CLIENT_CERT_ENV} and {CLIENT_KEY_ENV} (the client's certificate \
                 and its key), or neither"
            ))
        }
    };
    client_config(Path::new(&ca), identity)
}

/// A client's TLS settings trusting the CA certificate(s) in the PEM file `ca`,
/// presenting `identity` (certificate and key PEM files) when asked.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(ca, CA_ENV)?);
    let config = match identity {
        Some((cert, key)) => {
            let (chain, key) = self::identity(cert, key)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                format!(
                    "client certificate {} and key do not make a TLS identity: {e}",
                    cert.display()
                )
            })?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A certificate chain and its private key, from PEM files.
fn identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain = pem_all(cert, "certificate", "BEGIN CERTIFICATE")?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "reading the private key {}: {e} (PEM, PKCS#8, RSA or EC)",
            key.display()
        )
    })?;
    Ok((chain, key))
}

/// The certificate revocation lists in the PEM file `crl`.
fn revocation_lists(
    crl: &Path,
) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>, String> {
    pem_all(crl, "revocation list", "BEGIN X509 CRL")
}

/// The CA certificates in the PEM file `ca` (given as `what`).
fn roots(ca: &Path, what: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let what = format!("CA certificate ({what})");
    for cert in pem_all(ca, &what, "BEGIN CERTIFICATE")? {
        roots
            .add(cert)
            .map_err(|e| format!("CA certificate in {}: {e}", ca.display()))?;
    }
    Ok(roots)
}

/// Every object of one kind in the PEM file `path` (`what` it holds, its `marker`), at
/// least one.
fn pem_all<T: PemObject>(path: &Path, what: &str, marker: &str) -> Result<Vec<T>, String> {
    let all = T::pem_file_iter(path)
        .and_then(|items| items.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("reading the {what} {}: {e}", path.display()))?;
    if all.is_empty() {
        return Err(format!(
            "{} holds no {what} (PEM \"{marker}\")",
            path.display()
        ));
    }
    Ok(all)
}

/// A connection's byte stream.
pub(crate) enum Stream {
    Plain(TcpStream),
    Client(Box<rustls::StreamOwned<ClientConnection, TcpStream>>),
    Server(Box<rustls::StreamOwned<ServerConnection, TcpStream>>),
}

impl Stream {
    /// TLS to `host` (the name its certificate must carry) over `tcp`, with the
    /// handshake done, so certificate trouble is reported as such.
    pub(crate) fn client(
        config: Arc<ClientConfig>,
        host: &str,
        mut tcp: TcpStream,
    ) -> io::Result<Stream> {
        let mut tls =
            ClientConnection::new(config, server_name(host)?).map_err(io::Error::other)?;
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp).map_err(|e| {
                let hint = handshake_hint(&e, host);
                io::Error::new(e.kind(), format!("TLS handshake failed: {e}{hint}"))
            })?;
        }
        Ok(Stream::Client(Box::new(rustls::StreamOwned::new(tls, tcp))))
    }

    /// The receiver's end of TLS over `tcp`, with the handshake done.
    pub(crate) fn server(config: Arc<ServerConfig>, mut tcp: TcpStream) -> io::Result<Stream> {
        let mut tls = ServerConnection::new(config).map_err(io::Error::other)?;
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp)
                .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake failed: {e}")))?;
        }
        Ok(Stream::Server(Box::new(rustls::StreamOwned::new(tls, tcp))))
    }

    /// The certificate the client presented, then its intermediates, on the
    /// receiver's end of TLS.
    fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        match self {
            Stream::Server(s) => s.conn.peer_certificates(),
            Stream::Plain(_) | Stream::Client(_) => None,
        }
    }
}

impl Drop for Stream {
    /// Ends a client's TLS session properly, so the receiver sees a clean close.
    fn drop(&mut self) {
        if let Stream::Client(s) = self {
            s.conn.send_close_notify();
            // Write it out; never wait for an answer.
            while s.conn.wants_write() {
                if s.conn.write_tls(&mut s.sock).is_err() {
                    break;
                }
            }
        }
    }
}

/// The name a receiver's certificate must carry, from the HOST of `HOST:PORT` (an
/// IPv6 address in brackets, an IPv4 address or a DNS name).
fn server_name(host: &str) -> io::Result<ServerName<'static>> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(bare)
        .map(|name| name.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host:?}: {e}")))
}

/// What a failed handshake most likely means, for the user.
fn handshake_hint(e: &io::Error, host: &str) -> String {
    use rustls::CertificateError as C;
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => format!(
            " (the receiver's certificate is not signed by a CA in {CA_ENV}: point it at the \
             CA that signed it)"
        ),
        Some(rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        )) => format!(
            " (the receiver's certificate does not name {host}: connect by a name it carries, \
             or give it a certificate whose subjectAltName has {host})"
        ),
        Some(rustls::Error::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        )) => " (the receiver's certificate is outside its validity period: renew it, or \
               check both clocks)"
            .into(),
        Some(rustls::Error::AlertReceived(alert)) => {
            client_certificate_hint(*alert).unwrap_or_default()
        }
        Some(_) => String::new(),
        // No TLS answer at all: the peer closed, reset, or spoke something else.
        None => " (is the receiver started with --tls-cert? A plain one takes tcp://)".into(),
    }
}

/// What an alert from the receiver about this client's certificate means, or `None`
/// for an alert about something else.
fn client_certificate_hint(alert: rustls::AlertDescription) -> Option<String> {
    use rustls::AlertDescription as A;
    let what = match alert {
        A::CertificateRequired => format!(
            "the receiver wants a client certificate: set {CLIENT_CERT_ENV} and \
             {CLIENT_KEY_ENV} to one its --tls-client-ca signed"
        ),
        A::UnknownCA | A::BadCertificate | A::DecryptError => format!(
            "the receiver does not accept this client's certificate ({CLIENT_CERT_ENV}): \
             it must be signed by the CA the receiver's --tls-client-ca names"
        ),
        A::CertificateRevoked => "this client's certificate was revoked (the receiver's \
                                  --tls-client-crl lists it): issue it a new one"
            .into(),
        A::CertificateExpired => "this client's certificate is outside its validity period: \
                                  renew it, or check both clocks"
            .into(),
        A::UnsupportedCertificate => "this client's certificate may not be used by a client: \
                                      it needs extendedKeyUsage=clientAuth"
            .into(),
        _ => return None,
    };
    Some(format!(" ({what})"))
}

/// An error that is the receiver refusing this client's certificate in the TLS layer
/// after the handshake (TLS 1.3 checks it then), with what to do; `None` for any other
/// error.
pub(crate) fn refused_by_alert(e: &io::Error) -> Option<io::Error> {
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    let rustls::Error::AlertReceived(alert) = inner else {
        return None;
    };
    let hint = client_certificate_hint(*alert)?;
    Some(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("the receiver ended TLS: {inner}{hint}"),
    ))
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Client(s) => s.read(buf),
            Stream::Server(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Client(s) => s.write(buf),
            Stream::Server(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Client(s) => s.flush(),
            Stream::Server(s) => s.flush(),
        }
    }
}

/// A connection: its stream with a read buffer.
pub(crate) struct Transport {
    reader: BufReader<Stream>,
}

impl Transport {
    pub(crate) fn new(stream: Stream) -> Transport {
        Transport {
            reader: BufReader::new(stream),
        }
    }

    /// Where frames are read from.
    pub(crate) fn reader(&mut self) -> &mut BufReader<Stream> {
        &mut self.reader
    }

    /// The client's certificate, then its intermediates, on the receiver's end of TLS
    /// with client certificates.
    pub(crate) fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.reader.get_ref().peer_certificates()
    }

    /// Writes one frame (buffered, so a small frame leaves in one packet or record).
    pub(crate) fn send<T: Serialize>(&mut self, head: &T, body: &[u8]) -> io::Result<()> {
        let mut writer = BufWriter::new(self.reader.get_mut());
        wire::write_frame(&mut writer, head, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_hello_never_looks_like_tls() {
        // A ClientHello's record header.
        assert!(starts_tls(&[0x16, 0x03, 0x01]));
        for token_len in 1..=wire::MAX_HEAD as usize {
            // Every head length a Hello could have (its exact encoding aside).
            let head_len = token_len as u32;
            if head_len > wire::MAX_HEAD {
                break;
            }
            let first = head_len.to_le_bytes();
            assert!(!starts_tls(&[first[0], first[1], first[2]]), "{head_len}");
        }
    }
}

#[cfg(test)]
mod name_tests {
    use super::*;

    #[test]
    fn the_server_name_is_the_host_without_brackets() {
        assert!(matches!(server_name("[::1]"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(
            server_name("127.0.0.1"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(server_name("dr-site"), Ok(ServerName::DnsName(_))));
        assert!(server_name("not a name").is_err());
    }
}
