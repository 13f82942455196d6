//! The Tee's background jobs that compare whole regions: the lazy hash job (`lazy-hashes`) and
//! the resync after an unclean stop.
//!
//! Both work in pieces of at most 1 MiB. A piece is compared under its stripes (so no write to
//! it is in flight) after draining the background stream (so neither version has a write to it
//! still queued): at that point both versions must hold the same bytes for every block the
//! candidate holds.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use dovetail_layout::{Sector, SECTOR_SIZE};
use xxhash_rust::xxh3::xxh3_128;

use crate::events::{Counters, EventKind, Report, RequestInfo};
use crate::policy::Policy;
use crate::presence::MAP_BLOCK;
use crate::stripes::Mode;
use crate::tee::{first_difference, Inner, PIECE};

const PIECE_BLOCKS: u64 = PIECE / MAP_BLOCK;

fn piece_info(
    inner: &Inner,
    op: &'static str,
    first: u64,
    last: u64,
) -> (Sector, usize, RequestInfo) {
    let start = first * MAP_BLOCK;
    let end = ((last + 1) * MAP_BLOCK).min(inner.cap_bytes);
    let at = Sector(start / SECTOR_SIZE);
    let len = (end - start) as usize;
    let info = RequestInfo {
        op,
        sector: at.0,
        sectors: len as u64 / SECTOR_SIZE,
        seq: 0,
    };
    (at, len, info)
}

/// Every `lazy_interval`, while the policy is `lazy-hashes` and the candidate is not
/// quarantined, compares the next `lazy_region` bytes (round robin over the disk) piece by
/// piece, skipping pieces with a block the candidate does not hold or that is unverified.
pub(crate) fn lazy_job(inner: Arc<Inner>) {
    let mut cursor = 0u64;
    let mut t = Vec::new();
    let mut c = Vec::new();
    while !inner.sleep(inner.lazy_interval) {
        let policy = inner.current_policy();
        if policy != Policy::LazyHashes || inner.is_quarantined() || inner.blocks == 0 {
            continue;
        }
        let region_blocks = inner.lazy_region.div_ceil(MAP_BLOCK).max(1);
        let end = cursor.saturating_add(region_blocks).min(inner.blocks);
        let mut first = cursor;
        while first < end && !inner.stopping() && !inner.is_quarantined() {
            let last = (first + PIECE_BLOCKS).min(end) - 1;
            check_piece(&inner, first, last, &mut t, &mut c);
            first = last + 1;
        }
        cursor = if end >= inner.blocks { 0 } else { end };
    }
}

fn check_piece(inner: &Inner, first: u64, last: u64, t: &mut Vec<u8>, c: &mut Vec<u8>) {
    let n = last - first + 1;
    if !inner.presence.contains_all(first, n)
        || (inner.unverified.any() && (first..=last).any(|b| inner.unverified.get(b)))
    {
        return;
    }
    let (at, len, info) = piece_info(inner, "lazy", first, last);
    t.resize(len, 0);
    c.resize(len, 0);
    let _g = inner.stripes.lock(first, last, Mode::Shared);
    inner.stream.drain();
    if inner.is_quarantined() {
        return;
    }
    if let Err(e) = inner.trusted.read_quiet(at, t) {
        log::warn!(
            "tee {}: lazy check of sector {} skipped: the trusted read failed: {}",
            inner.disk,
            at.0,
            dovetail_layout::error_chain(&e)
        );
        return;
    }
    if let Err(f) = inner.call_candidate(|cand| cand.read_quiet(at, c)) {
        inner.candidate_failed("read (lazy check)", Some(info), f);
        return;
    }
    Counters::bump(&inner.counters.lazy_regions_checked);
    inner
        .counters
        .compared_bytes
        .fetch_add(len as u64, Ordering::Relaxed);
    let (th, ch) = (xxh3_128(t), xxh3_128(c));
    if th != ch {
        let d = first_difference(t, c).map(|d| d as u64);
        inner.mismatch(
            EventKind::LazyMismatch,
            "lazy hash check: the candidate's region differs from the trusted version",
            Some(info),
            Some(th),
            Some(ch),
            d,
        );
    }
}

/// After an unclean stop: compares every unverified block with the trusted version, rewrites
/// the candidate's copy where they differ, and marks them verified; one `Resynced` event at the
/// end.
pub(crate) fn resync(inner: Arc<Inner>) {
    let total = inner.unverified.count();
    let mut repaired = 0u64;
    let mut t = Vec::new();
    let mut c = Vec::new();
    let mut first = 0u64;
    while first < inner.blocks && inner.unverified.any() {
        if inner.stopping() || inner.is_quarantined() {
            log::info!(
                "tee {}: resync stopped with {} blocks unverified",
                inner.disk,
                inner.unverified.count()
            );
            return;
        }
        let last = (first + PIECE_BLOCKS).min(inner.blocks) - 1;
        if (first..=last).any(|b| inner.unverified.get(b)) {
            match resync_piece(&inner, first, last, &mut t, &mut c) {
                Some(n) => repaired += n,
                None => return,
            }
        }
        first = last + 1;
    }
    let r = Report::new(
        EventKind::Resynced,
        format!(
            "resync after an unclean stop: {total} present blocks compared, {repaired} rewritten from the trusted version"
        ),
    );
    inner.emit(r);
}

/// Resyncs one piece; `None` if the candidate failed (and was quarantined).
fn resync_piece(
    inner: &Inner,
    first: u64,
    last: u64,
    t: &mut Vec<u8>,
    c: &mut Vec<u8>,
) -> Option<u64> {
    let (at, len, info) = piece_info(inner, "resync", first, last);
    t.resize(len, 0);
    c.resize(len, 0);
    let _g = inner.stripes.lock(first, last, Mode::Exclusive);
    inner.stream.drain();
    if inner.is_quarantined() {
        return None;
    }
    if let Err(e) = inner.trusted.read_quiet(at, t) {
        log::warn!(
            "tee {}: resync of sector {} postponed: the trusted read failed: {}",
            inner.disk,
            at.0,
            dovetail_layout::error_chain(&e)
        );
        return Some(0);
    }
    if let Err(f) = inner.call_candidate(|cand| cand.read_quiet(at, c)) {
        inner.candidate_failed("read (resync)", Some(info), f);
        return None;
    }
    let mut repaired = 0;
    for b in first..=last {
        if !inner.unverified.get(b) {
            continue;
        }
        let from = ((b - first) * MAP_BLOCK) as usize;
        let to = (from + MAP_BLOCK as usize).min(len);
        if t[from..to] != c[from..to] {
            let block_at = Sector(at.0 + from as u64 / SECTOR_SIZE);
            if let Err(f) = inner.call_candidate(|cand| cand.write(block_at, &t[from..to])) {
                inner.candidate_failed("write (resync)", Some(info), f);
                return None;
            }
            repaired += 1;
            Counters::bump(&inner.counters.resync_blocks_repaired);
        }
        inner.unverified.clear(b, b);
    }
    Some(repaired)
}
