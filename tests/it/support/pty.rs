//! A serial device that sends text: a pseudo-terminal pair whose device
//! end the gateway opens by a stable path (a symlink, like udev's
//! `by-id` links), and whose other end the test writes to.

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt as _;
use tokio_serial::{SerialPort as _, SerialStream};

pub struct LinePort {
    path: PathBuf,
    /// (the test's end, the device end kept open so writes never hit EIO
    /// while the gateway reopens).
    ends: Option<(SerialStream, SerialStream)>,
}

impl LinePort {
    pub fn start(path: &Path) -> LinePort {
        let mut p = LinePort {
            path: path.to_path_buf(),
            ends: None,
        };
        p.plug();
        p
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes as the device sends them.
    pub async fn send(&mut self, bytes: &[u8]) {
        if let Some((ours, _)) = self.ends.as_mut() {
            ours.write_all(bytes).await.expect("pty write");
        }
    }

    /// The adapter is pulled: the gateway's end hangs up.
    pub fn unplug(&mut self) {
        self.ends = None;
        let _ = std::fs::remove_file(&self.path);
    }

    /// A new adapter behind the same path.
    pub fn plug(&mut self) {
        self.unplug();
        let (ours, device) = SerialStream::pair().expect("pty pair");
        let device_path = device.name().expect("pty name");
        let tmp = self.path.with_extension("new");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(device_path, &tmp).expect("symlink");
        std::fs::rename(&tmp, &self.path).expect("rename symlink");
        self.ends = Some((ours, device));
    }
}

impl Drop for LinePort {
    fn drop(&mut self) {
        self.unplug();
    }
}
