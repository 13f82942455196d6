//! A live disk served through an N-version Tee ([`VotingTee`]): `tee` with several
//! candidates, `tee-add`, `tee-remove`, `untee`, what `status` and the metrics say of each
//! member. Every membership change is committed to the catalog before it takes effect (a new
//! member is recorded `filling` before it joins; a member leaves the catalog before it leaves
//! the Tee), so a daemon killed at any moment restarts with the membership of the last commit.

use dovetail_migrate::{MemberStatus, VoteCounters, VotingTee};
use dovetail_store::MemberState;

use super::*;
use crate::ops::voting::{self, MemberId, Voting};

/// One member of a voting Tee as `status` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberReport {
    /// Member number (0: the trusted version).
    pub member: usize,
    pub version: u64,
    pub layout: String,
    /// `trusted`, `candidate` or `member`.
    pub role: &'static str,
    /// `voting`, `filling` or `quarantined`.
    pub state: &'static str,
    pub faulty: bool,
    pub held_blocks: u64,
    pub stale_blocks: u64,
    pub votes_lost: u64,
    pub repairs: u64,
    pub errors: u64,
}

/// A disk's voting Tee as `status` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct VotingStatus {
    pub policy: String,
    pub members: Vec<MemberReport>,
    pub counters: VoteCounters,
    /// Blocks with no majority (the trusted member's data returned), marked disputed.
    pub disputed_blocks: Vec<u64>,
}

fn member_reports(ids: &[MemberId], states: &[MemberStatus], filling: &[u64]) -> Vec<MemberReport> {
    ids.iter()
        .zip(states.iter())
        .enumerate()
        .map(|(i, (id, s))| MemberReport {
            member: i,
            version: id.key.0,
            layout: id.layout.clone(),
            role: match i {
                0 => "trusted",
                1 => "candidate",
                _ => "member",
            },
            state: if s.quarantined {
                "quarantined"
            } else if filling.contains(&id.key.0) {
                "filling"
            } else {
                "voting"
            },
            faulty: id.faulty,
            held_blocks: s.held_blocks,
            stale_blocks: s.stale_blocks,
            votes_lost: s.votes_lost,
            repairs: s.repairs,
            errors: s.errors,
        })
        .collect()
}

impl LiveDisk {
    /// `tee` with two or more candidates: a voting Tee over the trusted version and new,
    /// empty members of `layouts`, each filled from the majority in the background.
    pub fn attach_voting(
        &self,
        layouts: &[String],
        policy: &str,
        faults: &[String],
    ) -> Result<(String, Pause), CommandError> {
        let store = self.store()?;
        for l in layouts {
            store_layout(l)?;
        }
        teed::parse_policy(policy)?;
        let mut set = self.lock();
        if set.candidate.is_some() || set.voting.is_some() {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {} is teed already; `untee` drops its candidates, `tee-add` adds one",
                    self.name
                ),
            ));
        }
        voting::tee_members(store, &self.name, layouts, policy, faults)?;
        let opened = voting::open_voting(
            store,
            &self.name,
            set.trusted.clone(),
            set.trusted_metrics.clone(),
        );
        let v = self.started(store, opened, "the voting tee")?;
        Self::pace(&mut set);
        let pause = self.swap_in(store, v.tee.clone(), || {
            let _ = v.tee.close();
        })?;
        self.forward_vote_events(&v);
        let n = v.tee.len();
        for i in 1..n {
            self.start_fill(&v, i);
        }
        let message = format!(
            "attached a voting tee of {n} members ({}), policy {}{}",
            v.ids()
                .iter()
                .skip(1)
                .map(|m| format!("{} {}", m.layout, m.key))
                .collect::<Vec<_>>()
                .join(", "),
            v.tee.policy(),
            faults_note(faults, " in member 1")
        );
        set.voting = Some(v);
        self.changed(&mut set, "voting-tee-attached", message.clone(), pause);
        Ok((message, pause))
    }

    /// `tee-add`: a new, empty member of `layout` joins the disk's voting Tee (recorded
    /// `filling` first), then is filled from the majority in the background.
    pub fn tee_add(&self, layout: &str) -> Result<(String, Pause), CommandError> {
        let store = self.store()?;
        store_layout(layout)?;
        let mut set = self.lock();
        let Some(v) = set.voting.as_ref() else {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {} has no voting tee (`tee --candidate L1 --candidate L2` starts one; \
                     a two-member tee is changed by `untee` and `tee` again)",
                    self.name
                ),
            ));
        };
        teed::check_upgrade(&self.name, &set.trusted_layout, layout)?;
        if v.tee.len() >= dovetail_migrate::vote::MAX_MEMBERS {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {}'s tee has {} members, the most a tee takes",
                    self.name,
                    v.tee.len()
                ),
            ));
        }
        let key = store.add_member(&self.name, layout)?;
        let opened = voting::open_member(store, &self.name, key, &[]);
        let (l, p, id) = match opened {
            Ok(x) => x,
            Err(e) => {
                let _ = store.remove_member(&self.name, key);
                return Err(e.into());
            }
        };
        let tee = v.tee.clone();
        let members = v.members.clone();
        members.lock().unwrap_or_else(|p| p.into_inner()).push(id);
        Self::pace(&mut set);
        let (r, pause) = self.switch.pause(|_| tee.add_member(l, p));
        let i = match r {
            Ok(i) => i,
            Err(e) => {
                members.lock().unwrap_or_else(|p| p.into_inner()).pop();
                let _ = store.remove_member(&self.name, key);
                return Err(CommandError::new(ErrorCode::Failed, error_chain(&e)));
            }
        };
        if let Some(v) = set.voting.as_ref() {
            self.start_fill(v, i);
        }
        let message = format!("added member {i}: {layout} {key}, filling from the majority");
        self.changed(&mut set, "member-added", message.clone(), pause);
        Ok((message, pause))
    }

    /// `tee-remove`: version `key` leaves the disk's voting Tee (the catalog first), its
    /// extents freed. Not the trusted version; the Tee keeps at least two members and one
    /// live one.
    pub fn tee_remove(&self, key: u64) -> Result<(String, Pause), CommandError> {
        let store = self.store()?;
        let mut set = self.lock();
        let Some(v) = set.voting.as_ref() else {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {} has no voting tee (`untee` drops a two-member tee's candidate)",
                    self.name
                ),
            ));
        };
        let key = VersionKey(key);
        let Some(i) = v.index_of(key) else {
            return Err(CommandError::new(
                ErrorCode::Invalid,
                format!(
                    "{key} is not a member of disk {}'s tee (members: {})",
                    self.name,
                    v.ids()
                        .iter()
                        .map(|m| m.key.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        };
        let states = v.tee.members();
        if i == 0 {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!("{key} is disk {}'s trusted version", self.name),
            ));
        }
        if states.len() <= 2 {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {}'s tee has two members: `untee` drops the candidate",
                    self.name
                ),
            ));
        }
        if !states.iter().any(|s| s.index != i && !s.quarantined) {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!("{key} is disk {}'s last live member", self.name),
            ));
        }
        // The catalog first: a daemon killed after this restarts without the member.
        store.remove_member(&self.name, key)?;
        let tee = v.tee.clone();
        let members = v.members.clone();
        Self::pace(&mut set);
        let (r, pause) = self.switch.pause(|_| tee.remove_member(i));
        match r {
            Ok(_) => {
                members.lock().unwrap_or_else(|p| p.into_inner()).remove(i);
            }
            Err(e) => {
                // Not expected after the checks above; the member is out of the catalog, so
                // its writes are refused by the store and it is quarantined.
                warn!(
                    "disk {}: member {i} ({key}) left the catalog but not the Tee: {}",
                    self.name,
                    error_chain(&e)
                );
                let _ = tee.quarantine(i, "removed from the catalog");
            }
        }
        let message = format!("removed member {i} ({key})");
        self.changed(&mut set, "member-removed", message.clone(), pause);
        Ok((message, pause))
    }

    /// `untee` of a voting Tee: every candidate dropped, the trusted version serves alone.
    pub(super) fn detach_voting(
        &self,
        set: &mut VersionSet,
        store: &Arc<Store>,
    ) -> Result<(String, Pause), CommandError> {
        let Some(v) = set.voting.take() else {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!("disk {} has no candidate", self.name),
            ));
        };
        Self::pace(set);
        let trusted = set.trusted.clone();
        v.tee.drain();
        let ((), pause) = self.switch.pause(|cur| {
            v.tee.drain();
            *cur = trusted;
        });
        if let Err(e) = v.tee.close() {
            warn!(
                "disk {}: closing the voting Tee: {}",
                self.name,
                error_chain(&e)
            );
        }
        let n = v.tee.len() - 1;
        drop(v);
        let before = store.info().free_extents;
        store.drop_candidate(&self.name)?;
        let freed = store.info().free_extents.saturating_sub(before);
        let message = format!("dropped {n} candidate(s), {freed} extent(s) freed");
        self.changed(set, "candidate-dropped", message.clone(), pause);
        Ok((message, pause))
    }

    /// Copies every block member `i` lacks from the majority, on a thread of its own; a
    /// member recorded `filling` is recorded `voting` once it holds every block.
    /// Returns false if a fill of that member is running already.
    pub(super) fn start_fill(&self, v: &Voting, i: usize) -> bool {
        let (tee, members) = (v.tee.clone(), v.members.clone());
        let Ok(store) = self.store().cloned() else {
            return false;
        };
        let Some(key) = v.ids().get(i).map(|m| m.key) else {
            return false;
        };
        {
            let mut f = v.filling.lock().unwrap_or_else(|p| p.into_inner());
            if f.contains(&key) {
                return false;
            }
            f.push(key);
        }
        let filling = v.filling.clone();
        let name = self.name.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("fill-{name}"))
            .spawn(move || {
                crate::sandbox::enter(dovetail_store::thread_kind::ThreadKind::Background);
                fill_member(&store, &name, &tee, &members, i);
                filling
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|k| *k != key);
            });
        if let Err(e) = spawned {
            warn!("disk {}: cannot start filling member {i}: {e}", self.name);
            v.filling
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|k| *k != key);
            return false;
        }
        true
    }

    /// Relays the voting Tee's events into the daemon's, naming the member's version (and
    /// with `serve --auto-bisect`, bisects its first lost vote).
    pub(super) fn forward_vote_events(&self, v: &Voting) {
        if let Ok(store) = self.store() {
            crate::ops::bisect_members::watch(store, v, &self.name);
        }
        let members = v.members.clone();
        self.relay_events(v.tee.subscribe(), "the voting Tee's", move |ev| {
            let key = ev.member.and_then(|i| {
                members
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(i)
                    .map(|m| m.key)
            });
            match key {
                Some(k) => format!("{} ({k})", ev.message),
                None => ev.message.clone(),
            }
        });
    }

    /// The voting Tee's part of `status`.
    pub(super) fn voting_status(&self, set: &VersionSet) -> Option<VotingStatus> {
        let v = set.voting.as_ref()?;
        let filling: Vec<u64> = self
            .store()
            .ok()
            .and_then(|s| s.members(&self.name).ok())
            .unwrap_or_default()
            .iter()
            .filter(|m| m.state == MemberState::Filling)
            .map(|m| m.key)
            .collect();
        Some(VotingStatus {
            policy: v.tee.policy().to_string(),
            members: member_reports(&v.ids(), &v.tee.members(), &filling),
            counters: v.tee.counters(),
            disputed_blocks: v.tee.disputed(),
        })
    }

    /// The voting Tee's samples for the Prometheus exposition: per member and per disk.
    pub(super) fn render_voting_metrics(&self, set: &VersionSet, out: &mut Exposition) {
        let Some(s) = self.voting_status(set) else {
            return;
        };
        let name = self.name.as_str();
        for m in &s.members {
            let (v, i) = (m.version.to_string(), m.member.to_string());
            let l = [
                ("disk", name),
                ("version", v.as_str()),
                ("member", i.as_str()),
            ];
            out.counter(
                "dovetail_tee_member_votes_lost_total",
                "Votes a voting Tee's member lost (its block differed from the majority's, or it failed).",
                &l,
                m.votes_lost,
            );
            out.counter(
                "dovetail_tee_member_repairs_total",
                "Blocks of a voting Tee's member rewritten from the majority.",
                &l,
                m.repairs,
            );
            out.gauge(
                "dovetail_tee_member_quarantined",
                "1 while a voting Tee's member is quarantined.",
                &l,
                if m.state == "quarantined" { 1.0 } else { 0.0 },
            );
        }
        out.counter(
            "dovetail_tee_no_majority_total",
            "Blocks a voting Tee found no majority for (the trusted member's data returned).",
            &[("disk", name)],
            s.counters.no_majority,
        );
    }
}

/// A voting Tee's candidate (member 1) in `status`'s `candidate`, as the Tee sees it: its
/// policy, state and blocks held (its counters are the members' in `voting`).
pub(super) fn candidate_of_voting(set: &VersionSet, c: &mut Option<CandidateStatus>) {
    let (Some(v), Some(c)) = (set.voting.as_ref(), c.as_mut()) else {
        return;
    };
    let Some(i) = v.index_of(VersionKey(c.version)) else {
        return;
    };
    let states = v.tee.members();
    if let Some(s) = states.get(i) {
        c.policy = v.tee.policy().to_string();
        c.state = if s.quarantined {
            "quarantined"
        } else {
            "active"
        };
        c.blocks_present = s.held_blocks;
    }
}

/// Fills member `i` and records it `voting` (members after the candidate only: the
/// candidate's state is the tee record's).
fn fill_member(
    store: &Arc<Store>,
    name: &str,
    tee: &Arc<VotingTee>,
    members: &Arc<Mutex<Vec<MemberId>>>,
    i: usize,
) {
    let key = members
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(i)
        .map(|m| m.key);
    let Some(key) = key else { return };
    let start = Instant::now();
    match tee.fill(i) {
        Ok(n) => {
            info!(
                "disk {name}: member {i} ({key}) filled: {n} block(s) copied from the majority in {:?}",
                start.elapsed()
            );
            let is_extra = store
                .members(name)
                .is_ok_and(|m| m.iter().any(|m| m.key == key.0));
            if is_extra {
                if let Err(e) = store.set_member_state(name, key, MemberState::Voting) {
                    warn!(
                        "disk {name}: cannot record member {key} as voting: {}",
                        error_chain(&e)
                    );
                }
            }
        }
        Err(e) => warn!(
            "disk {name}: filling member {i} ({key}) stopped: {}",
            error_chain(&e)
        ),
    }
}

impl LiveDisk {
    /// At open: relays the voting Tee's events and goes on filling every live member that
    /// does not hold every block yet (a fill cut short by a stop, or a member recorded
    /// `filling`).
    pub(super) fn resume_voting(&self, set: &VersionSet) {
        let Some(v) = set.voting.as_ref() else { return };
        self.forward_vote_events(v);
        for i in 1..v.tee.len() {
            if !v.tee.quarantined(i) && !v.tee.complete(i) {
                self.start_fill(v, i);
            }
        }
    }
}

impl LiveDisk {
    /// `policy` of a voting Tee: committed to the tee record, then changed during a pause.
    pub(super) fn set_voting_policy(
        &self,
        set: &mut VersionSet,
        store: &Arc<Store>,
        p: dovetail_migrate::Policy,
    ) -> Result<(String, Pause), CommandError> {
        let Some(v) = set.voting.as_ref() else {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!("disk {} has no voting tee", self.name),
            ));
        };
        let old = v.tee.policy();
        let Some(mut rec) = store.tee(&self.name)? else {
            return Err(CommandError::new(
                ErrorCode::Failed,
                format!("disk {}: the catalog has no tee record", self.name),
            ));
        };
        rec.policy = p.to_string();
        rec.changed = unix_ms() / 1000;
        store.set_tee(&self.name, rec)?;
        let tee = v.tee.clone();
        Self::pace(set);
        let ((), pause) = self.switch.pause(|_| tee.set_policy(p));
        let message = format!("policy changed from {old} to {p}");
        self.changed(set, "policy-changed", message.clone(), pause);
        Ok((message, pause))
    }

    /// `promote` of a voting Tee: member `key` (default: the first candidate holding every
    /// block), which must hold every block and inject no faults, becomes the trusted version;
    /// the former trusted version stays a member (holding every block: its presence map is
    /// written full first). The Tee's swap and the catalog's commit happen in one pause (the
    /// swap is undone if the commit fails).
    pub(super) fn promote_voting(
        &self,
        set: &mut VersionSet,
        store: &Arc<Store>,
        key: Option<u64>,
    ) -> Result<(String, Pause), CommandError> {
        let Some(v) = set.voting.as_ref() else {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!("disk {} has no voting tee", self.name),
            ));
        };
        let ids = v.ids();
        let i = match key {
            Some(k) => v.index_of(VersionKey(k)).ok_or_else(|| {
                CommandError::new(
                    ErrorCode::Invalid,
                    format!(
                        "{} is not a member of disk {}'s tee",
                        VersionKey(k),
                        self.name
                    ),
                )
            })?,
            None => (1..ids.len())
                .find(|&i| v.tee.complete(i) && !ids[i].faulty)
                .ok_or_else(|| {
                    CommandError::new(
                        ErrorCode::Conflict,
                        format!(
                            "disk {}: no candidate holds every block yet (members are filled \
                             in the background; `status` shows their held blocks)",
                            self.name
                        ),
                    )
                })?,
        };
        if i == 0 {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "{} is disk {}'s trusted version already",
                    ids[0].key, self.name
                ),
            ));
        }
        let id = ids[i].clone();
        if id.faulty {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {}: member {} injects faults (testing): it cannot be promoted",
                    self.name, id.key
                ),
            ));
        }
        if !v.tee.complete(i) {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {}: member {} does not hold every block (or is quarantined, or has \
                     blocks awaiting repair)",
                    self.name, id.key
                ),
            ));
        }
        let Some(new_parallax) = id.parallax.clone() else {
            return Err(CommandError::new(
                ErrorCode::Failed,
                format!("disk {}: member {} has no version open", self.name, id.key),
            ));
        };
        // The former trusted version holds every block: say so in a presence map of its own
        // before the catalog makes it a member (a crash first leaves an orphan map, removed
        // when the store is served).
        let old = ids[0].key;
        let blocks = self
            .disk
            .capacity()
            .0
            .saturating_mul(SECTOR_SIZE)
            .div_ceil(MAP_BLOCK);
        let map = store.map_path(old);
        let full = dovetail_migrate::presence::PresenceMap::open_or_create(&map, blocks, old.0)
            .and_then(|p| {
                p.insert_range(0, blocks);
                p.close_clean()
            });
        if let Err(e) = full {
            return Err(CommandError::new(
                ErrorCode::Failed,
                format!(
                    "disk {}: cannot write the presence map of {old}: {}",
                    self.name,
                    error_chain(&e)
                ),
            ));
        }
        let tee = v.tee.clone();
        let members = v.members.clone();
        if let Err(e) = tee.flush() {
            warn!(
                "disk {}: flush before promotion: {}",
                self.name,
                error_chain(&e)
            );
        }
        drop(set.mover.take());
        Self::pace(set);
        let name = self.name.clone();
        let (r, pause) = self.switch.pause(|_| -> Result<(), CommandError> {
            tee.promote(i)
                .map_err(|e| CommandError::new(ErrorCode::Conflict, error_chain(&e)))?;
            if let Err(e) = store.promote_member(&name, id.key) {
                // Undo the swap: the catalog still names the former trusted version.
                let _ = tee.promote(i);
                return Err(e.into());
            }
            dovetail_store::failpoint::hit("promote-member");
            Ok(())
        });
        if let Err(e) = r {
            set.mover = set.parallax.clone().and_then(|p| self.start_mover(&p));
            return Err(e);
        }
        {
            let mut m = members.lock().unwrap_or_else(|p| p.into_inner());
            m.swap(0, i);
            m[i].parallax = set.parallax.clone();
            m[0].parallax = None;
        }
        if let Some(l) = tee.member(0) {
            set.trusted = l;
        }
        set.parallax = Some(new_parallax.clone());
        if let Err(e) = new_parallax.start_reserve() {
            warn!("disk {}: no extent reserve: {e}", self.name);
        }
        set.mover = self.start_mover(&new_parallax);
        set.trusted_metrics = id.metrics.clone();
        set.trusted_key = Some(id.key);
        set.trusted_layout = id.layout.clone();
        let message = format!(
            "promoted member {i} ({} {}) to trusted; {old} is member {i}",
            id.layout, id.key
        );
        self.changed(set, "promoted", message.clone(), pause);
        Ok((message, pause))
    }
}
