//! Power loss while commits race writes: a FLUSH commit (and a snapshot, and parallax-v2's
//! annotation timer) runs while other threads, as other queues would, keep writing to the same
//! and to different blocks of one disk, and a power cut at any point of that loses nothing the
//! guest was promised: neither the disk's acknowledged writes nor a snapshot that returned, and
//! every snapshot there holds exactly what was acknowledged before it was taken.
//!
//! The store's files are recorded (`dovetail_store::logwrites`: one ordered log of every write,
//! hole, resize and fdatasync of the metadata file and both tier files). Three writer threads
//! write whole 4 KiB blocks, each block's data naming its write, half of them to 8 blocks all
//! threads share; a fourth thread sends FLUSHes one after another, and every third FLUSH also
//! takes a snapshot; on parallax-v2 the annotation timer commits every few milliseconds too. Each
//! write's issue and completion, and each FLUSH's issue and acknowledgement, is a marker in the
//! same log, so for any cut the test knows what had been promised. Every sync boundary and
//! seeded subsets and torn versions of the writes not yet synced are rebuilt; each state must
//! pass the store check with the parallax checks, open, and hold in every sector of the disk an
//! accepted value.
//!
//! Accepted: let F be the last FLUSH acknowledged before the cut. The writes that completed
//! before F was issued are *stable*; of those that wrote a sector, the ones no other stable write
//! of it followed (issued after it completed) are its *latest* (several when they overlapped in
//! time: either order is right). A sector must hold the data of one of its latest stable writes
//! (zeros if it has none), or of a write to it that was not stable and was issued before the cut.
//!
//! A negative control acknowledges each FLUSH before issuing it (as a device whose volatile
//! cache ignores FLUSH would) and must lose acknowledged writes in some state, so the check can
//! fail.
//!
//! The seed is printed; `DOVETAIL_SEED=<n>` replays the choices (not the threads' interleaving).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dovetail_layout::parallax::ParallaxCheck;
use dovetail_layout::{BlockLayout, Parallax, ParallaxOptions, Sector, Sectors};
use dovetail_store::logwrites::{
    CrashState, Image, Kind, MemFile, Plan, Rebuilder, Recording, WriteLog,
};
use dovetail_store::rng::SplitMix64;
use dovetail_store::{check_on_tiers, Store, StoreFile, VersionKey};

const DISK: &str = "vda";
/// The guest disk: 1 MiB, 256 blocks.
const SIZE: u64 = 1 << 20;
const BLOCK: usize = 4096;
const SECTOR: usize = 512;
const BLOCKS: u64 = SIZE / BLOCK as u64;
/// 32 KiB extents: 8 blocks each, so the version is granted extents often, each grant a
/// metadata commit of its own racing the writes too.
const EXTENT: u64 = 32 << 10;
const FAST_EXTENTS: u32 = 128;
const SLOW_EXTENTS: u32 = 32;
/// Threads writing at once, and writes each.
const WRITERS: usize = 3;
const WRITES_EACH: usize = 60;
/// Blocks every writer writes half of its writes to.
const SHARED_BLOCKS: u64 = 8;
/// Threads checking states.
const CHECKERS: usize = 2;

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
fn data(seed: u64) -> Vec<u8> {
    let mut r = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(BLOCK);
    while out.len() < BLOCK {
        out.extend_from_slice(&(r.next_u64() | 1).to_le_bytes());
    }
    out
}

fn opts(layout: &str) -> ParallaxOptions {
    ParallaxOptions {
        // parallax-v2's annotation timer, often, so its commits race the writes as well.
        persist_every: (layout == "parallax-v2").then_some(Duration::from_millis(3)),
        ..ParallaxOptions::default()
    }
}

/// One guest write: its block, data, and the log positions of the markers just before it was
/// issued and just after it completed.
#[derive(Debug)]
struct Write {
    block: u64,
    data: Vec<u8>,
    issued: usize,
    done: usize,
}

/// One FLUSH: the markers just before it was issued and just after it was acknowledged.
#[derive(Debug, Clone, Copy)]
struct Flush {
    issued: usize,
    acked: usize,
}

/// One snapshot: its name, and the markers just before it was taken and just after it returned.
#[derive(Debug, Clone)]
struct Snap {
    name: String,
    issued: usize,
    acked: usize,
}

/// What the guest did, and where in the log.
#[derive(Debug, Default)]
struct Model {
    writes: Vec<Write>,
    flushes: Vec<Flush>,
    snapshots: Vec<Snap>,
    /// Per block, the indices of the writes to it (filled once the recording ends).
    by_block: Vec<Vec<usize>>,
}

/// What a block may hold at one cut.
struct Accepted<'a> {
    /// Data of the block's latest stable writes and of its writes issued after.
    data: Vec<&'a [u8]>,
    /// Zeros are accepted (no stable write of the block).
    zeros: bool,
    /// The block holds acknowledged data.
    acknowledged: bool,
}

impl Accepted<'_> {
    /// Whether sector `s` holding `got` is accepted.
    fn sector(&self, s: usize, got: &[u8]) -> bool {
        (self.zeros && got.iter().all(|&b| b == 0))
            || self
                .data
                .iter()
                .any(|d| &d[s * SECTOR..(s + 1) * SECTOR] == got)
    }
}

impl Model {
    fn index(&mut self) {
        self.by_block = vec![Vec::new(); BLOCKS as usize];
        for (i, w) in self.writes.iter().enumerate() {
            self.by_block[w.block as usize].push(i);
        }
    }

    /// The log position before which a write must have completed to be stable at `cut`: the
    /// issue of the last FLUSH acknowledged before the cut (0: none).
    fn stable_before(&self, cut: usize) -> usize {
        self.flushes
            .iter()
            .filter(|f| f.acked < cut)
            .max_by_key(|f| f.acked)
            .map_or(0, |f| f.issued)
    }

    /// What `block` may hold at `cut`.
    fn accepted(&self, cut: usize, block: u64) -> Accepted<'_> {
        self.accepted_between(self.stable_before(cut), cut, block)
    }

    /// What `block` may hold in snapshot `snap`: one of its latest writes completed before the
    /// snapshot was taken, or a write that overlapped the snapshot call (never one issued after
    /// it returned).
    fn accepted_in(&self, snap: &Snap, block: u64) -> Accepted<'_> {
        self.accepted_between(snap.issued, snap.acked, block)
    }

    /// The writes of `block` completed before `before` (their latest), or issued before `cut`.
    fn accepted_between(&self, before: usize, cut: usize, block: u64) -> Accepted<'_> {
        let of_block: Vec<&Write> = self.by_block[block as usize]
            .iter()
            .map(|&i| &self.writes[i])
            .collect();
        let stable: Vec<&Write> = of_block
            .iter()
            .copied()
            .filter(|w| w.done < before)
            .collect();
        let latest = stable
            .iter()
            .filter(|w| !stable.iter().any(|o| o.issued > w.done));
        let later = of_block
            .iter()
            .copied()
            .filter(|w| w.done >= before && w.issued < cut);
        Accepted {
            data: latest.copied().chain(later).map(|w| &w.data[..]).collect(),
            zeros: stable.is_empty(),
            acknowledged: !stable.is_empty(),
        }
    }
}

/// Opens (formatting on first use) the disk's trusted version.
fn open_version(store: &Arc<Store>, key: VersionKey, layout: &str) -> Parallax {
    let space = store.space(key).expect("space");
    if store.version(key).expect("version").root_len == 0 {
        Parallax::create_layout(space, layout, Sectors(SIZE / 512), opts(layout)).expect("format")
    } else {
        Parallax::open_with(space, opts(layout)).expect("open version")
    }
}

/// A fresh two-tier store holding the disk, its version formatted: the files the recording
/// starts from.
fn fresh_store(layout: &str) -> (MemFile, MemFile, MemFile) {
    let (meta, fast, slow) = (MemFile::new(), MemFile::new(), MemFile::new());
    let store = Store::create_on_tiers(
        Box::new(meta.clone()),
        vec![
            ("fast".into(), Box::new(fast.clone()), FAST_EXTENTS),
            ("slow".into(), Box::new(slow.clone()), SLOW_EXTENTS),
        ],
        EXTENT,
    )
    .expect("create the store");
    let key = store.create_disk(DISK, SIZE, layout).expect("create disk");
    let p = open_version(&store, key, layout);
    p.flush().expect("flush the fresh disk");
    drop(p);
    drop(store);
    (meta, fast, slow)
}

/// Runs the workload over recording files; returns the recording and the model.
fn record(seed: u64, layout: &str, early_ack: bool) -> (Recording, Model) {
    let (meta, fast, slow) = fresh_store(layout);
    let log = WriteLog::new();
    let wrap = |name: &str, f: &MemFile| log.wrap(name, Box::new(f.clone())).expect("wrap");
    let store = Store::open_on_tiers(
        Box::new(wrap("meta", &meta)),
        vec![Box::new(wrap("fast", &fast)), Box::new(wrap("slow", &slow))],
    )
    .expect("open the store over the recording files");
    let key = store.disk(DISK).expect("disk").trusted;
    let p = Arc::new(open_version(&store, key, layout));
    let model = Mutex::new(Model::default());
    let writing = AtomicBool::new(true);
    std::thread::scope(|s| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|t| {
                let (p, log, model) = (&p, &log, &model);
                s.spawn(move || {
                    let mut rng = SplitMix64::new(seed ^ (t as u64 + 1).wrapping_mul(0x9e37));
                    for i in 0..WRITES_EACH {
                        let block = if rng.below(2) == 0 {
                            rng.below(SHARED_BLOCKS)
                        } else {
                            rng.below(BLOCKS)
                        };
                        let d = data(rng.next_u64() ^ ((t * WRITES_EACH + i) as u64));
                        let issued = log.mark(format!("writer {t} write {i} issued"));
                        p.write(Sector(block * 8), &d).expect("guest write");
                        let done = log.mark(format!("writer {t} write {i} done"));
                        model.lock().expect("model").writes.push(Write {
                            block,
                            data: d,
                            issued,
                            done,
                        });
                        if rng.below(4) == 0 {
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let flusher = {
            let (p, log, model, writing) = (&p, &log, &model, &writing);
            s.spawn(move || {
                let mut n = 0usize;
                while writing.load(Ordering::Acquire) {
                    if n % 3 == 2 {
                        // A snapshot instead of this FLUSH: it commits like one (everything
                        // completed before it is durable once it returns), with what the writes
                        // changed since the last commit to write while they go on.
                        let name = format!("s{n}");
                        let issued = log.mark(format!("snapshot {name} taken"));
                        p.snapshot(&name).expect("snapshot");
                        let acked = log.mark(format!("snapshot {name} returned"));
                        let mut m = model.lock().expect("model");
                        m.flushes.push(Flush { issued, acked });
                        m.snapshots.push(Snap {
                            name,
                            issued,
                            acked,
                        });
                        n += 1;
                        std::thread::sleep(Duration::from_micros(200));
                        continue;
                    }
                    let issued = log.mark(format!("flush {n} issued"));
                    let early =
                        early_ack.then(|| log.mark(format!("flush {n} acknowledged early")));
                    p.flush().expect("guest flush");
                    let acked = log.mark(format!("flush {n} acknowledged"));
                    model.lock().expect("model").flushes.push(Flush {
                        issued,
                        acked: early.unwrap_or(acked),
                    });
                    n += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        };
        for w in writers {
            w.join().expect("writer");
        }
        writing.store(false, Ordering::Release);
        flusher.join().expect("flusher");
    });
    // A last FLUSH after every write: everything must then be stable.
    let issued = log.mark("final flush issued");
    p.flush().expect("final flush");
    let acked = log.mark("final flush acknowledged");
    let mut model = model.into_inner().expect("model");
    model.flushes.push(Flush { issued, acked });
    model.index();
    drop(p);
    drop(store);
    (log.recording(), model)
}

/// What checking the states found.
#[derive(Debug, Default)]
struct Found {
    states: usize,
    kinds: [usize; 3],
    acked_checked: u64,
    lost: u64,
    /// Snapshots read back and checked block by block.
    snapshots_checked: u64,
    check_failures: usize,
    problems: Vec<String>,
}

fn file(img: &Option<Image>) -> Box<dyn StoreFile> {
    Box::new(MemFile::with_image(
        img.clone().expect("a store file exists in every state"),
    ))
}

/// Checks one crash state.
fn check_state(
    rec: &Recording,
    model: &Model,
    layout: &str,
    ids: [usize; 3],
    state: &CrashState,
    files: &[Option<Image>],
    f: &mut Found,
) {
    let cut = rec.cut(state.syncs);
    let name = format!("{state}, cut at entry {cut}");
    f.states += 1;
    f.kinds[state.kind as usize] += 1;
    let data = || vec![file(&files[ids[1]]), file(&files[ids[2]])];
    match check_on_tiers(file(&files[ids[0]]), data(), &ParallaxCheck::ALL) {
        Ok(r) if r.is_ok() => {}
        Ok(r) => {
            f.check_failures += 1;
            f.problems
                .push(format!("{name}: the store check failed:\n{r}"));
            return;
        }
        Err(e) => {
            f.problems
                .push(format!("{name}: the check cannot run: {e}"));
            return;
        }
    }
    let store = match Store::open_on_tiers(file(&files[ids[0]]), data()) {
        Ok(s) => s,
        Err(e) => {
            f.problems
                .push(format!("{name}: the store does not open: {e}"));
            return;
        }
    };
    let key = match store.disk(DISK) {
        Ok(d) => d.trusted,
        Err(e) => {
            f.problems.push(format!("{name}: the disk is gone: {e}"));
            return;
        }
    };
    let space = store.space(key).expect("space");
    let p = match Parallax::open_with(
        space,
        ParallaxOptions {
            persist_every: None,
            ..opts(layout)
        },
    ) {
        Ok(p) => p,
        Err(e) => {
            f.problems
                .push(format!("{name}: the version does not open: {e}"));
            return;
        }
    };
    let mut image = vec![0u8; SIZE as usize];
    if let Err(e) = p.read(Sector(0), &mut image) {
        f.problems
            .push(format!("{name}: reading the disk failed: {e}"));
        return;
    }
    // Every snapshot that returned before the cut is there; each one there holds exactly what
    // was acknowledged before it was taken (or written while it was taken).
    let names: Vec<String> = p.snapshots().into_iter().map(|s| s.name).collect();
    for snap in &model.snapshots {
        if snap.acked < cut && !names.contains(&snap.name) {
            f.problems.push(format!(
                "{name}: snapshot {} returned before the cut and is gone",
                snap.name
            ));
        }
    }
    for (i, listed) in names.iter().enumerate() {
        let Some(snap) = model.snapshots.iter().find(|s| &s.name == listed) else {
            f.problems
                .push(format!("{name}: unknown snapshot {listed} listed"));
            continue;
        };
        // The newest snapshot in every state; each older one in a quarter of the states (so
        // in states all along the run after it was taken: a block of it freed and reused by
        // later writes would show), to keep the run short.
        if i + 1 < names.len() && (f.states + i) % 4 != 0 {
            continue;
        }
        let view = match p.open_snapshot(listed) {
            Ok(v) => v,
            Err(e) => {
                f.problems
                    .push(format!("{name}: snapshot {listed} does not open: {e}"));
                continue;
            }
        };
        let mut image = vec![0u8; SIZE as usize];
        if let Err(e) = view.read(Sector(0), &mut image) {
            f.problems
                .push(format!("{name}: reading snapshot {listed} failed: {e}"));
            continue;
        }
        f.snapshots_checked += 1;
        for block in 0..BLOCKS {
            let accepted = model.accepted_in(snap, block);
            let at = block as usize * BLOCK;
            let bad = (0..BLOCK / SECTOR)
                .find(|&s| !accepted.sector(s, &image[at + s * SECTOR..at + (s + 1) * SECTOR]));
            if let Some(s) = bad {
                f.lost += 1;
                f.problems.push(format!(
                    "{name}: snapshot {listed}: block {block} sector {s} holds data neither \
                     acknowledged before the snapshot was taken nor written while it was"
                ));
            }
        }
    }
    for block in 0..BLOCKS {
        let accepted = model.accepted(cut, block);
        if accepted.acknowledged {
            f.acked_checked += 1;
        }
        let at = block as usize * BLOCK;
        let bad = (0..BLOCK / SECTOR).find(|&s| {
            let got = &image[at + s * SECTOR..at + (s + 1) * SECTOR];
            !accepted.sector(s, got)
        });
        if let Some(s) = bad {
            f.lost += 1;
            f.problems.push(format!(
                "{name}: block {block} sector {s} holds data neither acknowledged nor written \
                 after the last acknowledged FLUSH"
            ));
        }
    }
}

/// Checks `states` of `rec` on [`CHECKERS`] threads.
fn check_states(rec: &Recording, model: &Model, layout: &str, states: &[CrashState]) -> Found {
    let id = |name| rec.file_named(name).expect("recorded file");
    let ids = [id("meta"), id("fast"), id("slow")];
    let mut total = Found::default();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..CHECKERS)
            .map(|w| {
                s.spawn(move || {
                    let mut found = Found::default();
                    let mut r = Rebuilder::new(rec);
                    for st in states.iter().skip(w).step_by(CHECKERS) {
                        let files = r.rebuild(st).expect("rebuild a crash state");
                        check_state(rec, model, layout, ids, st, &files, &mut found);
                    }
                    found
                })
            })
            .collect();
        for w in workers {
            let o = w.join().expect("checker");
            total.states += o.states;
            for i in 0..3 {
                total.kinds[i] += o.kinds[i];
            }
            total.acked_checked += o.acked_checked;
            total.lost += o.lost;
            total.snapshots_checked += o.snapshots_checked;
            total.check_failures += o.check_failures;
            total.problems.extend(o.problems);
        }
    });
    total
}

#[test]
fn power_loss_while_commits_race_writes_from_several_threads_loses_no_acknowledged_write() {
    let seed = seed();
    eprintln!("powerloss_concurrent: seed {seed} (DOVETAIL_SEED={seed} replays its choices)");
    for layout in ["parallax-v1", "parallax-v2"] {
        let started = Instant::now();
        // The commits must race the writes: some FLUSH issued while a write was in flight and
        // some write issued while a FLUSH was running. The threads' interleaving is the
        // scheduler's: on a machine too busy to overlap them, the recording is made again (the
        // same choices), a few times at most.
        let overlapped = |model: &Model| {
            model.flushes.iter().any(|f| {
                model
                    .writes
                    .iter()
                    .any(|w| w.issued < f.acked && w.done > f.issued)
            })
        };
        let mut attempt = 1;
        let (rec, model) = loop {
            let (rec, model) = record(seed, layout, false);
            if overlapped(&model) || attempt == 5 {
                break (rec, model);
            }
            eprintln!("powerloss_concurrent {layout}: no FLUSH overlapped a write in recording {attempt}; recording again");
            attempt += 1;
        };
        let raced = overlapped(&model);
        let states = rec.states(&Plan {
            seed,
            subsets: 1,
            torn: 1,
        });
        let total = check_states(&rec, &model, layout, &states);
        let kind = |k: Kind| total.kinds[k as usize];
        eprintln!(
            "powerloss_concurrent {layout}: {} entries, {} syncs, {} writes, {} flushes, {} \
             snapshots; {} states (boundaries {}, subsets {}, torn {}); acknowledged blocks \
             checked {}; snapshots checked {}; lost {}; in {:.1} s",
            rec.entries().len(),
            rec.sync_count(),
            model.writes.len(),
            model.flushes.len(),
            model.snapshots.len(),
            total.states,
            kind(Kind::Boundary),
            kind(Kind::Subset),
            kind(Kind::Torn),
            total.acked_checked,
            total.snapshots_checked,
            total.lost,
            started.elapsed().as_secs_f64()
        );
        for p in total.problems.iter().take(5) {
            eprintln!("powerloss_concurrent {layout}: seed {seed}: {p}");
        }
        assert!(
            raced,
            "{layout}: no FLUSH overlapped a write in {attempt} recordings"
        );
        assert!(
            total.problems.is_empty(),
            "{layout}, seed {seed}: {} problems (first above)",
            total.problems.len()
        );
        assert_eq!(total.lost, 0);
        assert!(
            total.states >= 100,
            "{layout}: only {} states",
            total.states
        );
        assert!(total.acked_checked > 0);
        assert!(!model.snapshots.is_empty(), "{layout}: no snapshot ran");
        assert!(
            total.snapshots_checked > 0,
            "{layout}: no state held a snapshot to check"
        );
        // A snapshot's commit raced the writes: some write was in flight while one was taken.
        assert!(
            model.snapshots.iter().any(|snap| model
                .writes
                .iter()
                .any(|w| w.issued < snap.acked && w.done > snap.issued)),
            "{layout}: no write was in flight while a snapshot was taken"
        );
    }
}

/// The negative control: FLUSHes acknowledged before they are issued lose acknowledged writes in
/// some state, and the check sees it.
#[test]
fn an_early_acknowledgement_under_concurrent_writes_is_caught() {
    let seed = seed();
    eprintln!("powerloss_concurrent (control): seed {seed}");
    let (rec, model) = record(seed, "parallax-v1", true);
    let states = rec.states(&Plan {
        seed,
        subsets: 1,
        torn: 0,
    });
    let total = check_states(&rec, &model, "parallax-v1", &states);
    eprintln!(
        "powerloss_concurrent (control): {} states, lost {}, check failures {}",
        total.states, total.lost, total.check_failures
    );
    assert_eq!(total.check_failures, 0, "{:?}", total.problems.first());
    assert!(
        total.lost > 0,
        "seed {seed}: no write acknowledged early was lost"
    );
}
