//! End-to-end tests of the daemon over a real vhost-user socket: an in-process frontend sets up
//! guest memory and split virtqueues, submits virtio-blk requests, and checks the used ring, the
//! status bytes, guest memory and the image file.

mod common;

use common::{
    header, image_bytes, open_raw_disk, pattern, raw_disk, Buf, DriverOptions, RangeSeg, Req,
    TestDriver, TestServer, GUEST_BASE, SERIAL, S_IOERR, S_OK, S_UNSUPP, WRITE_ZEROES_UNMAP,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX as EVENT_IDX;

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

fn bit(n: u32) -> u64 {
    1u64 << n
}

/// Write, read back, flush, GET_ID and config space, with or without EVENT_IDX.
fn io_round_trip(event_idx: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let disk = raw_disk(&image, 8 * MIB, false);
    let server = TestServer::start(disk, 1);
    let driver = TestDriver::connect_with(
        server.socket(),
        DriverOptions {
            event_idx,
            ..DriverOptions::new(1, 16 << 20)
        },
    );

    // Negotiation.
    let offered = driver.device_features();
    for f in [
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        EVENT_IDX,
    ] {
        assert_ne!(offered & bit(f), 0, "feature {f} not offered: {offered:#x}");
    }
    assert_eq!(
        offered & bit(VIRTIO_BLK_F_RO),
        0,
        "writable disk offered RO"
    );
    assert_eq!(driver.acked_features() & bit(EVENT_IDX) != 0, event_idx);

    // Config space.
    let config = driver.blk_config();
    assert_eq!(config.capacity, 8 * MIB / SECTOR);
    assert_eq!(config.num_queues, 1);
    assert_eq!(config.seg_max, 126);
    assert_eq!(config.blk_size, 512);
    // A partial read at an offset returns just those bytes.
    assert_eq!(
        driver.config(0, 8),
        (8 * MIB / SECTOR).to_le_bytes().to_vec()
    );

    // Write 64 KiB at sector 100, then read it back.
    let data = pattern(1, 64 * 1024);
    let c = driver.submit(0, &Req::write(100, &data));
    c.assert_ok(0);
    assert!(c.data.is_empty());
    let c = driver.submit(0, &Req::read(100, data.len() as u32));
    c.assert_ok(data.len() as u32);
    assert!(c.data == data, "read back differs from what was written");
    assert!(
        image_bytes(&image, 100 * SECTOR, data.len()) == data,
        "image file differs from what was written"
    );

    // Framing is free: header and the start of the data share a descriptor, and the data read
    // back shares one with the status byte.
    let other = pattern(2, 8 * 1024);
    let mut first = header(VIRTIO_BLK_T_OUT, 2000);
    first.extend_from_slice(&other[..1000]);
    let c = driver.submit(
        0,
        &[
            Buf::Out(first),
            Buf::Out(other[1000..5000].to_vec()),
            Buf::Out(other[5000..].to_vec()),
            Buf::In(1),
        ],
    );
    c.assert_ok(0);
    let c = driver.submit(
        0,
        &[
            Buf::Out(header(VIRTIO_BLK_T_IN, 2000)),
            Buf::In(3000),
            Buf::In(other.len() as u32 - 3000 + 1),
        ],
    );
    c.assert_ok(other.len() as u32);
    assert!(c.data == other, "split read differs from the split write");
    assert!(image_bytes(&image, 2000 * SECTOR, other.len()) == other);

    // Neighbouring sectors are untouched.
    let c = driver.submit(0, &Req::read(99, 512));
    c.assert_ok(512);
    assert!(c.data.iter().all(|&b| b == 0));

    // Flush.
    let c = driver.submit(0, &Req::flush());
    c.assert_ok(0);

    // GET_ID: the serial, zero-padded to 20 bytes.
    let c = driver.submit(0, &Req::get_id());
    c.assert_ok(20);
    let mut id = SERIAL.as_bytes().to_vec();
    id.resize(20, 0);
    assert_eq!(c.data, id);

    // The device consumed exactly what was made available.
    assert_eq!(driver.stop_queue(0), driver.submitted(0) as u16);
    drop(driver);
    server.stop().expect("serve returns Ok");
}

#[test]
fn write_read_flush_get_id_and_config_with_event_idx() {
    io_round_trip(true);
}

#[test]
fn write_read_flush_get_id_and_config_without_event_idx() {
    io_round_trip(false);
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeroes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let disk = raw_disk(&image, 4 * MIB, false);
    let server = TestServer::start(disk, 1);
    let driver = TestDriver::connect(server.socket(), 1, 16 << 20);

    let config = driver.blk_config();
    assert!(config.max_discard_sectors > 0);
    assert!(config.max_discard_seg > 0);
    assert!(config.max_write_zeroes_sectors > 0);
    assert!(config.max_write_zeroes_seg > 0);
    assert_eq!(config.write_zeroes_may_unmap, 1);
    assert_eq!(config.discard_sector_alignment, 8);

    // Fill the first 1 MiB with non-zero data.
    let fill = vec![0xffu8; MIB as usize];
    driver.submit(0, &Req::write(0, &fill)).assert_ok(0);

    // Zero sectors [8, 16) without unmap, [64, 128) with unmap, discard [512, 1024), and zero
    // two more ranges ([200, 208) and [300, 301)) in one two-segment request.
    let c = driver.submit(0, &Req::write_zeroes(&[RangeSeg::new(8, 8, 0)]));
    c.assert_ok(0);
    let c = driver.submit(
        0,
        &Req::write_zeroes(&[RangeSeg::new(64, 64, WRITE_ZEROES_UNMAP)]),
    );
    c.assert_ok(0);
    let c = driver.submit(0, &Req::discard(&[RangeSeg::new(512, 512, 0)]));
    c.assert_ok(0);
    let c = driver.submit(
        0,
        &Req::write_zeroes(&[RangeSeg::new(200, 8, 0), RangeSeg::new(300, 1, 0)]),
    );
    c.assert_ok(0);

    let zeroed = |sector: u64| {
        (8..16).contains(&sector)
            || (64..128).contains(&sector)
            || (200..208).contains(&sector)
            || sector == 300
            || (512..1024).contains(&sector)
    };
    let check = |what: &str, bytes: &[u8]| {
        for (sector, chunk) in bytes.chunks(SECTOR as usize).enumerate() {
            let want = if zeroed(sector as u64) { 0 } else { 0xff };
            assert!(
                chunk.iter().all(|&b| b == want),
                "{what}: sector {sector} should be all {want:#x}"
            );
        }
    };
    let c = driver.submit(0, &Req::read(0, MIB as u32));
    c.assert_ok(MIB as u32);
    check("read over the protocol", &c.data);
    check("image file", &image_bytes(&image, 0, MIB as usize));

    // A discard segment with flags set is refused and changes nothing.
    let c = driver.submit(0, &Req::discard(&[RangeSeg::new(0, 8, 1)]));
    assert_eq!((c.status, c.used_len), (Some(S_UNSUPP), 1));
    // A write-zeroes whose second segment is out of range is refused as a whole.
    let c = driver.submit(
        0,
        &Req::write_zeroes(&[
            RangeSeg::new(0, 8, 0),
            RangeSeg::new(4 * MIB / SECTOR - 4, 8, 0),
        ]),
    );
    assert_eq!((c.status, c.used_len), (Some(S_IOERR), 1));
    check(
        "image file after refused requests",
        &image_bytes(&image, 0, MIB as usize),
    );

    drop(driver);
    server.stop().expect("serve returns Ok");
}

#[test]
fn two_queues_in_parallel() {
    const PER_QUEUE: u64 = 200;
    const LEN: usize = 4096;
    let sectors_per_req = LEN as u64 / SECTOR;

    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let disk = raw_disk(&image, 8 * MIB, false);
    let server = TestServer::start(disk, 2);
    let driver = TestDriver::connect(server.socket(), 2, 32 << 20);
    assert_eq!(driver.blk_config().num_queues, 2);

    let region = |q: usize| q as u64 * PER_QUEUE * sectors_per_req;
    let data = |q: usize, i: u64| pattern(1000 * q as u64 + i, LEN);

    std::thread::scope(|s| {
        for q in 0..2 {
            let driver = &driver;
            s.spawn(move || {
                let base = region(q);
                // Writes: the first half one at a time, the rest in batches of 20.
                for i in 0..PER_QUEUE / 2 {
                    driver
                        .submit(q, &Req::write(base + i * sectors_per_req, &data(q, i)))
                        .assert_ok(0);
                }
                let batch: Vec<_> = (PER_QUEUE / 2..PER_QUEUE)
                    .map(|i| Req::write(base + i * sectors_per_req, &data(q, i)))
                    .collect();
                for chunk in batch.chunks(20) {
                    for c in driver.submit_batch(q, chunk) {
                        c.assert_ok(0);
                    }
                }
                // Reads, in batches of 25 (the ring holds 85 three-descriptor chains).
                let reads: Vec<_> = (0..PER_QUEUE)
                    .map(|i| Req::read(base + i * sectors_per_req, LEN as u32))
                    .collect();
                let mut i = 0;
                for chunk in reads.chunks(25) {
                    for c in driver.submit_batch(q, chunk) {
                        c.assert_ok(LEN as u32);
                        assert!(
                            c.data == data(q, i),
                            "queue {q}: request {i} read back wrong"
                        );
                        i += 1;
                    }
                }
            });
        }
    });

    assert_eq!(driver.submitted(0), 2 * PER_QUEUE);
    assert_eq!(driver.submitted(1), 2 * PER_QUEUE);
    let file = image_bytes(&image, 0, 2 * PER_QUEUE as usize * LEN);
    for q in 0..2 {
        for i in 0..PER_QUEUE {
            let off = ((region(q) + i * sectors_per_req) * SECTOR) as usize;
            assert!(
                file[off..off + LEN] == data(q, i)[..],
                "image: queue {q} request {i} differs"
            );
        }
    }
    drop(driver);
    server.stop().expect("serve returns Ok");
}

#[test]
fn bad_requests_get_their_status_and_the_queue_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let disk = raw_disk(&image, MIB, false);
    let capacity = MIB / SECTOR;
    let server = TestServer::start(disk, 1);
    let mem_size = 16 << 20;
    let driver = TestDriver::connect(server.socket(), 1, mem_size);
    // Just past the end of guest memory.
    let outside = GUEST_BASE + mem_size as u64 + 4096;

    let good = pattern(7, 4096);
    driver.submit(0, &Req::write(8, &good)).assert_ok(0);

    // Bad and good requests made available together: each gets its own status.
    let results = driver.submit_batch(
        0,
        &[
            // Reaches past the end of the disk.
            Req::read(capacity - 1, 4096),
            // Unknown request type.
            Req::raw(0xff, 0),
            // Starts past the end.
            Req::read(capacity, 512),
            // Sector number that overflows.
            Req::read(u64::MAX, 512),
            // Not a whole number of sectors.
            Req::read(0, 100),
            // Header shorter than 16 bytes.
            vec![Buf::Out(vec![0u8; 8]), Buf::In(1)],
            // IN with device-readable data after the header.
            vec![
                Buf::Out(header(VIRTIO_BLK_T_IN, 0)),
                Buf::Out(vec![0u8; 512]),
                Buf::In(1),
            ],
            // Data buffers outside guest memory, for IN and for OUT.
            vec![
                Buf::Out(header(VIRTIO_BLK_T_IN, 8)),
                Buf::Raw {
                    addr: outside,
                    len: 4096,
                    writable: true,
                },
                Buf::In(1),
            ],
            vec![
                Buf::Out(header(VIRTIO_BLK_T_OUT, 8)),
                Buf::Raw {
                    addr: outside,
                    len: 4096,
                    writable: false,
                },
                Buf::In(1),
            ],
            // A good read after all of them.
            Req::read(8, 4096),
        ],
    );
    let statuses: Vec<_> = results.iter().map(|c| (c.status, c.used_len)).collect();
    assert_eq!(
        statuses,
        vec![
            (Some(S_IOERR), 1),
            (Some(S_UNSUPP), 1),
            (Some(S_IOERR), 1),
            (Some(S_IOERR), 1),
            (Some(S_IOERR), 1),
            (Some(S_UNSUPP), 1),
            (Some(S_UNSUPP), 1),
            (Some(S_IOERR), 1),
            (Some(S_IOERR), 1),
            (Some(S_OK), 4097),
        ]
    );
    assert!(results[9].data == good, "sector 8 changed");

    // A chain whose status byte lies outside guest memory cannot be answered: it is completed
    // with a used length of 0, and the queue goes on.
    let c = driver.submit(
        0,
        &[
            Buf::Out(header(VIRTIO_BLK_T_IN, 8)),
            Buf::In(512),
            Buf::Raw {
                addr: outside,
                len: 1,
                writable: true,
            },
        ],
    );
    assert_eq!(c.used_len, 0);
    // And one with no device-writable buffer at all.
    let c = driver.submit(0, &[Buf::Out(header(VIRTIO_BLK_T_IN, 8))]);
    assert_eq!((c.status, c.used_len), (None, 0));

    // A write past the end fails and leaves the image as it was.
    let before = std::fs::read(&image).expect("read image");
    let c = driver.submit(0, &Req::write(capacity - 4, &pattern(8, 4096)));
    assert_eq!((c.status, c.used_len), (Some(S_IOERR), 1));
    let after = std::fs::read(&image).expect("read image");
    assert_eq!(after.len(), MIB as usize, "image size changed");
    assert!(before == after, "a refused write changed the image");

    // The queue still serves good requests one at a time.
    let last = pattern(9, 4096);
    driver
        .submit(0, &Req::write(capacity - 8, &last))
        .assert_ok(0);
    let c = driver.submit(0, &Req::read(capacity - 8, 4096));
    c.assert_ok(4096);
    assert!(c.data == last);
    assert!(image_bytes(&image, (capacity - 8) * SECTOR, 4096) == last);

    drop(driver);
    server.stop().expect("serve returns Ok");
}

#[test]
fn serves_a_second_frontend_after_the_first_disconnects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let disk = raw_disk(&image, 4 * MIB, false);
    let server = TestServer::start(disk, 1);

    let data = pattern(11, 32 * 1024);
    {
        let first = TestDriver::connect(server.socket(), 1, 16 << 20);
        first.submit(0, &Req::write(40, &data)).assert_ok(0);
        first.submit(0, &Req::flush()).assert_ok(0);
        assert_eq!(first.stop_queue(0), 2);
        // Dropping the driver closes the socket.
    }

    // The second frontend negotiates differently (no EVENT_IDX) and starts its ring from zero.
    let second = TestDriver::connect_with(
        server.socket(),
        DriverOptions {
            event_idx: false,
            ..DriverOptions::new(1, 16 << 20)
        },
    );
    assert_eq!(second.acked_features() & bit(EVENT_IDX), 0);
    let c = second.submit(0, &Req::read(40, data.len() as u32));
    c.assert_ok(data.len() as u32);
    assert!(c.data == data, "second frontend read different data");
    let more = pattern(12, 4096);
    second.submit(0, &Req::write(0, &more)).assert_ok(0);
    drop(second);

    // And a third, with EVENT_IDX again, sees both writes.
    let third = TestDriver::connect(server.socket(), 1, 16 << 20);
    let c = third.submit(0, &Req::read(0, 4096));
    c.assert_ok(4096);
    assert!(c.data == more);
    assert!(image_bytes(&image, 40 * SECTOR, data.len()) == data);

    // Stopping the daemon while a frontend is still connected disconnects it and returns Ok.
    server.stop().expect("serve returns Ok");
    drop(third);
}

#[test]
fn queue_restarts_within_one_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let disk = raw_disk(&image, 4 * MIB, false);
    let server = TestServer::start(disk, 1);
    let driver = TestDriver::connect(server.socket(), 1, 16 << 20);

    let a = pattern(31, 4096);
    driver.submit(0, &Req::write(0, &a)).assert_ok(0);
    assert_eq!(driver.stop_queue(0), 1);

    // Resume where the rings left off (as after a paused guest continues).
    driver.restart_queue(0, false);
    let b = pattern(32, 4096);
    driver.submit(0, &Req::write(8, &b)).assert_ok(0);
    let c = driver.submit(0, &Req::read(0, 4096));
    c.assert_ok(4096);
    assert!(c.data == a);
    assert_eq!(driver.stop_queue(0), 3);

    // Start again from zeroed rings (as after the guest driver reloads).
    driver.restart_queue(0, true);
    let c = driver.submit(0, &Req::read(8, 4096));
    c.assert_ok(4096);
    assert!(c.data == b);
    assert_eq!(driver.stop_queue(0), 1);

    drop(driver);
    server.stop().expect("serve returns Ok");
}

/// A call eventfd set on a started queue is signalled at once (as libvhost-user does, and as
/// QEMU's vhost-user-blk qtest waits for), so a completion signalled on the old fd while the
/// frontend switched fds is never lost; a stopped queue's new call fd is not signalled.
#[test]
fn a_call_fd_set_on_a_started_queue_is_signalled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = raw_disk(&dir.path().join("disk.img"), 4 * MIB, false);
    let server = TestServer::start(disk, 1);
    let driver = TestDriver::connect(server.socket(), 1, 16 << 20);
    let wait = std::time::Duration::from_secs(2);

    let a = pattern(41, 4096);
    driver.submit(0, &Req::write(0, &a)).assert_ok(0);
    // Nothing is in flight: the signal comes from the switch alone, each time.
    assert!(driver.replace_call(0, wait).expect("SET_VRING_CALL"));
    assert!(driver.replace_call(0, wait).expect("SET_VRING_CALL"));
    // Completions arrive on the new fd.
    let c = driver.submit(0, &Req::read(0, 4096));
    c.assert_ok(4096);
    assert!(c.data == a);

    // A stopped queue gets no signal; started again, it serves.
    assert_eq!(driver.stop_queue(0), 2);
    let idle = std::time::Duration::from_millis(200);
    assert!(!driver.replace_call(0, idle).expect("SET_VRING_CALL"));
    driver.restart_queue(0, false);
    let c = driver.submit(0, &Req::read(0, 4096));
    c.assert_ok(4096);
    assert!(c.data == a);

    drop(driver);
    server.stop().expect("serve returns Ok");
}

#[test]
fn read_only_disk_refuses_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let contents = pattern(21, MIB as usize);
    std::fs::write(&image, &contents).expect("write image");
    let disk = open_raw_disk(&image, true);
    let server = TestServer::start(disk, 1);
    let driver = TestDriver::connect(server.socket(), 1, 16 << 20);

    let offered = driver.device_features();
    assert_ne!(
        offered & bit(VIRTIO_BLK_F_RO),
        0,
        "RO not offered: {offered:#x}"
    );
    assert_eq!(offered & bit(VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(offered & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);

    let c = driver.submit(0, &Req::write(0, &pattern(22, 4096)));
    assert_eq!((c.status, c.used_len), (Some(S_IOERR), 1));
    let c = driver.submit(0, &Req::write_zeroes(&[RangeSeg::new(0, 8, 0)]));
    assert_eq!((c.status, c.used_len), (Some(S_UNSUPP), 1));
    let c = driver.submit(0, &Req::discard(&[RangeSeg::new(0, 8, 0)]));
    assert_eq!((c.status, c.used_len), (Some(S_UNSUPP), 1));

    // Reads and flushes still work.
    let c = driver.submit(0, &Req::read(0, 8192));
    c.assert_ok(8192);
    assert!(c.data[..] == contents[..8192]);
    driver.submit(0, &Req::flush()).assert_ok(0);

    assert!(
        std::fs::read(&image).expect("read image") == contents,
        "read-only image changed"
    );
    drop(driver);
    server.stop().expect("serve returns Ok");
}

/// A served parallax-v2 disk whose data blocks were destroyed on the store: the guest's read of
/// such a block gets `VIRTIO_BLK_S_IOERR`, not zeros; unwritten and rewritten blocks read fine.
#[test]
fn a_destroyed_parallax_v2_block_reads_as_ioerr() {
    use dovetail_backend::Disk;
    use dovetail_layout::parallax::{Class, Parallax, ParallaxOptions};
    use dovetail_layout::{BlockLayout, Sector, Sectors};
    use dovetail_store::mem::{MemPool, MemSpace};
    use dovetail_store::{VersionKey, VersionSpace};
    use std::sync::Arc;

    let extent = 256u64 << 10;
    let space = Arc::new(MemSpace::new(MemPool::new(256), VersionKey(1), extent));
    let opts = ParallaxOptions {
        persist_every: None,
        ..ParallaxOptions::default()
    };
    let layout = Parallax::create_layout(
        space.clone(),
        "parallax-v2",
        Sectors(8 * MIB / SECTOR),
        opts,
    )
    .expect("create parallax-v2");
    let data = vec![0xabu8; MIB as usize];
    layout.write(Sector(0), &data).expect("write");
    layout.flush().expect("flush");
    for g in layout.extent_groups() {
        if g.class != Class::Meta {
            for &e in &g.members {
                space
                    .write(e, 0, &vec![0u8; extent as usize])
                    .expect("destroy");
            }
        }
    }
    layout
        .write(Sector(8), &[0xcd; 4096])
        .expect("rewrite block 1");
    let disk = Arc::new(Disk::new(Arc::new(layout), false, SERIAL).expect("serial fits"));
    let server = TestServer::start(disk, 1);
    let driver = TestDriver::connect_with(server.socket(), DriverOptions::new(1, 16 << 20));
    let c = driver.submit(0, &Req::read(0, 4096));
    assert_eq!(c.status, Some(S_IOERR), "destroyed block 0");
    let c = driver.submit(0, &Req::read(16, 8192));
    assert_eq!(c.status, Some(S_IOERR), "destroyed blocks 2 and 3");
    let c = driver.submit(0, &Req::read(8, 4096));
    c.assert_ok(4096);
    assert!(c.data.iter().all(|&b| b == 0xcd), "rewritten block 1");
    let c = driver.submit(0, &Req::read(4 * MIB / SECTOR, 4096));
    c.assert_ok(4096);
    assert!(c.data.iter().all(|&b| b == 0), "unwritten block");
    drop(driver);
    server.stop().expect("serve returns Ok");
}
