//! Retained messages across restarts, as Mosquitto's `persistence true`
//! keeps them: written to `data_dir/broker-retained.json` when the gateway
//! stops and published again (retained) when it starts. rmqtt-retainer's
//! persistent stores need sled or redis; a JSON file of what is retained is
//! all a gateway needs (a few hundred status and value topics).

use std::path::Path;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::model::{Message, Qos};

#[derive(Serialize, Deserialize)]
struct Stored {
    topic: String,
    /// Base64: payloads are bytes, not always text.
    payload: String,
    qos: u8,
}

/// The retained messages saved in `file`; none when it does not exist or
/// cannot be read (logged: a damaged file must not stop the gateway).
pub fn load(file: &Path) -> Vec<Message> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "cannot read the saved retained messages");
            return Vec::new();
        }
    };
    let stored: Vec<Stored> = match serde_json::from_str(&text) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "the saved retained messages are damaged; starting without them");
            return Vec::new();
        }
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    stored
        .into_iter()
        .filter_map(|s| {
            let payload = b64.decode(s.payload).ok()?;
            Some(Message {
                topic: s.topic,
                payload: payload.into(),
                qos: Qos::from_u8(s.qos).unwrap_or_default(),
                retain: true,
            })
        })
        .collect()
}

/// Writes `messages` to `file` (through a temporary file and a rename, so
/// that a crash half-way leaves the previous file whole).
pub fn save(file: &Path, messages: &[Message]) {
    let b64 = base64::engine::general_purpose::STANDARD;
    let stored: Vec<Stored> = messages
        .iter()
        .map(|m| Stored {
            topic: m.topic.clone(),
            payload: b64.encode(&m.payload),
            qos: m.qos as u8,
        })
        .collect();
    let result = serde_json::to_vec(&stored)
        .map_err(std::io::Error::other)
        .and_then(|json| replace_private(file, &json));
    match result {
        Ok(()) => {
            tracing::debug!(file = %file.display(), count = messages.len(), "retained messages saved")
        }
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "cannot save the retained messages")
        }
    }
}

/// Like the bridge queues: the data folder is the service user's alone
/// (0700), its files 0600; retained payloads can be private.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Puts `bytes` in `file`, readable by the service user alone, through a
/// temporary file and a rename (a crash half-way leaves the previous file
/// whole); the folder is made (0700) if needed.
pub fn replace_private(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        private_dir(dir)?;
    }
    let tmp = file.with_extension("json.tmp");
    write_private(&tmp, bytes)?;
    std::fs::rename(&tmp, file)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_messages_load_back_as_retained() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/retained.json");
        let mut m = Message::new("PV/data", vec![0u8, 0xff, b'x']);
        m.qos = Qos::AtLeastOnce;
        save(&file, &[m.clone()]);
        let back = load(&file);
        assert_eq!(back, vec![Message { retain: true, ..m }]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "readable by others: {mode:o}");
    }

    #[test]
    fn a_damaged_file_loads_as_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("retained.json");
        std::fs::write(&file, "{not json").unwrap();
        assert!(load(&file).is_empty());
        assert!(load(&dir.path().join("missing.json")).is_empty());
    }
}
