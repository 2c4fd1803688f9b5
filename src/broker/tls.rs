//! TLS for the broker's listeners, with rustls and *ring*.
//!
//! rmqtt's own TLS (its `tls` feature) brings rustls with aws-lc-rs, a C
//! library that blocks cross-compiling for the ARM boxes we run on (see
//! README, "Cross-compiling"). So a TLS listener is ours: it accepts on the
//! configured address, does the handshake, and hands the plain stream to an
//! rmqtt listener on a loopback port that only it uses, with a PROXY
//! protocol v1 header first so that rmqtt sees the real peer address (for
//! logs and the refusal lines). One extra copy per byte, on loopback.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// A TLS handshake that takes longer is abandoned (a silent peer must not
/// hold a task and a socket forever).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS certificate and key do not go together: {0}")]
    Config(rustls::Error),
}

/// Reads the PEM certificate chain and key into a server config.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let file_err = |path: &Path, reason: String| TlsError::File {
        path: path.display().to_string(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_err(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(cert, "no certificate in it".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Config)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `listener` until the task is aborted: each TLS client is carried
/// to `inner` (the loopback rmqtt listener).
pub async fn front(listener: TcpListener, acceptor: TlsAcceptor, inner: SocketAddr) {
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!(error = %e, "TLS listener: accept failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            if let Err(e) = carry(socket, peer, acceptor, inner).await {
                tracing::debug!(%peer, error = %e, "TLS connection ended");
            }
        });
    }
}

async fn carry(
    socket: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    inner: SocketAddr,
) -> std::io::Result<()> {
    let local = socket.local_addr()?;
    let _ = socket.set_nodelay(true);
    let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            return Ok(());
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            return Ok(());
        }
    };
    let mut plain = TcpStream::connect(inner).await?;
    let _ = plain.set_nodelay(true);
    plain
        .write_all(proxy_header(peer, local).as_bytes())
        .await?;
    tokio::io::copy_bidirectional(&mut tls, &mut plain).await?;
    Ok(())
}

/// A PROXY protocol v1 header (haproxy's proxy-protocol.txt, section 2.1).
fn proxy_header(peer: SocketAddr, local: SocketAddr) -> String {
    let family = match (peer, local) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => "TCP4",
        (SocketAddr::V6(_), SocketAddr::V6(_)) => "TCP6",
        _ => return "PROXY UNKNOWN\r\n".into(),
    };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        peer.ip(),
        local.ip(),
        peer.port(),
        local.port()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_header_names_both_ends() {
        let peer: SocketAddr = "192.0.2.7:50000".parse().unwrap();
        let local: SocketAddr = "10.0.0.1:8883".parse().unwrap();
        assert_eq!(
            proxy_header(peer, local),
            "PROXY TCP4 192.0.2.7 10.0.0.1 50000 8883\r\n"
        );
        let v6: SocketAddr = "[::1]:1".parse().unwrap();
        assert_eq!(proxy_header(v6, local), "PROXY UNKNOWN\r\n");
    }
}
