//! Which volumes each client of a receiver may reach, by the name on its certificate
//! (`ublk-target receive --tls-client-ca CA --client-volumes FILE`): one protected host
//! then cannot overwrite, read or delete another's history, even though every host
//! reaches the same receiver.
//!
//! ```toml
//! # A protected host is known by a DNS name (or IP address) in its client certificate's
//! # subjectAltName, and may reach the volumes listed for it.
//! [clients]
//! "host-a.example.com" = ["vol0", "vol1"]
//! "host-b.example.com" = ["db0"]
//! "dr-admin.example.com" = ["*"]        # every volume
//! ```
//!
//! Contract:
//!
//! * A client is every name of the file its certificate is valid for (the certificate's
//!   subjectAltName, checked as TLS checks a server's) and may reach the volumes of all
//!   of them. A wildcard name (`*.example.com`) stands for no host: it would match
//!   every host's entry, so a name matched only through one gives nothing. A
//!   certificate valid for none of the names, or no certificate at all, is refused
//!   when it connects, saying so.
//! * Every call is about one volume ([`crate::wire::Request::volume`]); a call for a
//!   volume the client may not reach is refused before the store sees it and the
//!   connection stays, so the client's own volumes go on.
//! * The file is read when the receiver starts: restart it after a change (shippers
//!   reconnect by themselves). An entry gives `["*"]` or a list of valid volume ids,
//!   never an empty list or a mix.

use changelog::VolumeId;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// What a client entry gives: every volume (`"*"`) or the listed ones.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Grant {
    Every,
    Only(BTreeSet<String>),
}

/// The `--client-volumes` file: client names and what each may reach.
#[derive(Clone, Debug)]
pub struct ClientVolumes {
    clients: Vec<(ServerName<'static>, Grant)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    clients: BTreeMap<String, Vec<String>>,
}

impl ClientVolumes {
    /// Reads and checks the file at `path`; the error says what to fix.
    pub fn load(path: &Path) -> Result<ClientVolumes, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("client volumes file {}: {e}", path.display()))?;
        ClientVolumes::parse(&text, path)
    }

    /// Checks the text of a file read from `source`.
    pub fn parse(text: &str, source: &Path) -> Result<ClientVolumes, String> {
        let bad = |what: String| format!("client volumes file {}: {what}", source.display());
        let file: File = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if file.clients.is_empty() {
            return Err(bad(
                "[clients] names no client, so no client could reach anything: add a line \
                 \"HOST-NAME\" = [\"VOLUME\", ...] per protected host"
                    .into(),
            ));
        }
        let mut clients = Vec::new();
        for (name, volumes) in file.clients {
            let server_name = ServerName::try_from(name.clone()).map_err(|_| {
                bad(format!(
                    "client {name:?} is not a DNS name or IP address (write the name in the \
                     host's client certificate's subjectAltName)"
                ))
            })?;
            let grant = match &volumes[..] {
                [] => {
                    return Err(bad(format!(
                        "client {name} is given no volume: list its volumes, or remove the line"
                    )))
                }
                [every] if every == "*" => Grant::Every,
                _ => {
                    for volume in &volumes {
                        if volume == "*" {
                            return Err(bad(format!(
                                "client {name}: \"*\" (every volume) goes alone, not in a list"
                            )));
                        }
                        VolumeId::new(volume).map_err(|e| bad(format!("client {name}: {e}")))?;
                    }
                    Grant::Only(volumes.into_iter().collect())
                }
            };
            clients.push((server_name, grant));
        }
        Ok(ClientVolumes { clients })
    }

    /// What the holder of `certificate` may reach; the error, for the client, is why
    /// it is refused.
    pub fn access(&self, certificate: Option<&CertificateDer>) -> Result<Access, String> {
        let certificate = certificate.ok_or_else(|| {
            "this receiver gives each client its own volumes by the name on its \
             certificate, and this client has none: connect over tls:// with a client \
             certificate"
                .to_string()
        })?;
        let end_entity = webpki::EndEntityCert::try_from(certificate)
            .map_err(|e| format!("the client's certificate does not parse: {e}"))?;
        let mut access = Access {
            names: Vec::new(),
            every: false,
            volumes: BTreeSet::new(),
        };
        let valid_for =
            |name: &ServerName| end_entity.verify_is_valid_for_subject_name(name).is_ok();
        for (name, grant) in &self.clients {
            if !valid_for(name) || by_wildcard(name).is_some_and(|probe| valid_for(&probe)) {
                continue;
            }
            access.names.push(name.to_str().into_owned());
            match grant {
                Grant::Every => access.every = true,
                Grant::Only(volumes) => access.volumes.extend(volumes.iter().cloned()),
            }
        }
        if access.names.is_empty() {
            return Err(
                "the client's certificate names none of the clients in the receiver's \
                 --client-volumes file (a wildcard name counts for none): add its own DNS \
                 name or IP address there, with the volumes it may reach, and restart the \
                 receiver"
                    .into(),
            );
        }
        Ok(access)
    }
}

/// A name that no host has, in the domain of DNS name `name` (`host-a.example.com` ->
/// `ublk-dr-wildcard-probe.example.com`): a certificate valid for both matched
/// `name` through a wildcard.
fn by_wildcard(name: &ServerName) -> Option<ServerName<'static>> {
    let ServerName::DnsName(dns) = name else {
        return None;
    };
    let (_, parent) = dns.as_ref().split_once('.')?;
    ServerName::try_from(format!("ublk-dr-wildcard-probe.{parent}")).ok()
}

/// What one connected client may reach.
#[derive(Clone, Debug)]
pub struct Access {
    /// The names of the file its certificate is valid for.
    names: Vec<String>,
    every: bool,
    volumes: BTreeSet<String>,
}

impl Access {
    /// Who the client is, for logs: its names in the file.
    pub fn who(&self) -> String {
        self.names.join(", ")
    }

    /// Why a call about `volume` is refused, if it is.
    pub fn refusal(&self, volume: &str) -> Option<String> {
        if self.every || self.volumes.contains(volume) {
            return None;
        }
        let allowed = if self.volumes.is_empty() {
            "none".to_string()
        } else {
            self.volumes.iter().cloned().collect::<Vec<_>>().join(", ")
        };
        Some(format!(
            "client {} may not reach volume {volume} (the receiver's client volumes file \
             gives it: {allowed}); add {volume} to its line there if it should",
            self.who()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ClientVolumes, String> {
        ClientVolumes::parse(text, Path::new("clients.toml"))
    }

    #[test]
    fn a_file_names_clients_and_their_volumes() {
        let clients = parse(
            "[clients]\n\"host-a.example.com\" = [\"vol0\", \"vol1\"]\n\
             \"10.0.0.7\" = [\"db0\"]\n\"admin.example.com\" = [\"*\"]\n",
        )
        .unwrap();
        assert_eq!(clients.clients.len(), 3);
        let grant = |name: &str| {
            clients
                .clients
                .iter()
                .find(|(n, _)| n.to_str() == name)
                .map(|(_, g)| g.clone())
                .unwrap()
        };
        assert_eq!(grant("admin.example.com"), Grant::Every);
        assert!(matches!(
            clients
                .clients
                .iter()
                .find(|(n, _)| n.to_str() == "10.0.0.7"),
            Some((ServerName::IpAddress(_), _))
        ));
        assert_eq!(
            grant("host-a.example.com"),
            Grant::Only(["vol0".to_string(), "vol1".to_string()].into())
        );
    }

    #[test]
    fn a_bad_file_says_what_to_fix() {
        for (text, says) in [
            ("[clients]\n", "names no client"),
            ("[clients]\n\"host a\" = [\"vol0\"]\n", "not a DNS name"),
            ("[clients]\n\"host-a\" = [\"../vol0\"]\n", "client host-a"),
            ("[clients]\n\"host-a\" = \"vol0\"\n", "invalid type"),
            ("[clients]\n\"host-a\" = []\n", "given no volume"),
            ("[clients]\n\"host-a\" = [\"*\", \"../x\"]\n", "goes alone"),
            ("[client]\n\"host-a\" = [\"vol0\"]\n", "unknown field"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(
                e.contains(says) && e.contains("clients.toml"),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn access_refuses_other_volumes_and_names_the_client() {
        let access = Access {
            names: vec!["host-a".into()],
            every: false,
            volumes: ["vol0".to_string()].into(),
        };
        assert_eq!(access.refusal("vol0"), None);
        let e = access.refusal("vol1").unwrap();
        assert!(
            e.contains("client host-a may not reach volume vol1") && e.contains("gives it: vol0"),
            "{e}"
        );
        let admin = Access {
            every: true,
            ..access
        };
        assert_eq!(admin.refusal("anything"), None);
        let clients = parse("[clients]\n\"host-a\" = [\"vol0\"]\n").unwrap();
        assert!(clients.access(None).unwrap_err().contains("has none"));
    }
}
