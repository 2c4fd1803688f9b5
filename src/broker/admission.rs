//! Who gets past the login: `broker.max_connections` and the connections to
//! be answered "server unavailable".
//!
//! **Slots.** One per network connection, taken when its login is accepted
//! and given back when it ends.
//!
//! rmqtt's own connection count goes up only once a session runs, after its
//! CONNACK is on the wire; a client that connects right after another one
//! got its CONNACK could slip past a limit checked against it. The slots
//! are taken in the login hook itself, under one lock, so that the limit
//! holds however fast clients arrive. A slot is given back when the
//! session ends (`ClientDisconnected`), when its handshake fails after the
//! login (`takeover.rs`), and, for a handshake that died in a way no hook
//! sees (a reset while the CONNACK is written), when it turns out to have
//! no live session after [`Admission::GRACE`].

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rmqtt::context::ServerContext;
use rmqtt::types::Id;

/// A connection: client id and peer (the peer's port tells two connections
/// of one client id apart).
type Key = (String, Option<SocketAddr>);

/// **Unavailable.** Connections to be answered "server unavailable" (3.1.1:
/// CONNACK 3; 5: 0x88) and closed, so that the client retries. rmqtt's login
/// hook can only accept or refuse as "not authorised", which clients take as
/// final, so such a login is accepted there and the connection is stopped at
/// the next step, before anything else happens: taking the client id's
/// session entry (`takeover.rs`), which fails for every connection marked
/// here.
pub struct Admission {
    max: usize,
    held: Mutex<HashMap<Key, (Id, Instant)>>,
    unavailable: Mutex<HashSet<Key>>,
}

impl Admission {
    /// Time a handshake has to turn into a running session before its slot
    /// may be reclaimed.
    const GRACE: Duration = Duration::from_secs(10);

    pub fn new(max: usize) -> Admission {
        Admission {
            max,
            held: Mutex::default(),
            unavailable: Mutex::default(),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Marks `id` to be answered "server unavailable" right after its login.
    pub fn mark_unavailable(&self, id: &Id) {
        lock(&self.unavailable).insert(key(id));
    }

    /// Whether `id` was marked to be answered "server unavailable" (the mark
    /// is taken off).
    pub fn take_unavailable(&self, id: &Id) -> bool {
        lock(&self.unavailable).remove(&key(id))
    }

    /// Takes a slot for `id`; false when all are taken, even after slots of
    /// dead handshakes were reclaimed (see the module docs).
    pub async fn take(&self, scx: &ServerContext, id: &Id) -> bool {
        if self.try_take(id) {
            return true;
        }
        self.reclaim(scx).await;
        self.try_take(id)
    }

    fn try_take(&self, id: &Id) -> bool {
        let mut held = self.lock();
        let key = key(id);
        if held.len() >= self.max && !held.contains_key(&key) {
            return false;
        }
        held.insert(key, (id.clone(), Instant::now()));
        true
    }

    /// Gives back the slot of `id`, if it holds one.
    pub fn give_back(&self, id: &Id) {
        self.lock().remove(&key(id));
    }

    /// Gives back the slots, older than [`Self::GRACE`], of connections
    /// that have no connected session.
    async fn reclaim(&self, scx: &ServerContext) {
        let old: Vec<Id> = self
            .lock()
            .values()
            .filter(|(_, since)| since.elapsed() >= Self::GRACE)
            .map(|(id, _)| id.clone())
            .collect();
        for id in old {
            let session = scx.extends.shared().await.entry(id.clone()).session();
            let live = match session {
                Some(s) => {
                    s.id.remote_addr == id.remote_addr && s.connected().await.unwrap_or(false)
                }
                None => false,
            };
            if !live {
                tracing::debug!(client_id = %id.client_id, "slot of a dead handshake reclaimed");
                self.give_back(&id);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Key, (Id, Instant)>> {
        lock(&self.held)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the data is whole.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn key(id: &Id) -> Key {
    (id.client_id.to_string(), id.remote_addr)
}
