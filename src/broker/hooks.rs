//! What edgebridge decides inside the broker: who may log in, who may
//! subscribe and publish where, and the counting of what the broker drops.
//! rmqtt calls these at its hook points; everything here is ours.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType};
use rmqtt::types::{AuthResult, PublishAclResult, Reason, SubscribeAclResult};

use super::access::{Access, Policy};

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

/// The policy in force; a reload swaps it without touching connections.
#[derive(Clone, Default)]
pub struct Gate {
    policy: Arc<RwLock<Arc<Policy>>>,
    log: Arc<LogLimit>,
}

impl Gate {
    pub fn new(policy: Policy) -> Gate {
        Gate {
            policy: Arc::new(RwLock::new(Arc::new(policy))),
            log: Arc::default(),
        }
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts `policy` in force for every later login, subscription and
    /// publish.
    pub fn replace(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }
}

#[async_trait]
impl Handler for Gate {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(info) => {
                let policy = self.policy();
                let user = info.username().map(|u| u.to_string());
                let password = info.password().map(|p| p.to_vec());
                let ok = match (&user, password) {
                    (Some(u), Some(p)) => {
                        let p = String::from_utf8_lossy(&p).into_owned();
                        policy.users.check(u.clone(), p).await
                    }
                    _ => false,
                };
                if ok {
                    return (false, Some(HookResult::AuthResult(AuthResult::Allow(false, None))));
                }
                REFUSED.fetch_add(1, Ordering::Relaxed);
                crate::ops::metrics::broker_login_refused();
                self.log.refused(
                    user.as_deref(),
                    &info.client_id().to_string(),
                    info.id().remote_addr,
                );
                // MQTT 3.1.1 answers 5 (not authorised), as Mosquitto does;
                // MQTT 5 says which: 0x86 bad user name or password.
                let result = if info.proto_ver() == rmqtt::codec::types::MQTT_LEVEL_5 {
                    AuthResult::BadUsernameOrPassword
                } else {
                    AuthResult::NotAuthorized
                };
                (false, Some(HookResult::AuthResult(result)))
            }
            Parameter::ClientSubscribeCheckAcl(session, sub) => {
                let user = session.id.username.as_ref().map(|u| u.to_string());
                let allowed = self.policy().allows(
                    user.as_deref(),
                    &session.id.client_id,
                    &sub.topic_filter,
                    Access::Subscribe,
                );
                if allowed {
                    return (true, acc);
                }
                DENIED.fetch_add(1, Ordering::Relaxed);
                crate::ops::metrics::broker_acl_denied("subscribe");
                tracing::debug!(user = ?user, client_id = %session.id.client_id,
                    filter = %sub.topic_filter, "subscription denied by the ACL");
                (
                    false,
                    Some(HookResult::SubscribeAclResult(SubscribeAclResult::new_failure(
                        SubscribeAckReason::NotAuthorized,
                    ))),
                )
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let user = session.id.username.as_ref().map(|u| u.to_string());
                let allowed = self.policy().allows(
                    user.as_deref(),
                    &session.id.client_id,
                    &publish.topic,
                    Access::Write,
                );
                if allowed {
                    return (true, acc);
                }
                DENIED.fetch_add(1, Ordering::Relaxed);
                crate::ops::metrics::broker_acl_denied("publish");
                tracing::debug!(user = ?user, client_id = %session.id.client_id,
                    topic = %publish.topic, "publish denied by the ACL");
                (
                    false,
                    Some(HookResult::PublishAclResult(PublishAclResult::rejected(false, None))),
                )
            }
            Parameter::MessageDelivered(..) => {
                SENT.fetch_add(1, Ordering::Relaxed);
                (true, acc)
            }
            Parameter::MessageDropped(to, _, publish, reason) => {
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
        if w.start.is_none_or(|s| now.duration_since(s) >= Self::WINDOW) {
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
                Some(user) => tracing::warn!(user, client_id, peer, "login refused: bad user name or password"),
                None => tracing::warn!(client_id, peer, "login refused: no user name (this broker requires one)"),
            }
        }
    }

    fn dropped(&self, client_id: Option<String>, topic: &str, why: &str) {
        if self.admit() {
            tracing::warn!(client_id = client_id.as_deref().unwrap_or("?"), topic, reason = why,
                "the broker dropped a message for a client");
        }
    }
}
