//! Persistent sessions across restarts, as Mosquitto's `persistence true`
//! keeps them: when the gateway stops, every offline session that has not
//! expired (clean session false, or an MQTT 5 session expiry) is written to
//! `data_dir/broker-sessions.json` with its subscriptions, its unacknowledged
//! QoS 1/2 messages and the messages queued for it; when the gateway starts,
//! they are set up again as offline sessions before the listeners open, so
//! that a client reconnecting gets `session present` and what was queued,
//! and publishes made before it reconnects are queued for it.
//!
//! rmqtt-session-storage does this through sled or redis, on every session
//! change; a gateway needs it at a clean stop only (a `kill -9` loses the
//! sessions' state since the last start, as Mosquitto loses it since its
//! last autosave). Passwords are never written: the saved CONNECT has none.

use std::collections::HashMap;
use std::num::NonZeroU16;
use std::path::Path;
use std::time::Duration;

use rmqtt::context::ServerContext;
use rmqtt::inflight::OutInflightMessage;
use rmqtt::session::{Session, SessionState};
use rmqtt::types::{
    ConnectInfo, ListenerConfig, ListenerId, SessionSubMap, SessionSubs, SubscriptionOptions,
    TimestampMillis, TopicFilter,
};
use rmqtt::utils::timestamp_millis;
use serde::{Deserialize, Serialize};

/// One offline session as saved.
#[derive(Serialize, Deserialize)]
struct Saved {
    /// The client's CONNECT (without its password): client id, user name,
    /// protocol, will, session expiry.
    connect: ConnectInfo,
    created_at: TimestampMillis,
    /// When the session ends if its client does not come back (ms since
    /// the epoch).
    expires_at: TimestampMillis,
    subscriptions: Vec<(TopicFilter, SubscriptionOptions)>,
    /// Sent, not yet acknowledged: sent again (QoS 2 after PUBREC: the
    /// PUBREL) when the client is back.
    inflight: Vec<OutInflightMessage>,
    /// Queued while the client was away, oldest first.
    queued: Vec<(rmqtt::types::From, rmqtt::types::Publish)>,
}

/// Saves every offline session of `scx` to `file` (kicked sessions must have
/// gone offline first). What is queued is taken out of the sessions: call
/// this when the broker stops.
pub async fn save(scx: &ServerContext, file: &Path) {
    let sessions: Vec<Session> = {
        let shared = scx.extends.shared().await;
        shared.iter().filter_map(|e| e.session()).collect()
    };
    let now = timestamp_millis();
    let mut saved = Vec::new();
    for s in sessions {
        if s.connected().await.unwrap_or(true) {
            continue;
        }
        let Ok(connect) = s.connect_info().await else {
            continue;
        };
        let disconnect = s.disconnect().await.unwrap_or(None);
        let expiry = s.fitter.session_expiry_interval(disconnect.as_ref());
        let since = s.disconnected_at().await.unwrap_or(now);
        let expires_at = since.saturating_add(millis(expiry));
        if expiry.is_zero() || expires_at <= now {
            continue;
        }
        let subscriptions = match s.subscriptions().await {
            Ok(subs) => subs
                .read()
                .await
                .iter()
                .map(|(f, o)| (f.clone(), o.clone()))
                .collect(),
            Err(_) => Vec::new(),
        };
        let inflight = s.out_inflight().write().await.clone_inflight_messages();
        let mut queued = Vec::new();
        while let Some(m) = s.deliver_queue().pop() {
            queued.push(m);
        }
        saved.push(Saved {
            connect: without_password(&connect),
            created_at: s.created_at().await.unwrap_or(now),
            expires_at,
            subscriptions,
            inflight,
            queued,
        });
    }
    let queued: usize = saved
        .iter()
        .map(|s| s.queued.len() + s.inflight.len())
        .sum();
    match serde_json::to_vec(&saved) {
        Ok(bytes) => match super::persist::replace_private(file, &bytes) {
            Ok(()) => {
                if !saved.is_empty() {
                    tracing::info!(sessions = saved.len(), messages = queued, file = %file.display(),
                        "persistent sessions saved");
                }
            }
            Err(e) => {
                tracing::error!(file = %file.display(), error = %e,
                    sessions = saved.len(), messages = queued, "cannot save the persistent sessions: they are lost");
            }
        },
        Err(e) => tracing::error!(error = %e, "cannot encode the persistent sessions"),
    }
}

/// Sets up again, as offline sessions, those saved in `file` that have not
/// expired; the file is removed once read (a session lives in one place).
/// `listeners` are the configs of the listeners by id: a session comes back
/// on its own listener, or the first one when that is gone.
pub async fn restore(
    scx: &ServerContext,
    file: &Path,
    listeners: &HashMap<ListenerId, ListenerConfig>,
) {
    let saved: Vec<Saved> = match std::fs::read(file) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e,
                    "the saved persistent sessions are damaged; starting without them");
                Vec::new()
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "cannot read the saved persistent sessions");
            return;
        }
    };
    let _ = std::fs::remove_file(file);
    let Some(first) = listeners.keys().min().and_then(|id| listeners.get(id)) else {
        return;
    };
    let now = timestamp_millis();
    let (mut restored, mut messages) = (0usize, 0usize);
    for s in saved {
        if s.expires_at <= now {
            continue;
        }
        let id = s.connect.id().clone();
        let listen_cfg = listeners.get(&id.lid).unwrap_or(first).clone();
        match rebuild(scx, s, listen_cfg, now).await {
            Ok(n) => {
                restored += 1;
                messages += n;
            }
            Err(e) => {
                tracing::warn!(client_id = %id.client_id, error = %e, "a saved persistent session could not be set up again")
            }
        }
    }
    if restored > 0 {
        tracing::info!(
            sessions = restored,
            messages,
            "persistent sessions restored"
        );
    }
}

/// One saved session back into the broker; the number of messages it holds.
async fn rebuild(
    scx: &ServerContext,
    s: Saved,
    listen_cfg: ListenerConfig,
    now: TimestampMillis,
) -> rmqtt::Result<usize> {
    let connect = std::sync::Arc::new(s.connect);
    let id = connect.id().clone();
    let fitter =
        scx.extends
            .fitter_mgr()
            .await
            .create(connect.clone(), id.clone(), listen_cfg.clone());
    let max_inflight = fitter.max_inflight();
    let max_queue = fitter.max_mqueue_len();
    let subs: SessionSubMap = s.subscriptions.into_iter().collect();
    let session = Session::new(
        id.clone(),
        scx.clone(),
        max_queue,
        listen_cfg,
        fitter,
        None,
        max_inflight.max(NonZeroU16::MIN),
        s.created_at,
        connect,
        true,
        false,
        false,
        now,
        SessionSubs::from(subs),
        Some(rmqtt::types::DisconnectInfo::new(now)),
        None,
    )
    .await?;
    let mut held = 0;
    {
        let mut inflight = session.out_inflight().write().await;
        for m in s.inflight {
            inflight.push_back(m);
            held += 1;
        }
    }
    let mut lost = 0u64;
    for m in s.queued {
        match session.deliver_queue().push(m) {
            Ok(()) => held += 1,
            Err(_) => lost += 1,
        }
    }
    if lost > 0 {
        tracing::warn!(client_id = %id.client_id, lost, "saved messages beyond broker.max_queued_messages were dropped");
        for _ in 0..lost {
            crate::ops::metrics::broker_dropped("queue_full");
        }
    }
    let remaining = Duration::from_millis(u64::try_from(s.expires_at - now).unwrap_or(0));
    let subs = session.subscriptions().await?;
    let tx = SessionState::offline_restart(session.clone(), remaining).await?;
    let mut entry = scx.extends.shared().await.entry(id.clone());
    entry.set(session, tx).await?;
    let router = scx.extends.router().await;
    for (filter, opts) in subs.read().await.iter() {
        router.add(filter, id.clone(), opts.clone()).await?;
    }
    Ok(held)
}

fn without_password(c: &ConnectInfo) -> ConnectInfo {
    let mut c = c.clone();
    match &mut c {
        ConnectInfo::V3(_, connect) => connect.password = None,
        ConnectInfo::V5(_, connect) => connect.password = None,
    }
    c
}

fn millis(d: Duration) -> TimestampMillis {
    TimestampMillis::try_from(d.as_millis()).unwrap_or(TimestampMillis::MAX)
}
