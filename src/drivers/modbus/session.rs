//! One Modbus conversation partner: an open serial bus or TCP connection,
//! with what tokio-modbus leaves to the caller: a timeout on every
//! request, silence between frames on a serial bus, discarding late bytes
//! after a timeout, and telling "port lost" from "garbled answer".

use std::io;
use std::time::Duration;

use thiserror::Error;
use tokio::time::Instant;
use tokio_modbus::client::{Client as _, Context};
use tokio_modbus::prelude::{rtu, tcp, SlaveContext as _};
use tokio_modbus::{ExceptionCode, ProtocolError, Request, Response, Slave};

use crate::config::{LineSettings, Table};

use super::plan::Block;
use super::transport::{open_serial, Io, Link};

/// Why one request failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("device answered with Modbus exception: {0}")]
    Exception(ExceptionCode),
    #[error("garbled answer: {0}")]
    Protocol(String),
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("not connected")]
    NotConnected,
}

/// The outcome of one attempt of a request.
enum Attempt {
    Failed(RequestError),
    /// The answer belonged to another request.
    Stray(String),
}

impl Attempt {
    fn into_error(self) -> RequestError {
        match self {
            Attempt::Failed(e) => e,
            Attempt::Stray(why) => RequestError::Protocol(why),
        }
    }
}

/// Where a session talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A serial port (RS-485/RS-232) with Modbus RTU framing.
    Serial {
        path: String,
        settings: LineSettings,
        /// Silence kept between two frames.
        frame_gap: Duration,
    },
    /// A Modbus TCP server, `host:port`.
    Tcp { address: String },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Serial { path, settings, .. } => write!(f, "{path} ({settings})"),
            Endpoint::Tcp { address } => write!(f, "tcp://{address}"),
        }
    }
}

/// Data of one block read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockData {
    Bits(Vec<bool>),
    Words(Vec<u16>),
}

struct Conn {
    ctx: Context,
    link: Link,
}

/// An endpoint and, while it is open, its client.
pub struct Session {
    endpoint: Endpoint,
    conn: Option<Conn>,
    /// When the last frame ended, for the inter-frame silence.
    last_io: Option<Instant>,
    /// Bytes (received, sent) of connections already closed.
    closed_counters: (u64, u64),
    /// Set when a request found the transport gone; see [`Session::take_lost`].
    lost: Option<String>,
}

impl Session {
    pub fn new(endpoint: Endpoint) -> Session {
        Session {
            endpoint,
            conn: None,
            last_io: None,
            closed_counters: (0, 0),
            lost: None,
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn is_open(&self) -> bool {
        self.conn.is_some()
    }

    /// Opens the port or connects; `timeout` bounds a TCP connect.
    pub async fn open(&mut self, timeout: Duration) -> io::Result<()> {
        self.close();
        let conn = match &self.endpoint {
            Endpoint::Serial { path, settings, .. } => {
                let stream = open_serial(path, settings)?;
                let link = Link::new(stream, false);
                let ctx = rtu::attach_slave(link.clone(), Slave(1));
                Conn { ctx, link }
            }
            Endpoint::Tcp { address } => {
                let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address))
                    .await
                    .map_err(|_| {
                        io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "connect timed out after {}",
                                humantime::format_duration(timeout)
                            ),
                        )
                    })??;
                stream.set_nodelay(true)?;
                let link = Link::new(stream, true);
                let ctx = tcp::attach_slave(link.clone(), Slave(1));
                Conn { ctx, link }
            }
        };
        self.conn = Some(conn);
        self.last_io = None;
        Ok(())
    }

    /// Uses an already open stream instead of opening the endpoint, with
    /// the endpoint's framing (RTU for `Serial`, MBAP for `Tcp`). For the
    /// fuzz harness and tests, which talk over an in-memory pipe.
    pub fn attach(&mut self, io: impl Io) {
        self.close();
        let serial = matches!(self.endpoint, Endpoint::Serial { .. });
        let link = Link::new(io, !serial);
        let ctx = if serial {
            rtu::attach_slave(link.clone(), Slave(1))
        } else {
            tcp::attach_slave(link.clone(), Slave(1))
        };
        self.conn = Some(Conn { ctx, link });
        self.last_io = None;
    }

    /// Closes the port or connection (it is reopened by [`Session::open`]).
    pub fn close(&mut self) {
        self.lost = None;
        if let Some(c) = self.conn.take() {
            let (rx, tx) = c.link.counters();
            self.closed_counters.0 += rx;
            self.closed_counters.1 += tx;
        }
    }

    /// Why the transport was lost during the last requests, once: the
    /// owner then reports it and reopens with backoff.
    pub fn take_lost(&mut self) -> Option<String> {
        self.lost.take()
    }

    fn lose(&mut self, why: String) -> RequestError {
        self.close();
        self.lost = Some(why.clone());
        RequestError::Lost(why)
    }

    /// Bytes received and sent over the session's life.
    pub fn counters(&self) -> (u64, u64) {
        let (rx, tx) = self
            .conn
            .as_ref()
            .map(|c| c.link.counters())
            .unwrap_or((0, 0));
        (self.closed_counters.0 + rx, self.closed_counters.1 + tx)
    }

    /// One request with a timeout. An answer that belongs to another
    /// request (another slave's late answer on a shared bus, an old TCP
    /// transaction) is dropped and the request is sent once more, so a
    /// slow neighbour does not count as this device's failure.
    pub async fn call(
        &mut self,
        slave: u8,
        request: Request<'_>,
        timeout: Duration,
    ) -> Result<Response, RequestError> {
        let started = Instant::now();
        let result = match self.call_once(slave, request.clone(), timeout).await {
            Err(Attempt::Stray(why)) => {
                tracing::debug!(endpoint = %self.endpoint, %slave, %why, "dropped an answer to another request; asking again");
                self.call_once(slave, request, timeout)
                    .await
                    .map_err(Attempt::into_error)
            }
            other => other.map_err(Attempt::into_error),
        };
        // The bus was held from the frame gap to the answer (or the
        // recovery after a timeout): its utilisation.
        if let Endpoint::Serial { path, .. } = &self.endpoint {
            crate::ops::metrics::serial_bus_request(path, started.elapsed());
        }
        result
    }

    async fn call_once(
        &mut self,
        slave: u8,
        request: Request<'_>,
        timeout: Duration,
    ) -> Result<Response, Attempt> {
        if let Endpoint::Serial { frame_gap, .. } = &self.endpoint {
            if let Some(t) = self.last_io {
                tokio::time::sleep_until(t + *frame_gap).await;
            }
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(Attempt::Failed(RequestError::NotConnected));
        };
        conn.link.discard_input();
        conn.ctx.set_slave(Slave(slave));
        let res = tokio::time::timeout(timeout, conn.ctx.call(request)).await;
        self.last_io = Some(Instant::now());
        match res {
            Ok(Ok(Ok(rsp))) => Ok(rsp),
            Ok(Ok(Err(code))) => Err(Attempt::Failed(RequestError::Exception(code))),
            Err(_) => {
                if let Some(why) = conn.link.lost() {
                    return Err(Attempt::Failed(self.lose(why)));
                }
                self.recover(timeout).await;
                Err(Attempt::Failed(RequestError::Timeout(timeout)))
            }
            Ok(Err(e)) => {
                if let Some(why) = conn.link.lost() {
                    return Err(Attempt::Failed(self.lose(why)));
                }
                self.recover(timeout).await;
                let why = e.to_string();
                match e {
                    tokio_modbus::Error::Protocol(
                        ProtocolError::HeaderMismatch { .. }
                        | ProtocolError::FunctionCodeMismatch { .. },
                    ) => Err(Attempt::Stray(why)),
                    _ => Err(Attempt::Failed(RequestError::Protocol(why))),
                }
            }
        }
    }

    /// After a timeout or a garbled answer the client's framing state is
    /// unknown. On a serial bus: let a late answer arrive and drop it (the
    /// line must stay quiet for a quarter of the timeout, 20-100 ms), then
    /// start a fresh client on the same port. On TCP: reconnect, which
    /// also drops any late answer.
    async fn recover(&mut self, timeout: Duration) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        match &self.endpoint {
            Endpoint::Serial { frame_gap, .. } => {
                let quiet = (timeout / 4)
                    .clamp(Duration::from_millis(20), Duration::from_millis(100))
                    .max(*frame_gap * 2);
                let dropped = conn.link.drain(quiet, Duration::from_millis(500)).await;
                if dropped > 0 {
                    tracing::debug!(endpoint = %self.endpoint, bytes = dropped, "dropped late bytes");
                }
                if let Some(why) = conn.link.lost() {
                    tracing::debug!(endpoint = %self.endpoint, %why, "lost while draining");
                    self.lose(why);
                    return;
                }
                conn.ctx = rtu::attach_slave(conn.link.clone(), Slave(1));
                self.last_io = Some(Instant::now());
            }
            Endpoint::Tcp { .. } => self.close(),
        }
    }

    /// Reads one planned block.
    pub async fn read(
        &mut self,
        slave: u8,
        block: &Block,
        timeout: Duration,
    ) -> Result<BlockData, RequestError> {
        let (start, count) = (block.start, block.count);
        let request = match block.table {
            Table::Coil => Request::ReadCoils(start, count),
            Table::Discrete => Request::ReadDiscreteInputs(start, count),
            Table::Input => Request::ReadInputRegisters(start, count),
            Table::Holding => Request::ReadHoldingRegisters(start, count),
        };
        let short =
            |got: usize| RequestError::Protocol(format!("asked for {count} values, got {got}"));
        match self.call(slave, request, timeout).await? {
            Response::ReadCoils(mut bits) | Response::ReadDiscreteInputs(mut bits) => {
                if bits.len() < usize::from(count) {
                    return Err(short(bits.len()));
                }
                bits.truncate(count.into());
                Ok(BlockData::Bits(bits))
            }
            Response::ReadInputRegisters(words) | Response::ReadHoldingRegisters(words) => {
                if words.len() != usize::from(count) {
                    return Err(short(words.len()));
                }
                Ok(BlockData::Words(words))
            }
            other => Err(RequestError::Protocol(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }
}
