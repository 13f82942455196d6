//! A crash-simulating [`StoreFile`]: it keeps the bytes as written (live) apart from the bytes a
//! `sync` made durable, and [`SimFile::after_crash`] returns the file a power cut would leave —
//! the durable bytes plus any subset of the unsynced 512-byte sectors (writes may be torn at
//! sector boundaries and reordered). A shared [`Power`] counts syncs across every file of one
//! simulated machine and cuts the power at a chosen one, so a test can crash a store at each of
//! its sync points in turn.
//!
//! File lengths (`set_size`, writes past the end) are modelled as durable at once. Files are
//! stored sparsely (pages never written take no memory), so large simulated stores are cheap.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::file::StoreFile;
use crate::rng::SplitMix64;

/// The unit a simulated write can tear at.
pub const SECTOR: u64 = 512;

/// The power supply of one simulated machine, shared by its files.
#[derive(Debug, Default)]
pub struct Power {
    syncs: AtomicU64,
    /// The sync (1-based, counted over all files) that fails and cuts the power; 0 = never.
    crash_at: AtomicU64,
    cut: AtomicBool,
}

impl Power {
    /// Power that stays on until told otherwise.
    pub fn new() -> Arc<Power> {
        Arc::new(Power::default())
    }

    /// Syncs attempted so far (including the one that cut the power).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    /// Cuts the power during sync number `n` (1-based, counting from the start): that sync
    /// fails without making anything durable, and so does every later operation.
    pub fn crash_at_sync(&self, n: u64) {
        self.crash_at.store(n, Ordering::SeqCst);
    }

    /// Cuts the power now.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Whether the power has been cut.
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    fn check(&self) -> io::Result<()> {
        if self.is_cut() {
            Err(io::Error::other("simulated power cut"))
        } else {
            Ok(())
        }
    }

    fn sync(&self) -> io::Result<()> {
        self.check()?;
        let n = self.syncs.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.crash_at.load(Ordering::SeqCst) {
            self.cut();
        }
        self.check()
    }
}

/// Bytes per page of the sparse representation (pages never written are not stored).
const PAGE: u64 = 4096;

/// A sparse byte array: pages absent from the map read as zeros.
#[derive(Debug, Clone, Default)]
struct Pages(BTreeMap<u64, Box<[u8]>>);

impl Pages {
    fn from_bytes(bytes: &[u8]) -> Pages {
        let mut p = Pages::default();
        for (i, chunk) in bytes.chunks(PAGE as usize).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                p.page_mut(i as u64)[..chunk.len()].copy_from_slice(chunk);
            }
        }
        p
    }

    fn page_mut(&mut self, page: u64) -> &mut [u8] {
        self.0
            .entry(page)
            .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (page, in_page) = (at / PAGE, (at % PAGE) as usize);
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            match self.0.get(&page) {
                Some(p) => buf[done..done + n].copy_from_slice(&p[in_page..in_page + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
    }

    fn write(&mut self, offset: u64, buf: &[u8]) {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (page, in_page) = (at / PAGE, (at % PAGE) as usize);
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            let src = &buf[done..done + n];
            if self.0.contains_key(&page) || src.iter().any(|&b| b != 0) {
                self.page_mut(page)[in_page..in_page + n].copy_from_slice(src);
            }
            done += n;
        }
    }

    fn copy_sector_from(&mut self, other: &Pages, sector: u64) {
        let mut b = [0u8; SECTOR as usize];
        other.read(sector * SECTOR, &mut b);
        self.write(sector * SECTOR, &b);
    }

    /// Drops everything at or past `len`.
    fn truncate(&mut self, len: u64) {
        let first_gone = len.div_ceil(PAGE);
        self.0.retain(|&p, _| p < first_gone);
        if len % PAGE != 0 {
            if let Some(p) = self.0.get_mut(&(len / PAGE)) {
                p[(len % PAGE) as usize..].fill(0);
            }
        }
    }

    fn to_vec(&self, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        self.read(0, &mut v);
        v
    }
}

#[derive(Debug, Default)]
struct State {
    len: u64,
    live: Pages,
    durable: Pages,
    /// Sectors whose live bytes may differ from the durable ones.
    dirty: BTreeSet<u64>,
}

/// One simulated file, stored sparsely. Clones share the file (like two descriptors of one
/// file).
#[derive(Debug, Clone)]
pub struct SimFile {
    state: Arc<Mutex<State>>,
    power: Arc<Power>,
}

impl SimFile {
    /// An empty file on the machine powered by `power`.
    pub fn new(power: Arc<Power>) -> SimFile {
        SimFile::with_bytes(power, &[])
    }

    /// A file holding `bytes`, all durable.
    pub fn with_bytes(power: Arc<Power>, bytes: &[u8]) -> SimFile {
        let pages = Pages::from_bytes(bytes);
        SimFile::with_state(
            power,
            State {
                len: bytes.len() as u64,
                live: pages.clone(),
                durable: pages,
                dirty: BTreeSet::new(),
            },
        )
    }

    fn with_state(power: Arc<Power>, state: State) -> SimFile {
        SimFile {
            state: Arc::new(Mutex::new(state)),
            power,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bytes as written, synced or not.
    pub fn live_bytes(&self) -> Vec<u8> {
        let s = self.state();
        s.live.to_vec(s.len)
    }

    /// The bytes the last sync made durable.
    pub fn durable_bytes(&self) -> Vec<u8> {
        let s = self.state();
        s.durable.to_vec(s.len)
    }

    /// Replaces bytes at `offset`, live and durable, bypassing the power model: for tests that
    /// corrupt a file on purpose.
    pub fn poke(&self, offset: u64, bytes: &[u8]) {
        let mut s = self.state();
        s.len = s.len.max(offset + bytes.len() as u64);
        s.live.write(offset, bytes);
        s.durable.write(offset, bytes);
    }

    /// What this file holds after a power cut, as a new file on the machine powered by `power`:
    /// the durable bytes, plus the live bytes of the unsynced sectors that `torn` keeps.
    pub fn after_crash(&self, power: Arc<Power>, torn: Torn) -> SimFile {
        let s = self.state();
        let mut durable = s.durable.clone();
        let mut rng = match torn {
            Torn::Random(seed) => Some(SplitMix64::new(seed)),
            _ => None,
        };
        for &sector in &s.dirty {
            let keep = match torn {
                Torn::KeepNone => false,
                Torn::KeepAll => true,
                Torn::Random(_) => rng.as_mut().is_some_and(|r| r.next_u64() & 1 == 1),
            };
            if keep {
                durable.copy_sector_from(&s.live, sector);
            }
        }
        durable.truncate(s.len);
        SimFile::with_state(
            power,
            State {
                len: s.len,
                live: durable.clone(),
                durable,
                dirty: BTreeSet::new(),
            },
        )
    }
}

/// Which unsynced sectors survive a simulated power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Torn {
    /// None of them.
    KeepNone,
    /// All of them.
    KeepAll,
    /// Each one with probability 1/2, by a generator seeded with this value.
    Random(u64),
}

impl StoreFile for SimFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.power.check()?;
        let s = self.state();
        let end = offset.checked_add(buf.len() as u64).ok_or_else(eof)?;
        if end > s.len {
            return Err(eof());
        }
        s.live.read(offset, buf);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.power.check()?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset.checked_add(buf.len() as u64).ok_or_else(eof)?;
        let mut s = self.state();
        s.len = s.len.max(end);
        s.live.write(offset, buf);
        s.dirty.extend(offset / SECTOR..=(end - 1) / SECTOR);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.power.sync()?;
        let mut s = self.state();
        let State {
            live,
            durable,
            dirty,
            ..
        } = &mut *s;
        for &sector in dirty.iter() {
            durable.copy_sector_from(live, sector);
        }
        dirty.clear();
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        self.power.check()?;
        Ok(self.state().len)
    }

    fn set_size(&self, len: u64) -> io::Result<()> {
        self.power.check()?;
        let mut s = self.state();
        s.len = len;
        s.live.truncate(len);
        s.durable.truncate(len);
        let limit = len.div_ceil(SECTOR);
        s.dirty.retain(|&d| d < limit);
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.power.check()?;
        if len == 0 {
            return Ok(());
        }
        let end = offset.checked_add(len).ok_or_else(eof)?;
        let mut s = self.state();
        s.len = s.len.max(end);
        // Whole pages become holes; partial ones are written.
        let mut at = offset;
        while at < end {
            let page = at / PAGE;
            let page_end = ((page + 1) * PAGE).min(end);
            if at % PAGE == 0 && page_end - at == PAGE {
                s.live.0.remove(&page);
            } else {
                s.live.write(at, &vec![0u8; (page_end - at) as usize]);
            }
            at = page_end;
        }
        s.dirty.extend(offset / SECTOR..=(end - 1) / SECTOR);
        Ok(())
    }
}

fn eof() -> io::Error {
    io::Error::from(io::ErrorKind::UnexpectedEof)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_sectors_may_be_lost_and_synced_ones_survive() {
        let power = Power::new();
        let f = SimFile::new(power.clone());
        f.write_at(0, &[1; 1024]).expect("write");
        f.sync().expect("sync");
        f.write_at(512, &[2; 1024]).expect("write");
        let none = f.after_crash(Power::new(), Torn::KeepNone);
        let all = f.after_crash(Power::new(), Torn::KeepAll);
        assert_eq!(none.live_bytes()[..1024], [1; 1024]);
        assert_eq!(none.live_bytes()[1024..], [0; 512]);
        assert_eq!(all.live_bytes()[512..], [2; 1024]);
        power.crash_at_sync(power.syncs() + 1);
        f.write_at(0, &[3; 1]).expect("write before the cut");
        assert!(f.sync().is_err(), "the cut sync fails");
        assert!(f.write_at(0, &[4; 1]).is_err(), "everything after it fails");
        assert!(power.is_cut());
    }
}
