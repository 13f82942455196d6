//! Per-block metadata kept by the `parallax-v2` layout: read/write counts, last access, access
//! pattern and taint labels, with queries over them and a heat picture.
//!
//! # What is kept
//!
//! For every 4 KiB block of a disk version, an [`Annotation`] of 16 bytes:
//!
//! - `reads`, `writes`: how many guest requests touched the block (a request touching several
//!   blocks counts once in each), saturating at `u32::MAX`;
//! - `last_read`, `last_write`: the [`Epochs`] epoch of the last read / write, 0 = never. An
//!   epoch is a coarse time slot (`secs` seconds from `base`, both chosen and kept by the layout);
//!   the fields never go backwards;
//! - `pattern`: two 4-bit counters, sequential hits (high nibble) and random hits (low nibble);
//! - `taint`: a bitset of up to [`MAX_LABELS`] labels. The layout names the labels; the table only
//!   knows the *active* bits ([`Table::set_active_taint`]) that every write ORs into the blocks it
//!   touches, so "everything written while label L was active" can be found later
//!   ([`Table::ranges_with`]). Labels are removed with [`Table::clear_taint`].
//!
//! A [`Table`] holds the annotations of one disk version in memory, 16 bytes per block, and is
//! updated lock-free from every I/O thread ([`Table::record_read`], [`Table::record_write`]):
//! per block one atomic add on the counter and one compare-and-swap on the packed rest, plus a
//! few atomics per request (the recent-request ring, the page's dirty bit) and no clock reading:
//! the current epoch comes from a coarse clock that a background thread (`dovetail-annot-clock`,
//! one per process while any table lives) refreshes every 100 ms. It tracks which pages changed
//! ([`Table::take_dirty`]) so the layout can persist only those.
//!
//! # Classification rule
//!
//! A request (read or write, of `len > 0` bytes at byte `start`) is *sequential* when `start`
//! equals the end byte (`start + len`) of one of the last [`RECENT_REQUESTS`] (8) requests of any
//! kind, from any thread. Then every block it touches gets a sequential hit. Otherwise its first
//! block gets a random hit and each following block a sequential hit (a long request is
//! sequential inside). A hit increments its nibble; a nibble saturates at 15: a hit on a nibble at
//! 15 first halves both nibbles (rounding down), so the counts follow recent behaviour
//! ([`pattern_hit`]). A block's class ([`Annotation::class`]) is [`Pattern::Sequential`] if its
//! sequential nibble is larger, [`Pattern::Random`] if its random nibble is, [`Pattern::Unknown`]
//! if they are equal (including never touched).
//!
//! Example: 64 KiB reads one after another across 1 MiB leave every block with `reads = 1` and
//! class Sequential, except block 0 (the first request's first block): Random.
//!
//! # Page format (version 1)
//!
//! The annotations are persisted in pages of [`PAGE_BYTES`] (4096) bytes, page `p` holding the
//! records of blocks `255·p .. 255·p + 254`; a disk of `B` blocks has `ceil(B / 255)` pages
//! ([`Table::pages_for`]). All integers are little-endian.
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic, ASCII `DTAN` |
//! | 4 | 2 | format version, u16 = 1 |
//! | 6 | 2 | reserved, zero |
//! | 8 | 4 | page index `p`, u32 |
//! | 12 | 4 | crc32c (CRC-32C, Castagnoli) of the whole 4096-byte page with these 4 bytes zero |
//! | 16 + 16·i | 16 | record `i` (`0 ≤ i < 255`): block `255·p + i` |
//!
//! Record (16 bytes, [`Annotation::encode`]):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | reads, u32 |
//! | 4 | 4 | writes, u32 |
//! | 8 | 2 | last_read epoch, u16 (0 = never) |
//! | 10 | 2 | last_write epoch, u16 (0 = never) |
//! | 12 | 1 | pattern: high nibble sequential hits, low nibble random hits |
//! | 13 | 1 | reserved, zero |
//! | 14 | 2 | taint label bits, u16 |
//!
//! Records of blocks past the disk's end (in the last page) are all zero. A page of 4096 zero
//! bytes is valid and means "never written": all records zero. [`Table::load_page`] checks, in
//! this order: all-zero, magic, version ([`AnnotationError::UnsupportedVersion`]), checksum,
//! reserved header bytes, page index, then each record's reserved byte, zero records past the end
//! and taint bits within the caller's known labels; anything wrong is
//! [`AnnotationError::Corrupt`] naming the page (and record), and leaves the table unchanged.
//!
//! # Crash and lag contract
//!
//! This crate only keeps memory and encodes/decodes pages; where pages live, when they are
//! written (at FLUSH, on a timer) and what survives a crash is the layout's contract
//! (`parallax-v2`, see docs/format.md). Annotations are statistics: after a crash the layout may
//! lose the updates since the last persisted page, never the guest's data. Queries read the
//! atomics without a global lock: each block is read at some instant while updates continue.

mod annotation;
mod clock;
mod epochs;
mod heatmap;
mod table;

pub use annotation::{pattern_hit, Annotation, Pattern};
pub use epochs::Epochs;
pub use heatmap::{heat_colour, render_heatmap_png, MAX_HEATMAP_PIXELS};
pub use table::{page_is_valid, Region, Table};

/// Bytes of one encoded [`Annotation`].
pub const RECORD_BYTES: usize = 16;
/// Bytes of one annotation page.
pub const PAGE_BYTES: usize = 4096;
/// Bytes of a page's header.
pub const PAGE_HEADER: usize = 16;
/// Records in one page: `(4096 - 16) / 16`.
pub const RECORDS_PER_PAGE: u64 = 255;
/// Taint labels: the bits of a u16.
pub const MAX_LABELS: usize = 16;
/// The page format version this crate writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// The magic at the start of a (non-zero) page.
pub const PAGE_MAGIC: &[u8; 4] = b"DTAN";
/// Bytes per disk block.
pub const BLOCK_BYTES: u64 = 4096;
/// How many recent request ends a request's start is compared with to call it sequential.
pub const RECENT_REQUESTS: usize = 8;

const _: () = assert!(PAGE_HEADER + RECORDS_PER_PAGE as usize * RECORD_BYTES == PAGE_BYTES);

/// Errors of decoding and loading annotation pages.
#[derive(Debug, thiserror::Error)]
pub enum AnnotationError {
    /// A page or record is damaged; the message says which page (and record) and what is wrong.
    #[error("corrupt annotations: {0}")]
    Corrupt(String),
    /// A page written by another format version.
    #[error("annotation page {page}: format version {version} is not supported (this binary reads version {FORMAT_VERSION})")]
    UnsupportedVersion {
        /// The page index it was loaded as.
        page: u64,
        /// The version in its header.
        version: u16,
    },
    /// `load_page` of a page index the disk does not have.
    #[error("annotation page {page} out of range (the disk has {pages} pages)")]
    PageOutOfRange {
        /// The page asked for.
        page: u64,
        /// Pages of the disk.
        pages: u64,
    },
}
