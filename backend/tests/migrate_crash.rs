//! Migration survives kill -9: the real `dovetail serve` binary serves a teed disk whose blocks
//! move to the candidate, first by upgrade-on-write alone (guest writes bring blocks over), then
//! by copy-out (the background job), while an in-process vhost-user frontend (the guest) writes
//! whole blocks, partial blocks and unaligned runs on two queues, flushes now and then and reads
//! its data back. The daemon is killed with SIGKILL at a random moment of every iteration
//! (seeded; the seed is printed, `DOVETAIL_SEED` replays one) and started again.
//!
//! The guest keeps a model of every sector: the data of the last write completed before the
//! last completed FLUSH is *stable* and must read back after any crash; writes issued after
//! that flush (completed or still in flight at the kill) *may* have reached the disk, so any of
//! them is accepted too. While the daemon lives, reads must return the latest write exactly.
//!
//! After every kill `store check` finds the store consistent. After every restart: the
//! candidate is active and never mismatched, the migration resumed in its mode (the copy-out
//! from where its presence map says), the map did not lose blocks, and every sector of the disk
//! reads back as the model allows. At the end a restarted daemon finishes the copy-out (`ctl migrate --rate 0
//! --wait`), every block is read and cross-checked under `sync-cross-checks`, and after a clean
//! stop the trusted and candidate versions, opened in-process, agree block for block and with
//! the model; `store check` passes; then `ctl promote` makes the candidate trusted and the disk
//! reads back the same content.

mod common;

mod cli;
mod serve;

use cli::path;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pattern, DriverOptions, Req, TestDriver, S_OK};
use dovetail_bench::driver::Driver;
use dovetail_bench::fill::Rng;
use dovetail_layout::{BlockLayout, Sector};
use dovetail_store::Store;
use serde_json::Value;
use serve::{ctl_ok, log_tail, seed, Daemon};

const DISK_SIZE: u64 = 32 << 20;
const SECTOR: u64 = 512;
const SECTORS: u64 = DISK_SIZE / SECTOR;
const BLOCK_SECTORS: u64 = 8;
const BLOCKS: u64 = DISK_SIZE / 4096;
const QUEUES: usize = 2;
/// Sectors each queue owns (queue q writes only its own half of the disk).
const REGION: u64 = SECTORS / QUEUES as u64;
/// Iterations in all, and how many of them migrate by upgrade-on-write before copy-out starts.
const ITERATIONS: usize = 50;
const UOW_ITERATIONS: usize = 20;
/// The copy-out's rate during the kill iterations: slow enough that it is still running at
/// many kills.
const COPY_RATE: &str = "384K";
/// Bytes per read request when the whole disk is read back.
const READ_CHUNK: u64 = 256 << 10;

// ------------------------------------------------------------------------------------------------
// The daemon, as a child process.

/// Runs `dovetail ARGS` (offline commands); must succeed.
fn dovetail(args: &[&str]) -> String {
    cli::ok(args)
}

/// A `ctl --json` command that must succeed: the last JSON line it printed.
fn ctl(dir: &Path, args: &[&str]) -> Value {
    let stdout = ctl_ok(dir, &[&["--json"], args].concat());
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .expect("ctl printed a reply");
    serde_json::from_str(last).expect("ctl --json prints JSON")
}

fn status(dir: &Path) -> Value {
    ctl(dir, &["status", "vd"])["disks"][0].clone()
}

/// One run of `dovetail serve` over the test's store.
fn start(dir: &Path, what: &str) -> Daemon {
    Daemon::start(
        dir,
        "migrate_crash",
        what,
        &["--queues", &QUEUES.to_string()],
    )
}

fn connect(dir: &Path) -> TestDriver {
    let mut o = DriverOptions::new(QUEUES, 16 << 20);
    o.timeout = Duration::from_secs(20);
    TestDriver::connect_with(&dir.join("vd.sock"), o)
}

// ------------------------------------------------------------------------------------------------
// The guest's model of its disk.

/// What one sector may hold: `stable` (a write tag, 0 for the imported content) is the last
/// write completed before the last completed flush; `maybe` are the writes issued since, oldest
/// first (completed or in flight).
#[derive(Debug, Clone, Default)]
struct SectorState {
    stable: u32,
    maybe: Vec<u32>,
}

impl SectorState {
    fn latest(&self) -> u32 {
        self.maybe.last().copied().unwrap_or(self.stable)
    }
}

/// The sectors one queue owns, and the counters of its load.
#[derive(Debug)]
struct Region {
    queue: usize,
    first: u64,
    sectors: Vec<SectorState>,
    /// Sectors with a non-empty `maybe`.
    dirty: Vec<u64>,
    next_tag: u32,
    acked_writes: u64,
    unacked_writes: u64,
    flushes: u64,
    verified_reads: u64,
}

impl Region {
    fn new(queue: usize) -> Region {
        Region {
            queue,
            first: queue as u64 * REGION,
            sectors: vec![SectorState::default(); REGION as usize],
            dirty: Vec::new(),
            next_tag: queue as u32 + 1,
            acked_writes: 0,
            unacked_writes: 0,
            flushes: 0,
            verified_reads: 0,
        }
    }

    fn at(&mut self, lba: u64) -> &mut SectorState {
        &mut self.sectors[(lba - self.first) as usize]
    }

    fn tag(&mut self) -> u32 {
        let t = self.next_tag;
        self.next_tag += QUEUES as u32;
        t
    }

    /// A FLUSH completed: every write issued before it (all completed) is stable.
    fn stabilize(&mut self) {
        for lba in std::mem::take(&mut self.dirty) {
            let s = self.at(lba);
            s.stable = s.latest();
            s.maybe.clear();
        }
    }
}

/// The bytes of sector `lba` as written by write `tag` (0: the imported content).
fn sector_bytes(initial: &[u8], tag: u32, lba: u64) -> Vec<u8> {
    if tag == 0 {
        let at = (lba * SECTOR) as usize;
        initial[at..at + SECTOR as usize].to_vec()
    } else {
        pattern((u64::from(tag) << 32) | lba, SECTOR as usize)
    }
}

/// What a sector that matches none of the allowed values holds, for the failure message.
fn describe(initial: &[u8], got: &[u8], lba: u64, regions: &[Region]) -> String {
    if got.iter().all(|&b| b == 0) {
        return "zeroes".into();
    }
    if got == &initial[(lba * SECTOR) as usize..((lba + 1) * SECTOR) as usize] {
        return "the imported content".into();
    }
    let r = &regions[(lba / REGION) as usize];
    for t in (r.queue as u32 + 1..r.next_tag).step_by(QUEUES).rev() {
        if got == sector_bytes(initial, t, lba).as_slice() {
            return format!("the data of write {t}");
        }
    }
    "unknown data".into()
}

/// A random write inside the region: whole aligned blocks, part of one block, or an unaligned
/// run across blocks. Half of them go to a hot spot (1 MiB), so that writes overlap; most others
/// to the lower half of the region; one in 200 anywhere. The upper half of the region is thus
/// left mostly to the copy-out, with a few guest writes racing it.
fn gen_write(rng: &mut Rng, first: u64) -> (u64, u64) {
    let (base, span) = if rng.below(200) == 0 {
        (first, REGION)
    } else if rng.below(2) == 0 {
        (first + 4096, 2048)
    } else {
        (first, REGION / 2)
    };
    match rng.below(10) {
        0..=5 => {
            let n = 1 + rng.below(4);
            let b = rng.below(span / BLOCK_SECTORS - n + 1);
            (base + b * BLOCK_SECTORS, n * BLOCK_SECTORS)
        }
        6..=8 => {
            let b = rng.below(span / BLOCK_SECTORS);
            let s = rng.below(BLOCK_SECTORS);
            let len = 1 + rng.below(BLOCK_SECTORS - s);
            let len = if s == 0 && len == BLOCK_SECTORS {
                BLOCK_SECTORS - 1
            } else {
                len
            };
            (base + b * BLOCK_SECTORS + s, len)
        }
        _ => {
            let len = 2 + rng.below(15);
            (base + rng.below(span - len), len)
        }
    }
}

fn ok_status(c: &common::Completion, data_len: u32, what: &str) {
    assert_eq!(
        (c.status, c.used_len),
        (Some(S_OK), data_len + 1),
        "{what}: the live daemon failed a guest request"
    );
}

/// One queue's guest load until `stop` or until the daemon goes away: batches of writes (never
/// overlapping within a batch), and after some of them a FLUSH or a read checked exactly against
/// the latest writes.
fn load(drv: &Driver, r: &mut Region, initial: &[u8], seed: u64, stop: &AtomicBool) {
    let q = r.queue;
    let mut rng = Rng::new(seed);
    while !stop.load(Ordering::Relaxed) {
        let n = 1 + rng.below(8);
        let mut writes: Vec<(u64, u64)> = Vec::new();
        let mut reqs = Vec::new();
        for _ in 0..n {
            let (at, len) = gen_write(&mut rng, r.first);
            if writes.iter().any(|&(a, l)| at < a + l && a < at + len) {
                continue;
            }
            let tag = r.tag();
            let mut data = Vec::with_capacity((len * SECTOR) as usize);
            for lba in at..at + len {
                data.extend_from_slice(&sector_bytes(initial, tag, lba));
                let s = r.at(lba);
                if s.maybe.is_empty() {
                    r.dirty.push(lba);
                }
                r.at(lba).maybe.push(tag);
            }
            writes.push((at, len));
            reqs.push(Req::write(at, &data));
        }
        match drv.submit_batch(q, &reqs) {
            Ok(done) => {
                for c in &done {
                    ok_status(c, 0, "write");
                }
                r.acked_writes += done.len() as u64;
            }
            Err(_) => {
                r.unacked_writes += reqs.len() as u64;
                return;
            }
        }
        if rng.below(3) == 0 {
            match drv.submit(q, &Req::flush()) {
                Ok(c) => {
                    ok_status(&c, 0, "flush");
                    r.stabilize();
                    r.flushes += 1;
                }
                Err(_) => return,
            }
        }
        if rng.below(4) == 0 {
            let blocks = 1 + rng.below(16);
            let b = rng.below(REGION / BLOCK_SECTORS - blocks + 1);
            let at = r.first + b * BLOCK_SECTORS;
            let len = blocks * BLOCK_SECTORS;
            match drv.submit(q, &Req::read(at, (len * SECTOR) as u32)) {
                Ok(c) => {
                    ok_status(&c, (len * SECTOR) as u32, "read");
                    for lba in at..at + len {
                        let off = ((lba - at) * SECTOR) as usize;
                        let want = sector_bytes(initial, r.at(lba).latest(), lba);
                        assert!(
                            c.data[off..off + SECTOR as usize] == want[..],
                            "queue {q}: sector {lba} (block {}) does not read back what was \
                             last written to it (write {})",
                            lba / BLOCK_SECTORS,
                            r.at(lba).latest()
                        );
                    }
                    r.verified_reads += 1;
                }
                Err(_) => return,
            }
        }
    }
}

/// Reads the whole disk through the daemon.
fn read_disk(drv: &Driver) -> Vec<u8> {
    let reqs: Vec<_> = (0..DISK_SIZE / READ_CHUNK)
        .map(|i| Req::read(i * READ_CHUNK / SECTOR, READ_CHUNK as u32))
        .collect();
    let done = drv
        .submit_batch(0, &reqs)
        .unwrap_or_else(|e| panic!("reading the disk: {}", dovetail_layout::error_chain(&e)));
    let mut out = Vec::with_capacity(DISK_SIZE as usize);
    for c in done {
        ok_status(&c, READ_CHUNK as u32, "read");
        out.extend_from_slice(&c.data);
    }
    out
}

/// How the unflushed writes fared at a crash.
#[derive(Debug, Default)]
struct Outcome {
    /// Sectors with unflushed writes that read back as the stable value (the writes were lost).
    reverted: u64,
    /// Those that read back as one of the unflushed writes.
    kept: u64,
}

/// After a restart: every sector must hold its stable value or one of the writes issued after
/// it; the model then takes what the disk holds as stable.
fn verify_after_crash(
    disk: &[u8],
    initial: &[u8],
    regions: &mut [Region],
    context: &str,
    dir: &Path,
) -> Outcome {
    let mut out = Outcome::default();
    let mut bad = Vec::new();
    for lba in 0..SECTORS {
        let r = &regions[(lba / REGION) as usize];
        let s = &r.sectors[(lba - r.first) as usize];
        let got = &disk[(lba * SECTOR) as usize..((lba + 1) * SECTOR) as usize];
        if s.stable == 0 && s.maybe.is_empty() {
            if got != &initial[(lba * SECTOR) as usize..((lba + 1) * SECTOR) as usize] {
                bad.push((lba, s.clone()));
            }
            continue;
        }
        if got == sector_bytes(initial, s.stable, lba).as_slice() {
            if !s.maybe.is_empty() {
                out.reverted += 1;
            }
            continue;
        }
        let found = s
            .maybe
            .iter()
            .rev()
            .find(|&&t| got == sector_bytes(initial, t, lba).as_slice())
            .copied();
        match found {
            Some(t) => {
                out.kept += 1;
                let r = &mut regions[(lba / REGION) as usize];
                r.at(lba).stable = t;
            }
            None => bad.push((lba, s.clone())),
        }
    }
    if !bad.is_empty() {
        let lines: Vec<String> = bad
            .iter()
            .take(12)
            .map(|(lba, s)| {
                let got = &disk[(lba * SECTOR) as usize..((lba + 1) * SECTOR) as usize];
                format!(
                    "  sector {lba} (block {}): expected write {} (stable) or one of {:?}, \
                     reads {}",
                    lba / BLOCK_SECTORS,
                    s.stable,
                    s.maybe,
                    describe(initial, got, *lba, regions)
                )
            })
            .collect();
        panic!(
            "{context}: {} sectors ({} blocks) lost acknowledged-stable data or read garbage:\n{}\n\
             --- daemon log ---\n{}",
            bad.len(),
            {
                let mut b: Vec<u64> = bad.iter().map(|(l, _)| l / BLOCK_SECTORS).collect();
                b.dedup();
                b.len()
            },
            lines.join("\n"),
            log_tail(dir, 40)
        );
    }
    for r in regions.iter_mut() {
        for lba in std::mem::take(&mut r.dirty) {
            r.at(lba).maybe.clear();
        }
    }
    out
}

/// The disk as the model says it is (every write stable).
fn expected_disk(initial: &[u8], regions: &[Region]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DISK_SIZE as usize);
    for lba in 0..SECTORS {
        let r = &regions[(lba / REGION) as usize];
        let s = &r.sectors[(lba - r.first) as usize];
        assert!(s.maybe.is_empty(), "the model has no unflushed write here");
        out.extend_from_slice(&sector_bytes(initial, s.stable, lba));
    }
    out
}

fn first_diff_block(a: &[u8], b: &[u8]) -> Option<u64> {
    a.chunks(4096)
        .zip(b.chunks(4096))
        .position(|(x, y)| x != y)
        .map(|p| p as u64)
}

/// Checks the candidate after a restart: active, never mismatched or quarantined.
fn check_candidate(st: &Value, context: &str, dir: &Path) {
    let c = &st["candidate"];
    let counters = &c["counters"];
    assert!(
        c["state"] == "active"
            && counters["mismatches"].as_u64() == Some(0)
            && counters["quarantines"].as_u64() == Some(0),
        "{context}: the candidate must stay active without mismatches: {c}\n--- daemon log ---\n{}",
        log_tail(dir, 40)
    );
}

/// One kill iteration's figures.
#[derive(Debug)]
struct Kill {
    mode: &'static str,
    delay_ms: u64,
    /// At the kill (from `migrate --status` just before it): copy-out state, blocks present.
    copy_state: String,
    present_at_kill: u64,
    /// After the restart.
    present_after: u64,
    writes: u64,
    outcome: Outcome,
}

#[test]
fn kill9_during_upgrade_on_write_and_copy_out_loses_nothing() {
    common::init_logging();
    let seed = seed();
    eprintln!("migrate_crash: seed {seed} (DOVETAIL_SEED={seed} replays it)");
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let st = dir.join("st");
    let mut rng = Rng::new(seed);

    // The disk: random data in two of every three MiB, holes elsewhere, so copy-out has real
    // blocks to copy and holes to skip.
    let mut initial = vec![0u8; DISK_SIZE as usize];
    for (i, mib) in initial.chunks_mut(1 << 20).enumerate() {
        if i % 3 != 2 {
            mib.copy_from_slice(&pattern(seed ^ (0xabc0 + i as u64), 1 << 20));
        }
    }
    let image = dir.join("initial.img");
    File::create(&image)
        .and_then(|mut f| f.write_all(&initial))
        .expect("write the initial image");
    dovetail(&[
        "store",
        "create",
        path(&st),
        "--size",
        "512M",
        "--extent-size",
        "4M",
    ]);
    dovetail(&["disk", "import", "--from", path(&image), path(&st), "vd"]);
    dovetail(&[
        "disk",
        "tee",
        path(&st),
        "vd",
        "--candidate",
        "parallax-v1",
        "--policy",
        "sync-cross-checks",
    ]);

    let mut regions: Vec<Region> = (0..QUEUES).map(Region::new).collect();
    let mut kills: Vec<Kill> = Vec::new();
    let mut last_present = 0u64;
    for it in 0..ITERATIONS {
        let copy_out = it >= UOW_ITERATIONS;
        let mode = if copy_out {
            "copy-out"
        } else {
            "upgrade-on-write"
        };
        let context = format!("seed {seed}, iteration {it} ({mode})");
        let daemon = start(dir, &context);
        if it == 0 {
            ctl(dir, &["migrate", "vd", "--mode", "upgrade-on-write"]);
        }
        // The migration the daemon resumed from its record (the copy-out starts below).
        let resumed = if it > UOW_ITERATIONS {
            "copy-out"
        } else {
            "upgrade-on-write"
        };
        let s = status(dir);
        check_candidate(&s, &context, dir);
        let m = &s["migration"];
        assert_eq!(m["mode"], resumed, "{context}: the migration resumed: {m}");
        if it > UOW_ITERATIONS {
            let state = &m["copy_out"]["state"];
            assert!(
                state == "running" || state == "done",
                "{context}: the copy-out resumed: {m}"
            );
        }
        let present = m["blocks_present"].as_u64().expect("blocks_present");
        assert_eq!(m["blocks_total"].as_u64(), Some(BLOCKS));
        assert!(
            present >= last_present,
            "{context}: the candidate held {last_present} blocks before the crash, {present} \
             after: the persisted presence map lost blocks\n{}",
            log_tail(dir, 40)
        );
        if let Some(k) = kills.last_mut() {
            k.present_after = present;
        }
        last_present = present;
        if it == UOW_ITERATIONS {
            let m = ctl(dir, &["migrate", "vd", "--rate", COPY_RATE]);
            assert_eq!(m["migration"]["copy_out"]["state"], "running", "{m}");
        }

        let drv = connect(dir);
        if it > 0 {
            let disk = read_disk(&drv);
            let o = verify_after_crash(&disk, &initial, &mut regions, &context, dir);
            if let Some(k) = kills.last_mut() {
                k.outcome = o;
            }
            // What the disk holds now is the model's stable state; make it durable.
            ok_status(&drv.submit(0, &Req::flush()), 0, "flush after verification");
        }

        // The load, and the kill at a random moment of it.
        let delay_ms = rng.below(300)
            + if rng.below(3) == 0 {
                rng.below(1200)
            } else {
                0
            };
        let load_seeds: Vec<u64> = (0..QUEUES).map(|_| rng.next_u64()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let writes_before: u64 = regions.iter().map(|r| r.acked_writes).sum();
        let (copy_state, present_at_kill) = std::thread::scope(|sc| {
            let drv: &Driver = &drv;
            let initial = &initial;
            for (r, &ls) in regions.iter_mut().zip(&load_seeds) {
                let stop = stop.clone();
                sc.spawn(move || load(drv, r, initial, ls, &stop));
            }
            std::thread::sleep(Duration::from_millis(delay_ms));
            let m = ctl(dir, &["migrate", "vd", "--status"])["migration"].clone();
            let state = m["copy_out"]["state"].as_str().unwrap_or("-").to_string();
            let present = m["blocks_present"].as_u64().unwrap_or(0);
            daemon.kill9();
            stop.store(true, Ordering::Relaxed);
            (state, present)
        });
        drop(drv);
        // The store is consistent at rest after every crash.
        let report = dovetail(&["store", "check", path(&st)]);
        assert!(
            report.contains("result: consistent"),
            "{context}: store check after the kill:\n{report}"
        );
        let writes: u64 = regions.iter().map(|r| r.acked_writes).sum::<u64>() - writes_before;
        kills.push(Kill {
            mode,
            delay_ms,
            copy_state,
            present_at_kill,
            present_after: 0,
            writes,
            outcome: Outcome::default(),
        });
    }
    let kill_phase = started.elapsed();

    // The copy-out finishes after the last crash.
    let daemon = start(dir, "final");
    let s = status(dir);
    check_candidate(&s, "after the last kill", dir);
    let present = s["migration"]["blocks_present"].as_u64().unwrap_or(0);
    assert!(present >= last_present, "the presence map lost blocks");
    if let Some(k) = kills.last_mut() {
        k.present_after = present;
    }
    let drv = connect(dir);
    let disk = read_disk(&drv);
    let o = verify_after_crash(&disk, &initial, &mut regions, "after the last kill", dir);
    if let Some(k) = kills.last_mut() {
        k.outcome = o;
    }
    let t = Instant::now();
    let m = ctl(dir, &["migrate", "vd", "--rate", "0", "--wait"]);
    let finish_secs = t.elapsed().as_secs_f64();
    assert_eq!(m["copy_out"]["state"], "done", "{m}");
    assert_eq!(m["blocks_present"].as_u64(), Some(BLOCKS), "{m}");
    // The resync after the last unclean stop must be over before the versions are compared.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ev = ctl(dir, &["events"]);
        let text = ev.to_string();
        if text.contains("\"resynced\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no resync finished within 60 s of the restart: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every block is present now: under sync-cross-checks every read is compared with the
    // candidate.
    let disk = read_disk(&drv);
    let want = expected_disk(&initial, &regions);
    assert!(
        disk == want,
        "after the copy-out the disk differs from the model at block {:?}",
        first_diff_block(&disk, &want)
    );
    let s = status(dir);
    check_candidate(&s, "after the copy-out", dir);
    let compared = s["candidate"]["counters"]["compared_reads"]
        .as_u64()
        .unwrap_or(0);
    assert!(compared > 0, "guest reads were compared: {s}");
    drop(drv);
    daemon.terminate();

    // Offline: both versions hold the same blocks, and what the guest wrote.
    let (trusted_key, candidate_key) = {
        let store = Store::open(&st).expect("open the store");
        let info = store.disk("vd").expect("disk vd");
        let ck = info.candidate.expect("the candidate is still attached");
        let read_all = |key| {
            let v = dovetail_backend::ops::open::open_version(
                &store,
                "vd",
                key,
                "parallax-v1",
                DISK_SIZE,
            )
            .expect("open a version");
            let mut b = vec![0u8; DISK_SIZE as usize];
            v.read(Sector(0), &mut b).expect("read a version");
            b
        };
        let trusted = read_all(info.trusted);
        let candidate = read_all(ck);
        assert!(
            trusted == candidate,
            "trusted and candidate differ at block {:?}",
            first_diff_block(&trusted, &candidate)
        );
        assert!(
            trusted == want,
            "the trusted version differs from the model at block {:?}",
            first_diff_block(&trusted, &want)
        );
        (info.trusted, ck)
    };
    let report = dovetail(&["store", "check", path(&st)]);
    assert!(report.contains("result: consistent"), "{report}");

    // Promote: the candidate becomes the trusted version, with the same content.
    let daemon = start(dir, "promote");
    let r = ctl(dir, &["promote", "vd"]);
    let pause_us = r["pause"]["total_us"].as_u64().expect("a pause");
    let s = status(dir);
    assert_eq!(s["trusted_version"].as_u64(), Some(candidate_key.0), "{s}");
    assert!(s["candidate"].is_null(), "{s}");
    let drv = connect(dir);
    let disk = read_disk(&drv);
    assert!(
        disk == want,
        "after promote the disk differs at block {:?}",
        first_diff_block(&disk, &want)
    );
    drop(drv);
    daemon.terminate();
    let report = dovetail(&["store", "check", path(&st)]);
    assert!(report.contains("result: consistent"), "{report}");
    let list = dovetail(&["disk", "list", path(&st)]);
    assert!(
        list.lines()
            .any(|l| l.split_whitespace().nth(4) == Some(&candidate_key.0.to_string())),
        "disk list shows the promoted version {candidate_key} as trusted:\n{list}"
    );
    assert_ne!(trusted_key, candidate_key);

    // The kills hit the migration where it mattered.
    for (i, k) in kills.iter().enumerate() {
        eprintln!(
            "  iteration {i:2} {:16} kill after {:4} ms, {:4} writes; copy-out {:8} with {:5} \
             blocks present at the kill, {:5} after the restart; unflushed sectors kept {:4}, \
             reverted {:4}",
            k.mode,
            k.delay_ms,
            k.writes,
            k.copy_state,
            k.present_at_kill,
            k.present_after,
            k.outcome.kept,
            k.outcome.reverted
        );
    }
    let mid_copy: Vec<&Kill> = kills
        .iter()
        .filter(|k| k.mode == "copy-out" && k.copy_state == "running" && k.present_at_kill < BLOCKS)
        .collect();
    let uow_growth = kills[UOW_ITERATIONS - 1].present_after;
    let copy_first = kills[UOW_ITERATIONS].present_after;
    let copy_last = kills[ITERATIONS - 1].present_after;
    let acked: u64 = regions.iter().map(|r| r.acked_writes).sum();
    let unacked: u64 = regions.iter().map(|r| r.unacked_writes).sum();
    let flushes: u64 = regions.iter().map(|r| r.flushes).sum();
    let reads: u64 = regions.iter().map(|r| r.verified_reads).sum();
    let kept: u64 = kills.iter().map(|k| k.outcome.kept).sum();
    let reverted: u64 = kills.iter().map(|k| k.outcome.reverted).sum();
    eprintln!(
        "migrate_crash: seed {seed}: {ITERATIONS} kills ({} during a running copy-out), {acked} \
         writes acknowledged, {unacked} in flight at kills, {flushes} flushes, {reads} reads \
         verified; unflushed sectors kept {kept}, reverted {reverted}; upgrade-on-write brought \
         {uow_growth} blocks over, copy-out took the candidate from {copy_first} to {copy_last} \
         of {BLOCKS} blocks across the kills; finishing took {finish_secs:.1} s; promote paused \
         I/O {pause_us} us; kill phase {:.1} s, whole test {:.1} s",
        mid_copy.len(),
        kill_phase.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        mid_copy.len() >= 10,
        "only {} kills hit a running copy-out",
        mid_copy.len()
    );
    assert!(
        copy_last > copy_first,
        "the copy-out made progress across the kills ({copy_first} -> {copy_last} of {BLOCKS})"
    );
    assert!(
        uow_growth > 0,
        "guest writes brought blocks over by upgrade-on-write"
    );
    assert!(kept + reverted > 0, "some kills hit unflushed writes");
    let log = fs::read_to_string(dir.join("serve.log")).expect("daemon log");
    let resumed = log
        .lines()
        .filter(|l| l.contains("resuming the migration by copy-out"))
        .count();
    assert!(
        resumed >= ITERATIONS - UOW_ITERATIONS,
        "every restart after a kill resumed the copy-out: {resumed} times"
    );
}
