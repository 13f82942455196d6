//! Divergence bisection: given a Tee's request journal ([`crate::journal`]) and a block on
//! which its versions disagree, name the first journaled request after which the versions'
//! views of that block differ, confirmed by replaying the journal against fresh versions.
//!
//! # How
//!
//! A caller-given factory makes a fresh pair of versions of the same layouts as the Tee's
//! (the backend: the same layouts in a scratch store, a fault-injecting candidate with the
//! same rules), both zero-filled. The journal's entries are replayed in sequence order onto
//! both; after each request that changes bytes (a flush changes none) the block is read from
//! both and compared. The first request after which they differ is the answer. Because both
//! fresh versions start from the same state, a difference that appears can only come from the
//! replayed requests. Comparing after every request finds the first one in one pass (`n`
//! requests, `2n` block reads), where a binary search over prefixes would replay `n log n`.
//!
//! The answer is then *confirmed* with another fresh pair: the prefix before it must leave
//! the block equal on both, and the request itself must make them differ. A flaky or
//! timing-dependent fault fails the confirmation, and the report says so.
//!
//! A reference model of the block (the specification: zeroes, then each journaled request's
//! bytes) says which fresh version is right after the request that split them.
//!
//! # Limits
//!
//! The journal is bounded: a difference caused by a request it has forgotten, by state the
//! versions had before the Tee started, or by something it does not record (reads, timing) is
//! not reproduced; the report then names no request and says why.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use dovetail_layout::{error_chain, BlockLayout, Sector, Sectors, SECTOR_SIZE};
use serde::Serialize;
use xxhash_rust::xxh3::xxh3_128;

use crate::events::hash_hex;
use crate::journal::{EntryInfo, JournalEntry, JournalOp, JournalSnapshot};
use crate::presence::MAP_BLOCK;

/// The version of the report's JSON layout.
pub const REPORT_FORMAT: u32 = 1;
/// At most this many earlier requests to the block are listed in a report.
pub const HISTORY: usize = 16;

/// A fresh pair of versions: (trusted, candidate), both zero-filled.
pub type Members = (Arc<dyn BlockLayout>, Arc<dyn BlockLayout>);

/// Makes fresh pairs of versions for the replay.
pub type Fresh<'a> = &'a (dyn Fn() -> Result<Members, String> + Sync);

/// Keeps a report: where it went, or why it could not be kept.
pub type Save<'a> = &'a dyn Fn(&BisectReport) -> Result<String, String>;

/// The journal's window a report covers.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    /// Sequence number of the first and last entry replayed (0 when empty).
    pub first_seq: u64,
    pub last_seq: u64,
    pub entries: u64,
    /// Entries forgotten before the window.
    pub forgotten: u64,
    /// The bounds: requests and bytes of data.
    pub limit_requests: u64,
    pub limit_bytes: u64,
}

/// Both versions' views of the block: XXH3-128 hashes (or an error).
#[derive(Debug, Clone, Serialize)]
pub struct Views {
    pub trusted: String,
    pub candidate: String,
    /// The reference model's hash (replays only).
    pub reference: Option<String>,
    /// Byte offset in the block of the first difference between the versions.
    pub first_difference: Option<u64>,
    /// `trusted`, `candidate`, `both` or `neither`: which version holds the reference's bytes.
    pub reference_agrees_with: Option<&'static str>,
}

/// What an engineer attaches to a bug report.
#[derive(Debug, Clone, Serialize)]
pub struct BisectReport {
    pub format: u32,
    pub disk: String,
    pub unix_ms: u64,
    /// The 4 KiB block the versions disagree on, and its sectors.
    pub block: u64,
    pub block_sector: u64,
    pub block_sectors: u64,
    /// How the block was chosen: `given`, `event` (the Tee's first mismatch event) or `scan`.
    pub block_from: String,
    /// The live versions' views of the block when the bisection ran.
    pub live: Option<Views>,
    pub window: Window,
    /// The first request after which the replayed versions' views of the block differ.
    pub first_bad: Option<EntryInfo>,
    /// The replayed views right after `first_bad`.
    pub after: Option<Views>,
    /// Replaying the prefix before `first_bad` leaves the block equal, and with it different.
    pub confirmed: bool,
    /// Requests replayed in all (search and confirmation).
    pub replayed: u64,
    /// The latest earlier requests that changed the block (up to [`HISTORY`]), oldest first.
    pub earlier_requests_to_block: Vec<EntryInfo>,
    /// Errors the fresh versions returned during the replay (the first few).
    pub replay_errors: Vec<String>,
    /// One sentence for the operator.
    pub verdict: String,
}

/// Why a bisection could not run.
#[derive(Debug, thiserror::Error)]
pub enum BisectError {
    #[error("block {block} is past the disk's end ({blocks} blocks)")]
    BlockOutOfRange { block: u64, blocks: u64 },
    #[error("could not make fresh versions for the replay: {0}")]
    Fresh(String),
    #[error("a fresh version failed: {0}")]
    Replay(String),
    #[error("member {member}: the tee has {members} members (0 to {})", members.saturating_sub(1))]
    NoSuchMember { member: usize, members: usize },
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One replay: a fresh pair, the reference model of the block, the errors seen.
struct Replay {
    t: Arc<dyn BlockLayout>,
    c: Arc<dyn BlockLayout>,
    reference: Vec<u8>,
    start: u64,
    errors: Vec<String>,
    applied: u64,
}

pub(crate) const MAX_ERRORS: usize = 8;

pub(crate) fn call<R>(
    what: &str,
    f: impl FnOnce() -> dovetail_layout::Result<R>,
) -> Result<R, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(format!("{what}: {}", error_chain(&e))),
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_string());
            Err(format!("{what}: panicked: {msg}"))
        }
    }
}

pub(crate) fn apply(l: &dyn BlockLayout, e: &JournalEntry) -> dovetail_layout::Result<()> {
    let at = Sector(e.sector);
    let len = Sectors(e.sectors);
    match e.op {
        JournalOp::Write => l.write(at, e.data.as_deref().unwrap_or(&[])),
        JournalOp::WriteZeroes => l.write_zeroes(at, len, false),
        JournalOp::WriteZeroesUnmap => l.write_zeroes(at, len, true),
        JournalOp::Discard => l.discard(at, len),
        JournalOp::Flush => l.flush(),
    }
}

impl Replay {
    fn new(fresh: Fresh<'_>, start: u64, len: usize) -> Result<Replay, BisectError> {
        let (t, c) = fresh().map_err(BisectError::Fresh)?;
        Ok(Replay {
            t,
            c,
            reference: vec![0; len],
            start,
            errors: Vec::new(),
            applied: 0,
        })
    }

    fn step(&mut self, e: &JournalEntry) {
        self.applied += 1;
        for (who, l) in [("trusted", &self.t), ("candidate", &self.c)] {
            if let Err(m) = call(who, || apply(&**l, e)) {
                if self.errors.len() < MAX_ERRORS {
                    self.errors.push(format!("request {}: {m}", e.seq));
                }
            }
        }
        reference_step(&mut self.reference, self.start, e);
    }

    /// Both versions' bytes of the block.
    fn read(&self) -> Result<(Vec<u8>, Vec<u8>), BisectError> {
        read_pair(&*self.t, &*self.c, self.start, self.reference.len())
    }
}

/// The reference model of the block at byte `start` (the specification: the bytes each
/// request puts into it), advanced by `e`.
pub(crate) fn reference_step(reference: &mut [u8], start: u64, e: &JournalEntry) {
    let end = start + reference.len() as u64;
    if !e.touches(start, end) {
        return;
    }
    let a = e.sector * SECTOR_SIZE;
    let from = a.max(start);
    let to = (a + e.sectors * SECTOR_SIZE).min(end);
    let dst = &mut reference[(from - start) as usize..(to - start) as usize];
    match (e.op, e.data.as_deref()) {
        (JournalOp::Write, Some(d)) => {
            dst.copy_from_slice(&d[(from - a) as usize..(to - a) as usize]);
        }
        _ => dst.fill(0),
    }
}

fn read_pair(
    t: &dyn BlockLayout,
    c: &dyn BlockLayout,
    start: u64,
    len: usize,
) -> Result<(Vec<u8>, Vec<u8>), BisectError> {
    let at = Sector(start / SECTOR_SIZE);
    let mut a = vec![0; len];
    let mut b = vec![0; len];
    call("reading the trusted version", || t.read_quiet(at, &mut a))
        .map_err(BisectError::Replay)?;
    call("reading the candidate", || c.read_quiet(at, &mut b)).map_err(BisectError::Replay)?;
    Ok((a, b))
}

pub(crate) fn first_diff(a: &[u8], b: &[u8]) -> Option<u64> {
    a.iter().zip(b).position(|(x, y)| x != y).map(|p| p as u64)
}

fn views(t: &[u8], c: &[u8], reference: Option<&[u8]>) -> Views {
    Views {
        trusted: hash_hex(xxh3_128(t)),
        candidate: hash_hex(xxh3_128(c)),
        reference: reference.map(|r| hash_hex(xxh3_128(r))),
        first_difference: first_diff(t, c),
        reference_agrees_with: reference.map(|r| match (r == t, r == c) {
            (true, true) => "both",
            (true, false) => "trusted",
            (false, true) => "candidate",
            (false, false) => "neither",
        }),
    }
}

/// The live versions' views of `block` (their current bytes), for the report.
pub fn live_views(t: &dyn BlockLayout, c: &dyn BlockLayout, block: u64) -> Result<Views, String> {
    let cap = t.capacity().0 * SECTOR_SIZE;
    let start = block * MAP_BLOCK;
    let len = (cap.saturating_sub(start)).min(MAP_BLOCK) as usize;
    let (a, b) = read_pair(t, c, start, len).map_err(|e| e.to_string())?;
    Ok(views(&a, &b, None))
}

/// Bisects the journal for `block` of a disk of `capacity`; see the module documentation.
pub fn bisect(
    disk: &str,
    capacity: Sectors,
    block: u64,
    block_from: &str,
    journal: &JournalSnapshot,
    fresh: Fresh<'_>,
    live: Option<Views>,
) -> Result<BisectReport, BisectError> {
    let cap = capacity.0.saturating_mul(SECTOR_SIZE);
    let blocks = cap.div_ceil(MAP_BLOCK);
    if block >= blocks {
        return Err(BisectError::BlockOutOfRange { block, blocks });
    }
    let start = block * MAP_BLOCK;
    let len = (cap - start).min(MAP_BLOCK) as usize;
    let entries = &journal.entries;
    let mut replayed = 0;

    // One pass: the first request after which the fresh versions differ on the block.
    let mut r = Replay::new(fresh, start, len)?;
    let mut found = None;
    for (i, e) in entries.iter().enumerate() {
        r.step(e);
        if e.op == JournalOp::Flush {
            continue;
        }
        let (a, b) = r.read()?;
        if a != b {
            found = Some((i, views(&a, &b, Some(&r.reference))));
            break;
        }
    }
    replayed += r.applied;
    let mut errors = std::mem::take(&mut r.errors);
    drop(r);

    // Confirmation, from another fresh pair: the prefix before it leaves the block equal on
    // both versions, and the request itself makes them differ. (Reading the block between
    // the two changes neither version, so one replay confirms both prefixes.)
    let mut confirmed = false;
    if let Some((i, _)) = &found {
        let mut again = Replay::new(fresh, start, len)?;
        for e in &entries[..*i] {
            again.step(e);
        }
        let (a, b) = again.read()?;
        again.step(&entries[*i]);
        let (c, d) = again.read()?;
        replayed += again.applied;
        confirmed = a == b && c != d;
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
    let (first_bad, after) = match found {
        Some((i, v)) => (Some(entries[i].info()), Some(v)),
        None => (None, None),
    };
    let verdict = match (&first_bad, &after) {
        (Some(e), Some(v)) => {
            let touches = if entries
                .iter()
                .any(|x| x.seq == e.seq && x.touches(start, start + len as u64))
            {
                "a request to the block"
            } else {
                "a request to other blocks (a misdirected effect)"
            };
            format!(
                "block {block}: the versions' views first differ after request {} ({} at sector {} +{} sectors, {touches}); {}; the reference model agrees with {}",
                e.seq,
                e.op,
                e.sector,
                e.sectors,
                if confirmed {
                    "confirmed by replaying the journal against fresh versions"
                } else {
                    "NOT confirmed: replaying the prefixes again did not give the same answer (a nondeterministic fault?)"
                },
                v.reference_agrees_with.unwrap_or("neither"),
            )
        }
        _ => format!(
            "block {block}: replaying the {} journaled requests (from request {}) against fresh versions does not reproduce a difference; it comes from a request the journal forgot ({} forgotten), from the versions' state before the journal started, or from something it does not record (reads, timing)",
            entries.len(),
            window.first_seq,
            journal.forgotten
        ),
    };
    Ok(BisectReport {
        format: REPORT_FORMAT,
        disk: disk.to_string(),
        unix_ms: now_ms(),
        block,
        block_sector: start / SECTOR_SIZE,
        block_sectors: len as u64 / SECTOR_SIZE,
        block_from: block_from.to_string(),
        live,
        window,
        first_bad,
        after,
        confirmed,
        replayed,
        earlier_requests_to_block: earlier,
        replay_errors: errors,
        verdict,
    })
}

/// Writes `report` as pretty JSON to the new file `name` in `dir` (never through a symlink,
/// never over an existing file), synced.
pub fn write_report(
    dir: &crate::mapfile::MapsDir,
    name: &str,
    report: &impl Serialize,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = dir.create_file(name)?;
    let mut text = serde_json::to_vec_pretty(report).map_err(std::io::Error::other)?;
    text.push(b'\n');
    f.write_all(&text)?;
    f.sync_all()?;
    dir.sync()
}

/// The report file's default name: `bisect-DISK-BLOCK-UNIXMS.json`.
pub fn report_name(report: &BisectReport) -> String {
    format!(
        "bisect-{}-{}-{}.json",
        report.disk, report.block, report.unix_ms
    )
}

/// Which block to bisect when the caller names none.
fn choose_block(tee: &crate::tee::Tee, journal: &JournalSnapshot) -> Option<(u64, &'static str)> {
    use crate::events::EventKind;
    // Read with the stream drained once: a block's later writes may still be in flight, which
    // only makes this see an older view of a block the versions then differ on anyway.
    tee.drain();
    let journal_lock = tee.journal();
    let (t, c) = (tee.trusted(), tee.candidate());
    let cap = t.capacity().0 * SECTOR_SIZE;
    let blocks = cap.div_ceil(MAP_BLOCK);
    let differs = |blk: u64| {
        let _g = journal_lock.map(|j| j.hold_block(blk));
        let start = blk * MAP_BLOCK;
        let len = cap.saturating_sub(start).min(MAP_BLOCK) as usize;
        read_pair(&**t, &**c, start, len).is_ok_and(|(a, b)| a != b)
    };
    // The Tee's first mismatch it still remembers. Its byte offset counts from the request's
    // first sector (a read) or from the start of its first block (a write the Tee extended to
    // whole blocks and read back), so the block is one of the request's: the one the offset
    // names either way that the versions now differ on, else the first of them that differs.
    for ev in tee.events() {
        if !matches!(ev.kind, EventKind::Mismatch | EventKind::LazyMismatch) {
            continue;
        }
        let (Some(r), Some(d)) = (&ev.request, ev.first_difference) else {
            continue;
        };
        let start = r.sector.saturating_mul(SECTOR_SIZE);
        let end = start.saturating_add(r.sectors.max(1).saturating_mul(SECTOR_SIZE));
        let (first, last) = (
            start / MAP_BLOCK,
            ((end - 1) / MAP_BLOCK).min(blocks.saturating_sub(1)),
        );
        let named = [
            start.saturating_add(d) / MAP_BLOCK,
            (first * MAP_BLOCK).saturating_add(d) / MAP_BLOCK,
        ];
        let in_request = |b: &u64| (first..=last).contains(b);
        if let Some(b) = named
            .into_iter()
            .filter(in_request)
            .chain(first..=last)
            .find(|&b| differs(b))
        {
            return Some((b, "event"));
        }
        return Some((named[0].min(last), "event"));
    }
    // Otherwise the first block the journal changed on which the versions now differ.
    let mut seen = std::collections::HashSet::new();
    for e in &journal.entries {
        if e.op == JournalOp::Flush || e.sectors == 0 {
            continue;
        }
        let a = e.sector * SECTOR_SIZE / MAP_BLOCK;
        let b = ((e.sector + e.sectors) * SECTOR_SIZE - 1) / MAP_BLOCK;
        for blk in a..=b.min(blocks.saturating_sub(1)) {
            if seen.insert(blk) && differs(blk) {
                return Some((blk, "scan"));
            }
        }
    }
    None
}

impl crate::tee::Tee {
    /// Both versions' current views of `block`, read with no journaled request to it in flight
    /// and the background stream drained.
    pub fn live_block(&self, block: u64) -> Result<Views, String> {
        let _g = self.journal().map(|j| j.hold_block(block));
        self.drain();
        live_views(&**self.trusted(), &**self.candidate(), block)
    }

    /// Bisects the Tee's journal for `block` (or, if `None`, the block of the first mismatch
    /// event the Tee remembers, or else the first journaled block the versions now differ on),
    /// replaying against versions `fresh` makes. `save` (if given) keeps the report and says
    /// where (or why not); then a `bisected` event carries the verdict and that. Fails if the
    /// Tee keeps no journal or no block differs.
    pub fn bisect(
        &self,
        block: Option<u64>,
        fresh: Fresh<'_>,
        save: Option<Save<'_>>,
    ) -> Result<BisectReport, String> {
        let journal = self
            .journal()
            .ok_or_else(|| {
                "the tee keeps no request journal (serve with --tee-journal N, then tee the disk \
                 again)"
                    .to_string()
            })?
            .snapshot();
        let (block, from) = match block {
            Some(b) => (b, "given"),
            None => choose_block(self, &journal).ok_or_else(|| {
                format!(
                    "the versions agree on every block the journal's {} requests changed, and no mismatch was reported: name a block",
                    journal.entries.len()
                )
            })?,
        };
        let live = self.live_block(block).ok();
        let capacity = self.trusted().capacity();
        let disk = self.inner().disk.clone();
        let report = bisect(&disk, capacity, block, from, &journal, fresh, live)
            .map_err(|e| e.to_string())?;
        let mut r = crate::events::Report::new(
            crate::events::EventKind::Bisected,
            match save.map(|f| f(&report)) {
                Some(Ok(f)) => format!("{} (report: {f})", report.verdict),
                Some(Err(why)) => format!("{} (report not saved: {why})", report.verdict),
                None => report.verdict.clone(),
            },
        );
        r.block = Some(report.block);
        if let Some(e) = &report.first_bad {
            r.request = Some(crate::events::RequestInfo {
                op: e.op,
                sector: e.sector,
                sectors: e.sectors,
                seq: e.seq,
            });
        }
        if let Some(v) = &report.after {
            r.trusted = Some(v.trusted.clone());
            r.candidate = Some(v.candidate.clone());
        }
        self.inner().emit(r);
        Ok(report)
    }
}
