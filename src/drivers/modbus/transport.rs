//! The byte pipe under the Modbus client: a serial port or a TCP stream,
//! wrapped so the driver can see what tokio-modbus hides.
//!
//! tokio-modbus owns its transport inside a `Context`, turns EOF into a
//! generic `BrokenPipe`, and keeps a decode error as a poisoned stream
//! state. [`Link`] is a shared handle on the transport: the client gets one
//! clone, the session keeps another to ask whether the port was lost (EOF
//! or an I/O error, which is how an unplugged USB adapter shows up), to
//! drain late bytes after a timeout, and to count bytes on the wire.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::config::{LineSettings, Parity};

/// A stream the Modbus client can run over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// Drops bytes received but not read yet; a no-op where a stale byte
    /// cannot be mistaken for an answer.
    fn discard_input(&mut self) {}
}

impl Io for tokio_serial::SerialStream {
    /// tcflush(TCIFLUSH): noise or a late answer sitting in the kernel's
    /// buffer must not be parsed as the answer to the next request.
    fn discard_input(&mut self) {
        use tokio_serial::SerialPort as _;
        if let Err(e) = self.clear(tokio_serial::ClearBuffer::Input) {
            tracing::debug!(error = %e, "could not clear the serial input buffer");
        }
    }
}

impl Io for tokio::net::TcpStream {}
impl Io for tokio::io::DuplexStream {}

struct LinkState {
    io: Box<dyn Io>,
    /// Why the transport is gone, once it is.
    lost: Option<String>,
    /// Serial ports: `flush` is tcdrain(2), a blocking syscall inside async
    /// code; written bytes are in the kernel's buffer already, so skip it.
    flush: bool,
    rx: u64,
    tx: u64,
}

/// Shared handle on one open transport.
#[derive(Clone)]
pub struct Link {
    state: Arc<Mutex<LinkState>>,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("Link")
            .field("lost", &st.lost)
            .field("rx", &st.rx)
            .field("tx", &st.tx)
            .finish()
    }
}

impl Link {
    /// `flush`: whether flushing reaches the inner stream. Pass false for
    /// serial ports: their flush is tcdrain(2), a blocking syscall inside
    /// async code, and written bytes are in the kernel's buffer already.
    pub fn new(io: impl Io, flush: bool) -> Link {
        Link {
            state: Arc::new(Mutex::new(LinkState {
                io: Box::new(io),
                lost: None,
                flush,
                rx: 0,
                tx: 0,
            })),
        }
    }

    /// The lock is only held inside one poll call, never across an await,
    /// and a panic while holding it leaves plain counters behind.
    fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Why the transport is gone (EOF or an I/O error), if it is.
    pub fn lost(&self) -> Option<String> {
        self.lock().lost.clone()
    }

    /// See [`Io::discard_input`].
    pub fn discard_input(&self) {
        self.lock().io.discard_input();
    }

    /// Bytes received and sent so far.
    pub fn counters(&self) -> (u64, u64) {
        let st = self.lock();
        (st.rx, st.tx)
    }

    /// Reads and discards whatever arrives until the line has been quiet
    /// for `quiet`, for at most `max`. Returns the bytes dropped. Used after
    /// a timeout on RTU: a late answer must not be taken for the answer to
    /// the next request.
    pub async fn drain(&self, quiet: Duration, max: Duration) -> usize {
        let deadline = Instant::now() + max;
        let mut buf = [0u8; 256];
        let mut dropped = 0;
        let mut reader = self.clone();
        loop {
            let wait = quiet.min(deadline.saturating_duration_since(Instant::now()));
            if wait.is_zero() {
                return dropped;
            }
            match tokio::time::timeout(wait, reader.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return dropped,
                Ok(Ok(n)) => dropped += n,
            }
        }
    }

    fn note_error(st: &mut LinkState, e: &io::Error) {
        if st.lost.is_none() {
            st.lost = Some(e.to_string());
        }
    }
}

impl AsyncRead for Link {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut st = self.lock();
        let before = buf.filled().len();
        let asked = buf.remaining() > 0;
        let res = Pin::new(&mut st.io).poll_read(cx, buf);
        match &res {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                st.rx += n as u64;
                // A hung-up tty reads 0 bytes forever: the port is gone.
                if n == 0 && asked && st.lost.is_none() {
                    st.lost = Some("end of file (device unplugged or connection closed)".into());
                }
            }
            Poll::Ready(Err(e)) => Link::note_error(&mut st, e),
            Poll::Pending => {}
        }
        res
    }
}

impl AsyncWrite for Link {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut st = self.lock();
        let res = Pin::new(&mut st.io).poll_write(cx, buf);
        match &res {
            Poll::Ready(Ok(n)) => st.tx += *n as u64,
            Poll::Ready(Err(e)) => Link::note_error(&mut st, e),
            Poll::Pending => {}
        }
        res
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.lock();
        if !st.flush {
            return Poll::Ready(Ok(()));
        }
        let res = Pin::new(&mut st.io).poll_flush(cx);
        if let Poll::Ready(Err(e)) = &res {
            Link::note_error(&mut st, e);
        }
        res
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.lock();
        Pin::new(&mut st.io).poll_shutdown(cx)
    }
}

/// Opens a serial port (exclusively) with the given settings.
pub fn open_serial(path: &str, s: &LineSettings) -> io::Result<tokio_serial::SerialStream> {
    use tokio_serial::SerialPortBuilderExt as _;
    let data_bits = match s.data_bits {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    };
    let parity = match s.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    };
    let stop_bits = match s.stop_bits {
        2 => tokio_serial::StopBits::Two,
        _ => tokio_serial::StopBits::One,
    };
    tokio_serial::new(path, s.baud)
        .data_bits(data_bits)
        .parity(parity)
        .stop_bits(stop_bits)
        .flow_control(tokio_serial::FlowControl::None)
        .open_native_async()
        .map_err(|e| {
            // A missing path is `Io(NotFound)`; a port locked by another
            // program is `NoDevice` ("Unable to acquire exclusive lock").
            let kind = match e.kind() {
                tokio_serial::ErrorKind::Io(k) => k,
                _ => io::ErrorKind::Other,
            };
            io::Error::new(kind, e.description)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    #[tokio::test]
    async fn counts_bytes_and_sees_eof_as_lost() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut link = Link::new(a, true);
        link.write_all(b"abc").await.unwrap();
        b.write_all(b"xy").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(link.read(&mut buf).await.unwrap(), 2);
        assert_eq!(link.counters(), (2, 3));
        assert!(link.lost().is_none());
        drop(b);
        assert_eq!(link.read(&mut buf).await.unwrap(), 0);
        assert!(link.lost().unwrap().contains("end of file"));
    }

    #[tokio::test]
    async fn drain_drops_late_bytes_until_quiet() {
        let (a, mut b) = tokio::io::duplex(64);
        let link = Link::new(a, true);
        b.write_all(&[1, 2, 3]).await.unwrap();
        let dropped = link
            .drain(Duration::from_millis(20), Duration::from_secs(1))
            .await;
        assert_eq!(dropped, 3);
        // Nothing pending: returns after the quiet time with nothing.
        let dropped = link
            .drain(Duration::from_millis(5), Duration::from_secs(1))
            .await;
        assert_eq!(dropped, 0);
    }

    #[tokio::test]
    async fn missing_port_is_not_found() {
        let e = open_serial(
            "/dev/does-not-exist-edgebridge",
            &LineSettings {
                baud: 9600,
                parity: Parity::None,
                data_bits: 8,
                stop_bits: 1,
            },
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }
}
