//! Divergence bisection for a voting Tee ([`crate::vote::VotingTee`]) of any number of
//! members: given its request journal ([`crate::journal`]) and a block, name the first
//! journaled request after which a member's view of that block differs from the majority's,
//! confirmed by replaying the journal against fresh members.
//!
//! # How
//!
//! As the two-version bisection ([`crate::bisect`]), generalised: a caller-given factory makes
//! a fresh set of members of the same layouts as the Tee's (the backend: the same layouts in a
//! scratch store, fault-injecting members under the same rules), all zero-filled. The journal's
//! entries are replayed in sequence order onto every member; after each request that changes
//! bytes the block is read from every member and voted on (a content held by more than half of
//! the members is the majority; a member whose read fails is outside it). The first request
//! after which the member asked about (or, if none is named, any member) is outside the
//! majority is the answer: `n` requests, `N·n` block reads. With no majority every member is
//! outside it, so a split with no majority is found too, and reported as such.
//!
//! The answer is *confirmed* with another fresh set: the prefix before it must leave that
//! member inside the majority, and the request itself must put it outside. The reference
//! model of the block (zeroes, then each request's bytes) says which members hold the
//! specification's bytes.
//!
//! # Limits
//!
//! Those of [`crate::bisect`]: a divergence caused by a request the journal forgot, by state the
//! members had before the journal started (e.g. a member added later and filled), or by
//! something it does not record (reads, timing) is not reproduced; the report then names no
//! request and says why.

use std::sync::Arc;

use dovetail_layout::{BlockLayout, Sector, Sectors, SECTOR_SIZE};
use serde::Serialize;
use xxhash_rust::xxh3::xxh3_128;

use crate::bisect::{
    apply, call, first_diff, now_ms, reference_step, BisectError, Window, HISTORY, MAX_ERRORS,
};
use crate::events::{hash_hex, EventKind, Report, RequestInfo};
use crate::journal::{EntryInfo, JournalEntry, JournalOp, JournalSnapshot};
use crate::presence::MAP_BLOCK;
use crate::vote::VotingTee;

/// The version of the report's JSON layout.
pub const REPORT_FORMAT: u32 = 1;

/// Makes a fresh set of members (member 0 first), all zero-filled, for the replay.
pub type FreshMembers<'a> = &'a (dyn Fn() -> Result<Vec<Arc<dyn BlockLayout>>, String> + Sync);

/// Keeps a report: where it went, or why it could not be kept.
pub type SaveMembers<'a> = &'a dyn Fn(&MembersReport) -> Result<String, String>;

/// Every member's view of the block and the vote over them.
#[derive(Debug, Clone, Serialize)]
pub struct MemberViews {
    /// Per member: an XXH3-128 hash (32 hex digits) of its block, or why it could not be read.
    pub members: Vec<String>,
    /// The majority's hash, if a content is held by more than half of the members.
    pub majority: Option<String>,
    /// Members whose view is not the majority's (every member when there is none).
    pub outside: Vec<usize>,
    /// Per member: byte offset in the block of its first difference from the majority's.
    pub first_difference: Vec<Option<u64>>,
    /// The reference model's hash (replays only).
    pub reference: Option<String>,
    /// Members holding the reference's bytes (replays only).
    pub reference_agrees_with: Option<Vec<usize>>,
}

/// What an engineer attaches to a bug report.
#[derive(Debug, Clone, Serialize)]
pub struct MembersReport {
    pub format: u32,
    pub disk: String,
    pub unix_ms: u64,
    /// Members of the Tee (and of each replay).
    pub members: usize,
    /// The member asked about (`None`: the first member to leave the majority).
    pub member: Option<usize>,
    /// The 4 KiB block, and its sectors.
    pub block: u64,
    pub block_sector: u64,
    pub block_sectors: u64,
    /// `given`, `event` (the Tee's first outvoted or no-majority event) or `scan`.
    pub block_from: String,
    /// The live members' views when the bisection ran.
    pub live: Option<MemberViews>,
    pub window: Window,
    /// The first request after which the member (or any member) left the majority.
    pub first_bad: Option<EntryInfo>,
    /// The members outside the majority right after `first_bad`.
    pub diverged: Vec<usize>,
    /// The replayed views right after `first_bad`.
    pub after: Option<MemberViews>,
    /// Replaying the prefix before `first_bad` leaves the member in the majority, and with
    /// `first_bad` outside it.
    pub confirmed: bool,
    /// Requests replayed in all (search and confirmation).
    pub replayed: u64,
    /// The latest earlier requests that changed the block (up to [`HISTORY`]), oldest first.
    pub earlier_requests_to_block: Vec<EntryInfo>,
    /// Errors the fresh members returned during the replay (the first few).
    pub replay_errors: Vec<String>,
    /// One sentence for the operator.
    pub verdict: String,
}

/// The vote over the members' bytes (`None`: the read failed).
fn views(bytes: &[Result<Vec<u8>, String>], reference: Option<&[u8]>) -> MemberViews {
    let n = bytes.len();
    // The content held by more than half of the members, by its first holder.
    let winner = (0..n).find(|&i| {
        let Ok(b) = &bytes[i] else { return false };
        bytes
            .iter()
            .filter(|x| x.as_ref().is_ok_and(|x| x == b))
            .count()
            * 2
            > n
    });
    let maj = winner.and_then(|w| bytes[w].as_ref().ok());
    let outside = (0..n)
        .filter(|&i| match (maj, &bytes[i]) {
            (Some(m), Ok(b)) => m != b,
            _ => true,
        })
        .collect();
    MemberViews {
        members: bytes
            .iter()
            .map(|b| match b {
                Ok(b) => hash_hex(xxh3_128(b)),
                Err(e) => format!("error: {e}"),
            })
            .collect(),
        majority: maj.map(|m| hash_hex(xxh3_128(m))),
        outside,
        first_difference: bytes
            .iter()
            .map(|b| match (maj, b) {
                (Some(m), Ok(b)) => first_diff(m, b),
                _ => None,
            })
            .collect(),
        reference: reference.map(|r| hash_hex(xxh3_128(r))),
        reference_agrees_with: reference.map(|r| {
            (0..n)
                .filter(|&i| bytes[i].as_ref().is_ok_and(|b| b == r))
                .collect()
        }),
    }
}

fn read_all(
    members: &[Arc<dyn BlockLayout>],
    start: u64,
    len: usize,
) -> Vec<Result<Vec<u8>, String>> {
    let at = Sector(start / SECTOR_SIZE);
    members
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut b = vec![0; len];
            call(&format!("reading member {i}"), || l.read_quiet(at, &mut b)).map(|()| b)
        })
        .collect()
}

/// One replay: a fresh set of members, the reference model of the block, the errors seen.
struct Replay {
    members: Vec<Arc<dyn BlockLayout>>,
    reference: Vec<u8>,
    start: u64,
    errors: Vec<String>,
    applied: u64,
}

impl Replay {
    fn new(
        fresh: FreshMembers<'_>,
        n: usize,
        start: u64,
        len: usize,
    ) -> Result<Replay, BisectError> {
        let members = fresh().map_err(BisectError::Fresh)?;
        if members.len() != n {
            return Err(BisectError::Fresh(format!(
                "the factory made {} members, the Tee has {n}",
                members.len()
            )));
        }
        Ok(Replay {
            members,
            reference: vec![0; len],
            start,
            errors: Vec::new(),
            applied: 0,
        })
    }

    fn step(&mut self, e: &JournalEntry) {
        self.applied += 1;
        for (i, l) in self.members.iter().enumerate() {
            if let Err(m) = call(&format!("member {i}"), || apply(&**l, e)) {
                if self.errors.len() < MAX_ERRORS {
                    self.errors.push(format!("request {}: {m}", e.seq));
                }
            }
        }
        reference_step(&mut self.reference, self.start, e);
    }

    fn views(&self) -> MemberViews {
        let bytes = read_all(&self.members, self.start, self.reference.len());
        views(&bytes, Some(&self.reference))
    }
}

/// Whether the views show the divergence asked about.
fn diverged(v: &MemberViews, member: Option<usize>) -> bool {
    match member {
        Some(m) => v.outside.contains(&m),
        None => !v.outside.is_empty(),
    }
}

/// The members' current views of `block`, for the report.
pub fn live_views(members: &[Arc<dyn BlockLayout>], block: u64) -> MemberViews {
    let cap = members.first().map_or(0, |m| m.capacity().0 * SECTOR_SIZE);
    let start = block * MAP_BLOCK;
    let len = cap.saturating_sub(start).min(MAP_BLOCK) as usize;
    views(&read_all(members, start, len), None)
}

/// Bisects the journal for `block` of a disk of `capacity` served by `n` members; see the
/// module documentation. `member`: the member whose divergence is asked about.
#[allow(clippy::too_many_arguments)]
pub fn bisect_members(
    disk: &str,
    capacity: Sectors,
    n: usize,
    block: u64,
    block_from: &str,
    member: Option<usize>,
    journal: &JournalSnapshot,
    fresh: FreshMembers<'_>,
    live: Option<MemberViews>,
) -> Result<MembersReport, BisectError> {
    let cap = capacity.0.saturating_mul(SECTOR_SIZE);
    let blocks = cap.div_ceil(MAP_BLOCK);
    if block >= blocks {
        return Err(BisectError::BlockOutOfRange { block, blocks });
    }
    if let Some(m) = member.filter(|&m| m >= n) {
        return Err(BisectError::NoSuchMember {
            member: m,
            members: n,
        });
    }
    let start = block * MAP_BLOCK;
    let len = (cap - start).min(MAP_BLOCK) as usize;
    let entries = &journal.entries;

    let mut r = Replay::new(fresh, n, start, len)?;
    let mut found = None;
    for (i, e) in entries.iter().enumerate() {
        r.step(e);
        if e.op == JournalOp::Flush {
            continue;
        }
        let v = r.views();
        if diverged(&v, member) {
            found = Some((i, v));
            break;
        }
    }
    let mut replayed = r.applied;
    let mut errors = std::mem::take(&mut r.errors);
    drop(r);

    let mut confirmed = false;
    if let Some((i, v)) = &found {
        // The member found: the one asked about, else the first outside the majority.
        let who = member.or(v.outside.first().copied());
        let mut again = Replay::new(fresh, n, start, len)?;
        for e in &entries[..*i] {
            again.step(e);
        }
        let before = again.views();
        again.step(&entries[*i]);
        let after = again.views();
        replayed += again.applied;
        confirmed = !diverged(&before, who) && diverged(&after, who);
        for m in again.errors {
            if errors.len() < MAX_ERRORS && !errors.contains(&m) {
                errors.push(m);
            }
        }
    }

    let upto = found.as_ref().map_or(entries.len(), |(i, _)| *i);
    let mut earlier: Vec<EntryInfo> = entries[..upto]
        .iter()
        .rev()
        .filter(|e| e.touches(start, start + len as u64))
        .take(HISTORY)
        .map(JournalEntry::info)
        .collect();
    earlier.reverse();
    let window = Window {
        first_seq: entries.first().map_or(0, |e| e.seq),
        last_seq: entries.last().map_or(0, |e| e.seq),
        entries: entries.len() as u64,
        forgotten: journal.forgotten,
        limit_requests: journal.limits.requests as u64,
        limit_bytes: journal.limits.bytes as u64,
    };
    let whom = match member {
        Some(m) => format!("member {m}"),
        None => "a member".to_string(),
    };
    let (first_bad, diverged_now, after, verdict) = match found {
        Some((i, v)) => {
            let e = &entries[i];
            let touches = if e.touches(start, start + len as u64) {
                "a request to the block"
            } else {
                "a request to other blocks (a misdirected effect)"
            };
            let split = if v.majority.is_some() {
                format!("member(s) {:?} left the majority", v.outside)
            } else {
                "no content has a majority".to_string()
            };
            let verdict = format!(
                "block {block}: {whom}'s view first differs from the majority's after request {} ({} at sector {} +{} sectors, {touches}): {split}; {}; the reference model agrees with member(s) {:?}",
                e.seq,
                e.op.name(),
                e.sector,
                e.sectors,
                if confirmed {
                    "confirmed by replaying the journal against fresh members"
                } else {
                    "NOT confirmed: replaying the prefixes again did not give the same answer (a nondeterministic fault?)"
                },
                v.reference_agrees_with.clone().unwrap_or_default(),
            );
            (Some(e.info()), v.outside.clone(), Some(v), verdict)
        }
        None => (
            None,
            Vec::new(),
            None,
            format!(
                "block {block}: replaying the {} journaled requests (from request {}) against fresh members never puts {whom} outside the majority; the divergence comes from a request the journal forgot ({} forgotten), from the members' state before the journal started, or from something it does not record (reads, timing)",
                entries.len(),
                window.first_seq,
                journal.forgotten
            ),
        ),
    };
    Ok(MembersReport {
        format: REPORT_FORMAT,
        disk: disk.to_string(),
        unix_ms: now_ms(),
        members: n,
        member,
        block,
        block_sector: start / SECTOR_SIZE,
        block_sectors: len as u64 / SECTOR_SIZE,
        block_from: block_from.to_string(),
        live,
        window,
        first_bad,
        diverged: diverged_now,
        after,
        confirmed,
        replayed,
        earlier_requests_to_block: earlier,
        replay_errors: errors,
        verdict,
    })
}

/// The report file's default name: `bisect-DISK-BLOCK-UNIXMS.json`, as the two-version one.
pub fn report_name(report: &MembersReport) -> String {
    format!(
        "bisect-{}-{}-{}.json",
        report.disk, report.block, report.unix_ms
    )
}

/// Writes `report` as pretty JSON to the new file `name` in `dir` (never through a symlink,
/// never over an existing file), synced: the same writer as the two-member bisection's.
pub use crate::bisect::write_report;

impl VotingTee {
    /// Every member's current view of `block`, read with no journaled request to it in
    /// flight and the background votes drained.
    pub fn live_block(&self, block: u64) -> MemberViews {
        let _g = self.journal().map(|j| j.hold_block(block));
        self.drain();
        let members: Vec<_> = (0..self.len()).filter_map(|i| self.member(i)).collect();
        live_views(&members, block)
    }

    /// Which block (and member) to bisect when the caller names no block: the Tee's first
    /// remembered `outvoted` or `no-majority` event's, else the first journaled block its
    /// members now disagree on.
    fn choose(&self, journal: &JournalSnapshot) -> Option<(u64, Option<usize>, &'static str)> {
        for ev in self.events() {
            match (ev.kind, ev.block) {
                (EventKind::Outvoted, Some(b)) => return Some((b, ev.member, "event")),
                (EventKind::NoMajority, Some(b)) => return Some((b, None, "event")),
                _ => {}
            }
        }
        let blocks = (self.capacity().0 * SECTOR_SIZE).div_ceil(MAP_BLOCK);
        let mut seen = std::collections::HashSet::new();
        for e in &journal.entries {
            if e.op == JournalOp::Flush || e.sectors == 0 {
                continue;
            }
            let a = e.sector * SECTOR_SIZE / MAP_BLOCK;
            let b = ((e.sector + e.sectors) * SECTOR_SIZE - 1) / MAP_BLOCK;
            for blk in a..=b.min(blocks.saturating_sub(1)) {
                if seen.insert(blk) && !self.live_block(blk).outside.is_empty() {
                    return Some((blk, None, "scan"));
                }
            }
        }
        None
    }

    /// Bisects the Tee's journal for `block` (or the block of its first outvoted or
    /// no-majority event, or else the first journaled block its members now disagree on),
    /// asking when `member` (or the event's member, or any) left the majority, replaying
    /// against members `fresh` makes. `save` (if given) keeps the report and says where (or
    /// why not); then a `bisected` event carries the verdict. Fails if the Tee keeps no
    /// journal or no block differs.
    pub fn bisect(
        &self,
        block: Option<u64>,
        member: Option<usize>,
        fresh: FreshMembers<'_>,
        save: Option<SaveMembers<'_>>,
    ) -> Result<MembersReport, String> {
        let journal = self
            .journal()
            .ok_or_else(|| {
                "the tee keeps no request journal (serve with --tee-journal N, then tee the disk \
                 again)"
                    .to_string()
            })?
            .snapshot();
        let (block, event_member, from) = match block {
            Some(b) => (b, None, "given"),
            None => self.choose(&journal).ok_or_else(|| {
                format!(
                    "the members agree on every block the journal's {} requests changed, and no vote was lost: name a block",
                    journal.entries.len()
                )
            })?,
        };
        let live = Some(self.live_block(block));
        let member = member.or(event_member);
        let report = bisect_members(
            &self.disk_name(),
            self.capacity(),
            self.len(),
            block,
            from,
            member,
            &journal,
            fresh,
            live,
        )
        .map_err(|e| e.to_string())?;
        let mut r = Report::new(
            EventKind::Bisected,
            match save.map(|f| f(&report)) {
                Some(Ok(f)) => format!("{} (report: {f})", report.verdict),
                Some(Err(why)) => format!("{} (report not saved: {why})", report.verdict),
                None => report.verdict.clone(),
            },
        );
        r.block = Some(report.block);
        r.member = report.member.or(report.diverged.first().copied());
        if let Some(e) = &report.first_bad {
            r.request = Some(RequestInfo {
                op: e.op,
                sector: e.sector,
                sectors: e.sectors,
                seq: e.seq,
            });
        }
        self.emit_report(r);
        Ok(report)
    }
}
