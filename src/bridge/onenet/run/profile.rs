//! The OneNET profile: the device's identity (a fresh token per
//! connection), local values batched into thing-model (or data-stream)
//! posts, a backlog merged into history posts, and OneNET's requests
//! (property set/get, commands) turned into local messages and answered.
//! The queue, the connection, retries, acks, pace and status are the
//! engine's (`bridge/engine`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::SystemTime;

use bytes::Bytes;
use serde_json::Value as Json;
use tokio::time::Instant;

use super::{cmd_topic, set_topic};
use crate::bridge::engine::{Actions, Next, Outgoing, Profile};
use crate::bridge::mqtt::RemoteOptions;
use crate::bridge::onenet::batch::{Batch, Batcher, Sample};
use crate::bridge::onenet::connect::{refresh_after, Credentials};
use crate::bridge::onenet::datastream::{self, DpIdCounter, DpRejected};
use crate::bridge::onenet::downlink::{Requests, Step};
use crate::bridge::onenet::sub::{self, Identity};
use crate::bridge::onenet::thing::{
    self, IdCounter, PropertyGet, PropertyPost, PropertySet, Reply,
};
use crate::bridge::onenet::topics::Topics;
use crate::bridge::onenet::uplink::PostBook;
use crate::bridge::queue::QueuedMessage;
use crate::config::{OneNetConfig, OneNetMode, SubDeviceConfig};
use crate::model::{now_ms, Message, Qos};
use crate::topic::matches;

/// Queued posts merged into one `thing/history/post`, at most.
const HISTORY_MAX: usize = 50;
/// Payload bytes of one history post, about at most.
const HISTORY_BYTES: usize = 128 * 1024;

pub(super) struct OneNetProfile {
    bridge: String,
    o: OneNetConfig,
    /// Connect options without credentials.
    base: RemoteOptions,
    topics: Topics,
    /// Local topic filter -> batch key (`prop`, or `<n>/<prop>` for
    /// sub-device n).
    routes: Vec<(String, String)>,
    batcher: Batcher,
    ids: IdCounter,
    dp_ids: DpIdCounter,
    history_ids: IdCounter,
    control_ids: IdCounter,
    subs: Vec<SubDeviceConfig>,
    /// The sub-devices, by index.
    identities: Vec<Identity>,
    book: PostBook,
    requests: Requests,
    /// Topology and login requests for the sub-devices, sent after each
    /// CONNACK ahead of any post.
    control: VecDeque<(String, Vec<u8>)>,
    /// The latest value of each property sent, for `thing/property/get`.
    latest: BTreeMap<String, Json>,
    /// `edgebridge/<id>/bridges/<name>/rejected`.
    rejected_topic: String,
    /// When the current token must be replaced.
    renew_at: Option<Instant>,
}

impl OneNetProfile {
    /// The profile of bridge `bridge`; `base` are its connect options
    /// without credentials, `routes` local filter -> batch key.
    pub(super) fn new(
        bridge: &str,
        o: OneNetConfig,
        base: RemoteOptions,
        routes: Vec<(String, String)>,
        status_topic: &str,
    ) -> OneNetProfile {
        OneNetProfile {
            bridge: bridge.to_string(),
            topics: Topics::new(&o.product_id, &o.device_name),
            routes,
            batcher: Batcher::new(o.batch_window, keep_per_window(o.mode)),
            ids: IdCounter::starting_at(initial_id()),
            dp_ids: DpIdCounter::default(),
            history_ids: IdCounter::starting_at(initial_id() / 3),
            control_ids: IdCounter::starting_at(initial_id() / 2),
            identities: o.sub_devices.iter().map(Identity::of).collect(),
            subs: o.sub_devices.clone(),
            book: PostBook::default(),
            requests: Requests::new(o.reply_timeout),
            control: VecDeque::new(),
            latest: BTreeMap::new(),
            rejected_topic: format!("{}/rejected", status_topic.trim_end_matches("/status")),
            renew_at: None,
            o,
            base,
        }
    }

    fn result_key(&self, topic: &str) -> Option<String> {
        let rest = topic.strip_prefix(&format!("onenet/{}/", self.bridge))?;
        match self.o.mode {
            OneNetMode::Thing => rest
                .strip_prefix("set/")?
                .strip_suffix("/result")
                .filter(|p| !p.is_empty() && !p.contains('/'))
                .map(str::to_string),
            OneNetMode::Datastream => (rest == "cmd/result").then(|| "cmd".to_string()),
        }
    }

    /// The open batch window becomes posts for the queue.
    fn flush_batch(&mut self, out: &mut Actions) {
        if self.batcher.is_empty() {
            return;
        }
        let batch = self.batcher.take();
        let mut posts: Vec<(String, Vec<u8>)> = Vec::new();
        match self.o.mode {
            OneNetMode::Thing => {
                // Keys `<n>/<prop>` belong to sub-device n; the rest to the
                // gateway itself.
                let (own, subs): (Batch, Batch) =
                    batch.into_iter().partition(|(k, _)| !k.contains('/'));
                if !own.is_empty() {
                    if let Some(post) = PropertyPost::from_batch(self.ids.next_id(), &own) {
                        posts.push((self.topics.property_post(), post.to_bytes()));
                    }
                }
                let mut devices: BTreeMap<Identity, Batch> = BTreeMap::new();
                for (key, samples) in subs {
                    let Some((n, prop)) = key.split_once('/') else {
                        continue;
                    };
                    let Some(who) = n.parse::<usize>().ok().and_then(|n| self.identities.get(n))
                    else {
                        continue;
                    };
                    devices
                        .entry(who.clone())
                        .or_default()
                        .insert(prop.to_string(), samples);
                }
                for pack in sub::pack_posts(&mut self.ids, &devices) {
                    posts.push((self.topics.pack_post(), pack.payload));
                }
            }
            OneNetMode::Datastream => {
                if let Some(p) = datastream::dp_post(self.dp_ids.next_id(), &batch) {
                    posts.push((self.topics.dp_post(), p));
                }
            }
        }
        for (topic, payload) in posts {
            out.queue.push(Message {
                topic,
                payload: Bytes::from(payload),
                qos: self.o.qos.0,
                retain: false,
            });
        }
    }

    /// An answer to OneNET, sent at once; only on the device's own topics.
    fn reply(&self, topic: String, payload: Vec<u8>, out: &mut Actions) {
        if self.topics.is_own(&topic) {
            out.replies.push((topic, Bytes::from(payload)));
        }
    }

    fn steps(&mut self, steps: Vec<Step>, out: &mut Actions) {
        let mut steps: Vec<Step> = steps.into_iter().rev().collect();
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
                        tracing::debug!(%id, %topic, "dispatching");
                        out.local
                            .push((Message::new(topic, thing::local_payload(&value)), false));
                    }
                }
                Step::Answer(a) => {
                    if a.code != thing::CODE_OK {
                        tracing::warn!(id = %a.id, code = a.code, msg = %a.msg,
                            "answering OneNET with an error");
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
                    self.reply(topic, payload, out);
                }
            }
        }
    }

    /// A backlog of property posts goes out as one history post (all but
    /// the newest, which stays a property post so the current value shows
    /// as current).
    fn history(&mut self, ready: &mut VecDeque<QueuedMessage>, newest: bool) -> Option<Next> {
        // A run of the same kind: the gateway's property posts, or
        // sub-device packs (at most 10 sub-devices per history message).
        let kind = ready.front()?.topic.clone();
        let packs = kind == self.topics.pack_post();
        if kind != self.topics.property_post() && !packs {
            return None;
        }
        let peeked = ready.len().min(HISTORY_MAX + 1);
        let mut n = 0;
        let mut bytes = 0;
        let mut devices = BTreeSet::new();
        for m in ready.iter().take(peeked) {
            if m.topic != kind || n == HISTORY_MAX || bytes + m.payload.len() > HISTORY_BYTES {
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
            n += 1;
        }
        // The newest queued post is not history.
        if n == peeked && newest && ready.len() <= HISTORY_MAX {
            n -= 1;
        }
        if n < 2 {
            return None;
        }
        let run: Vec<QueuedMessage> = ready.drain(..n).collect();
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
        let qos = run[0].qos.min(Qos::AtLeastOnce);
        let merged: Vec<i64> = run.iter().map(|m| m.id).collect();
        let last = merged[merged.len() - 1];
        tracing::debug!(posts = merged.len(), "backlog sent as history");
        self.book.sent(id, props);
        Some(Next::Send(Outgoing {
            topic: self.topics.history_post(),
            payload: Bytes::from(payload),
            qos,
            retain: false,
            id: last,
            merged,
        }))
    }
}

impl Profile for OneNetProfile {
    fn connect_options(&mut self) -> Result<RemoteOptions, String> {
        // Checked at start; the key cannot change while running.
        let creds = Credentials::new(&self.o, SystemTime::now())
            .map_err(|e| format!("cannot make a token: {e}"))?;
        let mut options = self.base.clone();
        options.username = Some(creds.username);
        options.password = Some(creds.password);
        self.renew_at = Some(Instant::now() + refresh_after(self.o.token_ttl));
        Ok(options)
    }

    fn renew_at(&self) -> Option<Instant> {
        self.renew_at
    }

    fn uplink(&mut self, m: Message, out: &mut Actions) -> Option<Message> {
        if let Some(key) = self.result_key(&m.topic) {
            let outcome = parse_result(&m.payload);
            let steps = self
                .requests
                .result(&key, outcome, std::time::Instant::now());
            self.steps(steps, out);
            return None;
        }
        let sample = Sample::from_local(&m.payload, now_ms())?;
        let now = std::time::Instant::now();
        let mut matched = false;
        for (filter, prop) in &self.routes {
            if matches(filter, &m.topic) {
                self.batcher.push(prop, sample.clone(), now);
                matched = true;
            }
        }
        if matched {
            tracing::trace!(topic = %m.topic, "property value");
        }
        None
    }

    fn holds_nothing(&self) -> bool {
        self.batcher.is_empty()
    }

    fn due(&self, connected: bool) -> Option<Instant> {
        let requests = self.requests.deadline().filter(|_| connected);
        [self.batcher.due(), requests]
            .into_iter()
            .flatten()
            .min()
            .map(Instant::from_std)
    }

    fn on_due(&mut self, now: Instant, connected: bool, out: &mut Actions) {
        let now = now.into_std();
        if self.batcher.due().is_some_and(|d| d <= now) {
            self.flush_batch(out);
        }
        if connected {
            let steps = self.requests.tick(now);
            self.steps(steps, out);
        }
    }

    fn flush(&mut self, out: &mut Actions) {
        self.flush_batch(out);
    }

    fn on_connected(&mut self, _session_present: bool) -> Vec<(String, Qos)> {
        let mut downlink = match self.o.mode {
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
        self.control.clear();
        if !self.subs.is_empty() {
            downlink.extend([
                (self.topics.topo_add_reply(), Qos::AtMostOnce),
                (self.topics.sub_login_reply(), Qos::AtMostOnce),
                (self.topics.pack_post_reply(), Qos::AtMostOnce),
            ]);
            for sd in &self.subs {
                let id = self.control_ids.next_id();
                match sub::topo_add(&id, sd, self.o.method, SystemTime::now(), self.o.token_ttl) {
                    Ok(p) => self.control.push_back((self.topics.topo_add(), p)),
                    Err(e) => tracing::error!(sub_device = %Identity::of(sd).label(), error = %e,
                        "cannot sign the sub-device's topo/add"),
                }
                let id = self.control_ids.next_id();
                let login = sub::login(&id, &Identity::of(sd));
                self.control.push_back((self.topics.sub_login(), login));
            }
        }
        downlink
    }

    fn next_control(&mut self) -> Option<(String, Bytes)> {
        let (topic, payload) = self.control.pop_front()?;
        Some((topic, Bytes::from(payload)))
    }

    fn has_control(&self) -> bool {
        !self.control.is_empty()
    }

    fn lookahead(&self) -> usize {
        if self.o.history_replay {
            HISTORY_MAX + 1
        } else {
            1
        }
    }

    fn next_out(&mut self, ready: &mut VecDeque<QueuedMessage>, newest: bool) -> Option<Next> {
        if self.o.history_replay {
            if let Some(next) = self.history(ready, newest) {
                return Some(next);
            }
        }
        let m = ready.pop_front()?;
        if !self.topics.is_own(&m.topic) {
            // Only our own topics are ever queued; never publish elsewhere.
            return Some(Next::Drop {
                ids: vec![m.id],
                why: format!(
                    "dropping a queued message outside the device's topics ({})",
                    m.topic
                ),
            });
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
        let qos = m.qos.min(Qos::AtLeastOnce);
        Some(Next::Send(Outgoing {
            topic: m.topic,
            payload: m.payload,
            qos,
            retain: false,
            id: m.id,
            merged: Vec::new(),
        }))
    }

    fn on_remote(&mut self, m: Message, out: &mut Actions) {
        let t = &self.topics;
        if m.topic == t.topo_add_reply() || m.topic == t.sub_login_reply() {
            match Reply::parse(&m.payload) {
                Ok(r) if r.is_ok() => tracing::debug!(topic = %m.topic, id = %r.id, "ok"),
                Ok(r) => {
                    tracing::warn!(topic = %m.topic, id = %r.id, code = r.code,
                        msg = r.msg.as_deref().unwrap_or(""),
                        "OneNET refused a sub-device request");
                    out.error = Some(format!(
                        "sub-device request refused: {} {}",
                        r.code,
                        r.msg.unwrap_or_default()
                    ));
                }
                Err(e) => tracing::warn!(error = %e, "bad reply"),
            }
        } else if m.topic == t.property_post_reply()
            || m.topic == t.pack_post_reply()
            || m.topic == t.history_post_reply()
        {
            match Reply::parse(&m.payload) {
                Ok(reply) => {
                    if let Some(r) = self.book.reply(&reply) {
                        tracing::warn!(id = %r.id, code = r.code, msg = %r.msg,
                            properties = ?r.properties, "OneNET rejected a post");
                        out.error = Some(format!("post {} rejected: {} {}", r.id, r.code, r.msg));
                        let counts =
                            serde_json::to_string(self.book.rejected()).unwrap_or_default();
                        out.local.push((
                            Message::new(self.rejected_topic.clone(), counts).retained(),
                            false,
                        ));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "bad post reply"),
            }
        } else if m.topic == t.property_set() {
            match PropertySet::parse(&m.payload) {
                Ok(set) => {
                    tracing::info!(id = %set.id,
                        properties = ?set.params.iter().map(|(k, _)| k).collect::<Vec<_>>(),
                        "property set from OneNET");
                    out.received += 1;
                    let steps =
                        self.requests
                            .request(set.id, set.params, std::time::Instant::now());
                    self.steps(steps, out);
                }
                Err((Some(id), e)) => {
                    tracing::warn!(error = %e, "bad property set");
                    let topic = t.property_set_reply();
                    let reply = Reply::new(id, thing::CODE_BAD_REQUEST, e).to_bytes();
                    self.reply(topic, reply, out);
                }
                Err((None, e)) => {
                    tracing::warn!(error = %e, "property set without an id; cannot answer it");
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
                    tracing::warn!(error = %e, "property get without an id; cannot answer it");
                    None
                }
            };
            if let Some(r) = reply {
                self.reply(topic, r.to_bytes(), out);
            }
        } else if let Some(cmd_id) = t.cmd_id(&m.topic) {
            out.received += 1;
            let value = Json::String(String::from_utf8_lossy(&m.payload).into_owned());
            let steps = self.requests.request(
                cmd_id.to_string(),
                vec![("cmd".to_string(), value)],
                std::time::Instant::now(),
            );
            self.steps(steps, out);
        } else if m.topic == t.dp_rejected() {
            match DpRejected::parse(&m.payload) {
                Ok(r) => tracing::warn!(id = r.id, code = r.err_code, msg = %r.err_msg,
                    "OneNET rejected data points"),
                Err(e) => tracing::warn!(error = %e, "bad dp rejection"),
            }
        } else {
            tracing::debug!(topic = %m.topic, "unexpected message");
        }
    }
}

/// A thing-model post carries one value per property; a data-stream post
/// takes several points per stream.
fn keep_per_window(mode: OneNetMode) -> usize {
    match mode {
        OneNetMode::Thing => 1,
        OneNetMode::Datastream => 100,
    }
}

/// Post ids continue from the clock after a restart, so replies to posts
/// from before the restart are not taken for new ones.
fn initial_id() -> u64 {
    (now_ms().max(1) as u64) % 1_000_000_000_000
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::mqtt::Endpoint;
    use crate::config::{Config, MqttProtocol};
    use std::time::Duration;

    fn profile(extra: &str) -> OneNetProfile {
        let text = format!(
            "gateway: {{ id: gw }}\nbridges:\n  - name: one\n    onenet:\n      product_id: p1\n      \
             device_name: d1\n      access_key: \"KuF3NT/jUBJ62LNBB/A8XZA9CqS3Cu79B/ABmfA1UCw=\"\n{extra}"
        );
        let c = Config::from_text(std::path::Path::new("/etc/eb/c.yaml"), &text, |_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        let o = c.bridges[0].onenet.clone().unwrap();
        let base = RemoteOptions {
            protocol: MqttProtocol::Mqtt,
            endpoint: Endpoint::parse("mqtt://127.0.0.1:1883").unwrap(),
            client_id: "d1".into(),
            username: None,
            password: None,
            keep_alive: Duration::from_secs(60),
            clean_session: true,
            will: None,
            tls: None,
            max_packet_size: 1 << 20,
            max_inflight: 6,
        };
        let routes = vec![("PV/data".to_string(), "power".to_string())];
        OneNetProfile::new("one", o, base, routes, "edgebridge/gw/bridges/one/status")
    }

    /// One window of values -> one post for the queue.
    fn post(p: &mut OneNetProfile, value: &str) -> Message {
        let mut out = Actions::default();
        assert!(p
            .uplink(Message::new("PV/data", value.to_string()), &mut out)
            .is_none());
        assert!(!p.holds_nothing(), "the value waits in the window");
        let due = p.due(false).expect("an open window is due");
        p.on_due(due + Duration::from_millis(1), false, &mut out);
        assert!(p.holds_nothing());
        assert_eq!(out.queue.len(), 1, "{out:?}");
        out.queue.pop().unwrap()
    }

    fn queued(id: i64, m: Message) -> QueuedMessage {
        QueuedMessage {
            id,
            ts: 0,
            topic: m.topic,
            payload: m.payload,
            qos: m.qos,
            retain: m.retain,
        }
    }

    /// Messages as the queue hands them out: ids from 1.
    fn as_queued(posts: &[Message]) -> VecDeque<QueuedMessage> {
        posts
            .iter()
            .cloned()
            .zip(1..)
            .map(|(m, id)| queued(id, m))
            .collect()
    }

    #[test]
    fn values_of_a_window_become_one_post_with_the_latest_value() {
        let mut p = profile("");
        let mut out = Actions::default();
        assert!(p.uplink(Message::new("PV/data", "2.5"), &mut out).is_none());
        let m = post(&mut p, "3.5");
        assert_eq!(m.topic, p.topics.property_post());
        let post = PropertyPost::parse(&m.payload).unwrap();
        let values = post.values();
        assert_eq!(values.len(), 1, "{values:?}");
        assert_eq!(values[0].0, "power");
        assert_eq!(values[0].1.value, serde_json::json!(3.5));
        // Unmatched topics and handler results are no data.
        assert!(p.uplink(Message::new("x/y", "1"), &mut out).is_none());
        assert!(p
            .uplink(Message::new("onenet/one/set/led/result", "ok"), &mut out)
            .is_none());
        assert!(p.holds_nothing());
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn a_backlog_goes_out_as_history_but_the_newest_post_as_current() {
        let mut p = profile("");
        let posts: Vec<Message> = (0..3).map(|i| post(&mut p, &i.to_string())).collect();
        let mut ready = as_queued(&posts);
        let Some(Next::Send(history)) = p.next_out(&mut ready, true) else {
            panic!("a history post");
        };
        assert_eq!(history.topic, p.topics.history_post());
        assert_eq!((history.id, history.merged.as_slice()), (2, &[1, 2][..]));
        assert_eq!(history.qos, Qos::AtLeastOnce);
        let Some(Next::Send(current)) = p.next_out(&mut ready, true) else {
            panic!("a property post");
        };
        assert_eq!(current.topic, p.topics.property_post());
        assert_eq!((current.id, current.merged.len()), (3, 0));
        assert!(p.next_out(&mut ready, true).is_none());

        // More waiting in the queue: the newest post seen is history too.
        let mut ready = as_queued(&posts);
        let Some(Next::Send(history)) = p.next_out(&mut ready, false) else {
            panic!("a history post");
        };
        assert_eq!(history.merged, [1, 2, 3]);
    }

    #[test]
    fn without_history_replay_posts_go_one_by_one() {
        let mut p = profile("      history_replay: false\n");
        assert_eq!(p.lookahead(), 1);
        let posts: Vec<Message> = (0..2).map(|i| post(&mut p, &i.to_string())).collect();
        let mut ready = as_queued(&posts);
        let Some(Next::Send(first)) = p.next_out(&mut ready, true) else {
            panic!("a property post");
        };
        assert_eq!((first.id, first.merged.len()), (1, 0));
    }

    #[test]
    fn a_queued_message_outside_the_devices_topics_is_never_sent() {
        let mut p = profile("");
        let mut ready = VecDeque::from([queued(7, Message::new("other/topic", "x"))]);
        match p.next_out(&mut ready, true) {
            Some(Next::Drop { ids, .. }) => assert_eq!(ids, [7]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn each_connection_gets_a_fresh_token_and_a_renewal_time() {
        let mut p = profile("");
        assert!(p.renew_at().is_none());
        let options = p.connect_options().unwrap();
        assert_eq!(options.username.as_deref(), Some("p1"));
        assert!(options.password.is_some());
        assert!(p.renew_at().is_some_and(|at| at > Instant::now()));
    }
}
