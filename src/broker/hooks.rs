//! What edgebridge decides inside the broker: who may log in, who may
//! subscribe and publish where, and the counting of what the broker drops.
//! rmqtt calls these at its hook points; everything here is ours.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rmqtt::codec::types::MQTT_LEVEL_5;
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType};
use rmqtt::types::{AuthResult, PublishAclResult, Reason, SubscribeAclResult};

use super::admission::Admission;
use super::backlog::Backlog;
use crate::access::{Access, AccessControl, Login};

/// Messages delivered to network clients (for `$SYS/broker/messages/sent`).
static SENT: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);
static DENIED: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Messages the broker sent to its network clients.
pub fn sent() -> u64 {
    SENT.load(Ordering::Relaxed)
}

/// Logins refused since start.
pub fn logins_refused() -> u64 {
    REFUSED.load(Ordering::Relaxed)
}

/// Subscriptions and publishes the ACL denied since start.
pub fn acl_denied() -> u64 {
    DENIED.load(Ordering::Relaxed)
}

/// Messages the broker dropped for a client since start.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Our side of the broker's hooks; clones share everything.
#[derive(Clone)]
pub struct Gate {
    access: AccessControl,
    /// `broker.max_payload_size`: a larger publish disconnects its sender.
    max_payload: usize,
    scx: ServerContext,
    fence: Arc<super::fence::Fence>,
    log: Arc<LogLimit>,
    /// `broker.max_connections` (network clients beyond it are answered
    /// "server unavailable"; the gateway's in-process clients never count)
    /// and logins answered "busy" (too many password checks waiting), so
    /// that the client retries.
    admission: Arc<Admission>,
    /// Messages waiting for each network client (`backlog.rs`).
    backlog: Arc<Backlog>,
}

impl Gate {
    pub fn new(
        scx: ServerContext,
        access: AccessControl,
        max_payload: usize,
        fence: Arc<super::fence::Fence>,
        admission: Arc<Admission>,
        backlog: Arc<Backlog>,
    ) -> Gate {
        Gate {
            fence,
            admission,
            backlog,
            access,
            max_payload,
            scx,
            log: Arc::default(),
        }
    }

    /// The users and ACL in force (shared: a reload through it applies
    /// here).
    pub fn access(&self) -> &AccessControl {
        &self.access
    }

    fn allows(&self, session: &rmqtt::session::Session, topic: &str, access: Access) -> bool {
        let user = session.id.username.as_ref().map(|u| u.to_string());
        self.access
            .check(user.as_deref(), &session.id.client_id, topic, access)
    }
}

#[async_trait]
impl Handler for Gate {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(info) => {
                let allow = Some(HookResult::AuthResult(AuthResult::Allow(false, None)));
                let id = info.id();
                let user = info.username().map(|u| u.to_string());
                let peer = id.remote_addr;
                let client_id = id.client_id.to_string();
                let login = if self.access.requires_login() {
                    self.access
                        .authenticate(
                            peer.map(|p| p.ip()),
                            user.as_deref(),
                            info.password().map(|p| p.as_ref()),
                        )
                        .await
                } else {
                    Login::Accepted
                };
                match login {
                    Login::Accepted => {
                        if !self.admission.take(&self.scx, id).await {
                            self.log.full(&client_id, peer, self.admission.max());
                            // Stopped right after this hook: see `Admission`.
                            self.admission.mark_unavailable(id);
                        }
                        return (false, allow);
                    }
                    Login::Busy => {
                        self.log.busy(user.as_deref(), &client_id, peer);
                        // Stopped right after this hook: see `Admission`.
                        self.admission.mark_unavailable(id);
                        return (false, allow);
                    }
                    Login::Refused => {
                        REFUSED.fetch_add(1, Ordering::Relaxed);
                        crate::ops::metrics::broker_login_refused();
                        self.log.refused(user.as_deref(), &client_id, peer);
                    }
                }
                // MQTT 3.1.1 answers 5 (not authorised), as Mosquitto does;
                // MQTT 5 says which: 0x86 bad user name or password.
                let result = if info.proto_ver() == MQTT_LEVEL_5 {
                    AuthResult::BadUsernameOrPassword
                } else {
                    AuthResult::NotAuthorized
                };
                (false, Some(HookResult::AuthResult(result)))
            }
            Parameter::ClientDisconnected(session, _) => {
                self.admission.give_back(&session.id);
                (true, acc)
            }
            Parameter::ClientConnected(session) | Parameter::SessionTerminated(session, _) => {
                self.backlog.reset(&session.id.client_id);
                (true, acc)
            }
            Parameter::ClientSubscribe(session, sub) => {
                self.fence.enter(&session.id.client_id, &sub.topic_filter);
                (true, acc)
            }
            Parameter::SessionSubscribed(session, sub) => {
                self.fence.leave(&session.id.client_id, &sub.topic_filter);
                (true, acc)
            }
            Parameter::ClientSubscribeCheckAcl(session, sub) => {
                if self.allows(session, &sub.topic_filter, Access::Subscribe) {
                    return (true, acc);
                }
                self.fence.leave(&session.id.client_id, &sub.topic_filter);
                DENIED.fetch_add(1, Ordering::Relaxed);
                crate::ops::metrics::broker_acl_denied("subscribe");
                tracing::debug!(client_id = %session.id.client_id,
                    filter = %sub.topic_filter, "subscription denied by the ACL");
                (
                    false,
                    Some(HookResult::SubscribeAclResult(
                        SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized),
                    )),
                )
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                // rmqtt bounds whole packets (topic and properties too);
                // the limit users set is on the payload, as Mosquitto's
                // `message_size_limit`.
                if publish.payload.len() > self.max_payload {
                    tracing::warn!(client_id = %session.id.client_id, size = publish.payload.len(),
                        max = self.max_payload, "publish larger than broker.max_payload_size: client disconnected");
                    let reason = Some("payload larger than the broker's limit".into());
                    return (
                        false,
                        Some(HookResult::PublishAclResult(PublishAclResult::rejected(
                            true, reason,
                        ))),
                    );
                }
                if self.allows(session, &publish.topic, Access::Write) {
                    return (true, acc);
                }
                DENIED.fetch_add(1, Ordering::Relaxed);
                crate::ops::metrics::broker_acl_denied("publish");
                tracing::debug!(client_id = %session.id.client_id,
                    topic = %publish.topic, "publish denied by the ACL");
                (
                    false,
                    Some(HookResult::PublishAclResult(PublishAclResult::rejected(
                        false, None,
                    ))),
                )
            }
            // The last check before a message goes to a client: the ACL's
            // read rules (a deny inside a granted subtree). rmqtt can skip a
            // delivery only as "expired"; `MessageDropped` below tells the
            // two apart (no expiry of its own: it was us).
            Parameter::MessageExpiryCheck(session, _, publish) => {
                let acl = &self.access.current().acl;
                if !acl.is_restrictive() || self.allows(session, &publish.topic, Access::Read) {
                    return (true, acc);
                }
                DENIED.fetch_add(1, Ordering::Relaxed);
                crate::ops::metrics::broker_acl_denied("read");
                (false, Some(HookResult::MessageExpiry))
            }
            Parameter::MessageDelivered(session, ..) => {
                self.backlog.done(&session.id.client_id);
                SENT.fetch_add(1, Ordering::Relaxed);
                (true, acc)
            }
            Parameter::MessageDropped(to, _, publish, reason) => {
                if let Some(to) = to {
                    self.backlog.done(&to.client_id);
                }
                let own_expiry = publish
                    .properties
                    .as_ref()
                    .is_some_and(|p| p.message_expiry_interval.is_some());
                if matches!(reason, Reason::MessageExpiration) && !own_expiry {
                    // Skipped by the ACL's read rules (see above): counted there.
                    return (true, acc);
                }
                DROPPED.fetch_add(1, Ordering::Relaxed);
                let why = match reason {
                    Reason::MessageQueueFull => "queue_full",
                    Reason::MessageExpiration => "expired",
                    Reason::InflightWindowFull => "inflight_full",
                    _ => "other",
                };
                crate::ops::metrics::broker_dropped(why);
                self.log.dropped(
                    to.as_ref().map(|t| t.client_id.to_string()),
                    &publish.topic,
                    why,
                );
                (true, acc)
            }
            _ => (true, acc),
        }
    }
}

/// Log lines about refusals and drops, at most [`LogLimit::BURST`] per
/// [`LogLimit::WINDOW`]; the rest are counted and summed up in one line, so
/// that a flood of bad logins cannot flood the journal.
#[derive(Default)]
struct LogLimit {
    state: Mutex<LogWindow>,
}

#[derive(Default)]
struct LogWindow {
    start: Option<Instant>,
    lines: u32,
    suppressed: u64,
}

impl LogLimit {
    const BURST: u32 = 10;
    const WINDOW: Duration = Duration::from_secs(10);

    /// Whether one more line may be written now.
    fn admit(&self) -> bool {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if w.start
            .is_none_or(|s| now.duration_since(s) >= Self::WINDOW)
        {
            if w.suppressed > 0 {
                tracing::warn!(
                    suppressed = w.suppressed,
                    "more broker refusals and drops in the last {}s were not logged (see metrics)",
                    Self::WINDOW.as_secs()
                );
            }
            *w = LogWindow {
                start: Some(now),
                ..LogWindow::default()
            };
        }
        if w.lines < Self::BURST {
            w.lines += 1;
            true
        } else {
            w.suppressed += 1;
            false
        }
    }

    fn refused(&self, user: Option<&str>, client_id: &str, peer: Option<SocketAddr>) {
        if self.admit() {
            let peer = peer.map(|p| p.to_string()).unwrap_or_else(|| "?".into());
            match user {
                Some(user) => tracing::warn!(
                    user,
                    client_id,
                    peer,
                    "login refused: bad user name or password"
                ),
                None => tracing::warn!(
                    client_id,
                    peer,
                    "login refused: no user name (this broker requires one)"
                ),
            }
        }
    }

    fn busy(&self, user: Option<&str>, client_id: &str, peer: Option<SocketAddr>) {
        if self.admit() {
            let peer = peer.map(|p| p.to_string()).unwrap_or_else(|| "?".into());
            tracing::warn!(user = user.unwrap_or(""), client_id, peer,
                "login answered \"server busy\": too many password checks waiting (the client retries)");
        }
    }

    fn full(&self, client_id: &str, peer: Option<SocketAddr>, max: usize) {
        if self.admit() {
            let peer = peer.map(|p| p.to_string()).unwrap_or_else(|| "?".into());
            tracing::warn!(
                client_id,
                peer,
                max,
                "connection refused: broker.max_connections reached"
            );
        }
    }

    fn dropped(&self, client_id: Option<String>, topic: &str, why: &str) {
        if self.admit() {
            tracing::warn!(
                client_id = client_id.as_deref().unwrap_or("?"),
                topic,
                reason = why,
                "the broker dropped a message for a client"
            );
        }
    }
}
