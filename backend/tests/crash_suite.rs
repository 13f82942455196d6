//! The crash suite: the real `dovetail serve` binary, built with its crash points
//! (`--features dovetail-backend/failpoints`, as `scripts/test.sh` builds it), is killed again
//! and again while the load generator (`dovetail_bench::load`, verify mode, FLUSH every few
//! writes) drives its disk over vhost-user, and it must give back every write a FLUSH
//! acknowledged, every time.
//!
//! Each iteration starts the daemon with one crash point armed through `FAILPOINTS` (the
//! process SIGKILLs itself at the point's Nth hit: inside a guest write, a FLUSH, a tree or
//! catalog commit, a snapshot, a version swap, upgrade-on-write, the copy-out, a tier move, a
//! promote) or none (then the test sends SIGKILL at a random moment). While the load runs, the
//! test performs the control operation of the disk's phase, so the armed point is reached:
//!
//! | phase | operation | points |
//! | --- | --- | --- |
//! | trusted alone | `ctl snapshot`, `ctl tiers --cold-after 1 --move-now` (parallax-v2), then `ctl tee` + `migrate --mode upgrade-on-write` | `parallax-snapshot`, `tier-move`, `swap` |
//! | upgrade-on-write | guest writes migrate blocks | `upgrade-on-write`, `presence-persist` |
//! | copy-out | `ctl migrate --rate 1M` (resumes after every restart) | `copyout-batch`, `copyout-checkpoint`, `presence-persist` |
//! | every block present | `ctl promote` | `promote-verify`, `store-promote`, `promote-retire`, `swap` |
//!
//! and in every phase the write, FLUSH and commit points (`parallax-write`, `parallax-flush`,
//! `parallax-commit-*`, `store-commit-*`). The disk goes round these phases several times:
//! parallax-v1 → parallax-v2 → parallax-v2, on a two-tier store.
//!
//! Commits race writes: the load runs on 2 queues, each sending its FLUSH once its own requests
//! in flight completed, so one queue's FLUSH commits while the other's writes are in flight
//! (and parallax-v2's annotation timer commits under both); the commit points cut those
//! commits after the nodes are written, after the sync, and after the root record.
//!
//! After every kill: `dovetail store check` finds the store consistent. After every restart:
//! a candidate is still active, never mismatched or quarantined; its presence map did not lose
//! blocks; and the whole disk, read back through the daemon, holds every stable write (or a
//! later one, sector by sector: `check_block_after_crash`). At the end a clean daemon finishes
//! the migration and the promote, the disk reads back exactly, and every crash point in
//! `dovetail_store::failpoint::POINTS` (but those with a test of their own, `OWN_TESTS`) has
//! fired at least once.
//!
//! A second test kills the daemon inside promote's verification pass and checks that the next
//! promote resumes the pass from the cursor checkpointed in the migration record, then promotes
//! correctly.
//!
//! Two small tests add what the phases above do not reach: a raw image (`serve --image`)
//! SIGKILLed at random moments under load, and a parallax-v2 disk killed inside a commit made by
//! its timer alone (no FLUSH in flight). The live disk verbs have theirs elsewhere: attach,
//! detach, disk-create and disk-delete in `lifecycle_crash.rs`, resize in `resize.rs`.
//!
//! The seed is printed; `DOVETAIL_SEED` replays a run, `DOVETAIL_CRASH_ITERATIONS` changes
//! the number of iterations (default 120).

mod cli;
mod common;
mod serve;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dovetail_bench::fill::Rng;
use dovetail_bench::load::{self, CrashCheck, Limit, LoadError, Pattern, Workload};
use dovetail_bench::verify::VerifyState;
use serde_json::Value;
use serve::{ctl_ok, ctl_output, log_tail, seed, store_check, Daemon};

const TAG: &str = "crash_suite";
const DISK_SIZE: u64 = 8 << 20;
const BLOCK: u32 = 4096;
const DEFAULT_ITERATIONS: usize = 120;
/// Iterations the disk stays in the "trusted alone" and "upgrade-on-write" phases.
const PLAIN_ITERATIONS: usize = 4;
const UOW_ITERATIONS: usize = 3;
/// The copy-out's rate: slow enough that it is still running at several kills.
const COPY_RATE: &str = "1M";
/// How long an iteration waits for its armed point before it kills the daemon itself.
const POINT_WAIT: Duration = Duration::from_millis(1500);

/// Crash points this suite does not arm: a test of their own kills the daemon there
/// (`store-ungrant`: tiers_crash.rs, `kill9_while_emptied_extents_are_given_back_loses_nothing`,
/// where the mover empties whole fast-tier extents, which this suite's load rarely does;
/// `control-request`: panics.rs, a panic in the control plane, not a crash point to die at).
/// `queue-kick` is no crash point: it wedges a queue worker for the systemd watchdog test
/// (tests/systemd.rs); `resize-committed` has its own tests (tests/resize.rs, and
/// tests/resize_crash.rs: a live `ctl resize` killed at each of its steps).
const OWN_TESTS: &[&str] = &[
    "store-ungrant",
    "control-request",
    "queue-kick",
    // tests/sandbox.rs
    "sandbox-forbidden-call",
    "resize-committed",
    // tests/lifecycle_crash.rs
    "store-set-attachment",
    "attach-recorded",
    "attach-listening",
    "detach-recorded",
    "disk-create-done",
    "serve-control-held",
    // tests/voting_crash.rs
    "store-upgrade-members",
    "store-member-added",
    "store-member-remove",
    "promote-member",
    // tests/upgrade.rs
    "upgrade-before-commit",
    "upgrade-handed-over",
    "upgrade-committed",
];

/// The crash points each phase's operation reaches, with the largest number of hits to let pass
/// before dying (drawn at random up to it).
const COMMON: &[(&str, u64)] = &[
    ("parallax-write", 200),
    ("parallax-flush", 20),
    ("parallax-commit-unsynced", 20),
    ("parallax-commit-synced", 20),
    ("parallax-commit-done", 20),
    ("store-commit-unsynced", 20),
    ("store-commit-synced", 20),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Snapshot,
    TierMove,
    Tee,
    StartUpgradeOnWrite,
    UpgradeOnWrite,
    StartCopyOut,
    CopyOut,
    Promote,
}

impl Op {
    fn points(self) -> &'static [(&'static str, u64)] {
        match self {
            Op::Snapshot => &[("parallax-snapshot", 0)],
            Op::TierMove => &[("tier-move", 2)],
            Op::Tee => &[("swap", 0)],
            Op::StartUpgradeOnWrite | Op::UpgradeOnWrite => {
                &[("upgrade-on-write", 100), ("presence-persist", 2)]
            }
            Op::StartCopyOut | Op::CopyOut => &[
                ("copyout-batch", 40),
                // Every second of copy-out: the first one after the (re)start.
                ("copyout-checkpoint", 0),
                ("presence-persist", 2),
            ],
            Op::Promote => &[
                ("store-promote", 0),
                ("promote-retire", 0),
                ("swap", 0),
                // Inside the verification pass (8 pieces of 1 MiB).
                ("promote-verify", 6),
            ],
        }
    }
}

/// What the disk looks like after a restart (from `ctl status`).
#[derive(Debug, Clone, PartialEq)]
struct Disk {
    trusted_layout: String,
    candidate: Option<u64>,
    mode: Option<String>,
    present: u64,
    total: u64,
}

fn status(dir: &Path) -> Result<Value, String> {
    let out = ctl_output(dir, &["--json", "status", "vd"]);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().rev().find(|l| !l.trim().is_empty());
    let v: Value = serde_json::from_str(last.unwrap_or("")).map_err(|e| e.to_string())?;
    Ok(v["disks"][0].clone())
}

fn disk_of(s: &Value, context: &str, dir: &Path) -> Disk {
    let c = &s["candidate"];
    let candidate = c["version"].as_u64();
    if candidate.is_some() {
        let n = &c["counters"];
        assert!(
            c["state"] == "active"
                && n["mismatches"].as_u64() == Some(0)
                && n["quarantines"].as_u64() == Some(0),
            "{context}: the candidate must stay active, never mismatched: {c}\n--- daemon log \
             ---\n{}",
            log_tail(dir, 60)
        );
    }
    let m = &s["migration"];
    Disk {
        trusted_layout: s["trusted_layout"].as_str().unwrap_or("?").to_string(),
        candidate,
        mode: m["mode"].as_str().map(str::to_string),
        present: m["blocks_present"].as_u64().unwrap_or(0),
        total: m["blocks_total"].as_u64().unwrap_or(0),
    }
}

/// `dovetail ctl ARGS` during an iteration: `Ok` if it succeeded, `Err(output)` otherwise.
fn ctl_try(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = ctl_output(dir, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// After a kill: the candidate's persisted presence map (read offline, as the next start will)
/// must hold at least the blocks it held after the last kill: bits on disk are never lost.
fn check_presence(
    dir: &Path,
    candidate: Option<u64>,
    persisted: &mut Option<(u64, u64)>,
    context: &str,
) {
    let Some(c) = candidate else {
        *persisted = None;
        return;
    };
    let path = dir.join("st").join("maps").join(format!("{c}.map"));
    if !path.exists() {
        // Promoted (the map is removed) or not created yet.
        *persisted = None;
        return;
    }
    let blocks = DISK_SIZE / u64::from(BLOCK);
    let map = dovetail_migrate::presence::PresenceMap::open(&path, blocks, c)
        .unwrap_or_else(|e| panic!("{context}: the presence map after the kill: {e}"));
    let n = map.count();
    if let Some((pc, pn)) = *persisted {
        assert!(
            pc != c || n >= pn,
            "{context}: candidate {c}'s persisted presence map held {pn} blocks after the last \
             kill, {n} after this one: it lost blocks"
        );
    }
    *persisted = Some((c, n));
}

fn iterations() -> usize {
    std::env::var("DOVETAIL_CRASH_ITERATIONS")
        .ok()
        .map(|s| {
            s.trim()
                .parse()
                .expect("DOVETAIL_CRASH_ITERATIONS is a number")
        })
        .unwrap_or(DEFAULT_ITERATIONS)
}

fn workload(seed: u64, stop: Option<Arc<AtomicBool>>) -> Workload {
    let mut w = Workload::new(Pattern::RandRw);
    w.read_percent = 30;
    w.block_size = BLOCK;
    w.iodepth = 4;
    w.queues = 2;
    w.limit = Limit::Time(Duration::from_secs(60));
    w.verify = true;
    w.flush_every = 8;
    w.seed = seed;
    w.timeout = Duration::from_secs(20);
    w.stop = stop;
    w.progress = Some(Arc::new(load::Progress::default()));
    w
}

/// Whether the daemon has died (or does within a second: its sockets close while it exits,
/// a moment before it can be reaped).
fn died(daemon: &mut Daemon) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        if daemon.exited().is_some() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Figures for the summary.
#[derive(Debug, Default)]
struct Tally {
    /// Per crash point: (armed, fired).
    points: BTreeMap<&'static str, (u64, u64)>,
    random_kills: u64,
    died_at_start: u64,
    ops: BTreeMap<String, u64>,
    checks: u64,
    blocks_checked: u64,
    stable_blocks: u64,
    newer_blocks: u64,
    writes: u64,
    flushes: u64,
    promotes: u64,
}

impl Tally {
    fn add_check(&mut self, c: &CrashCheck) {
        self.checks += 1;
        self.blocks_checked += c.checked;
        self.stable_blocks += c.stable;
        self.newer_blocks += c.newer;
    }
}

/// Reads the whole disk back after a crash and checks it against the record.
fn check_disk(
    dir: &Path,
    driver: &dovetail_bench::driver::Driver,
    state: &mut VerifyState,
    tally: &mut Tally,
    context: &str,
) -> Result<(), LoadError> {
    let c = load::check_after_crash(driver, state, 16 << 10)?;
    assert!(
        c.lost.is_empty(),
        "{context}: {} block(s) lost data a FLUSH acknowledged; first: {}\n--- daemon log \
         ---\n{}",
        c.lost.len(),
        c.lost[0],
        log_tail(dir, 60)
    );
    tally.add_check(&c);
    Ok(())
}

/// The binary must have its crash points too (another build of the package without the
/// feature may have replaced it): it refuses an unknown point only if it has them.
fn assert_crash_points_built_in() {
    let probe = std::process::Command::new(serve::bin())
        .args(["store", "check", "/nonexistent"])
        .env("FAILPOINTS", "no-such-point=return")
        .output()
        .expect("run dovetail");
    assert!(
        String::from_utf8_lossy(&probe.stderr).contains("no crash point named"),
        "{} was built without crash points: build it with --features \
         dovetail-backend/failpoints",
        serve::bin()
    );
}

#[test]
fn sigkill_during_the_promote_verification_pass_resumes_it_from_its_cursor() {
    assert_crash_points_built_in();
    const SIZE: usize = 16 << 20;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let st = dir.join("st");
    cli::ok(&["store", "create", cli::path(&st), "--size", "256M"]);
    let mut rng = Rng::new(seed());
    let data: Vec<u8> = (0..SIZE / 8)
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .collect();
    std::fs::write(dir.join("src.img"), &data).expect("source image");
    cli::ok(&[
        "disk",
        "import",
        cli::path(&st),
        "vd",
        "--from",
        cli::path(&dir.join("src.img")),
    ]);
    cli::ok(&[
        "disk",
        "tee",
        cli::path(&st),
        "vd",
        "--candidate",
        "parallax-v2",
        "--policy",
        "mirror-only",
    ]);
    cli::ok(&["migrate", cli::path(&st), "vd"]);
    // 16 pieces of 1 MiB at 4 MiB/s: a checkpoint every second (every ~4 pieces); the 11th
    // piece kills the daemon.
    let mut d = Daemon::start_with_env(
        dir,
        TAG,
        "kill inside the verification pass",
        &[],
        &[("FAILPOINTS", "promote-verify=10*off->return")],
    );
    let r = ctl_try(dir, &["promote", "vd", "--verify-rate", "4M"]);
    assert!(r.is_err(), "the promote must die with the daemon: {r:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.exited().is_none() {
        assert!(Instant::now() < deadline, "the daemon did not die");
        std::thread::sleep(Duration::from_millis(20));
    }
    d.reap("killed inside the verification pass");
    assert!(log_tail(dir, 20).contains("crash point promote-verify"));
    store_check(dir, "after the kill");
    let maps = st.join("maps");
    let record = std::fs::read_dir(&maps)
        .expect("maps/")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "migration"))
        .expect("the migration record holds the cursor");
    let rec = std::fs::read(&record).expect("record");
    let cursor = u64::from_le_bytes(rec[40..48].try_into().expect("8 bytes"));
    assert!(
        cursor > 0 && cursor < (SIZE / 4096) as u64,
        "a checkpointed cursor inside the disk: {cursor}"
    );
    let d = Daemon::start(dir, TAG, "promote again", &[]);
    let out = ctl_ok(dir, &["promote", "vd"]);
    assert!(out.contains("promoted candidate"), "{out}");
    let log = log_tail(dir, 30);
    assert!(
        log.contains(&format!("resuming at block {cursor} of {}", SIZE / 4096)),
        "the pass resumed from its cursor:\n{log}"
    );
    d.terminate();
    let out = dir.join("out.img");
    cli::ok(&[
        "disk",
        "export",
        cli::path(&st),
        "vd",
        "--to",
        cli::path(&out),
    ]);
    assert!(
        std::fs::read(&out).expect("export") == data,
        "the export differs"
    );
    store_check(dir, "after the promote");
}

#[test]
fn sigkill_at_crash_points_and_random_moments_loses_no_flushed_write() {
    assert_crash_points_built_in();
    common::init_logging();
    let seed = seed();
    let iterations = iterations();
    eprintln!("{TAG}: seed {seed} (DOVETAIL_SEED={seed} replays it), {iterations} iterations");
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    serve::two_tier_store(dir, "192M", "1M", "8M", "parallax-v1");
    let socket = dir.join("vd.sock");
    let mut rng = Rng::new(seed);
    let mut state = VerifyState::new(BLOCK, 0, DISK_SIZE / u64::from(BLOCK));
    let mut tally = Tally::default();
    for (name, _) in dovetail_store::failpoint::POINTS {
        if !OWN_TESTS.contains(name) {
            tally.points.insert(name, (0, 0));
        }
    }
    let mut op_turn: BTreeMap<Op, usize> = BTreeMap::new();
    let mut common_turn = 0usize;
    let mut phase_key = (String::new(), None::<u64>, None::<String>);
    let mut in_phase = 0usize;
    // At the last restart: the candidate's version, blocks present, blocks in all.
    let mut last_present: Option<(u64, u64, u64)> = None;
    let mut next_candidate = "parallax-v2";
    // The candidate's persisted presence map after the last kill: (version, blocks).
    let mut persisted: Option<(u64, u64)> = None;

    for it in 0..iterations {
        // The operation of the disk's phase as the last restart saw it chooses the point to
        // arm (the point must be armed when the daemon starts); the operation itself is chosen
        // again from the phase this restart finds (a crash may have moved it on).
        let next_in_phase = if phase_key.0.is_empty() {
            0
        } else {
            in_phase + 1
        };
        let predicted = op_for(&phase_key, next_in_phase, last_present);
        // What to arm: half the time a point of the operation, 30% a write/FLUSH/commit point,
        // 20% none (a SIGKILL at a random moment instead).
        // Operations that are rare (a snapshot, a tee, a promote) always arm one of their own
        // points; of an operation's points, the one that fired least so far.
        let rare = matches!(predicted, Op::Snapshot | Op::Tee | Op::Promote);
        let roll = if rare { 0 } else { rng.below(10) };
        let point: Option<(&'static str, u64)> = if roll < 5 {
            let list = predicted.points();
            let t = op_turn.entry(predicted).or_default();
            *t += 1;
            // The least fired, then the least armed: a point armed when the operation had
            // already finished (e.g. a promote completed by the kill before) comes back.
            let count = |name: &str| tally.points.get(name).map_or((0, 0), |p| (p.1, p.0));
            let least = list.iter().map(|p| count(p.0)).min().unwrap_or((0, 0));
            let ties: Vec<_> = list.iter().filter(|p| count(p.0) == least).collect();
            Some(*ties[*t % ties.len()])
        } else if roll < 8 {
            let p = COMMON[common_turn % COMMON.len()];
            common_turn += 1;
            Some(p)
        } else {
            None
        };
        let armed = point.map(|(name, max)| (name, rng.below(max + 1)));
        let spec = armed.map(|(name, skip)| {
            if skip == 0 {
                format!("{name}=return")
            } else {
                format!("{name}={skip}*off->return")
            }
        });
        let mut context = format!(
            "seed {seed}, iteration {it} ({predicted:?}, {})",
            spec.as_deref().unwrap_or("random kill")
        );
        if let Some((name, _)) = armed {
            tally.points.entry(name).or_default().0 += 1;
        } else {
            tally.random_kills += 1;
        }
        let env: Vec<(&str, &str)> = spec.iter().map(|s| ("FAILPOINTS", s.as_str())).collect();
        let mut daemon = match Daemon::try_start_with_env(
            dir,
            TAG,
            &context,
            &["--mover-interval", "1", "--queues", "2"],
            &env,
        ) {
            Ok(d) => d,
            Err(e) => {
                // A point armed with no skip can fire while the daemon opens the store.
                let (name, _) = armed.unwrap_or_else(|| panic!("{context}: {e}"));
                tally.points.entry(name).or_default().1 += 1;
                tally.died_at_start += 1;
                store_check(dir, &context);
                check_presence(dir, phase_key.1, &mut persisted, &context);
                continue;
            }
        };

        // Where the disk stands after the restart.
        let s = match status(dir) {
            Ok(s) => s,
            Err(e) if died(&mut daemon) => {
                let _ = e;
                if let Some((name, _)) = armed {
                    tally.points.entry(name).or_default().1 += 1;
                }
                daemon.reap("died before its status");
                store_check(dir, &context);
                check_presence(dir, phase_key.1, &mut persisted, &context);
                continue;
            }
            Err(e) => panic!("{context}: ctl status failed: {e}\n{}", log_tail(dir, 40)),
        };
        let disk = disk_of(&s, &context, dir);
        let key = (
            disk.trusted_layout.clone(),
            disk.candidate,
            disk.mode.clone(),
        );
        if key != phase_key {
            phase_key = key;
            in_phase = 0;
        } else {
            in_phase += 1;
        }
        last_present = disk.candidate.map(|c| (c, disk.present, disk.total));
        let op = op_for(&phase_key, in_phase, last_present);
        if op != predicted {
            context = format!("{context}, then {op:?}");
        }

        // The guest: check what survived, then load the disk while the operation runs.
        let stop = Arc::new(AtomicBool::new(false));
        let w = workload(rng.next_u64(), Some(stop.clone()));
        let (driver, device) = match load::connect(&socket, &w) {
            Ok(x) => x,
            Err(e) if died(&mut daemon) => {
                let _ = e;
                if let Some((name, _)) = armed {
                    tally.points.entry(name).or_default().1 += 1;
                }
                daemon.reap("died before the guest connected");
                store_check(dir, &context);
                check_presence(dir, phase_key.1, &mut persisted, &context);
                continue;
            }
            Err(e) => panic!("{context}: connecting: {e}\n{}", log_tail(dir, 40)),
        };
        if let Err(e) = check_disk(dir, &driver, &mut state, &mut tally, &context) {
            // The armed point fired during the check (the copy-out or mover runs at once).
            assert!(
                died(&mut daemon),
                "{context}: reading the disk back failed with the daemon alive: {e}\n{}",
                log_tail(dir, 40)
            );
            if let Some((name, _)) = armed {
                tally.points.entry(name).or_default().1 += 1;
            }
            daemon.reap("died during the check");
            drop(driver);
            store_check(dir, &context);
            check_presence(dir, phase_key.1, &mut persisted, &context);
            continue;
        }

        let kill_after = Duration::from_millis(100 + rng.below(900));
        let op_after = Duration::from_millis(rng.below(300));
        let mut live = Some(daemon);
        let (loaded, fired, op_result) = std::thread::scope(|sc| {
            let state = &mut state;
            let driver = &driver;
            let device = &device;
            let w = &w;
            let h = sc.spawn(move || load::run(driver, device, w, Some(state)));
            let t0 = Instant::now();
            std::thread::sleep(op_after);
            // A promote armed with none of its own points waits for the next iteration, which
            // arms one: otherwise promotes would mostly run unarmed (the candidate becomes
            // complete during a copy-out iteration) and their points would rarely be reached.
            let op_result = if op == Op::Promote && predicted != Op::Promote {
                Ok(None)
            } else {
                run_op(dir, op, &mut next_candidate)
            };
            // Wait for the armed point to kill the daemon, or kill it.
            let deadline = if armed.is_some() {
                Instant::now() + POINT_WAIT
            } else {
                t0 + kill_after
            };
            let mut fired = false;
            let daemon = live.as_mut().expect("the daemon");
            while Instant::now() < deadline {
                if daemon.exited().is_some() {
                    fired = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            fired |= daemon.exited().is_some();
            let daemon = live.take().expect("the daemon");
            if fired {
                daemon.reap("killed itself at the crash point");
            } else {
                // SIGKILL with the guest's requests in flight.
                daemon.kill9();
            }
            stop.store(true, Ordering::Relaxed);
            (h.join(), fired, op_result)
        });
        if let (true, Some((name, _))) = (fired, armed) {
            tally.points.entry(name).or_default().1 += 1;
        }
        eprintln!(
            "{TAG}: {context}: {}",
            if fired {
                "died at the point"
            } else {
                "SIGKILL"
            }
        );
        drop(driver);
        if let Some(p) = &w.progress {
            tally.writes += p.writes.load(Ordering::Relaxed);
            tally.flushes += p.flushes.load(Ordering::Relaxed);
        }
        match loaded.expect("the load thread panicked") {
            Ok(r) => {
                let bad = r.verify.as_ref().map_or(0, |v| v.corrupt.len());
                assert_eq!(bad, 0, "{context}: live reads returned wrong data: {r:?}");
            }
            Err(LoadError::CorruptThenFailed { corrupt, failure }) => panic!(
                "{context}: live reads returned wrong data before the crash ({failure}): {}\n{}",
                corrupt[0],
                log_tail(dir, 40)
            ),
            // The daemon died under the load: expected.
            Err(_) => {}
        }
        match op_result {
            Ok(Some(name)) => *tally.ops.entry(name).or_default() += 1,
            Ok(None) => {}
            Err(e) => assert!(
                fired,
                "{context}: {op:?} failed with the daemon alive: {e}\n{}",
                log_tail(dir, 40)
            ),
        }
        store_check(dir, &context);
        check_presence(dir, phase_key.1, &mut persisted, &context);
    }

    // The end: a clean daemon finishes the migration and promotes; the disk reads back exactly.
    let mut daemon = Daemon::start(
        dir,
        TAG,
        "final",
        &["--mover-interval", "1", "--queues", "2"],
    );
    let s = status(dir).expect("status");
    let disk = disk_of(&s, "final", dir);
    let w = workload(rng.next_u64(), None);
    let (driver, device) = load::connect(&socket, &w).expect("connect");
    check_disk(dir, &driver, &mut state, &mut tally, "final").expect("final check");
    if disk.candidate.is_some() {
        let out = serve::ctl_ok(
            dir,
            &[
                "migrate", "vd", "--mode", "copy-out", "--rate", "0", "--wait",
            ],
        );
        eprintln!("{TAG}: final migration: {}", out.trim());
        run_op(dir, Op::Promote, &mut "parallax-v2").expect("the final promote");
        tally.promotes += 1;
    }
    // Every block known exactly: one pass of checked reads, then a last verify pass.
    let mut pass = workload(rng.next_u64(), None);
    pass.pattern = Pattern::Read;
    pass.limit = Limit::Passes(1);
    pass.flush_every = 0;
    let r = load::run(&driver, &device, &pass, Some(&mut state)).expect("final read pass");
    let v = r.verify.expect("verify summary");
    assert!(
        v.corrupt.is_empty(),
        "after the final promote: {} blocks read back wrong; first {}",
        v.corrupt.len(),
        v.corrupt[0]
    );
    let exact = v.checked;
    drop(driver);
    let _ = daemon.exited();
    daemon.terminate();
    store_check(dir, "after the final clean stop");

    let fired_all: Vec<&str> = tally
        .points
        .iter()
        .filter(|(_, &(_, f))| f == 0)
        .map(|(n, _)| *n)
        .collect();
    eprintln!(
        "{TAG}: seed {seed}: {iterations} iterations in {:.0} s: {} crash-point kills, {} random \
         kills ({} during start-up); {} restarts checked, {} block reads after crashes ({} with \
         a stable write, {} holding a later write), none lost (a loss fails the check at once); {} writes and {} FLUSHes by the \
         guest; operations {:?}; final: {exact} blocks exact",
        started.elapsed().as_secs_f64(),
        tally.points.values().map(|p| p.1).sum::<u64>(),
        tally.random_kills,
        tally.died_at_start,
        tally.checks,
        tally.blocks_checked,
        tally.stable_blocks,
        tally.newer_blocks,
        tally.writes,
        tally.flushes,
        tally.ops,
    );
    for (name, (armed, fired)) in &tally.points {
        eprintln!("{TAG}:   {name:<26} armed {armed:>3}, fired {fired:>3}");
    }
    assert!(
        iterations < DEFAULT_ITERATIONS || fired_all.is_empty(),
        "crash points never reached in {iterations} iterations: {fired_all:?}"
    );
}

/// The operation for a disk in phase `(trusted layout, candidate, migration mode)`, seen
/// `in_phase` restarts in a row; `present` is the candidate's (version, blocks present, total).
fn op_for(
    (layout, cand, mode): &(String, Option<u64>, Option<String>),
    in_phase: usize,
    present: Option<(u64, u64, u64)>,
) -> Op {
    let present_all = present.is_some_and(|(_, p, t)| t > 0 && p == t);
    match (cand, mode.as_deref()) {
        (None, _) if in_phase < PLAIN_ITERATIONS || layout.is_empty() => {
            if layout == "parallax-v2" && in_phase % 2 == 1 {
                Op::TierMove
            } else {
                Op::Snapshot
            }
        }
        (None, _) => Op::Tee,
        (Some(_), _) if present_all => Op::Promote,
        (Some(_), Some("upgrade-on-write")) if in_phase < UOW_ITERATIONS => Op::UpgradeOnWrite,
        // A candidate attached, its migration not started (a crash between the two).
        (Some(_), None) => Op::StartUpgradeOnWrite,
        (Some(_), Some("upgrade-on-write")) => Op::StartCopyOut,
        (Some(_), Some(_)) => Op::CopyOut,
    }
}

/// Performs `op` on the running daemon: `Ok(Some(name))` if an operation ran, `Ok(None)` if the
/// phase needs none, `Err` with the output if it failed.
fn run_op(dir: &Path, op: Op, next_candidate: &mut &'static str) -> Result<Option<String>, String> {
    match op {
        Op::Snapshot => {
            let name = format!(
                "s{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_micros())
                    .unwrap_or(0)
            );
            ctl_try(dir, &["snapshot", "vd", "--name", &name]).map(|_| Some("snapshot".into()))
        }
        Op::TierMove => ctl_try(
            dir,
            &[
                "tiers",
                "vd",
                "--cold-after",
                "1",
                "--hot-accesses",
                "3",
                "--move-now",
            ],
        )
        .map(|_| Some("tier move".into())),
        Op::Tee => {
            ctl_try(
                dir,
                &[
                    "tee",
                    "vd",
                    "--candidate",
                    next_candidate,
                    "--policy",
                    "sync-cross-checks",
                ],
            )?;
            ctl_try(dir, &["migrate", "vd", "--mode", "upgrade-on-write"])?;
            Ok(Some(format!("tee {next_candidate}")))
        }
        Op::StartUpgradeOnWrite => ctl_try(dir, &["migrate", "vd", "--mode", "upgrade-on-write"])
            .map(|_| Some("upgrade-on-write".into())),
        Op::UpgradeOnWrite | Op::CopyOut => Ok(None),
        Op::StartCopyOut => ctl_try(
            dir,
            &["migrate", "vd", "--mode", "copy-out", "--rate", COPY_RATE],
        )
        .map(|_| Some("copy-out".into())),
        Op::Promote => {
            // Snapshots retire with the trusted version: delete them first (more commits).
            let list = ctl_try(dir, &["--json", "snapshots", "vd"])?;
            let v: Value = serde_json::from_str(list.lines().last().unwrap_or(""))
                .map_err(|e| format!("snapshots reply: {e}: {list}"))?;
            for snap in v["snapshots"].as_array().into_iter().flatten() {
                let name = snap["name"].as_str().unwrap_or("");
                ctl_try(dir, &["delete-snapshot", "vd", name])?;
            }
            let r = ctl_try(dir, &["promote", "vd"]).map(|_| Some("promote".into()));
            if r.is_ok() {
                *next_candidate = "parallax-v2";
            }
            r
        }
    }
}

/// Runs the verifying load against the daemon `start` brings up on `DIR/vd.sock`, `rounds`
/// times: each round reads the whole disk back first (every write a FLUSH acknowledged is
/// there, later ones whole or not at all), then loads it until `end` returns (it gets the
/// daemon: it may SIGKILL it, or wait for an armed point to), and the round's daemon must be
/// dead after. A last daemon reads the disk back once more. Returns the tally.
fn load_until_killed(
    dir: &Path,
    what: &str,
    rounds: usize,
    w: impl Fn(usize, u64) -> Workload,
    mut start: impl FnMut(usize) -> std::process::Child,
    mut end: impl FnMut(usize, &mut std::process::Child),
) -> Tally {
    let mut rng = Rng::new(seed());
    let mut state = VerifyState::new(BLOCK, 0, DISK_SIZE / u64::from(BLOCK));
    let mut tally = Tally::default();
    let socket = dir.join("vd.sock");
    for round in 0..=rounds {
        let context = format!("{what}, round {round}");
        let mut child = start(round);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                child.try_wait().expect("try_wait").is_none(),
                "{context}: the daemon exited at start:\n{}",
                log_tail(dir, 40)
            );
            assert!(Instant::now() < deadline, "{context}: no socket");
            std::thread::sleep(Duration::from_millis(5));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let w = w(round, rng.next_u64());
        let w = Workload {
            stop: Some(stop.clone()),
            ..w
        };
        let (driver, device) = load::connect(&socket, &w)
            .unwrap_or_else(|e| panic!("{context}: connecting: {e}\n{}", log_tail(dir, 40)));
        check_disk(dir, &driver, &mut state, &mut tally, &context)
            .unwrap_or_else(|e| panic!("{context}: reading back: {e}\n{}", log_tail(dir, 40)));
        if round == rounds {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        let loaded = std::thread::scope(|sc| {
            let (state, driver, device, w) = (&mut state, &driver, &device, &w);
            let h = sc.spawn(move || load::run(driver, device, w, Some(state)));
            // Stops the load even when `end` fails the test, so the failure shows at once.
            struct StopOnDrop<'a>(&'a AtomicBool);
            impl Drop for StopOnDrop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Relaxed);
                }
            }
            let _stop = StopOnDrop(&stop);
            end(round, &mut child);
            let _ = child.kill();
            let st = child.wait().expect("wait");
            assert!(!st.success(), "{context}: the daemon exited cleanly ({st})");
            stop.store(true, Ordering::Relaxed);
            h.join().expect("the load thread panicked")
        });
        drop(driver);
        if let Some(p) = &w.progress {
            tally.writes += p.writes.load(Ordering::Relaxed);
            tally.flushes += p.flushes.load(Ordering::Relaxed);
        }
        match loaded {
            Ok(r) => {
                let bad = r.verify.as_ref().map_or(0, |v| v.corrupt.len());
                assert_eq!(bad, 0, "{context}: live reads returned wrong data: {r:?}");
            }
            Err(LoadError::CorruptThenFailed { corrupt, failure }) => panic!(
                "{context}: live reads returned wrong data before the crash ({failure}): {}",
                corrupt.len()
            ),
            // Requests cut off by the kill.
            Err(_) => {}
        }
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(dir.join("ctl.sock"));
    }
    tally
}

/// A raw image (`serve --image`) SIGKILLed at random moments under a load that FLUSHes every
/// 8 writes keeps every acknowledged-stable write: the raw layout has no crash points, so the
/// kills come from outside.
#[test]
fn sigkill_of_a_raw_image_under_load_loses_no_flushed_write() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let image = dir.join("disk.img");
    let mut rng = Rng::new(seed() ^ 0x5eed);
    let start = Instant::now();
    let t = load_until_killed(
        dir,
        "raw image",
        3,
        |_, s| workload(s, None),
        |_| {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("serve.log"))
                .expect("log");
            std::process::Command::new(serve::bin())
                .args(["serve", "--image", cli::path(&image), "--size", "8M"])
                .args(["--queues", "2", "--socket", cli::path(&dir.join("vd.sock"))])
                .args(["--control", cli::path(&dir.join("ctl.sock"))])
                .args(serve::test_cache_args())
                .env("RUST_LOG", "info")
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn dovetail serve")
        },
        |_, _| std::thread::sleep(Duration::from_millis(150 + rng.below(450))),
    );
    assert!(t.flushes > 0 && t.stable_blocks > 0, "{t:?}");
    eprintln!(
        "{TAG}: raw: 3 SIGKILLs, writes={} flushes={} blocks checked={} stable={} newer={} \
         ({:.1} s)",
        t.writes,
        t.flushes,
        t.blocks_checked,
        t.stable_blocks,
        t.newer_blocks,
        start.elapsed().as_secs_f64()
    );
}

/// parallax-v2 commits on a timer too (every 5 s, annotations and tree), with no FLUSH asking
/// for it. Round 0 loads the disk with FLUSHes and is SIGKILLed; round 1 loads it without any
/// FLUSH, so the only commit is the timer's, and the daemon dies inside it
/// (`parallax-commit-synced`: nodes written and synced, root not yet). After each: the store
/// is consistent and every write a FLUSH acknowledged reads back.
#[test]
fn sigkill_inside_a_parallax_v2_timer_commit_loses_no_flushed_write() {
    assert_crash_points_built_in();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let st = dir.join("st");
    cli::ok(&["store", "create", cli::path(&st), "--size", "256M"]);
    cli::ok(&[
        "disk",
        "create",
        cli::path(&st),
        "vd",
        "--size",
        "8M",
        "--layout",
        "parallax-v2",
    ]);
    let start = Instant::now();
    let t = load_until_killed(
        dir,
        "parallax-v2 timer commit",
        2,
        |round, s| Workload {
            flush_every: if round == 1 { 0 } else { 8 },
            ..workload(s, None)
        },
        |round| {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("serve.log"))
                .expect("log");
            let mut cmd = std::process::Command::new(serve::bin());
            cmd.args(["serve", "--store", cli::path(&st)])
                .args(["--disk", &format!("vd={}", cli::path(&dir.join("vd.sock")))])
                .args(["--queues", "2"])
                .args(["--control", cli::path(&dir.join("ctl.sock"))])
                .args(serve::test_cache_args())
                .env("RUST_LOG", "info")
                .stdout(std::process::Stdio::null())
                .stderr(log);
            if round == 1 {
                cmd.env("FAILPOINTS", "parallax-commit-synced=return");
            }
            cmd.spawn().expect("spawn dovetail serve")
        },
        |round, child| {
            if round == 0 {
                std::thread::sleep(Duration::from_millis(400));
                return;
            }
            // The timer's commit kills the daemon within its period (5 s) and a margin.
            let deadline = Instant::now() + Duration::from_secs(8);
            while child.try_wait().expect("try_wait").is_none() {
                assert!(
                    Instant::now() < deadline,
                    "no timer commit within 8 s:\n{}",
                    log_tail(dir, 30)
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(
                log_tail(dir, 20).contains("crash point parallax-commit-synced"),
                "died elsewhere:\n{}",
                log_tail(dir, 30)
            );
            store_check(dir, "after the kill inside the timer commit");
        },
    );
    store_check(dir, "at the end");
    assert!(t.stable_blocks > 0, "{t:?}");
    eprintln!(
        "{TAG}: parallax-v2 timer commit: writes={} flushes={} blocks checked={} stable={} \
         newer={} ({:.1} s)",
        t.writes,
        t.flushes,
        t.blocks_checked,
        t.stable_blocks,
        t.newer_blocks,
        start.elapsed().as_secs_f64()
    );
}
