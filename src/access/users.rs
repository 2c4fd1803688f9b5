//! Broker users: who may log in. Passwords are stored as argon2 PHC
//! strings (`broker.users`, written by `edgebridge passwd`) or as
//! Mosquitto hashes (`broker.password_file`, written by `mosquitto_passwd`):
//! - `$7$<iterations>$<base64 salt>$<base64 hash>`: PBKDF2-HMAC-SHA512,
//!   64-byte key (Mosquitto 2.0's default, 101 iterations);
//! - `$6$<base64 salt>$<base64 hash>`: SHA-512 of password ‖ salt
//!   (Mosquitto 1.x);
//! - an argon2 PHC string (`$argon2id$…`), which newer Mosquitto writes too.
//!
//! Checks run on the small pool in [`super::pool`], never on the async
//! threads nor on tokio's blocking pool (see there why).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

use super::pool::{self, CheckPool};
use super::LineError;
use crate::config::UserConfig;

/// The argon2id cost `edgebridge passwd` writes: 8 MiB, 3 passes, one
/// lane. A gateway has a few cores and little RAM and answers logins from a
/// LAN: this takes ~8 ms per check on the 2-vCPU test machine, against
/// ~16 ms and 19 MiB for the argon2 crate's default (m=19 MiB t=2, OWASP's
/// first choice); see BENCHMARKS.md, "Logins". It is in OWASP's list's
/// range of cost per guess within a factor of two, and far above
/// Mosquitto's PBKDF2 with 101 iterations. Existing hashes keep their own
/// cost: the PHC string carries it.
pub const ARGON2_MEMORY_KIB: u32 = 8 * 1024;
/// Passes over the memory; see [`ARGON2_MEMORY_KIB`].
pub const ARGON2_PASSES: u32 = 3;

/// The hasher for new passwords, at the cost chosen above.
fn hasher() -> Argon2<'static> {
    match Params::new(ARGON2_MEMORY_KIB, ARGON2_PASSES, 1, None) {
        Ok(params) => Argon2::new(Algorithm::Argon2id, Version::V0x13, params),
        // The constants are within argon2's limits; fall back to its
        // (costlier) default rather than fail a hash.
        Err(_) => Argon2::default(),
    }
}

/// Creates an argon2id PHC string for `password` (what `edgebridge passwd`
/// prints).
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(hasher()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsersError {
    #[error("cannot read password file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(transparent)]
    Line(#[from] LineError),
    #[error(
        "broker.users[{index}]: not an argon2 hash; create one with `edgebridge passwd <user>`"
    )]
    Config { index: usize },
    #[error("user `{user}` is defined twice (broker.users and {path}:{line})")]
    Duplicate {
        user: String,
        path: PathBuf,
        line: usize,
    },
}

/// One stored password. No `Debug`: it is a secret.
#[derive(Clone)]
enum Stored {
    /// An argon2 PHC string, parsed again for each check (cheap next to
    /// the hash itself).
    Argon2(String),
    /// Mosquitto `$6$`.
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
    /// Mosquitto `$7$`.
    Pbkdf2Sha512 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

impl Stored {
    fn parse(s: &str) -> Result<Stored, String> {
        if s.starts_with("$argon2") {
            PasswordHash::new(s).map_err(|e| format!("not an argon2 hash: {e}"))?;
            return Ok(Stored::Argon2(s.to_string()));
        }
        let b64 = |part: &str, what: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(part)
                .map_err(|e| format!("the {what} is not base64: {e}"))
        };
        let parts: Vec<&str> = s.split('$').collect();
        match parts.as_slice() {
            ["", "6", salt, hash] => Ok(Stored::Sha512 {
                salt: b64(salt, "salt")?,
                hash: nonempty(b64(hash, "hash")?)?,
            }),
            ["", "7", iterations, salt, hash] => {
                let iterations: u32 = iterations
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("bad iteration count `{iterations}`"))?;
                Ok(Stored::Pbkdf2Sha512 {
                    iterations,
                    salt: b64(salt, "salt")?,
                    hash: nonempty(b64(hash, "hash")?)?,
                })
            }
            _ => Err(
                "not a password hash: expected $7$…, $6$… (mosquitto_passwd) or $argon2id$…".into(),
            ),
        }
    }

    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Stored::Argon2(phc) => verify_argon2(phc, password),
            Stored::Sha512 { salt, hash } => {
                let mut d = Sha512::new();
                d.update(password);
                d.update(salt);
                bool::from(d.finalize().as_slice().ct_eq(hash))
            }
            Stored::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => {
                let mut out = vec![0u8; hash.len()];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                bool::from(out.as_slice().ct_eq(hash))
            }
        }
    }
}

/// Largest argon2 memory a check may keep between checks; a stored hash
/// with a larger cost is checked with a buffer of its own.
const MAX_KEPT_KIB: u32 = 64 * 1024;

thread_local! {
    /// This thread's argon2 working memory, kept between checks. A check
    /// on a fresh buffer pays a page fault for each of its 4 KiB pages
    /// (measured: ~14 ms instead of ~7.5 ms per check at 8 MiB on the
    /// test VM); the pool's two threads keep one buffer each instead, so
    /// memory is bounded (2 × the largest cost) and does not grow per
    /// login.
    static ARGON2_MEMORY: std::cell::RefCell<Vec<argon2::Block>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Verifies an argon2 PHC string (its own algorithm, version and cost) in
/// constant time, in this thread's kept memory, which is wiped after.
fn verify_argon2(phc: &str, password: &[u8]) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    let Ok(params) = Params::try_from(&hash) else {
        return false;
    };
    if params.m_cost() > MAX_KEPT_KIB {
        return Argon2::default().verify_password(password, &hash).is_ok();
    }
    let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(hash.algorithm) else {
        return false;
    };
    let version = match hash.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let blocks = params.block_count();
    let argon2 = Argon2::new(algorithm, version, params);
    let mut out = vec![0u8; expected.len()];
    ARGON2_MEMORY.with_borrow_mut(|memory| {
        if memory.len() < blocks {
            memory.resize(blocks, argon2::Block::default());
        }
        let used = &mut memory[..blocks];
        let done = argon2.hash_password_into_with_memory(password, salt, &mut out, &mut *used);
        // Password-derived data must not outlive the check.
        used.fill(argon2::Block::default());
        done.is_ok() && bool::from(out.as_slice().ct_eq(expected.as_bytes()))
    })
}

fn nonempty(v: Vec<u8>) -> Result<Vec<u8>, String> {
    if v.is_empty() {
        Err("the hash is empty".into())
    } else {
        Ok(v)
    }
}

/// The answer to a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Login {
    Accepted,
    /// Unknown user or wrong password (the two are not told apart).
    Refused,
    /// Too many checks are waiting: answer "server busy" (MQTT 5 0x89,
    /// MQTT 3.1.1 0x03 "server unavailable") and let the client retry,
    /// instead of making every login wait behind a flood.
    Busy,
}

/// Username -> stored password. Cheap to clone (`Arc`s); immutable, so a
/// reload builds a new one (see [`super::AccessControl`]).
#[derive(Clone)]
pub struct Users {
    stored: Arc<HashMap<String, Stored>>,
    pool: Arc<CheckPool>,
}

/// Password checks running at once; more wait their turn (see
/// [`super::pool`]).
pub const CONCURRENT_CHECKS: usize = pool::WORKERS;

impl Default for Users {
    fn default() -> Users {
        Users::new(&[])
    }
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("count", &self.stored.len())
            .finish()
    }
}

impl Users {
    /// The `broker.users` entries; one that is not an argon2 hash cannot
    /// log in (validation has already refused such a config).
    pub fn new(users: &[UserConfig]) -> Users {
        let stored = users
            .iter()
            .filter_map(|u| {
                Stored::parse(u.password_hash.expose())
                    .ok()
                    .map(|s| (u.username.clone(), s))
            })
            .collect();
        Users {
            stored: Arc::new(stored),
            pool: pool::shared(),
        }
    }

    /// `broker.users` and the lines of `password_file` (resolved by the
    /// caller). A bad line is an error naming `file:line`: a user silently
    /// dropped (what Mosquitto does) is a surprise at the worst moment.
    pub fn load(users: &[UserConfig], password_file: Option<&Path>) -> Result<Users, UsersError> {
        let mut stored = HashMap::new();
        for (index, u) in users.iter().enumerate() {
            let s = Stored::parse(u.password_hash.expose())
                .ok()
                .filter(|s| matches!(s, Stored::Argon2(_)))
                .ok_or(UsersError::Config { index })?;
            stored.insert(u.username.clone(), s);
        }
        if let Some(path) = password_file {
            let text = std::fs::read_to_string(path).map_err(|e| UsersError::Read {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            for (user, s, line) in parse_password_file(path, &text)? {
                if stored.contains_key(&user) {
                    return Err(UsersError::Duplicate {
                        user,
                        path: path.to_path_buf(),
                        line,
                    });
                }
                stored.insert(user, s);
            }
        }
        Ok(Users {
            stored: Arc::new(stored),
            pool: pool::shared(),
        })
    }

    /// The same users, checked on another pool (tests and benchmarks).
    pub fn with_pool(mut self, pool: Arc<CheckPool>) -> Users {
        self.pool = pool;
        self
    }

    pub fn is_empty(&self) -> bool {
        self.stored.is_empty()
    }

    pub fn len(&self) -> usize {
        self.stored.len()
    }

    /// Checks a login on the check pool. `peer` (the client's address)
    /// shares the pool fairly: one host flooding wrong passwords waits
    /// behind itself, not in front of everyone (see [`super::pool`]).
    pub async fn authenticate(
        &self,
        peer: Option<IpAddr>,
        username: &str,
        password: &[u8],
    ) -> Login {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let users = self.clone();
        let (username, password) = (username.to_string(), password.to_vec());
        let job = Box::new(move || {
            let _ = tx.send(users.verify(&username, &password));
        });
        if self.pool.submit(peer, job).is_err() {
            return Login::Busy;
        }
        match rx.await {
            Ok(true) => {
                if let Some(p) = peer {
                    self.pool.remember(p);
                }
                Login::Accepted
            }
            Ok(false) => Login::Refused,
            // The pool was shut down with the job unrun.
            Err(_) => Login::Busy,
        }
    }

    /// [`Users::authenticate`] as yes or no: busy is no.
    #[cfg(test)]
    async fn check(&self, username: String, password: String) -> bool {
        self.authenticate(None, &username, password.as_bytes())
            .await
            == Login::Accepted
    }

    /// Checks a login on this thread (blocking: tens of ms). Unknown users
    /// still cost one check against a stored hash, so that timing does not
    /// tell which usernames exist.
    pub fn verify(&self, username: &str, password: &[u8]) -> bool {
        match self.stored.get(username) {
            Some(s) => s.verify(password),
            None => {
                if let Some(any) = self.stored.values().next() {
                    let _ = any.verify(password);
                }
                false
            }
        }
    }
}

/// `user:hash` lines as `mosquitto_passwd` writes them; `#` comments and
/// blank lines are skipped. Returns (user, hash, line number).
fn parse_password_file(
    path: &Path,
    text: &str,
) -> Result<Vec<(String, Stored, usize)>, UsersError> {
    let mut out: Vec<(String, Stored, usize)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_end_matches(['\r', ' ', '\t']);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |message: String| UsersError::Line(LineError::new(path, i + 1, message));
        let Some((user, hash)) = line.split_once(':') else {
            return Err(err("expected `username:hash`".into()));
        };
        if user.is_empty() {
            return Err(err("empty username".into()));
        }
        if out.iter().any(|(u, _, _)| u == user) {
            return Err(err(format!("user `{user}` appears twice")));
        }
        let stored = Stored::parse(hash).map_err(|m| err(format!("user `{user}`: {m}")))?;
        out.push((user.to_string(), stored, i + 1));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mosquitto.passwd")
    }

    #[test]
    fn hash_then_verify() {
        let hash = hash_password("pw1").unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=8192,t=3,p=1$"), "{hash}");
        let users = Users::new(&[UserConfig {
            username: "evse".into(),
            password_hash: Secret::new(hash),
        }]);
        assert!(users.verify("evse", b"pw1"));
        assert!(!users.verify("evse", b"pw2"));
        assert!(!users.verify("other", b"pw1"));
        assert_eq!(format!("{users:?}"), "Users { count: 1 }");
    }

    /// Hashes of other costs and variants (older `edgebridge passwd`:
    /// argon2's default 19 MiB) verify in the kept memory too.
    #[test]
    fn argon2_hashes_of_any_cost_and_variant_verify() {
        for (alg, m) in [
            (Algorithm::Argon2id, 19456),
            (Algorithm::Argon2i, 4096),
            (Algorithm::Argon2d, 8),
        ] {
            let a = Argon2::new(alg, Version::V0x13, Params::new(m, 2, 1, None).unwrap());
            let phc = a
                .hash_password(b"pw", &SaltString::generate(&mut OsRng))
                .unwrap()
                .to_string();
            assert!(verify_argon2(&phc, b"pw"), "{phc}");
            assert!(!verify_argon2(&phc, b"pW"), "{phc}");
        }
        assert!(!verify_argon2(
            "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ",
            b"pw"
        ));
    }

    /// `tests/fixtures/mosquitto.passwd`: `evse` and `scada` were written
    /// by the real mosquitto_passwd 2.0.11 (`$7$`, PBKDF2-SHA512); `legacy`
    /// is a `$6$` line (Mosquitto 1.x's format, which 2.0 no longer
    /// writes) made with Python's hashlib. Passwords are `<user>-pw`.
    #[test]
    fn the_committed_mosquitto_file_verifies() {
        let users = Users::load(&[], Some(&fixture())).unwrap();
        assert!(users.len() >= 3);
        for user in ["evse", "scada", "legacy"] {
            assert!(
                users.verify(user, format!("{user}-pw").as_bytes()),
                "{user}"
            );
            assert!(!users.verify(user, b"wrong"), "{user}");
        }
        assert!(!users.verify("nobody", b"evse-pw"));
    }

    /// With the real mosquitto_passwd installed, a file made now verifies
    /// too (the committed fixture covers machines without it).
    #[test]
    fn a_file_from_mosquitto_passwd_now_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let made = std::process::Command::new("mosquitto_passwd")
            .args(["-c", "-b"])
            .arg(&path)
            .args(["charger", "s3cret:with$signs"])
            .status();
        match made {
            Ok(s) if s.success() => {}
            _ => {
                println!("SKIPPED: mosquitto_passwd is not installed (apt-get install mosquitto); the committed fixture is tested instead");
                return;
            }
        }
        let users = Users::load(&[], Some(&path)).unwrap();
        assert!(users.verify("charger", b"s3cret:with$signs"));
        assert!(!users.verify("charger", b"s3cret"));
    }

    #[test]
    fn bad_password_file_lines_are_named() {
        let err = |text: &str| match parse_password_file(Path::new("/etc/mosquitto/passwd"), text) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted: {text}"),
        };
        assert!(err("# c\n\nevse\n").starts_with("/etc/mosquitto/passwd:3: expected"));
        assert!(err("evse:plain\n").contains(":1: user `evse`: not a password hash"));
        assert!(err("a:$7$0$AAAA$AAAA\n").contains("bad iteration count"));
        assert!(err("a:$6$!!$AAAA\n").contains("salt is not base64"));
        assert!(err("a:$6$AAAA$AAAA\nb:$6$AAAA$AAAA\na:$6$AAAA$AAAA\n")
            .contains(":3: user `a` appears twice"));
        let e = Users::load(&[], Some(Path::new("/nonexistent/passwd"))).unwrap_err();
        assert!(matches!(e, UsersError::Read { .. }), "{e}");
    }

    #[test]
    fn yaml_and_file_users_merge_but_do_not_collide() {
        let yaml = UserConfig {
            username: "evse".into(),
            password_hash: Secret::new(hash_password("yaml-pw").unwrap()),
        };
        let e = Users::load(std::slice::from_ref(&yaml), Some(&fixture())).unwrap_err();
        assert!(matches!(e, UsersError::Duplicate { .. }), "{e}");
        let other = UserConfig {
            username: "admin".into(),
            ..yaml
        };
        let users = Users::load(&[other], Some(&fixture())).unwrap();
        assert!(users.verify("admin", b"yaml-pw"));
        assert!(users.verify("scada", b"scada-pw"));
    }

    #[tokio::test]
    async fn concurrent_checks_are_all_answered() {
        let hash = hash_password("pw1").unwrap();
        let users = Users::new(&[UserConfig {
            username: "evse".into(),
            password_hash: Secret::new(hash),
        }]);
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let u = users.clone();
                tokio::spawn(async move {
                    let pw = if i % 2 == 0 { "pw1" } else { "bad" };
                    (i, u.check("evse".into(), pw.into()).await)
                })
            })
            .collect();
        for t in tasks {
            let (i, ok) = t.await.unwrap();
            assert_eq!(ok, i % 2 == 0);
        }
    }
}
