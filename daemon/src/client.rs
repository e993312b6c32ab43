//! Connecting to a domkitd, and the errors a client sees: the daemon's typed refusals
//! ([`RemoteError`], with the library's message word for word) apart from not reaching it.

use crate::convert;
use crate::pb;
use crate::pb::domkit_client::DomkitClient;
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};
use tonic::{Code, Status};

/// Where a domkitd listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A Unix socket.
    Unix(PathBuf),
    /// TCP with mutual TLS.
    Tcp {
        /// `HOST:PORT`.
        addr: String,
        /// The client's TLS files.
        tls: ClientTls,
    },
}

/// A client's TLS files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// The CA that signed the daemon's certificate (PEM).
    pub ca: Option<PathBuf>,
    /// The client's certificate (PEM), signed by the daemon's client CA.
    pub cert: Option<PathBuf>,
    /// The client's key (PEM).
    pub key: Option<PathBuf>,
}

impl Target {
    /// Parse `unix://PATH` (or `unix:PATH`) or `tcp://HOST:PORT` (with `tls`).
    pub fn parse(uri: &str, tls: ClientTls) -> Result<Target, ClientError> {
        if let Some(rest) = uri.strip_prefix("unix:") {
            let path = PathBuf::from(rest.strip_prefix("//").unwrap_or(rest));
            if !path.is_absolute() {
                return Err(ClientError::Usage(format!(
                    "{uri:?}: want unix:///absolute/path/to/domkitd.sock"
                )));
            }
            return Ok(Target::Unix(path));
        }
        if let Some(rest) = uri.strip_prefix("tcp:") {
            let addr = rest
                .strip_prefix("//")
                .unwrap_or(rest)
                .trim_end_matches('/');
            if addr.rsplit_once(':').is_none() {
                return Err(ClientError::Usage(format!("{uri:?}: want tcp://HOST:PORT")));
            }
            return Ok(Target::Tcp {
                addr: addr.to_string(),
                tls,
            });
        }
        Err(ClientError::Usage(format!(
            "{uri:?} is not a domkitd address: use unix:///PATH or tcp://HOST:PORT"
        )))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "unix://{}", p.display()),
            Target::Tcp { addr, .. } => write!(f, "tcp://{addr}"),
        }
    }
}

/// The daemon refused a call: the typed detail it sent (docs/daemon.md, "Errors").
#[derive(Debug, Clone)]
pub struct RemoteError {
    /// The gRPC status code.
    pub code: Code,
    /// The typed detail; `message` is the library's message.
    pub detail: Box<pb::ErrorDetail>,
}

impl RemoteError {
    /// The kind's snake_case name (`not_found`, `invalid_state`, ...).
    pub fn kind(&self) -> &'static str {
        convert::kind_name(self.detail.kind)
    }
}

/// What can go wrong for a client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon answered with an error; its message is the library's.
    #[error("{}", .0.detail.message)]
    Remote(RemoteError),
    /// The daemon cannot be reached (not running, no permission on the socket, TLS
    /// refused).
    #[error("cannot reach domkitd at {target}: {message}")]
    Unreachable {
        /// Where.
        target: String,
        /// Why.
        message: String,
    },
    /// A status without domkit's detail (a proxy, a transport failure mid-call).
    #[error("domkitd call failed ({code:?}): {message}")]
    Transport {
        /// The gRPC code.
        code: Code,
        /// The status message.
        message: String,
    },
    /// The client was used wrongly (bad address, missing TLS files).
    #[error("{0}")]
    Usage(String),
    /// A local file (config, certificate) could not be read.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        match convert::detail_of(&status) {
            Some(detail) => ClientError::Remote(RemoteError {
                code: status.code(),
                detail: Box::new(detail),
            }),
            None => ClientError::Transport {
                code: status.code(),
                message: status.message().to_string(),
            },
        }
    }
}

/// A connected client of the `domkit.v1.Domkit` service.
pub type Client = DomkitClient<Channel>;

/// Connect to the daemon at `target`.
pub async fn connect(target: &Target) -> Result<Client, ClientError> {
    let unreachable = |e: &dyn std::error::Error| ClientError::Unreachable {
        target: target.to_string(),
        message: error_chain(e),
    };
    let channel = match target {
        Target::Unix(path) => {
            let path = path.clone();
            // The URI is not used for a Unix socket: the connector below is.
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(&path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(|e| unreachable(&e))?
        }
        Target::Tcp { addr, tls } => {
            let read = |p: &PathBuf, what: &str| {
                std::fs::read(p).map_err(|e| ClientError::Io {
                    context: format!("reading the {what} {}", p.display()),
                    source: e,
                })
            };
            let host = addr
                .rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
                .unwrap_or(addr);
            let mut config = ClientTlsConfig::new().domain_name(host.to_string());
            match &tls.ca {
                Some(ca) => {
                    config =
                        config.ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?))
                }
                None => {
                    return Err(ClientError::Usage(
                        "tcp:// needs --ca (the CA that signed domkitd's certificate)".into(),
                    ))
                }
            }
            match (&tls.cert, &tls.key) {
                (Some(cert), Some(key)) => {
                    config = config.identity(Identity::from_pem(
                        read(cert, "client certificate")?,
                        read(key, "client key")?,
                    ));
                }
                (None, None) => {}
                _ => return Err(ClientError::Usage("--cert and --key go together".into())),
            }
            Endpoint::from_shared(format!("https://{addr}"))
                .map_err(|e| ClientError::Usage(format!("tcp://{addr}: {e}")))?
                .tls_config(config)
                .map_err(|e| unreachable(&e))?
                .connect()
                .await
                .map_err(|e| unreachable(&e))?
        }
    };
    Ok(DomkitClient::new(channel))
}

/// An error with its sources, for humans (`transport error: ... : No such file`).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// A domain reference from what a user typed: a uuid if it parses as one, else a name.
pub fn domain_ref(text: &str) -> pb::DomainRef {
    let domain = match uuid::Uuid::parse_str(text) {
        Ok(uuid) => pb::domain_ref::Domain::Uuid(uuid.to_string()),
        Err(_) => pb::domain_ref::Domain::Name(text.to_string()),
    };
    pb::DomainRef {
        domain: Some(domain),
    }
}
