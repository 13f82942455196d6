//! What the Tee reports: events with their provenance (kept in a bounded ring, sent to
//! subscribers, logged) and counters.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use serde::Serialize;

use crate::policy::Policy;

/// How many events [`Tee::events`](crate::tee::Tee::events) keeps.
pub const EVENT_RING: usize = 256;
/// How many events a subscriber's channel holds before further events are dropped (and counted).
pub const SUBSCRIBER_QUEUE: usize = 1024;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// The candidate's data differed from the trusted version's.
    Mismatch,
    /// The candidate returned an I/O error.
    CandidateError,
    /// The candidate panicked.
    CandidatePanic,
    /// The candidate tried to write outside its grants and the store refused it.
    GrantRefused,
    /// The candidate was quarantined: it gets no more I/O.
    Quarantined,
    /// Under `barrier-writes-async`, a write waited for an earlier read that failed verification
    /// and was refused.
    BarrierRefusedWrite,
    /// The lazy hash job found a region where the versions differ.
    LazyMismatch,
    /// The resync after an unclean stop finished.
    Resynced,
    /// The policy was changed.
    PolicyChanged,
    /// A write or flush the background stream applied to the trusted version failed
    /// (`async-new-primary`).
    TrustedBackgroundError,
    /// N-version Tee: a member's block lost a vote (its data differed from the majority's, or
    /// it failed); `member`, `block` and `first_difference` say which and where.
    Outvoted,
    /// N-version Tee: a block that lost a vote was rewritten in that member from the majority.
    Repaired,
    /// N-version Tee: no content had a majority of the members holding a block; the trusted
    /// member's data was returned and the block is marked disputed.
    NoMajority,
    /// N-version Tee: a member joined the Tee.
    MemberAdded,
    /// N-version Tee: a member left the Tee.
    MemberRemoved,
    /// N-version Tee: a member holding every block became the trusted member.
    MemberPromoted,
    /// A divergence bisection named the first request after which the versions differ on a
    /// block (or found none); the report's file is named in the message.
    Bisected,
}

impl EventKind {
    /// Events an operator must look at (logged at `warn`); the others are logged at `info`.
    pub fn is_warning(self) -> bool {
        matches!(
            self,
            EventKind::Mismatch
                | EventKind::LazyMismatch
                | EventKind::Quarantined
                | EventKind::BarrierRefusedWrite
                | EventKind::TrustedBackgroundError
                | EventKind::Outvoted
                | EventKind::NoMajority
        )
    }
}

/// The guest request (or background piece) an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestInfo {
    /// `read`, `write`, `write-zeroes`, `flush`, `lazy`, `resync`.
    pub op: &'static str,
    pub sector: u64,
    pub sectors: u64,
    /// The Tee's sequence number of the request (counted from 1 per Tee).
    pub seq: u64,
}

/// Where a Tee's (or a voting Tee's) events arrive (`subscribe`).
pub type TeeEvents = crossbeam_channel::Receiver<TeeEvent>;

/// One event, with its provenance.
#[derive(Debug, Clone, Serialize)]
pub struct TeeEvent {
    /// Per Tee, from 1.
    pub seq: u64,
    pub unix_ms: u64,
    pub disk: String,
    pub kind: EventKind,
    pub request: Option<RequestInfo>,
    pub policy: Policy,
    /// What the trusted version said: an XXH3-128 hash (32 hex digits) or an error.
    pub trusted: Option<String>,
    /// What the candidate said: an XXH3-128 hash (32 hex digits), an error or a panic message.
    pub candidate: Option<String>,
    /// Byte offset of the first difference within the request, when known (N-version Tee:
    /// within `block`).
    pub first_difference: Option<u64>,
    pub message: String,
    /// N-version Tee: the member (index, 0 = trusted) the event is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member: Option<usize>,
    /// N-version Tee: the 4 KiB block the event is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block: Option<u64>,
}

/// A snapshot of a Tee's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TeeCounters {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    /// Guest reads (or parts of reads) compared with the candidate, now or in the background.
    pub compared_reads: u64,
    pub compared_bytes: u64,
    pub mismatches: u64,
    pub candidate_errors: u64,
    pub candidate_panics: u64,
    pub grant_refusals: u64,
    pub quarantines: u64,
    /// The most data ever queued for the background stream, in bytes.
    pub queue_high_water: u64,
    /// Times a request waited for the background stream to make room.
    pub backpressure_waits: u64,
    /// Pieces (≤ 1 MiB) compared by the lazy hash job.
    pub lazy_regions_checked: u64,
    /// Blocks the resync after an unclean stop rewrote in the candidate.
    pub resync_blocks_repaired: u64,
    /// Events a slow subscriber did not receive.
    pub events_dropped: u64,
    /// Writes refused under `barrier-writes-async`.
    pub barrier_refused_writes: u64,
    /// Errors of the trusted version in the background stream (`async-new-primary`).
    pub trusted_background_errors: u64,
}

/// The live counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub compared_reads: AtomicU64,
    pub compared_bytes: AtomicU64,
    pub mismatches: AtomicU64,
    pub candidate_errors: AtomicU64,
    pub candidate_panics: AtomicU64,
    pub grant_refusals: AtomicU64,
    pub quarantines: AtomicU64,
    pub queue_high_water: AtomicU64,
    pub backpressure_waits: AtomicU64,
    pub lazy_regions_checked: AtomicU64,
    pub resync_blocks_repaired: AtomicU64,
    pub events_dropped: AtomicU64,
    pub barrier_refused_writes: AtomicU64,
    pub trusted_background_errors: AtomicU64,
}

impl Counters {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> TeeCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TeeCounters {
            reads: g(&self.reads),
            writes: g(&self.writes),
            flushes: g(&self.flushes),
            compared_reads: g(&self.compared_reads),
            compared_bytes: g(&self.compared_bytes),
            mismatches: g(&self.mismatches),
            candidate_errors: g(&self.candidate_errors),
            candidate_panics: g(&self.candidate_panics),
            grant_refusals: g(&self.grant_refusals),
            quarantines: g(&self.quarantines),
            queue_high_water: g(&self.queue_high_water),
            backpressure_waits: g(&self.backpressure_waits),
            lazy_regions_checked: g(&self.lazy_regions_checked),
            resync_blocks_repaired: g(&self.resync_blocks_repaired),
            events_dropped: g(&self.events_dropped),
            barrier_refused_writes: g(&self.barrier_refused_writes),
            trusted_background_errors: g(&self.trusted_background_errors),
        }
    }
}

/// The fields of an event the reporter fills in; [`EventLog::emit`] adds the rest.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    pub kind: EventKind,
    pub request: Option<RequestInfo>,
    pub trusted: Option<String>,
    pub candidate: Option<String>,
    pub first_difference: Option<u64>,
    pub message: String,
    pub member: Option<usize>,
    pub block: Option<u64>,
}

impl Report {
    pub fn new(kind: EventKind, message: impl Into<String>) -> Report {
        Report {
            kind,
            request: None,
            trusted: None,
            candidate: None,
            first_difference: None,
            message: message.into(),
            member: None,
            block: None,
        }
    }
}

/// The ring of recent events and the subscribers.
#[derive(Debug)]
pub(crate) struct EventLog {
    disk: String,
    seq: AtomicU64,
    ring: Mutex<VecDeque<TeeEvent>>,
    subscribers: Mutex<Vec<Sender<TeeEvent>>>,
}

impl EventLog {
    pub fn new(disk: &str) -> EventLog {
        EventLog {
            disk: disk.to_string(),
            seq: AtomicU64::new(0),
            ring: Mutex::new(VecDeque::with_capacity(EVENT_RING)),
            subscribers: Mutex::new(Vec::new()),
        }
    }

    /// Records, logs and publishes an event; returns it.
    pub fn emit(&self, policy: Policy, r: Report, counters: &Counters) -> TeeEvent {
        let ev = TeeEvent {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            disk: self.disk.clone(),
            kind: r.kind,
            request: r.request,
            policy,
            trusted: r.trusted,
            candidate: r.candidate,
            first_difference: r.first_difference,
            message: r.message,
            member: r.member,
            block: r.block,
        };
        log_event(&ev);
        {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            if ring.len() == EVENT_RING {
                ring.pop_front();
            }
            ring.push_back(ev.clone());
        }
        let mut subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|s| match s.try_send(ev.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                Counters::bump(&counters.events_dropped);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
        ev
    }

    pub fn recent(&self) -> Vec<TeeEvent> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().cloned().collect()
    }

    pub fn subscribe(&self) -> Receiver<TeeEvent> {
        let (tx, rx) = crossbeam_channel::bounded(SUBSCRIBER_QUEUE);
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }
}

/// One line an operator can follow: disk, event, request, both sides' answers.
fn log_event(ev: &TeeEvent) {
    let mut line = format!(
        "tee {}: {:?} #{} under {}: {}",
        ev.disk, ev.kind, ev.seq, ev.policy, ev.message
    );
    if let Some(r) = &ev.request {
        line.push_str(&format!(
            " [{} request #{} at sector {} +{} sectors]",
            r.op, r.seq, r.sector, r.sectors
        ));
    }
    if let Some(t) = &ev.trusted {
        line.push_str(&format!(" trusted={t}"));
    }
    if let Some(c) = &ev.candidate {
        line.push_str(&format!(" candidate={c}"));
    }
    if let Some(m) = ev.member {
        line.push_str(&format!(" member={m}"));
    }
    if let Some(b) = ev.block {
        line.push_str(&format!(" block={b}"));
    }
    if let Some(d) = ev.first_difference {
        line.push_str(&format!(" first difference at byte {d}"));
    }
    if ev.kind.is_warning() {
        log::warn!("{line}");
    } else {
        log::info!("{line}");
    }
}

/// An XXH3-128 hash as 32 hex digits.
pub fn hash_hex(h: u128) -> String {
    format!("{h:032x}")
}
