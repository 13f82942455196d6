//! The in-memory annotation table of one disk version, its page codec and its queries.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::annotation::{classify, pattern_hit};
use crate::clock;
use crate::{
    Annotation, AnnotationError, Epochs, Pattern, BLOCK_BYTES, FORMAT_VERSION, PAGE_BYTES,
    PAGE_HEADER, PAGE_MAGIC, RECENT_REQUESTS, RECORDS_PER_PAGE, RECORD_BYTES,
};

// The packed `meta` word of a block: last_read, last_write, pattern, taint.
const LAST_READ_SHIFT: u32 = 0;
const LAST_WRITE_SHIFT: u32 = 16;
const PATTERN_SHIFT: u32 = 32;
const TAINT_SHIFT: u32 = 40;

/// Below this a counter can take a plain `fetch_add` without any risk of wrapping (it would take
/// this many concurrent incrementers racing past the check).
const COUNTER_FAST_LIMIT: u32 = u32::MAX - (1 << 20);

fn pack(last_read: u16, last_write: u16, pattern: u8, taint: u16) -> u64 {
    (u64::from(last_read) << LAST_READ_SHIFT)
        | (u64::from(last_write) << LAST_WRITE_SHIFT)
        | (u64::from(pattern) << PATTERN_SHIFT)
        | (u64::from(taint) << TAINT_SHIFT)
}

fn last_read_of(meta: u64) -> u16 {
    (meta >> LAST_READ_SHIFT) as u16
}

fn last_write_of(meta: u64) -> u16 {
    (meta >> LAST_WRITE_SHIFT) as u16
}

fn pattern_of(meta: u64) -> u8 {
    (meta >> PATTERN_SHIFT) as u8
}

fn taint_of(meta: u64) -> u16 {
    (meta >> TAINT_SHIFT) as u16
}

/// One block: 16 bytes, one cache line holds four blocks.
#[derive(Default)]
struct Slot {
    reads: AtomicU32,
    writes: AtomicU32,
    /// `pack(last_read, last_write, pattern, taint)`.
    meta: AtomicU64,
}

/// Increments `c` by one, saturating at `u32::MAX`.
fn saturating_inc(c: &AtomicU32) {
    let mut v = c.load(Ordering::Relaxed);
    if v < COUNTER_FAST_LIMIT {
        c.fetch_add(1, Ordering::SeqCst);
        return;
    }
    while v != u32::MAX {
        match c.compare_exchange_weak(v, v + 1, Ordering::SeqCst, Ordering::Relaxed) {
            Ok(_) => return,
            Err(now) => v = now,
        }
    }
}

/// Applies `f` to `meta` atomically (a CAS loop); no store if `f` changes nothing.
fn update_meta(meta: &AtomicU64, f: impl Fn(u64) -> u64) -> u64 {
    let mut old = meta.load(Ordering::Relaxed);
    loop {
        let new = f(old);
        if new == old {
            return old;
        }
        match meta.compare_exchange_weak(old, new, Ordering::SeqCst, Ordering::Relaxed) {
            Ok(_) => return old,
            Err(now) => old = now,
        }
    }
}

/// The end bytes of the last `RECENT_REQUESTS` requests, on a cache line of their own.
#[repr(align(64))]
#[derive(Default)]
struct Recent {
    ends: [AtomicU64; RECENT_REQUESTS],
    next: AtomicUsize,
}

impl Recent {
    fn contains(&self, byte: u64) -> bool {
        self.ends.iter().any(|e| e.load(Ordering::Relaxed) == byte)
    }

    /// Records `end`; returns the request's sequence number.
    fn push(&self, end: u64) -> usize {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        self.ends[seq % RECENT_REQUESTS].store(end, Ordering::Relaxed);
        seq
    }
}

/// Totals over a run of blocks (see [`Table::top`], [`Table::histogram`], [`Table::totals`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Region {
    /// First block of the region.
    pub first_block: u64,
    /// Number of blocks in the region.
    pub blocks: u64,
    /// Sum of the blocks' reads.
    pub reads: u64,
    /// Sum of the blocks' writes.
    pub writes: u64,
    /// `reads + writes`.
    pub heat: u64,
    /// Blocks with heat > 0.
    pub touched_blocks: u64,
    /// Blocks whose class is [`Pattern::Sequential`].
    pub sequential_blocks: u64,
    /// Blocks whose class is [`Pattern::Random`].
    pub random_blocks: u64,
    /// OR of the blocks' taint labels.
    pub taint: u16,
    /// Largest `last_read` of the blocks (0 = none was read).
    pub last_read: u16,
    /// Largest `last_write` of the blocks (0 = none was written).
    pub last_write: u16,
}

/// The in-memory annotations of a disk of `blocks` 4 KiB blocks.
///
/// Every method takes `&self`: updates are lock-free (atomic read-modify-writes on the block's
/// 16 bytes), queries read the atomics without a global lock, so a query running alongside
/// updates sees each block at some moment but not the whole disk at one instant.
pub struct Table {
    blocks: u64,
    epochs: Epochs,
    slots: Box<[Slot]>,
    /// One bit per page.
    dirty: Box<[AtomicU64]>,
    recent: Recent,
    active_taint: AtomicU16,
    /// Keeps the coarse clock ticking while the table lives.
    _clock: clock::Registration,
}

impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table")
            .field("blocks", &self.blocks)
            .field("pages", &self.pages())
            .field("dirty_pages", &self.dirty_pages())
            .field("epochs", &self.epochs)
            .field(
                "active_taint",
                &format_args!("{:#06x}", self.active_taint()),
            )
            .finish()
    }
}

impl Table {
    /// A table of `blocks` all-zero annotations (nothing dirty).
    ///
    /// # Panics
    /// If `blocks` does not fit the address space.
    pub fn new(blocks: u64, epochs: Epochs) -> Table {
        let n = usize::try_from(blocks).expect("annotation table larger than the address space");
        let pages = Self::pages_for(blocks);
        let words = usize::try_from(pages.div_ceil(64)).expect("page count fits usize");
        Table {
            blocks,
            epochs,
            slots: (0..n).map(|_| Slot::default()).collect(),
            dirty: (0..words).map(|_| AtomicU64::new(0)).collect(),
            recent: Recent::default(),
            active_taint: AtomicU16::new(0),
            _clock: clock::Registration::new(),
        }
    }

    /// Number of 4 KiB blocks of the disk.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The epochs `last_read` / `last_write` are counted in.
    pub fn epochs(&self) -> Epochs {
        self.epochs
    }

    /// Number of annotation pages: `pages_for(blocks)`.
    pub fn pages(&self) -> u64 {
        Self::pages_for(self.blocks)
    }

    /// Annotation pages needed for `blocks` blocks: `ceil(blocks / 255)`.
    pub fn pages_for(blocks: u64) -> u64 {
        blocks.div_ceil(RECORDS_PER_PAGE)
    }

    /// The page holding block `block`'s record (`block / 255`).
    pub fn page_of(block: u64) -> u64 {
        block / RECORDS_PER_PAGE
    }

    /// The blocks whose records page `page` holds: `[page·255, page·255 + 255)`, cut at the
    /// disk's end.
    pub fn page_blocks(&self, page: u64) -> std::ops::Range<u64> {
        let first = page.saturating_mul(RECORDS_PER_PAGE).min(self.blocks);
        first..first.saturating_add(RECORDS_PER_PAGE).min(self.blocks)
    }

    /// A guest read of `len` bytes at byte `start`, at the current epoch (see the crate docs for
    /// what is counted). `len == 0` does nothing; blocks past the end are ignored.
    ///
    /// The current epoch comes from a coarse clock refreshed every 100 ms, not from a clock
    /// reading per request.
    pub fn record_read(&self, start: u64, len: u64) {
        if len != 0 {
            self.record(start, len, false, self.current_epoch());
        }
    }

    /// A guest write of `len` bytes at byte `start`, at the current epoch: like
    /// [`Table::record_read`], counting writes, and every block touched gets
    /// `taint |= active_taint()`.
    pub fn record_write(&self, start: u64, len: u64) {
        if len != 0 {
            self.record(start, len, true, self.current_epoch());
        }
    }

    /// [`Table::record_read`] at a given epoch (for callers with their own clock, and tests).
    pub fn record_read_at(&self, start: u64, len: u64, epoch: u16) {
        if len != 0 {
            self.record(start, len, false, epoch);
        }
    }

    /// [`Table::record_write`] at a given epoch.
    pub fn record_write_at(&self, start: u64, len: u64, epoch: u16) {
        if len != 0 {
            self.record(start, len, true, epoch);
        }
    }

    /// The epoch of the coarse clock (what `record_read` / `record_write` stamp).
    pub fn current_epoch(&self) -> u16 {
        self.epochs.at(clock::coarse_secs())
    }

    fn record(&self, start: u64, len: u64, write: bool, epoch: u16) {
        let end = start.saturating_add(len);
        // No request ends at byte 0, so an empty ring slot (0) never matches a start.
        let sequential = start != 0 && self.recent.contains(start);
        if self.recent.push(end) % clock::FALLBACK_EVERY == 0 {
            clock::refresh();
        }
        let first = start / BLOCK_BYTES;
        if first >= self.blocks {
            return;
        }
        let last = ((end - 1) / BLOCK_BYTES).min(self.blocks - 1);
        let taint = if write { self.active_taint() } else { 0 };
        let (shift, taint_bits) = if write {
            (LAST_WRITE_SHIFT, u64::from(taint) << TAINT_SHIFT)
        } else {
            (LAST_READ_SHIFT, 0)
        };
        let Some(slots) = self.slots.get(first as usize..=last as usize) else {
            return;
        };
        for (i, slot) in slots.iter().enumerate() {
            saturating_inc(if write { &slot.writes } else { &slot.reads });
            let seq = sequential || i != 0;
            update_meta(&slot.meta, |m| {
                let old_epoch = (m >> shift) as u16;
                let pattern = pattern_hit(pattern_of(m), seq);
                let mut n = m & !(0xffffu64 << shift) & !(0xffu64 << PATTERN_SHIFT);
                n |= u64::from(old_epoch.max(epoch)) << shift;
                n |= u64::from(pattern) << PATTERN_SHIFT;
                n | taint_bits
            });
        }
        for page in Self::page_of(first)..=Self::page_of(last) {
            self.dirty_page(page);
        }
    }

    /// Sets `page`'s dirty bit. The check before the RMW keeps a hot page's word from being
    /// written on every request; SeqCst on both sides (here and in `take_dirty`) makes sure a
    /// block update that saw the bit still set is visible to whoever cleared it.
    fn dirty_page(&self, page: u64) {
        if let Some(word) = self.dirty.get((page / 64) as usize) {
            let bit = 1u64 << (page % 64);
            if word.load(Ordering::SeqCst) & bit == 0 {
                word.fetch_or(bit, Ordering::SeqCst);
            }
        }
    }

    /// Sets the taint label bits that writes add to the blocks they touch from now on.
    pub fn set_active_taint(&self, bits: u16) {
        self.active_taint.store(bits, Ordering::SeqCst);
    }

    /// The taint label bits writes currently add.
    pub fn active_taint(&self) -> u16 {
        self.active_taint.load(Ordering::Relaxed)
    }

    /// Block `block`'s annotation (`Default` for a block past the end).
    pub fn get(&self, block: u64) -> Annotation {
        let Some(slot) = self.slot(block) else {
            return Annotation::default();
        };
        let meta = slot.meta.load(Ordering::SeqCst);
        Annotation {
            reads: slot.reads.load(Ordering::SeqCst),
            writes: slot.writes.load(Ordering::SeqCst),
            last_read: last_read_of(meta),
            last_write: last_write_of(meta),
            pattern: pattern_of(meta),
            taint: taint_of(meta),
        }
    }

    /// Replaces block `block`'s annotation and marks its page dirty (ignored past the end).
    pub fn set(&self, block: u64, a: Annotation) {
        if self.store(block, &a) {
            self.dirty_page(Self::page_of(block));
        }
    }

    fn slot(&self, block: u64) -> Option<&Slot> {
        if block < self.blocks {
            self.slots.get(block as usize)
        } else {
            None
        }
    }

    /// Stores `a` into the block without touching the dirty bits; false past the end.
    fn store(&self, block: u64, a: &Annotation) -> bool {
        let Some(slot) = self.slot(block) else {
            return false;
        };
        slot.reads.store(a.reads, Ordering::SeqCst);
        slot.writes.store(a.writes, Ordering::SeqCst);
        slot.meta.store(
            pack(a.last_read, a.last_write, a.pattern, a.taint),
            Ordering::SeqCst,
        );
        true
    }

    /// The indexes of the pages dirtied since the last call, ascending, clearing their dirty
    /// bits. An update racing with this call leaves its page dirty again (for the next call) or
    /// is visible to an `encode_page` made after this call returns.
    pub fn take_dirty(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        for (w, word) in self.dirty.iter().enumerate() {
            if word.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = word.swap(0, Ordering::SeqCst);
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                pages.push(w as u64 * 64 + b);
            }
        }
        pages
    }

    /// Marks page `page` dirty again (e.g. to retry a page whose persist failed); ignored past
    /// the last page.
    pub fn mark_dirty(&self, page: u64) {
        if page < self.pages() {
            self.dirty_page(page);
        }
    }

    /// Clears page `page`'s dirty bit; whether it was set. For a writer that writes some pages
    /// ahead of a commit (a grown disk's pages, in batches): the page is encoded after this
    /// call, so an update racing with it leaves the page dirty again or is in the encoding.
    pub fn take_dirty_page(&self, page: u64) -> bool {
        let Some(word) = self.dirty.get((page / 64) as usize) else {
            return false;
        };
        let bit = 1u64 << (page % 64);
        word.load(Ordering::SeqCst) & bit != 0 && word.fetch_and(!bit, Ordering::SeqCst) & bit != 0
    }

    /// Number of pages currently dirty.
    pub fn dirty_pages(&self) -> u64 {
        self.dirty
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Encodes page `page` into `out` (the on-disk format, see the crate docs).
    ///
    /// # Panics
    /// If `out.len() != PAGE_BYTES` or `page >= self.pages()` (callers pass pages from
    /// [`Table::take_dirty`] into a page buffer).
    pub fn encode_page(&self, page: u64, out: &mut [u8]) {
        assert_eq!(out.len(), PAGE_BYTES, "annotation page buffer size");
        assert!(
            page < self.pages(),
            "annotation page {page} out of range (the disk has {} pages)",
            self.pages()
        );
        let index = u32::try_from(page).expect("annotation page index fits u32");
        out.fill(0);
        out[0..4].copy_from_slice(PAGE_MAGIC);
        out[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[8..12].copy_from_slice(&index.to_le_bytes());
        for (i, block) in self.page_blocks(page).enumerate() {
            let at = PAGE_HEADER + i * RECORD_BYTES;
            self.get(block).encode(&mut out[at..at + RECORD_BYTES]);
        }
        let crc = crc32c::crc32c(out);
        out[12..16].copy_from_slice(&crc.to_le_bytes());
    }

    /// Loads page `page` as read from disk into the table, without marking it dirty.
    ///
    /// An all-zero page (never written) loads as all-zero records. Any other page must carry
    /// the magic, format version 1, zero reserved fields, its own page index and a matching
    /// checksum; every record must have a zero reserved byte, records past the disk's end must
    /// be zero and taint bits must lie within `label_mask`. Otherwise the error says which page
    /// (and record) is wrong and how, and the table is left unchanged.
    pub fn load_page(&self, page: u64, buf: &[u8], label_mask: u16) -> Result<(), AnnotationError> {
        let records = self.check_page(page, buf, label_mask)?;
        for (block, a) in self.page_blocks(page).zip(records.iter()) {
            self.store(block, a);
        }
        Ok(())
    }

    /// Validates page `page` and returns its decoded records (only the disk's blocks).
    fn check_page(
        &self,
        page: u64,
        buf: &[u8],
        label_mask: u16,
    ) -> Result<Vec<Annotation>, AnnotationError> {
        let pages = self.pages();
        if page >= pages {
            return Err(AnnotationError::PageOutOfRange { page, pages });
        }
        let corrupt =
            |what: String| AnnotationError::Corrupt(format!("annotation page {page}: {what}"));
        if buf.len() != PAGE_BYTES {
            return Err(corrupt(format!(
                "{} bytes long, expected {PAGE_BYTES}",
                buf.len()
            )));
        }
        let blocks = self.page_blocks(page);
        let n = (blocks.end - blocks.start) as usize;
        if buf.iter().all(|&b| b == 0) {
            return Ok(vec![Annotation::default(); n]);
        }
        if &buf[0..4] != PAGE_MAGIC {
            return Err(corrupt(format!(
                "bad magic {:02x?} (expected \"DTAN\")",
                &buf[0..4]
            )));
        }
        let version = u16::from_le_bytes([buf[4], buf[5]]);
        if version != FORMAT_VERSION {
            return Err(AnnotationError::UnsupportedVersion { page, version });
        }
        let stored = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
        let mut hasher_input = [0u8; PAGE_HEADER];
        hasher_input.copy_from_slice(&buf[..PAGE_HEADER]);
        hasher_input[12..16].fill(0);
        let computed = crc32c::crc32c_append(crc32c::crc32c(&hasher_input), &buf[PAGE_HEADER..]);
        if stored != computed {
            return Err(corrupt(format!(
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            )));
        }
        let reserved = u16::from_le_bytes([buf[6], buf[7]]);
        if reserved != 0 {
            return Err(corrupt(format!(
                "reserved header bytes 6..8 are {reserved:#06x}, must be 0"
            )));
        }
        let index = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
        if u64::from(index) != page {
            return Err(corrupt(format!(
                "holds the index of page {index} (misplaced or stale page)"
            )));
        }
        let mut out = Vec::with_capacity(n);
        for (i, rec) in buf[PAGE_HEADER..]
            .chunks_exact(RECORD_BYTES)
            .take(RECORDS_PER_PAGE as usize)
            .enumerate()
        {
            let block = blocks.start + i as u64;
            if i >= n {
                if rec.iter().any(|&b| b != 0) {
                    return Err(corrupt(format!(
                        "record {i} (block {block}) lies past the disk's end ({} blocks) but is not zero",
                        self.blocks
                    )));
                }
                continue;
            }
            let a = Annotation::decode(rec).map_err(|e| {
                corrupt(format!(
                    "record {i} (block {block}): {}",
                    match e {
                        AnnotationError::Corrupt(m) => m,
                        other => other.to_string(),
                    }
                ))
            })?;
            if a.taint & !label_mask != 0 {
                return Err(corrupt(format!(
                    "record {i} (block {block}) has taint bits {:#06x} outside the known labels {label_mask:#06x}",
                    a.taint
                )));
            }
            out.push(a);
        }
        Ok(out)
    }

    /// Clears the label bit(s) `bits` from every block, marking the pages it changes dirty
    /// (for deleting a label).
    pub fn clear_taint(&self, bits: u16) {
        if bits == 0 {
            return;
        }
        let mask = u64::from(bits) << TAINT_SHIFT;
        for (b, slot) in self.slots.iter().enumerate() {
            if slot.meta.load(Ordering::Relaxed) & mask != 0 {
                update_meta(&slot.meta, |m| m & !mask);
                self.dirty_page(Self::page_of(b as u64));
            }
        }
    }

    // ---- queries ----

    /// Totals over the blocks `[first, first + blocks)` (cut at the disk's end).
    pub fn region(&self, first: u64, blocks: u64) -> Region {
        let first = first.min(self.blocks);
        let end = first.saturating_add(blocks).min(self.blocks);
        let mut r = Region {
            first_block: first,
            blocks: end - first,
            ..Region::default()
        };
        for slot in &self.slots[first as usize..end as usize] {
            let reads = u64::from(slot.reads.load(Ordering::Relaxed));
            let writes = u64::from(slot.writes.load(Ordering::Relaxed));
            let meta = slot.meta.load(Ordering::Relaxed);
            r.reads += reads;
            r.writes += writes;
            if reads + writes > 0 {
                r.touched_blocks += 1;
            }
            match classify(pattern_of(meta)) {
                Pattern::Sequential => r.sequential_blocks += 1,
                Pattern::Random => r.random_blocks += 1,
                Pattern::Unknown => {}
            }
            r.taint |= taint_of(meta);
            r.last_read = r.last_read.max(last_read_of(meta));
            r.last_write = r.last_write.max(last_write_of(meta));
        }
        r.heat = r.reads + r.writes;
        r
    }

    fn heat_of(&self, first: u64, end: u64) -> u64 {
        self.slots[first as usize..end as usize]
            .iter()
            .map(|s| {
                u64::from(s.reads.load(Ordering::Relaxed))
                    + u64::from(s.writes.load(Ordering::Relaxed))
            })
            .sum()
    }

    /// The `n` hottest regions of `region_blocks` blocks (aligned: region `i` is blocks
    /// `[i·region_blocks, (i+1)·region_blocks)`, the last cut at the disk's end; 0 counts as 1),
    /// hottest first, ties broken by lower first block; regions with heat 0 are omitted.
    pub fn top(&self, n: usize, region_blocks: u64) -> Vec<Region> {
        let rb = region_blocks.max(1);
        if n == 0 {
            return Vec::new();
        }
        // Min-heap of the best `n` so far: the root is the worst (lowest heat, then highest
        // first block).
        let mut heap: BinaryHeap<Reverse<(u64, Reverse<u64>)>> = BinaryHeap::with_capacity(n + 1);
        let mut first = 0;
        while first < self.blocks {
            let end = first.saturating_add(rb).min(self.blocks);
            let heat = self.heat_of(first, end);
            if heat > 0 {
                let key = (heat, Reverse(first));
                let better =
                    heap.len() < n || heap.peek().is_some_and(|Reverse(worst)| key > *worst);
                if better {
                    heap.push(Reverse(key));
                    if heap.len() > n {
                        heap.pop();
                    }
                }
            }
            first = end;
        }
        let mut best: Vec<(u64, Reverse<u64>)> = heap.into_iter().map(|Reverse(k)| k).collect();
        best.sort_unstable_by(|a, b| b.cmp(a));
        best.into_iter()
            .map(|(_, Reverse(first))| self.region(first, rb))
            .collect()
    }

    /// The disk cut into `buckets` contiguous parts of `ceil(blocks / buckets)` blocks each
    /// (`buckets` clamped to `1..=blocks`), in order: part `i` starts at block
    /// `min(i·size, blocks)`. The parts at the end are shorter when `blocks` is not a multiple
    /// of the size, and may even be empty (10 blocks in 6 buckets: 2, 2, 2, 2, 2, 0), so the
    /// result always has exactly the clamped number of entries and every part stands for the
    /// same span of the disk. An empty disk gives an empty vector.
    pub fn histogram(&self, buckets: usize) -> Vec<Region> {
        if self.blocks == 0 {
            return Vec::new();
        }
        let buckets = (buckets.max(1) as u64).min(self.blocks);
        let size = self.blocks.div_ceil(buckets);
        (0..buckets)
            .map(|i| self.region(i.saturating_mul(size), size))
            .collect()
    }

    /// Maximal runs of consecutive blocks whose taint has any of `bits`, as `[first, end)`
    /// block ranges, ascending.
    pub fn ranges_with(&self, bits: u16) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if bits == 0 {
            return out;
        }
        let mask = u64::from(bits) << TAINT_SHIFT;
        let mut run: Option<u64> = None;
        for (b, slot) in self.slots.iter().enumerate() {
            let b = b as u64;
            let hit = slot.meta.load(Ordering::Relaxed) & mask != 0;
            match (hit, run) {
                (true, None) => run = Some(b),
                (false, Some(start)) => {
                    out.push((start, b));
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run {
            out.push((start, self.blocks));
        }
        out
    }

    /// Totals over the whole disk.
    pub fn totals(&self) -> Region {
        self.region(0, self.blocks)
    }
}

/// Whether `buf` is an intact annotation page (its magic, version and checksum; the records
/// are not interpreted): how a replicated copy is judged before it is trusted.
pub fn page_is_valid(buf: &[u8]) -> bool {
    if buf.len() != PAGE_BYTES || &buf[0..4] != PAGE_MAGIC {
        return false;
    }
    if u16::from_le_bytes([buf[4], buf[5]]) != FORMAT_VERSION {
        return false;
    }
    let stored = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
    let mut copy = buf.to_vec();
    copy[12..16].fill(0);
    crc32c::crc32c(&copy) == stored
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epochs() -> Epochs {
        Epochs { base: 0, secs: 60 }
    }

    #[test]
    fn meta_packing() {
        let m = pack(0x1234, 0xabcd, 0x5a, 0xf00f);
        assert_eq!(last_read_of(m), 0x1234);
        assert_eq!(last_write_of(m), 0xabcd);
        assert_eq!(pattern_of(m), 0x5a);
        assert_eq!(taint_of(m), 0xf00f);
        assert_eq!(m >> 56, 0);
    }

    #[test]
    fn slot_is_16_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 16);
    }

    #[test]
    fn counter_saturates() {
        let c = AtomicU32::new(u32::MAX - 2);
        for _ in 0..5 {
            saturating_inc(&c);
        }
        assert_eq!(c.load(Ordering::Relaxed), u32::MAX);
        let c = AtomicU32::new(COUNTER_FAST_LIMIT - 1);
        saturating_inc(&c);
        saturating_inc(&c);
        assert_eq!(c.load(Ordering::Relaxed), COUNTER_FAST_LIMIT + 1);
    }

    #[test]
    fn ring_forgets_after_eight() {
        let t = Table::new(1000, epochs());
        // A request at byte 4096 after one ending there: sequential.
        t.record_read_at(0, 4096, 1);
        for i in 0..8u64 {
            t.record_read_at(100 * 4096 + i * 8192, 4096, 1);
        }
        // The end 4096 has been pushed out by 8 later requests.
        t.record_read_at(4096, 4096, 1);
        assert_eq!(t.get(1).class(), Pattern::Random);
        t.record_read_at(0, 4096, 1);
        for i in 0..7u64 {
            t.record_read_at(200 * 4096 + i * 8192, 4096, 1);
        }
        t.record_read_at(4096, 4096, 1);
        assert_eq!((t.get(1).sequential_hits(), t.get(1).random_hits()), (1, 1));
    }
}
