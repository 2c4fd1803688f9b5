use super::*;

fn limits(max_bytes: u64) -> QueueLimits {
    QueueLimits {
        max_bytes,
        max_age: None,
    }
}

fn msg(i: usize) -> Message {
    Message {
        topic: format!("PV/data/{i}"),
        payload: Bytes::from(format!("payload-{i}")),
        qos: Qos::AtLeastOnce,
        retain: i.is_multiple_of(2),
    }
}

fn msgs(range: std::ops::Range<usize>) -> Vec<Message> {
    range.map(msg).collect()
}

fn topics(q: &[QueuedMessage]) -> Vec<String> {
    q.iter().map(|m| m.topic.clone()).collect()
}

#[test]
fn append_peek_in_order_and_ack() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, rec) = Queue::open(dir.path(), "cloud", limits(1 << 20)).unwrap();
    assert_eq!(rec, Recovery::default());
    assert_eq!(q.append(&msgs(0..5)).unwrap(), 0);
    assert_eq!(q.append(&msgs(5..10)).unwrap(), 0);
    let all = q.peek_after(0, 100).unwrap();
    assert_eq!(
        topics(&all),
        msgs(0..10)
            .iter()
            .map(|m| m.topic.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(all[0].payload, Bytes::from("payload-0"));
    assert!(all[0].retain && !all[1].retain);
    assert_eq!(all[0].qos, Qos::AtLeastOnce);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));

    // peek after a cursor, with a limit
    let page = q.peek_after(all[3].id, 2).unwrap();
    assert_eq!(topics(&page), ["PV/data/4", "PV/data/5"]);

    // acks out of order; unknown ids are ignored
    q.ack(&[all[2].id, all[0].id, 999_999]).unwrap();
    assert_eq!(q.stats().depth, 8);
    let left = q.peek_after(0, 100).unwrap();
    assert_eq!(left[0].topic, "PV/data/1");
    assert_eq!(left[1].topic, "PV/data/3");
}

#[test]
fn replay_after_reopen_and_ids_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let last_id = {
        let (mut q, _) = Queue::open(dir.path(), "cloud", limits(1 << 20)).unwrap();
        q.append(&msgs(0..3)).unwrap();
        let all = q.peek_after(0, 10).unwrap();
        q.ack(&[all[2].id]).unwrap();
        all[2].id
    };
    let (mut q, rec) = Queue::open(dir.path(), "cloud", limits(1 << 20)).unwrap();
    assert!(rec.damaged_file.is_none());
    let stats = q.stats();
    assert_eq!(stats.depth, 2);
    assert_eq!(
        stats.bytes,
        msgs(0..2)
            .iter()
            .map(|m| message_size(&m.topic, &m.payload))
            .sum::<u64>()
    );
    assert_eq!(
        topics(&q.peek_after(0, 10).unwrap()),
        ["PV/data/0", "PV/data/1"]
    );
    // Even after the newest row was deleted, new ids continue above it.
    q.append(&msgs(3..4)).unwrap();
    let all = q.peek_after(0, 10).unwrap();
    assert!(all[2].id > last_id);
}

#[test]
fn max_bytes_drops_oldest_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let one = message_size(&msg(0).topic, &msg(0).payload);
    // Room for exactly 10 messages of this size (indexes 0..10 have equal size).
    let (mut q, _) = Queue::open(dir.path(), "cloud", limits(one * 10)).unwrap();
    assert_eq!(q.append(&msgs(0..10)).unwrap(), 0);
    let dropped = q.append(&msgs(0..3)).unwrap();
    assert_eq!(dropped, 3);
    let stats = q.stats();
    assert_eq!(stats.depth, 10);
    assert_eq!(stats.dropped, 3);
    assert!(stats.bytes <= one * 10);
    let left = q.peek_after(0, 100).unwrap();
    assert_eq!(left[0].topic, "PV/data/3", "the oldest three were dropped");
    assert_eq!(left[9].topic, "PV/data/2", "the newest is kept");
}

#[test]
fn oversize_message_is_dropped_not_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, _) = Queue::open(dir.path(), "cloud", limits(200)).unwrap();
    q.append(&msgs(0..2)).unwrap();
    let big = Message::new("big", vec![0u8; 500]);
    assert_eq!(q.append(&[big]).unwrap(), 1);
    assert_eq!(q.stats().depth, 2);
    assert_eq!(q.stats().dropped, 1);
}

#[test]
fn shrunk_limit_applies_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let one = message_size(&msg(0).topic, &msg(0).payload);
    {
        let (mut q, _) = Queue::open(dir.path(), "cloud", limits(1 << 20)).unwrap();
        q.append(&msgs(0..10)).unwrap();
    }
    let (q, _) = Queue::open(dir.path(), "cloud", limits(one * 4)).unwrap();
    assert_eq!(q.stats().depth, 4);
    assert_eq!(q.stats().dropped, 6);
}

#[test]
fn max_age_expires_old_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, _) = Queue::open(
        dir.path(),
        "cloud",
        QueueLimits {
            max_bytes: 1 << 20,
            max_age: Some(Duration::from_secs(3600)),
        },
    )
    .unwrap();
    q.append(&msgs(0..3)).unwrap();
    assert_eq!(q.expire().unwrap(), 0);
    // Age the first two rows by two hours.
    q.conn
        .execute(
            "UPDATE messages SET ts = ts - 7200000 WHERE id <= (SELECT MIN(id) + 1 FROM messages)",
            [],
        )
        .unwrap();
    assert_eq!(q.expire().unwrap(), 2);
    assert_eq!(q.stats().depth, 1);
    assert_eq!(q.stats().dropped, 2);
    assert_eq!(topics(&q.peek_after(0, 10).unwrap()), ["PV/data/2"]);
}

#[cfg(unix)]
#[test]
fn files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("data");
    let (mut q, _) = Queue::open(&dir, "cloud", limits(1 << 20)).unwrap();
    q.append(&msgs(0..1)).unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(q.path()), 0o600);
    let mut wal = q.path().as_os_str().to_owned();
    wal.push("-wal");
    assert_eq!(mode(Path::new(&wal)), 0o600);
}

#[test]
fn survives_a_crash_without_close() {
    // Simulate kill -9: the connection is leaked, never closed or
    // checkpointed, so the committed rows live only in the WAL.
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut q, _) = Queue::open(dir.path(), "cloud", limits(1 << 20)).unwrap();
        q.append(&msgs(0..50)).unwrap();
        std::mem::forget(q);
    }
    let (q, rec) = Queue::open(dir.path(), "cloud", limits(1 << 20)).unwrap();
    assert!(rec.damaged_file.is_none());
    assert_eq!(q.stats().depth, 50);
}

/// A closed queue of 40 messages `t/0`..`t/39` of 400 bytes (big enough
/// that the rows span several pages); its file.
fn closed_queue_of_40(dir: &Path) -> PathBuf {
    let (mut q, _) = Queue::open(dir, "cloud", limits(1 << 20)).unwrap();
    for i in 0..40 {
        q.append(&[Message::new(format!("t/{i}"), vec![b'x'; 400])])
            .unwrap();
    }
    q.path().to_path_buf()
    // dropped here: closing checkpoints the WAL into the main file
}

/// Overwrites the end of the closed queue file (the page that holds the
/// newest rows) with garbage.
fn damage_tail(path: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    let len = fs::metadata(path).unwrap().len();
    let mut f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(len - 2048)).unwrap();
    f.write_all(&[0xA5; 2048]).unwrap();
}

#[test]
fn damaged_last_record_is_detected_and_survived() {
    let dir = tempfile::tempdir().unwrap();
    let path = closed_queue_of_40(dir.path());
    damage_tail(&path);

    let (mut q, rec) = Queue::open(dir.path(), "cloud", limits(1 << 20)).unwrap();
    let damaged = rec.damaged_file.clone().expect("damage is reported");
    assert!(damaged.exists(), "the damaged file is kept for inspection");
    assert!(rec.detail.is_some());
    // The rows before the damaged page are still there, in order.
    let left = q.peek_after(0, 100).unwrap();
    assert_eq!(left.len() as u64, rec.salvaged);
    assert!(
        rec.salvaged > 0 && rec.salvaged < 40,
        "salvaged {}",
        rec.salvaged
    );
    for (i, m) in left.iter().enumerate() {
        assert_eq!(m.topic, format!("t/{i}"));
    }
    // And the queue keeps working.
    q.append(&[Message::new("after", "x")]).unwrap();
    let all = q.peek_after(0, 100).unwrap();
    assert_eq!(all.last().unwrap().topic, "after");
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));
}

#[test]
fn truncated_file_is_detected_and_survived() {
    let dir = tempfile::tempdir().unwrap();
    let path = closed_queue_of_40(dir.path());
    let len = fs::metadata(&path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 3000)
        .unwrap();
    let (mut q, rec) = Queue::open(dir.path(), "cloud", limits(1 << 20)).unwrap();
    assert!(rec.damaged_file.is_some());
    q.append(&[Message::new("after", "x")]).unwrap();
    assert_eq!(q.stats().depth, rec.salvaged + 1);
}

#[test]
fn garbage_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        Queue::file_path(dir.path(), "cloud"),
        b"this is not sqlite at all, sorry",
    )
    .unwrap();
    let (mut q, rec) = Queue::open(dir.path(), "cloud", limits(1 << 20)).unwrap();
    assert!(rec.damaged_file.is_some());
    assert_eq!(rec.salvaged, 0);
    q.append(&msgs(0..1)).unwrap();
    assert_eq!(q.stats().depth, 1);
}

/// Regression (fuzz target `queue_recovery`): a damaged file whose TEXT
/// column is not UTF-8 made the salvage panic inside rusqlite.
#[test]
fn salvage_copies_rows_with_invalid_utf8_text() {
    let dir = tempfile::tempdir().unwrap();
    let damaged = dir.path().join("damaged.db");
    {
        let c = Connection::open(&damaged).unwrap();
        c.execute_batch(SCHEMA).unwrap();
        c.execute(
            "INSERT INTO messages (id, ts, qos, retain, size, topic, payload) \
             VALUES (7, 0, 1, 0, 3, CAST(x'41ff42' AS TEXT), x'00')",
            [],
        )
        .unwrap();
    }
    let into = Connection::open_in_memory().unwrap();
    into.execute_batch(SCHEMA).unwrap();
    assert_eq!(copy_readable_rows(&damaged, &into), 1);
    let id: i64 = into
        .query_row("SELECT id FROM messages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(id, 7);
}

/// Rows in the file, read by a second connection (what a crash leaves).
fn rows_on_disk(dir: &Path) -> i64 {
    let conn = Connection::open(Queue::file_path(dir, "cloud")).unwrap();
    conn.query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn staged_messages_count_at_once_and_reach_the_disk_on_flush() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, _) = Queue::open(dir.path(), "cloud", limits(1 << 20)).unwrap();
    let mut ids = Vec::new();
    q.stage(&msgs(0..3), &mut ids).unwrap();
    assert_eq!(ids.iter().map(|&(i, _)| i).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(q.stats().depth, 3);
    assert!(q.unwritten_since().is_some());
    assert_eq!(rows_on_disk(dir.path()), 0, "staged, not written");
    // Readable before they are written, in order, after older rows.
    q.flush().unwrap();
    q.stage(&msgs(3..5), &mut ids).unwrap();
    assert_eq!(
        topics(&q.peek_after(0, 10).unwrap()),
        [
            "PV/data/0",
            "PV/data/1",
            "PV/data/2",
            "PV/data/3",
            "PV/data/4"
        ]
    );
    assert_eq!(rows_on_disk(dir.path()), 3);
    q.flush().unwrap();
    assert_eq!(rows_on_disk(dir.path()), 5);
    assert!(q.unwritten_since().is_none());
}

#[test]
fn a_staged_message_acknowledged_in_time_never_touches_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, _) = Queue::open(dir.path(), "cloud", limits(1 << 20)).unwrap();
    let mut ids = Vec::new();
    q.stage(&msgs(0..4), &mut ids).unwrap();
    let staged: Vec<i64> = ids.iter().map(|&(_, id)| id).collect();
    q.ack_later(&staged[..3]);
    assert_eq!(q.stats().depth, 1);
    assert_eq!(
        q.stats().bytes,
        message_size(&msg(3).topic, &msg(3).payload)
    );
    q.flush().unwrap();
    assert_eq!(rows_on_disk(dir.path()), 1, "only the unacknowledged one");
    assert_eq!(topics(&q.peek_after(0, 10).unwrap()), ["PV/data/3"]);
}

#[test]
fn acknowledged_rows_are_deleted_by_the_next_flush_and_never_peeked_again() {
    let dir = tempfile::tempdir().unwrap();
    let (mut q, _) = Queue::open(dir.path(), "cloud", limits(1 << 20)).unwrap();
    q.append(&msgs(0..10)).unwrap();
    let all = q.peek_after(0, 100).unwrap();
    // Two runs and a single one: 1..=3, 5, 7..=8 (by position).
    let acked: Vec<i64> = [1, 2, 3, 5, 7, 8].iter().map(|&i| all[i].id).collect();
    q.ack_later(&acked);
    assert_eq!(rows_on_disk(dir.path()), 10, "deleted later");
    assert!(q.unwritten_since().is_some());
    // A peek from the start does not return them.
    assert_eq!(
        topics(&q.peek_after(0, 100).unwrap()),
        ["PV/data/0", "PV/data/4", "PV/data/6", "PV/data/9"]
    );
    assert_eq!(rows_on_disk(dir.path()), 4);
    assert_eq!(q.stats().depth, 4);
    assert_eq!(
        q.stats().bytes,
        [0, 4, 6, 9]
            .iter()
            .map(|&i| message_size(&msg(i).topic, &msg(i).payload))
            .sum::<u64>()
    );
}

#[test]
fn closing_the_queue_writes_what_is_staged() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut q, _) = Queue::open(dir.path(), "cloud", limits(1 << 20)).unwrap();
        q.stage(&msgs(0..3), &mut Vec::new()).unwrap();
        let first = q.peek_after(0, 1).unwrap()[0].id;
        q.append(&msgs(3..4)).unwrap();
        q.ack_later(&[first]);
    }
    let (mut q, _) = Queue::open(dir.path(), "cloud", limits(1 << 20)).unwrap();
    assert_eq!(
        topics(&q.peek_after(0, 10).unwrap()),
        ["PV/data/1", "PV/data/2", "PV/data/3"]
    );
}

#[test]
fn staged_messages_count_against_max_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let one = message_size(&msg(0).topic, &msg(0).payload);
    let (mut q, _) = Queue::open(dir.path(), "cloud", limits(one * 3)).unwrap();
    let dropped = q.stage(&msgs(0..5), &mut Vec::new()).unwrap().0;
    assert_eq!(dropped, 2);
    assert_eq!(q.stats().dropped, 2);
    assert_eq!(
        topics(&q.peek_after(0, 10).unwrap()),
        ["PV/data/2", "PV/data/3", "PV/data/4"]
    );
}

/// A zero-length file (a crash right after the file was made) is reported,
/// not silently taken for a new queue; the queue then works.
#[test]
fn a_zero_length_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(Queue::file_path(dir.path(), "cloud"), b"").unwrap();
    let (mut q, rec) = Queue::open(dir.path(), "cloud", limits(1 << 20)).unwrap();
    assert_eq!(rec.salvaged, 0);
    assert!(
        rec.detail
            .as_deref()
            .is_some_and(|d| d.contains("empty (0 bytes)")),
        "{rec:?}"
    );
    q.append(&msgs(0..3)).unwrap();
    drop(q);
    let (q, rec) = Queue::open(dir.path(), "cloud", limits(1 << 20)).unwrap();
    assert_eq!(rec, Recovery::default(), "a good file is not reported");
    assert_eq!(q.stats().depth, 3);
}

/// What the queue's files take on disk, as `du` counts it.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// `max_bytes` bounds the queue's files on disk, WAL included (issue 13:
/// 512 KiB of limit let the WAL alone grow to 2 MiB): through a long
/// outage the files stay within the limit plus the documented margin, the
/// oldest messages are dropped and every drop is counted, and what is kept
/// is the newest, in order.
#[test]
fn max_bytes_bounds_the_files_on_disk() {
    const MAX: u64 = 512 * 1024;
    // The `-shm` index (32 KiB) and one append batch of WAL.
    const MARGIN: u64 = 32 * 1024 + 128 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let (mut q, _) = Queue::open(dir.path(), "cloud", limits(MAX)).unwrap();
    let payload = Bytes::from(vec![b'x'; 200]);
    let mut appended = 0u64;
    let mut peak = 0;
    for batch in 0..200 {
        let msgs: Vec<Message> = (0..100)
            .map(|i| Message {
                topic: format!("PV/data/{}", batch * 100 + i),
                payload: payload.clone(),
                qos: Qos::AtLeastOnce,
                retain: false,
            })
            .collect();
        q.append(&msgs).unwrap();
        appended += msgs.len() as u64;
        peak = peak.max(disk_usage(dir.path()));
    }
    let stats = q.stats();
    eprintln!("peak {peak} bytes on disk, {stats:?}");
    assert!(
        peak <= MAX + MARGIN,
        "the files took {peak} bytes for a max_bytes of {MAX}"
    );
    assert_eq!(
        stats.depth + stats.dropped,
        appended,
        "every message is either queued or counted as dropped: {stats:?}"
    );
    assert!(stats.dropped > 0 && stats.depth > 500, "{stats:?}");
    let kept = q.peek_after(0, usize::MAX >> 1).unwrap();
    assert_eq!(kept.len() as u64, stats.depth);
    assert_eq!(
        kept.last().unwrap().topic,
        format!("PV/data/{}", appended - 1),
        "the newest are kept"
    );
    assert!(kept.windows(2).all(|w| w[0].id < w[1].id));
}
