//! One integration-test harness (one binary, fast to build); one module per
//! area, shared helpers in `support`.

mod support;

mod architecture;
mod bridge;
mod broker;
mod cli;
mod config;
mod drivers;
mod gateway;
mod interop;
mod onenet;
mod onenet_gateway;
mod ops;
mod rules;
mod security;
