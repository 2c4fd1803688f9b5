//! Assembles the gateway from a validated config: broker, bus, status,
//! pipeline, drivers and commands, and takes them down again in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bridge::{self, RunningBridge, StartError};
use crate::broker::{BrokerError, EmbeddedBroker};
use crate::bus::{Bus, BusError};
use crate::config::{Config, ListenerProtocol};
use crate::drivers::{self, Devices, DriverContext, DriverError};
use crate::model::Message;
use crate::pipeline::rules::{ReloadReport, RuleError, RuleErrors, Rules, RulesRuntime};
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
    #[error("the rules do not compile:\n{0}")]
    Rules(#[from] RuleErrors),
    #[error("cannot start the rules thread: {0}")]
    RulesThread(std::io::Error),
    #[error(transparent)]
    Bridge(#[from] StartError),
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
    rules: Option<Arc<RulesRuntime>>,
    bridges: Vec<RunningBridge>,
    /// Bridges stop after the pipeline drained, so its last messages are
    /// queued.
    bridge_shutdown: CancellationToken,
}

impl Gateway {
    /// Starts everything; returns once the broker listens and the devices
    /// are started.
    pub async fn start(config: Config) -> Result<Gateway, GatewayError> {
        let id = config.gateway.id.clone();
        // Rules are compiled before anything starts, so a broken rule is
        // reported (file:line:col) without a half-started gateway.
        let rules = load_rules(&config)?;
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

        // Bridges subscribe before any driver runs, so no reading is missed.
        let bridge_shutdown = CancellationToken::new();
        let bridges = bridge::start_all(&config, &bus, &bridge_shutdown).await?;

        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (readings_tx, readings_rx) = mpsc::channel(pipeline::READING_QUEUE);
        let mappings = Arc::new(Mappings::new(&config.mappings, &id));
        let ctx = DriverContext {
            readings: readings_tx,
            status: status.clone(),
            shutdown: shutdown.child_token(),
            tasks: tasks.clone(),
        };
        // Drivers may send before the pipeline runs: their batches wait in
        // the channel.
        let devices = match drivers::spawn_all(&config, &ctx) {
            Ok(d) => d,
            Err(e) => {
                shutdown.cancel();
                bridge_shutdown.cancel();
                return Err(e.into());
            }
        };
        drop(ctx);
        let rules = match rules {
            Some(r) => Some(
                RulesRuntime::start(
                    r,
                    &config,
                    mappings.clone(),
                    bus.clone(),
                    devices.clone(),
                    status.clone(),
                )
                .await
                .map_err(|e| {
                    shutdown.cancel();
                    bridge_shutdown.cancel();
                    GatewayError::RulesThread(e)
                })?,
            ),
            None => None,
        };
        let pipeline = tokio::spawn(pipeline::run(
            readings_rx,
            mappings,
            bus.clone(),
            rules.clone(),
        ));
        if let Err(e) = pipeline::commands::run(&config, bus.clone(), devices.clone()).await {
            shutdown.cancel();
            bridge_shutdown.cancel();
            return Err(e.into());
        }
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
            rules,
            bridges,
            bridge_shutdown,
        })
    }

    /// Compiles the rules folder again (SIGHUP). A set that compiles
    /// replaces the running one at once; otherwise the running rules stay
    /// and the errors come back. `None` when no rules are configured.
    pub async fn reload_rules(&self) -> Option<Result<ReloadReport, RuleErrors>> {
        match &self.rules {
            Some(r) => Some(r.reload().await),
            None => None,
        }
    }

    /// The rules thread, if rules are configured.
    pub fn rules(&self) -> Option<&Arc<RulesRuntime>> {
        self.rules.as_ref()
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

    /// The running cloud bridges, with their live status.
    pub fn bridges(&self) -> &[RunningBridge] {
        &self.bridges
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
        if let Some(r) = &self.rules {
            r.shutdown(Duration::from_millis(500)).await;
        }
        if !self.bridges.is_empty() {
            // Let the pipeline's last messages reach the bridges, then stop
            // them: they queue what they got and say goodbye to the cloud.
            self.bus.flush(Duration::from_millis(200)).await;
            self.bridge_shutdown.cancel();
            for b in self.bridges {
                if tokio::time::timeout(Duration::from_secs(2), b.task)
                    .await
                    .is_err()
                {
                    tracing::warn!(bridge = %b.name, "bridge did not stop within 2s");
                }
            }
        }
        self.status.gateway(false).await;
        self.bus.flush(Duration::from_millis(300)).await;
        if let Some(b) = &self.broker {
            b.close_listeners();
        }
        tracing::info!("gateway stopped");
    }
}

/// Compiles `rules.dir` (relative to the config file), if configured.
pub fn load_rules(config: &Config) -> Result<Option<Rules>, RuleErrors> {
    let Some(rc) = &config.rules else {
        return Ok(None);
    };
    let dir = config.resolve(&rc.dir);
    if !dir.is_dir() {
        return Err(RuleErrors(vec![RuleError::Io {
            path: dir,
            message: "`rules.dir` is not a folder".into(),
        }]));
    }
    Rules::load_dir(&dir, rc.deadline).map(Some)
}
