//! The pipeline: where readings are transformed. One path for every
//! reading, in the order the drivers sent them:
//!
//! ```text
//! drivers ──ReadingBatch──▶ (rules, optional) ──▶ mappings ──▶ Pipeline::publish ──▶ bus
//! ```
//!
//! [`Pipeline`] is that path's two fixed ends: [`Pipeline::map`] (the
//! mappings) and [`Pipeline::publish`] (the one place messages leave the
//! pipeline, counted). Without rules, a task runs it ([`spawn`]); with
//! rules, the rules thread runs it, calling `on_line`/`on_reading` in
//! between (see [`rules::RulesRuntime`]).
//!
//! **Overload policy.** The drivers' channel holds [`READING_QUEUE`]
//! batches. When the rules fall behind and more than
//! [`rules::SHED_RULES_AT`] batches wait, the batches taken from the head
//! of the channel skip the rules and only go through the mappings, until
//! the backlog is below that mark again. Nothing is reordered (the same
//! loop takes every batch in turn) and nothing is dropped; skipped
//! readings are counted (`skipped` on `edgebridge/<id>/rules`) and logged
//! at most every 10 s. A driver waits only when the whole channel is full
//! (a rule stuck in a long `write()`); it keeps answering writes while it
//! waits, so a rule's `write()` to it cannot deadlock.

pub mod commands;
pub mod mapping;
pub mod rules;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::bus::Bus;
use crate::model::{Message, Reading, ReadingBatch};
use crate::ops::metrics;
use mapping::Mappings;

/// Batches waiting for the pipeline; drivers wait when it is full.
pub const READING_QUEUE: usize = 1024;

/// The fixed ends of the one path: mappings in, bus out.
#[derive(Clone)]
pub struct Pipeline {
    mappings: Arc<Mappings>,
    bus: Bus,
}

impl Pipeline {
    pub fn new(mappings: Arc<Mappings>, bus: Bus) -> Pipeline {
        Pipeline { mappings, bus }
    }

    /// Counts a batch as it enters the pipeline (one poll of one device).
    pub fn received(batch: &[Reading]) {
        if let Some(first) = batch.first() {
            metrics::readings(&first.device, batch.len());
        }
    }

    /// The messages the mappings make of `r`, appended to `out`.
    pub fn map(&self, r: &Reading, out: &mut Vec<Message>) {
        self.mappings.apply(r, out);
    }

    /// Every reading of `batch` through the mappings only (no rules).
    pub fn map_all(&self, batch: &[Reading], out: &mut Vec<Message>) {
        for r in batch {
            self.map(r, out);
        }
    }

    /// The one place messages leave the pipeline: publishes `out` in
    /// order and empties it.
    pub async fn publish(&self, out: &mut Vec<Message>) {
        if out.is_empty() {
            return;
        }
        metrics::pipeline_messages(out.len());
        for m in out.drain(..) {
            self.bus.publish(m).await;
        }
    }
}

/// Runs the pipeline without rules until every driver has dropped its
/// sender. (With rules, [`rules::RulesRuntime::start`] takes the
/// channel instead.)
pub fn spawn(mut readings: mpsc::Receiver<ReadingBatch>, pipeline: Pipeline) -> JoinHandle<()> {
    tokio::spawn(async move { run_without_rules(&mut readings, &pipeline).await })
}

/// Every batch through the mappings, until the channel closes.
pub(crate) async fn run_without_rules(
    readings: &mut mpsc::Receiver<ReadingBatch>,
    pipeline: &Pipeline,
) {
    let mut out = Vec::with_capacity(64);
    while let Some(batch) = readings.recv().await {
        Pipeline::received(&batch);
        pipeline.map_all(&batch, &mut out);
        pipeline.publish(&mut out).await;
    }
}
