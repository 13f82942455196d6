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
