//! MQTT topic filters: validity and matching, shared by the bridges'
//! forward filters and loop guard and the rules' `SUBSCRIBE` lists; and
//! [`Echoes`], the one loop guard for messages a component will receive
//! back because it published them itself.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Checks an MQTT topic filter: not empty, `#` only as the last level,
/// `+` and `#` only as whole levels.
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("a topic filter cannot be empty".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(format!(
                "invalid filter `{filter}`: `#` must be a whole level and the last one"
            ));
        }
        if level.contains('\0') {
            return Err(format!(
                "invalid filter `{filter}`: it contains a NUL character"
            ));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!(
                "invalid filter `{filter}`: `+` must be a whole level"
            ));
        }
    }
    Ok(())
}

/// Whether `topic` matches `filter` (MQTT rules; topics starting with `$`
/// do not match a leading wildcard).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every topic that `filter` can match is also matched by `outer`
/// (the filter is a subset of `outer`). The ACL needs this to answer a
/// SUBSCRIBE: `PV/+/power` lies within `PV/#`, `#` does not lie within
/// `PV/#`. A `$` topic is only within a filter whose first level is the
/// same literal, as in [`matches`].
pub fn within(filter: &str, outer: &str) -> bool {
    let mut f = filter.split('/');
    let mut o = outer.split('/');
    let mut first = true;
    loop {
        match (f.next(), o.next()) {
            (Some(a), Some("+" | "#")) if first && a.starts_with('$') => return false,
            (_, Some("#")) => return true,
            (Some("#"), _) => return false,
            (Some("+"), Some("+")) => {}
            (Some("+"), Some(_)) => return false,
            (Some(_), Some("+")) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

/// Messages a component published that its own subscription will hand
/// back to it (a bridge's downlink that its forward filters match; what
/// the rules publish on topics their `SUBSCRIBE` matches). Each expected
/// message is swallowed once, by topic and payload; any other message, or
/// the same one a second time, is real. Remembered at most `ttl` and at
/// most `limit` of them (the oldest go first), so an echo that never
/// comes costs nothing for long.
///
/// Times are arguments, so the guard is tested without waiting.
#[derive(Debug)]
pub struct Echoes {
    ttl: Duration,
    limit: usize,
    expected: VecDeque<(Instant, String, Bytes)>,
}

impl Echoes {
    pub fn new(ttl: Duration, limit: usize) -> Echoes {
        Echoes {
            ttl,
            limit: limit.max(1),
            expected: VecDeque::new(),
        }
    }

    /// Remembers that `topic`/`payload`, published at `now`, will come back.
    pub fn expect(&mut self, topic: &str, payload: &Bytes, now: Instant) {
        self.expire(now);
        if self.expected.len() >= self.limit {
            self.expected.pop_front();
        }
        self.expected
            .push_back((now, topic.to_string(), payload.clone()));
    }

    /// Whether a message received at `now` is an expected echo; if so it
    /// is expected no more.
    pub fn is_echo(&mut self, topic: &str, payload: &[u8], now: Instant) -> bool {
        self.expire(now);
        match self
            .expected
            .iter()
            .position(|(_, t, p)| t == topic && p == payload)
        {
            Some(i) => {
                self.expected.remove(i);
                true
            }
            None => false,
        }
    }

    /// How many echoes are still expected.
    pub fn len(&self) -> usize {
        self.expected.len()
    }

    pub fn is_empty(&self) -> bool {
        self.expected.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while self
            .expected
            .front()
            .is_some_and(|(at, _, _)| now.saturating_duration_since(*at) > self.ttl)
        {
            self.expected.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_expected_echo_is_swallowed_once() {
        let t0 = Instant::now();
        let mut g = Echoes::new(Duration::from_secs(10), 16);
        let on = Bytes::from("on");
        g.expect("cmd/led", &on, t0);
        assert!(!g.is_echo("cmd/led", b"off", t0));
        assert!(!g.is_echo("cmd/other", b"on", t0));
        assert!(g.is_echo("cmd/led", b"on", t0));
        assert!(
            !g.is_echo("cmd/led", b"on", t0),
            "a second, real message passes"
        );
    }

    #[test]
    fn echoes_expire_and_are_bounded() {
        let t0 = Instant::now();
        let mut g = Echoes::new(Duration::from_secs(10), 2);
        let p = Bytes::from("1");
        g.expect("a", &p, t0);
        assert!(
            !g.is_echo("a", b"1", t0 + Duration::from_secs(11)),
            "too late"
        );
        assert!(g.is_empty());
        for topic in ["a", "b", "c"] {
            g.expect(topic, &p, t0);
        }
        assert_eq!(g.len(), 2);
        assert!(!g.is_echo("a", b"1", t0), "the oldest went first");
        assert!(g.is_echo("c", b"1", t0));
    }

    #[test]
    fn filters_are_checked() {
        for ok in ["#", "PV/#", "a/+/c", "+", "a/b"] {
            assert!(check_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "PV/da#"] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn filters_within_filters() {
        let cases = [
            ("PV/#", "PV/#", true),
            ("PV/+/power", "PV/#", true),
            ("PV", "PV/#", true),
            ("PV/a", "PV/+", true),
            ("PV/+", "PV/+", true),
            ("#", "PV/#", false),
            ("cmd/#", "PV/#", false),
            ("PV/#", "PV/+", false),
            ("PV/+", "PV/a", false),
            ("PV/a/b", "PV/+", false),
            ("PV", "PV/+", false),
            ("a/b", "#", true),
            ("$SYS/x", "#", false),
            ("$SYS/x", "+/x", false),
            ("$SYS/x", "$SYS/#", true),
        ];
        for (filter, outer, want) in cases {
            assert_eq!(within(filter, outer), want, "{filter} within {outer}");
        }
    }

    #[test]
    fn matching() {
        assert!(matches("PV/#", "PV/data"));
        assert!(matches("PV/#", "PV"));
        assert!(matches("PV/#", "PV/a/b"));
        assert!(matches("+/data", "PV/data"));
        assert!(!matches("+/data", "PV/data/x"));
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/c"));
        assert!(!matches("#", "$SYS/x"));
        assert!(matches("cmd/+/set", "cmd/led/set"));
    }
}
