//! edgebridge: an IoT gateway in one binary. See DESIGN.md in the repo for
//! the architecture; folder names follow the data flow.

pub mod access;
pub mod bridge;
pub mod broker;
pub mod bus;
pub mod cli;
pub mod config;
pub mod drivers;
pub mod gateway;
pub mod model;
pub mod ops;
pub mod pipeline;
pub mod status;
pub mod topic;
