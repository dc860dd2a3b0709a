//! TLS (rustls) for the fleet's listeners and clients.
//!
//! A service given a [`TlsConfig`] serves HTTPS only: its certificate
//! chain and key, and the fleet CA against which it checks the client
//! certificates that callers may present. A client certificate is
//! optional at the handshake (devices and operators come with bearer
//! tokens); what a verified one proves, "a member of this fleet", is told
//! to the handlers in [`PeerAddr::fleet_member`], and the endpoints of a
//! handoff require it (mutual TLS between cloudlets).
//!
//! [`ServeListener`] accepts connections for `axum::serve`, plain or TLS,
//! each handshake in a task of its own (a slow client holds up no other),
//! with `TCP_NODELAY` set (small answers sit inside a VM's downtime).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::either::Either;

use crate::secrets;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A service's TLS files (PEM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// This service's certificate (and its chain), from `cloudlet pki issue`.
    pub cert: PathBuf,
    /// Its private key (mode 0600).
    pub key: PathBuf,
    /// The fleet CA (`ca.pem` of `cloudlet pki init`): client certificates
    /// are checked against it, and so are the servers this service calls.
    pub ca: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("Cannot read {}: {detail}", path.display())]
    Read { path: PathBuf, detail: String },
    #[error("{} holds no certificate (PEM)", .0.display())]
    NoCertificate(PathBuf),
    #[error(transparent)]
    Secret(#[from] secrets::SecretError),
    #[error("TLS settings refused: {0}")]
    Rustls(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// The certificates in PEM file `path`.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Read {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

/// The private key in PEM file `path` (which must be private).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    secrets::check_private(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        detail: format!("no private key (PEM): {e}"),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .map_err(|e| TlsError::Rustls(format!("{}: {e}", ca.display())))?;
    }
    Ok(Arc::new(roots))
}

/// The server side of `c`: its certificate; client certificates optional,
/// checked against the fleet CA when given.
pub fn server_config(c: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&c.ca)?, provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&c.cert)?, load_key(&c.key)?)
        .map_err(|e| TlsError::Rustls(format!("{}: {e}", c.cert.display())))?;
    // HTTP/1.1 only: the services are built without HTTP/2 (a browser
    // offered h2 would otherwise pick it).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A listener that would serve plain HTTP where others can listen in.
#[derive(Debug, thiserror::Error)]
#[error("{listen} is not a loopback address and there is no TLS: give the service a certificate (cloudlet pki issue; [tls] or --tls-cert/--tls-key/--tls-ca), or say plain HTTP on purpose (plain_http = true, --plain-http): credentials and overlays would cross the network in the clear")]
pub struct PlainHttpRefused {
    pub listen: SocketAddr,
}

/// Every service serves plain HTTP only on loopback, unless told so
/// (`plain_http`): with `tls` it serves HTTPS anyway.
pub fn check_plain_http(
    listen: SocketAddr,
    tls: bool,
    plain_http: bool,
) -> Result<(), PlainHttpRefused> {
    if tls || plain_http || listen.ip().is_loopback() {
        Ok(())
    } else {
        Err(PlainHttpRefused { listen })
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr {
    pub remote: SocketAddr,
    /// It showed a client certificate of the fleet CA (mutual TLS).
    pub fleet_member: bool,
    /// The connection is TLS.
    pub tls: bool,
}

pub type ServeIo = Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>;

/// Connections for `axum::serve`: plain, or TLS with `tls`.
pub struct ServeListener {
    accepted: tokio::sync::mpsc::Receiver<(ServeIo, PeerAddr)>,
    local: SocketAddr,
}

impl ServeListener {
    pub fn new(tcp: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, accepted) = tokio::sync::mpsc::channel(64);
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let (sock, remote) = match tcp.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and the like: wait, as axum's own loop does.
                        tracing::debug!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = sock.set_nodelay(true);
                let Some(acceptor) = acceptor.clone() else {
                    let peer = PeerAddr {
                        remote,
                        fleet_member: false,
                        tls: false,
                    };
                    if tx.send((Either::Left(sock), peer)).await.is_err() {
                        return;
                    }
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                        Ok(Ok(s)) => {
                            let fleet_member = s.get_ref().1.peer_certificates().is_some();
                            let peer = PeerAddr {
                                remote,
                                fleet_member,
                                tls: true,
                            };
                            let _ = tx.send((Either::Right(s), peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%remote, "TLS handshake refused: {e}"),
                        Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(ServeListener { accepted, local })
    }
}

impl axum::serve::Listener for ServeListener {
    type Io = ServeIo;
    type Addr = PeerAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(c) => c,
            // The accept loop ended (it never does while the runtime runs).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(PeerAddr {
            remote: self.local,
            fleet_member: false,
            tls: false,
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, ServeListener>>
    for PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, ServeListener>) -> Self {
        *stream.remote_addr()
    }
}

/// The environment variable naming the fleet CA's certificate (PEM) that
/// this process's clients trust (when [`trust_fleet_ca`] was not called).
pub const FLEET_CA_ENV: &str = "CLOUDLET_CA";

static FLEET_CA: std::sync::OnceLock<reqwest::Certificate> = std::sync::OnceLock::new();

/// Trust the fleet CA in `path` (PEM) for every client this process makes
/// from now on with [`client_builder`], and no other CA.
pub fn trust_fleet_ca(path: &Path) -> Result<(), TlsError> {
    let pem = read(path)?;
    let ca = reqwest::Certificate::from_pem(&pem).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        detail: format!("not a certificate (PEM): {e}"),
    })?;
    let _ = FLEET_CA.set(ca);
    Ok(())
}

/// The fleet CA this process trusts: set by [`trust_fleet_ca`], else read
/// from `$CLOUDLET_CA` (a warning when that cannot be read), else none.
pub fn fleet_ca() -> Option<reqwest::Certificate> {
    if let Some(c) = FLEET_CA.get() {
        return Some(c.clone());
    }
    let path = std::env::var_os(FLEET_CA_ENV)?;
    match trust_fleet_ca(Path::new(&path)) {
        Ok(()) => FLEET_CA.get().cloned(),
        Err(e) => {
            tracing::warn!("${FLEET_CA_ENV}: {e}");
            None
        }
    }
}

/// A client builder for the fleet's services: with a fleet CA
/// ([`fleet_ca`]), that CA is the only one trusted for `https://`.
pub fn client_builder() -> reqwest::ClientBuilder {
    let b = reqwest::Client::builder();
    match fleet_ca() {
        Some(ca) => b
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca),
        None => b,
    }
}

/// A PEM bundle for a client's identity (its certificate, then its key),
/// as `reqwest::Identity::from_pem` takes it.
pub fn identity_pem(c: &TlsConfig) -> Result<Vec<u8>, TlsError> {
    let mut pem = read(&c.cert)?;
    secrets::check_private(&c.key)?;
    pem.extend_from_slice(b"\n");
    pem.extend_from_slice(&read(&c.key)?);
    Ok(pem)
}
