//! Device drivers against real Modbus servers on PTYs and TCP.

use std::time::Duration;

use tokio_modbus::prelude::*;

use crate::support::modbus_sim::{load_fixture, RtuBus, Sim, Table, TcpDevice};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_serves_several_slaves_on_one_pty() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::new();
    load_fixture(&sim, 1);
    sim.add_slave(2);
    sim.set_holding(2, 0, &[7]);
    let mut bus = RtuBus::start(&sim, &dir.path().join("ttySIM0"));
    let port = tokio_serial::new(bus.path().to_string_lossy(), 9600);
    let stream = tokio_serial::SerialStream::open(&port).unwrap();
    let mut ctx = rtu::attach_slave(stream, Slave(1));
    let t = Duration::from_secs(2);
    let regs = tokio::time::timeout(t, ctx.read_holding_registers(0, 3))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(regs, vec![0x1234, 0xFFFE, 0xFEFF]);
    ctx.set_slave(Slave(2));
    let regs = tokio::time::timeout(t, ctx.read_holding_registers(0, 1))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(regs, vec![7]);
    sim.set_exception(2, Table::Holding, 5);
    let e = tokio::time::timeout(t, ctx.read_holding_registers(0, 10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e, Err(ExceptionCode::IllegalDataAddress));
    ctx.set_slave(Slave(3));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), ctx.read_holding_registers(0, 1))
            .await
            .is_err()
    );
    assert_eq!(sim.count(1), 1);
    assert_eq!(sim.count(2), 2);
    assert_eq!(sim.count(3), 1);
    // Unplug: the gateway's end sees EOF or an error, never data.
    bus.unplug();
    ctx.set_slave(Slave(1));
    let r = tokio::time::timeout(t, ctx.read_holding_registers(0, 1)).await;
    assert!(matches!(r, Ok(Err(_))), "{r:?}");
    bus.plug();
    let stream = tokio_serial::SerialStream::open(&port).unwrap();
    let mut ctx = rtu::attach_slave(stream, Slave(1));
    let regs = tokio::time::timeout(t, ctx.read_holding_registers(0, 1))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(regs, vec![0x1234]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_serves_tcp_and_restarts() {
    let sim = Sim::new();
    load_fixture(&sim, 1);
    let mut dev = TcpDevice::start(&sim).await;
    let mut ctx = tcp::connect_slave(dev.addr(), Slave(1)).await.unwrap();
    ctx.write_single_coil(1, true).await.unwrap().unwrap();
    assert!(sim.coil(1, 1));
    dev.stop();
    assert!(ctx.read_coils(1, 1).await.is_err());
    dev.restart().await;
    let mut ctx = tcp::connect_slave(dev.addr(), Slave(1)).await.unwrap();
    assert_eq!(ctx.read_coils(1, 1).await.unwrap().unwrap(), vec![true]);
}
