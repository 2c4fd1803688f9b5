//! The local MQTT bus. Everything the gateway publishes or listens to goes
//! through it: the embedded broker through in-process links (no TCP), or an
//! external broker through rumqttc when `broker.enabled: false`.
//!
//! # The gateway's OS threads, and why each exists
//! Everything that waits on the network, a serial port or a timer is a
//! tokio task; a thread of its own is only for work that would hold up
//! the tasks sharing a worker. `edgebridge run` has:
//!
//! - **tokio's workers** (`edgebridge`, one per core; `cli::run`): every
//!   task: the embedded broker (rmqtt starts no threads, its listeners,
//!   sessions and router are tasks), the drivers, the pipeline, the
//!   `commands:` writes, the bridges (their queues' SQLite calls take tens
//!   of microseconds: see `bridge/queue/mod.rs`), this bus's links and the
//!   metrics endpoint.
//! - **tokio's blocking pool** (threads made on demand, gone after 10 s
//!   idle): [`crate::ops::blocking`] for file system work that may take
//!   long — opening, checking and salvaging a queue's SQLite file and
//!   reading a bridge's inbox segments (`bridge::open`,
//!   `Queue::open_async`, `Inbox::open_async`); and the DNS lookups of
//!   rumqttc's connections (tokio resolves with `getaddrinfo` there).
//! - **the rules thread** (`rules`; `pipeline/rules/worker.rs`): rhai is
//!   synchronous and a rule may run up to its `rules.deadline`, and a
//!   rule's `write()` waits for the device; on a worker that would stall
//!   every task behind it. It has a large stack for rhai's recursion.
//! - **the password-check threads** (`edgebridge-auth-0`, `-1`;
//!   `access/pool.rs`): an argon2 check is ~10 ms of CPU and 8–19 MiB of
//!   memory; two long-lived threads bound both (tokio's blocking pool
//!   would grow to hundreds of threads and arenas under a login flood).
//!
//! The command-line tools add their own: `edgebridge rules test` runs the
//! fixtures on a `rules-test` thread (the rules' stack size), and
//! `edgebridge read` runs on a current-thread runtime.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::broker::{EmbeddedBroker, LocalPublisher, LocalSubscription};
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
    /// To the external broker's publisher.
    publish_tx: Option<mpsc::Sender<Message>>,
    /// On the embedded broker: publishes are handed to the broker on the
    /// caller's task, so that when `publish` returns, a strict bridge has
    /// the message in its inbox (`bridge/queue/inbox.rs`).
    direct: Option<Arc<LocalPublisher>>,
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Embedded(Arc<EmbeddedBroker>),
    External(external::External, Arc<external::Publisher>),
}

impl Bus {
    /// A bus on the embedded broker. Each publish is handed to the broker
    /// by the publishing task itself, in order.
    pub fn embedded(broker: Arc<EmbeddedBroker>) -> Result<Bus, BusError> {
        let publisher = broker.publisher_as("edgebridge-publisher");
        Ok(Bus {
            publish_tx: None,
            direct: Some(Arc::new(publisher)),
            backend: Backend::Embedded(broker),
        })
    }

    /// A bus on the external broker of `config` (`broker.enabled: false`).
    ///
    /// What the gateway publishes goes out through the bridge engine, as a
    /// bridge named `external-broker` would (`external::publisher`): into a
    /// durable queue in `data_dir` whenever the broker cannot take it, sent
    /// in order once it is back, reconnecting at most [`external::RECONNECT_MAX`]
    /// apart, with its status on `edgebridge/<id>/bridges/external-broker/status`.
    /// So drivers never wait on a broker that is away, and nothing they
    /// read while it is away is lost. `will` is the publishing connection's
    /// last will.
    pub async fn external(config: &crate::config::Config, will: Message) -> Result<Bus, BusError> {
        let b = &config.broker;
        let url = b.external.clone().unwrap_or_default();
        let credentials = b.external_username.clone().map(|u| {
            let p = b
                .external_password
                .as_ref()
                .map(|s| s.expose().to_string())
                .unwrap_or_default();
            (u, p)
        });
        let client_id = format!("edgebridge-{}", config.gateway.id);
        let ext = external::External::new(&url, &client_id, credentials)?;
        let (publish_tx, rx) = mpsc::channel::<Message>(PUBLISH_QUEUE);
        let publisher = external::publisher(config, &ext, will, rx, publish_tx.downgrade()).await?;
        Ok(Bus {
            publish_tx: Some(publish_tx),
            direct: None,
            backend: Backend::External(ext, Arc::new(publisher)),
        })
    }

    /// Stops the external broker's publisher once it has queued what it
    /// was given (nothing to do on the embedded broker).
    pub async fn close(&self) {
        if let Backend::External(ext, publisher) = &self.backend {
            ext.close();
            publisher.close().await;
        }
    }

    /// Publishes a message; waits while the bus is saturated. On the
    /// embedded broker, when this returns the message has been routed: a
    /// QoS 1/2 message for a strict bridge is in its inbox on disk.
    pub async fn publish(&self, msg: Message) {
        crate::ops::metrics::bus_message();
        if let Some(direct) = &self.direct {
            direct.publish(msg).await;
            return;
        }
        let Some(tx) = &self.publish_tx else { return };
        if tx.send(msg).await.is_err() {
            tracing::debug!("bus closed; message dropped at shutdown");
        }
    }

    /// Waits until everything published so far has been handed to the
    /// broker and delivered to connected clients, or `limit` passes.
    pub async fn flush(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        // On the embedded broker there is nothing in between.
        if let Some(tx) = &self.publish_tx {
            while tx.capacity() < tx.max_capacity() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // The client connections run on other tasks; give them a moment to
        // write what they were handed.
        let rest = deadline.saturating_duration_since(tokio::time::Instant::now());
        tokio::time::sleep(rest.min(Duration::from_millis(100))).await;
    }

    /// The status of the external broker's publisher (a bridge named
    /// `external-broker`); `None` on the embedded broker.
    pub fn external_status(
        &self,
    ) -> Option<tokio::sync::watch::Receiver<crate::bridge::BridgeStatus>> {
        match &self.backend {
            Backend::External(_, p) => Some(p.status.clone()),
            Backend::Embedded(_) => None,
        }
    }

    /// Whether a bus client receives what it publishes itself. The embedded
    /// broker honours no-local for the gateway's own clients; an external
    /// MQTT 3.1.1 broker has none.
    pub fn echoes_own_publishes(&self) -> bool {
        matches!(self.backend, Backend::External(..))
    }

    /// A new client of the bus that receives messages on `filters`
    /// (retained ones first), never its own publishes on the embedded
    /// broker (see [`Bus::echoes_own_publishes`]).
    pub async fn subscribe(
        &self,
        client_id: &str,
        filters: &[(String, Qos)],
    ) -> Result<Subscription, BusError> {
        self.subscribe_with_inbox(client_id, filters, None).await
    }

    /// [`Bus::subscribe`] for a strict bridge: on the embedded broker its
    /// QoS 1/2 messages go to `inbox` (written before the publisher is
    /// acknowledged) instead of the subscription. An external broker has
    /// no such thing: everything comes through the subscription.
    pub async fn subscribe_with_inbox(
        &self,
        client_id: &str,
        filters: &[(String, Qos)],
        inbox: Option<std::sync::Arc<crate::bridge::queue::inbox::Inbox>>,
    ) -> Result<Subscription, BusError> {
        match &self.backend {
            Backend::Embedded(broker) => {
                let names: Vec<String> = filters.iter().map(|(f, _)| f.clone()).collect();
                let durable = inbox.map(|inbox| crate::broker::Durable {
                    inbox,
                    qos: filters.iter().map(|(_, q)| *q).collect(),
                });
                let rx = broker.subscribe(client_id, &names, durable).await;
                let tx = broker.publisher_as(client_id);
                Ok(Subscription {
                    inner: SubInner::Local { tx, rx },
                })
            }
            Backend::External(ext, _) => {
                let (client, rx) = ext.subscriber(client_id, filters).await?;
                Ok(Subscription {
                    inner: SubInner::External { client, rx },
                })
            }
        }
    }
}

/// One bus client: receives what matches its filters, and can publish.
pub struct Subscription {
    inner: SubInner,
}

enum SubInner {
    Local {
        tx: LocalPublisher,
        rx: LocalSubscription,
    },
    External {
        client: rumqttc::AsyncClient,
        rx: mpsc::Receiver<Message>,
    },
    /// Halves made by [`Subscription::split`].
    LocalRx(LocalSubscription),
    LocalTx(LocalPublisher),
    ExternalTx(rumqttc::AsyncClient),
    Closed,
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
    /// [`Forwarder`] is gone.
    pub fn forward_to(
        self,
        _name: &str,
        out: mpsc::Sender<Message>,
    ) -> Result<Forwarder, BusError> {
        let mut me = self;
        let task = tokio::spawn(async move {
            while let Some(m) = me.recv().await {
                if out.send(m).await.is_err() {
                    return;
                }
            }
        });
        Ok(Forwarder { task })
    }
}

/// Stops the reader of [`SubscriptionRx::forward_to`] when dropped.
pub struct Forwarder {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
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
            SubInner::Local { rx, .. } | SubInner::LocalRx(rx) => rx.recv().await,
            SubInner::External { rx, .. } => rx.recv().await,
            SubInner::LocalTx(_) | SubInner::ExternalTx(_) | SubInner::Closed => None,
        }
    }

    /// Splits into a receiving and a publishing half of the same client,
    /// so that one task can wait in `recv` while another publishes.
    pub fn split(self) -> (SubscriptionRx, SubscriptionTx) {
        let half = |inner| Subscription { inner };
        let (rx, tx) = match self.inner {
            SubInner::Local { tx, rx } => (SubInner::LocalRx(rx), SubInner::LocalTx(tx)),
            SubInner::External { client, rx } => (
                SubInner::External {
                    client: client.clone(),
                    rx,
                },
                SubInner::ExternalTx(client),
            ),
            other => (other, SubInner::Closed),
        };
        (
            SubscriptionRx { inner: half(rx) },
            SubscriptionTx { inner: half(tx) },
        )
    }

    /// Publishes from this client.
    pub async fn publish(&mut self, msg: Message) -> Result<(), BusError> {
        match &mut self.inner {
            SubInner::Local { tx, .. } | SubInner::LocalTx(tx) => {
                tx.publish(msg).await;
                Ok(())
            }
            SubInner::External { client, .. } | SubInner::ExternalTx(client) => client
                .publish(
                    msg.topic,
                    external::qos(msg.qos),
                    msg.retain,
                    msg.payload.to_vec(),
                )
                .await
                .map_err(|e| BusError::External(e.to_string())),
            SubInner::LocalRx(_) | SubInner::Closed => Err(BusError::Closed),
        }
    }
}

pub mod external {
    //! The bus on an external broker: the gateway's publishing goes through
    //! the bridge engine (a durable queue, in order, see [`publisher`]);
    //! each subscribing bus client has its own rumqttc connection,
    //! reconnecting at most [`RECONNECT_MAX`] apart.

    use super::*;
    use crate::bridge::mqtt::{Endpoint, RemoteOptions, Will};
    use crate::bridge::queue::QueueLimits;
    use crate::bridge::{status_topic, BridgeSpec, LocalLink};
    use crate::config::{QueueConfig, ReconnectConfig, TopicRoute};
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet as CPacket, QoS};
    use tokio_util::sync::CancellationToken;

    /// The longest pause between two connection attempts: the gateway is
    /// back within this of the broker.
    pub const RECONNECT_MAX: Duration = Duration::from_secs(5);

    /// The name the publisher has as a bridge (its queue file and status).
    pub const NAME: &str = "external-broker";

    #[derive(Clone)]
    pub struct External {
        endpoint: Endpoint,
        prefix: String,
        credentials: Option<(String, String)>,
        /// Cancelled by [`Bus::close`]: stops every subscriber's
        /// connection task.
        stop: CancellationToken,
    }

    /// The running publisher (a bridge task).
    pub struct Publisher {
        /// Its bridge status (for the health summary and the metrics).
        pub status: tokio::sync::watch::Receiver<crate::bridge::BridgeStatus>,
        stop: CancellationToken,
        task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    }

    impl Publisher {
        /// Lets the publisher take what is still on its way, queue it and
        /// close its connection (at most 2 s).
        pub async fn close(&self) {
            self.stop.cancel();
            let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(task) = task {
                if tokio::time::timeout(Duration::from_secs(2), task)
                    .await
                    .is_err()
                {
                    tracing::warn!("the external broker's publisher did not stop within 2s");
                }
            }
        }
    }

    /// The bus side of the publisher: what the gateway publishes, and its
    /// own status, published back onto the bus (so onto the broker) when
    /// there is room.
    struct PublishLink {
        rx: mpsc::Receiver<Message>,
        bus: mpsc::WeakSender<Message>,
    }

    impl LocalLink for PublishLink {
        async fn recv(&mut self) -> Option<Message> {
            self.rx.recv().await
        }

        async fn publish(&mut self, message: Message) -> Result<(), String> {
            // Never wait on its own input: a full bus skips one status.
            match self.bus.upgrade() {
                Some(tx) => tx.try_send(message).map_err(|e| e.to_string()),
                None => Err("the bus is closed".into()),
            }
        }

        fn echoes_own_publishes(&self) -> bool {
            false
        }
    }

    /// Starts the bridge that carries everything the gateway publishes to
    /// the external broker, with the gateway's last will.
    pub async fn publisher(
        config: &crate::config::Config,
        ext: &External,
        will: Message,
        rx: mpsc::Receiver<Message>,
        bus: mpsc::WeakSender<Message>,
    ) -> Result<Publisher, BusError> {
        let remote = RemoteOptions {
            protocol: crate::config::MqttProtocol::default(),
            endpoint: ext.endpoint.clone(),
            client_id: format!("{}-gateway", ext.prefix),
            username: ext.credentials.as_ref().map(|(u, _)| u.clone()),
            password: ext
                .credentials
                .as_ref()
                .map(|(_, p)| crate::config::Secret::new(p.clone())),
            keep_alive: Duration::from_secs(30),
            clean_session: true,
            will: Some(Will {
                topic: will.topic,
                payload: will.payload,
                qos: Qos::AtLeastOnce,
                retain: will.retain,
            }),
            tls: None,
            max_packet_size: 1 << 20,
            max_inflight: 100,
        };
        let spec = BridgeSpec {
            name: NAME.to_string(),
            remote,
            forward: vec![TopicRoute {
                topics: "#".into(),
                remote_prefix: String::new(),
                qos: crate::config::QosLevel(Qos::AtLeastOnce),
            }],
            subscribe: Vec::new(),
            data_dir: config.resolve(&config.gateway.data_dir),
            limits: QueueLimits::from(&QueueConfig::default()),
            drain_rate: None,
            write_behind: None,
            reconnect: ReconnectConfig {
                min: Duration::from_millis(100),
                max: RECONNECT_MAX,
            },
            status_topic: status_topic(&config.gateway.id, NAME),
            keep_message_qos: true,
            strict: false,
        };
        let bridge = crate::bridge::open(spec)
            .await
            .map_err(|e| BusError::External(e.to_string()))?;
        let status = bridge.status();
        crate::ops::metrics::watch_bridge(NAME, status.clone());
        let stop = CancellationToken::new();
        let task = tokio::spawn(bridge.run(PublishLink { rx, bus }, stop.clone()));
        Ok(Publisher {
            status,
            stop,
            task: std::sync::Mutex::new(Some(task)),
        })
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
        ) -> Result<External, BusError> {
            let endpoint =
                Endpoint::parse_plain(url).map_err(|e| BusError::External(e.to_string()))?;
            Ok(External {
                endpoint,
                prefix: client_id.to_string(),
                credentials,
                stop: CancellationToken::new(),
            })
        }

        /// Stops every subscriber's connection task.
        pub fn close(&self) {
            self.stop.cancel();
        }

        fn options(&self, id: &str) -> MqttOptions {
            let mut o = MqttOptions::new(
                format!("{}-{id}", self.prefix),
                &self.endpoint.host,
                self.endpoint.port,
            );
            o.set_keep_alive(Duration::from_secs(30));
            o.set_max_packet_size(1 << 20, 1 << 20);
            if let Some((u, p)) = &self.credentials {
                o.set_credentials(u, p);
            }
            o
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
                client.clone(),
                tx,
                filters.iter().map(|(f, q)| (f.clone(), qos(*q))).collect(),
                self.stop.child_token(),
            );
            Ok((client, rx))
        }
    }

    /// One subscriber's connection: (re)subscribes on every connect and
    /// hands what arrives to the subscription. Ends when the subscription
    /// is dropped or the bus is closed (`stop`).
    fn spawn_loop(
        mut eventloop: rumqttc::EventLoop,
        client: AsyncClient,
        tx: mpsc::Sender<Message>,
        filters: Vec<(String, QoS)>,
        stop: CancellationToken,
    ) {
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tx.closed() => break,
                    event = eventloop.poll() => event,
                };
                match event {
                    Ok(Event::Incoming(CPacket::ConnAck(_))) => {
                        backoff = Duration::from_millis(100);
                        for (f, q) in &filters {
                            let _ = client.subscribe(f.clone(), *q).await;
                        }
                    }
                    Ok(Event::Incoming(CPacket::Publish(p))) => {
                        let msg = Message {
                            topic: p.topic.clone(),
                            payload: p.payload.clone(),
                            qos: Qos::from_u8(p.qos as u8).unwrap_or_default(),
                            retain: p.retain,
                        };
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            sent = tx.send(msg) => if sent.is_err() { break },
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "external broker connection");
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tx.closed() => break,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(RECONNECT_MAX);
                    }
                }
            }
        });
    }
}
