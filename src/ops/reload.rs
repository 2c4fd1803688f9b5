//! Config reload (SIGHUP): which parts of a new config the running gateway
//! can take over live, and the report of what a reload did.

use crate::config::Config;

/// What a reload did to the devices or the bridges, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub unchanged: Vec<String>,
    pub restarted: Vec<String>,
    pub started: Vec<String>,
    pub stopped: Vec<String>,
    /// Could not start (the error is logged); only bridges, whose start
    /// opens a queue and subscribes, can fail after the reload began.
    pub failed: Vec<String>,
}

impl Changes {
    fn is_noop(&self) -> bool {
        self.restarted.is_empty()
            && self.started.is_empty()
            && self.stopped.is_empty()
            && self.failed.is_empty()
    }
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigReload {
    pub devices: Changes,
    pub bridges: Changes,
    pub mappings_changed: bool,
    pub commands_changed: bool,
    /// Top-level keys that changed but only apply after a restart; their
    /// running values stay.
    pub needs_restart: Vec<&'static str>,
}

impl ConfigReload {
    /// Nothing was started, stopped or switched.
    pub fn is_noop(&self) -> bool {
        self.devices.is_noop()
            && self.bridges.is_noop()
            && !self.mappings_changed
            && !self.commands_changed
    }
}

/// Splits `new` into what can be applied live: the returned config has the
/// running values of the keys only a restart can change (the gateway's
/// identity and data folder, the broker's listeners and limits, the rules
/// folder and deadline, the metrics endpoint), and those keys are listed
/// when they differ.
pub fn split_live(running: &Config, mut new: Config) -> (Config, Vec<&'static str>) {
    let mut needs_restart = Vec::new();
    if new.gateway != running.gateway {
        needs_restart.push("gateway");
        new.gateway = running.gateway.clone();
    }
    // Users and the ACL (and their files, read again on every reload) are
    // live; the rest of the broker (listeners, limits) needs a restart.
    let mut fixed = new.broker.clone();
    fixed.users.clone_from(&running.broker.users);
    fixed
        .password_file
        .clone_from(&running.broker.password_file);
    fixed.acl.clone_from(&running.broker.acl);
    fixed.acl_file.clone_from(&running.broker.acl_file);
    if fixed != running.broker {
        needs_restart.push("broker");
        let live = new.broker;
        new.broker = running.broker.clone();
        new.broker.users = live.users;
        new.broker.password_file = live.password_file;
        new.broker.acl = live.acl;
        new.broker.acl_file = live.acl_file;
    }
    // The rule files themselves are reloaded on every SIGHUP; where they
    // live (or whether there are rules at all) is fixed at start.
    if new.rules != running.rules {
        needs_restart.push("rules");
        new.rules = running.rules.clone();
    }
    // OneNET bridges are started by their own module and restart only with
    // the gateway; generic MQTT bridges are reloaded one by one.
    let onenet = |c: &Config| -> Vec<crate::config::BridgeConfig> {
        c.bridges
            .iter()
            .filter(|b| b.onenet.is_some())
            .cloned()
            .collect()
    };
    if onenet(&new) != onenet(running) {
        needs_restart.push("bridges (OneNET)");
        new.bridges.retain(|b| b.onenet.is_none());
        new.bridges.extend(onenet(running));
    }
    if new.metrics != running.metrics {
        needs_restart.push("metrics");
        new.metrics = running.metrics.clone();
    }
    (new, needs_restart)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(yaml: &str) -> Config {
        Config::from_text(Path::new("c.yaml"), yaml, |_| None).unwrap()
    }

    #[test]
    fn restart_only_keys_keep_their_running_values() {
        let running = config("gateway: { id: a }\nbroker:\n  listeners: [{ bind: \"127.0.0.1:1883\", protocol: mqtt }]\n");
        let new = config("gateway: { id: b }\nbroker:\n  listeners: [{ bind: \"127.0.0.1:1999\", protocol: mqtt }]\nmetrics: { bind: \"127.0.0.1:9100\" }\nmappings: [{ match: '*/*', topic: x }]\n");
        let (live, restart) = split_live(&running, new.clone());
        assert_eq!(restart, ["gateway", "broker", "metrics"]);
        assert_eq!(live.gateway, running.gateway);
        assert_eq!(live.broker, running.broker);
        assert_eq!(live.metrics, None);
        assert_eq!(live.mappings, new.mappings);
        let (_, none) = split_live(&running, running.clone());
        assert!(none.is_empty());
    }

    #[test]
    fn onenet_bridges_keep_their_running_settings() {
        let base = "gateway: { id: a }\nbridges:\n";
        let onenet = |key: &str| {
            format!("  - name: on\n    onenet: {{ product_id: p, device_name: d, access_key: {key} }}\n")
        };
        let mqtt = |url: &str| {
            format!("  - name: cloud\n    url: {url}\n    forward: [{{ topics: 'a/#' }}]\n")
        };
        let running = config(&format!(
            "{base}{}{}",
            onenet("a2V5"),
            mqtt("mqtt://127.0.0.1:1")
        ));
        let new = config(&format!(
            "{base}{}{}",
            onenet("b3RoZXI="),
            mqtt("mqtt://127.0.0.1:2")
        ));
        let (live, restart) = split_live(&running, new.clone());
        assert_eq!(restart, ["bridges (OneNET)"]);
        let on = |c: &Config| c.bridges.iter().find(|b| b.name == "on").cloned();
        assert_eq!(on(&live), on(&running));
        let cloud = |c: &Config| c.bridges.iter().find(|b| b.name == "cloud").cloned();
        assert_eq!(cloud(&live), cloud(&new), "generic bridges are reloaded");
    }
}
