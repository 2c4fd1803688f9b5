//! Modbus RTU and TCP: register decoding, request planning, and the
//! pollers that own a serial bus or a TCP connection.

pub mod bus;
pub mod decode;
pub mod device;
pub mod plan;
pub mod point;
pub mod session;
pub mod transport;
