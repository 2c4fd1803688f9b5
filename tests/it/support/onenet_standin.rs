//! A local stand-in for OneNET's MQTT access (OneNET itself is not reachable
//! from tests). It speaks MQTT 3.1.1 with rumqttc's packet codec and
//! enforces what OneNET enforces:
//!
//! - CONNECT: protocol 3.1.1, client id = device name, username = product
//!   id, password = a token that verifies against the access key and has not
//!   expired, clean session, no will, keep-alive 10..=1800 s; otherwise a
//!   refusing CONNACK and a close;
//! - publishes with QoS 2 or retain, or outside `$sys/{pid}/{dev}/`, and
//!   PUBREC/PUBREL/PUBCOMP, get the device disconnected (recorded as a
//!   violation); payloads over 256 KB too;
//! - subscriptions outside the prefix are refused; granted QoS is 0;
//! - property posts are answered on `thing/property/post/reply` (code 200,
//!   or 2404 for identifiers not in the "thing model" when one is set);
//! - data-point posts get `dp/post/json/accepted`;
//! - it records every post with its arrival time (to measure the rate), can
//!   send `thing/property/set` and `cmd/request/{id}`, and records the
//!   replies; it can simulate an outage (connections closed and refused).
//!
//! Tests wait on conditions with [`StandIn::wait_for`], never on sleeps.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as CodecError, Protocol, QoS};
use serde_json::Value as Json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use edgebridge::bridge::onenet::{token, AccessKey, ParsedToken, Topics};
use edgebridge::config::Secret;

/// OneNET's largest PUBLISH payload.
const MAX_PACKET: usize = 256 * 1024 + 1024;

/// One CONNECT and how it was answered.
#[derive(Debug, Clone)]
pub struct ConnectAttempt {
    pub client_id: String,
    pub accepted: bool,
    /// Why it was refused.
    pub reason: Option<String>,
    pub keep_alive: u16,
    /// The token's expiry (Unix seconds), when it could be read.
    pub token_et: Option<u64>,
}

/// One message the device published, with when it arrived.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub topic: String,
    pub qos: QoS,
    pub payload: Vec<u8>,
}

impl Received {
    pub fn json(&self) -> Json {
        serde_json::from_slice(&self.payload).unwrap_or(Json::Null)
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub connects: Vec<ConnectAttempt>,
    /// Everything published by the device, in arrival order.
    pub published: Vec<Received>,
    /// Protocol rules the device broke (each got it disconnected).
    pub violations: Vec<String>,
    /// Filters subscribed in the current session.
    pub subscriptions: Vec<String>,
    /// Refused subscription filters.
    pub refused_subscriptions: Vec<String>,
    pub online: bool,
    /// Sessions that ended (either side).
    pub disconnects: usize,
    /// While set, connections are closed at once (an outage).
    pub outage: bool,
    /// The product's thing model; posts of other identifiers get 2404.
    pub known_properties: Option<HashSet<String>>,
    /// Property sets sent (`id`s) in order.
    pub sets_sent: Vec<String>,
    /// Sub-devices known to the platform: (product, device) -> access key.
    pub sub_keys: HashMap<(String, String), String>,
    /// Sub-devices in the gateway's topology (kept across sessions).
    pub topology: HashSet<(String, String)>,
    /// Sub-devices logged in during the current session.
    pub logged_in: HashSet<(String, String)>,
    /// `(topic suffix, code, msg)` of every reply the stand-in sent to
    /// sub-device requests, in order.
    pub sub_replies: Vec<(String, i64, String)>,
    outgoing: Option<mpsc::UnboundedSender<Publish>>,
    kick: Option<mpsc::UnboundedSender<()>>,
}

impl State {
    fn topics_ending(&self, suffix: &str) -> Vec<&Received> {
        self.published
            .iter()
            .filter(|r| r.topic.ends_with(suffix))
            .collect()
    }

    /// Property posts received, in order.
    pub fn property_posts(&self) -> Vec<&Received> {
        self.topics_ending("/thing/property/post")
    }

    /// Data-point posts received, in order.
    pub fn dp_posts(&self) -> Vec<&Received> {
        self.topics_ending("/dp/post/json")
    }

    /// `set_reply` for property set `id`, parsed.
    pub fn set_reply(&self, id: &str) -> Option<Json> {
        self.topics_ending("/thing/property/set_reply")
            .into_iter()
            .map(|r| r.json())
            .find(|j| j.get("id").and_then(Json::as_str) == Some(id))
    }

    /// `get_reply` for property get `id`, parsed.
    pub fn get_reply(&self, id: &str) -> Option<Json> {
        self.topics_ending("/thing/property/get_reply")
            .into_iter()
            .map(|r| r.json())
            .find(|j| j.get("id").and_then(Json::as_str) == Some(id))
    }

    /// The response to command `cmd_id`.
    pub fn cmd_response(&self, cmd_id: &str) -> Option<Vec<u8>> {
        self.published
            .iter()
            .find(|r| r.topic.ends_with(&format!("/cmd/response/{cmd_id}")))
            .map(|r| r.payload.clone())
    }

    /// History posts received, in order.
    pub fn history_posts(&self) -> Vec<&Received> {
        self.topics_ending("/thing/history/post")
    }

    /// Every `(property, value, time)` posted (property posts and history
    /// posts), in arrival order.
    pub fn posted_values(&self) -> Vec<(String, Json, i64)> {
        let mut out = Vec::new();
        let posts = self.published.iter().filter(|r| {
            r.topic.ends_with("/thing/property/post") || r.topic.ends_with("/thing/history/post")
        });
        for r in posts {
            let j = r.json();
            let mut push = |k: &str, v: &Json| {
                let time = v.get("time").and_then(Json::as_i64).unwrap_or(0);
                out.push((
                    k.to_string(),
                    v.get("value").cloned().unwrap_or(Json::Null),
                    time,
                ));
            };
            match j.get("params") {
                Some(Json::Object(params)) => params.iter().for_each(|(k, v)| push(k, v)),
                Some(Json::Array(entries)) => {
                    for e in entries {
                        if let Some(Json::Object(props)) = e.get("properties") {
                            for (k, values) in props {
                                for v in values.as_array().into_iter().flatten() {
                                    push(k, v);
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// `(product, device, property, value, time)` of every pack/post entry.
    pub fn packed_values(&self) -> Vec<(String, String, String, Json, i64)> {
        let mut out = Vec::new();
        // pack/post entries, and history/post entries with an identity
        // (a sub-device backlog), in arrival order.
        let msgs = self.published.iter().filter(|r| {
            r.topic.ends_with("/thing/pack/post") || r.topic.ends_with("/thing/history/post")
        });
        for r in msgs {
            let j = r.json();
            for e in j["params"].as_array().cloned().unwrap_or_default() {
                if !e["identity"].is_object() {
                    continue;
                }
                let pid = e["identity"]["productID"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                let dev = e["identity"]["deviceName"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                for (k, v) in e["properties"].as_object().into_iter().flatten() {
                    let values = match v {
                        Json::Array(a) => a.clone(),
                        one => vec![one.clone()],
                    };
                    for v in values {
                        let t = v["time"].as_i64().unwrap_or(0);
                        out.push((pid.clone(), dev.clone(), k.clone(), v["value"].clone(), t));
                    }
                }
            }
        }
        out
    }

    /// The most messages (posts, history, replies: everything the device
    /// published) that arrived within any `window`.
    pub fn max_posts_within(&self, window: Duration) -> usize {
        let times: Vec<Instant> = self.published.iter().map(|r| r.at).collect();
        let mut best = 0;
        for (i, t) in times.iter().enumerate() {
            let n = times[i..].iter().take_while(|u| **u - *t < window).count();
            best = best.max(n);
        }
        best
    }
}

/// A running stand-in; it stops when dropped.
pub struct StandIn {
    pub product_id: String,
    pub device_name: String,
    pub access_key: String,
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    changed: watch::Receiver<u64>,
    task: JoinHandle<()>,
    next_id: Mutex<u64>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The reference's sample key; any base64 key works.
pub const SAMPLE_KEY: &str = "KuF3NT/jUBJ62LNBB/A8XZA9CqS3Cu79B/ABmfA1UCw=";

impl StandIn {
    /// Starts on a free loopback port.
    pub async fn start(product_id: &str, device_name: &str, access_key: &str) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind stand-in");
        let addr = listener.local_addr().expect("stand-in addr");
        let state = Arc::new(Mutex::new(State::default()));
        let (tx, rx) = watch::channel(0u64);
        let shared = Shared {
            product_id: product_id.to_string(),
            device_name: device_name.to_string(),
            key: AccessKey::from_base64(&Secret::new(access_key)).expect("stand-in key"),
            topics: Topics::new(product_id, device_name),
            state: state.clone(),
            changed: Arc::new(tx),
        };
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let shared = shared.clone();
                tokio::spawn(async move { shared.serve(sock).await });
            }
        });
        StandIn {
            product_id: product_id.to_string(),
            device_name: device_name.to_string(),
            access_key: access_key.to_string(),
            addr,
            state,
            changed: rx,
            task,
            next_id: Mutex::new(1000),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `mqtt://127.0.0.1:<port>`, for a bridge's `url:`.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    pub fn topics(&self) -> Topics {
        Topics::new(&self.product_id, &self.device_name)
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `cond` holds (checked on every change), or panics with
    /// `what` and the state after `timeout`. `cond` gets the locked state:
    /// calling [`StandIn::state`] inside it would deadlock.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&State) -> Option<T>,
    ) -> T {
        let mut rx = self.changed.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(v) = cond(&self.state()) {
                return v;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    let s = self.state();
                    panic!(
                        "stand-in: timed out waiting for {what}; connects: {:?}; violations: {:?}; \
                         {} published; subscriptions: {:?}",
                        s.connects,
                        s.violations,
                        s.published.len(),
                        s.subscriptions
                    );
                }
            }
        }
    }

    /// Identifiers of the product's thing model; others get code 2404.
    pub fn set_known_properties(&self, props: &[&str]) {
        self.state().known_properties = Some(props.iter().map(|s| s.to_string()).collect());
    }

    /// Registers a sub-device with its own key (as creating it in the
    /// OneNET console would).
    pub fn add_sub_device(&self, product_id: &str, device_name: &str, key: &str) {
        self.state()
            .sub_keys
            .insert((product_id.into(), device_name.into()), key.into());
    }

    /// Starts an outage: the current connection is closed and new ones are
    /// closed as soon as they arrive.
    pub fn begin_outage(&self) {
        let mut s = self.state();
        s.outage = true;
        if let Some(k) = s.kick.take() {
            let _ = k.send(());
        }
    }

    pub fn end_outage(&self) {
        self.state().outage = false;
    }

    /// Sends `thing/property/set` with `params`; returns its id.
    pub fn send_property_set(&self, params: Json) -> String {
        let id = {
            let mut n = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
            *n += 1;
            n.to_string()
        };
        let payload = serde_json::json!({"id": id, "version": "1.0", "params": params});
        let topic = self.topics().property_set();
        self.send(Publish::new(topic, QoS::AtMostOnce, payload.to_string()));
        self.state().sets_sent.push(id.clone());
        id
    }

    /// Sends `thing/property/get` for `props`; returns its id.
    pub fn send_property_get(&self, props: &[&str]) -> String {
        let id = {
            let mut n = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
            *n += 1;
            n.to_string()
        };
        let payload = serde_json::json!({"id": id, "version": "1.0", "params": props});
        let topic = self.topics().property_get();
        self.send(Publish::new(topic, QoS::AtMostOnce, payload.to_string()));
        id
    }

    /// Sends `cmd/request/{cmd_id}` with `payload`.
    pub fn send_command(&self, cmd_id: &str, payload: &[u8]) {
        let topic = self.topics().cmd_request(cmd_id);
        self.send(Publish::new(topic, QoS::AtMostOnce, payload.to_vec()));
    }

    fn send(&self, p: Publish) {
        let s = self.state();
        let subscribed = s
            .subscriptions
            .iter()
            .any(|f| edgebridge::topic::matches(f, &p.topic));
        assert!(
            subscribed,
            "the device has not subscribed to {} (subscriptions: {:?})",
            p.topic, s.subscriptions
        );
        s.outgoing
            .as_ref()
            .expect("no device connected")
            .send(p)
            .expect("connection gone");
    }
}

#[derive(Clone)]
struct Shared {
    product_id: String,
    device_name: String,
    key: AccessKey,
    topics: Topics,
    state: Arc<Mutex<State>>,
    changed: Arc<watch::Sender<u64>>,
}

enum Step {
    Continue,
    Close,
}

impl Shared {
    fn update<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
        self.changed.send_modify(|n| *n += 1);
        out
    }

    async fn serve(&self, mut sock: TcpStream) {
        if self.update(|s| s.outage) {
            return;
        }
        let mut buf = BytesMut::with_capacity(4096);
        let connect = match read_packet(&mut sock, &mut buf, Duration::from_secs(5)).await {
            Ok(Packet::Connect(c)) => c,
            _ => return,
        };
        let refuse = self.check_connect(&connect);
        self.update(|s| {
            s.connects.push(ConnectAttempt {
                client_id: connect.client_id.clone(),
                accepted: refuse.is_none(),
                reason: refuse.as_ref().map(|(_, r)| r.clone()),
                keep_alive: connect.keep_alive,
                token_et: connect
                    .login
                    .as_ref()
                    .and_then(|l| ParsedToken::parse(&l.password).ok())
                    .map(|t| t.et),
            })
        });
        if let Some((code, _)) = refuse {
            let _ = write_packet(&mut sock, Packet::ConnAck(ConnAck::new(code, false))).await;
            return;
        }
        if write_packet(
            &mut sock,
            Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
        )
        .await
        .is_err()
        {
            return;
        }
        let (out_tx, mut out_rx) = mpsc::unbounded_channel();
        let (kick_tx, mut kick_rx) = mpsc::unbounded_channel();
        self.update(|s| {
            s.online = true;
            s.subscriptions.clear();
            s.logged_in.clear();
            s.outgoing = Some(out_tx);
            s.kick = Some(kick_tx);
        });
        // OneNET drops a device that is silent for 1.5 x keep-alive.
        let idle = Duration::from_millis(u64::from(connect.keep_alive) * 1500);
        let mut pkid: u16 = 0;
        loop {
            tokio::select! {
                read = read_packet(&mut sock, &mut buf, idle) => {
                    let step = match read {
                        Ok(p) => self.on_packet(&mut sock, p).await,
                        Err(e) => {
                            if e != "closed" {
                                self.update(|s| s.violations.push(e));
                            }
                            Step::Close
                        }
                    };
                    if let Step::Close = step { break; }
                }
                Some(mut p) = out_rx.recv() => {
                    if p.qos != QoS::AtMostOnce {
                        pkid = pkid.wrapping_add(1).max(1);
                        p.pkid = pkid;
                    }
                    if write_packet(&mut sock, Packet::Publish(p)).await.is_err() { break; }
                }
                _ = kick_rx.recv() => break,
            }
        }
        self.update(|s| {
            s.online = false;
            s.outgoing = None;
            s.kick = None;
            s.disconnects += 1;
        });
    }

    fn check_connect(
        &self,
        c: &rumqttc::mqttbytes::v4::Connect,
    ) -> Option<(ConnectReturnCode, String)> {
        use ConnectReturnCode::*;
        if c.protocol != Protocol::V4 {
            return Some((RefusedProtocolVersion, "not MQTT 3.1.1".into()));
        }
        if c.client_id != self.device_name {
            return Some((
                BadClientId,
                format!("client id `{}` is not the device name", c.client_id),
            ));
        }
        if !c.clean_session {
            return Some((NotAuthorized, "clean session must be 1".into()));
        }
        if c.last_will.is_some() {
            return Some((NotAuthorized, "will is not supported".into()));
        }
        if !(10..=1800).contains(&c.keep_alive) {
            return Some((
                NotAuthorized,
                format!("keep-alive {} not in 10..=1800", c.keep_alive),
            ));
        }
        let Some(login) = &c.login else {
            return Some((BadUserNamePassword, "no username/password".into()));
        };
        if login.username != self.product_id {
            return Some((BadUserNamePassword, "username is not the product id".into()));
        }
        let t = match ParsedToken::parse(&login.password) {
            Ok(t) => t,
            Err(e) => return Some((BadUserNamePassword, format!("token: {e}"))),
        };
        if t.res != token::device_resource(&self.product_id, &self.device_name) {
            return Some((
                NotAuthorized,
                format!("token res `{}` is not this device", t.res),
            ));
        }
        if !t.verify(&self.key) {
            return Some((
                BadUserNamePassword,
                "token signature does not verify".into(),
            ));
        }
        if t.et <= now_secs() {
            return Some((NotAuthorized, "token expired".into()));
        }
        None
    }

    async fn on_packet(&self, sock: &mut TcpStream, p: Packet) -> Step {
        match p {
            Packet::Publish(p) => self.on_publish(sock, p).await,
            Packet::Subscribe(sub) => {
                let mut codes = Vec::new();
                for f in &sub.filters {
                    let ok = f.path.starts_with(self.topics.prefix())
                        && f.path.len() > self.topics.prefix().len();
                    self.update(|s| {
                        if ok {
                            s.subscriptions.push(f.path.clone());
                        } else {
                            s.refused_subscriptions.push(f.path.clone());
                        }
                    });
                    codes.push(if ok {
                        SubscribeReasonCode::Success(QoS::AtMostOnce)
                    } else {
                        SubscribeReasonCode::Failure
                    });
                }
                step(write_packet(sock, Packet::SubAck(SubAck::new(sub.pkid, codes))).await)
            }
            Packet::Unsubscribe(u) => {
                self.update(|s| s.subscriptions.retain(|f| !u.topics.contains(f)));
                step(write_packet(sock, Packet::UnsubAck(UnsubAck::new(u.pkid))).await)
            }
            Packet::PingReq => step(write_packet(sock, Packet::PingResp).await),
            Packet::PubAck(_) => Step::Continue,
            Packet::Disconnect => Step::Close,
            Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => {
                self.violation("QoS 2 packet (PUBREC/PUBREL/PUBCOMP)")
            }
            other => self.violation(&format!("unexpected packet {other:?}")),
        }
    }

    fn violation(&self, what: &str) -> Step {
        self.update(|s| s.violations.push(what.to_string()));
        Step::Close
    }

    async fn on_publish(&self, sock: &mut TcpStream, p: Publish) -> Step {
        if p.qos == QoS::ExactlyOnce {
            return self.violation(&format!("QoS 2 publish on {}", p.topic));
        }
        if p.retain {
            return self.violation(&format!("retained publish on {}", p.topic));
        }
        if !self.topics.is_own(&p.topic) {
            return self.violation(&format!("publish outside the device prefix: {}", p.topic));
        }
        if p.payload.len() > 256 * 1024 {
            return self.violation("payload over 256 KB");
        }
        self.update(|s| {
            s.published.push(Received {
                at: Instant::now(),
                topic: p.topic.clone(),
                qos: p.qos,
                payload: p.payload.to_vec(),
            })
        });
        if p.qos == QoS::AtLeastOnce
            && write_packet(sock, Packet::PubAck(PubAck::new(p.pkid)))
                .await
                .is_err()
        {
            return Step::Close;
        }
        let mut replies = Vec::new();
        if p.topic == self.topics.property_post() {
            replies.push((
                self.topics.property_post_reply(),
                self.post_reply(&p.payload),
            ));
        } else if p.topic == self.topics.history_post() {
            let json: Json = serde_json::from_slice(&p.payload).unwrap_or(Json::Null);
            let ok = json["params"][0]["properties"].is_object();
            let reply = serde_json::json!({
                "id": json["id"],
                "code": if ok { 200 } else { 400 },
                "msg": if ok { "success" } else { "params[0].properties missing" },
            });
            replies.push((
                self.topics.history_post_reply(),
                reply.to_string().into_bytes(),
            ));
        } else if p.topic == self.topics.topo_add()
            || p.topic == self.topics.sub_login()
            || p.topic == self.topics.pack_post()
        {
            let reply = self.sub_reply(&p.topic, &p.payload);
            replies.push((format!("{}/reply", p.topic), reply));
        } else if p.topic == self.topics.dp_post() {
            let id = serde_json::from_slice::<Json>(&p.payload)
                .ok()
                .and_then(|j| j.get("id").cloned())
                .unwrap_or(Json::Null);
            replies.push((
                self.topics.dp_accepted(),
                serde_json::json!({ "id": id }).to_string().into_bytes(),
            ));
        }
        for (topic, payload) in replies {
            let subscribed = self.update(|s| {
                s.subscriptions
                    .iter()
                    .any(|f| edgebridge::topic::matches(f, &topic))
            });
            if subscribed {
                let reply = Publish::new(topic, QoS::AtMostOnce, payload);
                if write_packet(sock, Packet::Publish(reply)).await.is_err() {
                    return Step::Close;
                }
            }
        }
        Step::Continue
    }

    /// Answers topo/add (checks the sub-device's token), sub/login (must
    /// be in the topology) and pack/post (logged in, within the limits).
    fn sub_reply(&self, topic: &str, payload: &[u8]) -> Vec<u8> {
        let json: Json = serde_json::from_slice(payload).unwrap_or(Json::Null);
        let id = json.get("id").cloned().unwrap_or(Json::Null);
        let params = json.get("params").cloned().unwrap_or(Json::Null);
        let ident = |v: &Json| {
            (
                v["productID"].as_str().unwrap_or("").to_string(),
                v["deviceName"].as_str().unwrap_or("").to_string(),
            )
        };
        let (code, msg) = self.update(|s| -> (i64, String) {
            if topic == self.topics.topo_add() {
                let who = ident(&params);
                let Some(key) = s.sub_keys.get(&who) else {
                    return (404, "no such sub-device".into());
                };
                let key = AccessKey::from_base64(&Secret::new(key.clone())).expect("sub key");
                let ok = params["sasToken"]
                    .as_str()
                    .and_then(|t| ParsedToken::parse(t).ok())
                    .is_some_and(|t| {
                        t.res == token::device_resource(&who.0, &who.1)
                            && t.verify(&key)
                            && t.et > now_secs()
                    });
                if !ok {
                    return (401, "sasToken does not verify".into());
                }
                s.topology.insert(who);
                (200, "success".into())
            } else if topic == self.topics.sub_login() {
                let who = ident(&params);
                if !s.topology.contains(&who) {
                    return (403, "not in the gateway's topology".into());
                }
                s.logged_in.insert(who);
                (200, "success".into())
            } else {
                let Some(entries) = params.as_array() else {
                    return (400, "params must be an array".into());
                };
                if entries.len() > 10 {
                    return (400, "more than 10 sub-devices".into());
                }
                for e in entries {
                    let who = ident(&e["identity"]);
                    if !s.logged_in.contains(&who) {
                        return (403, format!("{}/{} not logged in", who.0, who.1));
                    }
                    if e["properties"].as_object().map_or(0, |p| p.len()) > 100 {
                        return (400, "more than 100 properties".into());
                    }
                }
                (200, "success".into())
            }
        });
        let suffix = topic.rsplit_once("thing/").map(|(_, t)| t).unwrap_or(topic);
        self.update(|s| s.sub_replies.push((suffix.to_string(), code, msg.clone())));
        serde_json::json!({"id": id, "code": code, "msg": msg})
            .to_string()
            .into_bytes()
    }

    fn post_reply(&self, payload: &[u8]) -> Vec<u8> {
        let json: Json = match serde_json::from_slice(payload) {
            Ok(j) => j,
            Err(_) => return br#"{"id":"0","code":400,"msg":"not JSON"}"#.to_vec(),
        };
        let id = json.get("id").cloned().unwrap_or(Json::Null);
        let id_ok = id.as_str().is_some_and(|s| {
            !s.is_empty() && s.len() <= 13 && s.bytes().all(|b| b.is_ascii_digit())
        });
        let reply = |code: i64, msg: String| {
            serde_json::json!({"id": id, "code": code, "msg": msg})
                .to_string()
                .into_bytes()
        };
        if !id_ok {
            return reply(400, "id must be a string of at most 13 digits".into());
        }
        let Some(Json::Object(params)) = json.get("params") else {
            return reply(400, "params missing".into());
        };
        let known = self.update(|s| s.known_properties.clone());
        if let Some(known) = known {
            if let Some(unknown) = params.keys().find(|k| !known.contains(*k)) {
                return reply(2404, format!("identifier not exist: {unknown}"));
            }
        }
        reply(200, "success".into())
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn step(r: Result<(), String>) -> Step {
    match r {
        Ok(()) => Step::Continue,
        Err(_) => Step::Close,
    }
}

async fn read_packet(
    sock: &mut TcpStream,
    buf: &mut BytesMut,
    idle: Duration,
) -> Result<Packet, String> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(p) => return Ok(p),
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("malformed packet: {e}")),
        }
        match tokio::time::timeout(idle, sock.read_buf(buf)).await {
            Err(_) => return Err("keep-alive expired (1.5 x keep-alive without a packet)".into()),
            Ok(Ok(0)) | Ok(Err(_)) => return Err("closed".into()),
            Ok(Ok(_)) => {}
        }
    }
}

async fn write_packet(sock: &mut TcpStream, p: Packet) -> Result<(), String> {
    let mut out = BytesMut::new();
    p.write(&mut out, MAX_PACKET).map_err(|e| e.to_string())?;
    sock.write_all(&out).await.map_err(|e| e.to_string())
}
