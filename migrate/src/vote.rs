//! The N-version Tee: a [`BlockLayout`] over 2..=[`MAX_MEMBERS`] versions of one disk (member
//! 0 the trusted version, the others candidates) that votes per 4 KiB block, returns the
//! majority's data, repairs the minority in place and quarantines a member that keeps losing.
//!
//! The two-member [`Tee`](crate::tee::Tee) stays as it is (the trusted version always wins,
//! any disagreement quarantines the candidate); this type is the generalisation for three or
//! more members, where a majority can tell which version was right (EnvyFS's N-version idea).
//!
//! # Voters
//!
//! A member *holds* a block when its presence map says so (the trusted member holds every
//! block) and the block is not *stale* in it (a write to it failed, or it lost a vote and its
//! repair has not happened yet). The voters of a block are the live (not quarantined) members
//! that hold it. Their 4 KiB blocks are compared by XXH3-128; a content held by more than half
//! of the voters is the majority. A single voter wins alone. With no majority (e.g. 1-1-1, or
//! 2-2), the data of the lowest-indexed voter (the trusted member while it is live) is
//! returned, the block is marked *disputed* ([`VotingTee::disputed`]), a `no-majority` event
//! tells the operator, and nothing is repaired (nobody knows which side is right).
//!
//! # Repair and quarantine
//!
//! A voter whose block differs from the majority's, or that failed to read it, *loses* the
//! vote: counted per member, an `outvoted` event naming the member, the block and the first
//! differing byte. The majority's block is then written to it in place (a `repaired` event and
//! counter) under the block's stripe, exclusively, after voting again (a write may have
//! changed the block meanwhile). A member whose losses exceed the threshold
//! ([`VotingTee::set_lose_threshold`], default [`DEFAULT_LOSE_THRESHOLD`]) is quarantined: no
//! more I/O, no more votes. A panic or a write refused by the store's grant check quarantines
//! at once. The last live member is never quarantined.
//!
//! # Writes
//!
//! Every write goes to every live member, under the blocks' stripes (exclusive), synchronously
//! under every policy (the asynchronous policies' background part is the vote, below), to the
//! members in parallel: each member has a writer thread ([`crate::vote_writer`], started with
//! the member), the first live member is written on the request's own thread and the others'
//! shares are handed to their writers (a busy writer, serving another request, gives its
//! share back and the request's thread writes that member itself), and the request waits for
//! every answer before it releases the stripes, so overlapping writes reach every member in the
//! same order. The
//! answers are then taken in member order, as if the members had been written one after
//! another (a member's panic is caught on its writer and counts as it did). That is done when
//! it saves time: each member keeps a moving average of its write time, and a write goes to
//! the members in parallel when those averages, all but the longest, add up to
//! [`DEFAULT_PARALLEL_MIN`] ([`VotingTee::set_parallel_min`]); otherwise every member is
//! written on the request's thread, one after another (a hand-off to another thread costs more
//! than a member answering from memory takes). A write succeeds if more than half of the members written succeeded; a
//! member whose write failed loses a vote and its blocks become stale until repaired. A
//! candidate's blocks become present when a write covers them whole (a partial block it did
//! not hold stays absent: [`VotingTee::fill`] copies absent blocks from the majority).
//! Under `sync-cross-checks` every candidate's copy is read back and rewritten if it differs.
//!
//! # Policies
//!
//! | policy | reads answered by | vote |
//! | --- | --- | --- |
//! | sync-cross-checks | the majority | before answering; writes read back from every candidate |
//! | sync-read-checks | the majority | before answering |
//! | async-old-primary | the trusted member | in the background, per read |
//! | barrier-writes-async | the first live candidate holding the blocks | in the background, per read; a later write waits for earlier votes and is refused if the answering member lost one |
//! | async-new-primary | the first live candidate holding the blocks | in the background, per read |
//! | lazy-hashes | the trusted member | in the background, a region every `lazy_interval` |
//! | mirror-only | the trusted member | never (errors still count) |
//!
//! A background vote remembers the hash of what the guest got; if no write touched the blocks
//! since (a per-stripe write generation), a hash that is not the majority's is a wrong answer
//! given to the guest: counted (`wrong_answers`) and, under barrier-writes-async, later writes
//! are refused as the two-member Tee does.
//!
//! # Membership
//!
//! [`VotingTee::add_member`], [`VotingTee::promote`] and [`VotingTee::remove_member`] change
//! the members between requests (they wait for the requests in flight, and for the background
//! vote's current piece: a vote takes the member set per piece under a lock they take too, so
//! a removed member is never voted on nor written once its removal returned); a daemon would
//! do that inside its `Switch` pause. A new member holds what its presence map says;
//! [`VotingTee::fill`] copies the rest from the majority. [`VotingTee::complete`] says whether
//! a member holds every block (the condition for promoting it).
//!
//! # Durability and bounds
//!
//! A candidate's presence map is marked dirty before its first write, persisted after each of
//! its flushes and closed cleanly by [`VotingTee::close`]. A member whose map was left unclean
//! (a crash) may differ on blocks written just before it without a fault: the background thread
//! first votes on every block (a `resynced` event when done), and until then that member's lost
//! votes are repaired without counting towards quarantine. A FLUSH succeeds when more than half
//! of the live members flushed; a member whose flush failed is quarantined. Background votes
//! queued or running are bounded by [`VOTE_BUDGET`] blocks (a read waits for room).
//!
//! Two members vote too, but a disagreement between two has no majority: the trusted member's
//! data is returned and the block disputed. The two-member [`Tee`](crate::tee::Tee), which
//! quarantines the candidate instead, is what a two-version disk is served by.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use dovetail_layout::{
    buffer_sectors, check_range, error_chain, BlockLayout, Error, Sector, Sectors, SECTOR_SIZE,
};
use dovetail_store::StoreError;
use serde::Serialize;
use xxhash_rust::xxh3::xxh3_128;

use crate::events::{hash_hex, Counters, EventKind, EventLog, Report, RequestInfo, TeeEvent};
use crate::policy::Policy;
use crate::presence::{PresenceMap, MAP_BLOCK};
use crate::stripes::{Mode, Stripes, STRIPES};
use crate::tee::{TeeError, TeeOptions, PIECE};
use crate::vote_writer::MemberWriter;

/// The most members a voting Tee takes.
pub const MAX_MEMBERS: usize = 5;
/// Votes a member may lose before it is quarantined.
pub const DEFAULT_LOSE_THRESHOLD: u64 = 16;
const BLOCK: u64 = MAP_BLOCK;
/// Blocks of background votes a Tee may have queued or running (64 MiB of guest reads): a read
/// that would exceed it waits for the worker (back-pressure, never unbounded memory).
pub const VOTE_BUDGET: u64 = 16384;
/// The time the members' recent writes say writing them at once would save, at least, for a
/// write to go to them in parallel ([`VotingTee::set_parallel_min`]): handing a write to
/// another thread and waiting for its answer costs a few tens of microseconds (more on a
/// loaded machine), more than members that answer from memory take.
pub const DEFAULT_PARALLEL_MIN: Duration = Duration::from_micros(50);

/// Run with the event of a quarantine.
type Callback = Box<dyn Fn(&TeeEvent) + Send + Sync>;

/// One member of the Tee.
struct Member {
    layout: Arc<dyn BlockLayout>,
    /// `None`: holds every block.
    presence: Option<Arc<PresenceMap>>,
    /// Blocks whose write failed or whose repair is pending.
    stale: Mutex<BTreeSet<u64>>,
    quarantined: AtomicBool,
    /// Its presence map was not closed cleanly: blocks written just before the stop may
    /// differ from the others' without any fault, so its lost votes are repaired but not
    /// counted towards the threshold until a full vote (the resync) has run.
    unclean: AtomicBool,
    losses: AtomicU64,
    repairs: AtomicU64,
    errors: AtomicU64,
    /// Applies its share of writes in parallel with the other members' (`None` until started).
    writer: Option<MemberWriter>,
    /// How long its writes take, in nanoseconds (a moving average, 1/8 per write).
    write_ns: Arc<AtomicU64>,
}

/// Folds the time one write took into a member's moving average.
fn record_write_time(avg: &AtomicU64, took: std::time::Duration) {
    let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
    let old = avg.load(Ordering::Relaxed);
    avg.store(old - old / 8 + ns / 8, Ordering::Relaxed);
}

impl Member {
    fn live(&self) -> bool {
        !self.quarantined.load(Ordering::Acquire)
    }

    fn holds(&self, b: u64) -> bool {
        self.presence.as_ref().is_none_or(|p| p.contains(b))
            && !self
                .stale
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&b)
    }

    fn holds_any(&self, first: u64, last: u64) -> bool {
        (first..=last).any(|b| self.holds(b))
    }

    fn call<R>(
        &self,
        f: impl FnOnce(&dyn BlockLayout) -> dovetail_layout::Result<R>,
    ) -> Result<R, Failure> {
        call(&*self.layout, f)
    }
}

/// Runs `f` on a member's layout, a panic caught as a [`Failure`].
fn call<R>(
    l: &dyn BlockLayout,
    f: impl FnOnce(&dyn BlockLayout) -> dovetail_layout::Result<R>,
) -> Result<R, Failure> {
    match catch_unwind(AssertUnwindSafe(|| f(l))) {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(Failure::Error(e)),
        Err(p) => Err(Failure::Panic(crate::tee::panic_text(&*p))),
    }
}

/// A mutating request, as each member applies it.
#[derive(Clone)]
enum MemberOp {
    /// `verify`: read the member's copy back afterwards (sync-cross-checks, candidates).
    Write {
        at: Sector,
        data: Arc<[u8]>,
        verify: bool,
    },
    Zeroes {
        at: Sector,
        len: Sectors,
        unmap: bool,
    },
}

/// A member's answer to a [`MemberOp`]: its result and, for a verified write that succeeded,
/// `Some((first difference, hash of what was read back))` if the copy read back differs.
type Answer = (Result<(), Failure>, Option<(u64, Option<u128>)>);

impl MemberOp {
    fn apply(&self, l: &dyn BlockLayout) -> Answer {
        match self {
            MemberOp::Write { at, data, verify } => {
                let r = call(l, |l| l.write(*at, data));
                if r.is_err() || !*verify {
                    return (r, None);
                }
                let mut back = vec![0u8; data.len()];
                let check = match call(l, |l| l.read_quiet(*at, &mut back)) {
                    Ok(()) => crate::tee::first_difference(data, &back)
                        .map(|d| (d as u64, Some(xxh3_128(&back)))),
                    Err(_) => Some((0, None)),
                };
                (r, check)
            }
            MemberOp::Zeroes { at, len, unmap } => {
                (call(l, |l| l.write_zeroes(*at, *len, *unmap)), None)
            }
        }
    }
}

/// Why a call into a member failed.
#[derive(Debug)]
enum Failure {
    Error(Error),
    Panic(String),
}

impl Failure {
    /// A panic or a grant refusal: the member cannot be trusted with more I/O.
    fn fatal(&self) -> bool {
        matches!(
            self,
            Failure::Panic(_) | Failure::Error(Error::Store(StoreError::GrantViolation { .. }))
        )
    }

    fn text(&self) -> String {
        match self {
            Failure::Error(e) => error_chain(e),
            Failure::Panic(p) => format!("panic: {p}"),
        }
    }
}

/// A voting Tee's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct VoteCounters {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    /// Blocks voted on (each block of each vote).
    pub blocks_voted: u64,
    /// Votes lost by some member (data differed, or the member failed).
    pub votes_lost: u64,
    /// Blocks rewritten in a member from the majority.
    pub repairs: u64,
    /// Blocks with no majority (trusted data returned, block marked disputed).
    pub no_majority: u64,
    /// Background votes that found the guest had been answered with a minority's data.
    pub wrong_answers: u64,
    /// Writes refused under barrier-writes-async.
    pub barrier_refused_writes: u64,
    /// The most blocks of background votes queued or running at once (at most
    /// [`VOTE_BUDGET`] plus one request's).
    pub votes_queued_peak: u64,
    pub member_errors: u64,
    pub member_panics: u64,
    pub grant_refusals: u64,
    pub quarantines: u64,
    /// Events a slow subscriber did not receive.
    pub events_dropped: u64,
}

#[derive(Debug, Default)]
struct Live {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    blocks_voted: AtomicU64,
    votes_lost: AtomicU64,
    repairs: AtomicU64,
    no_majority: AtomicU64,
    wrong_answers: AtomicU64,
    barrier_refused_writes: AtomicU64,
    member_errors: AtomicU64,
    member_panics: AtomicU64,
    grant_refusals: AtomicU64,
    quarantines: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// One member's state, for status output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberStatus {
    pub index: usize,
    pub quarantined: bool,
    /// Blocks its presence map holds (every block for the trusted member).
    pub held_blocks: u64,
    pub stale_blocks: u64,
    pub votes_lost: u64,
    pub repairs: u64,
    pub errors: u64,
}

/// A vote requested by a read, run by the background worker.
struct Job {
    seq: u64,
    first: u64,
    last: u64,
    /// The member that answered the guest, the hash of each block it answered, and the
    /// stripes' write generations when it did.
    answered: Option<(Arc<Member>, Vec<u128>, Vec<u64>)>,
    request: RequestInfo,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    next: u64,
    done: u64,
    stop: bool,
    /// Blocks of the jobs queued or running (bounded by [`VOTE_BUDGET`]).
    blocks: u64,
    /// The most `blocks` has been.
    peak: u64,
}

struct State {
    policy: Policy,
    members: Vec<Arc<Member>>,
}

struct Shared {
    disk: String,
    capacity: Sectors,
    cap_bytes: u64,
    blocks: u64,
    state: RwLock<State>,
    /// The members as of the last change, for the background threads (which must not take
    /// `state`: a request holding it may wait for them).
    snapshot: Mutex<Arc<Vec<Arc<Member>>>>,
    policy_now: AtomicU8,
    closed: AtomicBool,
    /// Set by `close`: a fill stops before its next block (checked under `vote_lock`).
    fills_stopped: AtomicBool,
    stripes: Stripes,
    /// Per stripe: bumped by every write under that stripe.
    gens: Box<[AtomicU64]>,
    live: Live,
    counters: Counters,
    events: EventLog,
    req_seq: AtomicU64,
    lose_threshold: AtomicU64,
    /// Held by a background vote for one piece and by a membership change: lock order is
    /// `state`, then this, then the stripes.
    vote_lock: Mutex<()>,
    /// Blocks of background votes that may be queued or running ([`VOTE_BUDGET`]).
    vote_budget: AtomicU64,
    /// Run once per quarantine, with its event (the daemon records it).
    callbacks: Mutex<Vec<Callback>>,
    disputed: Mutex<BTreeSet<u64>>,
    queue: Mutex<Queue>,
    queue_cv: Condvar,
    /// barrier-writes-async: per wrong answer, the job's sequence number and the last job
    /// queued when it was found (writes arriving in between are refused).
    failed: Mutex<Vec<(u64, u64)>>,
    lazy_interval: Duration,
    lazy_region: u64,
    /// [`DEFAULT_PARALLEL_MIN`], in nanoseconds.
    parallel_min_ns: AtomicU64,
}

/// An N-version Tee; see the module documentation.
pub struct VotingTee {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The request journal, when the options asked for one (`crate::bisect_members`).
    journal: Option<Arc<crate::journal::Journal>>,
}

impl std::fmt::Debug for VotingTee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VotingTee")
            .field("disk", &self.shared.disk)
            .field("members", &self.members())
            .field("policy", &self.policy())
            .finish_non_exhaustive()
    }
}

/// The outcome of voting on one block.
struct Verdict {
    /// Index (into the voters) of a voter holding the winning data.
    winner: usize,
    majority: bool,
    /// Voters that lost, with the first differing byte (`None`: they failed to read).
    losers: Vec<(usize, Option<u64>)>,
    hash: u128,
}

/// Votes among `datas` (one 4 KiB block each, `None` for a voter that failed).
fn vote(datas: &[Option<&[u8]>]) -> Option<Verdict> {
    let hashes: Vec<Option<u128>> = datas.iter().map(|d| d.map(xxh3_128)).collect();
    let mut count: HashMap<u128, usize> = HashMap::new();
    for h in hashes.iter().flatten() {
        *count.entry(*h).or_default() += 1;
    }
    let n = datas.len();
    let top = count.iter().find(|(_, c)| **c * 2 > n).map(|(h, _)| *h);
    let (hash, majority) = match top {
        Some(h) => (h, true),
        // No majority: the lowest-indexed voter that answered.
        None => (hashes.iter().flatten().next().copied()?, false),
    };
    let winner = hashes.iter().position(|h| *h == Some(hash))?;
    let wdata = datas[winner]?;
    let losers = if majority {
        datas
            .iter()
            .enumerate()
            .filter(|(i, _)| hashes[*i] != Some(hash))
            .map(|(i, d)| {
                (
                    i,
                    d.map(|d| crate::tee::first_difference(wdata, d).unwrap_or(0) as u64),
                )
            })
            .collect()
    } else {
        Vec::new()
    };
    Some(Verdict {
        winner,
        majority,
        losers,
        hash,
    })
}

impl Shared {
    fn policy(&self) -> Policy {
        Policy::ALL
            .get(self.policy_now.load(Ordering::Relaxed) as usize)
            .copied()
            .unwrap_or(Policy::SyncCrossChecks)
    }

    fn emit(&self, r: Report) -> TeeEvent {
        self.events.emit(self.policy(), r, &self.counters)
    }

    fn gate(&self) -> dovetail_layout::Result<RwLockReadGuard<'_, State>> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(Error::InvalidArgument(format!(
                "tee of disk {} is closed",
                self.disk
            )));
        }
        Ok(self.state.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn members(&self) -> Arc<Vec<Arc<Member>>> {
        self.snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn request(&self, op: &'static str, at: Sector, len: Sectors) -> RequestInfo {
        RequestInfo {
            op,
            sector: at.0,
            sectors: len.0,
            seq: self.req_seq.fetch_add(1, Ordering::Relaxed) + 1,
        }
    }

    /// `[start, end)` in bytes and the first and last block.
    fn span(&self, at: Sector, len: Sectors) -> dovetail_layout::Result<(u64, u64, u64, u64)> {
        check_range(at, len, self.capacity)?;
        let start = at.0 * SECTOR_SIZE;
        let end = start + len.0 * SECTOR_SIZE;
        Ok((
            start,
            end,
            start / BLOCK,
            end.saturating_sub(1).max(start) / BLOCK,
        ))
    }

    fn block_end(&self, b: u64) -> u64 {
        ((b + 1) * BLOCK).min(self.cap_bytes)
    }

    fn gens_of(&self, first: u64, last: u64) -> Vec<u64> {
        (first..=last.min(first + STRIPES - 1))
            .map(|b| self.gens[(b % STRIPES) as usize].load(Ordering::Acquire))
            .collect()
    }

    fn bump_gens(&self, first: u64, last: u64) {
        for b in first..=last.min(first + STRIPES - 1) {
            self.gens[(b % STRIPES) as usize].fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Counts a failure of member `i` and quarantines it if fatal.
    fn failed(
        &self,
        members: &[Arc<Member>],
        i: usize,
        what: &str,
        req: Option<&RequestInfo>,
        f: &Failure,
    ) {
        let m = &members[i];
        bump(&m.errors);
        let kind = match f {
            Failure::Panic(_) => {
                bump(&self.live.member_panics);
                EventKind::CandidatePanic
            }
            Failure::Error(Error::Store(StoreError::GrantViolation { .. })) => {
                bump(&self.live.grant_refusals);
                EventKind::GrantRefused
            }
            Failure::Error(_) => {
                bump(&self.live.member_errors);
                EventKind::CandidateError
            }
        };
        let mut r = Report::new(kind, format!("member {i}: {what} failed"));
        r.request = req.cloned();
        r.candidate = Some(f.text());
        r.member = Some(i);
        self.emit(r);
        if f.fatal() {
            self.quarantine(members, i, &format!("{what} failed: {}", f.text()), req);
        }
    }

    /// Quarantines member `i` (once), unless it is the last live member.
    fn quarantine(&self, members: &[Arc<Member>], i: usize, why: &str, req: Option<&RequestInfo>) {
        let live = members.iter().filter(|m| m.live()).count();
        if live <= 1 || !members[i].live() {
            return;
        }
        if members[i].quarantined.swap(true, Ordering::AcqRel) {
            return;
        }
        bump(&self.live.quarantines);
        let mut r = Report::new(
            EventKind::Quarantined,
            format!("member {i} quarantined: {why}; the other members serve the disk"),
        );
        r.request = req.cloned();
        r.member = Some(i);
        let ev = self.emit(r);
        let callbacks = self.callbacks.lock().unwrap_or_else(|p| p.into_inner());
        for cb in callbacks.iter() {
            cb(&ev);
        }
    }

    /// Records a lost vote of member `i` on block `b`.
    fn lost(
        &self,
        members: &[Arc<Member>],
        i: usize,
        b: u64,
        diff: Option<u64>,
        hashes: (u128, Option<u128>),
        req: Option<&RequestInfo>,
    ) {
        let m = &members[i];
        let unsettled = m.unclean.load(Ordering::Acquire);
        let n = if unsettled {
            m.losses.load(Ordering::Acquire)
        } else {
            m.losses.fetch_add(1, Ordering::AcqRel) + 1
        };
        bump(&self.live.votes_lost);
        let mut r = Report::new(
            EventKind::Outvoted,
            match diff {
                Some(d) => {
                    format!("member {i} lost the vote on block {b}: first differing byte {d}")
                }
                None => format!("member {i} lost the vote on block {b}: it could not read it"),
            },
        );
        r.request = req.cloned();
        r.member = Some(i);
        r.block = Some(b);
        r.first_difference = diff;
        r.trusted = Some(hash_hex(hashes.0));
        r.candidate = hashes.1.map(hash_hex);
        self.emit(r);
        let limit = self.lose_threshold.load(Ordering::Relaxed);
        if !unsettled && n > limit {
            self.quarantine(
                members,
                i,
                &format!("lost {n} votes (threshold {limit})"),
                req,
            );
        }
    }

    /// Reads `[at, at + buf.len())` of member `i`.
    fn read_member(&self, m: &Member, at: u64, buf: &mut [u8]) -> Result<(), Failure> {
        m.call(|l| l.read_quiet(Sector(at / SECTOR_SIZE), buf))
    }

    /// Votes on blocks `first..=last` (within one request or piece) from the members' copies,
    /// with the caller holding the stripes. Fills `out` (the blocks' bytes, `[start, end)` of
    /// the disk) with the winners' data. Returns the blocks some member lost, and the first
    /// block no live member holds or could read (its bytes in `out` are not filled).
    fn vote_range(
        &self,
        members: &[Arc<Member>],
        start: u64,
        end: u64,
        out: &mut [u8],
        req: Option<&RequestInfo>,
    ) -> (Vec<u64>, Option<u64>) {
        let first = start / BLOCK;
        let last = (end - 1) / BLOCK;
        // Each voter's copy of the whole range (a member holding none of it is skipped).
        let mut copies: Vec<(usize, Option<Vec<u8>>)> = Vec::new();
        for (i, m) in members.iter().enumerate() {
            if !m.live() || !m.holds_any(first, last) {
                continue;
            }
            let mut v = vec![0u8; (end - start) as usize];
            match self.read_member(m, start, &mut v) {
                Ok(()) => copies.push((i, Some(v))),
                Err(f) => {
                    self.failed(members, i, "read", req, &f);
                    copies.push((i, None));
                }
            }
        }
        let mut need_repair = Vec::new();
        let mut unreadable = None;
        for b in first..=last {
            let bs = (b * BLOCK).max(start);
            let be = self.block_end(b).min(end);
            let (o, n) = ((bs - start) as usize, (be - bs) as usize);
            let voters: Vec<&(usize, Option<Vec<u8>>)> = copies
                .iter()
                .filter(|(i, _)| members[*i].holds(b) && members[*i].live())
                .collect();
            let datas: Vec<Option<&[u8]>> = voters
                .iter()
                .map(|(_, d)| d.as_ref().map(|d| &d[o..o + n]))
                .collect();
            if datas.is_empty() {
                unreadable.get_or_insert(b);
                continue;
            }
            self.live.blocks_voted.fetch_add(1, Ordering::Relaxed);
            let Some(v) = vote(&datas) else {
                unreadable.get_or_insert(b);
                continue;
            };
            if let Some(w) = datas[v.winner] {
                out[o..o + n].copy_from_slice(w);
            }
            if !v.majority && datas.len() > 1 {
                self.no_majority(b, &voters.iter().map(|(i, _)| *i).collect::<Vec<_>>(), req);
                continue;
            }
            for (li, diff) in &v.losers {
                let i = voters[*li].0;
                let h = datas[*li].map(xxh3_128);
                self.lost(
                    members,
                    i,
                    b,
                    diff.map(|d| d + (bs - b * BLOCK)),
                    (v.hash, h),
                    req,
                );
                members[i]
                    .stale
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(b);
            }
            if !v.losers.is_empty() {
                need_repair.push(b);
            }
        }
        (need_repair, unreadable)
    }

    fn no_majority(&self, b: u64, voters: &[usize], req: Option<&RequestInfo>) {
        if !self
            .disputed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(b)
        {
            return;
        }
        bump(&self.live.no_majority);
        let mut r = Report::new(
            EventKind::NoMajority,
            format!(
                "block {b}: no majority among members {voters:?}; member {} (the lowest-indexed) answered, the block is marked disputed",
                voters.first().copied().unwrap_or(0)
            ),
        );
        r.request = req.cloned();
        r.block = Some(b);
        r.member = voters.first().copied();
        self.emit(r);
    }

    /// Votes again on block `b` under its stripe (exclusive) and rewrites every member that
    /// does not hold the majority's data (including members stale on it).
    fn repair(&self, members: &[Arc<Member>], b: u64, req: Option<&RequestInfo>) {
        let _g = self.stripes.lock(b, b, Mode::Exclusive);
        self.repair_locked(members, b, req);
    }

    fn repair_locked(&self, members: &[Arc<Member>], b: u64, req: Option<&RequestInfo>) {
        let start = b * BLOCK;
        let end = self.block_end(b);
        let n = (end - start) as usize;
        let mut copies: Vec<(usize, Option<Vec<u8>>)> = Vec::new();
        for (i, m) in members.iter().enumerate() {
            if !m.live() || m.presence.as_ref().is_some_and(|p| !p.contains(b)) {
                continue;
            }
            let mut v = vec![0u8; n];
            let r = self.read_member(m, start, &mut v);
            copies.push((i, r.ok().map(|()| v)));
        }
        // Stale members are repaired but do not vote.
        let voters: Vec<usize> = (0..copies.len())
            .filter(|&k| {
                let i = copies[k].0;
                !members[i]
                    .stale
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&b)
            })
            .collect();
        let datas: Vec<Option<&[u8]>> = voters.iter().map(|&k| copies[k].1.as_deref()).collect();
        let Some(v) = vote(&datas) else { return };
        if !v.majority && datas.len() > 1 {
            let idx: Vec<usize> = voters.iter().map(|&k| copies[k].0).collect();
            self.no_majority(b, &idx, req);
            return;
        }
        let Some(good) = datas[v.winner].map(|d| d.to_vec()) else {
            return;
        };
        for (i, d) in &copies {
            if d.as_deref().is_some_and(|d| xxh3_128(d) == v.hash) {
                members[*i]
                    .stale
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&b);
                continue;
            }
            let m = &members[*i];
            match m.call(|l| l.write(Sector(start / SECTOR_SIZE), &good)) {
                Ok(()) => {
                    bump(&m.repairs);
                    bump(&self.live.repairs);
                    m.stale.lock().unwrap_or_else(|p| p.into_inner()).remove(&b);
                    let mut r = Report::new(
                        EventKind::Repaired,
                        format!("member {i}: block {b} rewritten from the majority"),
                    );
                    r.request = req.cloned();
                    r.member = Some(*i);
                    r.block = Some(b);
                    self.emit(r);
                }
                Err(f) => {
                    self.failed(members, *i, "repair write", req, &f);
                    // Cannot repair what cannot be written: one more lost vote.
                    self.lost(members, *i, b, None, (v.hash, None), req);
                }
            }
        }
        if v.majority {
            self.disputed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&b);
        }
    }

    fn read_impl(&self, at: Sector, buf: &mut [u8]) -> dovetail_layout::Result<()> {
        let len = buffer_sectors(buf.len())?;
        let (start, end, first, last) = self.span(at, len)?;
        let g = self.gate()?;
        bump(&self.live.reads);
        if buf.is_empty() {
            return Ok(());
        }
        let p = g.policy;
        let members = &g.members;
        let req = self.request("read", at, len);
        let sync = matches!(p, Policy::SyncCrossChecks | Policy::SyncReadChecks);
        if sync {
            let (repairs, bad) = {
                let _s = self.stripes.lock(first, last, Mode::Shared);
                self.vote_range(members, start, end, buf, Some(&req))
            };
            for b in repairs {
                self.repair(members, b, Some(&req));
            }
            return match bad {
                Some(b) => Err(io_error(&format!(
                    "block {b}: no live member holding it could read it"
                ))),
                None => Ok(()),
            };
        }
        let _s = self.stripes.lock(first, last, Mode::Shared);
        // Who answers: the trusted member, or under the candidate-primary policies the first
        // live candidate holding every block of the request.
        let mut order: Vec<usize> = (0..members.len()).filter(|&i| members[i].live()).collect();
        if p.candidate_answers_reads() {
            if let Some(k) = order
                .iter()
                .position(|&i| i > 0 && (first..=last).all(|b| members[i].holds(b)))
            {
                let i = order.remove(k);
                order.insert(0, i);
            }
        }
        let mut answered = None;
        for &i in &order {
            let m = &members[i];
            if !(first..=last).all(|b| m.holds(b)) {
                continue;
            }
            match m.call(|l| l.read(at, buf)) {
                Ok(()) => {
                    answered = Some(i);
                    break;
                }
                Err(f) => self.failed(members, i, "read", Some(&req), &f),
            }
        }
        let Some(i) = answered else {
            return Err(io_error("no member holding the blocks could read them"));
        };
        if p == Policy::LazyHashes || p == Policy::MirrorOnly {
            return Ok(());
        }
        let hashes = (first..=last)
            .map(|b| {
                let bs = (b * BLOCK).max(start);
                let be = self.block_end(b).min(end);
                xxh3_128(&buf[(bs - start) as usize..(be - start) as usize])
            })
            .collect();
        let gens = self.gens_of(first, last);
        // The worker takes the stripes exclusively: release them before waiting for room.
        drop(_s);
        self.queue_vote(first, last, Some((members[i].clone(), hashes, gens)), req);
        Ok(())
    }

    fn queue_vote(
        &self,
        first: u64,
        last: u64,
        answered: Option<(Arc<Member>, Vec<u128>, Vec<u64>)>,
        request: RequestInfo,
    ) {
        let n = last - first + 1;
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        // A job larger than the budget alone still runs (when nothing else is queued).
        let budget = self.vote_budget.load(Ordering::Relaxed);
        while q.blocks > 0 && q.blocks + n > budget && !q.stop {
            q = self.queue_cv.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        q.blocks += n;
        q.peak = q.peak.max(q.blocks);
        q.next += 1;
        let seq = q.next;
        q.jobs.push_back(Job {
            seq,
            first,
            last,
            answered,
            request,
        });
        self.queue_cv.notify_all();
    }

    /// Waits until every vote queued so far has run; returns the last sequence number.
    fn drain(&self) -> u64 {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let upto = q.next;
        while q.done < upto && !q.stop {
            q = self.queue_cv.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        upto
    }

    fn worker(&self) {
        loop {
            let job = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(j) = q.jobs.pop_front() {
                        break j;
                    }
                    if q.stop {
                        q.done = q.next;
                        self.queue_cv.notify_all();
                        return;
                    }
                    q = self.queue_cv.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            };
            self.run_job(&job);
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.done = q.done.max(job.seq);
            q.blocks = q.blocks.saturating_sub(job.last - job.first + 1);
            self.queue_cv.notify_all();
        }
    }

    /// Runs a vote over the job's blocks; false if the Tee closed before it finished.
    fn run_job(&self, job: &Job) -> bool {
        let mut b = job.first;
        while b <= job.last {
            if self.stopping() {
                return false;
            }
            // The members cannot change during a piece: a removed member is neither voted
            // on nor repaired once its removal returned.
            let _v = self.vote_lock.lock().unwrap_or_else(|p| p.into_inner());
            let members = self.members();
            let e = (b + PIECE / BLOCK - 1).min(job.last);
            let start = b * BLOCK;
            let end = self.block_end(e);
            let mut out = vec![0u8; (end - start) as usize];
            let _g = self.stripes.lock(b, e, Mode::Exclusive);
            let answered_ok = job.answered.as_ref().map(|(_, _, gens)| {
                gens.as_slice() == self.gens_of(job.first, job.last).as_slice()
            });
            // A block nobody could read has no majority to repair from (nor to judge the
            // answer by): nothing to do.
            let (repairs, bad) =
                self.vote_range(&members, start, end, &mut out, Some(&job.request));
            let voted = bad.is_none();
            // The member that answered, where it is now (not at all if it was removed).
            let who = job
                .answered
                .as_ref()
                .and_then(|(m, _, _)| members.iter().position(|x| Arc::ptr_eq(x, m)));
            if let (Some((_, hashes, _)), Some(who), Some(true), true) =
                (&job.answered, who, answered_ok, voted)
            {
                // The part of each block the guest read (its request may start or end
                // inside a block): the answer's hashes cover that part alone.
                let rs = job.request.sector * SECTOR_SIZE;
                let re = rs + job.request.sectors * SECTOR_SIZE;
                for x in b..=e {
                    let bs = (x * BLOCK).max(rs);
                    let be = self.block_end(x).min(re);
                    let (o, n) = ((bs - start) as usize, (be - bs) as usize);
                    let h = hashes.get((x - job.first) as usize).copied();
                    // Without a majority nobody knows which answer was right.
                    let disputed = self
                        .disputed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains(&x);
                    if !disputed && h.is_some_and(|h| h != xxh3_128(&out[o..o + n])) {
                        bump(&self.live.wrong_answers);
                        let mark = self.queue.lock().unwrap_or_else(|p| p.into_inner()).next;
                        self.failed
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((job.seq, mark));
                        let mut r = Report::new(
                            EventKind::Mismatch,
                            format!("member {who} answered the guest's read of block {x} with data the vote rejected"),
                        );
                        r.request = Some(job.request.clone());
                        r.member = Some(who);
                        r.block = Some(x);
                        self.emit(r);
                        // It answered the guest wrongly: no more answers from it.
                        if who != 0 {
                            self.quarantine(
                                &members,
                                who,
                                "it answered a guest read with data the vote rejected",
                                Some(&job.request),
                            );
                        }
                    }
                }
            }
            for x in repairs {
                self.repair_locked(&members, x, Some(&job.request));
            }
            drop(_g);
            drop(_v);
            b = e + 1;
        }
        true
    }

    fn stopping(&self) -> bool {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).stop
    }

    /// After an unclean stop: votes on every block once, repairing without blame, then
    /// counts lost votes of the members again.
    fn resync(&self) {
        let members = self.members();
        if !members.iter().any(|m| m.unclean.load(Ordering::Acquire)) {
            return;
        }
        let req = RequestInfo {
            op: "resync",
            sector: 0,
            sectors: self.capacity.0,
            seq: 0,
        };
        let done = self.run_job(&Job {
            seq: 0,
            first: 0,
            last: self.blocks - 1,
            answered: None,
            request: req,
        });
        if done {
            for m in members.iter() {
                m.unclean.store(false, Ordering::Release);
            }
            self.emit(Report::new(
                EventKind::Resynced,
                "every block voted on after an unclean stop".to_string(),
            ));
        }
    }

    fn write_impl(&self, at: Sector, data: &[u8]) -> dovetail_layout::Result<()> {
        let len = buffer_sectors(data.len())?;
        let (start, end, first, last) = self.span(at, len)?;
        let g = self.gate()?;
        bump(&self.live.writes);
        if data.is_empty() {
            return Ok(());
        }
        let req = self.request("write", at, len);
        if g.policy == Policy::BarrierWritesAsync {
            self.barrier(&req)?;
        }
        let verify = g.policy == Policy::SyncCrossChecks;
        self.mutate(
            &g.members,
            start,
            end,
            first,
            last,
            &req,
            MemberOp::Write {
                at,
                data: Arc::from(data),
                verify,
            },
            Some(data),
        )
    }

    fn zeroes_impl(
        &self,
        at: Sector,
        len: Sectors,
        unmap: bool,
        op: &'static str,
    ) -> dovetail_layout::Result<()> {
        let (start, end, first, last) = self.span(at, len)?;
        let g = self.gate()?;
        bump(&self.live.writes);
        if len.0 == 0 {
            return Ok(());
        }
        let req = self.request(op, at, len);
        if g.policy == Policy::BarrierWritesAsync {
            self.barrier(&req)?;
        }
        self.mutate(
            &g.members,
            start,
            end,
            first,
            last,
            &req,
            MemberOp::Zeroes { at, len, unmap },
            None,
        )
    }

    /// Applies `op` to every live member at once, under the blocks' stripes (exclusive):
    /// each candidate's share goes to its writer thread, the first live member's runs here,
    /// and the request waits for every answer. The stripes keep overlapping requests apart
    /// and the writers' FIFO queues keep their order, so every member sees overlapping
    /// writes in the same order. The answers are then handled in member order, as if the
    /// members had been written one after another.
    fn apply_all(&self, members: &[Arc<Member>], op: &MemberOp) -> Vec<(usize, Answer)> {
        let live: Vec<usize> = (0..members.len()).filter(|&i| members[i].live()).collect();
        // In parallel when that saves enough: the members' recent write times, all but the
        // longest (which the request waits for either way).
        let times: Vec<u64> = live
            .iter()
            .map(|&i| members[i].write_ns.load(Ordering::Relaxed))
            .collect();
        let saved = times
            .iter()
            .sum::<u64>()
            .saturating_sub(times.iter().copied().max().unwrap_or(0));
        let parallel = saved >= self.parallel_min_ns.load(Ordering::Relaxed);
        let (tx, rx) = std::sync::mpsc::channel::<(usize, Answer)>();
        let mut handed = 0usize;
        let mut answers: Vec<(usize, Answer)> = Vec::with_capacity(live.len());
        let mut inline = Vec::new();
        // Shares a busy writer gave back: run here, after the first member's.
        let mut refused = Vec::new();
        for (k, &i) in live.iter().enumerate() {
            let m = &members[i];
            let op = match op {
                // The trusted member's copy is not read back.
                MemberOp::Write { at, data, verify } => MemberOp::Write {
                    at: *at,
                    data: data.clone(),
                    verify: *verify && i != 0,
                },
                o => o.clone(),
            };
            match (&m.writer, k) {
                (Some(w), 1..) if parallel => {
                    let tx = tx.clone();
                    let l = m.layout.clone();
                    let avg = m.write_ns.clone();
                    handed += 1;
                    let job: crate::vote_writer::WriteJob = Box::new(move || {
                        let t = std::time::Instant::now();
                        let a = op.apply(&*l);
                        record_write_time(&avg, t.elapsed());
                        Box::new(move || {
                            let _ = tx.send((i, a));
                        })
                    });
                    if let Err(job) = w.offer(job) {
                        refused.push(job);
                    }
                }
                _ => inline.push((i, op)),
            }
        }
        drop(tx);
        for (i, op) in inline {
            let t = std::time::Instant::now();
            answers.push((i, op.apply(&*members[i].layout)));
            record_write_time(&members[i].write_ns, t.elapsed());
        }
        for job in refused {
            job()();
        }
        for _ in 0..handed {
            match rx.recv() {
                Ok(a) => answers.push(a),
                Err(_) => break,
            }
        }
        // A writer that lost a job without answering (it cannot: jobs catch panics) counts as
        // that member's failure, never as a success.
        for &i in &live {
            if !answers.iter().any(|(k, _)| *k == i) {
                answers.push((
                    i,
                    (
                        Err(Failure::Panic(
                            "its writer thread did not answer".to_string(),
                        )),
                        None,
                    ),
                ));
            }
        }
        answers.sort_by_key(|(i, _)| *i);
        answers
    }

    /// Applies a write to every live member under the blocks' stripes (exclusive), in
    /// parallel ([`Shared::apply_all`]). A verified write re-reads each candidate's copy
    /// (sync-cross-checks) and applies `data` again where it differs.
    #[allow(clippy::too_many_arguments)]
    fn mutate(
        &self,
        members: &[Arc<Member>],
        start: u64,
        end: u64,
        first: u64,
        last: u64,
        req: &RequestInfo,
        op: MemberOp,
        data: Option<&[u8]>,
    ) -> dovetail_layout::Result<()> {
        let _s = self.stripes.lock(first, last, Mode::Exclusive);
        self.bump_gens(first, last);
        let answers = self.apply_all(members, &op);
        // Blocks the request covers whole.
        let whole_first = start.div_ceil(BLOCK);
        let whole_last_excl = if end == self.cap_bytes {
            end.div_ceil(BLOCK)
        } else {
            end / BLOCK
        };
        let (mut ok, mut tried) = (0usize, 0usize);
        // Members that succeeded and hold every block of the request afterwards: without one,
        // nobody could answer a read of what was written (a partial write to blocks the
        // candidates lack, with the trusted member's write failed).
        let mut ok_holding = 0usize;
        let mut first_err = None;
        for (i, (result, check)) in answers {
            let m = &members[i];
            tried += 1;
            match result {
                Ok(()) => {
                    ok += 1;
                    if let Some(p) = &m.presence {
                        if whole_last_excl > whole_first {
                            p.insert_range(whole_first, whole_last_excl - whole_first);
                        }
                    }
                    let mut stale = m.stale.lock().unwrap_or_else(|p| p.into_inner());
                    for b in whole_first..whole_last_excl {
                        stale.remove(&b);
                    }
                    drop(stale);
                    if (first..=last).all(|b| m.holds(b)) {
                        ok_holding += 1;
                    }
                    if let Some((d, h)) = check {
                        let b = first + d / BLOCK;
                        let hd = data.map(xxh3_128).unwrap_or(0);
                        self.lost(members, i, b, Some(d % BLOCK), (hd, h), Some(req));
                        if let Some(data) = data {
                            let at = Sector(start / SECTOR_SIZE);
                            match m.call(|l| l.write(at, data)) {
                                Ok(()) => {
                                    bump(&m.repairs);
                                    bump(&self.live.repairs);
                                    let mut r = Report::new(
                                        EventKind::Repaired,
                                        format!("member {i}: read-back differed; the write was applied again"),
                                    );
                                    r.request = Some(req.clone());
                                    r.member = Some(i);
                                    r.block = Some(b);
                                    self.emit(r);
                                }
                                Err(f) => self.failed(members, i, "write", Some(req), &f),
                            }
                        }
                    }
                }
                Err(f) => {
                    self.failed(members, i, "write", Some(req), &f);
                    let mut stale = m.stale.lock().unwrap_or_else(|p| p.into_inner());
                    for b in first..=last {
                        if m.presence.as_ref().is_none_or(|p| p.contains(b)) {
                            stale.insert(b);
                        }
                    }
                    drop(stale);
                    if !f.fatal() {
                        self.lost(members, i, first, None, (0, None), Some(req));
                    }
                    first_err.get_or_insert(f);
                }
            }
        }
        if ok * 2 > tried && ok_holding > 0 {
            // Members that failed are repaired from the majority now.
            if ok < tried {
                for b in first..=last {
                    self.repair_locked(members, b, Some(req));
                }
            }
            return Ok(());
        }
        Err(match first_err {
            Some(Failure::Error(e)) if ok * 2 <= tried => e,
            Some(Failure::Panic(p)) if ok * 2 <= tried => {
                io_error(&format!("a member panicked: {p}"))
            }
            _ if ok * 2 > tried => io_error(
                "no member holding every block of the request took the write (the others lack \
                 the rest of a partial block)",
            ),
            _ => io_error("no live member"),
        })
    }

    /// barrier-writes-async: waits for every vote queued before this write; refuses it if one
    /// of them found the guest had been answered wrongly.
    fn barrier(&self, req: &RequestInfo) -> dovetail_layout::Result<()> {
        let upto = self.drain();
        let refused = self
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|&(f, mark)| f <= upto && upto <= mark);
        if refused {
            bump(&self.live.barrier_refused_writes);
            let mut r = Report::new(
                EventKind::BarrierRefusedWrite,
                "write refused: a read answered before it lost its vote".to_string(),
            );
            r.request = Some(req.clone());
            self.emit(r);
            return Err(io_error(
                "write refused: an earlier read answered by a candidate lost its vote",
            ));
        }
        Ok(())
    }

    fn flush_impl(&self) -> dovetail_layout::Result<()> {
        let g = self.gate()?;
        bump(&self.live.flushes);
        let (mut ok, mut tried, mut first_err) = (0usize, 0usize, None);
        for (i, m) in g.members.iter().enumerate() {
            if !m.live() {
                continue;
            }
            tried += 1;
            match m.call(|l| l.flush()) {
                Ok(()) => {
                    ok += 1;
                    // The member's data is durable: its presence map may say so.
                    if let Some(Err(e)) = m.presence.as_ref().map(|p| p.persist()) {
                        let why = format!(
                            "its presence map could not be persisted: {}",
                            error_chain(&e)
                        );
                        self.quarantine(&g.members, i, &why, None);
                    }
                }
                Err(f) => {
                    self.failed(&g.members, i, "flush", None, &f);
                    // What it holds is no longer known durable.
                    self.quarantine(&g.members, i, "flush failed", None);
                    first_err.get_or_insert(f);
                }
            }
        }
        if ok * 2 > tried {
            return Ok(());
        }
        Err(match first_err {
            Some(Failure::Error(e)) => e,
            Some(Failure::Panic(p)) => io_error(&format!("a member panicked: {p}")),
            None => io_error("no live member"),
        })
    }

    /// The lazy job: votes over `lazy_region` bytes every `lazy_interval` under lazy-hashes.
    fn lazy(&self) {
        self.resync();
        let mut next = 0u64;
        loop {
            {
                let q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                let (q, _) = self
                    .queue_cv
                    .wait_timeout_while(q, self.lazy_interval, |q| !q.stop)
                    .unwrap_or_else(|p| p.into_inner());
                if q.stop {
                    return;
                }
            }
            if self.policy() != Policy::LazyHashes {
                continue;
            }
            let blocks = (self.lazy_region / BLOCK).max(1);
            let last = (next + blocks - 1).min(self.blocks - 1);
            let req = RequestInfo {
                op: "lazy",
                sector: next * BLOCK / SECTOR_SIZE,
                sectors: (self.block_end(last) - next * BLOCK) / SECTOR_SIZE,
                seq: 0,
            };
            self.run_job(&Job {
                seq: 0,
                first: next,
                last,
                answered: None,
                request: req,
            });
            next = if last + 1 >= self.blocks { 0 } else { last + 1 };
        }
    }
}

fn io_error(what: &str) -> Error {
    Error::Io {
        op: "vote",
        path: "tee".to_string(),
        source: std::io::Error::other(what.to_string()),
    }
}

impl VotingTee {
    /// Puts `trusted` (member 0, holding every block) and `candidates` (each with the presence
    /// map of the blocks it holds) behind a voting Tee. Refuses fewer than 2 or more than
    /// [`MAX_MEMBERS`] members, different capacities and presence maps of the wrong size.
    pub fn new(
        trusted: Arc<dyn BlockLayout>,
        candidates: Vec<(Arc<dyn BlockLayout>, Arc<PresenceMap>)>,
        opts: TeeOptions,
    ) -> Result<VotingTee, TeeError> {
        let n = candidates.len() + 1;
        if !(2..=MAX_MEMBERS).contains(&n) {
            return Err(TeeError::InvalidArgument(format!(
                "disk {}: a tee has 2 to {MAX_MEMBERS} members, not {n}",
                opts.disk
            )));
        }
        let capacity = trusted.capacity();
        let cap_bytes = capacity.bytes().ok_or_else(|| {
            TeeError::InvalidArgument(format!("disk {}: capacity overflows", opts.disk))
        })?;
        let blocks = cap_bytes.div_ceil(BLOCK).max(1);
        let mut members = vec![Arc::new(
            Member::new(trusted, None).with_writer(&opts.disk)?,
        )];
        for (k, (l, p)) in candidates.into_iter().enumerate() {
            check_member(&opts.disk, k + 1, &*l, &p, capacity, blocks)?;
            members.push(Arc::new(Member::opened(l, p)?.with_writer(&opts.disk)?));
        }
        let shared = Arc::new(Shared {
            disk: opts.disk.clone(),
            capacity,
            cap_bytes,
            blocks,
            state: RwLock::new(State {
                policy: opts.policy,
                members: members.clone(),
            }),
            snapshot: Mutex::new(Arc::new(members)),
            policy_now: AtomicU8::new(policy_index(opts.policy)),
            closed: AtomicBool::new(false),
            fills_stopped: AtomicBool::new(false),
            stripes: Stripes::new(),
            gens: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            live: Live::default(),
            counters: Counters::default(),
            events: EventLog::new(&opts.disk),
            req_seq: AtomicU64::new(0),
            lose_threshold: AtomicU64::new(DEFAULT_LOSE_THRESHOLD),
            vote_lock: Mutex::new(()),
            vote_budget: AtomicU64::new(VOTE_BUDGET),
            callbacks: Mutex::new(Vec::new()),
            disputed: Mutex::new(BTreeSet::new()),
            queue: Mutex::new(Queue::default()),
            queue_cv: Condvar::new(),
            failed: Mutex::new(Vec::new()),
            lazy_interval: opts.lazy_interval,
            lazy_region: opts.lazy_region.max(BLOCK),
            parallel_min_ns: AtomicU64::new(DEFAULT_PARALLEL_MIN.as_nanos() as u64),
        });
        let mut threads = Vec::new();
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("vote-{}", opts.disk))
                .spawn(move || {
                    // The daemon's seccomp filter for background threads, as the Tee's.
                    dovetail_store::thread_kind::entered(
                        dovetail_store::thread_kind::ThreadKind::Background,
                    );
                    s.worker()
                })
                .map_err(|e| TeeError::Thread("vote", e))?,
        );
        let s = shared.clone();
        let lazy = std::thread::Builder::new()
            .name(format!("vote-lazy-{}", opts.disk))
            .spawn(move || {
                dovetail_store::thread_kind::entered(
                    dovetail_store::thread_kind::ThreadKind::Background,
                );
                s.lazy()
            });
        match lazy {
            Ok(h) => threads.push(h),
            Err(e) => {
                let t = VotingTee {
                    shared,
                    threads: Mutex::new(threads),
                    journal: None,
                };
                t.stop();
                return Err(TeeError::Thread("lazy vote", e));
            }
        }
        Ok(VotingTee {
            shared,
            threads: Mutex::new(threads),
            journal: opts
                .journal
                .map(|l| Arc::new(crate::journal::Journal::new(l, capacity))),
        })
    }

    pub fn policy(&self) -> Policy {
        self.shared.policy()
    }

    /// Changes the policy between requests.
    pub fn set_policy(&self, p: Policy) {
        let mut g = self.shared.state.write().unwrap_or_else(|e| e.into_inner());
        let old = g.policy;
        g.policy = p;
        self.shared
            .policy_now
            .store(policy_index(p), Ordering::Relaxed);
        drop(g);
        if old != p {
            self.shared.emit(Report::new(
                EventKind::PolicyChanged,
                format!("policy changed from {old} to {p}"),
            ));
        }
    }

    /// Writes go to the members in parallel when, by the members' recent write times, that
    /// saves at least `d` (default [`DEFAULT_PARALLEL_MIN`]; zero: always), one after another
    /// otherwise. Either way overlapping writes reach every member in the same order.
    pub fn set_parallel_min(&self, d: Duration) {
        self.shared.parallel_min_ns.store(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Votes a member may lose before it is quarantined.
    pub fn set_lose_threshold(&self, n: u64) {
        self.shared.lose_threshold.store(n, Ordering::Relaxed);
    }

    /// Blocks of background votes that may be queued or running before reads wait (default
    /// [`VOTE_BUDGET`]).
    pub fn set_vote_budget(&self, blocks: u64) {
        self.shared
            .vote_budget
            .store(blocks.max(1), Ordering::Relaxed);
        self.shared.queue_cv.notify_all();
    }

    /// How many members the Tee has (live or quarantined).
    pub fn len(&self) -> usize {
        self.shared.members().len()
    }

    /// Never true: a Tee has at least two members.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Every member's state, in member order.
    pub fn members(&self) -> Vec<MemberStatus> {
        let blocks = self.shared.blocks;
        self.shared
            .members()
            .iter()
            .enumerate()
            .map(|(index, m)| MemberStatus {
                index,
                quarantined: !m.live(),
                held_blocks: m.presence.as_ref().map_or(blocks, |p| p.count()),
                stale_blocks: m.stale.lock().unwrap_or_else(|p| p.into_inner()).len() as u64,
                votes_lost: m.losses.load(Ordering::Relaxed),
                repairs: m.repairs.load(Ordering::Relaxed),
                errors: m.errors.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Member `i`'s layout.
    /// The disk's name.
    pub fn disk_name(&self) -> String {
        self.shared.disk.clone()
    }

    /// Emits an event of this Tee (the bisection's, `crate::bisect_members`).
    pub(crate) fn emit_report(&self, r: Report) -> TeeEvent {
        self.shared.emit(r)
    }

    /// The request journal, if the Tee keeps one (`TeeOptions::journal`).
    pub fn journal(&self) -> Option<&Arc<crate::journal::Journal>> {
        self.journal.as_ref()
    }

    pub fn member(&self, i: usize) -> Option<Arc<dyn BlockLayout>> {
        self.shared.members().get(i).map(|m| m.layout.clone())
    }

    pub fn quarantined(&self, i: usize) -> bool {
        self.shared.members().get(i).is_some_and(|m| !m.live())
    }

    /// Quarantines member `i` by hand (not the last live one).
    pub fn quarantine(&self, i: usize, reason: &str) -> Result<(), TeeError> {
        let members = self.shared.members();
        if i >= members.len() {
            return Err(TeeError::InvalidArgument(format!("no member {i}")));
        }
        self.shared
            .quarantine(&members, i, &format!("manual: {reason}"), None);
        if members[i].live() {
            return Err(TeeError::InvalidArgument(format!(
                "member {i} is the last live member"
            )));
        }
        Ok(())
    }

    pub fn counters(&self) -> VoteCounters {
        let l = &self.shared.live;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        VoteCounters {
            reads: g(&l.reads),
            writes: g(&l.writes),
            flushes: g(&l.flushes),
            blocks_voted: g(&l.blocks_voted),
            votes_lost: g(&l.votes_lost),
            repairs: g(&l.repairs),
            no_majority: g(&l.no_majority),
            wrong_answers: g(&l.wrong_answers),
            barrier_refused_writes: g(&l.barrier_refused_writes),
            votes_queued_peak: self
                .shared
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .peak,
            member_errors: g(&l.member_errors),
            member_panics: g(&l.member_panics),
            grant_refusals: g(&l.grant_refusals),
            quarantines: g(&l.quarantines),
            events_dropped: g(&self.shared.counters.events_dropped),
        }
    }

    /// The most recent events, oldest first.
    pub fn events(&self) -> Vec<TeeEvent> {
        self.shared.events.recent()
    }

    pub fn subscribe(&self) -> crossbeam_channel::Receiver<TeeEvent> {
        self.shared.events.subscribe()
    }

    /// Blocks on which the last vote found no majority.
    pub fn disputed(&self) -> Vec<u64> {
        self.shared
            .disputed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// Waits until every background vote queued so far has run.
    pub fn drain(&self) {
        self.shared.drain();
    }

    /// Votes on every block of the disk now (piece by piece, under their stripes), repairing
    /// the minorities; returns the blocks that some member lost.
    pub fn scrub(&self) -> u64 {
        let before = self.shared.live.votes_lost.load(Ordering::Relaxed);
        let req = RequestInfo {
            op: "scrub",
            sector: 0,
            sectors: self.shared.capacity.0,
            seq: 0,
        };
        self.shared.run_job(&Job {
            seq: 0,
            first: 0,
            last: self.shared.blocks - 1,
            answered: None,
            request: req,
        });
        self.shared.live.votes_lost.load(Ordering::Relaxed) - before
    }

    /// Copies every block member `i` does not hold from the majority (under each block's
    /// stripe), so that it holds every block; returns the blocks copied.
    pub fn fill(&self, i: usize) -> Result<u64, TeeError> {
        let members = self.shared.members();
        let m = members
            .get(i)
            .ok_or_else(|| TeeError::InvalidArgument(format!("no member {i}")))?;
        let Some(p) = &m.presence else { return Ok(0) };
        let mut copied = 0;
        let mut b = 0;
        while let Some(a) = p.next_absent(b) {
            if !m.live() {
                return Err(TeeError::InvalidArgument(format!(
                    "member {i} was quarantined while being filled"
                )));
            }
            let _v = self
                .shared
                .vote_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if self.shared.fills_stopped.load(Ordering::Acquire) {
                return Err(TeeError::InvalidArgument(format!(
                    "the tee was closed while member {i} was being filled"
                )));
            }
            let _g = self.shared.stripes.lock(a, a, Mode::Exclusive);
            if !p.contains(a) {
                let start = a * BLOCK;
                let end = self.shared.block_end(a);
                let mut out = vec![0u8; (end - start) as usize];
                // The members as they are now (a member may have left since the fill began).
                let others = self.shared.members();
                if !others.iter().any(|x| Arc::ptr_eq(x, m)) {
                    return Err(TeeError::InvalidArgument(format!(
                        "member {i} left the tee while being filled"
                    )));
                }
                let (_, bad) = self.shared.vote_range(&others, start, end, &mut out, None);
                if let Some(b) = bad {
                    return Err(TeeError::InvalidArgument(format!(
                        "filling member {i}: no live member holding block {b} could read it"
                    )));
                }
                m.call(|l| l.write(Sector(start / SECTOR_SIZE), &out))
                    .map_err(|f| {
                        TeeError::InvalidArgument(format!(
                            "filling block {a} of member {i}: {}",
                            f.text()
                        ))
                    })?;
                p.insert(a);
                copied += 1;
            }
            b = a + 1;
        }
        Ok(copied)
    }

    /// Whether member `i` holds every block (and none is stale): it may be promoted.
    pub fn complete(&self, i: usize) -> bool {
        let members = self.shared.members();
        members.get(i).is_some_and(|m| {
            m.live()
                && m.presence
                    .as_ref()
                    .is_none_or(|p| p.count() == self.shared.blocks)
                && m.stale.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
        })
    }

    /// Adds a candidate between requests; returns its index.
    pub fn add_member(
        &self,
        layout: Arc<dyn BlockLayout>,
        presence: Arc<PresenceMap>,
    ) -> Result<usize, TeeError> {
        let mut g = self.shared.state.write().unwrap_or_else(|e| e.into_inner());
        let _v = self
            .shared
            .vote_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if g.members.len() >= MAX_MEMBERS {
            return Err(TeeError::InvalidArgument(format!(
                "disk {}: a tee has at most {MAX_MEMBERS} members",
                self.shared.disk
            )));
        }
        let i = g.members.len();
        check_member(
            &self.shared.disk,
            i,
            &*layout,
            &presence,
            self.shared.capacity,
            self.shared.blocks,
        )?;
        g.members.push(Arc::new(
            Member::opened(layout, presence)?.with_writer(&self.shared.disk)?,
        ));
        *self
            .shared
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(g.members.clone());
        drop(g);
        let mut r = Report::new(EventKind::MemberAdded, format!("member {i} added"));
        r.member = Some(i);
        self.shared.emit(r);
        Ok(i)
    }

    /// Runs `f` with the event of every quarantine from now on (once per member quarantined).
    pub fn on_quarantine(&self, f: Box<dyn Fn(&TeeEvent) + Send + Sync>) {
        self.shared
            .callbacks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(f);
    }

    /// Makes member `i`, which must hold every block ([`VotingTee::complete`]), the trusted
    /// member 0 between requests: it answers reads under the policies the trusted member
    /// answers, and wins when there is no majority. The former trusted member takes its place
    /// (it holds every block); [`VotingTee::remove_member`] retires it.
    pub fn promote(&self, i: usize) -> Result<(), TeeError> {
        let mut g = self.shared.state.write().unwrap_or_else(|e| e.into_inner());
        let _v = self
            .shared
            .vote_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if i == 0 {
            return Ok(());
        }
        if !self.complete(i) {
            return Err(TeeError::InvalidArgument(format!(
                "disk {}: member {i} does not hold every block (or is quarantined, or has \
                 blocks awaiting repair): `fill` it first",
                self.shared.disk
            )));
        }
        g.members.swap(0, i);
        *self
            .shared
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(g.members.clone());
        drop(g);
        let mut r = Report::new(
            EventKind::MemberPromoted,
            format!(
                "member {i} promoted to trusted member 0; the former trusted member is member {i}"
            ),
        );
        r.member = Some(0);
        self.shared.emit(r);
        Ok(())
    }

    /// Removes member `i` between requests (the members after it move down one place); the
    /// trusted member only if another live member holds every block (it becomes the trusted
    /// one). Refuses to leave fewer than two members or no live one.
    pub fn remove_member(&self, i: usize) -> Result<Arc<dyn BlockLayout>, TeeError> {
        let mut g = self.shared.state.write().unwrap_or_else(|e| e.into_inner());
        let _v = self
            .shared
            .vote_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = g.members.len();
        if i >= n {
            return Err(TeeError::InvalidArgument(format!(
                "disk {}: no member {i} (the tee has {n})",
                self.shared.disk
            )));
        }
        if n <= 2 {
            return Err(TeeError::InvalidArgument(format!(
                "disk {}: a tee keeps at least 2 members",
                self.shared.disk
            )));
        }
        if !g
            .members
            .iter()
            .enumerate()
            .any(|(k, m)| k != i && m.live())
        {
            return Err(TeeError::InvalidArgument(format!(
                "disk {}: member {i} is the last live member",
                self.shared.disk
            )));
        }
        if i == 0 && !self.complete(1) {
            return Err(TeeError::InvalidArgument(format!(
                "disk {}: member 1 does not hold every block, so the trusted member cannot be removed",
                self.shared.disk
            )));
        }
        let m = g.members.remove(i);
        *self
            .shared
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(g.members.clone());
        drop(g);
        let mut r = Report::new(EventKind::MemberRemoved, format!("member {i} removed"));
        r.member = Some(i);
        self.shared.emit(r);
        Ok(m.layout.clone())
    }

    fn stop(&self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        {
            let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.stop = true;
            self.shared.queue_cv.notify_all();
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        // The writers run what is queued first (a request in flight gets its answers).
        for m in self.shared.members().iter() {
            if let Some(w) = &m.writer {
                w.stop();
            }
        }
    }

    /// Runs the queued votes, stops the background threads and flushes every live member.
    pub fn close(&self) -> Result<(), TeeError> {
        // No fill writes a member after this (a block being filled is finished first), so
        // the flush below covers every fill's writes and the members' versions may be
        // closed and reopened (a resize) once this returns.
        self.shared.fills_stopped.store(true, Ordering::Release);
        drop(
            self.shared
                .vote_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        self.shared.drain();
        let r = self.shared.flush_impl();
        self.stop();
        r.map_err(TeeError::Layout)?;
        // Clean maps say the next start needs no resync: only for members that are settled.
        for m in self.shared.members().iter() {
            if let (true, Some(p)) = (m.live(), &m.presence) {
                if m.unclean.load(Ordering::Acquire) {
                    p.persist()?;
                } else {
                    p.close_clean()?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for VotingTee {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Member {
    /// A candidate with its presence map, marked dirty before any write reaches it.
    fn opened(layout: Arc<dyn BlockLayout>, p: Arc<PresenceMap>) -> Result<Member, TeeError> {
        let unclean = !p.was_clean();
        p.mark_dirty()?;
        let m = Member::new(layout, Some(p));
        m.unclean.store(unclean, Ordering::Release);
        Ok(m)
    }

    fn new(layout: Arc<dyn BlockLayout>, presence: Option<Arc<PresenceMap>>) -> Member {
        Member {
            layout,
            presence,
            stale: Mutex::new(BTreeSet::new()),
            quarantined: AtomicBool::new(false),
            unclean: AtomicBool::new(false),
            losses: AtomicU64::new(0),
            repairs: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            writer: None,
            write_ns: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Starts its writer thread (every member has one: whichever member is the first live
    /// one is written on the request's own thread instead).
    fn with_writer(mut self, disk: &str) -> Result<Member, TeeError> {
        let w = MemberWriter::start(format!("vote-w-{disk}"))
            .map_err(|e| TeeError::Thread("vote writer", e))?;
        self.writer = Some(w);
        Ok(self)
    }
}

fn check_member(
    disk: &str,
    i: usize,
    l: &dyn BlockLayout,
    p: &PresenceMap,
    capacity: Sectors,
    blocks: u64,
) -> Result<(), TeeError> {
    if l.capacity() != capacity {
        return Err(TeeError::InvalidArgument(format!(
            "disk {disk}: member {i} has {} but the trusted version {capacity}",
            l.capacity()
        )));
    }
    if p.blocks() != blocks {
        return Err(TeeError::InvalidArgument(format!(
            "disk {disk}: member {i}'s presence map has {} blocks, the disk {blocks}",
            p.blocks()
        )));
    }
    Ok(())
}

fn policy_index(p: Policy) -> u8 {
    Policy::ALL.iter().position(|&q| q == p).unwrap_or(0) as u8
}

impl BlockLayout for VotingTee {
    fn capacity(&self) -> Sectors {
        self.shared.capacity
    }

    fn read(&self, at: Sector, buf: &mut [u8]) -> dovetail_layout::Result<()> {
        self.shared.read_impl(at, buf)
    }

    fn write(&self, at: Sector, buf: &[u8]) -> dovetail_layout::Result<()> {
        let _j = self.journal.as_ref().map(|j| j.write(at, buf));
        self.shared.write_impl(at, buf)
    }

    fn flush(&self) -> dovetail_layout::Result<()> {
        let _j = self.journal.as_ref().map(|j| j.flush());
        self.shared.flush_impl()
    }

    fn discard(&self, at: Sector, len: Sectors) -> dovetail_layout::Result<()> {
        let _j = self.journal.as_ref().map(|j| j.zeroes(at, len, true, true));
        self.shared.zeroes_impl(at, len, true, "discard")
    }

    fn write_zeroes(&self, at: Sector, len: Sectors, unmap: bool) -> dovetail_layout::Result<()> {
        let _j = self
            .journal
            .as_ref()
            .map(|j| j.zeroes(at, len, unmap, false));
        self.shared.zeroes_impl(at, len, unmap, "write-zeroes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vote_finds_the_majority_and_the_losers() {
        let a = [1u8; 16];
        let mut b = [1u8; 16];
        b[5] = 9;
        let v = vote(&[Some(&a[..]), Some(&b[..]), Some(&a[..])]).expect("verdict");
        assert!(v.majority);
        assert_eq!(v.winner, 0);
        assert_eq!(v.losers, vec![(1, Some(5))]);
        // Trusted outvoted.
        let v = vote(&[Some(&b[..]), Some(&a[..]), Some(&a[..])]).expect("verdict");
        assert_eq!((v.winner, v.majority), (1, true));
        assert_eq!(v.losers, vec![(0, Some(5))]);
        // A failed voter loses; 1-1 has no majority and the trusted answers.
        let v = vote(&[Some(&a[..]), None, Some(&a[..])]).expect("verdict");
        assert_eq!(v.losers, vec![(1, None)]);
        let c = [3u8; 16];
        let v = vote(&[Some(&b[..]), Some(&a[..]), Some(&c[..])]).expect("verdict");
        assert_eq!((v.winner, v.majority), (0, false));
        assert!(v.losers.is_empty());
        assert!(vote(&[None, None]).is_none());
    }
}
