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
