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
use std::sync::{RwLockReadGuard, RwLockWriteGuard};

use dovetail_store::{ExtentId, StoreError};
use dovetail_tiering::{ClassUsage, Kind, TierStatus};

use super::format::{split_ptr, Class, Group, TierPolicy, Tiering, BLOCK_SIZE};
use super::{Inner, State};
use crate::{Error, Result};

/// The copies of one block's extent.
#[derive(Debug, Clone, Copy)]
pub(super) struct Members {
    ids: [ExtentId; 3],
    pub n: u8,
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

/// Counters of the tiering machinery.
#[derive(Debug, Default)]
pub(super) struct TierCounters {
    pub repairs: AtomicU64,
    pub promoted: AtomicU64,
    pub demoted: AtomicU64,
    pub placed: AtomicU64,
    pub compressed_reads: AtomicU64,
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
    pub current: [Option<usize>; 4],
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
            // One hole per piece of at most PUNCH_CHUNK_BLOCKS: a punch holds off every
            // direct write to the tier file (all its disks') while it runs, so a long run is
            // released in short steps the other writes go between.
            let pieces = (0..n).step_by(PUNCH_CHUNK_BLOCKS as usize).map(|k| {
                (
                    u64::from(i + k) * bs,
                    u64::from(PUNCH_CHUNK_BLOCKS.min(n - k)) * bs,
                )
            });
            for (c, (at, len)) in copies
                .iter()
                .flat_map(|&c| pieces.clone().map(move |p| (c, p)))
            {
                if let Err(err) = self.space.punch(c, at, len) {
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
    pub(super) fn compliant(&self, policy: &TierPolicy, g: &Group) -> bool {
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

    /// Whether a block of `kind` can be had where the policy says without granting more than
    /// the policy's tier can give: `None` when unknown (no tiering).
    pub(super) fn alloc_probe(&self, st: &mut State, kind: Kind) -> Option<bool> {
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

/// The shortest run of freed blocks whose host space a commit releases (64 KiB): random 4 KiB
/// frees are left to be reused, a discarded range or a demoted run is released.
pub(super) const MIN_PUNCH_BLOCKS: u32 = 16;

/// The longest hole one punch makes (1 MiB): on ext4 a punch waits for the tier file's direct
/// writes in flight and holds off new ones until it ends (measured: a noisy parallax-v2 tenant's
/// commit punched 68 000 freed blocks in up to 426 ms, and the other tenants' writes waited as
/// long), so a long run is released piece by piece.
pub(super) const PUNCH_CHUNK_BLOCKS: u32 = 256;
