//! edgebridge: an IoT gateway in one binary. Folder names follow the data
//! flow: drivers -> pipeline (mappings, rules) -> bus -> bridges; README.md
//! describes what each part does for the user.

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
