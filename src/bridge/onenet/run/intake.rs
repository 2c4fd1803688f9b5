//! The intake task: local bus -> batches -> the durable queue.

use super::*;

pub(super) struct Intake {
    pub(super) bridge: String,
    pub(super) mode: OneNetMode,
    pub(super) qos: Qos,
    pub(super) routes: Vec<(String, String)>,
    pub(super) topics: Topics,
    pub(super) batcher: Batcher,
    pub(super) ids: IdCounter,
    pub(super) dp_ids: DpIdCounter,
    pub(super) queue: Arc<Mutex<Queue>>,
    pub(super) queued: Arc<Notify>,
    pub(super) results: mpsc::Sender<HandlerResult>,
    /// Sub-devices, by index (`<n>/<prop>` batch keys).
    pub(super) subs: Vec<Identity>,
    /// Posts the queue refused (e.g. disk full), tried again with the next.
    pub(super) unsaved: std::collections::VecDeque<Message>,
    /// Messages from the broker in strict mode (`queue/inbox.rs`); what
    /// the last run left there comes first.
    pub(super) inbox: Arc<Inbox>,
    pub(super) recovered: Vec<Numbered>,
    /// The last inbox record taken, and the last one the queue was told
    /// is dealt with.
    pub(super) taken_seq: u64,
    pub(super) marked: u64,
}

impl Intake {
    pub(super) async fn run(mut self, mut link: BusLink, shutdown: CancellationToken) {
        for (seq, m) in std::mem::take(&mut self.recovered) {
            self.on_local(m).await;
            self.taken_seq = seq;
        }
        loop {
            let due = self.batcher.due().map(Instant::from_std);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                msg = link.recv() => match msg {
                    Some(m) => self.on_local(m).await,
                    None => break,
                },
                _ = self.inbox.arrived() => self.take_inbox().await,
                _ = sleep_until(due) => self.flush(),
            }
            if self
                .batcher
                .due()
                .is_some_and(|d| d <= std::time::Instant::now())
            {
                self.flush();
            }
        }
        // Nothing that arrived is lost: what the bus and the inbox already
        // handed over and the open window go to the queue.
        while let Ok(Some(m)) = tokio::time::timeout(Duration::ZERO, link.recv()).await {
            self.on_local(m).await;
        }
        self.take_inbox().await;
        self.flush();
    }

    /// Takes everything waiting in the inbox.
    async fn take_inbox(&mut self) {
        loop {
            let batch = self.inbox.take(256);
            if batch.is_empty() {
                return;
            }
            for (seq, m) in batch {
                self.on_local(m).await;
                self.taken_seq = seq;
            }
            self.settle_inbox();
        }
    }

    /// Once everything taken from the inbox is in the queue (nothing in
    /// the open window, nothing unsaved), the queue records it and the
    /// inbox lets it go.
    fn settle_inbox(&mut self) {
        if self.taken_seq <= self.marked || !self.batcher.is_empty() || !self.unsaved.is_empty() {
            return;
        }
        let mut q = lock(&self.queue);
        q.mark_inbox(self.taken_seq);
        if q.flush().is_ok() {
            self.marked = self.taken_seq;
            self.inbox.release(q.inbox_mark());
        }
    }

    async fn on_local(&mut self, m: Message) {
        if let Some(key) = self.result_key(&m.topic) {
            let outcome = parse_result(&m.payload);
            // Never block the intake of data on the downlink side.
            if let Err(e) = self.results.try_send((key, outcome)) {
                tracing::warn!(bridge = %self.bridge, error = %e, "a handler result was dropped");
            }
            return;
        }
        let Some(sample) = Sample::from_local(&m.payload, now_ms()) else {
            return;
        };
        let now = std::time::Instant::now();
        let mut matched = false;
        for (filter, prop) in &self.routes {
            if matches(filter, &m.topic) {
                self.batcher.push(prop, sample.clone(), now);
                matched = true;
            }
        }
        if matched {
            tracing::trace!(bridge = %self.bridge, topic = %m.topic, "property value");
        }
    }

    fn result_key(&self, topic: &str) -> Option<String> {
        let rest = topic.strip_prefix(&format!("onenet/{}/", self.bridge))?;
        match self.mode {
            OneNetMode::Thing => rest
                .strip_prefix("set/")?
                .strip_suffix("/result")
                .filter(|p| !p.is_empty() && !p.contains('/'))
                .map(str::to_string),
            OneNetMode::Datastream => (rest == "cmd/result").then(|| "cmd".to_string()),
        }
    }

    fn flush(&mut self) {
        if self.batcher.is_empty() {
            return;
        }
        let batch = self.batcher.take();
        let mut out: Vec<(String, Vec<u8>)> = Vec::new();
        match self.mode {
            OneNetMode::Thing => {
                // Keys `<n>/<prop>` belong to sub-device n; the rest to the
                // gateway itself.
                let (own, subs): (Batch, Batch) =
                    batch.into_iter().partition(|(k, _)| !k.contains('/'));
                if !own.is_empty() {
                    if let Some(post) = PropertyPost::from_batch(self.ids.next_id(), &own) {
                        out.push((self.topics.property_post(), post.to_bytes()));
                    }
                }
                let mut devices: BTreeMap<Identity, Batch> = BTreeMap::new();
                for (key, samples) in subs {
                    let Some((n, prop)) = key.split_once('/') else {
                        continue;
                    };
                    let Some(who) = n.parse::<usize>().ok().and_then(|n| self.subs.get(n)) else {
                        continue;
                    };
                    devices
                        .entry(who.clone())
                        .or_default()
                        .insert(prop.to_string(), samples);
                }
                for pack in sub::pack_posts(&mut self.ids, &devices) {
                    out.push((self.topics.pack_post(), pack.payload));
                }
            }
            OneNetMode::Datastream => {
                if let Some(p) = datastream::dp_post(self.dp_ids.next_id(), &batch) {
                    out.push((self.topics.dp_post(), p));
                }
            }
        }
        for (topic, payload) in out {
            self.unsaved.push_back(Message {
                topic,
                payload: Bytes::from(payload),
                qos: self.qos,
                retain: false,
            });
        }
        while self.unsaved.len() > MAX_UNSAVED {
            self.unsaved.pop_front();
            tracing::warn!(bridge = %self.bridge, "queue unwritable for long; oldest post dropped");
        }
        if self.unsaved.is_empty() {
            return;
        }
        let batch: Vec<Message> = self.unsaved.iter().cloned().collect();
        let appended = lock(&self.queue).append(&batch);
        match appended {
            Ok(_) => {
                self.unsaved.clear();
                self.queued.notify_one();
                self.settle_inbox();
            }
            Err(e) => {
                // Kept in memory and tried again with the next post.
                tracing::error!(bridge = %self.bridge, error = %e, waiting = self.unsaved.len(),
                    "cannot queue a OneNET post")
            }
        }
    }
}

/// A local handler's result payload: the `commands:` result JSON
/// (`{"ok":true}` / `{"ok":false,"error":"…"}`), a reply-like JSON with
/// `code`, or text (`ok`, `success`, `200` are success; anything else is
/// the error).
pub fn parse_result(payload: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(payload);
    let text = text.trim();
    if let Ok(Json::Object(o)) = serde_json::from_str::<Json>(text) {
        let error = || {
            o.get("error")
                .or_else(|| o.get("msg"))
                .map(|e| match e {
                    Json::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .unwrap_or_else(|| text.to_string())
        };
        if let Some(ok) = o.get("ok").and_then(Json::as_bool) {
            return if ok { Ok(()) } else { Err(error()) };
        }
        if let Some(code) = o.get("code").and_then(Json::as_i64) {
            return if code == thing::CODE_OK {
                Ok(())
            } else {
                Err(error())
            };
        }
    }
    match text.to_ascii_lowercase().as_str() {
        "ok" | "success" | "200" | "true" => Ok(()),
        "" => Err("empty result".into()),
        _ => Err(text.to_string()),
    }
}
