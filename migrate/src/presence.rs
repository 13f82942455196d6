//! The presence map: a persistent bitmap of which 4 KiB blocks of a disk a candidate version
//! holds (docs/format.md, "Presence map, format version 2"). The Tee inserts a block once the
//! candidate holds it; copy-out fills the rest (it looks for gaps with
//! [`PresenceMap::next_absent`]).
//!
//! The file is a 4096-byte header (magic `DVTLPMAP`, version, block size, block count, the
//! candidate's version key, the clean flag, a checksum; every field in the first 512 bytes)
//! followed by the bitmap in 4096-byte pages, each holding 32 704 blocks' bits and a crc32c of
//! the page (seeded with the map's key and the page's index). Format version 1 (no page
//! checksums) is read and rewritten as version 2 on a read-write open.
//!
//! Crash safety comes from monotonicity: a bit only ever goes from absent to present during a
//! map's life. [`PresenceMap::persist`] therefore rewrites changed pages in place, without a
//! shadow copy. A page torn by a power cut fails its checksum and is read as all-absent (and
//! reported): a conservative answer, since an absent block is served by the trusted version
//! and copied to the candidate again. The candidate's data is made durable before the persist
//! (the caller's duty), so a present bit is always true. The clean flag records an orderly
//! shutdown, so that after any other stop the Tee knows the map may lack blocks written since
//! the last persist.
//!
//! A checksum does not prove the bits true (anyone can compute one): promote's verification
//! pass (`crate::verify`) compares every block before trusting the map.
//!
//! Concurrency: `insert`/`contains` are lock-free (one `AtomicU64` per 64 blocks) and may run
//! on any number of threads; changed pages are tracked in an atomic bitmap, one bit per page;
//! `persist`, `mark_dirty` and `close_clean` are serialised by an internal mutex.

use std::fmt;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use dovetail_store::le::{le_u32, le_u64};
use log::{debug, info, warn};

use crate::mapfile::{Dir, Entry, MapFile, MapsDir};

/// Bytes per tracked block.
pub const MAP_BLOCK: u64 = 4096;
/// The presence map format this module reads and writes.
pub const MAP_FORMAT_VERSION: u32 = 2;
/// The older format this module reads (and rewrites as [`MAP_FORMAT_VERSION`]).
pub const MAP_FORMAT_V1: u32 = 1;
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
/// 64-bit words of bits per bitmap page (the page's last 8 bytes hold its checksum).
const WORDS_PER_PAGE: usize = (PAGE / 8) as usize - 1;
/// Blocks per bitmap page.
pub const BLOCKS_PER_PAGE: u64 = WORDS_PER_PAGE as u64 * 64;
/// 64-bit words per bitmap page of a format version 1 map (no checksum).
const V1_WORDS_PER_PAGE: usize = (PAGE / 8) as usize;
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

/// Bitmap bytes in the file for `blocks` blocks: one 4096-byte page per 32 704 blocks.
fn bitmap_len(blocks: u64) -> u64 {
    blocks.div_ceil(BLOCKS_PER_PAGE) * PAGE
}

/// Bitmap bytes of a format version 1 map: `ceil(blocks / 8)` rounded up to 4096.
fn bitmap_len_v1(blocks: u64) -> u64 {
    blocks.div_ceil(8).div_ceil(PAGE) * PAGE
}

/// The crc32c of bitmap page `index` of the map of version `key` (`page` is its first 4092
/// bytes).
fn page_crc(key: u64, index: u64, page: &[u8]) -> u32 {
    let mut seed = [0u8; 16];
    seed[..8].copy_from_slice(&key.to_le_bytes());
    seed[8..].copy_from_slice(&index.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&seed), page)
}

/// The header's 4096 bytes.
fn encode_header(blocks: u64, key: u64, flags: u32) -> Vec<u8> {
    encode_header_version(MAP_FORMAT_VERSION, blocks, key, flags)
}

/// The header of a map of format `version` (1 only to build old maps in tests).
fn encode_header_version(version: u32, blocks: u64, key: u64, flags: u32) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_SIZE as usize];
    b[0..8].copy_from_slice(MAP_MAGIC);
    b[8..12].copy_from_slice(&version.to_le_bytes());
    b[12..16].copy_from_slice(&(MAP_BLOCK as u32).to_le_bytes());
    b[16..24].copy_from_slice(&blocks.to_le_bytes());
    b[24..32].copy_from_slice(&key.to_le_bytes());
    b[32..36].copy_from_slice(&flags.to_le_bytes());
    let crc = crc32c::crc32c(&b[..HEADER_USED]);
    b[36..40].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The file and what its header says now.
#[derive(Debug)]
struct Disk {
    file: MapFile,
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
    /// Bitmap pages that failed their checksum when the map was opened (read as all-absent).
    bad_pages: Vec<u64>,
    /// The format version the file had when opened (1: it was upgraded).
    found_version: u32,
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

/// The directory of the map at `path`, opened without following a symlink (or the records of
/// a store on RADOS), and the map's name.
fn dir_of(path: &Path, key: u64) -> Result<(Dir, String)> {
    Dir::of(path, key).map_err(io_err("opening the directory of", path))
}

/// What a read of a map file found (see [`PresenceMap::inspect`]).
#[derive(Debug, Clone)]
pub struct Inspection {
    /// The format version of the file.
    pub version: u32,
    pub blocks: u64,
    /// Blocks present (bad pages count as absent).
    pub present: u64,
    /// Bitmap pages that failed their checksum.
    pub bad_pages: Vec<u64>,
    pub clean: bool,
}

/// A map file's contents, read and checked.
struct Loaded {
    words: Vec<AtomicU64>,
    bad_pages: Vec<u64>,
    clean: bool,
    version: u32,
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
            bad_pages: Vec::new(),
            found_version: MAP_FORMAT_VERSION,
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
    /// map or a complete one. Nothing is followed through a symlink: a symlink at `path` or at
    /// `<path>.tmp` is refused.
    pub fn create(path: &Path, blocks: u64, key: u64) -> Result<PresenceMap> {
        check_blocks(blocks)?;
        let (dir, name) = dir_of(path, key)?;
        PresenceMap::create_in(&dir, &name, path, blocks, key, &PresenceMap::zeroed(blocks))?;
        info!(
            "created presence map {} ({blocks} blocks, version {key})",
            path.display()
        );
        let file = dir
            .open_file(&name, true)
            .map_err(io_err("opening", path))?;
        Ok(PresenceMap::with_words(
            Some(path.to_path_buf()),
            blocks,
            key,
            PresenceMap::zeroed(blocks),
            true,
            Some(Disk { file, clean: true }),
        ))
    }

    /// Builds a complete map file `<name>.tmp` holding `words` and links it to `name` (which
    /// must not exist, or with `replace`, is renamed over); durable on return.
    fn create_in(
        dir: &Dir,
        name: &str,
        path: &Path,
        blocks: u64,
        key: u64,
        words: &[AtomicU64],
    ) -> Result<()> {
        PresenceMap::build(dir, name, path, blocks, key, words, FLAG_CLEAN, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        dir: &Dir,
        name: &str,
        path: &Path,
        blocks: u64,
        key: u64,
        words: &[AtomicU64],
        flags: u32,
        replace: bool,
    ) -> Result<()> {
        let dir = match dir {
            Dir::Files(d) => d,
            Dir::Rados(r) => {
                // One operation creates (exclusively) or replaces the whole map: a crash leaves
                // no map, the old one or the new one, never a part.
                let image = encode_map(blocks, key, words, flags);
                let done = if replace {
                    r.replace(name, &image)
                } else {
                    r.create(name, &image)
                };
                return done.map_err(io_err(if replace { "replacing" } else { "creating" }, path));
            }
        };
        PresenceMap::build_file(dir, name, path, blocks, key, words, flags, replace)
    }

    /// [`build`](Self::build) in a `maps/` directory: a temporary file linked or renamed into
    /// place.
    #[allow(clippy::too_many_arguments)]
    fn build_file(
        dir: &MapsDir,
        name: &str,
        path: &Path,
        blocks: u64,
        key: u64,
        words: &[AtomicU64],
        flags: u32,
        replace: bool,
    ) -> Result<()> {
        if !replace && dir.entry(name).map_err(io_err("looking up", path))? != Entry::Missing {
            return Err(PresenceError::Io {
                op: "creating",
                path: path.to_path_buf(),
                source: io::Error::from(io::ErrorKind::AlreadyExists),
            });
        }
        let tmp_name = format!("{name}.tmp");
        let tmp = path.with_file_name(&tmp_name);
        dir.remove_stale(&tmp_name)
            .map_err(io_err("removing the stale", &tmp))?;
        let built = (|| {
            let file = dir
                .create_file(&tmp_name)
                .map_err(io_err("creating", &tmp))?;
            file.set_len(HEADER_SIZE + bitmap_len(blocks))
                .and_then(|()| file.write_all_at(&encode_header(blocks, key, flags), 0))
                .map_err(io_err("writing", &tmp))?;
            let pages: Vec<usize> = (0..bitmap_len(blocks) / PAGE).map(|p| p as usize).collect();
            let file = MapFile::File(file);
            write_pages_of(&file, &tmp, key, words, &pages)?;
            let MapFile::File(file) = file else {
                unreachable!("a file of maps/")
            };
            file.sync_all().map_err(io_err("syncing", &tmp))?;
            if replace {
                dir.rename(&tmp_name, name)
                    .map_err(io_err("replacing", path))?;
            } else {
                // A hard link fails if `path` exists: no map is ever replaced.
                dir.link(&tmp_name, name)
                    .map_err(io_err("creating", path))?;
            }
            Ok(())
        })();
        if !replace || built.is_err() {
            let _ = dir.remove(&tmp_name);
        }
        built?;
        dir.sync().map_err(io_err("syncing the directory of", path))
    }

    /// Opens an existing map, checking magic, format version, checksums, reserved bytes and
    /// length, and that it tracks `blocks` blocks of version `key` ([`PresenceError::Mismatch`]
    /// otherwise). A bitmap page failing its checksum (a page torn by a power cut, or damage)
    /// is read as all-absent, logged, listed by [`bad_pages`](Self::bad_pages) and rewritten by
    /// the next persist. A format version 1 map is rewritten as version 2 (durably, before
    /// returning); otherwise nothing is written. Never follows a symlink.
    pub fn open(path: &Path, blocks: u64, key: u64) -> Result<PresenceMap> {
        check_blocks(blocks)?;
        let (dir, name) = dir_of(path, key)?;
        let file = dir
            .open_file(&name, true)
            .map_err(io_err("opening", path))?;
        let loaded = PresenceMap::load(&file, path, blocks, key)?;
        let file = if loaded.version == MAP_FORMAT_V1 {
            let flags = if loaded.clean { FLAG_CLEAN } else { 0 };
            PresenceMap::build(&dir, &name, path, blocks, key, &loaded.words, flags, true)?;
            info!(
                "upgraded presence map {} from format version {MAP_FORMAT_V1} to \
                 {MAP_FORMAT_VERSION} (page checksums)",
                path.display()
            );
            dir.open_file(&name, true)
                .map_err(io_err("opening", path))?
        } else {
            file
        };
        let mut map = PresenceMap::with_words(
            Some(path.to_path_buf()),
            blocks,
            key,
            loaded.words,
            loaded.clean,
            Some(Disk {
                file,
                clean: loaded.clean,
            }),
        );
        map.found_version = loaded.version;
        if !loaded.bad_pages.is_empty() {
            warn!(
                "presence map {}: {} bitmap page(s) failed their checksum ({}); their {} blocks \
                 each are taken as absent (served by the trusted version, copied again)",
                path.display(),
                loaded.bad_pages.len(),
                list_pages(&loaded.bad_pages),
                BLOCKS_PER_PAGE
            );
            for &p in &loaded.bad_pages {
                map.mark_page(p as usize);
            }
        }
        map.bad_pages = loaded.bad_pages;
        debug!(
            "opened presence map {} ({} of {blocks} blocks present, {})",
            path.display(),
            map.count(),
            if map.was_clean { "clean" } else { "not clean" }
        );
        Ok(map)
    }

    /// Reads and checks the map at `path` without changing it (for `store check`): what
    /// [`open`](Self::open) would find. `blocks`/`key` as there.
    pub fn inspect(path: &Path, blocks: u64, key: u64) -> Result<Inspection> {
        check_blocks(blocks)?;
        let (dir, name) = dir_of(path, key)?;
        let file = dir
            .open_file(&name, false)
            .map_err(io_err("opening", path))?;
        let l = PresenceMap::load(&file, path, blocks, key)?;
        Ok(Inspection {
            version: l.version,
            blocks,
            present: l
                .words
                .iter()
                .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
                .sum(),
            bad_pages: l.bad_pages,
            clean: l.clean,
        })
    }

    /// Reads and checks a map file (either format version).
    fn load(file: &MapFile, path: &Path, blocks: u64, key: u64) -> Result<Loaded> {
        let len = file.size().map_err(io_err("reading the size of", path))?;
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
        if version != MAP_FORMAT_VERSION && version != MAP_FORMAT_V1 {
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
        let want = HEADER_SIZE
            + if version == MAP_FORMAT_V1 {
                bitmap_len_v1(blocks)
            } else {
                bitmap_len(blocks)
            };
        if len != want {
            return Err(corrupt(format!(
                "{len} bytes, but a map of {blocks} blocks is {want} bytes{}",
                if len < want { " (truncated)" } else { "" }
            )));
        }
        let (words, bad_pages) = PresenceMap::read_bitmap(file, path, blocks, key, version)?;
        Ok(Loaded {
            words,
            bad_pages,
            clean: flags & FLAG_CLEAN != 0,
            version,
        })
    }

    /// Reads the bitmap, checking that every bit past the last block is zero and (format
    /// version 2) every page's checksum: a page failing it reads as all-absent and is listed.
    fn read_bitmap(
        file: &MapFile,
        path: &Path,
        blocks: u64,
        key: u64,
        version: u32,
    ) -> Result<(Vec<AtomicU64>, Vec<u64>)> {
        let nwords = blocks.div_ceil(64) as usize;
        let v1 = version == MAP_FORMAT_V1;
        let total = if v1 {
            bitmap_len_v1(blocks)
        } else {
            bitmap_len(blocks)
        } as usize;
        let page_words = if v1 {
            V1_WORDS_PER_PAGE
        } else {
            WORDS_PER_PAGE
        };
        let mut words = Vec::with_capacity(nwords);
        let mut bad = Vec::new();
        let mut buf = vec![0u8; (MAX_RUN * PAGE as usize).min(total)];
        let mut done = 0usize;
        while done < total {
            let n = buf.len().min(total - done);
            file.read_exact_at(&mut buf[..n], HEADER_SIZE + done as u64)
                .map_err(io_err("reading the bitmap of", path))?;
            for (pi, page) in buf[..n].chunks_exact(PAGE as usize).enumerate() {
                let index = ((done / PAGE as usize) + pi) as u64;
                let good = v1 || {
                    let stored = le_u32(page, PAGE as usize - 4);
                    stored == page_crc(key, index, &page[..PAGE as usize - 4])
                };
                if !good {
                    bad.push(index);
                }
                if !v1 && good && le_u32(page, PAGE as usize - 8) != 0 {
                    return Err(PresenceError::Corrupt(format!(
                        "{}: bitmap page {index}: reserved bytes are not zero",
                        path.display()
                    )));
                }
                for c in page[..page_words * 8].chunks_exact(8) {
                    let w = if good { le_u64(c, 0) } else { 0 };
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
            }
            done += n;
        }
        Ok((words, bad))
    }

    /// Opens the map at `path`, or creates it if there is none.
    pub fn open_or_create(path: &Path, blocks: u64, key: u64) -> Result<PresenceMap> {
        let (dir, name) = dir_of(path, key)?;
        if dir.entry(&name).map_err(io_err("looking up", path))? != Entry::Missing {
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

    /// Grows the map at `path` (of candidate `key`) to track `blocks` blocks, for a disk that
    /// grew: the bits it holds are kept, the new blocks are absent (the grown versions read
    /// them as zeroes, and an absent block is served by the trusted version and copied
    /// again). The new file is built under `<path>.tmp` and renamed over the map, so a crash
    /// leaves the old map or the grown one (the next grow finishes it). Returns the blocks
    /// the map tracked; nothing is written when it already tracks `blocks`. A map tracking
    /// more blocks, of another key, or damaged is an error, as for [`open`](Self::open); a
    /// format version 1 map is written as version 2; its clean flag is kept. Never follows a
    /// symlink.
    pub fn grow(path: &Path, blocks: u64, key: u64) -> Result<u64> {
        check_blocks(blocks)?;
        let (dir, name) = dir_of(path, key)?;
        let file = dir
            .open_file(&name, false)
            .map_err(io_err("opening", path))?;
        let mut h = [0u8; 24];
        file.read_exact_at(&mut h, 0)
            .map_err(io_err("reading the header of", path))?;
        let found = le_u64(&h, 16);
        if found > blocks {
            return Err(PresenceError::Mismatch(format!(
                "{} tracks {found} blocks, more than the {blocks} of the disk: a map never \
                 shrinks",
                path.display()
            )));
        }
        // Checks everything (magic, checksums, key, length) for the size it claims.
        let loaded = PresenceMap::load(&file, path, found, key)?;
        if found == blocks && loaded.version == MAP_FORMAT_VERSION {
            return Ok(found);
        }
        let words = PresenceMap::zeroed(blocks);
        for (w, old) in words.iter().zip(&loaded.words) {
            w.store(old.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let flags = if loaded.clean { FLAG_CLEAN } else { 0 };
        PresenceMap::build(&dir, &name, path, blocks, key, &words, flags, true)?;
        info!(
            "presence map {}: grown from {found} to {blocks} blocks",
            path.display()
        );
        Ok(found)
    }

    /// Bitmap pages that failed their checksum when the map was opened (their blocks read as
    /// absent).
    pub fn bad_pages(&self) -> &[u64] {
        &self.bad_pages
    }

    /// The format version the file had when it was opened (1: it has been upgraded).
    pub fn found_version(&self) -> u32 {
        self.found_version
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

    fn persist_locked(&self, file: &MapFile) -> Result<()> {
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
    fn write_pages(&self, file: &MapFile, pages: &[usize]) -> Result<()> {
        write_pages_of(file, self.path_or_memory(), self.key, &self.words, pages)
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

    /// Deletes the map file at `path` (no error if there is none; a symlink there is removed
    /// itself, never followed), durably.
    pub fn remove(path: &Path) -> Result<()> {
        let key = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".map"))
            .and_then(|k| k.parse().ok())
            .unwrap_or(0);
        let (dir, name) = dir_of(path, key)?;
        match dir.remove(&name) {
            Ok(()) => {
                debug!("removed presence map {}", path.display());
                dir.sync().map_err(io_err("syncing the directory of", path))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", path)(e)),
        }
    }
}

/// Writes bitmap `pages` (ascending) of the map of version `key` from `words`, consecutive
/// pages together, each with its checksum.
fn write_pages_of(
    file: &MapFile,
    path: &Path,
    key: u64,
    words: &[AtomicU64],
    pages: &[usize],
) -> Result<()> {
    let mut buf = Vec::with_capacity(MAX_RUN * PAGE as usize);
    let mut i = 0;
    while i < pages.len() {
        let first = pages[i];
        let mut n = 1;
        while i + n < pages.len() && pages[i + n] == first + n && n < MAX_RUN {
            n += 1;
        }
        buf.clear();
        for p in first..first + n {
            encode_page(key, words, p, &mut buf);
        }
        file.write_all_at(&buf, HEADER_SIZE + first as u64 * PAGE)
            .map_err(io_err("writing the bitmap of", path))?;
        i += n;
    }
    Ok(())
}

/// Appends bitmap page `p` of the map of version `key` (its bits from `words`, then its
/// checksum) to `buf`.
fn encode_page(key: u64, words: &[AtomicU64], p: usize, buf: &mut Vec<u8>) {
    let start = buf.len();
    for w in p * WORDS_PER_PAGE..(p + 1) * WORDS_PER_PAGE {
        let v = words.get(w).map_or(0, |x| x.load(Ordering::Acquire));
        buf.extend_from_slice(&v.to_le_bytes());
    }
    buf.extend_from_slice(&[0u8; 4]);
    let crc = page_crc(key, p as u64, &buf[start..]);
    buf.extend_from_slice(&crc.to_le_bytes());
}

/// A whole map (header and every bitmap page), as one record object of a store on RADOS holds
/// it: the same bytes as a map file.
fn encode_map(blocks: u64, key: u64, words: &[AtomicU64], flags: u32) -> Vec<u8> {
    let mut b = encode_header(blocks, key, flags);
    b.reserve(bitmap_len(blocks) as usize);
    for p in 0..(bitmap_len(blocks) / PAGE) as usize {
        encode_page(key, words, p, &mut b);
    }
    b
}

/// The first few page numbers of `pages`, and how many more.
fn list_pages(pages: &[u64]) -> String {
    let mut s: Vec<String> = pages.iter().take(8).map(u64::to_string).collect();
    if pages.len() > 8 {
        s.push(format!("and {} more", pages.len() - 8));
    }
    s.join(", ")
}

/// Writes a format version 1 map file at `path` with blocks `present` set (for tests of the
/// upgrade: this binary never writes version 1).
#[doc(hidden)]
pub fn write_v1_for_tests(path: &Path, blocks: u64, key: u64, present: &[u64], clean: bool) {
    let mut b = encode_header_version(MAP_FORMAT_V1, blocks, key, u32::from(clean));
    let mut bitmap = vec![0u8; bitmap_len_v1(blocks) as usize];
    for &p in present {
        bitmap[(p / 8) as usize] |= 1 << (p % 8);
    }
    b.extend_from_slice(&bitmap);
    std::fs::write(path, b).expect("writing a version 1 map");
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
        assert_eq!(bitmap_len(BLOCKS_PER_PAGE), 4096);
        assert_eq!(bitmap_len(BLOCKS_PER_PAGE + 1), 8192);
        assert_eq!(bitmap_len_v1(32768), 4096);
        assert_eq!(bitmap_len_v1(32769), 8192);
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

    #[test]
    fn a_page_failing_its_checksum_reads_as_absent_and_is_rewritten() {
        let t = tempfile::tempdir().expect("test step");
        let path = t.path().join("7.map");
        let blocks = 2 * BLOCKS_PER_PAGE + 100;
        let m = PresenceMap::create(&path, blocks, 7).expect("test step");
        m.insert_range(0, 10);
        m.insert_range(BLOCKS_PER_PAGE, 10);
        m.close_clean().expect("test step");
        drop(m);
        // A forged (or torn) first sector of page 0: every bit set, checksum not updated.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("test step");
        f.write_all_at(&[0xff; 512], HEADER_SIZE)
            .expect("test step");
        let i = PresenceMap::inspect(&path, blocks, 7).expect("test step");
        assert_eq!(i.bad_pages, vec![0]);
        assert_eq!(i.present, 10, "page 0 counts as all-absent");
        let m = PresenceMap::open(&path, blocks, 7).expect("test step");
        assert_eq!(m.bad_pages(), &[0]);
        assert_eq!(m.count(), 10);
        assert!(!m.contains(0) && !m.contains(5000));
        assert!(m.contains(BLOCKS_PER_PAGE));
        m.persist().expect("test step");
        drop(m);
        let i = PresenceMap::inspect(&path, blocks, 7).expect("test step");
        assert!(i.bad_pages.is_empty(), "the next persist rewrote the page");
        assert_eq!(i.present, 10);
        // A page copied from another position (or another map) fails too.
        let mut p1 = vec![0u8; PAGE as usize];
        f.read_exact_at(&mut p1, HEADER_SIZE + PAGE)
            .expect("test step");
        f.write_all_at(&p1, HEADER_SIZE + 2 * PAGE)
            .expect("test step");
        assert_eq!(
            PresenceMap::inspect(&path, blocks, 7)
                .expect("test step")
                .bad_pages,
            vec![2]
        );
    }

    #[test]
    fn format_version_1_maps_are_upgraded_in_place() {
        let t = tempfile::tempdir().expect("test step");
        let path = t.path().join("9.map");
        let blocks = 40_000;
        let present = [0, 1, 63, 64, 32767, 32768, 39_999];
        write_v1_for_tests(&path, blocks, 9, &present, false);
        let i = PresenceMap::inspect(&path, blocks, 9).expect("test step");
        assert_eq!((i.version, i.present, i.clean), (1, 7, false));
        let m = PresenceMap::open(&path, blocks, 9).expect("test step");
        assert_eq!(m.found_version(), 1);
        assert!(!m.was_clean(), "the clean flag is carried over");
        assert_eq!(m.count(), 7);
        for b in present {
            assert!(m.contains(b), "block {b}");
        }
        drop(m);
        let i = PresenceMap::inspect(&path, blocks, 9).expect("test step");
        assert_eq!((i.version, i.present), (MAP_FORMAT_VERSION, 7));
        assert_eq!(
            std::fs::metadata(&path).expect("test step").len(),
            HEADER_SIZE + bitmap_len(blocks)
        );
        assert!(!t.path().join("9.map.tmp").exists());
        let m = PresenceMap::open(&path, blocks, 9).expect("test step");
        assert_eq!(m.found_version(), MAP_FORMAT_VERSION);
        assert!(m.contains(39_999) && !m.contains(2));
    }

    #[test]
    fn symlinks_at_a_map_or_its_temporary_file_are_refused() {
        let t = tempfile::tempdir().expect("test step");
        let target = t.path().join("target");
        std::fs::write(&target, b"keep").expect("test step");
        let path = t.path().join("3.map");
        std::os::unix::fs::symlink(&target, &path).expect("test step");
        let e = PresenceMap::open_or_create(&path, 100, 3).expect_err("must fail");
        assert!(
            dovetail_layout::error_chain(&e).contains("symbolic link"),
            "{e:?}"
        );
        std::fs::remove_file(&path).expect("test step");
        std::os::unix::fs::symlink(&target, t.path().join("3.map.tmp")).expect("test step");
        let e = PresenceMap::create(&path, 100, 3).expect_err("must fail");
        assert!(
            dovetail_layout::error_chain(&e).contains("not a regular file"),
            "{e:?}"
        );
        assert_eq!(std::fs::read(&target).expect("test step"), b"keep");
        assert!(!path.exists());
    }
}
