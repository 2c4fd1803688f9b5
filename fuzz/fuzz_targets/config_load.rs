//! YAML text -> validated config. Properties: never panics, and every error
//! names the file and a line (column may be unknown only together with the
//! line, which is reported as a bug here too).
#![no_main]

use std::path::Path;

use edgebridge::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Variables whose name starts with `UNSET` are missing; others are set,
    // so both the substitution and the "not set" path are exercised.
    let env = |k: &str| (!k.starts_with("UNSET")).then(|| format!("v-{k}"));
    if let Err(errors) = Config::from_text(Path::new("fuzz.yaml"), text, env) {
        assert!(!errors.0.is_empty(), "an error list without errors");
        for e in &errors.0 {
            assert_eq!(e.file, Path::new("fuzz.yaml"));
            assert!(!e.message.is_empty(), "an error without a message");
            assert!(e.line > 0, "error without a location: {e}");
        }
    }
});
