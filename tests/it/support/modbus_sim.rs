//! A Modbus device simulator for the driver tests: one register map per
//! slave id, served by the real tokio-modbus RTU server over a
//! pseudo-terminal pair and by its TCP server. It counts requests, can make
//! a slave silent or slow, answer exceptions for chosen addresses, put
//! garbage on the line, and be unplugged and plugged in again.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use std::os::fd::AsRawFd as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_modbus::prelude::*;
use tokio_modbus::server::Service;

use tokio_serial::{SerialPort as _, SerialStream};

/// The four Modbus tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Coil,
    Discrete,
    Input,
    Holding,
}

/// One request as the simulator saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Req {
    pub slave: u8,
    pub function: u8,
    pub address: u16,
    pub count: u16,
    /// Whether the simulator sent an answer (normal or exception).
    pub answered: bool,
}

#[derive(Debug, Default)]
struct SlaveState {
    bits: HashMap<(Table, u16), bool>,
    words: HashMap<(Table, u16), u16>,
    silent: bool,
    /// Answers every request with this exception.
    failing: Option<ExceptionCode>,
    /// Answers with a frame whose CRC is wrong.
    garbage: bool,
    delay: Duration,
    exceptions: HashSet<(Table, u16)>,
}

#[derive(Debug, Default)]
struct State {
    slaves: BTreeMap<u8, SlaveState>,
    log: Vec<Req>,
    /// The RTU line, for answers the server cannot send (garbage).
    raw: Option<std::fs::File>,
}

/// Shared simulator state; clones share it. Slaves that were never added
/// do not answer, like an empty address on a real bus.
#[derive(Debug, Clone, Default)]
pub struct Sim {
    state: Arc<Mutex<State>>,
}

impl Sim {
    pub fn new() -> Sim {
        Sim::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with_slave<R>(&self, slave: u8, f: impl FnOnce(&mut SlaveState) -> R) -> R {
        f(self.lock().slaves.entry(slave).or_default())
    }

    pub fn add_slave(&self, slave: u8) {
        self.with_slave(slave, |_| ());
    }

    pub fn set_words(&self, slave: u8, table: Table, address: u16, words: &[u16]) {
        self.with_slave(slave, |s| {
            for (i, w) in words.iter().enumerate() {
                s.words.insert((table, address + i as u16), *w);
            }
        });
    }

    pub fn set_holding(&self, slave: u8, address: u16, words: &[u16]) {
        self.set_words(slave, Table::Holding, address, words);
    }

    pub fn set_input(&self, slave: u8, address: u16, words: &[u16]) {
        self.set_words(slave, Table::Input, address, words);
    }

    pub fn set_bit(&self, slave: u8, table: Table, address: u16, on: bool) {
        self.with_slave(slave, |s| {
            s.bits.insert((table, address), on);
        });
    }

    pub fn holding(&self, slave: u8, address: u16, n: u16) -> Vec<u16> {
        self.with_slave(slave, |s| {
            (address..address + n)
                .map(|a| *s.words.get(&(Table::Holding, a)).unwrap_or(&0))
                .collect()
        })
    }

    pub fn coil(&self, slave: u8, address: u16) -> bool {
        self.with_slave(slave, |s| {
            *s.bits.get(&(Table::Coil, address)).unwrap_or(&false)
        })
    }

    /// A silent slave receives requests but never answers.
    pub fn set_silent(&self, slave: u8, silent: bool) {
        self.with_slave(slave, |s| s.silent = silent);
    }

    /// Answers every request with `code` (e.g. a TCP gateway whose
    /// device is gone: GatewayTargetDevice), or normally again with `None`.
    pub fn set_failing(&self, slave: u8, code: Option<ExceptionCode>) {
        self.with_slave(slave, |s| s.failing = code);
    }

    /// Answers every request with a frame with a wrong CRC (RTU only).
    pub fn set_garbage(&self, slave: u8, on: bool) {
        self.with_slave(slave, |s| s.garbage = on);
    }

    /// Answers after `delay` (a slave slower than the gateway's timeout
    /// answers late, into the next request's time).
    pub fn set_delay(&self, slave: u8, delay: Duration) {
        self.with_slave(slave, |s| s.delay = delay);
    }

    /// Any request touching `address` of `table` gets IllegalDataAddress.
    pub fn set_exception(&self, slave: u8, table: Table, address: u16) {
        self.with_slave(slave, |s| {
            s.exceptions.insert((table, address));
        });
    }

    pub fn requests(&self) -> Vec<Req> {
        self.lock().log.clone()
    }

    pub fn clear_requests(&self) {
        self.lock().log.clear();
    }

    /// Requests to `slave` so far.
    pub fn count(&self, slave: u8) -> usize {
        self.lock().log.iter().filter(|r| r.slave == slave).count()
    }

    /// Read requests (FC 1-4) to `slave` so far.
    pub fn reads(&self, slave: u8) -> usize {
        self.lock()
            .log
            .iter()
            .filter(|r| r.slave == slave && (1..=4).contains(&r.function))
            .count()
    }

    /// Handles one request; `None` means no answer.
    fn handle(
        &self,
        slave: u8,
        req: &Request<'_>,
    ) -> (Option<Result<Response, ExceptionCode>>, Duration) {
        let (function, address, count) = describe(req);
        let mut st = self.lock();
        let Some(s) = st.slaves.get_mut(&slave) else {
            st.log.push(Req {
                slave,
                function,
                address,
                count,
                answered: false,
            });
            return (None, Duration::ZERO);
        };
        if s.silent {
            st.log.push(Req {
                slave,
                function,
                address,
                count,
                answered: false,
            });
            return (None, Duration::ZERO);
        }
        if s.garbage {
            st.log.push(Req {
                slave,
                function,
                address,
                count,
                answered: true,
            });
            if let Some(raw) = st.raw.as_mut() {
                let _ = raw.write_all(&[slave, function, 2, 0x00, 0x2A, 0xDE, 0xAD]);
            }
            return (None, Duration::ZERO);
        }
        let delay = s.delay;
        let table = match function {
            1 | 5 | 15 => Table::Coil,
            2 => Table::Discrete,
            4 => Table::Input,
            _ => Table::Holding,
        };
        let touches_bad = (address..address.saturating_add(count.max(1)))
            .any(|a| s.exceptions.contains(&(table, a)));
        let result = if let Some(code) = s.failing {
            Err(code)
        } else if touches_bad {
            Err(ExceptionCode::IllegalDataAddress)
        } else {
            let bits = |s: &SlaveState, t| -> Vec<bool> {
                (address..address + count)
                    .map(|a| *s.bits.get(&(t, a)).unwrap_or(&false))
                    .collect()
            };
            let words = |s: &SlaveState, t| -> Vec<u16> {
                (address..address + count)
                    .map(|a| *s.words.get(&(t, a)).unwrap_or(&0))
                    .collect()
            };
            match req {
                Request::ReadCoils(..) => Ok(Response::ReadCoils(bits(s, Table::Coil))),
                Request::ReadDiscreteInputs(..) => {
                    Ok(Response::ReadDiscreteInputs(bits(s, Table::Discrete)))
                }
                Request::ReadInputRegisters(..) => {
                    Ok(Response::ReadInputRegisters(words(s, Table::Input)))
                }
                Request::ReadHoldingRegisters(..) => {
                    Ok(Response::ReadHoldingRegisters(words(s, Table::Holding)))
                }
                Request::WriteSingleCoil(a, v) => {
                    s.bits.insert((Table::Coil, *a), *v);
                    Ok(Response::WriteSingleCoil(*a, *v))
                }
                Request::WriteMultipleCoils(a, vs) => {
                    for (i, v) in vs.iter().enumerate() {
                        s.bits.insert((Table::Coil, a + i as u16), *v);
                    }
                    Ok(Response::WriteMultipleCoils(*a, vs.len() as u16))
                }
                Request::WriteSingleRegister(a, v) => {
                    s.words.insert((Table::Holding, *a), *v);
                    Ok(Response::WriteSingleRegister(*a, *v))
                }
                Request::WriteMultipleRegisters(a, vs) => {
                    for (i, v) in vs.iter().enumerate() {
                        s.words.insert((Table::Holding, a + i as u16), *v);
                    }
                    Ok(Response::WriteMultipleRegisters(*a, vs.len() as u16))
                }
                _ => Err(ExceptionCode::IllegalFunction),
            }
        };
        st.log.push(Req {
            slave,
            function,
            address,
            count,
            answered: true,
        });
        (Some(result), delay)
    }

    fn service(&self) -> SimService {
        SimService { sim: self.clone() }
    }
}

fn describe(req: &Request<'_>) -> (u8, u16, u16) {
    match req {
        Request::ReadCoils(a, n) => (1, *a, *n),
        Request::ReadDiscreteInputs(a, n) => (2, *a, *n),
        Request::ReadHoldingRegisters(a, n) => (3, *a, *n),
        Request::ReadInputRegisters(a, n) => (4, *a, *n),
        Request::WriteSingleCoil(a, _) => (5, *a, 1),
        Request::WriteSingleRegister(a, _) => (6, *a, 1),
        Request::WriteMultipleCoils(a, v) => (15, *a, v.len() as u16),
        Request::WriteMultipleRegisters(a, v) => (16, *a, v.len() as u16),
        _ => (0, 0, 0),
    }
}

struct SimService {
    sim: Sim,
}

type SimFuture = Pin<Box<dyn Future<Output = Result<Option<Response>, ExceptionCode>> + Send>>;

impl Service for SimService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = SimFuture;

    fn call(&self, req: Self::Request) -> Self::Future {
        let (answer, delay) = self.sim.handle(req.slave, &req.request);
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            match answer {
                None => Ok(None),
                Some(Ok(r)) => Ok(Some(r)),
                Some(Err(e)) => Err(e),
            }
        })
    }
}

/// A Modbus RTU bus on a pseudo-terminal: the gateway opens `path` (a
/// symlink to the PTY's device, like a udev `by-id` link), the simulator
/// serves the other end.
pub struct RtuBus {
    sim: Sim,
    path: PathBuf,
    line: Option<Line>,
}

struct Line {
    task: JoinHandle<()>,
    /// A second handle on the simulator's end, to put raw bytes on the wire.
    raw: std::fs::File,
    /// Keeps the device end open so the simulator's end never sees EIO
    /// while the gateway is between two opens; never read.
    _device_end: SerialStream,
}

impl RtuBus {
    /// Creates the PTY pair, points `path` at it and starts serving.
    pub fn start(sim: &Sim, path: &Path) -> RtuBus {
        let mut bus = RtuBus {
            sim: sim.clone(),
            path: path.to_path_buf(),
            line: None,
        };
        bus.plug();
        bus
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pulls the adapter: the simulator's end closes, so the gateway's
    /// reads see EOF/EIO, and the path disappears.
    pub fn unplug(&mut self) {
        if let Some(line) = self.line.take() {
            line.task.abort();
        }
        self.sim.lock().raw = None;
        let _ = std::fs::remove_file(&self.path);
    }

    /// Plugs a (new) adapter in: a new PTY behind the same path.
    pub fn plug(&mut self) {
        self.unplug();
        let (sim_end, device_end) = SerialStream::pair().expect("pty pair");
        let device_path = device_end.name().expect("pty name");
        // SAFETY: `sim_end` owns this open fd for the whole call; the
        // borrow only lives until `try_clone_to_owned` has dup'ed it.
        let raw = unsafe { std::os::fd::BorrowedFd::borrow_raw(sim_end.as_raw_fd()) }
            .try_clone_to_owned()
            .map(std::fs::File::from)
            .expect("dup pty");
        let tmp = self.path.with_extension("new");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&device_path, &tmp).expect("symlink");
        std::fs::rename(&tmp, &self.path).expect("rename symlink");
        let service = self.sim.service();
        let task = tokio::spawn(async move {
            let server = tokio_modbus::server::rtu::Server::new(sim_end);
            if let Err(e) = server.serve_forever(service).await {
                eprintln!("modbus sim (rtu) stopped: {e}");
            }
        });
        self.sim.lock().raw = raw.try_clone().ok();
        self.line = Some(Line {
            task,
            raw,
            _device_end: device_end,
        });
    }

    /// Writes raw bytes toward the gateway (garbage, a bad CRC frame).
    pub fn write_raw(&mut self, bytes: &[u8]) {
        if let Some(line) = self.line.as_mut() {
            let _ = line.raw.write_all(bytes);
        }
    }
}

impl Drop for RtuBus {
    fn drop(&mut self) {
        self.unplug();
    }
}

/// A Modbus TCP server on loopback; unit ids are the simulator's slaves.
pub struct TcpDevice {
    sim: Sim,
    addr: SocketAddr,
    task: Option<JoinHandle<()>>,
    /// A duplicate of every accepted socket, to close them at once on stop.
    conns: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl TcpDevice {
    /// Listens on a free port.
    pub async fn start(sim: &Sim) -> TcpDevice {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let mut dev = TcpDevice {
            sim: sim.clone(),
            addr,
            task: None,
            conns: Arc::default(),
        };
        dev.serve(listener);
        dev
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn serve(&mut self, listener: TcpListener) {
        let sim = self.sim.clone();
        let conns = self.conns.clone();
        self.task = Some(tokio::spawn(async move {
            let server = tokio_modbus::server::tcp::Server::new(listener);
            let on_connected = |stream: tokio::net::TcpStream, addr| {
                let sim = sim.clone();
                let conns = conns.clone();
                async move {
                    let std = stream.into_std()?;
                    conns
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(std.try_clone()?);
                    let stream = tokio::net::TcpStream::from_std(std)?;
                    tokio_modbus::server::tcp::accept_tcp_connection(stream, addr, |_| {
                        Ok(Some(sim.service()))
                    })
                }
            };
            let _ = server.serve(&on_connected, |_e| {}).await;
        }));
    }

    /// Stops listening and closes every connection (a PLC restart).
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Connections accepted so far (reconnects show up here).
    pub fn connections(&self) -> usize {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Listens again on the same address.
    pub async fn restart(&mut self) {
        self.stop();
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("rebind {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }
}

impl Drop for TcpDevice {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A point of the fixture register map: its YAML and the value the
/// gateway must publish for it (payload `value`).
pub struct FixturePoint {
    pub name: &'static str,
    pub yaml: &'static str,
    pub expected: &'static str,
}

/// Registers of every type and order, written out by hand (independent of
/// the gateway's codec), and the values they must decode to.
pub fn load_fixture(sim: &Sim, slave: u8) {
    sim.set_holding(
        slave,
        0,
        &[
            0x1234, // 0 u16
            0xFFFE, // 1 i16 -2
            0xFEFF, // 2 i16 BADC -2
            0xAABB, 0xCCDD, // 3 u32 ABCD
            0xCCDD, 0xAABB, // 5 u32 CDAB
            0xFEFF, 0xC01D, // 7 i32 BADC -123456
            0xC01D, 0xFEFF, // 9 i32 DCBA -123456
            0x42F6, 0xE979, // 11 f32 ABCD 123.456
            0xE979, 0x42F6, // 13 f32 CDAB
            0xF642, 0x79E9, // 15 f32 BADC
            0x79E9, 0xF642, // 17 f32 DCBA
            0x0102, 0x0304, 0x0506, 0x0708, // 19 u64 ABCD
            0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF, // 23 i64 CDAB -2
            0x4093, 0x4A45, 0x6D5C, 0xFAAD, // 27 f64 ABCD 1234.5678
            0x0000, 0x0000, 0x0000, 0x04C0, // 31 f64 DCBA -2.5
            0x5356, 0x2D31, 0x0000, 0x0000, // 35 string "SV-1"
            215,    // 39 i16 * 0.1
            0x0008, // 40 bit 3
        ],
    );
    sim.set_input(slave, 10, &[0xE240, 0x0001]); // u32 CDAB 123456
    sim.set_bit(slave, Table::Discrete, 0, true);
    sim.set_bit(slave, Table::Coil, 1, false);
}

pub fn fixture_points() -> Vec<FixturePoint> {
    let p = |name, yaml, expected| FixturePoint {
        name,
        yaml,
        expected,
    };
    vec![
        p(
            "u16",
            "{ name: u16, table: holding, address: 0, type: u16 }",
            "4660",
        ),
        p(
            "i16",
            "{ name: i16, table: holding, address: 1, type: i16 }",
            "-2",
        ),
        p(
            "i16_badc",
            "{ name: i16_badc, table: holding, address: 2, type: i16, order: BADC }",
            "-2",
        ),
        p(
            "u32_abcd",
            "{ name: u32_abcd, table: holding, address: 3, type: u32 }",
            "2864434397",
        ),
        p(
            "u32_cdab",
            "{ name: u32_cdab, table: holding, address: 5, type: u32, order: CDAB }",
            "2864434397",
        ),
        p(
            "i32_badc",
            "{ name: i32_badc, table: holding, address: 7, type: i32, order: BADC }",
            "-123456",
        ),
        p(
            "i32_dcba",
            "{ name: i32_dcba, table: holding, address: 9, type: i32, order: DCBA }",
            "-123456",
        ),
        p(
            "f32_abcd",
            "{ name: f32_abcd, table: holding, address: 11, type: f32, order: ABCD }",
            "123.456",
        ),
        p(
            "f32_cdab",
            "{ name: f32_cdab, table: holding, address: 13, type: f32, order: CDAB }",
            "123.456",
        ),
        p(
            "f32_badc",
            "{ name: f32_badc, table: holding, address: 15, type: f32, order: BADC }",
            "123.456",
        ),
        p(
            "f32_dcba",
            "{ name: f32_dcba, table: holding, address: 17, type: f32, order: DCBA }",
            "123.456",
        ),
        p(
            "u64",
            "{ name: u64, table: holding, address: 19, type: u64 }",
            "72623859790382856",
        ),
        p(
            "i64_cdab",
            "{ name: i64_cdab, table: holding, address: 23, type: i64, order: CDAB }",
            "-2",
        ),
        p(
            "f64_abcd",
            "{ name: f64_abcd, table: holding, address: 27, type: f64 }",
            "1234.5678",
        ),
        p(
            "f64_dcba",
            "{ name: f64_dcba, table: holding, address: 31, type: f64, order: DCBA }",
            "-2.5",
        ),
        p(
            "serial",
            "{ name: serial, table: holding, address: 35, type: string, length: 4 }",
            "SV-1",
        ),
        p(
            "temp",
            "{ name: temp, table: holding, address: 39, type: i16, scale: 0.1, unit: \"°C\" }",
            "21.5",
        ),
        p(
            "alarm",
            "{ name: alarm, table: holding, address: 40, bit: 3 }",
            "true",
        ),
        p(
            "energy",
            "{ name: energy, table: input, address: 10, type: u32, order: CDAB, unit: kWh }",
            "123456",
        ),
        p(
            "sunshine",
            "{ name: sunshine, table: discrete, address: 0 }",
            "true",
        ),
        p(
            "led",
            "{ name: led, table: coil, address: 1, writable: true }",
            "false",
        ),
    ]
}
