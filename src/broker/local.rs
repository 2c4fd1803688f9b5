//! The gateway's own clients of the embedded broker: in-process, no TCP.
//!
//! rmqtt has no in-process subscriber (its sessions are network
//! connections), only a place where every routed message passes: the
//! `Shared` extension's `forwards`, called once per message whoever
//! published it (a LAN client, a will, the gateway itself). [`Tap`] wraps
//! rmqtt's own `DefaultShared` there: it hands the message to every
//! matching in-process subscriber, then lets rmqtt route it to the network
//! sessions as before.
//!
//! Delivery to an in-process subscriber is a bounded channel, and the
//! publisher *waits* when it is full: a LAN client that publishes faster
//! than a bridge can take is slowed down (its session waits, TCP pushes
//! back), as Mosquitto does, instead of losing messages. A subscriber that
//! takes nothing for [`STALL_LIMIT`] (a stuck consumer, or two in-process
//! clients waiting on each other) gets that one message dropped, counted
//! in `edgebridge_bus_dropped_total` and logged: never silently.
//!
//! In-process subscribers get every message whatever its QoS (nothing is
//! lost between two parts of one process), retained messages matching
//! their filters when they subscribe, and never their own publishes
//! (MQTT 5 no-local), which is what the bridge loop guard needs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use rmqtt::context::ServerContext;
use rmqtt::session::Session;
use rmqtt::shared::{DefaultShared, Entry, Shared};
use rmqtt::types::{
    ForwardedCount, ForwardedRecipients, From, MsgID, Publish, Reason, SessionStatus, SubRelations,
    SubRelationsMap, SubsSearchParams, SubsSearchResult, To,
};
use tokio::sync::mpsc;

use crate::bridge::queue::inbox::Inbox;
use crate::model::{Message, Qos};

/// Messages waiting for one in-process subscriber before publishers wait.
pub const SUBSCRIBER_QUEUE: usize = 16 * 1024;

/// How long a publisher waits for a full in-process subscriber before that
/// message is dropped for it (and counted).
pub const STALL_LIMIT: Duration = Duration::from_secs(5);

static DROPPED: AtomicU64 = AtomicU64::new(0);
static RECEIVED: AtomicU64 = AtomicU64::new(0);

/// Messages dropped for an in-process subscriber that stalled.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Messages the broker received from its network clients (wills included).
pub fn received() -> u64 {
    RECEIVED.load(Ordering::Relaxed)
}

struct Subscriber {
    key: u64,
    client_id: String,
    filters: Vec<String>,
    tx: mpsc::Sender<Message>,
    durable: Option<Durable>,
}

/// A subscriber that wants QoS 1/2 messages in its inbox (a strict bridge,
/// see `bridge/queue/inbox.rs`): written there before the publisher is
/// acknowledged, instead of going through the channel.
pub struct Durable {
    pub inbox: Arc<Inbox>,
    /// The QoS of each filter, in the order of the filters: a message goes
    /// to the inbox when its QoS and that of the first filter it matches
    /// are 1 or more (the bridge forwards it by its first matching route).
    pub qos: Vec<Qos>,
}

/// The inbox did not take a message (a full disk): logged once per episode.
static INBOX_FAILING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The registry of in-process subscribers; shared by the broker and [`Tap`].
#[derive(Default)]
pub struct LocalClients {
    subs: RwLock<Vec<Arc<Subscriber>>>,
    next: AtomicU64,
}

impl LocalClients {
    /// Registers `client_id` for `filters`; messages arrive on the receiver
    /// until [`LocalClients::remove`] is called with the returned key.
    pub fn add(
        &self,
        client_id: &str,
        filters: Vec<String>,
        durable: Option<Durable>,
    ) -> (u64, mpsc::Receiver<Message>) {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let sub = Arc::new(Subscriber {
            key,
            client_id: client_id.to_string(),
            filters,
            tx,
            durable,
        });
        self.write().push(sub);
        (key, rx)
    }

    pub fn remove(&self, key: u64) {
        self.write().retain(|s| s.key != key);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<Subscriber>>> {
        // A poisoned lock means a panic while pushing to a Vec: the Vec is
        // still whole.
        self.subs.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The subscribers `topic` goes to, `from` (a client id) excluded,
    /// each with the index of its first filter that matches.
    fn matching(&self, from: &str, topic: &str) -> Vec<(Arc<Subscriber>, usize)> {
        let subs = self.subs.read().unwrap_or_else(|e| e.into_inner());
        subs.iter()
            .filter(|s| s.client_id != from)
            .filter_map(|s| {
                let first = s
                    .filters
                    .iter()
                    .position(|f| crate::topic::matches(f, topic))?;
                Some((s.clone(), first))
            })
            .collect()
    }

    /// Hands `msg` to every matching subscriber, waiting while one is full
    /// (see the module docs).
    pub async fn deliver(&self, from: &str, msg: &Message) {
        for (sub, first) in self.matching(from, &msg.topic) {
            if let Some(d) = sub.durable.as_ref().filter(|d| d.wants(first, msg)) {
                match d.inbox.put(msg, STALL_LIMIT).await {
                    Ok(_) => {
                        if INBOX_FAILING.swap(false, Ordering::Relaxed) {
                            tracing::info!(subscriber = %sub.client_id, "the inbox takes messages again");
                        }
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        DROPPED.fetch_add(1, Ordering::Relaxed);
                        crate::ops::metrics::bus_dropped();
                        tracing::warn!(subscriber = %sub.client_id, topic = %msg.topic,
                            "a bridge took nothing from its inbox for {}s: message dropped for it",
                            STALL_LIMIT.as_secs());
                        continue;
                    }
                    Err(e) => {
                        // Not on disk (the disk is full): it goes to the
                        // bridge the ordinary way, which stores it or counts
                        // it as lost.
                        if !INBOX_FAILING.swap(true, Ordering::Relaxed) {
                            tracing::warn!(subscriber = %sub.client_id, error = %e,
                                "cannot write to the bridge's inbox: QoS 1/2 messages are acknowledged before they are stored until it can");
                        }
                    }
                }
            }
            let sent = match sub.tx.try_send(msg.clone()) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Closed(_)) => continue,
                Err(mpsc::error::TrySendError::Full(m)) => {
                    tokio::time::timeout(STALL_LIMIT, sub.tx.send(m)).await
                }
            };
            if sent.is_err() {
                DROPPED.fetch_add(1, Ordering::Relaxed);
                crate::ops::metrics::bus_dropped();
                tracing::warn!(
                    subscriber = %sub.client_id,
                    topic = %msg.topic,
                    "an in-process subscriber took nothing for {}s: message dropped for it",
                    STALL_LIMIT.as_secs()
                );
            }
        }
    }
}

impl Durable {
    /// Whether `msg`, matched first by filter `first`, goes to the inbox.
    fn wants(&self, first: usize, msg: &Message) -> bool {
        msg.qos != Qos::AtMostOnce && self.qos.get(first).is_some_and(|q| *q != Qos::AtMostOnce)
    }
}

/// rmqtt's publish as our [`Message`].
pub fn to_message(p: &Publish) -> Message {
    Message {
        topic: p.topic.to_string(),
        payload: p.payload.clone(),
        qos: Qos::from_u8(p.qos as u8).unwrap_or_default(),
        retain: p.retain,
    }
}

/// rmqtt's routing with the in-process subscribers in front (module docs).
pub struct Tap {
    inner: DefaultShared,
    scx: ServerContext,
    local: Arc<LocalClients>,
    backlog: Arc<super::backlog::Backlog>,
    fence: Arc<super::fence::Fence>,
    admission: Arc<super::admission::Admission>,
}

impl Tap {
    pub fn new(
        scx: &ServerContext,
        local: Arc<LocalClients>,
        fence: Arc<super::fence::Fence>,
        admission: Arc<super::admission::Admission>,
        backlog: Arc<super::backlog::Backlog>,
    ) -> Tap {
        Tap {
            inner: DefaultShared::new(Some(scx.clone())),
            scx: scx.clone(),
            local,
            backlog,
            fence,
            admission,
        }
    }
}

#[async_trait]
impl Shared for Tap {
    fn entry(&self, id: rmqtt::types::Id) -> Box<dyn Entry> {
        Box::new(super::takeover::Takeover {
            inner: self.inner.entry(id),
            admission: self.admission.clone(),
        })
    }

    fn exist(&self, client_id: &str) -> bool {
        self.inner.exist(client_id)
    }

    async fn forwards(
        &self,
        msg_id: Option<MsgID>,
        from: From,
        publish: Publish,
    ) -> Result<ForwardedCount, (ForwardedCount, Vec<(To, From, Publish, Reason)>)> {
        // Mosquitto's `messages/received` counts what clients sent; the
        // gateway's own publishes (`from_system`, see `LocalPublisher`) are
        // not received.
        if !from.is_system() {
            RECEIVED.fetch_add(1, Ordering::Relaxed);
        }
        self.fence.wait().await;
        // `$SYS/...` is the broker's own chatter; no gateway part wants it.
        if !publish.topic.starts_with('$') {
            self.local
                .deliver(&from.id.client_id, &to_message(&publish))
                .await;
        }
        if publish.target_clientid.is_some() {
            return self.inner.forwards(msg_id, from, publish).await;
        }
        // rmqtt's own `forwards`, with the clients whose backlog is full
        // left out (`backlog.rs`): their drops are reported as errors, for
        // which rmqtt calls the `MessageDropped` hook.
        let node = self.scx.node.id();
        let router = self.scx.extends.router().await;
        let relations = match router.matches(from.id.clone(), &publish.topic).await {
            Ok(mut by_node) => by_node.remove(&node).unwrap_or_default(),
            Err(e) => {
                tracing::warn!(topic = %publish.topic, error = %e, "the broker could not route a message");
                Vec::new()
            }
        };
        drop(router);
        if relations.is_empty() {
            return Ok(0);
        }
        let (send, full): (SubRelations, SubRelations) = relations
            .into_iter()
            .partition(|(_, client, ..)| self.backlog.admit(client));
        let (count, mut errs) = match self
            .inner
            .forwards_to(from.clone(), &publish, send, msg_id)
            .await
        {
            Ok(to) => (to.len(), Vec::new()),
            Err((to, errs)) => (to.len(), errs),
        };
        for (_, client, ..) in full {
            let mut p = publish.clone();
            p.packet_id = None;
            errs.push((
                To::from(node, client),
                from.clone(),
                p,
                Reason::MessageQueueFull,
            ));
        }
        if errs.is_empty() {
            Ok(count)
        } else {
            Err((count, errs))
        }
    }

    async fn forwards_and_get_shareds(
        &self,
        from: From,
        publish: Publish,
    ) -> Result<
        (SubRelationsMap, ForwardedRecipients),
        (ForwardedRecipients, Vec<(To, From, Publish, Reason)>),
    > {
        self.inner.forwards_and_get_shareds(from, publish).await
    }

    async fn forwards_to(
        &self,
        from: From,
        publish: &Publish,
        relations: SubRelations,
        msg_id: Option<MsgID>,
    ) -> Result<ForwardedRecipients, (ForwardedRecipients, Vec<(To, From, Publish, Reason)>)> {
        self.inner
            .forwards_to(from, publish, relations, msg_id)
            .await
    }

    fn iter(&self) -> Box<dyn Iterator<Item = Box<dyn Entry>> + Sync + Send + '_> {
        self.inner.iter()
    }

    fn random_session(&self) -> Option<Session> {
        self.inner.random_session()
    }

    async fn session_status(&self, client_id: &str) -> Option<SessionStatus> {
        self.inner.session_status(client_id).await
    }

    async fn client_states_count(&self) -> usize {
        self.inner.client_states_count().await
    }

    fn sessions_count(&self) -> usize {
        self.inner.sessions_count()
    }

    async fn query_subscriptions(&self, q: &SubsSearchParams) -> Vec<SubsSearchResult> {
        self.inner.query_subscriptions(q).await
    }

    async fn subscriptions_count(&self) -> usize {
        self.inner.subscriptions_count().await
    }

    async fn retain_load_with(
        &self,
        topic_filter: &rmqtt::types::TopicFilter,
        cb: Arc<dyn rmqtt::shared::RetainLoadCallback>,
    ) -> rmqtt::Result<Vec<(rmqtt::types::NodeId, MsgID)>> {
        self.inner.retain_load_with(topic_filter, cb).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delivers_to_matching_subscribers_but_not_to_the_publisher() {
        let local = LocalClients::default();
        let (_, mut a) = local.add("edgebridge-a", vec!["PV/#".into()], None);
        let (_, mut b) = local.add("edgebridge-b", vec!["cmd/+".into()], None);
        local
            .deliver("lan-client", &Message::new("PV/data", "1"))
            .await;
        local
            .deliver("edgebridge-a", &Message::new("PV/x", "own"))
            .await;
        local
            .deliver("lan-client", &Message::new("cmd/led", "on"))
            .await;
        assert_eq!(a.recv().await.unwrap().payload, "1");
        assert!(a.try_recv().is_err(), "no-local: a got its own publish");
        assert_eq!(b.recv().await.unwrap().topic, "cmd/led");
    }

    #[tokio::test]
    async fn a_removed_subscriber_gets_nothing_more() {
        let local = LocalClients::default();
        let (key, mut a) = local.add("edgebridge-a", vec!["#".into()], None);
        local.remove(key);
        local.deliver("x", &Message::new("t", "1")).await;
        assert!(a.recv().await.is_none());
    }
}
