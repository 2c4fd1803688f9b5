//! The engine's loop: one task per bridge (see the module docs).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::disk::DiskFull;
use super::link::{ConnEvent, Connector};
use super::{Actions, BridgeStatus, LocalLink, Next, Opened, Outgoing, Pacer, Profile, Settings};
use crate::bridge::mqtt::{AckTracker, RemoteError, RemoteEvent};
use crate::bridge::queue::inbox::Inbox;
use crate::bridge::queue::{Queue, QueueError, QueuedMessage};
use crate::model::{now_ms, Message, Qos};

/// Tracker id of a QoS 0 message sent without the queue (queue ids start
/// at 1).
const DIRECT: i64 = 0;
/// Tracker id of a profile's reply (not counted as forwarded).
const REPLY: i64 = -1;
/// QoS 0 messages buffered in memory on their way past the queue, at most;
/// more wait in the queue.
const MAX_DIRECT: usize = 50_000;
/// Stored messages kept in memory, ready to send, at most; more are read
/// back from the queue when their turn comes.
const MAX_READY: usize = 4096;
/// Messages taken from the bus per queue transaction, at most.
const APPEND_BATCH: usize = 512;
/// How long acknowledged rows may wait before they are deleted (in one
/// transaction with the next appends, or on their own after this). A crash
/// before that sends them again: at least once, never lost.
const DELETE_DELAY: Duration = Duration::from_millis(20);
/// Connection events handled per turn of the loop, at most.
const ACK_BATCH: usize = 512;
/// Messages kept in memory while the disk refuses appends (e.g. full).
const MAX_UNSAVED: usize = 10_000;
/// Messages per queue transaction while the disk is full.
const DISK_FULL_BATCH: usize = 32;
/// Inbox records taken into the queue whose position is not on disk yet,
/// at most: what a crash can make the bridge send twice, besides its
/// in-flight window.
const MARK_LAG: u64 = 256;
/// How long a goodbye waits for the last acknowledgements.
const GOODBYE: Duration = Duration::from_millis(500);

/// The size of the PUBLISH packet for `m`, at most (fixed header, topic,
/// packet id, MQTT 5 properties length).
fn packet_size(m: &Outgoing) -> usize {
    5 + 2 + m.topic.len() + 2 + 1 + m.payload.len()
}

pub(super) struct Runner<L, P> {
    settings: Settings,
    profile: P,
    queue: Queue,
    status_tx: watch::Sender<BridgeStatus>,
    status: BridgeStatus,
    local: L,
    local_open: bool,
    shutdown: CancellationToken,
    conn: Connector,
    tracker: AckTracker,
    connected: bool,
    /// Highest queue id handed to rumqttc on this connection.
    cursor: i64,
    ready: VecDeque<QueuedMessage>,
    /// Prepared by the profile, refused by a busy client: sent first.
    held: Option<Outgoing>,
    /// Publishes that carry several queued messages: newest id -> all ids.
    merged: HashMap<i64, Vec<i64>>,
    /// Mapped to remote topic/QoS, waiting for the next append.
    unsaved: Vec<Message>,
    /// QoS 0 messages taken while connected with nothing waiting ahead of
    /// them, waiting only for room in the connection's request queue. Always
    /// older than anything unsent in the queue, so they go first.
    direct: VecDeque<Message>,
    /// Ids of the last append (kept to reuse its allocation).
    appended: Vec<(usize, i64)>,
    acked: Vec<i64>,
    /// What the profile asked for and the engine has not done yet.
    actions: Actions,
    /// Messages the remote broker refused (MQTT 5 reason codes) or that
    /// were too large to send.
    refused: u64,
    pacer: Option<Pacer>,
    /// When the last queue write failed (they are retried a second later).
    flush_failed_at: Option<Instant>,
    /// Set while the file system refuses appends (see [`DiskFull`]).
    disk_full: Option<DiskFull>,
    inbox: Arc<Inbox>,
    /// The last inbox record taken.
    taken_seq: u64,
    /// The last inbox record taken when the profile held nothing back:
    /// everything up to it is in `unsaved` or in the queue.
    settled_seq: u64,
    /// Messages may wait in the inbox.
    inbox_due: bool,
}

impl<L: LocalLink, P: Profile> Runner<L, P> {
    pub(super) fn new(
        settings: Settings,
        opened: Opened,
        mut profile: P,
        local: L,
        shutdown: CancellationToken,
    ) -> Runner<L, P> {
        let Opened {
            queue,
            inbox,
            recovered,
            status: status_tx,
        } = opened;
        profile.set_echoes(local.echoes_own_publishes());
        let status = status_tx.borrow().clone();
        let pacer = settings.pace.map(|step| Pacer::new(step, Instant::now()));
        let mut runner = Runner {
            conn: Connector::new(settings.reconnect),
            settings,
            profile,
            queue,
            status_tx,
            status,
            local,
            local_open: true,
            shutdown,
            tracker: AckTracker::new(),
            connected: false,
            cursor: 0,
            ready: VecDeque::new(),
            held: None,
            merged: HashMap::new(),
            unsaved: Vec::new(),
            direct: VecDeque::new(),
            appended: Vec::new(),
            acked: Vec::new(),
            actions: Actions::default(),
            refused: 0,
            disk_full: None,
            pacer,
            flush_failed_at: None,
            inbox,
            taken_seq: 0,
            settled_seq: 0,
            inbox_due: true,
        };
        for (seq, m) in recovered {
            runner.map_uplink(m);
            runner.taken_seq = seq;
        }
        runner
    }

    /// Takes what the broker wrote to the inbox, up to a batch, when
    /// something may be there (a strict bridge was woken by it, or the
    /// last batch was full).
    fn take_inbox(&mut self) {
        if !self.inbox_due {
            return;
        }
        let batch = self.inbox.take(APPEND_BATCH);
        self.inbox_due = batch.len() == APPEND_BATCH;
        for (seq, m) in batch {
            self.map_uplink(m);
            self.taken_seq = seq;
        }
    }

    /// Room for more messages from the bus or the inbox.
    fn has_room(&self) -> bool {
        self.unsaved.len() < MAX_UNSAVED || self.disk_full.is_some()
    }

    pub(super) async fn run(mut self) {
        tracing::info!(depth = self.status.queue_depth, "bridge starting");
        self.report_status();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.has_room() {
                self.take_inbox();
            }
            self.profile_due();
            self.apply().await;
            self.persist();
            self.fill_window();
            let rate_wait = self.rate_limited();
            let write_at = self.write_at();
            let retry_at = self.conn.retry_at();
            let profile_at = self.profile.due(self.connected);
            let renew_at = self.profile.renew_at().filter(|_| self.connected);
            // Not `biased`: a steady stream of acks during a drain must not
            // starve the local bus (live data keeps being queued).
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                ev = self.conn.next() => {
                    self.on_event(ev).await;
                    // Take the events that are already waiting too, so a
                    // batch of acks becomes one delete transaction.
                    for _ in 0..ACK_BATCH {
                        match self.conn.try_next() {
                            Some(ev) => self.on_event(ev).await,
                            None => break,
                        }
                    }
                }
                _ = self.inbox.arrived(), if self.settings.strict && self.has_room() => {
                    self.inbox_due = true;
                }
                m = self.local.recv(), if self.local_open && self.has_room() => {
                    match m {
                        Some(m) => self.take_local(m).await,
                        None => {
                            tracing::info!("local bus closed");
                            self.local_open = false;
                            break;
                        }
                    }
                }
                _ = sleep_until(self.pacer.as_ref().map_or_else(Instant::now, Pacer::next)), if rate_wait => {}
                _ = sleep_until(write_at.unwrap_or_else(Instant::now)), if write_at.is_some() => {}
                _ = sleep_until(profile_at.unwrap_or_else(Instant::now)), if profile_at.is_some() => {}
                _ = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                    self.connect();
                }
                _ = sleep_until(renew_at.unwrap_or_else(Instant::now)), if renew_at.is_some() => {
                    self.renew().await;
                }
                _ = tick.tick() => {
                    if self.disk_full.is_some() && !self.queue.recheck_room() {
                        self.disk_room_again();
                    }
                    self.expire();
                    self.report_status();
                }
            }
        }
        self.stop().await;
    }

    fn connect(&mut self) {
        match self.profile.connect_options() {
            Ok(options) => {
                tracing::debug!(url = ?options.endpoint, "connecting");
                self.conn.connect(&options);
            }
            Err(e) => {
                let delay = self.conn.failed();
                tracing::error!(error = %e, retry_in = ?delay, "cannot make the connect options");
                self.status.connection_errors += 1;
                self.status.last_error = Some(e);
            }
        }
    }

    /// A message from the local bus, plus whatever else is already waiting.
    async fn take_local(&mut self, first: Message) {
        self.map_uplink(first);
        while self.unsaved.len() < APPEND_BATCH {
            // `timeout(ZERO, f)` polls `f` once: takes what is ready, never waits.
            match tokio::time::timeout(Duration::ZERO, self.local.recv()).await {
                Ok(Some(m)) => self.map_uplink(m),
                Ok(None) => {
                    self.local_open = false;
                    break;
                }
                Err(_) => break,
            }
        }
    }

    /// A local message through the profile into the queue.
    fn map_uplink(&mut self, m: Message) {
        if let Some(m) = self.profile.uplink(m, &mut self.actions) {
            self.enqueue(m);
        }
        self.take_queued_actions();
    }

    /// Messages the profile made for the queue.
    fn take_queued_actions(&mut self) {
        if !self.actions.queue.is_empty() {
            let made = std::mem::take(&mut self.actions.queue);
            for m in made {
                self.enqueue(m);
            }
        }
    }

    /// The profile's timers.
    fn profile_due(&mut self) {
        let now = Instant::now();
        if self.profile.due(self.connected).is_some_and(|at| at <= now) {
            self.profile.on_due(now, self.connected, &mut self.actions);
            self.take_queued_actions();
            self.settle();
        }
    }

    /// Does what the profile asked for: replies, local messages, counts.
    async fn apply(&mut self) {
        if self.actions.is_empty() {
            return;
        }
        let mut actions = std::mem::take(&mut self.actions);
        for (topic, payload) in actions.replies.drain(..) {
            self.reply(&topic, payload);
        }
        for (m, counted) in actions.local.drain(..) {
            match self.local.publish(m).await {
                Ok(()) => self.status.received += u64::from(counted),
                Err(e) => {
                    tracing::warn!(error = %e, "could not publish a downlink message locally")
                }
            }
        }
        self.status.received += std::mem::take(&mut actions.received);
        if let Some(e) = actions.error.take() {
            self.status.last_error = Some(e);
        }
        self.actions = actions;
        self.take_queued_actions();
    }

    /// Sends a reply at once; it counts against the pace.
    fn reply(&mut self, topic: &str, payload: Bytes) {
        let Some(sender) = self.conn.sender().filter(|_| self.connected) else {
            tracing::warn!(%topic, "not connected: a reply was dropped");
            return;
        };
        match sender.publish(topic, payload, Qos::AtMostOnce, false) {
            Ok(()) => {
                self.tracker.sent(REPLY, Qos::AtMostOnce);
                if let Some(p) = &mut self.pacer {
                    p.sent(Instant::now());
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot send a reply"),
        }
    }

    /// A remote message for the queue (or, QoS 0 with nothing waiting,
    /// straight for the connection).
    fn enqueue(&mut self, m: Message) {
        if self.settings.qos0_past_queue
            && m.qos == Qos::AtMostOnce
            && self.direct.len() < MAX_DIRECT
            && self.nothing_waiting()
        {
            // QoS 0 promises at most once: while connected with nothing
            // waiting ahead of it, it goes straight to the connection, as in
            // Mosquitto's bridge, through a memory buffer that absorbs bursts
            // (the disk would slow the bridge down just when it must keep
            // up). Offline, or behind a backlog, it is queued like
            // everything else; order is kept either way.
            self.direct.push_back(m);
            // With more buffered, the connection was full a moment ago: the
            // next round of the loop tries again.
            if self.direct.len() == 1 {
                self.send_direct();
            }
            return;
        }
        self.unsaved.push(m);
        if let Some(full) = &mut self.disk_full {
            if self.unsaved.len() >= MAX_UNSAVED + APPEND_BATCH {
                // Nowhere to keep them: the oldest go, counted.
                let n = self.unsaved.len() - MAX_UNSAVED;
                self.unsaved.drain(..n);
                full.lost += n as u64;
                self.refused += n as u64;
            }
        }
    }

    /// Hands buffered QoS 0 messages to the connection while it has room.
    fn send_direct(&mut self) {
        let Some(sender) = self.conn.sender() else {
            return;
        };
        while let Some(m) = self.direct.front() {
            match sender.publish(&m.topic, m.payload.clone(), m.qos, m.retain) {
                Ok(()) => {
                    self.tracker.sent(DIRECT, Qos::AtMostOnce);
                    self.direct.pop_front();
                }
                Err(_) => return,
            }
        }
        if self.direct.capacity() > 1024 {
            self.direct.shrink_to(1024);
        }
    }

    /// Buffered QoS 0 messages go to the durable queue, ahead of anything
    /// newer (the connection is gone, or the bridge stops).
    fn spill_direct(&mut self) {
        if !self.direct.is_empty() {
            let newer = std::mem::take(&mut self.unsaved);
            self.unsaved.extend(self.direct.drain(..));
            self.unsaved.extend(newer);
            self.direct.shrink_to(1024);
        }
    }

    /// Connected, not paced, and every message taken so far has been handed
    /// to the connection: a new message may skip the queue.
    fn nothing_waiting(&self) -> bool {
        self.connected
            && self.pacer.is_none()
            && self.unsaved.is_empty()
            && self.ready.is_empty()
            && self.all_handed_over()
    }

    /// `ready` holds every message of the queue not yet handed over.
    fn ready_holds_all_unsent(&self) -> bool {
        match self.ready.back() {
            None => self.all_handed_over(),
            Some(newest) => newest.id == self.queue.last_id(),
        }
    }

    /// Every message in the queue has been handed to the connection.
    fn all_handed_over(&self) -> bool {
        self.held.is_none() && (self.queue.is_empty() || self.queue.last_id() <= self.cursor)
    }

    /// Appends up to `max` waiting messages; whether they were stored.
    fn append_unsaved(&mut self, max: usize) -> bool {
        let batch_len = self.unsaved.len().min(max);
        // While connected and `ready` holds every unsent message, the new
        // ones join it as they are stored, instead of being read back.
        let keep = self.connected && self.ready.len() < MAX_READY && self.ready_holds_all_unsent();
        let mut ids = std::mem::take(&mut self.appended);
        // With `write_behind`, while connected, messages are staged and
        // written after that delay unless acknowledged before; otherwise
        // (and always offline) they are on disk before they are sent.
        // Not while the disk is full: staged messages would hold back the
        // small delete-only writes that drain the queue then.
        let stored =
            if self.connected && self.settings.write_behind.is_some() && self.disk_full.is_none() {
                self.queue.stage(&self.unsaved[..batch_len], &mut ids)
            } else {
                self.queue
                    .append_with_ids(&self.unsaved[..batch_len], &mut ids)
            };
        match stored {
            Ok(_) if self.disk_full.is_some() => {
                // Stored in pages the drain freed, or in new room: the
                // episode ends only when the file system has room.
                if !self.queue.disk_full() {
                    self.disk_room_again();
                }
                self.unsaved.drain(..batch_len);
                self.ready.clear();
            }
            Ok((dropped, _)) if dropped > 0 => {
                self.unsaved.drain(..batch_len);
                // Some of the peeked messages may be gone now.
                self.ready.clear();
            }
            Ok((_, ts)) if keep => {
                let mut stored = ids.iter().peekable();
                for (i, m) in self.unsaved.drain(..batch_len).enumerate() {
                    if let Some(&(_, id)) = stored.next_if(|(at, _)| *at == i) {
                        self.ready.push_back(QueuedMessage {
                            id,
                            ts,
                            topic: m.topic,
                            payload: m.payload,
                            qos: m.qos,
                            retain: m.retain,
                        });
                    }
                }
            }
            Ok(_) => {
                self.unsaved.drain(..batch_len);
            }
            Err(e) => {
                self.appended = ids;
                self.queue_failed(e);
                return false;
            }
        }
        self.appended = ids;
        true
    }

    /// Everything taken so far is out of the profile's hands.
    fn settle(&mut self) {
        if self.profile.holds_nothing() {
            self.settled_seq = self.taken_seq;
        }
    }

    /// Appends waiting messages and deletes acknowledged ones.
    fn persist(&mut self) {
        let retry_later = self
            .disk_full
            .as_ref()
            .is_some_and(|f| Instant::now() < f.retry_at);
        if !self.unsaved.is_empty() && !retry_later {
            if self.disk_full.is_some() {
                // Small transactions while the disk is full: the WAL cannot
                // grow, only reuse its room.
                for _ in 0..64 {
                    if self.unsaved.is_empty() || !self.append_unsaved(DISK_FULL_BATCH) {
                        break;
                    }
                }
            } else {
                self.append_unsaved(APPEND_BATCH * 4);
            }
        }
        if self.write_at().is_some_and(|at| at <= Instant::now()) {
            self.flush_staged();
        }
        // Everything taken from the inbox is in the queue (or dropped,
        // counted): the queue records that with its next write, and the
        // inbox lets go of what the queue has recorded.
        self.settle();
        if self.unsaved.is_empty() {
            self.queue.mark_inbox(self.settled_seq);
        }
        // The position on disk lags at most `MARK_LAG` records (not only
        // `flush_delay`): after a crash that many at most are sent again,
        // however fast messages come.
        let lag = self.settled_seq.saturating_sub(self.queue.inbox_mark());
        if lag >= MARK_LAG && self.flush_failed_at.is_none() && self.disk_full.is_none() {
            self.flush_staged();
        }
        self.inbox.release(self.queue.inbox_mark());
        // Deleted with the next write (at most `flush_delay` later); a
        // crash before that sends them again: at least once.
        self.queue.ack_later(&self.acked);
        self.acked.clear();
        self.sync_queue_stats();
    }

    /// How long staged messages and acknowledged rows wait for a write.
    fn flush_delay(&self) -> Duration {
        self.settings.write_behind.unwrap_or(DELETE_DELAY)
    }

    /// Writes staged messages and deletes acknowledged rows now.
    fn flush_staged(&mut self) {
        match self.queue.flush() {
            Ok(()) => self.flush_failed_at = None,
            Err(e) => {
                // A full or broken disk: try again in a second, not on
                // every turn of the loop.
                self.flush_failed_at = Some(Instant::now());
                self.queue_failed(e);
            }
        }
    }

    /// When the waiting queue writes are due: `flush_delay` after the
    /// oldest, or a second after a failed attempt.
    fn write_at(&self) -> Option<Instant> {
        let due = Instant::from_std(self.queue.unwritten_since()?) + self.flush_delay();
        Some(match self.flush_failed_at {
            Some(failed) => due.max(failed + Duration::from_secs(1)),
            None => due,
        })
    }

    /// The disk took a write again: the end of a disk-full episode.
    fn disk_room_again(&mut self) {
        if let Some(full) = self.disk_full.take() {
            tracing::warn!(
                lost = full.lost,
                after = ?full.since.elapsed(),
                "the disk has room again: the queue stores messages again ({} could not be kept while it was full, counted in dropped)",
                full.lost
            );
            self.status.last_error = None;
        }
    }

    /// The queue-failure path: a full disk is a state (see [`DiskFull`]);
    /// a damaged file is reopened (salvaged) and sent again from its start.
    fn queue_failed(&mut self, e: QueueError) {
        if e.is_disk_full() {
            let now = Instant::now();
            match &mut self.disk_full {
                Some(full) => {
                    full.retry_at = now + Duration::from_secs(1);
                    tracing::debug!(error = %e, "disk still full");
                }
                None => {
                    tracing::warn!(path = %self.queue.path().display(), waiting = self.unsaved.len(),
                        "disk full: the queue cannot store new messages; what is queued keeps draining, new messages wait in memory (up to {MAX_UNSAVED}, then the oldest are dropped and counted) until there is room again");
                    self.disk_full = Some(DiskFull {
                        since: now,
                        retry_at: now + Duration::from_secs(1),
                        lost: 0,
                    });
                }
            }
            self.status.last_error = Some(format!("disk full: {e}"));
            return;
        }
        tracing::error!(error = %e, "queue operation failed");
        self.status.last_error = Some(e.to_string());
        if e.is_corrupt() {
            match Queue::open(
                &self.settings.data_dir,
                &self.settings.name,
                self.settings.limits,
            ) {
                Ok((queue, recovery)) => {
                    tracing::warn!(salvaged = recovery.salvaged, "queue reopened after damage");
                    self.queue = queue;
                    // Resend everything from the start of the recovered queue.
                    self.cursor = 0;
                    self.ready.clear();
                    self.held = None;
                }
                Err(e) => tracing::error!(error = %e, "queue could not be reopened"),
            }
        }
    }

    fn sync_queue_stats(&mut self) {
        let stats = self.queue.stats();
        self.status.queue_depth = stats.depth;
        self.status.queue_bytes = stats.bytes;
        self.status.dropped = stats.dropped + self.refused;
        self.status.disk_full = self.disk_full.is_some();
    }

    /// Waiting for the pacer with something to send.
    fn rate_limited(&self) -> bool {
        self.connected
            && (!self.queue.is_empty() || self.profile.has_control())
            && self
                .pacer
                .as_ref()
                .is_some_and(|p| !p.ready(Instant::now()))
    }

    /// Something unsent: held back, in `ready`, or in the queue.
    fn has_unsent(&self) -> bool {
        !self.ready.is_empty() || !self.all_handed_over()
    }

    /// Hands the oldest unsent messages to rumqttc, up to the window.
    fn fill_window(&mut self) {
        if !self.connected {
            return;
        }
        // Buffered QoS 0 is older than anything unsent in the queue.
        self.send_direct();
        if !self.direct.is_empty() {
            return;
        }
        if self.profile.has_control() {
            // Sent one per pace step; the queue waits behind them.
            if self.pacer.as_ref().is_none_or(|p| p.ready(Instant::now())) {
                if let Some((topic, payload)) = self.profile.next_control() {
                    self.reply(&topic, payload);
                }
            }
            return;
        }
        let window = self.settings.window;
        let lookahead = self.profile.lookahead();
        let peek = window.size().max(64).max(lookahead);
        while window.is_open(&self.tracker) && self.has_unsent() {
            if let Some(pacer) = &mut self.pacer {
                if !pacer.take(Instant::now()) {
                    return;
                }
            }
            let out = match self.held.take() {
                Some(out) => out,
                None => {
                    if self.ready.len() < lookahead && !self.ready_holds_all_unsent() {
                        let after = self.ready.back().map_or(self.cursor, |m| m.id);
                        match self.queue.peek_after(after, peek) {
                            Ok(batch) => self.ready.extend(batch),
                            Err(e) => {
                                self.queue_failed(e);
                                return;
                            }
                        }
                    }
                    let newest = self.ready_holds_all_unsent();
                    match self.profile.next_out(&mut self.ready, newest) {
                        Some(Next::Send(out)) => out,
                        Some(Next::Drop { ids, why }) => {
                            tracing::error!(ids = ?ids, "{why}");
                            if let Some(&last) = ids.last() {
                                self.cursor = last;
                            }
                            self.acked.extend(ids);
                            continue;
                        }
                        None => return,
                    }
                }
            };
            if packet_size(&out) > self.settings.max_packet_size {
                // rumqttc would fail the whole connection on it, again
                // after every reconnect: drop it instead, loudly.
                tracing::warn!(id = out.id, topic = %out.topic, bytes = out.payload.len(),
                    max_packet_size = self.settings.max_packet_size,
                    "message larger than max_packet_size dropped");
                self.status.last_error = Some(format!(
                    "a {}-byte message on {} exceeds max_packet_size and was dropped",
                    out.payload.len(),
                    out.topic
                ));
                self.refused += 1;
                self.cursor = out.id;
                self.ack_ids(out.id, out.merged);
                continue;
            }
            let Some(sender) = self.conn.sender() else {
                self.held = Some(out);
                return;
            };
            match sender.publish(&out.topic, out.payload.clone(), out.qos, out.retain) {
                Ok(()) => {
                    self.tracker.sent(out.id, out.qos);
                    self.cursor = out.id;
                    if !out.merged.is_empty() {
                        self.merged.insert(out.id, out.merged);
                    }
                }
                Err(e) => {
                    // Busy or closed: try again on the next round.
                    tracing::debug!(error = %e, "remote request queue refused a publish");
                    self.held = Some(out);
                    return;
                }
            }
        }
    }

    /// Queue message `id` (and those merged with it) may be deleted.
    fn ack_ids(&mut self, id: i64, merged: Vec<i64>) -> u64 {
        if merged.is_empty() {
            self.acked.push(id);
            1
        } else {
            let n = merged.len() as u64;
            self.acked.extend(merged);
            n
        }
    }

    /// A publish that the tracker says is done.
    fn done(&mut self, id: i64) -> u64 {
        match id {
            REPLY => 0,
            DIRECT => 1,
            id => {
                let merged = if self.merged.is_empty() {
                    Vec::new()
                } else {
                    self.merged.remove(&id).unwrap_or_default()
                };
                self.ack_ids(id, merged)
            }
        }
    }

    /// A publish was written (QoS 0: done) or acknowledged: its queued
    /// messages may be deleted.
    fn delivered(&mut self, ev: &RemoteEvent) {
        let done = match ev {
            RemoteEvent::Published { pkid } => self.tracker.on_outgoing_publish(*pkid),
            RemoteEvent::Acked { pkid } => self.tracker.on_ack(*pkid),
            _ => None,
        };
        if let Some(id) = done {
            self.status.forwarded += self.done(id);
        }
    }

    async fn on_event(&mut self, ev: ConnEvent) {
        match ev {
            Ok(RemoteEvent::Connected { session_present }) => {
                self.connected = true;
                self.conn.connected();
                self.status.connected = true;
                self.status.since = now_ms();
                self.cursor = 0;
                self.ready.clear();
                self.held = None;
                tracing::info!(
                    session_present,
                    backlog = self.queue.stats().depth,
                    "connected to {}",
                    self.settings.peer
                );
                let filters = self.profile.on_connected(session_present);
                if let Some(sender) = self.conn.sender() {
                    if let Err(e) = sender.subscribe(&filters) {
                        tracing::warn!(error = %e, "could not queue the remote subscriptions");
                    }
                }
                self.report_status();
            }
            Ok(ev @ (RemoteEvent::Published { .. } | RemoteEvent::Acked { .. })) => {
                self.delivered(&ev);
            }
            Ok(RemoteEvent::Refused { pkid, reason }) => {
                if let Some(id) = self.tracker.on_ack(pkid) {
                    tracing::warn!(id, reason = %reason, "remote broker refused a message; dropped");
                    self.refused += self.done(id);
                    self.status.last_error = Some(format!("remote refused a message: {reason}"));
                }
            }
            Ok(RemoteEvent::Received(m)) => {
                self.profile.on_remote(m, &mut self.actions);
                self.apply().await;
            }
            Ok(RemoteEvent::Subscribed { refused }) => {
                if refused > 0 {
                    let e = format!("remote broker refused {refused} subscription(s)");
                    tracing::warn!("{e}");
                    self.status.last_error = Some(e);
                }
            }
            Ok(RemoteEvent::Other) => {}
            Err(e) => self.disconnected(e).await,
        }
    }

    /// Forgets the connection's state: what was in flight is sent again,
    /// from the queue, after the next CONNACK.
    fn forget_connection(&mut self) -> usize {
        let mut unacked = self.tracker.reset();
        // QoS 0 sent past the queue is not sent again (at most once); what
        // had not reached the connection yet is kept in the queue.
        unacked.retain(|&id| id != DIRECT && id != REPLY);
        self.merged.clear();
        // An outage may last: what is only in memory goes to disk now.
        self.flush_staged();
        self.spill_direct();
        self.status.redelivered += unacked.len() as u64;
        self.ready.clear();
        self.held = None;
        self.cursor = 0;
        unacked.len()
    }

    async fn disconnected(&mut self, e: RemoteError) {
        let was_connected = std::mem::replace(&mut self.connected, false);
        let delay = self.conn.failed();
        let unacked = self.forget_connection();
        self.status.connection_errors += 1;
        self.status.last_error = Some(e.to_string());
        let attempt = self.conn.attempt();
        if was_connected {
            self.status.connected = false;
            self.status.since = now_ms();
            tracing::warn!(error = %e, unacked, retry_in = ?delay,
                "connection to {} lost", self.settings.peer);
            self.report_status();
        } else {
            tracing::debug!(error = %e, attempt, retry_in = ?delay,
                "cannot connect to {}", self.settings.peer);
            if attempt == 1 || attempt.is_multiple_of(10) {
                tracing::warn!(error = %e, attempt, retry_in = ?delay,
                    "cannot connect to {}", self.settings.peer);
            }
        }
    }

    /// Says goodbye on the live connection and records the acks that still
    /// arrive, briefly.
    async fn goodbye(&mut self) {
        let Some(sender) = self.conn.sender() else {
            return;
        };
        if sender.disconnect().is_err() {
            return;
        }
        // Let the driver write the DISCONNECT; acks that arrive meanwhile
        // are still recorded.
        let deadline = Instant::now() + GOODBYE;
        while let Ok(ev) = tokio::time::timeout_at(deadline, self.conn.next()).await {
            match ev {
                Ok(ev) => self.delivered(&ev),
                Err(_) => break,
            }
        }
    }

    /// The profile wants a new connection (a fresh token): goodbye, and
    /// reconnect at once.
    async fn renew(&mut self) {
        tracing::info!("reconnecting with fresh credentials");
        self.goodbye().await;
        self.connected = false;
        self.conn.close(true).await;
        self.forget_connection();
        self.status.connected = false;
        self.status.since = now_ms();
        self.persist();
    }

    fn expire(&mut self) {
        match self.queue.expire() {
            Ok(n) if n > 0 => {
                tracing::warn!(dropped = n, "old messages dropped (queue.max_age)");
                // Expired rows may have been in `ready`; peeking again skips them.
                self.ready.clear();
            }
            Ok(_) => {}
            Err(e) => self.queue_failed(e),
        }
        self.sync_queue_stats();
    }

    /// Hands the status to whoever watches it: the gateway's status task
    /// publishes each change on `edgebridge/<id>/bridges/<name>/status`.
    fn report_status(&mut self) {
        self.sync_queue_stats();
        self.status_tx.send_replace(self.status.clone());
    }

    /// Saves what is waiting, says goodbye to the remote broker (briefly),
    /// and stops the connection task.
    async fn stop(mut self) {
        // From here everything goes to the queue: nothing new is sent.
        let connected = std::mem::replace(&mut self.connected, false);
        self.spill_direct();
        // Take what already reached the bridge's link, without waiting.
        while self.unsaved.len() < MAX_UNSAVED {
            let before = self.taken_seq;
            self.inbox_due = true;
            self.take_inbox();
            if self.taken_seq == before {
                break;
            }
        }
        while self.local_open && self.unsaved.len() < MAX_UNSAVED {
            match tokio::time::timeout(Duration::ZERO, self.local.recv()).await {
                Ok(Some(m)) => self.map_uplink(m),
                _ => break,
            }
        }
        // And what the profile holds (an open batch window).
        self.profile.flush(&mut self.actions);
        self.take_queued_actions();
        self.persist();
        if connected {
            self.goodbye().await;
            self.persist();
        }
        self.flush_staged();
        self.inbox.release(self.queue.inbox_mark());
        self.conn.close(false).await;
        self.status.connected = false;
        self.status.since = now_ms();
        self.report_status();
        tracing::info!(depth = self.status.queue_depth, "bridge stopped");
    }
}
