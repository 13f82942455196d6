//! Metrics: what each disk's guest asked for, what each served version did, and a Prometheus
//! endpoint to read them from.
//!
//! Plain Rust, no vhost types. Three layers:
//!
//! - **Recording** ([`Histogram`], [`RequestMetrics`], [`VersionMetrics`], [`Metered`]): relaxed
//!   atomics only, so the I/O path takes no lock and allocates nothing. [`RequestMetrics`] is
//!   per disk and filled by the queue workers (one record per guest request, by
//!   [`ReqOp`]); [`VersionMetrics`] is per served version and filled by [`Metered`], a
//!   `BlockLayout` wrapper that times every call into the layout it wraps.
//! - **Reading**: `snapshot()` methods give serde-serialisable views (for a JSON status);
//!   `render()` methods write Prometheus families into an [`Exposition`].
//! - **Serving**: [`serve_http`] answers `GET /metrics` on a loopback address with whatever the
//!   caller's render closure returns, on one background thread.
//!
//! Counters are read one atomic at a time, so a snapshot taken under load is not a single instant
//! (a request may show in `requests` and not yet in `bytes`); each histogram's `+Inf` bucket and
//! count always agree, because the count is the sum of the buckets.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dovetail_layout::{BlockLayout, IoBufs, Result as LayoutResult, Sector, Sectors};
use log::{debug, warn};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// Histogram
// ---------------------------------------------------------------------------------------------

/// Upper bounds of the latency buckets, in seconds (a final `+Inf` bucket follows).
pub const BOUNDS: [f64; 16] = [
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
    250e-3, 500e-3, 1.0,
];

/// [`BOUNDS`] in nanoseconds, so `observe` compares integers.
const BOUNDS_NS: [u64; 16] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
];

/// Number of buckets, `+Inf` included.
const BUCKETS: usize = BOUNDS.len() + 1;

/// A lock-free latency histogram with the fixed buckets of [`BOUNDS`] plus `+Inf`.
///
/// `observe` is two relaxed `fetch_add`s and a search of 16 integers; it never allocates. The
/// bucket counts are kept per bucket (not cumulative); the total count is their sum, computed at
/// [`snapshot`](Histogram::snapshot), so a snapshot's `+Inf` bucket always equals its count even
/// while other threads observe.
#[derive(Debug, Default)]
pub struct Histogram {
    /// `counts[i]` counts observations `<= BOUNDS[i]` and `> BOUNDS[i - 1]`; the last is `+Inf`.
    counts: [AtomicU64; BUCKETS],
    /// Sum of all observations in nanoseconds (wraps after 584 years of accumulated latency).
    sum_ns: AtomicU64,
}

/// A histogram as read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Cumulative: `(le, count of observations <= le)`, in increasing `le`; the last `le` is
    /// `f64::INFINITY` and its count is [`count`](HistogramSnapshot::count).
    pub buckets: Vec<(f64, u64)>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram::default()
    }

    /// Records one duration.
    #[inline]
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // The first bound >= ns (Prometheus buckets are "less than or equal"); 16 = +Inf.
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = Vec::with_capacity(BUCKETS);
        let mut cumulative = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative = cumulative.saturating_add(c.load(Ordering::Relaxed));
            buckets.push((BOUNDS.get(i).copied().unwrap_or(f64::INFINITY), cumulative));
        }
        HistogramSnapshot {
            buckets,
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count: cumulative,
        }
    }
}

impl HistogramSnapshot {
    /// The upper bound of the bucket holding the `q`-quantile (`q` in `[0, 1]`, clamped): an
    /// upper estimate, exact to the bucket. `f64::INFINITY` if that is the `+Inf` bucket; `None`
    /// if nothing was observed (or `q` is NaN).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 || q.is_nan() {
            return None;
        }
        // The rank (1-based) of the q-quantile among `count` sorted observations.
        let rank = (q.clamp(0.0, 1.0) * self.count as f64).ceil().max(1.0) as u64;
        let rank = rank.min(self.count);
        self.buckets
            .iter()
            .find(|&&(_, c)| c >= rank)
            .map(|&(le, _)| le)
    }

    /// Mean observation in seconds, or `None` if nothing was observed.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_seconds / self.count as f64)
    }
}

// ---------------------------------------------------------------------------------------------
// Operations and per-operation counters
// ---------------------------------------------------------------------------------------------

/// What a guest request (or a layout call) was, as metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReqOp {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    GetId,
    /// A request of an unknown type, or one rejected before its type was known (short or
    /// unreadable header, misordered descriptors, no status byte).
    Unsupported,
}

impl ReqOp {
    /// Every operation, in label order.
    pub const ALL: [ReqOp; 7] = [
        ReqOp::Read,
        ReqOp::Write,
        ReqOp::Flush,
        ReqOp::Discard,
        ReqOp::WriteZeroes,
        ReqOp::GetId,
        ReqOp::Unsupported,
    ];

    /// The operations a `BlockLayout` carries out (what [`VersionMetrics`] counts).
    pub const LAYOUT: [ReqOp; 5] = [
        ReqOp::Read,
        ReqOp::Write,
        ReqOp::Flush,
        ReqOp::Discard,
        ReqOp::WriteZeroes,
    ];

    /// The `op` label value.
    pub fn label(self) -> &'static str {
        match self {
            ReqOp::Read => "read",
            ReqOp::Write => "write",
            ReqOp::Flush => "flush",
            ReqOp::Discard => "discard",
            ReqOp::WriteZeroes => "write-zeroes",
            ReqOp::GetId => "get-id",
            ReqOp::Unsupported => "unsupported",
        }
    }

    /// Whether the exposition carries a latency histogram for this operation.
    fn exposes_latency(self) -> bool {
        matches!(self, ReqOp::Read | ReqOp::Write | ReqOp::Flush)
    }
}

impl fmt::Display for ReqOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Counters of one operation: how many, how many failed, bytes moved, latency.
#[derive(Debug, Default)]
struct OpCounters {
    count: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    latency: Histogram,
}

impl OpCounters {
    #[inline]
    fn record(&self, bytes: u64, ok: bool, took: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        if bytes != 0 {
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        self.latency.observe(took);
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// One operation's counters in a [`RequestSnapshot`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RequestOpSnapshot {
    pub requests: u64,
    /// Requests completed with a status other than OK (or with no status byte at all).
    pub errors: u64,
    /// Data bytes moved (see [`RequestMetrics::record`]).
    pub bytes: u64,
    /// Upper bucket bounds of the median and 99th percentile latency; `None` (JSON `null`) when
    /// there were no requests or the quantile is in the `+Inf` bucket (over one second).
    pub latency_p50_seconds: Option<f64>,
    pub latency_p99_seconds: Option<f64>,
}

/// One operation's counters in a [`VersionSnapshot`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VersionOpSnapshot {
    /// Calls into the layout.
    pub ops: u64,
    /// Calls that returned an error.
    pub errors: u64,
    /// Bytes read or written; for discard and write-zeroes, the bytes covered. Successful calls
    /// only.
    pub bytes: u64,
    /// As in [`RequestOpSnapshot`].
    pub latency_p50_seconds: Option<f64>,
    pub latency_p99_seconds: Option<f64>,
}

/// `f64::INFINITY` is not representable in JSON; report it as unknown.
fn finite(q: Option<f64>) -> Option<f64> {
    q.filter(|v| v.is_finite())
}

fn quantiles(c: &OpCounters) -> (Option<f64>, Option<f64>) {
    let h = c.latency.snapshot();
    (finite(h.quantile(0.5)), finite(h.quantile(0.99)))
}

// ---------------------------------------------------------------------------------------------
// RequestMetrics: per disk, what the guest asked for
// ---------------------------------------------------------------------------------------------

/// Per-disk request metrics, recorded by the queue workers: per [`ReqOp`], requests, errors,
/// data bytes and latency (from popping the chain to having its status written).
#[derive(Default)]
pub struct RequestMetrics {
    ops: [OpCounters; ReqOp::ALL.len()],
    /// Requests that panicked (each answered IOERR).
    panics: AtomicU64,
}

/// [`RequestMetrics`] as read at one moment (JSON keys: `read`, `write`, `flush`, `discard`,
/// `write-zeroes`, `get-id`, `unsupported`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RequestSnapshot {
    pub read: RequestOpSnapshot,
    pub write: RequestOpSnapshot,
    pub flush: RequestOpSnapshot,
    pub discard: RequestOpSnapshot,
    pub write_zeroes: RequestOpSnapshot,
    pub get_id: RequestOpSnapshot,
    pub unsupported: RequestOpSnapshot,
}

impl RequestSnapshot {
    pub fn get(&self, op: ReqOp) -> &RequestOpSnapshot {
        match op {
            ReqOp::Read => &self.read,
            ReqOp::Write => &self.write,
            ReqOp::Flush => &self.flush,
            ReqOp::Discard => &self.discard,
            ReqOp::WriteZeroes => &self.write_zeroes,
            ReqOp::GetId => &self.get_id,
            ReqOp::Unsupported => &self.unsupported,
        }
    }
}

impl RequestMetrics {
    pub fn new() -> RequestMetrics {
        RequestMetrics::default()
    }

    /// Counts one request that panicked; returns the count so far.
    pub fn panicked(&self) -> u64 {
        self.panics.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Requests that panicked so far.
    pub fn panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }

    /// Records one completed request. `bytes` is the data it moved (the request path passes 0
    /// for a failed request); `ok` is whether its status was OK.
    #[inline]
    pub fn record(&self, op: ReqOp, bytes: u64, ok: bool, took: Duration) {
        self.ops[op as usize].record(bytes, ok, took);
    }

    /// Requests of `op` recorded so far.
    pub fn requests(&self, op: ReqOp) -> u64 {
        self.ops[op as usize].count()
    }

    /// The latency histogram of `op`.
    pub fn latency(&self, op: ReqOp) -> HistogramSnapshot {
        self.ops[op as usize].latency.snapshot()
    }

    pub fn snapshot(&self) -> RequestSnapshot {
        let one = |op: ReqOp| {
            let c = &self.ops[op as usize];
            let (p50, p99) = quantiles(c);
            RequestOpSnapshot {
                requests: c.count(),
                errors: c.errors(),
                bytes: c.bytes(),
                latency_p50_seconds: p50,
                latency_p99_seconds: p99,
            }
        };
        RequestSnapshot {
            read: one(ReqOp::Read),
            write: one(ReqOp::Write),
            flush: one(ReqOp::Flush),
            discard: one(ReqOp::Discard),
            write_zeroes: one(ReqOp::WriteZeroes),
            get_id: one(ReqOp::GetId),
            unsupported: one(ReqOp::Unsupported),
        }
    }

    /// Writes this disk's families: `dovetail_requests_total`, `dovetail_request_errors_total`,
    /// `dovetail_request_bytes_total` (labels `disk`, `op`; every op) and
    /// `dovetail_request_duration_seconds` (histogram; read, write and flush), and
    /// `dovetail_request_panics_total` (label `disk`).
    pub fn render(&self, disk: &str, out: &mut Exposition) {
        out.counter(
            "dovetail_request_panics_total",
            "Requests that panicked (each answered IOERR; the queue carried on).",
            &[("disk", disk)],
            self.panics(),
        );
        for op in ReqOp::ALL {
            let c = &self.ops[op as usize];
            let labels = [("disk", disk), ("op", op.label())];
            out.counter(
                "dovetail_requests_total",
                "Requests the guest submitted, by operation.",
                &labels,
                c.count(),
            );
            out.counter(
                "dovetail_request_errors_total",
                "Requests completed with a status other than OK, by operation.",
                &labels,
                c.errors(),
            );
            out.counter(
                "dovetail_request_bytes_total",
                "Data bytes moved by successful requests (discard, write-zeroes: bytes covered).",
                &labels,
                c.bytes(),
            );
            if op.exposes_latency() {
                out.histogram(
                    "dovetail_request_duration_seconds",
                    "Time from taking a request off the queue to writing its status.",
                    &labels,
                    &c.latency.snapshot(),
                );
            }
        }
    }
}

impl fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("RequestMetrics");
        for op in ReqOp::ALL {
            d.field(op.label(), &self.ops[op as usize].count());
        }
        d.finish()
    }
}

// ---------------------------------------------------------------------------------------------
// VersionMetrics and Metered: per served version, what the layout did
// ---------------------------------------------------------------------------------------------

/// Per-version layout metrics, recorded by [`Metered`]: per layout operation (read, write,
/// flush, discard, write-zeroes), calls, errors, bytes and latency.
#[derive(Default)]
pub struct VersionMetrics {
    ops: [OpCounters; ReqOp::LAYOUT.len()],
    /// The changes (writes, discards, write-zeroes) since the last successful flush.
    unsynced: Unsynced,
    /// Reads and writes a queue worker mapped to the version's files and submitted itself
    /// (`map_direct`, `map_direct_write`), counted at their completion.
    direct_reads: AtomicU64,
    direct_writes: AtomicU64,
}

/// Changes of a version no successful flush has covered yet: how many, their bytes, and the
/// sectors they span. A failed sync reports them as the requests whose durability is unknown.
/// Kept with a few relaxed atomics per request; a flush that succeeds takes away what was
/// counted before it started (the span is reset once nothing is left), so the report may
/// cover more than was lost, never less.
#[derive(Debug)]
pub struct Unsynced {
    changes: AtomicU64,
    bytes: AtomicU64,
    first: AtomicU64,
    end: AtomicU64,
}

impl Default for Unsynced {
    fn default() -> Unsynced {
        Unsynced {
            changes: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            first: AtomicU64::new(u64::MAX),
            end: AtomicU64::new(0),
        }
    }
}

/// [`Unsynced`] as read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnsyncedSnapshot {
    /// Writes, discards and write-zeroes completed since the last successful flush.
    pub changes: u64,
    pub bytes: u64,
    /// The sectors they lie in, `[first_sector, end_sector)` (both 0 when there are none).
    pub first_sector: u64,
    pub end_sector: u64,
}

impl Unsynced {
    fn changed(&self, at: Sector, bytes: u64) {
        self.changes.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.first.fetch_min(at.0, Ordering::Relaxed);
        let end =
            at.0.saturating_add(bytes.div_ceil(dovetail_layout::SECTOR_SIZE));
        self.end.fetch_max(end, Ordering::Relaxed);
    }

    /// What a flush that succeeded covered: `before` as read when it started.
    fn flushed(&self, before: UnsyncedSnapshot) {
        // Two flushes may cover the same changes: never below zero.
        let sub = |a: &AtomicU64, n: u64| {
            let old = a
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(n))
                })
                .unwrap_or(0);
            old.saturating_sub(n)
        };
        let left = sub(&self.changes, before.changes);
        sub(&self.bytes, before.bytes);
        if left == 0 {
            self.first.store(u64::MAX, Ordering::Relaxed);
            self.end.store(0, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> UnsyncedSnapshot {
        let changes = self.changes.load(Ordering::Relaxed);
        let first = self.first.load(Ordering::Relaxed);
        UnsyncedSnapshot {
            changes,
            bytes: self.bytes.load(Ordering::Relaxed),
            first_sector: if first == u64::MAX { 0 } else { first },
            end_sector: if first == u64::MAX {
                0
            } else {
                self.end.load(Ordering::Relaxed)
            },
        }
    }
}

/// [`VersionMetrics`] as read at one moment (JSON keys: `read`, `write`, `flush`, `discard`,
/// `write-zeroes`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VersionSnapshot {
    pub read: VersionOpSnapshot,
    pub write: VersionOpSnapshot,
    pub flush: VersionOpSnapshot,
    pub discard: VersionOpSnapshot,
    pub write_zeroes: VersionOpSnapshot,
}

impl VersionSnapshot {
    /// The counters of a layout operation; `None` for `GetId` and `Unsupported`.
    pub fn get(&self, op: ReqOp) -> Option<&VersionOpSnapshot> {
        match op {
            ReqOp::Read => Some(&self.read),
            ReqOp::Write => Some(&self.write),
            ReqOp::Flush => Some(&self.flush),
            ReqOp::Discard => Some(&self.discard),
            ReqOp::WriteZeroes => Some(&self.write_zeroes),
            ReqOp::GetId | ReqOp::Unsupported => None,
        }
    }
}

impl VersionMetrics {
    pub fn new() -> VersionMetrics {
        VersionMetrics::default()
    }

    /// Reads and writes mapped to the version's files and submitted by a queue worker itself
    /// (io_uring), completed so far: `(reads, writes)`.
    pub fn direct_requests(&self) -> (u64, u64) {
        (
            self.direct_reads.load(Ordering::Relaxed),
            self.direct_writes.load(Ordering::Relaxed),
        )
    }

    /// The changes through [`Metered`] that no successful flush has covered yet.
    pub fn unsynced(&self) -> UnsyncedSnapshot {
        self.unsynced.snapshot()
    }

    /// Takes away the unflushed changes (the version they were made to was reopened from its
    /// last commit without them); returns what they were.
    pub fn forget_unsynced(&self) -> UnsyncedSnapshot {
        let was = self.unsynced.snapshot();
        self.unsynced.flushed(was);
        was
    }

    /// Records one layout call. Operations outside [`ReqOp::LAYOUT`] are ignored.
    #[inline]
    pub fn record(&self, op: ReqOp, bytes: u64, ok: bool, took: Duration) {
        if let Some(c) = self.ops.get(op as usize) {
            c.record(bytes, ok, took);
        }
    }

    /// Calls of `op` recorded so far (0 for operations outside [`ReqOp::LAYOUT`]).
    pub fn ops(&self, op: ReqOp) -> u64 {
        self.ops.get(op as usize).map_or(0, OpCounters::count)
    }

    /// The latency histogram of `op` (empty for operations outside [`ReqOp::LAYOUT`]).
    pub fn latency(&self, op: ReqOp) -> HistogramSnapshot {
        match self.ops.get(op as usize) {
            Some(c) => c.latency.snapshot(),
            None => Histogram::new().snapshot(),
        }
    }

    pub fn snapshot(&self) -> VersionSnapshot {
        let one = |op: ReqOp| {
            let c = &self.ops[op as usize];
            let (p50, p99) = quantiles(c);
            VersionOpSnapshot {
                ops: c.count(),
                errors: c.errors(),
                bytes: c.bytes(),
                latency_p50_seconds: p50,
                latency_p99_seconds: p99,
            }
        };
        VersionSnapshot {
            read: one(ReqOp::Read),
            write: one(ReqOp::Write),
            flush: one(ReqOp::Flush),
            discard: one(ReqOp::Discard),
            write_zeroes: one(ReqOp::WriteZeroes),
        }
    }

    /// Writes this version's families: `dovetail_version_ops_total`,
    /// `dovetail_version_errors_total`, `dovetail_version_bytes_total` (labels `disk`,
    /// `version` (its key, e.g. `v3`), `role` (`trusted` / `candidate`), `layout`, `op`; every
    /// layout op) and `dovetail_version_op_duration_seconds` (histogram; read, write, flush).
    pub fn render(
        &self,
        disk: &str,
        version: &str,
        role: &str,
        layout: &str,
        out: &mut Exposition,
    ) {
        for op in ReqOp::LAYOUT {
            let c = &self.ops[op as usize];
            let labels = [
                ("disk", disk),
                ("version", version),
                ("role", role),
                ("layout", layout),
                ("op", op.label()),
            ];
            out.counter(
                "dovetail_version_ops_total",
                "Calls into a version's layout, by operation.",
                &labels,
                c.count(),
            );
            out.counter(
                "dovetail_version_errors_total",
                "Calls into a version's layout that returned an error, by operation.",
                &labels,
                c.errors(),
            );
            out.counter(
                "dovetail_version_bytes_total",
                "Bytes moved by successful layout calls (discard, write-zeroes: bytes covered).",
                &labels,
                c.bytes(),
            );
            if op.exposes_latency() {
                out.histogram(
                    "dovetail_version_op_duration_seconds",
                    "Time spent in a version's layout per call.",
                    &labels,
                    &c.latency.snapshot(),
                );
            }
        }
        let (reads, writes) = self.direct_requests();
        for (op, n) in [("read", reads), ("write", writes)] {
            out.counter(
                "dovetail_version_mapped_total",
                "Reads and writes a queue worker mapped to the version's files and submitted \
                 itself (io_uring, --cache none), by operation; also counted in \
                 dovetail_version_ops_total.",
                &[
                    ("disk", disk),
                    ("version", version),
                    ("role", role),
                    ("layout", layout),
                    ("op", op),
                ],
                n,
            );
        }
    }
}

impl fmt::Debug for VersionMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("VersionMetrics");
        for op in ReqOp::LAYOUT {
            d.field(op.label(), &self.ops[op as usize].count());
        }
        d.finish()
    }
}

/// A `BlockLayout` that times and counts every call into `inner` in a [`VersionMetrics`].
///
/// Every method forwards to the same method of `inner` (`read_into` / `write_from` included, so
/// a zero-copy layout stays zero-copy). Per call it adds two `Instant` reads and a few relaxed
/// atomics: no lock, no allocation.
pub struct Metered {
    inner: Arc<dyn BlockLayout>,
    metrics: Arc<VersionMetrics>,
}

impl Metered {
    pub fn new(inner: Arc<dyn BlockLayout>, metrics: Arc<VersionMetrics>) -> Metered {
        Metered { inner, metrics }
    }

    /// The wrapped layout.
    pub fn inner(&self) -> &Arc<dyn BlockLayout> {
        &self.inner
    }

    pub fn metrics(&self) -> &Arc<VersionMetrics> {
        &self.metrics
    }

    /// Counts a change of `bytes` at `at` that succeeded as not yet flushed.
    #[inline]
    fn changed(&self, at: Sector, bytes: u64, res: LayoutResult<()>) -> LayoutResult<()> {
        if res.is_ok() {
            self.metrics.unsynced.changed(at, bytes);
        }
        res
    }

    /// Runs `f` as one call of `op` moving `bytes` (counted only if it succeeds).
    #[inline]
    fn timed(
        &self,
        op: ReqOp,
        bytes: u64,
        f: impl FnOnce() -> LayoutResult<()>,
    ) -> LayoutResult<()> {
        let start = Instant::now();
        let res = f();
        let ok = res.is_ok();
        self.metrics
            .record(op, if ok { bytes } else { 0 }, ok, start.elapsed());
        res
    }
}

impl fmt::Debug for Metered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metered")
            .field("inner", &self.inner)
            .field("metrics", &self.metrics)
            .finish()
    }
}

/// Bytes covered by `len` sectors (saturating: only a label for metrics).
fn covered(len: Sectors) -> u64 {
    len.bytes().unwrap_or(u64::MAX)
}

impl BlockLayout for Metered {
    fn capacity(&self) -> Sectors {
        self.inner.capacity()
    }

    fn grow(&self, capacity: Sectors) -> LayoutResult<()> {
        self.inner.grow(capacity)
    }

    fn read(&self, at: Sector, buf: &mut [u8]) -> LayoutResult<()> {
        let bytes = buf.len() as u64;
        self.timed(ReqOp::Read, bytes, || self.inner.read(at, buf))
    }

    fn read_quiet(&self, at: Sector, buf: &mut [u8]) -> LayoutResult<()> {
        let bytes = buf.len() as u64;
        self.timed(ReqOp::Read, bytes, || self.inner.read_quiet(at, buf))
    }

    fn write(&self, at: Sector, buf: &[u8]) -> LayoutResult<()> {
        let r = self.timed(ReqOp::Write, buf.len() as u64, || self.inner.write(at, buf));
        self.changed(at, buf.len() as u64, r)
    }

    fn flush(&self) -> LayoutResult<()> {
        let before = self.metrics.unsynced.snapshot();
        let r = self.timed(ReqOp::Flush, 0, || self.inner.flush());
        if r.is_ok() {
            self.metrics.unsynced.flushed(before);
        }
        r
    }

    fn discard(&self, at: Sector, len: Sectors) -> LayoutResult<()> {
        let r = self.timed(ReqOp::Discard, covered(len), || self.inner.discard(at, len));
        self.changed(at, covered(len), r)
    }

    fn write_zeroes(&self, at: Sector, len: Sectors, unmap: bool) -> LayoutResult<()> {
        let r = self.timed(ReqOp::WriteZeroes, covered(len), || {
            self.inner.write_zeroes(at, len, unmap)
        });
        self.changed(at, covered(len), r)
    }

    fn read_into(&self, at: Sector, bufs: IoBufs<'_>, scratch: &mut Vec<u8>) -> LayoutResult<()> {
        self.timed(ReqOp::Read, bufs.len() as u64, || {
            self.inner.read_into(at, bufs, scratch)
        })
    }

    fn write_from(&self, at: Sector, bufs: IoBufs<'_>, scratch: &mut Vec<u8>) -> LayoutResult<()> {
        let bytes = bufs.len() as u64;
        let r = self.timed(ReqOp::Write, bytes, || {
            self.inner.write_from(at, bufs, scratch)
        });
        self.changed(at, bytes, r)
    }

    /// Forwarded: reads and writes a queue worker submits straight to the file (io_uring) are
    /// counted here through `direct_completed`.
    fn direct_file(&self) -> Option<dovetail_layout::DirectFile> {
        self.inner.direct_file()
    }

    fn direct_completed(&self, write: bool, bytes: u64, ok: bool, took: Duration) {
        let op = if write { ReqOp::Write } else { ReqOp::Read };
        self.metrics
            .record(op, if ok { bytes } else { 0 }, ok, took);
        self.inner.direct_completed(write, bytes, ok, took);
    }

    fn map_direct_supported(&self) -> bool {
        self.inner.map_direct_supported()
    }

    /// Forwarded; the read is counted when the worker reports its completion to the guard.
    fn map_direct<'a>(
        &'a self,
        at: Sector,
        len: usize,
        pieces: &mut Vec<dovetail_layout::MappedPiece>,
    ) -> Option<dovetail_layout::Mapped<'a>> {
        let m = self.inner.map_direct(at, len, pieces)?;
        Some(dovetail_layout::Mapped {
            guard: Box::new(MeteredRead {
                inner: m.guard,
                metrics: &self.metrics,
                bytes: len as u64,
            }),
            mem_align: m.mem_align,
        })
    }

    /// Forwarded; the write is counted when the worker reports its completion to the guard
    /// (one carried out by the layout itself is counted at once, like `write_from`).
    fn map_direct_write<'a>(
        &'a self,
        at: Sector,
        bufs: IoBufs<'_>,
        pieces: &mut Vec<dovetail_layout::MappedPiece>,
    ) -> Option<LayoutResult<dovetail_layout::Mapped<'a>>> {
        let bytes = bufs.len() as u64;
        let start = Instant::now();
        let m = match self.inner.map_direct_write(at, bufs, pieces)? {
            Ok(m) => m,
            Err(e) => {
                self.metrics.record(ReqOp::Write, 0, false, start.elapsed());
                return Some(Err(e));
            }
        };
        Some(Ok(dovetail_layout::Mapped {
            guard: Box::new(MeteredWrite {
                inner: m.guard,
                metrics: &self.metrics,
                at,
                bytes,
            }),
            mem_align: m.mem_align,
        }))
    }
}

/// A read a queue worker submits itself ([`Metered::map_direct`]): counted at its completion.
struct MeteredRead<'a> {
    inner: Box<dyn dovetail_layout::MapGuard + 'a>,
    metrics: &'a VersionMetrics,
    bytes: u64,
}

impl dovetail_layout::MapGuard for MeteredRead<'_> {
    fn verify(&mut self, bufs: IoBufs<'_>) -> LayoutResult<()> {
        self.inner.verify(bufs)
    }

    fn completed(&mut self, ok: bool, took: Duration) {
        self.metrics
            .record(ReqOp::Read, if ok { self.bytes } else { 0 }, ok, took);
        self.metrics.direct_reads.fetch_add(1, Ordering::Relaxed);
        self.inner.completed(ok, took);
    }
}

/// A write a queue worker submits itself ([`Metered::map_direct_write`]): counted (and noted
/// as not yet flushed) at its completion.
struct MeteredWrite<'a> {
    inner: Box<dyn dovetail_layout::MapGuard + 'a>,
    metrics: &'a VersionMetrics,
    at: Sector,
    bytes: u64,
}

impl dovetail_layout::MapGuard for MeteredWrite<'_> {
    fn data(&self) -> Option<&[u8]> {
        self.inner.data()
    }

    fn completed(&mut self, ok: bool, took: Duration) {
        self.metrics
            .record(ReqOp::Write, if ok { self.bytes } else { 0 }, ok, took);
        self.metrics.direct_writes.fetch_add(1, Ordering::Relaxed);
        self.inner.completed(ok, took);
        if ok {
            self.metrics.unsynced.changed(self.at, self.bytes);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus text exposition
// ---------------------------------------------------------------------------------------------

/// The `Content-Type` of the Prometheus text format this module writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    kind: Kind,
    /// The family's sample lines, in the order they were added.
    samples: String,
}

/// A Prometheus text exposition (format 0.0.4), built by hand.
///
/// Samples may be added in any order: each family's samples are buffered, and
/// [`finish`](Exposition::finish) writes the families in the order their names were first used,
/// each as `# HELP`, `# TYPE` (once, with the help text of the first use) then all its samples,
/// so a family is always contiguous. Label values are escaped (`\\`, `\"`, `\n`); metric and
/// label names must be valid Prometheus names (checked in debug builds), counter names must end
/// in `_total`, and a name keeps the type it was first used with.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<Family>,
    /// Family name → index in `families`.
    index: HashMap<String, usize>,
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Adds one counter sample. `name` must end in `_total`.
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: u64) {
        debug_assert!(
            name.ends_with("_total"),
            "counter {name:?} must end in _total"
        );
        let out = self.family(name, help, Kind::Counter);
        write_sample(out, name, "", labels, None);
        out.push_str(&value.to_string());
        out.push('\n');
    }

    /// Adds one gauge sample.
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        let out = self.family(name, help, Kind::Gauge);
        write_sample(out, name, "", labels, None);
        push_f64(out, value);
        out.push('\n');
    }

    /// Adds one histogram: `name_bucket{…,le="…"}` for every (cumulative) bucket, `le="+Inf"`
    /// last, then `name_sum` and `name_count`. `labels` must not contain `le`.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        h: &HistogramSnapshot,
    ) {
        debug_assert!(
            labels.iter().all(|&(k, _)| k != "le"),
            "histogram {name:?} with an `le` label"
        );
        let out = self.family(name, help, Kind::Histogram);
        let mut le = String::new();
        for &(bound, count) in &h.buckets {
            le.clear();
            push_f64(&mut le, bound);
            write_sample(out, name, "_bucket", labels, Some(("le", &le)));
            out.push_str(&count.to_string());
            out.push('\n');
        }
        if h.buckets.last().is_none_or(|&(b, _)| b != f64::INFINITY) {
            // Every histogram has a +Inf bucket, even one built by hand without it.
            write_sample(out, name, "_bucket", labels, Some(("le", "+Inf")));
            out.push_str(&h.count.to_string());
            out.push('\n');
        }
        write_sample(out, name, "_sum", labels, None);
        push_f64(out, h.sum_seconds);
        out.push('\n');
        write_sample(out, name, "_count", labels, None);
        out.push_str(&h.count.to_string());
        out.push('\n');
    }

    /// The exposition text: every family, in first-use order.
    pub fn finish(self) -> String {
        let len = self
            .families
            .iter()
            .map(|f| f.samples.len() + f.help.len() + 2 * f.name.len() + 32)
            .sum();
        let mut out = String::with_capacity(len);
        for f in &self.families {
            out.push_str("# HELP ");
            out.push_str(&f.name);
            out.push(' ');
            escape_help(&mut out, &f.help);
            out.push_str("\n# TYPE ");
            out.push_str(&f.name);
            out.push(' ');
            out.push_str(f.kind.name());
            out.push('\n');
            out.push_str(&f.samples);
        }
        out
    }

    /// The sample buffer of family `name`, created at first use.
    fn family(&mut self, name: &str, help: &str, kind: Kind) -> &mut String {
        debug_assert!(valid_name(name, true), "invalid metric name {name:?}");
        let i = match self.index.get(name) {
            Some(&i) => {
                debug_assert_eq!(
                    self.families[i].kind, kind,
                    "metric {name:?} used with two types"
                );
                i
            }
            None => {
                self.families.push(Family {
                    name: name.to_string(),
                    help: help.to_string(),
                    kind,
                    samples: String::new(),
                });
                self.index.insert(name.to_string(), self.families.len() - 1);
                self.families.len() - 1
            }
        };
        &mut self.families[i].samples
    }
}

/// Writes `name` `suffix` `{labels[,extra]}` and the separating space.
fn write_sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &[(&str, &str)],
    extra: Option<(&str, &str)>,
) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() || extra.is_some() {
        out.push('{');
        for (i, &(k, v)) in labels.iter().chain(extra.iter()).enumerate() {
            debug_assert!(valid_name(k, false), "invalid label name {k:?}");
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            escape_label_value(out, v);
            out.push('"');
        }
        out.push('}');
    }
    out.push(' ');
}

fn escape_label_value(out: &mut String, v: &str) {
    for ch in v.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(out: &mut String, v: &str) {
    for ch in v.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A float as Prometheus spells it (`+Inf`, `-Inf`, `NaN`, else the shortest exact decimal).
fn push_f64(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v == f64::INFINITY {
        out.push_str("+Inf");
    } else if v == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        out.push_str(&v.to_string());
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*` for metric names, the same without `:` for label names.
fn valid_name(name: &str, metric: bool) -> bool {
    let ok = |c: char, first: bool| {
        c.is_ascii_alphabetic()
            || c == '_'
            || (metric && c == ':')
            || (!first && c.is_ascii_digit())
    };
    let mut chars = name.chars();
    chars.next().is_some_and(|c| ok(c, true)) && chars.all(|c| ok(c, false))
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "metrics address {0} is not a loopback address; the endpoint has no authentication, so \
         it listens only on 127.0.0.1 or ::1 (put a proxy in front to export it)"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the metrics thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// The render closure [`serve_http`] calls for each `GET /metrics`.
pub type RenderFn = Arc<dyn Fn() -> String + Send + Sync>;

/// A running metrics endpoint. [`stop`](MetricsServer::stop) (or dropping it) closes it and
/// joins its thread.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    local: SocketAddr,
    /// A duplicate of the listening socket, to hand it to a new daemon (`dovetail ctl upgrade`).
    listener: Option<std::net::TcpListener>,
}

impl MetricsServer {
    /// Another fd of the listening socket (the handover of `dovetail ctl upgrade`).
    pub fn dup_listener(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        match &self.listener {
            Some(l) => Ok(l.try_clone()?.into()),
            None => Err(std::io::Error::other("the metrics listener is not known")),
        }
    }

    /// The address actually bound (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops answering, closes the listening socket and joins the thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::Release);
        self.server.unblock();
        if thread.join().is_err() {
            warn!("metrics: the HTTP thread panicked");
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsServer")
            .field("local", &self.local)
            .field("running", &self.thread.is_some())
            .finish()
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_loopback(),
        IpAddr::V6(a) => a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// Serves Prometheus metrics over HTTP on `addr`, which must be a loopback address (there is no
/// authentication). One thread, `metrics-http`, answers `GET /metrics` with `render()` (a
/// panicking render gives a 500 and the thread goes on), `GET /` with a pointer to `/metrics`,
/// other paths with 404 and other methods with 405.
pub fn serve_http(addr: SocketAddr, render: RenderFn) -> Result<MetricsServer, MetricsError> {
    if !is_loopback(addr.ip()) {
        return Err(MetricsError::NotLoopback(addr));
    }
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
    serve_http_on(listener, render)
}

/// [`serve_http`] on a listening socket already bound to a loopback address (one a previous
/// daemon handed over: `dovetail ctl upgrade`).
pub fn serve_http_on(
    listener: std::net::TcpListener,
    render: RenderFn,
) -> Result<MetricsServer, MetricsError> {
    let addr = listener.local_addr().map_err(|source| MetricsError::Bind {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        source,
    })?;
    if !is_loopback(addr.ip()) {
        return Err(MetricsError::NotLoopback(addr));
    }
    let dup = listener.try_clone().ok();
    let server =
        tiny_http::Server::from_listener(listener, None).map_err(|e| MetricsError::Bind {
            addr,
            source: std::io::Error::other(e),
        })?;
    let local = server.server_addr().to_ip().unwrap_or(addr);
    let server = Arc::new(server);
    let stop = Arc::new(AtomicBool::new(false));
    let thread = std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn({
            let (server, stop) = (server.clone(), stop.clone());
            move || {
                crate::sandbox::enter(dovetail_store::thread_kind::ThreadKind::Metrics);
                run_http(&server, &stop, &*render)
            }
        })
        .map_err(MetricsError::Spawn)?;
    debug!("metrics: serving http://{local}/metrics");
    Ok(MetricsServer {
        server,
        stop,
        thread: Some(thread),
        local,
        listener: dup,
    })
}

fn run_http(
    server: &tiny_http::Server,
    stop: &AtomicBool,
    render: &(dyn Fn() -> String + Send + Sync),
) {
    loop {
        match server.recv() {
            Ok(rq) => answer(rq, render),
            Err(_) if stop.load(Ordering::Acquire) => break,
            Err(e) => {
                warn!("metrics: accepting a connection failed: {e}");
                // An error that repeats (out of descriptors) must not spin.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn header(name: &str, value: &str) -> Option<tiny_http::Header> {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

fn answer(rq: tiny_http::Request, render: &(dyn Fn() -> String + Send + Sync)) {
    let path = rq.url().split('?').next().unwrap_or_default();
    let known = matches!(path, "/" | "/metrics");
    let text =
        |code: u16, body: &str| tiny_http::Response::from_string(body).with_status_code(code);
    let response = if !known {
        text(404, "not found; metrics are at /metrics\n")
    } else if *rq.method() != tiny_http::Method::Get {
        let r = text(405, "only GET is supported\n");
        match header("Allow", "GET") {
            Some(h) => r.with_header(h),
            None => r,
        }
    } else if path == "/" {
        text(
            200,
            "Dovetail metrics: GET /metrics (Prometheus text format)\n",
        )
    } else {
        match catch_unwind(AssertUnwindSafe(render)) {
            Ok(body) => {
                let r = tiny_http::Response::from_string(body);
                match header("Content-Type", CONTENT_TYPE) {
                    Some(h) => r.with_header(h),
                    None => r,
                }
            }
            Err(_) => {
                warn!("metrics: rendering panicked");
                text(500, "rendering metrics failed\n")
            }
        }
    };
    if let Err(e) = rq.respond(response) {
        debug!("metrics: answering a request failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    use dovetail_layout::{IoBuf, MemLayout};

    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn histogram_buckets_sum_and_quantiles_are_exact() {
        let h = Histogram::new();
        assert_eq!(h.snapshot().quantile(0.5), None, "empty");
        assert_eq!(h.snapshot().mean(), None);
        // 10 µs sits on a bound: it belongs to that bucket (le = "less or equal").
        for d in [us(5), us(10), us(30), us(1000), Duration::from_secs(2)] {
            h.observe(d);
        }
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.buckets.len(), 17);
        let expect: Vec<(f64, u64)> = BOUNDS
            .iter()
            .map(|&b| {
                let n = match b {
                    b if b < 50e-6 => 2,
                    b if b < 1e-3 => 3,
                    _ => 4,
                };
                (b, n)
            })
            .chain([(f64::INFINITY, 5)])
            .collect();
        assert_eq!(s.buckets, expect);
        assert_eq!(s.sum_seconds, 2_001_045_000_f64 / 1e9);
        assert_eq!(s.quantile(0.0), Some(10e-6));
        assert_eq!(s.quantile(0.4), Some(10e-6));
        assert_eq!(s.quantile(0.5), Some(50e-6));
        assert_eq!(s.quantile(0.8), Some(1e-3));
        assert_eq!(s.quantile(0.81), Some(f64::INFINITY));
        assert_eq!(s.quantile(1.0), Some(f64::INFINITY));
        assert_eq!(s.quantile(7.0), Some(f64::INFINITY), "clamped");
        assert_eq!(s.quantile(f64::NAN), None);
        // Just past a bound goes to the next bucket; huge durations saturate into +Inf.
        let h = Histogram::new();
        h.observe(Duration::from_nanos(1_000_001));
        h.observe(Duration::MAX);
        let s = h.snapshot();
        assert_eq!(s.quantile(0.5), Some(2.5e-3));
        // The integer bounds observe() uses are the published ones.
        for (ns, secs) in BOUNDS_NS.iter().zip(BOUNDS) {
            assert_eq!(Duration::from_nanos(*ns), Duration::from_secs_f64(secs));
        }
        assert_eq!(s.buckets[15], (1.0, 1));
        assert_eq!(s.buckets[16], (f64::INFINITY, 2));
    }

    /// A parsed sample line: metric name, labels, value.
    type Sample = (String, Vec<(String, String)>, String);

    fn parse_sample(line: &str) -> Sample {
        let (series, value) = line.rsplit_once(' ').expect("value");
        let Some((name, rest)) = series.split_once('{') else {
            return (series.to_string(), Vec::new(), value.to_string());
        };
        let body = rest.strip_suffix('}').expect("closing brace");
        let mut labels = Vec::new();
        let mut chars = body.chars().peekable();
        while chars.peek().is_some() {
            let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
            assert_eq!(chars.next(), Some('"'), "{line}");
            let mut v = String::new();
            loop {
                match chars.next().expect("unterminated label value") {
                    '\\' => match chars.next().expect("escape") {
                        'n' => v.push('\n'),
                        c @ ('\\' | '"') => v.push(c),
                        c => panic!("bad escape \\{c} in {line}"),
                    },
                    '"' => break,
                    '\n' => panic!("raw newline in {line}"),
                    c => v.push(c),
                }
            }
            labels.push((key, v));
            if chars.peek() == Some(&',') {
                chars.next();
            }
        }
        (name.to_string(), labels, value.to_string())
    }

    /// A histogram series: family and labels other than `le`.
    type SeriesKey = (String, Vec<(String, String)>);

    /// Checks the structure of an exposition and returns its samples with their family.
    fn check_exposition(text: &str) -> Vec<(String, Sample)> {
        assert!(text.ends_with('\n'));
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helps = HashSet::new();
        let mut finished: HashSet<String> = HashSet::new();
        let mut current: Option<String> = None;
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().expect("name").to_string();
                assert!(helps.insert(name.clone()), "HELP twice for {name}");
                assert!(!types.contains_key(&name), "HELP after TYPE for {name}");
                if let Some(prev) = current.replace(name) {
                    finished.insert(prev);
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("type");
                assert_eq!(current.as_deref(), Some(name), "TYPE right after HELP");
                assert!(
                    types.insert(name.to_string(), kind.to_string()).is_none(),
                    "TYPE twice for {name}"
                );
                continue;
            }
            let sample = parse_sample(line);
            let family = current.clone().expect("a sample before any family");
            let kind = types.get(&family).expect("typed").as_str();
            let ok_name = match kind {
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|sfx| sample.0 == format!("{family}{sfx}")),
                _ => sample.0 == family,
            };
            assert!(
                ok_name,
                "{} is not in family {family} (families contiguous)",
                sample.0
            );
            assert!(!finished.contains(&family));
            samples.push((family, sample));
        }
        // Histograms: cumulative buckets monotone, +Inf last and equal to _count.
        let mut series: HashMap<SeriesKey, Vec<(String, u64)>> = HashMap::new();
        let mut counts = HashMap::new();
        for (family, (name, labels, value)) in &samples {
            if types[family] != "histogram" {
                continue;
            }
            let mut rest: Vec<_> = labels.iter().filter(|(k, _)| k != "le").cloned().collect();
            rest.sort();
            if name.ends_with("_bucket") {
                let le = labels
                    .iter()
                    .find(|(k, _)| k == "le")
                    .expect("le")
                    .1
                    .clone();
                series
                    .entry((family.clone(), rest))
                    .or_default()
                    .push((le, value.parse().expect("bucket count")));
            } else if name.ends_with("_count") {
                counts.insert((family.clone(), rest), value.parse::<u64>().expect("count"));
            }
        }
        assert!(!series.is_empty() || counts.is_empty());
        for (key, buckets) in &series {
            let les: Vec<f64> = buckets
                .iter()
                .map(|(le, _)| {
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().expect("le")
                    }
                })
                .collect();
            assert!(
                les.windows(2).all(|w| w[0] < w[1]),
                "le increasing: {les:?}"
            );
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "monotone: {buckets:?}"
            );
            let last = buckets.last().expect("a bucket");
            assert_eq!(last.0, "+Inf");
            assert_eq!(Some(&last.1), counts.get(key), "+Inf == count for {key:?}");
        }
        samples
    }

    #[test]
    fn exposition_groups_families_and_escapes_labels() {
        let h = Histogram::new();
        for d in [us(3), us(70), us(70), Duration::from_millis(3)] {
            h.observe(d);
        }
        let mut e = Exposition::new();
        // Interleaved on purpose: the output must still group each family.
        e.counter(
            "x_requests_total",
            "Requests.",
            &[("disk", "a"), ("op", "read")],
            3,
        );
        e.gauge("x_depth", "Queue depth.\nSecond line \\ here.", &[], 1.5);
        e.histogram("x_seconds", "Latency.", &[("disk", "a")], &h.snapshot());
        e.counter(
            "x_requests_total",
            "ignored help",
            &[("disk", "a\"b\\c\nd"), ("op", "write")],
            4,
        );
        e.gauge("x_depth", "ignored", &[("q", "1")], f64::INFINITY);
        e.histogram(
            "x_seconds",
            "Latency.",
            &[("disk", "b")],
            &Histogram::new().snapshot(),
        );
        e.gauge("x_nan", "Not a number.", &[], f64::NAN);
        let text = e.finish();
        let samples = check_exposition(&text);
        assert_eq!(samples.len(), 2 + 2 + 2 * (17 + 2) + 1);
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            families,
            [
                "x_requests_total counter",
                "x_depth gauge",
                "x_seconds histogram",
                "x_nan gauge"
            ]
        );
        let lines: Vec<&str> = text.lines().collect();
        for want in [
            "# HELP x_requests_total Requests.",
            "# HELP x_depth Queue depth.\\nSecond line \\\\ here.",
            "x_requests_total{disk=\"a\",op=\"read\"} 3",
            "x_requests_total{disk=\"a\\\"b\\\\c\\nd\",op=\"write\"} 4",
            "x_depth 1.5",
            "x_depth{q=\"1\"} +Inf",
            "x_nan NaN",
            "x_seconds_bucket{disk=\"a\",le=\"0.00001\"} 1",
            "x_seconds_bucket{disk=\"a\",le=\"0.0001\"} 3",
            "x_seconds_bucket{disk=\"a\",le=\"0.0025\"} 3",
            "x_seconds_bucket{disk=\"a\",le=\"0.005\"} 4",
            "x_seconds_bucket{disk=\"a\",le=\"+Inf\"} 4",
            "x_seconds_sum{disk=\"a\"} 0.003143",
            "x_seconds_count{disk=\"a\"} 4",
            "x_seconds_bucket{disk=\"b\",le=\"+Inf\"} 0",
            "x_seconds_count{disk=\"b\"} 0",
        ] {
            assert!(lines.contains(&want), "{want:?} missing in\n{text}");
        }
        // The escaped value parses back to the original.
        let (_, labels, _) = &samples[1].1;
        assert_eq!(labels[0], ("disk".to_string(), "a\"b\\c\nd".to_string()));
    }

    #[test]
    fn request_and_version_metrics_render_valid_families() {
        let r = RequestMetrics::new();
        r.record(ReqOp::Read, 4096, true, us(20));
        r.record(ReqOp::GetId, 0, true, us(1));
        let v = VersionMetrics::new();
        v.record(ReqOp::Write, 512, true, us(80));
        v.record(ReqOp::GetId, 0, true, us(1)); // not a layout op: ignored
        let mut e = Exposition::new();
        r.render("d0", &mut e);
        v.render("d0", "v1", "trusted", "raw", &mut e);
        v.render("d0", "v2", "candidate", "parallax-v1", &mut e);
        r.render("d1", &mut e);
        let text = e.finish();
        let samples = check_exposition(&text);
        let count = |family: &str| samples.iter().filter(|(f, _)| f == family).count();
        assert_eq!(count("dovetail_requests_total"), 2 * 7);
        assert_eq!(count("dovetail_request_duration_seconds"), 2 * 3 * 19);
        assert_eq!(count("dovetail_version_ops_total"), 2 * 5);
        assert_eq!(count("dovetail_version_op_duration_seconds"), 2 * 3 * 19);
        assert!(text.contains(
            "dovetail_version_bytes_total{disk=\"d0\",version=\"v1\",role=\"trusted\",layout=\"raw\",op=\"write\"} 512\n"
        ));
        assert!(text.contains("dovetail_requests_total{disk=\"d0\",op=\"get-id\"} 1\n"));
        assert_eq!(v.ops(ReqOp::GetId), 0);
        let json = serde_json::to_value(r.snapshot()).expect("json");
        assert_eq!(json["read"]["requests"], 1);
        assert_eq!(json["read"]["bytes"], 4096);
        assert_eq!(json["read"]["latency_p50_seconds"], 25e-6);
        assert!(json["write-zeroes"]["latency_p99_seconds"].is_null());
        let json = serde_json::to_value(v.snapshot()).expect("json");
        assert_eq!(json["write"]["ops"], 1);
        assert_eq!(
            serde_json::to_value(ReqOp::WriteZeroes).expect("op"),
            "write-zeroes"
        );
        assert_eq!(
            ReqOp::ALL.map(ReqOp::label),
            [
                "read",
                "write",
                "flush",
                "discard",
                "write-zeroes",
                "get-id",
                "unsupported"
            ]
        );
    }

    #[test]
    fn metered_keeps_the_changes_no_flush_covered() {
        let metrics = Arc::new(VersionMetrics::new());
        let mem: Arc<dyn BlockLayout> = Arc::new(MemLayout::new(Sectors(64)));
        let m = Metered::new(mem, metrics.clone());
        assert_eq!(metrics.unsynced().changes, 0);
        assert_eq!(metrics.unsynced().first_sector, 0);
        m.write(Sector(8), &[1u8; 1024]).expect("write");
        m.write(Sector(63), &[0u8; 1024])
            .expect_err("a failed write is not counted");
        m.discard(Sector(40), Sectors(8)).expect("discard");
        let u = metrics.unsynced();
        assert_eq!(
            (u.changes, u.bytes, u.first_sector, u.end_sector),
            (2, 1024 + 4096, 8, 48)
        );
        m.flush().expect("flush");
        assert_eq!(
            metrics.unsynced(),
            UnsyncedSnapshot {
                changes: 0,
                bytes: 0,
                first_sector: 0,
                end_sector: 0
            }
        );
        m.write_zeroes(Sector(2), Sectors(1), false)
            .expect("zeroes");
        let mut scratch = Vec::new();
        let mut data = [3u8; 512];
        let bufs = [IoBuf {
            ptr: data.as_mut_ptr(),
            len: data.len(),
        }];
        // SAFETY: `bufs` names `data`, alive and unaliased for the call.
        m.write_from(Sector(4), unsafe { IoBufs::new(&bufs) }, &mut scratch)
            .expect("write_from");
        let u = metrics.forget_unsynced();
        assert_eq!((u.changes, u.first_sector, u.end_sector), (2, 2, 5));
        assert_eq!(metrics.unsynced().changes, 0, "forgotten");
    }

    #[test]
    fn metered_counts_ops_bytes_and_errors() {
        let metrics = Arc::new(VersionMetrics::new());
        let mem: Arc<dyn BlockLayout> = Arc::new(MemLayout::new(Sectors(64)));
        let m = Metered::new(mem.clone(), metrics.clone());
        assert_eq!(m.capacity(), Sectors(64));
        assert!(Arc::ptr_eq(m.inner(), &mem));
        m.write(Sector(0), &[7u8; 1024]).expect("write");
        m.write(Sector(8), &[8u8; 512]).expect("write");
        let mut buf = [0u8; 512];
        m.read(Sector(1), &mut buf).expect("read");
        assert_eq!(buf, [7u8; 512]);
        m.read(Sector(64), &mut buf).expect_err("past the end");
        m.write(Sector(63), &[0u8; 1024]).expect_err("past the end");
        m.flush().expect("flush");
        m.discard(Sector(0), Sectors(8)).expect("discard");
        m.write_zeroes(Sector(8), Sectors(4), false)
            .expect("zeroes");
        m.write_zeroes(Sector(62), Sectors(4), true)
            .expect_err("past the end");
        let s = metrics.snapshot();
        let counts = |op| {
            let o = s.get(op).expect("layout op");
            (o.ops, o.errors, o.bytes)
        };
        assert_eq!(counts(ReqOp::Read), (2, 1, 512));
        assert_eq!(counts(ReqOp::Write), (3, 1, 1536));
        assert_eq!(counts(ReqOp::Flush), (1, 0, 0));
        assert_eq!(counts(ReqOp::Discard), (1, 0, 4096));
        assert_eq!(counts(ReqOp::WriteZeroes), (2, 1, 2048));
        assert_eq!(metrics.latency(ReqOp::Read).count, 2);
        assert_eq!(metrics.latency(ReqOp::Write).count, 3);
        assert!(s.get(ReqOp::GetId).is_none());
        assert!(format!("{m:?}").contains("Metered"));
    }

    /// A layout that records which methods were called.
    #[derive(Debug)]
    struct Recorder {
        inner: MemLayout,
        calls: Mutex<Vec<&'static str>>,
    }

    impl Recorder {
        fn called(&self, name: &'static str) {
            self.calls.lock().expect("calls").push(name);
        }
    }

    impl BlockLayout for Recorder {
        fn capacity(&self) -> Sectors {
            self.inner.capacity()
        }
        fn read(&self, at: Sector, buf: &mut [u8]) -> LayoutResult<()> {
            self.called("read");
            self.inner.read(at, buf)
        }
        fn write(&self, at: Sector, buf: &[u8]) -> LayoutResult<()> {
            self.called("write");
            self.inner.write(at, buf)
        }
        fn flush(&self) -> LayoutResult<()> {
            self.called("flush");
            Ok(())
        }
        fn discard(&self, at: Sector, len: Sectors) -> LayoutResult<()> {
            self.called("discard");
            self.inner.discard(at, len)
        }
        fn write_zeroes(&self, at: Sector, len: Sectors, unmap: bool) -> LayoutResult<()> {
            self.called("write_zeroes");
            self.inner.write_zeroes(at, len, unmap)
        }
        fn read_into(
            &self,
            at: Sector,
            bufs: IoBufs<'_>,
            scratch: &mut Vec<u8>,
        ) -> LayoutResult<()> {
            self.called("read_into");
            let buf = dovetail_layout::iobuf::scratch(scratch, bufs.len());
            self.inner.read(at, buf)?;
            bufs.copy_from(buf);
            Ok(())
        }
        fn write_from(
            &self,
            at: Sector,
            bufs: IoBufs<'_>,
            scratch: &mut Vec<u8>,
        ) -> LayoutResult<()> {
            self.called("write_from");
            let buf = dovetail_layout::iobuf::scratch(scratch, bufs.len());
            bufs.copy_to(buf);
            self.inner.write(at, buf)
        }
    }

    #[test]
    fn metered_forwards_scatter_list_transfers() {
        let rec = Arc::new(Recorder {
            inner: MemLayout::new(Sectors(16)),
            calls: Mutex::new(Vec::new()),
        });
        let metrics = Arc::new(VersionMetrics::new());
        let m = Metered::new(rec.clone(), metrics.clone());
        let mut a = [0x11u8; 512];
        let mut b = [0x22u8; 1024];
        let list = [
            IoBuf {
                ptr: a.as_mut_ptr(),
                len: a.len(),
            },
            IoBuf {
                ptr: b.as_mut_ptr(),
                len: b.len(),
            },
        ];
        let mut scratch = Vec::new();
        {
            // SAFETY: both arrays live until the end of this block and are not otherwise
            // accessed while `bufs` is in use.
            let bufs = unsafe { IoBufs::new(&list) };
            m.write_from(Sector(2), bufs, &mut scratch)
                .expect("write_from");
            bufs.zero(0, bufs.len());
            m.read_into(Sector(2), bufs, &mut scratch)
                .expect("read_into");
            m.read_into(Sector(15), bufs, &mut scratch)
                .expect_err("past the end");
        }
        assert_eq!(a, [0x11; 512]);
        assert_eq!(b, [0x22; 1024]);
        assert_eq!(
            *rec.calls.lock().expect("calls"),
            ["write_from", "read_into", "read_into"],
            "forwarded, not the copying defaults"
        );
        let s = metrics.snapshot();
        assert_eq!((s.write.ops, s.write.bytes), (1, 1536));
        assert_eq!((s.read.ops, s.read.errors, s.read.bytes), (2, 1, 1536));
    }

    /// Sends a raw HTTP/1.0 request and returns (status code, headers, body).
    fn http(addr: SocketAddr, request: &str) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(request.as_bytes()).expect("send");
        let mut raw = String::new();
        s.read_to_string(&mut raw).expect("receive");
        let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status code");
        (status, head.to_string(), body.to_string())
    }

    #[test]
    fn serve_http_answers_metrics_and_refuses_the_rest() {
        let calls = Arc::new(AtomicUsize::new(0));
        let render: RenderFn = {
            let calls = calls.clone();
            Arc::new(move || {
                if calls.fetch_add(1, Ordering::SeqCst) == 1 {
                    panic!("render fails once (expected in this test)");
                }
                "# HELP up Up.\n# TYPE up gauge\nup 1\n".to_string()
            })
        };
        let server = serve_http("127.0.0.1:0".parse().expect("addr"), render).expect("serve");
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);

        let (code, head, body) = http(addr, "GET /metrics HTTP/1.0\r\n\r\n");
        assert_eq!(code, 200, "{head}");
        assert!(
            head.lines()
                .any(|l| l.eq_ignore_ascii_case(&format!("content-type: {CONTENT_TYPE}"))),
            "{head}"
        );
        assert_eq!(body, "# HELP up Up.\n# TYPE up gauge\nup 1\n");
        // The second render panics: a 500, and the thread carries on.
        assert_eq!(http(addr, "GET /metrics HTTP/1.0\r\n\r\n").0, 500);
        assert_eq!(http(addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n").0, 200);
        let (code, _, body) = http(addr, "GET / HTTP/1.0\r\n\r\n");
        assert_eq!(code, 200);
        assert!(body.contains("/metrics"));
        assert_eq!(http(addr, "GET /nope HTTP/1.0\r\n\r\n").0, 404);
        let (code, head, _) = http(addr, "POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(code, 405);
        assert!(head.to_ascii_lowercase().contains("allow: get"), "{head}");
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        server.stop();
        // tiny_http closes its listener on its own (detached) accept thread, soon after.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_ok() {
            assert!(Instant::now() < deadline, "still listening after stop");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn serve_http_listens_on_loopback_only() {
        let render: RenderFn = Arc::new(String::new);
        for addr in [
            "0.0.0.0:0",
            "192.0.2.1:9100",
            "[::]:0",
            "[2001:db8::1]:9100",
        ] {
            let addr: SocketAddr = addr.parse().expect("addr");
            match serve_http(addr, render.clone()) {
                Err(MetricsError::NotLoopback(a)) => assert_eq!(a, addr),
                other => panic!("{addr}: {other:?}"),
            }
        }
        let e =
            serve_http("0.0.0.0:0".parse().expect("addr"), render.clone()).expect_err("refused");
        assert!(e.to_string().contains("loopback"), "{e}");
        assert!(is_loopback("::ffff:127.0.0.1".parse().expect("ip")));
        assert!(is_loopback("::1".parse().expect("ip")));
        // A port already taken is a bind error, not a panic.
        let first =
            serve_http("127.0.0.1:0".parse().expect("addr"), render.clone()).expect("serve");
        match serve_http(first.local_addr(), render) {
            Err(MetricsError::Bind { addr, .. }) => assert_eq!(addr, first.local_addr()),
            other => panic!("{other:?}"),
        }
        drop(first); // Drop stops and joins too.
    }
}
