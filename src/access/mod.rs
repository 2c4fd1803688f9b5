//! Access control for the embedded broker: who may log in ([`Users`]:
//! `broker.users`, `broker.password_file`) and what they may publish and
//! subscribe to ([`Acl`]: `broker.acl`, `broker.acl_file`). Pure logic,
//! no sockets: the broker's hooks call [`AccessControl`], SIGHUP calls
//! [`AccessControl::reload`].
//!
//! - `users.rs`: stored passwords (argon2, Mosquitto `$6$`/`$7$`) and the
//!   login check;
//! - `pool.rs`: the threads and the fair, bounded queue those checks run
//!   on (why not tokio's blocking pool is there);
//! - `acl.rs`: Mosquitto's acl_file semantics, and where we differ.
//!
//! How the broker uses it:
//! - CONNECT: if [`AccessControl::requires_login`],
//!   [`AccessControl::authenticate`] → accept, refuse (bad username or
//!   password) or busy (server unavailable);
//! - SUBSCRIBE, per filter: [`AccessControl::check`] with
//!   [`Access::Subscribe`] → SUBACK failure (0x80 / 0x87) when `false`;
//! - PUBLISH from a client: [`Access::Write`] → drop it (MQTT 3.1.1) or
//!   PUBACK 0x87 (MQTT 5) when `false`;
//! - each delivery (and retained message) to a client: [`Access::Read`] →
//!   skip that client when `false`.
//!
//! The gateway's own in-process clients (bus, bridges) are not checked.

mod acl;
mod pool;
mod users;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

pub use acl::{Access, Acl, AclError};
pub use pool::{Busy, CheckPool, Limits, MAX_WAITING, MAX_WAITING_PER_PEER, WORKERS};
pub use users::{
    hash_password, Login, Users, UsersError, ARGON2_MEMORY_KIB, ARGON2_PASSES, CONCURRENT_CHECKS,
};

use crate::config::Config;

/// A bad line of an ACL or password file, as `file:line: what`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}:{line}: {message}")]
pub struct LineError {
    pub path: PathBuf,
    /// 1-based.
    pub line: usize,
    pub message: String,
}

impl LineError {
    fn new(path: &Path, line: usize, message: String) -> LineError {
        LineError {
            path: path.to_path_buf(),
            line,
            message,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    #[error(transparent)]
    Users(#[from] UsersError),
    #[error(transparent)]
    Acl(#[from] AclError),
}

/// The users and the ACL in force at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub users: Users,
    pub acl: Acl,
}

impl Snapshot {
    /// Reads `broker.users`, `broker.password_file`, `broker.acl` and
    /// `broker.acl_file` (the files relative to the config file).
    pub fn load(config: &Config) -> Result<Snapshot, AccessError> {
        let b = &config.broker;
        let password_file = b.password_file.as_deref().map(|p| config.resolve(p));
        let acl_file = b.acl_file.as_deref().map(|p| config.resolve(p));
        Ok(Snapshot {
            users: Users::load(&b.users, password_file.as_deref())?,
            acl: Acl::from_config(&b.acl, acl_file.as_deref())?,
        })
    }
}

/// The current users and ACL, swapped whole on reload: a check sees
/// either the old or the new pair, never a mix. Clone it into every hook;
/// clones share the same current pair.
///
/// A `std` `RwLock` around an `Arc`: readers hold the lock only to clone
/// the `Arc` (never across an `.await` or a password check), so it is
/// never contended for long and no async lock is needed.
#[derive(Debug, Clone)]
pub struct AccessControl {
    current: Arc<RwLock<Arc<Snapshot>>>,
}

impl AccessControl {
    pub fn new(snapshot: Snapshot) -> AccessControl {
        AccessControl {
            current: Arc::new(RwLock::new(Arc::new(snapshot))),
        }
    }

    /// [`Snapshot::load`] as the initial pair.
    pub fn from_config(config: &Config) -> Result<AccessControl, AccessError> {
        Ok(AccessControl::new(Snapshot::load(config)?))
    }

    /// SIGHUP: reads the users and the ACL again and swaps them in. On an
    /// error the running pair stays and the error says where (file:line).
    /// Connected clients keep their session; their next SUBSCRIBE,
    /// PUBLISH and delivery are checked against the new ACL.
    pub fn reload(&self, config: &Config) -> Result<(), AccessError> {
        let new = Arc::new(Snapshot::load(config)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = new;
        Ok(())
    }

    /// The pair in force now.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether CONNECT needs a valid username and password (there are
    /// users). Without users only loopback listeners are allowed
    /// (validation), and anyone who can connect is in.
    pub fn requires_login(&self) -> bool {
        !self.current().users.is_empty()
    }

    /// Checks a CONNECT's credentials; `peer` is the client's address (for
    /// the fair queue, see `pool.rs`). A missing username or password is
    /// refused without a check.
    pub async fn authenticate(
        &self,
        peer: Option<IpAddr>,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Login {
        let (Some(user), Some(password)) = (username, password) else {
            return Login::Refused;
        };
        let users = self.current().users.clone();
        users.authenticate(peer, user, password).await
    }

    /// [`Acl::check`] with the current ACL.
    pub fn check(
        &self,
        username: Option<&str>,
        client_id: &str,
        topic: &str,
        access: Access,
    ) -> bool {
        self.current().acl.check(username, client_id, topic, access)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(dir: &Path, broker: &str) -> Config {
        let path = dir.join("config.yaml");
        let text = format!("gateway: {{ id: gw }}\nbroker:\n{broker}");
        std::fs::write(&path, &text).unwrap();
        Config::load(&path).unwrap()
    }

    #[tokio::test]
    async fn reload_swaps_users_and_acl_and_keeps_them_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mosquitto.passwd");
        std::fs::copy(&fixture, dir.path().join("passwd")).unwrap();
        std::fs::write(dir.path().join("acl"), "user evse\ntopic read PV/#\n").unwrap();
        let c1 = config(
            dir.path(),
            "  password_file: passwd\n  acl_file: acl\n  listeners: [{ bind: '127.0.0.1:0', protocol: mqtt }]\n",
        );
        let access = AccessControl::from_config(&c1).unwrap();
        assert!(access.requires_login());
        let hook = access.clone();
        assert_eq!(
            hook.authenticate(None, Some("evse"), Some(b"evse-pw"))
                .await,
            Login::Accepted
        );
        assert_eq!(
            hook.authenticate(None, Some("evse"), None).await,
            Login::Refused
        );
        assert!(hook.check(Some("evse"), "c", "PV/x", Access::Read));
        assert!(!hook.check(Some("evse"), "c", "cmd/x", Access::Write));

        // The ACL file changes; SIGHUP.
        std::fs::write(dir.path().join("acl"), "user evse\ntopic write cmd/#\n").unwrap();
        access.reload(&c1).unwrap();
        assert!(!hook.check(Some("evse"), "c", "PV/x", Access::Read));
        assert!(hook.check(Some("evse"), "c", "cmd/x", Access::Write));

        // A bad file: the error names the line, the running ACL stays.
        std::fs::write(dir.path().join("acl"), "user evse\ntopic nope cmd/#\n").unwrap();
        let e = access.reload(&c1).unwrap_err().to_string();
        assert!(
            e.ends_with("acl:2: unknown access `nope`: expected read, write, readwrite or deny"),
            "{e}"
        );
        assert!(hook.check(Some("evse"), "c", "cmd/x", Access::Write));
    }

    #[test]
    fn without_acl_everything_is_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(
            dir.path(),
            "  listeners: [{ bind: '127.0.0.1:0', protocol: mqtt }]\n",
        );
        let access = AccessControl::from_config(&c).unwrap();
        assert!(!access.requires_login());
        assert!(!access.current().acl.is_restrictive());
        assert!(access.check(None, "c", "#", Access::Subscribe));
    }
}
