//! Power loss at any point of a disk's life through a migration loses nothing the guest was
//! promised.
//!
//! A two-tier store runs over recording files (`dovetail_store::logwrites`: one log of every
//! write, hole, resize and sync of its metadata file and both tier files, in order). A seeded,
//! single-threaded workload does what a guest and an operator would: writes (whole 4 KiB blocks,
//! partial blocks, unaligned multi-block runs), discards, write-zeroes and FLUSHes to a
//! parallax-v1 disk, a snapshot, a parallax-v2 candidate behind a Tee (sync-cross-checks; guest
//! writes upgrade blocks as they land), copy-on-read rounds (the copy-out part way, each ending
//! in a checkpoint) and the copy-out to completion, the snapshot's deletion, the promotion of the
//! candidate (the old version retired and its extents released), then on the new trusted
//! parallax-v2 version a tiering policy change and mover rounds (blocks re-placed with two
//! copies, then idle blocks demoted, compressed, to the slow tier) and a second snapshot. The
//! presence map is a real file (`PresenceMap` writes through `std::fs`, each change followed by
//! `fdatasync`) that the log watches: its changes are recorded, as a write and a sync, before the
//! next entry of the store's files, so the map is ordered against the candidate's data as the Tee
//! and the copy-out wrote them.
//!
//! Then at least 1000 crash states of the recording (every sync boundary with nothing or
//! everything unsynced kept, seeded random subsets of the unsynced writes, and torn writes at
//! 512-byte sectors) are rebuilt. For each: the store check with the parallax checks passes, the
//! store opens, the catalog holds what was committed before the cut, and the guest's data is
//! checked sector by sector.
//!
//! What is accepted: let F be the last FLUSH acknowledged before the cut. A sector must hold what
//! it held when F was issued (the *acknowledged-stable* data, zeros if never written), or the
//! data of a guest write to that sector issued after F and before the cut (a write after the cut
//! never happened). Nothing else: not older data, not data of another sector. This is checked on
//! the disk's trusted version (whichever the catalog names), on every block the candidate's
//! on-disk presence map says it holds, and exactly (whole image) on every snapshot present. In
//! some states the migration is resumed as a restarted daemon would: the Tee reopens over the
//! presence map (resyncing after the unclean stop), a copy-out finishes, and the candidate must
//! then equal the trusted version block for block, with the store check still passing.
//!
//! Two negative controls show the checks can fail: the parallax-v1 part of the workload over a
//! fast tier whose fdatasync lies fails the store check in some states, and the same part with
//! every FLUSH acknowledged before it is issued loses acknowledged writes in some.
//!
//! The seed is printed; `DOVETAIL_SEED=<n>` replays one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dovetail_layout::parallax::{Class, ParallaxCheck, TierPolicy};
use dovetail_layout::{BlockLayout, Parallax, ParallaxOptions, Sector, Sectors};
use dovetail_migrate::presence::PresenceMap;
use dovetail_migrate::{
    CopyOut, CopyOutOptions, JobState, Policy, Scope, Tee, TeeOptions, Upgrade,
};
use dovetail_store::logwrites::{
    CrashState, Image, Kind, LogFile, MemFile, Plan, Rebuilder, Recording, WriteLog,
};
use dovetail_store::rng::SplitMix64;
use dovetail_store::{check_on_tiers, Store, StoreFile, TeeRec, TeeState, VersionKey};

const DISK: &str = "vda";
/// The guest disk: 1 MiB, 256 blocks.
const SIZE: u64 = 1 << 20;
const BLOCK: usize = 4096;
const SECTOR: usize = 512;
const BLOCKS: u64 = SIZE / BLOCK as u64;
const SECTORS: u64 = SIZE / SECTOR as u64;
/// 32 KiB extents: 8 blocks each, so versions are granted extents often (each grant a
/// metadata commit).
const EXTENT: u64 = 32 << 10;
const FAST_EXTENTS: u32 = 96;
const SLOW_EXTENTS: u32 = 96;
/// At least this many crash states are checked.
const MIN_STATES: usize = 1000;
/// One state in this many (of those with an active candidate) resumes the migration.
const RESUME_EVERY: usize = 9;
const WORKERS: usize = 2;

fn opts() -> ParallaxOptions {
    ParallaxOptions {
        persist_every: None,
        ..ParallaxOptions::default()
    }
}

/// The test's seed: `DOVETAIL_SEED`, or from the clock.
fn seed() -> u64 {
    match std::env::var("DOVETAIL_SEED") {
        Ok(s) => s.trim().parse().expect("DOVETAIL_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

/// Guest data that names its write (never all zeros, different for every write).
fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut r = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&(r.next_u64() | 1).to_le_bytes());
    }
    out.truncate(len);
    out
}

// ------------------------------------------------------------------------- the model

/// A snapshot the workload took: on which version, when, and what it must hold.
#[derive(Debug)]
struct Snap {
    name: &'static str,
    version: VersionKey,
    /// Marker positions: before the call, after it returned.
    begin: usize,
    taken: usize,
    /// Marker before its deletion began, if it was deleted.
    deleted: Option<usize>,
    image: Arc<Vec<u8>>,
}

/// An acknowledged FLUSH: where its acknowledgement is in the log, how many guest writes came
/// before it, and the disk's contents then.
#[derive(Debug)]
struct Ack {
    pos: usize,
    writes: usize,
    image: Arc<Vec<u8>>,
    /// Per block: whether it holds data (was written before the FLUSH).
    written: Arc<Vec<bool>>,
}

/// Log positions of the workload's milestones (`usize::MAX`: never reached).
#[derive(Debug, Clone, Copy)]
struct Milestones {
    /// `create_disk` and the trusted version's format returned.
    disk: usize,
    /// The candidate is in the catalog with its tee record.
    candidate: usize,
    /// Before `Tee::close` and the catalog's role swap.
    promote_begin: usize,
    /// `promote_deferred` returned.
    promoted: usize,
}

/// What the guest did, and where in the log.
#[derive(Debug)]
struct Model {
    /// Every guest write: first sector, data.
    writes: Vec<(u64, Vec<u8>)>,
    /// The log position of the marker just before each write was issued.
    issued: Vec<usize>,
    acks: Vec<Ack>,
    snaps: Vec<Snap>,
    image: Vec<u8>,
    at: Milestones,
    v1: VersionKey,
    v2: VersionKey,
    /// FLUSHes issued, blocks the mover moved, copy-out jobs: for the summary.
    flushes: usize,
    tier_moves: u64,
    copy_rounds: usize,
}

impl Model {
    fn new() -> Model {
        Model {
            writes: Vec::new(),
            issued: Vec::new(),
            acks: Vec::new(),
            snaps: Vec::new(),
            image: vec![0u8; SIZE as usize],
            at: Milestones {
                disk: usize::MAX,
                candidate: usize::MAX,
                promote_begin: usize::MAX,
                promoted: usize::MAX,
            },
            v1: VersionKey(0),
            v2: VersionKey(0),
            flushes: 0,
            tier_moves: 0,
            copy_rounds: 0,
        }
    }

    /// What a crash with cut `cut` must leave: the stable image and the writes that may or may
    /// not have landed.
    fn expect(&self, cut: usize) -> Expect<'_> {
        let ack = self.acks.iter().rev().find(|a| a.pos < cut);
        let from = ack.map_or(0, |a| a.writes);
        Expect {
            stable: ack.map(|a| a.image.clone()),
            written: ack.map(|a| a.written.clone()),
            later: (from..self.writes.len())
                .filter(|&i| self.issued[i] < cut)
                .map(|i| &self.writes[i])
                .collect(),
        }
    }
}

/// The accepted contents of every sector at one cut.
struct Expect<'a> {
    /// The disk when the last acknowledged FLUSH was issued (`None`: zeros).
    stable: Option<Arc<Vec<u8>>>,
    /// Which of its blocks hold data.
    written: Option<Arc<Vec<bool>>>,
    /// Guest writes issued after it and before the cut.
    later: Vec<&'a (u64, Vec<u8>)>,
}

impl Expect<'_> {
    fn stable_block(&self, block: u64) -> &[u8] {
        const ZEROS: [u8; BLOCK] = [0u8; BLOCK];
        let at = block as usize * BLOCK;
        self.stable
            .as_ref()
            .map_or(&ZEROS[..], |s| &s[at..at + BLOCK])
    }

    /// Whether the block holds acknowledged data (was written before the last acknowledged
    /// FLUSH).
    fn acknowledged(&self, block: u64) -> bool {
        self.written.as_ref().is_some_and(|w| w[block as usize])
    }

    /// Whether `got` is an accepted content of `block`; if not, the first bad sector.
    fn check_block(&self, block: u64, got: &[u8]) -> Result<(), u64> {
        let stable = self.stable_block(block);
        if got == stable {
            return Ok(());
        }
        for s in 0..(BLOCK / SECTOR) {
            let sector = block * (BLOCK / SECTOR) as u64 + s as u64;
            let g = &got[s * SECTOR..(s + 1) * SECTOR];
            if g == &stable[s * SECTOR..(s + 1) * SECTOR] {
                continue;
            }
            let by_later = self.later.iter().any(|(first, d)| {
                let n = (d.len() / SECTOR) as u64;
                (*first..first + n).contains(&sector) && {
                    let o = (sector - first) as usize * SECTOR;
                    &d[o..o + SECTOR] == g
                }
            });
            if !by_later {
                return Err(sector);
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------- the workload

/// The workload's state: the log, the model, the generator.
struct Run {
    log: WriteLog,
    model: Model,
    rng: SplitMix64,
    /// Acknowledge FLUSHes before issuing them (the [`Workload::EarlyAck`] control).
    early_ack: bool,
}

impl Run {
    /// One guest write of a random kind: a whole block, part of a block, an unaligned run over
    /// several blocks, or (one in eleven) a discard or write-zeroes of an unaligned run (both
    /// read back as zeros: a write of zeros to the model); half of them in the first 32 blocks,
    /// so blocks are overwritten.
    fn write(&mut self, to: &dyn BlockLayout) {
        let rng = &mut self.rng;
        let block = if rng.below(2) == 0 {
            rng.below(32)
        } else {
            rng.below(BLOCKS)
        };
        let kind = rng.below(11);
        let (sector, sectors) = match kind {
            0..=3 => (block * 8, 8),
            4..=6 => {
                let off = rng.below(8);
                (block * 8 + off, 1 + rng.below(8 - off))
            }
            7..=9 => {
                let n = 9 + rng.below(40);
                (rng.below(SECTORS - n), n)
            }
            _ => {
                let n = 1 + rng.below(24);
                (block * 8 + rng.below(8), n)
            }
        };
        let sectors = sectors.min(SECTORS - sector);
        let i = self.model.writes.len();
        let seed = self.rng.next_u64() ^ i as u64;
        let pos = self.log.mark(format!("write {i}"));
        let d = if kind == 10 {
            let (at, len) = (Sector(sector), Sectors(sectors));
            if seed & 1 == 0 {
                to.discard(at, len).expect("guest discard");
            } else {
                to.write_zeroes(at, len, seed & 2 == 0)
                    .expect("guest write-zeroes");
            }
            vec![0u8; sectors as usize * SECTOR]
        } else {
            let d = data(seed, sectors as usize * SECTOR);
            to.write(Sector(sector), &d).expect("guest write");
            d
        };
        let at = sector as usize * SECTOR;
        self.model.image[at..at + d.len()].copy_from_slice(&d);
        self.model.writes.push((sector, d));
        self.model.issued.push(pos);
    }

    /// A guest FLUSH; once it returned (and the presence map's changes are logged), it is
    /// acknowledged.
    fn flush(&mut self, to: &dyn BlockLayout) {
        let image = Arc::new(self.model.image.clone());
        let written = Arc::new(
            image
                .chunks(BLOCK)
                .map(|b| b.iter().any(|&x| x != 0))
                .collect(),
        );
        let writes = self.model.writes.len();
        let early = self
            .early_ack
            .then(|| self.log.mark("flush acknowledged early"));
        to.flush().expect("guest flush");
        let pos = self
            .log
            .mark(format!("flush {} acknowledged", self.model.flushes));
        let pos = early.unwrap_or(pos);
        self.model.flushes += 1;
        self.model.acks.push(Ack {
            pos,
            writes,
            image,
            written,
        });
    }

    /// `n` guest operations: writes, and a FLUSH one time in six.
    fn burst(&mut self, to: &dyn BlockLayout, n: usize) {
        for _ in 0..n {
            if self.rng.below(6) == 0 {
                self.flush(to);
            } else {
                self.write(to);
            }
        }
    }

    fn snapshot(&mut self, p: &Parallax, version: VersionKey, name: &'static str) {
        let begin = self.log.mark(format!("snapshot {name}"));
        p.snapshot(name).expect("snapshot");
        let taken = self.log.mark(format!("snapshot {name} taken"));
        self.model.snaps.push(Snap {
            name,
            version,
            begin,
            taken,
            deleted: None,
            image: Arc::new(self.model.image.clone()),
        });
    }

    /// A mover round over the whole disk; returns the blocks moved.
    fn tier_round(&mut self, p: &Parallax) -> u64 {
        let mut moved = 0;
        for _ in 0..10_000 {
            let r = p.tier_pass(16, 64).expect("tier pass");
            moved += r.moved();
            if r.wrapped {
                self.model.tier_moves += moved;
                return moved;
            }
        }
        panic!("the mover never finished a round");
    }
}

/// Opens (formatting on first use, as the daemon does) version `key` of the disk.
fn open_version(store: &Arc<Store>, key: VersionKey, layout: &str) -> Parallax {
    let space = store.space(key).expect("space");
    if store.version(key).expect("version").root_len == 0 {
        Parallax::create_layout(space, layout, Sectors(SIZE / 512), opts()).expect("format")
    } else {
        Parallax::open_with(space, opts()).expect("open version")
    }
}

fn copy_opts(scope: Scope) -> CopyOutOptions {
    CopyOutOptions {
        rate: 0,
        batch_blocks: 8,
        // Only the checkpoint at the end of a job: the job's I/O is then the same in every run
        // of a seed.
        checkpoint_every: Duration::from_secs(3600),
        scope,
    }
}

fn tee_rec() -> TeeRec {
    TeeRec {
        policy: Policy::SyncCrossChecks.to_string(),
        faults: Vec::new(),
        state: TeeState::Active,
        reason: String::new(),
        changed: 1,
    }
}

/// The files a workload starts from: a fresh two-tier store.
fn fresh_store() -> (MemFile, MemFile, MemFile) {
    let (meta, fast, slow) = (MemFile::new(), MemFile::new(), MemFile::new());
    drop(
        Store::create_on_tiers(
            Box::new(meta.clone()),
            vec![
                ("fast".into(), Box::new(fast.clone()), FAST_EXTENTS),
                ("slow".into(), Box::new(slow.clone()), SLOW_EXTENTS),
            ],
            EXTENT,
        )
        .expect("create the store"),
    );
    (meta, fast, slow)
}

/// A file whose `sync` claims success without syncing (nothing reaches the log): the broken
/// fdatasync of the negative control.
#[derive(Debug)]
struct LyingSync(LogFile);

impl StoreFile for LyingSync {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_at(offset, buf)
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn size(&self) -> std::io::Result<u64> {
        self.0.size()
    }
    fn set_size(&self, len: u64) -> std::io::Result<()> {
        self.0.set_size(len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.zero_range(offset, len)
    }
}

/// A tier file of `extents` extents as the store uses it: with `DOVETAIL_TEST_CACHE=none`
/// (scripts/test.sh), through the transfers direct I/O makes (`serve --cache none`: partial
/// blocks read-modify-written as whole 4 KiB blocks, `dovetail_store::direct::Widened`), so
/// the crash states are the ones those can leave; else as it is.
fn direct_io(f: LogFile, extents: u32) -> Box<dyn StoreFile> {
    match std::env::var("DOVETAIL_TEST_CACHE").as_deref() {
        Ok("none") => Box::new(dovetail_store::direct::Widened::new(
            f,
            4096,
            u64::from(extents) * EXTENT,
        )),
        _ => Box::new(f),
    }
}

/// Which workload [`record`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// Everything, through the migration and the promotion to tiering on parallax-v2.
    Full,
    /// A negative control: the parallax-v1 part alone, over a fast tier whose syncs lie.
    LyingFastTier,
    /// A negative control: the parallax-v1 part alone, each FLUSH acknowledged before it is
    /// issued (as a device with a volatile cache that ignores FLUSH would).
    EarlyAck,
}

/// Runs the workload over recording files; returns the recording and the model.
fn record(seed: u64, dir: &std::path::Path, workload: Workload) -> (Recording, Model) {
    let (meta, fast, slow) = fresh_store();
    let log = WriteLog::new();
    // The presence map is written through std::fs: the log looks at it before every entry.
    let map = dir.join(format!("recorded-{workload:?}.map"));
    log.watch("presence", &map);
    let wrap = |name: &str, f: &MemFile| log.wrap(name, Box::new(f.clone())).expect("wrap");
    let fast_file: Box<dyn StoreFile> = match workload {
        Workload::LyingFastTier => Box::new(LyingSync(wrap("fast", &fast))),
        _ => direct_io(wrap("fast", &fast), FAST_EXTENTS),
    };
    let store = Store::open_on_tiers(
        Box::new(wrap("meta", &meta)),
        vec![fast_file, direct_io(wrap("slow", &slow), SLOW_EXTENTS)],
    )
    .expect("open the store over the recording files");
    let mut run = Run {
        log: log.clone(),
        model: Model::new(),
        rng: SplitMix64::new(seed),
        early_ack: workload == Workload::EarlyAck,
    };

    // A parallax-v1 disk, written and flushed, snapshotted.
    run.model.v1 = store
        .create_disk(DISK, SIZE, "parallax-v1")
        .expect("create disk");
    let v1 = Arc::new(open_version(&store, run.model.v1, "parallax-v1"));
    run.model.at.disk = log.mark("disk created");
    run.burst(&*v1, 40);
    run.flush(&*v1);
    run.snapshot(&v1, run.model.v1, "s1");
    run.burst(&*v1, 25);
    run.flush(&*v1);
    if workload != Workload::Full {
        drop(v1);
        drop(store);
        return (log.recording(), run.model);
    }

    // A parallax-v2 candidate behind a Tee; guest writes upgrade the blocks they touch.
    run.model.v2 = store
        .add_version(DISK, "parallax-v2")
        .expect("add candidate");
    store.set_tee(DISK, tee_rec()).expect("tee record");
    run.model.at.candidate = log.mark("candidate in the catalog");
    let v2 = Arc::new(open_version(&store, run.model.v2, "parallax-v2"));
    log.mark("candidate formatted");
    let presence = PresenceMap::create(&map, BLOCKS, run.model.v2.0).expect("presence map");
    let tee = Tee::new(
        v1.clone(),
        v2.clone(),
        Arc::new(presence),
        TeeOptions::new(DISK, Policy::SyncCrossChecks),
    )
    .expect("tee");
    log.mark("tee up");
    run.burst(&tee, 30);
    run.flush(&tee);

    // The copy-out part way: copy-on-read rounds, each ended (and checkpointed) by a cancel.
    let upgrade: Arc<dyn Upgrade> = Arc::from(
        dovetail_migrate::upgrade::for_versions("parallax-v1", Some(v1.clone()), &v2)
            .expect("v1 -> v2 upgrade"),
    );
    for round in 0..2 {
        let job = CopyOut::start(
            &tee,
            upgrade.clone(),
            copy_opts(Scope::ReadBlocks),
            Box::new(|_, _| {}),
        )
        .expect("copy-on-read");
        let mut wanted = Vec::new();
        for _ in 0..3 {
            let first = run.rng.below(BLOCKS - 16);
            let n = 1 + run.rng.below(16);
            let mut buf = vec![0u8; n as usize * BLOCK];
            tee.read(Sector(first * 8), &mut buf).expect("guest read");
            let at = first as usize * BLOCK;
            assert!(
                buf == run.model.image[at..at + buf.len()],
                "guest read through the tee"
            );
            wanted.push((first, n));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !wanted
            .iter()
            .all(|&(f, n)| tee.presence().contains_all(f, n))
        {
            assert!(
                Instant::now() < deadline,
                "copy-on-read never copied the read blocks"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        job.cancel();
        assert_eq!(job.state(), JobState::Cancelled);
        log.mark(format!("copy-on-read round {round} checkpointed"));
        run.model.copy_rounds += 1;
        run.burst(&tee, 12);
        run.flush(&tee);
    }

    // The copy-out to completion.
    let job = CopyOut::start(
        &tee,
        upgrade.clone(),
        copy_opts(Scope::Everything),
        Box::new(|_, _| {}),
    )
    .expect("copy-out");
    assert_eq!(job.wait(Duration::from_secs(120)), JobState::Done);
    drop(job);
    log.mark("copy-out done");
    run.model.copy_rounds += 1;
    assert_eq!(tee.presence().count(), BLOCKS);
    run.burst(&tee, 15);
    run.flush(&tee);

    // The snapshot retires with v1: delete it; then promote.
    let del = log.mark("deleting snapshot s1");
    v1.delete_snapshot("s1").expect("delete snapshot");
    run.model.snaps[0].deleted = Some(del);
    run.flush(&tee);
    assert!(!tee.quarantined(), "{:?}", tee.events());
    run.model.at.promote_begin = log.mark("promote");
    tee.close().expect("close the tee");
    let (old, freed) = store.promote_deferred(DISK).expect("promote");
    assert_eq!(old, run.model.v1);
    run.model.at.promoted = log.mark("promoted");
    store.release(freed);
    log.mark("released");
    drop(tee);
    drop(v1);

    // parallax-v2 trusted: hot data kept twice (every block re-placed), then idle blocks
    // demoted, compressed, to the slow tier.
    run.burst(&*v2, 20);
    run.flush(&*v2);
    let mut policy = TierPolicy::defaults(2);
    policy.classes[Class::Hot as usize].copies = 2;
    policy.cold_after_secs = 1;
    policy.hot_accesses = 3;
    v2.set_tier_policy(policy).expect("tier policy");
    log.mark("tier policy set");
    v2.observe_temperature();
    let placed = run.tier_round(&v2);
    assert!(placed > 0, "the policy change re-places blocks");
    run.burst(&*v2, 10);
    run.flush(&*v2);
    std::thread::sleep(Duration::from_millis(1100));
    v2.observe_temperature();
    let demoted = run.tier_round(&v2);
    assert!(demoted > 0, "idle blocks are demoted");
    log.mark("demoted");
    run.burst(&*v2, 15);
    run.flush(&*v2);
    run.snapshot(&v2, run.model.v2, "s2");
    // The run ends with writes never flushed.
    run.burst(&*v2, 8);
    for _ in 0..3 {
        run.write(&*v2);
    }
    drop(v2);
    drop(store);
    (log.recording(), run.model)
}

// ------------------------------------------------------------------------- checking a state

/// What checking one state found.
#[derive(Debug, Default)]
struct Found {
    states: usize,
    kinds: [usize; 3],
    /// Blocks holding acknowledged data that were read back and checked.
    acked_checked: u64,
    /// Blocks (of any version or snapshot) holding data that is not accepted.
    lost: u64,
    resumed: usize,
    with_candidate: usize,
    presence_blocks: u64,
    /// States whose store check (with the layouts' checks) failed.
    check_failures: usize,
    problems: Vec<String>,
}

impl Found {
    fn add(&mut self, o: Found) {
        self.states += o.states;
        for i in 0..3 {
            self.kinds[i] += o.kinds[i];
        }
        self.acked_checked += o.acked_checked;
        self.lost += o.lost;
        self.resumed += o.resumed;
        self.with_candidate += o.with_candidate;
        self.presence_blocks += o.presence_blocks;
        self.check_failures += o.check_failures;
        self.problems.extend(o.problems);
    }
}

fn file(img: &Option<Image>) -> Box<dyn StoreFile> {
    Box::new(MemFile::with_image(
        img.clone().expect("a store file exists in every state"),
    ))
}

fn read_all(d: &dyn BlockLayout) -> Vec<u8> {
    let mut buf = vec![0u8; (d.capacity().0 * 512) as usize];
    d.read(Sector(0), &mut buf).expect("read the whole disk");
    buf
}

/// Checks every block of `image` (a version's contents) against `expect`; `only` limits it to
/// the blocks it returns true for. Returns (acknowledged blocks checked, bad blocks).
fn check_image(
    expect: &Expect<'_>,
    image: &[u8],
    only: impl Fn(u64) -> bool,
    what: &str,
    problems: &mut Vec<String>,
) -> (u64, u64) {
    let (mut acked, mut bad) = (0, 0);
    for b in (0..BLOCKS).filter(|&b| only(b)) {
        let got = &image[b as usize * BLOCK..(b as usize + 1) * BLOCK];
        if expect.acknowledged(b) {
            acked += 1;
        }
        if let Err(sector) = expect.check_block(b, got) {
            bad += 1;
            problems.push(format!(
                "{what}: block {b} (sector {sector}) holds data neither acknowledged nor \
                 written after"
            ));
        }
    }
    (acked, bad)
}

struct Ctx<'a> {
    rec: &'a Recording,
    model: &'a Model,
    dir: &'a std::path::Path,
    worker: usize,
    meta: usize,
    fast: usize,
    slow: usize,
    /// The presence map, once it was seen.
    presence: Option<usize>,
}

/// Checks one crash state; problems go into `f`.
fn check_state(
    c: &Ctx<'_>,
    index: usize,
    state: &CrashState,
    files: &[Option<Image>],
    f: &mut Found,
) {
    let m = c.model;
    let cut = c.rec.cut(state.syncs);
    let at = |p: usize| p < cut;
    let name = format!("state {index} ({state}, cut at entry {cut})");
    let problem = |f: &mut Found, s: String| f.problems.push(format!("{name}: {s}"));
    f.states += 1;
    f.kinds[state.kind as usize] += 1;
    let data = || vec![file(&files[c.fast]), file(&files[c.slow])];

    let report = match check_on_tiers(file(&files[c.meta]), data(), &ParallaxCheck::ALL) {
        Ok(r) => r,
        Err(e) => return problem(f, format!("the check cannot run: {e}")),
    };
    if !report.is_ok() {
        f.check_failures += 1;
        return problem(f, format!("the store check failed:\n{report}"));
    }
    // The store's own files (clones share them): checked again after a resumed migration.
    let own: Vec<MemFile> = [c.meta, c.fast, c.slow]
        .iter()
        .map(|&i| {
            MemFile::with_image(
                files[i]
                    .clone()
                    .expect("a store file exists in every state"),
            )
        })
        .collect();
    let boxed = |i: usize| Box::new(own[i].clone()) as Box<dyn StoreFile>;
    let store = match Store::open_on_tiers(boxed(0), vec![boxed(1), boxed(2)]) {
        Ok(s) => s,
        Err(e) => return problem(f, format!("the store does not open: {e}")),
    };
    let expect = m.expect(cut);
    let disk = match store.disk(DISK) {
        Ok(d) => d,
        Err(_) => {
            if at(m.at.disk) {
                problem(f, "the disk was created before the cut but is gone".into());
            }
            return;
        }
    };
    // The catalog: the roles as committed before the cut.
    let promoted = at(m.at.promoted);
    let promoting = at(m.at.promote_begin) && !promoted;
    let want_trusted: &[VersionKey] = if promoted {
        &[m.v2]
    } else if promoting {
        &[m.v1, m.v2]
    } else {
        &[m.v1]
    };
    if !want_trusted.contains(&disk.trusted) {
        return problem(
            f,
            format!(
                "trusted version {} (expected {want_trusted:?})",
                disk.trusted
            ),
        );
    }
    let candidate_expected = at(m.at.candidate) && disk.trusted == m.v1;
    match disk.candidate {
        Some(k) if k != m.v2 || disk.trusted != m.v1 => {
            return problem(f, format!("unexpected candidate {k}"))
        }
        None if candidate_expected => {
            return problem(f, "the candidate committed before the cut is gone".into())
        }
        _ => {}
    }
    if candidate_expected && disk.tee.as_ref().map(|t| t.state) != Some(TeeState::Active) {
        return problem(f, format!("tee record {:?}", disk.tee));
    }

    // The trusted version: every block accepted.
    if store.version(disk.trusted).expect("version").root_len == 0 {
        if at(m.at.disk) {
            problem(f, "the trusted version lost its root record".into());
        }
        return;
    }
    let trusted = match Parallax::open_with(store.space(disk.trusted).expect("space"), opts()) {
        Ok(p) => Arc::new(p),
        Err(e) => return problem(f, format!("the trusted version does not open: {e}")),
    };
    let timage = read_all(&*trusted);
    let mut bad = Vec::new();
    let (acked, lost) = check_image(&expect, &timage, |_| true, "trusted", &mut bad);
    f.acked_checked += acked;
    f.lost += lost;
    for b in bad.into_iter().take(3) {
        problem(f, b);
    }

    // Its snapshots: exactly what they froze; those taken (and not being deleted) are there.
    let listed = trusted.snapshots();
    for s in m.snaps.iter().filter(|s| s.version == disk.trusted) {
        let present = listed.iter().any(|l| l.name == s.name);
        let must = at(s.taken) && s.deleted.is_none_or(|d| !at(d));
        let may = at(s.begin);
        if (must && !present) || (present && !may) {
            problem(f, format!("snapshot {} present: {present}", s.name));
            continue;
        }
        if present {
            let snap = trusted.open_snapshot(s.name).expect("open snapshot");
            let got = read_all(&snap);
            let wrong = (0..BLOCKS as usize)
                .filter(|&b| got[b * BLOCK..(b + 1) * BLOCK] != s.image[b * BLOCK..(b + 1) * BLOCK])
                .count() as u64;
            if wrong > 0 {
                f.lost += wrong;
                problem(
                    f,
                    format!(
                        "snapshot {}: {wrong} blocks differ from what it froze",
                        s.name
                    ),
                );
            }
        }
    }
    if let Some(extra) = listed.iter().find(|l| {
        !m.snaps
            .iter()
            .any(|s| s.name == l.name && s.version == disk.trusted)
    }) {
        problem(f, format!("unknown snapshot {}", extra.name));
    }

    // The candidate: every block its on-disk presence map names is accepted.
    let Some(ck) = disk.candidate else { return };
    if store.version(ck).expect("version").root_len == 0 {
        if c.presence.is_some_and(|i| files[i].is_some()) {
            problem(
                f,
                "a presence map exists for a candidate never formatted".into(),
            );
        }
        return;
    }
    f.with_candidate += 1;
    let cand = match Parallax::open_with(store.space(ck).expect("space"), opts()) {
        Ok(p) => Arc::new(p),
        Err(e) => return problem(f, format!("the candidate does not open: {e}")),
    };
    let map_path = c.dir.join(format!("worker{}.map", c.worker));
    let _ = std::fs::remove_file(&map_path);
    let presence = match c.presence.and_then(|i| files[i].as_ref()) {
        Some(img) => {
            std::fs::write(&map_path, img.to_vec()).expect("write the presence map");
            match PresenceMap::open(&map_path, BLOCKS, ck.0) {
                Ok(p) => Some(p),
                Err(e) => return problem(f, format!("the presence map does not open: {e}")),
            }
        }
        None => None,
    };
    let cimage = read_all(&*cand);
    if let Some(p) = &presence {
        f.presence_blocks += p.count();
        let mut bad = Vec::new();
        let (acked, lost) = check_image(&expect, &cimage, |b| p.contains(b), "candidate", &mut bad);
        f.acked_checked += acked;
        f.lost += lost;
        for b in bad.into_iter().take(3) {
            problem(f, b);
        }
    }

    // Resume the migration as a restarted daemon would, in some states.
    if f.with_candidate % RESUME_EVERY != 0 || disk.tee.is_none() {
        return;
    }
    f.resumed += 1;
    let presence = match presence {
        Some(p) => p,
        None => PresenceMap::create(&map_path, BLOCKS, ck.0).expect("new presence map"),
    };
    let tee = match Tee::new(
        trusted.clone(),
        cand.clone(),
        Arc::new(presence),
        TeeOptions::new(DISK, Policy::SyncCrossChecks),
    ) {
        Ok(t) => t,
        Err(e) => return problem(f, format!("the tee does not start again: {e}")),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while tee.unverified_blocks() > 0 {
        if Instant::now() > deadline {
            return problem(f, "the resync never finished".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let upgrade: Arc<dyn Upgrade> = Arc::from(
        dovetail_migrate::upgrade::for_versions("parallax-v1", Some(trusted.clone()), &cand)
            .expect("upgrade"),
    );
    let job = CopyOut::start(
        &tee,
        upgrade,
        copy_opts(Scope::Everything),
        Box::new(|_, _| {}),
    )
    .expect("copy-out");
    let end = job.wait(Duration::from_secs(60));
    drop(job);
    if end != JobState::Done || tee.quarantined() {
        return problem(
            f,
            format!("the resumed copy-out ended {end:?}: {:?}", tee.events()),
        );
    }
    tee.flush().expect("flush");
    tee.close().expect("close");
    drop(tee);
    let after = read_all(&*cand);
    let differ = (0..BLOCKS as usize)
        .filter(|&b| after[b * BLOCK..(b + 1) * BLOCK] != timage[b * BLOCK..(b + 1) * BLOCK])
        .count();
    if differ > 0 || read_all(&*trusted) != timage {
        f.lost += differ as u64;
        return problem(
            f,
            format!(
                "after the resumed copy-out, {differ} blocks of the candidate differ from the \
                 trusted version"
            ),
        );
    }
    drop((cand, trusted));
    drop(store);
    // The files as the resumed store left them.
    let report = check_on_tiers(boxed(0), vec![boxed(1), boxed(2)], &ParallaxCheck::ALL);
    match report {
        Ok(r) if r.is_ok() => {}
        Ok(r) => problem(
            f,
            format!("the store check failed after the resumed copy-out:\n{r}"),
        ),
        Err(e) => problem(
            f,
            format!("the check cannot run after the resumed copy-out: {e}"),
        ),
    }
}

/// Checks `states` of `rec` on [`WORKERS`] threads.
fn check_states(
    rec: &Recording,
    model: &Model,
    states: &[CrashState],
    dir: &std::path::Path,
) -> Found {
    let id = |name| rec.file_named(name).expect("recorded file");
    let mut total = Found::default();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let ctx = Ctx {
                    rec,
                    model,
                    dir,
                    worker: w,
                    meta: id("meta"),
                    fast: id("fast"),
                    slow: id("slow"),
                    presence: rec.file_named("presence"),
                };
                s.spawn(move || {
                    let mut found = Found::default();
                    let mut r = Rebuilder::new(rec);
                    for (i, st) in states.iter().enumerate().skip(w).step_by(WORKERS) {
                        let files = r.rebuild(st).expect("rebuild a crash state");
                        check_state(&ctx, i, st, &files, &mut found);
                    }
                    found
                })
            })
            .collect();
        for w in workers {
            total.add(w.join().expect("worker"));
        }
    });
    total
}

/// The negative controls: with a tier file whose fdatasync lies, the store check fails in some
/// crash states; with FLUSHes acknowledged before they are issued, acknowledged writes are lost
/// in some; and this test's checks see both (so they can fail).
#[test]
fn a_lying_fdatasync_or_an_early_acknowledgement_is_caught() {
    let seed = seed();
    eprintln!("powerloss (controls): seed {seed} (DOVETAIL_SEED={seed} replays it)");
    let tmp = tempfile::tempdir().expect("tempdir");
    for workload in [Workload::LyingFastTier, Workload::EarlyAck] {
        let (rec, model) = record(seed, tmp.path(), workload);
        let states = rec.states(&Plan {
            seed,
            subsets: 0,
            torn: 0,
        });
        let found = check_states(&rec, &model, &states, tmp.path());
        eprintln!(
            "powerloss ({workload:?}): seed={seed} states={} acknowledged blocks checked={} \
             lost={} check failures={} problems={}",
            found.states,
            found.acked_checked,
            found.lost,
            found.check_failures,
            found.problems.len()
        );
        if let Some(p) = found.problems.first() {
            eprintln!(
                "powerloss ({workload:?}): {}",
                p.lines().next().unwrap_or("")
            );
        }
        assert_eq!(found.states, states.len());
        match workload {
            Workload::LyingFastTier => assert!(
                found.check_failures > 0,
                "seed {seed}: the store check passed every state over a lying fdatasync"
            ),
            _ => assert!(
                found.lost > 0,
                "seed {seed}: no write acknowledged early was lost"
            ),
        }
    }
}

#[test]
fn power_loss_anywhere_in_a_migration_loses_no_acknowledged_write() {
    let seed = seed();
    eprintln!("powerloss: seed {seed} (DOVETAIL_SEED={seed} replays it)");
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rec, model) = record(seed, tmp.path(), Workload::Full);
    let recorded = started.elapsed();
    let states = rec.states(&Plan {
        seed,
        subsets: 2,
        torn: 1,
    });
    eprintln!(
        "powerloss: recorded {} entries ({} syncs, {} guest writes, {} acknowledged flushes, \
         {} copy rounds, {} tier moves) in {:.2} s; {} states",
        rec.entries().len(),
        rec.sync_count(),
        model.writes.len(),
        model.acks.len(),
        model.copy_rounds,
        model.tier_moves,
        recorded.as_secs_f64(),
        states.len()
    );
    assert!(
        states.len() >= MIN_STATES,
        "seed {seed}: only {} crash states",
        states.len()
    );
    let total = check_states(&rec, &model, &states, tmp.path());
    let kind = |k: Kind| total.kinds[k as usize];
    eprintln!(
        "powerloss: seed={seed} states={} (boundaries {}, subsets {}, torn {}) acknowledged \
         blocks checked={} lost={} (candidate states {}, presence blocks checked {}, migrations \
         resumed {}) in {:.1} s",
        total.states,
        kind(Kind::Boundary),
        kind(Kind::Subset),
        kind(Kind::Torn),
        total.acked_checked,
        total.lost,
        total.with_candidate,
        total.presence_blocks,
        total.resumed,
        started.elapsed().as_secs_f64()
    );
    for p in total.problems.iter().take(10) {
        eprintln!("powerloss: seed {seed}: {p}");
    }
    assert!(
        total.problems.is_empty(),
        "seed {seed}: {} problems (first above)",
        total.problems.len()
    );
    assert_eq!(total.lost, 0, "seed {seed}");
    assert!(total.states >= MIN_STATES);
    assert!(total.acked_checked > 0);
    assert!(total.resumed > 0, "no state resumed the migration");
}
