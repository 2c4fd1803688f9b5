//! Talking to systemd (`Type=notify`): READY once the gateway serves,
//! RELOADING around a SIGHUP reload, STOPPING on shutdown, and watchdog
//! pings. Outside systemd (`NOTIFY_SOCKET` unset) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

/// The service manager, as far as this process talks to it.
#[derive(Debug, Clone)]
pub struct ServiceManager {
    watchdog: Option<Duration>,
}

impl ServiceManager {
    /// Reads `NOTIFY_SOCKET` / `WATCHDOG_USEC` / `WATCHDOG_PID` as systemd
    /// sets them.
    pub fn from_env() -> ServiceManager {
        ServiceManager {
            watchdog: sd_notify::watchdog_enabled().filter(|d| !d.is_zero()),
        }
    }

    /// How often to check health and ping: half the watchdog timeout as
    /// sd_watchdog_enabled(3) recommends, and at most `max`.
    pub fn check_interval(&self, max: Duration) -> Duration {
        match self.watchdog {
            Some(w) => (w / 2).min(max).max(Duration::from_millis(10)),
            None => max,
        }
    }

    /// The gateway serves: the broker listens and the devices are started.
    pub fn ready(&self, status: &str) {
        send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A reload starts; `ready` ends it.
    pub fn reloading(&self) {
        let mut states = vec![NotifyState::Reloading];
        // systemd matches RELOADING=1 to the reload request by this stamp.
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        send(&states);
    }

    pub fn stopping(&self) {
        send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    /// Tells the watchdog the gateway is alive and healthy.
    pub fn watchdog_ping(&self) {
        if self.watchdog.is_some() {
            send(&[NotifyState::Watchdog]);
        }
    }

    /// A free-form status line (`systemctl status` shows it).
    pub fn status(&self, status: &str) {
        send(&[NotifyState::Status(status)]);
    }
}

/// Turns health check results into watchdog pings: a ping only after a
/// check that passed, so a gateway that stays unhealthy (or whose main loop
/// is stuck) is restarted by systemd after `WatchdogSec=`.
#[derive(Debug, Default)]
pub struct Watchdog {
    /// Consecutive failed checks.
    failures: u32,
}

/// What to do after one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub ping: bool,
    pub log: Option<CheckLog>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckLog {
    /// One failed check (e.g. an external broker still connecting): a
    /// warning.
    Failed,
    /// The second failure in a row: an error, once.
    Unhealthy,
    /// Passed again after being unhealthy.
    Recovered,
}

impl Watchdog {
    pub fn observe(&mut self, healthy: bool) -> Verdict {
        if healthy {
            let log = (self.failures >= 2).then_some(CheckLog::Recovered);
            self.failures = 0;
            return Verdict { ping: true, log };
        }
        self.failures = self.failures.saturating_add(1);
        let log = match self.failures {
            1 => Some(CheckLog::Failed),
            2 => Some(CheckLog::Unhealthy),
            _ => None,
        };
        Verdict { ping: false, log }
    }
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_pinged_only_after_a_passed_check() {
        let mut w = Watchdog::default();
        let v = |ping, log| Verdict { ping, log };
        assert_eq!(w.observe(true), v(true, None));
        assert_eq!(w.observe(false), v(false, Some(CheckLog::Failed)));
        assert_eq!(w.observe(true), v(true, None), "one failure is no outage");
        assert_eq!(w.observe(false), v(false, Some(CheckLog::Failed)));
        assert_eq!(w.observe(false), v(false, Some(CheckLog::Unhealthy)));
        assert_eq!(w.observe(false), v(false, None), "logged once");
        assert_eq!(w.observe(true), v(true, Some(CheckLog::Recovered)));
    }

    #[test]
    fn check_interval_is_half_the_watchdog_capped() {
        let s = ServiceManager {
            watchdog: Some(Duration::from_secs(30)),
        };
        assert_eq!(
            s.check_interval(Duration::from_secs(60)),
            Duration::from_secs(15)
        );
        assert_eq!(
            s.check_interval(Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        let none = ServiceManager { watchdog: None };
        assert_eq!(
            none.check_interval(Duration::from_secs(10)),
            Duration::from_secs(10)
        );
    }
}
