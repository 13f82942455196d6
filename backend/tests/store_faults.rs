//! Storage faults under the store, seen by a guest: two store-backed disks (parallax-v1, then
//! parallax-v2; and parallax-v1 with disk `d` teed to a parallax-v2 candidate) are served
//! in-process over real vhost-user sockets, their store opened over `FaultFile`s wrapping the
//! real `store.meta` and `data.0` of a store made in a temporary directory. For each fault
//! kind (EIO on reads, EIO on writes, ENOSPC, short writes, failed syncs, failed syncs that
//! lose the unsynced writes, metadata-file faults), at the Nth operation and with a
//! probability, the in-process frontend drives a seeded workload of writes, reads and FLUSHes
//! on two queues of disk `d` and on disk `e`, one request at a time, and checks every
//! completion (status byte and used length) against a model of what the store may honestly
//! answer:
//!
//! - a read or write gets `IOERR` exactly when a fault was injected while it ran, `OK`
//!   otherwise; the exceptions are the redundancy that masks a fault (parallax-v2 keeps tree
//!   nodes in two copies and reads the other one; a Tee keeps a fault in its candidate from the
//!   guest by quarantining the candidate, which the test checks) and a disk whose unsynced
//!   writes a failed sync lost (tree nodes among them): it may fail requests that need them;
//! - a FLUSH gets `IOERR` when a fault was injected while it ran, and also — for good — once a
//!   sync of the data file failed while the disk had writes that no successful sync covered
//!   (after a failed `fsync` the kernel may have dropped those pages and the next `fsync`
//!   succeeds: a later FLUSH must not report them durable); `OK` otherwise;
//! - an OK read returns what the model holds for every block whose content is defined (a
//!   block whose last write failed, or whose unsynced write was lost, holds anything).
//!
//! The workload's blocks are spread over many tree leaves and the node cache is as small as it
//! goes, so tree nodes are read back from the store (and meet the faults) too.
//!
//! Then the faults are switched off: every defined block reads back through the daemon as the
//! model says (a disk that lost writes may fail reads until it restarts, never return wrong
//! data), the daemons stop (the final flush failing exactly for the disks that lost writes),
//! the store passes `store check` (library and CLI, every version including the candidate),
//! and after a restart without faults every write acknowledged before an acknowledged FLUSH
//! reads back exactly (a block written since may also hold a later acknowledged value). The
//! daemon must never panic or hang: the driver's waits time out.

mod common;

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    pattern, Completion, RangeSeg, Req, TestDriver, TestServer, S_IOERR, S_OK, WRITE_ZEROES_UNMAP,
};
use dovetail_backend::Disk;
use dovetail_layout::parallax::{Class, Parallax, ParallaxCheck, ParallaxOptions};
use dovetail_layout::{BlockLayout, Sectors};
use dovetail_migrate::presence::{PresenceMap, MAP_BLOCK};
use dovetail_migrate::{Policy, Tee, TeeOptions};
use dovetail_store::faultfile::{FaultControl, FaultFile, Injected, Op};
use dovetail_store::rng::SplitMix64;
use dovetail_store::{ExtentId, Store, VersionKey, DATA_FILE, META_FILE};

const DISK_BYTES: u64 = 64 << 20;
const STORE_BYTES: u64 = 64 << 20;
/// Small extents, so that the workload needs grants (zeroing, sync, metadata commit) while
/// the faults are on.
const EXTENT: u64 = 256 << 10;
const BLOCK: usize = 4096;
const SECTORS_PER_BLOCK: u64 = (BLOCK / 512) as u64;
/// Blocks of each disk the workload touches: `ZONES` runs of `ZONE` blocks, one every
/// `ZONE_STRIDE` blocks (2 MiB, a tree leaf's span), so that the workload touches more tree
/// nodes than the node cache keeps, and nodes are read back from the store (and fail there)
/// too. A request stays inside one zone.
const ZONE: u64 = 5;
const ZONES: u64 = 32;
const ZONE_STRIDE: u64 = 512;
const REGION: u64 = ZONE * ZONES;
/// Requests per case while the faults are on.
const REQUESTS: usize = 90;
const DISKS: [&str; 2] = ["d", "e"];
/// Queues of disk `d` (disk `e` has one).
const D_QUEUES: usize = 2;
const GUEST_MEM: usize = 4 << 20;
/// The layout of the teed disk's candidate.
const CANDIDATE_LAYOUT: &str = "parallax-v2";

/// One fault scenario: the rules of the data file and of the metadata file.
struct Case {
    name: &'static str,
    data: &'static [&'static str],
    meta: &'static [&'static str],
    /// parallax-v2 only (the case is skipped for parallax-v1): guest data kept in two copies,
    /// so that a read can fall back to the other copy.
    two_copies: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "eio-read-nth",
        data: &["eio:nth=6,op=read"],
        meta: &[],
        two_copies: false,
    },
    Case {
        name: "eio-read-prob",
        data: &["eio:prob=0.15,op=read"],
        meta: &[],
        two_copies: false,
    },
    Case {
        name: "eio-write-nth",
        data: &["eio:nth=9,op=write"],
        meta: &[],
        two_copies: false,
    },
    Case {
        name: "eio-write-prob",
        data: &["eio:prob=0.08,op=write"],
        meta: &[],
        two_copies: false,
    },
    Case {
        name: "enospc-nth",
        data: &["enospc:nth=7,op=any"],
        meta: &[],
        two_copies: false,
    },
    Case {
        name: "enospc-prob",
        data: &["enospc:prob=0.06,op=any"],
        meta: &[],
        two_copies: false,
    },
    Case {
        name: "short-write-nth",
        data: &["short-write:nth=8"],
        meta: &[],
        two_copies: false,
    },
    Case {
        name: "short-write-prob",
        data: &["short-write:prob=0.08"],
        meta: &[],
        two_copies: false,
    },
    Case {
        name: "sync-nth",
        data: &["eio:nth=3,op=sync"],
        meta: &[],
        two_copies: false,
    },
    Case {
        name: "sync-lose-nth",
        data: &["eio:nth=4,op=sync,lose=true"],
        meta: &[],
        two_copies: false,
    },
    Case {
        name: "sync-lose-prob",
        data: &["eio:prob=0.3,op=sync,lose=true"],
        meta: &[],
        two_copies: false,
    },
    Case {
        name: "meta-nth",
        data: &[],
        meta: &["eio:nth=4"],
        two_copies: false,
    },
    Case {
        name: "meta-prob",
        data: &[],
        meta: &["eio:prob=0.2,lose=true"],
        two_copies: false,
    },
    Case {
        name: "eio-read-two-copies",
        data: &["eio:prob=0.5,op=read"],
        meta: &[],
        two_copies: true,
    },
];

/// What a block holds, as far as the model knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Val {
    Zero,
    /// `pattern(seed, BLOCK)`.
    Data(u64),
    /// A write to it failed (or its unsynced write was lost): anything goes.
    Undefined,
}

impl Val {
    fn bytes(self) -> Option<Vec<u8>> {
        match self {
            Val::Zero => Some(vec![0; BLOCK]),
            Val::Data(seed) => Some(pattern(seed, BLOCK)),
            Val::Undefined => None,
        }
    }
}

/// No / maybe / yes, ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tri {
    No,
    Maybe,
    Yes,
}

/// One disk as the guest may rely on it.
struct Model {
    name: &'static str,
    /// What a read returns now.
    current: Vec<Val>,
    /// What the guest wrote last and was told succeeded (`Undefined` after a failed write);
    /// unlike `current`, not changed by a sync that lost it: an acknowledged FLUSH promises it.
    acked: Vec<Val>,
    /// What the last acknowledged FLUSH made durable.
    durable: Vec<Val>,
    /// Values written since that FLUSH (acknowledged, or `Undefined` for failed writes).
    pending: Vec<Vec<Val>>,
    /// Whether the store has writes of this disk that no successful sync covered.
    dirty: Tri,
    /// Whether a sync failed while it had such writes: then no FLUSH may succeed again.
    tainted: Tri,
    /// Whether a sync lost writes of this disk (tree nodes among them, maybe): then any
    /// request that needs a lost node back from the store fails.
    poisoned: bool,
}

impl Model {
    fn new(name: &'static str) -> Model {
        Model {
            name,
            current: vec![Val::Zero; REGION as usize],
            acked: vec![Val::Zero; REGION as usize],
            durable: vec![Val::Zero; REGION as usize],
            pending: vec![Vec::new(); REGION as usize],
            dirty: Tri::No,
            tainted: Tri::No,
            poisoned: false,
        }
    }

    fn written(&mut self, block: u64, v: Val) {
        self.current[block as usize] = v;
        self.acked[block as usize] = v;
        self.pending[block as usize].push(v);
    }

    fn flushed(&mut self) {
        self.durable.clone_from(&self.acked);
        for p in &mut self.pending {
            p.clear();
        }
        self.dirty = Tri::No;
        self.tainted = Tri::No;
    }

    /// A sync of the data file lost what was unsynced: every block written since the last
    /// acknowledged FLUSH may now read as anything (until it is written again). What the guest
    /// was told stays as it was: no FLUSH may be acknowledged while it is not true.
    fn lost_unsynced(&mut self) {
        if self.tainted > Tri::No {
            self.poisoned = true;
        }
        for b in 0..REGION as usize {
            if !self.pending[b].is_empty() {
                self.current[b] = Val::Undefined;
            }
        }
    }
}

/// Totals over cases.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    injected: u64,
    ioerr: u64,
    ok: u64,
    /// Blocks holding acknowledged data, verified after the restart.
    checked: u64,
    /// Blocks verified through the daemon with the faults switched off.
    checked_live: u64,
    /// parallax-v2 requests that succeeded although a read fault hit them (another copy).
    masked: u64,
    /// Blocks of disks that lost writes to a failed sync that could not be read with the
    /// faults off (before the restart).
    unreadable: u64,
    /// Times the teed disk's candidate was quarantined.
    quarantines: u64,
    lost: u64,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.injected += o.injected;
        self.ioerr += o.ioerr;
        self.ok += o.ok;
        self.checked += o.checked;
        self.checked_live += o.checked_live;
        self.masked += o.masked;
        self.unreadable += o.unreadable;
        self.quarantines += o.quarantines;
        self.lost += o.lost;
    }
}

fn open_rw(path: &Path) -> std::fs::File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// The store in `dir`, over fault files injecting `case`'s rules (seeded with `seed`).
fn open_faulty(dir: &Path, case: &Case, seed: u64, control: &Arc<FaultControl>) -> Arc<Store> {
    let meta = FaultFile::with_specs(
        Box::new(open_rw(&dir.join(META_FILE))),
        "meta",
        case.meta,
        seed,
        control.clone(),
    )
    .expect("metadata rules parse");
    let data = FaultFile::with_specs(
        Box::new(open_rw(&dir.join(DATA_FILE))),
        "data",
        case.data,
        seed ^ 0x5555,
        control.clone(),
    )
    .expect("data rules parse");
    Store::open_on(Box::new(meta), Box::new(data)).expect("open the store over fault files")
}

fn layout_opts() -> ParallaxOptions {
    ParallaxOptions {
        // No background commits: every store operation belongs to a guest request.
        persist_every: None,
        // The smallest node cache (16 nodes): tree nodes are evicted and read again.
        cache_bytes: 0,
    }
}

/// The first sector of region block `r`.
fn sector_of(r: u64) -> u64 {
    ((r / ZONE) * ZONE_STRIDE + r % ZONE) * SECTORS_PER_BLOCK
}

/// Region blocks left in `r`'s zone, `r` included.
fn zone_left(r: u64) -> u64 {
    ZONE - r % ZONE
}

/// Opens (formatting on first use) version `key`; a new parallax-v2 version
/// keeps its guest data in two copies if `two_copies`.
fn open_version(
    store: &Arc<Store>,
    key: VersionKey,
    layout: &str,
    two_copies: bool,
) -> Arc<Parallax> {
    let space = store.space(key).expect("space");
    let fresh = store.version(key).expect("version").root_len == 0;
    let p = if fresh {
        Parallax::create_layout(space, layout, Sectors(DISK_BYTES / 512), layout_opts())
    } else {
        Parallax::open_with(space, layout_opts())
    }
    .unwrap_or_else(|e| panic!("open {key}: {}", dovetail_layout::error_chain(&e)));
    assert_eq!(p.layout(), layout);
    if fresh && two_copies {
        let mut policy = p.tier_status().expect("parallax-v2").policy;
        policy.classes[Class::Hot as usize].copies = 2;
        p.set_tier_policy(policy).expect("two copies of guest data");
    }
    Arc::new(p)
}

/// Disk `d` served through a Tee: its trusted version and a candidate.
struct Teed {
    tee: Arc<Tee>,
    trusted: VersionKey,
    candidate: VersionKey,
}

/// Which version of the teed disk an injected fault hit, as far as the file offset tells (a
/// sync names no offset; a zeroing is of an extent not granted yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Trusted,
    Candidate,
    Unknown,
}

impl Teed {
    fn owner(&self, store: &Store, e: &Injected) -> Owner {
        if e.file != "data" || !matches!(e.op, Op::Read | Op::Write) {
            return Owner::Unknown;
        }
        let extent = ExtentId((e.offset / EXTENT) as u32);
        let holds = |k: VersionKey| store.version(k).expect("version").extents.contains(&extent);
        if holds(self.trusted) {
            Owner::Trusted
        } else if holds(self.candidate) {
            Owner::Candidate
        } else {
            Owner::Unknown
        }
    }
}

fn status_name(s: Option<u8>) -> String {
    match s {
        Some(S_OK) => "OK".into(),
        Some(S_IOERR) => "IOERR".into(),
        other => format!("{other:?}"),
    }
}

fn describe(events: &[Injected]) -> String {
    events
        .iter()
        .map(|e| {
            format!(
                "{} {} {}@{}+{} ({})",
                e.file, e.kind, e.op, e.offset, e.len, e.rule
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The served disks of one store and their guests.
struct Served {
    servers: Vec<TestServer>,
    drivers: Vec<TestDriver>,
    /// Set when disk `d` is served through a Tee.
    teed: Option<Teed>,
}

impl Served {
    /// Serves the disks' trusted versions; disk `d` through a Tee with its candidate (of
    /// [`CANDIDATE_LAYOUT`], presence map in `tee_dir`) if `tee_dir` is given.
    fn start(store: &Arc<Store>, layout: &str, two_copies: bool, tee_dir: Option<&Path>) -> Served {
        let mut servers = Vec::new();
        let mut drivers = Vec::new();
        let mut teed = None;
        for (i, name) in DISKS.iter().enumerate() {
            let queues = if i == 0 { D_QUEUES } else { 1 };
            let info = store.disk(name).expect("disk");
            let trusted = open_version(store, info.trusted, layout, two_copies);
            let served: Arc<dyn BlockLayout> = match tee_dir {
                Some(dir) if i == 0 => {
                    let candidate = info.candidate.expect("disk d has a candidate");
                    let c = open_version(store, candidate, CANDIDATE_LAYOUT, false);
                    let presence = PresenceMap::open_or_create(
                        &dir.join("d.map"),
                        DISK_BYTES / MAP_BLOCK,
                        candidate.0,
                    )
                    .expect("presence map");
                    let opts = TeeOptions {
                        // No background comparison: every store operation belongs to a request.
                        lazy_interval: Duration::from_secs(3600),
                        ..TeeOptions::new(name, Policy::SyncCrossChecks)
                    };
                    let tee = Arc::new(
                        Tee::new(trusted, c, Arc::new(presence), opts).expect("start the Tee"),
                    );
                    teed = Some(Teed {
                        tee: tee.clone(),
                        trusted: info.trusted,
                        candidate,
                    });
                    tee
                }
                _ => trusted,
            };
            let disk = Arc::new(Disk::new(served, false, name).expect("serial fits"));
            let server = TestServer::start(disk, queues);
            drivers.push(TestDriver::connect(server.socket(), queues, GUEST_MEM));
            servers.push(server);
        }
        Served {
            servers,
            drivers,
            teed,
        }
    }

    /// Reads the whole region of disk `i`, a zone at a time: `None` for a zone whose read
    /// failed (an `IOERR` with the right used length; anything else fails the test).
    fn read_zones(&self, i: usize) -> Vec<Option<Vec<u8>>> {
        (0..REGION)
            .step_by(ZONE as usize)
            .map(|r| {
                let len = (ZONE as usize * BLOCK) as u32;
                let c = self.drivers[i].submit(0, &Req::read(sector_of(r), len));
                if c.status == Some(S_IOERR) && c.used_len == 1 {
                    return None;
                }
                c.assert_ok(len);
                Some(c.data)
            })
            .collect()
    }

    /// [`Served::read_zones`], every read succeeding.
    fn read_region(&self, i: usize) -> Vec<u8> {
        self.read_zones(i)
            .into_iter()
            .enumerate()
            .flat_map(|(z, d)| d.unwrap_or_else(|| panic!("reading zone {z} of disk {i} failed")))
            .collect()
    }

    /// Disconnects the guests and stops the daemons; returns whether each one's final flush
    /// succeeded.
    fn stop(self) -> Vec<bool> {
        drop(self.drivers);
        self.servers.into_iter().map(|s| s.stop().is_ok()).collect()
    }
}

/// Runs one case on a fresh store; returns its tally.
/// With `teed`, disk `d` is served through a Tee over its trusted version and a candidate of
/// [`CANDIDATE_LAYOUT`] in the same store (the guest sees the trusted version).
fn run_case(layout: &str, case: &Case, seed: u64, teed: bool) -> Tally {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    {
        let store = Store::create(&dir, STORE_BYTES, EXTENT).expect("create store");
        for name in DISKS {
            store
                .create_disk(name, DISK_BYTES, layout)
                .expect("create disk");
        }
        if teed {
            store
                .add_version("d", CANDIDATE_LAYOUT)
                .expect("add a candidate");
        }
    }
    let control = FaultControl::new();
    control.disable();
    let store = open_faulty(&dir, case, seed, &control);
    let served = Served::start(&store, layout, case.two_copies, teed.then_some(tmp.path()));
    let mut models: Vec<Model> = DISKS.iter().map(|n| Model::new(n)).collect();
    let mut next_seed = seed.wrapping_mul(1000) + 1;

    // Without faults: the first four blocks of every zone written and flushed.
    for (i, m) in models.iter_mut().enumerate() {
        for b in (0..REGION).step_by(ZONE as usize) {
            let seeds: Vec<u64> = (0..ZONE - 1).map(|k| next_seed + k).collect();
            next_seed += ZONE;
            let data: Vec<u8> = seeds.iter().flat_map(|&s| pattern(s, BLOCK)).collect();
            served.drivers[i]
                .submit(0, &Req::write(sector_of(b), &data))
                .assert_ok(0);
            for (k, s) in seeds.into_iter().enumerate() {
                m.written(b + k as u64, Val::Data(s));
            }
        }
        served.drivers[i].submit(0, &Req::flush()).assert_ok(0);
        m.flushed();
    }

    // With faults.
    control.enable();
    let mut rng = SplitMix64::new(seed);
    let mut tally = Tally::default();
    for step in 0..REQUESTS {
        let pick = rng.below(10);
        let (i, queue) = match pick {
            0..=5 => (0, 0),
            6 | 7 => (0, 1),
            _ => (1, 0),
        };
        let kind = rng.below(20);
        let start = rng.below(REGION);
        let events_before = control.events().len();
        let injected_before = control.injected();
        let tee = served.teed.as_ref().filter(|_| i == 0);
        let quarantined_before = tee.is_some_and(|t| t.tee.quarantined());
        let (what, c, blocks): (&str, Completion, Vec<(u64, Val)>) = if kind < 9 {
            let n = (1 + rng.below(4)).min(zone_left(start));
            let vals: Vec<(u64, Val)> = (0..n)
                .map(|k| {
                    next_seed += 1;
                    (start + k, Val::Data(next_seed))
                })
                .collect();
            let data: Vec<u8> = vals
                .iter()
                .flat_map(|&(_, v)| v.bytes().expect("data"))
                .collect();
            let c = served.drivers[i].submit(queue, &Req::write(sector_of(start), &data));
            ("write", c, vals)
        } else if kind < 14 {
            let n = (1 + rng.below(ZONE)).min(zone_left(start));
            let len = (n as usize * BLOCK) as u32;
            let c = served.drivers[i].submit(queue, &Req::read(sector_of(start), len));
            let vals = (start..start + n)
                .map(|b| (b, models[i].current[b as usize]))
                .collect();
            ("read", c, vals)
        } else if kind < 16 {
            // Whole blocks, half of them with unmap (DISCARD's path in parallax: the pointers
            // go; the tree changes, which is store I/O).
            let n = (1 + rng.below(3)).min(zone_left(start));
            let flags = if kind == 14 { WRITE_ZEROES_UNMAP } else { 0 };
            let seg = RangeSeg::new(sector_of(start), (n * SECTORS_PER_BLOCK) as u32, flags);
            let c = served.drivers[i].submit(queue, &Req::write_zeroes(&[seg]));
            (
                "write-zeroes",
                c,
                (start..start + n).map(|b| (b, Val::Zero)).collect(),
            )
        } else {
            (
                "flush",
                served.drivers[i].submit(queue, &Req::flush()),
                Vec::new(),
            )
        };
        let delta = control.injected() - injected_before;
        let events: Vec<Injected> = control.events()[events_before..].to_vec();
        // Faults that certainly hit the version the guest sees (`hard`), that may have hit it
        // or the teed disk's candidate (`soft`: a sync, a zeroing before a grant, the metadata
        // file), and that hit the candidate (whose failures the Tee keeps from the guest: it
        // quarantines the candidate and serves the trusted version alone).
        let (mut hard, mut soft, mut cand, mut cand_reads) = (0u64, 0u64, 0u64, 0u64);
        // A failed write of the data file marks the version that wrote it as a failed sync
        // does (its tree may point at a block that does not hold the data): it takes no more
        // writes and every later FLUSH fails (until reopened from its last commit).
        let mut write_taint = Tri::No;
        for e in &events {
            if e.file == "data" && e.op == Op::Write {
                write_taint =
                    write_taint.max(match tee.map_or(Owner::Trusted, |t| t.owner(&store, e)) {
                        Owner::Trusted => Tri::Yes,
                        Owner::Unknown => Tri::Maybe,
                        Owner::Candidate => Tri::No,
                    });
            }
            // A parallax version punches the blocks a commit freed once it is durable; a
            // failed punch only keeps the space allocated (it is logged), it loses nothing.
            if layout != "raw" && e.op == Op::ZeroRange {
                soft += 1;
                continue;
            }
            match tee.map_or(Owner::Trusted, |t| t.owner(&store, e)) {
                Owner::Trusted => hard += 1,
                Owner::Unknown => soft += 1,
                Owner::Candidate => {
                    cand += 1;
                    cand_reads += u64::from(e.op == Op::Read);
                }
            }
        }
        let quarantined = tee.is_some_and(|t| t.tee.quarantined());
        if quarantined && !quarantined_before {
            tally.quarantines += 1;
        }
        let m = &mut models[i];
        let ctx = format!(
            "{layout} {} step {step}: {what} on disk {} queue {queue} (faults injected while it \
             ran: {delta}: {}; disk dirty {:?}, tainted {:?})",
            case.name,
            m.name,
            describe(&events),
            m.dirty,
            m.tainted
        );
        // parallax-v2 keeps tree nodes in two copies and reads the other one (repairing the
        // first) when one fails, so a read fault may be masked, and so may a failed repair
        // write: with a read fault, the request may succeed (its data is checked all the
        // same).
        let masked =
            layout == "parallax-v2" && events.iter().any(|e| e.op == Op::Read) && tee.is_none();
        if masked && c.status == Some(S_OK) {
            tally.masked += 1;
        }
        if let Some(t) = tee {
            // A fault in the candidate (other than a read, which its second copy of the tree
            // may mask) quarantines it; a request that succeeded despite a fault that may have
            // hit the trusted version must have put it on the candidate.
            if (cand > cand_reads || (c.status == Some(S_OK) && soft > 0)) && !quarantined {
                panic!(
                    "{ctx}: a fault hit the candidate ({cand} faults; status {}) but the Tee did \
                     not quarantine it ({:?})",
                    status_name(c.status),
                    t.tee.counters()
                );
            }
        }
        match what {
            "write" | "read" | "write-zeroes" => {
                let data_len = if what == "read" {
                    (blocks.len() * BLOCK) as u32
                } else {
                    0
                };
                // A disk whose unsynced writes were lost (tree nodes among them) may fail any
                // request that needs one of those nodes back from the store.
                // A disk that a failed sync or write tainted takes no more reads nor writes
                // (its version is to be reopened from its last commit: its tree may point at
                // blocks that do not hold what it says).
                let may_fail = hard + soft > 0 || m.poisoned || m.tainted != Tri::No;
                let may_succeed = hard == 0 || masked;
                let ok = match c.status {
                    Some(S_OK) if may_succeed => true,
                    Some(S_IOERR) if may_fail => false,
                    other => panic!(
                        "{ctx}: status {}, expected {}",
                        status_name(other),
                        if may_fail { "IOERR" } else { "OK" }
                    ),
                };
                assert_eq!(c.used_len, if ok { data_len + 1 } else { 1 }, "{ctx}");
                if what != "read" {
                    for (b, v) in blocks {
                        m.written(b, if ok { v } else { Val::Undefined });
                    }
                    m.dirty = if ok {
                        Tri::Yes
                    } else {
                        m.dirty.max(Tri::Maybe)
                    };
                } else if ok {
                    for (k, (b, v)) in blocks.iter().enumerate() {
                        if let Some(want) = v.bytes() {
                            assert!(
                                c.data[k * BLOCK..(k + 1) * BLOCK] == want[..],
                                "{ctx}: block {b} read back differs from {v:?}"
                            );
                        }
                    }
                }
            }
            _ => {
                let must_fail = (hard > 0 && !masked) || m.tainted == Tri::Yes;
                let may_fail = must_fail || hard + soft > 0 || m.tainted == Tri::Maybe;
                assert_eq!(c.used_len, 1, "{ctx}");
                match c.status {
                    Some(S_OK) => {
                        assert!(
                            !must_fail,
                            "{ctx}: FLUSH acknowledged although {}",
                            if hard > 0 {
                                "a fault was injected while it ran"
                            } else {
                                "a sync of the data file failed while the disk had unsynced \
                                 writes: they may be lost"
                            }
                        );
                        m.flushed();
                    }
                    Some(S_IOERR) => {
                        assert!(may_fail, "{ctx}: FLUSH failed without a fault");
                        if hard + soft == 0 {
                            // Not this flush's fault: the store remembers an earlier sync
                            // failure, as the model allowed.
                            m.tainted = Tri::Yes;
                        }
                        m.dirty = m.dirty.max(Tri::Maybe);
                    }
                    other => panic!("{ctx}: status {other:?}"),
                }
            }
        }
        models[i].tainted = models[i].tainted.max(write_taint);
        if c.status == Some(S_IOERR) {
            tally.ioerr += 1;
        } else {
            tally.ok += 1;
        }
        // A failed sync of the data file: every disk with writes no sync covered may have lost
        // them, and the one that was syncing certainly had some if it was flushing.
        let data_sync_failed = events.iter().any(|e| e.file == "data" && e.op == Op::Sync);
        if data_sync_failed {
            for (j, m) in models.iter_mut().enumerate() {
                let mut t = m.dirty;
                if j == i && c.status == Some(S_IOERR) {
                    // Its own sync (or a grant's) failed: it may have had writes pending
                    // (parallax-v2 writes annotations at a flush even after reads only).
                    t = t.max(Tri::Maybe);
                }
                m.tainted = m.tainted.max(t);
            }
        }
        if events
            .iter()
            .any(|e| e.file == "data" && e.op == Op::Sync && e.bytes > 0)
        {
            for m in &mut models {
                m.lost_unsynced();
            }
        }
    }
    tally.injected = control.injected();

    // Faults off: everything defined reads back through the daemon.
    control.disable();
    for (i, m) in models.iter().enumerate() {
        let zones = served.read_zones(i);
        for (b, v) in m.current.iter().enumerate() {
            let Some(zone) = &zones[b / ZONE as usize] else {
                // Only a disk that lost writes to a failed sync may fail a read now: the tree
                // nodes it changed since its last commit may be among them; and a disk a
                // failed sync or write marked takes no reads until it is reopened. (After a
                // restart it is back at that commit.)
                assert!(
                    m.poisoned || m.tainted != Tri::No,
                    "{layout} {}: disk {}: reading block {b} failed with the faults off",
                    case.name,
                    m.name
                );
                tally.unreadable += 1;
                continue;
            };
            if let Some(want) = v.bytes() {
                let at = (b % ZONE as usize) * BLOCK;
                assert!(
                    zone[at..at + BLOCK] == want[..],
                    "{layout} {}: disk {} block {b} reads back wrong through the daemon after the \
                     faults stopped (expected {v:?})",
                    case.name,
                    m.name
                );
                if matches!(v, Val::Data(_)) {
                    tally.checked_live += 1;
                }
            }
        }
    }
    // The daemon stops; its final flush fails exactly for the disks that lost writes.
    let flushed = served.stop();
    for (m, ok) in models.iter_mut().zip(flushed) {
        match (m.tainted, ok) {
            (Tri::Yes, true) => panic!(
                "{layout} {}: disk {}: the final flush succeeded although writes were lost to a \
                 failed sync",
                case.name, m.name
            ),
            (Tri::No, false) => panic!(
                "{layout} {}: disk {}: the final flush failed with the faults off",
                case.name, m.name
            ),
            (_, true) => m.flushed(),
            (_, false) => {}
        }
    }
    drop(store);

    // The store at rest: consistent, by the library and by the CLI.
    let report = dovetail_store::check_with(&dir, &ParallaxCheck::ALL).expect("store check runs");
    assert!(
        report.is_ok(),
        "{layout} {}: store check: {:?}",
        case.name,
        report.violations
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dovetail"))
        .args(["store", "check"])
        .arg(&dir)
        .output()
        .expect("run dovetail store check");
    assert!(
        out.status.success(),
        "{layout} {}: dovetail store check failed: {}{}",
        case.name,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A clean restart without faults: what was acknowledged before an acknowledged FLUSH is
    // there.
    let store = Store::open(&dir).expect("reopen the store");
    let served = Served::start(&store, layout, case.two_copies, None);
    for (i, m) in models.iter().enumerate() {
        let bytes = served.read_region(i);
        for b in 0..REGION as usize {
            let got = &bytes[b * BLOCK..(b + 1) * BLOCK];
            let mut allowed = vec![m.durable[b]];
            allowed.extend(m.pending[b].iter().copied());
            if allowed.contains(&Val::Undefined) {
                continue;
            }
            let good = allowed
                .iter()
                .any(|v| v.bytes().is_some_and(|want| want[..] == *got));
            if matches!(m.durable[b], Val::Data(_)) || !m.pending[b].is_empty() {
                tally.checked += 1;
            }
            if !good {
                tally.lost += 1;
                eprintln!(
                    "{layout} {}: disk {} block {b} after the restart is none of {allowed:?}",
                    case.name, m.name
                );
            }
        }
    }
    let clean = served.stop();
    assert!(
        clean.iter().all(|&ok| ok),
        "{layout} {}: the restarted daemon's final flush failed",
        case.name
    );
    assert!(
        tally.injected > 0 && tally.ioerr + tally.masked + tally.quarantines > 0,
        "{layout} {}: the case injected {} faults and failed {} requests: it tests nothing",
        case.name,
        tally.injected,
        tally.ioerr
    );
    tally
}

/// Runs every case (those that apply) on `layout`, disk `d` teed if `teed`, and prints a
/// line per case and a summary.
fn run_layout(layout: &str, teed: bool) {
    let started = Instant::now();
    let name = if teed {
        format!("{layout}+tee({CANDIDATE_LAYOUT})")
    } else {
        layout.to_string()
    };
    let mut total = Tally::default();
    let mut cases = 0;
    for (k, case) in CASES.iter().enumerate() {
        if case.two_copies && (layout != "parallax-v2" || teed) {
            continue;
        }
        cases += 1;
        let t0 = Instant::now();
        let seed = 0x5eed_0000
            + k as u64 * 7919
            + u64::from(layout == "parallax-v2")
            + 2 * u64::from(teed);
        let t = run_case(layout, case, seed, teed);
        println!(
            "store-faults: layout={name} case={} faults injected={} IOERR statuses={} ok={} \
             acknowledged blocks checked={} (live {}) lost={} (masked by a copy: {}, \
             unreadable until the restart: {}, candidate quarantined: {}, {:.0} ms)",
            case.name,
            t.injected,
            t.ioerr,
            t.ok,
            t.checked,
            t.checked_live,
            t.lost,
            t.masked,
            t.unreadable,
            t.quarantines,
            t0.elapsed().as_secs_f64() * 1000.0
        );
        total.add(t);
    }
    println!(
        "store-faults: layout={name} faults injected={} IOERR statuses={} ok={} acknowledged \
         blocks checked={} lost={} ({cases} cases, {:.1} s)",
        total.injected,
        total.ioerr,
        total.ok,
        total.checked,
        total.lost,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(total.lost, 0, "{name}: acknowledged data lost");
    if teed {
        assert!(
            total.quarantines > 0,
            "{name}: no fault ever reached the candidate"
        );
    }
}

#[test]
fn store_faults_parallax_v1() {
    run_layout("parallax-v1", false);
}

#[test]
fn store_faults_parallax_v2() {
    run_layout("parallax-v2", false);
}

/// Disk `d` served through a Tee (sync-cross-checks) over its parallax-v1 trusted version and
/// a parallax-v2 candidate in the same store: a fault in the candidate quarantines it and
/// never reaches the guest; a fault in the trusted version does, as above.
#[test]
fn store_faults_teed() {
    run_layout("parallax-v1", true);
}
