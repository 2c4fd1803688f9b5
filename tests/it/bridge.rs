//! Cloud bridges against a real Mosquitto (`.ci/run` runs these).

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgebridge::bridge::mqtt::{client_config, Endpoint, RemoteClient, RemoteEvent, RemoteOptions};
use edgebridge::config::MqttProtocol;

use crate::support::mosquitto::{Mosquitto, Security};

fn options(url: &str, tls: Option<rustls::ClientConfig>) -> RemoteOptions {
    RemoteOptions {
        protocol: MqttProtocol::Mqtt,
        endpoint: Endpoint::parse(url).unwrap(),
        client_id: "it-bridge".into(),
        username: None,
        password: None,
        keep_alive: Duration::from_secs(5),
        clean_session: true,
        will: None,
        tls: tls.map(std::sync::Arc::new),
        max_packet_size: 1 << 20,
        max_inflight: 10,
    }
}

/// Polls until CONNACK or the first error.
async fn first_connect(opts: &RemoteOptions) -> Result<bool, String> {
    let mut client = RemoteClient::new(opts);
    let r = tokio::time::timeout(Duration::from_secs(10), client.poll())
        .await
        .map_err(|_| "no answer within 10s".to_string())?;
    match r {
        Ok(RemoteEvent::Connected { session_present }) => Ok(session_present),
        Ok(other) => Err(format!("unexpected first event {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn tls(ca: &Path, client: Option<(&PathBuf, &PathBuf)>) -> rustls::ClientConfig {
    client_config(Some(ca), client.map(|(c, k)| (c.as_path(), k.as_path()))).unwrap()
}

#[tokio::test]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn tls_connects_with_the_right_ca_and_fails_clearly_with_a_wrong_one() {
    let m = Mosquitto::start(Security::Tls);
    let certs = m.certs().unwrap().clone();
    first_connect(&options(&m.url(), Some(tls(&certs.ca, None))))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", m.log()));
    let err = first_connect(&options(&m.url(), Some(tls(&certs.wrong_ca, None))))
        .await
        .unwrap_err();
    assert!(
        err.contains("invalid peer certificate") && err.contains("UnknownIssuer"),
        "{err}"
    );
}

#[tokio::test]
#[ignore = "needs mosquitto: run by .ci/run"]
async fn mutual_tls_needs_the_client_certificate() {
    let m = Mosquitto::start(Security::MutualTls);
    let c = m.certs().unwrap().clone();
    first_connect(&options(
        &m.url(),
        Some(tls(&c.ca, Some((&c.client_cert, &c.client_key)))),
    ))
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", m.log()));
    assert!(first_connect(&options(&m.url(), Some(tls(&c.ca, None))))
        .await
        .is_err());
}
