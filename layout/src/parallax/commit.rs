//! The state's locks and the commit: group commit of the changed tree and annotations, and
//! the timer that persists the annotations.

use super::*;

impl Inner {
    pub(super) fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The state lock shared, once every data write in flight is done: every pointer of the
    /// live tree then has its data (no write can start its tree change meanwhile).
    pub(super) fn read_settled(&self) -> RwLockReadGuard<'_, State> {
        let st = self.read();
        self.inflight.drain();
        st
    }

    /// Everything to itself: the commit lock, the state lock, and no data write in flight
    /// (for commits, snapshots, the mover and other changes of the whole version).
    pub(super) fn write(&self) -> Exclusive<'_> {
        let commit = self.committing.lock().unwrap_or_else(|p| p.into_inner());
        Exclusive {
            st: self.write_io(),
            _commit: commit,
        }
    }

    /// The state lock with no data write in flight, for a request that changes the tree and
    /// writes data under it (partial writes, zeroing): a commit's persisting step may run.
    pub(super) fn write_io(&self) -> RwLockWriteGuard<'_, State> {
        let st = self.state_write();
        self.inflight.drain();
        st
    }

    /// The state lock alone (writes in their data phase may still be in flight).
    pub(super) fn state_write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn group(&self) -> MutexGuard<'_, GroupCommit> {
        self.group.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits what was written before the call without holding the state lock while the
    /// nodes are written, the space synced and the root record committed: requests go on
    /// meanwhile, into the next epoch. Returns without committing when nothing changed.
    ///
    /// Group commit: calls that wait while a commit runs (FLUSHes from several queues) share
    /// the next one. A call notes how many captures had started when it arrived; once it holds
    /// the commit lock, if a commit numbered above that is durable, that commit's capture began
    /// after this call did, so after every write completed before it (a write's tree change is
    /// made under the state lock, which the capture takes after taking its number, and the
    /// capture waits for data writes in flight): the call returns without a commit of its own.
    /// A commit that fails covers nobody; the next call commits again.
    pub(super) fn commit_concurrent(&self, failpoint: Option<&str>) -> Result<()> {
        let arrived = self.group().started;
        let t0 = std::time::Instant::now();
        let _commit = self.committing.lock().unwrap_or_else(|p| p.into_inner());
        let t1 = std::time::Instant::now();
        let mine = {
            let mut g = self.group();
            if g.durable > arrived {
                return Ok(());
            }
            g.started += 1;
            g.started
        };
        let durable = |r: Result<()>| {
            if r.is_ok() {
                let mut g = self.group();
                g.durable = g.durable.max(mine);
            }
            r
        };
        let cap = {
            // Data writes in flight may go on: the capture ends their epoch, and `persist`
            // waits for them before its sync (no wait under the state lock).
            let mut st = self.state_write();
            if !st.changed && !self.annotations_dirty() && st.retry.is_empty() {
                // Everything captured now is durable already.
                return durable(Ok(()));
            }
            if let Some(name) = failpoint {
                dovetail_store::failpoint::hit(name);
            }
            let mut cache = self.cache();
            let list = st.snapshots.clone();
            self.capture(&mut st, &mut cache, list)?
        };
        let t2 = std::time::Instant::now();
        let done = self.persist(&cap);
        let t3 = std::time::Instant::now();
        let mut st = self.state_write();
        let mut cache = self.cache();
        let r = durable(self.finish(&mut st, &mut cache, cap, done));
        log::debug!(
            target: "dovetail_layout::commit",
            "{}: commit {mine}: waited {:?} for the commit lock, captured in {:?} (state lock \
             held), persisted in {:?}, finished in {:?}",
            self.space.key(),
            t1 - t0,
            t2 - t1,
            t3 - t2,
            t3.elapsed()
        );
        r
    }
}

/// parallax-v2: commits changed annotations every `every` while the disk is open.
pub(super) fn spawn_persister(inner: Weak<Inner>, every: Duration) -> Result<()> {
    let name = inner
        .upgrade()
        .map(|i| format!("annotations-{}", i.space.key()))
        .unwrap_or_default();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            dovetail_store::thread_kind::entered(
                dovetail_store::thread_kind::ThreadKind::Background,
            );
            let mut failing = false;
            loop {
                std::thread::sleep(every);
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                if !inner.annotations_dirty() {
                    continue;
                }
                match inner.commit_concurrent(None) {
                    Ok(()) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        log::warn!(
                            "parallax-v2: {}: committing annotations failed (retrying every \
                             {every:?}): {}",
                            inner.space.key(),
                            crate::error_chain(&e)
                        );
                    }
                    Err(_) => {}
                }
            }
        })
        .map(|_| ())
        .map_err(|e| Error::Io {
            op: "starting the annotation persister",
            path: String::new(),
            source: e,
        })
}

/// What a change given to [`Inner::commit_change`] leaves to commit.
pub(super) enum Change<T> {
    /// Commit with this snapshot list, then return the value.
    Commit(T, Vec<SnapshotRecord>),
    /// Nothing changed: return the value without a commit.
    Nothing(T),
}

/// A commit's turn ([`Inner::turn`]): the commit lock, and the commit's number in the group
/// commit's order.
pub(super) struct Turn<'a> {
    _commit: MutexGuard<'a, ()>,
    mine: u64,
}

impl Inner {
    /// Takes the commit lock and numbers the commit (a whole-version change's commit: it
    /// always commits, so it never returns early like [`commit_concurrent`](Inner::commit_concurrent)).
    pub(super) fn turn(&self) -> Turn<'_> {
        let commit = self.committing.lock().unwrap_or_else(|p| p.into_inner());
        self.numbered(commit)
    }

    /// [`turn`](Inner::turn) if no commit runs now, else `None`.
    pub(super) fn try_turn(&self) -> Option<Turn<'_>> {
        let commit = match self.committing.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(self.numbered(commit))
    }

    fn numbered<'a>(&'a self, commit: MutexGuard<'a, ()>) -> Turn<'a> {
        let mut g = self.group();
        g.started += 1;
        Turn {
            _commit: commit,
            mine: g.started,
        }
    }

    /// Commits a change of the whole version (a taint label, a tiering policy) the way
    /// [`commit_concurrent`](Inner::commit_concurrent) commits a FLUSH: `change` runs under the
    /// state lock with no data write in flight, and the tree is captured in the same instant
    /// with the snapshot list it returns; then it is written, synced and published without the
    /// state lock while requests go on into the next generation. An error of `change` is
    /// returned as it is (nothing committed). If the commit fails, `undo(state, what change
    /// returned)` runs under the state lock: the change must not outlive a failed commit.
    pub(super) fn commit_change<T>(
        &self,
        change: impl FnOnce(&mut State) -> Result<Change<T>>,
        undo: impl FnOnce(&mut State, T),
    ) -> Result<T> {
        let turn = self.turn();
        let (out, cap) = {
            let mut st = self.write_io();
            let (out, list) = match change(&mut st)? {
                Change::Commit(out, list) => (out, list),
                Change::Nothing(out) => return Ok(out),
            };
            let mut cache = self.cache();
            (out, self.capture(&mut st, &mut cache, list)?)
        };
        let mut out = Some(out);
        self.end_turn(&turn, cap, |st| {
            if let Some(o) = out.take() {
                undo(st, o);
            }
        })?;
        out.ok_or_else(|| Error::Corrupt("a committed change lost its result".to_string()))
    }

    /// Persists what a turn captured, then finishes the commit under the state lock. The
    /// caller drops the turn (the commit lock) when it is done.
    pub(super) fn end_turn(
        &self,
        turn: &Turn<'_>,
        cap: tree::Captured,
        undo: impl FnOnce(&mut State),
    ) -> Result<()> {
        let persisted = self.persist(&cap);
        self.end_turn_with(turn, cap, persisted, undo)
    }

    /// [`end_turn`](Inner::end_turn) once the captured commit was persisted (or failed, or
    /// was abandoned: `persisted` is an error).
    pub(super) fn end_turn_with(
        &self,
        turn: &Turn<'_>,
        cap: tree::Captured,
        persisted: Result<()>,
        undo: impl FnOnce(&mut State),
    ) -> Result<()> {
        let mut st = self.state_write();
        let mut cache = self.cache();
        let r = self.finish(&mut st, &mut cache, cap, persisted);
        match &r {
            Ok(()) => {
                let mut g = self.group();
                g.durable = g.durable.max(turn.mine);
            }
            Err(_) => undo(&mut st),
        }
        r
    }
}
