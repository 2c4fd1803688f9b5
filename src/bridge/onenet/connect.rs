//! What a OneNET CONNECT carries: client id = device name, username =
//! product id, password = a fresh token, and TLS trusting OneNET's CA.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use super::token::{self, AccessKey, TokenError};
use crate::config::{OneNetConfig, Secret};

/// CONNECT credentials, valid until `expires`.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub client_id: String,
    pub username: String,
    /// The token; a [`Secret`], so it never shows in logs.
    pub password: Secret,
    /// Unix seconds (the token's `et`).
    pub expires: u64,
}

impl Credentials {
    /// Fresh credentials with a token valid for `token_ttl` from `now`.
    pub fn new(o: &OneNetConfig, now: SystemTime) -> Result<Credentials, TokenError> {
        let key = AccessKey::from_base64(&o.access_key)?;
        let et = token::expiry(now, o.token_ttl);
        let res = token::device_resource(&o.product_id, &o.device_name);
        Ok(Credentials {
            client_id: o.device_name.clone(),
            username: o.product_id.clone(),
            password: Secret::new(token::token(&key, o.method, &res, et)),
            expires: et,
        })
    }
}

/// How long a connection may use a token of `ttl` before the bridge
/// reconnects with a fresh one: a tenth of the lifetime (at most an hour)
/// before it expires.
pub fn refresh_after(ttl: Duration) -> Duration {
    let margin = (ttl / 10).min(Duration::from_secs(3600));
    ttl.saturating_sub(margin)
}

/// A rustls config that trusts the bundled OneNET CA (ring provider).
pub fn bundled_tls() -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(super::CA_PEM.as_bytes()) {
        let cert = cert.map_err(|e| format!("bundled OneNET CA: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("bundled OneNET CA: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SignMethod;
    use std::time::UNIX_EPOCH;

    fn config() -> OneNetConfig {
        OneNetConfig {
            product_id: "123123".into(),
            device_name: "mydev".into(),
            access_key: Secret::new("KuF3NT/jUBJ62LNBB/A8XZA9CqS3Cu79B/ABmfA1UCw="),
            method: SignMethod::Sha1,
            mode: Default::default(),
            token_ttl: Duration::from_secs(100),
            batch_window: Duration::from_secs(1),
            min_interval: Duration::from_secs(1),
            reply_timeout: Duration::from_secs(5),
            qos: crate::config::QosLevel(crate::model::Qos::AtLeastOnce),
            sub_devices: Vec::new(),
            history_replay: true,
        }
    }

    #[test]
    fn credentials_follow_onenet_rules() {
        let now = UNIX_EPOCH + Duration::from_secs(1537255423);
        let c = Credentials::new(&config(), now).unwrap();
        assert_eq!(
            (c.client_id.as_str(), c.username.as_str()),
            ("mydev", "123123")
        );
        assert_eq!(c.expires, 1537255523);
        assert!(c
            .password
            .expose()
            .ends_with("&method=sha1&sign=p2Bv5QYrZolQCtt68923gtxRCVk%3D"));
        assert!(!format!("{c:?}").contains("sign="), "token in Debug");
    }

    #[test]
    fn tokens_are_refreshed_before_expiry() {
        assert_eq!(
            refresh_after(Duration::from_secs(1000)),
            Duration::from_secs(900)
        );
        let month = Duration::from_secs(30 * 86400);
        assert_eq!(refresh_after(month), month - Duration::from_secs(3600));
    }

    #[test]
    fn the_bundled_ca_loads() {
        bundled_tls().unwrap();
    }
}
