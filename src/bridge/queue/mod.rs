//! The durable per-bridge queue: every message taken for forwarding is
//! appended here first and deleted only after the remote broker acknowledged
//! it.
//!
//! # Why SQLite (rusqlite, bundled)
//! - Crash safety is SQLite's job and it is very good at it: a transaction is
//!   either in the file or not, also after `kill -9` or a power cut in the
//!   middle of a write. Writing our own append-only log would mean writing
//!   our own checksums, recovery and compaction, which is where the
//!   Mosquitto/NanoMQ bridges lost messages.
//! - WAL mode gives cheap group commits (one transaction per batch of
//!   appends or acks, no fsync per commit with `synchronous=NORMAL`), and
//!   deleting acknowledged rows reuses pages, so the file does not grow
//!   without bound while a long outage drains.
//! - `PRAGMA quick_check` and WAL frame checksums detect a damaged file; we
//!   salvage what can still be read into a fresh file and keep the damaged
//!   one next to it for inspection.
//! - It is compiled in (`bundled`), so there is no system library to match
//!   on a small gateway. redb would also fit, but it has no equivalent of
//!   the row-level salvage we need for a damaged file.
//!
//! With `synchronous=NORMAL` a committed transaction survives a crash of the
//! process (the WAL is in the OS page cache); a power cut may lose the last
//! transactions committed since the last checkpoint, never corrupt the file.
//!
//! # Batched deletes, optional write-behind
//! [`Queue::append_with_ids`] and [`Queue::ack`] write at once. The generic
//! bridge acknowledges with [`Queue::ack_later`]: the deletes go into the
//! transaction of the next append, or a [`Queue::flush`] within a few
//! milliseconds, one statement per run of consecutive ids (single-row
//! deletes, one transaction per batch of acks, were 43 % of the bridge's
//! time in a backlog drain). With `queue.write_behind` it also appends with
//! [`Queue::stage`] while connected: a message acknowledged before the
//! flush is never written. Staged messages are counted, peeked and limited
//! like written ones, and are written when the queue is closed.
//!
//! # Blocking
//! Calls are synchronous. The bridge calls them from its task: a WAL commit
//! without fsync takes tens of microseconds, about one system call's worth,
//! so moving each call to a blocking thread would cost more than it saves.
//! Opening is different: it may run `quick_check` over the whole file and
//! salvage a damaged one, seconds on an SD card. Async code opens with
//! [`Queue::open_async`], which does that on the blocking pool.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::{params, Connection, ErrorCode, OpenFlags};

use crate::model::{now_ms, Message, Millis, Qos};

/// Fixed per-message overhead counted against `max_bytes` besides topic and
/// payload (row header, id, timestamp): keeps a flood of empty payloads from
/// being free.
const ROW_OVERHEAD: u64 = 32;

/// Staged messages, at most, before [`Queue::stage`] writes them itself.
const MAX_STAGED: usize = 16_384;

/// Errors of the durable queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot create queue directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("cannot create queue file {path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("queue {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("queue {path} is damaged: {detail}")]
    Corrupt { path: PathBuf, detail: String },
}

impl QueueError {
    /// True when the file is damaged; reopening the queue recovers it.
    pub fn is_corrupt(&self) -> bool {
        match self {
            QueueError::Corrupt { .. } => true,
            QueueError::Sqlite { source, .. } => is_corruption(source),
            _ => false,
        }
    }
}

impl QueueError {
    /// True when SQLite could not get more room: the file system is full
    /// (or the file is at its budget, which [`Queue::flush`] handles).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, QueueError::Sqlite { source, .. }
            if source.sqlite_error_code() == Some(ErrorCode::DiskFull))
    }
}

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

/// Limits of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Past this, the oldest messages are dropped.
    pub max_bytes: u64,
    /// Messages older than this are dropped by [`Queue::expire`].
    pub max_age: Option<Duration>,
}

impl From<&crate::config::QueueConfig> for QueueLimits {
    fn from(c: &crate::config::QueueConfig) -> Self {
        QueueLimits {
            max_bytes: c.max_bytes.0,
            max_age: c.max_age,
        }
    }
}

/// How `max_bytes` is shared between the files of a queue, so that
/// together they stay within it (`du`), plus SQLite's shared-memory index
/// (`-shm`, 32 KiB) and at most one append batch in the WAL:
/// - the WAL is checkpointed every `wal_pages` pages and cut back to that
///   size after each checkpoint (a sixteenth of the budget, at most
///   512 KiB);
/// - a reserve file of the same size ([`Reserve`]) keeps room for
///   draining on a full disk;
/// - the database file may have at most `db_pages` pages (the rest):
///   SQLite refuses to grow it further, and [`Queue::flush`] then drops
///   the oldest rows, whose pages new rows reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskBudget {
    pub page_size: i64,
    pub wal_pages: i64,
    pub db_pages: i64,
}

impl DiskBudget {
    pub fn new(max_bytes: u64, page_size: i64) -> DiskBudget {
        let page_size = page_size.max(512);
        let pages = i64::try_from(max_bytes).unwrap_or(i64::MAX) / page_size;
        let wal_pages = (pages / 16).clamp(8, 128);
        let db_pages = (pages - 2 * wal_pages).max(16);
        DiskBudget {
            page_size,
            wal_pages,
            db_pages,
        }
    }

    fn apply(&self, conn: &Connection) -> rusqlite::Result<()> {
        conn.execute_batch(&format!(
            "PRAGMA wal_autocheckpoint={}; PRAGMA journal_size_limit={};",
            self.wal_pages,
            self.wal_pages * self.page_size
        ))?;
        // Answers the limit in force, never below the file's current size
        // (a file from a larger limit keeps its size; it is not shrunk).
        conn.query_row(
            &format!("PRAGMA max_page_count={}", self.db_pages),
            [],
            |_| Ok(()),
        )
    }
}

/// Room kept for a full disk: a file of [`DiskBudget::wal_pages`] pages
/// next to the queue (`….sqlite.reserve`). Deleting acknowledged rows must
/// write to the WAL, and the checkpoint that lets the WAL be reused may
/// have to grow the database file by as much; on a full disk neither could
/// happen and the backlog would stop draining just when the cloud is back.
/// So when a write that only deletes finds the disk full, the reserve is
/// given back to the file system and the write tried again; once the disk
/// has room again the reserve is taken anew.
struct Reserve {
    path: PathBuf,
    size: u64,
    /// Given back; when the disk was last looked at for taking it anew.
    released: Option<Instant>,
}

impl Reserve {
    fn new(queue_file: &Path, size: u64) -> Reserve {
        let mut r = Reserve {
            path: queue_file.with_extension("sqlite.reserve"),
            size,
            released: None,
        };
        if !r.take() {
            r.released = Some(Instant::now());
        }
        r
    }

    /// Makes the file `size` bytes of allocated space; whether it is.
    fn take(&mut self) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        let Ok(f) = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.path)
        else {
            return false;
        };
        let len = libc::off_t::try_from(self.size).unwrap_or(libc::off_t::MAX);
        // SAFETY: `f` is an open file for the whole call.
        let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len) };
        if rc == 0 {
            return true;
        }
        // Not supported here: write the bytes.
        use std::io::Write;
        let mut f = f;
        let block = [0u8; 4096];
        let mut written = 0;
        while written < self.size {
            if f.write_all(&block).is_err() {
                return false;
            }
            written += block.len() as u64;
        }
        f.sync_all().is_ok()
    }

    /// Gives the space back; whether there was any to give.
    fn release(&mut self) -> bool {
        if self.released.is_some() {
            return false;
        }
        self.released = Some(Instant::now());
        fs::remove_file(&self.path).is_ok()
    }

    /// Takes the reserve anew once the disk has room for it and more (looked
    /// at every second while it is given back); whether it holds it.
    fn renew(&mut self) -> bool {
        let Some(at) = self.released else {
            return true;
        };
        if at.elapsed() < Duration::from_secs(1) {
            return false;
        }
        self.released = Some(Instant::now());
        let dir = self.path.parent().unwrap_or(Path::new("."));
        if free_space(dir).is_some_and(|free| free > self.size + (256 << 10)) && self.take() {
            self.released = None;
        }
        self.released.is_none()
    }
}

/// A message as stored in the queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedMessage {
    /// Strictly increasing; an id once written is never reused, also not
    /// after a restart.
    pub id: i64,
    /// When it was appended.
    pub ts: Millis,
    pub topic: String,
    pub payload: Bytes,
    pub qos: Qos,
    pub retain: bool,
}

/// What opening a queue found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The file was damaged. It was moved aside to this path and the rows
    /// that could be read were copied into a fresh file.
    pub damaged_file: Option<PathBuf>,
    /// Rows copied from the damaged file.
    pub salvaged: u64,
    /// What SQLite reported about the damage.
    pub detail: Option<String>,
}

/// Counters and levels of one queue, for status and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages in the queue (sent-but-unacknowledged included).
    pub depth: u64,
    /// Bytes counted against `max_bytes`.
    pub bytes: u64,
    /// Messages dropped by the limits since the queue was opened.
    pub dropped: u64,
}

/// The durable queue of one bridge. See the module docs.
pub struct Queue {
    conn: Connection,
    path: PathBuf,
    name: String,
    limits: QueueLimits,
    budget: DiskBudget,
    /// On a full disk the file may not grow: new rows only take pages that
    /// deleted ones freed (see [`Queue::flush`]).
    capped: bool,
    /// When [`Queue::recheck_room`] last looked at the file system.
    room_checked: Option<Instant>,
    reserve: Reserve,
    depth: u64,
    bytes: u64,
    dropped: u64,
    /// The id of the newest message ever appended (ids only grow).
    last_id: i64,
    /// Appended by [`Queue::stage`] and not written yet, by id: all newer
    /// than every row on disk. See [`Queue::stage`].
    staged: BTreeMap<i64, QueuedMessage>,
    /// Acknowledged rows on disk not deleted yet ([`Queue::ack_later`]).
    unacked_deletes: Vec<i64>,
    /// Since when `staged` or `unacked_deletes` holds something.
    dirty_since: Option<Instant>,
    /// Drops in the current over-limit episode; `Some` while it lasts, so
    /// the warning is logged once per episode, not once per message.
    episode: Option<u64>,
    /// Every inbox record up to this sequence number is dealt with (stored
    /// here, or not for this bridge): as committed, and as to be committed
    /// with the next transaction. See `inbox.rs`.
    inbox_mark: u64,
    inbox_pending: u64,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("path", &self.path)
            .field("depth", &self.depth)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Queue {
    /// The file that holds the queue of bridge `name` under `data_dir`.
    pub fn file_path(data_dir: &Path, name: &str) -> PathBuf {
        data_dir.join(format!("bridge-{name}.queue.sqlite"))
    }

    /// Opens (or creates) the queue of bridge `name` under `data_dir`. The
    /// folder is created with mode 0700 and the file with 0600 when missing.
    /// A damaged file is detected, moved aside and salvaged; see
    /// [`Recovery`].
    pub fn open(
        data_dir: &Path,
        name: &str,
        limits: QueueLimits,
    ) -> Result<(Queue, Recovery), QueueError> {
        create_private_dir(data_dir)?;
        let path = Queue::file_path(data_dir, name);
        // SQLite takes a zero-length file for a new database; here it means
        // a file whose content never reached the disk (a crash or power cut
        // right after it was made, typical of a fresh SD card): say so.
        let was_empty = fs::metadata(&path).is_ok_and(|m| m.len() == 0);
        create_private_file(&path)?;
        let mut recovery = Recovery::default();
        if was_empty {
            tracing::warn!(bridge = %name, path = %path.display(),
                "queue file was empty (0 bytes): whatever it held never reached the disk; starting with an empty queue");
            recovery.detail = Some("the file was empty (0 bytes)".into());
        }
        let conn = match open_checked(&path) {
            Ok(conn) => conn,
            Err(e) if e.is_corrupt() => {
                let detail = e.to_string();
                tracing::error!(bridge = %name, path = %path.display(), error = %detail,
                    "queue file is damaged; salvaging what can be read");
                let (conn, damaged, salvaged) = salvage(&path)?;
                tracing::warn!(bridge = %name, salvaged, moved_to = %damaged.display(),
                    "queue recovered from a damaged file");
                recovery = Recovery {
                    damaged_file: Some(damaged),
                    salvaged,
                    detail: Some(detail),
                };
                conn
            }
            Err(e) => return Err(e),
        };
        // The newest id ever stored: AUTOINCREMENT remembers it after the
        // row is gone, so ids continue above it.
        let (depth, bytes, last_id) = conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), MAX(COALESCE(MAX(id), 0), \
                 (SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'messages')) \
                 FROM messages",
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, i64>(1)? as u64,
                        r.get::<_, i64>(2)?,
                    ))
                },
            )
            .map_err(|source| sql(&path, source))?;
        let inbox_mark = conn
            .query_row("SELECT value FROM meta WHERE key = 'inbox'", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|v| u64::try_from(v).unwrap_or(0))
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(0),
                other => Err(other),
            })
            .map_err(|source| sql(&path, source))?;
        let page_size = conn
            .query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))
            .map_err(|source| sql(&path, source))?;
        let budget = DiskBudget::new(limits.max_bytes, page_size);
        budget.apply(&conn).map_err(|source| sql(&path, source))?;
        let reserve = Reserve::new(
            &path,
            u64::try_from(budget.wal_pages * budget.page_size).unwrap_or(0),
        );
        let mut queue = Queue {
            conn,
            path,
            name: name.to_string(),
            limits,
            budget,
            capped: false,
            room_checked: None,
            reserve,
            depth,
            bytes,
            dropped: 0,
            last_id,
            episode: None,
            staged: BTreeMap::new(),
            unacked_deletes: Vec::new(),
            dirty_since: None,
            inbox_mark,
            inbox_pending: inbox_mark,
        };
        if depth > 0 {
            tracing::info!(bridge = %name, depth, bytes, "queue reopened with a backlog");
        }
        // The limits may have shrunk since the last run.
        queue.enforce_limits()?;
        Ok((queue, recovery))
    }

    /// [`Queue::open`] on the blocking pool, for async callers.
    pub async fn open_async(
        data_dir: PathBuf,
        name: String,
        limits: QueueLimits,
    ) -> Result<(Queue, Recovery), QueueError> {
        crate::ops::blocking(move || Queue::open(&data_dir, &name, limits)).await
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file system was found full and has not had room since: the file
    /// keeps its size and new rows only reuse freed pages.
    pub fn disk_full(&self) -> bool {
        self.capped
    }

    pub fn stats(&self) -> QueueStats {
        QueueStats {
            depth: self.depth,
            bytes: self.bytes,
            dropped: self.dropped,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.depth == 0
    }

    /// The id of the newest message appended (0 before the first): every
    /// message up to it has been seen by whoever peeked after it.
    pub fn last_id(&self) -> i64 {
        self.last_id
    }

    /// Every inbox record up to this number is dealt with, on disk.
    pub fn inbox_mark(&self) -> u64 {
        self.inbox_mark
    }

    /// Every inbox record up to `seq` is dealt with once what was handed to
    /// this queue so far is written: the next transaction records it.
    pub fn mark_inbox(&mut self, seq: u64) {
        if seq > self.inbox_pending {
            self.inbox_pending = seq;
            self.dirty_since.get_or_insert_with(Instant::now);
        }
    }

    /// Appends messages in one transaction (group commit), in order, then
    /// applies `max_bytes` by dropping the oldest. Returns how many were
    /// dropped by this call. A single message larger than `max_bytes` is
    /// dropped (and counted) instead of emptying the queue for it.
    pub fn append(&mut self, msgs: &[Message]) -> Result<u64, QueueError> {
        self.append_with_ids(msgs, &mut Vec::new())
            .map(|(dropped, _)| dropped)
    }

    /// [`Queue::append`], and tells which queue message each stored one
    /// became: `(index in msgs, queued id)`, in order (an oversized message
    /// has no entry). Returns how many were dropped and the timestamp the
    /// stored ones got.
    pub fn append_with_ids(
        &mut self,
        msgs: &[Message],
        ids: &mut Vec<(usize, i64)>,
    ) -> Result<(u64, Millis), QueueError> {
        let before = (self.depth, self.bytes, self.last_id, self.dirty_since);
        let stored = self.stage(msgs, ids)?;
        // One transaction with whatever was staged or acknowledged before.
        if let Err(e) = self.flush() {
            // Nothing of this call stays: the caller keeps the messages.
            for (_, id) in ids.drain(..) {
                self.staged.remove(&id);
            }
            (self.depth, self.bytes, self.last_id, self.dirty_since) = before;
            return Err(e);
        }
        Ok(stored)
    }

    /// Appends messages in memory only (write-behind), in order; they count
    /// in the depth and the limits at once and are written by the next
    /// [`Queue::flush`] (or any write-through append), unless
    /// [`Queue::ack`] removed them before: a message the remote broker
    /// acknowledges within the bridge's write delay never touches the disk.
    /// Returns what [`Queue::append_with_ids`] returns; the rows get `ts` as
    /// their timestamp.
    pub fn stage(
        &mut self,
        msgs: &[Message],
        ids: &mut Vec<(usize, i64)>,
    ) -> Result<(u64, Millis), QueueError> {
        ids.clear();
        let ts = now_ms();
        if self.staged.len() >= MAX_STAGED {
            // The disk must keep up; if it cannot, the caller keeps the
            // messages and tries again.
            self.flush()?;
        }
        let mut oversize = 0;
        for (i, m) in msgs.iter().enumerate() {
            let size = message_size(&m.topic, &m.payload);
            if size > self.limits.max_bytes {
                oversize += 1;
                continue;
            }
            self.last_id += 1;
            self.staged.insert(
                self.last_id,
                QueuedMessage {
                    id: self.last_id,
                    ts,
                    topic: m.topic.clone(),
                    payload: m.payload.clone(),
                    qos: m.qos,
                    retain: m.retain,
                },
            );
            self.dirty_since.get_or_insert_with(Instant::now);
            ids.push((i, self.last_id));
            self.depth += 1;
            self.bytes += size;
        }
        if oversize > 0 {
            tracing::warn!(bridge = %self.name, dropped = oversize, max_bytes = self.limits.max_bytes,
                "message larger than the whole queue limit dropped");
            self.count_drops(oversize);
        }
        Ok((oversize + self.enforce_limits()?, ts))
    }

    /// Since when something waits for [`Queue::flush`]: a staged message
    /// or an acknowledged row not deleted yet.
    pub fn unwritten_since(&self) -> Option<Instant> {
        self.dirty_since
    }

    /// Writes every staged message and deletes every row acknowledged with
    /// [`Queue::ack_later`], in one transaction. On an error nothing
    /// changes; the next call tries again.
    ///
    /// When the file has reached its share of `max_bytes` (see
    /// [`DiskBudget`]), the oldest rows are dropped (counted) to make room,
    /// as the limit says; a full file system is an error
    /// ([`QueueError::is_disk_full`]).
    pub fn flush(&mut self) -> Result<(), QueueError> {
        let mut attempts = 0;
        loop {
            match self.write_pending() {
                Err(e) if e.is_disk_full() && attempts < 16 => {
                    attempts += 1;
                    let staged: u64 = self
                        .staged
                        .values()
                        .map(|m| message_size(&m.topic, &m.payload))
                        .sum();
                    // SQLite says "full" for both; the file system tells.
                    if free_space(&self.path).is_none_or(|free| free <= 2 * staged + (1 << 20)) {
                        // The disk is full. From now on the file keeps its
                        // size: new rows take only the pages deleted ones
                        // free, and whatever room there is stays for the
                        // deletes and the WAL.
                        self.cap_pages();
                        // Deleting acknowledged rows (nothing new to store)
                        // gets the reserve's room.
                        if self.staged.is_empty() && self.reserve.release() {
                            tracing::info!(bridge = %self.name,
                                "disk full: the queue's reserve is given back so that sent messages can still be deleted");
                            continue;
                        }
                        return Err(e);
                    }
                    let room = staged.max(self.limits.max_bytes / 16);
                    if self.drop_oldest_on_disk(room)? == 0 {
                        return Err(e);
                    }
                }
                Ok(()) => {
                    self.recheck_room();
                    return Ok(());
                }
                other => return other,
            }
        }
    }

    /// After a full disk: once the file system has room again (looked at
    /// every second at most), the reserve is taken anew and the file may
    /// grow again. Whether the disk is still taken for full.
    pub fn recheck_room(&mut self) -> bool {
        if !self.capped {
            return false;
        }
        if self
            .room_checked
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return true;
        }
        self.room_checked = Some(Instant::now());
        let room = self.reserve.renew()
            && free_space(&self.path).is_some_and(|free| free > self.reserve.size + (256 << 10));
        if room {
            self.capped = false;
            let _ = self.budget.apply(&self.conn);
        }
        self.capped
    }

    /// Keeps the database file at the pages it has (see `capped`).
    fn cap_pages(&mut self) {
        if self.capped {
            return;
        }
        self.room_checked = Some(Instant::now());
        let pages = self
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0))
            .unwrap_or(self.budget.db_pages);
        if self
            .conn
            .query_row(&format!("PRAGMA max_page_count={pages}"), [], |_| Ok(()))
            .is_ok()
        {
            self.capped = true;
        }
    }

    /// Drops the oldest rows on disk, at least `bytes` of them (as counted
    /// against `max_bytes`); how many.
    fn drop_oldest_on_disk(&mut self, bytes: u64) -> Result<u64, QueueError> {
        let (last_id, n, freed) = self.oldest_covering(bytes)?;
        if n == 0 {
            return Ok(0);
        }
        self.delete_through(last_id, n, freed)?;
        self.count_drops(n);
        Ok(n)
    }

    /// The id up to which the oldest rows on disk add up to `bytes` (or all
    /// of them), how many rows that is and their bytes.
    fn oldest_covering(&mut self, bytes: u64) -> Result<(i64, u64, u64), QueueError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, size FROM messages ORDER BY id")
            .map_err(|source| sql(&self.path, source))?;
        let mut rows = stmt.query([]).map_err(|source| sql(&self.path, source))?;
        let (mut last_id, mut n, mut freed) = (0i64, 0u64, 0u64);
        while freed < bytes {
            let Some(row) = rows.next().map_err(|source| sql(&self.path, source))? else {
                break;
            };
            last_id = row.get(0).map_err(|source| sql(&self.path, source))?;
            let size: i64 = row.get(1).map_err(|source| sql(&self.path, source))?;
            freed += size as u64;
            n += 1;
        }
        Ok((last_id, n, freed))
    }

    fn write_pending(&mut self) -> Result<(), QueueError> {
        if self.staged.is_empty()
            && self.unacked_deletes.is_empty()
            && self.inbox_pending == self.inbox_mark
        {
            self.dirty_since = None;
            return Ok(());
        }
        let tx = self
            .conn
            .transaction()
            .map_err(|source| sql(&self.path, source))?;
        let (mut removed, mut removed_bytes) = (0u64, 0u64);
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO messages (id, ts, qos, retain, size, topic, payload) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(|source| sql(&self.path, source))?;
            for m in self.staged.values() {
                insert
                    .execute(params![
                        m.id,
                        m.ts,
                        m.qos as u8,
                        m.retain,
                        message_size(&m.topic, &m.payload) as i64,
                        m.topic,
                        m.payload.as_ref()
                    ])
                    .map_err(|source| sql(&self.path, source))?;
            }
            // Acknowledgements mostly come in order: one statement per run
            // of consecutive ids.
            self.unacked_deletes.sort_unstable();
            self.unacked_deletes.dedup();
            let mut delete = tx
                .prepare_cached("DELETE FROM messages WHERE id BETWEEN ?1 AND ?2 RETURNING size")
                .map_err(|source| sql(&self.path, source))?;
            for (first, last) in runs(&self.unacked_deletes) {
                let mut rows = delete
                    .query(params![first, last])
                    .map_err(|source| sql(&self.path, source))?;
                while let Some(row) = rows.next().map_err(|source| sql(&self.path, source))? {
                    let size: i64 = row.get(0).map_err(|source| sql(&self.path, source))?;
                    removed += 1;
                    removed_bytes += size as u64;
                }
            }
            if self.inbox_pending > self.inbox_mark {
                tx.prepare_cached(
                    "INSERT INTO meta (key, value) VALUES ('inbox', ?1) \
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                )
                .and_then(|mut st| st.execute(params![self.inbox_pending as i64]))
                .map_err(|source| sql(&self.path, source))?;
            }
        }
        tx.commit().map_err(|source| sql(&self.path, source))?;
        self.inbox_mark = self.inbox_pending;
        self.staged.clear();
        self.unacked_deletes.clear();
        self.dirty_since = None;
        self.depth -= removed.min(self.depth);
        self.bytes -= removed_bytes.min(self.bytes);
        self.end_episode_if_below();
        Ok(())
    }

    /// Up to `max` messages with an id greater than `after`, oldest first.
    pub fn peek_after(&mut self, after: i64, max: usize) -> Result<Vec<QueuedMessage>, QueueError> {
        let mut found = if self.depth == self.staged.len() as u64 {
            // Everything is staged: spare the query.
            Vec::new()
        } else {
            // Acknowledged rows must not come back: deleted first, or, when
            // the disk cannot take even that, left out below.
            if !self.unacked_deletes.is_empty() {
                match self.flush() {
                    Ok(()) => {}
                    Err(e) if e.is_disk_full() => {}
                    Err(e) => return Err(e),
                }
            }
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT id, ts, qos, retain, topic, payload FROM messages \
                     WHERE id > ?1 ORDER BY id LIMIT ?2",
                )
                .map_err(|source| sql(&self.path, source))?;
            let rows = stmt
                .query_map(params![after, max as i64], row_to_message)
                .map_err(|source| sql(&self.path, source))?;
            let mut rows = rows
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| sql(&self.path, source))?;
            if !self.unacked_deletes.is_empty() {
                self.unacked_deletes.sort_unstable();
                rows.retain(|m| self.unacked_deletes.binary_search(&m.id).is_err());
            }
            rows
        };
        // Staged messages are newer than everything on disk.
        let rest = max - found.len();
        found.extend(
            self.staged
                .range(after.saturating_add(1)..)
                .take(rest)
                .map(|(_, m)| m.clone()),
        );
        Ok(found)
    }

    /// Deletes acknowledged messages now, in one transaction (with whatever
    /// [`Queue::stage`] and [`Queue::ack_later`] left for the next flush).
    /// Unknown ids (already dropped by the limits) are ignored.
    pub fn ack(&mut self, ids: &[i64]) -> Result<(), QueueError> {
        self.ack_later(ids);
        self.flush()
    }

    /// Acknowledged messages: a staged one is forgotten at once (it is
    /// never written); a row on disk is deleted by the next
    /// [`Queue::flush`]. Until then it still counts in the depth; after a
    /// crash it would be sent again (at least once).
    pub fn ack_later(&mut self, ids: &[i64]) {
        for &id in ids {
            match self.staged.remove(&id) {
                Some(m) => {
                    self.depth = self.depth.saturating_sub(1);
                    self.bytes = self
                        .bytes
                        .saturating_sub(message_size(&m.topic, &m.payload));
                }
                None => self.unacked_deletes.push(id),
            }
        }
        if self.staged.is_empty() && self.unacked_deletes.is_empty() {
            self.dirty_since = None;
        } else if !self.unacked_deletes.is_empty() {
            self.dirty_since.get_or_insert_with(Instant::now);
        }
        self.end_episode_if_below();
    }

    /// Drops messages older than `max_age` (if set), oldest first. Returns
    /// how many. Rows are in append order, so this reads from the head and
    /// stops at the first young one: cheap enough to call every second on
    /// a large backlog (a clock set backwards only delays expiry).
    pub fn expire(&mut self) -> Result<u64, QueueError> {
        let Some(max_age) = self.limits.max_age else {
            return Ok(0);
        };
        self.flush()?;
        let cutoff = now_ms() - max_age.as_millis() as i64;
        let (last_id, n, freed) = {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT id, size, ts FROM messages ORDER BY id")
                .map_err(|source| sql(&self.path, source))?;
            let mut rows = stmt.query([]).map_err(|source| sql(&self.path, source))?;
            let (mut last_id, mut n, mut freed) = (0i64, 0u64, 0u64);
            while let Some(row) = rows.next().map_err(|source| sql(&self.path, source))? {
                let ts: i64 = row.get(2).map_err(|source| sql(&self.path, source))?;
                if ts >= cutoff {
                    break;
                }
                last_id = row.get(0).map_err(|source| sql(&self.path, source))?;
                let size: i64 = row.get(1).map_err(|source| sql(&self.path, source))?;
                freed += size as u64;
                n += 1;
            }
            (last_id, n, freed)
        };
        if n == 0 {
            return Ok(0);
        }
        self.delete_through(last_id, n, freed)?;
        tracing::warn!(bridge = %self.name, dropped = n, max_age = ?max_age,
            "queued messages older than max_age dropped");
        self.dropped += n;
        Ok(n)
    }

    /// Deletes every message with an id up to `last_id` (the `n` oldest,
    /// `freed` bytes) and updates the depth and size.
    fn delete_through(&mut self, last_id: i64, n: u64, freed: u64) -> Result<(), QueueError> {
        self.conn
            .execute("DELETE FROM messages WHERE id <= ?1", [last_id])
            .map_err(|source| sql(&self.path, source))?;
        self.depth -= n.min(self.depth);
        self.bytes -= freed.min(self.bytes);
        Ok(())
    }

    /// Drops the oldest messages until `bytes <= max_bytes`.
    fn enforce_limits(&mut self) -> Result<u64, QueueError> {
        if self.bytes <= self.limits.max_bytes {
            self.end_episode_if_below();
            return Ok(0);
        }
        // The oldest rows are on disk; staged ones may be among them, and
        // pending deletes may free enough.
        self.flush()?;
        if self.bytes <= self.limits.max_bytes {
            return Ok(0);
        }
        let excess = self.bytes - self.limits.max_bytes;
        self.drop_oldest_on_disk(excess)
    }

    fn count_drops(&mut self, n: u64) {
        self.dropped += n;
        match &mut self.episode {
            Some(count) => *count += n,
            None => {
                tracing::warn!(bridge = %self.name, dropped = n, max_bytes = self.limits.max_bytes,
                    "queue full: dropping the oldest messages (logged once until it drains)");
                self.episode = Some(n);
            }
        }
    }

    /// An episode ends when the queue is back under 90% of its limit.
    fn end_episode_if_below(&mut self) {
        if let Some(count) = self.episode {
            if self.bytes <= self.limits.max_bytes / 10 * 9 {
                tracing::warn!(bridge = %self.name, dropped = count,
                    "queue below its limit again; messages dropped in this episode");
                self.episode = None;
            }
        }
    }
}

/// Runs of consecutive values in sorted `ids`, as (first, last).
fn runs(ids: &[i64]) -> impl Iterator<Item = (i64, i64)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = *ids.get(i)?;
        let mut last = first;
        i += 1;
        while ids.get(i) == Some(&(last + 1)) {
            last += 1;
            i += 1;
        }
        Some((first, last))
    })
}

impl Drop for Queue {
    /// Staged messages are written when the queue is closed.
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!(bridge = %self.name, error = %e, lost = self.staged.len(),
                "could not write the staged messages when closing the queue");
        }
    }
}

fn message_size(topic: &str, payload: &[u8]) -> u64 {
    topic.len() as u64 + payload.len() as u64 + ROW_OVERHEAD
}

fn row_to_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<QueuedMessage> {
    let qos: u8 = r.get(2)?;
    let payload: Vec<u8> = r.get(5)?;
    Ok(QueuedMessage {
        id: r.get(0)?,
        ts: r.get(1)?,
        qos: Qos::from_u8(qos).unwrap_or(Qos::AtLeastOnce),
        retain: r.get(3)?,
        topic: r.get(4)?,
        payload: Bytes::from(payload),
    })
}

fn sql(path: &Path, source: rusqlite::Error) -> QueueError {
    QueueError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts INTEGER NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    size INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);";

/// Opens the file, sets it up and checks it. Damage shows as an error for
/// which [`QueueError::is_corrupt`] is true.
fn open_checked(path: &Path) -> Result<Connection, QueueError> {
    let conn = open_raw(path)?;
    conn.execute_batch(SCHEMA)
        .map_err(|source| sql(path, source))?;
    let verdict: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|source| sql(path, source))?;
    if verdict != "ok" {
        return Err(QueueError::Corrupt {
            path: path.to_path_buf(),
            detail: verdict,
        });
    }
    Ok(conn)
}

fn open_raw(path: &Path) -> Result<Connection, QueueError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| sql(path, source))?;
    // journal_mode returns a row, so query it rather than execute.
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(|source| sql(path, source))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), mode = %mode, "queue could not switch to WAL mode");
    }
    conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;")
        .map_err(|source| sql(path, source))?;
    Ok(conn)
}

/// Moves the damaged file (and its WAL) aside, creates a fresh queue file
/// and copies every row that can still be read, in id order, into it.
fn salvage(path: &Path) -> Result<(Connection, PathBuf, u64), QueueError> {
    let damaged = path.with_extension(format!("sqlite.damaged-{}", now_ms()));
    let move_aside = |from: &Path, to: &Path| -> Result<(), QueueError> {
        match fs::rename(from, to) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(QueueError::File {
                path: from.to_path_buf(),
                source,
            }),
        }
    };
    move_aside(path, &damaged)?;
    for suffix in ["-wal", "-shm"] {
        let mut from = path.as_os_str().to_owned();
        from.push(suffix);
        let mut to = damaged.as_os_str().to_owned();
        to.push(suffix);
        move_aside(Path::new(&from), Path::new(&to))?;
    }
    create_private_file(path)?;
    let conn = open_raw(path)?;
    conn.execute_batch(SCHEMA)
        .map_err(|source| sql(path, source))?;
    let salvaged = copy_readable_rows(&damaged, &conn);
    Ok((conn, damaged, salvaged))
}

/// Copies rows from the damaged file until the first unreadable one; keeps
/// the original ids so the order and the at-least-once bookkeeping survive.
fn copy_readable_rows(damaged: &Path, into: &Connection) -> u64 {
    let Ok(old) = Connection::open_with_flags(damaged, OpenFlags::SQLITE_OPEN_READ_WRITE) else {
        return 0;
    };
    let Ok(mut stmt) =
        old.prepare("SELECT id, ts, qos, retain, size, topic, payload FROM messages ORDER BY id")
    else {
        return 0;
    };
    let Ok(mut rows) = stmt.query([]) else {
        return 0;
    };
    let mut copied = 0;
    loop {
        let row = match rows.next() {
            Ok(Some(row)) => row,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, copied, "stopped salvaging at an unreadable row");
                break;
            }
        };
        // Copied column by column as SQLite values: no decoding, no loss.
        let values: rusqlite::Result<Vec<rusqlite::types::Value>> =
            (0..7).map(|i| row.get_ref(i).map(owned)).collect();
        let Ok(values) = values else {
            break;
        };
        if into
            .execute(
                "INSERT INTO messages (id, ts, qos, retain, size, topic, payload) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                rusqlite::params_from_iter(values),
            )
            .is_err()
        {
            break;
        }
        copied += 1;
    }
    copied
}

/// An owned copy of a column value. rusqlite's own conversion panics on
/// TEXT that is not UTF-8, which a damaged file can hold: such bytes are
/// kept as a BLOB instead (found by the `queue_recovery` fuzz target).
fn owned(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::Value {
    use rusqlite::types::{Value, ValueRef};
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(f) => Value::Real(f),
        ValueRef::Text(t) => match std::str::from_utf8(t) {
            Ok(s) => Value::Text(s.to_string()),
            Err(_) => Value::Blob(t.to_vec()),
        },
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), QueueError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| QueueError::Dir {
        path: dir.to_path_buf(),
        source,
    })
}

/// Creates the file with mode 0600 if it does not exist; SQLite gives its
/// `-wal` and `-shm` files the same mode as the database file.
/// Bytes an unprivileged writer may still use on the file system of
/// `path`; `None` when it cannot be asked.
fn free_space(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` a buffer of the
    // right type that statvfs fills in; it is read only when it succeeded.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    // The field types are 32 bits wide on some 32-bit targets.
    #[allow(clippy::useless_conversion)]
    Some(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

fn create_private_file(path: &Path) -> Result<(), QueueError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
        .map(drop)
        .map_err(|source| QueueError::File {
            path: path.to_path_buf(),
            source,
        })
}

pub mod inbox;
#[cfg(test)]
mod tests;
