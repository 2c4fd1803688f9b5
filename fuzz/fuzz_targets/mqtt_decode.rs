//! The MQTT 3.1.1 and 5 packet decoders of rumqttd, which parse every byte a
//! LAN client sends to the embedded broker before our code sees anything.
//! Property: no panic, and each decoded packet consumes bytes (no loop).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rumqttd::protocol::{v4::V4, v5::V5, Protocol};

/// The default `broker.max_payload_size`.
const MAX: usize = 256 * 1024;

fn decode_all<P: Protocol>(mut p: P, data: &[u8]) {
    let mut buf = BytesMut::from(data);
    for _ in 0..1000 {
        let before = buf.len();
        match p.read_mut(&mut buf, MAX) {
            Ok(_) => assert!(buf.len() < before, "a packet consumed no bytes"),
            Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    // The first byte picks the protocol; the rest is the stream.
    if data[0] & 1 == 0 {
        decode_all(V4, &data[1..]);
    } else {
        decode_all(V5, &data[1..]);
    }
});
