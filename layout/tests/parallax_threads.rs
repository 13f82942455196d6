//! parallax-v1 shared by threads, as queue workers share it: concurrent writers on disjoint
//! ranges, readers of a snapshot, and flushes, all consistent at the end.

mod common;

use std::sync::Arc;

use common::{assert_clean, assert_disk_eq, crash_and_reopen, parallax, pattern, Rng};
use dovetail_layout::{BlockLayout, Sector, Sectors};

#[test]
fn concurrent_writers_readers_and_flushes_stay_consistent() {
    const WORKERS: u64 = 4;
    const REGION: u64 = 2048; // sectors per worker
    let capacity = Sectors(WORKERS * REGION);
    let (space, disk) = parallax(capacity, 256 << 10);
    let base = pattern(7, (capacity.0 * 512) as usize);
    disk.write(Sector(0), &base).expect("fill");
    disk.snapshot("base").expect("snapshot");
    let disk = Arc::new(disk);
    let models: Vec<Vec<u8>> = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for w in 0..WORKERS {
            let disk = disk.clone();
            let base = &base;
            handles.push(s.spawn(move || {
                let mut rng = Rng::new(w + 1);
                let start = w * REGION;
                let mut model =
                    base[(start * 512) as usize..((start + REGION) * 512) as usize].to_vec();
                for step in 0..400u64 {
                    let at = rng.below(REGION);
                    let len = 1 + rng.below(16.min(REGION - at));
                    let r = (at * 512) as usize..((at + len) * 512) as usize;
                    match rng.below(6) {
                        0 => {
                            disk.discard(Sector(start + at), Sectors(len))
                                .expect("discard");
                            model[r].fill(0);
                        }
                        1 => {
                            let mut buf = vec![0u8; r.len()];
                            disk.read(Sector(start + at), &mut buf).expect("read");
                            assert!(buf[..] == model[r], "worker {w} step {step}");
                        }
                        2 if step % 50 == 0 => disk.flush().expect("flush"),
                        _ => {
                            let data = pattern(w * 10_000 + step, r.len());
                            disk.write(Sector(start + at), &data).expect("write");
                            model[r].copy_from_slice(&data);
                        }
                    }
                }
                model
            }));
        }
        // A reader of the snapshot, while the live disk changes under it.
        let snap_reader = {
            let disk = disk.clone();
            let base = &base;
            s.spawn(move || {
                let view = disk.open_snapshot("base").expect("open snapshot");
                let mut rng = Rng::new(99);
                for _ in 0..300 {
                    let at = rng.below(capacity.0 - 64);
                    let mut buf = vec![0u8; 64 * 512];
                    view.read(Sector(at), &mut buf).expect("snapshot read");
                    assert!(buf[..] == base[(at * 512) as usize..((at + 64) * 512) as usize]);
                }
            })
        };
        snap_reader.join().expect("snapshot reader");
        handles
            .into_iter()
            .map(|h| h.join().expect("worker"))
            .collect()
    });
    let model: Vec<u8> = models.concat();
    assert_disk_eq(&*disk, &model, "after the threads");
    assert_clean(&disk, "after the threads");
    disk.flush().expect("flush");
    let (_c, reopened) = crash_and_reopen(&space);
    assert_disk_eq(&reopened, &model, "reopened");
    let view = reopened.open_snapshot("base").expect("snapshot");
    assert_disk_eq(&view, &base, "snapshot reopened");
    assert_clean(&reopened, "reopened");
}

/// A space whose `sync` takes 300 ms while `slow` is set, counting root commits.
#[derive(Debug)]
struct SlowSync {
    inner: Arc<dovetail_store::mem::MemSpace>,
    slow: std::sync::atomic::AtomicBool,
    commits: std::sync::atomic::AtomicU64,
}

impl dovetail_store::VersionSpace for SlowSync {
    fn key(&self) -> dovetail_store::VersionKey {
        self.inner.key()
    }
    fn extent_size(&self) -> u64 {
        self.inner.extent_size()
    }
    fn extents(&self) -> Vec<dovetail_store::ExtentId> {
        self.inner.extents()
    }
    fn grant_extent(&self) -> dovetail_store::Result<dovetail_store::ExtentId> {
        self.inner.grant_extent()
    }
    fn read(
        &self,
        extent: dovetail_store::ExtentId,
        offset: u64,
        buf: &mut [u8],
    ) -> dovetail_store::Result<()> {
        self.inner.read(extent, offset, buf)
    }
    fn write(
        &self,
        extent: dovetail_store::ExtentId,
        offset: u64,
        buf: &[u8],
    ) -> dovetail_store::Result<()> {
        self.inner.write(extent, offset, buf)
    }
    fn sync(&self) -> dovetail_store::Result<()> {
        if self.slow.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        self.inner.sync()
    }
    fn root(&self) -> Vec<u8> {
        self.inner.root()
    }
    fn commit_root(&self, record: &[u8]) -> dovetail_store::Result<()> {
        self.commits
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.commit_root(record)
    }
    fn grant_violations(&self) -> u64 {
        self.inner.grant_violations()
    }
}

/// Group commit: FLUSHes from several queues that arrive while a commit runs share the next
/// commit instead of each running its own (while another queue keeps writing, so that each
/// would find something to commit), and each still completes only once every write completed
/// before it is durable (a crash right after they return loses none of them).
#[test]
fn flushes_waiting_behind_a_commit_share_the_next_one() {
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    const QUEUES: u64 = 8;
    for layout in ["parallax-v1", "parallax-v2"] {
        let (_pool, mem) = common::mem_space(256 << 10, 1 << 12);
        let space = Arc::new(SlowSync {
            inner: mem.clone(),
            slow: false.into(),
            commits: 0.into(),
        });
        let disk = Arc::new(
            dovetail_layout::Parallax::create_layout(
                space.clone(),
                layout,
                Sectors(1024),
                common::v2_options(),
            )
            .expect("create"),
        );
        disk.write(Sector(0), &pattern(1, 4096)).expect("write");
        disk.flush().expect("flush");
        let before = space.commits.load(Ordering::SeqCst);
        space.slow.store(true, Ordering::SeqCst);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let commits = std::thread::scope(|s| {
            // A queue that keeps writing (blocks 100 to 127).
            let writer = {
                let (disk, stop) = (disk.clone(), &stop);
                s.spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        disk.write(Sector((100 + i % 28) * 8), &pattern(1000 + i, 4096))
                            .expect("background write");
                        i += 1;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            };
            // A commit that takes 300 ms in its sync.
            let first = {
                let disk = disk.clone();
                s.spawn(move || {
                    disk.write(Sector(0), &pattern(100, 4096)).expect("write");
                    disk.flush().expect("first flush");
                })
            };
            std::thread::sleep(Duration::from_millis(60));
            // Queues writing and flushing while it runs.
            let queues: Vec<_> = (1..=QUEUES)
                .map(|q| {
                    let disk = disk.clone();
                    s.spawn(move || {
                        disk.write(Sector(q * 8), &pattern(100 + q, 4096))
                            .expect("write");
                        disk.flush().expect("flush");
                    })
                })
                .collect();
            first.join().expect("first");
            for q in queues {
                q.join().expect("queue");
            }
            let commits = space.commits.load(Ordering::SeqCst) - before;
            stop.store(true, Ordering::SeqCst);
            writer.join().expect("writer");
            commits
        });
        assert!(
            commits <= 3,
            "{layout}: {QUEUES} FLUSHes waiting behind one commit ran {commits} commits, \
             not one shared commit"
        );
        eprintln!("{layout}: 1 + {QUEUES} FLUSHes, {commits} commits");
        // Every write completed before a FLUSH that returned is durable.
        let crashed: Arc<dyn dovetail_store::VersionSpace> = Arc::new(mem.crash());
        let reopened =
            dovetail_layout::Parallax::open_with(crashed, common::v2_options()).expect("reopen");
        let mut buf = vec![0u8; 4096];
        for q in 0..=QUEUES {
            reopened.read(Sector(q * 8), &mut buf).expect("read");
            assert!(
                buf == pattern(100 + q, 4096),
                "{layout}: block {q} lost after its FLUSH returned"
            );
        }
        assert_clean(&reopened, layout);
    }
}
