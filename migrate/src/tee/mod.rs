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

/// Why a call into the candidate failed.
#[derive(Debug)]
pub(crate) enum CandidateFailure {
    Error(Error),
    Panic(String),
}

/// Blocks the resync has not compared yet (bit set = unverified). The bitmap is allocated on
/// the first block marked, so a Tee started cleanly pays nothing for it.
#[derive(Debug)]
pub(crate) struct Unverified {
    blocks: u64,
    words: std::sync::OnceLock<Box<[AtomicU64]>>,
    count: AtomicU64,
}

impl Unverified {
    fn new(blocks: u64) -> Unverified {
        Unverified {
            blocks,
            words: std::sync::OnceLock::new(),
            count: AtomicU64::new(0),
        }
    }

    pub fn any(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }

    fn word(&self, b: u64) -> Option<&AtomicU64> {
        self.words.get()?.get((b / 64) as usize)
    }

    pub fn get(&self, b: u64) -> bool {
        self.any()
            && self
                .word(b)
                .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (b % 64)) != 0)
    }

    fn set(&self, b: u64) {
        let words = self.words.get_or_init(|| {
            (0..self.blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect()
        });
        if let Some(w) = words.get((b / 64) as usize) {
            if w.fetch_or(1 << (b % 64), Ordering::AcqRel) & (1 << (b % 64)) == 0 {
                self.count.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    pub fn clear(&self, first: u64, last: u64) {
        if !self.any() {
            return;
        }
        for b in first..=last {
            if let Some(w) = self.word(b) {
                if w.fetch_and(!(1 << (b % 64)), Ordering::AcqRel) & (1 << (b % 64)) != 0 {
                    self.count.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }
}

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

/// The queue through which guest reads tell a copy-on-read migration which absent blocks they
/// touched. Reporting never blocks a read: when the queue is full the hint is dropped (a
/// copy-out still gets every block; copy-on-read gets it at a later read).
#[derive(Debug)]
pub(crate) struct ReadHints {
    on: AtomicBool,
    tx: crossbeam_channel::Sender<(u64, u64)>,
    pub rx: crossbeam_channel::Receiver<(u64, u64)>,
}

/// Runs of blocks a copy-on-read migration may have waiting.
const READ_HINTS: usize = 4096;

impl ReadHints {
    fn new() -> Self {
        let (tx, rx) = crossbeam_channel::bounded(READ_HINTS);
        ReadHints {
            on: AtomicBool::new(false),
            tx,
            rx,
        }
    }

    /// Starts (or stops) reporting reads; stopping empties the queue.
    pub fn set(&self, on: bool) {
        self.on.store(on, Ordering::Release);
        if !on {
            while self.rx.try_recv().is_ok() {}
        }
    }
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

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
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
    /// Copy-on-read: reports a read's blocks the candidate does not hold to the migration job.
    /// One atomic load when copy-on-read is off.
    fn hint_read(&self, s: Span) {
        if !self.read_hints.on.load(Ordering::Acquire) {
            return;
        }
        if let Some(b) = self.presence.next_absent(s.first) {
            if b <= s.last {
                let _ = self.read_hints.tx.try_send((b, s.last));
            }
        }
    }

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

    pub fn emit(&self, r: Report) -> TeeEvent {
        self.events.emit(self.current_policy(), r, &self.counters)
    }

    /// Calls into the candidate, catching panics.
    pub fn call_candidate<R>(
        &self,
        f: impl FnOnce(&dyn BlockLayout) -> dovetail_layout::Result<R>,
    ) -> Result<R, CandidateFailure> {
        let c = &*self.candidate;
        match catch_unwind(AssertUnwindSafe(|| f(c))) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(CandidateFailure::Error(e)),
            Err(p) => Err(CandidateFailure::Panic(panic_message(&*p))),
        }
    }

    /// Reports a candidate failure and quarantines the candidate.
    pub fn candidate_failed(&self, what: &str, request: Option<RequestInfo>, f: CandidateFailure) {
        let (kind, candidate) = match &f {
            CandidateFailure::Error(e @ Error::Store(StoreError::GrantViolation { .. })) => {
                Counters::bump(&self.counters.grant_refusals);
                (EventKind::GrantRefused, error_chain(e))
            }
            CandidateFailure::Error(e) => {
                Counters::bump(&self.counters.candidate_errors);
                (EventKind::CandidateError, error_chain(e))
            }
            CandidateFailure::Panic(m) => {
                Counters::bump(&self.counters.candidate_panics);
                (EventKind::CandidatePanic, format!("panic: {m}"))
            }
        };
        let message = match kind {
            EventKind::GrantRefused => {
                format!("candidate {what} refused by the store's grant check")
            }
            EventKind::CandidatePanic => format!("candidate panicked during {what}"),
            _ => format!("candidate {what} failed"),
        };
        let mut r = Report::new(kind, message.clone());
        r.request = request.clone();
        r.candidate = Some(candidate);
        self.emit(r);
        self.quarantine(&message, request);
    }

    /// Reports a data mismatch and quarantines the candidate.
    #[allow(clippy::too_many_arguments)]
    pub fn mismatch(
        &self,
        kind: EventKind,
        what: &str,
        request: Option<RequestInfo>,
        trusted_hash: Option<u128>,
        candidate_hash: Option<u128>,
        first_difference: Option<u64>,
    ) {
        Counters::bump(&self.counters.mismatches);
        let mut r = Report::new(kind, what.to_string());
        r.request = request.clone();
        r.trusted = trusted_hash.map(hash_hex);
        r.candidate = candidate_hash.map(hash_hex);
        r.first_difference = first_difference;
        self.emit(r);
        self.quarantine(what, request);
    }

    /// Quarantines the candidate (once): event, counters, callbacks. Never blocks on I/O.
    pub fn quarantine(&self, reason: &str, request: Option<RequestInfo>) {
        if self.quarantined.swap(true, Ordering::AcqRel) {
            return;
        }
        // Reads answered by the candidate whose checks are still queued can no longer be
        // verified: writes waiting for them at the barrier are refused.
        self.first_failed
            .fetch_min(self.stream.done(), Ordering::AcqRel);
        Counters::bump(&self.counters.quarantines);
        let mut r = Report::new(
            EventKind::Quarantined,
            format!("candidate quarantined: {reason}; serving the trusted version alone"),
        );
        r.request = request;
        let ev = self.emit(r);
        let callbacks = self.callbacks.lock().unwrap_or_else(|p| p.into_inner());
        for cb in callbacks.iter() {
            cb(&ev);
        }
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

    /// Whether a read of `s` under `p` involves the candidate at all.
    fn read_involves_candidate(&self, p: Policy, s: Span) -> bool {
        if self.is_quarantined() || !p.checks_reads() {
            return false;
        }
        (s.first..=s.last).any(|b| self.presence.contains(b))
    }

    // ---------------------------------------------------------------- reads

    /// A read that involves the candidate, into `buf` (Rust-owned memory).
    fn read_checked(
        &self,
        p: Policy,
        at: Sector,
        s: Span,
        buf: &mut [u8],
    ) -> dovetail_layout::Result<()> {
        let len = Sectors(buf.len() as u64 / SECTOR_SIZE);
        let req = self.request("read", at, len);
        let _g = self.stripes.lock(s.first, s.last, Mode::Shared);
        if p.candidate_answers_reads() {
            return self.read_from_candidate(p, at, s, buf, &req);
        }
        self.trusted.read(at, buf)?;
        if self.is_quarantined() {
            return Ok(());
        }
        let classify = |b| {
            if self.held_verified(b) {
                Source::Checked
            } else {
                Source::Trusted
            }
        };
        self.runs(s, classify, |off, n, src| {
            if src != Source::Checked || self.is_quarantined() {
                return Ok(());
            }
            let (o, n) = (off as usize, n as usize);
            let run_at = Sector(at.0 + off / SECTOR_SIZE);
            let t = &buf[o..o + n];
            Counters::bump(&self.counters.compared_reads);
            self.counters
                .compared_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
            if p == Policy::AsyncOldPrimary {
                let op = Op::CandidateCheck {
                    at: run_at,
                    len: n,
                    hash: xxh3_128(t),
                    request: req.clone(),
                };
                self.stream.push(op, CHECK_COST, &self.counters);
                return Ok(());
            }
            with_scratch(&SCRATCH_B, n, |c| {
                match self.call_candidate(|cand| cand.read(run_at, c)) {
                    Err(f) => self.candidate_failed("read", Some(req.clone()), f),
                    Ok(()) => {
                        if let Some(d) = first_difference(t, c) {
                            self.mismatch(
                                EventKind::Mismatch,
                                "candidate read differs from the trusted version",
                                Some(req.clone()),
                                Some(xxh3_128(t)),
                                Some(xxh3_128(c)),
                                Some(off + d as u64),
                            );
                        }
                    }
                }
            });
            Ok(())
        })
    }

    /// barrier-writes-async and async-new-primary: blocks the candidate holds are answered by
    /// it and checked against the trusted version in the background stream.
    fn read_from_candidate(
        &self,
        p: Policy,
        at: Sector,
        s: Span,
        buf: &mut [u8],
        req: &RequestInfo,
    ) -> dovetail_layout::Result<()> {
        let classify = |b| {
            if !self.presence.contains(b) {
                Source::Trusted
            } else if !self.unverified.get(b) {
                Source::Checked
            } else if p == Policy::AsyncNewPrimary {
                // The trusted version may lag behind; the candidate is the primary.
                Source::CandidateOnly
            } else {
                Source::Trusted
            }
        };
        self.runs(s, classify, |off, n, src| {
            let (o, nu) = (off as usize, n as usize);
            let run_at = Sector(at.0 + off / SECTOR_SIZE);
            let out = &mut buf[o..o + nu];
            if src == Source::Trusted || self.is_quarantined() {
                if self.is_quarantined() {
                    self.settle();
                }
                return self.trusted.read(run_at, out);
            }
            match self.call_candidate(|cand| cand.read(run_at, out)) {
                Err(f) => {
                    self.candidate_failed("read", Some(req.clone()), f);
                    self.settle();
                    self.trusted.read(run_at, out)
                }
                Ok(()) => {
                    if src == Source::Checked {
                        Counters::bump(&self.counters.compared_reads);
                        self.counters.compared_bytes.fetch_add(n, Ordering::Relaxed);
                        let op = Op::TrustedCheck {
                            at: run_at,
                            len: nu,
                            hash: xxh3_128(out),
                            request: req.clone(),
                        };
                        self.stream.push(op, CHECK_COST, &self.counters);
                    }
                    Ok(())
                }
            }
        })
    }

    // --------------------------------------------------------------- writes

    /// The parts of the edge blocks of `s` the request does not cover and the candidate does
    /// not hold: `[(start, end)]` in bytes, at most two.
    fn fills(&self, s: Span) -> [Option<(u64, u64)>; 2] {
        let mut out = [None, None];
        let head = s.first * BLOCK;
        if s.start > head && !self.presence.contains(s.first) {
            out[0] = Some((head, s.start));
        }
        let tail = self.block_end(s.last);
        if s.end < tail && !self.presence.contains(s.last) {
            out[1] = Some((s.end, tail));
        }
        out
    }

    /// Marks the blocks of a candidate write present, and verified where the write covered
    /// them whole (`[from, to)` in bytes is what the candidate now has from this request).
    fn mark_written(&self, s: Span, from: u64, to: u64) {
        dovetail_store::failpoint::hit("upgrade-on-write");
        self.presence.insert_range(s.first, s.last - s.first + 1);
        if self.unverified.any() {
            let first = from.div_ceil(BLOCK);
            let last_excl = if to == self.cap_bytes {
                to.div_ceil(BLOCK)
            } else {
                to / BLOCK
            };
            if last_excl > first {
                self.unverified.clear(first, last_excl - 1);
            }
        }
    }

    /// After a failed trusted write the versions may differ on these blocks: stop comparing them.
    fn mark_trusted_failed(&self, s: Span) {
        for b in s.first..=s.last {
            if self.presence.contains(b) {
                self.unverified.set(b);
            }
        }
    }

    fn write_impl(&self, at: Sector, payload: Payload<'_>) -> dovetail_layout::Result<()> {
        let data = payload.bytes();
        let len = buffer_sectors(data.len())?;
        let s = self.span(at, len)?;
        let g = self.gate()?;
        let p = *g;
        Counters::bump(&self.counters.writes);
        if data.is_empty() {
            return self.trusted.write(at, data);
        }
        let req = self.request("write", at, len);
        let _stripes = self.stripes.lock(s.first, s.last, Mode::Exclusive);
        if self.is_quarantined() {
            self.settle();
            return self.trusted.write(at, data);
        }
        match p {
            Policy::AsyncNewPrimary => return self.write_new_primary(at, s, data, &req),
            Policy::BarrierWritesAsync => self.barrier(&req)?,
            _ => {}
        }
        if let Err(e) = self.trusted.write(at, data) {
            self.mark_trusted_failed(s);
            return Err(e);
        }
        if self.is_quarantined() {
            return Ok(());
        }
        let fills = self.fills(s);
        let from = fills[0].map_or(s.start, |f| f.0);
        let to = fills[1].map_or(s.end, |f| f.1);
        let ext_at = Sector(from / SECTOR_SIZE);
        let ext_len = (to - from) as usize;
        let head = (s.start - from) as usize;
        if p.candidate_writes_sync() {
            let verify = p == Policy::SyncCrossChecks;
            if fills == [None, None] {
                self.candidate_write_sync(ext_at, data, verify, &req);
            } else {
                with_scratch(&SCRATCH_A, ext_len, |ext| -> dovetail_layout::Result<()> {
                    self.fill_from_trusted(ext, from, fills)?;
                    ext[head..head + data.len()].copy_from_slice(data);
                    self.candidate_write_sync(ext_at, ext, verify, &req);
                    Ok(())
                })?;
            }
        } else {
            let ext = match payload {
                // The common case: the guest's data, copied once, goes on the stream as it is.
                Payload::Owned(v) if fills == [None, None] => v,
                _ => {
                    let mut ext = self.stream.buffer(ext_len);
                    self.fill_from_trusted(&mut ext, from, fills)?;
                    ext[head..head + data.len()].copy_from_slice(data);
                    ext
                }
            };
            let op = Op::CandidateWrite {
                at: ext_at,
                data: ext,
            };
            self.stream.push(op, ext_len, &self.counters);
        }
        self.mark_written(s, from, to);
        Ok(())
    }

    /// Migrates the run of blocks `[first, first + count)` that the candidate does not hold yet:
    /// each is read from the trusted version under its stripe (so no guest write to it is in
    /// flight), turned into the candidate's block by `upgrade`, written to the candidate
    /// (all-zero blocks as `write_zeroes(unmap)`: holes stay holes, nothing is copied) and
    /// marked present. Blocks that became present meanwhile (a guest write migrated them) are
    /// skipped. Returns (blocks written with data, all-zero blocks), or `None` once the
    /// candidate is quarantined or the Tee closed.
    pub(crate) fn migrate_blocks(
        &self,
        first: u64,
        count: u64,
        upgrade: &dyn crate::upgrade::Upgrade,
        buf: &mut Vec<u8>,
    ) -> dovetail_layout::Result<Option<(u64, u64)>> {
        let Ok(_g) = self.gate() else {
            return Ok(None);
        };
        let last = (first + count).min(self.blocks).saturating_sub(1);
        if first > last {
            return Ok(Some((0, 0)));
        }
        let _stripes = self.stripes.lock(first, last, Mode::Exclusive);
        // One read of the whole batch from the trusted version, then one candidate call per
        // run of consecutive absent blocks of the same kind (data or all zero).
        let start = first * BLOCK;
        let len = (self.block_end(last) - start) as usize;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let absent: Vec<u64> = (first..=last)
            .filter(|&b| !self.presence.contains(b))
            .collect();
        if absent.is_empty() {
            return Ok(Some((0, 0)));
        }
        self.trusted
            .read_quiet(Sector(start / SECTOR_SIZE), &mut buf[..len])?;
        let (mut data, mut zero) = (0u64, 0u64);
        let mut i = 0;
        while i < absent.len() {
            if self.is_quarantined() {
                return Ok(None);
            }
            let b0 = absent[i];
            let block_of = |b: u64| {
                let o = ((b - first) * BLOCK) as usize;
                o..o + (self.block_end(b) - b * BLOCK) as usize
            };
            let is_zero = |b: u64| buf[block_of(b)].iter().all(|&x| x == 0);
            let kind = is_zero(b0);
            let mut j = i + 1;
            while j < absent.len() && absent[j] == absent[j - 1] + 1 && is_zero(absent[j]) == kind {
                j += 1;
            }
            let b1 = absent[j - 1];
            let at = Sector(b0 * BLOCK / SECTOR_SIZE);
            let run = block_of(b0).start..block_of(b1).end;
            let req = RequestInfo {
                op: "migrate",
                sector: at.0,
                sectors: run.len() as u64 / SECTOR_SIZE,
                seq: 0,
            };
            let written = if kind {
                zero += b1 - b0 + 1;
                self.call_candidate(|c| {
                    c.write_zeroes(at, Sectors(run.len() as u64 / SECTOR_SIZE), true)
                })
            } else {
                data += b1 - b0 + 1;
                for b in b0..=b1 {
                    let r = block_of(b);
                    if let Err(e) = upgrade.upgrade_block(b, &mut buf[r]) {
                        self.quarantine(
                            &format!("the upgrade code failed on block {b}: {}", error_chain(&e)),
                            Some(req),
                        );
                        return Ok(None);
                    }
                }
                self.call_candidate(|c| c.write(at, &buf[run.clone()]))
            };
            if let Err(f) = written {
                self.candidate_failed("migrate", Some(req), f);
                return Ok(None);
            }
            dovetail_store::failpoint::hit("copyout-batch");
            for b in b0..=b1 {
                if let Err(e) = upgrade.migrated(b) {
                    self.quarantine(
                        &format!("the upgrade code failed on block {b}: {}", error_chain(&e)),
                        Some(req),
                    );
                    return Ok(None);
                }
                self.presence.insert(b);
            }
            i = j;
        }
        Ok(Some((data, zero)))
    }

    /// Makes what migration copied durable: the candidate's data first, then the presence map
    /// (a bit on disk says the candidate holds the block durably).
    pub(crate) fn migration_checkpoint(&self) -> dovetail_layout::Result<bool> {
        let Ok(_g) = self.gate() else {
            return Ok(false);
        };
        if self.is_quarantined() {
            return Ok(false);
        }
        if let Err(f) = self.call_candidate(|c| c.flush()) {
            self.candidate_failed("flush (migration)", None, f);
            return Ok(false);
        }
        dovetail_store::failpoint::hit("copyout-checkpoint");
        if let Err(e) = self.presence.persist() {
            self.quarantine(
                &format!(
                    "the presence map could not be persisted: {}",
                    error_chain(&e)
                ),
                None,
            );
            return Ok(false);
        }
        Ok(true)
    }

    /// Reads the fill ranges of an extended buffer starting at byte `from` from the trusted.
    fn fill_from_trusted(
        &self,
        ext: &mut [u8],
        from: u64,
        fills: [Option<(u64, u64)>; 2],
    ) -> dovetail_layout::Result<()> {
        for (a, b) in fills.into_iter().flatten() {
            let o = (a - from) as usize;
            let n = (b - a) as usize;
            self.trusted
                .read_quiet(Sector(a / SECTOR_SIZE), &mut ext[o..o + n])?;
        }
        Ok(())
    }

    /// Writes `data` to the candidate now; under sync-cross-checks reads it back and compares.
    fn candidate_write_sync(&self, at: Sector, data: &[u8], verify: bool, req: &RequestInfo) {
        if let Err(f) = self.call_candidate(|c| c.write(at, data)) {
            self.candidate_failed("write", Some(req.clone()), f);
            return;
        }
        if verify {
            with_scratch(&SCRATCH_B, data.len(), |back| {
                match self.call_candidate(|c| c.read_quiet(at, back)) {
                    Err(f) => self.candidate_failed("read-back", Some(req.clone()), f),
                    Ok(()) => {
                        if let Some(d) = first_difference(data, back) {
                            self.mismatch(
                                EventKind::Mismatch,
                                "candidate read-back differs from what was written",
                                Some(req.clone()),
                                Some(xxh3_128(data)),
                                Some(xxh3_128(back)),
                                Some(d as u64),
                            );
                        }
                    }
                }
            });
        }
    }

    /// barrier-writes-async: waits (under the write's stripes) for every read check queued
    /// before this write; refuses the write if one of them failed.
    fn barrier(&self, req: &RequestInfo) -> dovetail_layout::Result<()> {
        let upto = self.stream.next_seq();
        self.stream.wait_done(upto);
        let failed = self.first_failed.load(Ordering::Acquire);
        if failed < upto {
            Counters::bump(&self.counters.barrier_refused_writes);
            let mut r = Report::new(
                EventKind::BarrierRefusedWrite,
                "write refused: a read answered before it failed verification".to_string(),
            );
            r.request = Some(req.clone());
            self.emit(r);
            return Err(io_error(
                "write refused: an earlier read answered by the candidate failed verification",
            ));
        }
        Ok(())
    }

    fn write_new_primary(
        &self,
        at: Sector,
        s: Span,
        data: &[u8],
        req: &RequestInfo,
    ) -> dovetail_layout::Result<()> {
        let fills = self.fills(s);
        let from = fills[0].map_or(s.start, |f| f.0);
        let to = fills[1].map_or(s.end, |f| f.1);
        if fills != [None, None] {
            // The trusted version is current for blocks the candidate does not hold, but make
            // sure nothing queued is still on its way there.
            self.stream.drain();
        }
        let head = (s.start - from) as usize;
        let r = with_scratch(&SCRATCH_A, (to - from) as usize, |ext| {
            let src: &[u8] = if fills == [None, None] {
                data
            } else {
                self.fill_from_trusted(ext, from, fills)?;
                ext[head..head + data.len()].copy_from_slice(data);
                ext
            };
            Ok::<_, Error>(self.call_candidate(|c| c.write(Sector(from / SECTOR_SIZE), src)))
        })?;
        if let Err(f) = r {
            self.candidate_failed("write", Some(req.clone()), f);
            self.settle();
            return self.trusted.write(at, data);
        }
        self.mark_written(s, from, to);
        let mut copy = self.stream.buffer(data.len());
        copy.copy_from_slice(data);
        let op = Op::TrustedWrite {
            at,
            data: copy,
            request: req.clone(),
        };
        self.stream.push(op, data.len(), &self.counters);
        Ok(())
    }

    fn write_zeroes_impl(
        &self,
        at: Sector,
        len: Sectors,
        unmap: bool,
        op: &'static str,
    ) -> dovetail_layout::Result<()> {
        let s = self.span(at, len)?;
        let g = self.gate()?;
        let p = *g;
        Counters::bump(&self.counters.writes);
        if len.0 == 0 {
            return self.trusted.write_zeroes(at, len, unmap);
        }
        let req = self.request(op, at, len);
        let _stripes = self.stripes.lock(s.first, s.last, Mode::Exclusive);
        if self.is_quarantined() {
            self.settle();
            return self.trusted.write_zeroes(at, len, unmap);
        }
        if p == Policy::BarrierWritesAsync {
            self.barrier(&req)?;
        }
        let fills = self.fills(s);
        let from = fills[0].map_or(s.start, |f| f.0);
        let to = fills[1].map_or(s.end, |f| f.1);
        if p == Policy::AsyncNewPrimary {
            if fills != [None, None] {
                self.stream.drain();
            }
            if let Err(f) = self.candidate_zeroes_sync(at, len, unmap, fills, false) {
                self.candidate_failed(op, Some(req.clone()), f);
                self.settle();
                return self.trusted.write_zeroes(at, len, unmap);
            }
            self.mark_written(s, from, to);
            let op = Op::TrustedZeroes {
                at,
                len,
                unmap,
                request: req,
            };
            self.stream.push(op, CHECK_COST, &self.counters);
            return Ok(());
        }
        if let Err(e) = self.trusted.write_zeroes(at, len, unmap) {
            self.mark_trusted_failed(s);
            return Err(e);
        }
        if self.is_quarantined() {
            return Ok(());
        }
        if p.candidate_writes_sync() {
            let verify = p == Policy::SyncCrossChecks;
            match self.candidate_zeroes_sync(at, len, unmap, fills, verify) {
                Err(f) => self.candidate_failed(op, Some(req.clone()), f),
                Ok(Some(d)) => self.mismatch(
                    EventKind::Mismatch,
                    "candidate read-back of zeroed range is not zero",
                    Some(req.clone()),
                    None,
                    None,
                    Some(d),
                ),
                Ok(None) => {}
            }
        } else {
            self.stream.push(
                Op::CandidateZeroes { at, len, unmap },
                CHECK_COST,
                &self.counters,
            );
            for (a, b) in fills.into_iter().flatten() {
                let mut v = self.stream.buffer((b - a) as usize);
                self.trusted.read_quiet(Sector(a / SECTOR_SIZE), &mut v)?;
                let op = Op::CandidateWrite {
                    at: Sector(a / SECTOR_SIZE),
                    data: v,
                };
                self.stream.push(op, (b - a) as usize, &self.counters);
            }
        }
        self.mark_written(s, from, to);
        Ok(())
    }

    /// Zeroes a range of the candidate now, completing partial blocks it did not hold from the
    /// trusted version; with `verify`, reads the range back and returns the offset of the first
    /// non-zero byte.
    fn candidate_zeroes_sync(
        &self,
        at: Sector,
        len: Sectors,
        unmap: bool,
        fills: [Option<(u64, u64)>; 2],
        verify: bool,
    ) -> Result<Option<u64>, CandidateFailure> {
        self.call_candidate(|c| c.write_zeroes(at, len, unmap))?;
        for (a, b) in fills.into_iter().flatten() {
            let fill_at = Sector(a / SECTOR_SIZE);
            with_scratch(&SCRATCH_A, (b - a) as usize, |v| {
                // A trusted read error here leaves the candidate's block partly unknown: report
                // it as the candidate's problem would be wrong, so mark it unverified instead.
                match self.trusted.read_quiet(fill_at, v) {
                    Ok(()) => self.call_candidate(|c| c.write(fill_at, v)),
                    Err(_) => {
                        self.unverified.set(a / BLOCK);
                        Ok(())
                    }
                }
            })?;
        }
        if !verify {
            return Ok(None);
        }
        let start = at.0 * SECTOR_SIZE;
        let end = start + len.0 * SECTOR_SIZE;
        let mut off = start;
        while off < end {
            let n = (end - off).min(PIECE) as usize;
            let found = with_scratch(&SCRATCH_B, n, |back| {
                self.call_candidate(|c| c.read_quiet(Sector(off / SECTOR_SIZE), back))
                    .map(|()| back.iter().position(|&x| x != 0))
            })?;
            if let Some(d) = found {
                return Ok(Some(off - start + d as u64));
            }
            off += n as u64;
        }
        Ok(None)
    }

    // --------------------------------------------------------------- flush

    fn flush_impl(&self) -> dovetail_layout::Result<()> {
        let g = self.gate()?;
        let p = *g;
        Counters::bump(&self.counters.flushes);
        if self.is_quarantined() {
            self.settle();
            self.trusted_lost_check()?;
            return self.trusted.flush();
        }
        if p == Policy::AsyncNewPrimary {
            if let Err(f) = self.call_candidate(|c| c.flush()) {
                let req = self.request("flush", Sector(0), Sectors(0));
                self.candidate_failed("flush", Some(req), f);
            }
            self.stream.drain();
            self.trusted_lost_check()?;
            self.trusted.flush()?;
        } else {
            self.trusted.flush()?;
            self.stream.drain();
            if !self.is_quarantined() {
                if let Err(f) = self.call_candidate(|c| c.flush()) {
                    let req = self.request("flush", Sector(0), Sectors(0));
                    self.candidate_failed("flush", Some(req), f);
                }
            }
        }
        if !self.is_quarantined() {
            if let Err(e) = self.presence.persist() {
                self.quarantine(
                    &format!(
                        "the presence map could not be persisted: {}",
                        error_chain(&e)
                    ),
                    None,
                );
            }
        }
        Ok(())
    }

    /// async-new-primary: a trusted write the guest was told had completed failed in the
    /// background; the next flush reports it (like a writeback error at fsync).
    fn trusted_lost_check(&self) -> dovetail_layout::Result<()> {
        if self.trusted_lost.swap(false, Ordering::AcqRel) {
            return Err(Error::Io {
                op: "flush",
                path: format!("tee of disk {}", self.disk),
                source: std::io::Error::other(
                    "a write applied to the trusted version in the background failed",
                ),
            });
        }
        Ok(())
    }

    // ------------------------------------------------------- the stream worker

    fn run_op(&self, seq: u64, op: Op) {
        match op {
            Op::CandidateWrite { at, data } => {
                if !self.is_quarantined() {
                    if let Err(f) = self.call_candidate(|c| c.write(at, &data)) {
                        let len = Sectors(data.len() as u64 / SECTOR_SIZE);
                        let req = self.request("write", at, len);
                        self.candidate_failed("write (background)", Some(req), f);
                    }
                }
                self.stream.recycle(data);
            }
            Op::CandidateZeroes { at, len, unmap } => {
                if !self.is_quarantined() {
                    if let Err(f) = self.call_candidate(|c| c.write_zeroes(at, len, unmap)) {
                        let req = self.request("write-zeroes", at, len);
                        self.candidate_failed("write-zeroes (background)", Some(req), f);
                    }
                }
            }
            Op::CandidateCheck {
                at,
                len,
                hash,
                request,
            } => {
                if self.is_quarantined() {
                    return;
                }
                let mut buf = self.stream.buffer(len);
                match self.call_candidate(|c| c.read(at, &mut buf)) {
                    Err(f) => self.candidate_failed("read (background check)", Some(request), f),
                    Ok(()) => {
                        let h = xxh3_128(&buf);
                        if h != hash {
                            self.mismatch(
                                EventKind::Mismatch,
                                "candidate read differs from the trusted version (background check)",
                                Some(request),
                                Some(hash),
                                Some(h),
                                None,
                            );
                        }
                    }
                }
                self.stream.recycle(buf);
            }
            Op::TrustedCheck {
                at,
                len,
                hash,
                request,
            } => {
                if self.is_quarantined() {
                    return;
                }
                let mut buf = self.stream.buffer(len);
                let r = catch_unwind(AssertUnwindSafe(|| self.trusted.read(at, &mut buf)));
                match r {
                    Ok(Ok(())) => {
                        let h = xxh3_128(&buf);
                        if h != hash {
                            self.first_failed.fetch_min(seq, Ordering::AcqRel);
                            self.mismatch(
                                EventKind::Mismatch,
                                "the read the candidate answered differs from the trusted version",
                                Some(request),
                                Some(h),
                                Some(hash),
                                None,
                            );
                        }
                    }
                    other => {
                        let what = match other {
                            Ok(Err(e)) => error_chain(&e),
                            Err(p) => format!("panic: {}", panic_message(&*p)),
                            Ok(Ok(())) => String::new(),
                        };
                        self.first_failed.fetch_min(seq, Ordering::AcqRel);
                        self.trusted_background_error("read (background check)", &request, what);
                        self.quarantine(
                            "a read the candidate answered could not be verified",
                            Some(request),
                        );
                    }
                }
                self.stream.recycle(buf);
            }
            Op::TrustedWrite { at, data, request } => {
                let r = catch_unwind(AssertUnwindSafe(|| self.trusted.write(at, &data)));
                self.trusted_result("write (background)", &request, r);
                self.stream.recycle(data);
            }
            Op::TrustedZeroes {
                at,
                len,
                unmap,
                request,
            } => {
                let r = catch_unwind(AssertUnwindSafe(|| {
                    self.trusted.write_zeroes(at, len, unmap)
                }));
                self.trusted_result("write-zeroes (background)", &request, r);
            }
        }
    }

    fn trusted_result(
        &self,
        what: &str,
        request: &RequestInfo,
        r: std::thread::Result<dovetail_layout::Result<()>>,
    ) {
        let msg = match r {
            Ok(Ok(())) => return,
            Ok(Err(e)) => error_chain(&e),
            Err(p) => format!("panic: {}", panic_message(&*p)),
        };
        self.trusted_lost.store(true, Ordering::Release);
        self.trusted_background_error(what, request, msg);
    }

    fn trusted_background_error(&self, what: &str, request: &RequestInfo, msg: String) {
        Counters::bump(&self.counters.trusted_background_errors);
        let mut r = Report::new(
            EventKind::TrustedBackgroundError,
            format!("trusted {what} failed"),
        );
        r.request = Some(request.clone());
        r.trusted = Some(msg);
        self.emit(r);
    }

    fn worker(self: Arc<Self>) {
        while let Some((seq, cost, op)) = self.stream.pop() {
            self.run_op(seq, op);
            self.stream.complete(seq, cost);
        }
    }

    /// Sleeps up to `d`; returns `true` if the Tee is stopping.
    pub fn sleep(&self, d: Duration) -> bool {
        let g = self.stop.lock().unwrap_or_else(|p| p.into_inner());
        if *g {
            return true;
        }
        let (g, _) = self
            .stop_cv
            .wait_timeout(g, d)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }

    pub fn stopping(&self) -> bool {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A [`BlockLayout`] over a trusted and a candidate version; see the module documentation.
pub struct Tee {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Tee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl Tee {
    /// Puts `trusted` and `candidate` behind a Tee. Refuses versions of different capacity and
    /// a presence map of the wrong size. Durably marks the map dirty before serving; if it was
    /// not closed cleanly, starts the resync of every present block.
    pub fn new(
        trusted: Arc<dyn BlockLayout>,
        candidate: Arc<dyn BlockLayout>,
        presence: Arc<PresenceMap>,
        opts: TeeOptions,
    ) -> Result<Tee, TeeError> {
        let capacity = trusted.capacity();
        if candidate.capacity() != capacity {
            return Err(TeeError::InvalidArgument(format!(
                "disk {}: the candidate has {} but the trusted version {}",
                opts.disk,
                candidate.capacity(),
                capacity
            )));
        }
        let cap_bytes = capacity.bytes().ok_or_else(|| {
            TeeError::InvalidArgument(format!("disk {}: capacity overflows", opts.disk))
        })?;
        let blocks = cap_bytes.div_ceil(BLOCK);
        if presence.blocks() != blocks {
            return Err(TeeError::InvalidArgument(format!(
                "disk {}: the presence map has {} blocks, the disk {}",
                opts.disk,
                presence.blocks(),
                blocks
            )));
        }
        let unclean = !presence.was_clean();
        presence.mark_dirty()?;
        let unverified = Unverified::new(blocks);
        if unclean {
            let mut b = 0;
            while let Some(p) = next_present(&presence, b) {
                unverified.set(p);
                b = p + 1;
            }
        }
        let inner = Arc::new(Inner {
            disk: opts.disk.clone(),
            trusted,
            candidate,
            presence,
            capacity,
            cap_bytes,
            blocks,
            policy: RwLock::new(opts.policy),
            policy_now: AtomicU8::new(policy_index(opts.policy)),
            quarantined: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            callbacks: Mutex::new(Vec::new()),
            stripes: Stripes::new(),
            stream: Stream::new(opts.stream_bytes),
            counters: Counters::default(),
            events: EventLog::new(&opts.disk),
            req_seq: AtomicU64::new(0),
            unverified,
            first_failed: AtomicU64::new(u64::MAX),
            trusted_lost: AtomicBool::new(false),
            stop: Mutex::new(false),
            stop_cv: Condvar::new(),
            lazy_interval: opts.lazy_interval,
            lazy_region: opts.lazy_region.max(BLOCK),
            read_hints: ReadHints::new(),
        });
        let tee = Tee {
            inner,
            threads: Mutex::new(Vec::new()),
        };
        tee.spawn("stream", |i| i.worker())?;
        tee.spawn("lazy", crate::lazy::lazy_job)?;
        if tee.inner.unverified.any() {
            log::info!(
                "tee {}: the presence map was not closed cleanly; resyncing {} present blocks",
                tee.inner.disk,
                tee.inner.unverified.count()
            );
            tee.spawn("resync", crate::lazy::resync)?;
        }
        Ok(tee)
    }

    fn spawn(
        &self,
        name: &'static str,
        f: impl FnOnce(Arc<Inner>) + Send + 'static,
    ) -> Result<(), TeeError> {
        let inner = self.inner.clone();
        let h = std::thread::Builder::new()
            .name(format!("tee-{name}"))
            .spawn(move || f(inner))
            .map_err(|e| TeeError::Thread(name, e))?;
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(h);
        Ok(())
    }

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

    /// Orderly shutdown: stops the lazy job and the resync, drains the stream, flushes both
    /// versions, and closes the presence map cleanly (left dirty if the candidate is
    /// quarantined or the resync did not finish, so the next start resyncs). Later requests
    /// fail.
    pub fn close(&self) -> Result<(), TeeError> {
        self.stop_background();
        let g = self.inner.policy.write().unwrap_or_else(|e| e.into_inner());
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        drop(g);
        let inner = &self.inner;
        inner.stream.drain();
        inner.trusted_lost_check()?;
        inner.trusted.flush()?;
        if !inner.is_quarantined() {
            if let Err(f) = inner.call_candidate(|c| c.flush()) {
                inner.candidate_failed("flush (close)", None, f);
            }
        }
        if !inner.is_quarantined() {
            if inner.unverified.any() {
                inner.presence.persist()?;
            } else {
                inner.presence.close_clean()?;
            }
        }
        Ok(())
    }

    /// Stops and joins the lazy job and the resync (the stream worker keeps running).
    fn stop_background(&self) {
        *self.inner.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.inner.stop_cv.notify_all();
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        // The stream worker is the first thread; join the others.
        let keep = threads.len().min(1);
        let rest: Vec<_> = threads.drain(keep..).collect();
        drop(threads);
        for h in rest {
            let _ = h.join();
        }
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        self.stop_background();
        self.inner.stream.stop();
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for h in threads {
            let _ = h.join();
        }
    }
}

fn policy_index(p: Policy) -> u8 {
    Policy::ALL.iter().position(|&q| q == p).unwrap_or(0) as u8
}

fn next_present(presence: &PresenceMap, from: u64) -> Option<u64> {
    // `next_absent` is the map's fast walk; present blocks are found by skipping absent runs.
    let mut b = from;
    while b < presence.blocks() {
        if presence.contains(b) {
            return Some(b);
        }
        b += 1;
    }
    None
}

impl BlockLayout for Tee {
    fn capacity(&self) -> Sectors {
        self.inner.capacity
    }

    fn read(&self, at: Sector, buf: &mut [u8]) -> dovetail_layout::Result<()> {
        let inner = &*self.inner;
        let len = buffer_sectors(buf.len())?;
        let s = inner.span(at, len)?;
        let g = inner.gate()?;
        Counters::bump(&inner.counters.reads);
        inner.hint_read(s);
        if buf.is_empty() || !inner.read_involves_candidate(*g, s) {
            if inner.is_quarantined() {
                inner.settle();
            }
            return inner.trusted.read(at, buf);
        }
        inner.read_checked(*g, at, s, buf)
    }

    fn read_into(
        &self,
        at: Sector,
        bufs: IoBufs<'_>,
        scratch: &mut Vec<u8>,
    ) -> dovetail_layout::Result<()> {
        let inner = &*self.inner;
        let len = buffer_sectors(bufs.len())?;
        let s = inner.span(at, len)?;
        let g = inner.gate()?;
        Counters::bump(&inner.counters.reads);
        inner.hint_read(s);
        if bufs.is_empty() || !inner.read_involves_candidate(*g, s) {
            if inner.is_quarantined() {
                inner.settle();
            }
            return inner.trusted.read_into(at, bufs, scratch);
        }
        let buf = dovetail_layout::iobuf::scratch(scratch, bufs.len());
        inner.read_checked(*g, at, s, buf)?;
        bufs.copy_from(buf);
        Ok(())
    }

    fn write(&self, at: Sector, buf: &[u8]) -> dovetail_layout::Result<()> {
        self.inner.write_impl(at, Payload::Borrowed(buf))
    }

    fn write_from(
        &self,
        at: Sector,
        bufs: IoBufs<'_>,
        scratch: &mut Vec<u8>,
    ) -> dovetail_layout::Result<()> {
        let inner = &*self.inner;
        if inner.is_quarantined() || inner.current_policy().candidate_writes_sync() {
            let buf = dovetail_layout::iobuf::scratch(scratch, bufs.len());
            bufs.copy_to(buf);
            return inner.write_impl(at, Payload::Borrowed(buf));
        }
        // The candidate is written from the stream: copy the guest's data once, into the
        // buffer that will be queued.
        let mut v = inner.stream.buffer(bufs.len());
        bufs.copy_to(&mut v);
        inner.write_impl(at, Payload::Owned(v))
    }

    fn flush(&self) -> dovetail_layout::Result<()> {
        self.inner.flush_impl()
    }

    fn discard(&self, at: Sector, len: Sectors) -> dovetail_layout::Result<()> {
        self.inner.write_zeroes_impl(at, len, true, "discard")
    }

    fn write_zeroes(&self, at: Sector, len: Sectors, unmap: bool) -> dovetail_layout::Result<()> {
        self.inner.write_zeroes_impl(at, len, unmap, "write-zeroes")
    }
}
