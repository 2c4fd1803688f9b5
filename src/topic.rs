//! MQTT topic filters: validity and matching, shared by the bridges'
//! forward filters and loop guard and the rules' `SUBSCRIBE` lists.

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

#[cfg(test)]
mod tests {
    use super::*;

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
