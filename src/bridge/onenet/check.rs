//! What a OneNET bridge's config must be (the second pass over its
//! `bridges[i]` entry, collected with the rest of the config's problems).

use std::collections::HashSet;

use crate::config::{
    is_valid_name, BridgeConfig, MqttProtocol, OneNetConfig, OneNetMode, Problems,
};

/// What OneNET enforces, checked before we ever connect: it disconnects
/// (or bans) devices that break these rules.
pub fn check(i: usize, b: &BridgeConfig, o: &OneNetConfig, p: &mut Problems) {
    let at = |k: &str| format!("bridges[{i}].{k}");
    let oat = |k: &str| format!("bridges[{i}].onenet.{k}");
    let id_chars = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    if !id_chars(&o.product_id) {
        p.add(
            oat("product_id"),
            "must be the product id from the OneNET console (letters, digits, `_`, `-`, `.`)",
        );
    }
    if !id_chars(&o.device_name) {
        p.add(
            oat("device_name"),
            "must be the device name from the OneNET console (letters, digits, `_`, `-`, `.`)",
        );
    }
    if let Err(e) = super::AccessKey::from_base64(&o.access_key) {
        p.add(oat("access_key"), e.to_string());
    }
    if o.token_ttl < std::time::Duration::from_secs(600) {
        p.add(
            oat("token_ttl"),
            "must be at least 10m (the bridge reconnects with a fresh token before it expires)",
        );
    }
    if o.batch_window.is_zero() || o.batch_window > std::time::Duration::from_secs(3600) {
        p.add(oat("batch_window"), "must be between 1ms and 1h");
    }
    if o.min_interval < std::time::Duration::from_millis(100)
        || o.min_interval > std::time::Duration::from_secs(3600)
    {
        p.add(
            oat("min_interval"),
            "must be between 100ms and 1h (OneNET accepts about one message per second)",
        );
    }
    if o.reply_timeout.is_zero() || o.reply_timeout > std::time::Duration::from_secs(60) {
        p.add(
            oat("reply_timeout"),
            "must be between 1ms and 60s (OneNET's API call waits for the reply)",
        );
    }
    if o.qos.0 == crate::model::Qos::ExactlyOnce {
        p.add(
            oat("qos"),
            "OneNET does not support QoS 2 (it disconnects the device); use 0 or 1",
        );
    }
    if let Some(ka) = b.keep_alive {
        if !(10..=1800).contains(&ka.as_secs()) || ka.subsec_nanos() != 0 {
            p.add(
                at("keep_alive"),
                "OneNET accepts a keep-alive of 10s to 1800s (whole seconds)",
            );
        }
    }
    if b.clean_session == Some(false) {
        p.add(
            at("clean_session"),
            "OneNET requires a clean session; remove `clean_session`",
        );
    }
    if b.will.is_some() {
        p.add(
            at("will"),
            "OneNET does not accept a will (it refuses the connection); remove `will`",
        );
    }
    if b.protocol == MqttProtocol::Mqtt5 {
        p.add(
            at("protocol"),
            "OneNET speaks MQTT 3.1.1 only; remove `protocol`",
        );
    }
    if b.queue.drain_rate.is_some() {
        p.add(
            at("queue.drain_rate"),
            "a OneNET bridge paces itself with `onenet.min_interval`; remove `drain_rate`",
        );
    }
    if b.queue.write_behind.is_some() {
        p.add(
            at("queue.write_behind"),
            "a OneNET bridge writes every post before sending it; remove `write_behind`",
        );
    }
    for (key, present) in [
        ("client_id", b.client_id.is_some()),
        ("username", b.username.is_some()),
        ("password", b.password.is_some()),
    ] {
        if present {
            p.add(
                at(key),
                format!(
                    "a OneNET bridge derives `{key}` from `onenet:` (device name, product id, \
                     token); remove it"
                ),
            );
        }
    }
    if !b.forward.is_empty() {
        p.add(
            at("forward"),
            "a OneNET bridge publishes only under $sys/{pid}/{dev}/; map local topics with \
             `properties:` instead",
        );
    }
    if !b.subscribe.is_empty() {
        p.add(
            at("subscribe"),
            "a OneNET bridge receives property sets on onenet/<bridge>/set/<property> \
             (commands on onenet/<bridge>/cmd); remove `subscribe`",
        );
    }
    if let Some(tls) = &b.tls {
        if tls.cert.is_some() != tls.key.is_some() {
            p.add(at("tls"), "`cert` and `key` go together");
        }
    }
    let mut props = HashSet::new();
    for (j, r) in b.properties.iter().enumerate() {
        let pat = |k: &str| format!("bridges[{i}].properties[{j}].{k}");
        if r.topics.is_empty() {
            p.add(pat("topics"), "must be a local topic filter");
        }
        if !is_valid_name(&r.property) {
            p.add(
                pat("property"),
                "must be the identifier from the product's thing model (letters, digits, `_`, `-`)",
            );
        }
        if !props.insert((r.topics.as_str(), r.property.as_str())) {
            p.add(pat("property"), "duplicate topic and property pair");
        }
    }
    if !o.sub_devices.is_empty() && o.mode == OneNetMode::Datastream {
        p.add(
            oat("sub_devices"),
            "sub-devices need a thing-model (OneJSON) gateway product, not `mode: datastream`",
        );
    }
    // OneNET's limit per gateway.
    if o.sub_devices.len() > 1500 {
        p.add(
            oat("sub_devices"),
            "a OneNET gateway has at most 1500 sub-devices",
        );
    }
    let mut subs = HashSet::new();
    for (j, sd) in o.sub_devices.iter().enumerate() {
        let sat = |k: &str| format!("bridges[{i}].onenet.sub_devices[{j}].{k}");
        if !id_chars(&sd.product_id) {
            p.add(sat("product_id"), "must be the sub-device's product id");
        }
        if !id_chars(&sd.device_name) {
            p.add(sat("device_name"), "must be the sub-device's name");
        }
        if !subs.insert((sd.product_id.as_str(), sd.device_name.as_str())) {
            p.add(sat("device_name"), "this sub-device is listed twice");
        }
        if sd.product_id == o.product_id && sd.device_name == o.device_name {
            p.add(
                sat("device_name"),
                "the gateway cannot be its own sub-device",
            );
        }
        if let Err(e) = super::AccessKey::from_base64(&sd.access_key) {
            p.add(sat("access_key"), e.to_string());
        }
        for (k, r) in sd.properties.iter().enumerate() {
            if r.topics.is_empty() {
                p.add(
                    sat(&format!("properties[{k}].topics")),
                    "must be a local topic filter",
                );
            }
            if !is_valid_name(&r.property) {
                p.add(
                    sat(&format!("properties[{k}].property")),
                    "must be the identifier from the sub-device's thing model",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    const KEY: &str = "KuF3NT/jUBJ62LNBB/A8XZA9CqS3Cu79B/ABmfA1UCw=";

    fn load(bridge: &str) -> Result<Config, String> {
        let text = format!("gateway: {{ id: gw }}\nbridges:\n{bridge}");
        Config::from_text(Path::new("c.yaml"), &text, |_| None).map_err(|e| e.to_string())
    }

    fn onenet(extra_onenet: &str, extra_bridge: &str) -> String {
        format!(
            "  - name: cloud\n    onenet:\n      product_id: abc123\n      device_name: gw-001\n      \
             access_key: \"{KEY}\"\n{extra_onenet}{extra_bridge}    properties:\n      \
             - {{ topics: PV/data, property: power }}\n"
        )
    }

    #[test]
    fn onenet_defaults() {
        let c = load(&onenet("", "")).unwrap();
        let o = c.bridges[0].onenet.as_ref().unwrap();
        assert_eq!(o.token_ttl, std::time::Duration::from_secs(30 * 86400));
        assert_eq!(o.batch_window, std::time::Duration::from_secs(1));
        assert_eq!(o.min_interval, std::time::Duration::from_secs(1));
        assert_eq!(o.qos.0, crate::model::Qos::AtLeastOnce);
        assert_eq!(o.mode, crate::config::OneNetMode::Thing);
        assert_eq!(o.method, crate::config::SignMethod::Sha256);
        assert!(o.history_replay);
        assert!(!format!("{c:?}").contains(KEY), "access key in Debug");
    }

    #[test]
    fn onenet_options_parse() {
        let c = load(&onenet(
            "      mode: datastream\n      token_ttl: 1h\n      batch_window: 5s\n      \
             method: md5\n      qos: 0\n",
            "    keep_alive: 10s\n    url: mqtt://127.0.0.1:1883\n",
        ))
        .unwrap();
        let o = c.bridges[0].onenet.as_ref().unwrap();
        assert_eq!(o.mode, crate::config::OneNetMode::Datastream);
        assert_eq!(o.token_ttl, std::time::Duration::from_secs(3600));
        assert_eq!(o.batch_window, std::time::Duration::from_secs(5));
    }

    #[test]
    fn onenet_sub_devices_are_checked() {
        let sub = |name: &str, key: &str| {
            format!(
                "      sub_devices:\n        - {{ product_id: sub1, device_name: {name}, \
                 access_key: \"{key}\", properties: [ {{ topics: a/b, property: p }} ] }}\n"
            )
        };
        let c = load(&onenet(&sub("meter-1", KEY), "")).unwrap();
        let o = c.bridges[0].onenet.as_ref().unwrap();
        assert_eq!(o.sub_devices[0].device_name, "meter-1");
        assert!(!format!("{c:?}").contains(KEY));
        let e = load(&onenet(&sub("meter/1", "bad!"), "")).unwrap_err();
        assert!(e.contains("sub_devices[0].device_name"), "{e}");
        assert!(e.contains("sub_devices[0].access_key"), "{e}");
        let e = load(&onenet(
            &format!("      mode: datastream\n{}", sub("m", KEY)),
            "",
        ))
        .unwrap_err();
        assert!(e.contains("sub-devices need a thing-model"), "{e}");
    }

    #[test]
    fn onenet_qos_2_is_a_clear_error() {
        let e = load(&onenet("      qos: 2\n", "")).unwrap_err();
        assert!(e.contains("c.yaml:8:12:"), "{e}");
        assert!(
            e.contains("bridges[0].onenet.qos: OneNET does not support QoS 2"),
            "{e}"
        );
    }

    #[test]
    fn onenet_keep_alive_range() {
        for bad in ["5s", "1801s", "1h"] {
            let e = load(&onenet("", &format!("    keep_alive: {bad}\n"))).unwrap_err();
            assert!(e.contains("keep-alive of 10s to 1800s"), "{bad}: {e}");
        }
        for good in ["10s", "30m"] {
            load(&onenet("", &format!("    keep_alive: {good}\n"))).unwrap();
        }
    }

    #[test]
    fn onenet_rejects_what_onenet_rejects() {
        let cases = [
            ("", "    clean_session: false\n", "requires a clean session"),
            ("", "    password: x\n", "derives `password`"),
            (
                "",
                "    forward: [ { topics: \"#\" } ]\n",
                "publishes only under $sys",
            ),
            (
                "",
                "    subscribe: [ { topics: \"#\" } ]\n",
                "remove `subscribe`",
            ),
            (
                "      token_ttl: 1m\n",
                "",
                "token_ttl: must be at least 10m",
            ),
            (
                "      batch_window: 0s\n",
                "",
                "batch_window: must be between",
            ),
            (
                "      min_interval: 0s\n",
                "",
                "min_interval: must be between",
            ),
            ("", "    will: { topic: x }\n", "does not accept a will"),
            ("", "    protocol: mqtt5\n", "MQTT 3.1.1 only"),
            ("", "    queue: { drain_rate: 5 }\n", "remove `drain_rate`"),
            (
                "",
                "    queue: { write_behind: 20ms }\n",
                "remove `write_behind`",
            ),
        ];
        for (o, b, want) in cases {
            let e = load(&onenet(o, b)).unwrap_err();
            assert!(e.contains(want), "want `{want}` in: {e}");
        }
        let e = load(&onenet("", "").replace(KEY, "not base64!")).unwrap_err();
        assert!(
            e.contains("access_key: the OneNET access key is not valid base64"),
            "{e}"
        );
        assert!(!e.contains("not base64!"), "key leaked: {e}");
        let e = load(&onenet("", "").replace("gw-001", "gw/001")).unwrap_err();
        assert!(e.contains("onenet.device_name"), "{e}");
    }
}
