//! A snapshot deleted while the tier mover moves blocks: the deletion's sweep rebuilds free
//! space from the committed trees while a mover step holds a copy it allocated but has not yet
//! pointed the tree at. The copy must stay allocated through the sweep, or the sweep counts it
//! free, a guest write takes the same block, and two guest blocks end up in one place (one of
//! them silently holding the other's data). Checked block by block against a model, live and
//! after a crash.
//!
//! The first test forces that interleaving: the mover's write of its copy (to the slow tier)
//! waits at a gate in the version's space while the snapshot is deleted and the guest writes.
//! The second runs snapshot deletions, mover steps and guest writes on three threads, round
//! after round, with the mover's copies slowed down so that they straddle the deletions.

mod common;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::*;
use dovetail_layout::parallax::{Class, Parallax, TierPolicy};
use dovetail_layout::{BlockLayout, Sector, Sectors};
use dovetail_store::mem::{MemPool, MemSpace};
use dovetail_store::{ExtentId, Result as StoreResult, TierInfo, VersionKey, VersionSpace};

const BLOCK: usize = 4096;
const EXTENT: u64 = 64 * BLOCK as u64;

fn sector(block: u64) -> Sector {
    Sector(block * 8)
}

/// Generation `gen` of block `b`: every 8 bytes name both.
fn content(b: u64, gen: u64) -> Vec<u8> {
    let word = (b << 32 | gen).to_le_bytes();
    word.iter().copied().cycle().take(BLOCK).collect()
}

/// What a block holds, if it is some generation of some block (`None` for zeroes or other
/// bytes).
fn names(data: &[u8]) -> Option<(u64, u64)> {
    let w = u64::from_le_bytes(data[..8].try_into().ok()?);
    let (b, gen) = (w >> 32, w & 0xffff_ffff);
    (gen != 0 && data == content(b, gen).as_slice()).then_some((b, gen))
}

/// What the writes to a version's slow tier (tier 1) do before they reach the store.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    /// The next write to tier 1 stops until `open`.
    armed: bool,
    /// A write waits at the gate.
    parked: bool,
    open: bool,
    /// Every write to tier 1 first sleeps this long (widens the mover's copy window).
    delay: Option<Duration>,
}

impl Gate {
    fn pass(&self) {
        let mut s = self.state.lock().expect("gate");
        if let Some(d) = s.delay {
            drop(s);
            std::thread::sleep(d);
            return;
        }
        if !s.armed {
            return;
        }
        s.armed = false;
        s.parked = true;
        self.cv.notify_all();
        while !s.open {
            s = self.cv.wait(s).expect("gate");
        }
    }

    fn arm(&self) {
        let mut s = self.state.lock().expect("gate");
        s.armed = true;
        s.parked = false;
        s.open = false;
    }

    /// Waits until a write is parked; false after `limit` without one.
    fn wait_parked(&self, limit: Duration) -> bool {
        let s = self.state.lock().expect("gate");
        let (s, _) = self
            .cv
            .wait_timeout_while(s, limit, |s| !s.parked)
            .expect("gate");
        s.parked
    }

    fn open(&self) {
        let mut s = self.state.lock().expect("gate");
        s.open = true;
        s.armed = false;
        self.cv.notify_all();
    }

    fn slow(&self, delay: Duration) {
        self.state.lock().expect("gate").delay = Some(delay);
    }
}

/// A real in-memory space whose writes to tier 1 pass a [`Gate`] first; everything else goes
/// straight to it.
struct GatedSpace {
    inner: Arc<MemSpace>,
    gate: Arc<Gate>,
}

impl fmt::Debug for GatedSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatedSpace")
            .field("inner", &self.inner)
            .finish()
    }
}

impl VersionSpace for GatedSpace {
    fn key(&self) -> VersionKey {
        self.inner.key()
    }
    fn extent_size(&self) -> u64 {
        self.inner.extent_size()
    }
    fn extents(&self) -> Vec<ExtentId> {
        self.inner.extents()
    }
    fn grant_extent(&self) -> StoreResult<ExtentId> {
        self.inner.grant_extent()
    }
    fn read(&self, extent: ExtentId, offset: u64, buf: &mut [u8]) -> StoreResult<()> {
        self.inner.read(extent, offset, buf)
    }
    fn write(&self, extent: ExtentId, offset: u64, buf: &[u8]) -> StoreResult<()> {
        if self.inner.extent_tier(extent) == 1 {
            self.gate.pass();
        }
        self.inner.write(extent, offset, buf)
    }
    fn sync(&self) -> StoreResult<()> {
        self.inner.sync()
    }
    fn punch(&self, extent: ExtentId, offset: u64, len: u64) -> StoreResult<()> {
        self.inner.punch(extent, offset, len)
    }
    fn release_extent(&self, extent: ExtentId) -> StoreResult<()> {
        self.inner.release_extent(extent)
    }
    fn root(&self) -> Vec<u8> {
        self.inner.root()
    }
    fn commit_root(&self, record: &[u8]) -> StoreResult<()> {
        self.inner.commit_root(record)
    }
    fn grant_violations(&self) -> u64 {
        self.inner.grant_violations()
    }
    fn tiers(&self) -> Vec<TierInfo> {
        self.inner.tiers()
    }
    fn extent_tier(&self, extent: ExtentId) -> usize {
        self.inner.extent_tier(extent)
    }
    fn grant_extent_on(&self, tier: usize) -> StoreResult<ExtentId> {
        self.inner.grant_extent_on(tier)
    }
    fn shared_cut(&self) -> u64 {
        self.inner.shared_cut()
    }
    fn commit_root_cut(&self, record: &[u8], cut: u64) -> StoreResult<()> {
        self.inner.commit_root_cut(record, cut)
    }
}

/// A parallax-v2 disk of `blocks` blocks on a two-tier in-memory store, behind a gate.
fn gated_disk(blocks: u64) -> (Arc<MemSpace>, Arc<Gate>, Parallax) {
    let pool = MemPool::with_tiers(&[("fast", 24), ("slow", 24)]);
    let mem = Arc::new(MemSpace::new(pool, VersionKey(1), EXTENT));
    let gate = Arc::new(Gate::default());
    let space: Arc<dyn VersionSpace> = Arc::new(GatedSpace {
        inner: mem.clone(),
        gate: gate.clone(),
    });
    let d = Parallax::create_layout(space, "parallax-v2", Sectors(blocks * 8), v2_options())
        .expect("create parallax-v2");
    (mem, gate, d)
}

/// Reopens a crashed copy of `mem` behind the same gate.
fn crash_and_reopen_gated(mem: &MemSpace, gate: &Arc<Gate>) -> (Arc<MemSpace>, Parallax) {
    let crashed = Arc::new(mem.crash());
    let space: Arc<dyn VersionSpace> = Arc::new(GatedSpace {
        inner: crashed.clone(),
        gate: gate.clone(),
    });
    let d = Parallax::open_with(space, v2_options()).expect("reopen after a crash");
    (crashed, d)
}

/// The default policy with hot data on tier `tier`: every hot block outside it moves.
fn hot_on(tier: u8) -> TierPolicy {
    let mut p = TierPolicy::defaults(2);
    p.classes[Class::Hot as usize].tier = tier;
    p
}

/// Every block against the model (`model[b]`: the generation last written, 0: never): a
/// list of what differs (empty when all is right).
fn differences(d: &dyn BlockLayout, model: &[u64]) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; BLOCK];
    for (b, &gen) in model.iter().enumerate() {
        let b = b as u64;
        match d.read(sector(b), &mut buf) {
            Err(e) => out.push(format!("block {b}: read failed: {e}")),
            Ok(()) if gen == 0 && buf.iter().all(|&x| x == 0) => {}
            Ok(()) if gen != 0 && names(&buf) == Some((b, gen)) => {}
            Ok(()) => out.push(format!(
                "block {b}: expected generation {gen}, got {}",
                match names(&buf) {
                    Some((ob, og)) => format!("block {ob}'s generation {og}"),
                    None => "other bytes".to_string(),
                }
            )),
        }
    }
    out
}

fn assert_model(d: &Parallax, model: &[u64], what: &str) {
    let diff = differences(d, model);
    assert!(
        diff.is_empty(),
        "{what}: {} blocks wrong: {:#?}",
        diff.len(),
        &diff[..diff.len().min(8)]
    );
    assert_clean(d, what);
}

#[test]
fn a_copy_the_mover_holds_is_not_freed_by_a_sweep_and_given_to_a_guest_write() {
    const BLOCKS: u64 = 64;
    let (mem, gate, d) = gated_disk(BLOCKS);
    let mut model = vec![0u64; BLOCKS as usize];
    for b in 0..32 {
        d.write(sector(b), &content(b, 1)).expect("write");
        model[b as usize] = 1;
    }
    d.flush().expect("flush");
    d.snapshot("before").expect("snapshot");
    for b in 0..16 {
        d.write(sector(b), &content(b, 2)).expect("overwrite");
        model[b as usize] = 2;
    }
    d.flush().expect("flush");
    d.set_tier_policy(hot_on(1))
        .expect("hot data on the slow tier");
    let d = Arc::new(d);

    // The mover copies block 0 into a new hot group on tier 1 and waits at the gate before
    // writing the copy: the copy's block is allocated, the tree does not point at it yet.
    gate.arm();
    let mover = {
        let d = d.clone();
        std::thread::spawn(move || d.tier_pass(1, BLOCKS).expect("mover step"))
    };
    assert!(
        gate.wait_parked(Duration::from_secs(10)),
        "the mover never wrote a copy to the slow tier"
    );
    // Meanwhile the snapshot goes (its commit starts a new epoch, its sweep rebuilds free
    // space) and the guest writes a block of the hot class, now kept on tier 1.
    d.delete_snapshot("before").expect("delete snapshot");
    d.write(sector(40), &content(40, 3)).expect("write");
    model[40] = 3;
    gate.open();
    let report = mover.join().expect("mover thread");
    assert_eq!(report.placed, 1, "the mover moved block 0: {report:?}");
    assert_model(&d, &model, "after the mover step");
    d.flush().expect("flush");
    drop(d);
    let (_space, d) = crash_and_reopen_gated(&mem, &gate);
    assert_model(&d, &model, "after a crash");
}

/// One seeded run of rounds: snapshots taken and deleted on one thread, mover steps (hot data
/// moving between the tiers) on a second, guest writes, FLUSHes and reads on a third; the
/// disk checked against the model after every round and, every few rounds, after a crash.
fn rounds(seed: u64, rounds: u64) -> (u64, u64) {
    const BLOCKS: u64 = 96;
    let (mut mem, gate, d) = gated_disk(BLOCKS);
    gate.slow(Duration::from_micros(300));
    let mut d = Arc::new(d);
    let mut model = vec![0u64; BLOCKS as usize];
    let mut gen = 1u64;
    for b in 0..BLOCKS {
        d.write(sector(b), &content(b, gen)).expect("write");
        model[b as usize] = gen;
    }
    d.flush().expect("flush");
    let mut rng = Rng::new(seed);
    let (mut moved, mut deleted) = (0u64, 0u64);
    for round in 0..rounds {
        d.snapshot(&format!("s{round}")).expect("snapshot");
        gen += 1;
        // Overwrite some blocks so the snapshot holds blocks only it references.
        for _ in 0..16 {
            let b = rng.below(BLOCKS);
            d.write(sector(b), &content(b, gen)).expect("overwrite");
            model[b as usize] = gen;
        }
        d.flush().expect("flush");
        let stop = Arc::new(AtomicBool::new(false));
        let model_now = Arc::new(Mutex::new(std::mem::take(&mut model)));
        let next_gen = Arc::new(AtomicU64::new(gen + 1));
        let mover = {
            let (d, stop) = (d.clone(), stop.clone());
            let tier = (round % 2) as u8;
            std::thread::spawn(move || {
                d.set_tier_policy(hot_on(tier)).expect("policy");
                let mut moved = 0;
                while !stop.load(Ordering::SeqCst) {
                    let r = d.tier_pass(4, BLOCKS).expect("mover step");
                    moved += r.moved();
                    if r.wrapped && r.moved() == 0 {
                        break;
                    }
                }
                moved
            })
        };
        let guest = {
            let (d, stop, model, next_gen) =
                (d.clone(), stop.clone(), model_now.clone(), next_gen.clone());
            let mut rng = Rng::new(seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            std::thread::spawn(move || {
                let mut buf = vec![0u8; BLOCK];
                while !stop.load(Ordering::SeqCst) {
                    let b = rng.below(BLOCKS);
                    match rng.below(8) {
                        0 => d.flush().expect("flush"),
                        1 | 2 => {
                            d.read(sector(b), &mut buf).expect("read");
                            let want = model.lock().expect("model")[b as usize];
                            assert_eq!(names(&buf), Some((b, want)), "block {b} read wrong");
                        }
                        _ => {
                            let g = next_gen.fetch_add(1, Ordering::SeqCst);
                            let mut m = model.lock().expect("model");
                            d.write(sector(b), &content(b, g)).expect("write");
                            m[b as usize] = g;
                        }
                    }
                }
            })
        };
        // The deletion, a little after the mover started its steps.
        std::thread::sleep(Duration::from_micros(rng.below(2000)));
        d.delete_snapshot(&format!("s{round}"))
            .expect("delete snapshot");
        deleted += 1;
        std::thread::sleep(Duration::from_millis(2));
        stop.store(true, Ordering::SeqCst);
        moved += mover.join().expect("mover thread");
        guest.join().expect("guest thread");
        gen = next_gen.load(Ordering::SeqCst);
        model = std::mem::take(&mut *model_now.lock().expect("model"));
        // A few more steps with nothing else running: whatever a stale copy did shows.
        for _ in 0..4 {
            moved += d.tier_pass(8, BLOCKS).expect("mover step").moved();
        }
        assert_model(&d, &model, &format!("seed {seed:#x}, round {round}"));
        if round % 4 == 3 {
            d.flush().expect("flush");
            drop(d);
            let (space, reopened) = crash_and_reopen_gated(&mem, &gate);
            assert_model(
                &reopened,
                &model,
                &format!("seed {seed:#x}, round {round}, after a crash"),
            );
            mem = space;
            d = Arc::new(reopened);
        }
    }
    (moved, deleted)
}

#[test]
fn snapshots_deleted_while_the_mover_steps_and_the_guest_writes_lose_nothing() {
    let (mut moved, mut deleted) = (0, 0);
    for seed in [0x5eed_0001u64, 0x1796_6623_8690_7971, 0x4882_7322_5701_0026] {
        let (m, d) = rounds(seed, 12);
        moved += m;
        deleted += d;
    }
    assert!(moved > 100, "the mover moved only {moved} blocks");
    assert_eq!(deleted, 36);
}
