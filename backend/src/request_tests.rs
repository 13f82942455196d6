//! Request parsing and execution, driven through virtio-queue's `MockSplitQueue`.
//!
//! Every well-formed case runs against every layout; every malformed case runs against a layout
//! whose methods are `unreachable!()`, which proves validation rejects it before any I/O.

use std::sync::Arc;

use dovetail_layout::raw::RawOptions;
use dovetail_layout::{BlockLayout, MemLayout, RawLayout, Sector, Sectors};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::disk::Disk;

const MEM_SIZE: usize = 0x200_0000; // 32 MiB
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x1f0_0000;
const DISK_SECTORS: u64 = 2048; // 1 MiB

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// A layout that must never be reached.
#[derive(Debug)]
struct Unreachable;

impl BlockLayout for Unreachable {
    fn capacity(&self) -> Sectors {
        Sectors(DISK_SECTORS)
    }
    fn read(&self, _: Sector, _: &mut [u8]) -> dovetail_layout::Result<()> {
        unreachable!("validation must reject this request before reading")
    }
    fn write(&self, _: Sector, _: &[u8]) -> dovetail_layout::Result<()> {
        unreachable!("validation must reject this request before writing")
    }
    fn flush(&self) -> dovetail_layout::Result<()> {
        unreachable!("validation must reject this request before flushing")
    }
    fn discard(&self, _: Sector, _: Sectors) -> dovetail_layout::Result<()> {
        unreachable!("validation must reject this request before discarding")
    }
    fn write_zeroes(&self, _: Sector, _: Sectors, _: bool) -> dovetail_layout::Result<()> {
        unreachable!("validation must reject this request before zeroing")
    }
}

/// A disk under test plus whatever keeps its backing alive.
struct TestDisk {
    name: &'static str,
    disk: Disk,
    layout: Arc<dyn BlockLayout>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDisk {
    /// The whole disk, read through the layout.
    fn contents(&self) -> Vec<u8> {
        let mut v = vec![0u8; (DISK_SECTORS * 512) as usize];
        self.layout.read(Sector(0), &mut v).expect("read back");
        v
    }

    /// The raw image file's bytes, when the disk has one.
    fn file_bytes(&self) -> Option<Vec<u8>> {
        self.layout_path()
            .map(|p| std::fs::read(p).expect("read image file"))
    }

    fn layout_path(&self) -> Option<std::path::PathBuf> {
        self._dir.as_ref().map(|d| d.path().join("disk.img"))
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Every layout the well-formed tests run against, pre-filled with a known pattern.
fn all_disks(read_only: bool) -> Vec<TestDisk> {
    let fill = pattern((DISK_SECTORS * 512) as usize, 7);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    std::fs::write(&path, &fill).expect("write image");
    let raw: Arc<dyn BlockLayout> = Arc::new(
        RawLayout::open(
            &path,
            RawOptions {
                create_size: None,
                read_only,
                cache: None,
            },
        )
        .expect("open raw"),
    );
    let mem = Arc::new(MemLayout::new(Sectors(DISK_SECTORS)));
    mem.write(Sector(0), &fill).expect("fill mem");
    let mem: Arc<dyn BlockLayout> = mem;
    vec![
        TestDisk {
            name: "raw",
            disk: Disk::new(raw.clone(), read_only, "test-serial").expect("disk"),
            layout: raw,
            _dir: Some(dir),
        },
        TestDisk {
            name: "mem",
            disk: Disk::new(mem.clone(), read_only, "test-serial").expect("disk"),
            layout: mem,
            _dir: None,
        },
    ]
}

fn unreachable_disk(read_only: bool) -> Disk {
    Disk::new(Arc::new(Unreachable), read_only, "x").expect("disk")
}

fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

fn header(req_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

fn seg(sector: u64, num: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

fn rd(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
}

fn wr(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        addr,
        len,
        VRING_DESC_F_WRITE as u16,
        0,
    ))
}

/// Builds a chain from `descs` in a fresh queue and runs it through a worker.
fn run(disk: &Disk, mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Completion {
    // Poison the status byte so a test can tell whether it was written.
    mem.write_obj(0xaau8, GuestAddress(STATUS)).expect("poison");
    let vq = MockSplitQueue::new(mem, 256);
    let chain = vq.build_desc_chain(descs).expect("chain");
    RequestWorker::new().process(disk, mem, chain, 0)
}

fn status_at(mem: &GuestMemoryMmap, addr: u64) -> u8 {
    mem.read_obj(GuestAddress(addr)).expect("status")
}

#[test]
fn read_returns_disk_bytes() {
    for t in all_disks(false) {
        let mem = guest_mem();
        mem.write_slice(&header(VIRTIO_BLK_T_IN, 8), GuestAddress(HDR))
            .expect("hdr");
        let c = run(&t.disk, &mem, &[rd(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)]);
        assert_eq!(
            c,
            Completion {
                used_len: 4097,
                status: Some(OK),
                op: ReqOp::Read,
                bytes: 4096,
            },
            "{}",
            t.name
        );
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(DATA)).expect("data");
        assert_eq!(got, t.contents()[4096..8192], "{}", t.name);
    }
}

#[test]
fn write_with_any_framing_lands_on_disk() {
    for t in all_disks(false) {
        let mem = guest_mem();
        let data = pattern(8192, 99);
        // Header and the first 512 data bytes share one descriptor; the rest is split unevenly.
        let mut first = header(VIRTIO_BLK_T_OUT, 16).to_vec();
        first.extend_from_slice(&data[..512]);
        mem.write_slice(&first, GuestAddress(HDR)).expect("hdr");
        mem.write_slice(&data[512..3000], GuestAddress(DATA))
            .expect("d1");
        mem.write_slice(&data[3000..], GuestAddress(DATA + 0x10000))
            .expect("d2");
        let c = run(
            &t.disk,
            &mem,
            &[
                rd(HDR, 16 + 512),
                rd(DATA, 3000 - 512),
                rd(DATA + 0x10000, 8192 - 3000),
                wr(STATUS, 1),
            ],
        );
        assert_eq!(
            c,
            Completion {
                used_len: 1,
                status: Some(OK),
                op: ReqOp::Write,
                bytes: 8192,
            },
            "{}",
            t.name
        );
        let after = t.contents();
        assert_eq!(after[8192..16384], data[..], "{}", t.name);
        if let Some(file) = t.file_bytes() {
            assert_eq!(file[8192..16384], data[..], "image file");
        }
    }
}

#[test]
fn status_byte_may_share_a_descriptor_with_read_data() {
    for t in all_disks(false) {
        let mem = guest_mem();
        mem.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
            .expect("hdr");
        let c = run(&t.disk, &mem, &[rd(HDR, 16), wr(DATA, 513)]);
        assert_eq!(
            c,
            Completion {
                used_len: 513,
                status: Some(OK),
                op: ReqOp::Read,
                bytes: 512,
            },
            "{}",
            t.name
        );
        assert_eq!(status_at(&mem, DATA + 512), OK);
        let mut got = vec![0u8; 512];
        mem.read_slice(&mut got, GuestAddress(DATA)).expect("data");
        assert_eq!(got, t.contents()[..512], "{}", t.name);
    }
}

#[test]
fn flush_succeeds() {
    for t in all_disks(false) {
        let mem = guest_mem();
        mem.write_slice(&header(VIRTIO_BLK_T_FLUSH, 0), GuestAddress(HDR))
            .expect("hdr");
        let c = run(&t.disk, &mem, &[rd(HDR, 16), wr(STATUS, 1)]);
        assert_eq!(
            c,
            Completion {
                used_len: 1,
                status: Some(OK),
                op: ReqOp::Flush,
                bytes: 0,
            },
            "{}",
            t.name
        );
    }
}

#[test]
fn get_id_returns_the_serial() {
    for t in all_disks(false) {
        let mem = guest_mem();
        mem.write_slice(&header(VIRTIO_BLK_T_GET_ID, 0), GuestAddress(HDR))
            .expect("hdr");
        mem.write_slice(&[0xee; 20], GuestAddress(DATA))
            .expect("poison");
        let c = run(&t.disk, &mem, &[rd(HDR, 16), wr(DATA, 20), wr(STATUS, 1)]);
        assert_eq!(
            c,
            Completion {
                used_len: 21,
                status: Some(OK),
                op: ReqOp::GetId,
                bytes: 0,
            },
            "{}",
            t.name
        );
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).expect("id");
        assert_eq!(&id[..11], b"test-serial");
        assert!(id[11..].iter().all(|&b| b == 0), "zero padded: {id:?}");

        // A shorter buffer gets a truncated serial.
        let c = run(&t.disk, &mem, &[rd(HDR, 16), wr(DATA, 4), wr(STATUS, 1)]);
        assert_eq!(
            c,
            Completion {
                used_len: 5,
                status: Some(OK),
                op: ReqOp::GetId,
                bytes: 0,
            }
        );
    }
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeroes() {
    for t in all_disks(false) {
        for (req, flags) in [
            (VIRTIO_BLK_T_DISCARD, 0),
            (VIRTIO_BLK_T_WRITE_ZEROES, 0),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            ),
        ] {
            // Refill, then zero two segments in one request.
            t.layout
                .write(Sector(0), &pattern((DISK_SECTORS * 512) as usize, 3))
                .expect("refill");
            let mem = guest_mem();
            let mut payload = header(req, 0).to_vec();
            payload.extend_from_slice(&seg(8, 8, flags));
            payload.extend_from_slice(&seg(1024, 64, flags));
            mem.write_slice(&payload, GuestAddress(HDR)).expect("req");
            let c = run(&t.disk, &mem, &[rd(HDR, 48), wr(STATUS, 1)]);
            assert_eq!(
                c,
                Completion {
                    used_len: 1,
                    status: Some(OK),
                    op: if req == VIRTIO_BLK_T_DISCARD {
                        ReqOp::Discard
                    } else {
                        ReqOp::WriteZeroes
                    },
                    bytes: (8 + 64) * 512,
                },
                "{} req {req} flags {flags}",
                t.name
            );
            let after = t.contents();
            let before = pattern((DISK_SECTORS * 512) as usize, 3);
            assert_eq!(after[..4096], before[..4096]);
            assert!(
                after[4096..8192].iter().all(|&b| b == 0),
                "{} {req}",
                t.name
            );
            assert_eq!(after[8192..524288], before[8192..524288]);
            assert!(after[524288..557056].iter().all(|&b| b == 0));
            assert_eq!(after[557056..], before[557056..]);
        }
    }
}

#[test]
fn unknown_request_types_are_unsupported() {
    for t in all_disks(false) {
        for req in [
            VIRTIO_BLK_T_SCSI_CMD,
            VIRTIO_BLK_T_SECURE_ERASE,
            VIRTIO_BLK_T_ZONE_REPORT,
            0xdead,
        ] {
            let mem = guest_mem();
            mem.write_slice(&header(req, 0), GuestAddress(HDR))
                .expect("hdr");
            let c = run(&t.disk, &mem, &[rd(HDR, 16), wr(STATUS, 1)]);
            assert_eq!(
                c,
                Completion {
                    used_len: 1,
                    status: Some(UNSUPP),
                    op: ReqOp::Unsupported,
                    bytes: 0,
                },
                "{}",
                t.name
            );
        }
    }
}

/// Writes `hdr` (plus `extra`) at HDR and expects `status` without any layout call.
fn rejected(read_only: bool, hdr: [u8; 16], extra: &[u8], descs: &[RawDescriptor], status: u8) {
    let disk = unreachable_disk(read_only);
    let mem = guest_mem();
    let mut bytes = hdr.to_vec();
    bytes.extend_from_slice(extra);
    mem.write_slice(&bytes, GuestAddress(HDR)).expect("hdr");
    let c = run(&disk, &mem, descs);
    assert_eq!(c.status, Some(status), "status for {descs:?}");
    assert_eq!(c.used_len, 1, "used length");
    assert_eq!(status_at(&mem, STATUS), status);
}

#[test]
fn out_of_range_and_overflowing_sectors_are_io_errors() {
    let descs = [rd(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)];
    for sector in [
        DISK_SECTORS,
        DISK_SECTORS - 7,
        u64::MAX,
        u64::MAX / 512,
        1 << 55,
    ] {
        rejected(false, header(VIRTIO_BLK_T_IN, sector), &[], &descs, IOERR);
    }
    let descs = [rd(HDR, 16), rd(DATA, 4096), wr(STATUS, 1)];
    for sector in [DISK_SECTORS, u64::MAX - 3] {
        rejected(false, header(VIRTIO_BLK_T_OUT, sector), &[], &descs, IOERR);
    }
}

#[test]
fn the_last_sector_is_readable() {
    for t in all_disks(false) {
        let mem = guest_mem();
        mem.write_slice(
            &header(VIRTIO_BLK_T_IN, DISK_SECTORS - 1),
            GuestAddress(HDR),
        )
        .expect("hdr");
        let c = run(&t.disk, &mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
        assert_eq!(
            c,
            Completion {
                used_len: 513,
                status: Some(OK),
                op: ReqOp::Read,
                bytes: 512,
            },
            "{}",
            t.name
        );
    }
}

#[test]
fn missing_status_descriptor_is_dropped_without_writing() {
    let disk = unreachable_disk(false);
    let mem = guest_mem();
    mem.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
        .expect("hdr");
    // No device-writable descriptor at all.
    let c = run(&disk, &mem, &[rd(HDR, 16), rd(DATA, 512)]);
    assert_eq!(
        c,
        Completion {
            used_len: 0,
            status: None,
            op: ReqOp::Unsupported,
            bytes: 0,
        }
    );
    // A zero-length "status" descriptor.
    let c = run(&disk, &mem, &[rd(HDR, 16), wr(STATUS, 0)]);
    assert_eq!(
        c,
        Completion {
            used_len: 0,
            status: None,
            op: ReqOp::Unsupported,
            bytes: 0,
        }
    );
    assert_eq!(status_at(&mem, STATUS), 0xaa, "nothing written");
}

#[test]
fn short_header_is_unsupported() {
    rejected(
        false,
        header(VIRTIO_BLK_T_IN, 0),
        &[],
        &[rd(HDR, 8), wr(STATUS, 1)],
        UNSUPP,
    );
    rejected(
        false,
        header(VIRTIO_BLK_T_IN, 0),
        &[],
        &[wr(STATUS, 1)],
        UNSUPP,
    );
}

#[test]
fn wrong_descriptor_directions_are_unsupported() {
    // IN whose data buffer is device-readable.
    rejected(
        false,
        header(VIRTIO_BLK_T_IN, 0),
        &[],
        &[rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)],
        UNSUPP,
    );
    // OUT whose data buffer is device-writable.
    rejected(
        false,
        header(VIRTIO_BLK_T_OUT, 0),
        &[],
        &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)],
        UNSUPP,
    );
    // A device-readable descriptor after a device-writable one.
    rejected(
        false,
        header(VIRTIO_BLK_T_OUT, 0),
        &[],
        &[
            rd(HDR, 16),
            wr(DATA, 512),
            rd(DATA + 4096, 512),
            wr(STATUS, 1),
        ],
        UNSUPP,
    );
    // DISCARD with a device-writable data buffer.
    rejected(
        false,
        header(VIRTIO_BLK_T_DISCARD, 0),
        &seg(0, 8, 0),
        &[rd(HDR, 32), wr(DATA, 16), wr(STATUS, 1)],
        UNSUPP,
    );
}

#[test]
fn zero_length_oversized_and_unaligned_transfers_are_refused() {
    for req in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        let data = |len| {
            if req == VIRTIO_BLK_T_IN {
                wr(DATA, len)
            } else {
                rd(DATA, len)
            }
        };
        rejected(
            false,
            header(req, 0),
            &[],
            &[rd(HDR, 16), wr(STATUS, 1)],
            UNSUPP,
        );
        rejected(
            false,
            header(req, 0),
            &[],
            &[
                rd(HDR, 16),
                data(MAX_REQUEST_BYTES as u32 + 512),
                wr(STATUS, 1),
            ],
            UNSUPP,
        );
        rejected(
            false,
            header(req, 0),
            &[],
            &[rd(HDR, 16), data(1000), wr(STATUS, 1)],
            IOERR,
        );
    }
}

#[test]
fn bad_discard_and_write_zeroes_are_refused() {
    for req in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let one = [rd(HDR, 32), wr(STATUS, 1)];
        // Reserved flags (UNMAP is reserved for DISCARD).
        let bad_flags = if req == VIRTIO_BLK_T_DISCARD { 1 } else { 2 };
        rejected(false, header(req, 0), &seg(0, 8, bad_flags), &one, UNSUPP);
        rejected(false, header(req, 0), &seg(0, 8, 0x8000_0000), &one, UNSUPP);
        // The QEMU test's num_sectors = 0xffffffff.
        rejected(false, header(req, 0), &seg(0, u32::MAX, 0), &one, IOERR);
        // Past the end, and overflowing.
        rejected(
            false,
            header(req, 0),
            &seg(DISK_SECTORS - 4, 8, 0),
            &one,
            IOERR,
        );
        rejected(false, header(req, 0), &seg(u64::MAX - 2, 8, 0), &one, IOERR);
        // Payload not a multiple of 16, or empty.
        rejected(
            false,
            header(req, 0),
            &seg(0, 8, 0),
            &[rd(HDR, 31), wr(STATUS, 1)],
            UNSUPP,
        );
        rejected(
            false,
            header(req, 0),
            &[],
            &[rd(HDR, 16), wr(STATUS, 1)],
            UNSUPP,
        );
        // Too many segments.
        let many: Vec<u8> = (0..MAX_DISCARD_SEGS as u64 + 1)
            .flat_map(|i| seg(i * 8, 8, 0))
            .collect();
        let len = 16 + many.len() as u32;
        rejected(
            false,
            header(req, 0),
            &many,
            &[rd(HDR, len), wr(STATUS, 1)],
            UNSUPP,
        );
        // A good first segment and a bad second one: nothing is applied (the layout is
        // unreachable, so applying the first would panic).
        let mut two = seg(0, 8, 0).to_vec();
        two.extend_from_slice(&seg(DISK_SECTORS, 8, 0));
        rejected(
            false,
            header(req, 0),
            &two,
            &[rd(HDR, 48), wr(STATUS, 1)],
            IOERR,
        );
    }
}

#[test]
fn read_only_disk_refuses_writes_and_keeps_its_bytes() {
    for t in all_disks(true) {
        let before = t.contents();
        let file_before = t.file_bytes();
        let mem = guest_mem();
        let mut bytes = header(VIRTIO_BLK_T_OUT, 0).to_vec();
        bytes.extend_from_slice(&[0x55; 512]);
        mem.write_slice(&bytes, GuestAddress(HDR)).expect("req");
        let c = run(&t.disk, &mem, &[rd(HDR, 16 + 512), wr(STATUS, 1)]);
        assert_eq!(
            c,
            Completion {
                used_len: 1,
                status: Some(IOERR),
                op: ReqOp::Write,
                bytes: 0,
            },
            "{}",
            t.name
        );
        for req in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            let mut bytes = header(req, 0).to_vec();
            bytes.extend_from_slice(&seg(0, 8, 0));
            mem.write_slice(&bytes, GuestAddress(HDR)).expect("req");
            let c = run(&t.disk, &mem, &[rd(HDR, 32), wr(STATUS, 1)]);
            assert_eq!(
                c,
                Completion {
                    used_len: 1,
                    status: Some(UNSUPP),
                    op: if req == VIRTIO_BLK_T_DISCARD {
                        ReqOp::Discard
                    } else {
                        ReqOp::WriteZeroes
                    },
                    bytes: 0,
                },
                "{}",
                t.name
            );
        }
        assert_eq!(t.contents(), before, "{}", t.name);
        assert_eq!(t.file_bytes(), file_before, "{}", t.name);
        // Reads still work.
        mem.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
            .expect("hdr");
        let c = run(&t.disk, &mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
        assert_eq!(
            c,
            Completion {
                used_len: 513,
                status: Some(OK),
                op: ReqOp::Read,
                bytes: 512,
            },
            "{}",
            t.name
        );
    }
}

#[test]
fn buffers_outside_guest_memory_are_io_errors() {
    for t in all_disks(false) {
        let before = t.contents();
        let outside = MEM_SIZE as u64 + 0x1000;
        let mem = guest_mem();
        // OUT whose data lies outside guest memory: nothing is written.
        mem.write_slice(&header(VIRTIO_BLK_T_OUT, 0), GuestAddress(HDR))
            .expect("hdr");
        let c = run(
            &t.disk,
            &mem,
            &[rd(HDR, 16), rd(outside, 512), wr(STATUS, 1)],
        );
        assert_eq!(
            c,
            Completion {
                used_len: 1,
                status: Some(IOERR),
                op: ReqOp::Write,
                bytes: 0,
            },
            "{}",
            t.name
        );
        assert_eq!(t.contents(), before);
        // IN into memory that does not exist.
        mem.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
            .expect("hdr");
        let c = run(
            &t.disk,
            &mem,
            &[rd(HDR, 16), wr(outside, 512), wr(STATUS, 1)],
        );
        assert_eq!(
            c,
            Completion {
                used_len: 1,
                status: Some(IOERR),
                op: ReqOp::Read,
                bytes: 0,
            },
            "{}",
            t.name
        );
        // A status byte outside guest memory: the request cannot be answered, so it is not
        // carried out either.
        let none = Completion {
            used_len: 0,
            status: None,
            op: ReqOp::Unsupported,
            bytes: 0,
        };
        let c = run(&t.disk, &mem, &[rd(HDR, 16), wr(DATA, 512), wr(outside, 1)]);
        assert_eq!(c, none, "{}", t.name);
        mem.write_slice(&header(VIRTIO_BLK_T_OUT, 0), GuestAddress(HDR))
            .expect("hdr");
        mem.write_slice(&[0x5a; 512], GuestAddress(DATA))
            .expect("data");
        let c = run(&t.disk, &mem, &[rd(HDR, 16), rd(DATA, 512), wr(outside, 1)]);
        assert_eq!(c, none, "{}", t.name);
        assert_eq!(t.contents(), before, "{}: nothing written", t.name);
        mem.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
            .expect("hdr");
        // Header outside guest memory.
        let c = run(&t.disk, &mem, &[rd(outside, 16), wr(STATUS, 1)]);
        assert_eq!(
            c,
            Completion {
                used_len: 1,
                status: Some(IOERR),
                op: ReqOp::Unsupported,
                bytes: 0,
            },
            "{}",
            t.name
        );
    }
}

#[test]
fn indirect_chains_are_followed() {
    for t in all_disks(false) {
        let mem = guest_mem();
        let vq = MockSplitQueue::new(&mem, 16);
        mem.write_slice(&header(VIRTIO_BLK_T_IN, 4), GuestAddress(HDR))
            .expect("hdr");
        // An indirect table of three descriptors at 0x80_0000.
        let table = 0x80_0000u64;
        let entries = [
            SplitDescriptor::new(HDR, 16, 1, 1),
            SplitDescriptor::new(DATA, 1024, 1 | VRING_DESC_F_WRITE as u16, 2),
            SplitDescriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, d) in entries.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(table + 16 * i as u64))
                .expect("indirect entry");
        }
        let head = RawDescriptor::from(SplitDescriptor::new(
            table,
            48,
            virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        let chain = vq.build_desc_chain(&[head]).expect("chain");
        let c = RequestWorker::new().process(&t.disk, &mem, chain, 0);
        assert_eq!(
            c,
            Completion {
                used_len: 1025,
                status: Some(OK),
                op: ReqOp::Read,
                bytes: 1024,
            },
            "{}",
            t.name
        );
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(DATA)).expect("data");
        assert_eq!(got, t.contents()[2048..3072]);
    }
}

#[test]
fn worker_buffers_are_reused_across_requests() {
    // raw transfers straight to guest memory; mem goes through the bounce buffer.
    for t in all_disks(false) {
        let mem = guest_mem();
        let mut w = RequestWorker::new();
        let vq = MockSplitQueue::new(&mem, 16);
        mem.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
            .expect("hdr");
        let big = [
            rd(HDR, 16),
            wr(DATA, 32768),
            wr(DATA + 65536, 32768),
            wr(STATUS, 1),
        ];
        let chain = vq.build_desc_chain(&big).expect("chain");
        assert_eq!(w.process(&t.disk, &mem, chain, 0).status, Some(OK));
        let before = (
            w.bounce.capacity(),
            w.bounce.as_ptr(),
            w.iobufs.capacity(),
            w.iobufs.as_ptr(),
        );
        assert!(before.2 >= 2, "{}: two guest buffers resolved", t.name);
        assert_eq!(before.0 == 0, t.name == "raw", "{}: bounce use", t.name);
        let small = [rd(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)];
        let chain = vq.build_desc_chain(&small).expect("chain");
        assert_eq!(w.process(&t.disk, &mem, chain, 0).status, Some(OK));
        let after = (
            w.bounce.capacity(),
            w.bounce.as_ptr(),
            w.iobufs.capacity(),
            w.iobufs.as_ptr(),
        );
        assert_eq!(after, before, "{}: no new allocation", t.name);
    }
}

#[test]
fn a_burst_of_large_requests_leaves_the_worker_within_its_bound() {
    // 8 MiB, within a 16 MiB disk: the mem layout goes through the bounce buffer, and a read
    // this large is split with the helper, whose scratch grows too.
    const LEN: u32 = 8 << 20;
    let layout: Arc<dyn BlockLayout> = Arc::new(MemLayout::new(Sectors(32768)));
    let disk = Disk::new(layout.clone(), false, "x").expect("disk");
    let mem = guest_mem();
    let mut w = RequestWorker::new();
    let data = pattern(LEN as usize, 9);
    for (op, round) in [(VIRTIO_BLK_T_OUT, 0), (VIRTIO_BLK_T_IN, 1)] {
        mem.write_slice(&header(op, 8), GuestAddress(HDR))
            .expect("hdr");
        if op == VIRTIO_BLK_T_OUT {
            mem.write_slice(&data, GuestAddress(DATA)).expect("data");
        } else {
            mem.write_slice(&vec![0u8; LEN as usize], GuestAddress(DATA))
                .expect("clear");
        }
        let mut descs = vec![rd(HDR, 16)];
        descs.extend(pieces(DATA, LEN, op == VIRTIO_BLK_T_IN));
        descs.push(wr(STATUS, 1));
        let vq = MockSplitQueue::new(&mem, 1024);
        let chain = vq.build_desc_chain(&descs).expect("chain");
        let c = w.process(&disk, &mem, chain, 0);
        assert_eq!(c.status, Some(OK), "round {round}");
        assert_eq!(c.bytes, u64::from(LEN));
        assert!(
            w.retained_scratch() <= 2 * RETAINED_SCRATCH,
            "round {round}: the worker keeps {} bytes after an {LEN}-byte request",
            w.retained_scratch()
        );
    }
    assert!(w.helper.is_some(), "the large read used the helper");
    let mut got = vec![0u8; LEN as usize];
    mem.read_slice(&mut got, GuestAddress(DATA)).expect("data");
    assert_eq!(got, data, "the data still made it both ways");
    // A small request afterwards reuses what was kept: no allocation.
    let before = (w.bounce.capacity(), w.bounce.as_ptr());
    mem.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
        .expect("hdr");
    let vq = MockSplitQueue::new(&mem, 16);
    let chain = vq
        .build_desc_chain(&[rd(HDR, 16), wr(DATA, 65536), wr(STATUS, 1)])
        .expect("chain");
    assert_eq!(w.process(&disk, &mem, chain, 0).status, Some(OK));
    assert_eq!((w.bounce.capacity(), w.bounce.as_ptr()), before);
}

/// Descriptors covering `len` bytes from `base`, cut into uneven pieces (not sector-aligned).
fn pieces(base: u64, len: u32, writable: bool) -> Vec<RawDescriptor> {
    let mut v = Vec::new();
    let (mut off, mut i) = (0u32, 0u32);
    while off < len {
        let n = (4096 * (i % 5 + 1) + 100 * (i % 3)).min(len - off);
        v.push(if writable {
            wr(base + u64::from(off), n)
        } else {
            rd(base + u64::from(off), n)
        });
        off += n;
        i += 1;
    }
    v
}

#[test]
fn large_reads_split_across_threads_keep_every_byte() {
    const LEN: u32 = 768 << 10;
    for t in all_disks(false) {
        let mem = guest_mem();
        let mut w = RequestWorker::new();
        // Write 768 KiB at sector 24 from scattered buffers, twice (the helper is reused).
        for round in 0..2u8 {
            let data = pattern(LEN as usize, 40 + round);
            mem.write_slice(&header(VIRTIO_BLK_T_OUT, 24), GuestAddress(HDR))
                .expect("hdr");
            mem.write_slice(&data, GuestAddress(DATA)).expect("data");
            let mut descs = vec![rd(HDR, 16)];
            descs.extend(pieces(DATA, LEN, false));
            descs.push(wr(STATUS, 1));
            let vq = MockSplitQueue::new(&mem, 1024);
            let chain = vq.build_desc_chain(&descs).expect("chain");
            let c = w.process(&t.disk, &mem, chain, 3);
            assert_eq!(
                c,
                Completion {
                    used_len: 1,
                    status: Some(OK),
                    op: ReqOp::Write,
                    bytes: u64::from(LEN),
                },
                "{}",
                t.name
            );
            assert_eq!(
                t.contents()[24 * 512..24 * 512 + LEN as usize],
                data[..],
                "{} round {round}",
                t.name
            );
            if let Some(file) = t.file_bytes() {
                assert_eq!(file[24 * 512..24 * 512 + LEN as usize], data[..]);
            }
        }
        assert!(w.helper.is_none(), "{}: writes are not split", t.name);

        // Read it back into different scattered buffers.
        mem.write_slice(&header(VIRTIO_BLK_T_IN, 24), GuestAddress(HDR))
            .expect("hdr");
        mem.write_slice(&vec![0u8; LEN as usize], GuestAddress(DATA + 0x40_0000))
            .expect("clear");
        let mut descs = vec![rd(HDR, 16)];
        descs.extend(pieces(DATA + 0x40_0000, LEN, true));
        descs.push(wr(STATUS, 1));
        let vq = MockSplitQueue::new(&mem, 1024);
        let chain = vq.build_desc_chain(&descs).expect("chain");
        let c = w.process(&t.disk, &mem, chain, 3);
        assert_eq!(
            c,
            Completion {
                used_len: LEN + 1,
                status: Some(OK),
                op: ReqOp::Read,
                bytes: u64::from(LEN),
            },
            "{}",
            t.name
        );
        assert!(w.helper.is_some(), "{}: the read started a helper", t.name);
        let mut got = vec![0u8; LEN as usize];
        mem.read_slice(&mut got, GuestAddress(DATA + 0x40_0000))
            .expect("data");
        assert_eq!(got, pattern(LEN as usize, 41), "{}", t.name);
    }
}

/// A layout whose reads fail from sector `bad` on: the second half of a split transfer fails.
#[derive(Debug)]
struct FailsFrom {
    inner: MemLayout,
    bad: u64,
}

impl BlockLayout for FailsFrom {
    fn capacity(&self) -> Sectors {
        self.inner.capacity()
    }
    fn read(&self, at: Sector, buf: &mut [u8]) -> dovetail_layout::Result<()> {
        if at.0 + (buf.len() as u64 / 512) > self.bad {
            return Err(dovetail_layout::Error::Io {
                op: "read",
                path: "test".into(),
                source: std::io::Error::other("injected"),
            });
        }
        self.inner.read(at, buf)
    }
    fn write(&self, at: Sector, buf: &[u8]) -> dovetail_layout::Result<()> {
        self.inner.write(at, buf)
    }
    fn flush(&self) -> dovetail_layout::Result<()> {
        Ok(())
    }
    fn discard(&self, at: Sector, len: Sectors) -> dovetail_layout::Result<()> {
        self.inner.discard(at, len)
    }
    fn write_zeroes(&self, at: Sector, len: Sectors, unmap: bool) -> dovetail_layout::Result<()> {
        self.inner.write_zeroes(at, len, unmap)
    }
}

#[test]
fn a_failure_in_either_half_of_a_split_transfer_is_an_io_error() {
    let layout = Arc::new(FailsFrom {
        inner: MemLayout::new(Sectors(DISK_SECTORS)),
        bad: 1536,
    });
    let disk = Disk::new(layout, false, "x").expect("disk");
    let mem = guest_mem();
    let mut w = RequestWorker::new();
    let read = |w: &mut RequestWorker, sector: u64| {
        mem.write_slice(&header(VIRTIO_BLK_T_IN, sector), GuestAddress(HDR))
            .expect("hdr");
        let mut descs = vec![rd(HDR, 16)];
        descs.extend(pieces(DATA, 512 * 1024, true));
        descs.push(wr(STATUS, 1));
        let vq = MockSplitQueue::new(&mem, 1024);
        let chain = vq.build_desc_chain(&descs).expect("chain");
        w.process(&disk, &mem, chain, 0)
    };
    // Sectors 1024..2048: the second half (1536..) fails on the helper.
    assert_eq!(
        read(&mut w, 1024),
        Completion {
            used_len: 1,
            status: Some(IOERR),
            op: ReqOp::Read,
            bytes: 0,
        }
    );
    // Sectors 0..1024: both halves fine, on the same helper.
    assert_eq!(
        read(&mut w, 0),
        Completion {
            used_len: 512 * 1024 + 1,
            status: Some(OK),
            op: ReqOp::Read,
            bytes: 512 * 1024,
        }
    );
}

#[test]
fn completions_feed_the_disk_request_metrics() {
    use crate::metrics::{Exposition, ReqOp};
    use std::time::Duration;

    let layout = Arc::new(MemLayout::new(Sectors(DISK_SECTORS)));
    let disk = Disk::new(layout, false, "m").expect("disk");
    let mem = guest_mem();
    let mut w = RequestWorker::new();
    let vq = MockSplitQueue::new(&mem, 16);
    // What `device::process_queue` does with each chain.
    let mut submit = |hdr: [u8; 16], descs: &[RawDescriptor]| {
        mem.write_slice(&hdr, GuestAddress(HDR)).expect("hdr");
        let chain = vq.build_desc_chain(descs).expect("chain");
        let c = w.process(&disk, &mem, chain, 0);
        c.record(disk.metrics(), Duration::from_micros(40));
        c
    };
    let read = submit(
        header(VIRTIO_BLK_T_IN, 8),
        &[rd(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)],
    );
    assert_eq!((read.op, read.bytes, read.ok()), (ReqOp::Read, 4096, true));
    let write = submit(
        header(VIRTIO_BLK_T_OUT, 0),
        &[rd(HDR, 16), rd(DATA, 8192), wr(STATUS, 1)],
    );
    assert_eq!(
        (write.op, write.bytes, write.ok()),
        (ReqOp::Write, 8192, true)
    );
    let flush = submit(header(VIRTIO_BLK_T_FLUSH, 0), &[rd(HDR, 16), wr(STATUS, 1)]);
    assert_eq!((flush.op, flush.bytes, flush.ok()), (ReqOp::Flush, 0, true));
    // A read past the end: a read, failed, nothing moved.
    let bad_read = submit(
        header(VIRTIO_BLK_T_IN, DISK_SECTORS),
        &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)],
    );
    assert_eq!(
        (bad_read.op, bad_read.bytes, bad_read.status),
        (ReqOp::Read, 0, Some(IOERR))
    );
    // An unknown type, and a header too short to have one.
    let unknown = submit(header(0xdead, 0), &[rd(HDR, 16), wr(STATUS, 1)]);
    assert_eq!(
        (unknown.op, unknown.status),
        (ReqOp::Unsupported, Some(UNSUPP))
    );
    let short = submit(header(VIRTIO_BLK_T_IN, 0), &[rd(HDR, 8), wr(STATUS, 1)]);
    assert_eq!((short.op, short.status), (ReqOp::Unsupported, Some(UNSUPP)));
    // Discard and write-zeroes count the bytes their segments cover.
    let mut payload = seg(0, 8, 0).to_vec();
    payload.extend_from_slice(&seg(64, 16, 0));
    mem.write_slice(&payload, GuestAddress(HDR + 16))
        .expect("segs");
    let discard = submit(
        header(VIRTIO_BLK_T_DISCARD, 0),
        &[rd(HDR, 48), wr(STATUS, 1)],
    );
    assert_eq!(
        (discard.op, discard.bytes, discard.ok()),
        (ReqOp::Discard, 24 * 512, true)
    );

    let snap = disk.metrics().snapshot();
    let counts = |op| {
        let s = snap.get(op);
        (s.requests, s.errors, s.bytes)
    };
    assert_eq!(counts(ReqOp::Read), (2, 1, 4096));
    assert_eq!(counts(ReqOp::Write), (1, 0, 8192));
    assert_eq!(counts(ReqOp::Flush), (1, 0, 0));
    assert_eq!(counts(ReqOp::Discard), (1, 0, 24 * 512));
    assert_eq!(counts(ReqOp::WriteZeroes), (0, 0, 0));
    assert_eq!(counts(ReqOp::GetId), (0, 0, 0));
    assert_eq!(counts(ReqOp::Unsupported), (2, 2, 0));
    // 40 µs lands in the (25 µs, 50 µs] bucket.
    assert_eq!(snap.read.latency_p50_seconds, Some(50e-6));
    assert_eq!(disk.metrics().latency(ReqOp::Read).count, 2);

    let mut out = Exposition::new();
    disk.metrics().render("vda", &mut out);
    let text = out.finish();
    for line in [
        "dovetail_requests_total{disk=\"vda\",op=\"read\"} 2",
        "dovetail_request_errors_total{disk=\"vda\",op=\"read\"} 1",
        "dovetail_request_bytes_total{disk=\"vda\",op=\"write\"} 8192",
        "dovetail_requests_total{disk=\"vda\",op=\"unsupported\"} 2",
        "dovetail_request_duration_seconds_count{disk=\"vda\",op=\"flush\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }
    assert!(!text.contains("dovetail_request_duration_seconds_count{disk=\"vda\",op=\"discard\"}"));
}

/// Stores `descs` at their indices in `vq`'s table, makes `head` available and returns the
/// chain virtio-queue yields for it (which ends silently where the chain is broken).
fn chain_at<'a>(
    vq: &'a MockSplitQueue<'a, GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
    descs: &[(u16, SplitDescriptor)],
    head: u16,
) -> virtio_queue::DescriptorChain<&'a GuestMemoryMmap> {
    use virtio_queue::{Queue, QueueOwnedT};
    for (i, d) in descs {
        vq.desc_table()
            .store(*i, RawDescriptor::from(*d))
            .expect("store descriptor");
    }
    vq.avail().ring().ref_at(0).expect("slot").store(head);
    vq.avail().idx().store(1);
    let mut q: Queue = vq.create_queue().expect("queue");
    q.iter(mem)
        .expect("avail iterator")
        .next()
        .expect("a chain")
}

#[test]
fn chains_cut_short_are_dropped_unexecuted() {
    const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    let disk = unreachable_disk(false);
    let mem = guest_mem();
    mem.write_slice(&header(VIRTIO_BLK_T_OUT, 0), GuestAddress(HDR))
        .expect("hdr");
    let dropped = Completion {
        used_len: 0,
        status: None,
        op: ReqOp::Unsupported,
        bytes: 0,
    };
    let cases: Vec<(&str, Vec<(u16, SplitDescriptor)>)> = vec![
        (
            "loop back to the head",
            vec![
                (0, SplitDescriptor::new(HDR, 16, NEXT, 1)),
                (1, SplitDescriptor::new(DATA, 512, NEXT, 2)),
                (2, SplitDescriptor::new(STATUS, 1, W | NEXT, 0)),
            ],
        ),
        (
            "next past the table",
            vec![
                (0, SplitDescriptor::new(HDR, 16, NEXT, 1)),
                (1, SplitDescriptor::new(STATUS, 1, W | NEXT, 16)),
            ],
        ),
        (
            "more than 4 GiB",
            vec![
                (0, SplitDescriptor::new(HDR, 16, NEXT, 1)),
                (1, SplitDescriptor::new(DATA, u32::MAX - 8, NEXT, 2)),
                (2, SplitDescriptor::new(STATUS, 16, W, 0)),
            ],
        ),
        ("head past the table", vec![]),
    ];
    for (name, descs) in cases {
        mem.write_obj(0xaau8, GuestAddress(STATUS)).expect("poison");
        let vq = MockSplitQueue::new(&mem, 16);
        let head = if descs.is_empty() { 16 } else { 0 };
        let chain = chain_at(&vq, &mem, &descs, head);
        let c = RequestWorker::new().process(&disk, &mem, chain, 0);
        assert_eq!(c, dropped, "{name}");
        assert_eq!(status_at(&mem, STATUS), 0xaa, "{name}: status written");
    }
}

#[test]
fn chains_longer_than_the_limit_are_unsupported() {
    const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    let mem = guest_mem();
    mem.write_slice(&header(VIRTIO_BLK_T_FLUSH, 0), GuestAddress(HDR))
        .expect("hdr");
    let table = 0x80_0000u64;
    for (n, disk, want) in [
        (MAX_CHAIN_DESCRIPTORS + 1, unreachable_disk(false), UNSUPP),
        (MAX_CHAIN_DESCRIPTORS, all_disks(false).remove(0).disk, OK),
    ] {
        // FLUSH, empty readable descriptors, status: n in all, in one indirect table.
        for i in 0..n {
            let d = if i == 0 {
                SplitDescriptor::new(HDR, 16, NEXT, 1)
            } else if i == n - 1 {
                SplitDescriptor::new(STATUS, 1, W, 0)
            } else {
                SplitDescriptor::new(HDR, 0, NEXT, i as u16 + 1)
            };
            mem.write_obj(d, GuestAddress(table + 16 * i as u64))
                .expect("entry");
        }
        mem.write_obj(0xaau8, GuestAddress(STATUS)).expect("poison");
        let vq = MockSplitQueue::new(&mem, 16);
        let head = SplitDescriptor::new(
            table,
            16 * n as u32,
            virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
            0,
        );
        let chain = chain_at(&vq, &mem, &[(0, head)], 0);
        let mut w = RequestWorker::new();
        let c = w.process(&disk, &mem, chain, 0);
        assert_eq!((c.used_len, c.status), (1, Some(want)), "{n} descriptors");
        assert_eq!(status_at(&mem, STATUS), want);
        assert!(
            w.readable.capacity() <= MAX_CHAIN_DESCRIPTORS,
            "segments kept"
        );
    }
}
