//! A FLUSH that captures the tree while a whole-block write is still writing its data (mapped
//! for a queue worker's ring, its tree change made) does not hold the state lock while it
//! waits for that data: other writes go on meanwhile. It does wait for the data before its
//! sync, so the root record it publishes never names a block whose data is not written: after
//! a reopen, both writes read back.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use dovetail_layout::engine::AlignedBuf;
use dovetail_layout::iobuf::IoBufs;
use dovetail_layout::{BlockLayout, Parallax, ParallaxOptions, Sector, Sectors};
use dovetail_store::{Store, VersionSpace};

const DISK: u64 = 8 << 20;
const BLOCK: usize = 4096;

fn options() -> ParallaxOptions {
    ParallaxOptions {
        persist_every: None,
        ..ParallaxOptions::default()
    }
}

fn pattern(tag: u8) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| (i as u8).wrapping_mul(31) ^ tag)
        .collect()
}

fn run(layout: &str) {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("store");
    let key = {
        let store = Store::create(&dir, 64 << 20, 1 << 20).expect("create the store");
        store.create_disk("d", DISK, layout).expect("create disk")
    };
    let store = Store::open_direct(&dir).expect("open the store with direct I/O");
    let space: Arc<dyn VersionSpace> = store.space(key).expect("space");
    let disk = Arc::new(
        Parallax::create_layout(space, layout, Sectors(DISK / 512), options()).expect("format"),
    );
    disk.write(Sector(0), &pattern(1)).expect("write");
    disk.flush().expect("flush");

    // A write of block 7 mapped: its tree change is made, its data not yet written.
    let mut buf = AlignedBuf::new(BLOCK);
    buf.as_mut_slice().copy_from_slice(&pattern(7));
    let one = [buf.iobuf()];
    let mut pieces = Vec::new();
    // SAFETY: `buf` outlives the mapping and nothing else uses it meanwhile.
    let mut m = disk
        .map_direct_write(Sector(7 * 8), unsafe { IoBufs::new(&one) }, &mut pieces)
        .expect("the write is mapped")
        .expect("mapped");
    assert_eq!(pieces.len(), 1, "{layout}: one copy, one piece");

    let flushed = Arc::new(AtomicBool::new(false));
    let flusher = {
        let (disk, flushed) = (disk.clone(), flushed.clone());
        std::thread::spawn(move || {
            disk.flush().expect("flush");
            flushed.store(true, Ordering::SeqCst);
        })
    };
    // Another write (another block) completes while that FLUSH waits.
    let (tx, rx) = mpsc::channel();
    {
        let disk = disk.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            disk.write(Sector(100 * 8), &pattern(100)).expect("write");
            let _ = tx.send(());
        });
    }
    rx.recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| panic!("{layout}: a write waited for the FLUSH's capture"));
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !flushed.load(Ordering::SeqCst),
        "{layout}: the FLUSH returned before the data of a block its tree names was written"
    );

    // The worker's part: the data written, the request completed.
    let (fd, offset) = pieces[0].file.expect("a file piece");
    // SAFETY: the descriptor stays open (the store holds it); ManuallyDrop keeps this
    // borrowed handle from closing it.
    let file = std::mem::ManuallyDrop::new(unsafe {
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
    });
    file.write_all_at(buf.as_slice(), offset)
        .expect("write the mapped range");
    m.guard.completed(true, Duration::ZERO);
    drop(m);
    flusher.join().expect("flusher");
    assert!(flushed.load(Ordering::SeqCst));
    // Block 100 was written after that FLUSH's capture: the next one makes it durable.
    disk.flush().expect("flush");
    drop(disk);
    drop(store);

    let store = Store::open_direct(&dir).expect("reopen the store");
    let disk = Parallax::open_with(store.space(key).expect("space"), options()).expect("reopen");
    let mut got = vec![0u8; BLOCK];
    for (b, tag) in [(0u64, 1u8), (7, 7), (100, 100)] {
        disk.read(Sector(b * 8), &mut got).expect("read");
        assert!(got == pattern(tag), "{layout}: block {b} after the reopen");
    }
    assert_eq!(disk.check(), Vec::<String>::new(), "{layout}");
}

#[test]
fn parallax_v1_flush_waits_for_captured_data_outside_the_state_lock() {
    run("parallax-v1");
}

#[test]
fn parallax_v2_flush_waits_for_captured_data_outside_the_state_lock() {
    run("parallax-v2");
}
