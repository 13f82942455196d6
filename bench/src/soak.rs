//! `dovetail-bench soak --minutes N`: everything at once, for a long time, with nothing lost.
//!
//! Two release daemons: `serve --image` for a raw disk, and `serve --store DIR --control CTL
//! --allow-fault-injection` over a two-tier store (`fast` and `slow` data files) for seven
//! disks: parallax-v1 (two, one of them on two queues), parallax-v2, a tiered parallax-v2
//! (hot data in two copies, cold data compressed, the mover every 5 s), parallax-v1 teed to a
//! parallax-v2 candidate and parallax-v2 teed to parallax-v2 (each with a copy-out running: when
//! one completes the candidate is dropped and a new one attached and copied out again), and a
//! parallax-v1 disk whose parallax-v1 candidate carries a fault rule (`eio` with a probability)
//! that is turned on and off (`tee` with the rule, `untee`) every `--fault-every`.
//!
//! Each disk has a load generator in verify mode (random 4 KiB reads and writes, a FLUSH every
//! 8 to 128 writes, drawn anew every epoch): every read is checked against what was
//! acknowledged. Every minute each store disk gets a snapshot (the two newest are kept, older
//! ones deleted); every `--abuse-every` the control socket gets a burst of bad lines over many
//! connections at once (not JSON, unknown commands, duplicate fields, a line over the limit,
//! unknown disks, a shrink, a relative socket path, half a line then a hang-up), each of which
//! must be refused, after which `hello` must still answer. Every `--kill-every` both daemons
//! get SIGKILL with the load running, are started again, and every block of every disk is
//! read back: a write a FLUSH acknowledged must be there (anything newer may or may not be).
//!
//! The store daemon runs with `--store-faults` (the store's own fault layer under its tier
//! files; a daemon built with `--features dovetail-backend/failpoints`): every
//! `--store-fault-every` one load epoch is a store-fault epoch, the faults switched on (`ctl
//! store-faults on`) for a few seconds from 2 s in and off at least 10 s before its end. Its
//! loads run with durability unknown (`Workload::durability_unknown`: the failed-sync rule may
//! reopen any version from its last commit, so a read may hold the stable write or any later
//! one issued; a write that got IOERR left the old or the new data; a FLUSH makes nothing
//! stable), and the epoch ends with a FLUSH of every store disk (retried while the reopens
//! finish) and a read-back of every block, checked and settled as after a kill.
//!
//! The daemons' RSS and descriptor counts are sampled every few seconds into a CSV and drawn
//! into a PNG. Lost or wrong blocks, or a bad line the daemon accepted, fail the run.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::compare::{CompareError, Daemon};
use crate::layouts::dovetail_cmd;
use crate::load::{self, Limit, LoadError, Pattern, Progress, Workload};
use crate::verify::VerifyState;

/// What a soak disk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// `serve --image`, its own daemon.
    Raw,
    ParallaxV1,
    ParallaxV2,
    /// parallax-v2 with a tiering policy: hot data in two copies, cold data compressed.
    Tiered,
    /// Teed to a candidate of the given layout, a copy-out running.
    TeedCopyOut(&'static str),
    /// Teed to a parallax-v1 candidate whose fault rule is turned on and off.
    TeedFaults,
}

impl Kind {
    fn layout(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::ParallaxV1 | Kind::TeedFaults => "parallax-v1",
            Kind::ParallaxV2 | Kind::Tiered => "parallax-v2",
            Kind::TeedCopyOut(_) => "parallax-v1",
        }
    }
}

/// The eight disks: name, kind, queues, trusted layout for teed ones.
pub fn disks() -> Vec<(String, Kind, usize, &'static str)> {
    vec![
        ("raw".into(), Kind::Raw, 1, "raw"),
        ("v1".into(), Kind::ParallaxV1, 1, "parallax-v1"),
        ("v1q2".into(), Kind::ParallaxV1, 2, "parallax-v1"),
        ("v2".into(), Kind::ParallaxV2, 1, "parallax-v2"),
        ("tiered".into(), Kind::Tiered, 1, "parallax-v2"),
        (
            "tee-v1-v2".into(),
            Kind::TeedCopyOut("parallax-v2"),
            1,
            "parallax-v1",
        ),
        (
            "tee-v2-v2".into(),
            Kind::TeedCopyOut("parallax-v2"),
            1,
            "parallax-v2",
        ),
        ("tee-faults".into(), Kind::TeedFaults, 1, "parallax-v1"),
    ]
}

fn disks_trusted(name: &str) -> &'static str {
    disks()
        .into_iter()
        .find(|d| d.0 == name)
        .map_or("?", |d| d.3)
}

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub dovetail: PathBuf,
    pub dir: PathBuf,
    pub duration: Duration,
    pub kill_every: Duration,
    pub snapshot_every: Duration,
    pub fault_every: Duration,
    pub abuse_every: Duration,
    pub sample_every: Duration,
    /// Size of each disk.
    pub size: u64,
    /// Requests in flight per queue.
    pub iodepth: u16,
    /// The copy-outs' rate, bytes/s.
    pub copy_rate: u64,
    /// The fault rule the faulty candidate carries while faults are on.
    pub fault_rule: String,
    /// `serve --cache` for the store daemon.
    pub cache: Option<String>,
    pub seed: u64,
    /// The store daemon's `serve --store-faults` rules (`None`: no store faults; the daemon
    /// must then be built with `--features dovetail-backend/failpoints`).
    pub store_faults: Option<String>,
    /// How often a load epoch is a store-fault epoch (faults on for `store_fault_for`).
    pub store_fault_every: Duration,
    pub store_fault_for: Duration,
}

/// The store faults of a soak unless it says otherwise: failed syncs (the failed-sync rule:
/// every version with unsynced writes is reopened from its last commit), EIO on a few data
/// writes, and slow I/O. Not `lose=true`: a read racing a sync failure that loses the
/// unsynced writes can return the lost block's junk before the daemon can know
/// (RELIABILITY.md, *The soak*), which the verifier counts as wrong.
pub const DEFAULT_STORE_FAULTS: &str =
    "eio:op=sync,prob=0.05;eio:op=write,prob=0.001;slow:ms=20,prob=0.02";

impl SoakOptions {
    pub fn new(dovetail: PathBuf, dir: PathBuf, duration: Duration) -> SoakOptions {
        // At least two kills in any run, at most one every three minutes.
        let kill_every = (duration / 3).min(Duration::from_secs(180));
        SoakOptions {
            dovetail,
            dir,
            duration,
            kill_every,
            snapshot_every: Duration::from_secs(60),
            fault_every: Duration::from_secs(15),
            abuse_every: Duration::from_secs(10),
            sample_every: Duration::from_secs(5),
            size: 64 << 20,
            iodepth: 4,
            copy_rate: 4 << 20,
            fault_rule: "eio:prob=0.02".into(),
            cache: None,
            seed: 1,
            store_faults: Some(DEFAULT_STORE_FAULTS.into()),
            store_fault_every: Duration::from_secs(90),
            store_fault_for: Duration::from_secs(5),
        }
    }
}

/// One sample of a daemon's footprint.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub seconds: f64,
    pub daemon: &'static str,
    pub pid: u32,
    pub rss_kib: u64,
    pub fds: usize,
    pub threads: usize,
}

/// One disk's totals.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DiskTotals {
    pub name: String,
    pub layout: String,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub io_errors: u64,
    /// Blocks checked by reads during the load.
    pub blocks_checked: u64,
    /// Blocks read back and checked after the kills.
    pub blocks_checked_after_kills: u64,
    /// Of those, blocks that held a write a FLUSH had acknowledged.
    pub stable_blocks_after_kills: u64,
    /// Blocks read back and checked after the store-fault epochs (as after a crash).
    pub blocks_checked_after_faults: u64,
    pub wrong: u64,
    pub lost: u64,
    /// Load runs that ended with an error other than the daemon's death.
    pub run_errors: u64,
    pub first_problem: Option<String>,
}

/// Everything a run did and found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SoakResult {
    pub seconds: f64,
    pub epochs: u64,
    pub kills: u64,
    pub snapshots: u64,
    pub snapshots_deleted: u64,
    pub fault_toggles: u64,
    /// Candidate errors the faulty Tee counted (injected EIOs it saw), summed before each untee.
    pub faults_injected: u64,
    pub quarantines: u64,
    pub copy_outs_completed: u64,
    pub abuse_connections: u64,
    pub abuse_lines: u64,
    /// Bad lines the daemon answered `ok` (must be 0).
    pub abuse_accepted: u64,
    /// `hello` after a burst that did not answer (must be 0).
    pub hello_failures: u64,
    /// Control calls of the soak's own (snapshot, tee, ...) that failed.
    pub control_errors: u64,
    pub first_control_error: Option<String>,
    /// Of `control_errors`, those in store-fault epochs (a snapshot whose sync failed, ...).
    pub control_errors_in_fault_epochs: u64,
    /// Store-fault windows (faults switched on, then off).
    pub store_fault_windows: u64,
    /// The store's own faults injected (`ctl store-faults` counts, summed over daemon lives).
    pub store_faults: StoreFaultTotals,
    /// `sync-failed` events: a version reopened from its last commit after a failed sync.
    pub reopens_after_failed_sync: u64,
    /// Teed disks whose candidate a reopen quarantined, attached and copied out anew.
    pub candidates_renewed: u64,
    pub disks: Vec<DiskTotals>,
    pub samples: Vec<Sample>,
}

/// The store's faults injected, as `ctl store-faults` counts them.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StoreFaultTotals {
    pub total: u64,
    pub eio: u64,
    pub slow: u64,
    pub slow_ms: u64,
    pub failed_syncs: u64,
    pub failed_writes: u64,
    pub lost_syncs: u64,
}

impl StoreFaultTotals {
    fn of(v: &Value) -> StoreFaultTotals {
        let c = &v["counts"];
        let n = |k: &str| c[k].as_u64().unwrap_or(0);
        StoreFaultTotals {
            total: n("total"),
            eio: n("eio"),
            slow: n("slow"),
            slow_ms: n("slow_ms"),
            failed_syncs: n("syncs"),
            failed_writes: n("writes"),
            lost_syncs: n("lost_syncs"),
        }
    }

    fn add_since(&mut self, now: &StoreFaultTotals, before: &StoreFaultTotals) {
        self.total += now.total.saturating_sub(before.total);
        self.eio += now.eio.saturating_sub(before.eio);
        self.slow += now.slow.saturating_sub(before.slow);
        self.slow_ms += now.slow_ms.saturating_sub(before.slow_ms);
        self.failed_syncs += now.failed_syncs.saturating_sub(before.failed_syncs);
        self.failed_writes += now.failed_writes.saturating_sub(before.failed_writes);
        self.lost_syncs += now.lost_syncs.saturating_sub(before.lost_syncs);
    }
}

impl SoakResult {
    pub fn requests(&self) -> u64 {
        self.disks
            .iter()
            .map(|d| d.reads + d.writes + d.flushes)
            .sum()
    }

    pub fn bytes_verified(&self) -> u64 {
        self.disks
            .iter()
            .map(|d| {
                (d.blocks_checked + d.blocks_checked_after_kills + d.blocks_checked_after_faults)
                    * 4096
            })
            .sum()
    }

    pub fn lost(&self) -> u64 {
        self.disks.iter().map(|d| d.lost).sum()
    }

    pub fn wrong(&self) -> u64 {
        self.disks.iter().map(|d| d.wrong).sum()
    }

    /// Whether the run found nothing wrong.
    pub fn passed(&self) -> bool {
        self.lost() == 0
            && self.wrong() == 0
            && self.abuse_accepted == 0
            && self.hello_failures == 0
            && self.disks.iter().all(|d| d.run_errors == 0)
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CompareError {
    let what = what.into();
    move |source| CompareError::Io { what, source }
}

/// One request on a fresh control connection; the reply, whatever it says.
fn ctl(path: &Path, req: &Value) -> Result<Value, String> {
    let s = UnixStream::connect(path).map_err(|e| format!("connect {}: {e}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    w.write_all(format!("{req}\n").as_bytes())
        .map_err(|e| format!("send {req}: {e}"))?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("reply to {req}: {e}"))?;
    serde_json::from_str(&line).map_err(|e| format!("reply to {req}: {line:?}: {e}"))
}

/// [`ctl`], an error unless the reply is `ok`.
fn ctl_ok(path: &Path, req: Value) -> Result<Value, String> {
    let r = ctl(path, &req)?;
    if r["ok"] == json!(true) {
        Ok(r)
    } else {
        Err(format!("{req}: {}", r["error"]))
    }
}

fn footprint(pid: u32) -> Option<(u64, usize, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((field("VmRSS:")?, fds, field("Threads:")? as usize))
}

/// The bad lines of an abuse burst; every one must be refused.
fn bad_lines() -> Vec<Vec<u8>> {
    vec![
        b"this is not json\n".to_vec(),
        b"{\"cmd\":\"no-such-command\"}\n".to_vec(),
        b"{\"cmd\":\"status\",\"cmd\":\"hello\"}\n".to_vec(),
        b"[1,2,3]\n".to_vec(),
        b"{\"v\":2,\"cmd\":\"hello\"}\n".to_vec(),
        b"{\"cmd\":\"snapshot\",\"disk\":\"no-such-disk\"}\n".to_vec(),
        b"{\"cmd\":\"attach\",\"disk\":\"v1\",\"socket\":\"relative.sock\"}\n".to_vec(),
        b"{\"cmd\":\"resize\",\"disk\":\"v1\",\"size\":4096}\n".to_vec(),
        b"{\"cmd\":\"disk-delete\",\"disk\":\"v1\"}\n".to_vec(),
        b"{\"cmd\":\"status\",\"disk\":\"v1\",\"extra\":1}\n".to_vec(),
        b"\x00\xff\xfe binary \x01\n".to_vec(),
        b"{\"cmd\":\"tiers\",\"disk\":\"tiered\",\"class\":\"hot\",\"copies\":9}\n".to_vec(),
        {
            let mut l = vec![b'{'; 70_000];
            l.push(b'\n');
            l
        },
    ]
}

#[derive(Debug, Default)]
struct Abuse {
    connections: u64,
    lines: u64,
    accepted: u64,
    hello_failed: bool,
    first_accepted: Option<String>,
}

/// Many connections at once, a bad line on each, then `hello`.
fn abuse(control: &Path, round: u64) -> Abuse {
    let lines = bad_lines();
    let mut out = Abuse::default();
    let mut conns = Vec::new();
    for i in 0..24u64 {
        let Ok(s) = UnixStream::connect(control) else {
            continue;
        };
        out.connections += 1;
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
        let line = &lines[((round * 24 + i) % lines.len() as u64) as usize];
        let mut w = &s;
        if w.write_all(line).is_ok() {
            out.lines += 1;
        }
        conns.push((s, line.clone()));
    }
    // Half a line, then a hang-up.
    if let Ok(mut s) = UnixStream::connect(control) {
        out.connections += 1;
        let _ = s.write_all(b"{\"cmd\":\"hel");
    }
    for (s, line) in conns {
        let mut reply = String::new();
        let _ = BufReader::new(&s).read_line(&mut reply);
        if let Ok(v) = serde_json::from_str::<Value>(&reply) {
            if v["ok"] == json!(true) {
                out.accepted += 1;
                out.first_accepted.get_or_insert_with(|| {
                    format!(
                        "{} -> {reply}",
                        String::from_utf8_lossy(&line[..line.len().min(80)])
                    )
                });
            }
        }
        drop(s);
    }
    // A connection that reads nothing back while sending a lot.
    if let Ok(mut s) = UnixStream::connect(control) {
        out.connections += 1;
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        for _ in 0..64 {
            if s.write_all(b"{\"cmd\":\"hello\"}\n").is_err() {
                break;
            }
        }
        let mut sink = [0u8; 64];
        let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
        let _ = s.read(&mut sink);
    }
    out.hello_failed = ctl_ok(control, json!({"cmd": "hello"})).is_err();
    out
}

struct Daemons {
    raw: Option<Daemon>,
    store: Option<Daemon>,
}

fn start_raw(o: &SoakOptions, start: u64) -> Result<Daemon, CompareError> {
    let mut cmd = Command::new(&o.dovetail);
    cmd.arg("serve")
        .arg("--image")
        .arg(o.dir.join("raw.img"))
        .arg("--socket")
        .arg(o.dir.join("raw.sock"));
    let log = o.dir.join(format!("raw-daemon.{start}.log"));
    Daemon::spawn("dovetail", cmd, &o.dir.join("raw.sock"), &log, None)
}

fn start_store(o: &SoakOptions, start: u64) -> Result<Daemon, CompareError> {
    let mut cmd = Command::new(&o.dovetail);
    cmd.arg("serve")
        .arg("--store")
        .arg(o.dir.join("store"))
        .arg("--control")
        .arg(o.dir.join("control.sock"))
        .arg("--allow-fault-injection")
        .arg("--mover-interval")
        .arg("5");
    if let Some(c) = &o.cache {
        cmd.arg("--cache").arg(c);
    }
    if let Some(rules) = &o.store_faults {
        // Off until the soak switches them on (`ctl store-faults on`).
        cmd.arg("--store-faults").arg(rules);
    }
    let log = o.dir.join(format!("store-daemon.{start}.log"));
    Daemon::spawn("dovetail", cmd, &o.dir.join("control.sock"), &log, None)
}

fn kill9(d: &Daemon) {
    // SAFETY: kill only sends a signal; the pid is our own child, not yet reaped.
    unsafe { libc::kill(d.pid() as libc::pid_t, libc::SIGKILL) };
}

/// Connects the load generator to `socket`, retrying while the daemon comes up.
fn connect(socket: &Path, w: &Workload) -> Result<(crate::driver::Driver, load::Device), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match load::connect(socket, w) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("connect {}: {e}", socket.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn workload(o: &SoakOptions, queues: usize, seed: u64) -> Workload {
    Workload {
        read_percent: 50,
        iodepth: o.iodepth,
        queues,
        limit: Limit::Time(Duration::from_secs(24 * 3600)),
        verify: true,
        seed,
        timeout: Duration::from_secs(60),
        ..Workload::new(Pattern::RandRw)
    }
}

/// Sets up the store, the disks and the daemons.
fn setup(o: &SoakOptions) -> Result<Daemons, CompareError> {
    let _ = std::fs::remove_dir_all(&o.dir);
    std::fs::create_dir_all(&o.dir).map_err(io(format!("create {}", o.dir.display())))?;
    let img = o.dir.join("raw.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(o.size))
        .map_err(io(format!("create {}", img.display())))?;
    let store = o.dir.join("store");
    // Seven disks, up to three versions each (trusted, candidate, a new candidate while the old
    // one's extents are released), two copies of hot data on the tiered one, snapshots.
    let extent = 16u64 << 20;
    let per_disk = o.size.div_ceil(extent) * extent;
    let fast = per_disk * 24 + 16 * extent;
    let slow = per_disk * 8 + 8 * extent;
    dovetail_cmd(
        &o.dovetail,
        &[
            "store".into(),
            "create".into(),
            store.display().to_string(),
            "--extent-size".into(),
            "16M".into(),
            "--tier".into(),
            format!("fast={}:{fast}", store.join("data.fast").display()),
            "--tier".into(),
            format!("slow={}:{slow}", store.join("data.slow").display()),
        ],
    )?;
    let daemons = Daemons {
        raw: Some(start_raw(o, 0)?),
        store: Some(start_store(o, 0)?),
    };
    let control = o.dir.join("control.sock");
    let fail = |e: String| CompareError::Pause(format!("soak setup: {e}"));
    for (name, kind, queues, trusted) in disks() {
        if kind == Kind::Raw {
            continue;
        }
        ctl_ok(
            &control,
            json!({"cmd": "disk-create", "disk": name, "size": o.size, "layout": trusted}),
        )
        .map_err(fail)?;
        ctl_ok(
            &control,
            json!({"cmd": "attach", "disk": name, "queues": queues,
                   "socket": o.dir.join(format!("{name}.sock"))}),
        )
        .map_err(fail)?;
        match kind {
            Kind::Tiered => {
                ctl_ok(
                    &control,
                    json!({"cmd": "tiers", "disk": name, "class": "hot", "copies": 2}),
                )
                .map_err(fail)?;
                ctl_ok(
                    &control,
                    json!({"cmd": "tiers", "disk": name, "cold_after_secs": 10}),
                )
                .map_err(fail)?;
            }
            Kind::TeedCopyOut(candidate) => {
                tee_and_copy(&control, &name, candidate, o.copy_rate).map_err(fail)?;
            }
            Kind::TeedFaults => {
                ctl_ok(
                    &control,
                    json!({"cmd": "tee", "disk": name, "candidate": "parallax-v1",
                           "policy": "sync-cross-checks", "faults": [o.fault_rule]}),
                )
                .map_err(fail)?;
            }
            _ => {}
        }
    }
    Ok(daemons)
}

fn tee_and_copy(control: &Path, disk: &str, candidate: &str, rate: u64) -> Result<(), String> {
    ctl_ok(
        control,
        json!({"cmd": "tee", "disk": disk, "candidate": candidate, "policy": "sync-cross-checks"}),
    )?;
    ctl_ok(
        control,
        json!({"cmd": "migrate", "disk": disk, "mode": "copy-out", "rate": rate}),
    )?;
    Ok(())
}

/// What the controller does between load epochs' starts and ends.
struct Controller<'a> {
    o: &'a SoakOptions,
    control: PathBuf,
    r: &'a mut SoakResult,
    snap_seq: u64,
    abuse_round: u64,
    /// Whether this epoch is a store-fault epoch.
    fault_epoch: bool,
}

impl Controller<'_> {
    fn note(&mut self, e: String) {
        self.r.control_errors += 1;
        if self.fault_epoch {
            // Expected: a snapshot or a migration whose sync the faults failed.
            self.r.control_errors_in_fault_epochs += 1;
            eprintln!("soak: control (store faults on): {e}");
            return;
        }
        eprintln!("soak: control: {e}");
        self.r.first_control_error.get_or_insert(e);
    }

    fn snapshots(&mut self) {
        self.snap_seq += 1;
        for (name, kind, _, _) in disks() {
            if kind == Kind::Raw {
                continue;
            }
            let snap = format!("soak-{}", self.snap_seq);
            match ctl_ok(
                &self.control,
                json!({"cmd": "snapshot", "disk": name, "name": snap}),
            ) {
                Ok(_) => self.r.snapshots += 1,
                Err(e) => self.note(e),
            }
            let list = match ctl_ok(&self.control, json!({"cmd": "snapshots", "disk": name})) {
                Ok(l) => l,
                Err(e) => {
                    self.note(e);
                    continue;
                }
            };
            let mut names: Vec<(u64, String)> = list["result"]["snapshots"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| Some((s["generation"].as_u64()?, s["name"].as_str()?.to_string())))
                .collect();
            names.sort();
            let keep = 2;
            for (_, old) in names.iter().take(names.len().saturating_sub(keep)) {
                match ctl_ok(
                    &self.control,
                    json!({"cmd": "delete-snapshot", "disk": name, "name": old}),
                ) {
                    Ok(_) => self.r.snapshots_deleted += 1,
                    Err(e) => self.note(e),
                }
            }
        }
    }

    fn toggle_faults(&mut self) {
        for (name, kind, _, _) in disks() {
            if kind != Kind::TeedFaults {
                continue;
            }
            let st = match ctl_ok(&self.control, json!({"cmd": "status", "disk": name})) {
                Ok(s) => s,
                Err(e) => {
                    self.note(e);
                    continue;
                }
            };
            let cand = &st["result"]["disks"][0]["candidate"];
            let res = if cand.is_null() {
                ctl_ok(
                    &self.control,
                    json!({"cmd": "tee", "disk": name, "candidate": "parallax-v1",
                           "policy": "sync-cross-checks", "faults": [self.o.fault_rule]}),
                )
            } else {
                self.r.faults_injected +=
                    cand["counters"]["candidate_errors"].as_u64().unwrap_or(0);
                if cand["state"] == json!("quarantined") {
                    self.r.quarantines += 1;
                }
                ctl_ok(&self.control, json!({"cmd": "untee", "disk": name}))
            };
            match res {
                Ok(_) => self.r.fault_toggles += 1,
                Err(e) => self.note(e),
            }
        }
    }

    fn copy_outs(&mut self) {
        for (name, kind, _, _) in disks() {
            let Kind::TeedCopyOut(candidate) = kind else {
                continue;
            };
            let st = match ctl_ok(
                &self.control,
                json!({"cmd": "migrate", "disk": name, "action": "status"}),
            ) {
                Ok(s) => s,
                Err(e) if e.contains("has no candidate") => {
                    // A reopen after a failed sync dropped the quarantined candidate: a new
                    // one, copied out again.
                    match tee_and_copy(&self.control, &name, candidate, self.o.copy_rate) {
                        Ok(()) => self.r.candidates_renewed += 1,
                        Err(e) => self.note(e),
                    }
                    continue;
                }
                Err(e) => {
                    self.note(e);
                    continue;
                }
            };
            let state = st["result"]["migration"]["copy_out"]["state"]
                .as_str()
                .unwrap_or("none")
                .to_string();
            let res = match state.as_str() {
                "running" | "paused" => Ok(()),
                "done" => {
                    self.r.copy_outs_completed += 1;
                    ctl_ok(&self.control, json!({"cmd": "untee", "disk": name})).and_then(|_| {
                        tee_and_copy(&self.control, &name, candidate, self.o.copy_rate)
                    })
                }
                _ => ctl_ok(
                    &self.control,
                    json!({"cmd": "migrate", "disk": name, "mode": "copy-out",
                           "rate": self.o.copy_rate}),
                )
                .map(|_| ())
                .or_else(|e| {
                    // A reopen after a failed sync quarantined the candidate and stopped its
                    // copy-out: drop it and start over with a new one.
                    let renewed = ctl_ok(&self.control, json!({"cmd": "untee", "disk": name}))
                        .and_then(|_| {
                            tee_and_copy(&self.control, &name, candidate, self.o.copy_rate)
                        });
                    match renewed {
                        Ok(()) => {
                            self.r.candidates_renewed += 1;
                            Ok(())
                        }
                        Err(e2) => Err(format!("{e}; then {e2}")),
                    }
                }),
            };
            if let Err(e) = res {
                self.note(e);
            }
        }
    }

    fn abuse(&mut self) {
        self.abuse_round += 1;
        let a = abuse(&self.control, self.abuse_round);
        self.r.abuse_connections += a.connections;
        self.r.abuse_lines += a.lines;
        self.r.abuse_accepted += a.accepted;
        if let Some(f) = a.first_accepted {
            eprintln!("soak: the daemon accepted a bad line: {f}");
        }
        if a.hello_failed {
            self.r.hello_failures += 1;
            eprintln!("soak: hello failed after an abuse burst");
        }
    }
}

fn sample(r: &mut SoakResult, started: Instant, d: &Daemons) {
    let t = started.elapsed().as_secs_f64();
    for (name, daemon) in [("store", &d.store), ("raw", &d.raw)] {
        if let Some(daemon) = daemon {
            if let Some((rss_kib, fds, threads)) = footprint(daemon.pid()) {
                r.samples.push(Sample {
                    seconds: t,
                    daemon: name,
                    pid: daemon.pid(),
                    rss_kib,
                    fds,
                    threads,
                });
            }
        }
    }
}

/// What the soak knows of the store daemon's current life.
#[derive(Debug, Default)]
struct Life {
    /// Its fault counts when last read (they start at 0 with each daemon).
    counts: StoreFaultTotals,
    /// The last event it reported that was counted.
    event_seq: u64,
}

/// `ctl store-faults on|off`; adds the faults injected since the last reply to the totals.
/// Returns whether the faults are on now.
fn switch_store_faults(c: &mut Controller<'_>, life: &mut Life, on: bool) -> bool {
    let action = if on { "on" } else { "off" };
    match ctl_ok(&c.control, json!({"cmd": "store-faults", "action": action})) {
        Ok(reply) => {
            let now = StoreFaultTotals::of(&reply["result"]);
            c.r.store_faults.add_since(&now, &life.counts);
            life.counts = now;
            eprintln!(
                "soak: store faults {action} (so far: {} injected, {} failed syncs, {} failed \
                 writes, {} slowed)",
                c.r.store_faults.total,
                c.r.store_faults.failed_syncs,
                c.r.store_faults.failed_writes,
                c.r.store_faults.slow
            );
            reply["result"]["enabled"] == json!(true)
        }
        Err(e) => {
            // Counted as an error of the soak's own (not of a fault epoch's).
            c.r.control_errors += 1;
            eprintln!("soak: control: {e}");
            c.r.first_control_error.get_or_insert(e);
            // If `off` failed, try again at the next turn.
            !on
        }
    }
}

/// After a store-fault epoch (the faults off, the loads stopped): each store disk gets a
/// FLUSH (retried while recoveries finish: the failed-sync rule says the disk serves and
/// flushes again once the device does) and then every block is read back and checked as after
/// a crash: what an earlier FLUSH made stable must be there, anything newer issued may be. The
/// record is settled on what the blocks hold (durable now: the FLUSH came after the last
/// write). Then counts the `sync-failed` events (reopens from the last commit).
fn read_back_after_faults(
    o: &SoakOptions,
    control: &Path,
    r: &mut SoakResult,
    states: &mut [VerifyState],
    life: &mut Life,
) {
    for (i, (name, kind, queues, _)) in disks().into_iter().enumerate() {
        if kind == Kind::Raw {
            continue;
        }
        let w = workload(o, queues, 0);
        let socket = o.dir.join(format!("{name}.sock"));
        let t = &mut r.disks[i];
        let checked = connect(&socket, &w).and_then(|(driver, _)| {
            let mut failed = 0;
            loop {
                match load::flush(&driver) {
                    Ok(true) => break,
                    Ok(false) if failed < 40 => {
                        failed += 1;
                        std::thread::sleep(Duration::from_millis(250));
                    }
                    Ok(false) => {
                        return Err(format!(
                            "FLUSH still failing 10 s after the store faults were switched off \
                             ({failed} failures)"
                        ))
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            if failed > 0 {
                eprintln!("soak: disk {name}: {failed} FLUSH(es) failed after the faults went off");
            }
            load::check_after_crash(&driver, &mut states[i], 1 << 20).map_err(|e| e.to_string())
        });
        match checked {
            Ok(c) => {
                t.blocks_checked_after_faults += c.checked;
                t.lost += c.lost.len() as u64;
                if let Some(l) = c.lost.first() {
                    t.first_problem
                        .get_or_insert(format!("lost after store faults: {l}"));
                }
            }
            Err(e) => {
                t.run_errors += 1;
                eprintln!("soak: disk {name}: after store faults: {e}");
                t.first_problem.get_or_insert(e);
            }
        }
    }
    match ctl_ok(control, json!({"cmd": "events", "since": life.event_seq})) {
        Ok(reply) => {
            for e in reply["result"]["events"].as_array().into_iter().flatten() {
                if e["kind"] == json!("sync-failed") {
                    r.reopens_after_failed_sync += 1;
                }
                life.event_seq = life.event_seq.max(e["seq"].as_u64().unwrap_or(0));
            }
        }
        Err(e) => {
            r.control_errors += 1;
            eprintln!("soak: control: {e}");
            r.first_control_error.get_or_insert(e);
        }
    }
}

/// How one disk's load epoch ended.
struct EpochOut {
    reads: u64,
    writes: u64,
    flushes: u64,
    result: Result<load::Report, LoadError>,
}

/// Runs the soak (module docs).
pub fn run(o: &SoakOptions) -> Result<SoakResult, CompareError> {
    let started = Instant::now();
    let mut daemons = setup(o)?;
    let disks = disks();
    let control = o.dir.join("control.sock");
    let socket = |name: &str| o.dir.join(format!("{name}.sock"));
    let mut r = SoakResult {
        disks: disks
            .iter()
            .map(|(n, k, _, _)| DiskTotals {
                name: n.clone(),
                layout: match k {
                    Kind::TeedCopyOut(c) => format!("{} teed to {c}, copy-out", disks_trusted(n)),
                    Kind::TeedFaults => "parallax-v1 teed to parallax-v1, faults".into(),
                    Kind::Tiered => "parallax-v2 tiered".into(),
                    _ => k.layout().into(),
                },
                ..DiskTotals::default()
            })
            .collect(),
        ..SoakResult::default()
    };
    // The verify records, one per disk, kept across epochs and kills.
    let mut states: Vec<VerifyState> = Vec::new();
    for (i, (name, _, queues, _)) in disks.iter().enumerate() {
        let w = workload(o, *queues, o.seed + i as u64);
        let (_d, device) = connect(&socket(name), &w).map_err(CompareError::Pause)?;
        states.push(load::new_state(&w, &device).map_err(|e| CompareError::Pause(e.to_string()))?);
    }
    let deadline = started + o.duration;
    let mut next_kill = started + o.kill_every;
    let mut next_snapshot = started + o.snapshot_every / 2;
    let mut next_fault = started + o.fault_every;
    let mut next_abuse = started + o.abuse_every / 2;
    let mut next_sample = started;
    let mut rng = dovetail_store::rng::SplitMix64::new(o.seed ^ 0x50a6);
    let mut ctl_state = (0u64, 0u64);
    let mut next_store_fault = started + o.store_fault_every / 2;
    // Per life of the store daemon: its fault counts so far and the last event seen.
    let mut life = Life::default();
    while Instant::now() < deadline {
        r.epochs += 1;
        let epoch_start = Instant::now();
        let epoch_end = (epoch_start + Duration::from_secs(20)).min(deadline);
        let kill = next_kill <= epoch_end + Duration::from_secs(5) && next_kill < deadline;
        let epoch_end = if kill {
            next_kill.min(deadline)
        } else {
            epoch_end
        };
        // A store-fault epoch: the faults are on for `store_fault_for` from 2 s in, and off
        // at least 10 s before the epoch ends (for the recoveries they started). Its loads
        // run with durability unknown, and the epoch ends with a read-back of every store
        // disk. Never in an epoch that ends in a kill (the restarted daemon starts without).
        let faults_on_at = epoch_start + Duration::from_secs(2);
        let faults_off_at = faults_on_at + o.store_fault_for;
        let fault_epoch = o.store_faults.is_some()
            && !kill
            && epoch_start >= next_store_fault
            && faults_off_at + Duration::from_secs(10) <= epoch_end;
        if fault_epoch {
            next_store_fault = epoch_start + o.store_fault_every;
        }
        let (mut faults_on, mut window_done) = (false, false);
        let stop = Arc::new(AtomicBool::new(false));
        let flush_every: Vec<u64> = (0..disks.len()).map(|_| 8 + rng.below(121)).collect();
        let outs: Vec<EpochOut> = std::thread::scope(|scope| {
            let handles: Vec<_> = disks
                .iter()
                .zip(states.iter_mut())
                .enumerate()
                .map(|(i, ((name, _, queues, _), state))| {
                    let w = Workload {
                        stop: Some(stop.clone()),
                        flush_every: flush_every[i],
                        progress: Some(Arc::new(Progress::default())),
                        seed: o.seed + r.epochs * 100 + i as u64,
                        durability_unknown: fault_epoch && name != "raw",
                        ..workload(o, *queues, 0)
                    };
                    let sock = socket(name);
                    scope.spawn(move || {
                        let progress = w.progress.clone().unwrap_or_default();
                        let result = connect(&sock, &w).map_err(LoadError::Workload).and_then(
                            |(driver, device)| load::run(&driver, &device, &w, Some(state)),
                        );
                        EpochOut {
                            reads: progress.reads.load(Ordering::Relaxed),
                            writes: progress.writes.load(Ordering::Relaxed),
                            flushes: progress.flushes.load(Ordering::Relaxed),
                            result,
                        }
                    })
                })
                .collect();
            let mut c = Controller {
                o,
                control: control.clone(),
                r: &mut r,
                snap_seq: ctl_state.0,
                abuse_round: ctl_state.1,
                fault_epoch,
            };
            while Instant::now() < epoch_end {
                let now = Instant::now();
                if fault_epoch && !window_done && now >= faults_on_at {
                    window_done = true;
                    faults_on = switch_store_faults(&mut c, &mut life, true);
                    c.r.store_fault_windows += 1;
                }
                if faults_on && now >= faults_off_at {
                    faults_on = switch_store_faults(&mut c, &mut life, false);
                }
                if now >= next_sample {
                    sample(c.r, started, &daemons);
                    next_sample = now + o.sample_every;
                }
                if now >= next_snapshot {
                    c.snapshots();
                    next_snapshot = now + o.snapshot_every;
                }
                if now >= next_fault {
                    c.toggle_faults();
                    c.copy_outs();
                    next_fault = now + o.fault_every;
                }
                if now >= next_abuse {
                    c.abuse();
                    next_abuse = now + o.abuse_every;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if faults_on {
                switch_store_faults(&mut c, &mut life, false);
            }
            ctl_state = (c.snap_seq, c.abuse_round);
            if kill {
                for d in [&daemons.store, &daemons.raw].into_iter().flatten() {
                    kill9(d);
                }
            } else {
                stop.store(true, Ordering::Relaxed);
            }
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or(EpochOut {
                        reads: 0,
                        writes: 0,
                        flushes: 0,
                        result: Err(LoadError::Panicked),
                    })
                })
                .collect()
        });
        for (t, out) in r.disks.iter_mut().zip(outs) {
            let wrong_before = t.wrong;
            t.reads += out.reads;
            t.writes += out.writes;
            t.flushes += out.flushes;
            match out.result {
                Ok(rep) => {
                    t.io_errors += rep.io_errors;
                    if let Some(v) = rep.verify {
                        t.blocks_checked += v.checked;
                        t.wrong += v.corrupt.len() as u64;
                        if let Some(c) = v.corrupt.first() {
                            t.first_problem.get_or_insert(format!("wrong read: {c}"));
                        }
                    }
                }
                Err(LoadError::CorruptThenFailed { corrupt, failure }) => {
                    t.wrong += corrupt.len() as u64;
                    t.first_problem.get_or_insert(format!(
                        "wrong read: {} (then {failure})",
                        corrupt.first().map(ToString::to_string).unwrap_or_default()
                    ));
                }
                Err(e) if kill => {
                    // The daemon died under the load: expected.
                    let _ = e;
                }
                Err(e) => {
                    t.run_errors += 1;
                    eprintln!("soak: disk {}: {e}", t.name);
                    t.first_problem.get_or_insert(e.to_string());
                }
            }
            if t.wrong > wrong_before {
                eprintln!(
                    "soak: disk {}: {} wrong read(s) in epoch {}{} (first of the run: {})",
                    t.name,
                    t.wrong - wrong_before,
                    r.epochs,
                    if fault_epoch {
                        ", a store-fault epoch"
                    } else {
                        ""
                    },
                    t.first_problem.as_deref().unwrap_or("?")
                );
            }
        }
        if kill {
            r.kills += 1;
            // Reap both before starting new ones on the same store and sockets.
            daemons.store = None;
            daemons.raw = None;
            eprintln!(
                "soak: {:.0} s: killed both daemons (kill {}), restarting",
                started.elapsed().as_secs_f64(),
                r.kills
            );
            daemons.raw = Some(start_raw(o, r.kills)?);
            daemons.store = Some(start_store(o, r.kills)?);
            life = Life::default();
            for (i, (name, _, queues, _)) in disks.iter().enumerate() {
                let w = workload(o, *queues, 0);
                let t = &mut r.disks[i];
                let checked = connect(&socket(name), &w).and_then(|(driver, _)| {
                    load::check_after_crash(&driver, &mut states[i], 1 << 20)
                        .map_err(|e| e.to_string())
                });
                match checked {
                    Ok(c) => {
                        t.blocks_checked_after_kills += c.checked;
                        t.stable_blocks_after_kills += c.stable;
                        t.lost += c.lost.len() as u64;
                        if let Some(l) = c.lost.first() {
                            t.first_problem
                                .get_or_insert(format!("lost after kill {}: {l}", r.kills));
                        }
                    }
                    Err(e) => {
                        t.run_errors += 1;
                        eprintln!("soak: disk {name}: after kill {}: {e}", r.kills);
                        t.first_problem.get_or_insert(e);
                    }
                }
            }
            next_kill = Instant::now() + o.kill_every;
        }
        if fault_epoch {
            read_back_after_faults(o, &control, &mut r, &mut states, &mut life);
        }
        eprintln!(
            "soak: {:.0} s: epoch {} done: {} requests, {} blocks verified, {} lost, {} wrong",
            started.elapsed().as_secs_f64(),
            r.epochs,
            r.requests(),
            r.bytes_verified() / 4096,
            r.lost(),
            r.wrong()
        );
    }
    // Last: the faulty Tee's count of this round.
    if let Ok(st) = ctl_ok(&control, json!({"cmd": "status", "disk": "tee-faults"})) {
        let cand = &st["result"]["disks"][0]["candidate"];
        r.faults_injected += cand["counters"]["candidate_errors"].as_u64().unwrap_or(0);
    }
    sample(&mut r, started, &daemons);
    drop(daemons);
    r.seconds = started.elapsed().as_secs_f64();
    Ok(r)
}

/// The result as text tables (Markdown).
pub fn tables(r: &SoakResult) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "| minutes | requests | kills | faults injected (toggles, quarantines) | snapshots (deleted) | copy-outs completed | bad control lines (connections) | bytes verified | lost | wrong |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n\
         | {:.1} | {} | {} | {} ({}, {}) | {} ({}) | {} | {} ({}) | {} | {} | {} |\n\n",
        r.seconds / 60.0,
        r.requests(),
        r.kills,
        r.faults_injected,
        r.fault_toggles,
        r.quarantines,
        r.snapshots,
        r.snapshots_deleted,
        r.copy_outs_completed,
        r.abuse_lines,
        r.abuse_connections,
        r.bytes_verified(),
        r.lost(),
        r.wrong(),
    ));
    s.push_str(
        "| disk | layout | reads | writes | flushes | I/O errors | blocks checked (load / after kills / after store faults) | lost | wrong | run errors |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for d in &r.disks {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} / {} / {} | {} | {} | {} |\n",
            d.name,
            d.layout,
            d.reads,
            d.writes,
            d.flushes,
            d.io_errors,
            d.blocks_checked,
            d.blocks_checked_after_kills,
            d.blocks_checked_after_faults,
            d.lost,
            d.wrong,
            d.run_errors
        ));
    }
    let f = &r.store_faults;
    s.push_str(&format!(
        "Store faults: {} windows; {} injected ({} EIO; {} failed syncs, {} of them losing the \
         unsynced writes, {} failed writes; {} operations slowed, {} ms in all); {} reopens \
         from the last commit (`sync-failed`); {} candidates renewed after a reopen \
         quarantined them; {} control errors in fault epochs.\n",
        r.store_fault_windows,
        f.total,
        f.eio,
        f.failed_syncs,
        f.lost_syncs,
        f.failed_writes,
        f.slow,
        f.slow_ms,
        r.reopens_after_failed_sync,
        r.candidates_renewed,
        r.control_errors_in_fault_epochs,
    ));
    let (first, last) = footprint_span(r, "store");
    s.push_str(&format!(
        "\nBad lines accepted: {}; hello failures after a burst: {}; the soak's own control calls that failed: {}{}.\n\
         Store daemon: {}; raw daemon: {}.\n",
        r.abuse_accepted,
        r.hello_failures,
        r.control_errors,
        r.first_control_error
            .as_ref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        first.zip(last).map_or("no samples".into(), |(a, b)| format!(
            "RSS {} KiB → {} KiB, fds {} → {}, threads {} → {} (first and last sample)",
            a.rss_kib, b.rss_kib, a.fds, b.fds, a.threads, b.threads
        )),
        {
            let (a, b) = footprint_span(r, "raw");
            a.zip(b).map_or("no samples".into(), |(a, b)| {
                format!(
                    "RSS {} KiB → {} KiB, fds {} → {}",
                    a.rss_kib, b.rss_kib, a.fds, b.fds
                )
            })
        }
    ));
    for d in r.disks.iter().filter(|d| d.first_problem.is_some()) {
        s.push_str(&format!(
            "disk {}: first problem: {}\n",
            d.name,
            d.first_problem.as_deref().unwrap_or_default()
        ));
    }
    s
}

fn footprint_span<'a>(r: &'a SoakResult, daemon: &str) -> (Option<&'a Sample>, Option<&'a Sample>) {
    let mut it = r.samples.iter().filter(|s| s.daemon == daemon);
    let first = it.next();
    (first, it.next_back().or(first))
}

/// The samples as CSV.
pub fn csv(r: &SoakResult) -> String {
    let mut s = String::from("seconds,daemon,pid,rss_kib,fds,threads\n");
    for x in &r.samples {
        s.push_str(&format!(
            "{:.1},{},{},{},{},{}\n",
            x.seconds, x.daemon, x.pid, x.rss_kib, x.fds, x.threads
        ));
    }
    s
}

/// Draws RSS and descriptors over time, both daemons, into a PNG: one line per process (a
/// kill starts a new one).
pub fn plot(r: &SoakResult, path: &Path) -> Result<(), crate::chart::ChartError> {
    let mut series: Vec<crate::chart::Line> = Vec::new();
    for (d, color) in [("store", (200u8, 40u8, 40u8)), ("raw", (40, 40, 200))] {
        let mut pids: Vec<u32> = Vec::new();
        for s in r.samples.iter().filter(|s| s.daemon == d) {
            if pids.last() != Some(&s.pid) {
                pids.push(s.pid);
            }
        }
        for (n, pid) in pids.iter().enumerate() {
            let pts = |f: &dyn Fn(&Sample) -> f64| -> Vec<(f64, f64)> {
                r.samples
                    .iter()
                    .filter(|s| s.daemon == d && s.pid == *pid)
                    .map(|s| (s.seconds / 60.0, f(s)))
                    .collect()
            };
            let name = |what: &str| {
                if n == 0 {
                    format!("{d} daemon {what}")
                } else {
                    String::new()
                }
            };
            series.push(crate::chart::Line {
                name: name("RSS (MiB)"),
                color,
                panel: 0,
                points: pts(&|s| s.rss_kib as f64 / 1024.0),
            });
            series.push(crate::chart::Line {
                name: name("open fds"),
                color,
                panel: 1,
                points: pts(&|s| s.fds as f64),
            });
        }
    }
    crate::chart::line_chart(
        path,
        &format!(
            "dovetail-bench soak: {:.0} min, {} kills (each restarts both daemons: a new line)",
            r.seconds / 60.0,
            r.kills
        ),
        "minutes",
        &["RSS (MiB)", "open fds"],
        &series,
    )
}
