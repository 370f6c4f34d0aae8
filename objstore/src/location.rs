//! Where a target store is, as users write it: a directory path (the embedded default)
//! or an object-storage URL.
//!
//! | written as | store |
//! |---|---|
//! | `/srv/dr-store`, `store`, `file:///srv/dr-store` | a local or mounted directory ([`changelog::LocalDirStore`]) |
//! | `az://CONTAINER[/PREFIX]`, `azure://…` | Azure Blob Storage |
//! | `s3://BUCKET[/PREFIX]` | S3 or an S3-compatible store |
//! | `tcp://HOST:PORT` | a network receiver (`ublk-target receive`) |
//! | `tls://HOST:PORT` | a network receiver over TLS (`ublk-target receive --tls-cert`) |
//!
//! Anything else with a `://` is refused rather than taken for a directory name, so a
//! typo in a scheme cannot ship a volume into `./http:/…`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The object-storage services a URL can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Azure,
    S3,
}

/// A parsed store location.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum StoreLocation {
    Dir(PathBuf),
    Object {
        service: Service,
        /// The container (Azure) or bucket (S3).
        bucket: String,
        /// The path inside it under which volumes live, without slashes at either
        /// end; empty for the top level.
        prefix: String,
    },
    /// A network receiver at `addr`, `HOST:PORT` (where volumes go is the receiver's
    /// choice, so there is no path), over TLS or plain TCP.
    Receiver {
        addr: String,
        tls: bool,
    },
}

impl StoreLocation {
    /// The directory, for a local store.
    pub fn dir(&self) -> Option<&std::path::Path> {
        match self {
            StoreLocation::Dir(dir) => Some(dir),
            StoreLocation::Object { .. } | StoreLocation::Receiver { .. } => None,
        }
    }
}

impl FromStr for StoreLocation {
    type Err = String;

    fn from_str(s: &str) -> Result<StoreLocation, String> {
        let Some((scheme, rest)) = s.split_once("://") else {
            if s.is_empty() {
                return Err("the store location is empty".into());
            }
            return Ok(StoreLocation::Dir(s.into()));
        };
        let service = match scheme {
            "file" if rest.starts_with('/') => return Ok(StoreLocation::Dir(rest.into())),
            "file" => return Err(format!("{s:?}: a file:// location needs an absolute path")),
            "az" | "azure" => Service::Azure,
            "s3" => Service::S3,
            "tcp" => return parse_receiver(s, rest, false),
            "tls" => return parse_receiver(s, rest, true),
            _ => {
                return Err(format!(
                    "{s:?}: unsupported store scheme {scheme:?}; use a directory path, \
                     az://CONTAINER/PREFIX (Azure Blob), s3://BUCKET/PREFIX, \
                     tcp://HOST:PORT or tls://HOST:PORT (a receiver)"
                ))
            }
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!(
                "{s:?}: no {} name after {scheme}://",
                match service {
                    Service::Azure => "container",
                    Service::S3 => "bucket",
                }
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|part| part == "." || part == "..") {
            return Err(format!("{s:?}: the path in the store may not hold . or .."));
        }
        Ok(StoreLocation::Object {
            service,
            bucket: bucket.into(),
            prefix: prefix.into(),
        })
    }
}

/// `HOST:PORT`, an optional trailing slash, nothing more.
fn parse_receiver(s: &str, rest: &str, tls: bool) -> Result<StoreLocation, String> {
    let scheme = if tls { "tls" } else { "tcp" };
    let addr = rest.strip_suffix('/').unwrap_or(rest);
    if addr.contains('/') {
        return Err(format!(
            "{s:?}: a receiver is {scheme}://HOST:PORT without a path (the receiver's \
             --store decides where volumes go)"
        ));
    }
    let port = addr
        .rsplit_once(':')
        .map(|(host, port)| (host, port.parse::<u16>()));
    match port {
        Some((host, Ok(port))) if !host.is_empty() && port != 0 => Ok(StoreLocation::Receiver {
            addr: addr.into(),
            tls,
        }),
        _ => Err(format!(
            "{s:?}: a receiver is {scheme}://HOST:PORT, with a port number"
        )),
    }
}

impl TryFrom<String> for StoreLocation {
    type Error = String;

    fn try_from(s: String) -> Result<StoreLocation, String> {
        s.parse()
    }
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Dir(dir) => write!(f, "{}", dir.display()),
            StoreLocation::Object {
                service,
                bucket,
                prefix,
            } => {
                let scheme = match service {
                    Service::Azure => "az",
                    Service::S3 => "s3",
                };
                write!(f, "{scheme}://{bucket}")?;
                if !prefix.is_empty() {
                    write!(f, "/{prefix}")?;
                }
                Ok(())
            }
            StoreLocation::Receiver { addr, tls: false } => write!(f, "tcp://{addr}"),
            StoreLocation::Receiver { addr, tls: true } => write!(f, "tls://{addr}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(service: Service, bucket: &str, prefix: &str) -> StoreLocation {
        StoreLocation::Object {
            service,
            bucket: bucket.into(),
            prefix: prefix.into(),
        }
    }

    #[test]
    fn paths_urls_and_mistakes() {
        let parse = |s: &str| s.parse::<StoreLocation>();
        assert_eq!(parse("/srv/dr"), Ok(StoreLocation::Dir("/srv/dr".into())));
        assert_eq!(parse("store"), Ok(StoreLocation::Dir("store".into())));
        assert_eq!(
            parse("file:///srv/dr"),
            Ok(StoreLocation::Dir("/srv/dr".into()))
        );
        assert_eq!(parse("az://dr"), Ok(object(Service::Azure, "dr", "")));
        assert_eq!(
            parse("azure://dr/site-a/"),
            Ok(object(Service::Azure, "dr", "site-a"))
        );
        assert_eq!(
            parse("s3://bucket/a/b"),
            Ok(object(Service::S3, "bucket", "a/b"))
        );
        let receiver = |addr: &str, tls| StoreLocation::Receiver {
            addr: addr.into(),
            tls,
        };
        assert_eq!(
            parse("tcp://dr-site:7087/"),
            Ok(receiver("dr-site:7087", false))
        );
        assert_eq!(parse("tcp://[::1]:7087"), Ok(receiver("[::1]:7087", false)));
        assert_eq!(
            parse("tls://dr-site:7087"),
            Ok(receiver("dr-site:7087", true))
        );
        for (bad, says) in [
            ("", "empty"),
            ("http://host/x", "unsupported store scheme \"http\""),
            ("az://", "no container name"),
            ("s3:///x", "no bucket name"),
            ("file://relative", "absolute path"),
            ("s3://b/../x", ". or .."),
            ("tcp://dr-site", "with a port number"),
            ("tcp://dr-site:0", "with a port number"),
            ("tcp://:7087", "with a port number"),
            ("tcp://dr-site:7087/site-a", "without a path"),
            ("tls://dr-site", "tls://HOST:PORT, with a port number"),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "/srv/dr",
            "az://dr",
            "az://dr/site-a",
            "s3://b/a/b",
            "tcp://h:1",
            "tls://h:1",
        ] {
            assert_eq!(s.parse::<StoreLocation>().unwrap().to_string(), s);
        }
    }
}
