//! The queue-failure path, the same for every profile.

use tokio::time::Instant;

/// A full disk is a state, logged when it starts and when it ends: while
/// it lasts, appends are tried once a second, what is already queued keeps
/// draining (deleting rows needs no new space, see `queue::DiskBudget`),
/// the bridge keeps taking messages from the bus (the gateway's publishers
/// never wait on it), and past `MAX_UNSAVED` in memory the oldest of those
/// are dropped and counted in `dropped`.
#[derive(Debug)]
pub struct DiskFull {
    pub since: Instant,
    pub retry_at: Instant,
    /// Messages dropped because they could not be stored.
    pub lost: u64,
}
