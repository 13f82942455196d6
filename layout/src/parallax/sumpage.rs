//! parallax-v2 checksum pages and the in-memory checksum table: a crc32c of every guest data
//! block, one atomic per block (so a write updates its entry without a lock), stored as
//! checksum pages in tree blocks after the annotation pages. Byte-by-byte format:
//! docs/format.md ("Checksum page"). How a version reads, verifies and commits them is
//! [`super::sums`].

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use super::codec::BLOCK_SIZE;

/// Magic of a checksum page.
pub const SUMS_MAGIC: [u8; 4] = *b"DVSM";
/// Format version of a checksum page.
pub const SUMS_VERSION: u16 = 1;
/// Bytes of a checksum page's header.
const HEADER: usize = 16;
/// Checksums per page.
pub const PER_PAGE: u64 = ((BLOCK_SIZE - HEADER) / 4) as u64;

/// Checksum pages of a disk of `guest_blocks` blocks.
pub fn pages_for(guest_blocks: u64) -> u64 {
    guest_blocks.div_ceil(PER_PAGE)
}

/// The checksum stored for a block's 4096 bytes.
#[inline]
pub fn block_sum(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Encodes page `page` holding `sums`.
pub fn encode_page(page: u64, sums: &[u32], out: &mut [u8]) {
    out.fill(0);
    out[..4].copy_from_slice(&SUMS_MAGIC);
    out[4..6].copy_from_slice(&SUMS_VERSION.to_le_bytes());
    out[8..12].copy_from_slice(&(page as u32).to_le_bytes());
    for (chunk, s) in out[HEADER..].chunks_exact_mut(4).zip(sums) {
        chunk.copy_from_slice(&s.to_le_bytes());
    }
    let crc = crc32c::crc32c(out);
    out[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// Whether `buf` is an intact checksum page (magic, version, checksum): how a replicated copy
/// is judged.
pub fn page_is_valid(buf: &[u8]) -> bool {
    buf.len() == BLOCK_SIZE
        && buf[..4] == SUMS_MAGIC
        && u16::from_le_bytes([buf[4], buf[5]]) == SUMS_VERSION
        && stored_crc_ok(buf)
}

fn stored_crc_ok(buf: &[u8]) -> bool {
    let stored = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
    let mut copy = [0u8; BLOCK_SIZE];
    copy.copy_from_slice(buf);
    copy[12..16].fill(0);
    crc32c::crc32c(&copy) == stored
}

/// Decodes page `page` of a disk of `guest_blocks` blocks into `out` (its checksums, block
/// `PER_PAGE · page + i` at `i`). Every failure says what is wrong.
pub fn decode_page(
    buf: &[u8],
    page: u64,
    guest_blocks: u64,
    out: &mut [u32],
) -> std::result::Result<(), String> {
    if buf.len() != BLOCK_SIZE {
        return Err("a checksum page is 4 KiB".to_string());
    }
    if buf[..4] != SUMS_MAGIC {
        return Err("bad magic".to_string());
    }
    let version = u16::from_le_bytes([buf[4], buf[5]]);
    if version != SUMS_VERSION {
        return Err(format!(
            "format version {version} is not supported (this binary reads {SUMS_VERSION})"
        ));
    }
    if !stored_crc_ok(buf) {
        return Err("checksum mismatch".to_string());
    }
    if buf[6..8] != [0, 0] {
        return Err("reserved bytes not zero".to_string());
    }
    let at = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if u64::from(at) != page {
        return Err(format!("page index {at} where {page} was expected"));
    }
    let first = page * PER_PAGE;
    for (i, chunk) in buf[HEADER..].chunks_exact(4).enumerate() {
        let s = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        if first + i as u64 >= guest_blocks {
            if s != 0 {
                return Err(format!(
                    "entry {i} is past the end of the disk but not zero"
                ));
            }
        } else if let Some(o) = out.get_mut(i) {
            *o = s;
        }
    }
    Ok(())
}

/// The live tree's checksums, in memory: updated by every data write with one atomic store,
/// written as pages (only the changed ones) before every commit.
#[derive(Debug)]
pub struct Sums {
    sums: Vec<AtomicU32>,
    dirty: Vec<AtomicBool>,
}

impl Sums {
    /// All zero (no checksum) for `blocks` guest blocks.
    pub fn new(blocks: u64) -> Sums {
        Sums {
            sums: (0..blocks).map(|_| AtomicU32::new(0)).collect(),
            dirty: (0..pages_for(blocks))
                .map(|_| AtomicBool::new(false))
                .collect(),
        }
    }

    pub fn blocks(&self) -> u64 {
        self.sums.len() as u64
    }

    pub fn pages(&self) -> u64 {
        self.dirty.len() as u64
    }

    /// The checksum of block `b` (0: none).
    #[inline]
    pub fn get(&self, b: u64) -> u32 {
        self.sums
            .get(b as usize)
            .map_or(0, |s| s.load(Ordering::Relaxed))
    }

    /// Puts back block `b`'s committed checksum `sum` (read from the tree), without marking
    /// its page changed.
    pub fn restore(&self, b: u64, sum: u32) {
        if let Some(s) = self.sums.get(b as usize) {
            s.store(sum, Ordering::Relaxed);
        }
    }

    /// Sets block `b`'s checksum and marks its page for the next commit.
    #[inline]
    pub fn set(&self, b: u64, sum: u32) {
        if let Some(s) = self.sums.get(b as usize) {
            if s.swap(sum, Ordering::Relaxed) != sum {
                self.mark_dirty(b / PER_PAGE);
            }
        }
    }

    pub fn mark_dirty(&self, page: u64) {
        if let Some(d) = self.dirty.get(page as usize) {
            d.store(true, Ordering::Release);
        }
    }

    /// Clears page `page`'s mark; whether it was set (see `Table::take_dirty_page`).
    pub fn take_dirty_page(&self, page: u64) -> bool {
        self.dirty
            .get(page as usize)
            .is_some_and(|d| d.swap(false, Ordering::AcqRel))
    }

    /// The dirty pages, clearing their marks.
    pub fn take_dirty(&self) -> Vec<u64> {
        self.dirty
            .iter()
            .enumerate()
            .filter(|(_, d)| d.swap(false, Ordering::AcqRel))
            .map(|(p, _)| p as u64)
            .collect()
    }

    /// Encodes page `page` into `out`.
    pub fn encode(&self, page: u64, out: &mut [u8]) {
        let lo = (page * PER_PAGE) as usize;
        let hi = (lo + PER_PAGE as usize).min(self.sums.len());
        let list: Vec<u32> = self.sums[lo.min(hi)..hi]
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect();
        encode_page(page, &list, out);
    }

    /// Loads page `page` from its stored bytes.
    #[cfg(test)]
    pub fn load(&self, page: u64, buf: &[u8]) -> std::result::Result<(), String> {
        let mut list = vec![0u32; PER_PAGE as usize];
        decode_page(buf, page, self.blocks(), &mut list)?;
        let lo = page * PER_PAGE;
        for (i, s) in list.into_iter().enumerate() {
            if let Some(slot) = self.sums.get((lo + i as u64) as usize) {
                slot.store(s, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_round_trip_and_reject_damage() {
        assert_eq!(PER_PAGE, 1020);
        let s = Sums::new(1500);
        s.set(3, 0xdead_beef);
        s.set(1499, 7);
        assert_eq!(s.take_dirty(), vec![0, 1]);
        let mut buf = vec![0u8; BLOCK_SIZE];
        s.encode(1, &mut buf);
        assert!(page_is_valid(&buf));
        let t = Sums::new(1500);
        t.load(1, &buf).expect("valid page");
        assert_eq!(t.get(1499), 7);
        assert!(t.load(0, &buf).is_err(), "wrong page index");
        for i in [0, 4, 9, 12, 16, 4095] {
            let mut b = buf.clone();
            b[i] ^= 1;
            assert!(t.load(1, &b).is_err(), "flip at byte {i}");
            assert!(!page_is_valid(&b), "flip at byte {i}");
        }
        assert!(t.load(0, &vec![0u8; BLOCK_SIZE]).is_err(), "zeros");
        // An entry past the disk's end must be zero.
        let mut long = vec![0u32; PER_PAGE as usize];
        long[PER_PAGE as usize - 1] = 1;
        encode_page(1, &long, &mut buf);
        assert!(t.load(1, &buf).is_err());
    }
}
