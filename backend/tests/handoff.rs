//! A guest's live vhost-user connection handed from one serve loop to another
//! (`dovetail_backend::handoff`): the frontend keeps its socket, memory and vrings, never
//! reconnects, and every request (including those made during the handover) completes once
//! with the right data.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use dovetail_backend::server::serve_adopting;
use dovetail_backend::{listen, DeviceConfig, ListenOn, Shutdown};
use vhost::vhost_user::Listener;
use vhost_user_backend::ExportedConnection;

const QUEUES: usize = 2;
const SIZE: u64 = 8 << 20;
const BLOCK: usize = 4096;

/// One serve loop in a thread; it returns the listener when it ends.
struct Loop {
    shutdown: Arc<Shutdown>,
    thread: JoinHandle<Listener>,
}

fn start(image: &Path, mut listener: Listener, adopt: Option<ExportedConnection>) -> Loop {
    let disk = open_raw_disk(image, false);
    let shutdown = Shutdown::new().expect("shutdown");
    let stop = shutdown.clone();
    let thread = std::thread::spawn(move || {
        serve_adopting(
            "d",
            disk,
            DeviceConfig { num_queues: QUEUES },
            &mut listener,
            &stop,
            &|_| {},
            &|| {},
            adopt,
        )
        .expect("serve");
        listener
    });
    Loop { shutdown, thread }
}

/// Hands the connection of `l` over: its loop ends, the connection exported.
fn hand_off(l: Loop) -> (Listener, Option<ExportedConnection>) {
    l.shutdown.hand_off();
    let deadline = Instant::now() + TIMEOUT;
    while !l.thread.is_finished() {
        assert!(Instant::now() < deadline, "the serve loop did not end");
        std::thread::sleep(Duration::from_millis(1));
    }
    let listener = l.thread.join().expect("serve loop");
    (listener, l.shutdown.take_exported())
}

fn block(seed: u64) -> Vec<u8> {
    pattern(seed, BLOCK)
}

#[test]
fn a_connection_handed_over_twice_keeps_serving_without_a_reconnect() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let socket = dir.path().join("d.sock");
    drop(raw_disk(&image, SIZE, false));
    let listener = listen(&ListenOn::Path(socket.clone())).expect("listen");
    let first = start(&image, listener, None);
    let driver = TestDriver::connect(&socket, QUEUES, 4 << 20);
    let config = driver.blk_config();

    // Queue 0: blocks written before, between and after the handovers, by this thread.
    driver.submit(0, &Req::write(0, &block(1))).assert_ok(0);

    // Queue 1: a writer that never stops during both handovers, each write a new block.
    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let third = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) || n < 4 {
                let sector = 8 * (1 + n);
                let done = driver.submit(1, &Req::write(sector, &block(100 + n)));
                done.assert_ok(0);
                n += 1;
                written.store(n, Ordering::SeqCst);
                assert!(8 * (2 + n) * 512 < SIZE, "the writer ran out of disk");
            }
            n
        });
        let wait_for_more = || {
            let at = written.load(Ordering::SeqCst);
            let deadline = Instant::now() + TIMEOUT;
            while written.load(Ordering::SeqCst) < at + 3 {
                assert!(Instant::now() < deadline, "the writer made no progress");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        wait_for_more();

        let (listener, exported) = hand_off(first);
        let c = exported.expect("a connection was exported");
        assert_eq!(c.vrings.iter().filter(|v| v.started).count(), QUEUES);
        assert_eq!(c.regions.len(), 1);
        let second = start(&image, listener, Some(c));
        driver
            .submit(0, &Req::write(8 * 1000, &block(2)))
            .assert_ok(0);
        wait_for_more();

        let (listener, exported) = hand_off(second);
        let third = start(&image, listener, Some(exported.expect("exported again")));
        driver
            .submit(0, &Req::write(8 * 1001, &block(3)))
            .assert_ok(0);
        wait_for_more();
        stop.store(true, Ordering::SeqCst);
        let n = writer.join().expect("writer");
        assert!(n >= 9, "{n} writes");
        third
    });

    // The same connection: its config space and every block written read back through it.
    assert_eq!(driver.blk_config(), config);
    let read = |sector: u64| {
        let c = driver.submit(0, &Req::read(sector, BLOCK as u32));
        c.assert_ok(BLOCK as u32);
        c.data
    };
    assert_eq!(read(0), block(1));
    assert_eq!(read(8 * 1000), block(2));
    assert_eq!(read(8 * 1001), block(3));
    let n = written.load(Ordering::SeqCst);
    for i in 0..n {
        assert_eq!(read(8 * (1 + i)), block(100 + i), "block {i} of queue 1");
    }

    // The last loop stops as any does: the guest disconnected, the disk flushed.
    third.shutdown.request();
    drop(third.thread.join().expect("serve loop"));
    for i in 0..n {
        let at = 8 * (1 + i) * 512;
        assert_eq!(image_bytes(&image, at, BLOCK), block(100 + i));
    }
    assert_eq!(image_bytes(&image, 8 * 1001 * 512, BLOCK), block(3));
}

#[test]
fn a_handover_with_no_guest_exports_nothing() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    drop(raw_disk(&image, SIZE, false));
    let listener = listen(&ListenOn::Path(dir.path().join("d.sock"))).expect("listen");
    let (_listener, exported) = hand_off(start(&image, listener, None));
    assert!(exported.is_none());
}
