//! An in-memory [`VersionSpace`] that simulates crashes: it keeps what has been written (live)
//! apart from what a `sync` or `commit_root` made durable, and [`MemSpace::crash`] returns a
//! space holding only the durable state, as after a power cut. For layout tests and proptests.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::space::{ExtentId, Result, StoreError, TierInfo, VersionKey, VersionSpace};

#[derive(Debug, Clone, Default)]
struct State {
    /// Extents granted to this version (durable at once, like the store's grants).
    granted: Vec<ExtentId>,
    /// Extent contents as written.
    live: BTreeMap<ExtentId, Vec<u8>>,
    /// Extent contents as of the last `sync`.
    durable: BTreeMap<ExtentId, Vec<u8>>,
    root: Vec<u8>,
}

/// Extents shared by every `MemSpace` of one simulated store, so that versions see each other's
/// grants (and a write to another version's extent is refused).
#[derive(Debug, Default)]
pub struct MemPool {
    owners: Mutex<BTreeMap<ExtentId, VersionKey>>,
    total: u32,
    /// Tiers: name and extent count, covering the extents in order.
    tiers: Vec<(String, u32)>,
}

impl MemPool {
    /// A pool of `extents` extents.
    pub fn new(extents: u32) -> Arc<MemPool> {
        MemPool::with_tiers(&[("default", extents)])
    }

    /// A pool cut into tiers: `(name, extents)` each, holding consecutive extents in order.
    pub fn with_tiers(tiers: &[(&str, u32)]) -> Arc<MemPool> {
        Arc::new(MemPool {
            owners: Mutex::new(BTreeMap::new()),
            total: tiers.iter().map(|t| t.1).sum(),
            tiers: tiers.iter().map(|(n, c)| (n.to_string(), *c)).collect(),
        })
    }

    /// The extents of tier `t`.
    fn tier_range(&self, t: usize) -> Option<std::ops::Range<u32>> {
        let start: u32 = self.tiers.iter().take(t).map(|x| x.1).sum();
        self.tiers.get(t).map(|x| start..start + x.1)
    }

    fn owners(&self) -> MutexGuard<'_, BTreeMap<ExtentId, VersionKey>> {
        self.owners.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One version's space in a [`MemPool`].
#[derive(Debug)]
pub struct MemSpace {
    key: VersionKey,
    extent_size: u64,
    pool: Arc<MemPool>,
    state: Mutex<State>,
    violations: AtomicU64,
}

impl MemSpace {
    /// A new, empty space for `key`.
    pub fn new(pool: Arc<MemPool>, key: VersionKey, extent_size: u64) -> MemSpace {
        MemSpace {
            key,
            extent_size,
            pool,
            state: Mutex::new(State::default()),
            violations: AtomicU64::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What survives a power cut now: grants, the committed root, and synced data. Writes made
    /// since the last `sync` are lost (their extents read back as they were at that sync).
    pub fn crash(&self) -> MemSpace {
        let s = self.state();
        let state = State {
            granted: s.granted.clone(),
            live: s.durable.clone(),
            durable: s.durable.clone(),
            root: s.root.clone(),
        };
        MemSpace {
            key: self.key,
            extent_size: self.extent_size,
            pool: self.pool.clone(),
            state: Mutex::new(state),
            violations: AtomicU64::new(0),
        }
    }

    /// Grants the lowest free extent of `range`; `full` is the error when there is none.
    fn grant_in(&self, range: std::ops::Range<u32>, full: StoreError) -> Result<ExtentId> {
        let mut owners = self.pool.owners();
        let Some(free) = range.map(ExtentId).find(|e| !owners.contains_key(e)) else {
            return Err(full);
        };
        owners.insert(free, self.key);
        self.state().granted.push(free);
        Ok(free)
    }

    fn bounds(&self, extent: ExtentId, offset: u64, len: usize) -> Result<std::ops::Range<usize>> {
        let oob = StoreError::OutOfBounds {
            extent,
            offset,
            len,
        };
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.extent_size && extent.0 < self.pool.total => {
                Ok(offset as usize..end as usize)
            }
            _ => Err(oob),
        }
    }
}

impl VersionSpace for MemSpace {
    fn key(&self) -> VersionKey {
        self.key
    }

    fn extent_size(&self) -> u64 {
        self.extent_size
    }

    fn extents(&self) -> Vec<ExtentId> {
        self.state().granted.clone()
    }

    fn grant_extent(&self) -> Result<ExtentId> {
        self.grant_in(0..self.pool.total, StoreError::Full)
    }

    fn tiers(&self) -> Vec<TierInfo> {
        let owners = self.pool.owners();
        (0..self.pool.tiers.len())
            .filter_map(|t| {
                let r = self.pool.tier_range(t)?;
                Some(TierInfo {
                    name: self.pool.tiers[t].0.clone(),
                    extents: r.len() as u32,
                    free: r.filter(|&e| !owners.contains_key(&ExtentId(e))).count() as u32,
                })
            })
            .collect()
    }

    fn extent_tier(&self, extent: ExtentId) -> usize {
        (0..self.pool.tiers.len())
            .find(|&t| {
                self.pool
                    .tier_range(t)
                    .is_some_and(|r| r.contains(&extent.0))
            })
            .unwrap_or(0)
    }

    fn grant_extent_on(&self, tier: usize) -> Result<ExtentId> {
        let r = self
            .pool
            .tier_range(tier)
            .ok_or_else(|| StoreError::Invalid(format!("the store has no tier {tier}")))?;
        let full = StoreError::TierFull(self.pool.tiers[tier].0.clone());
        self.grant_in(r, full)
    }

    fn read(&self, extent: ExtentId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let r = self.bounds(extent, offset, buf.len())?;
        match self.state().live.get(&extent) {
            Some(data) => buf.copy_from_slice(&data[r]),
            None => buf.fill(0),
        }
        Ok(())
    }

    fn write(&self, extent: ExtentId, offset: u64, buf: &[u8]) -> Result<()> {
        let r = self.bounds(extent, offset, buf.len())?;
        if self.pool.owners().get(&extent) != Some(&self.key) {
            self.violations.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::GrantViolation {
                key: self.key,
                extent,
                offset,
            });
        }
        let size = self.extent_size as usize;
        self.state()
            .live
            .entry(extent)
            .or_insert_with(|| vec![0; size])[r]
            .copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let mut s = self.state();
        s.durable = s.live.clone();
        Ok(())
    }

    fn root(&self) -> Vec<u8> {
        self.state().root.clone()
    }

    fn commit_root(&self, record: &[u8]) -> Result<()> {
        self.state().root = record.to_vec();
        Ok(())
    }

    fn grant_violations(&self) -> u64 {
        self.violations.load(Ordering::Relaxed)
    }

    fn release_extent(&self, extent: ExtentId) -> Result<()> {
        let mut owners = self.pool.owners();
        if owners.get(&extent) != Some(&self.key) {
            return Err(StoreError::Invalid(format!(
                "{extent} is not granted to {}: it cannot be given back",
                self.key
            )));
        }
        owners.remove(&extent);
        let mut s = self.state();
        s.granted.retain(|&e| e != extent);
        s.live.remove(&extent);
        s.durable.remove(&extent);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_writes_are_lost_in_a_crash_and_synced_ones_survive() {
        let pool = MemPool::new(4);
        let s = MemSpace::new(pool, VersionKey(1), 1 << 16);
        let e = s.grant_extent().expect("grant");
        s.write(e, 0, &[1; 512]).expect("write");
        s.sync().expect("sync");
        s.write(e, 512, &[2; 512]).expect("write");
        s.commit_root(b"root-1").expect("commit");
        let after = s.crash();
        let mut buf = [0u8; 1024];
        after.read(e, 0, &mut buf).expect("read");
        assert_eq!(&buf[..512], &[1; 512]);
        assert_eq!(&buf[512..], &[0; 512]);
        assert_eq!(after.root(), b"root-1");
        assert_eq!(after.extents(), vec![e]);
    }

    #[test]
    fn writes_outside_grants_are_refused_and_counted() {
        let pool = MemPool::new(4);
        let a = MemSpace::new(pool.clone(), VersionKey(1), 1 << 16);
        let b = MemSpace::new(pool, VersionKey(2), 1 << 16);
        let ea = a.grant_extent().expect("grant");
        a.write(ea, 0, &[7; 16]).expect("own extent");
        let err = b.write(ea, 4096, &[9; 16]).expect_err("not granted");
        assert!(
            matches!(err, StoreError::GrantViolation { extent, offset: 4096, .. } if extent == ea)
        );
        assert_eq!(b.grant_violations(), 1);
        let mut buf = [0u8; 16];
        a.read(ea, 4096, &mut buf).expect("read");
        assert_eq!(buf, [0; 16], "nothing written");
        assert!(matches!(
            a.write(ExtentId(9), 0, &[0; 1]),
            Err(StoreError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn a_full_tier_is_named_and_a_full_pool_is_full() {
        let pool = MemPool::with_tiers(&[("fast", 1), ("slow", 2)]);
        let s = MemSpace::new(pool, VersionKey(1), 4096);
        assert_eq!(s.grant_extent_on(0).expect("fast"), ExtentId(0));
        let e = s.grant_extent_on(0).expect_err("fast is full");
        assert!(
            matches!(e, StoreError::TierFull(ref t) if t == "fast"),
            "{e}"
        );
        assert!(e.is_full());
        assert_eq!(s.grant_extent().expect("any"), ExtentId(1));
        assert_eq!(s.grant_extent_on(1).expect("slow"), ExtentId(2));
        assert!(matches!(s.grant_extent(), Err(StoreError::Full)));
        assert!(matches!(s.grant_extent_on(2), Err(StoreError::Invalid(_))));
        assert_eq!(s.extent_tier(ExtentId(1)), 1);
    }
}
