//! Broker users now live in [`crate::access`] (with the ACL, the
//! Mosquitto password files and the check pool). This re-export keeps
//! `broker::{Users, hash_password}` working for the engine wiring in
//! `broker/mod.rs` until it moves to [`crate::access::AccessControl`].

pub use crate::access::{hash_password, Users};
