//! The scrub beside a commit's write-back. A commit captures its tree nodes, annotation and
//! checksum pages under the state lock, then writes them without it: until it ends, those
//! blocks are in use (no longer fresh) but their copies hold what the blocks held before.
//! The scrub runs under the shared state lock only, so it can meet such a block. Here the
//! commit is held at its first write of a reused metadata block (its copies still hold an
//! older, valid page), the scrub runs, and its read of that block lets the commit write both
//! copies before the scrub compares them: a scrub that reads captured blocks would then
//! "repair" the commit's fresh copies with the stale bytes it read first. The scrub must
//! read the settled metadata copies yet repair nothing on a healthy disk, every copy must hold what the commit wrote, and the
//! disk must check clean and read back exactly after a crash.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use common::*;
use dovetail_layout::parallax::{Class, Parallax};
use dovetail_layout::{BlockLayout, Sector, Sectors};
use dovetail_store::mem::{MemPool, MemSpace};
use dovetail_store::{ExtentId, TierInfo, VersionKey, VersionSpace};

const CAP: Sectors = Sectors(2048 * 16); // 16 MiB, 4096 blocks
/// The rounds write within the first blocks only: the tree nodes and pages of the others
/// stay as committed, for the scrub to read beside the commit.
const HOT: u64 = 1024;
const BLOCK: usize = 4096;
const EXTENT: u64 = 256 << 10; // 64 blocks
/// FLUSHes, each after scattered writes.
const ROUNDS: u64 = 24;
/// How long either side waits for the other before going on alone (only reached if the
/// scrub waits for the commit, which the hold would otherwise deadlock).
const PATIENCE: Duration = Duration::from_secs(2);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    #[default]
    Idle,
    /// Watching the committing thread's writes to metadata primaries.
    Armed,
    /// The commit is held before writing the target block.
    Held,
    /// The scrub read the target's first copy: the commit writes it now.
    Released,
    /// The commit wrote every copy of the target.
    Written,
}

#[derive(Debug, Default)]
struct Plan {
    phase: Phase,
    committer: Option<ThreadId>,
    scrubber: Option<ThreadId>,
    /// Metadata group primary -> its other copies.
    replicas: HashMap<ExtentId, Vec<ExtentId>>,
    /// The held block: primary, offset, what the commit writes, replicas still to write.
    target: Option<(ExtentId, u64, Vec<u8>, Vec<ExtentId>)>,
    /// Whether the scrub read the held block's first copy while the commit was held.
    scrub_met_it: bool,
    /// The commit returned.
    finished: bool,
    /// Reads of metadata copies by the scrubbing thread while the commit was held.
    scrub_reads: u64,
}

/// A space that holds the committing thread at its first write of a metadata block whose
/// first copy holds older, different bytes, until the scrubbing thread reads that copy.
#[derive(Debug)]
struct Gated {
    inner: Arc<MemSpace>,
    plan: Mutex<Plan>,
    moved: Condvar,
}

impl Gated {
    fn plan(&self) -> std::sync::MutexGuard<'_, Plan> {
        self.plan.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits (at most [`PATIENCE`]) until `done` holds.
    fn wait_until<'a>(
        &'a self,
        mut g: std::sync::MutexGuard<'a, Plan>,
        done: impl Fn(&Plan) -> bool,
    ) -> std::sync::MutexGuard<'a, Plan> {
        let deadline = std::time::Instant::now() + PATIENCE;
        while !done(&g) {
            let now = std::time::Instant::now();
            if now >= deadline {
                break;
            }
            g = self
                .moved
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        g
    }
}

impl VersionSpace for Gated {
    fn key(&self) -> VersionKey {
        self.inner.key()
    }
    fn extent_size(&self) -> u64 {
        self.inner.extent_size()
    }
    fn extents(&self) -> Vec<ExtentId> {
        self.inner.extents()
    }
    fn grant_extent(&self) -> dovetail_store::Result<ExtentId> {
        self.inner.grant_extent()
    }
    fn tiers(&self) -> Vec<TierInfo> {
        self.inner.tiers()
    }
    fn extent_tier(&self, extent: ExtentId) -> usize {
        self.inner.extent_tier(extent)
    }
    fn grant_extent_on(&self, tier: usize) -> dovetail_store::Result<ExtentId> {
        self.inner.grant_extent_on(tier)
    }
    fn read(&self, extent: ExtentId, offset: u64, buf: &mut [u8]) -> dovetail_store::Result<()> {
        self.inner.read(extent, offset, buf)?;
        let mut g = self.plan();
        let me = std::thread::current().id();
        if g.phase == Phase::Held && g.scrubber == Some(me) {
            let meta = g
                .replicas
                .iter()
                .any(|(p, r)| *p == extent || r.contains(&extent));
            g.scrub_reads += u64::from(meta);
        }
        let hit = g.phase == Phase::Held
            && g.scrubber == Some(me)
            && g.target.as_ref().is_some_and(|(e, off, _, _)| {
                *e == extent && offset <= *off && *off < offset + buf.len() as u64
            });
        if hit {
            // The scrub has the stale bytes; the commit writes every copy before it goes on.
            g.scrub_met_it = true;
            g.phase = Phase::Released;
            self.moved.notify_all();
            drop(self.wait_until(g, |p| p.phase == Phase::Written));
        }
        Ok(())
    }
    fn write(&self, extent: ExtentId, offset: u64, buf: &[u8]) -> dovetail_store::Result<()> {
        let me = std::thread::current().id();
        let mut g = self.plan();
        if g.phase == Phase::Armed && g.committer == Some(me) {
            if let Some(replicas) = g.replicas.get(&extent).cloned() {
                let mut old = vec![0u8; BLOCK];
                for (k, new) in buf.chunks(BLOCK).enumerate() {
                    let off = offset + (k * BLOCK) as u64;
                    self.inner.read(extent, off, &mut old)?;
                    if old.iter().any(|&b| b != 0) && old != new {
                        g.target = Some((extent, off, new.to_vec(), replicas));
                        g.phase = Phase::Held;
                        self.moved.notify_all();
                        g = self.wait_until(g, |p| p.phase != Phase::Held);
                        g.phase = Phase::Released;
                        break;
                    }
                }
            }
        }
        drop(g);
        self.inner.write(extent, offset, buf)?;
        let mut g = self.plan();
        if g.phase == Phase::Released && g.committer == Some(me) {
            let covered = |off: u64| offset <= off && off < offset + buf.len() as u64;
            if let Some((_, off, _, left)) = g.target.as_mut() {
                if covered(*off) {
                    left.retain(|&r| r != extent);
                    if left.is_empty() {
                        g.phase = Phase::Written;
                        self.moved.notify_all();
                    }
                }
            }
        }
        Ok(())
    }
    fn sync(&self) -> dovetail_store::Result<()> {
        self.inner.sync()
    }
    fn root(&self) -> Vec<u8> {
        self.inner.root()
    }
    fn commit_root(&self, record: &[u8]) -> dovetail_store::Result<()> {
        self.inner.commit_root(record)
    }
    fn grant_violations(&self) -> u64 {
        self.inner.grant_violations()
    }
    fn release_extent(&self, extent: ExtentId) -> dovetail_store::Result<()> {
        self.inner.release_extent(extent)
    }
}

#[test]
fn the_scrub_never_repairs_a_commits_blocks_from_what_they_held_before() {
    let pool = MemPool::with_tiers(&[("fast", 64), ("slow", 256)]);
    let mem = Arc::new(MemSpace::new(pool, VersionKey(1), EXTENT));
    let gate = Arc::new(Gated {
        inner: mem.clone(),
        plan: Mutex::new(Plan::default()),
        moved: Condvar::new(),
    });
    let d = Arc::new(
        Parallax::create_layout(gate.clone(), "parallax-v2", CAP, v2_options())
            .expect("create parallax-v2"),
    );
    let mut model = vec![0u8; (CAP.0 * 512) as usize];
    let mut rng = Rng::new(0x5c2b);
    // Every part of the tree and of the checksum pages, committed once.
    for b in (0..CAP.0 / 8).step_by(128) {
        let data = pattern(b, BLOCK);
        d.write(Sector(b * 8), &data).expect("write");
        model[b as usize * BLOCK..(b as usize + 1) * BLOCK].copy_from_slice(&data);
    }
    d.flush().expect("flush");
    let mut met = 0;
    for round in 0..ROUNDS {
        // Scattered writes: every commit rewrites nodes and checksum pages, reusing the
        // metadata blocks earlier commits freed.
        for _ in 0..24 {
            let b = rng.next_u64() % HOT;
            let data = pattern(round << 32 | b, BLOCK);
            d.write(Sector(b * 8), &data).expect("write");
            model[b as usize * BLOCK..(b as usize + 1) * BLOCK].copy_from_slice(&data);
        }
        {
            let mut g = gate.plan();
            g.replicas = d
                .extent_groups()
                .iter()
                .filter(|g| g.class == Class::Meta && g.members.len() > 1)
                .map(|g| (g.members[0], g.members[1..].to_vec()))
                .collect();
            g.phase = Phase::Armed;
            g.scrubber = Some(std::thread::current().id());
            g.committer = None;
            g.target = None;
            g.scrub_met_it = false;
            g.finished = false;
            g.scrub_reads = 0;
        }
        let committer = {
            let (d, gate) = (d.clone(), gate.clone());
            std::thread::spawn(move || {
                gate.plan().committer = Some(std::thread::current().id());
                let r = d.flush();
                gate.plan().finished = true;
                gate.moved.notify_all();
                r
            })
        };
        let held = {
            let g = gate.plan();
            let g = gate.wait_until(g, |p| p.phase == Phase::Held || p.finished);
            g.phase == Phase::Held
        };
        if !held {
            // This commit reused no metadata block: nothing to race with.
            gate.plan().phase = Phase::Idle;
            committer.join().expect("commit thread").expect("flush");
            continue;
        }
        let repaired = d.scrub();
        {
            // The scrub did not meet the held block (or is done with it): let the commit go.
            let mut g = gate.plan();
            if g.phase == Phase::Held {
                g.phase = Phase::Released;
                gate.moved.notify_all();
            }
        }
        committer.join().expect("commit thread").expect("flush");
        let (target, scrub_met_it, scrub_reads) = {
            let mut g = gate.plan();
            g.phase = Phase::Idle;
            (
                g.target.take().expect("held target"),
                g.scrub_met_it,
                g.scrub_reads,
            )
        };
        // The scrub did its work beside the held commit: it read the metadata copies.
        assert!(
            scrub_reads > 0,
            "round {round}: the scrub read no metadata copy"
        );
        met += 1;
        let (primary, off, written, replicas) = target;
        assert_eq!(
            repaired, 0,
            "round {round}: the scrub repaired {repaired} copies of a healthy disk (met the \
             commit's block: {scrub_met_it})"
        );
        let mut got = vec![0u8; BLOCK];
        let groups = d.extent_groups();
        let copies = groups
            .iter()
            .find(|g| g.members[0] == primary)
            .map(|g| g.members.clone())
            .unwrap_or_else(|| {
                let mut all = vec![primary];
                all.extend(replicas);
                all
            });
        for e in copies {
            mem.read(e, off, &mut got).expect("read copy");
            assert!(
                got == written,
                "round {round}: the copy on {e} at {off} lost what the commit wrote"
            );
        }
        assert_eq!(d.check(), Vec::<String>::new(), "round {round}");
    }
    eprintln!("{met} of {ROUNDS} commits were held at a reused metadata block");
    assert!(met >= 3, "only {met} commits reused a metadata block");
    drop(d);
    let (_space, d) = crash_and_reopen(&mem);
    assert_eq!(d.check(), Vec::<String>::new(), "after a crash");
    let mut buf = vec![0u8; model.len()];
    d.read(Sector(0), &mut buf).expect("read back");
    assert!(buf == model, "the disk reads back exactly after a crash");
}
