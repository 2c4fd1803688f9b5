//! The code map's import rules (ARCHITECTURE.md, "must not import"),
//! checked on the source: a change that breaks one fails here and either
//! moves the code or changes the map.

use std::path::{Path, PathBuf};

/// (folder or file under `src/`, the top-level modules it must not use).
const RULES: &[(&str, &[&str])] = &[
    (
        "model.rs",
        &[
            "access", "bridge", "broker", "bus", "cli", "config", "drivers", "gateway", "ops",
            "pipeline", "status",
        ],
    ),
    (
        "topic.rs",
        &[
            "access", "bridge", "broker", "bus", "cli", "config", "drivers", "gateway", "ops",
            "pipeline", "status",
        ],
    ),
    (
        "drivers",
        &["bus", "broker", "bridge", "pipeline", "gateway", "cli"],
    ),
    ("pipeline", &["broker", "bridge", "gateway", "cli"]),
    (
        "status.rs",
        &["bridge", "broker", "pipeline", "gateway", "cli"],
    ),
    ("bus.rs", &["pipeline", "drivers", "gateway", "cli"]),
    ("broker", &["pipeline", "drivers", "gateway", "cli"]),
    (
        "bridge",
        &["pipeline", "drivers", "gateway", "cli", "status"],
    ),
    (
        "access",
        &[
            "bridge", "broker", "bus", "cli", "drivers", "gateway", "ops", "pipeline", "status",
        ],
    ),
    ("ops", &["pipeline", "drivers", "gateway", "cli"]),
    (
        "config",
        &[
            "bus",
            "broker",
            "gateway",
            "cli",
            "pipeline::rules",
            "status",
        ],
    ),
];

fn sources(at: &Path) -> Vec<PathBuf> {
    if at.is_file() {
        return vec![at.to_path_buf()];
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(at).unwrap().flatten() {
        files.extend(sources(&entry.path()));
    }
    files.retain(|f| f.extension().is_some_and(|e| e == "rs"));
    files
}

#[test]
fn each_folder_imports_only_what_the_code_map_allows() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut broken = Vec::new();
    for (part, forbidden) in RULES {
        for file in sources(&src.join(part)) {
            let text = std::fs::read_to_string(&file).unwrap();
            // `use crate::{a::X, b};` on one line: its parts, as paths.
            let lines = text
                .lines()
                .map(|l| match l.trim().strip_prefix("use crate::{") {
                    Some(group) => group
                        .split(',')
                        .map(|part| format!("crate::{}", part.trim()))
                        .collect::<Vec<_>>()
                        .join(" "),
                    None => l.to_string(),
                });
            for (n, line) in lines.enumerate() {
                // Doc links name other parts without depending on them.
                if line.trim_start().starts_with("//") {
                    continue;
                }
                for module in *forbidden {
                    if line.contains(&format!("crate::{module}")) {
                        broken.push(format!(
                            "{}:{}: uses crate::{module}",
                            file.strip_prefix(&src).unwrap().display(),
                            n + 1
                        ));
                    }
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "ARCHITECTURE.md says no:\n{}",
        broken.join("\n")
    );
}
