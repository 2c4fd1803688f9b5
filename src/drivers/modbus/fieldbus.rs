//! The task that owns one Modbus transport: a serial port shared by every
//! device on that RS-485 bus, or one TCP connection.
//!
//! An RS-485 bus is half-duplex, so exactly one task talks on it and
//! requests are strictly serialised. Devices are polled earliest-due
//! first, so a device that fell behind waits behind devices that waited
//! longer (round robin under overload) and a slow device cannot starve
//! the others. Writes go ahead of queued polls. A dead device costs one
//! timeout per (backed-off) poll, not the bus.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::drivers::{reply, Events};
use crate::model::{Command, ReadingBatch, WriteError};
use crate::ops::metrics::{self, PollOutcome};

use super::device::{Device, Transition, MAX_BACKOFF};
use super::session::{RequestError, Session};

/// First wait before reopening a lost port; doubles up to [`MAX_BACKOFF`].
pub const REOPEN_BACKOFF: Duration = Duration::from_millis(500);
/// How often each device's counters are published (retained) on
/// `edgebridge/<id>/devices/<device>/stats`; also at every online/offline
/// change.
pub const STATS_EVERY: Duration = Duration::from_secs(10);

/// Inputs and outputs of a bus task.
pub struct FieldBusIo {
    pub events: Events,
    /// Writes for any device on this bus.
    pub commands: mpsc::Receiver<Command>,
    pub shutdown: CancellationToken,
}

/// One transport and the devices behind it.
pub struct FieldBus {
    session: Session,
    devices: Vec<Device>,
    io: FieldBusIo,
    /// Why the transport is down, while it is (logged once per outage).
    down: Option<String>,
    /// Failed opens in the current outage.
    open_failures: u32,
    reopen_backoff: Duration,
}

impl FieldBus {
    pub fn new(session: Session, devices: Vec<Device>, io: FieldBusIo) -> FieldBus {
        FieldBus {
            session,
            devices,
            io,
            down: None,
            open_failures: 0,
            reopen_backoff: REOPEN_BACKOFF,
        }
    }

    /// Runs until shutdown.
    pub async fn run(mut self) {
        let endpoint = self.session.endpoint().to_string();
        // Requests in flight are abandoned at shutdown: a dead device's
        // timeout must not delay it.
        let shutdown = self.io.shutdown.clone();
        let mut commands_open = true;
        let mut next_stats = Instant::now() + STATS_EVERY;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let opened = self.session.is_open() || {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    ok = self.open() => ok,
                }
            };
            if !opened {
                // Wait for the next attempt; answer writes meanwhile.
                let until = Instant::now() + self.reopen_backoff;
                self.reopen_backoff = (self.reopen_backoff * 2).min(MAX_BACKOFF);
                if !self.idle_until(until, &mut commands_open).await {
                    break;
                }
                continue;
            }
            let Some(idx) = self.next_device() else {
                // No devices: only writes could arrive, and they all fail.
                if !self
                    .idle_until(Instant::now() + MAX_BACKOFF, &mut commands_open)
                    .await
                {
                    break;
                }
                continue;
            };
            let due = self.devices[idx].next_due;
            tokio::select! {
                biased;
                _ = self.io.shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(next_stats) => {
                    self.publish_stats().await;
                    next_stats = Instant::now() + STATS_EVERY;
                    continue;
                }
                cmd = self.io.commands.recv(), if commands_open => {
                    match cmd {
                        Some(cmd) => tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = self.write(cmd) => {}
                        },
                        None => commands_open = false,
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(due) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.poll(idx) => {}
            }
        }
        self.session.close();
        tracing::debug!(%endpoint, "bus task stopped");
    }

    /// The device to poll next: earliest due; ties go to the lower index.
    fn next_device(&self) -> Option<usize> {
        self.devices
            .iter()
            .enumerate()
            .min_by_key(|(i, d)| (d.next_due, *i))
            .map(|(i, _)| i)
    }

    async fn open(&mut self) -> bool {
        let endpoint = self.session.endpoint().to_string();
        match self.session.open(self.connect_timeout()).await {
            Ok(()) => {
                if let Some(why) = self.down.take() {
                    tracing::info!(%endpoint, failed_attempts = self.open_failures, was = %why, "transport is back");
                    // Back from an outage: poll everything at once rather
                    // than after each device's backoff.
                    let now = Instant::now();
                    for d in &mut self.devices {
                        d.next_due = d.next_due.min(now);
                    }
                } else {
                    // First open, or a TCP reconnect after a timeout: keep
                    // each device's schedule (and a dead one's backoff).
                    tracing::debug!(%endpoint, "transport open");
                }
                self.open_failures = 0;
                self.reopen_backoff = REOPEN_BACKOFF;
                true
            }
            Err(e) => {
                self.open_failures += 1;
                let why = format!("cannot open {endpoint}: {e}");
                self.transport_down(why).await;
                false
            }
        }
    }

    fn connect_timeout(&self) -> Duration {
        self.devices
            .iter()
            .map(|d| d.timeout)
            .max()
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_secs(1))
    }

    /// Marks every device offline; logs the first time per outage.
    async fn transport_down(&mut self, why: String) {
        if self.down.is_none() {
            tracing::warn!(reason = %why, "transport down; retrying with backoff");
        } else {
            tracing::debug!(reason = %why, attempts = self.open_failures, "transport still down");
        }
        for i in 0..self.devices.len() {
            let t = self.devices[i].transport_down(&why);
            self.report(i, t).await;
        }
        self.down = Some(why);
    }

    /// Sleeps until `until`, answering writes with an error meanwhile.
    /// Returns false on shutdown.
    async fn idle_until(&mut self, until: Instant, commands_open: &mut bool) -> bool {
        loop {
            tokio::select! {
                biased;
                _ = self.io.shutdown.cancelled() => return false,
                cmd = self.io.commands.recv(), if *commands_open => match cmd {
                    Some(cmd) => {
                        let why = self.down.clone().unwrap_or_else(|| "not connected".into());
                        reply(cmd, Err(WriteError::Unreachable(why)));
                    }
                    None => *commands_open = false,
                },
                _ = tokio::time::sleep_until(until) => return true,
            }
        }
    }

    async fn poll(&mut self, idx: usize) {
        let started = Instant::now();
        let mut run = self.devices[idx].start_poll();
        let result = loop {
            // Writes that arrived meanwhile go first, even in the middle of
            // a poll of many requests.
            while let Ok(cmd) = self.io.commands.try_recv() {
                self.write(cmd).await;
            }
            if let Some(r) = self.devices[idx]
                .poll_step(&mut run, &mut self.session)
                .await
            {
                break r;
            }
        };
        let readings = run.into_readings();
        let device = &mut self.devices[idx];
        if let Err(e) = &result {
            tracing::debug!(device = %device.name, error = %e, "poll failed");
        }
        let outcome = match &result {
            Ok(()) => PollOutcome::Ok,
            Err(RequestError::Timeout(_)) => PollOutcome::Timeout,
            Err(_) => PollOutcome::Error,
        };
        metrics::device_poll(&device.name, outcome, started.elapsed());
        let transition = device.record(&result, Instant::now());
        if !readings.is_empty() {
            self.hand_over(readings).await;
        }
        match self.session.take_lost() {
            Some(why) => {
                let why = format!("{} lost: {why}", self.session.endpoint());
                self.transport_down(why).await;
            }
            None => self.report(idx, transition).await,
        }
    }

    /// Hands a poll's readings to the pipeline. While its channel is full
    /// (the rules are stuck, perhaps in a `write()` to this very bus),
    /// writes are still answered, so the two cannot wait for each other.
    async fn hand_over(&mut self, readings: ReadingBatch) {
        let events = self.io.events.clone();
        loop {
            tokio::select! {
                biased;
                _ = self.io.shutdown.cancelled() => return,
                slot = events.reserve() => {
                    match slot {
                        Ok(slot) => slot.send(readings),
                        Err(e) => tracing::debug!(error = %e, "dropping readings"),
                    }
                    return;
                }
                Some(cmd) = self.io.commands.recv() => self.write(cmd).await,
            }
        }
    }

    async fn write(&mut self, cmd: Command) {
        let Some(idx) = self.devices.iter().position(|d| *d.name == *cmd.device) else {
            let why = WriteError::NotOnBus(cmd.device.clone());
            reply(cmd, Err(why));
            return;
        };
        let device = &mut self.devices[idx];
        let result = device
            .write(&mut self.session, &cmd.point, &cmd.value)
            .await;
        device.record_write(&result, Instant::now());
        match &result {
            Ok(()) => {
                tracing::info!(device = %cmd.device, point = %cmd.point, value = %cmd.value, "write done")
            }
            Err(e) => {
                tracing::warn!(device = %cmd.device, point = %cmd.point, error = %e, "write failed")
            }
        }
        reply(cmd, result);
        if let Some(why) = self.session.take_lost() {
            let why = format!("{} lost: {why}", self.session.endpoint());
            self.transport_down(why).await;
        }
    }

    async fn publish_stats(&mut self) {
        for i in 0..self.devices.len() {
            self.publish_device_stats(i).await;
        }
    }

    /// `edgebridge/<id>/devices/<device>/stats`, retained.
    async fn publish_device_stats(&mut self, idx: usize) {
        let Some(d) = self.devices.get(idx) else {
            return;
        };
        let json = serde_json::to_value(d.stats).unwrap_or_default();
        self.io.events.stats(&d.name, json).await;
    }

    async fn report(&mut self, idx: usize, t: Option<Transition>) {
        let (Some(t), Some(d)) = (t, self.devices.get(idx)) else {
            return;
        };
        if t.online {
            tracing::info!(device = %d.name, "device online");
        } else {
            tracing::warn!(device = %d.name, reason = t.reason.as_deref().unwrap_or(""), "device offline");
        }
        if t.online {
            self.io.events.online(&d.name).await;
        } else {
            self.io.events.offline(&d.name, t.reason.as_deref()).await;
        }
        // The counters as they were when it happened.
        self.publish_device_stats(idx).await;
    }
}
