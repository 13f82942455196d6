//! Dirty-page logging for live migration: a frontend that starts the log as QEMU does
//! (`SET_LOG_BASE` with a shared file, `VHOST_F_LOG_ALL` acked) finds every guest page a read
//! filled marked, whichever engine carried the read out (io_uring, the pool, the worker
//! itself), though the data lands in guest memory outside vm-memory's accessors.

mod common;
#[path = "common/layouts.rs"]
mod layouts;

use std::time::{Duration, Instant};

use common::{
    pattern, raw_disk_with, test_cache, DriverOptions, Req, TestDriver, TestServer, GUEST_BASE,
};
use dovetail_backend::disk::Engine;
use dovetail_layout::CacheMode;
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

const KIB: u64 = 1024;
const PAGE: u64 = 4096;

fn reads_mark_their_pages(engine: Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let disk = raw_disk_with(&image, Some(8 << 20), false, test_cache(), engine);
    let server = TestServer::start(disk, 1);
    let driver = TestDriver::connect_with(server.socket(), DriverOptions::new(1, 4 << 20));
    let len = 64 * KIB;
    let data = pattern(7, len as usize);
    driver.submit(0, &Req::write(64, &data)).assert_ok(0);

    let (area, _) = driver.queue(0).expect("queue 0").data_area();
    // The chain's buffers: the 16-byte header at the area's start, the data right after it.
    let buf = GuestAddress(area.0 + 16);
    let pages = (buf.0 + len - 1) / PAGE - buf.0 / PAGE + 1;

    let log = driver.start_dirty_log().expect("dirty log");
    log.clear();
    assert_eq!(log.dirty_pages(buf, len), 0, "pages dirty before any read");
    let c = driver.submit(0, &Req::read(64, len as u32));
    c.assert_ok(len as u32);
    assert!(c.data == data, "read back differs");
    assert_eq!(
        log.dirty_pages(buf, len),
        pages,
        "{engine:?}: not every page the read filled is marked dirty"
    );

    // Logging off (a cancelled migration): reads mark nothing more than vm-memory's own
    // writes (the status byte, in the data's last page).
    driver.stop_dirty_log().expect("stop the log");
    log.clear();
    driver
        .submit(0, &Req::read(64, len as u32))
        .assert_ok(len as u32);
    assert_eq!(
        log.dirty_pages(buf, len - PAGE),
        0,
        "{engine:?}: data pages marked with logging off"
    );
}

#[test]
fn io_uring_reads_mark_their_pages() {
    reads_mark_their_pages(Engine::Auto);
}

#[test]
fn pool_reads_mark_their_pages() {
    reads_mark_their_pages(Engine::Threads);
}

#[test]
fn worker_reads_mark_their_pages() {
    reads_mark_their_pages(Engine::Sync);
}

// ------------------------------------------------------------------------------------------------
// The end of a migration, as QEMU runs it: no page the device writes may escape the log.

/// Queues the migration checks drive at once.
const QUEUES: usize = 4;
/// Reads made available on each queue per round.
const CHAINS: u16 = 24;
/// Bytes each read fills.
const READ_LEN: u32 = 64 * 1024;
/// Guest memory: each queue's rings and its reads' buffers.
const MEM: usize = QUEUES * (2 << 20);
/// Bytes of disk the reads come from (a pattern, so each round's reads change their buffers).
const DISK: u64 = 4 << 20;

/// How the frontend behaves while a round's reads run.
#[derive(Debug, Clone, Copy)]
struct Frontend {
    /// Start the log while the reads run (SET_LOG_BASE, SET_FEATURES with `VHOST_F_LOG_ALL`,
    /// then SET_VRING_ADDR with `VHOST_VRING_F_LOG` on every running queue: QEMU's order),
    /// instead of before they are made available.
    log_while_running: bool,
    /// Send the memory table again once logging is on (QEMU's `vhost_commit` after the
    /// guest's memory map changed during the migration).
    mem_table_again: bool,
}

/// What one round saw.
#[derive(Debug, Default)]
struct Round {
    /// Chains the device completed after the frontend's last copy of memory (in flight then).
    completed_after_copy: u64,
    /// Guest pages changed after that copy and not in the log (each a page the destination
    /// would run with stale).
    unlogged: Vec<u64>,
    /// Guest pages changed after every queue's GET_VRING_BASE was answered.
    after_stop: Vec<u64>,
    /// Queues whose used index in guest memory is not the base GET_VRING_BASE returned (a
    /// chain the device took and never completed, or a completion lost).
    used_mismatch: Vec<(usize, u16, u16)>,
}

fn snapshot(driver: &TestDriver) -> Vec<u8> {
    let mut b = vec![0u8; MEM];
    driver
        .memory()
        .read_slice(&mut b, GuestAddress(GUEST_BASE))
        .expect("copy guest memory");
    b
}

fn changed_pages(a: &[u8], b: &[u8]) -> Vec<u64> {
    a.chunks(PAGE as usize)
        .zip(b.chunks(PAGE as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| GUEST_BASE + i as u64 * PAGE)
        .collect()
}

/// Puts `CHAINS` reads in `queue`'s avail ring (header, data, status: even chains with their
/// data page-aligned, odd ones right after the header, as the kernel's bios come), the data
/// buffers poisoned first; [`kick`] makes them available.
fn post_reads(driver: &TestDriver, queue: usize, first_sector: u64, chains: u16, len: u32) {
    let mut q = driver.queue(queue).expect("queue");
    let mem = driver.memory();
    let (area, _) = q.data_area();
    let stride = u64::from(len) + 2 * PAGE;
    let sectors = u64::from(len) / 512;
    for k in 0..chains {
        let at = area.0 + u64::from(k) * stride;
        let data = if k % 2 == 0 { at + PAGE } else { at + 16 };
        let status = data + u64::from(len);
        let sector = (first_sector + u64::from(k) * sectors) % (DISK / 512 - sectors);
        mem.write_slice(&common::header(VIRTIO_BLK_T_IN, sector), GuestAddress(at))
            .expect("header");
        mem.write_slice(&vec![0xa5; len as usize + 1], GuestAddress(data))
            .expect("poison");
        let d = 3 * k;
        q.write_desc(d, at, 16, VRING_DESC_F_NEXT as u16, d + 1)
            .expect("desc");
        q.write_desc(
            d + 1,
            data,
            len,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            d + 2,
        )
        .expect("desc");
        q.write_desc(d + 2, status, 1, VRING_DESC_F_WRITE as u16, 0)
            .expect("desc");
        q.push(d).expect("push");
    }
}

/// Publishes what [`post_reads`] pushed on `queue` and kicks it.
fn kick(driver: &TestDriver, queue: usize) {
    let mut q = driver.queue(queue).expect("queue");
    q.publish().expect("publish");
    q.kick().expect("kick");
}

/// One round: reads on every queue; the frontend's last copy of guest memory (the log cleared
/// just before, as QEMU syncs it: a bit cleared, then the page copied) while they run; every
/// queue disabled and stopped as `vhost_dev_stop` does; then every page that changed since the
/// copy must be in the log, nothing may change once the stops were answered, and each queue's
/// used index must be the base its stop returned.
fn round(socket: &std::path::Path, n: u32, fe: Frontend) -> Round {
    let mut options = DriverOptions::new(QUEUES, MEM);
    options.queue_size = 128;
    let driver = TestDriver::connect_with(socket, options);
    let log = (!fe.log_while_running).then(|| {
        let log = driver.start_dirty_log().expect("dirty log");
        driver
            .log_vring_addrs(true)
            .expect("SET_VRING_ADDR with logging");
        if fe.mem_table_again {
            driver.resend_mem_table().expect("SET_MEM_TABLE");
        }
        log
    });
    let first = u64::from(n) * 136;
    for q in 0..QUEUES {
        post_reads(&driver, q, first + q as u64 * 4096, CHAINS, READ_LEN);
    }
    // All made available at once, so that the device is busy when memory is copied. Logging
    // started mid-way: half the queues run while the log's messages arrive.
    for q in 0..QUEUES / 2 {
        kick(&driver, q);
    }
    let log = log.unwrap_or_else(|| {
        let log = driver.start_dirty_log().expect("dirty log");
        driver
            .log_vring_addrs(true)
            .expect("SET_VRING_ADDR with logging");
        log
    });
    for q in QUEUES / 2..QUEUES {
        kick(&driver, q);
    }
    // Land the copy at different points of the reads' progress.
    let spin = Duration::from_micros(u64::from(n % 4) * 50);
    let t = Instant::now();
    while t.elapsed() < spin {
        std::hint::spin_loop();
    }
    let used_at_copy: Vec<u16> = (0..QUEUES)
        .map(|q| {
            driver
                .queue(q)
                .expect("queue")
                .device_used_idx()
                .expect("used")
        })
        .collect();
    log.clear();
    let copied = snapshot(&driver);
    for q in 0..QUEUES {
        driver.set_queue_enabled(q, false).expect("disable");
    }
    let bases: Vec<u16> = (0..QUEUES).map(|q| driver.stop_queue(q)).collect();
    let at_stop = snapshot(&driver);
    let mut r = Round {
        unlogged: changed_pages(&copied, &at_stop)
            .into_iter()
            .filter(|&p| !log.dirty(GuestAddress(p)))
            .collect(),
        ..Round::default()
    };
    for q in 0..QUEUES {
        let used = driver
            .queue(q)
            .expect("queue")
            .device_used_idx()
            .expect("used");
        r.completed_after_copy += u64::from(used.wrapping_sub(used_at_copy[q]));
        if used != bases[q] {
            r.used_mismatch.push((q, used, bases[q]));
        }
    }
    std::thread::sleep(Duration::from_millis(5));
    r.after_stop = changed_pages(&at_stop, &snapshot(&driver));
    r
}

fn migration_end_is_logged(engine: Engine, fe: Frontend, rounds: u32) {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    std::fs::write(&image, pattern(29, DISK as usize)).expect("image");
    let disk = raw_disk_with(&image, None, false, test_cache(), engine);
    check_rounds(disk, engine, fe, rounds);
}

/// [`round`] `rounds` times on `disk` (its first `DISK` bytes written), each with a new
/// connection.
fn check_rounds(
    disk: std::sync::Arc<dovetail_backend::Disk>,
    engine: Engine,
    fe: Frontend,
    rounds: u32,
) {
    let server = TestServer::start(disk, QUEUES);
    let mut in_flight = 0;
    for n in 0..rounds {
        let r = round(server.socket(), n, fe);
        assert!(
            r.unlogged.is_empty(),
            "{engine:?} {fe:?}, round {n}: {} guest page(s) changed after the last copy and \
             not in the dirty log (first: {:#x}); {} chain(s) completed after the copy",
            r.unlogged.len(),
            r.unlogged[0],
            r.completed_after_copy
        );
        assert!(
            r.after_stop.is_empty(),
            "{engine:?} {fe:?}, round {n}: {} guest page(s) changed after GET_VRING_BASE was \
             answered (first: {:#x})",
            r.after_stop.len(),
            r.after_stop[0]
        );
        assert!(
            r.used_mismatch.is_empty(),
            "{engine:?} {fe:?}, round {n}: used index differs from the stopped base \
             (queue, used, base): {:?}",
            r.used_mismatch
        );
        in_flight += r.completed_after_copy;
    }
    eprintln!("{engine:?} {fe:?}: {in_flight} read(s) completed after the copy in {rounds} rounds");
    server.stop().expect("serve returned an error");
    // The check means something only if reads were still running when memory was copied.
    assert!(
        in_flight > 0,
        "{engine:?}: no read completed after the copy in {rounds} rounds"
    );
}

const STEADY: Frontend = Frontend {
    log_while_running: false,
    mem_table_again: false,
};
const AS_QEMU: Frontend = Frontend {
    log_while_running: true,
    mem_table_again: false,
};
const MAP_CHANGE: Frontend = Frontend {
    log_while_running: false,
    mem_table_again: true,
};

#[test]
fn io_uring_migration_end_is_logged() {
    migration_end_is_logged(Engine::Auto, STEADY, 4);
    migration_end_is_logged(Engine::Auto, AS_QEMU, 4);
}

#[test]
fn pool_migration_end_is_logged() {
    migration_end_is_logged(Engine::Threads, STEADY, 4);
    migration_end_is_logged(Engine::Threads, AS_QEMU, 4);
}

#[test]
fn worker_migration_end_is_logged() {
    migration_end_is_logged(Engine::Sync, STEADY, 4);
    migration_end_is_logged(Engine::Sync, AS_QEMU, 4);
}

#[test]
fn a_memory_table_sent_while_logging_keeps_the_log() {
    migration_end_is_logged(Engine::Auto, MAP_CHANGE, 4);
}

/// QEMU sends every running ring's addresses again as a migration starts (`VHOST_VRING_F_LOG`
/// on); the device must carry on from its own used index: reloading it from guest memory while
/// a worker adds to the used ring put the index back, and the next entries overwrote ones the
/// guest had seen (a completion lost, or the used index going backwards: stale entries taken
/// for new ones, requests completed twice). Small reads keep the used rings busy while the
/// addresses arrive again and again; every queue must end with every chain completed.
#[test]
fn ring_addresses_sent_to_running_queues_lose_no_completion() {
    const ROUNDS: u32 = 100;
    const SMALL: u32 = 4096;
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    std::fs::write(&image, pattern(29, DISK as usize)).expect("image");
    let disk = raw_disk_with(&image, None, false, test_cache(), Engine::Sync);
    let server = TestServer::start(disk, QUEUES);
    let mut options = DriverOptions::new(QUEUES, MEM);
    options.queue_size = 128;
    let driver = TestDriver::connect_with(server.socket(), options);
    let _log = driver.start_dirty_log().expect("dirty log");
    let mut lost = Vec::new();
    for n in 0..ROUNDS {
        for q in 0..QUEUES {
            post_reads(&driver, q, u64::from(n) * 8 + q as u64 * 64, 42, SMALL);
        }
        for q in 0..QUEUES {
            kick(&driver, q);
        }
        for _ in 0..64 {
            driver.log_vring_addrs(true).expect("SET_VRING_ADDR");
        }
        for q in 0..QUEUES {
            let deadline = Instant::now() + Duration::from_secs(1);
            loop {
                let (used, avail) = {
                    let q = driver.queue(q).expect("queue");
                    (q.device_used_idx().expect("used"), q.next_avail())
                };
                if used == avail {
                    break;
                }
                if Instant::now() > deadline {
                    lost.push((n, q, used, avail));
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        if !lost.is_empty() {
            break;
        }
    }
    assert!(
        lost.is_empty(),
        "chains made available and never seen used after the ring addresses were sent again \
         (round, queue, used index, avail index): {lost:?}"
    );
}

/// The same on a parallax-v1 version of a store opened for direct I/O (`serve --store
/// --cache none`): reads mapped to the store's files go on the queue's io_uring, the rest on
/// its pool (`Engines::submit_mapped`), holes zeroed at submission. (With the default
/// writeback cache, as the VM test serves, a store's reads take the pool, as above.)
#[test]
fn mapped_migration_end_is_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opened = layouts::open(dir.path(), "parallax-v1", DISK, CacheMode::None, true);
    let disk = std::sync::Arc::new(
        dovetail_backend::Disk::new(opened.layout.clone(), false, common::SERIAL)
            .expect("serial fits")
            .with_engine(Engine::Auto),
    );
    {
        // Half written, the rest left a hole (zeroes, no extent).
        let server = TestServer::start(disk.clone(), 1);
        let driver = TestDriver::connect_with(server.socket(), DriverOptions::new(1, 4 << 20));
        let data = pattern(29, DISK as usize);
        let chunk = 1 << 20;
        for (i, c) in data
            .chunks(chunk)
            .take(DISK as usize / 2 / chunk)
            .enumerate()
        {
            driver
                .submit(0, &Req::write((i * chunk / 512) as u64, c))
                .assert_ok(0);
        }
        driver.submit(0, &Req::flush()).assert_ok(0);
        drop(driver);
        server.stop().expect("serve returned an error");
    }
    check_rounds(disk.clone(), Engine::Auto, STEADY, 4);
    check_rounds(disk, Engine::Auto, AS_QEMU, 4);
}

/// The destination of a migration starts its queue on a ring the source stopped in the middle
/// of a pass, its notification state as the source left it: an avail event behind the
/// driver's index (`VIRTIO_RING_F_EVENT_IDX`), or `NO_NOTIFY` set. A driver with nothing
/// outstanding would then never kick again (seen once: the destination guest's reads hung).
/// The queue's first event, with nothing to serve, must turn notifications on for the
/// device's own index.
fn a_queue_started_on_a_left_ring_asks_for_kicks(event_idx: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = raw_disk_with(
        &dir.path().join("disk.img"),
        Some(1 << 20),
        false,
        test_cache(),
        Engine::Sync,
    );
    let server = TestServer::start(disk, 1);
    let mut options = DriverOptions::new(1, 1 << 20);
    options.event_idx = event_idx;
    let driver = TestDriver::connect_with(server.socket(), options);
    for i in 0..5 {
        driver.submit(0, &Req::read(i * 8, 4096)).assert_ok(4096);
    }
    let base = driver.stop_queue(0);
    assert_eq!(base, 5);
    let (flags_at, event_at) = {
        let q = driver.queue(0).expect("queue");
        let (_, _, used) = q.ring_addrs();
        (used, GuestAddress(used.0 + 4 + 8 * u64::from(q.size())))
    };
    let mem = driver.memory();
    // As a device stopped mid-pass leaves them.
    if event_idx {
        mem.write_obj(2u16, event_at).expect("avail event");
    } else {
        mem.write_obj(1u16, flags_at).expect("used flags");
    }
    driver.restart_queue(0, false);
    // QEMU hands the kick eventfd over signalled once.
    driver.queue(0).expect("queue").kick().expect("kick");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let armed = if event_idx {
            mem.read_obj::<u16>(event_at).expect("avail event") == base
        } else {
            mem.read_obj::<u16>(flags_at).expect("used flags") & 1 == 0
        };
        if armed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "event_idx {event_idx}: 2 s after the queue started, the driver is still not asked \
             to kick for its next request"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    driver.submit(0, &Req::read(0, 4096)).assert_ok(4096);
    drop(driver);
    server.stop().expect("serve returned an error");
}

#[test]
fn a_queue_started_on_a_left_ring_asks_for_kicks_with_event_idx() {
    a_queue_started_on_a_left_ring_asks_for_kicks(true);
}

#[test]
fn a_queue_started_on_a_left_ring_asks_for_kicks_without_event_idx() {
    a_queue_started_on_a_left_ring_asks_for_kicks(false);
}
