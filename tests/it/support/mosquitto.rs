//! A private Mosquitto for interop tests: its own config, data and log in a
//! temp dir, on a free port, killed on Drop even when the test fails.
//!
//! ```ignore
//! let mut m = Mosquitto::start(Security::Plain);
//! let url = m.url();            // mqtt://127.0.0.1:<port>
//! m.stop();                     // SIGTERM; saves persistent sessions
//! m.restart();                  // same port, same config, same sessions
//! ```
//! With [`Security::Tls`] / [`Security::MutualTls`] the listener uses
//! certificates generated for the test with the `openssl` CLI; find them in
//! [`Mosquitto::certs`].

#![allow(dead_code)] // each test uses a different part of it

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// How the listener is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    Plain,
    /// Server certificate signed by a test CA.
    Tls,
    /// Also requires a client certificate signed by the test CA.
    MutualTls,
}

/// Certificates generated for one test (PEM files in the temp dir).
#[derive(Debug, Clone)]
pub struct Certs {
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// A CA that signed nothing here: trusting it must fail the handshake.
    pub wrong_ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// A running (or stopped) private Mosquitto.
pub struct Mosquitto {
    dir: TempDir,
    port: u16,
    security: Security,
    certs: Option<Certs>,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts Mosquitto on a free port and waits until it accepts
    /// connections. Sessions persist across [`Mosquitto::stop`] and
    /// [`Mosquitto::restart`].
    pub fn start(security: Security) -> Mosquitto {
        let dir = tempfile::tempdir().expect("temp dir");
        let certs = (security != Security::Plain).then(|| generate_certs(dir.path()));
        let port = super::free_port();
        let mut m = Mosquitto {
            dir,
            port,
            security,
            certs,
            child: None,
        };
        m.write_config();
        m.restart();
        m
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:<port>`, or `mqtts://localhost:<port>` with TLS
    /// (the server certificate is for `localhost` and 127.0.0.1).
    pub fn url(&self) -> String {
        match self.security {
            Security::Plain => format!("mqtt://127.0.0.1:{}", self.port),
            _ => format!("mqtts://localhost:{}", self.port),
        }
    }

    pub fn certs(&self) -> Option<&Certs> {
        self.certs.as_ref()
    }

    /// Mosquitto's own log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    fn write_config(&self) {
        let d = self.dir.path();
        let mut conf = format!(
            "per_listener_settings false\nallow_anonymous true\n\
             persistence true\npersistence_location {}/\nautosave_interval 0\n\
             max_queued_messages 0\nmax_inflight_messages 100\nmessage_size_limit 0\n\
             log_dest file {}\nlog_type error\nlog_type warning\nlog_type notice\n\
             user root\nlistener {} 127.0.0.1\n",
            d.display(),
            d.join("mosquitto.log").display(),
            self.port
        );
        if let Some(c) = &self.certs {
            conf += &format!(
                "cafile {}\ncertfile {}\nkeyfile {}\n",
                c.ca.display(),
                c.server_cert.display(),
                c.server_key.display()
            );
            if self.security == Security::MutualTls {
                conf += "require_certificate true\n";
            }
        }
        std::fs::write(d.join("mosquitto.conf"), conf).expect("write mosquitto.conf");
    }

    /// Starts it again on the same port (after [`Mosquitto::stop`] or
    /// [`Mosquitto::kill`]) and waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "mosquitto is already running");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let child = Command::new(MOSQUITTO)
                .arg("-c")
                .arg(self.dir.path().join("mosquitto.conf"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("cannot start /usr/sbin/mosquitto");
            self.child = Some(child);
            if self.wait_ready(deadline) {
                return;
            }
            // It exited (e.g. the port was still in TIME_WAIT): try again.
            self.kill();
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start on port {}:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// True once the port accepts; false if the process exited first.
    fn wait_ready(&mut self, deadline: Instant) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    return false;
                }
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Graceful stop (SIGTERM): Mosquitto saves its sessions and queued
    /// messages, so [`Mosquitto::restart`] brings them back.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Hard stop (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("cannot run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a second unrelated CA, a server certificate for localhost and
/// 127.0.0.1, and a client certificate; P-256 keys (fast to make).
fn generate_certs(dir: &Path) -> Certs {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for (name, cn) in [("ca", "edgebridge test CA"), ("wrong-ca", "some other CA")] {
        let key = format!("{name}.key");
        let pem = format!("{name}.pem");
        let subj = format!("/CN={cn}");
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend([
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(dir, &args);
    }
    let mut ext = std::fs::File::create(dir.join("server.ext")).expect("server.ext");
    writeln!(
        ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE"
    )
    .expect("write server.ext");
    let mut ext = std::fs::File::create(dir.join("client.ext")).expect("client.ext");
    writeln!(
        ext,
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE"
    )
    .expect("client.ext");
    for (name, cn) in [("server", "localhost"), ("client", "edgebridge-gw")] {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let pem = format!("{name}.pem");
        let extfile = format!("{name}.ext");
        let subj = format!("/CN={cn}");
        let mut args = vec!["req"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &args);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ],
        );
    }
    Certs {
        ca: dir.join("ca.pem"),
        wrong_ca: dir.join("wrong-ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    }
}
