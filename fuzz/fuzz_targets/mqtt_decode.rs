//! The MQTT 3.1.1 and 5 packet decoders of the embedded broker (rmqtt's
//! codec), which parse every byte a LAN client sends before our code sees
//! anything. Property: no panic, and each decoded packet consumes bytes
//! (no loop).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rmqtt_codec::{v3, v5};
use tokio_util::codec::Decoder;

/// The default `broker.max_payload_size` plus the broker's packet overhead.
const MAX: u32 = 256 * 1024 + 64 * 1024;

fn decode_all<D: Decoder>(mut codec: D, data: &[u8]) {
    let mut buf = BytesMut::from(data);
    for _ in 0..1000 {
        let before = buf.len();
        match codec.decode(&mut buf) {
            Ok(Some(_)) => assert!(buf.len() < before, "a packet consumed no bytes"),
            Ok(None) | Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    // The first byte picks the protocol; the rest is the stream.
    if first & 1 == 0 {
        decode_all(v3::Codec::new(MAX), rest);
    } else {
        decode_all(v5::Codec::new(MAX, MAX), rest);
    }
});
