//! Keeps the embedded broker's listeners open to new clients despite a
//! rumqttd 0.20 bug (rumqtt issue #1062).
//!
//! rumqttd's per-listener server keeps a map client id → will channel
//! behind a `std::sync::Mutex`. When a connection fails after its CONNECT
//! was read — the client resets the socket before the CONNACK is written,
//! or the router refuses it — its map entry stays, with the receiving end
//! gone. The next CONNECT with the same client id then panics on that dead
//! channel *while holding the mutex*: the mutex is poisoned and every later
//! CONNECT on that listener panics too. One client that connects and resets
//! is enough to lock every LAN client out.
//!
//! A listener's server owns that map, so a fresh server (same socket
//! address) starts with an empty, healthy one; clients already connected
//! keep their own tasks and are not touched. Two things make us restart:
//! - rumqttd's own log line for the failure ("Remote link error"), seen by
//!   [`watch_layer`] — the listeners restart *before* the client comes back,
//!   so the panic does not happen at all;
//! - a panic in rumqttd's server code (the panic hook), for any other way
//!   into the same state.
//!
//! Both wake the supervisor at once; a restart takes a few milliseconds
//! during which a connection attempt is refused (clients retry).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::field::{Field, Visit};
use tracing::{Level, Metadata, Subscriber};
use tracing_subscriber::filter::{FilterFn, Filtered};
use tracing_subscriber::layer::{Context, Layer};

use super::{wait_listening, ServerFactory};
use crate::config::ListenerProtocol;
use rumqttd::ServerSettings;

/// Where rumqttd's per-connection server code lives (its tracing target).
const RUMQTTD_SERVER: &str = "rumqttd::server::broker";
/// What rumqttd logs when a connection fails between CONNECT and CONNACK,
/// leaving a dead will channel behind.
const STALE_WILL_MESSAGE: &str = "Remote link error";

/// Panics inside rumqttd's connection handling seen by the panic hook.
static LISTENER_PANICS: AtomicU64 = AtomicU64::new(0);
/// Connections that left a dead will channel behind (from rumqttd's log).
static STALE_WILLS: AtomicU64 = AtomicU64::new(0);
/// Times the supervisor restarted the listeners.
static LISTENER_RESTARTS: AtomicU64 = AtomicU64::new(0);

fn wake() -> &'static Notify {
    static WAKE: OnceLock<Notify> = OnceLock::new();
    WAKE.get_or_init(Notify::new)
}

/// How often the listeners were restarted (after a stale will channel or a
/// rumqttd panic).
pub fn listener_restarts() -> u64 {
    LISTENER_RESTARTS.load(Ordering::Relaxed)
}

/// Counts a listener panic and wakes the supervisor.
pub fn note_listener_panic() {
    LISTENER_PANICS.fetch_add(1, Ordering::Relaxed);
    wake().notify_one();
}

/// Counts a connection that left a dead will channel and wakes the
/// supervisor.
fn note_stale_will() {
    STALE_WILLS.fetch_add(1, Ordering::Relaxed);
    wake().notify_one();
}

/// Is a panic at `file` one in rumqttd's per-connection server code?
fn is_listener_panic(file: &str) -> bool {
    file.contains("rumqttd") && file.replace('\\', "/").ends_with("server/broker.rs")
}

/// Installs (once per process) a panic hook that notes rumqttd listener
/// panics and then reports the panic as before.
pub(super) fn watch_listener_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.location().is_some_and(|l| is_listener_panic(l.file())) {
                note_listener_panic();
            }
            previous(info);
        }));
    });
}

/// A tracing layer that watches rumqttd's server log for connections that
/// fail after CONNECT (see the module docs). It has its own filter, so it
/// sees those events whatever the log level, and costs nothing for others.
pub fn watch_layer<S>() -> Filtered<StaleWillWatch, FilterFn, S>
where
    S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let filter: FilterFn = FilterFn::new(is_rumqttd_server_error);
    StaleWillWatch.with_filter(filter)
}

fn is_rumqttd_server_error(m: &Metadata<'_>) -> bool {
    *m.level() == Level::ERROR && m.target() == RUMQTTD_SERVER
}

/// See [`watch_layer`].
pub struct StaleWillWatch;

impl<S: Subscriber> Layer<S> for StaleWillWatch {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut message = MessageIs {
            expected: STALE_WILL_MESSAGE,
            matched: false,
        };
        event.record(&mut message);
        if message.matched {
            note_stale_will();
        }
    }
}

/// Does an event's message equal `expected`?
struct MessageIs {
    expected: &'static str,
    matched: bool,
}

impl Visit for MessageIs {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.matched = value == self.expected;
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.matched = format!("{value:?}") == self.expected;
        }
    }
}

/// Restarts every listener when woken by a stale will channel or a rumqttd
/// panic, so that no listener stays poisoned. Events that arrive during a
/// restart cause one more.
pub(super) async fn supervise(
    servers: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    specs: Vec<(ListenerProtocol, ServerSettings)>,
    spawn_server: Arc<ServerFactory>,
) {
    let seen = || {
        (
            LISTENER_PANICS.load(Ordering::Relaxed),
            STALE_WILLS.load(Ordering::Relaxed),
        )
    };
    let mut last = seen();
    // The notification is the fast path; the tick catches a counter bumped
    // before this task first waited.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = wake().notified() => {}
            _ = tick.tick() => {}
        }
        let now = seen();
        if now == last {
            continue;
        }
        let (panics, stale) = (now.0 - last.0, now.1 - last.1);
        last = now;
        if panics > 0 {
            tracing::warn!(
                panics,
                "a connection task panicked inside rumqttd (rumqtt#1062); \
                 restarting the broker's listeners so new clients can connect"
            );
        } else {
            tracing::info!(
                connections = stale,
                "a client left during its CONNECT; restarting the broker's listeners \
                 before rumqttd trips over it (rumqtt#1062)"
            );
        }
        crate::ops::metrics::broker_listener_restart();
        let old: Vec<JoinHandle<()>> = {
            let mut s = servers.lock().unwrap_or_else(|e| e.into_inner());
            s.drain(..).collect()
        };
        for task in old {
            task.abort();
            let _ = task.await;
        }
        let mut fresh = Vec::new();
        for (protocol, settings) in &specs {
            fresh.push(spawn_server(settings.clone(), *protocol));
        }
        for ((_, settings), task) in specs.iter().zip(&fresh) {
            let addr = settings.listen;
            if let Err(e) = wait_listening(addr, task).await {
                tracing::error!(%addr, error = %e, "listener did not come back");
            }
        }
        *servers.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        LISTENER_RESTARTS.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rumqttd_server_panics_restart_listeners() {
        assert!(is_listener_panic(
            "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/rumqttd-0.20.0/src/server/broker.rs"
        ));
        assert!(is_listener_panic(
            r"C:\cargo\rumqttd-0.20.0\src\server\broker.rs"
        ));
        assert!(!is_listener_panic(
            "/root/.cargo/registry/src/x/rumqttd-0.20.0/src/protocol/v5/mod.rs"
        ));
        assert!(!is_listener_panic("src/broker/mod.rs"));
    }

    #[test]
    fn the_watch_layer_notes_only_rumqttd_stale_link_errors() {
        use tracing_subscriber::layer::SubscriberExt;
        let subscriber = tracing_subscriber::registry().with(watch_layer());
        let before = STALE_WILLS.load(Ordering::Relaxed);
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "rumqttd::server::broker", error = "reset", "Remote link error");
            tracing::error!(target: "rumqttd::server::broker", "Error while handling MQTT connect packet");
            tracing::warn!(target: "rumqttd::server::broker", "Remote link error");
            tracing::error!(target: "edgebridge::other", "Remote link error");
        });
        assert_eq!(STALE_WILLS.load(Ordering::Relaxed), before + 1);
        let subscriber = tracing_subscriber::registry().with(watch_layer());
        let before = STALE_WILLS.load(Ordering::Relaxed);
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "rumqttd::server::broker", "connection-stop");
            tracing::info!(target: "rumqttd::server::broker", "Remote link error");
        });
        assert_eq!(STALE_WILLS.load(Ordering::Relaxed), before);
    }
}
