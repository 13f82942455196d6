//! Growing parallax-v1 and parallax-v2 disks (`Parallax::open_grown`): the data stays, the new
//! blocks read as zeroes and take writes, the tree gains a level when it must, parallax-v2's
//! annotation and checksum pages move past the new last block, and a power cut before the
//! grown root record is committed leaves the old disk, which grows again at the next open.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{assert_clean, assert_disk_eq, pattern, read_all, v2_options};
use dovetail_layout::{BlockLayout, Parallax, ParallaxOptions, Sector, Sectors};
use dovetail_store::mem::MemSpace;
use dovetail_store::{ExtentId, StoreError, VersionKey, VersionSpace};

/// 508 blocks: the most a tree of depth 1 holds.
const ONE_LEVEL: Sectors = Sectors(508 * 8);
/// 1500 blocks (depth 2), not a whole number of blocks.
const TWO_LEVELS: Sectors = Sectors(1500 * 8 - 3);

/// A space whose root commits fail while `fail` is set: the power cut between a grow's node
/// writes and its root record.
#[derive(Debug)]
struct CutSpace {
    inner: Arc<MemSpace>,
    fail: AtomicBool,
}

impl VersionSpace for CutSpace {
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
        self.inner.sync()
    }
    fn punch(&self, extent: ExtentId, offset: u64, len: u64) -> dovetail_store::Result<()> {
        self.inner.punch(extent, offset, len)
    }
    fn release_extent(&self, extent: ExtentId) -> dovetail_store::Result<()> {
        self.inner.release_extent(extent)
    }
    fn root(&self) -> Vec<u8> {
        self.inner.root()
    }
    fn commit_root(&self, record: &[u8]) -> dovetail_store::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Io {
                op: "committing the root record".into(),
                source: std::io::Error::other("power cut"),
            });
        }
        self.inner.commit_root(record)
    }
    fn grant_violations(&self) -> u64 {
        self.inner.grant_violations()
    }
}

/// A disk of `layout` and `capacity` with a pattern written at its first and last blocks,
/// flushed; returns its space and the disk's bytes.
fn written(layout: &str, capacity: Sectors) -> (Arc<MemSpace>, Vec<u8>) {
    let (_pool, space) = common::mem_space(1 << 20, 1 << 12);
    let disk =
        Parallax::create_layout(space.clone(), layout, capacity, v2_options()).expect("create");
    let first = pattern(1, 8 * 512);
    disk.write(Sector(0), &first).expect("write first block");
    let last = pattern(2, 5 * 512);
    disk.write(Sector(capacity.0 - 5), &last)
        .expect("write last sectors");
    disk.flush().expect("flush");
    let model = read_all(&disk);
    (space, model)
}

fn open_grown(space: Arc<dyn VersionSpace>, capacity: Sectors) -> Parallax {
    Parallax::open_grown(space, capacity, v2_options()).expect("open grown")
}

/// Grows a disk of `layout` from `from` to `to`, checks it, writes past the old end, and
/// checks it again after a power cut.
fn grow_and_check(layout: &str, from: Sectors, to: Sectors) {
    let (space, mut model) = written(layout, from);
    let disk = open_grown(space.clone(), to);
    assert_eq!(disk.capacity(), to, "{layout}: capacity after growing");
    model.resize((to.0 * 512) as usize, 0);
    assert_disk_eq(&disk, &model, &format!("{layout}: grown"));
    assert_clean(&disk, &format!("{layout}: grown"));
    // Writes past the old end, up to the new last sector.
    let past = pattern(3, 16 * 512);
    disk.write(Sector(from.0), &past)
        .expect("write past the old end");
    model[(from.0 * 512) as usize..(from.0 * 512) as usize + past.len()].copy_from_slice(&past);
    let tail = pattern(4, 512);
    disk.write(Sector(to.0 - 1), &tail)
        .expect("write the new last sector");
    model[((to.0 - 1) * 512) as usize..].copy_from_slice(&tail);
    disk.flush().expect("flush");
    let (_crashed, reopened) = common::crash_and_reopen(&space);
    assert_eq!(
        reopened.capacity(),
        to,
        "{layout}: capacity after a power cut"
    );
    assert_disk_eq(&reopened, &model, &format!("{layout}: reopened"));
    assert_clean(&reopened, &format!("{layout}: reopened"));
    if layout == "parallax-v2" {
        assert!(
            reopened.check_data().is_empty(),
            "{layout}: data checksums: {:?}",
            reopened.check_data()
        );
    }
}

#[test]
fn v1_grows_within_its_depth() {
    grow_and_check("parallax-v1", Sectors(100 * 8), ONE_LEVEL);
}

#[test]
fn v1_grows_a_tree_level() {
    grow_and_check("parallax-v1", ONE_LEVEL, TWO_LEVELS);
}

#[test]
fn v2_grows_and_moves_its_pages() {
    grow_and_check("parallax-v2", Sectors(300 * 8), Sectors(400 * 8));
}

#[test]
fn v2_grows_a_tree_level() {
    grow_and_check("parallax-v2", Sectors(400 * 8), TWO_LEVELS);
}

#[test]
fn v2_keeps_annotations_and_new_blocks_have_none() {
    let (space, _) = written("parallax-v2", Sectors(300 * 8));
    let before = {
        let d = Parallax::open_with(space.clone(), v2_options()).expect("open");
        let t = d.annotations().expect("v2 has annotations");
        (t.get(0), t.get(299))
    };
    assert!(before.0.writes > 0 && before.1.writes > 0, "{before:?}");
    let disk = open_grown(space.clone(), Sectors(2000 * 8));
    let t = disk.annotations().expect("annotations");
    assert_eq!((t.get(0), t.get(299)), before, "annotations kept");
    assert_eq!(
        t.get(300).writes,
        0,
        "the first new block has no annotation"
    );
    // The blocks that held the annotation pages read as zeroes.
    let mut buf = vec![0xaau8; 64 * 4096];
    disk.read(Sector(300 * 8), &mut buf)
        .expect("read the new blocks");
    assert!(buf.iter().all(|&b| b == 0), "new blocks read as zeroes");
    drop(disk);
    let (_c, reopened) = common::crash_and_reopen(&space);
    let t = reopened.annotations().expect("annotations");
    assert_eq!((t.get(0), t.get(299)), before, "annotations durable");
}

/// A power cut in the middle of a grow (its nodes and pages written, its root record not):
/// the old disk reopens intact, and the next open grows it.
#[test]
fn power_cut_mid_grow_leaves_the_old_disk() {
    for layout in ["parallax-v1", "parallax-v2"] {
        let (space, model) = written(layout, ONE_LEVEL);
        let cut = Arc::new(CutSpace {
            inner: space.clone(),
            fail: AtomicBool::new(true),
        });
        let err = Parallax::open_grown(cut.clone(), TWO_LEVELS, v2_options())
            .expect_err("the root commit fails");
        let chain = dovetail_layout::error_chain(&err);
        assert!(chain.contains("power cut"), "{layout}: {chain}");
        let (crashed, reopened) = common::crash_and_reopen(&space);
        assert_eq!(reopened.capacity(), ONE_LEVEL, "{layout}: old size");
        assert_disk_eq(&reopened, &model, &format!("{layout}: after the cut"));
        assert_clean(&reopened, &format!("{layout}: after the cut"));
        drop(reopened);
        let grown = open_grown(crashed, TWO_LEVELS);
        let mut want = model.clone();
        want.resize((TWO_LEVELS.0 * 512) as usize, 0);
        assert_disk_eq(&grown, &want, &format!("{layout}: grown after the cut"));
        assert_clean(&grown, &format!("{layout}: grown after the cut"));
    }
}

#[test]
fn shrinking_is_refused_and_changes_nothing() {
    let (space, model) = written("parallax-v1", ONE_LEVEL);
    let err = Parallax::open_grown(space.clone(), Sectors(8), ParallaxOptions::default())
        .expect_err("shrink refused");
    assert!(err.to_string().contains("shrinking"), "{err}");
    let d = Parallax::open(space).expect("open");
    assert_eq!(d.capacity(), ONE_LEVEL);
    assert_disk_eq(&d, &model, "after a refused shrink");
}

#[test]
fn snapshots_refuse_a_new_level_but_not_a_growth_within_it() {
    let (space, model) = written("parallax-v1", Sectors(100 * 8));
    {
        let d = Parallax::open(space.clone()).expect("open");
        d.snapshot("s1").expect("snapshot");
    }
    let err = Parallax::open_grown(space.clone(), TWO_LEVELS, ParallaxOptions::default())
        .expect_err("a new level with snapshots is refused");
    assert!(err.to_string().contains("delete its snapshots"), "{err}");
    let d = open_grown(space.clone(), ONE_LEVEL);
    assert_eq!(d.capacity(), ONE_LEVEL);
    let snap = d.open_snapshot("s1").expect("snapshot still readable");
    let mut buf = vec![0u8; model.len()];
    snap.read(Sector(0), &mut buf).expect("read snapshot");
    assert_eq!(buf, model, "snapshot data");
    assert_clean(&d, "grown with a snapshot");
}

#[test]
fn too_large_is_refused() {
    let (space, _) = written("parallax-v1", ONE_LEVEL);
    let err = Parallax::open_grown(space, Sectors(u64::MAX), ParallaxOptions::default())
        .expect_err("too large");
    assert!(err.to_string().contains("too large"), "{err}");
}

/// A tiered parallax-v2 disk (two tiers, metadata kept on both) grows: its pages move within
/// the metadata class, the data stays, the checks and the mover's pass still hold.
#[test]
fn tiered_v2_grows() {
    use dovetail_layout::parallax::Tiered;
    use dovetail_store::mem::MemPool;
    let pool = MemPool::with_tiers(&[("fast", 64), ("slow", 256)]);
    let space = Arc::new(MemSpace::new(pool, VersionKey(1), 256 << 10));
    let from = Sectors(1024 * 8);
    let to = Sectors(1700 * 8);
    let disk =
        Parallax::create_layout(space.clone(), "parallax-v2", from, v2_options()).expect("create");
    let mut model = vec![0u8; (from.0 * 512) as usize];
    for b in (0..1024u64).step_by(37) {
        let data = pattern(b, 4096);
        disk.write(Sector(b * 8), &data).expect("write");
        model[(b * 4096) as usize..((b + 1) * 4096) as usize].copy_from_slice(&data);
    }
    disk.flush().expect("flush");
    drop(disk);
    let disk = open_grown(space.clone(), to);
    model.resize((to.0 * 512) as usize, 0);
    assert_disk_eq(&disk, &model, "tiered: grown");
    assert_clean(&disk, "tiered: grown");
    assert!(disk.check_data().is_empty(), "{:?}", disk.check_data());
    disk.pass(4096, u64::MAX)
        .expect("a mover pass after the grow");
    let data = pattern(9999, 4096);
    disk.write(Sector(1699 * 8), &data)
        .expect("write the new last block");
    model[(1699 * 4096) as usize..].copy_from_slice(&data);
    disk.flush().expect("flush");
    let (_c, reopened) = common::crash_and_reopen(&space);
    assert_disk_eq(&reopened, &model, "tiered: reopened");
    assert_clean(&reopened, "tiered: reopened");
    assert!(reopened.check_data().is_empty());
}
