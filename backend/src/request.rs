//! virtio-blk request parsing and execution.
//!
//! A request is one descriptor chain: device-readable buffers (a 16-byte header, then any data the
//! driver sends) followed by device-writable buffers (any data the device returns, then one status
//! byte). Framing is free (VIRTIO_F_VERSION_1 implies ANY_LAYOUT), so the chain is treated as two
//! byte streams rather than as "one descriptor per part".
//!
//! Everything here is untrusted input. Every value is checked before any I/O; a bad request gets
//! `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP` and a `warn!`, never a panic, and the queue keeps
//! running. A [`RequestWorker`] is owned by one queue's worker thread and reuses its buffers, so
//! the steady state allocates nothing per request.

use std::fmt;
use std::time::Duration;

use dovetail_layout::iobuf::{release_scratch, RETAINED_SCRATCH};
use dovetail_layout::{check_range, error_chain, BlockLayout, IoBuf, Sector, Sectors, SECTOR_SIZE};
use dovetail_store::le::{le_u32, le_u64};
use log::warn;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::disk::Disk;
use crate::metrics::{ReqOp, RequestMetrics};
use crate::split::{self, Helper, SPLIT_BYTES};

/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_LEN: usize = 16;
/// Size of one `struct virtio_blk_discard_write_zeroes` segment.
pub const DISCARD_SEG_LEN: usize = 16;
/// Largest data transfer accepted in one IN/OUT request. Larger requests get UNSUPP.
pub const MAX_REQUEST_BYTES: usize = 32 << 20;
/// Largest number of segments in one DISCARD / WRITE_ZEROES request (advertised in config).
pub const MAX_DISCARD_SEGS: usize = 32;
/// Largest number of sectors in one discard / write-zeroes segment (advertised in config).
pub const MAX_DISCARD_SECTORS: u32 = (1 << 22) - 1;
/// Most descriptors one chain may have, indirect tables included (QEMU's `VIRTQUEUE_MAX_SIZE`,
/// and the largest queue size offered). A longer chain gets `VIRTIO_BLK_S_UNSUPP`; the worker
/// never records more than this many segments, so its buffers stay bounded.
pub const MAX_CHAIN_DESCRIPTORS: usize = 1024;

/// One guest buffer of a descriptor chain.
#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// Why a request was refused or failed; logged once, then mapped to a status byte.
#[derive(Debug)]
enum Reject {
    /// Malformed or unsupported request: `VIRTIO_BLK_S_UNSUPP`.
    Unsupp(String),
    /// Well-formed request that cannot be carried out: `VIRTIO_BLK_S_IOERR`.
    IoErr(String),
}

impl Reject {
    fn status(&self) -> u8 {
        match self {
            Reject::Unsupp(_) => VIRTIO_BLK_S_UNSUPP as u8,
            Reject::IoErr(_) => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reject::Unsupp(m) => write!(f, "unsupported request ({m})"),
            Reject::IoErr(m) => write!(f, "I/O error ({m})"),
        }
    }
}

/// A discard / write-zeroes segment as read from the guest, before validation.
#[derive(Debug, Clone, Copy, Default)]
struct RangeSeg {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}

/// Per-queue request state: reusable buffers, so a request does not allocate once warmed up.
#[derive(Debug, Default)]
pub struct RequestWorker {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    /// Host addresses of the current request's data buffers.
    iobufs: Vec<IoBuf>,
    /// Scratch for layouts that cannot transfer straight to guest memory.
    bounce: Vec<u8>,
    /// The queue's helper for large transfers, started at the first one.
    helper: Option<Helper>,
    helper_tried: bool,
    queue: usize,
    /// Set by `execute` when asked to leave a request's I/O to the caller (`begin`).
    deferred: Option<(IoKind, Sector, usize)>,
    /// The sector of the request being executed, once its header was read (for the log line
    /// of a request that panics).
    sector: Option<u64>,
    /// Whether reads must mark the guest pages they fill (a live migration runs).
    log: crate::dirty::DirtyLog,
}

/// The I/O a [`Pending`] request leaves to its queue's engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// IN: `len` bytes from the disk into the guest buffers.
    Read,
    /// OUT: `len` bytes of the guest buffers to the disk.
    Write,
    /// FLUSH: a barrier, then the layout's flush.
    Flush,
}

/// A checked request whose I/O the queue worker carries out itself (an engine keeps many in
/// flight); [`RequestWorker::finish`] writes its status once that I/O completed.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    pub kind: IoKind,
    pub at: Sector,
    pub len: usize,
    status_addr: GuestAddress,
    op: ReqOp,
}

/// What [`RequestWorker::begin`] made of a chain.
#[derive(Debug)]
pub enum Begun {
    /// Answered already (refused, or carried out synchronously): its completion.
    Done(Completion),
    /// Checked; its data buffers are in the worker's scatter list ([`RequestWorker::take_iobufs`]).
    Io(Pending),
}

/// The outcome of one request, for the used ring, the metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Bytes written into device-writable buffers (data plus the status byte): the used length.
    pub used_len: u32,
    /// The status byte written, or `None` if the chain had no room for one.
    pub status: Option<u8>,
    /// What the request was; [`ReqOp::Unsupported`] for an unknown type and for a request
    /// rejected before its type was known (no status byte, short or unreadable header,
    /// misordered descriptors).
    pub op: ReqOp,
    /// Data bytes the request moved: the length read (IN) or written (OUT), the bytes covered by
    /// all segments (DISCARD, WRITE_ZEROES), 0 for FLUSH, GET_ID and anything else. 0 when the
    /// request was refused or failed (but kept when only writing the status byte failed).
    pub bytes: u64,
}

impl Completion {
    /// A request that cannot be answered: nothing goes in the used ring but its length.
    fn dropped(op: ReqOp) -> Completion {
        Completion {
            used_len: 0,
            status: None,
            op,
            bytes: 0,
        }
    }

    /// Whether the request completed with `VIRTIO_BLK_S_OK`.
    pub fn ok(&self) -> bool {
        self.status == Some(VIRTIO_BLK_S_OK as u8)
    }

    /// Records this completion, which took `took`, in a disk's request metrics.
    #[inline]
    pub fn record(&self, metrics: &RequestMetrics, took: Duration) {
        metrics.record(self.op, self.bytes, self.ok(), took);
    }
}

/// What a request carried out: bytes written to the guest (for the used length) and data bytes
/// moved (for the metrics).
#[derive(Debug, Clone, Copy)]
struct Done {
    used_data: u32,
    bytes: u64,
}

impl Done {
    fn new(used_data: u32, bytes: u64) -> Done {
        Done { used_data, bytes }
    }
}

/// The metrics label of a request type.
fn req_op(req_type: u32) -> ReqOp {
    match req_type {
        VIRTIO_BLK_T_IN => ReqOp::Read,
        VIRTIO_BLK_T_OUT => ReqOp::Write,
        VIRTIO_BLK_T_FLUSH => ReqOp::Flush,
        VIRTIO_BLK_T_GET_ID => ReqOp::GetId,
        VIRTIO_BLK_T_DISCARD => ReqOp::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => ReqOp::WriteZeroes,
        _ => ReqOp::Unsupported,
    }
}

impl RequestWorker {
    /// Creates a worker with empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the worker mark the guest pages its reads fill while `log` is on (the
    /// connection's dirty logging, `dirty.rs`).
    pub fn set_dirty_log(&mut self, log: crate::dirty::DirtyLog) {
        self.log = log;
    }

    /// Parses and executes one descriptor chain against `disk`, writes the status byte, and
    /// returns what to put in the used ring. `queue` only labels log lines.
    pub fn process<M, I>(&mut self, disk: &Disk, mem: &M, chain: I, queue: usize) -> Completion
    where
        M: GuestMemory,
        I: Iterator<Item = Descriptor>,
    {
        match self.begin(disk, disk.layout(), mem, chain, queue, false) {
            Begun::Done(c) => c,
            // Not asked to defer: never happens, but completes correctly if it did.
            Begun::Io(p) => self.finish(mem, &p, &[], Ok(())),
        }
    }

    /// Parses and checks one chain like [`process`](RequestWorker::process). With `defer`, the
    /// I/O of IN, OUT and FLUSH is left to the caller: their data buffers are resolved into the
    /// worker's scatter list (take it with [`take_iobufs`](RequestWorker::take_iobufs)) and a
    /// [`Pending`] is returned, to [`finish`](RequestWorker::finish) once carried out. Every
    /// other request is carried out at once on `layout` (the disk's layout, or the one pinned
    /// for this batch).
    pub fn begin<M, I>(
        &mut self,
        disk: &Disk,
        layout: &dyn BlockLayout,
        mem: &M,
        chain: I,
        queue: usize,
        defer: bool,
    ) -> Begun
    where
        M: GuestMemory,
        I: Iterator<Item = Descriptor>,
    {
        self.queue = queue;
        self.deferred = None;
        self.readable.clear();
        self.writable.clear();
        let mut misordered = false;
        let mut seen_writable = false;
        let mut count = 0usize;
        // Whether the last descriptor yielded says another follows: virtio-queue ends a chain
        // silently when it loops (runs out of its queue-size budget), names a descriptor past
        // the table, cannot read a descriptor or indirect table, or passes 4 GiB in total.
        let mut cut_short = false;
        // The last device-writable descriptor with room: its last byte is the status byte.
        let mut last_writable: Option<Segment> = None;
        for desc in chain {
            count += 1;
            cut_short = desc.has_next();
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            let keep = count <= MAX_CHAIN_DESCRIPTORS;
            if desc.is_write_only() {
                seen_writable = true;
                if seg.len > 0 {
                    last_writable = Some(seg);
                }
                if keep {
                    self.writable.push(seg);
                }
            } else if !seen_writable {
                if keep {
                    self.readable.push(seg);
                }
            } else {
                misordered = true;
            }
        }

        if count == 0 {
            warn!("queue {queue}: empty descriptor chain (head past the table, or a bad indirect table); dropped");
            return Begun::Done(Completion::dropped(ReqOp::Unsupported));
        }
        if cut_short {
            // There is no last descriptor, so no status byte: nothing is executed or written.
            warn!(
                "queue {queue}: descriptor chain cut short after {count} descriptors (a loop, a \
                 next index past the table, an unreadable descriptor, or over 4 GiB); dropped"
            );
            return Begun::Done(Completion::dropped(ReqOp::Unsupported));
        }

        // The status byte is the last byte of the device-writable area.
        let Some(status_addr) =
            last_writable.and_then(|s| s.addr.checked_add(u64::from(s.len) - 1))
        else {
            warn!("queue {queue}: request without a status byte (no device-writable descriptor with room); dropped");
            return Begun::Done(Completion::dropped(ReqOp::Unsupported));
        };

        if mem.read_obj::<u8>(status_addr).is_err() {
            warn!(
                "queue {queue}: status byte at {:#x} is not in guest memory; request dropped unexecuted",
                status_addr.0
            );
            return Begun::Done(Completion::dropped(ReqOp::Unsupported));
        }

        let mut op = ReqOp::Unsupported;
        let (done, status) = if misordered || count > MAX_CHAIN_DESCRIPTORS {
            let r = if misordered {
                Reject::Unsupp("device-readable descriptor after a device-writable one".into())
            } else {
                Reject::Unsupp(format!(
                    "chain of {count} descriptors (at most {MAX_CHAIN_DESCRIPTORS})"
                ))
            };
            warn!("queue {queue}: {r}");
            (Done::new(0, 0), r.status())
        } else {
            // The panic boundary: a request that panics is answered IOERR, counted and
            // logged, and the queue carries on (its buffers are cleared by the next `begin`).
            self.sector = None;
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.execute(disk, layout, mem, &mut op, defer)
            }));
            let run = run.unwrap_or_else(|payload| {
                self.deferred = None;
                let cause = crate::disk::panic_message(&*payload);
                let what = match self.sector {
                    Some(s) => format!("{} at sector {s}", op.label()),
                    None => op.label().to_string(),
                };
                disk.request_panicked(queue, &what, &cause);
                Err(Reject::IoErr(format!("{what}: panicked: {cause}")))
            });
            match run {
                Ok(done) => {
                    if let Some((kind, at, len)) = self.deferred.take() {
                        return Begun::Io(Pending {
                            kind,
                            at,
                            len,
                            status_addr,
                            op,
                        });
                    }
                    (done, VIRTIO_BLK_S_OK as u8)
                }
                Err(r) => {
                    warn!("queue {queue}: {r}");
                    (Done::new(0, 0), r.status())
                }
            }
        };

        if let Err(e) = mem.write_obj(status, status_addr) {
            warn!(
                "queue {queue}: status byte at {:#x} is not in guest memory: {e}",
                status_addr.0
            );
            // Carried out, but the guest cannot be told: the data did move.
            return Begun::Done(Completion {
                bytes: done.bytes,
                ..Completion::dropped(op)
            });
        }
        Begun::Done(Completion {
            used_len: done.used_data + 1,
            status: Some(status),
            op,
            bytes: done.bytes,
        })
    }

    /// The scatter list `begin` resolved for a [`Pending`] IN or OUT, swapped for `spare` (an
    /// empty list whose allocation the worker keeps for the next request).
    pub fn take_iobufs(&mut self, spare: &mut Vec<IoBuf>) {
        spare.clear();
        std::mem::swap(&mut self.iobufs, spare);
    }

    /// Completes a [`Pending`] request whose I/O ended with `result`: marks the guest pages a
    /// read filled (`bufs`, its guest buffers) dirty while a migration runs, writes its status
    /// byte and returns what to put in the used ring.
    pub fn finish<M: GuestMemory>(
        &mut self,
        mem: &M,
        p: &Pending,
        bufs: &[IoBuf],
        result: Result<(), String>,
    ) -> Completion {
        // Even a failed read may have filled part of its buffers.
        if p.kind == IoKind::Read && self.log.on() {
            crate::dirty::mark_written(mem, bufs);
        }
        let (status, data) = match result {
            Ok(()) => (VIRTIO_BLK_S_OK as u8, p.len),
            Err(e) => {
                let what = match p.kind {
                    IoKind::Read => "read",
                    IoKind::Write => "write",
                    IoKind::Flush => "flush",
                };
                let r = if p.kind == IoKind::Flush {
                    Reject::IoErr(format!("flush: {e}"))
                } else {
                    Reject::IoErr(format!("{what} at {}: {e}", p.at))
                };
                warn!("queue {}: {r}", self.queue);
                (r.status(), 0)
            }
        };
        let bytes = if p.kind == IoKind::Flush {
            0
        } else {
            data as u64
        };
        if let Err(e) = mem.write_obj(status, p.status_addr) {
            warn!(
                "queue {}: status byte at {:#x} is not in guest memory: {e}",
                self.queue, p.status_addr.0
            );
            return Completion {
                bytes,
                ..Completion::dropped(p.op)
            };
        }
        let used_data = if p.kind == IoKind::Read {
            data as u32
        } else {
            0
        };
        Completion {
            used_len: used_data + 1,
            status: Some(status),
            op: p.op,
            bytes,
        }
    }

    fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Device-writable bytes available for data (everything but the status byte).
    fn writable_data_len(&self) -> u64 {
        self.writable
            .iter()
            .map(|s| u64::from(s.len))
            .sum::<u64>()
            .saturating_sub(1)
    }

    /// Runs a request whose status byte is known to exist. Returns the number of data bytes
    /// written to the guest and the data bytes moved; sets `op` once the type is known.
    fn execute<M: GuestMemory>(
        &mut self,
        disk: &Disk,
        layout: &dyn BlockLayout,
        mem: &M,
        op: &mut ReqOp,
        defer: bool,
    ) -> Result<Done, Reject> {
        let out_len = self.readable_len();
        if out_len < HEADER_LEN as u64 {
            return Err(Reject::Unsupp(format!(
                "header is {out_len} bytes, expected {HEADER_LEN}"
            )));
        }
        let mut header = [0u8; HEADER_LEN];
        copy_from_guest(mem, &self.readable, 0, &mut header)?;
        let req_type = le_u32(&header, 0);
        *op = req_op(req_type);
        let sector = le_u64(&header, 8);
        self.sector = Some(sector);
        if let (Some(why), true) = (disk.failed(), req_type != VIRTIO_BLK_T_GET_ID) {
            return Err(Reject::IoErr(format!("{}: failed: {why}", disk.name())));
        }
        let data_out = out_len - HEADER_LEN as u64;
        let data_in = self.writable_data_len();

        match req_type {
            VIRTIO_BLK_T_IN => {
                expect_no_data("IN", "driver-to-device", data_out)?;
                let len = transfer_len("IN", data_in)?;
                let at = checked_range(disk, sector, len)?;
                host_bufs(
                    mem,
                    &self.writable,
                    0,
                    len,
                    Permissions::Write,
                    &mut self.iobufs,
                )?;
                if defer {
                    self.deferred = Some((IoKind::Read, at, len));
                    return Ok(Done::new(len as u32, len as u64));
                }
                // The transfer may split the list (`split.rs`): the buffers to mark are kept.
                let filled = self.log.on().then(|| self.iobufs.clone());
                let r = self.transfer(disk, at, len, false);
                if let Some(bufs) = filled {
                    crate::dirty::mark_written(mem, &bufs);
                }
                r.map_err(|e| Reject::IoErr(format!("read at {at}: {}", error_chain(&e))))?;
                Ok(Done::new(len as u32, len as u64))
            }
            VIRTIO_BLK_T_OUT => {
                expect_no_data("OUT", "device-to-driver", data_in)?;
                let len = transfer_len("OUT", data_out)?;
                let at = checked_range(disk, sector, len)?;
                writable(disk, "OUT")?;
                host_bufs(
                    mem,
                    &self.readable,
                    HEADER_LEN,
                    len,
                    Permissions::Read,
                    &mut self.iobufs,
                )?;
                if defer {
                    self.deferred = Some((IoKind::Write, at, len));
                    return Ok(Done::new(0, len as u64));
                }
                self.transfer(disk, at, len, true)
                    .map_err(|e| Reject::IoErr(format!("write at {at}: {}", error_chain(&e))))?;
                Ok(Done::new(0, len as u64))
            }
            VIRTIO_BLK_T_FLUSH => {
                if defer {
                    self.deferred = Some((IoKind::Flush, Sector(0), 0));
                    return Ok(Done::new(0, 0));
                }
                layout.flush().map_err(|e| {
                    let e = error_chain(&e);
                    disk.flush_failed(&e);
                    Reject::IoErr(format!("flush: {e}"))
                })?;
                Ok(Done::new(0, 0))
            }
            VIRTIO_BLK_T_GET_ID => {
                if data_in == 0 {
                    return Err(Reject::Unsupp(
                        "GET_ID without a device-writable buffer".into(),
                    ));
                }
                let n = (VIRTIO_BLK_ID_BYTES as u64).min(data_in) as usize;
                copy_to_guest(mem, &self.writable, &disk.serial()[..n])?;
                Ok(Done::new(n as u32, 0))
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let zeroes = req_type == VIRTIO_BLK_T_WRITE_ZEROES;
                let name = if zeroes { "WRITE_ZEROES" } else { "DISCARD" };
                if !disk.supports_discard() {
                    return Err(Reject::Unsupp(format!("{name} on a read-only disk")));
                }
                expect_no_data(name, "device-to-driver", data_in)?;
                let covered = self.range_ops(disk, layout, mem, name, zeroes, data_out)?;
                Ok(Done::new(0, covered))
            }
            other => Err(Reject::Unsupp(format!("request type {other}"))),
        }
    }

    /// Moves the data of an IN or OUT whose guest buffers are in `self.iobufs`.
    fn transfer(
        &mut self,
        disk: &Disk,
        at: Sector,
        len: usize,
        write: bool,
    ) -> dovetail_layout::Result<()> {
        if len >= SPLIT_BYTES && !write && !self.helper_tried {
            self.helper_tried = true;
            self.helper = Helper::start(self.queue);
        }
        // SAFETY: every entry of `iobufs` was just resolved by vm-memory's bounds-checked
        // `get_slices` within the guest memory mapping, which the caller's `mem` keeps mapped
        // until this request is complete.
        let r = unsafe {
            split::transfer(
                disk.layout_arc(),
                self.helper.as_mut(),
                at,
                len,
                &mut self.iobufs,
                write,
                &mut self.bounce,
            )
        };
        self.release_burst();
        r
    }

    /// Gives back what a request larger than [`RETAINED_SCRATCH`] grew: the bounce buffers (the
    /// worker's and its helper's) go back to at most that size, so a queue keeps at most about
    /// 2 MiB between requests however large the guest's requests were (up to
    /// [`MAX_REQUEST_BYTES`] each). The segment and iovec vectors are bounded by the chain length
    /// (at most [`MAX_CHAIN_DESCRIPTORS`] entries) and kept.
    fn release_burst(&mut self) {
        release_scratch(&mut self.bounce, RETAINED_SCRATCH);
        if let Some(h) = self.helper.as_mut() {
            h.release_scratch(RETAINED_SCRATCH);
        }
    }

    /// Bytes of data buffers this worker keeps between requests (its bounce buffer and its
    /// helper's), for tests of the bound.
    pub fn retained_scratch(&self) -> usize {
        self.bounce.capacity() + self.helper.as_ref().map_or(0, |h| h.scratch_capacity())
    }

    /// DISCARD and WRITE_ZEROES: validate every segment first, then apply them, so a bad segment
    /// anywhere in the request means nothing is changed. Returns the bytes the segments cover.
    fn range_ops<M: GuestMemory>(
        &mut self,
        disk: &Disk,
        layout: &dyn BlockLayout,
        mem: &M,
        name: &str,
        zeroes: bool,
        data_out: u64,
    ) -> Result<u64, Reject> {
        if data_out == 0 || data_out % DISCARD_SEG_LEN as u64 != 0 {
            return Err(Reject::Unsupp(format!(
                "{name} payload of {data_out} bytes is not a positive multiple of {DISCARD_SEG_LEN}"
            )));
        }
        let count = data_out / DISCARD_SEG_LEN as u64;
        if count > MAX_DISCARD_SEGS as u64 {
            return Err(Reject::Unsupp(format!(
                "{name} with {count} segments (at most {MAX_DISCARD_SEGS})"
            )));
        }
        // Copied out of guest memory once: the guest cannot change them between check and use.
        let mut segs = [RangeSeg::default(); MAX_DISCARD_SEGS];
        let segs = &mut segs[..count as usize];
        let allowed_flags = if zeroes {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        for (i, seg) in segs.iter_mut().enumerate() {
            let mut raw = [0u8; DISCARD_SEG_LEN];
            copy_from_guest(
                mem,
                &self.readable,
                HEADER_LEN + i * DISCARD_SEG_LEN,
                &mut raw,
            )?;
            *seg = RangeSeg {
                sector: le_u64(&raw, 0),
                num_sectors: le_u32(&raw, 8),
                flags: le_u32(&raw, 12),
            };
            if seg.flags & !allowed_flags != 0 {
                return Err(Reject::Unsupp(format!(
                    "{name} segment {i} has reserved flags {:#x}",
                    seg.flags
                )));
            }
            if seg.num_sectors > MAX_DISCARD_SECTORS {
                return Err(Reject::IoErr(format!(
                    "{name} segment {i} of {} sectors (at most {MAX_DISCARD_SECTORS})",
                    seg.num_sectors
                )));
            }
            check_range(
                Sector(seg.sector),
                Sectors(u64::from(seg.num_sectors)),
                disk.capacity(),
            )
            .map_err(|e| Reject::IoErr(format!("{name} segment {i}: {e}")))?;
        }
        let mut covered = 0u64;
        for seg in segs.iter() {
            let (at, len) = (Sector(seg.sector), Sectors(u64::from(seg.num_sectors)));
            let res = if zeroes {
                let unmap = seg.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                layout.write_zeroes(at, len, unmap)
            } else {
                layout.discard(at, len)
            };
            res.map_err(|e| Reject::IoErr(format!("{name} at {at}: {}", error_chain(&e))))?;
            // At most 32 segments of < 2^22 sectors each: no overflow.
            covered += u64::from(seg.num_sectors) * SECTOR_SIZE;
        }
        Ok(covered)
    }
}

/// Resolves `len` bytes of the guest buffers `segs`, starting `skip` bytes in, to host buffers
/// in `out` (cleared first; reused across requests, so it allocates only when a request has more
/// pieces than any before it).
fn host_bufs<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    mut skip: usize,
    len: usize,
    access: Permissions,
    out: &mut Vec<IoBuf>,
) -> Result<(), Reject> {
    out.clear();
    let mut left = len;
    for seg in segs {
        if left == 0 {
            break;
        }
        let seg_len = seg.len as usize;
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min(left);
        let addr = seg
            .addr
            .checked_add(skip as u64)
            .ok_or_else(|| Reject::IoErr("descriptor address overflows".into()))?;
        let bad = |e: vm_memory::GuestMemoryError| {
            Reject::IoErr(format!(
                "guest buffer {:#x}+{n} is not in guest memory: {e}",
                addr.0
            ))
        };
        let mut got = 0;
        for slice in mem.get_slices(addr, n, access).map_err(bad)? {
            let slice = slice.map_err(bad)?;
            out.push(IoBuf {
                ptr: slice.ptr_guard_mut().as_ptr(),
                len: slice.len(),
            });
            got += slice.len();
        }
        if got != n {
            return Err(Reject::IoErr(format!(
                "guest buffer {:#x}+{n} is only partly in guest memory",
                addr.0
            )));
        }
        left -= n;
        skip = 0;
    }
    if left == 0 {
        Ok(())
    } else {
        Err(Reject::Unsupp(
            "request shorter than its header says".into(),
        ))
    }
}

fn expect_no_data(req: &str, direction: &str, len: u64) -> Result<(), Reject> {
    if len == 0 {
        Ok(())
    } else {
        Err(Reject::Unsupp(format!(
            "{req} with {len} bytes of {direction} data"
        )))
    }
}

/// Validates the data length of an IN or OUT request.
fn transfer_len(req: &str, len: u64) -> Result<usize, Reject> {
    if len == 0 {
        return Err(Reject::Unsupp(format!("{req} without data")));
    }
    if len > MAX_REQUEST_BYTES as u64 {
        return Err(Reject::Unsupp(format!(
            "{req} of {len} bytes (at most {MAX_REQUEST_BYTES})"
        )));
    }
    if len % SECTOR_SIZE != 0 {
        return Err(Reject::IoErr(format!(
            "{req} of {len} bytes is not a whole number of sectors"
        )));
    }
    Ok(len as usize)
}

/// Checks that `len` bytes from `sector` lie on the disk.
fn checked_range(disk: &Disk, sector: u64, len: usize) -> Result<Sector, Reject> {
    let at = Sector(sector);
    check_range(at, Sectors(len as u64 / SECTOR_SIZE), disk.capacity())
        .map_err(|e| Reject::IoErr(e.to_string()))?;
    Ok(at)
}

fn writable(disk: &Disk, req: &str) -> Result<(), Reject> {
    if disk.read_only() {
        Err(Reject::IoErr(format!("{req} on a read-only disk")))
    } else {
        Ok(())
    }
}

/// Copies `dst.len()` bytes from the guest buffers `segs`, starting `skip` bytes in.
fn copy_from_guest<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    mut skip: usize,
    dst: &mut [u8],
) -> Result<(), Reject> {
    let mut done = 0;
    for seg in segs {
        if done == dst.len() {
            break;
        }
        let seg_len = seg.len as usize;
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min(dst.len() - done);
        let addr = seg
            .addr
            .checked_add(skip as u64)
            .ok_or_else(|| Reject::IoErr("descriptor address overflows".into()))?;
        mem.read_slice(&mut dst[done..done + n], addr)
            .map_err(|e| Reject::IoErr(format!("reading guest memory at {:#x}: {e}", addr.0)))?;
        done += n;
        skip = 0;
    }
    if done == dst.len() {
        Ok(())
    } else {
        Err(Reject::Unsupp(
            "request shorter than its header says".into(),
        ))
    }
}

/// Copies `src` into the guest's device-writable buffers, from their start.
fn copy_to_guest<M: GuestMemory>(mem: &M, segs: &[Segment], src: &[u8]) -> Result<(), Reject> {
    let mut done = 0;
    for seg in segs {
        if done == src.len() {
            break;
        }
        let n = (seg.len as usize).min(src.len() - done);
        mem.write_slice(&src[done..done + n], seg.addr)
            .map_err(|e| {
                Reject::IoErr(format!("writing guest memory at {:#x}: {e}", seg.addr.0))
            })?;
        done += n;
    }
    if done == src.len() {
        Ok(())
    } else {
        Err(Reject::Unsupp("device-writable buffers too short".into()))
    }
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
