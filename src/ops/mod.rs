//! Running as a service: the systemd notification protocol and watchdog
//! ([`service`]), the gateway's health check and summary ([`health`]), and
//! the Prometheus endpoint ([`metrics`]), and the allocator's settings
//! ([`memory`]).

pub mod health;
pub mod memory;
pub mod metrics;
pub mod reload;
pub mod service;

/// Runs `f` on tokio's blocking pool and waits for it: for file system
/// work that may take long (opening and salvaging a queue's SQLite file,
/// scanning an inbox's segments) so that it never holds up an async
/// worker thread. A panic in `f` continues in the caller, as if `f` had
/// been called there.
pub async fn blocking<T, F>(f: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // The pool drops a task that has not started only while the
            // runtime shuts down, and then it drops this caller too: this
            // arm is never reached by a caller that is still polled.
            Err(_) => std::panic::resume_unwind(Box::new(
                "a blocking task was cancelled: the runtime is shutting down",
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn blocking_returns_and_panics_like_a_call() {
        assert_eq!(super::blocking(|| 6 * 7).await, 42);
        let caught = tokio::spawn(super::blocking(|| -> u8 { panic!("boom") })).await;
        assert!(caught.unwrap_err().is_panic());
    }
}
