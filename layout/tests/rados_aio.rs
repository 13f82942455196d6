//! Reads a queue worker submits itself on a store on RADOS (librados aio, `engine::Aio`),
//! against a one-host cluster this test starts (skipped with a message where Ceph is not
//! installed, except in CI): a parallax-v1 disk's mapped reads come out as pieces on an
//! asynchronous source (never a file), 128 of them are in flight at once, each lands in its own
//! buffer with the bytes written, unwritten blocks are holes (zeros, no I/O), and a read mapped
//! right after a write sees that write.

#[path = "../../rados/tests/ceph/mod.rs"]
mod ceph;
mod common;

use std::path::Path;
use std::sync::Arc;

use dovetail_layout::engine::{Aio, Completed};
use dovetail_layout::{BlockLayout, Parallax, Sector, Sectors};
use dovetail_store::{rados, Store, VersionSpace};

const MIB: u64 = 1 << 20;
const DISK: u64 = 16 * MIB;
const BLOCK: usize = 4096;

#[test]
fn mapped_reads_on_rados_are_asynchronous() {
    let Some(cluster) = ceph::TestCluster::start(&["dovetail"]) else {
        return;
    };
    rados::set_connection(Some(cluster.conf.clone()), Some("admin".into()));
    let store = Store::create(Path::new("rados:dovetail/aio"), 64 * MIB, 4 * MIB).expect("create");
    let key = store
        .create_disk("d", DISK, "parallax-v1")
        .expect("create disk");
    let space: Arc<dyn VersionSpace> = store.space(key).expect("space");
    assert!(space.aio_reads() && !space.direct_io());
    let disk = Parallax::create(space, Sectors(DISK / 512)).expect("format");
    assert!(disk.map_direct_supported(), "a store on RADOS maps reads");

    // 128 blocks spread over the disk (several extents and objects), every other block
    // left unwritten, flushed (data synced, tree committed).
    let blocks: Vec<u64> = (0..128u64).map(|i| i * 30 + (i % 3)).collect();
    for &b in &blocks {
        disk.write(Sector(b * 8), &common::pattern(b, BLOCK))
            .expect("write");
    }
    disk.flush().expect("flush");

    // Every read mapped and submitted before any is reaped: all in flight at once, each
    // holding its guard (the layout's locks) until its completion.
    let mut aio = Aio::new(None);
    let mut bufs: Vec<Vec<u8>> = blocks.iter().map(|_| vec![0xEEu8; BLOCK]).collect();
    let mut guards = Vec::new();
    let mut pieces = Vec::new();
    for (i, &b) in blocks.iter().enumerate() {
        let m = disk
            .map_direct(Sector(b * 8), BLOCK, &mut pieces)
            .unwrap_or_else(|| panic!("block {b} is mapped"));
        assert_eq!(pieces.len(), 1, "{pieces:?}");
        let p = &pieces[0];
        assert!(p.file.is_none(), "no file on RADOS: {p:?}");
        let (source, offset) = p.aio.clone().expect("an asynchronous source");
        let iov = [libc::iovec {
            iov_base: bufs[i].as_mut_ptr().cast(),
            iov_len: BLOCK,
        }];
        // SAFETY: `bufs[i]` is neither moved nor touched until every completion was reaped
        // below (the vector of buffers is not resized).
        unsafe { aio.submit(i as u64, &*source, offset, &iov) }.expect("submit");
        guards.push(m);
    }
    assert_eq!(aio.in_flight(), blocks.len());
    let mut done: Vec<Completed> = Vec::new();
    while aio.in_flight() > 0 {
        aio.reap(true, &mut done);
    }
    drop(guards);
    assert_eq!(done.len(), blocks.len());
    for c in &done {
        assert!(c.result.is_ok(), "read {}: {:?}", c.tag, c.result);
    }
    for (i, &b) in blocks.iter().enumerate() {
        assert!(
            bufs[i] == common::pattern(b, BLOCK),
            "block {b} read back through aio"
        );
    }

    // An unwritten block is a hole: zeros, nothing to read.
    let m = disk
        .map_direct(Sector(8), BLOCK, &mut pieces)
        .expect("a hole maps");
    assert!(
        !pieces.is_empty() && pieces.iter().all(|p| !p.transfers()),
        "{pieces:?}"
    );
    drop(m);

    // A read right after a write (its data possibly still in flight to the cluster): mapped
    // to the source only once no write to the object is in flight, else left to `read_into`
    // (None); either way it reads the new bytes.
    for round in 0..16u64 {
        let b = blocks[(round * 7) as usize % blocks.len()];
        let data = common::pattern(1000 + round, BLOCK);
        disk.write(Sector(b * 8), &data).expect("rewrite");
        let mut back = vec![0u8; BLOCK];
        match disk.map_direct(Sector(b * 8), BLOCK, &mut pieces) {
            Some(m) => {
                let (source, offset) = pieces[0].aio.clone().expect("an asynchronous source");
                let iov = [libc::iovec {
                    iov_base: back.as_mut_ptr().cast(),
                    iov_len: BLOCK,
                }];
                // SAFETY: `back` is untouched until the completion was reaped just below.
                unsafe { aio.submit(round, &*source, offset, &iov) }.expect("submit");
                done.clear();
                while aio.in_flight() > 0 {
                    aio.reap(true, &mut done);
                }
                assert!(done[0].result.is_ok(), "{:?}", done[0].result);
                drop(m);
            }
            None => disk.read(Sector(b * 8), &mut back).expect("read"),
        }
        assert!(back == data, "round {round}: block {b} reads its new bytes");
    }
}
