//! Memory and latency of broker logins (issue 19): RSS around 1,000
//! password checks, good and bad, in bursts of 500 at once, and how long a
//! legitimate login waits during a burst of 500 wrong passwords.
//!
//! `cargo bench --bench logins` measures the gateway as shipped: the
//! allocator tuned, checks on the 2-thread pool, the `edgebridge passwd`
//! cost. `cargo bench --bench logins -- before` measures the old way for
//! comparison: no allocator tuning, each check on tokio's blocking pool,
//! argon2's default cost (19 MiB); `-- no-tune` runs the shipped pool
//! without the allocator setting. Run the two in separate processes: the
//! allocator setting cannot be undone. Exits 1 when the shipped way grows
//! RSS by more than 2 MB or keeps a legitimate login waiting 1 s or more.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
use edgebridge::access::{hash_password, CheckPool, Limits, Login, Users};
use edgebridge::config::{Secret, UserConfig};
use edgebridge::ops::memory::{resident_bytes, tune_allocator};

const LOGINS: usize = 1000;
const BURST: usize = 500;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn rss() -> u64 {
    resident_bytes().unwrap_or(0)
}

fn users_with(hash: String) -> Users {
    Users::new(&[UserConfig {
        username: "evse".into(),
        password_hash: Secret::new(hash),
    }])
}

/// Median time of one check on this thread.
fn time_per_check(users: &Users) -> Duration {
    let mut runs: Vec<Duration> = (0..15)
        .map(|i| {
            let pw: &[u8] = if i % 2 == 0 { b"pw" } else { b"bad" };
            let t = Instant::now();
            users.verify("evse", pw);
            t.elapsed()
        })
        .collect();
    runs.sort();
    runs[runs.len() / 2]
}

fn main() {
    let before = std::env::args().any(|a| a == "before");
    // `no-tune`: the shipped pool without the allocator setting, to see
    // what each of the two fixes does.
    let tune = !before && !std::env::args().any(|a| a == "no-tune");
    if tune {
        tune_allocator();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start a runtime: {e}");
            std::process::exit(1);
        }
    };
    let default_cost = argon2::Argon2::default()
        .hash_password(b"pw", &SaltString::generate(&mut OsRng))
        .map(|h| h.to_string());
    let (Ok(default_cost), Ok(ours)) = (default_cost, hash_password("pw")) else {
        eprintln!("hashing failed");
        std::process::exit(1);
    };
    println!(
        "machine: {} CPU(s)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let ok = if before {
        runtime.block_on(run_before(default_cost))
    } else {
        println!(
            "time per check (one thread, median of 15): argon2 default m=19 MiB t=2: {:?}; edgebridge passwd {}: {:?}",
            time_per_check(&users_with(default_cost.clone())),
            ours.split('$').nth(3).unwrap_or(""),
            time_per_check(&users_with(ours.clone()))
        );
        runtime.block_on(run_shipped(ours, tune))
    };
    if !ok {
        std::process::exit(1);
    }
}

/// The old way: every check on `spawn_blocking`, default allocator.
async fn run_before(hash: String) -> bool {
    let users = users_with(hash);
    // As `Users::check` was: at most 2 checks at once (a semaphore), each
    // on whichever blocking-pool thread is free.
    let slots = Arc::new(tokio::sync::Semaphore::new(2));
    let r0 = rss();
    let t = Instant::now();
    for _ in 0..LOGINS / BURST {
        let tasks: Vec<_> = (0..BURST)
            .map(|i| {
                let u = users.clone();
                let slots = slots.clone();
                tokio::spawn(async move {
                    let _permit = slots.acquire().await;
                    tokio::task::spawn_blocking(move || {
                        u.verify("evse", if i % 2 == 0 { b"pw" } else { b"bad" })
                    })
                    .await
                })
            })
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }
    let r1 = rss();
    println!(
        "before (2 at once on spawn_blocking, default allocator, m=19 MiB): {LOGINS} checks in bursts of {BURST} took {:?}; RSS {:.1} MiB -> {:.1} MiB (+{:.1} MiB)",
        t.elapsed(),
        mib(r0),
        mib(r1),
        mib(r1.saturating_sub(r0))
    );
    true
}

async fn run_shipped(hash: String, tuned: bool) -> bool {
    // 1. Memory: every one of the 1,000 logins really checked, so the
    // pool's queue is made long enough to take a whole burst.
    let roomy = match CheckPool::start(Limits {
        max_waiting: BURST,
        max_waiting_per_peer: BURST,
        ..Limits::default()
    }) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            eprintln!("cannot start a pool: {e}");
            return false;
        }
    };
    let users = users_with(hash.clone()).with_pool(roomy);
    // Warm up: the pool's threads, the runtime and the first buffers.
    for _ in 0..10 {
        users.authenticate(None, "evse", b"pw").await;
    }
    let r0 = rss();
    let t = Instant::now();
    let mut accepted = 0;
    let mut peak = r0;
    for _ in 0..LOGINS / BURST {
        let tasks: Vec<_> = (0..BURST)
            .map(|i| {
                let u = users.clone();
                tokio::spawn(async move {
                    let pw: &[u8] = if i % 2 == 0 { b"pw" } else { b"bad" };
                    u.authenticate(None, "evse", pw).await
                })
            })
            .collect();
        for task in tasks {
            if let Ok(Login::Accepted) = task.await {
                accepted += 1;
            }
            peak = peak.max(rss());
        }
    }
    let r1 = rss();
    let grew = r1.saturating_sub(r0);
    println!(
        "{} {LOGINS} checks ({accepted} good) in bursts of {BURST} took {:?}; RSS {:.1} MiB -> {:.1} MiB (+{:.2} MiB, peak {:.1} MiB)",
        if tuned {
            "shipped (2-thread pool, M_MMAP_THRESHOLD 256 KiB):"
        } else {
            "2-thread pool, default allocator:"
        },
        t.elapsed(),
        mib(r0),
        mib(r1),
        mib(grew),
        mib(peak)
    );

    // 2. Latency: a legitimate login during 500 wrong passwords, on the
    // shipped pool and its limits.
    let users = users_with(hash);
    let mut all_ok = grew <= 2 * 1024 * 1024 || !tuned;
    let scenarios = [
        ("one attacking host", 1usize, "first login"),
        ("500 attacking hosts", BURST, "first login"),
        ("500 attacking hosts", BURST, "logged in before"),
    ];
    for (n, (what, peers, history)) in scenarios.into_iter().enumerate() {
        let legit_peer = IpAddr::from([192, 168, 1, 50 + n as u8]);
        if history == "logged in before" {
            users.authenticate(Some(legit_peer), "evse", b"pw").await;
        }
        let flood: Vec<_> = (0..BURST)
            .map(|i| {
                let u = users.clone();
                let peer = IpAddr::from([10, 0, (i % peers / 256) as u8, (i % peers % 256) as u8]);
                tokio::spawn(async move { u.authenticate(Some(peer), "evse", b"bad").await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let t = Instant::now();
        let answer = users.authenticate(Some(legit_peer), "evse", b"pw").await;
        let waited = t.elapsed();
        let mut busy = 0;
        for f in flood {
            if let Ok(Login::Busy) = f.await {
                busy += 1;
            }
        }
        println!(
            "legitimate login ({history}) during {BURST} wrong passwords from {what}: {answer:?} after {waited:?} ({busy} of the {BURST} answered busy at once)"
        );
        // Wait for the flood's last checks so the next scenario starts clean.
        tokio::time::sleep(Duration::from_millis(500)).await;
        all_ok &= waited < Duration::from_secs(1);
    }
    if !all_ok {
        println!("FAILED: RSS grew by more than 2 MB or a login waited 1 s or more");
    }
    all_ok
}
