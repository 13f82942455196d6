//! parallax-v2's side of the mover ([`dovetail_tiering::Tiered`]): a step chooses the blocks
//! to move under the shared state lock (the decision is `dovetail_tiering::Temps::decide`),
//! copies them holding their stripes (metadata pages: the commit lock), and repoints them in
//! one instant under the state lock, only those no write changed meanwhile; then commits like
//! a FLUSH. Blocks only move by the tree's own copy-on-write, so a crash at any point leaves
//! either the old placement or the new one, never a lost block.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dovetail_tiering::{Kind, Mover, MoverEvent, PassReport, TierStatus, Tiered};

use super::cache::NodeCache;
use super::format::{encode_compressed, span, Class, Group, Placed, TierPolicy, BLOCK_SIZE, NULL};
use super::{locate, Inner, Parallax, State};
use crate::{Error, Result};

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

impl Inner {
    /// Records the heat of every guest block; marks hot those accessed at least
    /// `hot_accesses` times since the last observation.
    pub(super) fn observe(&self, hot_accesses: u16) {
        let Some(ann) = &self.ann else {
            return;
        };
        let mut t = self.temps.lock().unwrap_or_else(|p| p.into_inner());
        t.observe(&ann.table, hot_accesses);
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
            let new = self.alloc_kind(&mut st, kind, false, true)?;
            if let Some(p) = new {
                // Held until repointed or given back: a sweep meanwhile keeps it.
                st.moving.insert(p);
            }
            new
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
        st.moving.remove(&new);
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
                        st.moving.remove(&c.new);
                        // A commit since the copy was allocated ended its epoch: it is in
                        // no committed tree and no snapshot, so it is the epoch under way's
                        // (a sweep keeps it, the next commit writes the tree that points at
                        // it, a write superseding it before then frees it at once).
                        let g = st.alloc.index(c.new)?;
                        st.alloc.refresh(g);
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
                if let Some(want) = t.decide(&policy, b, b >= guest_blocks, current, ok) {
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
        set_policy(&self.inner, policy)
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
        let name = format!("mover-{}", self.inner.space.key().0);
        Mover::start(Arc::downgrade(&self.inner), name, interval, events).map_err(|e| Error::Io {
            op: "starting the tier mover",
            path: String::new(),
            source: e,
        })
    }
}

/// [`Parallax::set_tier_policy`].
fn set_policy(inner: &Inner, policy: TierPolicy) -> Result<()> {
    policy
        .validate(inner.space.tiers().len())
        .map_err(|why| Error::InvalidArgument(format!("tiering policy: {why}")))?;
    // The change and the capture are one instant under the state lock; the commit is
    // persisted without it, like a FLUSH's.
    let changed = inner.commit_change(
        |st| {
            let Some(place) = st.place.as_mut() else {
                return Err(Error::InvalidArgument(format!(
                    "{} is a parallax-v1 disk, which has no block classes",
                    inner.space.key()
                )));
            };
            if place.policy == policy {
                return Ok(super::commit::Change::Nothing(None));
            }
            let before = place.policy;
            place.policy = policy;
            place.current = [None; 4];
            Ok(super::commit::Change::Commit(
                Some(before),
                st.snapshots.clone(),
            ))
        },
        |st, before| {
            if let (Some(p), Some(before)) = (st.place.as_mut(), before) {
                p.policy = before;
            }
        },
    )?;
    if changed.is_none() {
        return Ok(());
    }
    let mut t = inner.temps.lock().unwrap_or_else(|p| p.into_inner());
    t.nodes_checked = false;
    log::info!(
        "parallax-v2: {}: tiering policy now {policy:?}",
        inner.space.key()
    );
    Ok(())
}

impl Tiered for Inner {
    type Error = Error;

    fn policy(&self) -> Option<TierPolicy> {
        self.read().place.as_ref().map(|p| p.policy)
    }

    fn observe(&self) {
        let hot = Tiered::policy(self).map_or(2, |p| p.hot_accesses);
        Inner::observe(self, hot);
    }

    fn pass(&self, max_blocks: u64, scan: u64) -> Result<PassReport> {
        Inner::pass(self, max_blocks, scan)
    }

    fn status(&self) -> Option<TierStatus> {
        Inner::status(self, &self.read())
    }

    fn set_policy(&self, policy: TierPolicy) -> Result<()> {
        set_policy(self, policy)
    }

    fn scrub(&self) -> u64 {
        Inner::scrub(self, &self.read_settled())
    }
}

/// parallax-v2's tiering, for the mover and the control plane (what [`Parallax`]'s own
/// methods do).
impl Tiered for Parallax {
    type Error = Error;

    fn policy(&self) -> Option<TierPolicy> {
        Tiered::policy(&*self.inner)
    }

    fn observe(&self) {
        Tiered::observe(&*self.inner);
    }

    fn pass(&self, max_blocks: u64, scan: u64) -> Result<PassReport> {
        self.inner.pass(max_blocks, scan)
    }

    fn status(&self) -> Option<TierStatus> {
        self.tier_status()
    }

    fn set_policy(&self, policy: TierPolicy) -> Result<()> {
        self.set_tier_policy(policy)
    }

    fn scrub(&self) -> u64 {
        Parallax::scrub(self)
    }
}
