//! Tiering survives kill -9: the real `dovetail serve` binary serves a parallax-v2 disk of a
//! two-tier store (`fast`, `slow`) with its tier mover running every second, while an
//! in-process vhost-user frontend (the guest) writes a known, compressible pattern over the
//! whole disk and flushes it. With `ctl tiers --cold-after 1 --hot-accesses 1` blocks go cold
//! one second after their last access and hot at their first: the mover demotes them (to the
//! slow tier, zstd-compressed) and promotes them again when the guest reads them back. The
//! daemon is killed with SIGKILL while it moves blocks: twice the moment `tiers --json` shows
//! it demoting, twice after a random delay (seeded; the seed is printed, `DOVETAIL_SEED`
//! replays one), and started again.
//!
//! Every write is flushed before a kill, so after every restart every block must read back
//! exactly; after every kill `store check` finds the store consistent (the copies of
//! replicated blocks agree, compressed blocks decode); the policy set before the first kill
//! is still in force. Each iteration also rewrites a random run of blocks (and flushes), so
//! guest writes race with the mover's relocations. After the last restart the mover settles:
//! every data block ends cold and compressed on the slow tier, and the disk still reads back.

mod common;

mod cli;
mod serve;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{DriverOptions, Req, TestDriver, S_OK};
use dovetail_bench::fill::Rng;
use serde_json::Value;
use serve::{ctl_ok, log_tail, seed, store_check, Daemon};

const DISK_SIZE: u64 = 16 << 20;
const SECTOR: u64 = 512;
const BLOCK: u64 = 4096;
const BLOCKS: u64 = DISK_SIZE / BLOCK;
/// Bytes per guest request when the whole disk is written or read.
const CHUNK: u64 = 256 << 10;
/// The mover's budget (MiB/s): the 16 MiB disk takes about 2 s to move, so kills land while
/// it moves.
const RATE: &str = "8";
/// Kills in all; the even ones happen as soon as the mover is seen demoting, the odd ones
/// after a random delay.
const KILLS: usize = 6;
/// Blocks each iteration rewrites.
const REWRITE: u64 = 64;

// ------------------------------------------------------------------------------------------------
// The daemon, as a child process.

/// A `ctl` command that must succeed: its stdout.
fn ctl(dir: &Path, args: &[&str]) -> String {
    ctl_ok(dir, args)
}

/// `ctl tiers vd --json`, parsed.
fn tiers(dir: &Path) -> Value {
    let out = ctl(dir, &["tiers", "vd", "--json"]);
    serde_json::from_str(out.trim()).expect("ctl tiers --json prints JSON")
}

/// The blocks in use of `class` (and, if given, on `tier`) in a `tiers` result.
fn class_blocks(r: &Value, class: &str, tier: Option<&str>) -> u64 {
    r["usage"]
        .as_array()
        .expect("usage")
        .iter()
        .filter(|u| u["class"] == class && tier.is_none_or(|t| u["tier"] == t))
        .map(|u| u["blocks"].as_u64().expect("blocks"))
        .sum()
}

/// One run of `dovetail serve` over the test's store, its mover every second.
fn start(dir: &Path, what: &str) -> Daemon {
    Daemon::start(dir, "tiers_crash", what, &["--mover-interval", "1"])
}

// ------------------------------------------------------------------------------------------------
// The guest.

fn connect(dir: &Path) -> TestDriver {
    let mut o = DriverOptions::new(1, 4 << 20);
    o.timeout = Duration::from_secs(20);
    TestDriver::connect_with(&dir.join("vd.sock"), o)
}

/// Block `b` as written by generation `gen`: a line naming both, repeated (compressible, and
/// no two blocks or generations alike).
fn block_data(seed: u64, b: u64, gen: u32) -> Vec<u8> {
    let line = format!("tiers_crash seed {seed:016x} block {b:06} generation {gen:04}\n");
    line.bytes().cycle().take(BLOCK as usize).collect()
}

/// Writes blocks `first..first + n` at their generations in `gens` (in requests of at most
/// CHUNK bytes), then FLUSHes.
fn write_blocks(drv: &TestDriver, seed: u64, gens: &[u32], first: u64, n: u64) {
    let per = CHUNK / BLOCK;
    let reqs: Vec<_> = (first..first + n)
        .step_by(per as usize)
        .map(|b0| {
            let end = (b0 + per).min(first + n);
            let data: Vec<u8> = (b0..end)
                .flat_map(|b| block_data(seed, b, gens[b as usize]))
                .collect();
            Req::write(b0 * BLOCK / SECTOR, &data)
        })
        .collect();
    for c in drv.submit_batch(0, &reqs) {
        assert_eq!(c.status, Some(S_OK), "write: {c:?}");
    }
    let c = drv.submit(0, &Req::flush());
    assert_eq!(c.status, Some(S_OK), "flush: {c:?}");
}

/// Reads the whole disk and checks every block against the model.
fn verify(drv: &TestDriver, seed: u64, gens: &[u32], context: &str, dir: &Path) {
    let reqs: Vec<_> = (0..DISK_SIZE / CHUNK)
        .map(|i| Req::read(i * CHUNK / SECTOR, CHUNK as u32))
        .collect();
    let done = drv.submit_batch(0, &reqs);
    for (i, c) in done.iter().enumerate() {
        assert_eq!(
            (c.status, c.data.len() as u64),
            (Some(S_OK), CHUNK),
            "{context}: reading chunk {i}\n{}",
            log_tail(dir, 40)
        );
        for (k, got) in c.data.chunks(BLOCK as usize).enumerate() {
            let b = i as u64 * (CHUNK / BLOCK) + k as u64;
            let want = block_data(seed, b, gens[b as usize]);
            if got != want {
                let head = String::from_utf8_lossy(&got[..80.min(got.len())]).into_owned();
                panic!(
                    "{context}: block {b} does not read back as generation {} (flushed); it \
                     starts {head:?}\n{}",
                    gens[b as usize],
                    log_tail(dir, 40)
                );
            }
        }
    }
}

/// Polls `tiers` until `done` holds; returns that result.
fn wait_tiers(dir: &Path, what: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let r = tiers(dir);
        if done(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {limit:?}: {r}\n{}",
            log_tail(dir, 40)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn kill9_while_the_mover_moves_blocks_loses_nothing() {
    common::init_logging();
    let seed = seed();
    eprintln!("tiers_crash: seed {seed} (DOVETAIL_SEED={seed} replays it)");
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut rng = Rng::new(seed);
    serve::two_tier_store(dir, "128M", "4M", "16M", "parallax-v2");

    // The guest writes every block (generation 1) and flushes.
    let mut gens = vec![1u32; BLOCKS as usize];
    let mut daemon = start(dir, "first");
    let drv = connect(dir);
    write_blocks(&drv, seed, &gens, 0, BLOCKS);
    // The guest stays connected across each kill.
    let mut guest = Some(drv);
    let r = tiers(dir);
    assert_eq!(r["policy"]["cold"]["tier"], "slow", "{r}");
    assert_eq!(r["policy"]["cold"]["compress"], true, "{r}");
    assert_eq!(r["policy"]["hot"]["tier"], "fast", "{r}");
    assert!(class_blocks(&r, "hot", Some("fast")) >= BLOCKS, "{r}");
    let out = ctl(
        dir,
        &[
            "tiers",
            "vd",
            "--cold-after",
            "1",
            "--hot-accesses",
            "1",
            "--rate",
            RATE,
        ],
    );
    assert!(out.contains("cold_after_secs 3600 -> 1"), "{out}");

    for kill in 0..KILLS {
        let context = format!("seed {seed}, kill {kill}");
        let how = if kill % 2 == 0 {
            // The moment the mover is seen demoting.
            let r = wait_tiers(dir, "demoting", Duration::from_secs(20), |r| {
                r["demoted"].as_u64() > Some(0)
            });
            format!("as soon as it demoted ({} blocks)", r["demoted"])
        } else {
            let ms = 200 + rng.below(2300);
            std::thread::sleep(Duration::from_millis(ms));
            format!("after {ms} ms")
        };
        daemon.kill9();
        drop(guest.take());
        eprintln!(
            "tiers_crash: {context}: killed {how}, {:.1} s in",
            started.elapsed().as_secs_f64()
        );
        store_check(dir, &context);

        daemon = start(dir, &context);
        let drv = connect(dir);
        let r = tiers(dir);
        let p = &r["policy"];
        assert_eq!(
            (&p["cold_after_secs"], &p["hot_accesses"], &p["move_mib_s"]),
            (&Value::from(1), &Value::from(1), &Value::from(8)),
            "{context}: the policy survived the crash: {r}"
        );
        assert_eq!(r["mover"]["state"], "running", "{context}: {r}");
        verify(&drv, seed, &gens, &context, dir);
        // Rewrite a random run of blocks (a new generation), flushed before the next kill.
        let first = rng.below(BLOCKS - REWRITE);
        for g in &mut gens[first as usize..(first + REWRITE) as usize] {
            *g += 1;
        }
        write_blocks(&drv, seed, &gens, first, REWRITE);
        verify(&drv, seed, &gens, &format!("{context}, rewritten"), dir);
        guest = Some(drv);
    }

    // The last daemon lives on: the mover settles (a whole round moves nothing) with every data
    // block cold, compressed, on the slow tier (the guest's last reads made them hot; a second
    // later they are cold).
    let context = format!("seed {seed}, settling");
    let r = wait_tiers(
        dir,
        "every block cold on the slow tier, and a round with nothing to move",
        Duration::from_secs(40),
        |r| {
            let last = &r["mover"]["last_round"];
            ["promoted", "demoted", "placed", "no_room"]
                .iter()
                .all(|k| last[k] == 0)
                && class_blocks(r, "hot", None) == 0
                && r["usage"].as_array().is_some_and(|u| {
                    u.iter()
                        .filter(|u| u["class"] == "cold")
                        .all(|u| u["compressed"] == true && u["tier"] == "slow")
                })
                && class_blocks(r, "cold", Some("slow")) >= BLOCKS
        },
    );
    assert!(r["demoted"].as_u64() >= Some(1), "{context}: {r}");
    assert_eq!(r["mover"]["last_error"], Value::Null, "{context}: {r}");
    // The rounds that moved blocks are events an operator reads. The round that demoted the
    // last blocks may still be walking the rest of the disk when the placement above is
    // reached: its event comes when it ends.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events: Value =
            serde_json::from_str(ctl(dir, &["--json", "events"]).trim()).expect("events JSON");
        let demoting = events["events"]
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| e["kind"] == "tiers")
            .filter_map(|e| e["message"].as_str())
            .any(|m| {
                m.starts_with("mover round: ")
                    && m.contains(" demoted to cold, ")
                    && !m.contains(" 0 demoted to cold")
            });
        if demoting {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: no mover round demoting blocks among the events: {events}\n{}",
            log_tail(dir, 60)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = ctl(dir, &["tiers", "vd"]);
    assert!(
        text.contains("slow") && text.contains("mover: running every 1 s"),
        "{text}"
    );
    let drv = guest.take().expect("the guest is connected");
    verify(&drv, seed, &gens, &context, dir);
    drop(drv);
    daemon.terminate();
    store_check(dir, &context);
    eprintln!(
        "tiers_crash: {KILLS} kills, done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// `tier fast: ..., N granted, M free` in `store check`'s report: N.
fn fast_granted(dir: &Path) -> u32 {
    let report = cli::ok(&["store", "check", cli::path(&dir.join("st"))]);
    let line = report
        .lines()
        .find(|l| l.trim_start().starts_with("tier fast:"))
        .unwrap_or_else(|| panic!("no fast tier line in:\n{report}"));
    let granted = line
        .split(": ")
        .last()
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok());
    granted.unwrap_or_else(|| panic!("no granted count in {line:?}"))
}

/// The extents the mover empties on the fast tier are given back to the store; a kill -9 just
/// before the catalog commit that gives one back (crash point `store-ungrant`, after the root
/// record that no longer names it is durable) loses nothing: `store check` finds the store
/// consistent, every block reads back after the restart, and the restarted daemon gives the
/// extents back at its next commit.
#[test]
fn kill9_while_emptied_extents_are_given_back_loses_nothing() {
    if !dovetail_store::failpoint::ENABLED {
        eprintln!("skipped: needs --features dovetail-backend/failpoints");
        return;
    }
    common::init_logging();
    let seed = seed();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    serve::two_tier_store(dir, "128M", "4M", "16M", "parallax-v2");
    let gens = vec![1u32; BLOCKS as usize];
    let mut daemon = Daemon::start_with_env(
        dir,
        "tiers_crash",
        "ungrant",
        &["--mover-interval", "1"],
        &[("FAILPOINTS", "store-ungrant=return")],
    );
    let drv = connect(dir);
    write_blocks(&drv, seed, &gens, 0, BLOCKS);
    ctl(dir, &["tiers", "vd", "--cold-after", "1", "--rate", "64"]);
    // The mover demotes every block; the commit after the one that dropped the emptied fast
    // groups from the root record gives their extents back, and dies there.
    let deadline = Instant::now() + Duration::from_secs(60);
    while daemon.exited().is_none() {
        assert!(
            Instant::now() < deadline,
            "the daemon did not reach store-ungrant within 60 s\n{}",
            log_tail(dir, 40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon.reap("killed at store-ungrant");
    drop(drv);
    store_check(dir, "killed at store-ungrant");
    let held = fast_granted(dir);
    assert!(
        held >= 4,
        "{held} fast extents still granted after the kill"
    );

    let daemon = start(dir, "after store-ungrant");
    let drv = connect(dir);
    verify(&drv, seed, &gens, "after the restart", dir);
    // The restarted daemon's mover commits: the extents are given back. What stays granted on
    // the fast tier: the metadata's extent and the hot class's current one. The extent reserve
    // keeps no spare beside them: it grants only when a group has less than a quarter extent
    // free, and the spares of the killed daemon were given back as orphans.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = fast_granted(dir);
        if n <= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{n} fast extents still granted 30 s after the restart\n{}",
            log_tail(dir, 40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    verify(&drv, seed, &gens, "after the extents were given back", dir);
    drop(drv);
    daemon.terminate();
    store_check(dir, "after the extents were given back");
    assert!(fast_granted(dir) <= 2);
    let log = std::fs::read_to_string(dir.join("serve.log")).expect("log");
    assert!(log.contains("back to the store"), "{}", log_tail(dir, 40));
}
