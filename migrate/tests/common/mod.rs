//! Helpers shared by the Tee's integration tests.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dovetail_layout::fault::{FaultLayout, FaultRule};
use dovetail_layout::{BlockLayout, IoBuf, IoBufs, MemLayout, Parallax, Result, Sector, Sectors};
use dovetail_migrate::presence::PresenceMap;
use dovetail_migrate::{Policy, Tee, TeeOptions};
use dovetail_store::mem::{MemPool, MemSpace};
use dovetail_store::{VersionKey, VersionSpace};

pub const BLOCK: usize = 4096;

/// The project's seeded generator, so failures replay exactly.
pub use dovetail_store::rng::SplitMix64 as Rng;

/// Bytes that identify where and when they were written (never all zero).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        out.extend_from_slice(&(r.next_u64() | 1).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A layout wrapper that counts the operations reaching it and can slow writes down.
#[derive(Debug)]
pub struct Probe {
    pub inner: Arc<dyn BlockLayout>,
    pub ops: AtomicU64,
    pub write_delay: Option<Duration>,
    pub read_delay: Option<Duration>,
}

impl Probe {
    pub fn new(inner: Arc<dyn BlockLayout>) -> Probe {
        Probe {
            inner,
            ops: AtomicU64::new(0),
            write_delay: None,
            read_delay: None,
        }
    }

    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::SeqCst)
    }

    fn count(&self) {
        self.ops.fetch_add(1, Ordering::SeqCst);
    }
}

impl BlockLayout for Probe {
    fn capacity(&self) -> Sectors {
        self.inner.capacity()
    }
    fn read(&self, at: Sector, buf: &mut [u8]) -> Result<()> {
        self.count();
        if let Some(d) = self.read_delay {
            std::thread::sleep(d);
        }
        self.inner.read(at, buf)
    }
    fn write(&self, at: Sector, buf: &[u8]) -> Result<()> {
        self.count();
        if let Some(d) = self.write_delay {
            std::thread::sleep(d);
        }
        self.inner.write(at, buf)
    }
    fn flush(&self) -> Result<()> {
        self.count();
        self.inner.flush()
    }
    fn discard(&self, at: Sector, len: Sectors) -> Result<()> {
        self.count();
        self.inner.discard(at, len)
    }
    fn write_zeroes(&self, at: Sector, len: Sectors, unmap: bool) -> Result<()> {
        self.count();
        self.inner.write_zeroes(at, len, unmap)
    }
}

/// Reads the whole of `d`.
pub fn read_all(d: &dyn BlockLayout) -> Vec<u8> {
    let mut buf = vec![0u8; (d.capacity().0 * 512) as usize];
    d.read(Sector(0), &mut buf).expect("read whole disk");
    buf
}

/// A parallax-v1 version on a fresh in-memory space (64 KiB extents).
pub fn parallax(capacity: Sectors) -> (Arc<MemSpace>, Arc<Parallax>) {
    let pool = MemPool::new(1 << 12);
    // Another version owns the first extents, so a write outside the grants hits its data.
    let other = MemSpace::new(pool.clone(), VersionKey(9), 64 << 10);
    let _ = other.grant_extent();
    let space = Arc::new(MemSpace::new(pool, VersionKey(2), 64 << 10));
    let disk = Parallax::create(space.clone(), capacity).expect("create parallax-v1");
    (space, Arc::new(disk))
}

/// A version of `layout` (`parallax-v1`, `parallax-v2`) on a fresh in-memory space, without
/// the annotation timer.
pub fn parallax_of(layout: &str, capacity: Sectors) -> (Arc<MemSpace>, Arc<Parallax>) {
    let pool = MemPool::new(1 << 12);
    let space = Arc::new(MemSpace::new(pool, VersionKey(3), 64 << 10));
    let opts = dovetail_layout::ParallaxOptions {
        persist_every: None,
        ..Default::default()
    };
    let disk = Parallax::create_layout(space.clone(), layout, capacity, opts).expect("create");
    (space, Arc::new(disk))
}

/// A Tee over a `MemLayout` trusted version and a candidate made of `candidate`, with an
/// in-memory presence map.
pub fn tee_over(
    trusted: Arc<dyn BlockLayout>,
    candidate: Arc<dyn BlockLayout>,
    opts: TeeOptions,
) -> Tee {
    let blocks = (trusted.capacity().0 * 512).div_ceil(BLOCK as u64);
    let presence = Arc::new(PresenceMap::in_memory(blocks));
    Tee::new(trusted, candidate, presence, opts).expect("tee")
}

/// The candidate of the policy × fault matrix: parallax-v1 on a `MemSpace`, under a
/// `FaultLayout` with `rule` (if any), under a `Probe`.
pub struct Rig {
    pub trusted: Arc<MemLayout>,
    pub probe: Arc<Probe>,
    pub fault: Arc<FaultLayout>,
    pub tee: Tee,
}

pub fn rig(
    policy: Policy,
    capacity: Sectors,
    rule: Option<&str>,
    opts: impl FnOnce(&mut TeeOptions),
) -> Rig {
    let trusted = Arc::new(MemLayout::new(capacity));
    let (space, cand) = parallax(capacity);
    let rules: Vec<FaultRule> = rule
        .map(|r| vec![r.parse().expect("fault rule")])
        .unwrap_or_default();
    let fault = Arc::new(FaultLayout::new(cand, rules, 7).with_space(space));
    let probe = Arc::new(Probe::new(fault.clone()));
    let mut o = TeeOptions::new("vda", policy);
    opts(&mut o);
    // Under barrier-writes-async the trusted version is slow to read, so read checks are still
    // pending when the next write arrives (the case the barrier exists for) rather than
    // finished, and a quarantine racing with a write is unlikely.
    let mut t = Probe::new(trusted.clone());
    if policy == Policy::BarrierWritesAsync {
        t.read_delay = Some(Duration::from_millis(2));
    }
    let tee = tee_over(Arc::new(t), probe.clone(), o);
    Rig {
        trusted,
        probe,
        fault,
        tee,
    }
}

/// Polls `f` until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    f()
}

/// Applies a write to a model.
pub fn apply(model: &mut [u8], at: u64, data: &[u8]) {
    let s = (at * 512) as usize;
    model[s..s + data.len()].copy_from_slice(data);
}

/// Bytes in which `a` and `b` differ.
pub fn diff(a: &[u8], b: &[u8]) -> u64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as u64
}

/// `write_from` with `data` split into two scattered buffers (copied, so the caller's slice is
/// never aliased).
pub fn write_scattered(d: &dyn BlockLayout, at: u64, data: &[u8]) -> Result<()> {
    let cut = data.len() / 3;
    let mut a = data[..cut].to_vec();
    let mut b = data[cut..].to_vec();
    let list = [
        IoBuf {
            ptr: a.as_mut_ptr(),
            len: a.len(),
        },
        IoBuf {
            ptr: b.as_mut_ptr(),
            len: b.len(),
        },
    ];
    // SAFETY: `a` and `b` live until the end of this function and are not otherwise accessed
    // while `bufs` is in use.
    let bufs = unsafe { IoBufs::new(&list) };
    let mut scratch = Vec::new();
    d.write_from(Sector(at), bufs, &mut scratch)
}

/// `read_into` two scattered buffers; returns what was read.
pub fn read_scattered(d: &dyn BlockLayout, at: u64, len: usize) -> Result<Vec<u8>> {
    let cut = len / 3;
    let mut a = vec![0u8; cut];
    let mut b = vec![0u8; len - cut];
    let list = [
        IoBuf {
            ptr: a.as_mut_ptr(),
            len: a.len(),
        },
        IoBuf {
            ptr: b.as_mut_ptr(),
            len: b.len(),
        },
    ];
    // SAFETY: `a` and `b` live until the end of this function and are not otherwise accessed
    // while `bufs` is in use.
    let bufs = unsafe { IoBufs::new(&list) };
    let mut scratch = Vec::new();
    d.read_into(Sector(at), bufs, &mut scratch)?;
    a.extend_from_slice(&b);
    Ok(a)
}
