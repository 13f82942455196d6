//! parallax-v2 replicated I/O: every write of a block goes to each copy of its extent group,
//! a read falls back to the next copy when one fails (an I/O error, or a copy that fails its
//! checksum: tree nodes, annotation pages and compressed blocks carry one, guest blocks too
//! with data checksums) and rewrites the bad copies from the good one (a repair); the scrub
//! and the check read every copy.

use std::sync::atomic::Ordering;

use dovetail_store::{ExtentId, StoreError};

use super::format::{
    check_compressed, decode_compressed, make_ptr, show_ptr, split_ptr, Class, Group, Node,
    BLOCK_SIZE, NODE_MAGIC,
};
use super::{locate, Inner, State};
use crate::{Error, Result};

/// Judges whether a copy of a block is intact.
type Validator = Box<dyn Fn(&[u8]) -> bool>;

/// Whether the copy of a metadata block (tree node or annotation page) is intact: its own
/// checksum holds.
fn meta_block_ok(b: &[u8]) -> bool {
    if b.len() != BLOCK_SIZE {
        return false;
    }
    if b[..8] == NODE_MAGIC {
        let stored = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        let mut copy = [0u8; BLOCK_SIZE];
        copy.copy_from_slice(b);
        copy[12..16].fill(0);
        return crc32c::crc32c(&copy) == stored;
    }
    dovetail_annotations::page_is_valid(b) || super::sumpage::page_is_valid(b)
}

impl Inner {
    /// Writes `data` at `offset` of `extent` and of every other copy of it.
    pub(super) fn write_copies(&self, extent: ExtentId, offset: u64, data: &[u8]) -> Result<()> {
        match self.members(extent) {
            Some(m) if m.n > 1 => {
                for &e in m.all() {
                    self.space.write(e, offset, data)?;
                }
                Ok(())
            }
            _ => Ok(self.space.write(extent, offset, data)?),
        }
    }

    /// Reads `buf` at `offset` of `extent` from the first copy that reads without an error and
    /// that `valid` accepts, and rewrites the copies that failed from it. `Ok(false)`: no copy
    /// is valid, and `buf` holds the first copy's bytes (for the caller's error message).
    pub(super) fn read_copies(
        &self,
        extent: ExtentId,
        offset: u64,
        buf: &mut [u8],
        valid: &dyn Fn(&[u8]) -> bool,
    ) -> Result<bool> {
        let m = self.members(extent);
        let single = [extent];
        let ids = m.as_ref().map_or(&single[..], |m| m.all());
        let mut bad: [bool; 3] = [false; 3];
        let mut first_err: Option<StoreError> = None;
        for (k, &id) in ids.iter().enumerate() {
            match self.space.read(id, offset, buf) {
                Ok(()) if valid(buf) => {
                    self.repair(ids, &bad[..k], offset, buf);
                    return Ok(true);
                }
                Ok(()) => bad[k] = true,
                Err(e) => {
                    bad[k] = true;
                    first_err.get_or_insert(e);
                }
            }
        }
        // Nothing valid: leave the first copy's bytes for the caller to report on. A copy
        // that failed with an I/O error may read now (the error was transient): if its bytes
        // are valid, this is a good read after all (for guest data, which any bytes are, the
        // caller relies on that).
        match self.space.read(ids[0], offset, buf) {
            Ok(()) => Ok(valid(buf)),
            Err(e) => Err(first_err.unwrap_or(e).into()),
        }
    }

    /// Rewrites the copies marked bad (`bad[k]` for member `k`) with `good`.
    fn repair(&self, ids: &[ExtentId], bad: &[bool], offset: u64, good: &[u8]) {
        for (k, _) in bad.iter().enumerate().filter(|(_, &b)| b) {
            let id = ids[k];
            match self.space.write(id, offset, good) {
                Ok(()) => {
                    self.counters.repairs.fetch_add(1, Ordering::Relaxed);
                    log::warn!(
                        "parallax-v2: {}: repaired the copy at {id}+{offset} ({} bytes) from \
                         another copy",
                        self.space.key(),
                        good.len()
                    );
                }
                Err(e) => log::warn!(
                    "parallax-v2: {}: the copy at {id}+{offset} is bad and could not be \
                     rewritten: {}",
                    self.space.key(),
                    crate::error_chain(&Error::from(e))
                ),
            }
        }
    }

    /// Reads the node block at `ptr` with fallback to its other copies (validated by
    /// [`Node::decode`]).
    pub(super) fn read_node_bytes(
        &self,
        ptr: u64,
        level: u8,
        max_gen: u64,
        buf: &mut [u8; BLOCK_SIZE],
    ) -> Result<()> {
        let (extent, index) = locate(ptr)?;
        let off = u64::from(index) * BLOCK_SIZE as u64;
        if !self.tiered {
            return Ok(self.space.read(extent, off, buf)?);
        }
        let valid = |b: &[u8]| {
            <&[u8; BLOCK_SIZE]>::try_from(b)
                .is_ok_and(|b| Node::decode(b, ptr, level, max_gen).is_ok())
        };
        self.read_copies(extent, off, buf, &valid).map(drop)
    }

    /// Reads `buf` (within one block, or a run of uncompressed blocks) at `off` of the block
    /// at `ptr` as the guest sees it: decompressed, from a good copy.
    pub(super) fn read_data(&self, ptr: u64, off: usize, buf: &mut [u8]) -> Result<()> {
        if self.is_pool(ptr) {
            return self.read_pool(ptr, off, buf);
        }
        let (extent, index) = locate(ptr)?;
        let at = u64::from(index) * BLOCK_SIZE as u64;
        let Some(m) = self.members(extent) else {
            return Ok(self.space.read(extent, at + off as u64, buf)?);
        };
        if !m.kind.compressed {
            if m.n == 1 {
                return Ok(self.space.read(extent, at + off as u64, buf)?);
            }
            if m.kind.class == Class::Meta && off == 0 && buf.len() == BLOCK_SIZE {
                // An annotation page: its checksum says which copy is good.
                if !self.read_copies(extent, at, buf, &meta_block_ok)? {
                    return Err(Error::Corrupt(format!(
                        "metadata block at {}: no copy passes its checksum",
                        show_ptr(ptr)
                    )));
                }
                return Ok(());
            }
            // Guest data has no checksum of its own: fall back on I/O errors only.
            let ok = self.read_copies(extent, at + off as u64, buf, &|_| true)?;
            debug_assert!(ok);
            return Ok(());
        }
        let mut plain = [0u8; BLOCK_SIZE];
        let mut done = 0usize;
        let (mut ptr_index, mut within) = (index, off);
        while done < buf.len() {
            let mut raw = [0u8; BLOCK_SIZE];
            let boff = u64::from(ptr_index) * BLOCK_SIZE as u64;
            let valid = |b: &[u8]| check_compressed(b).is_ok();
            if !self.read_copies(extent, boff, &mut raw, &valid)? {
                let why = decode_compressed(&raw, &mut plain)
                    .err()
                    .unwrap_or_default();
                return Err(Error::Corrupt(format!(
                    "compressed block at {}: {why}",
                    show_ptr(super::format::make_ptr(extent, ptr_index))
                )));
            }
            decode_compressed(&raw, &mut plain).map_err(Error::Corrupt)?;
            self.counters
                .compressed_reads
                .fetch_add(1, Ordering::Relaxed);
            let n = (BLOCK_SIZE - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&plain[within..within + n]);
            done += n;
            within = 0;
            ptr_index += 1;
        }
        Ok(())
    }

    /// Whether the block at `ptr` is stored compressed (so it is never rewritten in place).
    pub(super) fn is_compressed(&self, ptr: u64) -> bool {
        split_ptr(ptr)
            .and_then(|(e, _)| self.members(e))
            .is_some_and(|m| m.kind.compressed)
    }

    /// Blocks in use whose copies need not hold their bytes now: those a captured commit
    /// writes or releases without the state lock (until it ends, they hold what they held
    /// before, maybe an older valid page), and the nodes a failed commit left for the next
    /// one to write. The scrub and the check skip them: comparing their copies could only
    /// "repair" a commit's fresh bytes from stale ones, or report a difference that is not
    /// damage.
    fn unsettled(st: &State) -> std::collections::HashSet<u64> {
        let mut skip = st.persisting.clone();
        skip.extend(st.retry.iter().map(|(p, _)| *p));
        skip.extend(st.punching.iter().copied());
        skip
    }

    /// Problems with the copies of blocks in use: a copy that differs from the primary, a
    /// compressed block that does not decode, a group member not granted to the version.
    pub(super) fn check_copies(&self, st: &State) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.tiered {
            return problems;
        }
        let granted: std::collections::HashSet<u32> =
            self.space.extents().iter().map(|e| e.0).collect();
        let groups = self.groups();
        let per = self.space.extent_size() / BLOCK_SIZE as u64;
        let mut a = vec![0u8; BLOCK_SIZE];
        let mut c = vec![0u8; BLOCK_SIZE];
        let mut plain = [0u8; BLOCK_SIZE];
        let unsettled = Self::unsettled(st);
        for g in &groups.groups {
            for m in &g.members {
                if !granted.contains(&m.0) {
                    problems.push(format!(
                        "{} group member {m} is not granted to the version",
                        g.class.name()
                    ));
                }
            }
            let Some(pos) = st.alloc.position(g.members[0]) else {
                problems.push(format!(
                    "group primary {} is not allocated from",
                    g.members[0]
                ));
                continue;
            };
            if g.members.len() < 2 && !g.compressed {
                continue;
            }
            for i in 0..per {
                if !st.alloc.used.get(pos * per + i)
                    || st.alloc.fresh.get(pos * per + i)
                    || unsettled.contains(&make_ptr(g.members[0], i as u32))
                {
                    continue;
                }
                let off = i * BLOCK_SIZE as u64;
                if let Err(e) = self.space.read(g.members[0], off, &mut a) {
                    problems.push(format!("{}+block {i}: {e}", g.members[0]));
                    continue;
                }
                if g.compressed {
                    if let Err(why) = decode_compressed(&a, &mut plain) {
                        problems.push(format!("compressed block {i} of {}: {why}", g.members[0]));
                    }
                }
                if g.class == Class::Meta && !meta_block_ok(&a) {
                    problems.push(format!(
                        "metadata block {i} of {} fails its checksum",
                        g.members[0]
                    ));
                }
                for m in &g.members[1..] {
                    match self.space.read(*m, off, &mut c) {
                        Ok(()) if c == a => {}
                        Ok(()) => problems.push(format!(
                            "block {i}: the copy on {m} differs from the one on {}",
                            g.members[0]
                        )),
                        Err(e) => problems.push(format!("{m}+block {i}: {e}")),
                    }
                }
            }
        }
        problems
    }

    /// Reads every copy of every block in use in replicated groups and rewrites the bad ones
    /// from a good one; returns the number of copies repaired. Runs under the shared state
    /// lock while a commit may be writing the blocks it captured: those are skipped
    /// ([`unsettled`](Inner::unsettled)), the next scrub sees them written.
    pub(super) fn scrub(&self, st: &State) -> u64 {
        let before = self.counters.repairs.load(Ordering::Relaxed);
        let unsettled = Self::unsettled(st);
        let groups: Vec<Group> = self.groups().groups.clone();
        let per = self.space.extent_size() / BLOCK_SIZE as u64;
        let mut buf = vec![0u8; BLOCK_SIZE];
        for g in groups.iter().filter(|g| g.members.len() > 1) {
            let Some(pos) = st.alloc.position(g.members[0]) else {
                continue;
            };
            for i in 0..per {
                if !st.alloc.used.get(pos * per + i)
                    || st.alloc.fresh.get(pos * per + i)
                    || unsettled.contains(&make_ptr(g.members[0], i as u32))
                {
                    continue;
                }
                let off = i * BLOCK_SIZE as u64;
                // The first copy that is intact wins; then every other copy must equal it.
                let valid: Validator = match (g.class, g.compressed) {
                    (Class::Meta, _) => Box::new(meta_block_ok),
                    (_, true) => Box::new(|b: &[u8]| check_compressed(b).is_ok()),
                    _ => Box::new(|_: &[u8]| true),
                };
                if let Ok(true) = self.read_copies(g.members[0], off, &mut buf, &*valid) {
                    let mut other = vec![0u8; BLOCK_SIZE];
                    let bad: Vec<bool> = g
                        .members
                        .iter()
                        .map(|&m| self.space.read(m, off, &mut other).is_err() || other != buf)
                        .collect();
                    if bad.iter().any(|&b| b) {
                        self.repair(&g.members, &bad, off, &buf);
                    }
                }
            }
        }
        self.counters.repairs.load(Ordering::Relaxed) - before
    }
}
