//! The presence map: a persistent bitmap of which 4 KiB blocks of a disk a candidate version
//! holds (docs/format.md, "Presence map, format version 1"). The Tee inserts a block once the
//! candidate holds it; copy-out fills the rest (it looks for gaps with
//! [`PresenceMap::next_absent`]).
//!
//! The file is a 4096-byte header (magic `DVTLPMAP`, version, block size, block count, the
//! candidate's version key, the clean flag, a checksum; every field in the first 512 bytes)
//! followed by the bitmap: bit `i` of byte `j` is block `8j + i`, padded with zeros to a whole
//! number of 4096-byte pages.
//!
//! Crash safety comes from monotonicity: a bit only ever goes from absent to present during a
//! map's life. [`PresenceMap::persist`] therefore rewrites changed pages in place, without a
//! shadow copy: a page torn by a power cut holds, bit by bit, either the old or the new value,
//! and both are true statements about the candidate, provided the candidate's data was made
//! durable before the persist (the caller's duty). The clean flag records an orderly shutdown,
//! so that after any other stop the Tee knows the map may lack blocks written since the last
//! persist.
//!
//! Concurrency: `insert`/`contains` are lock-free (one `AtomicU64` per 64 blocks) and may run
//! on any number of threads; changed pages are tracked in an atomic bitmap, one bit per page;
//! `persist`, `mark_dirty` and `close_clean` are serialised by an internal mutex.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use log::{debug, info};

/// Bytes per tracked block.
pub const MAP_BLOCK: u64 = 4096;
/// The presence map format this module reads and writes.
pub const MAP_FORMAT_VERSION: u32 = 1;
/// Bytes 0..8 of every presence map file.
pub const MAP_MAGIC: &[u8; 8] = b"DVTLPMAP";
/// The most blocks a map tracks (a 256 TiB disk; an 8 GiB bitmap).
pub const MAX_MAP_BLOCKS: u64 = 1 << 36;

/// Bytes of the header at the start of the file.
const HEADER_SIZE: u64 = 4096;
/// Bytes of the header covered by its checksum (the crc32c is stored right after them).
const HEADER_USED: usize = 36;
/// The header bytes rewritten when the flags change: the first sector holds every field.
const HEADER_SECTOR: usize = 512;
/// Bytes per bitmap page: the unit `persist` writes.
const PAGE: u64 = 4096;
/// 64-bit words per bitmap page.
const WORDS_PER_PAGE: usize = (PAGE / 8) as usize;
/// Flags bit 0: the map was closed cleanly.
const FLAG_CLEAN: u32 = 1;
/// Pages written by one `pwrite` at most, when consecutive pages are dirty.
const MAX_RUN: usize = 256;

/// Errors of a presence map.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// An I/O error on the map file.
    #[error("{op} {} failed", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is not a valid presence map (bad magic, checksum, length, reserved bits...).
    #[error("presence map is corrupt: {0}")]
    Corrupt(String),
    /// A valid presence map, but of another version key or disk size than expected.
    #[error("presence map does not match: {0}")]
    Mismatch(String),
    /// A presence map of a format version this binary does not read.
    #[error("presence map {} is format version {found}; this binary reads version {supported}", path.display())]
    Version {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// A request that cannot be carried out as asked (a block count out of range).
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, PresenceError>;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PresenceError {
    let path = path.to_path_buf();
    move |source| PresenceError::Io { op, path, source }
}

/// Bitmap bytes in the file for `blocks` blocks: `ceil(blocks / 8)` rounded up to 4096.
fn bitmap_len(blocks: u64) -> u64 {
    blocks.div_ceil(8).div_ceil(PAGE) * PAGE
}

/// The header's 4096 bytes.
fn encode_header(blocks: u64, key: u64, flags: u32) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_SIZE as usize];
    b[0..8].copy_from_slice(MAP_MAGIC);
    b[8..12].copy_from_slice(&MAP_FORMAT_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(MAP_BLOCK as u32).to_le_bytes());
    b[16..24].copy_from_slice(&blocks.to_le_bytes());
    b[24..32].copy_from_slice(&key.to_le_bytes());
    b[32..36].copy_from_slice(&flags.to_le_bytes());
    let crc = crc32c::crc32c(&b[..HEADER_USED]);
    b[36..40].copy_from_slice(&crc.to_le_bytes());
    b
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The file and what its header says now.
#[derive(Debug)]
struct Disk {
    file: File,
    /// The clean flag as last written durably.
    clean: bool,
}

/// A presence map: which blocks of a disk a candidate version holds. `Send + Sync`; share it
/// by `Arc`.
pub struct PresenceMap {
    /// `None` for an in-memory map.
    path: Option<PathBuf>,
    blocks: u64,
    key: u64,
    /// Bit `b % 64` of word `b / 64` is block `b` (the file's bytes, little-endian).
    words: Vec<AtomicU64>,
    /// Bit `p % 64` of word `p / 64`: bitmap page `p` changed since the last persist.
    dirty: Vec<AtomicU64>,
    /// Blocks present.
    present: AtomicU64,
    was_clean: bool,
    /// The file (`None` in memory), locked by `persist`, `mark_dirty` and `close_clean`.
    disk: Mutex<Option<Disk>>,
}

impl fmt::Debug for PresenceMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PresenceMap")
            .field("path", &self.path)
            .field("blocks", &self.blocks)
            .field("key", &self.key)
            .field("present", &self.count())
            .field("was_clean", &self.was_clean)
            .finish_non_exhaustive()
    }
}

fn check_blocks(blocks: u64) -> Result<()> {
    if blocks > MAX_MAP_BLOCKS {
        return Err(PresenceError::Invalid(format!(
            "a presence map tracks at most {MAX_MAP_BLOCKS} blocks, not {blocks}"
        )));
    }
    Ok(())
}

/// Makes a directory entry change in `path`'s parent durable.
fn sync_parent(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing the directory of", path))
}

impl PresenceMap {
    fn with_words(
        path: Option<PathBuf>,
        blocks: u64,
        key: u64,
        words: Vec<AtomicU64>,
        was_clean: bool,
        disk: Option<Disk>,
    ) -> PresenceMap {
        let present = words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        let pages = words.len().div_ceil(WORDS_PER_PAGE);
        PresenceMap {
            path,
            blocks,
            key,
            words,
            dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            present: AtomicU64::new(present),
            was_clean,
            disk: Mutex::new(disk),
        }
    }

    fn zeroed(blocks: u64) -> Vec<AtomicU64> {
        (0..blocks.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect()
    }

    /// A new map file at `path` (which must not exist) for a disk of `blocks` blocks and
    /// candidate version `key`, all blocks absent, flagged clean; durable before returning.
    /// The file is built under `<path>.tmp` and linked into place, so a crash leaves either no
    /// map or a complete one.
    pub fn create(path: &Path, blocks: u64, key: u64) -> Result<PresenceMap> {
        check_blocks(blocks)?;
        if path.symlink_metadata().is_ok() {
            return Err(PresenceError::Io {
                op: "creating",
                path: path.to_path_buf(),
                source: io::Error::from(io::ErrorKind::AlreadyExists),
            });
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        match std::fs::remove_file(&tmp) {
            Ok(()) => debug!("removed a stale {}", tmp.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing", &tmp)(e)),
        }
        let built = (|| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(io_err("creating", &tmp))?;
            file.set_len(HEADER_SIZE + bitmap_len(blocks))
                .and_then(|()| file.write_all_at(&encode_header(blocks, key, FLAG_CLEAN), 0))
                .and_then(|()| file.sync_all())
                .map_err(io_err("writing", &tmp))?;
            // A hard link fails if `path` exists: no map is ever replaced.
            std::fs::hard_link(&tmp, path).map_err(io_err("creating", path))?;
            Ok(file)
        })();
        let _ = std::fs::remove_file(&tmp);
        let file = built?;
        sync_parent(path)?;
        info!(
            "created presence map {} ({blocks} blocks, version {key})",
            path.display()
        );
        Ok(PresenceMap::with_words(
            Some(path.to_path_buf()),
            blocks,
            key,
            PresenceMap::zeroed(blocks),
            true,
            Some(Disk { file, clean: true }),
        ))
    }

    /// Opens an existing map, checking magic, format version, checksum, reserved bytes and
    /// length, and that it tracks `blocks` blocks of version `key` ([`PresenceError::Mismatch`]
    /// otherwise). Reads the whole bitmap; writes nothing.
    pub fn open(path: &Path, blocks: u64, key: u64) -> Result<PresenceMap> {
        check_blocks(blocks)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("opening", path))?;
        let len = file
            .metadata()
            .map_err(io_err("reading the size of", path))?
            .len();
        let corrupt = |why: String| PresenceError::Corrupt(format!("{}: {why}", path.display()));
        if len < HEADER_SIZE {
            return Err(corrupt(format!(
                "{len} bytes, shorter than the {HEADER_SIZE}-byte header"
            )));
        }
        let mut h = vec![0u8; HEADER_SIZE as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(io_err("reading the header of", path))?;
        if &h[0..8] != MAP_MAGIC {
            return Err(corrupt("bad magic (expected \"DVTLPMAP\")".into()));
        }
        let version = le_u32(&h, 8);
        if version != MAP_FORMAT_VERSION {
            return Err(PresenceError::Version {
                path: path.to_path_buf(),
                found: version,
                supported: MAP_FORMAT_VERSION,
            });
        }
        let stored = le_u32(&h, 36);
        let crc = crc32c::crc32c(&h[..HEADER_USED]);
        if stored != crc {
            return Err(corrupt(format!(
                "header checksum mismatch (stored {stored:#010x}, computed {crc:#010x})"
            )));
        }
        let flags = le_u32(&h, 32);
        if flags & !FLAG_CLEAN != 0 || h[40..].iter().any(|&b| b != 0) {
            return Err(corrupt("reserved header bits are not zero".into()));
        }
        let block_size = le_u32(&h, 12);
        if u64::from(block_size) != MAP_BLOCK {
            return Err(corrupt(format!(
                "block size {block_size}, but maps track {MAP_BLOCK}-byte blocks"
            )));
        }
        let (found_blocks, found_key) = (le_u64(&h, 16), le_u64(&h, 24));
        if found_key != key {
            return Err(PresenceError::Mismatch(format!(
                "{} belongs to version {found_key}, not version {key}",
                path.display()
            )));
        }
        if found_blocks != blocks {
            return Err(PresenceError::Mismatch(format!(
                "{} tracks {found_blocks} blocks, but the disk has {blocks}",
                path.display()
            )));
        }
        let want = HEADER_SIZE + bitmap_len(blocks);
        if len != want {
            return Err(corrupt(format!(
                "{len} bytes, but a map of {blocks} blocks is {want} bytes{}",
                if len < want { " (truncated)" } else { "" }
            )));
        }
        let words = PresenceMap::read_bitmap(&file, path, blocks)?;
        let was_clean = flags & FLAG_CLEAN != 0;
        let map = PresenceMap::with_words(
            Some(path.to_path_buf()),
            blocks,
            key,
            words,
            was_clean,
            Some(Disk {
                file,
                clean: was_clean,
            }),
        );
        debug!(
            "opened presence map {} ({} of {blocks} blocks present, {})",
            path.display(),
            map.count(),
            if was_clean { "clean" } else { "not clean" }
        );
        Ok(map)
    }

    /// Reads the bitmap, checking that every bit past the last block is zero.
    fn read_bitmap(file: &File, path: &Path, blocks: u64) -> Result<Vec<AtomicU64>> {
        let nwords = blocks.div_ceil(64) as usize;
        let total = bitmap_len(blocks) as usize;
        let mut words = Vec::with_capacity(nwords);
        let mut buf = vec![0u8; (MAX_RUN * PAGE as usize).min(total)];
        let mut done = 0usize;
        while done < total {
            let n = buf.len().min(total - done);
            file.read_exact_at(&mut buf[..n], HEADER_SIZE + done as u64)
                .map_err(io_err("reading the bitmap of", path))?;
            for c in buf[..n].chunks_exact(8) {
                let w = le_u64(c, 0);
                let i = words.len();
                let valid = if i < nwords {
                    let first = i as u64 * 64;
                    match blocks - first {
                        r if r >= 64 => u64::MAX,
                        r => (1u64 << r) - 1,
                    }
                } else {
                    0
                };
                if w & !valid != 0 {
                    return Err(PresenceError::Corrupt(format!(
                        "{}: bits set past the last of its {blocks} blocks",
                        path.display()
                    )));
                }
                if i < nwords {
                    words.push(AtomicU64::new(w));
                }
            }
            done += n;
        }
        Ok(words)
    }

    /// Opens the map at `path`, or creates it if there is none.
    pub fn open_or_create(path: &Path, blocks: u64, key: u64) -> Result<PresenceMap> {
        if path.symlink_metadata().is_ok() {
            return PresenceMap::open(path, blocks, key);
        }
        match PresenceMap::create(path, blocks, key) {
            Err(PresenceError::Io { source, .. })
                if source.kind() == io::ErrorKind::AlreadyExists =>
            {
                PresenceMap::open(path, blocks, key)
            }
            r => r,
        }
    }

    /// A map without a file (tests, serving a plain image): `persist`, `mark_dirty` and
    /// `close_clean` do nothing, and `was_clean` is true.
    pub fn in_memory(blocks: u64) -> PresenceMap {
        PresenceMap::with_words(None, blocks, 0, PresenceMap::zeroed(blocks), true, None)
    }

    /// Blocks the map tracks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The map file, if it has one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Whether `block` is present (false past the last block). Lock-free.
    pub fn contains(&self, block: u64) -> bool {
        block < self.blocks
            && self.words[(block / 64) as usize].load(Ordering::Acquire) & (1 << (block % 64)) != 0
    }

    /// Whether every block of `[first, first + count)` is present (true for an empty range;
    /// false if the range runs past the last block).
    pub fn contains_all(&self, first: u64, count: u64) -> bool {
        if count == 0 {
            return true;
        }
        let Some(end) = first.checked_add(count).filter(|&e| e <= self.blocks) else {
            return false;
        };
        let mut at = first;
        while at < end {
            let (w, bit) = ((at / 64) as usize, at % 64);
            let n = (64 - bit).min(end - at);
            let mask = mask(bit, n);
            if self.words[w].load(Ordering::Acquire) & mask != mask {
                return false;
            }
            at += n;
        }
        true
    }

    /// Marks `block` present (in memory; durable at the next [`persist`](Self::persist)). A
    /// block past the last one is ignored. Cheap when the block is already present (one
    /// atomic load); otherwise one atomic OR on the block's word and one on the page's dirty
    /// bit, which happens once per block in the map's life.
    pub fn insert(&self, block: u64) {
        if block >= self.blocks {
            return;
        }
        let w = (block / 64) as usize;
        let bit = 1u64 << (block % 64);
        let word = &self.words[w];
        if word.load(Ordering::Acquire) & bit != 0 {
            return;
        }
        if word.fetch_or(bit, Ordering::AcqRel) & bit == 0 {
            self.present.fetch_add(1, Ordering::Relaxed);
            self.mark_page(w / WORDS_PER_PAGE);
        }
    }

    /// Marks `[first, first + count)` present (the part inside the disk).
    pub fn insert_range(&self, first: u64, count: u64) {
        let end = first.saturating_add(count).min(self.blocks);
        let mut at = first;
        while at < end {
            let (w, bit) = ((at / 64) as usize, at % 64);
            let n = (64 - bit).min(end - at);
            let mask = mask(bit, n);
            let word = &self.words[w];
            if word.load(Ordering::Acquire) & mask != mask {
                let new = mask & !word.fetch_or(mask, Ordering::AcqRel);
                if new != 0 {
                    self.present
                        .fetch_add(u64::from(new.count_ones()), Ordering::Relaxed);
                    self.mark_page(w / WORDS_PER_PAGE);
                }
            }
            at += n;
        }
    }

    /// Records that bitmap page `page` changed. Always an atomic OR (never a load first): the
    /// OR is ordered after the bit it follows, and `persist` takes dirty bits with a swap, so
    /// either `persist` sees this mark and then the bit, or the page stays dirty for the next
    /// one.
    fn mark_page(&self, page: usize) {
        self.dirty[page / 64].fetch_or(1 << (page % 64), Ordering::AcqRel);
    }

    /// Blocks present.
    pub fn count(&self) -> u64 {
        self.present.load(Ordering::Relaxed)
    }

    /// The first absent block at or after `from`, if any.
    pub fn next_absent(&self, from: u64) -> Option<u64> {
        if from >= self.blocks {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut skip = from % 64;
        while w < self.words.len() {
            let absent = !self.words[w].load(Ordering::Acquire) & (u64::MAX << skip);
            if absent != 0 {
                let block = w as u64 * 64 + u64::from(absent.trailing_zeros());
                return (block < self.blocks).then_some(block);
            }
            w += 1;
            skip = 0;
        }
        None
    }

    fn lock_disk(&self) -> MutexGuard<'_, Option<Disk>> {
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path_or_memory(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new("(in memory)"))
    }

    /// Writes every bitmap page changed since the last persist, then `fdatasync`s the file.
    /// Callers make the candidate's data durable first: a bit on disk says the candidate holds
    /// the block durably. If a write or the sync fails, the pages stay marked changed and the
    /// next persist writes them again.
    pub fn persist(&self) -> Result<()> {
        let disk = self.lock_disk();
        match &*disk {
            Some(d) => self.persist_locked(&d.file),
            None => Ok(()),
        }
    }

    fn persist_locked(&self, file: &File) -> Result<()> {
        let path = self.path_or_memory();
        let mut pages = Vec::new();
        for (i, d) in self.dirty.iter().enumerate() {
            if d.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = d.swap(0, Ordering::AcqRel);
            while bits != 0 {
                pages.push(i * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
        if pages.is_empty() {
            return Ok(());
        }
        let written = self.write_pages(file, &pages).and_then(|()| {
            dovetail_store::failpoint::hit("presence-persist");
            file.sync_data()
                .map_err(io_err("syncing the presence map", path))
        });
        if written.is_err() {
            for &p in &pages {
                self.mark_page(p);
            }
        }
        written?;
        debug!("persisted {} pages of {}", pages.len(), path.display());
        Ok(())
    }

    /// Writes `pages` (ascending), consecutive ones together.
    fn write_pages(&self, file: &File, pages: &[usize]) -> Result<()> {
        let mut buf = Vec::with_capacity(MAX_RUN * PAGE as usize);
        let mut i = 0;
        while i < pages.len() {
            let first = pages[i];
            let mut n = 1;
            while i + n < pages.len() && pages[i + n] == first + n && n < MAX_RUN {
                n += 1;
            }
            buf.clear();
            for w in first * WORDS_PER_PAGE..(first + n) * WORDS_PER_PAGE {
                let v = self.words.get(w).map_or(0, |x| x.load(Ordering::Acquire));
                buf.extend_from_slice(&v.to_le_bytes());
            }
            file.write_all_at(&buf, HEADER_SIZE + first as u64 * PAGE)
                .map_err(io_err("writing the bitmap of", self.path_or_memory()))?;
            i += n;
        }
        Ok(())
    }

    /// Rewrites the header's first sector with the clean flag set or not, and syncs.
    fn write_flags(&self, d: &mut Disk, clean: bool) -> Result<()> {
        let h = encode_header(self.blocks, self.key, if clean { FLAG_CLEAN } else { 0 });
        d.file
            .write_all_at(&h[..HEADER_SECTOR], 0)
            .and_then(|()| d.file.sync_data())
            .map_err(io_err("writing the header of", self.path_or_memory()))?;
        d.clean = clean;
        Ok(())
    }

    /// Whether the map had been closed cleanly ([`close_clean`](Self::close_clean)) when it
    /// was opened (true for a new map and an in-memory one). If not, it may lack blocks the
    /// candidate was given after the last persist.
    pub fn was_clean(&self) -> bool {
        self.was_clean
    }

    /// Durably clears the clean flag, if it is set. Call it before the first write to the
    /// candidate after opening the map (and after a `close_clean` if writing resumes).
    pub fn mark_dirty(&self) -> Result<()> {
        let mut disk = self.lock_disk();
        match &mut *disk {
            Some(d) if d.clean => self.write_flags(d, false),
            _ => Ok(()),
        }
    }

    /// Orderly shutdown: [`persist`](Self::persist), then durably sets the clean flag. Nothing
    /// may be inserted afterwards without [`mark_dirty`](Self::mark_dirty).
    pub fn close_clean(&self) -> Result<()> {
        let mut disk = self.lock_disk();
        let Some(d) = &mut *disk else {
            return Ok(());
        };
        self.persist_locked(&d.file)?;
        self.write_flags(d, true)
    }

    /// Deletes the map file at `path` (no error if there is none), durably.
    pub fn remove(path: &Path) -> Result<()> {
        match std::fs::remove_file(path) {
            Ok(()) => {
                debug!("removed presence map {}", path.display());
                sync_parent(path)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", path)(e)),
        }
    }
}

/// `n` bits (1..=64) from bit `bit` on.
fn mask(bit: u64, n: u64) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        ((1u64 << n) - 1) << bit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_lengths() {
        assert_eq!(mask(0, 64), u64::MAX);
        assert_eq!(mask(3, 2), 0b11000);
        assert_eq!(mask(63, 1), 1 << 63);
        assert_eq!(bitmap_len(0), 0);
        assert_eq!(bitmap_len(1), 4096);
        assert_eq!(bitmap_len(32768), 4096);
        assert_eq!(bitmap_len(32769), 8192);
    }

    #[test]
    fn in_memory_maps_track_ranges_and_gaps() {
        let m = PresenceMap::in_memory(200);
        assert!(m.was_clean());
        assert_eq!(m.next_absent(0), Some(0));
        m.insert_range(0, 130);
        m.insert_range(60, 10);
        assert_eq!(m.count(), 130);
        assert!(m.contains_all(0, 130));
        assert!(!m.contains_all(0, 131));
        assert!(!m.contains_all(190, 20), "past the end");
        assert!(m.contains_all(500, 0));
        assert_eq!(m.next_absent(0), Some(130));
        m.insert(130);
        m.insert(130);
        m.insert(5000);
        assert_eq!(m.count(), 131);
        assert_eq!(m.next_absent(64), Some(131));
        m.insert_range(131, u64::MAX);
        assert_eq!(m.count(), 200);
        assert_eq!(m.next_absent(0), None);
        assert!(!m.contains(200));
        m.persist().expect("no-op");
        m.mark_dirty().expect("no-op");
        m.close_clean().expect("no-op");
    }
}
