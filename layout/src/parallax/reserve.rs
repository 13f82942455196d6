//! Grants ahead of need: a served version keeps a reserve of granted extents, prepared by a
//! thread of its own, so that a guest request rarely waits for a grant (the store punches a
//! hole over the extent and commits the grant: one `fdatasync` of the metadata file, none of
//! the tier file).
//!
//! When a request's allocation leaves less than an extent's worth of blocks free (parallax-v2:
//! a quarter extent in the group it allocated from), it kicks the reserve thread, which grants outside every lock of the layout and then, under the state
//! lock for an instant, adds the extent: parallax-v1 to its allocator, parallax-v2 to its spare
//! extents, one per tier that a new metadata or hot group would take a member from. A crash
//! loses nothing: a granted extent the tree does not use yet is free space after a reopen
//! (parallax-v1) or a spare extent, used first (parallax-v2). A request that finds no free
//! block still grants for itself, as before.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use dovetail_store::ExtentId;

use super::format::Class;
use super::{Inner, Parallax, State};
use crate::{Error, Result};

/// The reserve's wake-up, in the version's state.
#[derive(Default)]
pub(super) struct Reserve {
    running: AtomicBool,
    /// parallax-v2: a group allocated from ran low since the last top-up.
    low: AtomicBool,
    wanted: Mutex<bool>,
    wake: Condvar,
}

impl Reserve {
    /// Asks the reserve thread (if any) to look at the free space.
    fn kick(&self) {
        if self.running.load(Ordering::Relaxed) {
            let mut w = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
            if !*w {
                *w = true;
                self.wake.notify_one();
            }
        }
    }

    /// Waits for a kick, or `every`.
    fn wait(&self, every: Duration) {
        let w = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        let (mut w, _) = self
            .wake
            .wait_timeout_while(w, every, |w| !*w)
            .unwrap_or_else(|p| p.into_inner());
        *w = false;
    }
}

impl Inner {
    /// Fewer free blocks than this make the reserve grant: parallax-v1 (free blocks of all its
    /// extents), a whole extent; parallax-v2 (free blocks of the group allocated from), a
    /// quarter extent, so that a group with room does not keep a spare extent granted (a group
    /// is often partly used: a whole extent's mark made the reserve hold a spare on every tier
    /// whatever the groups had free). A grant is a hole and a metadata commit (no sync of the
    /// tier file), so a quarter extent of writes leaves it ample time.
    fn low_water(&self, tiered: bool) -> u64 {
        let per = self.space.extent_size() / super::format::BLOCK_SIZE as u64;
        if tiered { per / 4 } else { per }.max(1)
    }

    /// Called after allocating `ptr`: kicks the reserve when free space runs low (parallax-v2:
    /// in the group `ptr` came from).
    pub(super) fn note_allocated(&self, st: &State, ptr: u64) {
        let free = match &st.place {
            None => st.alloc.free(),
            Some(_) => super::format::split_ptr(ptr)
                .and_then(|(e, _)| st.alloc.position(e))
                .map_or(0, |pos| st.alloc.free_at(pos)),
        };
        if free < self.low_water(st.place.is_some()) {
            self.reserve.low.store(true, Ordering::Relaxed);
            self.reserve.kick();
        }
    }

    /// The tiers to grant an extent on now (empty: the reserve is full enough).
    fn reserve_wants(&self, st: &State) -> Vec<Option<usize>> {
        let Some(place) = &st.place else {
            if st.alloc.free() >= self.low_water(false) {
                return Vec::new();
            }
            return vec![None];
        };
        if !self.reserve.low.swap(false, Ordering::Relaxed) {
            return Vec::new();
        }
        // parallax-v2: a spare extent on each tier a new metadata and a new hot group take.
        let mut want: Vec<usize> = Vec::new();
        for class in [Class::Meta, Class::Hot] {
            let p = place.policy.class(class);
            let order = self.tier_order(usize::from(p.tier));
            for k in 0..usize::from(p.copies) {
                want.push(order[k % order.len()]);
            }
        }
        let mut have: Vec<ExtentId> = place.spare.clone();
        let mut out = Vec::new();
        for t in want {
            match have.iter().position(|&e| self.space.extent_tier(e) == t) {
                Some(i) => {
                    have.swap_remove(i);
                }
                None => out.push(Some(t)),
            }
        }
        out
    }

    /// One round of the reserve: grants what [`reserve_wants`](Inner::reserve_wants) asks.
    fn top_up(&self) -> Result<usize> {
        // A closed handle (grown into another) no longer allocates: a grant now would be lost.
        if self.closed.load(Ordering::SeqCst) {
            return Ok(0);
        }
        let wants = {
            let st = self.read();
            self.reserve_wants(&st)
        };
        let mut granted = 0;
        for tier in wants {
            let got = match tier {
                None => self.space.grant_extent(),
                Some(t) => self.space.grant_extent_on(t),
            };
            let e = match got {
                Ok(e) => e,
                // Full: the request path reports it when it comes to that.
                Err(e) if e.is_full() => break,
                Err(e) => return Err(e.into()),
            };
            let mut st = self.state_write();
            match st.place.as_mut() {
                Some(place) => place.spare.push(e),
                None => st.alloc.add_extent(e),
            }
            granted += 1;
            log::debug!("{}: granted {e} ahead of need (reserve)", self.space.key());
        }
        Ok(granted)
    }
}

impl Parallax {
    /// Starts keeping a reserve of granted extents ahead of need (see the module
    /// documentation of `reserve`), on a thread that ends when the disk is dropped. A served
    /// disk runs one; offline commands do not need it.
    pub fn start_reserve(&self) -> Result<()> {
        let inner = &self.inner;
        if inner.reserve.running.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let weak: Weak<Inner> = Arc::downgrade(inner);
        let reserve = inner.reserve.clone();
        std::thread::Builder::new()
            .name(format!("reserve-{}", inner.space.key().0))
            .spawn(move || {
                dovetail_store::thread_kind::entered(
                    dovetail_store::thread_kind::ThreadKind::Background,
                );
                reserve_loop(&weak, &reserve)
            })
            .map(|_| ())
            .map_err(|e| Error::Io {
                op: "starting the extent reserve",
                path: String::new(),
                source: e,
            })
    }
}

fn reserve_loop(weak: &Weak<Inner>, reserve: &Reserve) {
    let mut failing = false;
    loop {
        {
            let Some(inner) = weak.upgrade() else {
                return;
            };
            match inner.top_up() {
                Ok(_) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    log::warn!(
                        "{}: granting extents ahead of need failed (requests grant for \
                         themselves meanwhile): {}",
                        inner.space.key(),
                        crate::error_chain(&e)
                    );
                }
                Err(_) => {}
            }
        }
        // Without the disk: dropping it ends the thread at its next wake-up.
        reserve.wait(Duration::from_secs(1));
    }
}
