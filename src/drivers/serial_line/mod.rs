//! `serial-line`: every text line received on a serial port becomes a
//! reading of point `line`; rules (`on_line`) parse it.

pub mod codec;
