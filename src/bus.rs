//! The local MQTT bus. Everything the gateway publishes or listens to goes
//! through it: the embedded broker through in-process links (no TCP), or an
//! external broker through rumqttc when `broker.enabled: false`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Filter, Packet, Publish, QoS as DQoS, RetainForwardRule, Subscribe};
use rumqttd::Notification;
use tokio::sync::mpsc;

use crate::broker::EmbeddedBroker;
use crate::model::{Message, Qos};

/// Messages waiting for the broker; publishers wait when it is full.
const PUBLISH_QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("broker link: {0}")]
    Link(String),
    #[error("the bus is closed")]
    Closed,
    #[error("external broker: {0}")]
    External(String),
}

/// A handle to the local bus; cheap to clone.
#[derive(Clone)]
pub struct Bus {
    publish_tx: mpsc::Sender<Message>,
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Embedded(Arc<EmbeddedBroker>),
    External(external::External),
}

impl Bus {
    /// A bus on the embedded broker. Publishing runs on its own thread
    /// because rumqttd's link hands packets to the router with a blocking
    /// channel send.
    pub fn embedded(broker: Arc<EmbeddedBroker>) -> Result<Bus, BusError> {
        let (link_tx, _link_rx) = broker
            .link("edgebridge-publisher", true)
            .map_err(|e| BusError::Link(e.to_string()))?;
        let (publish_tx, rx) = mpsc::channel(PUBLISH_QUEUE);
        let handle = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("bus-publisher".into())
            .spawn(move || handle.block_on(run_publisher(link_tx, rx)))
            .map_err(|e| BusError::Link(e.to_string()))?;
        Ok(Bus {
            publish_tx,
            backend: Backend::Embedded(broker),
        })
    }

    /// A bus on an external broker at `url` (`mqtt://host:port`).
    pub async fn external(
        url: &str,
        client_id: &str,
        credentials: Option<(String, String)>,
        will: Option<Message>,
    ) -> Result<Bus, BusError> {
        let ext = external::External::new(url, client_id, credentials, will)?;
        let (publish_tx, mut rx) = mpsc::channel::<Message>(PUBLISH_QUEUE);
        let client = ext.publisher().await?;
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if let Err(e) = client
                    .publish(m.topic, external::qos(m.qos), m.retain, m.payload.to_vec())
                    .await
                {
                    tracing::warn!(error = %e, "publish to the external broker failed");
                }
            }
        });
        Ok(Bus {
            publish_tx,
            backend: Backend::External(ext),
        })
    }

    /// Publishes a message; waits while the bus is saturated.
    pub async fn publish(&self, msg: Message) {
        crate::ops::metrics::bus_message();
        if self.publish_tx.send(msg).await.is_err() {
            tracing::debug!("bus closed; message dropped at shutdown");
        }
    }

    /// Waits until everything published so far has been handed to the
    /// broker and delivered to connected clients, or `limit` passes.
    pub async fn flush(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.publish_tx.capacity() < self.publish_tx.max_capacity()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The router and the client connections run on other threads;
        // give them a moment to write what they were handed.
        let rest = deadline.saturating_duration_since(tokio::time::Instant::now());
        tokio::time::sleep(rest.min(Duration::from_millis(100))).await;
    }

    /// A new client of the bus that receives messages on `filters`. Its
    /// filters ask for no-local, but rumqttd 0.20 ignores that (and an
    /// external MQTT 3.1.1 broker has none): a client does receive what it
    /// publishes itself. The bridge's loop guard deals with it.
    pub async fn subscribe(
        &self,
        client_id: &str,
        filters: &[(String, Qos)],
    ) -> Result<Subscription, BusError> {
        match &self.backend {
            Backend::Embedded(broker) => {
                let (mut tx, rx) = broker
                    .link(client_id, true)
                    .map_err(|e| BusError::Link(e.to_string()))?;
                if !filters.is_empty() {
                    let sub = Subscribe {
                        pkid: 1,
                        filters: filters
                            .iter()
                            .map(|(f, _)| Filter {
                                path: f.clone(),
                                qos: DQoS::AtMostOnce,
                                nolocal: true,
                                preserve_retain: false,
                                retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                            })
                            .collect(),
                    };
                    tx.send(Packet::Subscribe(sub, None))
                        .await
                        .map_err(|e| BusError::Link(e.to_string()))?;
                }
                Ok(Subscription {
                    inner: SubInner::Link { tx, rx },
                })
            }
            Backend::External(ext) => {
                let (client, rx) = ext.subscriber(client_id, filters).await?;
                Ok(Subscription {
                    inner: SubInner::External { client, rx },
                })
            }
        }
    }
}

async fn run_publisher(mut link: LinkTx, mut rx: mpsc::Receiver<Message>) {
    let mut batch = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 256).await > 0 {
        let last = batch.pop();
        {
            // Queue all but the last without waking the router; the last
            // send wakes it once for the whole batch.
            let mut buf = link.buffer();
            for m in batch.drain(..) {
                buf.push_back(to_packet(m));
            }
        }
        if let Some(m) = last {
            if link.send(to_packet(m)).await.is_err() {
                tracing::error!("the broker's router is gone; stopping the publisher");
                return;
            }
        }
    }
}

fn to_packet(m: Message) -> Packet {
    let topic = Bytes::from(m.topic.into_bytes());
    Packet::Publish(Publish::new(topic, m.payload, m.retain), None)
}

/// One bus client: receives what matches its filters, and can publish.
pub struct Subscription {
    inner: SubInner,
}

enum SubInner {
    Link {
        tx: LinkTx,
        rx: LinkRx,
    },
    External {
        client: rumqttc::AsyncClient,
        rx: mpsc::Receiver<Message>,
    },
    /// Halves made by [`Subscription::split`].
    RxOnly(LinkRx),
    TxOnly(LinkTx),
    ExternalTx(rumqttc::AsyncClient),
    Closed,
}

/// The next forwarded message on an embedded-broker link.
async fn link_recv(rx: &mut LinkRx) -> Option<Message> {
    loop {
        match rx.next().await {
            Ok(Some(Notification::Forward(f))) => {
                let topic = String::from_utf8_lossy(&f.publish.topic).into_owned();
                return Some(Message {
                    topic,
                    payload: f.publish.payload,
                    qos: Qos::AtMostOnce,
                    retain: f.publish.retain,
                });
            }
            // The router paused us because our buffer was full;
            // ask for more now that we are reading again.
            Ok(Some(Notification::Unschedule)) => {
                if rx.wake().await.is_err() {
                    return None;
                }
            }
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// The receiving half of a [`Subscription`].
pub struct SubscriptionRx {
    inner: Subscription,
}

impl SubscriptionRx {
    /// The next message; `None` when the bus is gone.
    pub async fn recv(&mut self) -> Option<Message> {
        self.inner.recv().await
    }

    /// Hands every message to `out` until the bus, `out` or the returned
    /// [`Forwarder`] is gone. On the embedded broker the link is read by a
    /// thread of its own (`name`) with blocking reads: rumqttd keeps a
    /// bounded log per filter and a reader that falls behind it loses QoS 0
    /// messages, so this reader must run as soon as the router wakes it,
    /// not when a busy runtime gets to it. On an external broker it is a
    /// task.
    pub fn forward_to(self, name: &str, out: mpsc::Sender<Message>) -> Result<Forwarder, BusError> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        match self.inner.inner {
            SubInner::RxOnly(rx) | SubInner::Link { rx, .. } => {
                let flag = stop.clone();
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || read_link(rx, out, &flag))
                    .map_err(|e| BusError::Link(e.to_string()))?;
                Ok(Forwarder { stop, task: None })
            }
            _ => {
                let mut me = self;
                let task = tokio::spawn(async move {
                    while let Some(m) = me.recv().await {
                        if out.send(m).await.is_err() {
                            return;
                        }
                    }
                });
                Ok(Forwarder {
                    stop,
                    task: Some(task),
                })
            }
        }
    }
}

/// Stops the reader of [`SubscriptionRx::forward_to`] when dropped (a thread
/// notices within a second).
pub struct Forwarder {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The loop of a link reader thread (see [`SubscriptionRx::forward_to`]).
fn read_link(mut rx: LinkRx, out: mpsc::Sender<Message>, stop: &std::sync::atomic::AtomicBool) {
    use rumqttd::local::LinkError;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        match rx.recv_deadline(deadline) {
            Ok(Some(Notification::Forward(f))) => {
                let m = Message {
                    topic: String::from_utf8_lossy(&f.publish.topic).into_owned(),
                    payload: f.publish.payload,
                    qos: Qos::AtMostOnce,
                    retain: f.publish.retain,
                };
                if out.blocking_send(m).is_err() {
                    return;
                }
            }
            // The router paused us because our buffer was full: ask for
            // more now that we are reading again.
            Ok(Some(Notification::Unschedule)) => {
                if rx.ready().is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(LinkError::RecvTimeout(flume::RecvTimeoutError::Timeout)) => {}
            Err(_) => return,
        }
    }
}

/// The publishing half of a [`Subscription`].
pub struct SubscriptionTx {
    inner: Subscription,
}

impl SubscriptionTx {
    /// Publishes from this client.
    pub async fn publish(&mut self, msg: Message) -> Result<(), BusError> {
        self.inner.publish(msg).await
    }
}

impl Subscription {
    /// The next message; `None` when the bus is gone.
    pub async fn recv(&mut self) -> Option<Message> {
        match &mut self.inner {
            SubInner::Link { rx, .. } => link_recv(rx).await,
            SubInner::External { rx, .. } => rx.recv().await,
            SubInner::RxOnly(rx) => link_recv(rx).await,
            SubInner::TxOnly(_) | SubInner::ExternalTx(_) | SubInner::Closed => None,
        }
    }

    /// Splits into a receiving and a publishing half of the same client,
    /// so that one task can wait in `recv` while another publishes. Waiting in `recv` must
    /// not be cancelled half-way on the embedded broker (a cancelled wake-up
    /// would leave the link paused), so give the receiving half a task of
    /// its own rather than a branch in a `select!`.
    pub fn split(self) -> (SubscriptionRx, SubscriptionTx) {
        match self.inner {
            SubInner::Link { tx, rx } => (
                SubscriptionRx {
                    inner: Subscription {
                        inner: SubInner::RxOnly(rx),
                    },
                },
                SubscriptionTx {
                    inner: Subscription {
                        inner: SubInner::TxOnly(tx),
                    },
                },
            ),
            SubInner::External { client, rx } => (
                SubscriptionRx {
                    inner: Subscription {
                        inner: SubInner::External {
                            client: client.clone(),
                            rx,
                        },
                    },
                },
                SubscriptionTx {
                    inner: Subscription {
                        inner: SubInner::ExternalTx(client),
                    },
                },
            ),
            other => (
                SubscriptionRx {
                    inner: Subscription { inner: other },
                },
                SubscriptionTx {
                    inner: Subscription {
                        inner: SubInner::Closed,
                    },
                },
            ),
        }
    }

    /// Publishes from this client.
    pub async fn publish(&mut self, msg: Message) -> Result<(), BusError> {
        match &mut self.inner {
            SubInner::Link { tx, .. } | SubInner::TxOnly(tx) => tx
                .send(to_packet(msg))
                .await
                .map(|_| ())
                .map_err(|e| BusError::Link(e.to_string())),
            SubInner::External { client, .. } | SubInner::ExternalTx(client) => client
                .publish(
                    msg.topic,
                    external::qos(msg.qos),
                    msg.retain,
                    msg.payload.to_vec(),
                )
                .await
                .map_err(|e| BusError::External(e.to_string())),
            SubInner::RxOnly(_) | SubInner::Closed => Err(BusError::Closed),
        }
    }
}

mod external {
    //! The bus on an external broker: one rumqttc connection per bus
    //! client, each reconnecting with a capped backoff.

    use super::*;
    use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet as CPacket, QoS};

    #[derive(Clone)]
    pub struct External {
        host: String,
        port: u16,
        prefix: String,
        credentials: Option<(String, String)>,
        will: Option<Message>,
    }

    pub fn qos(q: Qos) -> QoS {
        match q {
            Qos::AtMostOnce => QoS::AtMostOnce,
            Qos::AtLeastOnce => QoS::AtLeastOnce,
            Qos::ExactlyOnce => QoS::ExactlyOnce,
        }
    }

    impl External {
        pub fn new(
            url: &str,
            client_id: &str,
            credentials: Option<(String, String)>,
            will: Option<Message>,
        ) -> Result<External, BusError> {
            let rest = url
                .strip_prefix("mqtt://")
                .or_else(|| url.strip_prefix("tcp://"))
                .ok_or_else(|| BusError::External(format!("unsupported URL `{url}`")))?;
            let (host, port) = match rest.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse()
                        .map_err(|_| BusError::External(format!("bad port in `{url}`")))?,
                ),
                None => (rest.to_string(), 1883),
            };
            Ok(External {
                host,
                port,
                prefix: client_id.to_string(),
                credentials,
                will,
            })
        }

        fn options(&self, id: &str) -> MqttOptions {
            let mut o = MqttOptions::new(format!("{}-{id}", self.prefix), &self.host, self.port);
            o.set_keep_alive(Duration::from_secs(30));
            o.set_max_packet_size(1 << 20, 1 << 20);
            if let Some((u, p)) = &self.credentials {
                o.set_credentials(u, p);
            }
            o
        }

        /// The gateway's publishing connection, carrying its last will.
        pub async fn publisher(&self) -> Result<AsyncClient, BusError> {
            let mut o = self.options("gateway");
            if let Some(w) = &self.will {
                o.set_last_will(LastWill::new(
                    &w.topic,
                    w.payload.to_vec(),
                    QoS::AtLeastOnce,
                    true,
                ));
            }
            let (client, eventloop) = AsyncClient::new(o, 1024);
            spawn_loop(eventloop, None, Vec::new());
            Ok(client)
        }

        pub async fn subscriber(
            &self,
            id: &str,
            filters: &[(String, Qos)],
        ) -> Result<(AsyncClient, mpsc::Receiver<Message>), BusError> {
            let (client, eventloop) = AsyncClient::new(self.options(id), 256);
            let (tx, rx) = mpsc::channel(1024);
            spawn_loop(
                eventloop,
                Some((client.clone(), tx)),
                filters.iter().map(|(f, q)| (f.clone(), qos(*q))).collect(),
            );
            Ok((client, rx))
        }
    }

    fn spawn_loop(
        mut eventloop: rumqttc::EventLoop,
        sink: Option<(AsyncClient, mpsc::Sender<Message>)>,
        filters: Vec<(String, QoS)>,
    ) {
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(CPacket::ConnAck(_))) => {
                        backoff = Duration::from_millis(100);
                        if let Some((client, _)) = &sink {
                            for (f, q) in &filters {
                                let _ = client.subscribe(f.clone(), *q).await;
                            }
                        }
                    }
                    Ok(Event::Incoming(CPacket::Publish(p))) => {
                        if let Some((_, tx)) = &sink {
                            let msg = Message {
                                topic: p.topic.clone(),
                                payload: p.payload.clone(),
                                qos: Qos::from_u8(p.qos as u8).unwrap_or_default(),
                                retain: p.retain,
                            };
                            if tx.send(msg).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "external broker connection");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        });
    }
}
