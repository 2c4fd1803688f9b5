//! Assembles the gateway from a validated config: broker, bus, status,
//! pipeline, drivers and commands, and takes them down again in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{BrokerError, EmbeddedBroker};
use crate::bus::{Bus, BusError};
use crate::config::{Config, ListenerProtocol};
use crate::drivers::{self, Devices, DriverContext, DriverError};
use crate::model::Message;
use crate::pipeline::{self, mapping::Mappings};
use crate::status::Status;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Driver(#[from] DriverError),
}

/// A running gateway.
pub struct Gateway {
    config: Config,
    broker: Option<Arc<EmbeddedBroker>>,
    bus: Bus,
    devices: Devices,
    status: Status,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    pipeline: JoinHandle<()>,
}

impl Gateway {
    /// Starts everything; returns once the broker listens and the devices
    /// are started.
    pub async fn start(config: Config) -> Result<Gateway, GatewayError> {
        let id = config.gateway.id.clone();
        let (broker, bus) = if config.broker.enabled {
            let broker = Arc::new(EmbeddedBroker::start(&config).await?);
            let bus = Bus::embedded(broker.clone())?;
            (Some(broker), bus)
        } else {
            let url = config.broker.external.clone().unwrap_or_default();
            let creds = config.broker.external_username.clone().map(|u| {
                let p = config
                    .broker
                    .external_password
                    .as_ref()
                    .map(|s| s.expose().to_string())
                    .unwrap_or_default();
                (u, p)
            });
            let will = Message::new(Status::gateway_topic(&id), "offline").retained();
            let bus = Bus::external(&url, &format!("edgebridge-{id}"), creds, Some(will)).await?;
            (None, bus)
        };
        let status = Status::new(&id, bus.clone());
        status.gateway(true).await;

        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (readings_tx, readings_rx) = mpsc::channel(pipeline::READING_QUEUE);
        let mappings = Mappings::new(&config.mappings, &id);
        let pipeline = tokio::spawn(pipeline::run(readings_rx, mappings, bus.clone()));
        let ctx = DriverContext {
            readings: readings_tx,
            status: status.clone(),
            shutdown: shutdown.child_token(),
            tasks: tasks.clone(),
        };
        let devices = match drivers::spawn_all(&config, &ctx) {
            Ok(d) => d,
            Err(e) => {
                shutdown.cancel();
                return Err(e.into());
            }
        };
        drop(ctx);
        pipeline::commands::run(&config, bus.clone(), devices.clone()).await?;
        tracing::info!(gateway = %id, devices = config.devices.len(), "gateway started");
        Ok(Gateway {
            config,
            broker,
            bus,
            devices,
            status,
            shutdown,
            tasks,
            pipeline,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    pub fn status(&self) -> &Status {
        &self.status
    }

    /// Listener addresses as bound (port 0 resolved), in config order.
    pub fn listeners(&self) -> Vec<(SocketAddr, ListenerProtocol)> {
        self.broker
            .as_ref()
            .map(|b| b.listeners().to_vec())
            .unwrap_or_default()
    }

    /// Address of the first listener speaking `protocol`.
    pub fn listener(&self, protocol: ListenerProtocol) -> Option<SocketAddr> {
        self.listeners()
            .into_iter()
            .find(|(_, p)| *p == protocol)
            .map(|(a, _)| a)
    }

    /// Stops the drivers, lets in-flight readings drain, publishes
    /// `offline`, and closes the listeners; bounded to about a second.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_millis(800), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some devices did not stop within 800ms");
        }
        // Drivers are gone, so the pipeline ends once it has drained.
        let _ = tokio::time::timeout(Duration::from_millis(300), self.pipeline).await;
        self.status.gateway(false).await;
        self.bus.flush(Duration::from_millis(300)).await;
        if let Some(b) = &self.broker {
            b.close_listeners();
        }
        tracing::info!("gateway stopped");
    }
}
