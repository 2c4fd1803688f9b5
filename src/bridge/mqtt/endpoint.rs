//! The one parser of broker URLs: `mqtt://host:port` and
//! `mqtts://host:port` for bridges, `mqtt://` or `tcp://` (no TLS) for the
//! external broker the bus uses. Validation and the runtime both call it,
//! so a URL the config check accepts is one the gateway can connect to.

/// Where a remote broker listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// `mqtts://`: TLS.
    pub tls: bool,
}

/// A URL that is not `mqtt://host[:port]` or `mqtts://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid broker URL `{url}`: {reason}")]
pub struct UrlError {
    pub url: String,
    pub reason: &'static str,
}

/// The schemes a URL may use, with whether each means TLS.
type Schemes = [(&'static str, bool)];

/// A bridge's broker: plain or TLS.
const BRIDGE: &Schemes = &[("mqtts://", true), ("mqtt://", false)];
/// The external broker of the bus: plain only (`tcp://` as Mosquitto
/// spells it).
const PLAIN: &Schemes = &[("mqtt://", false), ("tcp://", false)];

impl Endpoint {
    /// Parses `mqtt://host[:port]` (default port 1883) or
    /// `mqtts://host[:port]` (default 8883). IPv6 hosts go in brackets.
    pub fn parse(url: &str) -> Result<Endpoint, UrlError> {
        parse_as(url, BRIDGE, "must start with mqtt:// or mqtts://")
    }

    /// Parses the external broker's URL: `mqtt://host[:port]` or
    /// `tcp://host[:port]` (default port 1883), never TLS.
    pub fn parse_plain(url: &str) -> Result<Endpoint, UrlError> {
        parse_as(url, PLAIN, "must be a URL like mqtt://127.0.0.1:1883")
    }
}

fn parse_as(
    url: &str,
    schemes: &Schemes,
    wrong_scheme: &'static str,
) -> Result<Endpoint, UrlError> {
    let err = |reason| UrlError {
        url: url.to_string(),
        reason,
    };
    let (tls, rest) = schemes
        .iter()
        .find_map(|(scheme, tls)| url.strip_prefix(scheme).map(|rest| (*tls, rest)))
        .ok_or_else(|| err(wrong_scheme))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) {
        return Err(err(
            "only host and port are allowed (credentials go in `username`/`password`)",
        ));
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| err("unclosed `[`"))?;
        match after.strip_prefix(':') {
            Some(p) => (host, p.parse().map_err(|_| err("invalid port"))?),
            None if after.is_empty() => (host, default_port),
            None => return Err(err("invalid port")),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| err("invalid port"))?),
            None => (rest, default_port),
        }
    };
    if host.is_empty() {
        return Err(err("missing host"));
    }
    if port == 0 {
        return Err(err("port 0 is not a broker port"));
    }
    Ok(Endpoint {
        host: host.to_string(),
        port,
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let e = Endpoint::parse("mqtts://mqtt.example.com").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.tls),
            ("mqtt.example.com", 8883, true)
        );
        let e = Endpoint::parse("mqtt://127.0.0.1:18830/").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.tls),
            ("127.0.0.1", 18830, false)
        );
        let e = Endpoint::parse("mqtt://[::1]:1884").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 1884));
        for bad in [
            "tcp://x:1",
            "mqtt://",
            "mqtt://h:notaport",
            "mqtt://u:p@h:1",
            "mqtt://h:1/path",
            "mqtt://h:0",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_external_broker_is_plain() {
        let e = Endpoint::parse_plain("tcp://10.0.0.2").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.tls), ("10.0.0.2", 1883, false));
        let e = Endpoint::parse_plain("mqtt://[::1]:1884").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.tls), ("::1", 1884, false));
        let e = Endpoint::parse_plain("mqtts://h:8883").unwrap_err();
        assert_eq!(e.reason, "must be a URL like mqtt://127.0.0.1:1883");
        for bad in ["mqtt://h:x", "tcp://", "tcp://u:p@h"] {
            assert!(Endpoint::parse_plain(bad).is_err(), "{bad}");
        }
    }
}
