//! `mqtt://host:port` and `mqtts://host:port`.

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

impl Endpoint {
    /// Parses `mqtt://host[:port]` (default port 1883) or
    /// `mqtts://host[:port]` (default 8883). IPv6 hosts go in brackets.
    pub fn parse(url: &str) -> Result<Endpoint, UrlError> {
        let err = |reason| UrlError {
            url: url.to_string(),
            reason,
        };
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else {
            return Err(err("must start with mqtt:// or mqtts://"));
        };
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
}
