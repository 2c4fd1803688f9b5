//! The `config.yaml` contract. Loading happens in passes: `${VAR}`
//! substitution on the text, serde into these structs (syntax, types and
//! unknown keys, with serde_yaml's line and column), then [`validate`]
//! across the whole file (names unique, references exist, per-driver
//! requirements), collecting every problem with its place.

mod error;
mod source;
mod validate;
mod values;

pub mod bridges;
pub mod devices;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use bridges::*;
pub use devices::*;
pub use error::{write_lines, ConfigError, ConfigErrors};
pub use source::{substitute_env, Locator, UnsetVar};
pub use validate::{is_valid_name, Problem, Problems};
pub use values::{ByteSize, QosLevel, Secret};

/// The whole config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identity and data directory of this gateway.
    pub gateway: GatewayConfig,
    /// The embedded broker, or the external broker to use instead.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// Field devices to poll.
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
    /// Readings to topics; first match wins unless `continue: true`.
    #[serde(default)]
    pub mappings: Vec<MappingConfig>,
    /// rhai rules.
    #[serde(default)]
    pub rules: Option<RulesConfig>,
    /// Local topics that write to device points.
    #[serde(default)]
    pub commands: Vec<CommandConfig>,
    /// Cloud bridges.
    #[serde(default)]
    pub bridges: Vec<BridgeConfig>,
    /// The Prometheus endpoint; off unless given.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Where the config was read from; relative paths in it are relative to
    /// this file's folder.
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Used in status topics: `edgebridge/<id>/...`.
    pub id: String,
    /// Durable queues live here.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `false`: connect to `external` instead of embedding a broker.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `mqtt://host:port` of an external broker (with `enabled: false`).
    #[serde(default)]
    pub external: Option<String>,
    /// Username for the external broker.
    #[serde(default)]
    pub external_username: Option<String>,
    /// Password for the external broker.
    #[serde(default)]
    pub external_password: Option<Secret>,
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    /// Required for any listener that is not on loopback (or a
    /// `password_file`).
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// A password file written by `mosquitto_passwd` (`user:$7$…`), read
    /// at start and on SIGHUP; its users log in next to `users`.
    /// Relative to this config file.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Who may publish and subscribe to what, with Mosquitto's acl_file
    /// rules written as YAML (see [`AclRuleConfig`]). With neither `acl`
    /// nor `acl_file`, every logged-in client may do anything.
    #[serde(default)]
    pub acl: Vec<AclRuleConfig>,
    /// A Mosquitto acl_file (`user`, `topic`, `pattern` lines), merged
    /// after `acl`; read at start and on SIGHUP. Relative to this config
    /// file.
    #[serde(default)]
    pub acl_file: Option<PathBuf>,
    /// Largest publish payload a client may send.
    #[serde(default = "default_max_payload")]
    pub max_payload_size: ByteSize,
    /// Connections beyond this are refused.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// QoS 1 and 2 messages kept for one client that is offline (a
    /// persistent session) or slower than its publishers; past this the
    /// oldest are dropped and counted (`edgebridge_broker_dropped_total`).
    /// Mosquitto's `max_queued_messages`.
    #[serde(default = "default_max_queued")]
    pub max_queued_messages: usize,
    /// How long a persistent session (MQTT 3.1.1 clean session false) is
    /// kept after its client went away; MQTT 5 clients say it themselves.
    #[serde(default = "default_session_expiry", with = "humantime_serde")]
    pub session_expiry: Duration,
    /// The longest keep-alive granted to an MQTT 5 client; one asking for
    /// more is told this (Server Keep Alive). MQTT 3.1.1 clients keep theirs.
    #[serde(default = "default_max_keep_alive", with = "humantime_serde")]
    pub max_keep_alive: Duration,
    /// How often the `$SYS/broker/...` topics are published.
    #[serde(default = "default_sys_interval", with = "humantime_serde")]
    pub sys_interval: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            enabled: true,
            external: None,
            external_username: None,
            external_password: None,
            listeners: Vec::new(),
            users: Vec::new(),
            password_file: None,
            acl: Vec::new(),
            acl_file: None,
            max_payload_size: default_max_payload(),
            max_connections: default_max_connections(),
            max_queued_messages: default_max_queued(),
            session_expiry: default_session_expiry(),
            max_keep_alive: default_max_keep_alive(),
            sys_interval: default_sys_interval(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_max_payload() -> ByteSize {
    ByteSize(256 * 1024)
}

fn default_max_connections() -> usize {
    1000
}

fn default_max_queued() -> usize {
    1000
}

fn default_session_expiry() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_max_keep_alive() -> Duration {
    Duration::from_secs(60)
}

fn default_sys_interval() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// MQTT 3.1, 3.1.1 and 5 on one port, as Mosquitto serves them.
    Mqtt,
    /// The same as `mqtt` (a listener serves every version); kept so that
    /// old configs load, with a deprecation note from `check`.
    Mqtt5,
    /// MQTT 3.1, 3.1.1 and 5 over WebSocket.
    Ws,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `address:port`; port 0 picks a free port.
    pub bind: SocketAddr,
    pub protocol: ListenerProtocol,
    #[serde(default)]
    pub tls: Option<ListenerTls>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub username: String,
    /// An argon2 PHC string from `edgebridge passwd`.
    pub password_hash: Secret,
}

/// One `broker.acl` entry: a Mosquitto acl_file line in YAML.
/// `{ user, topic, access }` is a `topic` line under `user <name>`;
/// `{ topic, access }` without a user is for anonymous clients (the
/// topics before the first `user` line); `{ pattern, access }` is a
/// `pattern` line, for every client, with `%u` (username) and `%c`
/// (client id) substituted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRuleConfig {
    /// The username the rule is for; none: anonymous clients.
    #[serde(default)]
    pub user: Option<String>,
    /// A topic filter (`+` and `#` allowed).
    #[serde(default)]
    pub topic: Option<String>,
    /// A topic filter with `%u` and `%c`, for every client.
    #[serde(default)]
    pub pattern: Option<String>,
    /// What the rule grants, or `deny` to take it away whatever else grants.
    pub access: AclAccess,
}

/// `access` of an ACL entry, as in Mosquitto's acl_file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AclAccess {
    /// Subscribe and receive.
    Read,
    /// Publish.
    Write,
    /// Both.
    Readwrite,
    /// Neither, even where another entry of the same list grants it.
    Deny,
}

/// What a mapping publishes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PayloadFormat {
    /// The bare value: `2.5`, `true`, `text`.
    #[default]
    Value,
    /// `{"value":…,"unit":"…","ts":<ms>}`.
    Json,
    /// A text template with `{value}` `{unit}` `{ts}` `{device}` `{point}`.
    Template(String),
}

impl<'de> Deserialize<'de> for PayloadFormat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "value" => PayloadFormat::Value,
            "json" => PayloadFormat::Json,
            _ => PayloadFormat::Template(s),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    /// `device/point`; `*` matches one segment.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Topic template with `{device}` `{point}` `{gateway}`.
    pub topic: String,
    #[serde(default)]
    pub payload: PayloadFormat,
    #[serde(default)]
    pub qos: QosLevel,
    #[serde(default)]
    pub retain: bool,
    /// Keep looking for further matching mappings.
    #[serde(default, rename = "continue")]
    pub continue_matching: bool,
    /// Multiply numeric values by this (e.g. 0.001 for W -> kW).
    #[serde(default)]
    pub scale: Option<f64>,
    /// Round numeric values to this many decimals.
    #[serde(default)]
    pub decimals: Option<u8>,
    /// The unit to publish instead of the point's (after `scale`).
    #[serde(default)]
    pub unit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// Every `*.rhai` file here is loaded, in name order.
    pub dir: PathBuf,
    /// Wall-clock limit for one call of a rule function.
    #[serde(default = "default_rule_deadline", with = "humantime_serde")]
    pub deadline: Duration,
}

fn default_rule_deadline() -> Duration {
    Duration::from_millis(10)
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `address:port` of the HTTP endpoint serving Prometheus text
    /// (`/metrics`). It has no login: keep it on loopback or a trusted
    /// interface.
    pub bind: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// Local topic (no wildcards) whose messages become writes.
    pub topic: String,
    /// `device/point` to write.
    pub write: String,
    /// Where the outcome is published; default `<topic>/result`.
    #[serde(default)]
    pub reply_topic: Option<String>,
}

impl CommandConfig {
    pub fn target(&self) -> (&str, &str) {
        self.write.split_once('/').unwrap_or((&self.write, ""))
    }

    pub fn result_topic(&self) -> String {
        self.reply_topic
            .clone()
            .unwrap_or_else(|| format!("{}/result", self.topic))
    }
}

impl Config {
    /// Reads, substitutes, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors::single(ConfigError {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                message: format!("cannot read config: {e}"),
            })
        })?;
        Config::from_text(path, &text, |k| std::env::var(k).ok())
    }

    /// Same as [`Config::load`], from text; `path` names it in errors.
    pub fn from_text(
        path: &Path,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let err = |line, column, message| ConfigError {
            file: path.to_path_buf(),
            line,
            column,
            message,
        };
        let text = substitute_env(text, env).map_err(|unset| {
            ConfigErrors(
                unset
                    .into_iter()
                    .map(|u| {
                        err(
                            u.line,
                            u.column,
                            format!("environment variable `{}` is not set", u.name),
                        )
                    })
                    .collect(),
            )
        })?;
        let mut config: Config = serde_yaml::from_str(&text).map_err(|e| {
            let message = strip_location(&e.to_string());
            // serde points a repeated key at its mapping's start; say where
            // the repeat is.
            if message.contains("duplicate") {
                if let Some((path, (line, column))) = Locator::new(&text).first_duplicate() {
                    return ConfigErrors::single(err(
                        line,
                        column,
                        format!(
                            "{path}: key given twice (the first one is earlier in the same block)"
                        ),
                    ));
                }
            }
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or_else(|| unlocated_place(&text));
            ConfigErrors::single(err(line, column, message))
        })?;
        config.source = path.to_path_buf();
        let locator = Locator::new(&text);
        let problems = validate::validate(&config);
        if problems.is_empty() {
            return Ok(config);
        }
        let mut errors: Vec<ConfigError> = problems
            .into_iter()
            .map(|p| {
                let (line, column) = locator.find(&p.path).unwrap_or((1, 1));
                err(line, column, format!("{}: {}", p.path, p.message))
            })
            .collect();
        errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(errors))
    }

    /// What `edgebridge check` prints as warnings (the config still
    /// loads), each with its place when the file can be read again.
    pub fn warnings(&self) -> Vec<ConfigError> {
        let text = std::fs::read_to_string(&self.source).unwrap_or_default();
        let locator = Locator::new(&text);
        validate::warnings(self)
            .into_iter()
            .map(|p| {
                let (line, column) = locator.find(&p.path).unwrap_or((0, 0));
                ConfigError {
                    file: self.source.clone(),
                    line,
                    column,
                    message: format!("warning: {}: {}", p.path, p.message),
                }
            })
            .collect()
    }

    /// A path from the config, relative to the config file's folder.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            return p.to_path_buf();
        }
        match self.source.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
            _ => p.to_path_buf(),
        }
    }
}

/// Where to point when the YAML parser gives no place (found by fuzzing:
/// a file with two documents): the second document's `---` if there is
/// one, else the start of the file. Every config error names a line.
fn unlocated_place(text: &str) -> (usize, usize) {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with("---") || l.starts_with("..."))
        .map(|(i, _)| (i + 1, 1))
        .nth(usize::from(text.trim_start().starts_with("---")))
        .unwrap_or((1, 1))
}

/// serde_yaml appends " at line L column C"; we print the place first.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Inputs found by `fuzz/` (config_load): every error must name a line.
#[cfg(test)]
mod fuzz_regressions {
    use super::*;

    fn errors(text: &str) -> Vec<ConfigError> {
        Config::from_text(Path::new("f.yaml"), text, |_| None)
            .err()
            .map(|e| e.0)
            .unwrap_or_default()
    }

    #[test]
    fn two_documents_point_at_the_second() {
        let e = errors("gateway: { id: a }\n---\ngateway: { id: b }\n");
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].line, e[0].column), (2, 1), "{}", e[0]);
        assert!(e[0].message.contains("more than one document"), "{}", e[0]);
        let e = errors("---\ngateway: { id: a }\n---\ngateway: { id: b }\n");
        assert_eq!(e[0].line, 3, "{}", e[0]);
    }

    #[test]
    fn the_fuzzed_file_has_located_errors() {
        let text = "gateway: { id: gw }\ndevices:\n  - { name: a, listeners:mulator }\n   { name: a, driver: simulator }\nmappings:\n---\n";
        for e in errors(text) {
            assert!(e.line > 0, "{e}");
        }
    }
}
