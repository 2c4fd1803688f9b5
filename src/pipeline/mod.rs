//! The pipeline: where readings are transformed. Each batch from a driver
//! goes through the rules (when configured) and the mappings, and the
//! resulting messages go to the bus.

pub mod commands;
pub mod mapping;
pub mod rules;

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::bus::Bus;
use crate::model::ReadingBatch;
use crate::ops::metrics;
use mapping::Mappings;
use rules::RulesRuntime;

/// Batches waiting for the pipeline; drivers wait when it is full.
pub const READING_QUEUE: usize = 1024;

/// Runs until every driver has dropped its sender. With rules, each batch
/// goes to the rules thread, which applies the mappings itself; a batch the
/// rules cannot take at once is mapped here without rules, so a slow rule
/// never makes a driver wait.
pub async fn run(
    mut readings: mpsc::Receiver<ReadingBatch>,
    mappings: Arc<Mappings>,
    bus: Bus,
    rules: Option<Arc<RulesRuntime>>,
) {
    let mut out = Vec::with_capacity(64);
    while let Some(batch) = readings.recv().await {
        if let Some(first) = batch.first() {
            // A batch is one poll of one device.
            metrics::readings(&first.device, batch.len());
        }
        let batch = match &rules {
            Some(rules) => match rules.offer(batch) {
                Ok(()) => continue,
                Err(skipped) => skipped,
            },
            None => batch,
        };
        for r in &batch {
            mappings.apply(r, &mut out);
        }
        metrics::pipeline_messages(out.len());
        for m in out.drain(..) {
            bus.publish(m).await;
        }
    }
}
