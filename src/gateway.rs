//! Assembles the gateway from a validated config: broker, bus, status,
//! pipeline, drivers and commands, and takes them down again in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bridge::{self, BridgeSpec, RunningBridge, StartError};
use crate::broker::{BrokerError, EmbeddedBroker};
use crate::bus::{self, Bus, BusError};
use crate::config::{Config, ListenerProtocol};
use crate::drivers::units::DriverUnits;
use crate::drivers::{Devices, DriverContext, DriverError, Events};
use crate::model::Message;
use crate::ops::health::{BridgeHealth, HealthProbe, Summary};
use crate::ops::reload::{self, Changes, ConfigReload};
use crate::pipeline::rules::{ReloadReport, RuleError, RuleErrors, Rules, RulesRuntime};
use crate::pipeline::{self, mapping::Mappings, Pipeline};
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
    /// The driver tasks, by unit, with the command routes to them.
    units: DriverUnits,
    /// Shared with the pipeline; a reload replaces the set inside.
    mappings: Mappings,
    /// The `commands:` subscription; a reload that changes it restarts it.
    commands: Option<pipeline::commands::Commands>,
    status: Status,
    shutdown: CancellationToken,
    pipeline: JoinHandle<()>,
    probe: HealthProbe,
    rules: Option<Arc<RulesRuntime>>,
    bridges: Vec<RunningBridge>,
    /// Bridges stop after the pipeline drained, so its last messages are
    /// queued.
    bridge_shutdown: CancellationToken,
    /// The tasks reporting each bridge's status changes (they end with
    /// their bridge).
    bridge_reports: Vec<JoinHandle<()>>,
    external_report: Option<JoinHandle<()>>,
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
            let will = Message::new(Status::gateway_topic(&id), "offline").retained();
            let bus = Bus::external(&config, will).await?;
            (None, bus)
        };
        let status = Status::start(&id, bus.clone());
        status.gateway(true).await;
        status.sync().await;
        let probe = HealthProbe::new(&bus, &id).await?;

        // Bridges subscribe before any driver runs, so no reading is missed.
        let bridge_shutdown = CancellationToken::new();
        let bridges = bridge::start_all(&config, &bus, &bridge_shutdown).await?;
        let bridge_reports = bridges
            .iter()
            .map(|b| status.follow_bridge(&b.name, b.status.clone()))
            .collect();
        // With an external broker, its publisher is a bridge too (it stops
        // with the bus, after the status task's last words).
        let external_report = bus
            .external_status()
            .map(|s| status.follow_bridge(bus::external::NAME, s));
        // Only now do LAN clients get in: whatever they publish first (a
        // session's queued messages after a restart) reaches the bridges.
        if let Some(b) = &broker {
            if let Err(e) = b.open_listeners().await {
                bridge_shutdown.cancel();
                return Err(e.into());
            }
        }

        let shutdown = CancellationToken::new();
        let (readings_tx, readings_rx) = mpsc::channel(pipeline::READING_QUEUE);
        // Clones share one set: a reload replaces it for the pipeline and
        // the rules thread at once.
        let mappings = Mappings::new(&config.mappings, &id);
        let ctx = DriverContext {
            events: Events::new(readings_tx, status.clone()),
            shutdown: shutdown.child_token(),
            tasks: TaskTracker::new(),
        };
        // Drivers may send before the pipeline runs: their batches wait in
        // the channel.
        let units = match DriverUnits::start(&config.devices, ctx) {
            Ok(u) => u,
            Err(e) => {
                shutdown.cancel();
                bridge_shutdown.cancel();
                return Err(e.into());
            }
        };
        // One path for every reading: the rules thread runs it when there
        // are rules, a task when there are none.
        let path = Pipeline::new(Arc::new(mappings.clone()), bus.clone());
        let (rules, pipeline) = match rules {
            Some(r) => {
                let (runtime, ended) = RulesRuntime::start(
                    r,
                    &config,
                    path,
                    readings_rx,
                    bus.clone(),
                    units.devices().clone(),
                    status.clone(),
                )
                .await
                .map_err(|e| {
                    shutdown.cancel();
                    bridge_shutdown.cancel();
                    GatewayError::RulesThread(e)
                })?;
                (Some(runtime), ended)
            }
            None => (None, pipeline::spawn(readings_rx, path)),
        };
        let commands =
            match pipeline::commands::run(&config, bus.clone(), units.devices().clone()).await {
                Ok(c) => c,
                Err(e) => {
                    shutdown.cancel();
                    bridge_shutdown.cancel();
                    return Err(e.into());
                }
            };
        tracing::info!(gateway = %id, devices = config.devices.len(), "gateway started");
        Ok(Gateway {
            config,
            broker,
            bus,
            units,
            mappings,
            commands,
            status,
            shutdown,
            pipeline,
            probe,
            rules,
            bridges,
            bridge_shutdown,
            bridge_reports,
            external_report,
        })
    }

    /// Applies a new, valid config (SIGHUP). Devices and bridges whose
    /// settings did not change keep running untouched (a shared serial bus
    /// keeps polling as long as none of its devices changed; a bridge keeps
    /// its connection and queue); changed ones restart; mappings and
    /// commands switch over at once. Settings that only a restart can apply
    /// (see [`reload::split_live`]) keep their running values and are
    /// listed in the report. The checks that can refuse a reload (a
    /// bridge's certificate files, a device's driver) run before anything
    /// stops, so a refused reload changed nothing.
    pub async fn reload(&mut self, new: Config) -> Result<ConfigReload, GatewayError> {
        let (new, needs_restart) = reload::split_live(&self.config, new);
        // Everything that can be refused is checked before anything stops.
        DriverUnits::check(&new.devices)?;
        // Users and ACL, their files read again even when config.yaml did
        // not change; connected clients stay, later checks use the new ones.
        if let Some(b) = &self.broker {
            b.reload_access(&new)?;
        }
        let bridge_specs = self.changed_bridge_specs(&new)?;
        // Bridges first, so they are subscribed before restarted devices
        // publish again.
        let bridges = self.reload_bridges(&new, bridge_specs).await;
        let devices = if new.devices == self.config.devices {
            Changes {
                unchanged: new.devices.iter().map(|d| d.name.clone()).collect(),
                ..Changes::default()
            }
        } else {
            self.units.apply(&new.devices).await?
        };
        let mappings_changed = new.mappings != self.config.mappings;
        if mappings_changed {
            self.mappings.replace(&new.mappings);
        }
        // Command routes carry the points' types: restart on either.
        let commands_changed =
            new.commands != self.config.commands || new.devices != self.config.devices;
        if commands_changed {
            if let Some(old) = self.commands.take() {
                old.abort();
                let _ = old.await;
            }
            self.commands =
                pipeline::commands::run(&new, self.bus.clone(), self.units.devices().clone())
                    .await?;
        }
        self.config = new;
        Ok(ConfigReload {
            devices,
            bridges,
            mappings_changed,
            commands_changed: commands_changed && !self.config.commands.is_empty(),
            needs_restart,
        })
    }

    /// The generic MQTT bridges of `new` that are not running as configured
    /// (new or changed), with their settings checked (certificate files
    /// read): an error refuses the reload before anything stops.
    fn changed_bridge_specs(&self, new: &Config) -> Result<Vec<BridgeSpec>, GatewayError> {
        new.bridges
            .iter()
            .filter(|b| b.onenet.is_none())
            .filter(|b| !self.config.bridges.contains(b))
            .map(|b| BridgeSpec::from_config(b, new).map_err(|e| GatewayError::Bridge(e.into())))
            .collect()
    }

    /// Keeps the bridges whose settings did not change (connection and
    /// queue untouched), stops changed and removed ones (they keep what is
    /// queued), then starts `specs`. A bridge that cannot start is logged
    /// and listed as failed; the rest of the reload goes on.
    async fn reload_bridges(&mut self, new: &Config, specs: Vec<BridgeSpec>) -> Changes {
        let mut changes = Changes::default();
        let mut keep = Vec::new();
        for b in std::mem::take(&mut self.bridges) {
            let same = new.bridges.iter().find(|c| c.name == b.name);
            let running = self.config.bridges.iter().find(|c| c.name == b.name);
            if same.is_some() && same == running {
                changes.unchanged.push(b.name.clone());
                keep.push(b);
                continue;
            }
            b.stop.cancel();
            if tokio::time::timeout(Duration::from_secs(5), b.task)
                .await
                .is_err()
            {
                tracing::warn!(bridge = %b.name, "bridge did not stop within 5s");
            }
            if same.is_some() {
                changes.restarted.push(b.name);
            } else {
                changes.stopped.push(b.name);
            }
        }
        self.bridges = keep;
        for spec in specs {
            let name = spec.name.clone();
            let started = match bridge::open(spec).await {
                Ok(bridge) => {
                    bridge::start(bridge, &self.bus, self.bridge_shutdown.child_token()).await
                }
                Err(e) => Err(e.into()),
            };
            match started {
                Ok(running) => {
                    self.bridge_reports.retain(|report| !report.is_finished());
                    self.bridge_reports
                        .push(self.status.follow_bridge(&name, running.status.clone()));
                    if !changes.restarted.contains(&name) {
                        changes.started.push(name);
                    }
                    self.bridges.push(running);
                }
                Err(e) => {
                    tracing::error!(bridge = %name, error = %e, "bridge did not start after the reload");
                    changes.restarted.retain(|n| n != &name);
                    changes.failed.push(name);
                }
            }
        }
        changes
    }

    /// Compiles the rules folder again (SIGHUP). A set that compiles
    /// replaces the running one at once; otherwise the running rules stay
    /// and the errors come back. `None` when no rules are configured.
    pub async fn reload_rules(&self) -> Option<Result<ReloadReport, RuleErrors>> {
        match &self.rules {
            Some(r) => Some(r.reload(&self.config).await),
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
        self.units.devices()
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

    /// Client connections on the embedded broker (`None` with an external
    /// broker).
    pub fn broker_connections(&self) -> Option<usize> {
        self.broker.as_ref().map(|b| b.connections())
    }

    /// Checks every component, publishes the summary on
    /// `edgebridge/<id>/health` and waits up to `within` for it to come
    /// back through the bus.
    pub async fn health(&self, within: Duration) -> Summary {
        let mut problems = Vec::new();
        if let Some(b) = &self.broker {
            for addr in b.dead_listeners() {
                problems.push(format!("listener {addr} stopped"));
            }
        }
        if self.pipeline.is_finished() {
            problems.push("the pipeline stopped".to_string());
        }
        let states = self.status.devices();
        let offline: Vec<String> = self
            .config
            .devices
            .iter()
            .filter(|d| states.get(&d.name) != Some(&true))
            .map(|d| d.name.clone())
            .collect();
        // With an external broker, its publisher is a bridge too.
        let external = self.bus.external_status();
        let summary = Summary {
            healthy: problems.is_empty(),
            problems,
            devices_online: self.config.devices.len() - offline.len(),
            devices_total: self.config.devices.len(),
            devices_offline: offline,
            bridges: self
                .bridges
                .iter()
                .map(|b| (b.name.as_str(), &b.status))
                .chain(external.as_ref().map(|s| (crate::bus::external::NAME, s)))
                .map(|(name, status)| {
                    let s = status.borrow();
                    BridgeHealth {
                        name: name.to_string(),
                        connected: s.connected,
                        queue_messages: s.queue_depth,
                        queue_bytes: s.queue_bytes,
                    }
                })
                .collect(),
            uptime_seconds: 0,
            seq: 0,
        };
        self.probe.round_trip(&self.bus, summary, within).await
    }

    /// Stops the drivers, lets in-flight readings drain, publishes
    /// `offline`, and closes the listeners; bounded to about a second.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        // No new commands; the writes under way finish and report.
        if let Some(c) = self.commands.take() {
            c.stop(Duration::from_millis(500)).await;
        }
        // Also drops the last readings sender, so the pipeline can end.
        if !self.units.stop(Duration::from_millis(800)).await {
            tracing::warn!("some devices did not stop within 800ms");
        }
        // Drivers are gone: the rules thread maps what they sent last
        // without rules and ends; so does the pipeline once it has drained.
        if let Some(r) = &self.rules {
            r.shutdown(Duration::from_millis(500)).await;
        }
        let _ = tokio::time::timeout(Duration::from_millis(300), self.pipeline).await;
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
        // Their last states reach the status task, then the bus.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        for report in self.bridge_reports {
            let _ = tokio::time::timeout_at(deadline, report).await;
        }
        if let Some(report) = &self.external_report {
            report.abort();
        }
        self.status.gateway(false).await;
        self.status.sync().await;
        self.bus.flush(Duration::from_millis(300)).await;
        if let Some(b) = &self.broker {
            b.shutdown().await;
        }
        self.bus.close().await;
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
