//! parallax-v2 tiering: block classes, extent groups (replication), compressed cold blocks,
//! self-healing reads, and the mover that places blocks as their class policy says.
//!
//! A version's extents are gathered into *groups* of 1 to 3 extents holding the same blocks:
//! block `i` of a group is block `i` of every member. Tree pointers name the first member (the
//! primary); every write goes to all members, and a read that fails (an I/O error, or a copy
//! that fails its checksum: tree nodes, annotation pages and compressed blocks carry one)
//! falls back to the next member and rewrites the bad copies from the good one (a repair).
//! Each group has a class (metadata, hot or cold data) and was made under that class's policy
//! (copies, the tier of the primary, compression); groups are recorded in the root record, so
//! they are committed with the tree. Blocks only move by the tree's own copy-on-write: the
//! mover copies a block into a group of the class it should be in, switches the pointer, and
//! the old block is freed by the next commit, so a crash at any point leaves either the old
//! placement or the new one, never a lost block.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, Instant};

use dovetail_store::{ExtentId, StoreError, TierInfo};

use super::alloc::Bitmap;
use super::cache::NodeCache;
use super::format::{
    check_compressed, decode_compressed, encode_compressed, show_ptr, span, split_ptr, Class,
    Group, Node, TierPolicy, Tiering, BLOCK_SIZE, NODE_MAGIC, NULL,
};
use super::{locate, Inner, Parallax, State};
use crate::{Error, Result};

/// Judges whether a copy of a block is intact.
type Validator = Box<dyn Fn(&[u8]) -> bool>;

/// Which groups a block may be allocated in: a class, and whether blocks are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Kind {
    pub class: Class,
    pub compressed: bool,
}

impl Kind {
    pub const META: Kind = Kind {
        class: Class::Meta,
        compressed: false,
    };
    pub const HOT: Kind = Kind {
        class: Class::Hot,
        compressed: false,
    };
}

/// The copies of one block's extent.
#[derive(Debug, Clone, Copy)]
pub(super) struct Members {
    ids: [ExtentId; 3],
    n: u8,
    pub kind: Kind,
}

impl Members {
    pub fn all(&self) -> &[ExtentId] {
        &self.ids[..usize::from(self.n)]
    }
}

/// The extent groups of a version, with an index from extent to group.
#[derive(Debug, Default)]
pub(super) struct GroupMap {
    pub groups: Vec<Group>,
    /// By extent id: group index + 1 (0: in no group).
    by_extent: Vec<u32>,
}

impl GroupMap {
    pub fn new(groups: Vec<Group>) -> GroupMap {
        let mut m = GroupMap::default();
        for g in groups {
            m.push(g);
        }
        m
    }

    pub fn push(&mut self, g: Group) -> usize {
        let i = self.groups.len();
        for e in &g.members {
            let at = e.0 as usize;
            if self.by_extent.len() <= at {
                self.by_extent.resize(at + 1, 0);
            }
            self.by_extent[at] = i as u32 + 1;
        }
        self.groups.push(g);
        i
    }

    pub fn group_of(&self, e: ExtentId) -> Option<usize> {
        match self.by_extent.get(e.0 as usize) {
            Some(&g) if g > 0 => Some(g as usize - 1),
            _ => None,
        }
    }

    pub fn members(&self, e: ExtentId) -> Option<Members> {
        let g = &self.groups[self.group_of(e)?];
        let mut ids = [ExtentId(0); 3];
        for (d, s) in ids.iter_mut().zip(&g.members) {
            *d = *s;
        }
        Some(Members {
            ids,
            n: g.members.len().min(3) as u8,
            kind: Kind {
                class: g.class,
                compressed: g.compressed,
            },
        })
    }
}

/// What the mover knows about each guest block's temperature (memory only: after a restart
/// every block starts lukewarm, neither hot nor cold).
#[derive(Debug, Default)]
pub(super) struct Temps {
    /// `reads + writes` at the last observation.
    heat: Vec<u64>,
    /// Seconds since `start` of the last observed access.
    touched: Vec<u32>,
    /// Accessed at least `hot_accesses` times between the last two observations.
    hot: Bitmap,
    /// Found not to compress into one block.
    incompressible: Bitmap,
    start: Option<Instant>,
    /// Where the next pass resumes (a guest block).
    cursor: u64,
    /// Whether the tree's nodes were checked against the metadata policy this round.
    nodes_checked: bool,
}

/// A block the mover chose to move: disk block `b`, which pointed at `old` when chosen, from
/// class `from` to `to`.
#[derive(Debug, Clone, Copy)]
struct Move {
    b: u64,
    old: u64,
    from: Class,
    to: Kind,
}

/// A copy the mover made: `new` holds the bytes of `m.b`'s block, as `kind` (uncompressed
/// when the block would not compress).
#[derive(Debug, Clone, Copy)]
struct Copied {
    m: Move,
    new: u64,
    kind: Kind,
}

/// What copying one block came to.
enum CopyOutcome {
    Made(Copied),
    /// The block was written (or discarded) since it was chosen: left to the next round.
    Changed,
    /// No room where the policy says.
    NoRoom,
}

/// Counters of the tiering machinery.
#[derive(Debug, Default)]
pub(super) struct TierCounters {
    pub repairs: AtomicU64,
    pub promoted: AtomicU64,
    pub demoted: AtomicU64,
    pub placed: AtomicU64,
    pub compressed_reads: AtomicU64,
}

/// What one call of [`Parallax::tier_pass`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Guest blocks looked at.
    pub scanned: u64,
    /// Blocks moved to the hot class.
    pub promoted: u64,
    /// Blocks moved to the cold class.
    pub demoted: u64,
    /// Blocks (and tree nodes) moved to follow their class's policy (copies, tier).
    pub placed: u64,
    /// Blocks that should move but found no room on the tier their policy names.
    pub no_room: u64,
    /// Whether the pass reached the end of the disk (a round is complete).
    pub wrapped: bool,
}

impl PassReport {
    pub fn moved(&self) -> u64 {
        self.promoted + self.demoted + self.placed
    }
}

/// Blocks and groups of one class on one tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassUsage {
    pub class: Class,
    pub compressed: bool,
    /// The tier of the groups' primaries.
    pub tier: String,
    pub copies: u8,
    pub groups: u64,
    /// Blocks in use (each stored `copies` times).
    pub blocks: u64,
    /// Whether these groups follow the class's current policy.
    pub compliant: bool,
}

/// A parallax-v2 disk's tiering state, for `ctl tiers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierStatus {
    pub policy: TierPolicy,
    pub tiers: Vec<TierInfo>,
    pub usage: Vec<ClassUsage>,
    /// Bad copies rewritten from a good one.
    pub repairs: u64,
    pub promoted: u64,
    pub demoted: u64,
    pub placed: u64,
    /// Reads of compressed blocks.
    pub compressed_reads: u64,
}

/// In [`State`]: the policy and the extents granted but in no group.
#[derive(Debug)]
pub(super) struct Placement {
    pub policy: TierPolicy,
    /// Granted to the version but in no committed group (a group that could not be
    /// completed): used first.
    pub spare: Vec<ExtentId>,
    /// Extents of groups left empty, taken out of the groups and the allocator, which the
    /// next commit's root record no longer names: given back to the store after that commit.
    pub releasing: Vec<ExtentId>,
    /// The group each kind allocated from last.
    current: [Option<usize>; 4],
}

impl Placement {
    /// `orphans`: extents granted to the version that its committed root record does not
    /// name (a crash came before a new group was committed, or before emptied ones were given
    /// back): no committed block lies in them, so they are given back after the next commit.
    pub fn new(policy: TierPolicy, orphans: Vec<ExtentId>) -> Placement {
        Placement {
            policy,
            spare: Vec::new(),
            releasing: orphans,
            current: [None; 4],
        }
    }
}

fn kind_slot(k: Kind) -> usize {
    match (k.class, k.compressed) {
        (Class::Meta, _) => 0,
        (Class::Hot, _) => 1,
        (Class::Cold, false) => 2,
        (Class::Cold, true) => 3,
    }
}

fn secs_since(start: Instant) -> u32 {
    start.elapsed().as_secs().min(u64::from(u32::MAX)) as u32
}

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
    dovetail_annotations::page_is_valid(b) || super::sums::page_is_valid(b)
}

impl Inner {
    pub(super) fn groups(&self) -> RwLockReadGuard<'_, GroupMap> {
        self.groups.read().unwrap_or_else(|p| p.into_inner())
    }

    fn groups_mut(&self) -> RwLockWriteGuard<'_, GroupMap> {
        self.groups.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The copies of `extent`'s blocks (`None`: a parallax-v1 extent, or one in no group).
    pub(super) fn members(&self, extent: ExtentId) -> Option<Members> {
        if !self.tiered {
            return None;
        }
        self.groups().members(extent)
    }

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

    /// parallax-v2: releases the host space of blocks a commit just freed (every copy),
    /// coalescing runs of consecutive blocks into one hole each, for runs of at least
    /// [`MIN_PUNCH_BLOCKS`] blocks. Failures are only logged:
    /// the blocks are free whatever happens to their bytes.
    pub(super) fn punch_freed(&self, freed: &mut [u64]) {
        if !self.tiered || freed.is_empty() {
            return;
        }
        freed.sort_unstable();
        let mut runs: Vec<(ExtentId, u32, u32)> = Vec::new();
        for &ptr in freed.iter() {
            let Some((e, i)) = split_ptr(ptr) else {
                continue;
            };
            match runs.last_mut() {
                Some((le, li, n)) if *le == e && *li + *n == i => *n += 1,
                _ => runs.push((e, i, 1)),
            }
        }
        let bs = BLOCK_SIZE as u64;
        for (e, i, n) in runs {
            if n < MIN_PUNCH_BLOCKS {
                // A short run is soon allocated again (next-fit); punching it costs a
                // filesystem transaction that blocks the file's writers, then a new
                // allocation of the same space.
                continue;
            }
            let copies = self.members(e).map_or(vec![e], |m| m.all().to_vec());
            for c in copies {
                if let Err(err) = self.space.punch(c, u64::from(i) * bs, u64::from(n) * bs) {
                    log::warn!(
                        "parallax-v2: {}: could not release the space of {n} freed blocks at \
                         {c} block {i}: {}",
                        self.space.key(),
                        crate::error_chain(&Error::from(err))
                    );
                }
            }
        }
    }

    /// parallax-v2, right after a commit: gives back to the store the extents of groups left
    /// empty, in two steps, so that no durable root record ever names an extent the version
    /// no longer holds. First the extents the previous call took out of the groups (which the
    /// commit just made no longer names) are given back (`VersionSpace::release_extent`: a
    /// catalog commit, and their host space released); then every group no block of which is
    /// in use (by the live tree, which is the committed one now, or by a snapshot) is taken
    /// out of the groups and the allocator, and marks the state changed so that the next
    /// commit drops it from the root record. Failures are only logged: an extent that could
    /// not be given back stays granted, a spare used before any new grant.
    pub(super) fn release_empty(&self, st: &mut State) {
        if !self.tiered {
            return;
        }
        let Some(place) = st.place.as_mut() else {
            return;
        };
        let mut given = 0usize;
        for e in std::mem::take(&mut place.releasing) {
            match self.space.release_extent(e) {
                Ok(()) => given += 1,
                Err(err) => {
                    log::warn!(
                        "parallax-v2: {}: could not give {e} back to the store (kept as a spare \
                         extent): {}",
                        self.space.key(),
                        crate::error_chain(&Error::from(err))
                    );
                    place.spare.push(e);
                }
            }
        }
        if given > 0 {
            log::info!(
                "parallax-v2: {}: gave {given} emptied extent(s) back to the store",
                self.space.key()
            );
        }
        let per = self.space.extent_size() / BLOCK_SIZE as u64;
        let empty: Vec<usize> = {
            let groups = self.groups();
            (0..groups.groups.len())
                .filter(|&i| {
                    st.alloc
                        .position(groups.groups[i].members[0])
                        .is_some_and(|pos| st.alloc.free_at(pos) == per)
                })
                .collect()
        };
        if empty.is_empty() {
            return;
        }
        let mut gone: Vec<ExtentId> = Vec::new();
        {
            let mut groups = self.groups_mut();
            let old = std::mem::take(&mut groups.groups);
            let mut kept = Vec::with_capacity(old.len() - empty.len());
            for (i, g) in old.into_iter().enumerate() {
                if empty.contains(&i) {
                    gone.extend(g.members.iter().copied());
                } else {
                    kept.push(g);
                }
            }
            *groups = GroupMap::new(kept);
        }
        let primaries: Vec<ExtentId> = gone.clone();
        st.alloc.forget(&primaries);
        place.current = [None; 4];
        log::info!(
            "parallax-v2: {}: {} emptied group(s) ({} extent(s)) leave the tiering record; \
             their extents are given back after the next commit",
            self.space.key(),
            empty.len(),
            gone.len()
        );
        place.releasing = gone;
        st.changed = true;
    }

    /// Whether a group follows its class's policy now.
    fn compliant(&self, policy: &TierPolicy, g: &Group) -> bool {
        let p = policy.class(g.class);
        let Some(&primary) = g.members.first() else {
            return false;
        };
        g.members.len() == usize::from(p.copies)
            && self.space.extent_tier(primary) == usize::from(p.tier)
            && (!g.compressed || p.compress)
    }

    /// The tiers to put a new group's copies on: the policy's first, then the others.
    pub(super) fn tier_order(&self, first: usize) -> Vec<usize> {
        let n = self.space.tiers().len().max(1);
        std::iter::once(first.min(n - 1))
            .chain((0..n).filter(|&t| t != first))
            .collect()
    }

    /// One extent of tier `tier`: a spare one, or a new grant.
    fn extent_on(&self, place: &mut Placement, tier: usize) -> Result<Option<ExtentId>> {
        if let Some(i) = place
            .spare
            .iter()
            .position(|&e| self.space.extent_tier(e) == tier)
        {
            return Ok(Some(place.spare.swap_remove(i)));
        }
        match self.space.grant_extent_on(tier) {
            Ok(e) => {
                log::debug!(
                    "parallax-v2: {}: granted {e} on tier {tier}",
                    self.space.key()
                );
                Ok(Some(e))
            }
            Err(e) if e.is_full() => Ok(None),
            Err(StoreError::Invalid(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes a new group of `kind` under the current policy. `strict`: only where the policy
    /// says (`None` if that tier is full); otherwise any tier will do.
    fn new_group(&self, st: &mut State, kind: Kind, strict: bool) -> Result<Option<usize>> {
        let Some(place) = st.place.as_mut() else {
            return Err(Error::Corrupt("tiering state lost".to_string()));
        };
        let p = *place.policy.class(kind.class);
        let order = self.tier_order(usize::from(p.tier));
        let mut members: Vec<ExtentId> = Vec::new();
        for k in 0..usize::from(p.copies) {
            let want = order[k % order.len()];
            let mut got = self.extent_on(place, want)?;
            if got.is_none() && !(strict && k == 0) {
                for &t in &order {
                    if let Some(e) = self.extent_on(place, t)? {
                        got = Some(e);
                        break;
                    }
                }
            }
            match got {
                Some(e) => members.push(e),
                None => {
                    place.spare.extend(members);
                    if strict {
                        return Ok(None);
                    }
                    return Err(Error::Store(StoreError::Full));
                }
            }
        }
        let primary = members[0];
        let g = self.groups_mut().push(Group {
            class: kind.class,
            compressed: kind.compressed,
            members,
        });
        st.alloc.add_extent(primary);
        st.changed = true;
        log::info!(
            "parallax-v2: {}: new {} group of {} {} on tier {}",
            self.space.key(),
            kind.class.name(),
            p.copies,
            if p.copies == 1 { "copy" } else { "copies" },
            self.space.extent_tier(primary)
        );
        Ok(Some(g))
    }

    /// A free block of `kind` (a tree node if `node`): from the group used last, another group
    /// of that kind with room (following the policy if `strict`), or a new group. `Ok(None)`
    /// only when `strict` and the policy's tier is full.
    pub(super) fn alloc_kind(
        &self,
        st: &mut State,
        kind: Kind,
        node: bool,
        strict: bool,
    ) -> Result<Option<u64>> {
        let Some(place) = st.place.as_ref() else {
            return Err(Error::Corrupt("tiering state lost".to_string()));
        };
        let policy = place.policy;
        let slot = kind_slot(kind);
        let candidates: Vec<usize> = {
            let groups = self.groups();
            let ok = |i: usize| {
                let g = &groups.groups[i];
                g.class == kind.class
                    && g.compressed == kind.compressed
                    && st
                        .alloc
                        .position(g.members[0])
                        .is_some_and(|pos| st.alloc.free_at(pos) > 0)
            };
            let current = place.current[slot].filter(|&i| ok(i));
            let mut list: Vec<usize> = current.into_iter().collect();
            if list.is_empty() {
                let (mut good, mut other): (Vec<usize>, Vec<usize>) = (0..groups.groups.len())
                    .filter(|&i| ok(i))
                    .partition(|&i| self.compliant(&policy, &groups.groups[i]));
                list.append(&mut good);
                if !strict {
                    list.append(&mut other);
                }
            } else if strict && !self.compliant(&policy, &groups.groups[list[0]]) {
                list.clear();
            }
            list
        };
        // A compliant group with room comes first; a new compliant group before a
        // non-compliant one.
        let mut pick = None;
        {
            let groups = self.groups();
            for &i in &candidates {
                if self.compliant(&policy, &groups.groups[i]) {
                    pick = Some(i);
                    break;
                }
            }
        }
        let g = match pick {
            Some(g) => g,
            None => match self.new_group(st, kind, true)? {
                Some(g) => g,
                None if strict => return Ok(None),
                None => match candidates.first() {
                    Some(&g) => g,
                    None => match self.new_group(st, kind, false)? {
                        Some(g) => g,
                        None => return Err(Error::Store(StoreError::Full)),
                    },
                },
            },
        };
        let primary = self.groups().groups[g].members[0];
        let pos = st
            .alloc
            .position(primary)
            .ok_or_else(|| Error::Corrupt(format!("{primary} is not in the allocator")))?;
        if let Some(place) = st.place.as_mut() {
            place.current[slot] = Some(g);
        }
        st.alloc
            .alloc_at(pos, node)
            .map(Some)
            .ok_or_else(|| Error::Corrupt(format!("{primary} has no free block after all")))
    }

    /// The tiering section for the next root record.
    pub(super) fn tiering(&self, st: &State) -> Option<Tiering> {
        st.place.as_ref().map(|p| Tiering {
            policy: p.policy,
            groups: self.groups().groups.clone(),
        })
    }

    /// Records the heat of every guest block; marks hot those accessed at least
    /// `hot_accesses` times since the last observation.
    pub(super) fn observe(&self, hot_accesses: u16) {
        let Some(ann) = &self.ann else {
            return;
        };
        let mut t = self.temps.lock().unwrap_or_else(|p| p.into_inner());
        let start = *t.start.get_or_insert_with(Instant::now);
        let now = secs_since(start);
        let blocks = ann.table.blocks() as usize;
        if t.heat.len() != blocks {
            t.heat = (0..blocks as u64)
                .map(|b| ann.table.get(b).heat())
                .collect();
            t.touched = vec![now; blocks];
            t.hot = Bitmap::default();
            return;
        }
        let mut hot = Bitmap::default();
        for b in 0..blocks {
            let h = ann.table.get(b as u64).heat();
            let last = t.heat[b];
            if h != last {
                t.touched[b] = now;
                if h.saturating_sub(last) >= u64::from(hot_accesses) {
                    hot.set(b as u64);
                }
                t.heat[b] = h;
            }
        }
        t.hot = hot;
    }

    /// The class guest block `b`, now in `current`, should be in (`None`: no opinion, keep
    /// it where it is).
    fn wanted(&self, t: &Temps, policy: &TierPolicy, b: u64, current: Class) -> Option<Class> {
        let start = t.start?;
        let i = b as usize;
        if i >= t.touched.len() {
            return None;
        }
        if t.hot.get(b) {
            return Some(Class::Hot);
        }
        let idle = secs_since(start).saturating_sub(t.touched[i]);
        if idle >= policy.cold_after_secs {
            return Some(Class::Cold);
        }
        (current == Class::Meta).then_some(Class::Hot)
    }

    /// Copies the block that disk block `m.b` points at (`m.old`, checked again first) into
    /// a fresh block of `m.to` (compressed if it says so and the block compresses). No lock
    /// of the version is held but the state lock for the allocation, in an instant: the
    /// caller holds what keeps the block's pointer and bytes still (its stripe, or for a
    /// metadata block the commit lock). The tree is not changed: [`Inner::repoint_copies`]
    /// does that.
    fn copy_block(&self, m: &Move) -> Result<CopyOutcome> {
        let now = {
            let st = self.read();
            self.resolve_shared(&st.alloc, st.root, st.gen + 1, m.b)?
        };
        if now != m.old {
            return Ok(CopyOutcome::Changed);
        }
        let mut data = [0u8; BLOCK_SIZE];
        // Verified against its checksum: a damaged block is not moved as if it were good.
        self.read_block_live(m.old, m.b, &mut data)?;
        let (kind, bytes) = if m.to.compressed {
            match encode_compressed(&data) {
                Some(z) => (m.to, z),
                None => (
                    Kind {
                        class: m.to.class,
                        compressed: false,
                    },
                    data,
                ),
            }
        } else {
            (m.to, data)
        };
        let new = {
            let mut st = self.state_write();
            self.alloc_kind(&mut st, kind, false, true)?
        };
        let Some(new) = new else {
            return Ok(CopyOutcome::NoRoom);
        };
        let (extent, index) = locate(new)?;
        if let Err(e) = self.write_copies(extent, u64::from(index) * BLOCK_SIZE as u64, &bytes) {
            self.drop_copy(&mut self.state_write(), new);
            return Err(e);
        }
        Ok(CopyOutcome::Made(Copied { m: *m, new, kind }))
    }

    /// Gives back a block allocated for a copy that the tree never pointed at (fresh or, if a
    /// commit ended its epoch meanwhile, in no committed tree either).
    fn drop_copy(&self, st: &mut State, new: u64) {
        if let Ok(g) = st.alloc.index(new) {
            st.alloc.release(g);
        }
    }

    /// Under the state lock, in one instant: points the live tree at each copy whose block
    /// still points where it did when it was copied, and gives back the other copies (their
    /// block was written meanwhile: the guest's write wins). Returns the copies the tree now
    /// points at; on an error, the copies not repointed are given back.
    fn repoint_copies(&self, copies: Vec<Copied>) -> Result<Vec<Copied>> {
        let mut st = self.state_write();
        let mut cache = self.cache();
        let mut done = Vec::with_capacity(copies.len());
        let mut failed: Option<Error> = None;
        for c in copies {
            if failed.is_none() {
                let moved = self
                    .resolve(&st.alloc, &mut cache, st.root, st.gen + 1, c.m.b)
                    .and_then(|now| {
                        if now != c.m.old {
                            return Ok(false);
                        }
                        self.repoint(&mut st, &mut cache, c.m.b, c.new, c.m.old)?;
                        Ok(true)
                    });
                match moved {
                    Ok(true) => {
                        st.changed = true;
                        done.push(c);
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => failed = Some(e),
                }
            }
            self.drop_copy(&mut st, c.new);
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    /// Moves the blocks of `moves`, which the caller keeps still: copies them without the
    /// state lock, then repoints them in one instant. Counts what was done in `report`, and
    /// the blocks that would not compress in `incompressible`.
    fn move_blocks(
        &self,
        moves: &[Move],
        report: &mut PassReport,
        incompressible: &mut Vec<u64>,
    ) -> Result<()> {
        let mut copies = Vec::with_capacity(moves.len());
        let mut failed: Option<Error> = None;
        for m in moves {
            match self.copy_block(m) {
                Ok(CopyOutcome::Made(c)) => copies.push(c),
                Ok(CopyOutcome::Changed) => {}
                Ok(CopyOutcome::NoRoom) => report.no_room += 1,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        for c in self.repoint_copies(copies)? {
            if c.m.to.compressed && !c.kind.compressed {
                incompressible.push(c.m.b);
            }
            match (c.m.to.class, c.m.from) {
                (Class::Hot, Class::Cold) => report.promoted += 1,
                (Class::Cold, Class::Hot) | (Class::Cold, Class::Meta) => report.demoted += 1,
                _ => report.placed += 1,
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The tree nodes of the live tree outside a group that follows the metadata policy, as
    /// `(level, first disk block)`.
    fn misplaced_nodes(&self, st: &State, cache: &mut NodeCache) -> Result<Vec<(u8, u64)>> {
        let policy = match st.place.as_ref() {
            Some(p) => p.policy,
            None => return Ok(Vec::new()),
        };
        let mut out = Vec::new();
        if st.root == NULL {
            return Ok(out);
        }
        let mut stack = vec![(st.root, self.depth, 0u64, st.gen + 1)];
        while let Some((ptr, level, base, max_gen)) = stack.pop() {
            let (e, _) = locate(ptr)?;
            let ok = {
                let groups = self.groups();
                groups.group_of(e).is_some_and(|g| {
                    let g = &groups.groups[g];
                    g.class == Class::Meta && self.compliant(&policy, g)
                })
            };
            if !ok {
                out.push((level, base));
            }
            if level == 1 {
                continue;
            }
            let node = self
                .node(&st.alloc, cache, ptr, level, base, max_gen)?
                .clone();
            let sp = span(level);
            for (i, &c) in node.entries.iter().enumerate() {
                if c != NULL {
                    stack.push((c, level - 1, base + i as u64 * sp, node.gen));
                }
            }
        }
        Ok(out)
    }

    /// One bounded pass of the mover: see [`Parallax::tier_pass`]. The blocks to move are
    /// chosen under the shared state lock; guest blocks are then copied holding only their
    /// stripes shared (a write to them waits, reads go on), metadata pages (annotations and
    /// checksums, which change only in commits) holding the commit lock; the state lock is
    /// taken exclusively only to allocate and, in one instant per step, to repoint.
    fn pass(&self, max_blocks: u64, scan: u64) -> Result<PassReport> {
        let mut report = PassReport::default();
        let Some(ann) = &self.ann else {
            return Ok(report);
        };
        let guest_blocks = ann.table.blocks();
        let policy = match self.read().place.as_ref() {
            Some(p) => p.policy,
            None => return Ok(report),
        };
        // Tree nodes first, once a round: copy-on-write of their paths puts them in metadata
        // groups (in the node cache: the commit writes them).
        let check_nodes = {
            let t = self.temps.lock().unwrap_or_else(|p| p.into_inner());
            !t.nodes_checked
        };
        if check_nodes {
            let mut st = self.write();
            let mut cache = self.cache();
            let nodes = self.misplaced_nodes(&st, &mut cache)?;
            for &(level, base) in nodes.iter().take(max_blocks as usize) {
                if self
                    .alloc_probe(&mut st, Kind::META)
                    .is_some_and(|room| !room)
                {
                    report.no_room += 1;
                    break;
                }
                self.path_mut(&mut st, &mut cache, base, level)?;
                report.placed += 1;
            }
            if nodes.len() as u64 <= max_blocks {
                let mut t = self.temps.lock().unwrap_or_else(|p| p.into_inner());
                t.nodes_checked = true;
            }
        }
        let mut moves: Vec<Move> = Vec::new();
        {
            let st = self.read();
            let mut t = self.temps.lock().unwrap_or_else(|p| p.into_inner());
            let mut b = t.cursor.min(self.blocks);
            let end = self.blocks;
            while report.placed + (moves.len() as u64) < max_blocks && report.scanned < scan {
                if b >= end {
                    b = 0;
                    report.wrapped = true;
                    t.nodes_checked = false;
                    break;
                }
                report.scanned += 1;
                let ptr = self.resolve_shared(&st.alloc, st.root, st.gen + 1, b)?;
                if ptr == NULL {
                    b += 1;
                    continue;
                }
                let (e, _) = locate(ptr)?;
                let (current, ok) = {
                    let groups = self.groups();
                    match groups.group_of(e) {
                        Some(g) => {
                            let g = &groups.groups[g];
                            (
                                Kind {
                                    class: g.class,
                                    compressed: g.compressed,
                                },
                                self.compliant(&policy, g),
                            )
                        }
                        None => (Kind::HOT, false),
                    }
                };
                let want_class = if b >= guest_blocks {
                    Class::Meta
                } else {
                    self.wanted(&t, &policy, b, current.class)
                        .unwrap_or(current.class)
                };
                let compress = want_class == Class::Cold
                    && policy.class(Class::Cold).compress
                    && !t.incompressible.get(b);
                let want = Kind {
                    class: want_class,
                    compressed: compress,
                };
                let recompress = want_class == Class::Cold && compress && !current.compressed;
                if !(want_class == current.class && ok && !recompress) {
                    moves.push(Move {
                        b,
                        old: ptr,
                        from: current.class,
                        to: want,
                    });
                }
                b += 1;
            }
            t.cursor = b;
        }
        let mut incompressible = Vec::new();
        let (meta, data): (Vec<Move>, Vec<Move>) =
            moves.into_iter().partition(|m| m.b >= guest_blocks);
        let mut moved = Ok(());
        if !meta.is_empty() {
            // Annotation and checksum pages are rewritten only by commits: while the commit
            // lock is held they stay still (a FLUSH waits for these few copies).
            let _commit = self.committing.lock().unwrap_or_else(|p| p.into_inner());
            moved = self.move_blocks(&meta, &mut report, &mut incompressible);
        }
        if moved.is_ok() && !data.is_empty() {
            // Guest writes to these blocks wait until they are repointed: none can be lost
            // to a stale copy.
            let blocks: Vec<u64> = data.iter().map(|m| m.b).collect();
            let _stripes = self.stripes.shared_blocks(&blocks);
            moved = self.move_blocks(&data, &mut report, &mut incompressible);
        }
        if !incompressible.is_empty() {
            let mut t = self.temps.lock().unwrap_or_else(|p| p.into_inner());
            for b in incompressible {
                t.incompressible.set(b);
            }
        }
        moved?;
        if self.read().changed {
            // Committed like a FLUSH: the nodes are written and synced without the state
            // lock, so requests go on meanwhile.
            self.commit_concurrent(Some("tier-move"))?;
        }
        self.counters
            .promoted
            .fetch_add(report.promoted, Ordering::Relaxed);
        self.counters
            .demoted
            .fetch_add(report.demoted, Ordering::Relaxed);
        self.counters
            .placed
            .fetch_add(report.placed, Ordering::Relaxed);
        Ok(report)
    }

    /// Whether a block of `kind` can be had where the policy says without granting more than
    /// the policy's tier can give: `None` when unknown (no tiering).
    fn alloc_probe(&self, st: &mut State, kind: Kind) -> Option<bool> {
        let place = st.place.as_ref()?;
        let policy = place.policy;
        let groups = self.groups();
        let room = groups.groups.iter().any(|g| {
            g.class == kind.class
                && g.compressed == kind.compressed
                && self.compliant(&policy, g)
                && st
                    .alloc
                    .position(g.members[0])
                    .is_some_and(|pos| st.alloc.free_at(pos) > 0)
        });
        if room {
            return Some(true);
        }
        let tier = usize::from(policy.class(kind.class).tier);
        Some(
            place
                .spare
                .iter()
                .any(|&e| self.space.extent_tier(e) == tier)
                || self.space.tiers().get(tier).is_some_and(|t| t.free > 0),
        )
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
                if !st.alloc.used.get(pos * per + i) || st.alloc.fresh.get(pos * per + i) {
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
    /// from a good one; returns the number of copies repaired.
    pub(super) fn scrub(&self, st: &State) -> u64 {
        let before = self.counters.repairs.load(Ordering::Relaxed);
        let groups: Vec<Group> = self.groups().groups.clone();
        let per = self.space.extent_size() / BLOCK_SIZE as u64;
        let mut buf = vec![0u8; BLOCK_SIZE];
        for g in groups.iter().filter(|g| g.members.len() > 1) {
            let Some(pos) = st.alloc.position(g.members[0]) else {
                continue;
            };
            for i in 0..per {
                if !st.alloc.used.get(pos * per + i) || st.alloc.fresh.get(pos * per + i) {
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

    pub(super) fn status(&self, st: &State) -> Option<TierStatus> {
        let place = st.place.as_ref()?;
        let tiers = self.space.tiers();
        let per = self.space.extent_size() / BLOCK_SIZE as u64;
        let mut usage: Vec<ClassUsage> = Vec::new();
        for g in &self.groups().groups {
            let tier_i = self.space.extent_tier(g.members[0]);
            let tier = tiers
                .get(tier_i)
                .map_or_else(|| format!("tier {tier_i}"), |t| t.name.clone());
            let blocks = st
                .alloc
                .position(g.members[0])
                .map_or(0, |pos| per - st.alloc.free_at(pos));
            let compliant = self.compliant(&place.policy, g);
            let copies = g.members.len() as u8;
            match usage.iter_mut().find(|u| {
                u.class == g.class
                    && u.compressed == g.compressed
                    && u.tier == tier
                    && u.copies == copies
                    && u.compliant == compliant
            }) {
                Some(u) => {
                    u.groups += 1;
                    u.blocks += blocks;
                }
                None => usage.push(ClassUsage {
                    class: g.class,
                    compressed: g.compressed,
                    tier,
                    copies,
                    groups: 1,
                    blocks,
                    compliant,
                }),
            }
        }
        usage.sort_by(|a, b| (a.class, &a.tier, a.copies).cmp(&(b.class, &b.tier, b.copies)));
        let c = &self.counters;
        Some(TierStatus {
            policy: place.policy,
            tiers,
            usage,
            repairs: c.repairs.load(Ordering::Relaxed),
            promoted: c.promoted.load(Ordering::Relaxed),
            demoted: c.demoted.load(Ordering::Relaxed),
            placed: c.placed.load(Ordering::Relaxed),
            compressed_reads: c.compressed_reads.load(Ordering::Relaxed),
        })
    }
}

/// What the mover reports (for the daemon's events and status).
#[derive(Debug, Clone)]
pub enum MoverEvent {
    /// A round over the whole disk ended.
    Round {
        promoted: u64,
        demoted: u64,
        placed: u64,
        no_room: u64,
        secs: f64,
    },
    /// A pass failed (the mover retries after its interval).
    Failed(String),
}

/// A running mover; stops (after its current pass) when dropped.
#[derive(Debug)]
pub struct Mover {
    stop: Arc<std::sync::atomic::AtomicBool>,
    wake: Arc<(Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Mover {
    /// Runs a pass now instead of at the end of the current interval.
    pub fn kick(&self) {
        let (m, cv) = &*self.wake;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }
}

impl Drop for Mover {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where one disk block is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub class: Class,
    /// The tier of the first copy.
    pub tier: usize,
    pub copies: usize,
    pub compressed: bool,
    /// The extent of the first copy.
    pub extent: ExtentId,
}

impl Parallax {
    /// parallax-v2: where guest block `block` is kept now (`None`: unwritten, or a
    /// parallax-v1 disk).
    pub fn placement(&self, block: u64) -> Result<Option<Placed>> {
        let inner = &*self.inner;
        if !inner.tiered || block >= inner.blocks {
            return Ok(None);
        }
        let st = inner.read();
        let ptr = inner.resolve_shared(&st.alloc, st.root, st.gen + 1, block)?;
        if ptr == NULL {
            return Ok(None);
        }
        let (extent, _) = locate(ptr)?;
        Ok(inner.members(extent).map(|m| Placed {
            class: m.kind.class,
            tier: inner.space.extent_tier(extent),
            copies: m.all().len(),
            compressed: m.kind.compressed,
            extent,
        }))
    }

    /// parallax-v2: the extent groups (empty for parallax-v1).
    pub fn extent_groups(&self) -> Vec<Group> {
        self.inner.groups().groups.clone()
    }

    /// parallax-v2: the tiering policy and where the blocks are (`None` for parallax-v1).
    pub fn tier_status(&self) -> Option<TierStatus> {
        self.inner.status(&self.inner.read())
    }

    /// parallax-v2: replaces the tiering policy (checked against the store's tiers) and
    /// commits it, so it survives a crash. Blocks already placed move when the mover reaches
    /// them.
    pub fn set_tier_policy(&self, policy: TierPolicy) -> Result<()> {
        let inner = &*self.inner;
        policy
            .validate(inner.space.tiers().len())
            .map_err(|why| Error::InvalidArgument(format!("tiering policy: {why}")))?;
        let mut st = inner.write();
        let mut cache = inner.cache();
        let Some(place) = st.place.as_mut() else {
            return Err(Error::InvalidArgument(format!(
                "{} is a parallax-v1 disk, which has no block classes",
                inner.space.key()
            )));
        };
        if place.policy == policy {
            return Ok(());
        }
        let before = place.policy;
        place.policy = policy;
        place.current = [None; 4];
        let list = st.snapshots.clone();
        if let Err(e) = inner.commit(&mut st, &mut cache, list) {
            if let Some(p) = st.place.as_mut() {
                p.policy = before;
            }
            return Err(e);
        }
        let mut t = inner.temps.lock().unwrap_or_else(|p| p.into_inner());
        t.nodes_checked = false;
        log::info!(
            "parallax-v2: {}: tiering policy now {policy:?}",
            inner.space.key()
        );
        Ok(())
    }

    /// parallax-v2: records every block's accesses since the last call (what makes a block
    /// hot, or cold once idle long enough). The mover calls it once per interval.
    pub fn observe_temperature(&self) {
        let hot = self
            .inner
            .read()
            .place
            .as_ref()
            .map_or(2, |p| p.policy.hot_accesses);
        self.inner.observe(hot);
    }

    /// parallax-v2: one bounded step of the mover. Looks at up to `scan` blocks from where
    /// the last step stopped and moves at most `max_blocks` of them: hot blocks to the hot
    /// class, cold ones to the cold class (compressed if the policy says so), and blocks or
    /// tree nodes whose group no longer follows its class's policy to one that does. Each
    /// move copies the block, switches the tree's pointer and commits, so the old block is
    /// freed only once the new one is durable.
    pub fn tier_pass(&self, max_blocks: u64, scan: u64) -> Result<PassReport> {
        self.inner.pass(max_blocks, scan)
    }

    /// parallax-v2: reads every copy of every replicated block in use and rewrites bad copies
    /// from good ones; returns how many were repaired.
    pub fn scrub(&self) -> u64 {
        self.inner.scrub(&self.inner.read_settled())
    }

    /// parallax-v2: starts the background mover: every `interval` it observes the blocks'
    /// temperatures, then moves blocks at the policy's rate until a round over the disk is
    /// complete. `events` hears of each round and failure.
    pub fn start_mover(
        &self,
        interval: Duration,
        events: Box<dyn Fn(MoverEvent) + Send>,
    ) -> Result<Mover> {
        if self.inner.ann.is_none() {
            return Err(Error::InvalidArgument(format!(
                "{} is a parallax-v1 disk, which has no block classes",
                self.inner.space.key()
            )));
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let wake = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let (stop2, wake2) = (stop.clone(), wake.clone());
        let name = format!("mover-{}", self.inner.space.key().0);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || mover_loop(weak, interval, &stop2, &wake2, &*events))
            .map_err(|e| Error::Io {
                op: "starting the tier mover",
                path: String::new(),
                source: e,
            })?;
        Ok(Mover {
            stop,
            wake,
            thread: Some(thread),
        })
    }
}

/// The shortest run of freed blocks whose host space a commit releases (64 KiB): random 4 KiB
/// frees are left to be reused, a discarded range or a demoted run is released.
pub(super) const MIN_PUNCH_BLOCKS: u32 = 16;

/// Blocks moved per step of the mover (a step holds their stripes while it copies them, and
/// the state lock only to allocate and to repoint).
const STEP_BLOCKS: u64 = 128;
/// Blocks looked at per step.
const STEP_SCAN: u64 = 8192;

fn mover_loop(
    inner: Weak<Inner>,
    interval: Duration,
    stop: &std::sync::atomic::AtomicBool,
    wake: &(Mutex<bool>, std::sync::Condvar),
    events: &dyn Fn(MoverEvent),
) {
    let mut round = PassReport::default();
    let mut round_start;
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        round_start = Instant::now();
        let hot = strong
            .read()
            .place
            .as_ref()
            .map_or(2, |p| p.policy.hot_accesses);
        strong.observe(hot);
        // Move until a round is complete, at the policy's rate.
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let rate = strong
                .read()
                .place
                .as_ref()
                .map_or(32, |p| p.policy.move_mib_s);
            let t0 = Instant::now();
            match strong.pass(STEP_BLOCKS, STEP_SCAN) {
                Ok(r) => {
                    round.promoted += r.promoted;
                    round.demoted += r.demoted;
                    round.placed += r.placed;
                    round.no_room += r.no_room;
                    if r.moved() > 0 {
                        let bytes = r.moved() * BLOCK_SIZE as u64;
                        let want =
                            Duration::from_secs_f64(bytes as f64 / (f64::from(rate) * 1048576.0));
                        if let Some(rest) = want.checked_sub(t0.elapsed()) {
                            std::thread::sleep(rest);
                        }
                    }
                    if r.wrapped {
                        events(MoverEvent::Round {
                            promoted: round.promoted,
                            demoted: round.demoted,
                            placed: round.placed,
                            no_room: round.no_room,
                            secs: round_start.elapsed().as_secs_f64(),
                        });
                        round = PassReport::default();
                        break;
                    }
                }
                Err(e) => {
                    events(MoverEvent::Failed(crate::error_chain(&e)));
                    break;
                }
            }
        }
        drop(strong);
        let (m, cv) = wake;
        let mut kicked = m.lock().unwrap_or_else(|p| p.into_inner());
        if !*kicked {
            kicked = cv
                .wait_timeout(kicked, interval)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        *kicked = false;
    }
}
