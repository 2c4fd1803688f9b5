//! The running OneNET bridge: the bridge engine (`bridge/engine`) with the
//! OneNET profile (`profile.rs`); this file checks the settings, opens the
//! queue and starts it.
//!
//! The engine does what every bridge does: it takes the local topics of
//! `properties:` (and the results of local handlers,
//! `onenet/<bridge>/set/+/result`, `onenet/<bridge>/cmd/result`) from the
//! bus, keeps taking them while OneNET is unreachable (an outage only grows
//! the queue), connects with the one retry policy, sends queued posts in
//! order within the pace (`min_interval`) and deletes each only after its
//! PUBACK. The profile batches values per window into one post, connects
//! with a fresh token (and has the engine reconnect with a fresh one before
//! it expires), merges a backlog into history posts, answers post replies,
//! and turns property sets and commands into local messages, answering
//! each once the handlers reported (or timed out).

mod profile;

pub use profile::parse_result;
use profile::OneNetProfile;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::connect::{bundled_tls, Credentials};
use super::token::TokenError;
use crate::bridge::engine::{self, OpenError, Opened, Settings, Window};
use crate::bridge::mqtt::{client_config, Endpoint, RemoteOptions, TlsError};
use crate::bridge::queue::QueueLimits;
use crate::bridge::{status_topic, BusLink, RunningBridge};
use crate::bus::{Bus, BusError};
use crate::config::{BridgeConfig, Config, MqttProtocol, OneNetConfig, OneNetMode};
use crate::model::Qos;

/// Problems that stop a OneNET bridge from starting.
#[derive(Debug, thiserror::Error)]
pub enum OneNetError {
    #[error("bridge `{bridge}` has no `onenet:` block")]
    NotOneNet { bridge: String },
    #[error("bridge `{bridge}`: {source}")]
    Token { bridge: String, source: TokenError },
    #[error("bridge `{bridge}`: {detail}")]
    Url { bridge: String, detail: String },
    #[error("bridge `{bridge}`: {source}")]
    Tls { bridge: String, source: TlsError },
    #[error("bridge `{bridge}`: {detail}")]
    BundledCa { bridge: String, detail: String },
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("bridge `{bridge}`: {source}")]
    Bus { bridge: String, source: BusError },
}

/// Local topic where property `prop` of a set request is published.
pub fn set_topic(bridge: &str, prop: &str) -> String {
    format!("onenet/{bridge}/set/{prop}")
}

/// Local topic where a data-stream command is published.
pub fn cmd_topic(bridge: &str) -> String {
    format!("onenet/{bridge}/cmd")
}

/// Keep-alive when the bridge sets none (OneNET allows 10 s to 1800 s).
const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(60);
/// Posts handed to the client and not yet acknowledged, at most.
const MAX_IN_FLIGHT: usize = 4;

/// A OneNET bridge whose settings were checked and whose queue is open;
/// [`OneNetBridge::start`] subscribes it on the bus and runs it.
pub struct OneNetBridge {
    settings: Settings,
    o: OneNetConfig,
    base: RemoteOptions,
    routes: Vec<(String, String)>,
    opened: Opened,
}

impl std::fmt::Debug for OneNetBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OneNetBridge")
            .field("name", &self.settings.name)
            .finish_non_exhaustive()
    }
}

/// The key, the URL and the TLS settings of OneNET bridge `b`, checked
/// (TLS files read) without connecting anywhere; for `edgebridge check`.
pub fn check_files(config: &Config, b: &BridgeConfig) -> Result<(), OneNetError> {
    match &b.onenet {
        Some(o) => connection_settings(config, b, o).map(|_| ()),
        None => Err(OneNetError::NotOneNet {
            bridge: b.name.clone(),
        }),
    }
}

type TlsConfig = Option<Arc<rustls::ClientConfig>>;

fn connection_settings(
    config: &Config,
    b: &BridgeConfig,
    o: &OneNetConfig,
) -> Result<(Endpoint, TlsConfig), OneNetError> {
    let bridge = b.name.clone();
    // Fail now on a bad key rather than on every connect.
    Credentials::new(o, SystemTime::now()).map_err(|source| OneNetError::Token {
        bridge: bridge.clone(),
        source,
    })?;
    let url = b.url.as_deref().unwrap_or(super::DEFAULT_URL);
    let endpoint = Endpoint::parse(url).map_err(|e| OneNetError::Url {
        bridge: bridge.clone(),
        detail: e.to_string(),
    })?;
    if !endpoint.tls {
        return Ok((endpoint, None));
    }
    let ca = b.tls.as_ref().and_then(|t| t.ca.as_deref());
    let client = b
        .tls
        .as_ref()
        .and_then(|t| t.cert.as_deref().zip(t.key.as_deref()));
    let tls = if ca.is_some() || client.is_some() {
        let ca = ca.map(|p| config.resolve(p));
        let cert = client.map(|(c, k)| (config.resolve(c), config.resolve(k)));
        let cfg = client_config(
            ca.as_deref(),
            cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        )
        .map_err(|source| OneNetError::Tls {
            bridge: bridge.clone(),
            source,
        })?;
        Arc::new(cfg)
    } else {
        bundled_tls().map_err(|detail| OneNetError::BundledCa { bridge, detail })?
    };
    Ok((endpoint, Some(tls)))
}

impl OneNetBridge {
    /// Checks what can be checked before connecting (the key, the URL, TLS
    /// files) and opens the bridge's durable queue.
    pub fn open(config: &Config, b: &BridgeConfig) -> Result<OneNetBridge, OneNetError> {
        let bridge = b.name.clone();
        let Some(o) = b.onenet.clone() else {
            return Err(OneNetError::NotOneNet { bridge });
        };
        let (endpoint, tls) = connection_settings(config, b, &o)?;
        let base = RemoteOptions {
            protocol: MqttProtocol::Mqtt,
            endpoint,
            client_id: o.device_name.clone(),
            username: None,
            password: None,
            keep_alive: b.keep_alive.unwrap_or(DEFAULT_KEEP_ALIVE),
            clean_session: true,
            will: None,
            tls,
            max_packet_size: 256 * 1024 + 1024,
            max_inflight: MAX_IN_FLIGHT as u16 + 2,
        };
        let data_dir = config.resolve(&config.gateway.data_dir);
        let limits = QueueLimits::from(&b.queue);
        let opened = Opened::open(&bridge, &data_dir, limits)?;
        let settings = Settings {
            status_topic: status_topic(&config.gateway.id, &bridge),
            name: bridge,
            data_dir,
            limits,
            write_behind: None,
            reconnect: b.reconnect,
            strict: b.queue.strict,
            pace: Some(o.min_interval),
            window: Window::InFlight(MAX_IN_FLIGHT),
            max_packet_size: base.max_packet_size,
            qos0_past_queue: false,
            peer: "OneNET",
        };
        Ok(OneNetBridge {
            settings,
            routes: b
                .properties
                .iter()
                .map(|p| (p.topics.clone(), p.property.clone()))
                .chain(o.sub_devices.iter().enumerate().flat_map(|(n, sd)| {
                    sd.properties
                        .iter()
                        .map(move |p| (p.topics.clone(), format!("{n}/{}", p.property)))
                }))
                .collect(),
            o,
            base,
            opened,
        })
    }

    /// Subscribes on the bus (before this returns, so nothing published
    /// afterwards is missed) and runs the bridge until `shutdown`; what is
    /// not acknowledged stays in the queue.
    pub async fn start(
        self,
        bus: &Bus,
        shutdown: &CancellationToken,
    ) -> Result<RunningBridge, OneNetError> {
        let OneNetBridge {
            settings,
            o,
            base,
            routes,
            opened,
        } = self;
        let name = settings.name.clone();
        let mut filters: Vec<(String, Qos)> = routes
            .iter()
            .map(|(t, _)| (t.clone(), Qos::AtLeastOnce))
            .collect();
        filters.push((result_filter(&name, o.mode), Qos::AtLeastOnce));
        let link = BusLink::new(
            bus,
            &format!("edgebridge-onenet-{name}"),
            &filters,
            settings.strict.then(|| opened.inbox().clone()),
        )
        .await
        .map_err(|source| OneNetError::Bus {
            bridge: name.clone(),
            source,
        })?;
        tracing::info!(bridge = %name, product = %o.product_id, device = %o.device_name,
            url = ?base.endpoint, mode = ?o.mode, "OneNET bridge starting");
        let profile = OneNetProfile::new(&name, o, base, routes, &settings.status_topic);
        let status = opened.status();
        let task = tokio::spawn(engine::run(
            settings,
            opened,
            profile,
            link,
            shutdown.clone(),
        ));
        crate::ops::metrics::watch_bridge(&name, status.clone());
        Ok(RunningBridge {
            name,
            status,
            task,
            stop: shutdown.clone(),
        })
    }
}

fn result_filter(bridge: &str, mode: OneNetMode) -> String {
    match mode {
        OneNetMode::Thing => format!("onenet/{bridge}/set/+/result"),
        OneNetMode::Datastream => format!("{}/result", cmd_topic(bridge)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge(extra: &str) -> (Config, BridgeConfig) {
        let text = format!(
            "gateway: {{ id: gw }}\nbridges:\n  - name: one\n    onenet:\n      product_id: p1\n      \
             device_name: d1\n      access_key: \"KuF3NT/jUBJ62LNBB/A8XZA9CqS3Cu79B/ABmfA1UCw=\"\n{extra}"
        );
        let c = Config::from_text(std::path::Path::new("/etc/eb/c.yaml"), &text, |_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        let b = c.bridges[0].clone();
        (c, b)
    }

    #[test]
    fn tls_uses_the_bundled_ca_unless_overridden() {
        let (c, b) = bridge("    url: mqtts://mqtts.heclouds.com:8883\n");
        check_files(&c, &b).unwrap();
        let (_, tls) = connection_settings(&c, &b, b.onenet.as_ref().unwrap()).unwrap();
        assert!(tls.is_some());
        let (c, b) = bridge("");
        let (endpoint, tls) = connection_settings(&c, &b, b.onenet.as_ref().unwrap()).unwrap();
        assert_eq!(
            (endpoint.host.as_str(), endpoint.port, tls.is_none()),
            ("mqtts.heclouds.com", 1883, true)
        );
        let (c, b) =
            bridge("    url: mqtts://mqtts.heclouds.com:8883\n    tls: { ca: nope.pem }\n");
        let e = check_files(&c, &b).unwrap_err().to_string();
        assert!(e.contains("/etc/eb/nope.pem"), "{e}");
    }

    #[test]
    fn handler_results_parse() {
        assert_eq!(
            parse_result(br#"{"ok":true,"device":"d","point":"p"}"#),
            Ok(())
        );
        assert_eq!(
            parse_result(br#"{"ok":false,"error":"illegal data address"}"#),
            Err("illegal data address".into())
        );
        assert_eq!(parse_result(br#"{"code":200}"#), Ok(()));
        assert_eq!(
            parse_result(br#"{"code":500,"msg":"no"}"#),
            Err("no".into())
        );
        assert_eq!(parse_result(b"OK"), Ok(()));
        assert_eq!(parse_result(b"jammed"), Err("jammed".into()));
    }
}
