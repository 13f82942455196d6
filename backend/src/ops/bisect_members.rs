//! Divergence bisection of a served voting Tee (`dovetail_migrate::bisect_members`): the fresh
//! members a replay needs (every member's layout in one scratch store, the fault-injecting
//! members under the tee record's rules), where the report is kept (the store's `bisect/`, as
//! the two-version reports: `ops::bisect`), and the automatic policy (`serve --auto-bisect`:
//! bisect when a member first loses a vote, or a block first has no majority).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use dovetail_layout::fault::{parse_rules, FaultRule};
use dovetail_layout::BlockLayout;
use dovetail_migrate::bisect_members::{self, MembersReport};
use dovetail_migrate::{EventKind, VotingTee};
use dovetail_store::Store;
use log::{info, warn};

use crate::ops::bisect::{save_report, scratch_root, Scratch, Shape};
use crate::ops::voting::{MemberId, Voting};

/// A voting Tee's bisection: the report and the file it was saved in.
#[derive(Debug, Clone)]
pub struct BisectedMembers {
    pub report: MembersReport,
    /// Where the report was saved, or why it was not.
    pub file: Result<PathBuf, String>,
}

/// Each member's layout and fault rules (the tee record's, for the members that inject them).
fn specs(
    store: &Store,
    disk: &str,
    ids: &[MemberId],
) -> Result<Vec<(String, Vec<FaultRule>)>, String> {
    let rec = store
        .tee(disk)
        .map_err(|e| dovetail_layout::error_chain(&e))?;
    let rules = match &rec {
        Some(r) => parse_rules(&r.faults).map_err(|e| format!("disk {disk}: fault rules: {e}"))?,
        None => Vec::new(),
    };
    Ok(ids
        .iter()
        .map(|m| {
            (
                m.layout.clone(),
                if m.faulty { rules.clone() } else { Vec::new() },
            )
        })
        .collect())
}

/// Bisects `v` (disk `disk` of `store`) for `block` (or the block of its first lost vote),
/// saves the report in the store's reports directory and emits the `bisected` event naming
/// the file.
pub fn run(
    store: &Store,
    v: (&Arc<VotingTee>, &[MemberId]),
    disk: &str,
    block: Option<u64>,
) -> Result<BisectedMembers, String> {
    let (tee, ids) = v;
    let limits = tee.journal().map(|j| j.limits()).ok_or_else(|| {
        "the tee keeps no request journal: serve with --tee-journal N (the requests it keeps), \
         then tee the disk again"
            .to_string()
    })?;
    let specs = specs(store, disk, ids)?;
    if specs.len() != tee.len() {
        return Err(format!(
            "disk {disk}: the tee has {} members, {} are known",
            tee.len(),
            specs.len()
        ));
    }
    let info = store
        .disk(disk)
        .map_err(|e| dovetail_layout::error_chain(&e))?;
    let shape = Shape {
        disk: disk.to_string(),
        trusted_layout: specs[0].0.clone(),
        candidate_layout: specs.get(1).map_or_else(String::new, |s| s.0.clone()),
        size: info.size,
        rules: Vec::new(),
    };
    let scratch = Scratch::sized(shape, &scratch_root(), limits, specs.len() as u64);
    let names: Vec<String> = (0..specs.len()).map(|i| format!("m{i}")).collect();
    let fresh = || -> Result<Vec<Arc<dyn BlockLayout>>, String> {
        let s: Vec<(&str, &str, &[FaultRule])> = specs
            .iter()
            .zip(&names)
            .map(|((l, r), n)| (n.as_str(), l.as_str(), r.as_slice()))
            .collect();
        scratch.make_versions(&s)
    };
    let saved: Mutex<Result<PathBuf, String>> = Mutex::new(Err("not saved".to_string()));
    let save = |r: &MembersReport| save_report(store, &saved, &bisect_members::report_name(r), r);
    let report = tee.bisect(block, None, &fresh, Some(&save))?;
    drop(scratch);
    let file = saved.into_inner().unwrap_or_else(|p| p.into_inner());
    match &file {
        Ok(f) => info!("disk {disk}: {} (report: {})", report.verdict, f.display()),
        Err(why) => warn!("disk {disk}: {} (report not saved: {why})", report.verdict),
    }
    Ok(BisectedMembers { report, file })
}

/// With `--auto-bisect`, bisects `v` once, on a thread, when a member first loses a vote or a
/// block first has no majority. The thread holds the Tee weakly and ends when it is dropped.
pub fn watch(store: &Arc<Store>, v: &Voting, disk: &str) {
    if !crate::ops::bisect::auto() || v.tee.journal().is_none() {
        return;
    }
    let rx = v.tee.subscribe();
    let weak: Weak<VotingTee> = Arc::downgrade(&v.tee);
    let members = v.members.clone();
    let store = store.clone();
    let name = disk.to_string();
    let spawned = std::thread::Builder::new()
        .name(format!("bisect-{name}"))
        .spawn(move || {
            let mut done = false;
            while let Ok(ev) = rx.recv() {
                if done || !matches!(ev.kind, EventKind::Outvoted | EventKind::NoMajority) {
                    continue;
                }
                done = true;
                let Some(tee) = weak.upgrade() else { return };
                let ids = members.lock().unwrap_or_else(|p| p.into_inner()).clone();
                info!("disk {name}: a member lost a vote: bisecting the request journal");
                if let Err(e) = run(&store, (&tee, &ids), &name, None) {
                    warn!("disk {name}: automatic bisection failed: {e}");
                }
            }
        });
    if let Err(e) = spawned {
        warn!("disk {disk}: cannot start the automatic bisection: {e}");
    }
}
