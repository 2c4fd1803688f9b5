//! The Modbus client path the drivers use (`Session::read`: tokio-modbus
//! RTU or TCP framing, the timeout, stray-answer retry and recovery), with
//! a device that answers arbitrary bytes: garbage, truncated, oversized,
//! wrong slave/function/CRC, then silence or a hang-up. Properties: never
//! panics, always returns within the timeout bound (virtual clock), and a
//! block read that succeeds has exactly the requested size.
#![no_main]

use std::time::Duration;

use edgebridge::config::{LineSettings, Parity, Table};
use edgebridge::drivers::modbus::plan::{Block, Merge};
use edgebridge::drivers::modbus::session::{BlockData, Endpoint, Session};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TABLES: [Table; 4] = [Table::Coil, Table::Discrete, Table::Input, Table::Holding];
const TIMEOUT: Duration = Duration::from_millis(200);

fuzz_target!(|input: (bool, u8, u8, u16, u8, bool, Vec<Vec<u8>>)| {
    let (tcp, slave, table, start, count, hang_up, answers) = input;
    let endpoint = if tcp {
        Endpoint::Tcp {
            address: "fuzz:502".into(),
        }
    } else {
        Endpoint::Serial {
            path: "/dev/fuzz".into(),
            settings: LineSettings {
                baud: 9600,
                parity: Parity::None,
                data_bits: 8,
                stop_bits: 1,
            },
            frame_gap: Duration::from_millis(4),
        }
    };
    let block = Block {
        table: TABLES[usize::from(table) % 4],
        start,
        count: u16::from(count % 125) + 1,
        points: vec![0],
        merge: Merge::Normal,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let (client, mut device) = tokio::io::duplex(4096);
        // The device: for each request it sees, one fuzzed answer (in
        // pieces, as a serial line delivers it); then silence or EOF.
        let dev = tokio::spawn(async move {
            let mut req = [0u8; 512];
            for answer in answers {
                match device.read(&mut req).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                for piece in answer.chunks(7) {
                    if device.write_all(piece).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            if hang_up {
                return;
            }
            // Silent but present: drain requests until the client goes.
            while let Ok(n) = device.read(&mut req).await {
                if n == 0 {
                    return;
                }
            }
        });
        let mut session = Session::new(endpoint);
        session.attach(client);
        for _ in 0..3 {
            let began = tokio::time::Instant::now();
            let res = session.read(slave, &block, TIMEOUT).await;
            // Two attempts (stray answer) plus recovery, each bounded.
            assert!(
                began.elapsed() <= TIMEOUT * 2 + Duration::from_secs(2),
                "a read took {:?}",
                began.elapsed()
            );
            match res {
                Ok(BlockData::Bits(b)) => assert_eq!(b.len(), usize::from(block.count)),
                Ok(BlockData::Words(w)) => assert_eq!(w.len(), usize::from(block.count)),
                Err(_) => {}
            }
            if !session.is_open() {
                break;
            }
        }
        drop(session);
        let _ = dev.await;
    });
});
