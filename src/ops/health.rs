//! The gateway's health: a summary published retained on
//! `edgebridge/<id>/health`, and the check behind the systemd watchdog.
//!
//! The check publishes the summary on the bus and waits for it to come back
//! through a subscription of its own. That round trip proves what a
//! watchdog should prove: the runtime runs, the publisher thread and the
//! broker's router (which stops all routing if it panics) still work.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Mutex;

use crate::bus::{Bus, BusError, Subscription};
use crate::model::{Message, Qos};

/// What `edgebridge/<id>/health` carries (JSON).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// `true` when nothing in `problems` needs a restart to heal.
    pub healthy: bool,
    /// Components that failed (the watchdog stops being pinged).
    pub problems: Vec<String>,
    /// Devices whose status is online / all devices.
    pub devices_online: usize,
    pub devices_total: usize,
    /// Devices that are offline now (a field problem: not unhealthy).
    pub devices_offline: Vec<String>,
    /// Each cloud bridge's link (a flaky uplink is not unhealthy either:
    /// the queue holds the data).
    pub bridges: Vec<BridgeHealth>,
    /// Seconds since the gateway started.
    pub uptime_seconds: u64,
    /// Increases with every check; the round trip waits for its own.
    pub seq: u64,
}

/// One bridge in the summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BridgeHealth {
    pub name: String,
    pub connected: bool,
    /// Messages and bytes waiting in its durable queue.
    pub queue_messages: u64,
    pub queue_bytes: u64,
}

/// Publishes summaries and checks that they come back.
pub struct HealthProbe {
    topic: String,
    started: Instant,
    state: Mutex<ProbeState>,
}

struct ProbeState {
    sub: Subscription,
    seq: u64,
}

impl HealthProbe {
    /// `edgebridge/<id>/health`.
    pub fn topic(gateway_id: &str) -> String {
        format!("edgebridge/{gateway_id}/health")
    }

    pub async fn new(bus: &Bus, gateway_id: &str) -> Result<HealthProbe, BusError> {
        let topic = Self::topic(gateway_id);
        let sub = bus
            .subscribe(
                &format!("edgebridge-health-{gateway_id}"),
                &[(topic.clone(), Qos::AtMostOnce)],
            )
            .await?;
        Ok(HealthProbe {
            topic,
            started: Instant::now(),
            state: Mutex::new(ProbeState { sub, seq: 0 }),
        })
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Publishes `summary` (its `seq` and `uptime_seconds` filled in here)
    /// and waits up to `within` for it to come back. A summary that does not
    /// come back adds a problem to the returned copy.
    pub async fn round_trip(&self, bus: &Bus, mut summary: Summary, within: Duration) -> Summary {
        let mut state = self.state.lock().await;
        state.seq += 1;
        summary.seq = state.seq;
        summary.uptime_seconds = self.started.elapsed().as_secs();
        let payload = match serde_json::to_vec(&summary) {
            Ok(p) => p,
            Err(e) => {
                // Serialising plain strings and numbers cannot fail; keep
                // going without the round trip if it ever does.
                tracing::warn!(error = %e, "cannot serialise the health summary");
                return summary;
            }
        };
        bus.publish(Message::new(self.topic.clone(), payload).retained())
            .await;
        let want = summary.seq;
        let back = tokio::time::timeout(within, async {
            while let Some(m) = state.sub.recv().await {
                let seq = serde_json::from_slice::<serde_json::Value>(&m.payload)
                    .ok()
                    .and_then(|v| v.get("seq").and_then(|s| s.as_u64()));
                if seq == Some(want) {
                    return true;
                }
            }
            false
        })
        .await;
        if back != Ok(true) {
            summary.healthy = false;
            summary
                .problems
                .push(format!("the bus did not carry a message within {within:?}"));
        }
        summary
    }
}
