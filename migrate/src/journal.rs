//! The request journal a Tee keeps for divergence bisection ([`crate::bisect`]): the guest's
//! requests that change a version (writes, write-zeroes, discards) and its flushes, in one order
//! across every queue, with their data, bounded in requests and in bytes.
//!
//! # Order across queues
//!
//! Each recorded request gets a global sequence number (from 1 per journal). A mutating request
//! locks the journal's own striped lock table over its 4 KiB blocks *before* it is numbered and
//! holds it until the Tee has finished the request ([`Recorded`] releases it on drop): two
//! overlapping requests are therefore numbered in the order both versions executed them, which
//! is the order a replay must use. Requests on different blocks may be numbered in either order;
//! they commute. Reads are not journaled: they change no version's view of a block.
//!
//! # What is kept, and the memory bound
//!
//! Every entry keeps the operation, its sector range, an XXH3-128 hash of its data (which names
//! the request in a report) and the data itself (a replay against fresh versions needs it:
//! hashes alone cannot regenerate it). The journal keeps at most `requests` entries and at most
//! `bytes` bytes of data; the oldest entries are forgotten first (counted in
//! [`JournalSnapshot::forgotten`]). Its memory is about `requests × 100 B` for the entries plus
//! `bytes` for the data: with the defaults ([`DEFAULT_REQUESTS`], [`DEFAULT_BYTES`]) about
//! 6.5 MiB + 64 MiB. A single write larger than `bytes` is kept alone.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use dovetail_layout::{Sector, Sectors, SECTOR_SIZE};
use serde::Serialize;
use xxhash_rust::xxh3::xxh3_128;

use crate::events::hash_hex;
use crate::presence::MAP_BLOCK;
use crate::stripes::{Mode, StripeGuard, Stripes};

/// Default bound on the number of journaled requests (a Tee keeps a journal only when `serve
/// --tee-journal N` asks, with N entries).
pub const DEFAULT_REQUESTS: usize = 65_536;
/// Default bound on the data the journal keeps, in bytes.
pub const DEFAULT_BYTES: usize = 64 << 20;
/// Approximate memory of one entry besides its data, for the documentation and status.
pub const ENTRY_OVERHEAD: usize = 100;

/// How much a journal keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalLimits {
    /// Entries kept (at least 1).
    pub requests: usize,
    /// Bytes of data kept.
    pub bytes: usize,
}

impl Default for JournalLimits {
    fn default() -> JournalLimits {
        JournalLimits {
            requests: DEFAULT_REQUESTS,
            bytes: DEFAULT_BYTES,
        }
    }
}

impl JournalLimits {
    /// `requests` entries, with the default data bound.
    pub fn requests(requests: usize) -> JournalLimits {
        JournalLimits {
            requests,
            ..JournalLimits::default()
        }
    }
}

/// The operation of a journaled request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum JournalOp {
    Write,
    WriteZeroes,
    /// `write-zeroes` with the unmap flag.
    WriteZeroesUnmap,
    Discard,
    Flush,
}

impl JournalOp {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            JournalOp::Write => "write",
            JournalOp::WriteZeroes => "write-zeroes",
            JournalOp::WriteZeroesUnmap => "write-zeroes-unmap",
            JournalOp::Discard => "discard",
            JournalOp::Flush => "flush",
        }
    }
}

/// One journaled request.
#[derive(Debug, Clone)]
pub struct JournalEntry {
    /// The journal's sequence number, from 1: the order both versions saw overlapping requests.
    pub seq: u64,
    pub op: JournalOp,
    pub sector: u64,
    pub sectors: u64,
    /// XXH3-128 of the data written (`write` only).
    pub hash: Option<u128>,
    /// The data written (`write` only).
    pub data: Option<Arc<[u8]>>,
}

/// An entry as a report shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryInfo {
    pub seq: u64,
    pub op: &'static str,
    pub sector: u64,
    pub sectors: u64,
    /// 32 hex digits, for writes.
    pub hash: Option<String>,
}

impl JournalEntry {
    pub fn info(&self) -> EntryInfo {
        EntryInfo {
            seq: self.seq,
            op: self.op.name(),
            sector: self.sector,
            sectors: self.sectors,
            hash: self.hash.map(hash_hex),
        }
    }

    /// Whether the request changes bytes `[start, end)` of the disk.
    pub fn touches(&self, start: u64, end: u64) -> bool {
        if self.op == JournalOp::Flush {
            return false;
        }
        let a = self.sector.saturating_mul(SECTOR_SIZE);
        let b = a.saturating_add(self.sectors.saturating_mul(SECTOR_SIZE));
        a < end && start < b
    }
}

/// What the journal holds at one moment.
#[derive(Debug, Clone)]
pub struct JournalSnapshot {
    /// The entries, oldest first, in sequence order.
    pub entries: Vec<JournalEntry>,
    /// Entries forgotten to keep the bounds (the first kept entry's `seq - 1`).
    pub forgotten: u64,
    pub limits: JournalLimits,
    /// Bytes of data held.
    pub bytes: usize,
}

#[derive(Debug, Default)]
struct Ring {
    entries: VecDeque<JournalEntry>,
    bytes: usize,
    next_seq: u64,
    forgotten: u64,
}

/// The bounded journal; see the module documentation.
#[derive(Debug)]
pub struct Journal {
    limits: JournalLimits,
    /// Requests outside it (refused by every version anyway) are not journaled.
    capacity: Sectors,
    stripes: Stripes,
    ring: Mutex<Ring>,
}

/// A journaled request in progress: holds its blocks' journal stripes until dropped.
#[derive(Debug)]
pub struct Recorded<'a> {
    _stripes: Option<StripeGuard<'a>>,
    /// The request's sequence number (0: not journaled, the request is invalid).
    pub seq: u64,
}

impl Recorded<'_> {
    const NOT: Recorded<'static> = Recorded {
        _stripes: None,
        seq: 0,
    };
}

impl Journal {
    /// A journal for a disk of `capacity`.
    pub fn new(limits: JournalLimits, capacity: Sectors) -> Journal {
        Journal {
            limits: JournalLimits {
                requests: limits.requests.max(1),
                bytes: limits.bytes,
            },
            capacity,
            stripes: Stripes::new(),
            ring: Mutex::new(Ring {
                next_seq: 1,
                ..Ring::default()
            }),
        }
    }

    pub fn limits(&self) -> JournalLimits {
        self.limits
    }

    fn lock_ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a write of `data` at `at`; hold the result until the write has finished.
    pub fn write(&self, at: Sector, data: &[u8]) -> Recorded<'_> {
        let sectors = data.len() as u64 / SECTOR_SIZE;
        if data.len() as u64 % SECTOR_SIZE != 0 || !self.valid(at, Sectors(sectors)) {
            return Recorded::NOT;
        }
        let g = self.lock_blocks(at, Sectors(sectors));
        let kept: Arc<[u8]> = Arc::from(data);
        let hash = xxh3_128(data);
        self.push(
            g,
            JournalOp::Write,
            at,
            Sectors(sectors),
            Some(hash),
            Some(kept),
        )
    }

    /// Records a write-zeroes (`discard` false) or a discard.
    pub fn zeroes(&self, at: Sector, len: Sectors, unmap: bool, discard: bool) -> Recorded<'_> {
        let op = match (discard, unmap) {
            (true, _) => JournalOp::Discard,
            (false, true) => JournalOp::WriteZeroesUnmap,
            (false, false) => JournalOp::WriteZeroes,
        };
        if !self.valid(at, len) {
            return Recorded::NOT;
        }
        let g = self.lock_blocks(at, len);
        self.push(g, op, at, len, None, None)
    }

    /// Records a flush (an order mark; it locks nothing).
    pub fn flush(&self) -> Recorded<'_> {
        self.push(None, JournalOp::Flush, Sector(0), Sectors(0), None, None)
    }

    fn valid(&self, at: Sector, len: Sectors) -> bool {
        dovetail_layout::check_range(at, len, self.capacity).is_ok()
    }

    fn lock_blocks(&self, at: Sector, len: Sectors) -> Option<StripeGuard<'_>> {
        if len.0 == 0 {
            return None;
        }
        let start = at.0.saturating_mul(SECTOR_SIZE);
        let end = start.saturating_add(len.0.saturating_mul(SECTOR_SIZE));
        Some(
            self.stripes
                .lock(start / MAP_BLOCK, (end - 1) / MAP_BLOCK, Mode::Exclusive),
        )
    }

    fn push<'a>(
        &'a self,
        g: Option<StripeGuard<'a>>,
        op: JournalOp,
        at: Sector,
        len: Sectors,
        hash: Option<u128>,
        data: Option<Arc<[u8]>>,
    ) -> Recorded<'a> {
        let n = data.as_ref().map_or(0, |d| d.len());
        let mut r = self.lock_ring();
        let seq = r.next_seq;
        r.next_seq += 1;
        while !r.entries.is_empty()
            && (r.entries.len() >= self.limits.requests || r.bytes + n > self.limits.bytes)
        {
            if let Some(old) = r.entries.pop_front() {
                r.bytes -= old.data.as_ref().map_or(0, |d| d.len());
                r.forgotten += 1;
            }
        }
        r.bytes += n;
        r.entries.push_back(JournalEntry {
            seq,
            op,
            sector: at.0,
            sectors: len.0,
            hash,
            data,
        });
        Recorded { _stripes: g, seq }
    }

    /// Holds the journal stripes of block `b` shared: no journaled request to it is in flight
    /// meanwhile (for reading both versions' views of it).
    pub(crate) fn hold_block(&self, b: u64) -> impl Drop + '_ {
        self.stripes.lock(b, b, Mode::Shared)
    }

    /// A copy of what the journal holds (the data is shared, not copied).
    pub fn snapshot(&self) -> JournalSnapshot {
        let r = self.lock_ring();
        JournalSnapshot {
            entries: r.entries.iter().cloned().collect(),
            forgotten: r.forgotten,
            limits: self.limits,
            bytes: r.bytes,
        }
    }

    /// Entries held and bytes of data held.
    pub fn usage(&self) -> (usize, usize) {
        let r = self.lock_ring();
        (r.entries.len(), r.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_order_and_forgets_the_oldest_by_count() {
        let j = Journal::new(
            JournalLimits {
                requests: 3,
                bytes: 1 << 20,
            },
            Sectors(1024),
        );
        for i in 0..5u64 {
            drop(j.write(Sector(i * 8), &[i as u8; 512]));
        }
        let s = j.snapshot();
        assert_eq!(s.forgotten, 2);
        let seqs: Vec<u64> = s.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![3, 4, 5]);
        assert_eq!(s.entries[0].sector, 16);
        assert_eq!(s.entries[0].data.as_deref(), Some(&[2u8; 512][..]));
        assert_eq!(s.entries[0].hash, Some(xxh3_128(&[2u8; 512])));
        assert_eq!(s.bytes, 3 * 512);
    }

    #[test]
    fn forgets_the_oldest_by_bytes_and_keeps_an_oversized_write_alone() {
        let j = Journal::new(
            JournalLimits {
                requests: 100,
                bytes: 4096,
            },
            Sectors(1024),
        );
        // Invalid requests are not journaled.
        assert_eq!(j.write(Sector(1020), &[0; 4096]).seq, 0);
        assert_eq!(j.write(Sector(0), &[0; 100]).seq, 0);
        drop(j.write(Sector(0), &[1; 2048]));
        drop(j.zeroes(Sector(0), Sectors(8), false, true));
        drop(j.write(Sector(8), &[2; 2048]));
        drop(j.write(Sector(16), &[3; 1024]));
        let s = j.snapshot();
        // The first write went to make room for the third (2048 + 2048 + 1024 > 4096).
        assert_eq!(s.forgotten, 1);
        assert_eq!(s.bytes, 3072);
        assert_eq!(s.entries[0].op, JournalOp::Discard);
        drop(j.write(Sector(0), &[4; 8192]));
        let s = j.snapshot();
        assert_eq!(s.entries.len(), 1);
        assert_eq!(s.entries[0].seq, 5);
        assert_eq!(s.bytes, 8192);
        assert_eq!(s.forgotten, 4);
    }

    #[test]
    fn an_entry_costs_no_more_than_the_stated_overhead() {
        // The entry in the ring plus the shared data's allocation header (two counters).
        let per_entry = std::mem::size_of::<JournalEntry>() + 2 * std::mem::size_of::<usize>();
        assert!(per_entry <= ENTRY_OVERHEAD, "{per_entry} bytes");
    }

    #[test]
    fn overlapping_requests_wait_for_the_one_in_flight() {
        let j = Arc::new(Journal::new(JournalLimits::default(), Sectors(1024)));
        let first = j.write(Sector(0), &[1; 4096]);
        let j2 = j.clone();
        let t = std::thread::spawn(move || j2.write(Sector(4), &[2; 512]).seq);
        std::thread::sleep(std::time::Duration::from_millis(50));
        // The second write to block 0 is not numbered while the first holds it.
        assert_eq!(j.usage().0, 1);
        drop(first);
        assert_eq!(t.join().ok(), Some(2));
    }
}
