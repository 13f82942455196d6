//! The Tee: a [`BlockLayout`] over a trusted and a candidate version of one disk, mirroring the
//! request stream to both and validating the candidate by [`Policy`].
//!
//! # Ordering
//!
//! Guests issue concurrent requests from several queue threads; the two versions must see every
//! pair of overlapping operations in the same order. A request locks the stripes of its 4 KiB
//! blocks ([`crate::stripes`]: shared for reads, exclusive for writes) and holds them across the
//! trusted operation and either the candidate operation (synchronous policies) or the push onto
//! the background stream ([`crate::stream`], one FIFO worker per Tee). The stream executes in push
//! order, so the version that is written in the background sees the same order as the one
//! written in the foreground; a background read check is queued at the same point in that
//! order, so it sees the same prefix of writes the foreground read saw.
//!
//! # Presence
//!
//! Only blocks the candidate holds ([`PresenceMap`]) are compared or answered by it. A write makes
//! its blocks present: a partial block the candidate does not hold is completed with the rest of
//! that block read from the trusted version (under the stripe lock, after the trusted write, so
//! the merged block is the trusted's state at that point of the order). Discard becomes
//! `write_zeroes(unmap)` on both versions so both read zeroes and stay comparable.
//!
//! # Quarantine
//!
//! A mismatch, a candidate I/O error, a candidate panic (caught at every call into the
//! candidate) or a grant refusal quarantines the candidate: an event with provenance, counters,
//! the `on_quarantine` callbacks (once), and from then on the candidate gets no I/O at all, not
//! even flushes, and the presence map is no longer written (it may overstate what a quarantined
//! candidate holds; the candidate is to be repaired or dropped). The Tee then serves the
//! trusted version alone; under `async-new-primary` it first drains the stream so the trusted
//! version has every write.
//!
//! # barrier-writes-async
//!
//! Reads of blocks the candidate holds are answered by the candidate and a check is queued (the
//! hash of what the guest got, compared with the trusted version by the worker). Candidate
//! writes are synchronous, so the candidate is always current for the reads it answers. A
//! write takes its stripes, then waits until every check queued before it has run (the
//! *barrier*; waiting under the stripes means no read of its blocks can slip in between). If one
//! of those reads failed verification, or could not be verified because the candidate was
//! quarantined meanwhile, the write is refused with an I/O error and reaches neither version:
//! data that may derive from a bad read never reaches the trusted version ("exposure: to the
//! application only"). Writes that arrive after the quarantine proceed on the trusted version
//! alone: the application was running on the candidate's answers until then, and the Tee cannot
//! know which later writes derive from them; the quarantine event is the operator's cue.
//!
//! # Unclean stop and resync
//!
//! If the presence map was not closed cleanly, the versions may legitimately differ on blocks
//! written after the last completed flush. Every present block is then *unverified*: not
//! compared and not answered by the candidate (except under `async-new-primary`, whose trusted
//! version may lag), until a background resync has compared it under its stripes and rewritten
//! the candidate's copy from the trusted one where they differ, or a whole-block write replaced
//! it.
//!
//! # Snapshots
//!
//! The Tee does not forward snapshots (`BlockLayout` has none): snapshots are taken by the store
//! CLI on each version separately.
//!
//! # Files
//!
//! This file holds the options, the shared state ([`Inner`]) and the `Tee`'s public API; one
//! concern per file beside it: `block_layout` (the guest's requests in), `read` and `write`
//! (the two request paths), `flush`, `worker` (the background stream), `quarantine`,
//! `unverified` (what the resync has yet to compare), `hints` (copy-on-read's reports),
//! `migration` (blocks copied in by a migration job) and `lifecycle` (set up, close, drop).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use dovetail_layout::{
    buffer_sectors, check_range, error_chain, BlockLayout, Error, IoBufs, Sector, Sectors,
    SECTOR_SIZE,
};
use dovetail_store::StoreError;
use xxhash_rust::xxh3::xxh3_128;

use crate::events::{
    hash_hex, Counters, EventKind, EventLog, Report, RequestInfo, TeeCounters, TeeEvent,
};
use crate::policy::Policy;
use crate::presence::{PresenceError, PresenceMap, MAP_BLOCK};
use crate::stream::{Op, Stream, CHECK_COST};
use crate::stripes::{Mode, Stripes};

pub(crate) use hints::ReadHints;
pub(crate) use quarantine::panic_message as panic_text;
pub(crate) use quarantine::CandidateFailure;
pub(crate) use unverified::Unverified;

mod block_layout;
mod flush;
mod hints;
mod lifecycle;
mod migration;
mod quarantine;
mod read;
mod unverified;
mod worker;
mod write;

/// Bytes per comparison piece of the resync and the lazy job.
pub(crate) const PIECE: u64 = 1 << 20;
const BLOCK: u64 = MAP_BLOCK;

/// How a Tee is set up.
#[derive(Debug, Clone)]
pub struct TeeOptions {
    /// The disk's name, in events and log lines.
    pub disk: String,
    pub policy: Policy,
    /// Bound on the data queued for the background stream (default 64 MiB).
    pub stream_bytes: usize,
    /// How often the lazy hash job compares a region (default 1 s).
    pub lazy_interval: Duration,
    /// Bytes the lazy job compares per run (default 16 MiB, in pieces of ≤ 1 MiB).
    pub lazy_region: u64,
    /// Keep a request journal for divergence bisection (`crate::journal`); none by default.
    pub journal: Option<crate::journal::JournalLimits>,
}

impl TeeOptions {
    /// Defaults for `disk` under `policy`.
    pub fn new(disk: &str, policy: Policy) -> TeeOptions {
        TeeOptions {
            disk: disk.to_string(),
            policy,
            stream_bytes: 64 << 20,
            lazy_interval: Duration::from_secs(1),
            lazy_region: 16 << 20,
            journal: None,
        }
    }
}

/// Why a Tee could not be set up or shut down.
#[derive(Debug, thiserror::Error)]
pub enum TeeError {
    #[error("the presence map failed")]
    Presence(#[from] PresenceError),
    #[error("a version failed")]
    Layout(#[from] Error),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("could not start the tee's {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
}

type Callback = Box<dyn Fn(&TeeEvent) + Send + Sync>;

/// The state shared by the request path and the background threads.
pub(crate) struct Inner {
    pub disk: String,
    pub trusted: Arc<dyn BlockLayout>,
    pub candidate: Arc<dyn BlockLayout>,
    pub presence: Arc<PresenceMap>,
    pub capacity: Sectors,
    pub cap_bytes: u64,
    pub blocks: u64,
    /// Held shared by every request, exclusively by `set_policy`.
    policy: RwLock<Policy>,
    /// The current policy, for the background threads' events.
    policy_now: AtomicU8,
    quarantined: AtomicBool,
    closed: AtomicBool,
    callbacks: Mutex<Vec<Callback>>,
    pub stripes: Stripes,
    pub stream: Stream,
    pub counters: Counters,
    pub events: EventLog,
    req_seq: AtomicU64,
    pub unverified: Unverified,
    /// barrier-writes-async: the lowest stream sequence number of a read check that failed
    /// (or was left unverified by a quarantine); `u64::MAX` for none.
    first_failed: AtomicU64,
    /// async-new-primary: a trusted write in the background failed since the last flush.
    trusted_lost: AtomicBool,
    /// Stops the lazy job and the resync.
    pub stop: Mutex<bool>,
    pub stop_cv: Condvar,
    pub lazy_interval: Duration,
    pub lazy_region: u64,
    /// Copy-on-read: guest reads of blocks the candidate does not hold are reported to the
    /// migration job through this queue while it is on.
    pub read_hints: ReadHints,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tee")
            .field("disk", &self.disk)
            .field("trusted", &self.trusted)
            .field("candidate", &self.candidate)
            .field("policy", &self.current_policy())
            .field("quarantined", &self.is_quarantined())
            .finish_non_exhaustive()
    }
}

thread_local! {
    static SCRATCH_A: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    static SCRATCH_B: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` on `len` bytes of a per-thread scratch buffer (taken out of its slot meanwhile, so
/// a nested Tee simply gets a fresh one).
fn with_scratch<R>(
    slot: &'static std::thread::LocalKey<std::cell::Cell<Vec<u8>>>,
    len: usize,
    f: impl FnOnce(&mut [u8]) -> R,
) -> R {
    let mut v = slot.with(|c| c.take());
    if v.len() < len {
        v.resize(len, 0);
    }
    let r = f(&mut v[..len]);
    // A request larger than the bound grew it for its own duration only.
    dovetail_layout::iobuf::release_scratch(&mut v, dovetail_layout::iobuf::RETAINED_SCRATCH);
    slot.with(|c| c.set(v));
    r
}

/// Position of the first differing byte of two equally long buffers.
pub(crate) fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or(Some(a.len().min(b.len())))
}

fn io_error(what: &str) -> Error {
    Error::Io {
        op: "write",
        path: "tee".to_string(),
        source: std::io::Error::other(what.to_string()),
    }
}

/// The byte range of the request, `[start, end)`, and its first and last block.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u64,
    end: u64,
    first: u64,
    last: u64,
}

/// The data of a write: borrowed, or already in a buffer the stream may keep.
enum Payload<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl Payload<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Borrowed(b) => b,
            Payload::Owned(v) => v,
        }
    }
}

/// Which version answers a run of blocks of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The trusted version, nothing to check.
    Trusted,
    /// Both versions, compared (or the candidate checked in the background).
    Checked,
    /// The candidate, not checked (async-new-primary, unverified blocks).
    CandidateOnly,
}

impl Inner {
    pub fn current_policy(&self) -> Policy {
        Policy::ALL
            .get(self.policy_now.load(Ordering::Relaxed) as usize)
            .copied()
            .unwrap_or(Policy::SyncCrossChecks)
    }

    pub fn is_quarantined(&self) -> bool {
        self.quarantined.load(Ordering::Acquire)
    }

    fn gate(&self) -> dovetail_layout::Result<RwLockReadGuard<'_, Policy>> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(Error::InvalidArgument(format!(
                "tee of disk {} is closed",
                self.disk
            )));
        }
        Ok(self.policy.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn request(&self, op: &'static str, at: Sector, len: Sectors) -> RequestInfo {
        RequestInfo {
            op,
            sector: at.0,
            sectors: len.0,
            seq: self.req_seq.fetch_add(1, Ordering::Relaxed) + 1,
        }
    }

    fn span(&self, at: Sector, len: Sectors) -> dovetail_layout::Result<Span> {
        check_range(at, len, self.capacity)?;
        // In range of the capacity, which fits in bytes (checked in `new`).
        let start = at.0 * SECTOR_SIZE;
        let end = start + len.0 * SECTOR_SIZE;
        Ok(Span {
            start,
            end,
            first: start / BLOCK,
            last: end.saturating_sub(1).max(start) / BLOCK,
        })
    }

    fn block_end(&self, b: u64) -> u64 {
        ((b + 1) * BLOCK).min(self.cap_bytes)
    }

    /// After a quarantine: make sure the trusted version has every write queued for it.
    fn settle(&self) {
        if !self.stream.idle() {
            self.stream.drain();
        }
    }

    /// Calls `f(offset in request, length, source)` for each maximal run of blocks of `s` with
    /// the same source, clipped to the request.
    fn runs(
        &self,
        s: Span,
        classify: impl Fn(u64) -> Source,
        mut f: impl FnMut(u64, u64, Source) -> dovetail_layout::Result<()>,
    ) -> dovetail_layout::Result<()> {
        let mut b = s.first;
        while b <= s.last {
            let src = classify(b);
            let mut e = b;
            while e < s.last && classify(e + 1) == src {
                e += 1;
            }
            let from = (b * BLOCK).max(s.start);
            let to = self.block_end(e).min(s.end);
            f(from - s.start, to - from, src)?;
            b = e + 1;
        }
        Ok(())
    }

    fn held_verified(&self, b: u64) -> bool {
        self.presence.contains(b) && !self.unverified.get(b)
    }
}

/// A [`BlockLayout`] over a trusted and a candidate version; see the module documentation.
pub struct Tee {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The request journal, when the options asked for one: one record per mutating request
    /// and flush, taken at the entry points in `block_layout`.
    journal: Option<Arc<crate::journal::Journal>>,
}

impl std::fmt::Debug for Tee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl Tee {
    /// Registers a callback run (once) when the candidate is quarantined, e.g. to persist the
    /// state in the store catalog. It may run on a background thread.
    pub fn on_quarantine(&self, f: Box<dyn Fn(&TeeEvent) + Send + Sync>) {
        self.inner
            .callbacks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(f);
    }

    pub fn policy(&self) -> Policy {
        self.inner.current_policy()
    }

    /// Changes the policy between requests: waits for requests in flight, drains the stream
    /// (pending writes and read checks), then switches.
    pub fn set_policy(&self, p: Policy) -> Result<(), TeeError> {
        let mut g = self.inner.policy.write().unwrap_or_else(|e| e.into_inner());
        self.inner.stream.drain();
        let old = *g;
        *g = p;
        self.inner
            .policy_now
            .store(policy_index(p), Ordering::Relaxed);
        drop(g);
        if old != p {
            self.inner.emit(Report::new(
                EventKind::PolicyChanged,
                format!("policy changed from {old} to {p}"),
            ));
        }
        Ok(())
    }

    pub fn quarantined(&self) -> bool {
        self.inner.is_quarantined()
    }

    /// Quarantines the candidate by hand.
    pub fn quarantine(&self, reason: &str) {
        self.inner.quarantine(&format!("manual: {reason}"), None);
    }

    pub fn counters(&self) -> TeeCounters {
        self.inner.counters.snapshot()
    }

    /// The most recent events (up to [`crate::events::EVENT_RING`]), oldest first.
    pub fn events(&self) -> Vec<TeeEvent> {
        self.inner.events.recent()
    }

    /// A bounded channel of future events; if it fills up, events are dropped (and counted),
    /// never waited for.
    pub fn subscribe(&self) -> crossbeam_channel::Receiver<TeeEvent> {
        self.inner.events.subscribe()
    }

    /// The request journal, if the Tee keeps one.
    pub fn journal(&self) -> Option<&Arc<crate::journal::Journal>> {
        self.journal.as_ref()
    }

    pub fn presence(&self) -> &Arc<PresenceMap> {
        &self.inner.presence
    }

    /// The Tee's shared state, for the migration jobs of this crate.
    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    pub fn trusted(&self) -> &Arc<dyn BlockLayout> {
        &self.inner.trusted
    }

    pub fn candidate(&self) -> &Arc<dyn BlockLayout> {
        &self.inner.candidate
    }

    /// Blocks the resync after an unclean stop has not compared yet.
    pub fn unverified_blocks(&self) -> u64 {
        self.inner.unverified.count()
    }

    /// Waits until every operation queued for the background stream so far has been executed.
    pub fn drain(&self) {
        self.inner.stream.drain();
    }

    /// Compares blocks `first..=last` (at most [`PIECE`] bytes) of both versions, block by
    /// block (XXH3-64 of each 4 KiB block), under their stripes after draining the background
    /// stream: no guest write to them is in flight or queued, so both versions must hold the
    /// same bytes. Returns the blocks that differ. Does not quarantine (the caller decides);
    /// fails if a version cannot be read or the candidate is quarantined. `t`/`c` are scratch.
    pub fn compare_blocks(
        &self,
        first: u64,
        last: u64,
        t: &mut Vec<u8>,
        c: &mut Vec<u8>,
    ) -> Result<Vec<u64>, String> {
        let inner = &self.inner;
        if last < first || last >= inner.blocks || (last - first + 1) * MAP_BLOCK > PIECE {
            return Err(format!("blocks {first}..={last}: not a piece of the disk"));
        }
        let start = first * MAP_BLOCK;
        let end = ((last + 1) * MAP_BLOCK).min(inner.cap_bytes);
        let at = Sector(start / SECTOR_SIZE);
        let len = (end - start) as usize;
        t.resize(len, 0);
        c.resize(len, 0);
        let _g = inner.stripes.lock(first, last, Mode::Shared);
        inner.stream.drain();
        if inner.is_quarantined() {
            return Err("the candidate is quarantined".into());
        }
        inner.trusted.read_quiet(at, t).map_err(|e| {
            format!(
                "reading sectors {}.. of the trusted version: {}",
                at.0,
                dovetail_layout::error_chain(&e)
            )
        })?;
        inner
            .call_candidate(|cand| cand.read_quiet(at, c))
            .map_err(|f| {
                let why = match f {
                    CandidateFailure::Error(e) => dovetail_layout::error_chain(&e),
                    CandidateFailure::Panic(p) => format!("panicked: {p}"),
                };
                format!("reading sectors {}.. of the candidate: {why}", at.0)
            })?;
        drop(_g);
        let bs = MAP_BLOCK as usize;
        Ok(t.chunks(bs)
            .zip(c.chunks(bs))
            .enumerate()
            .filter(|(_, (a, b))| xxhash_rust::xxh3::xxh3_64(a) != xxhash_rust::xxh3::xxh3_64(b))
            .map(|(i, _)| first + i as u64)
            .collect())
    }
}

fn policy_index(p: Policy) -> u8 {
    Policy::ALL.iter().position(|&q| q == p).unwrap_or(0) as u8
}
