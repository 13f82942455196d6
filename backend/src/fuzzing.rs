//! Entry points for the fuzz targets.
//!
//! Each `pub fn <target>(data: &[u8])` here holds the whole logic of one cargo-fuzz target:
//! `fuzz/fuzz_targets/<target>.rs` is a one-line call into it, so the same code runs under
//! libFuzzer (`cargo +nightly fuzz run <target>`, see fuzz/README.md) and on stable, where
//! `backend/tests/fuzz_corpus.rs` replays the committed seeds (`fuzz/seeds/<target>/`) and the
//! minimized crashes (`fuzz/regressions/<target>/`) through it. [`TARGETS`] lists them all.
//!
//! A target returns normally for any input. It panics only when the code under test breaks a
//! contract: a decoder that panics or allocates without bound instead of returning an error, a
//! decoded structure that does not encode back to the same bytes (or whose re-encoding does not
//! decode to the same value), a refused virtio request that changed the disk, a control reply
//! that is not one line of JSON, ...
//!
//! Most targets read a leading *mode* byte that steers the input past the checks a random
//! mutation almost never satisfies: bit 0 repairs the checksums of the bytes before decoding
//! them, so that the checks behind a checksum get fuzzed too; other bits are per target and
//! documented there. Every multi-byte integer is little-endian, as on disk.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use dovetail_annotations::{page_is_valid, Annotation, Epochs, Table, PAGE_BYTES, PAGE_MAGIC};
use dovetail_layout::fault::{FaultKind, FaultLayout, FaultRule};
use dovetail_layout::parallax::format::{
    check_compressed, check_label, check_name, decode_compressed, encode_compressed, make_ptr,
    show_ptr, split_ptr, Node, RootRecord, Tiering, BLOCK_SIZE, NODE_MAGIC, ZBLOCK_HEADER,
    ZBLOCK_MAGIC,
};
use dovetail_layout::parallax::{decode_sums_page, encode_sums_page, Label, SUMS_PER_PAGE};
use dovetail_layout::raw::RawOptions;
use dovetail_layout::{BlockLayout, MemLayout, Parallax, ParallaxOptions, RawLayout};
use dovetail_layout::{Sector, Sectors};
use dovetail_migrate::presence::{PresenceMap, BLOCKS_PER_PAGE};
use dovetail_migrate::record::{record_name, MigrationRecord, RECORD_SIZE, RECORD_VERSION};
use dovetail_migrate::Policy;
use dovetail_store::format::{
    check_disk_name, check_layout_name, check_tier_name, encode_slot, one_line_reason, slot_crc,
    tee_problems, validate, Header, Meta, TierHeader, HEADER_SIZE, MAX_TEE_REASON, SLOT_HEADER,
    TIER_HEADER_SIZE,
};
use dovetail_store::le::{le_u16, le_u32, le_u64};
use dovetail_store::mem::{MemPool, MemSpace};
use dovetail_store::{check_on_tiers, Store, StoreFile, VersionKey, VersionSpace};
use dovetail_tiering::{Class, TierPolicy};
use serde_json::Value;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::daemon::control::{self, AnnotatedView, AnnotationQuery};
use crate::daemon::live::{EventHub, MigrationMode};
use crate::daemon::served::Daemon;
use crate::disk::Disk;
use crate::face::render;
use crate::metrics::ReqOp;
use crate::request::RequestWorker;

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// Every fuzz target: its name (the directory of its seeds and regressions, the file in
/// `fuzz/fuzz_targets/`) and its entry point.
pub const TARGETS: &[(&str, Target)] = &[
    ("virtio_request", virtio_request),
    ("control_request", control_request),
    ("ctl_reply", ctl_reply),
    ("store_header", store_header),
    ("store_catalog", store_catalog),
    ("store_open", store_open),
    ("store_tiers", store_tiers),
    ("tier_header", tier_header),
    ("parallax_node", parallax_node),
    ("parallax_root", parallax_root),
    ("parallax_open", parallax_open),
    ("compressed_block", compressed_block),
    ("checksum_page", checksum_page),
    ("annotation_page", annotation_page),
    ("presence_map", presence_map),
    ("migration_record", migration_record),
    ("fault_rule", fault_rule),
];

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// `data[i]`, or 0 past the end: short inputs read as zero-padded.
fn byte(data: &[u8], i: usize) -> u8 {
    data.get(i).copied().unwrap_or(0)
}

/// `data[at..]`, or nothing past the end.
fn tail(data: &[u8], at: usize) -> &[u8] {
    data.get(at..).unwrap_or(&[])
}

/// `data` cut or zero-padded to exactly `len` bytes.
fn padded(data: &[u8], len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let n = data.len().min(len);
    v[..n].copy_from_slice(&data[..n]);
    v
}

/// A file name in the temporary directory no other call (in this process or another) uses.
fn scratch_path(what: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "dovetail-fuzz-{}-{}-{what}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Keeps one annotation table alive for the whole process, so the coarse clock's thread is not
/// started and stopped by every execution that makes a table.
fn keep_clock_ticking() {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| Table::new(1, Epochs { base: 0, secs: 1 }));
}

// ---------------------------------------------------------------------------------------------
// virtio_request: descriptor chains through `RequestWorker::process`
// ---------------------------------------------------------------------------------------------

/// Queue size of the fuzzed split queue.
const VQ_SIZE: u16 = 16;
/// Guest addresses of the descriptor table, the available ring, the used ring and the payload.
const VQ_DESC: u64 = 0;
const VQ_AVAIL: u64 = 0x1000;
const VQ_USED: u64 = 0x2000;
const VQ_PAYLOAD: u64 = 0x3000;
/// Guest memory: two adjacent regions (buffers may straddle them), a hole, a small third one.
const VQ_REGIONS: [(u64, usize); 3] = [(0, 0x1_0000), (0x1_0000, 0x8000), (0x2_0000, 0x1000)];
/// The fuzzed disk: 64 KiB.
const VQ_DISK_SECTORS: u64 = 128;

/// What the disk holds before each execution, so that any change is visible.
fn disk_pattern() -> Vec<u8> {
    (0..VQ_DISK_SECTORS as usize * 512)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add((i >> 9) as u8))
        .collect()
}

/// A raw image in the temporary directory, made once per process and unlinked at once (the
/// open file keeps it), so the raw layout's zero-copy `preadv`/`pwritev` into guest memory is
/// fuzzed too. `None` if the temporary directory is unusable.
fn raw_disk() -> Option<Arc<dyn BlockLayout>> {
    static RAW: OnceLock<Option<Arc<dyn BlockLayout>>> = OnceLock::new();
    RAW.get_or_init(|| {
        let path = scratch_path("raw.img");
        let layout = RawLayout::open(
            &path,
            RawOptions {
                create_size: Some(VQ_DISK_SECTORS * 512),
                read_only: false,
                cache: None,
            },
        );
        let _ = std::fs::remove_file(&path);
        layout.ok().map(|l| Arc::new(l) as Arc<dyn BlockLayout>)
    })
    .clone()
}

fn whole_disk(layout: &dyn BlockLayout) -> Vec<u8> {
    let mut v = vec![0u8; VQ_DISK_SECTORS as usize * 512];
    layout
        .read(Sector(0), &mut v)
        .expect("the fuzzed disk reads");
    v
}

/// virtio-blk requests: descriptor chains built from the input in guest memory, popped from a
/// real split queue (virtio-queue's `Queue`, which follows indirect tables) and handed to
/// [`RequestWorker::process`] against a 64 KiB disk, as the device's queue worker does.
///
/// Input: a flags byte (bit 0: the disk is read-only; bit 1: a raw image file instead of the
/// in-memory layout; bits 2–3: chains − 1), one head index byte per chain, the descriptor table
/// (16 descriptors of 16 bytes: address u64, length u32, flags u16, next u16), then payload
/// bytes placed at guest address 0x3000 (headers, data, discard segments, indirect tables).
///
/// Checked for each chain: the status byte is one of OK, IOERR, UNSUPP; the disk changes only
/// through a writable disk's OUT, DISCARD or WRITE_ZEROES that moved data.
pub fn virtio_request(data: &[u8]) {
    let flags = byte(data, 0);
    let read_only = flags & 1 != 0;
    let chains = usize::from((flags >> 2) & 3) + 1;
    let heads: Vec<u16> = (0..chains).map(|i| u16::from(byte(data, 1 + i))).collect();
    let rest = tail(data, 1 + chains);
    let (table, payload) = rest.split_at(rest.len().min(usize::from(VQ_SIZE) * 16));

    let ranges: Vec<(GuestAddress, usize)> = VQ_REGIONS
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l))
        .collect();
    let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).expect("guest memory");
    mem.write_slice(table, GuestAddress(VQ_DESC))
        .expect("the descriptor table fits the first region");
    let room = VQ_REGIONS[0].1 - VQ_PAYLOAD as usize;
    mem.write_slice(
        &payload[..payload.len().min(room)],
        GuestAddress(VQ_PAYLOAD),
    )
    .expect("the payload fits the first region");
    let mut avail = vec![0u8; 4 + 2 * chains];
    avail[2..4].copy_from_slice(&(chains as u16).to_le_bytes());
    for (i, h) in heads.iter().enumerate() {
        avail[4 + 2 * i..6 + 2 * i].copy_from_slice(&h.to_le_bytes());
    }
    mem.write_slice(&avail, GuestAddress(VQ_AVAIL))
        .expect("the available ring fits the first region");

    let layout = match raw_disk() {
        Some(raw) if flags & 2 != 0 => raw,
        _ => Arc::new(MemLayout::new(Sectors(VQ_DISK_SECTORS))),
    };
    layout
        .write(Sector(0), &disk_pattern())
        .expect("the fuzzed disk is reset");
    let disk = Disk::new(layout.clone(), read_only, "fuzz-serial").expect("the serial fits");

    let mut q = Queue::new(VQ_SIZE).expect("the queue size is a power of two");
    q.set_size(VQ_SIZE);
    q.set_desc_table_address(Some(VQ_DESC as u32), Some(0));
    q.set_avail_ring_address(Some(VQ_AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(VQ_USED as u32), Some(0));
    q.set_ready(true);

    let mut worker = RequestWorker::new();
    let mut before = whole_disk(&*layout);
    while let Some(chain) = q.pop_descriptor_chain(&mem) {
        let head = chain.head_index();
        let c = worker.process(&disk, &mem, chain, 0);
        // The request path's panic boundary answers a panic IOERR: still a bug.
        assert_eq!(disk.metrics().panics(), 0, "a request panicked: {c:?}");
        if let Some(s) = c.status {
            assert!(
                [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP].contains(&u32::from(s)),
                "status byte {s}"
            );
            assert!(c.used_len >= 1, "a status byte was written: {c:?}");
        } else {
            assert_eq!(c.used_len, 0, "no status byte, nothing used: {c:?}");
        }
        let after = whole_disk(&*layout);
        if after != before {
            assert!(
                !read_only
                    && c.bytes > 0
                    && matches!(c.op, ReqOp::Write | ReqOp::Discard | ReqOp::WriteZeroes),
                "the disk changed under {c:?} (read-only {read_only})"
            );
        }
        before = after;
        // A head outside the queue cannot be returned; that is the queue's business.
        let _ = q.add_used(&mem, head, c.used_len);
    }
}

// ---------------------------------------------------------------------------------------------
// control_request / ctl_reply: the control socket's two ends
// ---------------------------------------------------------------------------------------------

/// The annotations an `annotations` request reads in `control_request`: 300 blocks with
/// reads, writes and two labels.
fn annotated() -> &'static (Table, Vec<Label>) {
    static VIEW: OnceLock<(Table, Vec<Label>)> = OnceLock::new();
    VIEW.get_or_init(|| {
        let t = Table::new(
            300,
            Epochs {
                base: 1_700_000_000,
                secs: 600,
            },
        );
        t.set_active_taint(0b10);
        t.record_write_at(0, 64 << 10, 3);
        t.record_read_at(100 << 12, 40 << 12, 9);
        t.record_write_at(299 << 12, 4096, 12);
        let labels = ["untrusted", "pii"]
            .iter()
            .enumerate()
            .map(|(i, n)| Label {
                name: n.to_string(),
                bit: i as u8,
                active: i == 1,
            })
            .collect();
        (t, labels)
    })
}

/// The query of an `annotations` request line, read leniently (what the daemon would do with
/// it once its disk is found), or `None` for another line.
fn annotation_query(line: &[u8]) -> Option<AnnotationQuery> {
    let v: Value = serde_json::from_slice(line).ok()?;
    if v.get("cmd")?.as_str()? != "annotations" {
        return None;
    }
    Some(AnnotationQuery {
        top: v.get("top").and_then(Value::as_u64),
        region_blocks: v.get("region_blocks").and_then(Value::as_u64),
        histogram: v.get("histogram").and_then(Value::as_u64),
        label: v.get("label").and_then(Value::as_str).map(str::to_string),
        block: v.get("block").and_then(Value::as_u64),
    })
}

/// Control-socket request lines, parsed and dispatched by the daemon's handler
/// ([`control::handle_line`]) against a daemon serving no disk (so every disk command stops at
/// `unknown-disk` after its arguments were parsed, and nothing touches a file). The input is
/// split into lines like a connection's stream. An `annotations` request's query also runs
/// through [`control::annotations_result`] over an in-memory table, as it would for a served
/// parallax-v2 disk.
///
/// Checked: every reply is exactly one line of JSON, an object with `"v": 1`, a boolean
/// `"ok"`, and an error code string when not ok; an annotations query is answered or refused
/// as `invalid`.
pub fn control_request(data: &[u8]) {
    let daemon = Daemon::new(Vec::new(), Arc::new(EventHub::default()), None);
    for line in data.split(|&b| b == b'\n') {
        if line.len() > control::MAX_LINE || line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let Some(q) = annotation_query(line) {
            keep_clock_ticking();
            let (table, labels) = annotated();
            let view = AnnotatedView {
                disk: "fuzz",
                layout: "parallax-v2",
                version: Some(1),
                role: "trusted",
                snapshot: None,
                table,
                labels,
            };
            match control::annotations_result(&view, &q) {
                Ok(v) => {
                    let _ = render::annotations_text(&v);
                }
                Err(e) => assert_eq!(
                    e.code,
                    crate::daemon::proto::ErrorCode::Invalid,
                    "{}",
                    e.message
                ),
            }
        }
        let reply = control::handle_line(&daemon, line);
        // The handler's panic boundary turns a panic into an error reply: still a bug.
        assert!(
            !reply.contains("the daemon carries on"),
            "a control request panicked: {reply}"
        );
        let body = reply
            .strip_suffix('\n')
            .expect("a reply ends with a newline");
        assert!(!body.contains('\n'), "a reply is one line: {reply:?}");
        let v: Value = serde_json::from_str(body).expect("a reply is JSON");
        assert_eq!(v["v"], control::PROTOCOL, "{body}");
        match v["ok"] {
            Value::Bool(true) => assert!(v.get("result").is_some(), "{body}"),
            Value::Bool(false) => assert!(v["error"]["code"].is_string(), "{body}"),
            _ => panic!("a reply without a boolean \"ok\": {body}"),
        }
    }
}

/// Replies as the `dovetail ctl` client reads them from the socket: any JSON value through the
/// text renderings of `tiers` and `annotations` results, which must not panic on a reply of any
/// shape.
pub fn ctl_reply(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let _ = render::tiers_text(&v);
    let _ = render::annotations_text(&v);
}

// ---------------------------------------------------------------------------------------------
// The store: header, catalog, the whole metadata file
// ---------------------------------------------------------------------------------------------

/// Repairs the header checksum of a store header (`b` at least 4096 bytes) by the rule of the
/// format version it states (docs/format.md).
fn fix_store_header_crc(b: &mut [u8]) {
    let version = le_u32(b, 16);
    let mut crc = crc32c::crc32c(&b[..64]);
    if version >= 3 {
        crc = crc32c::crc32c_append(crc, &b[68..HEADER_SIZE as usize]);
    }
    b[64..68].copy_from_slice(&crc.to_le_bytes());
}

/// A store header (`store.meta` bytes 0..4096) through `Header::decode`.
///
/// Input: a mode byte (bit 0: repair the checksum; bit 1: pass the bytes as they are instead
/// of cut or padded to 4096), then the header. Checked: a decoded header encodes back to the
/// same 4096 bytes and decodes again to itself; its derived geometry does not overflow.
pub fn store_header(data: &[u8]) {
    let mode = byte(data, 0);
    let rest = tail(data, 1);
    let mut b = if mode & 2 != 0 {
        rest.to_vec()
    } else {
        padded(rest, HEADER_SIZE as usize)
    };
    if mode & 1 != 0 && b.len() >= HEADER_SIZE as usize {
        fix_store_header_crc(&mut b);
    }
    let Ok(h) = Header::decode(&b, Path::new("fuzz")) else {
        return;
    };
    let enc = h.encode();
    assert_eq!(
        enc[..],
        b[..HEADER_SIZE as usize],
        "a decoded header encodes back to its bytes"
    );
    assert_eq!(
        Header::decode(&enc, Path::new("fuzz")).expect("an encoded header decodes"),
        h
    );
    for t in 0..h.tiers.len() {
        let _ = (h.tier_start(t), h.tier_len(t));
    }
    let _ = (h.slot_offset(1), h.meta_len(), h.max_payload());
}

/// A slot payload (the whole catalog) through `Meta::decode`, then `validate` against a header
/// of its size.
///
/// Input: a selector byte (bits 0–1: format version 1, 2 or 3, or 3 = the version is the byte
/// shifted right by 2, mostly unsupported ones), then the payload. Checked: a decoded catalog
/// re-encodes in its format to bytes that decode to the same catalog, equal to the input when
/// its free-extent count was right; the tee records' strings go through the parsers the Tee
/// uses for them.
pub fn store_catalog(data: &[u8]) {
    let sel = byte(data, 0);
    let version = match sel & 3 {
        0 => 1,
        1 => 2,
        2 => 3,
        _ => u32::from(sel >> 2),
    };
    let payload = tail(data, 1);
    let Ok((meta, free)) = Meta::decode(payload, version) else {
        return;
    };
    let count = u32::try_from(meta.owners.len()).unwrap_or(u32::MAX);
    let _ = validate(&Header::new([0; 16], 4096, count), &meta, free);
    for v in &meta.versions {
        let _ = RootRecord::decode(&v.root);
    }
    for d in &meta.disks {
        if let Some(tee) = &d.tee {
            let _ = tee_problems(tee);
            let _ = tee.policy.parse::<Policy>();
            for f in &tee.faults {
                let _ = f.parse::<FaultRule>();
            }
        }
    }
    let enc = meta
        .encode_for(version)
        .expect("a decoded catalog encodes in its own format");
    let (again, recorded) = Meta::decode(&enc, version).expect("an encoded catalog decodes");
    assert_eq!(again, meta, "decode(encode(catalog)) == catalog");
    assert_eq!(recorded, meta.free_extents());
    if free == meta.free_extents() {
        assert_eq!(enc, payload, "a decoded catalog encodes back to its bytes");
    }
    let slot = encode_slot(version, 1, &enc);
    assert_eq!(
        le_u32(&slot, 12),
        slot_crc(version, &slot[..12], &slot[SLOT_HEADER..])
    );
}

/// A metadata file in memory, shared so its bytes can be read after a store wrote to it.
#[derive(Debug, Clone)]
struct MemFile(Arc<Mutex<Vec<u8>>>);

impl MemFile {
    fn new(bytes: Vec<u8>) -> MemFile {
        MemFile(Arc::new(Mutex::new(bytes)))
    }

    fn bytes(&self) -> MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StoreFile for MemFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let b = self.bytes();
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .filter(|&e| e <= b.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&b[start..end]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut b = self.bytes();
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::InvalidInput)?;
        if end > b.len() {
            b.resize(end, 0);
        }
        b[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.bytes().len() as u64)
    }

    fn set_size(&self, _len: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    fn zero_range(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// A tier data file of `0` bytes' length that reads as zeros and refuses writes: opening a
/// store reads its length only.
#[derive(Debug)]
struct ZeroFile(u64);

impl StoreFile for ZeroFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.0 => {
                buf.fill(0);
                Ok(())
            }
            _ => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }

    fn write_at(&self, _offset: u64, _buf: &[u8]) -> io::Result<()> {
        Err(io::ErrorKind::PermissionDenied.into())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.0)
    }

    fn set_size(&self, _len: u64) -> io::Result<()> {
        Err(io::ErrorKind::PermissionDenied.into())
    }

    fn zero_range(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::ErrorKind::PermissionDenied.into())
    }
}

/// A tier data file as `create` makes it, without the memory: `base` bytes of extents that read
/// as zeros (and take no writes but zeroing), then a tail held in memory: the tier header in
/// format version 4, nothing in version 3 (where the upgrade writes it).
#[derive(Debug, Clone)]
struct SparseTier(Arc<Mutex<(u64, Vec<u8>)>>);

impl SparseTier {
    /// Tier `t`'s file for header `h`.
    fn of(h: &Header, t: usize) -> SparseTier {
        let tail = if h.has_tier_headers() {
            TierHeader::expected(h, t).encode()
        } else {
            Vec::new()
        };
        SparseTier(Arc::new(Mutex::new((h.tier_len(t), tail))))
    }

    fn state(&self) -> MutexGuard<'_, (u64, Vec<u8>)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StoreFile for SparseTier {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let st = self.state();
        let (base, tail) = (st.0, &st.1);
        offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= base + tail.len() as u64)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        for (i, b) in buf.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = if at < base {
                0
            } else {
                tail[(at - base) as usize]
            };
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut st = self.state();
        let base = st.0;
        let start = offset
            .checked_sub(base)
            .and_then(|s| usize::try_from(s).ok())
            .ok_or(io::ErrorKind::PermissionDenied)?;
        let end = start + buf.len();
        if end > 1 << 20 {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        if end > st.1.len() {
            st.1.resize(end, 0);
        }
        st.1[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        let st = self.state();
        Ok(st.0 + st.1.len() as u64)
    }

    fn set_size(&self, len: u64) -> io::Result<()> {
        let mut st = self.state();
        match len.checked_sub(st.0) {
            Some(t) if t <= 1 << 20 => {
                st.1.resize(t as usize, 0);
                Ok(())
            }
            _ => Err(io::ErrorKind::PermissionDenied.into()),
        }
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut st = self.state();
        let base = st.0;
        let end = offset.saturating_add(len);
        for at in offset.max(base)..end.min(base + st.1.len() as u64) {
            st.1[(at - base) as usize] = 0;
        }
        Ok(())
    }
}

/// A tier file's header (the 4096 bytes after a tier's extents, format version 4) through
/// `TierHeader::decode`, and against the headers a two-tier store expects.
///
/// Input: a mode byte (bit 0: repair the checksum), then the header. Checked: a decoded header
/// encodes back to the same bytes; it matches (`mismatch` is `None`) exactly the tier it equals.
pub fn tier_header(data: &[u8]) {
    let mode = byte(data, 0);
    let mut b = padded(tail(data, 1), TIER_HEADER_SIZE as usize);
    if mode & 1 != 0 {
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..76]), &b[80..]);
        b[76..80].copy_from_slice(&crc.to_le_bytes());
    }
    let Ok(found) = TierHeader::decode(&b) else {
        return;
    };
    assert_eq!(
        found.encode(),
        b,
        "a decoded tier header encodes back to its bytes"
    );
    assert_eq!(found.mismatch(&found), None);
    let tier = |name: &str, extents: u32, path: &str| dovetail_store::format::TierRec {
        name: name.into(),
        extents,
        path: path.into(),
    };
    let h = Header::with_tiers(
        found.uuid,
        found.extent_size.max(4096),
        vec![tier("fast", 2, "/f"), tier("slow", 3, "/s")],
    );
    for t in 0..2 {
        let want = TierHeader::expected(&h, t);
        assert_eq!(want.mismatch(&found).is_none(), want == found);
    }
}

/// The tier table of a store header (`store.meta` bytes 68..4096), in an otherwise valid
/// format-4 header, through `Header::decode`, then a whole store opened over it.
///
/// Input: a mode byte (bit 0: set the header's extent count to the sum of the tiers' counts
/// as a loose parse finds them; bit 1: give tier 0 the file of the last tier), then the table
/// (tier count u16, 2 reserved bytes, the entries). Checked: a decoded table encodes back to its
/// bytes; its tiers cover the extents in order; a store over files made for it opens read-only
/// and read-write with those tiers, `check` agrees, and a grant on each tier lands in that
/// tier's range; a tier given another tier's file is refused by `open` and reported by `check`.
pub fn store_tiers(data: &[u8]) {
    let mode = byte(data, 0);
    let table = tail(data, 1);
    let mut b = vec![0u8; HEADER_SIZE as usize];
    b[0..16].copy_from_slice(dovetail_store::format::MAGIC);
    b[16..20].copy_from_slice(&dovetail_store::format::FORMAT_VERSION.to_le_bytes());
    b[24..40].copy_from_slice(&[0x5a; 16]);
    b[40..48].copy_from_slice(&4096u64.to_le_bytes());
    let n = table.len().min(HEADER_SIZE as usize - 68);
    b[68..68 + n].copy_from_slice(&table[..n]);
    let mut count = 1u64;
    if mode & 1 != 0 {
        // The counts where a well-formed table has them.
        let (tiers, mut at, mut sum) = (le_u16(&b, 68) as usize, 72usize, 0u64);
        for _ in 0..tiers.min(8) {
            if at + 22 > b.len() {
                break;
            }
            sum += u64::from(le_u32(&b, at + 16));
            at += 22 + le_u16(&b, at + 20) as usize;
        }
        count = sum;
    }
    let count = u32::try_from(count).unwrap_or(u32::MAX);
    b[48..52].copy_from_slice(&count.to_le_bytes());
    let slot_size = (40 + 12 * u64::from(count) + 4096).div_ceil(4096) * 4096;
    b[56..64].copy_from_slice(&slot_size.to_le_bytes());
    fix_store_header_crc(&mut b);
    let Ok(h) = Header::decode(&b, Path::new("fuzz")) else {
        return;
    };
    assert_eq!(
        h.encode(),
        b,
        "a decoded tier table encodes back to its bytes"
    );
    let mut next = 0u32;
    for (t, rec) in h.tiers.iter().enumerate() {
        assert_eq!(
            h.tier_start(t),
            next,
            "tier {t} starts after the tiers before it"
        );
        next += rec.extents;
    }
    assert_eq!(next, h.extent_count, "the tiers cover the store's extents");
    if h.extent_count > 16384 {
        // The metadata file would outgrow the allocation budget (docs: fuzz_corpus.rs).
        return;
    }

    // A store over it: the header, slot A with an empty catalog, slot B empty.
    let mut meta = b.clone();
    let payload = Meta::empty(h.extent_count).encode();
    let mut slot = encode_slot(h.version, 1, &payload);
    slot.resize(h.slot_size as usize, 0);
    meta.extend_from_slice(&slot);
    meta.resize(h.meta_len() as usize, 0);
    let swap = mode & 2 != 0 && h.tiers.len() > 1;
    let files = |swap: bool| -> Vec<Box<dyn StoreFile>> {
        let mut v: Vec<SparseTier> = (0..h.tiers.len()).map(|t| SparseTier::of(&h, t)).collect();
        if swap {
            let last = v.len() - 1;
            v.swap(0, last);
        }
        v.into_iter()
            .map(|f| Box::new(f) as Box<dyn StoreFile>)
            .collect()
    };
    let ro = Store::open_on_tiers_read_only(Box::new(MemFile::new(meta.clone())), files(swap));
    let report = check_on_tiers(Box::new(MemFile::new(meta.clone())), files(swap), &[])
        .expect("check reads in-memory files without I/O errors");
    if swap {
        let e = ro.expect_err("a tier given another tier's file is refused");
        assert!(
            matches!(e, dovetail_store::StoreError::TierFile { .. }),
            "{e}"
        );
        assert!(!report.is_ok(), "check reports the swapped file");
        return;
    }
    let store = ro.expect("a store over a valid tier table opens");
    assert!(report.is_ok(), "{:?}", report.violations);
    let names: Vec<String> = store.tiers().into_iter().map(|t| t.name).collect();
    let want: Vec<String> = h.tiers.iter().map(|t| t.name.clone()).collect();
    assert_eq!(names, want);
    drop(store);
    let store = Store::open_on_tiers(Box::new(MemFile::new(meta)), files(false))
        .expect("it opens read-write too");
    let key = store
        .create_disk("d", 4096, "parallax-v1")
        .expect("a disk in an empty store");
    let space = store.space(key).expect("space");
    for t in 0..h.tiers.len() {
        let e = space
            .grant_extent_on(t)
            .expect("each tier has a free extent");
        let first = h.tier_start(t);
        assert!(
            (first..first + h.tiers[t].extents).contains(&e.0),
            "a grant on tier {t} lands in its range"
        );
        assert_eq!(space.extent_tier(e), t);
    }
}

/// Repairs the checksum of slot `i` of a metadata file, if its header and payload are inside
/// the file.
fn fix_slot_crc(meta: &mut [u8], h: &Header, i: usize) {
    let Ok(at) = usize::try_from(h.slot_offset(i)) else {
        return;
    };
    let Some(head) = meta.get(at..at.saturating_add(SLOT_HEADER)) else {
        return;
    };
    let len = le_u32(head, 8) as usize;
    let start = at + SLOT_HEADER;
    let Some(payload) = meta.get(start..start.saturating_add(len)) else {
        return;
    };
    let crc = slot_crc(h.version, &meta[at..at + 12], payload);
    meta[at + 12..at + 16].copy_from_slice(&crc.to_le_bytes());
}

/// A whole `store.meta` (header, slot A, slot B) opened by `Store` over in-memory files:
/// read-only, then read-write (which upgrades a format-1 store in place), then read-only
/// again; and checked by `check_on_tiers`.
///
/// Input: a mode byte (bit 0: repair the header checksum; bits 1 and 2: repair slot A's and
/// slot B's checksums), then the file. Tier data files are given, empty, at exactly the length
/// the header asks for (with the tier header each tier expects in format version 4). Checked: `open` succeeds exactly when `check` finds no violation, and
/// then both see the same catalog; a read-write open (and its upgrade) succeeds too and keeps
/// the catalog, as does the next read-only open of the bytes it left.
pub fn store_open(data: &[u8]) {
    let mode = byte(data, 0);
    let mut meta = tail(data, 1).to_vec();
    if mode & 1 != 0 && meta.len() >= HEADER_SIZE as usize {
        fix_store_header_crc(&mut meta);
    }
    let header = Header::decode(&meta, Path::new("fuzz")).ok();
    if let Some(h) = &header {
        for i in 0..2 {
            if mode & (2 << i) != 0 {
                fix_slot_crc(&mut meta, h, i);
            }
        }
    }
    let files = || -> Vec<Box<dyn StoreFile>> {
        match &header {
            Some(h) => (0..h.tiers.len())
                .map(|t| Box::new(SparseTier::of(h, t)) as Box<dyn StoreFile>)
                .collect(),
            None => vec![Box::new(ZeroFile(0))],
        }
    };
    let ro = Store::open_on_tiers_read_only(Box::new(MemFile::new(meta.clone())), files());
    let report = check_on_tiers(Box::new(MemFile::new(meta.clone())), files(), &[])
        .expect("check reads in-memory files without I/O errors");
    let store = match ro {
        Ok(store) => store,
        Err(e) => {
            assert!(
                !report.is_ok(),
                "open fails ({e}) but check finds nothing wrong"
            );
            return;
        }
    };
    assert!(
        report.is_ok(),
        "open succeeds but check finds {:?}",
        report.violations
    );
    let (disks, versions) = (store.disks(), store.versions());
    assert_eq!(report.disks, disks);
    assert_eq!(report.versions, versions);
    let _ = (store.info(), store.tiers());
    for d in &disks {
        let _ = store.disk(&d.name).expect("a listed disk is found");
        let _ = store.tee(&d.name);
    }
    drop(store);

    let file = MemFile::new(meta);
    // The tier files as the read-write open leaves them (an upgrade to format 4 writes their
    // tier headers).
    let tiers: Vec<SparseTier> = match &header {
        Some(h) => (0..h.tiers.len()).map(|t| SparseTier::of(h, t)).collect(),
        None => Vec::new(),
    };
    let boxed = || -> Vec<Box<dyn StoreFile>> {
        tiers
            .iter()
            .map(|f| Box::new(f.clone()) as Box<dyn StoreFile>)
            .collect()
    };
    let rw = Store::open_on_tiers(Box::new(file.clone()), boxed())
        .expect("a store that opens read-only opens read-write (and upgrades)");
    assert_eq!(rw.disks(), disks, "a read-write open keeps the catalog");
    drop(rw);
    let bytes = file.bytes().clone();
    let again = Store::open_on_tiers_read_only(Box::new(MemFile::new(bytes)), boxed())
        .expect("a store opens again after a read-write open");
    assert_eq!(
        again.disks(),
        disks,
        "the catalog survives a read-write open"
    );
    assert_eq!(
        again.versions().len(),
        versions.len(),
        "the versions survive a read-write open"
    );
}

// ---------------------------------------------------------------------------------------------
// parallax: nodes, root records, a whole version
// ---------------------------------------------------------------------------------------------

/// Repairs a node's checksum (bytes 12..16, crc32c of the block with them zero).
fn fix_node_crc(b: &mut [u8]) {
    b[12..16].fill(0);
    let crc = crc32c::crc32c(b);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// Repairs a root record's checksum (same rule as a node's, over the whole record).
fn fix_root_crc(b: &mut [u8]) {
    if b.len() >= 16 {
        fix_node_crc(b);
    }
}

/// Repairs a compressed block's header: a frame length that fits, the reserved bytes, the
/// frame's checksum.
fn fix_zblock(b: &mut [u8]) {
    let len = usize::from(le_u16(b, 4)).min(BLOCK_SIZE - ZBLOCK_HEADER);
    b[4..6].copy_from_slice(&(len as u16).to_le_bytes());
    b[6..8].fill(0);
    let crc = crc32c::crc32c(&b[ZBLOCK_HEADER..ZBLOCK_HEADER + len]);
    b[8..12].copy_from_slice(&crc.to_le_bytes());
}

/// Repairs an annotation page's checksum.
fn fix_page_crc(b: &mut [u8]) {
    fix_node_crc(b);
}

/// A tree node block through `Node::decode`.
///
/// Input: a mode byte (bit 0: repair the checksum; bit 1: expect the level, self pointer and
/// generation the block states, so those checks pass), the expected level (u8), self pointer
/// (u64) and maximum generation (u64), then the 4096-byte block. Checked: a decoded node encodes
/// back to the same block; every entry's pointer decodes and re-encodes to itself.
pub fn parallax_node(data: &[u8]) {
    let mode = byte(data, 0);
    let params = padded(tail(data, 1).get(..17).unwrap_or(tail(data, 1)), 17);
    let mut block = [0u8; BLOCK_SIZE];
    let b = tail(data, 18);
    block[..b.len().min(BLOCK_SIZE)].copy_from_slice(&b[..b.len().min(BLOCK_SIZE)]);
    let (mut level, mut self_ptr, mut max_gen) =
        (params[0], le_u64(&params, 1), le_u64(&params, 9));
    if mode & 2 != 0 {
        level = block[8];
        max_gen = le_u64(&block, 16);
        self_ptr = le_u64(&block, 24);
    }
    if mode & 1 != 0 {
        fix_node_crc(&mut block);
    }
    let Ok(node) = Node::decode(&block, self_ptr, level, max_gen) else {
        return;
    };
    let mut enc = [0u8; BLOCK_SIZE];
    node.encode(self_ptr, &mut enc);
    assert_eq!(enc, block, "a decoded node encodes back to its block");
    for &e in node.entries.iter() {
        let _ = show_ptr(e);
        if let Some((extent, index)) = split_ptr(e) {
            assert_eq!(make_ptr(extent, index), e, "pointer round trip");
        }
    }
}

/// A root record (parallax-v1, or parallax-v2 with its annotation and tiering sections) through
/// `RootRecord::decode`.
///
/// Input: a mode byte (bit 0: repair the checksum), then the record. Checked: a decoded record
/// encodes to bytes that decode to the same record (a v2 extension of version 1, without a
/// tiering section, comes back with the default one, which is what the next commit writes);
/// equal to the input otherwise; and re-encoding is stable.
pub fn parallax_root(data: &[u8]) {
    let mode = byte(data, 0);
    let mut rec = tail(data, 1).to_vec();
    if mode & 1 != 0 {
        fix_root_crc(&mut rec);
    }
    let Ok(r) = RootRecord::decode(&rec) else {
        return;
    };
    let enc = r.encode();
    let again = RootRecord::decode(&enc).expect("an encoded root record decodes");
    let mut want = r.clone();
    let mut upgraded = false;
    if let Some(v2) = &mut want.v2 {
        if v2.tiering.is_none() {
            upgraded = true;
            v2.tiering = Some(Tiering {
                policy: TierPolicy::defaults(1),
                groups: Vec::new(),
            });
        }
        let _ = v2.annotations_at();
    }
    assert_eq!(again, want, "decode(encode(record)) == record");
    if !upgraded {
        assert_eq!(enc, rec, "a decoded root record encodes back to its bytes");
    }
    assert_eq!(again.encode(), enc, "re-encoding is stable");
}

/// Blocks per extent of the fuzzed parallax version (tiny, so the input can fill them).
const PX_EXTENT_BLOCKS: usize = 4;
/// The largest tree the target opens: 2^21 sectors (depth 3). `Parallax::open` keeps 16 bytes
/// of annotations in memory per guest block of a parallax-v2 disk, by design, so a record of a
/// huge disk would cost the run its memory, not find a bug.
const PX_MAX_SECTORS: u64 = 1 << 21;

/// Repairs what a block's checksum covers, by what the block starts with: a node (and its self
/// pointer), an annotation page, a compressed block.
fn fix_block(b: &mut [u8], self_ptr: u64) {
    if b[..8] == NODE_MAGIC {
        b[24..32].copy_from_slice(&self_ptr.to_le_bytes());
        fix_node_crc(b);
    } else if b[..4] == PAGE_MAGIC[..] {
        fix_page_crc(b);
    } else if b[..4] == ZBLOCK_MAGIC {
        fix_zblock(b);
    }
}

/// A whole parallax version opened from fuzzed bytes: a root record and the contents of up to
/// four extents of four blocks (tree nodes, annotation pages, data, compressed blocks) in a
/// two-tier in-memory store, through `Parallax::open` (which validates the record and sweeps
/// every tree), then `check`, reads of the first blocks, the snapshots, the annotations and the
/// tiering status.
///
/// Input: a mode byte (bit 0: repair the root record's checksum; bit 1: repair the blocks'
/// checksums and nodes' self pointers; bit 2: also write a block, commit and reopen), the
/// number of extents − 1 (bits 0–1 of a byte; granted alternately on the two tiers: extents
/// 0, 4, 1, 5), the root record's length (u16), the record, then the blocks in extent order.
/// Checked, after a write and a commit on a version that opened: it reopens, reads the write
/// back, and, if `check` found nothing before, finds nothing after.
pub fn parallax_open(data: &[u8]) {
    keep_clock_ticking();
    let mode = byte(data, 0);
    let extents = usize::from(byte(data, 1) & 3) + 1;
    let root_len = usize::from(le_u16(&[byte(data, 2), byte(data, 3)], 0));
    let rest = tail(data, 4);
    let (root, blocks) = rest.split_at(root_len.min(rest.len()));
    let mut root = root.to_vec();
    if mode & 1 != 0 {
        fix_root_crc(&mut root);
    }
    match RootRecord::decode(&root) {
        Ok(r) if r.capacity.0 <= PX_MAX_SECTORS => {}
        // Refused by open the same way (parallax_root fuzzes that), or too large to afford.
        _ => return,
    }

    let pool = MemPool::with_tiers(&[("fast", 4), ("slow", 4)]);
    let space = Arc::new(MemSpace::new(
        pool,
        VersionKey(1),
        (PX_EXTENT_BLOCKS * BLOCK_SIZE) as u64,
    ));
    for i in 0..extents {
        space
            .grant_extent_on(i % 2)
            .expect("the pool has room for four extents");
    }
    let granted = space.extents();
    for (i, chunk) in blocks
        .chunks(BLOCK_SIZE)
        .take(extents * PX_EXTENT_BLOCKS)
        .enumerate()
    {
        let mut b = padded(chunk, BLOCK_SIZE);
        let (e, idx) = (granted[i / PX_EXTENT_BLOCKS], i % PX_EXTENT_BLOCKS);
        if mode & 2 != 0 {
            fix_block(&mut b, make_ptr(e, idx as u32));
        }
        space
            .write(e, (idx * BLOCK_SIZE) as u64, &b)
            .expect("a granted extent takes the write");
    }
    space.sync().expect("an in-memory sync");
    space.commit_root(&root).expect("an in-memory commit");

    let opts = ParallaxOptions {
        cache_bytes: 64 << 10,
        persist_every: None,
    };
    let Ok(p) = Parallax::open_with(space.clone(), opts) else {
        return;
    };
    let problems = p.check();
    let cap = p.capacity();
    let mut buf = vec![0u8; BLOCK_SIZE];
    for b in 0..16u64 {
        let at = b * 8;
        if at >= cap.0 {
            break;
        }
        let n = (cap.0 - at).min(8) as usize * 512;
        let _ = p.read(Sector(at), &mut buf[..n]);
    }
    for s in p.snapshots() {
        if let Ok(snap) = p.open_snapshot(&s.name) {
            if snap.capacity().0 >= 8 {
                let _ = snap.read(Sector(0), &mut buf);
            }
        }
    }
    if let Some(t) = p.annotations() {
        let _ = (t.totals(), t.top(3, 2), t.histogram(5));
    }
    let _ = (p.labels(), p.tier_status(), p.usage(), p.extent_groups());
    let _ = p.placement(0);

    if mode & 4 == 0 || cap.0 < 8 {
        return;
    }
    let written = [0x5au8; BLOCK_SIZE];
    if p.write(Sector(0), &written).is_err() || p.flush().is_err() {
        return;
    }
    drop(p);
    let p = Parallax::open_with(space, opts).expect("a version reopens after its own commit");
    p.read(Sector(0), &mut buf)
        .expect("a committed block reads back");
    assert_eq!(buf[..], written[..], "a committed write reads back");
    if problems.is_empty() {
        let after = p.check();
        assert!(
            after.is_empty(),
            "a sound version is unsound after a write and a commit: {after:?}"
        );
    }
}

/// A compressed block (cold data) through `decode_compressed` and `check_compressed`.
///
/// Input: a mode byte, then bytes whose meaning the mode picks. Bit 2: the bytes are 4 KiB of
/// data; if they compress into a block, it must decode back to them. Bit 1: the bytes are a zstd
/// frame, wrapped in a valid block header. Otherwise the bytes are the block (cut or padded to
/// 4096, or as they are with bit 3), with bit 0 repairing its header and checksum. Checked: a
/// block that decodes passes `check_compressed`, and what it decodes to round-trips.
pub fn compressed_block(data: &[u8]) {
    let mode = byte(data, 0);
    let rest = tail(data, 1);
    let mut out = [0u8; BLOCK_SIZE];
    if mode & 4 != 0 {
        let plain = padded(rest, BLOCK_SIZE);
        if let Some(block) = encode_compressed(&plain) {
            decode_compressed(&block, &mut out).expect("an encoded block decodes");
            assert_eq!(out[..], plain[..], "compression round trip");
        }
        return;
    }
    let block = if mode & 2 != 0 {
        let frame = &rest[..rest.len().min(BLOCK_SIZE - ZBLOCK_HEADER)];
        let mut b = vec![0u8; BLOCK_SIZE];
        b[..4].copy_from_slice(&ZBLOCK_MAGIC);
        b[4..6].copy_from_slice(&(frame.len() as u16).to_le_bytes());
        b[8..12].copy_from_slice(&crc32c::crc32c(frame).to_le_bytes());
        b[ZBLOCK_HEADER..ZBLOCK_HEADER + frame.len()].copy_from_slice(frame);
        b
    } else {
        let mut b = if mode & 8 != 0 {
            rest.to_vec()
        } else {
            padded(rest, BLOCK_SIZE)
        };
        if mode & 1 != 0 && b.len() == BLOCK_SIZE {
            fix_zblock(&mut b);
        }
        b
    };
    let checked = check_compressed(&block).is_ok();
    if decode_compressed(&block, &mut out).is_ok() {
        assert!(checked, "a block that decodes passes its check");
        if let Some(again) = encode_compressed(&out) {
            let mut back = [0u8; BLOCK_SIZE];
            decode_compressed(&again, &mut back).expect("a re-encoded block decodes");
            assert_eq!(back, out, "re-compression round trip");
        }
    }
}

/// A parallax-v2 checksum page (the crc32c of 1020 guest blocks) through `decode_sums_page`.
///
/// Input: a mode byte (bit 0: repair the page's checksum; bit 1: write the page index expected
/// into the page; bit 3: pass the page bytes as they are instead of cut or padded to 4096),
/// the disk's guest blocks (u64), the page index (u32), then the page. Checked: a page that
/// decodes encodes back to exactly its bytes (so every entry past the disk's end was zero,
/// the reserved bytes too), and a page refused leaves no entry past the disk's end set.
pub fn checksum_page(data: &[u8]) {
    let mode = byte(data, 0);
    let blocks = le_u64(&padded(tail(data, 1), 8), 0);
    let page = u64::from(le_u32(&padded(tail(data, 9), 4), 0));
    let rest = tail(data, 13);
    let mut buf = if mode & 8 != 0 {
        rest.to_vec()
    } else {
        padded(rest, BLOCK_SIZE)
    };
    if buf.len() == BLOCK_SIZE {
        if mode & 2 != 0 {
            buf[8..12].copy_from_slice(&(page as u32).to_le_bytes());
        }
        if mode & 1 != 0 {
            buf[12..16].fill(0);
            let crc = crc32c::crc32c(&buf);
            buf[12..16].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let mut out = vec![0u32; SUMS_PER_PAGE as usize];
    match decode_sums_page(&buf, page, blocks, &mut out) {
        Ok(()) => {
            let mut back = vec![0u8; BLOCK_SIZE];
            encode_sums_page(page, &out, &mut back);
            assert!(
                back == buf,
                "a decoded checksum page encodes back to other bytes"
            );
        }
        Err(why) => assert!(!why.is_empty() && !why.contains('\n'), "error {why:?}"),
    }
    let first = page.saturating_mul(SUMS_PER_PAGE);
    for (i, s) in out.iter().enumerate() {
        if first.saturating_add(i as u64) >= blocks {
            assert_eq!(*s, 0, "entry {i}, past the disk's end, was set");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// annotations, presence maps
// ---------------------------------------------------------------------------------------------

/// An annotation page through `Table::load_page` into a table of 1 to 4096 blocks.
///
/// Input: a mode byte (bit 0: repair the checksum; bit 1: write the page index expected into
/// the page; bit 3: pass the page bytes as they are instead of cut or padded to 4096), the
/// table's blocks − 1 (u16, low 12 bits), the page index (a byte, modulo pages + 1, so one past
/// the end too), the defined labels' mask (u16), then the page. Checked: a page that loads is
/// all zeros or valid by `page_is_valid`, and (unless all zeros) encodes back to itself; the
/// re-encoded page loads to the same records; a page that does not load leaves the table
/// unchanged; queries over the table do not panic; every 16-byte record that decodes
/// re-encodes to itself.
pub fn annotation_page(data: &[u8]) {
    keep_clock_ticking();
    let mode = byte(data, 0);
    let blocks = u64::from(le_u16(&[byte(data, 1), byte(data, 2)], 0) & 0x0fff) + 1;
    let pages = Table::pages_for(blocks);
    let page = u64::from(byte(data, 3)) % (pages + 1);
    let labels = le_u16(&[byte(data, 4), byte(data, 5)], 0);
    let rest = tail(data, 6);
    let mut buf = if mode & 8 != 0 {
        rest.to_vec()
    } else {
        padded(rest, PAGE_BYTES)
    };
    if buf.len() == PAGE_BYTES {
        if mode & 2 != 0 {
            buf[8..12].copy_from_slice(&(page as u32).to_le_bytes());
        }
        if mode & 1 != 0 {
            fix_page_crc(&mut buf);
        }
    }
    let epochs = Epochs {
        base: 1_600_000_000,
        secs: 600,
    };
    let table = Table::new(blocks, epochs);
    match table.load_page(page, &buf, labels) {
        Ok(()) => {
            let zero = buf.iter().all(|&b| b == 0);
            assert!(zero || page_is_valid(&buf), "a loaded page is valid");
            let mut enc = vec![0u8; PAGE_BYTES];
            table.encode_page(page, &mut enc);
            if !zero {
                assert_eq!(enc, buf, "a loaded page encodes back to its bytes");
            }
            let other = Table::new(blocks, epochs);
            other
                .load_page(page, &enc, labels)
                .expect("an encoded page loads");
            for b in table.page_blocks(page) {
                assert_eq!(other.get(b), table.get(b), "block {b}");
            }
            let _ = (
                table.totals(),
                table.top(4, 3),
                table.histogram(7),
                table.ranges_with(labels),
            );
        }
        Err(_) => {
            for b in 0..blocks {
                assert_eq!(
                    table.get(b),
                    Annotation::default(),
                    "a refused page changed block {b}"
                );
            }
        }
    }
    for rec in rest.chunks_exact(16) {
        if let Ok(a) = Annotation::decode(rec) {
            let mut out = [0u8; 16];
            a.encode(&mut out);
            assert_eq!(out[..], rec[..], "record round trip");
        }
    }
}

/// A presence map file through `PresenceMap::open`, and if it opens, a few inserts, a
/// persist, a clean close and a reopen.
///
/// Input: a mode byte (bit 0: repair the header checksum; bit 1: ask for one block more than
/// the header says, the mismatch path; bit 2: repair every bitmap page's checksum, the format
/// version 2 path past the checksums), then the file. The expected block count and version key
/// are the ones the header states. Checked: an opened map holds exactly the bitmap's bits
/// (format version 1, upgraded on open; or version 2, where a page failing its checksum holds
/// none and is reported); after inserts, persist and a clean close it reopens clean with the old
/// bits and the new ones, with no bad page.
pub fn presence_map(data: &[u8]) {
    let mode = byte(data, 0);
    let mut file = tail(data, 1).to_vec();
    if mode & 1 != 0 && file.len() >= 40 {
        let crc = crc32c::crc32c(&file[..36]);
        file[36..40].copy_from_slice(&crc.to_le_bytes());
    }
    let (mut blocks, key) = if file.len() >= 32 {
        (le_u64(&file, 16), le_u64(&file, 24))
    } else {
        (0, 0)
    };
    if mode & 4 != 0 && file.len() > HEADER_SIZE as usize {
        for (i, page) in file[HEADER_SIZE as usize..]
            .chunks_exact_mut(4096)
            .enumerate()
        {
            let mut seed = key.to_le_bytes().to_vec();
            seed.extend_from_slice(&(i as u64).to_le_bytes());
            let crc = crc32c::crc32c_append(crc32c::crc32c(&seed), &page[..4092]);
            page[4092..].copy_from_slice(&crc.to_le_bytes());
        }
    }
    if mode & 2 != 0 {
        blocks = blocks.wrapping_add(1);
    }
    let path = scratch_path("presence.map");
    if std::fs::write(&path, &file).is_err() {
        return;
    }
    presence_map_at(&path, &file, blocks, key);
    let _ = std::fs::remove_file(&path);
}

// ---------------------------------------------------------------------------------------------
/// A migration record (`maps/<key>.migration`) through `MigrationRecord::decode` and, as a
/// file in a scratch `maps/` directory, `MigrationRecord::read`, then `write` and `read` again.
///
/// Input: a mode byte (bit 0: repair the checksum of a 64-byte record; bit 1: expect the key
/// the record states, bytes 16..24, instead of key 7), then the file. Checked: `read` agrees
/// with `decode` (a file over 4 KiB is refused unread); a version 2 record decodes only from
/// its own encoding (so it re-encodes to the same bytes), with `verified <= blocks` and the
/// expected key; a version 1 record (JSON) has a mode, and no block count or cursor; an error
/// is one line; whatever decodes is written back as version 2 and reads back equal.
pub fn migration_record(data: &[u8]) {
    let mode = byte(data, 0);
    let mut file = tail(data, 1).to_vec();
    if mode & 1 != 0 && file.len() == RECORD_SIZE {
        let crc = crc32c::crc32c(&file[..60]);
        file[60..64].copy_from_slice(&crc.to_le_bytes());
    }
    let key = if mode & 2 != 0 && file.len() >= 24 {
        le_u64(&file, 16)
    } else {
        7
    };
    let path = Path::new("maps").join(record_name(key));
    let decoded = MigrationRecord::decode(&file, &path, key);
    match &decoded {
        Ok((r, version)) => {
            assert_eq!(r.key, key, "a record is for the key expected");
            assert!(r.verified <= r.blocks || *version == 1, "{r:?}");
            match *version {
                RECORD_VERSION => assert_eq!(&r.encode()[..], &file[..], "re-encodes exactly"),
                1 => assert!(
                    r.mode.is_some() && r.blocks == 0 && r.verified == 0,
                    "version 1: {r:?}"
                ),
                v => panic!("decoded as version {v}"),
            }
            let again = MigrationRecord::decode(&r.encode(), &path, key).expect("round trip");
            assert_eq!(again, (*r, RECORD_VERSION));
        }
        Err(e) => assert!(!e.to_string().contains('\n'), "one line: {e}"),
    }
    let dir = scratch_path("maps");
    if std::fs::create_dir(&dir).is_err() {
        return;
    }
    migration_record_in(&dir, &file, key, decoded.ok());
    let _ = std::fs::remove_dir_all(&dir);
}

fn migration_record_in(dir: &Path, file: &[u8], key: u64, decoded: Option<(MigrationRecord, u32)>) {
    if std::fs::write(dir.join(record_name(key)), file).is_err() {
        return;
    }
    match MigrationRecord::read(dir, key) {
        Ok(Some(got)) => {
            assert!(file.len() <= 4096, "a record over 4 KiB is refused");
            assert_eq!(Some(got), decoded, "read agrees with decode");
            got.0.write(dir).expect("write the record back");
            let back = MigrationRecord::read(dir, key).expect("read it again");
            assert_eq!(back, Some((got.0, RECORD_VERSION)));
        }
        Ok(None) => panic!("a record that is there reads as missing"),
        Err(e) => {
            assert!(
                file.len() > 4096 || decoded.is_none(),
                "read refused what decode accepted: {e}"
            );
        }
    }
}

fn presence_map_at(path: &Path, file: &[u8], blocks: u64, key: u64) {
    let Ok(map) = PresenceMap::open(path, blocks, key) else {
        return;
    };
    let bitmap = &file[HEADER_SIZE as usize..];
    let v1 = le_u32(file, 8) == 1;
    let bpp = BLOCKS_PER_PAGE;
    let bad = map.bad_pages().to_vec();
    let bit = |b: u64| {
        if v1 {
            bitmap[(b / 8) as usize] & (1 << (b % 8)) != 0
        } else {
            let (p, r) = (b / bpp, b % bpp);
            !bad.contains(&p) && bitmap[(p * 4096 + r / 8) as usize] & (1 << (r % 8)) != 0
        }
    };
    let count: u64 = if v1 {
        bitmap.iter().map(|b| u64::from(b.count_ones())).sum()
    } else {
        bitmap
            .chunks_exact(4096)
            .enumerate()
            .filter(|(p, _)| !bad.contains(&(*p as u64)))
            .map(|(_, page)| {
                page[..4088]
                    .iter()
                    .map(|b| u64::from(b.count_ones()))
                    .sum::<u64>()
            })
            .sum()
    };
    assert_eq!(map.count(), count, "an opened map counts its bitmap's bits");
    assert_eq!(map.blocks(), blocks);
    for b in 0..blocks.min(4096) {
        assert_eq!(map.contains(b), bit(b), "block {b}");
    }
    let first_absent = (0..blocks).find(|&b| !bit(b));
    if blocks <= 1 << 16 {
        assert_eq!(map.next_absent(0), first_absent);
    }
    let added: Vec<u64> = [0, blocks / 2, blocks.saturating_sub(1)]
        .into_iter()
        .filter(|&b| b < blocks && !bit(b))
        .collect();
    for &b in &added {
        map.insert(b);
    }
    let mut unique = added.clone();
    unique.sort_unstable();
    unique.dedup();
    map.persist().expect("a persist to a temporary file");
    map.close_clean()
        .expect("a clean close of a temporary file");
    drop(map);
    let again = PresenceMap::open(path, blocks, key).expect("a persisted map reopens");
    assert!(again.was_clean(), "a map closed clean reopens clean");
    assert!(
        again.bad_pages().is_empty(),
        "a persist rewrites every bad page"
    );
    assert_eq!(again.count(), count + unique.len() as u64);
    for &b in &unique {
        assert!(again.contains(b), "inserted block {b} persisted");
    }
}

// ---------------------------------------------------------------------------------------------
// fault_rule: the strings of the catalog and the command line
// ---------------------------------------------------------------------------------------------

/// Strings a tee record and the command line carry: each line through `FaultRule::from_str`
/// (a tee record holds up to 16 rules), the whole string through the policy, migration mode,
/// class, name and label parsers and `one_line_reason`. Parsed rules (but `panic`, whose job
/// is to panic) then run in a `FaultLayout` over a small in-memory disk.
///
/// Checked: a parsed rule passes `check`, and its canonical form (`Display`) parses back to
/// the same rule and prints the same; a quarantine reason is one line of at most 4096 bytes
/// without surrounding blanks; the fault layout returns errors, never panics.
pub fn fault_rule(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = s.parse::<Policy>();
    let _ = MigrationMode::parse(s);
    let _ = Class::parse(s);
    let _ = (check_tier_name(s), check_disk_name(s), check_layout_name(s));
    let _ = (check_label(s), check_name(s));
    let reason = one_line_reason(s);
    assert!(reason.len() <= MAX_TEE_REASON, "reason of {}", reason.len());
    assert!(!reason.chars().any(char::is_control), "{reason:?}");
    assert!(
        reason.trim() == reason,
        "a reason of {} bytes has surrounding blanks",
        reason.len()
    );

    let mut rules = Vec::new();
    for spec in s.lines().take(16) {
        let Ok(rule) = spec.parse::<FaultRule>() else {
            continue;
        };
        rule.check().expect("a parsed rule passes check");
        let canon = rule.to_string();
        let back: FaultRule = canon.parse().expect("a rule's canonical form parses");
        assert_eq!(back, rule, "{spec:?} -> {canon:?}");
        assert_eq!(back.to_string(), canon, "the canonical form is stable");
        if rule.kind != FaultKind::Panic {
            rules.push(rule);
        }
    }
    if rules.is_empty() {
        return;
    }
    let inner = Arc::new(MemLayout::new(Sectors(64)));
    let f = FaultLayout::new(inner, rules, 7);
    let mut buf = vec![0x33u8; BLOCK_SIZE];
    for round in 0..3u64 {
        for at in [0, 8, 56, 60, 63] {
            let n = (64 - at).min(8) as usize * 512;
            let _ = f.write(Sector(at), &buf[..n]);
            let _ = f.read(Sector(at), &mut buf[..n]);
        }
        let _ = f.write_zeroes(Sector(round * 8), Sectors(8), round == 1);
        let _ = f.discard(Sector(48), Sectors(16));
        let _ = f.flush();
    }
    let _ = (f.injected(), f.rule_hits());
}
