//! A bridge's inbox: the log that makes "PUBACK means stored" cheap.
//!
//! A QoS 1/2 message for a bridge in strict mode must be on disk before the
//! publisher gets its PUBACK. The broker handles one connection's publishes
//! one after another and acknowledges each only when it has been routed, so
//! a wait for the bridge's SQLite transaction on every message would cap a
//! publisher at one round trip between tasks plus one commit per message.
//! Instead the broker appends the message to this log on the publisher's own
//! task before routing it: one `write` system call, after which the message
//! is in the operating system's page cache and survives `kill -9` of the
//! gateway (as a SQLite commit with `synchronous=NORMAL` does). The message
//! also waits in memory for the bridge, with its sequence number
//! ([`Inbox::take`]), which replaces the bus for it; once the bridge has
//! stored everything up to a number in its queue (the queue records that
//! number in the same transaction), the log up to there is let go
//! ([`Inbox::release`]). At start the bridge takes in what the log holds
//! past what its queue says it stored ([`Inbox::open`]).
//!
//! The log is a series of segment files `bridge-NAME.inbox-FIRSTSEQ`; a
//! segment is deleted once all its records are stored. A record is
//! `len u32 | crc32 u32 | seq u64 | qos u8 | retain u8 | topic_len u16 |
//! topic | payload`, little-endian; reading stops at the first record that
//! is cut short or fails its checksum (the one being written at a crash).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use memmap2::MmapMut;
use tokio::sync::{Notify, Semaphore};

use crate::model::{Message, Qos};

/// A segment past this size is closed and a new one begun.
const SEGMENT_BYTES: u64 = 1 << 20;

const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// Bytes of a record before its body: length and checksum.
const HEADER: usize = 8;

/// A message with its sequence number in the inbox.
pub type Numbered = (u64, Message);

/// The inboxes open in this process, by path prefix (see [`Inbox::open`]).
static OPEN: Mutex<Vec<(PathBuf, Weak<Inbox>)>> = Mutex::new(Vec::new());

/// The open segment, wholly stored, is emptied once it has this much.
const TRUNCATE_AT: u64 = 256 * 1024;

/// Messages waiting in memory for the bridge before publishers wait.
const WAITING: usize = 16 * 1024;

pub struct Inbox {
    dir: PathBuf,
    prefix: String,
    state: Mutex<State>,
    /// One permit per free place in `State::waiting`.
    room: Semaphore,
    arrived: Notify,
}

struct State {
    /// The open segment, mapped: a record is copied into it, which puts
    /// it in the page cache without a system call.
    map: Option<MmapMut>,
    path: PathBuf,
    /// The sequence number of the last record written.
    seq: u64,
    bytes: u64,
    /// Closed segments: (last sequence number in it, path).
    closed: Vec<(u64, PathBuf)>,
    /// Up to here everything is stored ([`Inbox::release`]).
    released: u64,
    buf: Vec<u8>,
    /// Written and not taken by the bridge yet, in order.
    waiting: VecDeque<(u64, Message)>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("dir", &self.dir)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Inbox {
    /// Opens the inbox of bridge `name` in `data_dir`, whose queue has
    /// stored everything up to sequence number `stored`. Returns it with
    /// the messages the log holds past `stored`, in order: they were
    /// acknowledged to their publishers and must be taken in before
    /// anything new. The old segments are removed once the caller has
    /// stored those (its next [`Inbox::release`]); a damaged tail is
    /// reported and skipped.
    ///
    /// While the inbox of the same bridge is still open (a reload replaces
    /// the bridge, and a publish already under way may still write to the
    /// old one), that one is returned: what the old bridge did not take
    /// waits in it, in order, for the new one.
    /// Async callers use [`Inbox::open_async`]: this reads every segment.
    pub fn open(
        data_dir: &Path,
        name: &str,
        stored: u64,
    ) -> io::Result<(Arc<Inbox>, Vec<Numbered>)> {
        let prefix = format!("bridge-{name}.inbox-");
        let key = data_dir.join(&prefix);
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|(_, w)| w.strong_count() > 0);
        if let Some(inbox) = open
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok((inbox, Vec::new()));
        }
        let mut segments = Vec::new();
        match fs::read_dir(data_dir) {
            Ok(entries) => {
                for e in entries.flatten() {
                    let file_name = e.file_name();
                    let Some(first) = file_name
                        .to_str()
                        .and_then(|n| n.strip_prefix(&prefix))
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                    else {
                        continue;
                    };
                    segments.push((first, e.path()));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir_all(data_dir)?,
            Err(e) => return Err(e),
        }
        segments.sort();
        let mut pending = Vec::new();
        let mut last = stored;
        let mut closed = Vec::new();
        for (_, path) in &segments {
            let (records, damaged) = read_segment(path)?;
            if damaged {
                tracing::warn!(file = %path.display(),
                    "the bridge inbox ends in a damaged record (a write cut short by a crash); the records before it are kept");
            }
            let mut seg_last = 0;
            for (seq, m) in records {
                seg_last = seg_last.max(seq);
                last = last.max(seq);
                if seq > stored {
                    pending.push((seq, m));
                }
            }
            closed.push((seg_last.max(stored), path.clone()));
        }
        pending.sort_by_key(|(seq, _)| *seq);
        let inbox = Inbox {
            dir: data_dir.to_path_buf(),
            prefix,
            room: Semaphore::new(WAITING),
            arrived: Notify::new(),
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                map: None,
                path: PathBuf::new(),
                seq: last,
                bytes: 0,
                closed,
                released: stored,
                buf: Vec::new(),
            }),
        };
        let inbox = Arc::new(inbox);
        open.push((key, Arc::downgrade(&inbox)));
        Ok((inbox, pending))
    }

    /// [`Inbox::open`] on the blocking pool, for async callers.
    pub async fn open_async(
        data_dir: PathBuf,
        name: String,
        stored: u64,
    ) -> io::Result<(Arc<Inbox>, Vec<Numbered>)> {
        crate::ops::blocking(move || Inbox::open(&data_dir, &name, stored)).await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `msg` to the log and hands it to the bridge. Waits while
    /// the bridge has [`WAITING`] messages to take, at most `patience`:
    /// then, or on a write error (a full disk), the message is not taken
    /// and the error says why.
    pub async fn put(&self, msg: &Message, patience: Duration) -> io::Result<u64> {
        let permit = match tokio::time::timeout(patience, self.room.acquire()).await {
            Ok(Ok(p)) => p,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the bridge took nothing from its inbox",
                ))
            }
        };
        let seq = self.write(msg)?;
        permit.forget();
        self.arrived.notify_one();
        Ok(seq)
    }

    /// Up to `max` messages written and not taken yet, in order.
    pub fn take(&self, max: usize) -> Vec<(u64, Message)> {
        let mut st = self.lock();
        let n = st.waiting.len().min(max);
        if n == 0 {
            return Vec::new();
        }
        let out: Vec<_> = st.waiting.drain(..n).collect();
        drop(st);
        self.room.add_permits(out.len());
        out
    }

    /// Waits until a message may be waiting ([`Inbox::take`]).
    pub async fn arrived(&self) {
        self.arrived.notified().await;
    }

    fn write(&self, msg: &Message) -> io::Result<u64> {
        let mut st = self.lock();
        let seq = st.seq + 1;
        let mut buf = std::mem::take(&mut st.buf);
        encode(seq, msg, &mut buf);
        let len = buf.len();
        let fits = st
            .map
            .as_ref()
            .is_some_and(|m| st.bytes as usize + len <= m.len());
        if !fits {
            if let Err(e) = self.begin_segment(&mut st, seq, len) {
                st.buf = buf;
                return Err(e);
            }
        }
        let at = st.bytes as usize;
        if let Some(map) = st.map.as_mut() {
            map[at..at + len].copy_from_slice(&buf);
        }
        st.buf = buf;
        st.seq = seq;
        st.bytes += len as u64;
        st.waiting.push_back((seq, msg.clone()));
        Ok(seq)
    }

    /// Closes the open segment and begins one for records from `first`,
    /// with room for at least `need` bytes. Its blocks are allocated up
    /// front: writing to a mapped page the file system has no room for
    /// would kill the process (SIGBUS), so a full disk fails here instead.
    fn begin_segment(&self, st: &mut State, first: u64, need: usize) -> io::Result<()> {
        if st.map.take().is_some() {
            let path = std::mem::take(&mut st.path);
            st.closed.push((first - 1, path));
        }
        let path = self.dir.join(format!("{}{first:016x}", self.prefix));
        // A file of this name holds nothing past what is stored (its
        // numbers would be taken otherwise): it starts over.
        st.closed.retain(|(_, p)| *p != path);
        let size = SEGMENT_BYTES.max(need as u64);
        let mut o = OpenOptions::new();
        o.create(true).read(true).write(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let file = o.open(&path)?;
        let mapped = allocate(&file, size).and_then(|()| {
            // SAFETY: the file is ours (0600 in the gateway's private
            // data_dir) and only this inbox writes it, under its lock; its
            // blocks are allocated, so no write to the map can fault.
            unsafe { MmapMut::map_mut(&file) }
        });
        match mapped {
            Ok(map) => {
                st.map = Some(map);
                st.path = path;
                st.bytes = 0;
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Everything up to sequence number `upto` is in the queue (or was
    /// dealt with otherwise): the segments holding only such records go.
    /// When the open segment is wholly stored too and holds
    /// [`TRUNCATE_AT`] or more, it goes as well (the next record begins a
    /// new one).
    pub fn release(&self, upto: u64) {
        let mut st = self.lock();
        if upto <= st.released {
            return;
        }
        st.released = upto;
        if upto >= st.seq && st.bytes >= TRUNCATE_AT && st.map.take().is_some() {
            let (last, path) = (st.seq, std::mem::take(&mut st.path));
            st.closed.push((last, path));
            st.bytes = 0;
        }
        let mut keep = Vec::new();
        for (last, path) in std::mem::take(&mut st.closed) {
            if last <= upto {
                if let Err(e) = fs::remove_file(&path) {
                    if e.kind() != io::ErrorKind::NotFound {
                        tracing::warn!(file = %path.display(), error = %e, "could not remove a stored inbox segment");
                    }
                }
            } else {
                keep.push((last, path));
            }
        }
        st.closed = keep;
    }

    /// The sequence number of the last record written.
    #[cfg(test)]
    fn last(&self) -> u64 {
        self.lock().seq
    }

    /// Segment files on disk (each takes a whole segment).
    #[cfg(test)]
    fn segments(&self) -> usize {
        let st = self.lock();
        st.closed.len() + usize::from(st.map.is_some())
    }
}

/// Gives `file` `size` bytes of real blocks (zeros).
fn allocate(file: &File, size: u64) -> io::Result<()> {
    let len =
        libc::off_t::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: posix_fallocate on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(file), 0, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

fn encode(seq: u64, m: &Message, buf: &mut Vec<u8>) {
    let topic = m.topic.as_bytes();
    let topic_len = u16::try_from(topic.len()).unwrap_or(u16::MAX);
    let topic = &topic[..usize::from(topic_len)];
    let body_len = 12 + topic.len() + m.payload.len();
    buf.clear();
    buf.reserve(HEADER + body_len);
    buf.extend_from_slice(&u32::try_from(body_len).unwrap_or(u32::MAX).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.push(m.qos as u8);
    buf.push(u8::from(m.retain));
    buf.extend_from_slice(&topic_len.to_le_bytes());
    buf.extend_from_slice(topic);
    buf.extend_from_slice(&m.payload);
    let crc = CRC.checksum(&buf[HEADER..]);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// The records of one segment, and whether it ended in a damaged one.
fn read_segment(path: &Path) -> io::Result<(Vec<(u64, Message)>, bool)> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        // The rest of a segment is zeros (allocated, never written).
        if data[at..].iter().take(HEADER).all(|b| *b == 0) {
            break;
        }
        let Some(record) = decode(&data[at..]) else {
            return Ok((out, true));
        };
        at += record.0;
        out.push((record.1, record.2));
    }
    Ok((out, false))
}

/// One record at the start of `data`: (its length, sequence number, message).
fn decode(data: &[u8]) -> Option<(usize, u64, Message)> {
    let body_len = usize::try_from(u32::from_le_bytes(data.get(..4)?.try_into().ok()?)).ok()?;
    let crc = u32::from_le_bytes(data.get(4..8)?.try_into().ok()?);
    let body = data.get(HEADER..HEADER.checked_add(body_len)?)?;
    if body_len < 12 || CRC.checksum(body) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(body[..8].try_into().ok()?);
    let qos = Qos::from_u8(body[8])?;
    let retain = body[9] != 0;
    let topic_len = usize::from(u16::from_le_bytes(body[10..12].try_into().ok()?));
    let topic = std::str::from_utf8(body.get(12..12 + topic_len)?).ok()?;
    let payload = Bytes::copy_from_slice(&body[12 + topic_len..]);
    Some((
        HEADER + body_len,
        seq,
        Message {
            topic: topic.to_string(),
            payload,
            qos,
            retain,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: u32) -> Message {
        let mut m = Message::new(format!("t/{i}"), format!("payload {i}"));
        m.qos = Qos::AtLeastOnce;
        m
    }

    #[test]
    fn what_was_not_stored_comes_back_in_order_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, pending) = Inbox::open(dir.path(), "cloud", 0).unwrap();
        assert!(pending.is_empty());
        for i in 1..=10 {
            assert_eq!(inbox.write(&msg(i)).unwrap(), u64::from(i));
        }
        inbox.release(4);
        drop(inbox);
        let (inbox, pending) = Inbox::open(dir.path(), "cloud", 4).unwrap();
        let seqs: Vec<u64> = pending.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (5..=10).collect::<Vec<_>>());
        assert_eq!(pending[0].1, msg(5));
        // Numbers go on after the old ones.
        assert_eq!(inbox.write(&msg(11)).unwrap(), 11);
    }

    #[test]
    fn a_bridge_reopened_while_its_inbox_is_in_use_gets_that_inbox() {
        let dir = tempfile::tempdir().unwrap();
        let (old, _) = Inbox::open(dir.path(), "cloud", 0).unwrap();
        old.write(&msg(1)).unwrap();
        let (new, pending) = Inbox::open(dir.path(), "cloud", 0).unwrap();
        assert!(pending.is_empty(), "nothing is read twice");
        // A publish under way during the reload still has the old handle.
        old.write(&msg(2)).unwrap();
        drop(old);
        let seqs: Vec<u64> = new.take(10).iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, [1, 2]);
    }

    #[test]
    fn stored_segments_are_removed_and_a_caught_up_log_is_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, _) = Inbox::open(dir.path(), "cloud", 0).unwrap();
        let big = Message::new("t", vec![7u8; 100_000]);
        for _ in 0..25 {
            inbox.write(&big).unwrap();
        }
        let files = || {
            fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .contains(".inbox-")
                })
                .count()
        };
        assert!(files() >= 3, "{} segments", files());
        assert_eq!(files(), inbox.segments());
        inbox.release(20);
        assert!(files() < 3, "segments wholly stored go: {} left", files());
        inbox.release(inbox.last());
        assert_eq!(files(), 0, "a caught-up log keeps no file");
        // The next record begins a new segment.
        inbox.write(&big).unwrap();
        assert_eq!(files(), 1);
        drop(inbox);
        let (_, pending) = Inbox::open(dir.path(), "cloud", 25).unwrap();
        assert_eq!(pending.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [26]);
    }

    #[test]
    fn a_record_cut_short_by_a_crash_ends_the_log_and_loses_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let (inbox, _) = Inbox::open(dir.path(), "cloud", 0).unwrap();
        for i in 1..=3 {
            inbox.write(&msg(i)).unwrap();
        }
        let (path, end) = {
            let st = inbox.lock();
            (st.path.clone(), st.bytes)
        };
        drop(inbox);
        // The last record's tail never made it (zeros, as allocated).
        let mut f = OpenOptions::new().write(true).open(&path).unwrap();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(end - 3)).unwrap();
        std::io::Write::write_all(&mut f, &[0, 0, 0]).unwrap();
        let (_, pending) = Inbox::open(dir.path(), "cloud", 0).unwrap();
        assert_eq!(pending.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2]);
    }
}
