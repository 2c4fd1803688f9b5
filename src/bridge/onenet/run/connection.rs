//! The connection task: the durable queue -> OneNET, and OneNET's
//! requests -> local topics -> replies.

use super::*;

/// Why a connection ended.
enum End {
    Shutdown,
    /// The token is about to expire: reconnect with a fresh one at once.
    Refresh,
    Failed(String),
}

type ConnEvent = Result<RemoteEvent, RemoteError>;

/// Polls one connection until it fails or `stop`; each connection has its
/// own client, so that every connect carries a fresh token. `poll()` runs
/// in this task only: cancelling it mid-way (in a `select!`) could drop a
/// half-made connection or a half-written packet.
async fn drive(
    mut conn: RemoteConnection,
    events: mpsc::Sender<ConnEvent>,
    stop: CancellationToken,
) {
    loop {
        let r = tokio::select! {
            r = conn.poll() => r,
            _ = stop.cancelled() => return,
        };
        let failed = r.is_err();
        if events.send(r).await.is_err() || failed {
            return;
        }
    }
}

pub(super) struct Connection {
    pub(super) bridge: String,
    pub(super) o: OneNetConfig,
    pub(super) base: RemoteOptions,
    pub(super) topics: Topics,
    pub(super) queue: Arc<Mutex<Queue>>,
    pub(super) queued: Arc<Notify>,
    pub(super) results: mpsc::Receiver<HandlerResult>,
    pub(super) bus: Bus,
    pub(super) status_topic: String,
    pub(super) status: BridgeStatus,
    pub(super) status_tx: watch::Sender<BridgeStatus>,
    pub(super) backoff: Backoff,
    pub(super) acks: AckTracker,
    pub(super) pacer: Pacer,
    pub(super) book: PostBook,
    pub(super) requests: Requests,
    /// Highest queue id handed to the client on this connection.
    pub(super) last_sent: i64,
    /// What was last published on the status topic.
    pub(super) published: Option<BridgeStatus>,
    /// Next housekeeping: queue expiry and a status update if it changed.
    pub(super) next_report: Instant,
    pub(super) subs: Vec<SubDeviceConfig>,
    /// Topology and login requests for the sub-devices, sent after each
    /// CONNACK ahead of any post.
    pub(super) control: VecDeque<(String, Vec<u8>)>,
    pub(super) control_ids: IdCounter,
    /// The latest value of each property sent, for `thing/property/get`.
    pub(super) latest: BTreeMap<String, Json>,
    /// History posts in flight: last queue id -> every queue id merged.
    pub(super) merged: std::collections::HashMap<i64, Vec<i64>>,
    pub(super) history_ids: IdCounter,
}

/// One connection's client halves.
struct Link {
    sender: RemoteSender,
    events: mpsc::Receiver<ConnEvent>,
    stop: CancellationToken,
    driver: tokio::task::JoinHandle<()>,
}

impl Connection {
    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        self.report().await;
        loop {
            let creds = match Credentials::new(&self.o, SystemTime::now()) {
                Ok(c) => c,
                Err(e) => {
                    // Checked at start; the key cannot change while running.
                    tracing::error!(bridge = %self.bridge, error = %e, "cannot make a token");
                    return;
                }
            };
            let mut options = self.base.clone();
            options.username = Some(creds.username);
            options.password = Some(creds.password);
            let (sender, conn) = remote_client(&options);
            let (events_tx, events) = mpsc::channel(256);
            let stop = CancellationToken::new();
            let driver = tokio::spawn(drive(conn, events_tx, stop.clone()));
            let mut link = Link {
                sender,
                events,
                stop,
                driver,
            };
            let refresh_at = Instant::now() + refresh_after(self.o.token_ttl);
            let end = self.session(&mut link, refresh_at, &shutdown).await;
            let was_connected = self.status.connected;
            match end {
                // Say goodbye while the acks can still be paired.
                End::Shutdown | End::Refresh => self.goodbye(link, was_connected).await,
                End::Failed(_) => {
                    link.stop.cancel();
                    let _ = link.driver.await;
                }
            }
            let unacked = self.acks.reset();
            self.merged.clear();
            self.last_sent = 0;
            self.backoff.disconnected();
            if was_connected {
                self.status.connected = false;
                self.status.since = now_ms();
                self.status.redelivered += unacked.len() as u64;
            }
            match end {
                End::Shutdown => {
                    self.report().await;
                    tracing::info!(bridge = %self.bridge, "OneNET bridge stopped");
                    return;
                }
                End::Refresh => {
                    tracing::info!(bridge = %self.bridge, "reconnecting with a fresh token");
                }
                End::Failed(reason) => {
                    self.status.connection_errors += 1;
                    self.status.last_error = Some(reason.clone());
                    let delay = self.backoff.next_delay();
                    if was_connected || self.backoff.attempt() == 1 {
                        tracing::warn!(bridge = %self.bridge, error = %reason,
                            retry_in = ?delay, "OneNET connection lost");
                    } else {
                        tracing::debug!(bridge = %self.bridge, error = %reason,
                            retry_in = ?delay, "cannot connect to OneNET");
                    }
                    self.report().await;
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            self.report().await;
                            return;
                        }
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// A clean DISCONNECT, briefly; acks that still arrive are recorded.
    async fn goodbye(&mut self, mut link: Link, connected: bool) {
        if connected && link.sender.disconnect().is_ok() {
            let deadline = Instant::now() + Duration::from_millis(300);
            while let Ok(Some(Ok(ev))) = tokio::time::timeout_at(deadline, link.events.recv()).await
            {
                self.on_ack_event(&ev);
            }
        }
        link.stop.cancel();
        let _ = link.driver.await;
    }

    async fn session(
        &mut self,
        link: &mut Link,
        refresh_at: Instant,
        shutdown: &CancellationToken,
    ) -> End {
        loop {
            let now = Instant::now();
            if self.status.connected {
                if now >= refresh_at {
                    return End::Refresh;
                }
                for step in self.requests.tick(now.into_std()) {
                    self.step(&link.sender, step).await;
                }
                if !self.send_control(&link.sender, now) {
                    self.send_next(&link.sender, now);
                }
            }
            if now >= self.next_report {
                self.next_report = now + REPORT_EVERY;
                self.housekeeping().await;
            }
            let wake = [
                Some(refresh_at),
                Some(self.next_report),
                self.requests.deadline().map(Instant::from_std),
                self.pacer.next_slot().map(Instant::from_std),
            ]
            .into_iter()
            .flatten()
            .filter(|t| *t > now)
            .min();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return End::Shutdown,
                ev = link.events.recv() => match ev {
                    Some(Ok(ev)) => self.on_event(&link.sender, ev).await,
                    Some(Err(e)) => return End::Failed(e.to_string()),
                    None => return End::Failed("connection task ended".into()),
                },
                Some((key, outcome)) = self.results.recv() => {
                    let steps = self.requests.result(&key, outcome, std::time::Instant::now());
                    for step in steps {
                        self.step(&link.sender, step).await;
                    }
                }
                _ = self.queued.notified() => {}
                _ = sleep_until(wake) => {}
            }
        }
    }

    /// Sends the next sub-device request if the pace allows it; `true` if
    /// one is waiting (posts wait behind them).
    fn send_control(&mut self, sender: &RemoteSender, now: Instant) -> bool {
        if self.control.is_empty() {
            return false;
        }
        if self.pacer.ready(now.into_std()) {
            if let Some((topic, payload)) = self.control.pop_front() {
                self.reply(sender, &topic, payload);
            }
        }
        true
    }

    /// Sends the next queued post if the pace allows it.
    fn send_next(&mut self, sender: &RemoteSender, now: Instant) {
        if !self.pacer.ready(now.into_std()) || self.acks.in_flight() >= MAX_IN_FLIGHT {
            return;
        }
        let want = if self.o.history_replay {
            HISTORY_MAX + 1
        } else {
            1
        };
        let peeked = match lock(&self.queue).peek_after(self.last_sent, want) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(bridge = %self.bridge, error = %e, "cannot read the queue");
                self.status.last_error = Some(e.to_string());
                return;
            }
        };
        if self.send_history(sender, &peeked, want, now) {
            return;
        }
        let Some(m) = peeked.into_iter().next() else {
            return;
        };
        if !self.topics.is_own(&m.topic) {
            // Only our own topics are ever queued; never publish elsewhere.
            tracing::error!(bridge = %self.bridge, topic = %m.topic,
                "dropping a queued message outside the device's topics");
            self.last_sent = m.id;
            let _ = lock(&self.queue).ack(&[m.id]);
            return;
        }
        let qos = match m.qos {
            Qos::ExactlyOnce => Qos::AtLeastOnce,
            q => q,
        };
        if let Err(e) = sender.publish(&m.topic, m.payload.clone(), qos, false) {
            tracing::debug!(bridge = %self.bridge, error = %e, "client refused a publish; retrying");
            return;
        }
        if m.topic == self.topics.property_post() {
            if let Ok(post) = PropertyPost::parse(&m.payload) {
                let props = post.properties().map(str::to_string).collect();
                self.book.sent(post.id.clone(), props);
                for (prop, v) in post.values() {
                    self.latest.insert(prop, v.value);
                }
            }
        } else if m.topic == self.topics.pack_post() {
            if let Some((id, labels)) = sub::pack_labels(&m.payload) {
                self.book.sent(id, labels);
            }
        }
        self.acks.sent(m.id, qos);
        self.last_sent = m.id;
        self.pacer.sent(now.into_std());
    }

    /// A backlog of property posts goes out as one history post (all but
    /// the newest, which stays a property post so the current value shows
    /// as current). `true` if one was sent.
    fn send_history(
        &mut self,
        sender: &RemoteSender,
        peeked: &[QueuedMessage],
        asked: usize,
        now: Instant,
    ) -> bool {
        // A run of the same kind: the gateway's property posts, or
        // sub-device packs (at most 10 sub-devices per history message).
        let Some(kind) = peeked.first().map(|m| m.topic.clone()) else {
            return false;
        };
        let packs = kind == self.topics.pack_post();
        if kind != self.topics.property_post() && !packs {
            return false;
        }
        let mut run: Vec<&QueuedMessage> = Vec::new();
        let mut bytes = 0;
        let mut devices = std::collections::BTreeSet::new();
        for m in peeked {
            if m.topic != kind
                || run.len() == HISTORY_MAX
                || bytes + m.payload.len() > HISTORY_BYTES
            {
                break;
            }
            if packs {
                let mut more = devices.clone();
                more.extend(sub::pack_identities(&m.payload));
                if more.len() > sub::MAX_DEVICES_PER_PACK {
                    break;
                }
                devices = more;
            }
            bytes += m.payload.len();
            run.push(m);
        }
        // The newest queued post is not history.
        if run.len() == peeked.len() && peeked.len() < asked {
            run.pop();
        }
        if run.len() < 2 {
            return false;
        }
        let id = self.history_ids.next_id();
        let (payload, props) = if packs {
            let payloads: Vec<&[u8]> = run.iter().map(|m| m.payload.as_ref()).collect();
            sub::history_from_packs(&id, &payloads)
        } else {
            let posts: Vec<PropertyPost> = run
                .iter()
                .filter_map(|m| PropertyPost::parse(&m.payload).ok())
                .collect();
            thing::history_post(&id, &posts)
        };
        let qos = match run[0].qos {
            Qos::ExactlyOnce => Qos::AtLeastOnce,
            q => q,
        };
        let topic = self.topics.history_post();
        if let Err(e) = sender.publish(&topic, Bytes::from(payload), qos, false) {
            tracing::debug!(bridge = %self.bridge, error = %e, "client refused a publish; retrying");
            return true;
        }
        let ids: Vec<i64> = run.iter().map(|m| m.id).collect();
        let last = ids[ids.len() - 1];
        tracing::debug!(bridge = %self.bridge, posts = ids.len(), "backlog sent as history");
        self.book.sent(id, props);
        self.merged.insert(last, ids);
        self.acks.sent(last, qos);
        self.last_sent = last;
        self.pacer.sent(now.into_std());
        true
    }

    /// Publish and acknowledgement events: a post leaves the queue once
    /// OneNET has it.
    fn on_ack_event(&mut self, ev: &RemoteEvent) {
        let done = match ev {
            RemoteEvent::Published { pkid } => self.acks.on_outgoing_publish(*pkid),
            RemoteEvent::Acked { pkid } => self.acks.on_ack(*pkid),
            RemoteEvent::Refused { pkid, reason } => {
                tracing::warn!(bridge = %self.bridge, %reason, "OneNET refused a message");
                self.acks.on_ack(*pkid)
            }
            _ => None,
        };
        if let Some(id) = done.filter(|id| *id != NOT_QUEUED) {
            let ids = self.merged.remove(&id).unwrap_or_else(|| vec![id]);
            let acked = lock(&self.queue).ack(&ids);
            match acked {
                Ok(()) => {
                    self.status.forwarded += ids.len() as u64;
                    self.sync_stats();
                    self.status_tx.send_replace(self.status.clone());
                }
                Err(e) => {
                    tracing::error!(bridge = %self.bridge, error = %e, "cannot delete a sent post")
                }
            }
        }
    }

    async fn on_event(&mut self, sender: &RemoteSender, ev: RemoteEvent) {
        match ev {
            RemoteEvent::Connected { .. } => {
                self.backoff.connected();
                self.status.connected = true;
                self.status.since = now_ms();
                self.last_sent = 0;
                let downlink = match self.o.mode {
                    OneNetMode::Thing => vec![
                        (self.topics.property_post_reply(), Qos::AtMostOnce),
                        (self.topics.property_set(), Qos::AtMostOnce),
                        (self.topics.property_get(), Qos::AtMostOnce),
                        (self.topics.history_post_reply(), Qos::AtMostOnce),
                    ],
                    OneNetMode::Datastream => vec![
                        (self.topics.dp_rejected(), Qos::AtMostOnce),
                        (self.topics.cmd_request_filter(), Qos::AtMostOnce),
                    ],
                };
                let mut downlink = downlink;
                self.control.clear();
                if !self.subs.is_empty() {
                    downlink.extend([
                        (self.topics.topo_add_reply(), Qos::AtMostOnce),
                        (self.topics.sub_login_reply(), Qos::AtMostOnce),
                        (self.topics.pack_post_reply(), Qos::AtMostOnce),
                    ]);
                    for sd in &self.subs {
                        let id = self.control_ids.next_id();
                        match sub::topo_add(
                            &id,
                            sd,
                            self.o.method,
                            SystemTime::now(),
                            self.o.token_ttl,
                        ) {
                            Ok(p) => self.control.push_back((self.topics.topo_add(), p)),
                            Err(e) => tracing::error!(bridge = %self.bridge,
                                sub_device = %Identity::of(sd).label(), error = %e,
                                "cannot sign the sub-device's topo/add"),
                        }
                        let id = self.control_ids.next_id();
                        let login = sub::login(&id, &Identity::of(sd));
                        self.control.push_back((self.topics.sub_login(), login));
                    }
                }
                if let Err(e) = sender.subscribe(&downlink) {
                    tracing::warn!(bridge = %self.bridge, error = %e, "cannot subscribe");
                }
                let backlog = lock(&self.queue).stats().depth;
                tracing::info!(bridge = %self.bridge, backlog, "connected to OneNET");
                self.report().await;
            }
            RemoteEvent::Received(m) => self.on_remote(sender, m).await,
            RemoteEvent::Subscribed { refused } if refused > 0 => {
                let e = format!("OneNET refused {refused} subscription(s)");
                tracing::warn!(bridge = %self.bridge, "{e}");
                self.status.last_error = Some(e);
            }
            other => self.on_ack_event(&other),
        }
    }

    async fn on_remote(&mut self, sender: &RemoteSender, m: Message) {
        let t = &self.topics;
        if m.topic == t.topo_add_reply() || m.topic == t.sub_login_reply() {
            match Reply::parse(&m.payload) {
                Ok(r) if r.is_ok() => {
                    tracing::debug!(bridge = %self.bridge, topic = %m.topic, id = %r.id, "ok")
                }
                Ok(r) => {
                    tracing::warn!(bridge = %self.bridge, topic = %m.topic, id = %r.id,
                        code = r.code, msg = r.msg.as_deref().unwrap_or(""),
                        "OneNET refused a sub-device request");
                    self.status.last_error = Some(format!(
                        "sub-device request refused: {} {}",
                        r.code,
                        r.msg.unwrap_or_default()
                    ));
                }
                Err(e) => tracing::warn!(bridge = %self.bridge, error = %e, "bad reply"),
            }
        } else if m.topic == t.property_post_reply()
            || m.topic == t.pack_post_reply()
            || m.topic == t.history_post_reply()
        {
            match Reply::parse(&m.payload) {
                Ok(reply) => {
                    if let Some(r) = self.book.reply(&reply) {
                        tracing::warn!(bridge = %self.bridge, id = %r.id, code = r.code,
                            msg = %r.msg, properties = ?r.properties, "OneNET rejected a post");
                        self.status.last_error =
                            Some(format!("post {} rejected: {} {}", r.id, r.code, r.msg));
                        let counts =
                            serde_json::to_string(self.book.rejected()).unwrap_or_default();
                        let topic =
                            format!("{}/rejected", self.status_topic.trim_end_matches("/status"));
                        self.bus
                            .publish(Message::new(topic, counts).retained())
                            .await;
                    }
                }
                Err(e) => tracing::warn!(bridge = %self.bridge, error = %e, "bad post reply"),
            }
        } else if m.topic == t.property_set() {
            match PropertySet::parse(&m.payload) {
                Ok(set) => {
                    tracing::info!(bridge = %self.bridge, id = %set.id,
                        properties = ?set.params.iter().map(|(k, _)| k).collect::<Vec<_>>(),
                        "property set from OneNET");
                    self.status.received += 1;
                    let steps =
                        self.requests
                            .request(set.id, set.params, std::time::Instant::now());
                    for step in steps {
                        self.step(sender, step).await;
                    }
                }
                Err((Some(id), e)) => {
                    tracing::warn!(bridge = %self.bridge, error = %e, "bad property set");
                    let topic = t.property_set_reply();
                    let reply = Reply::new(id, thing::CODE_BAD_REQUEST, e).to_bytes();
                    self.reply(sender, &topic, reply);
                }
                Err((None, e)) => {
                    tracing::warn!(bridge = %self.bridge, error = %e,
                        "property set without an id; cannot answer it");
                }
            }
        } else if m.topic == t.property_get() {
            // Answered from the latest values sent; OneNET's API call waits
            // for the reply.
            let topic = t.property_get_reply();
            let reply = match PropertyGet::parse(&m.payload) {
                Ok(get) => {
                    let data: serde_json::Map<String, Json> = self
                        .latest
                        .iter()
                        .filter(|(k, _)| get.params.is_empty() || get.params.contains(k))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    let mut r = Reply::new(get.id, thing::CODE_OK, "success");
                    r.data = Some(Json::Object(data));
                    Some(r)
                }
                Err((Some(id), e)) => Some(Reply::new(id, thing::CODE_BAD_REQUEST, e)),
                Err((None, e)) => {
                    tracing::warn!(bridge = %self.bridge, error = %e,
                        "property get without an id; cannot answer it");
                    None
                }
            };
            if let Some(r) = reply {
                self.reply(sender, &topic, r.to_bytes());
            }
        } else if let Some(cmd_id) = t.cmd_id(&m.topic) {
            self.status.received += 1;
            let value = Json::String(String::from_utf8_lossy(&m.payload).into_owned());
            let steps = self.requests.request(
                cmd_id.to_string(),
                vec![("cmd".to_string(), value)],
                std::time::Instant::now(),
            );
            for step in steps {
                self.step(sender, step).await;
            }
        } else if m.topic == t.dp_rejected() {
            match DpRejected::parse(&m.payload) {
                Ok(r) => tracing::warn!(bridge = %self.bridge, id = r.id, code = r.err_code,
                    msg = %r.err_msg, "OneNET rejected data points"),
                Err(e) => tracing::warn!(bridge = %self.bridge, error = %e, "bad dp rejection"),
            }
        } else {
            tracing::debug!(bridge = %self.bridge, topic = %m.topic, "unexpected message");
        }
    }

    async fn step(&mut self, sender: &RemoteSender, step: Step) {
        let mut steps = vec![step];
        while let Some(step) = steps.pop() {
            match step {
                Step::Dispatch { id, params } => {
                    for (key, value) in params {
                        let topic = match self.o.mode {
                            OneNetMode::Thing
                                if key.is_empty() || key.contains(['/', '+', '#']) =>
                            {
                                let more = self.requests.result(
                                    &key,
                                    Err("not a valid identifier".into()),
                                    std::time::Instant::now(),
                                );
                                steps.extend(more.into_iter().rev());
                                continue;
                            }
                            OneNetMode::Thing => set_topic(&self.bridge, &key),
                            OneNetMode::Datastream => cmd_topic(&self.bridge),
                        };
                        tracing::debug!(bridge = %self.bridge, %id, %topic, "dispatching");
                        self.bus
                            .publish(Message::new(topic, thing::local_payload(&value)))
                            .await;
                    }
                }
                Step::Answer(a) => {
                    if a.code != thing::CODE_OK {
                        tracing::warn!(bridge = %self.bridge, id = %a.id, code = a.code,
                            msg = %a.msg, "answering OneNET with an error");
                    }
                    let (topic, payload) = match self.o.mode {
                        OneNetMode::Thing => {
                            (self.topics.property_set_reply(), a.reply().to_bytes())
                        }
                        OneNetMode::Datastream => (
                            self.topics.cmd_response(&a.id),
                            datastream::cmd_response(
                                serde_json::json!({"code": a.code, "msg": a.msg})
                                    .to_string()
                                    .as_bytes(),
                            ),
                        ),
                    };
                    self.reply(sender, &topic, payload);
                }
            }
        }
    }

    /// Sends a reply at once (OneNET's API call waits for it); it counts
    /// against the pace of posts.
    fn reply(&mut self, sender: &RemoteSender, topic: &str, payload: Vec<u8>) {
        if !self.topics.is_own(topic) {
            return;
        }
        let qos = Qos::AtMostOnce;
        match sender.publish(topic, Bytes::from(payload), qos, false) {
            Ok(()) => {
                self.acks.sent(NOT_QUEUED, qos);
                self.pacer.sent(std::time::Instant::now());
            }
            Err(e) => tracing::warn!(bridge = %self.bridge, error = %e, "cannot send a reply"),
        }
    }

    /// Applies the queue's `max_age` and publishes the status if it changed.
    async fn housekeeping(&mut self) {
        let expired = lock(&self.queue).expire();
        match expired {
            Ok(n) if n > 0 => {
                tracing::warn!(bridge = %self.bridge, dropped = n, "old posts dropped (queue.max_age)");
                // Expired rows may be ahead of the cursor; peeking skips them.
            }
            Ok(_) => {}
            Err(e) => tracing::error!(bridge = %self.bridge, error = %e, "queue expiry failed"),
        }
        self.sync_stats();
        if self.published.as_ref() != Some(&self.status) {
            self.report().await;
        }
    }

    fn sync_stats(&mut self) {
        let stats = lock(&self.queue).stats();
        self.status.queue_depth = stats.depth;
        self.status.queue_bytes = stats.bytes;
        self.status.dropped = stats.dropped;
    }

    /// Publishes the retained status (`edgebridge/<id>/bridges/<name>/status`).
    async fn report(&mut self) {
        self.sync_stats();
        let payload = serde_json::to_vec(&self.status).unwrap_or_default();
        self.bus
            .publish(Message::new(self.status_topic.clone(), payload).retained())
            .await;
        self.published = Some(self.status.clone());
        self.status_tx.send_replace(self.status.clone());
    }
}
