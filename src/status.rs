//! Status topics under `edgebridge/<id>/`: the gateway's own
//! online/offline, each device's, and whatever other components report.

use bytes::Bytes;

use crate::bus::Bus;
use crate::model::Message;

#[derive(Clone)]
pub struct Status {
    gateway_id: String,
    bus: Bus,
}

impl Status {
    pub fn new(gateway_id: &str, bus: Bus) -> Status {
        Status {
            gateway_id: gateway_id.to_string(),
            bus,
        }
    }

    /// `edgebridge/<id>/status`.
    pub fn gateway_topic(gateway_id: &str) -> String {
        format!("edgebridge/{gateway_id}/status")
    }

    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    pub async fn gateway(&self, online: bool) {
        let payload = if online { "online" } else { "offline" };
        self.bus
            .publish(Message::new(Self::gateway_topic(&self.gateway_id), payload).retained())
            .await;
    }

    /// `edgebridge/<id>/devices/<device>/status`: `online`, or `offline`
    /// followed by the reason as JSON when there is one.
    pub async fn device(&self, device: &str, online: bool, reason: Option<&str>) {
        let payload = match (online, reason) {
            (true, _) => Bytes::from_static(b"online"),
            (false, None) => Bytes::from_static(b"offline"),
            (false, Some(r)) => {
                Bytes::from(serde_json::json!({"status": "offline", "reason": r}).to_string())
            }
        };
        self.publish_retained(&format!("devices/{device}/status"), payload)
            .await;
    }

    /// Any retained status under `edgebridge/<id>/<subtopic>`.
    pub async fn publish_retained(&self, subtopic: &str, payload: impl Into<Bytes>) {
        let topic = format!("edgebridge/{}/{subtopic}", self.gateway_id);
        self.bus
            .publish(Message::new(topic, payload).retained())
            .await;
    }
}
