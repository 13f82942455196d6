//! `check_reader` beside a writer that commits all the time (as a daemon serving a busy guest
//! does): the check never reports a violation that is not there (blocks freed by one commit
//! and reused by the next are never read as the tree of the commit checked), it finds one that
//! is, and the readers' retries (`Store::open_reader`, `committed_generation`) see a moving
//! store as it moves.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dovetail_layout::parallax::{Parallax, ParallaxCheck};
use dovetail_layout::{BlockLayout, Sector, Sectors};
use dovetail_store::{check_reader, Store, StoreError, VersionSpace};

const DISK: u64 = 8 << 20;

fn store_with_disk(dir: &Path) -> (Arc<Store>, Parallax) {
    let store = Store::create(dir, 64 << 20, 1 << 20).expect("create store");
    let key = store
        .create_disk("d", DISK, "parallax-v1")
        .expect("create disk");
    let space: Arc<dyn VersionSpace> = store.space(key).expect("space");
    let disk = Parallax::create(space, Sectors(DISK / 512)).expect("format");
    (store, disk)
}

#[test]
fn a_check_beside_a_committing_writer_is_never_falsely_inconsistent() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("st");
    let (store, disk) = store_with_disk(&dir);
    for b in 0..(DISK / 4096) {
        disk.write(Sector(b * 8), &[b as u8; 4096]).expect("fill");
    }
    disk.flush().expect("flush");

    // A writer rewriting blocks and committing in a loop: every commit frees the blocks the
    // previous tree used and the next writes reuse them.
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, commits) = (stop.clone(), commits.clone());
        std::thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..16 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let b = x % (DISK / 4096);
                    disk.write(Sector(b * 8), &[x as u8; 4096]).expect("write");
                }
                disk.flush().expect("commit");
                commits.fetch_add(1, Ordering::Relaxed);
            }
            disk
        })
    };
    while commits.load(Ordering::Relaxed) < 5 {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        matches!(Store::open_read_only(&dir), Err(StoreError::InUse(_))),
        "the writer holds the store"
    );
    let (mut complete, mut unchecked) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let r = check_reader(&dir, &ParallaxCheck::ALL).expect("check runs");
        assert!(r.violations.is_empty(), "a false violation:\n{r}");
        assert!(r.info.is_some(), "{r}");
        match &r.unchecked {
            None => {
                assert!(r.to_string().contains("result: consistent"), "{r}");
                assert!(
                    r.notes
                        .iter()
                        .any(|n| n.contains("in use by another process")),
                    "{r}"
                );
                complete += 1;
            }
            Some(why) => {
                assert!(why.contains("committed during each of"), "{why}");
                assert!(r.to_string().contains("not everything was checked"), "{r}");
                unchecked += 1;
            }
        }
        // A reader sees the store move.
        let reader = Store::open_reader(&dir).expect("reader beside the writer");
        assert!(reader.beside_writer());
        assert!(reader.create_disk("x", 4096, "parallax-v1").is_err());
        let read = reader.info().generation;
        assert!(reader.committed_generation().expect("generation") >= read);
    }
    stop.store(true, Ordering::Relaxed);
    let disk = writer.join().expect("writer");
    eprintln!(
        "{complete} complete and {unchecked} incomplete checks beside {} commits",
        commits.load(Ordering::Relaxed)
    );
    assert!(complete + unchecked > 0);

    // Without a writer the reader takes the shared lock as before.
    drop(disk);
    drop(store);
    let reader = Store::open_reader(&dir).expect("reader");
    assert!(!reader.beside_writer());
}

#[test]
fn a_check_beside_a_writer_finds_a_damaged_tree_node() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("st");
    let (store, disk) = store_with_disk(&dir);
    for b in 0..64u64 {
        disk.write(Sector(b * 8), &[b as u8 + 1; 4096])
            .expect("write");
    }
    disk.flush().expect("flush");
    let data = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("data.0"))
        .expect("data.0");
    let mut magic = [0u8; 8];
    let node = (0..64u64 << 20)
        .step_by(4096)
        .find(|&off| {
            data.read_exact_at(&mut magic, off).expect("read");
            &magic == b"DVPXNODE"
        })
        .expect("a tree node");
    data.write_all_at(&[0xff; 8], node + 100).expect("damage");
    // The writer (`store`, `disk`) still holds the store.
    let r = check_reader(&dir, &ParallaxCheck::ALL).expect("check runs");
    assert!(r.unchecked.is_none(), "{r}");
    assert!(
        r.violations.iter().any(|v| v.contains("checksum mismatch")),
        "{r}"
    );
    drop(disk);
    drop(store);
}
