//! The password-check pool: [`WORKERS`] threads of our own and a bounded,
//! per-peer fair queue.
//!
//! Why not `spawn_blocking`: tokio's blocking pool grows to 512 threads,
//! and glibc gives each thread that allocates its own arena. An argon2
//! check needs its whole memory cost (8–19 MiB) at once; spread over
//! hundreds of threads and arenas, the freed buffers stayed in the process
//! (measured: +836 MiB after 1,000 logins). Two long-lived threads, each
//! keeping one argon2 buffer between checks (`users.rs`), bound both the
//! CPU and the memory a login flood can take: +0.6 MiB after 1,000.
//!
//! Why a fair, bounded queue: a check costs ~10 ms of one core, so 500
//! wrong passwords queued in front of a legitimate login would delay it by
//! seconds. Waiting checks are served round-robin by peer (IP address), at
//! most [`MAX_WAITING_PER_PEER`] each, so one host flooding the broker
//! waits behind itself; and at most [`MAX_WAITING`] wait in all, so any
//! login is answered within about `MAX_WAITING / WORKERS` checks (~0.1 s
//! at ~8 ms per check, allowing for a busy CPU). A login beyond those bounds is refused at once as
//! "server busy" ([`super::Login::Busy`]); MQTT clients retry.
//!
//! Addresses that have logged in successfully before (the chargers and
//! meters of the site, up to [`KNOWN_PEERS`]) have a lane of their own,
//! served first with the same bounds: a flood from many strangers fills
//! the other lane and cannot lock them out. A first-time client during
//! such a flood is answered busy until it subsides.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

/// Threads checking passwords (one per core on a 2-core gateway).
pub const WORKERS: usize = 2;
/// Checks waiting in all before a login is refused as busy.
pub const MAX_WAITING: usize = 16;
/// Checks one peer may have waiting before its next login is refused as
/// busy.
pub const MAX_WAITING_PER_PEER: usize = 4;

/// A unit of work: one password check that sends its own answer.
pub type Job = Box<dyn FnOnce() + Send>;

/// The queue is full (in all or for this peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many password checks are waiting")]
pub struct Busy;

/// Sizes of a [`CheckPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub workers: usize,
    pub max_waiting: usize,
    pub max_waiting_per_peer: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            workers: WORKERS,
            max_waiting: MAX_WAITING,
            max_waiting_per_peer: MAX_WAITING_PER_PEER,
        }
    }
}

/// Waiting jobs of one class of peers, served round-robin by peer.
#[derive(Default)]
struct Lane {
    /// Waiting jobs per peer (`None`: the caller did not know the peer).
    by_peer: HashMap<Option<IpAddr>, VecDeque<Job>>,
    /// Peers with waiting jobs, in serving order.
    turn: VecDeque<Option<IpAddr>>,
    waiting: usize,
}

impl Lane {
    fn push(&mut self, peer: Option<IpAddr>, job: Job, limits: &Limits) -> Result<(), Busy> {
        let mine = self.by_peer.get(&peer).map_or(0, VecDeque::len);
        // Checks from unknown peers share the global bound only: lumping
        // them under one peer's bound would refuse ordinary concurrency.
        let peer_full = peer.is_some() && mine >= limits.max_waiting_per_peer;
        if self.waiting >= limits.max_waiting || peer_full {
            return Err(Busy);
        }
        if mine == 0 {
            self.turn.push_back(peer);
        }
        self.by_peer.entry(peer).or_default().push_back(job);
        self.waiting += 1;
        Ok(())
    }

    /// The next job, round-robin over peers.
    fn pop(&mut self) -> Option<Job> {
        let peer = self.turn.pop_front()?;
        let jobs = self.by_peer.get_mut(&peer)?;
        let job = jobs.pop_front();
        if jobs.is_empty() {
            self.by_peer.remove(&peer);
        } else {
            self.turn.push_back(peer);
        }
        if job.is_some() {
            self.waiting -= 1;
        }
        job
    }
}

/// Addresses that logged in successfully before, at most [`KNOWN_PEERS`]
/// (the oldest success is forgotten first).
#[derive(Default)]
struct KnownPeers(HashMap<IpAddr, Instant>);

/// How many known-good addresses are remembered (a gateway's LAN has tens
/// of clients; the bound keeps memory flat whatever happens).
pub const KNOWN_PEERS: usize = 1024;

impl KnownPeers {
    fn remember(&mut self, peer: IpAddr) {
        if self.0.len() >= KNOWN_PEERS && !self.0.contains_key(&peer) {
            if let Some(oldest) = self.0.iter().min_by_key(|(_, t)| **t).map(|(p, _)| *p) {
                self.0.remove(&oldest);
            }
        }
        self.0.insert(peer, Instant::now());
    }
}

#[derive(Default)]
struct Queue {
    /// Peers that logged in successfully before: served first, and not
    /// refused because strangers filled the other lane.
    known: Lane,
    others: Lane,
    known_peers: KnownPeers,
    closed: bool,
}

impl Queue {
    fn pop(&mut self) -> Option<Job> {
        self.known.pop().or_else(|| self.others.pop())
    }

    fn waiting(&self) -> usize {
        self.known.waiting + self.others.waiting
    }
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    limits: Limits,
}

/// Threads that run password checks; see the module doc. Dropping the
/// pool stops its threads once the waiting checks are done.
pub struct CheckPool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CheckPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckPool")
            .field("limits", &self.shared.limits)
            .finish()
    }
}

impl CheckPool {
    pub fn start(limits: Limits) -> std::io::Result<CheckPool> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            limits,
        });
        for i in 0..limits.workers.max(1) {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("edgebridge-auth-{i}"))
                .spawn(move || work(&shared))?;
        }
        Ok(CheckPool { shared })
    }

    /// A pool without threads that refuses every check as busy.
    fn closed() -> CheckPool {
        CheckPool {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue {
                    closed: true,
                    ..Queue::default()
                }),
                ready: Condvar::new(),
                limits: Limits::default(),
            }),
        }
    }

    /// Queues a check, or refuses it at once when the queue is full (in
    /// all, or for this peer when it is known).
    pub fn submit(&self, peer: Option<IpAddr>, job: Job) -> Result<(), Busy> {
        let limits = self.shared.limits;
        let mut q = lock(&self.shared.queue);
        if q.closed {
            return Err(Busy);
        }
        let known = peer.is_some_and(|p| q.known_peers.0.contains_key(&p));
        if known {
            q.known.push(peer, job, &limits)?;
        } else {
            q.others.push(peer, job, &limits)?;
        }
        drop(q);
        self.shared.ready.notify_one();
        Ok(())
    }

    /// Notes that `peer` logged in: its next checks go to the front lane.
    pub fn remember(&self, peer: IpAddr) {
        lock(&self.shared.queue).known_peers.remember(peer);
    }

    /// Checks waiting (not yet running).
    pub fn waiting(&self) -> usize {
        lock(&self.shared.queue).waiting()
    }
}

impl Drop for CheckPool {
    fn drop(&mut self) {
        lock(&self.shared.queue).closed = true;
        self.shared.ready.notify_all();
    }
}

/// A poisoned lock only means a job panicked while another thread held
/// it; the queue itself is always consistent between statements.
fn lock(m: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn work(shared: &Shared) {
    loop {
        let job = {
            let mut q = lock(&shared.queue);
            loop {
                if let Some(job) = q.pop() {
                    break job;
                }
                if q.closed {
                    return;
                }
                q = shared.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        // A panicking check (a bug) must not take the worker with it; its
        // caller sees the answer channel close and reports busy.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

/// The process's pool, started on first use and shared by every [`Users`]
/// (a reload builds new users, not new threads).
///
/// [`Users`]: super::Users
pub fn shared() -> Arc<CheckPool> {
    static POOL: OnceLock<Arc<CheckPool>> = OnceLock::new();
    POOL.get_or_init(|| match CheckPool::start(Limits::default()) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            // No threads: every login is answered busy, loudly, rather
            // than the broker failing to start.
            tracing::error!(error = %e, "cannot start the password-check threads; logins will be refused");
            Arc::new(CheckPool::closed())
        }
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn ip(n: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, n]))
    }

    /// A pool whose one worker is held busy, so that everything submitted
    /// waits; jobs made by [`Held::job`] report their names when run.
    struct Held {
        release: mpsc::Sender<()>,
        done_tx: mpsc::Sender<&'static str>,
        done_rx: mpsc::Receiver<&'static str>,
    }

    impl Held {
        fn new(pool: &CheckPool) -> Held {
            let (release, release_rx) = mpsc::channel::<()>();
            let (started_tx, started_rx) = mpsc::channel::<()>();
            pool.submit(
                ip(9),
                Box::new(move || {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                }),
            )
            .unwrap();
            started_rx.recv().unwrap();
            let (done_tx, done_rx) = mpsc::channel();
            Held {
                release,
                done_tx,
                done_rx,
            }
        }

        fn job(&self, name: &'static str) -> Job {
            let tx = self.done_tx.clone();
            Box::new(move || tx.send(name).unwrap())
        }

        /// Lets the worker go; the names of the next `n` jobs run, in order.
        fn release(&self, n: usize) -> Vec<&'static str> {
            self.release.send(()).unwrap();
            (0..n)
                .map(|_| self.done_rx.recv_timeout(Duration::from_secs(5)).unwrap())
                .collect()
        }
    }

    #[test]
    fn peers_take_turns_and_floods_are_refused_busy() {
        let pool = CheckPool::start(Limits {
            workers: 1,
            max_waiting: 6,
            max_waiting_per_peer: 3,
        })
        .unwrap();
        let held = Held::new(&pool);
        let job = |name| held.job(name);
        for name in ["a1", "a2", "a3"] {
            pool.submit(ip(1), job(name)).unwrap();
        }
        assert_eq!(pool.submit(ip(1), job("a4")), Err(Busy), "per-peer bound");
        pool.submit(ip(2), job("b1")).unwrap();
        pool.submit(ip(2), job("b2")).unwrap();
        pool.submit(ip(3), job("c1")).unwrap();
        assert_eq!(pool.waiting(), 6);
        assert_eq!(pool.submit(ip(4), job("d1")), Err(Busy), "global bound");
        assert_eq!(held.release(6), ["a1", "b1", "c1", "a2", "b2", "a3"]);
    }

    #[test]
    fn known_peers_are_served_first_and_not_locked_out() {
        let pool = CheckPool::start(Limits {
            workers: 1,
            max_waiting: 2,
            max_waiting_per_peer: 2,
        })
        .unwrap();
        pool.remember(IpAddr::from([192, 168, 1, 50]));
        let held = Held::new(&pool);
        let job = |name| held.job(name);
        pool.submit(ip(1), job("stranger1")).unwrap();
        pool.submit(ip(2), job("stranger2")).unwrap();
        assert_eq!(pool.submit(ip(3), job("stranger3")), Err(Busy));
        pool.submit(Some(IpAddr::from([192, 168, 1, 50])), job("known"))
            .unwrap();
        assert_eq!(held.release(3), ["known", "stranger1", "stranger2"]);
    }

    #[test]
    fn known_peers_are_bounded() {
        let mut k = KnownPeers::default();
        for i in 0..(KNOWN_PEERS + 10) as u32 {
            k.remember(IpAddr::from(i.to_be_bytes()));
        }
        assert_eq!(k.0.len(), KNOWN_PEERS);
    }

    #[test]
    fn a_panicking_job_does_not_stop_the_pool() {
        let pool = CheckPool::start(Limits {
            workers: 1,
            ..Limits::default()
        })
        .unwrap();
        pool.submit(None, Box::new(|| panic!("boom"))).unwrap();
        let (tx, rx) = mpsc::channel();
        pool.submit(None, Box::new(move || tx.send(1).unwrap()))
            .unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(1));
    }
}
