//! Crash safety of parallax-v1: after a crash at any point, the disk reopens as it was at the
//! last completed flush (every write acknowledged before it reads back), with a clean check.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{assert_clean, assert_disk_eq, crash_and_reopen, pattern, Rng};
use dovetail_layout::{BlockLayout, Error, Parallax, Sector, Sectors};
use dovetail_store::mem::{MemPool, MemSpace};
use dovetail_store::{ExtentId, StoreError, VersionKey, VersionSpace};

/// Two levels of tree: 700 blocks.
const CAPACITY: Sectors = Sectors(5600 - 3);

/// One random mutation of the disk and the model.
fn mutate(rng: &mut Rng, d: &Parallax, model: &mut [u8], step: u64) {
    let cap = d.capacity().0;
    let at = rng.below(cap);
    let max = if rng.below(4) == 0 { 200 } else { 24 };
    let len = 1 + rng.below(max.min(cap - at));
    let (s, e) = ((at * 512) as usize, ((at + len) * 512) as usize);
    match rng.below(10) {
        0 => {
            d.discard(Sector(at), Sectors(len)).expect("discard");
            model[s..e].fill(0);
        }
        1 => {
            d.write_zeroes(Sector(at), Sectors(len), rng.below(2) == 0)
                .expect("write zeroes");
            model[s..e].fill(0);
        }
        _ => {
            let data = pattern(step, e - s);
            d.write(Sector(at), &data).expect("write");
            model[s..e].copy_from_slice(&data);
        }
    }
}

/// Runs a random workload; at every flush, and at random points in between, crashes a copy of
/// the space and checks the reopened disk equals the model as of the last flush. Now and then
/// the workload goes on from the crashed copy (so recovery is followed by more writes).
fn crash_workload(seed: u64, steps: u64, extent_size: u64) {
    let (space, disk) = common::parallax(CAPACITY, extent_size);
    crash_workload_on(seed, steps, 20, space, disk);
}

/// Out of every `odds` steps, 3 are flushes, 1 a crash between flushes, 1 a snapshot and 1 a
/// snapshot deletion (when possible); the rest change the disk.
fn crash_workload_on(seed: u64, steps: u64, odds: u64, space: Arc<MemSpace>, disk: Parallax) {
    let mut rng = Rng::new(seed);
    let (mut space, mut disk) = (space, disk);
    let mut model = vec![0u8; (disk.capacity().0 * 512) as usize];
    let mut durable = model.clone();
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let mut durable_snaps = snaps.clone();
    for step in 0..steps {
        match rng.below(odds) {
            0..=2 => {
                disk.flush().expect("flush");
                durable = model.clone();
                durable_snaps = snaps.clone();
                let (crashed, reopened) = crash_and_reopen(&space);
                let what = format!("seed {seed} step {step}: reopened after flush");
                assert_disk_eq(&reopened, &durable, &what);
                assert_clean(&reopened, &what);
                for (name, data) in &durable_snaps {
                    let view = reopened.open_snapshot(name).expect("snapshot survives");
                    assert_disk_eq(&view, data, &format!("{what}: snapshot {name}"));
                }
                if rng.below(2) == 0 {
                    // Carry on from the crashed copy.
                    space = crashed;
                    disk = reopened;
                }
            }
            3 => {
                // A crash between flushes: the disk is as of the last flush.
                let (crashed, reopened) = crash_and_reopen(&space);
                let what = format!("seed {seed} step {step}: reopened between flushes");
                assert_disk_eq(&reopened, &durable, &what);
                assert_clean(&reopened, &what);
                if rng.below(3) == 0 {
                    space = crashed;
                    disk = reopened;
                    model = durable.clone();
                    snaps = durable_snaps.clone();
                }
            }
            4 if snaps.len() < 3 => {
                let name = format!("s{step}");
                disk.snapshot(&name).expect("snapshot");
                snaps.push((name, model.clone()));
                // A snapshot commits.
                durable = model.clone();
                durable_snaps = snaps.clone();
            }
            5 if !snaps.is_empty() => {
                let (name, _) = snaps.remove(rng.below(snaps.len() as u64) as usize);
                disk.delete_snapshot(&name).expect("delete snapshot");
                durable = model.clone();
                durable_snaps = snaps.clone();
            }
            _ => mutate(&mut rng, &disk, &mut model, seed * 1_000_000 + step),
        }
    }
    let what = format!("seed {seed}: end");
    assert_disk_eq(&disk, &model, &what);
    assert_clean(&disk, &what);
}

#[test]
fn every_flushed_write_survives_a_crash() {
    for seed in 0..12 {
        crash_workload(seed, 300, 64 << 10);
    }
}

#[test]
fn every_flushed_write_survives_a_crash_on_parallax_v2() {
    for seed in 300..308 {
        let (space, disk) = common::parallax_v2(CAPACITY, 64 << 10);
        crash_workload_on(seed, 300, 20, space, disk);
    }
}

#[test]
fn every_flushed_write_survives_a_crash_with_large_extents() {
    for seed in 100..104 {
        crash_workload(seed, 400, 4 << 20);
    }
}

#[test]
fn every_flushed_write_survives_a_crash_when_nodes_are_written_back_early() {
    // 40 MiB: 21 level-1 nodes, more than the smallest cache holds dirty, so changed nodes are
    // written back (in place, being fresh) before the commit.
    for seed in 200..202 {
        let (space, disk) = common::parallax_with_cache(Sectors(80 * 1024 + 5), 1 << 20, 0);
        crash_workload_on(seed, 300, 150, space, disk);
    }
}

/// A space whose `sync` or `commit_root` fail on demand, as a full or failing device would.
#[derive(Debug)]
struct FlakySpace {
    inner: Arc<MemSpace>,
    fail_sync: AtomicBool,
    fail_commit: AtomicBool,
}

impl VersionSpace for FlakySpace {
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
    fn read(&self, extent: ExtentId, offset: u64, buf: &mut [u8]) -> dovetail_store::Result<()> {
        self.inner.read(extent, offset, buf)
    }
    fn write(&self, extent: ExtentId, offset: u64, buf: &[u8]) -> dovetail_store::Result<()> {
        self.inner.write(extent, offset, buf)
    }
    fn sync(&self) -> dovetail_store::Result<()> {
        if self.fail_sync.load(Ordering::Relaxed) {
            return Err(StoreError::Io {
                op: "sync".into(),
                source: std::io::Error::other("injected"),
            });
        }
        self.inner.sync()
    }
    fn root(&self) -> Vec<u8> {
        self.inner.root()
    }
    fn commit_root(&self, record: &[u8]) -> dovetail_store::Result<()> {
        if self.fail_commit.load(Ordering::Relaxed) {
            return Err(StoreError::Io {
                op: "commit root".into(),
                source: std::io::Error::other("injected"),
            });
        }
        self.inner.commit_root(record)
    }
    fn grant_violations(&self) -> u64 {
        self.inner.grant_violations()
    }
}

#[test]
fn a_failed_commit_keeps_the_previous_state_and_a_retry_succeeds() {
    let pool = MemPool::new(1024);
    let mem = Arc::new(MemSpace::new(pool, VersionKey(7), 64 << 10));
    let flaky = Arc::new(FlakySpace {
        inner: mem.clone(),
        fail_sync: AtomicBool::new(false),
        fail_commit: AtomicBool::new(false),
    });
    let disk = Parallax::create(flaky.clone(), CAPACITY).expect("create");
    let mut model = vec![0u8; (CAPACITY.0 * 512) as usize];
    let mut rng = Rng::new(42);
    for step in 0..40 {
        mutate(&mut rng, &disk, &mut model, step);
    }
    disk.flush().expect("flush");
    let durable = model.clone();
    for step in 40..80 {
        mutate(&mut rng, &disk, &mut model, step);
    }
    for (flag, what) in [(&flaky.fail_sync, "sync"), (&flaky.fail_commit, "commit")] {
        flag.store(true, Ordering::Relaxed);
        let err = disk.flush().expect_err("injected failure");
        assert!(matches!(err, Error::Store(StoreError::Io { .. })), "{err}");
        flag.store(false, Ordering::Relaxed);
        // Nothing committed: a crash now comes back as of the last good flush.
        let (_c, reopened) = crash_and_reopen(&mem);
        assert_disk_eq(&reopened, &durable, &format!("after a failed {what}"));
        assert_clean(&reopened, &format!("after a failed {what}"));
        // The live disk is unharmed.
        assert_disk_eq(&disk, &model, &format!("live disk after a failed {what}"));
        assert_clean(&disk, &format!("live disk after a failed {what}"));
    }
    for step in 80..120 {
        mutate(&mut rng, &disk, &mut model, step);
    }
    disk.flush().expect("retry");
    let (_c, reopened) = crash_and_reopen(&mem);
    assert_disk_eq(&reopened, &model, "after the retried flush");
    assert_clean(&reopened, "after the retried flush");
}

#[test]
fn a_large_sparse_disk_has_a_deep_tree_and_survives_a_crash() {
    // 2 TiB: four levels of nodes.
    let capacity = Sectors(1 << 32);
    let (space, disk) = common::parallax(capacity, 1 << 20);
    assert_eq!(disk.depth(), 4);
    let spots = [
        0u64,
        7,
        4096 + 3,
        1 << 20,
        (1 << 31) + 5,
        capacity.0 - 1,
        capacity.0 - 9,
    ];
    for (i, &at) in spots.iter().enumerate() {
        disk.write(Sector(at), &pattern(i as u64, 512))
            .expect("write");
    }
    disk.flush().expect("flush");
    // Unflushed: lost in the crash.
    disk.write(Sector(12345), &pattern(99, 512)).expect("write");
    let (_c, reopened) = crash_and_reopen(&space);
    for (i, &at) in spots.iter().enumerate() {
        let mut buf = vec![0u8; 512];
        reopened.read(Sector(at), &mut buf).expect("read");
        assert_eq!(buf, pattern(i as u64, 512), "sector {at}");
    }
    let mut buf = vec![0u8; 512];
    reopened.read(Sector(12345), &mut buf).expect("read");
    assert_eq!(buf, vec![0u8; 512], "an unflushed write is not there");
    assert_clean(&reopened, "deep tree");
    // Discarding the whole disk frees everything once committed.
    reopened
        .discard(Sector(0), capacity)
        .expect("discard everything");
    reopened.flush().expect("flush");
    assert_eq!(reopened.usage().used, 0, "{:?}", reopened.usage());
    assert_clean(&reopened, "after discarding everything");
}
