//! Dirty-page logging for live migration: a frontend that starts the log as QEMU does
//! (`SET_LOG_BASE` with a shared file, `VHOST_F_LOG_ALL` acked) finds every guest page a read
//! filled marked, whichever engine carried the read out (io_uring, the pool, the worker
//! itself), though the data lands in guest memory outside vm-memory's accessors.

mod common;

use common::{pattern, raw_disk_with, test_cache, DriverOptions, Req, TestDriver, TestServer};
use dovetail_backend::disk::Engine;
use vm_memory::GuestAddress;

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
