//! Broker users: argon2 password hashes, checked off the async threads.

use std::collections::HashMap;
use std::sync::Arc;

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use tokio::sync::Semaphore;

use crate::config::UserConfig;

/// Creates an argon2id PHC string for `password` (what `edgebridge passwd` prints).
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// Username -> PHC hash. Verification compares in constant time (argon2's
/// `verify_password` compares the derived hashes with `subtle`).
#[derive(Clone)]
pub struct Users {
    hashes: Arc<HashMap<String, String>>,
    /// Bounds concurrent argon2 checks: each takes ~19 MiB and tens of ms,
    /// so a flood of logins must queue instead of filling the blocking
    /// thread pool (512 threads x 19 MiB) and the memory.
    slots: Arc<Semaphore>,
}

/// Password checks running at once; more wait their turn.
pub const CONCURRENT_CHECKS: usize = 2;

impl Default for Users {
    fn default() -> Users {
        Users::new(&[])
    }
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("count", &self.hashes.len())
            .finish()
    }
}

impl Users {
    pub fn new(users: &[UserConfig]) -> Users {
        Users {
            hashes: Arc::new(
                users
                    .iter()
                    .map(|u| (u.username.clone(), u.password_hash.expose().to_string()))
                    .collect(),
            ),
            slots: Arc::new(Semaphore::new(CONCURRENT_CHECKS)),
        }
    }

    /// [`Users::verify`] off the async threads, at most
    /// [`CONCURRENT_CHECKS`] at a time.
    pub async fn check(&self, username: String, password: String) -> bool {
        let Ok(_permit) = self.slots.acquire().await else {
            return false;
        };
        let users = self.clone();
        tokio::task::spawn_blocking(move || users.verify(&username, &password))
            .await
            .unwrap_or(false)
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Checks a login. Unknown users still cost one hash, so that timing
    /// does not tell which usernames exist.
    pub fn verify(&self, username: &str, password: &str) -> bool {
        const DUMMY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Bm0BLuLhGAGvq4NGVIHzKsDgJfzNwu1vPj6D2bL5JEI";
        let (hash, known) = match self.hashes.get(username) {
            Some(h) => (h.as_str(), true),
            None => (DUMMY, false),
        };
        let Ok(parsed) = PasswordHash::new(hash) else {
            return false;
        };
        let ok = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        ok && known
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn hash_then_verify() {
        let hash = hash_password("pw1").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        let users = Users::new(&[UserConfig {
            username: "evse".into(),
            password_hash: Secret::new(hash),
        }]);
        assert!(users.verify("evse", "pw1"));
        assert!(!users.verify("evse", "pw2"));
        assert!(!users.verify("other", "pw1"));
    }

    #[tokio::test]
    async fn concurrent_checks_are_bounded_and_all_answered() {
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
        assert_eq!(users.slots.available_permits(), CONCURRENT_CHECKS);
    }
}
