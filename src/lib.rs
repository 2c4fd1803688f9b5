//! edgebridge: an IoT gateway in one binary. See DESIGN.md in the repo for
//! the architecture; folder names follow the data flow.

pub mod config;
pub mod model;
