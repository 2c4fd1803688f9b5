//! Bytes from a hostile TCP client to a running gateway's MQTT 3.1.1 and 5
//! listeners (every version on either). After each input, a well-behaved client must still connect,
//! subscribe and receive its own publish (the router is alive and serving).
#![no_main]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use edgebridge::config::{Config, ListenerProtocol};
use edgebridge::gateway::Gateway;
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"
gateway: { id: fuzz-gw, data_dir: /tmp/edgebridge-fuzz-data }
broker:
  listeners:
    - { bind: "127.0.0.1:0", protocol: mqtt }
    - { bind: "127.0.0.1:0", protocol: mqtt5 }
"#;

/// The gateway lives for the whole fuzzing run, on its own runtime thread.
fn gateway() -> &'static (SocketAddr, SocketAddr) {
    static ADDRS: OnceLock<(SocketAddr, SocketAddr)> = OnceLock::new();
    ADDRS.get_or_init(|| {
        // The broker closes a connection on a malformed packet, and writing
        // the rest of the input then raises SIGPIPE. A Rust `main` ignores
        // it, libFuzzer's does not: ignore it here, so the write fails with
        // EPIPE as in the gateway's own process.
        // SAFETY: setting a signal's disposition to SIG_IGN before any other
        // thread of ours runs; no handler code is involved.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let config = Config::from_text(Path::new("fuzz.yaml"), CONFIG, |_| None)
                    .expect("fuzz config");
                let gw = Gateway::start(config).await.expect("gateway starts");
                let v4 = gw.listener(ListenerProtocol::Mqtt).expect("mqtt listener");
                let v5 = gw
                    .listener(ListenerProtocol::Mqtt5)
                    .expect("mqtt5 listener");
                tx.send((v4, v5)).expect("report addresses");
                std::future::pending::<()>().await;
                drop(gw);
            });
        });
        rx.recv().expect("gateway started")
    })
}

fn encode_len(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![header];
    encode_len(body.len(), &mut p);
    p.extend_from_slice(body);
    p
}

/// Reads one MQTT packet: (first byte, body).
fn read_packet(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    let header = b[0];
    let (mut len, mut shift) = (0usize, 0);
    loop {
        s.read_exact(&mut b)?;
        len |= usize::from(b[0] & 0x7f) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
        assert!(shift < 28, "bad remaining length from the broker");
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((header, body))
}

/// A well-behaved 3.1.1 client must get through within 5 s: CONNECT,
/// SUBSCRIBE, PUBLISH to itself and receive that publish. A connection the
/// broker drops is retried, as a real client would (a fuzzed client may
/// have used the same client id a moment ago); a wrong answer fails at once.
fn probe(addr: SocketAddr, nonce: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let e = match probe_once(addr, nonce) {
            Ok(()) => return,
            Err(e) => e,
        };
        assert!(
            std::time::Instant::now() < deadline,
            "the broker stopped serving: no probe got through for 5 s (last: {e})"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn probe_once(addr: SocketAddr, nonce: u64) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    // A client id of its own each time: fuzzed inputs grown from the
    // corpus connect as "probe" too, and taking over such a session (a
    // half-open connection) can take the broker seconds.
    let id = format!("edgebridge-probe-{nonce}");
    let mut connect = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    connect.extend_from_slice(&(id.len() as u16).to_be_bytes());
    connect.extend_from_slice(id.as_bytes());
    s.write_all(&packet(0x10, &connect))?;
    assert_eq!(read_packet(&mut s)?, (0x20, vec![0, 0]), "CONNACK");
    // Skips retained messages a fuzzed client left on the topic.
    let topic = b"probe/1";
    let mut sub = vec![0, 1, 0, topic.len() as u8];
    sub.extend_from_slice(topic);
    sub.push(0);
    s.write_all(&packet(0x82, &sub))?;
    let mut publish = vec![0, topic.len() as u8];
    publish.extend_from_slice(topic);
    let payload = nonce.to_be_bytes();
    publish.extend_from_slice(&payload);
    let mut sent = false;
    for _ in 0..100 {
        let (h, body) = read_packet(&mut s)?;
        if h == 0x90 {
            assert_eq!(body, [0, 1, 0], "SUBACK");
            s.write_all(&packet(0x30, &publish))?;
            sent = true;
        } else if h & 0xF0 == 0x30 && sent && body.ends_with(&payload) {
            let _ = s.write_all(&[0xE0, 0]);
            return Ok(());
        }
    }
    panic!("the probe never got its own publish back");
}

/// A panic inside the broker library's per-connection code (rmqtt and its
/// codec and network crates) stays in that connection's task: tokio
/// catches it, the connection closes, and the broker goes on serving, which
/// the probe checks after every input. libFuzzer's hook aborts on every
/// panic, so those are printed and let through to unwind; any other panic
/// (ours, the probe's assertions) still aborts.
fn tolerate_broker_connection_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_broker = info
                .location()
                .is_some_and(|l| l.file().contains("/rmqtt"));
            if in_broker {
                eprintln!("contained panic in the broker library: {info}");
            } else {
                previous(info);
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    tolerate_broker_connection_panics();
    let &(v4, v5) = gateway();
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let addr = if first & 1 == 0 { v4 } else { v5 };
    if let Ok(mut s) = TcpStream::connect(addr) {
        let _ = s.set_nodelay(true);
        let _ = s.write_all(rest);
        // Read whatever comes back briefly, so the broker processes it.
        let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
        let mut sink = [0u8; 4096];
        while let Ok(n) = s.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
    }
    static NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    probe(v4, NONCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
});
