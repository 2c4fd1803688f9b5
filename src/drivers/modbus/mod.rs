//! Modbus RTU and TCP: register decoding, request planning, and the
//! pollers that own a serial bus or a TCP connection.

pub mod decode;
pub mod plan;
pub mod point;
