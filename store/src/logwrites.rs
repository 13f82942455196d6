//! A power-loss recorder: a userspace `dm-log-writes` for a store's files.
//!
//! [`WriteLog`] is one log shared by every file of a store (one global order). Each file is
//! wrapped in a [`LogFile`], a [`StoreFile`] that forwards to an inner file (a [`MemFile`], a
//! [`crate::sim::SimFile`] whose power is never cut, or the production `std::fs::File`) and
//! records every completed `write_at` (file, offset, bytes), `zero_range`, `set_size` and
//! `sync`. A test appends its own [marker](WriteLog::mark) entries at the points it knows
//! something ("the guest's FLUSH 12 was acknowledged here"), so it can tell, for any point of the
//! log, what had been promised by then.
//!
//! A finished [`Recording`] rebuilds every file's bytes as a power cut at any point of the run
//! would have left them ([`Recording::rebuild`], or [`Rebuilder`] for many states in order),
//! starting from each file's bytes when it joined the log; [`Recording::states`] enumerates crash
//! states to try: every sync boundary, seeded random subsets of the writes that were not yet
//! durable, and torn versions of them.
//!
//! # The crash model
//!
//! A [`CrashState`] says how many sync entries completed, `k`. The *cut* is just before sync
//! entry `k + 1` (the end of the log when there are only `k`): the entries before it happened,
//! those after it did not. A write, `zero_range` or `set_size` of file `F` before the cut is
//! *durable* if a sync of `F` follows it before the cut; `fdatasync` is per file, so a sync of
//! another file does not count. Every other change before the cut is *pending*: it may have
//! reached the medium or not, and a pending write may have reached it only in part, at 512-byte
//! sector granularity (a *torn* write; sectors are counted from the start of the file). The
//! state says, per pending change in log order, whether it was lost, kept whole, or (writes only)
//! which of its sectors were kept; the kept ones are applied in log order on top of the durable
//! bytes, so two pending writes of one sector leave the old bytes, the first or the second, never
//! the first over the second.
//!
//! Lengths: a write past the end and `set_size` change a file's length, durably or pending like
//! any change (a lost extension leaves the file shorter). `zero_range` never changes the length,
//! like the hole the production file punches. A file exists from the point it joined the log
//! ([`WriteLog::wrap`]) on, with its bytes at that point durable; before it, a rebuilt state has
//! no such file (`None`), which models a file created atomically (written, synced, then linked
//! into place).
//!
//! Ordering: a [`LogFile`] holds the log's lock across each change and each sync of its inner
//! file, so the log order is the order in which the changes completed, and a sync covers exactly
//! the changes logged before it. A failed change or sync is not logged. Reads are not logged and
//! do not take the lock.
//!
//! Files written outside the [`StoreFile`] seam (a presence map goes through `std::fs`) can be
//! [watched](WriteLog::watch): the log looks at them before every entry and records their
//! changes since the last look as writes followed by a sync, so they are ordered against the
//! store's files at the granularity of the store's I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::file::StoreFile;
use crate::rng::SplitMix64;

/// The unit a pending write may be torn at.
pub const SECTOR: u64 = 512;

/// Bytes per page of [`Image`]'s sparse representation.
const PAGE: u64 = 4096;

/// Bytes read per call when a file joins the log.
const WRAP_CHUNK: u64 = 1 << 20;

type Page = [u8; PAGE as usize];

/// The bytes of one file: stored sparsely in 4 KiB pages (pages never written take no memory)
/// that clones share copy-on-write, so the files of many crash states are cheap to build.
/// Equal when the lengths and bytes are, however they are stored.
#[derive(Clone, Default)]
pub struct Image {
    len: u64,
    pages: BTreeMap<u64, Arc<Page>>,
}

impl PartialEq for Image {
    fn eq(&self, other: &Image) -> bool {
        const ZERO: Page = [0u8; PAGE as usize];
        self.len == other.len
            && self.pages.keys().chain(other.pages.keys()).all(|p| {
                match (self.pages.get(p), other.pages.get(p)) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
                    (Some(a), None) | (None, Some(a)) => **a == ZERO,
                    (None, None) => true,
                }
            })
    }
}

impl Eq for Image {}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image")
            .field("len", &self.len)
            .field("pages", &self.pages.len())
            .finish()
    }
}

impl Image {
    /// An empty file.
    pub fn new() -> Image {
        Image::default()
    }

    /// A file holding `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Image {
        let mut i = Image::new();
        i.write(0, bytes);
        i
    }

    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end read as zeros.
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (page, in_page) = (at / PAGE, (at % PAGE) as usize);
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            match self.pages.get(&page) {
                Some(p) if at < self.len => {
                    buf[done..done + n].copy_from_slice(&p[in_page..in_page + n])
                }
                _ => buf[done..done + n].fill(0),
            }
            done += n;
        }
    }

    /// Writes `data` at `offset`, extending the file if it ends past the end.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let (page, in_page) = (at / PAGE, (at % PAGE) as usize);
            let n = (PAGE as usize - in_page).min(data.len() - done);
            let src = &data[done..done + n];
            match self.pages.get_mut(&page) {
                Some(p) => Arc::make_mut(p)[in_page..in_page + n].copy_from_slice(src),
                None if src.iter().any(|&b| b != 0) => {
                    let mut p = [0u8; PAGE as usize];
                    p[in_page..in_page + n].copy_from_slice(src);
                    self.pages.insert(page, Arc::new(p));
                }
                None => {}
            }
            done += n;
        }
        self.len = self.len.max(offset + data.len() as u64);
    }

    /// Makes `[offset, offset + len)` read as zeros, within the file (the length is kept).
    pub fn zero(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.len);
        let mut at = offset;
        while at < end {
            let page = at / PAGE;
            let page_end = ((page + 1) * PAGE).min(end);
            if at % PAGE == 0 && page_end - at == PAGE {
                self.pages.remove(&page);
            } else if let Some(p) = self.pages.get_mut(&page) {
                Arc::make_mut(p)[(at % PAGE) as usize..(at % PAGE + page_end - at) as usize]
                    .fill(0);
            }
            at = page_end;
        }
    }

    /// Sets the length: bytes past a shorter length are dropped, a longer one reads as zeros.
    pub fn set_len(&mut self, len: u64) {
        if len < self.len {
            let first_gone = len.div_ceil(PAGE);
            self.pages.retain(|&p, _| p < first_gone);
            if len % PAGE != 0 {
                if let Some(p) = self.pages.get_mut(&(len / PAGE)) {
                    Arc::make_mut(p)[(len % PAGE) as usize..].fill(0);
                }
            }
        }
        self.len = len;
    }

    /// The whole file.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len as usize];
        self.read(0, &mut v);
        v
    }
}

/// An in-memory [`StoreFile`] over an [`Image`]: `sync` does nothing (everything is durable).
/// Clones share the file (like two descriptors of one file).
#[derive(Debug, Clone, Default)]
pub struct MemFile {
    image: Arc<Mutex<Image>>,
}

impl MemFile {
    /// An empty file.
    pub fn new() -> MemFile {
        MemFile::default()
    }

    /// A file holding `image` (shared copy-on-write with the caller's copy).
    pub fn with_image(image: Image) -> MemFile {
        MemFile {
            image: Arc::new(Mutex::new(image)),
        }
    }

    /// A file holding `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> MemFile {
        MemFile::with_image(Image::from_bytes(bytes))
    }

    fn lock(&self) -> MutexGuard<'_, Image> {
        self.image.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file's bytes now (a copy-on-write snapshot).
    pub fn image(&self) -> Image {
        self.lock().clone()
    }

    /// The file's bytes now, as one vector.
    pub fn bytes(&self) -> Vec<u8> {
        self.lock().to_vec()
    }
}

fn eof() -> io::Error {
    io::Error::from(io::ErrorKind::UnexpectedEof)
}

impl StoreFile for MemFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let i = self.lock();
        let end = offset.checked_add(buf.len() as u64).ok_or_else(eof)?;
        if end > i.len() {
            return Err(eof());
        }
        i.read(offset, buf);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        offset.checked_add(buf.len() as u64).ok_or_else(eof)?;
        self.lock().write(offset, buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.lock().len())
    }

    fn set_size(&self, len: u64) -> io::Result<()> {
        self.lock().set_len(len);
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.lock().zero(offset, len);
        Ok(())
    }
}

/// A file's number in a [`WriteLog`]: the order in which it joined.
pub type FileId = usize;

/// One entry of a [`WriteLog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// File `file` joined the log here ([`WriteLog::wrap`]); its bytes then are durable.
    Create { file: FileId },
    /// `data` was written at `offset`.
    Write {
        file: FileId,
        offset: u64,
        data: Arc<[u8]>,
    },
    /// `[offset, offset + len)` was made to read as zeros.
    ZeroRange { file: FileId, offset: u64, len: u64 },
    /// The file's length was set to `len`.
    SetSize { file: FileId, len: u64 },
    /// The file was synced: every change of it logged before is durable.
    Sync { file: FileId },
    /// A marker the test appended.
    Mark { label: String },
}

impl Entry {
    /// The file a change or sync is of (`None` for a marker).
    pub fn file(&self) -> Option<FileId> {
        match self {
            Entry::Create { file }
            | Entry::Write { file, .. }
            | Entry::ZeroRange { file, .. }
            | Entry::SetSize { file, .. }
            | Entry::Sync { file } => Some(*file),
            Entry::Mark { .. } => None,
        }
    }

    /// Whether this entry changes a file's bytes or length (and so may be pending at a crash).
    pub fn is_change(&self) -> bool {
        matches!(
            self,
            Entry::Write { .. } | Entry::ZeroRange { .. } | Entry::SetSize { .. }
        )
    }

    /// The sectors a write covers: `(first, count)`; `None` for other entries.
    pub fn sectors(&self) -> Option<(u64, u64)> {
        match self {
            Entry::Write { offset, data, .. } if !data.is_empty() => {
                let first = offset / SECTOR;
                let last = (offset + data.len() as u64 - 1) / SECTOR;
                Some((first, last - first + 1))
            }
            _ => None,
        }
    }
}

/// A file of a recording: its name and where it joined the log.
#[derive(Debug, Clone)]
pub struct FileInfo {
    /// The name given to [`WriteLog::wrap`].
    pub name: String,
    /// The position of its [`Entry::Create`].
    pub created: usize,
    /// Its bytes when it joined.
    initial: Image,
}

#[derive(Debug, Default)]
struct Shared {
    entries: Vec<Entry>,
    files: Vec<FileInfo>,
    watched: Vec<Watched>,
}

/// A file outside the [`StoreFile`] seam that the log looks at before each entry.
#[derive(Debug)]
struct Watched {
    name: String,
    path: PathBuf,
    /// Its number once it has been seen.
    file: Option<FileId>,
    /// Its bytes when last looked at.
    last: Vec<u8>,
}

impl Shared {
    fn add_file(&mut self, name: &str, initial: Image) -> FileId {
        let id = self.files.len();
        let created = self.entries.len();
        self.files.push(FileInfo {
            name: name.to_string(),
            created,
            initial,
        });
        self.entries.push(Entry::Create { file: id });
        id
    }

    /// Logs what changed in the watched files since the last look: a file seen for the first
    /// time joins (with its bytes durable), a changed one gets its new length, a write per run
    /// of changed sectors and a sync.
    fn poll(&mut self) {
        for i in 0..self.watched.len() {
            let Ok(now) = std::fs::read(&self.watched[i].path) else {
                continue;
            };
            let Some(file) = self.watched[i].file else {
                let name = self.watched[i].name.clone();
                let id = self.add_file(&name, Image::from_bytes(&now));
                let w = &mut self.watched[i];
                w.file = Some(id);
                w.last = now;
                continue;
            };
            let last = std::mem::take(&mut self.watched[i].last);
            let mut changed = false;
            if now.len() != last.len() {
                self.entries.push(Entry::SetSize {
                    file,
                    len: now.len() as u64,
                });
                changed = true;
            }
            let sector = SECTOR as usize;
            let differs = |k: usize| {
                let (a, b) = (k * sector, ((k + 1) * sector).min(now.len()));
                last.get(a..b) != Some(&now[a..b])
            };
            let sectors = now.len().div_ceil(sector);
            let mut k = 0;
            while k < sectors {
                if !differs(k) {
                    k += 1;
                    continue;
                }
                let mut e = k + 1;
                while e < sectors && differs(e) {
                    e += 1;
                }
                let (a, b) = (k * sector, (e * sector).min(now.len()));
                self.entries.push(Entry::Write {
                    file,
                    offset: a as u64,
                    data: Arc::from(&now[a..b]),
                });
                changed = true;
                k = e;
            }
            if changed {
                self.entries.push(Entry::Sync { file });
            }
            self.watched[i].last = now;
        }
    }

    /// Appends `entry` after the watched files' changes.
    fn push(&mut self, entry: Entry) -> usize {
        self.poll();
        self.entries.push(entry);
        self.entries.len() - 1
    }
}

/// The log shared by the files of one store (see the [module documentation](self)). Clones
/// share the log.
#[derive(Debug, Clone, Default)]
pub struct WriteLog {
    shared: Arc<Mutex<Shared>>,
}

impl WriteLog {
    /// An empty log.
    pub fn new() -> WriteLog {
        WriteLog::default()
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `inner` from now on: reads its bytes as its state when it joins (durable), logs
    /// an [`Entry::Create`], and returns the wrapper to use in its place. Reads the whole file
    /// (sparsely), so it is meant for test-sized files.
    pub fn wrap(&self, name: &str, inner: Box<dyn StoreFile>) -> io::Result<LogFile> {
        let len = inner.size()?;
        let mut initial = Image::new();
        let mut buf = vec![0u8; WRAP_CHUNK.min(len) as usize];
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(WRAP_CHUNK) as usize;
            inner.read_at(at, &mut buf[..n])?;
            initial.write(at, &buf[..n]);
            at += n as u64;
        }
        initial.set_len(len);
        let mut s = self.lock();
        s.poll();
        let id = s.add_file(name, initial);
        drop(s);
        Ok(LogFile {
            log: self.clone(),
            id,
            inner,
        })
    }

    /// Appends a marker; returns its position in the log.
    pub fn mark(&self, label: impl Into<String>) -> usize {
        self.lock().push(Entry::Mark {
            label: label.into(),
        })
    }

    /// Watches the file at `path`, written outside the [`StoreFile`] seam (e.g. a presence map
    /// written through `std::fs`): before every entry is logged, and before a recording is
    /// taken, the log reads it and records what changed since the last look, as if it had been
    /// written and synced just then. The file joins the log (as `name`, its bytes durable) when
    /// it is first seen, so it may not exist yet; a removal is not recorded.
    ///
    /// Exact when the writer syncs each change before the next logged entry and no logged I/O
    /// runs concurrently with it (the presence map's writes are each followed by `fdatasync`);
    /// a change written but not yet synced when the log looks is recorded as synced. The file
    /// is read whole at every entry, so it is meant for small files.
    pub fn watch(&self, name: &str, path: impl AsRef<Path>) {
        let mut s = self.lock();
        s.watched.push(Watched {
            name: name.to_string(),
            path: path.as_ref().to_path_buf(),
            file: None,
            last: Vec::new(),
        });
        s.poll();
    }

    /// Entries logged so far.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether nothing has been logged.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sync entries logged so far.
    pub fn syncs(&self) -> usize {
        self.lock()
            .entries
            .iter()
            .filter(|e| matches!(e, Entry::Sync { .. }))
            .count()
    }

    /// A copy of the log as it is now, to rebuild crash states from.
    pub fn recording(&self) -> Recording {
        let mut s = self.lock();
        s.poll();
        Recording::new(s.files.clone(), s.entries.clone())
    }
}

/// A [`StoreFile`] whose changes and syncs are recorded in a [`WriteLog`]; everything is
/// forwarded to the inner file.
#[derive(Debug)]
pub struct LogFile {
    log: WriteLog,
    id: FileId,
    inner: Box<dyn StoreFile>,
}

impl LogFile {
    /// The file's number in the log.
    pub fn id(&self) -> FileId {
        self.id
    }

    /// The log it records into.
    pub fn log(&self) -> &WriteLog {
        &self.log
    }

    /// Runs `op` on the inner file under the log's lock and logs `entry` if it succeeded.
    fn logged(
        &self,
        entry: Entry,
        op: impl FnOnce(&dyn StoreFile) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut s = self.log.lock();
        // What a watched file's writer did before this call comes first.
        s.poll();
        op(&*self.inner)?;
        s.entries.push(entry);
        Ok(())
    }
}

impl StoreFile for LogFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if buf.is_empty() {
            return self.inner.write_at(offset, buf);
        }
        let entry = Entry::Write {
            file: self.id,
            offset,
            data: Arc::from(buf),
        };
        self.logged(entry, |f| f.write_at(offset, buf))
    }

    fn sync(&self) -> io::Result<()> {
        self.logged(Entry::Sync { file: self.id }, |f| f.sync())
    }

    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    fn set_size(&self, len: u64) -> io::Result<()> {
        self.logged(Entry::SetSize { file: self.id, len }, |f| f.set_size(len))
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return self.inner.zero_range(offset, len);
        }
        let entry = Entry::ZeroRange {
            file: self.id,
            offset,
            len,
        };
        self.logged(entry, |f| f.zero_range(offset, len))
    }

    unsafe fn read_raw(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        // SAFETY: the caller's promise on `iov` is passed on unchanged.
        unsafe { self.inner.read_raw(offset, iov) }
    }
}

/// What happened to one pending change at a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Survival {
    /// It never reached the medium.
    Lost,
    /// It reached the medium whole.
    Whole,
    /// Writes only: these of its sectors reached the medium (index 0 is its first sector, as
    /// [`Entry::sectors`] counts them), the others did not.
    Sectors(Vec<bool>),
}

/// How a crash state was chosen, for summaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// At a sync boundary: no pending change kept, or every one kept whole.
    Boundary,
    /// Some pending changes kept whole, the others lost.
    Subset,
    /// At least one pending write kept in part.
    Torn,
}

/// One power cut: how many syncs completed, and what became of each pending change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashState {
    /// Sync entries that completed; the cut is just before the next one.
    pub syncs: usize,
    /// How the state was chosen.
    pub kind: Kind,
    /// One per pending change ([`Recording::pending`]), in log order.
    pub survived: Vec<Survival>,
}

impl fmt::Display for CrashState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kept = self
            .survived
            .iter()
            .filter(|s| **s == Survival::Whole)
            .count();
        let torn = self
            .survived
            .iter()
            .filter(|s| matches!(s, Survival::Sectors(_)))
            .count();
        write!(
            f,
            "{:?} state after {} syncs: {} pending changes, {kept} kept whole, {torn} torn",
            self.kind,
            self.syncs,
            self.survived.len()
        )
    }
}

/// How [`Recording::states`] chooses states beyond the sync boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Seeds every random choice (the same seed, the same states).
    pub seed: u64,
    /// Subset states per sync boundary with at least two pending changes: alternately each
    /// change kept with probability 1/2, and the first `n` kept (a cut between two writes).
    pub subsets: usize,
    /// Torn states per sync boundary with a pending write of two sectors or more: one or more
    /// such writes kept in part (at least one sector kept and one lost), the other changes kept
    /// or lost at random.
    pub torn: usize,
}

/// A finished log: rebuilds the files of any crash state (see the [module documentation](self)).
#[derive(Debug, Clone)]
pub struct Recording {
    files: Vec<FileInfo>,
    entries: Vec<Entry>,
    /// Positions of the sync entries, in order.
    sync_at: Vec<usize>,
}

impl Recording {
    fn new(files: Vec<FileInfo>, entries: Vec<Entry>) -> Recording {
        let sync_at = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, Entry::Sync { .. }))
            .map(|(i, _)| i)
            .collect();
        Recording {
            files,
            entries,
            sync_at,
        }
    }

    /// Every entry, in log order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The files, by [`FileId`].
    pub fn files(&self) -> &[FileInfo] {
        &self.files
    }

    /// The file wrapped under `name`, if any (the first, if several were).
    pub fn file_named(&self, name: &str) -> Option<FileId> {
        self.files.iter().position(|f| f.name == name)
    }

    /// Sync entries in the log.
    pub fn sync_count(&self) -> usize {
        self.sync_at.len()
    }

    /// The cut of a state with `syncs` completed syncs: the position of the next sync entry,
    /// or the end of the log. Entries before it happened.
    pub fn cut(&self, syncs: usize) -> usize {
        self.sync_at
            .get(syncs)
            .copied()
            .unwrap_or(self.entries.len())
    }

    /// The markers before the cut of a state with `syncs` completed syncs: position and label.
    pub fn marks(&self, syncs: usize) -> impl Iterator<Item = (usize, &str)> {
        self.entries[..self.cut(syncs)]
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e {
                Entry::Mark { label } => Some((i, label.as_str())),
                _ => None,
            })
    }

    /// The positions of the changes pending at the cut of a state with `syncs` completed syncs
    /// (logged before it, not followed by a sync of their file before it), in log order.
    pub fn pending(&self, syncs: usize) -> Vec<usize> {
        let cut = self.cut(syncs);
        let mut last_sync = vec![None; self.files.len()];
        for (i, e) in self.entries[..cut].iter().enumerate() {
            if let Entry::Sync { file } = e {
                last_sync[*file] = Some(i);
            }
        }
        (0..cut)
            .filter(|&i| {
                let e = &self.entries[i];
                e.is_change() && e.file().is_some_and(|f| last_sync[f].is_none_or(|s| s < i))
            })
            .collect()
    }

    /// The files as the power cut `state` describes leaves them, by [`FileId`] (`None`: the file
    /// had not joined the log yet). An error if `state` does not fit the recording.
    pub fn rebuild(&self, state: &CrashState) -> io::Result<Vec<Option<Image>>> {
        Rebuilder::new(self).rebuild(state)
    }

    /// Crash states to try, ordered by sync count: at every sync boundary (0 to
    /// [`Recording::sync_count`] completed syncs) the state that keeps no pending change and
    /// the one that keeps them all (one state when nothing is pending), then `plan.subsets`
    /// subset states and `plan.torn` torn states where they differ from the boundaries.
    pub fn states(&self, plan: &Plan) -> Vec<CrashState> {
        let mut out = Vec::new();
        // Walks the log once, keeping the pending changes per file.
        let mut pending: Vec<Vec<usize>> = vec![Vec::new(); self.files.len()];
        let mut pos = 0usize;
        for syncs in 0..=self.sync_count() {
            let cut = self.cut(syncs);
            while pos < cut {
                match &self.entries[pos] {
                    Entry::Sync { file } => pending[*file].clear(),
                    e if e.is_change() => {
                        if let Some(f) = e.file() {
                            pending[f].push(pos);
                        }
                    }
                    _ => {}
                }
                pos += 1;
            }
            let mut now: Vec<usize> = pending.iter().flatten().copied().collect();
            now.sort_unstable();
            let n = now.len();
            let state = |kind, survived| CrashState {
                syncs,
                kind,
                survived,
            };
            out.push(state(Kind::Boundary, vec![Survival::Lost; n]));
            if n == 0 {
                continue;
            }
            out.push(state(Kind::Boundary, vec![Survival::Whole; n]));
            let mut rng = SplitMix64::new(plan.seed ^ (syncs as u64).wrapping_mul(0x9e37_79b9));
            if n >= 2 {
                for i in 0..plan.subsets {
                    let survived: Vec<Survival> = if i % 2 == 0 {
                        let mut s: Vec<Survival> = (0..n).map(|_| coin(&mut rng)).collect();
                        // Neither none nor all (those are the boundaries).
                        let flip = rng.below(n as u64) as usize;
                        if s.iter().all(|x| *x == Survival::Lost) {
                            s[flip] = Survival::Whole;
                        } else if s.iter().all(|x| *x == Survival::Whole) {
                            s[flip] = Survival::Lost;
                        }
                        s
                    } else {
                        let keep = 1 + rng.below(n as u64 - 1) as usize;
                        (0..n)
                            .map(|j| {
                                if j < keep {
                                    Survival::Whole
                                } else {
                                    Survival::Lost
                                }
                            })
                            .collect()
                    };
                    out.push(state(Kind::Subset, survived));
                }
            }
            let tearable: Vec<(usize, u64)> = now
                .iter()
                .enumerate()
                .filter_map(|(j, &p)| {
                    self.entries[p]
                        .sectors()
                        .filter(|&(_, count)| count >= 2)
                        .map(|(_, count)| (j, count))
                })
                .collect();
            if tearable.is_empty() {
                continue;
            }
            for _ in 0..plan.torn {
                let mut survived: Vec<Survival> = (0..n).map(|_| coin(&mut rng)).collect();
                let first = rng.below(tearable.len() as u64) as usize;
                for (t, &(j, count)) in tearable.iter().enumerate() {
                    if t == first || rng.below(4) == 0 {
                        survived[j] = Survival::Sectors(torn_mask(&mut rng, count as usize));
                    }
                }
                out.push(state(Kind::Torn, survived));
            }
        }
        out
    }
}

/// Kept or lost, with probability 1/2.
fn coin(rng: &mut SplitMix64) -> Survival {
    if rng.next_u64() & 1 == 1 {
        Survival::Whole
    } else {
        Survival::Lost
    }
}

/// A random mask of `count` (≥ 2) sectors with at least one kept and one lost.
fn torn_mask(rng: &mut SplitMix64, count: usize) -> Vec<bool> {
    let mut m: Vec<bool> = (0..count).map(|_| rng.next_u64() & 1 == 1).collect();
    let a = rng.below(count as u64) as usize;
    let b = (a + 1 + rng.below(count as u64 - 1) as usize) % count;
    m[a] = true;
    m[b] = false;
    m
}

/// Rebuilds the files of crash states, applying each log entry once for states given in order
/// of their sync counts (an earlier state starts over from the beginning of the log).
#[derive(Debug)]
pub struct Rebuilder<'a> {
    rec: &'a Recording,
    /// Entries before this position have been applied to `durable` / queued in `pending`.
    pos: usize,
    /// Each file's durable bytes at `pos` (`None` before it joined).
    durable: Vec<Option<Image>>,
    /// Each file's pending changes at `pos`.
    pending: Vec<Vec<usize>>,
}

impl<'a> Rebuilder<'a> {
    /// A rebuilder at the start of `rec`.
    pub fn new(rec: &'a Recording) -> Rebuilder<'a> {
        Rebuilder {
            rec,
            pos: 0,
            durable: vec![None; rec.files.len()],
            pending: vec![Vec::new(); rec.files.len()],
        }
    }

    fn advance(&mut self, cut: usize) {
        if cut < self.pos {
            *self = Rebuilder::new(self.rec);
        }
        while self.pos < cut {
            let i = self.pos;
            match &self.rec.entries[i] {
                Entry::Create { file } => {
                    self.durable[*file] = Some(self.rec.files[*file].initial.clone());
                }
                Entry::Sync { file } => {
                    let queued = std::mem::take(&mut self.pending[*file]);
                    if let Some(img) = self.durable[*file].as_mut() {
                        for p in queued {
                            apply(img, &self.rec.entries[p], &Survival::Whole);
                        }
                    }
                }
                e if e.is_change() => {
                    if let Some(f) = e.file() {
                        self.pending[f].push(i);
                    }
                }
                _ => {}
            }
            self.pos += 1;
        }
    }

    /// The files as `state` leaves them (see [`Recording::rebuild`]).
    pub fn rebuild(&mut self, state: &CrashState) -> io::Result<Vec<Option<Image>>> {
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        if state.syncs > self.rec.sync_count() {
            return Err(invalid(format!(
                "{} syncs, but the recording has {}",
                state.syncs,
                self.rec.sync_count()
            )));
        }
        self.advance(self.rec.cut(state.syncs));
        let mut pending: Vec<usize> = self.pending.iter().flatten().copied().collect();
        pending.sort_unstable();
        if pending.len() != state.survived.len() {
            return Err(invalid(format!(
                "{} pending changes after {} syncs, but the state says what became of {}",
                pending.len(),
                state.syncs,
                state.survived.len()
            )));
        }
        let mut files = self.durable.clone();
        for (&p, s) in pending.iter().zip(&state.survived) {
            let e = &self.rec.entries[p];
            if let Survival::Sectors(mask) = s {
                let count = e.sectors().map_or(0, |(_, c)| c);
                if mask.len() as u64 != count {
                    return Err(invalid(format!(
                        "entry {p} covers {count} sectors, but its mask has {}",
                        mask.len()
                    )));
                }
            }
            if let Some(img) = e.file().and_then(|f| files[f].as_mut()) {
                apply(img, e, s);
            }
        }
        Ok(files)
    }
}

/// Applies what survived of change `e` to `img`.
fn apply(img: &mut Image, e: &Entry, s: &Survival) {
    match (e, s) {
        (_, Survival::Lost) => {}
        (Entry::Write { offset, data, .. }, Survival::Whole) => img.write(*offset, data),
        (Entry::Write { offset, data, .. }, Survival::Sectors(mask)) => {
            let first = offset / SECTOR;
            let end = offset + data.len() as u64;
            for (i, _) in mask.iter().enumerate().filter(|(_, &keep)| keep) {
                let s = ((first + i as u64) * SECTOR).max(*offset);
                let t = ((first + i as u64 + 1) * SECTOR).min(end);
                if s < t {
                    img.write(s, &data[(s - offset) as usize..(t - offset) as usize]);
                }
            }
        }
        (Entry::ZeroRange { offset, len, .. }, _) => img.zero(*offset, *len),
        (Entry::SetSize { len, .. }, _) => img.set_len(*len),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_files() -> (WriteLog, MemFile, MemFile, LogFile, LogFile) {
        let log = WriteLog::new();
        let (a, b) = (MemFile::from_bytes(&[7u8; 4096]), MemFile::new());
        let la = log.wrap("a", Box::new(a.clone())).expect("wrap a");
        let lb = log.wrap("b", Box::new(b.clone())).expect("wrap b");
        (log, a, b, la, lb)
    }

    fn bytes(files: &[Option<Image>], f: FileId) -> Vec<u8> {
        files[f].as_ref().expect("file exists").to_vec()
    }

    #[test]
    fn images_write_zero_and_truncate_sparsely() {
        let mut i = Image::new();
        i.write(5000, &[1u8; 100]);
        assert_eq!(i.len(), 5100);
        assert_eq!(i.pages.len(), 1, "page 0 never written");
        i.write(0, &[0u8; 4096]);
        assert_eq!(i.pages.len(), 1, "zeros to an absent page take no memory");
        let shared = i.clone();
        i.zero(5050, 1000);
        assert_eq!(i.len(), 5100, "zero_range keeps the length");
        let v = i.to_vec();
        assert_eq!(&v[5000..5050], &[1u8; 50][..]);
        assert!(v[5050..].iter().all(|&b| b == 0));
        assert_eq!(shared.to_vec()[5099], 1, "clones are copy-on-write");
        i.set_len(5010);
        i.set_len(6000);
        let v = i.to_vec();
        assert_eq!(&v[5000..5010], &[1u8; 10][..]);
        assert!(
            v[5010..].iter().all(|&b| b == 0),
            "truncated bytes come back as zeros"
        );
        i.zero(0, 8192);
        assert_eq!(
            i,
            Image::from_bytes(&[0u8; 6000]),
            "equal bytes, however stored"
        );
        assert_ne!(i, Image::from_bytes(&[0u8; 6001]));
        assert!(i.to_vec().iter().all(|&b| b == 0));
        assert!(!i.pages.contains_key(&0), "a whole page zeroed is a hole");
    }

    #[test]
    fn a_sync_makes_only_its_own_files_changes_durable() {
        let (log, _, _, la, lb) = two_files();
        la.write_at(0, &[1u8; 512]).expect("write a");
        lb.write_at(0, &[2u8; 512]).expect("write b");
        la.sync().expect("sync a");
        lb.write_at(512, &[3u8; 512]).expect("write b again");
        let rec = log.recording();
        assert_eq!(rec.sync_count(), 1);
        // After the sync of a: a's write is durable; both writes of b are pending.
        let pending = rec.pending(1);
        assert_eq!(pending.len(), 2);
        assert!(pending
            .iter()
            .all(|&p| rec.entries()[p].file() == Some(lb.id())));
        let none = rec
            .rebuild(&CrashState {
                syncs: 1,
                kind: Kind::Boundary,
                survived: vec![Survival::Lost; 2],
            })
            .expect("rebuild");
        assert_eq!(&bytes(&none, la.id())[..512], &[1u8; 512][..]);
        assert_eq!(&bytes(&none, la.id())[512..], &[7u8; 3584][..]);
        assert!(
            bytes(&none, lb.id()).is_empty(),
            "b's writes were never synced"
        );
        // Before any sync: a's write may be lost too.
        let before = rec
            .rebuild(&CrashState {
                syncs: 0,
                kind: Kind::Boundary,
                survived: vec![Survival::Lost; 2],
            })
            .expect("rebuild");
        assert_eq!(bytes(&before, la.id()), vec![7u8; 4096]);
        // The second write of b kept alone.
        let second = rec
            .rebuild(&CrashState {
                syncs: 1,
                kind: Kind::Subset,
                survived: vec![Survival::Lost, Survival::Whole],
            })
            .expect("rebuild");
        let b = bytes(&second, lb.id());
        assert_eq!(b.len(), 1024);
        assert_eq!((&b[..512], &b[512..]), (&[0u8; 512][..], &[3u8; 512][..]));
        // A state that does not fit is refused.
        assert!(rec
            .rebuild(&CrashState {
                syncs: 1,
                kind: Kind::Boundary,
                survived: vec![],
            })
            .is_err());
        assert!(rec
            .rebuild(&CrashState {
                syncs: 2,
                kind: Kind::Boundary,
                survived: vec![],
            })
            .is_err());
    }

    #[test]
    fn pending_writes_of_one_sector_apply_in_log_order_and_tear_by_sector() {
        let (log, _, _, la, _) = two_files();
        la.write_at(0, &[1u8; 4096]).expect("first");
        la.write_at(1024, &[2u8; 512]).expect("second");
        let rec = log.recording();
        let state = |survived| CrashState {
            syncs: 0,
            kind: Kind::Torn,
            survived,
        };
        let first_only = rec
            .rebuild(&state(vec![Survival::Whole, Survival::Lost]))
            .expect("rebuild");
        assert_eq!(bytes(&first_only, 0), vec![1u8; 4096]);
        let both = rec
            .rebuild(&state(vec![Survival::Whole, Survival::Whole]))
            .expect("rebuild");
        assert_eq!(&bytes(&both, 0)[1024..1536], &[2u8; 512][..]);
        let second_only = rec
            .rebuild(&state(vec![Survival::Lost, Survival::Whole]))
            .expect("rebuild");
        let b = bytes(&second_only, 0);
        assert_eq!(&b[1024..1536], &[2u8; 512][..]);
        assert_eq!(&b[..1024], &[7u8; 1024][..]);
        // Sectors 0 and 7 of the 4 KiB write kept, the rest lost.
        let mut mask = vec![false; 8];
        mask[0] = true;
        mask[7] = true;
        let torn = rec
            .rebuild(&state(vec![Survival::Sectors(mask), Survival::Lost]))
            .expect("rebuild");
        let t = bytes(&torn, 0);
        assert_eq!(&t[..512], &[1u8; 512][..]);
        assert_eq!(&t[512..3584], &[7u8; 3072][..]);
        assert_eq!(&t[3584..], &[1u8; 512][..]);
        assert!(rec
            .rebuild(&state(vec![
                Survival::Sectors(vec![true; 3]),
                Survival::Lost
            ]))
            .is_err());
    }

    #[test]
    fn unaligned_writes_tear_at_file_sectors() {
        let log = WriteLog::new();
        let f = log.wrap("f", Box::new(MemFile::new())).expect("wrap");
        f.write_at(500, &[9u8; 600]).expect("write"); // sectors 0..=2
        let rec = log.recording();
        let p = rec.pending(0);
        assert_eq!(rec.entries()[p[0]].sectors(), Some((0, 3)));
        let torn = rec
            .rebuild(&CrashState {
                syncs: 0,
                kind: Kind::Torn,
                survived: vec![Survival::Sectors(vec![true, false, true])],
            })
            .expect("rebuild");
        let b = bytes(&torn, 0);
        assert_eq!(b.len(), 1100);
        assert_eq!(&b[500..512], &[9u8; 12][..]);
        assert!(b[512..1024].iter().all(|&x| x == 0));
        assert_eq!(&b[1024..1100], &[9u8; 76][..]);
    }

    #[test]
    fn lengths_and_holes_are_pending_until_synced() {
        let log = WriteLog::new();
        let inner = MemFile::from_bytes(&[5u8; 8192]);
        let f = log.wrap("f", Box::new(inner.clone())).expect("wrap");
        f.zero_range(0, 4096).expect("hole");
        f.set_size(16384).expect("grow");
        f.sync().expect("sync");
        f.set_size(4096).expect("shrink");
        f.zero_range(4096, 100).expect("past the end: nothing");
        let rec = log.recording();
        let states = rec.states(&Plan {
            seed: 1,
            subsets: 0,
            torn: 0,
        });
        let last = states.last().expect("states");
        assert_eq!(last.survived, vec![Survival::Whole; 2]);
        let kept = rec.rebuild(last).expect("rebuild");
        assert_eq!(bytes(&kept, 0), inner.bytes(), "keep-all is the live file");
        assert_eq!(bytes(&kept, 0), vec![0u8; 4096]);
        let lost = rec.rebuild(&states[states.len() - 2]).expect("rebuild");
        let l = bytes(&lost, 0);
        assert_eq!(l.len(), 16384);
        assert!(l[..4096].iter().all(|&x| x == 0));
        assert_eq!(&l[4096..8192], &[5u8; 4096][..]);
    }

    #[test]
    fn a_file_exists_from_the_point_it_joined_and_marks_are_seen_after_it() {
        let log = WriteLog::new();
        let a = log.wrap("a", Box::new(MemFile::new())).expect("wrap");
        a.write_at(0, &[1u8; 10]).expect("write");
        a.sync().expect("sync");
        let m = log.mark("made b");
        let b = log
            .wrap("b", Box::new(MemFile::from_bytes(b"hello")))
            .expect("wrap b");
        a.sync().expect("sync");
        let rec = log.recording();
        assert_eq!(rec.file_named("b"), Some(b.id()));
        let at = |syncs| {
            rec.rebuild(&CrashState {
                syncs,
                kind: Kind::Boundary,
                survived: vec![Survival::Lost; rec.pending(syncs).len()],
            })
            .expect("rebuild")
        };
        assert!(at(0)[b.id()].is_none());
        assert!(at(1)[b.id()].is_some(), "b joined before the second sync");
        assert_eq!(bytes(&at(1), b.id()), b"hello".to_vec());
        assert_eq!(rec.marks(0).count(), 0);
        assert_eq!(rec.marks(1).collect::<Vec<_>>(), vec![(m, "made b")]);
        assert_eq!(log.syncs(), 2);
        assert!(!log.is_empty());
    }

    /// A seeded log over three files, with overlapping writes, syncs of one file at a time,
    /// torn-able 4 KiB writes and length changes.
    fn busy(seed: u64) -> (WriteLog, Vec<MemFile>) {
        let log = WriteLog::new();
        let inner: Vec<MemFile> = (0..3).map(|_| MemFile::from_bytes(&[0xaa; 8192])).collect();
        let files: Vec<LogFile> = inner
            .iter()
            .enumerate()
            .map(|(i, f)| {
                log.wrap(&format!("f{i}"), Box::new(f.clone()))
                    .expect("wrap")
            })
            .collect();
        let mut rng = SplitMix64::new(seed);
        for step in 0..200u64 {
            let f = &files[rng.below(3) as usize];
            match rng.below(10) {
                0..=5 => {
                    let len = [512, 4096, 1000, 8192][rng.below(4) as usize];
                    let at = rng.below(16) * 512 + rng.below(2) * 7;
                    f.write_at(at, &vec![step as u8; len]).expect("write");
                }
                6 | 7 => f.sync().expect("sync"),
                8 => f.zero_range(rng.below(4) * 4096, 4096).expect("zero"),
                _ => f.set_size(4096 * (1 + rng.below(4))).expect("size"),
            }
            if step % 50 == 0 {
                log.mark(format!("step {step}"));
            }
        }
        (log, inner)
    }

    #[test]
    fn incremental_rebuilds_match_rebuilds_from_scratch_and_plans_replay() {
        let (log, inner) = busy(42);
        let rec = log.recording();
        let plan = Plan {
            seed: 7,
            subsets: 2,
            torn: 2,
        };
        let states = rec.states(&plan);
        assert_eq!(states, rec.states(&plan), "the same seed, the same states");
        assert_ne!(
            states,
            rec.states(&Plan { seed: 8, ..plan }),
            "another seed, other states"
        );
        let kinds = |k| states.iter().filter(|s| s.kind == k).count();
        assert!(kinds(Kind::Boundary) > rec.sync_count());
        assert!(kinds(Kind::Subset) > 0 && kinds(Kind::Torn) > 0);
        assert!(states.windows(2).all(|w| w[0].syncs <= w[1].syncs));
        let mut r = Rebuilder::new(&rec);
        for s in &states {
            let a = r.rebuild(s).expect("incremental");
            let b = rec.rebuild(s).expect("from scratch");
            assert_eq!(a, b, "{s}");
            if s.kind == Kind::Torn {
                assert!(s.survived.iter().any(
                    |x| matches!(x, Survival::Sectors(m) if m.contains(&true) && m.contains(&false))
                ));
            }
        }
        // Everything kept at the end is the live files.
        let last = states
            .iter()
            .rfind(|s| s.kind == Kind::Boundary)
            .expect("a boundary");
        let all = rec.rebuild(last).expect("rebuild");
        if last.survived.iter().all(|s| *s == Survival::Whole) {
            for (i, f) in inner.iter().enumerate() {
                assert_eq!(bytes(&all, i), f.bytes(), "file {i}");
            }
        }
    }

    #[test]
    fn every_synced_byte_survives_every_state() {
        // The bytes of each file at its last sync before the cut are there, except where a
        // pending change of that file covers them.
        let (log, _) = busy(9);
        let rec = log.recording();
        let states = rec.states(&Plan {
            seed: 3,
            subsets: 1,
            torn: 1,
        });
        for s in states
            .iter()
            .filter(|s| s.survived.iter().all(|x| *x == Survival::Lost))
        {
            let got = rec.rebuild(s).expect("rebuild");
            // Replay by hand: every change followed by a sync of its file before the cut.
            let cut = rec.cut(s.syncs);
            for (f, info) in rec.files().iter().enumerate() {
                let mut want = info.initial.clone();
                let last = rec.entries()[..cut]
                    .iter()
                    .rposition(|e| *e == Entry::Sync { file: f });
                if let Some(last) = last {
                    for e in &rec.entries()[..last] {
                        if e.file() == Some(f) {
                            apply(&mut want, e, &Survival::Whole);
                        }
                    }
                }
                assert_eq!(got[f].as_ref(), Some(&want), "{s}, file {f}");
            }
        }
    }

    #[test]
    fn watched_files_are_ordered_against_the_logged_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("map");
        let log = WriteLog::new();
        log.watch("map", &path);
        let f = log.wrap("f", Box::new(MemFile::new())).expect("wrap");
        f.write_at(0, &[1u8; 512]).expect("write");
        f.sync().expect("sync");
        std::fs::write(&path, [0u8; 2048]).expect("create the watched file");
        f.write_at(512, &[2u8; 512]).expect("write");
        f.sync().expect("sync");
        let mut changed = vec![0u8; 2048];
        changed[1030] = 9;
        std::fs::write(&path, &changed).expect("change it");
        let m = log.mark("after the change");
        let rec = log.recording();
        let map = rec.file_named("map").expect("seen");
        // It joined after the first sync of f, before the write that followed its creation.
        assert!(rec.files()[map].created > rec.cut(0));
        assert!(rec.files()[map].created < rec.cut(1));
        // Its change (one sector) and a sync of it are logged before the marker.
        let change = rec
            .entries()
            .iter()
            .position(|e| matches!(e, Entry::Write { file, .. } if *file == map))
            .expect("the change is logged");
        assert_eq!(rec.entries()[change].sectors(), Some((2, 1)));
        assert_eq!(rec.entries()[change + 1], Entry::Sync { file: map });
        assert!(change > rec.cut(1) && change + 1 < m);
        let at = |syncs: usize| {
            rec.rebuild(&CrashState {
                syncs,
                kind: Kind::Boundary,
                survived: vec![Survival::Lost; rec.pending(syncs).len()],
            })
            .expect("rebuild")
        };
        assert!(at(0)[map].is_none(), "not created yet");
        assert_eq!(bytes(&at(1), map), vec![0u8; 2048]);
        assert_eq!(bytes(&at(3), map), changed);
        assert_eq!(rec.sync_count(), 3);
    }

    #[test]
    fn it_records_over_real_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, [3u8; 1000]).expect("create");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let log = WriteLog::new();
        let f = log.wrap("real", Box::new(file)).expect("wrap");
        f.write_at(100, &[4u8; 50]).expect("write");
        f.sync().expect("sync");
        f.write_at(2000, &[5u8; 10]).expect("write past the end");
        let mut back = [0u8; 50];
        f.read_at(100, &mut back).expect("read");
        assert_eq!(back, [4u8; 50]);
        let rec = log.recording();
        let states = rec.states(&Plan {
            seed: 1,
            subsets: 0,
            torn: 0,
        });
        let all = rec.rebuild(states.last().expect("state")).expect("rebuild");
        assert_eq!(
            bytes(&all, 0),
            std::fs::read(&path).expect("read"),
            "keep-all is the real file"
        );
        let synced = rec.rebuild(&states[states.len() - 2]).expect("rebuild");
        assert_eq!(bytes(&synced, 0).len(), 1000);
        assert_eq!(&bytes(&synced, 0)[100..150], &[4u8; 50][..]);
    }

    #[test]
    fn a_store_over_logged_files_opens_and_checks_in_every_state() {
        use crate::{check_on, Store};
        let (meta, data) = (MemFile::new(), MemFile::new());
        drop(
            Store::create_on(
                Box::new(meta.clone()),
                Box::new(data.clone()),
                8 << 16,
                1 << 16,
            )
            .expect("create"),
        );
        let log = WriteLog::new();
        let store = Store::open_on(
            Box::new(log.wrap("meta", Box::new(meta)).expect("wrap")),
            Box::new(log.wrap("data", Box::new(data)).expect("wrap")),
        )
        .expect("open");
        let mut made = Vec::new();
        for i in 0..4u8 {
            store
                .create_disk(&format!("d{i}"), 1 << 20, "parallax-v1")
                .expect("disk");
            let key = store.disk(&format!("d{i}")).expect("disk").trusted;
            let space = store.space(key).expect("space");
            let e = space.grant_extent().expect("grant");
            space.write(e, 0, &[i + 1; 4096]).expect("write");
            space.sync().expect("sync");
            space.commit_root(&[i; 40]).expect("commit");
            made.push(log.mark(format!("disk d{i} committed")));
        }
        drop(store);
        let rec = log.recording();
        let states = rec.states(&Plan {
            seed: 5,
            subsets: 2,
            torn: 2,
        });
        let mut r = Rebuilder::new(&rec);
        for s in &states {
            let files = r.rebuild(s).expect("rebuild");
            let file = |name| {
                Box::new(MemFile::with_image(
                    files[rec.file_named(name).expect("file")]
                        .clone()
                        .expect("exists"),
                )) as Box<dyn StoreFile>
            };
            let report = check_on(file("meta"), file("data"), &[]).expect("check runs");
            assert!(report.is_ok(), "{s}: {report}");
            let store = Store::open_on(file("meta"), file("data")).expect("open");
            let cut = rec.cut(s.syncs);
            for (i, &m) in made.iter().enumerate() {
                let Ok(d) = store.disk(&format!("d{i}")) else {
                    assert!(m > cut, "{s}: disk d{i} was committed before the cut");
                    continue;
                };
                let space = store.space(d.trusted).expect("space");
                if space.root() == vec![i as u8; 40] {
                    let mut b = vec![0u8; 4096];
                    space.read(space.extents()[0], 0, &mut b).expect("read");
                    assert_eq!(b, vec![i as u8 + 1; 4096], "{s}: synced before its commit");
                } else {
                    assert!(m > cut, "{s}: d{i}'s root was committed before the cut");
                }
            }
        }
    }
}
