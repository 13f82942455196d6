//! The shared pool of single-instance blocks (format version 6; docs/format.md, *Shared
//! pool*): extents granted to [`POOL_KEY`] (so no version's write passes the grant check
//! there), cut into 4 KiB blocks that versions hold instead of writing identical blocks of
//! their own.
//!
//! The durable truth is in the catalog ([`Pool`]): the pool's extents, each block's crc32c and,
//! per version, the blocks it holds. A version's holds change only in the metadata commit of
//! its root record ([`Store::commit_root_cut`]), so the root that references a block and the
//! hold that keeps it allocated are durable together or not at all: no crash can free a block a
//! committed root references, nor leave one held that no committed root took (as long as the
//! layout holds exactly what its roots reference, which `store check` verifies).
//!
//! In memory ([`PoolMem`]): the content index (crc32c to pool blocks, rebuilt at open from the
//! recorded checksums, so no block is read to rebuild it), each block's durable and current
//! holder counts, each version's current holds and its pending shares and releases in call
//! order (a commit applies those before its cut).

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::format::{Holder, Pool, POOL_KEY, SHARED_BLOCK, SHARED_VERSION};
use crate::space::SharedRef;

/// A pending change of one version's holds: its number in the store's sequence, whether it
/// adds (share) or drops (release), and the pool block.
type Op = (u64, bool, u32);

/// The pool's in-memory state (see the module's comment). Guarded by `Store::pool`, taken
/// after the catalog lock when both are needed.
#[derive(Debug, Default)]
pub(super) struct PoolMem {
    enabled: bool,
    bpe: u32,
    extents: Vec<u32>,
    /// crc32c of each block in use.
    crc: Vec<u32>,
    /// Versions holding each block in the newest durable catalog.
    durable: Vec<u32>,
    /// Versions holding each block now (durable holds, minus pending releases, plus pending
    /// shares).
    current: Vec<u32>,
    /// Per block, the shares of it not yet committed nor dropped (in `ops`): a commit in
    /// flight may be recording one of them (its cut was taken before a release that came
    /// after), so the block stays in use until the commit that applies it is done.
    pending: Vec<u32>,
    /// crc32c to the blocks in use with it.
    index: HashMap<u32, Vec<u32>>,
    /// Each version's current holds.
    held: HashMap<u64, BTreeSet<u32>>,
    /// Each version's pending changes, in call order.
    ops: HashMap<u64, Vec<Op>>,
    seq: u64,
    /// Per tier: pool writes done, and the count a successful sync covered (any sync of the
    /// tier's file, a version's included: [`Store::sync_tier_locked`]).
    pub(super) written: Vec<u64>,
    synced: Vec<u64>,
    /// Per block: its tier's `written` count right after the block's latest write (0 for a
    /// block written before the store was opened, durable since): a commit holding it needs
    /// the tier's `synced` at least this.
    mark: Vec<u64>,
    /// A sync of a tier file failed with pool writes not yet durable: they may be lost, so no
    /// commit may take a hold on a block written since (until the store is reopened).
    lost: bool,
    /// No block below this one is free (where the search for a free block starts).
    free_from: u32,
    /// The disk of each version of the catalog (blocks are shared within a disk only), kept
    /// by every commit that adds or removes versions.
    disks: HashMap<u64, String>,
}

/// The pool at a glance ([`Store::pool_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStatus {
    /// Single-instance blocks are on.
    pub enabled: bool,
    /// Extents granted to the pool.
    pub extents: u32,
    /// Pool blocks in use (held, durably or pending, by at least one version).
    pub used: u64,
    /// Holds in all (a block held by three versions counts three): `refs - used` blocks were
    /// saved.
    pub refs: u64,
}

impl PoolMem {
    pub(super) fn from_meta(pool: &Pool, tiers: usize) -> PoolMem {
        let n = pool.blocks() as usize;
        let mut m = PoolMem {
            enabled: pool.enabled,
            bpe: pool.blocks_per_extent,
            extents: pool.extents.clone(),
            crc: pool.crcs.clone(),
            durable: vec![0; n],
            current: vec![0; n],
            pending: vec![0; n],
            mark: vec![0; n],
            written: vec![0; tiers],
            synced: vec![0; tiers],
            ..PoolMem::default()
        };
        m.crc.resize(n, 0);
        for h in &pool.holders {
            let set: BTreeSet<u32> = h.blocks().filter(|&p| (p as usize) < n).collect();
            for &p in &set {
                m.durable[p as usize] += 1;
                m.current[p as usize] += 1;
            }
            m.held.insert(h.key, set);
        }
        for p in 0..n as u32 {
            if m.current[p as usize] > 0 {
                m.index.entry(m.crc[p as usize]).or_default().push(p);
            }
        }
        m
    }

    /// Takes the versions' disks from catalog `meta` if its versions changed.
    pub(super) fn note_versions(&mut self, meta: &Meta) {
        let same = self.disks.len() == meta.versions.len()
            && meta
                .versions
                .iter()
                .all(|v| self.disks.contains_key(&v.key));
        if !same {
            self.disks = meta
                .versions
                .iter()
                .map(|v| (v.key, v.disk.clone()))
                .collect();
        }
    }

    /// The other versions of version `key`'s disk.
    fn siblings(&self, key: u64) -> Vec<u64> {
        let Some(disk) = self.disks.get(&key) else {
            return Vec::new();
        };
        self.disks
            .iter()
            .filter(|(&k, d)| k != key && *d == disk)
            .map(|(&k, _)| k)
            .collect()
    }

    fn in_use(&self, p: u32) -> bool {
        self.durable[p as usize] > 0 || self.current[p as usize] > 0 || self.pending[p as usize] > 0
    }

    fn place(&self, p: u32) -> (u32, u32) {
        (self.extents[(p / self.bpe) as usize], p % self.bpe)
    }

    fn block_of(&self, r: SharedRef) -> Option<u32> {
        if r.block >= self.bpe {
            return None;
        }
        let pos = self.extents.iter().position(|&e| e == r.extent.0)?;
        Some(pos as u32 * self.bpe + r.block)
    }

    fn shared_ref(&self, p: u32) -> SharedRef {
        let (e, i) = self.place(p);
        SharedRef {
            extent: ExtentId(e),
            block: i,
        }
    }

    /// The lowest free block (blocks are filled from the pool's start, so the pool grows only
    /// when every block is in use). The search starts at `free_from`, below which every block
    /// is in use: a scan from 0 on every share would cost time in the pool's size.
    fn find_free(&mut self) -> Option<u32> {
        let n = self.current.len() as u32;
        let p = (self.free_from.min(n)..n).find(|&p| !self.in_use(p));
        self.free_from = p.unwrap_or(n);
        p
    }

    /// Forgets block `p` once nobody holds it (it is free).
    fn free_if_unused(&mut self, p: u32) {
        if self.in_use(p) {
            return;
        }
        let crc = self.crc[p as usize];
        if let Some(v) = self.index.get_mut(&crc) {
            v.retain(|&x| x != p);
            if v.is_empty() {
                self.index.remove(&crc);
            }
        }
        self.crc[p as usize] = 0;
        self.free_from = self.free_from.min(p);
    }

    fn add(&mut self, key: u64, p: u32) {
        self.seq += 1;
        let seq = self.seq;
        self.held.entry(key).or_default().insert(p);
        self.current[p as usize] += 1;
        self.pending[p as usize] += 1;
        self.ops.entry(key).or_default().push((seq, true, p));
    }
}

impl Store {
    pub(super) fn pool_mem(&self) -> MutexGuard<'_, PoolMem> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether versions of this store may share blocks.
    pub fn single_instance(&self) -> bool {
        self.pool_mem().enabled
    }

    /// The pool's extents, used blocks and holds.
    pub fn pool_status(&self) -> PoolStatus {
        let m = self.pool_mem();
        PoolStatus {
            enabled: m.enabled,
            extents: m.extents.len() as u32,
            used: (0..m.current.len() as u32).filter(|&p| m.in_use(p)).count() as u64,
            refs: m.held.values().map(|s| s.len() as u64).sum(),
        }
    }

    /// Turns single-instance blocks on for this store, durably: a format-5 store is upgraded
    /// in place to format 6 (two synced steps, as every upgrade: docs/format.md, *Upgrade from
    /// format version 5*), which needs this to be the only handle on the store (it is reopened
    /// on the same files and returned); a format-6 store commits the flag. A store of an older
    /// format is refused (open it read-write first: it is upgraded to 5).
    pub fn enable_single_instance(self: Arc<Self>) -> Result<Arc<Store>> {
        self.writable()?;
        if self.header.version >= SHARED_VERSION {
            let mut st = self.lock_state();
            if !st.meta.pool.enabled {
                let mut new = st.meta.clone();
                new.pool.enabled = true;
                new.pool.blocks_per_extent = (self.header.extent_size / SHARED_BLOCK) as u32;
                self.commit(&mut st, new)?;
                let mut m = self.pool_mem();
                m.enabled = true;
                m.bpe = st.meta.pool.blocks_per_extent;
            }
            drop(st);
            return Ok(self);
        }
        if self.header.version != ATTACH_VERSION {
            return Err(StoreError::Invalid(format!(
                "single-instance blocks need a store of format version {ATTACH_VERSION} or \
                 {SHARED_VERSION}; this one is version {} (a read-write open upgrades it to \
                 {ATTACH_VERSION} first)",
                self.header.version
            )));
        }
        let store = Arc::try_unwrap(self).map_err(|_| {
            StoreError::Invalid(
                "the store is in use (another handle is open): single-instance blocks are \
                 turned on with the store to itself"
                    .into(),
            )
        })?;
        let st = store.state.into_inner().unwrap_or_else(|p| p.into_inner());
        let mut meta = st.meta.clone();
        meta.pool = Pool {
            enabled: true,
            blocks_per_extent: (store.header.extent_size / SHARED_BLOCK) as u32,
            ..Pool::default()
        };
        upgrade(
            &*store.meta_file,
            &store.header,
            &meta,
            st.newest,
            st.generation,
            SHARED_VERSION,
        )?;
        info!(
            "{}: upgraded the store from format version {ATTACH_VERSION} to {SHARED_VERSION} \
             (single-instance blocks on)",
            store.location.display()
        );
        let data = store.tiers.into_iter().map(|t| t.file).collect();
        Store::load_as(
            store.meta_file,
            data,
            store.location,
            store.dir,
            false,
            false,
        )
    }

    /// Grants one more extent to the pool (the lowest free one), zeroed, in one metadata
    /// commit that also widens every holder's bitmap and the checksum table.
    fn grow_pool(&self) -> Result<()> {
        self.writable()?;
        let e = {
            let st = self.lock_state();
            let mut granting = self.granting.lock().unwrap_or_else(|p| p.into_inner());
            let Some(e) = (0..self.header.extent_count)
                .find(|&e| st.meta.owners.get(e as usize) == Some(&0) && !granting.contains(&e))
            else {
                return Err(StoreError::Full);
            };
            granting.push(e);
            e
        };
        let done = (|| {
            let size = self.header.extent_size;
            let t = &self.tiers[self.tier_of(e)];
            t.file
                .zero_range(u64::from(e - t.first) * size, size)
                .map_err(io_err(format!(
                    "zeroing extent {e} (tier {}) before adding it to the shared pool",
                    t.name
                )))?;
            let mut st = self.lock_state();
            if st.meta.owners.get(e as usize) != Some(&0) {
                return Err(StoreError::Invalid(format!(
                    "extent {e} was taken while being zeroed for the shared pool"
                )));
            }
            let mut new = st.meta.clone();
            new.owners[e as usize] = POOL_KEY;
            new.pool.extents.push(e);
            let n = new.pool.blocks() as usize;
            new.pool.crcs.resize(n, 0);
            let len = new.pool.bitmap_len();
            for h in &mut new.pool.holders {
                h.held.resize(len, 0);
            }
            self.commit(&mut st, new)?;
            self.grants_write()[e as usize] = POOL_KEY;
            let mut m = self.pool_mem();
            m.extents.push(e);
            m.crc.resize(n, 0);
            m.durable.resize(n, 0);
            m.current.resize(n, 0);
            m.pending.resize(n, 0);
            m.mark.resize(n, 0);
            debug!("added extent {e} to the shared pool ({n} blocks)");
            Ok(())
        })();
        self.granting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&g| g != e);
        done
    }

    /// [`VersionSpace::share`] for version `key`.
    pub(super) fn share(&self, key: VersionKey, data: &[u8]) -> Result<Option<SharedRef>> {
        if data.len() as u64 != SHARED_BLOCK {
            return Err(StoreError::Invalid(format!(
                "a shared block is {SHARED_BLOCK} bytes, not {}",
                data.len()
            )));
        }
        if !self.single_instance() || self.read_only {
            return Ok(None);
        }
        let crc = crc32c::crc32c(data);
        // Blocks are shared among the versions of one disk only: a guest whose write finds a
        // block another disk holds (it completes without a data write) could otherwise learn
        // what another tenant's disk contains.
        let mut tmp = vec![0u8; SHARED_BLOCK as usize];
        loop {
            let mut m = self.pool_mem();
            if m.lost {
                return Err(StoreError::Io {
                    op: "sharing a block".into(),
                    source: io::Error::other(
                        "a sync of the shared pool failed earlier: blocks written since may \
                         be lost, so the pool takes no more until the store is reopened",
                    ),
                });
            }
            // A guest can make blocks of one crc32c on purpose: the candidates looked at and
            // compared are bounded (past them, a new block is written).
            let siblings = m.siblings(key.0);
            let candidates: Vec<u32> = m
                .index
                .get(&crc)
                .map(|v| v.iter().rev().take(64).copied().collect())
                .unwrap_or_default();
            let mut compared = 0;
            for &p in &candidates {
                if m.held.get(&key.0).is_some_and(|s| s.contains(&p)) {
                    return Ok(None);
                }
                if !siblings
                    .iter()
                    .any(|k| m.held.get(k).is_some_and(|s| s.contains(&p)))
                {
                    continue;
                }
                compared += 1;
                if compared > 8 {
                    break;
                }
                let (e, i) = m.place(p);
                let (t, at) = self.locate(ExtentId(e), u64::from(i) * SHARED_BLOCK, tmp.len())?;
                self.tiers[t]
                    .file
                    .read_at(at, &mut tmp)
                    .map_err(io_err(format!("reading shared block {i} of extent {e}")))?;
                if tmp == data {
                    m.add(key.0, p);
                    return Ok(Some(m.shared_ref(p)));
                }
            }
            if let Some(p) = m.find_free() {
                let (e, i) = m.place(p);
                let (t, at) = self.locate(ExtentId(e), u64::from(i) * SHARED_BLOCK, data.len())?;
                crate::failpoint::hit("store-share-write");
                self.tiers[t]
                    .file
                    .write_at(at, data)
                    .map_err(io_err(format!("writing shared block {i} of extent {e}")))?;
                m.written[t] += 1;
                m.mark[p as usize] = m.written[t];
                m.crc[p as usize] = crc;
                m.index.entry(crc).or_default().push(p);
                m.add(key.0, p);
                return Ok(Some(m.shared_ref(p)));
            }
            drop(m);
            match self.grow_pool() {
                Ok(()) => continue,
                Err(e) if e.is_full() || matches!(e, StoreError::MetadataFull { .. }) => {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// [`VersionSpace::release_shared`] for version `key`.
    pub(super) fn release_shared(&self, key: VersionKey, r: SharedRef) -> Result<()> {
        let mut m = self.pool_mem();
        let p = m
            .block_of(r)
            .filter(|p| m.held.get(&key.0).is_some_and(|s| s.contains(p)))
            .ok_or_else(|| {
                StoreError::Invalid(format!("{key} does not hold {r}: it cannot release it"))
            })?;
        if let Some(s) = m.held.get_mut(&key.0) {
            s.remove(&p);
        }
        m.current[p as usize] -= 1;
        m.seq += 1;
        let seq = m.seq;
        m.ops.entry(key.0).or_default().push((seq, false, p));
        m.free_if_unused(p);
        Ok(())
    }

    pub(super) fn holds_shared(&self, key: VersionKey, r: SharedRef) -> bool {
        let m = self.pool_mem();
        m.block_of(r)
            .is_some_and(|p| m.held.get(&key.0).is_some_and(|s| s.contains(&p)))
    }

    pub(super) fn held_shared(&self, key: VersionKey) -> Vec<SharedRef> {
        let m = self.pool_mem();
        let mut v: Vec<SharedRef> = m
            .held
            .get(&key.0)
            .map(|s| s.iter().map(|&p| m.shared_ref(p)).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Reads shared block `r` and checks it against its recorded crc32c.
    pub fn read_shared(&self, r: SharedRef, buf: &mut [u8]) -> Result<()> {
        if buf.len() as u64 != SHARED_BLOCK {
            return Err(StoreError::Invalid(format!(
                "a shared block is {SHARED_BLOCK} bytes, not {}",
                buf.len()
            )));
        }
        let expected = {
            let m = self.pool_mem();
            let p = m
                .block_of(r)
                .ok_or_else(|| StoreError::Invalid(format!("{r} is not in the shared pool")))?;
            m.crc[p as usize]
        };
        let (t, at) = self.locate(r.extent, u64::from(r.block) * SHARED_BLOCK, buf.len())?;
        self.tiers[t]
            .file
            .read_at(at, buf)
            .map_err(io_err(format!("reading {r}")))?;
        let found = crc32c::crc32c(buf);
        if found != expected {
            return Err(StoreError::SharedCorrupt {
                block: r,
                expected,
                found,
            });
        }
        Ok(())
    }

    pub(super) fn shared_cut(&self) -> u64 {
        self.pool_mem().seq + 1
    }

    /// After a sync of tier `t`'s file that started when the pool had written `written`
    /// blocks there: those are durable if it succeeded; if it failed and some were not covered
    /// yet, they may be lost.
    pub(super) fn pool_synced(&self, t: usize, written: u64, ok: bool) {
        let mut m = self.pool_mem();
        if t >= m.synced.len() {
            return;
        }
        if ok {
            m.synced[t] = m.synced[t].max(written);
        } else if m.written[t] > m.synced[t] {
            m.lost = true;
        }
    }

    /// Makes the pool writes a commit is to hold durable: per tier, every write up to
    /// `need[t]` (a sync of the tier's file since, a version's own included, covered them).
    fn sync_pool(&self, need: &[u64]) -> Result<()> {
        for t in 0..self.tiers.len() {
            let want = need.get(t).copied().unwrap_or(0);
            if self.pool_mem().synced[t] >= want {
                continue;
            }
            let _one = self.tiers[t]
                .sync_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let covered = {
                let m = self.pool_mem();
                if m.synced[t] >= want {
                    continue;
                }
                m.written[t]
            };
            crate::failpoint::hit("store-pool-sync");
            if let Err(e) = self.sync_tier_locked(t) {
                self.pool_mem().lost = true;
                return Err(StoreError::Io {
                    op: format!(
                        "syncing the shared pool's blocks in tier {}",
                        self.tiers[t].name
                    ),
                    source: e,
                });
            }
            let mut m = self.pool_mem();
            m.synced[t] = m.synced[t].max(covered);
        }
        Ok(())
    }

    /// Commits version `key`'s root record together with its shares and releases made before
    /// `cut` ([`u64::MAX`]: all), in one metadata commit.
    pub(super) fn commit_root_cut(&self, key: VersionKey, record: &[u8], cut: u64) -> Result<()> {
        self.writable()?;
        if record.len() > MAX_ROOT {
            return Err(StoreError::RootTooLarge {
                len: record.len(),
                max: MAX_ROOT,
            });
        }
        // Per tier, the pool writes the blocks this commit starts holding need durable (a
        // sync of the tier since, such as the layout's own before its commit, may cover them).
        let (adds, need) = {
            let m = self.pool_mem();
            let mut need = vec![0u64; self.tiers.len()];
            let mut adds = false;
            for &(s, add, p) in m.ops.get(&key.0).map_or(&[][..], |o| &o[..]) {
                if add && s < cut {
                    adds = true;
                    let (e, _) = m.place(p);
                    let t = self.tier_of(e);
                    need[t] = need[t].max(m.mark[p as usize]);
                }
            }
            (adds, need)
        };
        if adds {
            self.sync_pool(&need)?;
        }
        let mut st = self.lock_state();
        let i = st
            .meta
            .version_index(key.0)
            .map_err(|_| StoreError::NoSuchVersion(key))?;
        let mut new = st.meta.clone();
        new.versions[i].root = record.to_vec();
        let mut m = self.pool_mem();
        if adds && m.lost {
            return Err(StoreError::Io {
                op: format!("committing {key}'s root record"),
                source: io::Error::other(
                    "a sync of the shared pool failed: blocks this commit would hold may be \
                     lost (reopen the store)",
                ),
            });
        }
        let applied: Vec<Op> = m
            .ops
            .get(&key.0)
            .map(|o| o.iter().copied().filter(|&(s, _, _)| s < cut).collect())
            .unwrap_or_default();
        // The holder's bitmap changed bit by bit, for the blocks the ops touch only (a
        // version may hold every block of a large disk: its whole set is not rebuilt per
        // commit, with the pool's lock held).
        let mut added: Vec<u32> = Vec::new();
        let mut gone: Vec<u32> = Vec::new();
        if !applied.is_empty() {
            let len = new.pool.bitmap_len();
            let pos = new.pool.holders.binary_search_by_key(&key.0, |h| h.key);
            let mut held = match pos {
                Ok(j) => std::mem::take(&mut new.pool.holders[j].held),
                Err(_) => Vec::new(),
            };
            held.resize(len, 0);
            let bit = |held: &[u8], p: u32| held[(p / 8) as usize] & (1 << (p % 8)) != 0;
            let mut touched: BTreeMap<u32, bool> = BTreeMap::new();
            for &(_, add, p) in &applied {
                touched.entry(p).or_insert_with(|| bit(&held, p));
                if add {
                    held[(p / 8) as usize] |= 1 << (p % 8);
                } else {
                    held[(p / 8) as usize] &= !(1 << (p % 8));
                }
            }
            for (&p, &was) in &touched {
                match (was, bit(&held, p)) {
                    (false, true) => {
                        added.push(p);
                        new.pool.crcs[p as usize] = m.crc[p as usize];
                    }
                    (true, false) => {
                        gone.push(p);
                        if m.durable[p as usize] == 1 {
                            new.pool.crcs[p as usize] = 0;
                        }
                    }
                    _ => {}
                }
            }
            let empty = held.iter().all(|&b| b == 0);
            match (pos, empty) {
                (Ok(j), true) => {
                    new.pool.holders.remove(j);
                }
                (Ok(j), false) => new.pool.holders[j].held = held,
                (Err(_), true) => {}
                (Err(j), false) => new.pool.holders.insert(j, Holder { key: key.0, held }),
            }
        }
        crate::failpoint::hit("store-commit-root-shared");
        // The pool's lock is not held across the metadata write and its sync (the guests'
        // writes share blocks under it meanwhile): the blocks this commit starts holding count
        // as durable from here, so none of them can be found free and written over while the
        // commit runs (a release of one after the cut only lowers its current count); a failed
        // commit takes that back.
        for &p in &added {
            m.durable[p as usize] += 1;
        }
        drop(m);
        let committed = self.commit(&mut st, new);
        let mut m = self.pool_mem();
        if let Err(e) = committed {
            for &p in &added {
                m.durable[p as usize] -= 1;
                m.free_if_unused(p);
            }
            return Err(e);
        }
        if !applied.is_empty() {
            if let Some(o) = m.ops.get_mut(&key.0) {
                o.retain(|&(s, _, _)| s >= cut);
            }
            for p in gone {
                m.durable[p as usize] -= 1;
                m.free_if_unused(p);
            }
            // The shares this commit applied are no longer pending: a block shared and let go
            // again (before or after the cut) is free once nothing else holds it.
            for &(_, add, p) in &applied {
                if add {
                    m.pending[p as usize] -= 1;
                    m.free_if_unused(p);
                }
            }
        }
        Ok(())
    }

    /// After a commit that removed versions: their holds (durable and pending) are gone with
    /// them, and the blocks nobody else holds are free.
    pub(super) fn pool_forget_removed(&self, meta: &Meta) {
        let mut m = self.pool_mem();
        let gone: Vec<u64> = m
            .held
            .keys()
            .chain(m.ops.keys())
            .copied()
            .filter(|&k| meta.version(k).is_none())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if gone.is_empty() {
            return;
        }
        for k in gone {
            for (_, add, p) in m.ops.remove(&k).unwrap_or_default() {
                if add {
                    m.pending[p as usize] -= 1;
                }
            }
            if let Some(set) = m.held.remove(&k) {
                for p in set {
                    m.current[p as usize] -= 1;
                }
            }
        }
        let n = m.durable.len();
        let mut durable = vec![0u32; n];
        for h in &meta.pool.holders {
            for p in h.blocks().filter(|&p| (p as usize) < n) {
                durable[p as usize] += 1;
            }
        }
        m.durable = durable;
        for p in 0..n as u32 {
            m.free_if_unused(p);
        }
    }
}
