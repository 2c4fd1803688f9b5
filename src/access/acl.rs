//! Who may publish and subscribe to what: Mosquitto 2.0's acl_file rules,
//! from `broker.acl` (YAML) and `broker.acl_file` (Mosquitto's syntax).
//!
//! How a check runs, as in Mosquitto's `mosquitto_acl_check_default`:
//! 1. The client's own list: the rules under its username, or, for a
//!    client without a username, the rules given before any user (the
//!    anonymous list). `deny` rules are looked at first, so a `deny` that
//!    matches wins over any grant in the same list.
//! 2. If nothing there granted or denied: the patterns (for every client),
//!    `%u` and `%c` replaced by the username and client id, again `deny`
//!    first. A pattern with `%u` is skipped for a client without one.
//! 3. Otherwise: denied.
//!
//! Where we differ, on purpose:
//! - **SUBSCRIBE is checked.** Mosquitto's acl_file accepts every
//!   SUBSCRIBE and only filters deliveries. Here a filter is accepted when
//!   it lies within a rule that grants `read` (`PV/+/power` within `PV/#`)
//!   and not within a `deny`; `#` is refused to a client that may only read
//!   `PV/#`, so the client learns at once (SUBACK failure) instead of
//!   silently receiving nothing. Each delivery is still checked with
//!   [`Access::Read`], which catches a `deny` inside an accepted filter.
//! - **`/` in a username or client id** is refused by the patterns, like
//!   `+` and `#` (Mosquitto 2.0 refuses only `+` and `#`): with
//!   `clients/%c/#`, client id `a/b` would otherwise reach into client `a`'s
//!   topics.
//!
//! Kept from Mosquitto: a rule only matches a `$` topic (`$SYS/…`) if its
//! first level is that literal; nobody may publish to `$SYS/…` or
//! `$share/…`; a SUBSCRIBE to `$share/<group>/<filter>` is checked as
//! `<filter>`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::LineError;
use crate::config::{AclAccess, AclRuleConfig};
use crate::topic;

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// SUBSCRIBE with this filter (wildcards allowed).
    Subscribe,
    /// Delivery of a message on this topic to the client (and retained
    /// messages sent on subscribe).
    Read,
    /// PUBLISH to this topic.
    Write,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AclError {
    #[error("cannot read ACL file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(transparent)]
    Line(#[from] LineError),
    #[error("broker.acl[{index}]: {message}")]
    Entry { index: usize, message: String },
}

/// What one rule does to the topics it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    Deny,
    Allow { read: bool, write: bool },
}

impl From<AclAccess> for Grant {
    fn from(a: AclAccess) -> Grant {
        match a {
            AclAccess::Read => Grant::Allow {
                read: true,
                write: false,
            },
            AclAccess::Write => Grant::Allow {
                read: false,
                write: true,
            },
            AclAccess::Readwrite => Grant::Allow {
                read: true,
                write: true,
            },
            AclAccess::Deny => Grant::Deny,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    filter: String,
    grant: Grant,
}

/// A list of rules kept `deny` first (Mosquitto puts each `deny` at the
/// head of its list), each group in file order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct RuleList(Vec<Rule>);

impl RuleList {
    fn push(&mut self, rule: Rule) {
        if rule.grant == Grant::Deny {
            let denies = self.0.iter().take_while(|r| r.grant == Grant::Deny).count();
            self.0.insert(denies, rule);
        } else {
            self.0.push(rule);
        }
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Rules {
    /// `false` for [`Acl::allow_all`]: no ACL was configured.
    restrictive: bool,
    users: HashMap<String, RuleList>,
    anonymous: RuleList,
    patterns: RuleList,
}

/// The compiled ACL. Cheap to clone (one `Arc`); immutable, so a reload
/// builds a new one (see [`crate::access::AccessControl`]).
#[derive(Debug, Clone)]
pub struct Acl(Arc<Rules>);

/// The outcome of one rule list: Mosquitto stops at the first rule that
/// decides.
enum Decision {
    Allow,
    Deny,
    Undecided,
}

impl Acl {
    /// No ACL configured: every logged-in client may do anything (except
    /// what MQTT itself forbids, see [`Acl::check`]).
    pub fn allow_all() -> Acl {
        Acl(Arc::new(Rules::default()))
    }

    /// `broker.acl` followed by the lines of `broker.acl_file` (resolved
    /// by the caller, relative to the config file). Neither given:
    /// [`Acl::allow_all`].
    pub fn from_config(entries: &[AclRuleConfig], file: Option<&Path>) -> Result<Acl, AclError> {
        let mut rules = Rules {
            restrictive: !entries.is_empty() || file.is_some(),
            ..Rules::default()
        };
        for (index, e) in entries.iter().enumerate() {
            let entry = |message: &str| AclError::Entry {
                index,
                message: message.to_string(),
            };
            let grant = Grant::from(e.access);
            match (&e.topic, &e.pattern, &e.user) {
                (Some(t), None, user) => {
                    topic::check_filter(t).map_err(|m| entry(&m))?;
                    rules.add(user.as_deref(), t, grant);
                }
                (None, Some(p), None) => {
                    topic::check_filter(p).map_err(|m| entry(&m))?;
                    rules.patterns.push(Rule {
                        filter: p.clone(),
                        grant,
                    });
                }
                (None, Some(_), Some(_)) => {
                    return Err(entry(
                        "a `pattern` applies to every client; it takes no `user`",
                    ))
                }
                _ => return Err(entry("needs exactly one of `topic` or `pattern`")),
            }
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| AclError::Read {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            parse_acl_file(&mut rules, path, &text)?;
        }
        Ok(Acl(Arc::new(rules)))
    }

    /// Parses the text of a Mosquitto acl_file alone (`path` names it in
    /// errors).
    pub fn from_acl_file_text(path: &Path, text: &str) -> Result<Acl, AclError> {
        let mut rules = Rules {
            restrictive: true,
            ..Rules::default()
        };
        parse_acl_file(&mut rules, path, text)?;
        Ok(Acl(Arc::new(rules)))
    }

    /// `false` for [`Acl::allow_all`].
    pub fn is_restrictive(&self) -> bool {
        self.0.restrictive
    }

    /// May this client do `access` on `topic` (a topic name for `Read` and
    /// `Write`, a filter for `Subscribe`)? `username` is `None` for a client
    /// that logged in without one.
    pub fn check<'a>(
        &'a self,
        username: Option<&str>,
        client_id: &str,
        topic: &str,
        access: Access,
    ) -> bool {
        let topic = match (access, topic.strip_prefix("$share/")) {
            // `$share/<group>/<filter>`: the filter is what is read.
            (Access::Subscribe, Some(rest)) => match rest.split_once('/') {
                Some((_, filter)) => filter,
                None => return false,
            },
            (_, Some(_)) => return false,
            (_, None) => topic,
        };
        if access == Access::Write && (topic == "$SYS" || topic.starts_with("$SYS/")) {
            return false;
        }
        let wildcard = topic.contains(['+', '#']);
        if wildcard && access != Access::Subscribe {
            // Topic names never hold wildcards; a broker must not ask.
            return false;
        }
        let rules = &self.0;
        if !rules.restrictive {
            return true;
        }
        let own = match username {
            Some(u) => rules.users.get(u),
            None => Some(&rules.anonymous),
        };
        if let Some(list) = own {
            match decide(list, topic, access, |f| Some(Cow::Borrowed(f))) {
                Decision::Allow => return true,
                Decision::Deny => return false,
                Decision::Undecided => {}
            }
        }
        if rules.patterns.0.is_empty() {
            return false;
        }
        // A `+`, `#` or `/` substituted into a pattern would widen it.
        let dangerous = |s: &str| s.contains(['+', '#', '/']);
        if username.is_some_and(dangerous) || dangerous(client_id) {
            tracing::debug!(
                client_id,
                "ACL: username or client id contains `+`, `#` or `/`; patterns do not apply"
            );
            return false;
        }
        let substitute = |f: &'a str| -> Option<Cow<'a, str>> {
            if !f.contains('%') {
                return Some(Cow::Borrowed(f));
            }
            // A `%u` pattern does not apply to a client without one.
            if username.is_none() && f.contains("%u") {
                return None;
            }
            Some(Cow::Owned(substitute_ids(f, client_id, username)))
        };
        matches!(
            decide(&rules.patterns, topic, access, substitute),
            Decision::Allow
        )
    }
}

/// `%c` -> client id, `%u` -> username, in one pass, so that an id
/// containing `%u` is not substituted again.
fn substitute_ids(pattern: &str, client_id: &str, username: Option<&str>) -> String {
    let mut out = String::with_capacity(pattern.len() + client_id.len());
    let mut rest = pattern;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        match (tail.get(..2), username) {
            (Some("%c"), _) => out.push_str(client_id),
            (Some("%u"), Some(u)) => out.push_str(u),
            _ => {
                out.push('%');
                rest = &tail[1..];
                continue;
            }
        }
        rest = &tail[2..];
    }
    out.push_str(rest);
    out
}

/// Walks one list (deny rules first) and stops at the first rule that
/// decides, as Mosquitto does. `filter_of` gives a rule's filter for this
/// client (patterns: substituted), `None` to skip the rule. Runs on every
/// delivery, so filters without `%` are borrowed, not copied.
fn decide<'r>(
    list: &'r RuleList,
    topic: &str,
    access: Access,
    filter_of: impl Fn(&'r str) -> Option<Cow<'r, str>>,
) -> Decision {
    for rule in &list.0 {
        let Some(filter) = filter_of(&rule.filter) else {
            continue;
        };
        let hit = match access {
            Access::Subscribe => topic::within(topic, &filter),
            Access::Read | Access::Write => topic::matches(&filter, topic),
        };
        if !hit {
            continue;
        }
        match (rule.grant, access) {
            (Grant::Deny, _) => return Decision::Deny,
            (Grant::Allow { read: true, .. }, Access::Subscribe | Access::Read) => {
                return Decision::Allow
            }
            (Grant::Allow { write: true, .. }, Access::Write) => return Decision::Allow,
            _ => {}
        }
    }
    Decision::Undecided
}

impl Rules {
    fn add(&mut self, user: Option<&str>, filter: &str, grant: Grant) {
        let rule = Rule {
            filter: filter.to_string(),
            grant,
        };
        match user {
            Some(u) => self.users.entry(u.to_string()).or_default().push(rule),
            None => self.anonymous.push(rule),
        }
    }
}

/// Mosquitto's acl_file: `# comment`, `user <name>`,
/// `topic [read|write|readwrite|deny] <filter>`,
/// `pattern [read|write|readwrite|deny] <filter>`; the access may be left
/// out (then `readwrite`), and a filter may contain spaces when the access
/// is given. Unlike Mosquitto, which logs and stops, every bad line is an
/// error naming `file:line`.
fn parse_acl_file(rules: &mut Rules, path: &Path, text: &str) -> Result<(), AclError> {
    let mut user: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let err = |message: String| AclError::Line(LineError::new(path, i + 1, message));
        let line = raw.trim_end();
        if line.starts_with('#') {
            continue;
        }
        let line = line.trim_start_matches(' ');
        let Some((keyword, rest)) = split_word(line) else {
            continue; // blank
        };
        match keyword {
            "user" => {
                let name = rest.trim_matches(' ');
                if name.is_empty() {
                    return Err(err("`user` needs a username".into()));
                }
                user = Some(name.to_string());
            }
            "topic" | "pattern" => {
                let Some((first, after)) = split_word(rest) else {
                    return Err(err(format!("`{keyword}` needs a topic")));
                };
                let (grant, filter) = match after.trim_matches(' ') {
                    "" => (Grant::from(AclAccess::Readwrite), first),
                    filter => {
                        let access = match first {
                            "read" => AclAccess::Read,
                            "write" => AclAccess::Write,
                            "readwrite" => AclAccess::Readwrite,
                            "deny" => AclAccess::Deny,
                            other => {
                                return Err(err(format!(
                                "unknown access `{other}`: expected read, write, readwrite or deny"
                            )))
                            }
                        };
                        (Grant::from(access), filter)
                    }
                };
                topic::check_filter(filter).map_err(err)?;
                if keyword == "topic" {
                    rules.add(user.as_deref(), filter, grant);
                } else {
                    rules.patterns.push(Rule {
                        filter: filter.to_string(),
                        grant,
                    });
                }
            }
            other => {
                return Err(err(format!(
                    "unknown keyword `{other}`: expected user, topic or pattern"
                )))
            }
        }
    }
    Ok(())
}

/// The first space-separated word and the rest after its space; `None`
/// for an empty line.
fn split_word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start_matches(' ');
    if s.is_empty() {
        return None;
    }
    Some(s.split_once(' ').unwrap_or((s, "")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Access::{Read, Subscribe, Write};

    fn yaml(text: &str) -> Acl {
        let entries: Vec<AclRuleConfig> = serde_yaml::from_str(text).unwrap();
        Acl::from_config(&entries, None).unwrap()
    }

    /// (username, client id, topic or filter, access, allowed)
    type Case<'a> = (Option<&'a str>, &'a str, &'a str, Access, bool);

    fn assert_cases(acl: &Acl, cases: &[Case]) {
        for &(user, client, topic, access, want) in cases {
            assert_eq!(
                acl.check(user, client, topic, access),
                want,
                "user {user:?} client {client} {access:?} {topic}"
            );
        }
    }

    /// The PV site: the charger may read `PV/#` and nothing else.
    const PV_SITE: &str = r##"
- { user: evse, topic: "PV/#", access: read }
- { user: scada, topic: "#", access: readwrite }
- { user: scada, topic: "cmd/relay/lock", access: deny }
- { pattern: "clients/%c/#", access: readwrite }
- { pattern: "users/%u/inbox", access: read }
- { topic: "public/#", access: read }
"##;

    #[test]
    fn the_pv_site() {
        let acl = yaml(PV_SITE);
        assert!(acl.is_restrictive());
        let evse = Some("evse");
        assert_cases(
            &acl,
            &[
                (evse, "ch1", "PV/data", Read, true),
                (evse, "ch1", "PV/inverter/power", Read, true),
                (evse, "ch1", "PV/#", Subscribe, true),
                (evse, "ch1", "PV/+/power", Subscribe, true),
                (evse, "ch1", "PV", Read, true),
                (evse, "ch1", "PV/data", Write, false),
                (evse, "ch1", "cmd/relay", Write, false),
                (evse, "ch1", "cmd/relay", Read, false),
                (evse, "ch1", "#", Subscribe, false),
                (evse, "ch1", "cmd/#", Subscribe, false),
                (evse, "ch1", "+/data", Subscribe, false),
                (evse, "ch1", "public/news", Read, false),
                // The patterns still apply to evse.
                (evse, "ch1", "clients/ch1/state", Write, true),
                (evse, "ch1", "clients/ch2/state", Write, false),
                (evse, "ch1", "users/evse/inbox", Read, true),
                (evse, "ch1", "users/scada/inbox", Read, false),
                // Deny wins over a broader grant, whatever the order.
                (Some("scada"), "s", "cmd/relay/lock", Write, false),
                (Some("scada"), "s", "cmd/relay/lock", Subscribe, false),
                (Some("scada"), "s", "cmd/relay/other", Write, true),
                (Some("scada"), "s", "#", Subscribe, true),
                // A user without rules of its own: only the patterns.
                (Some("guest"), "g", "PV/data", Read, false),
                (Some("guest"), "g", "clients/g/x", Read, true),
                (Some("guest"), "g", "public/news", Read, false),
                // Anonymous: the rules without a user, and %c patterns.
                (None, "anon", "public/news", Read, true),
                (None, "anon", "public/news", Write, false),
                (None, "anon", "PV/data", Read, false),
                (None, "anon", "clients/anon/x", Write, true),
                (None, "anon", "users/%u/inbox", Read, false),
            ],
        );
    }

    #[test]
    fn substitutions_cannot_widen_a_pattern() {
        let acl = yaml(
            r##"[{ pattern: "clients/%c/#", access: readwrite }, { pattern: "u/%u", access: readwrite }]"##,
        );
        assert_cases(
            &acl,
            &[
                (Some("a"), "c1", "clients/c1/x", Write, true),
                (Some("a"), "#", "clients/anything", Write, false),
                (Some("a"), "+", "clients/x/y", Write, false),
                (Some("a"), "c1/x", "clients/c1/x/y", Write, false),
                (Some("#"), "c1", "clients/c1/x", Write, false),
                (Some("a/b"), "c1", "u/a/b", Write, false),
                (Some("a"), "c1", "u/a", Write, true),
            ],
        );
    }

    #[test]
    fn substitution_is_one_pass() {
        assert_eq!(substitute_ids("c/%c/u/%u", "%u", Some("bob")), "c/%u/u/bob");
        assert_eq!(substitute_ids("%c%", "x", None), "x%");
        assert_eq!(substitute_ids("a/%x/%c", "é", None), "a/%x/é");
        let acl = yaml(r##"[{ pattern: "clients/%c/#", access: readwrite }]"##);
        assert!(!acl.check(Some("bob"), "%u", "clients/bob/x", Write));
    }

    #[test]
    fn a_deny_pattern_wins_over_a_granting_pattern() {
        let acl = yaml(
            r##"
- { pattern: "dev/%c/#", access: readwrite }
- { pattern: "dev/%c/secret", access: deny }
"##,
        );
        assert_cases(
            &acl,
            &[
                (Some("a"), "d1", "dev/d1/data", Write, true),
                (Some("a"), "d1", "dev/d1/secret", Read, false),
                (Some("a"), "d1", "dev/d1/#", Subscribe, true),
            ],
        );
    }

    #[test]
    fn dollar_topics() {
        let acl = yaml(
            r##"
- { user: a, topic: "#", access: readwrite }
- { user: mon, topic: "$SYS/#", access: readwrite }
"##,
        );
        assert_cases(
            &acl,
            &[
                (Some("a"), "c", "$SYS/broker/uptime", Read, false),
                (Some("a"), "c", "$SYS/#", Subscribe, false),
                (Some("mon"), "c", "$SYS/broker/uptime", Read, true),
                (Some("mon"), "c", "$SYS/broker/uptime", Write, false),
                (Some("a"), "c", "$share/g/PV/#", Subscribe, true),
                (Some("a"), "c", "$share/g/PV/x", Write, false),
                (Some("a"), "c", "$share/g", Subscribe, false),
            ],
        );
        let open = Acl::allow_all();
        assert!(!open.is_restrictive());
        assert!(open.check(Some("a"), "c", "anything/#", Subscribe));
        assert!(!open.check(Some("a"), "c", "$SYS/x", Write));
        assert!(!open.check(Some("a"), "c", "a/+", Write));
    }

    #[test]
    fn yaml_entries_are_checked() {
        let bad = |text: &str| {
            let entries: Vec<AclRuleConfig> = serde_yaml::from_str(text).unwrap();
            Acl::from_config(&entries, None).unwrap_err().to_string()
        };
        assert!(bad("[{ user: a, pattern: 'x/%u', access: read }]").contains("acl[0]"));
        assert!(bad("[{ topic: a, pattern: b, access: read }]").contains("exactly one"));
        assert!(bad("[{ access: read }]").contains("exactly one"));
        assert!(bad("[{ topic: 'a/#/b', access: read }]").contains("`#`"));
        assert!(serde_yaml::from_str::<Vec<AclRuleConfig>>("[{ topic: a, access: all }]").is_err());
    }

    const ACL_FILE: &str = "\
# Mosquitto acl_file
topic read public/#

user evse
topic read PV/#
topic deny cmd/#

user scada
topic #
topic write cmd/with space
pattern readwrite clients/%c/#
";

    #[test]
    fn an_acl_file_parses_like_mosquitto() {
        let acl = Acl::from_acl_file_text(Path::new("acl"), ACL_FILE).unwrap();
        assert_cases(
            &acl,
            &[
                (None, "x", "public/a", Read, true),
                (Some("evse"), "ch1", "PV/a", Read, true),
                (Some("evse"), "ch1", "public/a", Read, false),
                (Some("evse"), "ch1", "cmd/relay", Write, false),
                (Some("evse"), "ch1", "clients/ch1/a", Write, true),
                (Some("scada"), "s", "cmd/relay", Write, true),
                (Some("scada"), "s", "any/thing", Read, true),
                (Some("scada"), "s", "cmd/with space", Write, true),
            ],
        );
    }

    #[test]
    fn a_bad_acl_file_line_is_named() {
        let err = |text: &str| {
            Acl::from_acl_file_text(Path::new("/etc/mosquitto/acl"), text)
                .unwrap_err()
                .to_string()
        };
        let e = err("# ok\n\nuser a\ntopic raed PV/#\n");
        assert!(
            e.starts_with("/etc/mosquitto/acl:4: unknown access `raed`"),
            "{e}"
        );
        let e = err("user a\nallow PV/#\n");
        assert!(
            e.starts_with("/etc/mosquitto/acl:2: unknown keyword"),
            "{e}"
        );
        let e = err("topic read a/#/b\n");
        assert!(e.starts_with("/etc/mosquitto/acl:1: invalid filter"), "{e}");
        let e = err("user\n");
        assert!(e.contains(":1: `user` needs a username"), "{e}");
        let e = err("topic\n");
        assert!(e.contains(":1: `topic` needs a topic"), "{e}");
    }

    #[test]
    fn yaml_and_file_merge() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acl");
        std::fs::write(&path, "user evse\ntopic write cmd/evse/#\n").unwrap();
        let entries: Vec<AclRuleConfig> =
            serde_yaml::from_str(r##"[{ user: evse, topic: "PV/#", access: read }]"##).unwrap();
        let acl = Acl::from_config(&entries, Some(&path)).unwrap();
        assert!(acl.check(Some("evse"), "c", "PV/x", Read));
        assert!(acl.check(Some("evse"), "c", "cmd/evse/go", Write));
        assert!(!acl.check(Some("evse"), "c", "cmd/other", Write));
        let missing = Acl::from_config(&[], Some(&dir.path().join("nope"))).unwrap_err();
        assert!(matches!(missing, AclError::Read { .. }), "{missing}");
    }
}
