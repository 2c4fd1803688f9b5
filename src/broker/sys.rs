//! Mosquitto-style `$SYS/broker/...` topics, published retained every
//! `broker.sys_interval`, so that tools made for Mosquitto (MQTT Explorer,
//! monitoring scripts) find what they expect.

use std::time::{Duration, Instant};

use rmqtt::context::ServerContext;

use super::LocalPublisher;
use crate::model::Message;

/// What the `$SYS` publisher reads.
pub struct Source {
    pub broker: LocalPublisher,
    pub scx: ServerContext,
    pub started: Instant,
}

/// The topics and values of one round.
pub async fn snapshot(src: &Source) -> Vec<(&'static str, String)> {
    let clients = src.scx.connections.count().max(0);
    let subscriptions = src.scx.extends.shared().await.subscriptions_count().await;
    vec![
        (
            "$SYS/broker/version",
            format!("edgebridge {} (rmqtt)", env!("CARGO_PKG_VERSION")),
        ),
        (
            "$SYS/broker/uptime",
            format!("{} seconds", src.started.elapsed().as_secs()),
        ),
        ("$SYS/broker/clients/connected", clients.to_string()),
        ("$SYS/broker/clients/active", clients.to_string()),
        (
            "$SYS/broker/messages/received",
            super::local::received().to_string(),
        ),
        (
            "$SYS/broker/messages/sent",
            super::hooks::sent().to_string(),
        ),
        (
            "$SYS/broker/messages/dropped",
            (super::hooks::dropped() + super::local::dropped()).to_string(),
        ),
        ("$SYS/broker/subscriptions/count", subscriptions.to_string()),
    ]
}

/// Publishes [`snapshot`] now and every `interval` until aborted.
pub async fn publish_every(src: Source, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (topic, value) in snapshot(&src).await {
            src.broker
                .publish(Message::new(topic, value).retained())
                .await;
        }
    }
}
