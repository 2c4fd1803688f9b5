//! Running as a service: the systemd notification protocol and watchdog
//! ([`service`]), the gateway's health check and summary ([`health`]), and
//! the Prometheus endpoint ([`metrics`]), and the allocator's settings
//! ([`memory`]).

pub mod health;
pub mod memory;
pub mod metrics;
pub mod reload;
pub mod service;
