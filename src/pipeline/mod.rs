//! The pipeline: where readings are transformed. Each batch from a driver
//! goes through the rules (when configured) and the mappings, and the
//! resulting messages go to the bus.

pub mod commands;
pub mod mapping;
pub mod rules;

use tokio::sync::mpsc;

use crate::bus::Bus;
use crate::model::ReadingBatch;
use mapping::Mappings;

/// Batches waiting for the pipeline; drivers wait when it is full.
pub const READING_QUEUE: usize = 1024;

/// Runs until every driver has dropped its sender.
pub async fn run(mut readings: mpsc::Receiver<ReadingBatch>, mappings: Mappings, bus: Bus) {
    let mut out = Vec::with_capacity(64);
    while let Some(batch) = readings.recv().await {
        for r in &batch {
            mappings.apply(r, &mut out);
        }
        for m in out.drain(..) {
            bus.publish(m).await;
        }
    }
}
