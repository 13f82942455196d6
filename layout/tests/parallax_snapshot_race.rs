//! Snapshots, their deletion, taint labels and tiering policies commit while other threads, as
//! other queues would, keep writing: the commit's slow sync does not stop their writes, and each
//! snapshot holds exactly the data acknowledged before it was taken (sector by sector: the last
//! write completed before the snapshot began, or a write that overlapped the snapshot call;
//! never a write issued after it returned), before and after a crash.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{assert_clean, pattern, Rng};
use dovetail_layout::{BlockLayout, Parallax, Sector, Sectors};
use dovetail_store::mem::MemSpace;
use dovetail_store::{ExtentId, VersionKey, VersionSpace};

/// Writer threads, each owning a region of the disk.
const WRITERS: u64 = 3;
/// Sectors per writer's region (128 blocks).
const REGION: u64 = 1024;
const CAPACITY: Sectors = Sectors(WRITERS * REGION);
/// How long each commit's sync takes.
const SYNC: Duration = Duration::from_millis(40);

/// A space whose `sync` takes [`SYNC`] while `slow` is set, so a commit's persisting step
/// clearly overlaps the writes of other threads.
#[derive(Debug)]
struct SlowSync {
    inner: Arc<MemSpace>,
    slow: AtomicBool,
}

impl VersionSpace for SlowSync {
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
        if self.slow.load(Ordering::SeqCst) {
            std::thread::sleep(SYNC);
        }
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
}

/// The bytes write `id` puts in disk sector `sector` (id 0: zeros, a discard's or nothing's).
fn sector_data(id: u64, sector: u64) -> Vec<u8> {
    if id == 0 {
        return vec![0u8; 512];
    }
    pattern(id.wrapping_mul(0x1_0000_0001) ^ sector, 512)
}

/// One change of a sector: which write (0: a discard), issued and completed at these ticks.
#[derive(Debug, Clone, Copy)]
struct Event {
    id: u64,
    issued: u64,
    done: u64,
}

/// A snapshot taken: its name and the ticks the call began and returned at.
#[derive(Debug, Clone)]
struct Taken {
    name: String,
    issued: u64,
    done: u64,
}

/// Checks that `view` holds, in every sector, the last change completed before the snapshot
/// began or a change that overlapped the call (zeros if no change completed before it).
fn check_snapshot(view: &dyn BlockLayout, history: &[Vec<Event>], snap: &Taken, what: &str) {
    let mut image = vec![0u8; (CAPACITY.0 * 512) as usize];
    view.read(Sector(0), &mut image).expect("read the snapshot");
    for (sector, events) in history.iter().enumerate() {
        let before = events
            .iter()
            .filter(|e| e.done < snap.issued)
            .max_by_key(|e| e.done)
            .map_or(0, |e| e.id);
        let mut accepted = vec![before];
        accepted.extend(
            events
                .iter()
                .filter(|e| e.done >= snap.issued && e.issued < snap.done)
                .map(|e| e.id),
        );
        let got = &image[sector * 512..(sector + 1) * 512];
        assert!(
            accepted
                .iter()
                .any(|&id| sector_data(id, sector as u64) == got),
            "{what}: snapshot {:?}: sector {sector} holds data neither acknowledged before the \
             snapshot nor written during it (accepted writes {accepted:?})",
            snap.name
        );
    }
}

#[test]
fn snapshots_taken_while_threads_write_hold_exactly_what_was_acknowledged_before_them() {
    for layout in ["parallax-v1", "parallax-v2"] {
        let (_pool, mem) = common::mem_space(64 << 10, 1 << 14);
        let space = Arc::new(SlowSync {
            inner: mem.clone(),
            slow: false.into(),
        });
        let disk = Arc::new(
            Parallax::create_layout(space.clone(), layout, CAPACITY, common::v2_options())
                .expect("create"),
        );
        space.slow.store(true, Ordering::SeqCst);
        let clock = AtomicU64::new(1);
        let tick = || clock.fetch_add(1, Ordering::SeqCst);
        let history: Mutex<Vec<Vec<Event>>> = Mutex::new(vec![Vec::new(); CAPACITY.0 as usize]);
        let writing = AtomicBool::new(true);
        let mut taken: Vec<Taken> = Vec::new();
        std::thread::scope(|s| {
            let writers: Vec<_> = (0..WRITERS)
                .map(|w| {
                    let (disk, history, tick, writing) = (&disk, &history, &tick, &writing);
                    s.spawn(move || {
                        let mut rng = Rng::new(w + 11);
                        let start = w * REGION;
                        let mut n = 0u64;
                        while writing.load(Ordering::SeqCst) || n < 50 {
                            n += 1;
                            let id = (w + 1) * 1_000_000 + n;
                            // Whole blocks mostly, partial blocks and discards too.
                            let (at, len) = match rng.below(4) {
                                0 => (rng.below(REGION - 16), 1 + rng.below(15)),
                                _ => (rng.below(REGION / 8 - 2) * 8, 8 * (1 + rng.below(2))),
                            };
                            let discard = rng.below(10) == 0;
                            let issued = tick();
                            if discard {
                                disk.discard(Sector(start + at), Sectors(len))
                                    .expect("discard");
                            } else {
                                let mut buf = Vec::with_capacity((len * 512) as usize);
                                for sector in start + at..start + at + len {
                                    buf.extend(sector_data(id, sector));
                                }
                                disk.write(Sector(start + at), &buf).expect("write");
                            }
                            let done = tick();
                            let mut h = history.lock().expect("history");
                            for sector in start + at..start + at + len {
                                h[sector as usize].push(Event {
                                    id: if discard { 0 } else { id },
                                    issued,
                                    done,
                                });
                            }
                        }
                        n
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(20));
            for i in 0..8 {
                let name = format!("s{i}");
                let issued = tick();
                disk.snapshot(&name).expect("snapshot");
                let done = tick();
                taken.push(Taken { name, issued, done });
                if i == 3 {
                    // A deletion, a label and a policy commit while the writes go on.
                    disk.delete_snapshot("s1").expect("delete a snapshot");
                    if layout == "parallax-v2" {
                        disk.set_taint("racing", true).expect("taint on");
                        disk.set_taint("racing", false).expect("taint off");
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            writing.store(false, Ordering::SeqCst);
            for w in writers {
                w.join().expect("writer");
            }
        });
        taken.retain(|t| t.name != "s1");
        let history = history.into_inner().expect("history");
        // The writes did not wait for the snapshots' commits: writes issued after a snapshot
        // began completed before it returned (each commit's sync alone takes 40 ms; when a
        // snapshot held the version's locks across it, no more than one write per thread could).
        let during: Vec<usize> = taken
            .iter()
            .map(|t| {
                history
                    .iter()
                    .flatten()
                    .filter(|e| e.issued > t.issued && e.done < t.done)
                    .map(|e| e.issued)
                    .collect::<std::collections::BTreeSet<u64>>()
                    .len()
            })
            .collect();
        eprintln!(
            "{layout}: {} snapshots; writes issued and completed during each: {during:?}",
            taken.len()
        );
        assert!(
            during.iter().all(|&n| n >= 10),
            "{layout}: writes waited for the snapshots' commits (writes completed during each \
             snapshot: {during:?})"
        );
        let names: Vec<String> = disk.snapshots().into_iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            taken.iter().map(|t| t.name.clone()).collect::<Vec<_>>(),
            "{layout}: the snapshots listed"
        );
        for t in &taken {
            let view = disk.open_snapshot(&t.name).expect("open snapshot");
            check_snapshot(&view, &history, t, layout);
        }
        assert_clean(&disk, layout);
        // After a crash, every snapshot is there with the same data (each was committed
        // before its call returned), and the check is clean.
        space.slow.store(false, Ordering::SeqCst);
        let crashed: Arc<dyn VersionSpace> = Arc::new(mem.crash());
        let reopened = Parallax::open_with(crashed, common::v2_options()).expect("reopen");
        for t in &taken {
            let view = reopened
                .open_snapshot(&t.name)
                .expect("snapshot after the crash");
            check_snapshot(&view, &history, t, &format!("{layout} after a crash"));
        }
        assert!(
            reopened.open_snapshot("s1").is_err(),
            "{layout}: s1 is back"
        );
        assert_clean(&reopened, &format!("{layout} after a crash"));
    }
}

/// A snapshot captured and then dropped without its commit leaves the disk as if its commit had
/// failed: no snapshot, nothing lost, and the next commit writes what it captured.
#[test]
fn a_snapshot_captured_but_never_committed_leaves_nothing_behind() {
    let (space, disk) = common::parallax(Sectors(4096), 64 << 10);
    disk.write(Sector(0), &pattern(1, 8192)).expect("write");
    let cap = disk.capture_snapshot("gone").expect("capture");
    assert_eq!(cap.info().name, "gone");
    drop(cap);
    assert!(disk.snapshots().is_empty());
    disk.write(Sector(16), &pattern(2, 4096))
        .expect("write after");
    disk.flush().expect("flush");
    let (_c, reopened) = common::crash_and_reopen(&space);
    let mut buf = vec![0u8; 8192];
    reopened.read(Sector(0), &mut buf).expect("read");
    assert!(buf == pattern(1, 8192));
    let mut buf = vec![0u8; 4096];
    reopened.read(Sector(16), &mut buf).expect("read");
    assert!(buf == pattern(2, 4096));
    assert!(reopened.snapshots().is_empty());
    assert_clean(&reopened, "reopened");
}
