//! rustls client configuration for `mqtts://` bridges, with the `ring`
//! provider (rumqttc's default would pull aws-lc-rs, a C build that is
//! awkward to cross-compile for small gateways). rumqttc's own
//! `tls_with_default_config()` panics when the system roots cannot be
//! loaded; this reports it instead.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// A TLS setting that cannot work, in the user's terms.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} file {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} file {} is not a PEM {expected}: {detail}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
        detail: String,
    },
    #[error("CA file {}: certificate not usable as a trust anchor: {detail}", path.display())]
    BadCa { path: PathBuf, detail: String },
    #[error("no system root certificates could be loaded ({detail}); set `tls.ca` to a CA file")]
    NoSystemRoots { detail: String },
    #[error("client certificate {} and key {} cannot be used: {detail}", cert.display(), key.display())]
    ClientAuth {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
    #[error("TLS setup failed: {0}")]
    Setup(String),
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let bad = |detail: String| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        expected: "certificate",
        detail,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no `BEGIN CERTIFICATE` block found".into()));
    }
    Ok(certs)
}

/// A rustls client config: trust `ca` (PEM, one or more certificates) or
/// the system roots when `None`; present `client = (cert, key)` for mutual
/// TLS.
pub fn client_config(
    ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in certificates("CA", path)? {
                roots.add(cert).map_err(|e| TlsError::BadCa {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let detail = found
                    .errors
                    .first()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "none found".into());
                return Err(TlsError::NoSystemRoots { detail });
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = certificates("client certificate", cert)?;
            let key_pem = read("client key", key)?;
            let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
                what: "client key",
                path: key.to_path_buf(),
                expected: "private key",
                detail: e.to_string(),
            })?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| TlsError::ClientAuth {
                    cert: cert.to_path_buf(),
                    key: key.to_path_buf(),
                    detail: e.to_string(),
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_clear_errors() {
        let e = client_config(Some(Path::new("/nonexistent/ca.pem")), None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read CA file /nonexistent/ca.pem"),
            "{e}"
        );
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "hello").unwrap();
        let e = client_config(Some(&ca), None).unwrap_err();
        assert!(e.to_string().contains("is not a PEM certificate"), "{e}");

        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = client_config(Some(&ca), None).unwrap_err();
        assert!(matches!(e, TlsError::BadCa { .. }), "{e}");
    }
}
