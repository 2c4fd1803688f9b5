//! The bridge's durable queue reopened from a damaged file: a valid queue
//! file with messages in it, truncated and with bytes overwritten where
//! the input says. Properties: `Queue::open` never panics; it either opens
//! (salvaging what it can read) or returns an error; an opened queue can be
//! read, appended to, acknowledged and reopened.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use edgebridge::bridge::queue::{Queue, QueueLimits};
use edgebridge::model::Message;
use libfuzzer_sys::fuzz_target;

const LIMITS: QueueLimits = QueueLimits {
    max_bytes: 1 << 20,
    max_age: None,
};

/// The bytes of a healthy queue file holding a few messages.
fn healthy() -> &'static Vec<u8> {
    static FILE: OnceLock<Vec<u8>> = OnceLock::new();
    FILE.get_or_init(|| {
        let dir = tempfile_dir("healthy");
        {
            let (mut q, _) = Queue::open(&dir, "fuzz", LIMITS).expect("fresh queue");
            let msgs: Vec<Message> = (0..40)
                .map(|i| Message::new(format!("site/t/{i}"), vec![b'x'; 10 + i * 7]))
                .collect();
            q.append(&msgs).expect("append");
            let first = q.peek_after(0, 5).expect("peek");
            let ids: Vec<i64> = first.iter().map(|m| m.id).collect();
            q.ack(&ids).expect("ack");
        }
        std::fs::read(Queue::file_path(&dir, "fuzz")).expect("queue file")
    })
}

fn tempfile_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "edgebridge-fuzz-queue-{}-{tag}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fuzz_target!(|input: (u32, Vec<(u32, u8)>, bool)| {
    let (cut, edits, with_wal_garbage) = input;
    let mut bytes = healthy().clone();
    for (at, b) in edits.iter().take(64) {
        if !bytes.is_empty() {
            let i = *at as usize % bytes.len();
            bytes[i] = *b;
        }
    }
    if cut != u32::MAX && !bytes.is_empty() {
        bytes.truncate(cut as usize % (bytes.len() + 1));
    }
    let dir = tempfile_dir("case");
    let path = Queue::file_path(&dir, "fuzz");
    std::fs::write(&path, &bytes).expect("write damaged file");
    if with_wal_garbage {
        let mut wal = path.clone().into_os_string();
        wal.push("-wal");
        let garbage: Vec<u8> = edits
            .iter()
            .flat_map(|(a, b)| a.to_le_bytes().into_iter().chain([*b]))
            .collect();
        std::fs::write(wal, garbage).expect("write wal");
    }
    if let Ok((mut q, _recovery)) = Queue::open(&dir, "fuzz", LIMITS) {
        if let Ok(msgs) = q.peek_after(0, 100) {
            let ids: Vec<i64> = msgs.iter().take(3).map(|m| m.id).collect();
            let _ = q.ack(&ids);
        }
        let _ = q.append(&[Message::new("after/recovery", "1")]);
        drop(q);
        let reopened = Queue::open(&dir, "fuzz", LIMITS);
        assert!(
            reopened.is_ok(),
            "a recovered queue does not reopen: {:?}",
            reopened.err()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
});
