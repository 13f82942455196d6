//! Disks served through an N-version Tee ([`VotingTee`]): three to five members (the trusted
//! version, the candidate, and the members the catalog lists after it, format version 7),
//! opened as the catalog says, each quarantine and each finished fill committed to the
//! catalog at once so a restarted daemon serves the same membership.
//!
//! The candidate (member 1) carries the tee record's policy, fault rules and state; the
//! members after it carry their own state (filling, voting, quarantined). A quarantined
//! member is opened and kept in the Tee (so member numbers and version keys stay aligned) but
//! quarantined at once: it gets no I/O and no vote.

use std::sync::{Arc, Mutex};

use dovetail_layout::fault::{parse_rules, FaultLayout};
use dovetail_layout::parallax::Parallax;
use dovetail_layout::{error_chain, BlockLayout};
use dovetail_migrate::presence::{PresenceMap, MAP_BLOCK};
use dovetail_migrate::{TeeOptions, VotingTee};
use dovetail_store::{MemberState, Store, TeeRec, TeeState, VersionKey};
use log::{info, warn};

use crate::metrics::{Metered, VersionMetrics};
use crate::ops::teed::{check_upgrade, grow_candidate_files, parse_policy};
use crate::ops::{open, OpsError};

/// One member's identity, aligned with the Tee's member numbers.
#[derive(Debug, Clone)]
pub struct MemberId {
    pub key: VersionKey,
    pub layout: String,
    /// Fault rules are injected into it (testing).
    pub faulty: bool,
    /// What the member was asked to do (through the Tee), for metrics.
    pub metrics: Arc<VersionMetrics>,
    /// The version itself (what a promote makes the trusted version); `None` for the
    /// trusted member, whose version the daemon keeps.
    pub parallax: Option<Arc<Parallax>>,
}

/// A disk's voting Tee and who its members are.
#[derive(Debug)]
pub struct Voting {
    pub tee: Arc<VotingTee>,
    /// Member `i` of the Tee is `members[i]` (0: the trusted version). Shared with the
    /// quarantine callback, which records a quarantine by version key.
    pub members: Arc<Mutex<Vec<MemberId>>>,
    /// The versions a fill thread is filling now (one fill per member at a time).
    pub filling: Arc<Mutex<Vec<VersionKey>>>,
}

impl Voting {
    /// The members, in member order.
    pub fn ids(&self) -> Vec<MemberId> {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The member number of version `key`, if it is a member.
    pub fn index_of(&self, key: VersionKey) -> Option<usize> {
        self.ids().iter().position(|m| m.key == key)
    }
}

/// Whether disk `name` is served through a voting Tee (members after its candidate).
pub fn is_voting(store: &Store, name: &str) -> Result<bool, OpsError> {
    Ok(!store.members(name)?.is_empty())
}

/// A member opened for the Tee: what it serves, its presence map, who it is.
pub type OpenedMember = (Arc<dyn BlockLayout>, Arc<PresenceMap>, MemberId);

/// Opens version `key` of disk `name` as a member: the version (formatted on first use),
/// the fault rules if any, metered, and its presence map (created empty on first use).
pub fn open_member(
    store: &Arc<Store>,
    name: &str,
    key: VersionKey,
    faults: &[String],
) -> Result<OpenedMember, OpsError> {
    let info = store.disk(name)?;
    let v = store.version(key)?;
    let p = Arc::new(open::open_version(store, name, key, &v.layout, info.size)?);
    let mut layout: Arc<dyn BlockLayout> = p.clone();
    let rules = parse_rules(faults)
        .map_err(|e| OpsError::Invalid(format!("disk {name}: fault rules: {e}")))?;
    if !rules.is_empty() {
        warn!(
            "disk {name}: injecting faults into tee member {key}: {}",
            faults.join(" ")
        );
        layout = Arc::new(
            FaultLayout::new(layout, rules, crate::ops::FAULT_SEED).with_space(store.space(key)?),
        );
    }
    let metrics = Arc::new(VersionMetrics::default());
    let layout: Arc<dyn BlockLayout> = Arc::new(Metered::new(layout, metrics.clone()));
    let blocks = info.size.div_ceil(MAP_BLOCK);
    let map_path = store.map_path(key);
    grow_candidate_files(name, key, &map_path, blocks)?;
    let presence = PresenceMap::open_or_create(&map_path, blocks, key.0).map_err(|e| {
        OpsError::Invalid(format!(
            "disk {name}: presence map {}: {}",
            map_path.display(),
            error_chain(&e)
        ))
    })?;
    Ok((
        layout,
        Arc::new(presence),
        MemberId {
            key,
            layout: v.layout,
            faulty: !faults.is_empty(),
            metrics,
            parallax: Some(p),
        },
    ))
}

/// Builds disk `name`'s voting Tee over its (already open, metered) `trusted` version as the
/// catalog says; `None` when it has no members after its candidate.
pub fn open_voting(
    store: &Arc<Store>,
    name: &str,
    trusted: Arc<dyn BlockLayout>,
    trusted_metrics: Arc<VersionMetrics>,
) -> Result<Option<Voting>, OpsError> {
    let info = store.disk(name)?;
    let extra = store.members(name)?;
    let (Some(cand), Some(rec)) = (info.candidate, info.tee.clone()) else {
        return Ok(None);
    };
    if extra.is_empty() {
        return Ok(None);
    }
    let policy = parse_policy(&rec.policy)?;
    let mut ids = vec![MemberId {
        key: info.trusted,
        layout: info.layout.clone(),
        faulty: false,
        metrics: trusted_metrics,
        parallax: None,
    }];
    let mut candidates = Vec::new();
    let mut quarantined = Vec::new();
    let (l, p, id) = open_member(store, name, cand, &rec.faults)?;
    candidates.push((l, p));
    ids.push(id);
    if rec.state == TeeState::Quarantined {
        quarantined.push((1, rec.reason.clone()));
    }
    for m in &extra {
        let (l, p, id) = open_member(store, name, VersionKey(m.key), &[])?;
        candidates.push((l, p));
        ids.push(id);
        if m.state == MemberState::Quarantined {
            quarantined.push((ids.len() - 1, "recorded in the store catalog".to_string()));
        }
    }
    let mut opts = TeeOptions::new(name, policy);
    opts.journal = crate::ops::bisect::journal_limits();
    let tee = VotingTee::new(trusted, candidates, opts).map_err(|e| {
        OpsError::Invalid(format!(
            "disk {name}: cannot start the voting Tee: {}",
            error_chain(&e)
        ))
    })?;
    for (i, why) in quarantined {
        if let Err(e) = tee.quarantine(i, &why) {
            warn!("disk {name}: member {i} stays live: {}", error_chain(&e));
        }
    }
    let voting = Voting {
        tee: Arc::new(tee),
        members: Arc::new(Mutex::new(ids)),
        filling: Arc::new(Mutex::new(Vec::new())),
    };
    record_quarantines(store, name, &voting);
    info!("disk {name}: {}", describe(&voting));
    Ok(Some(voting))
}

/// One line for the log: the members and their states.
pub fn describe(v: &Voting) -> String {
    let ids = v.ids();
    let states = v.tee.members();
    let parts: Vec<String> = ids
        .iter()
        .zip(states.iter())
        .map(|(id, s)| {
            format!(
                "{} {}{}",
                id.layout,
                id.key,
                if s.quarantined { " (quarantined)" } else { "" }
            )
        })
        .collect();
    format!(
        "voting tee of {} members ({}), policy {}",
        ids.len(),
        parts.join(", "),
        v.tee.policy()
    )
}

/// Records every quarantine of `v`'s members in the catalog when it happens (by version key:
/// member 1's in the tee record, the others' in their member records).
pub fn record_quarantines(store: &Arc<Store>, name: &str, v: &Voting) {
    let (store, disk, ids) = (store.clone(), name.to_string(), v.members.clone());
    v.tee.on_quarantine(Box::new(move |event| {
        let Some(i) = event.member else { return };
        let Some(key) = ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(i)
            .map(|m| m.key)
        else {
            return;
        };
        let info = match store.disk(&disk) {
            Ok(i) => i,
            Err(e) => {
                warn!("disk {disk}: cannot record member {key}'s quarantine: {e}");
                return;
            }
        };
        let r = if info.candidate == Some(key) {
            store.quarantine(&disk, &event.message)
        } else {
            store.set_member_state(&disk, key, MemberState::Quarantined)
        };
        match r {
            Ok(()) => warn!("disk {disk}: quarantine of member {key} recorded in the catalog"),
            Err(e) => warn!(
                "disk {disk}: cannot record member {key}'s quarantine: {}",
                error_chain(&e)
            ),
        }
    }));
}

/// Records disk `name`'s Tee over a candidate of `layouts[0]` and members of the others (one
/// commit each, the candidate's tee record first), all new and empty. The store must be of
/// format version 7 when there is more than one layout; the disk must have no candidate.
/// Returns the keys, in member order (members 1 and up).
pub fn tee_members(
    store: &Arc<Store>,
    name: &str,
    layouts: &[String],
    policy: &str,
    faults: &[String],
) -> Result<Vec<VersionKey>, OpsError> {
    let policy = parse_policy(policy)?;
    parse_rules(faults).map_err(|e| OpsError::Invalid(format!("--fault: {e}")))?;
    let info = store.disk(name)?;
    if layouts.len() > dovetail_migrate::vote::MAX_MEMBERS - 1 {
        return Err(OpsError::Invalid(format!(
            "disk {name}: a tee has at most {} candidates, not {}",
            dovetail_migrate::vote::MAX_MEMBERS - 1,
            layouts.len()
        )));
    }
    for l in layouts {
        check_upgrade(name, &info.layout, l)?;
    }
    if store.info().format_version < dovetail_store::format::MEMBERS_VERSION {
        return Err(OpsError::Invalid(format!(
            "disk {name}: a tee of {} members needs a store of format version {}; this one is \
             version {} (`dovetail store upgrade --voting` with no daemon serving the store)",
            layouts.len() + 1,
            dovetail_store::format::MEMBERS_VERSION,
            store.info().format_version
        )));
    }
    if let Some(k) = info.candidate {
        return Err(OpsError::Invalid(format!(
            "disk {name} already has candidate {k}; `untee` drops it first"
        )));
    }
    let first = store.add_version(name, &layouts[0])?;
    store.set_tee(
        name,
        TeeRec {
            policy: policy.to_string(),
            faults: faults.to_vec(),
            state: TeeState::Active,
            reason: String::new(),
            changed: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        },
    )?;
    let mut keys = vec![first];
    for l in &layouts[1..] {
        match store.add_member(name, l) {
            Ok(k) => keys.push(k),
            Err(e) => {
                // Leave no half-made Tee behind: untee drops every member added so far.
                if let Err(e2) = store.drop_candidate(name) {
                    warn!("disk {name}: cannot drop the half-made tee: {e2}");
                }
                return Err(e.into());
            }
        }
    }
    Ok(keys)
}
