//! Memory per active key: the growth of the resident set when N keys each get a bucket, ours
//! ([`Store`], as the service builds it: 256 shards) against `governor`'s keyed limiter
//! (`RateLimiter::keyed`, DashMap), with the same 14-byte keys and the same quota.
//!
//! Each measurement runs in a fresh child process (this binary, re-run with
//! `OPENCLAW_MEMORY_SUBJECT` set), so one subject never reuses memory the other freed. The child
//! reads `VmRSS` from `/proc/self/status` before building the structure and after the last
//! insertion; keys are formatted into one reused buffer, so they are counted only where the
//! structure keeps its own copy. RSS is what the process really holds: entries, table slots at
//! the load factor the table happens to be at, allocator rounding, and freed-but-kept pages of
//! tables that grew. It is page-granular, so it is only meaningful for many keys.
//!
//! Run: `cargo bench -p openclaw-limiter --bench memory`. Target: under 150 bytes per active
//! key at 1M keys. Without `--bench` (as under `cargo test --benches`) it runs 1000 keys once.

use std::fmt::Write as _;
use std::num::NonZeroU32;
use std::process::{Command, ExitCode};

use compact_str::CompactString;
use governor::{Quota, RateLimiter};
use openclaw_limiter::bucket::Rate;
use openclaw_limiter::clock::{Clock, WallClock};
use openclaw_limiter::crdt::{BucketState, Component, ReplicaId};
use openclaw_limiter::store::{PolicyId, Store};

const SUBJECT_ENV: &str = "OPENCLAW_MEMORY_SUBJECT";
const KEYS_ENV: &str = "OPENCLAW_MEMORY_KEYS";
const TARGET_BYTES_PER_KEY: f64 = 150.0;
const TOKENS_PER_SECOND: u32 = 1000;
const SHARDS: usize = 256;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|n| n.trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// The same 14-byte client ids as the decision benchmark, written into a reused buffer.
fn key_name(buf: &mut String, i: usize) {
    buf.clear();
    let _ = write!(buf, "client-{i:07}");
}

/// In the child: give `keys` keys a bucket in `subject`, print the RSS growth.
fn measure(subject: &str, keys: usize) -> Result<(), String> {
    let mut key = String::with_capacity(32);
    let before = rss_bytes();
    let held = match subject {
        "openclaw" => {
            let clock = WallClock::new();
            let rate = Rate::try_new(u64::from(TOKENS_PER_SECOND), 1000).expect("valid rate");
            let store = Store::new(ReplicaId(1), SHARDS);
            for i in 0..keys {
                key_name(&mut key, i);
                let outcome = store.decide(PolicyId(0), &key, rate, 1, clock.now());
                assert!(outcome.allowed);
            }
            let after = rss_bytes();
            assert_eq!(store.len(), keys);
            std::hint::black_box(&store);
            after
        }
        "governor" => {
            let quota = Quota::per_second(NonZeroU32::new(TOKENS_PER_SECOND).expect("non-zero"));
            let governor = RateLimiter::<String, _, _>::keyed(quota);
            for i in 0..keys {
                key_name(&mut key, i);
                assert!(governor.check_key(&key).is_ok());
            }
            let after = rss_bytes();
            assert_eq!(governor.len(), keys);
            std::hint::black_box(&governor);
            after
        }
        other => return Err(format!("unknown subject {other:?}")),
    };
    println!("rss_growth={}", held.saturating_sub(before));
    Ok(())
}

/// In the parent: run one child, return the bytes per key it measured.
fn run_child(subject: &str, keys: usize) -> Result<f64, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let output = Command::new(exe)
        .env(SUBJECT_ENV, subject)
        .env(KEYS_ENV, keys.to_string())
        .output()
        .map_err(|e| format!("cannot run the child: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "{subject} child failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let growth: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("rss_growth="))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{subject} child printed no rss_growth: {stdout}"))?;
    Ok(growth as f64 / keys as f64)
}

fn main() -> ExitCode {
    if let Ok(subject) = std::env::var(SUBJECT_ENV) {
        let keys = std::env::var(KEYS_ENV)
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1_000_000);
        return match measure(&subject, keys) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }

    let full = std::env::args().any(|a| a == "--bench");
    let sizes: &[usize] = if full { &[100_000, 1_000_000] } else { &[1000] };
    // What one of our buckets is made of: the store boxes an entry of (policy, two flags, key,
    // state), which malloc rounds up to a multiple of 16 with 8 bytes of header, and keeps an
    // 8-byte pointer plus a 1-byte control tag per table slot.
    println!(
        "sizes: entry = {} B (key inline up to {} B), \
         BucketState = {} B, Component = {} B",
        Store::ENTRY_BYTES,
        size_of::<CompactString>(),
        size_of::<BucketState>(),
        size_of::<Component>(),
    );
    println!(
        "{:>10} {:>18} {:>18}",
        "keys", "openclaw B/key", "governor B/key"
    );
    let mut ok = true;
    for &keys in sizes {
        let ours = run_child("openclaw", keys);
        let theirs = run_child("governor", keys);
        match (ours, theirs) {
            (Ok(ours), Ok(theirs)) => {
                println!("{keys:>10} {ours:>18.1} {theirs:>18.1}");
                if full && keys == 1_000_000 {
                    let verdict = if ours < TARGET_BYTES_PER_KEY {
                        "met".to_owned()
                    } else {
                        format!("missed by {:.1} B", ours - TARGET_BYTES_PER_KEY)
                    };
                    println!(
                        "target < {TARGET_BYTES_PER_KEY} B per active key at 1M keys: {verdict} \
                         ({:.2}x governor)",
                        ours / theirs
                    );
                }
            }
            (ours, theirs) => {
                for e in [ours.err(), theirs.err()].into_iter().flatten() {
                    eprintln!("{e}");
                }
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
