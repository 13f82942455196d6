//! Disks served through a Tee: `dovetail disk tee` / `disk untee` (offline changes of a disk's
//! version set, recorded in the store's catalog) and, for `dovetail serve --store`, opening a
//! disk as its catalog says: its trusted version alone, or a Tee over the trusted and the
//! candidate version with the recorded policy (and fault rules, for testing).
//!
//! A quarantine found while serving is written to the catalog at once, so a restarted daemon
//! does not send I/O to that candidate again; `disk untee` drops it.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use dovetail_layout::fault::{parse_rules, FaultLayout};
use dovetail_layout::parallax::Parallax;
use dovetail_layout::BlockLayout;
use dovetail_migrate::presence::{PresenceMap, MAP_BLOCK};
use dovetail_migrate::{Policy, Tee, TeeOptions};
use dovetail_store::{DiskInfo, Store, TeeRec, TeeState, VersionKey};
use log::{info, warn};

use crate::metrics::{Metered, VersionMetrics};
use crate::ops::open;
use crate::ops::OpsError;

/// Seed of the fault rules' random choices (fixed, so a faulty run can be repeated).
const FAULT_SEED: u64 = crate::ops::FAULT_SEED;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A disk opened for serving.
#[derive(Debug)]
pub struct Served {
    /// What the device serves: the trusted version, or the Tee.
    pub layout: Arc<dyn BlockLayout>,
    /// The Tee, when the disk is teed and its candidate is not quarantined.
    pub tee: Option<Arc<Tee>>,
    /// One line for the log: which versions serve the disk, how.
    pub description: String,
}

/// Checks a policy name, with the list of valid ones in the error.
pub fn parse_policy(s: &str) -> Result<Policy, OpsError> {
    Policy::from_str(s).map_err(|_| {
        OpsError::Invalid(format!(
            "unknown policy {s:?}; one of: {}",
            Policy::ALL.map(|p| p.to_string()).join(", ")
        ))
    })
}

/// A candidate version attached to a served disk through a Tee.
#[derive(Debug)]
pub struct Candidate {
    pub tee: Arc<Tee>,
    /// The candidate version itself (what promotion makes the trusted version).
    pub parallax: Arc<Parallax>,
    /// Fault rules are injected into it (testing): it cannot be promoted.
    pub faulty: bool,
    pub key: VersionKey,
    pub layout: String,
    /// What the candidate was asked to do (through the Tee), for metrics.
    pub metrics: Arc<VersionMetrics>,
}

/// Opens disk `name` for serving, as its catalog entry says.
pub fn open_served(store: &Arc<Store>, name: &str) -> Result<Served, OpsError> {
    let info: DiskInfo = store.disk(name)?;
    let trusted: Arc<dyn BlockLayout> = Arc::new(open::open_disk(store, name)?);
    match attach_candidate(store, name, trusted.clone())? {
        None => Ok(Served {
            layout: trusted,
            tee: None,
            description: describe(&info, None),
        }),
        Some(c) => Ok(Served {
            layout: c.tee.clone(),
            description: describe(&info, Some(&c)),
            tee: Some(c.tee),
        }),
    }
}

/// One line for the log: which versions serve disk `info`, how.
pub fn describe(info: &DiskInfo, candidate: Option<&Candidate>) -> String {
    match (candidate, info.candidate, &info.tee) {
        (Some(c), _, _) => format!(
            "tee of {} {} and {} {}, policy {}",
            info.layout,
            info.trusted,
            c.layout,
            c.key,
            c.tee.policy()
        ),
        (None, Some(k), Some(t)) if t.state == TeeState::Quarantined => {
            format!("{}, {} ({k} quarantined)", info.layout, info.trusted)
        }
        _ => format!("{}, {}", info.layout, info.trusted),
    }
}

/// Builds the Tee of disk `name` over its (already open) `trusted` version as the catalog's
/// tee record says: opens the candidate (formatting it on first use), its presence map and the
/// recorded fault rules, and records a quarantine in the catalog when one happens. `None` when
/// the disk has no candidate or its candidate is quarantined (logged).
/// For a disk that grew (its catalog size above what the candidate's files track): grows
/// candidate `key`'s presence map at `map_path` to `blocks` blocks (the new ones absent) and
/// its migration record's block count (mode, rate and verification cursor kept: the blocks
/// already compared did not change). Each file is replaced atomically, and each step is
/// skipped once done, so a grow cut short is finished by the next attach. Files that do not
/// exist are left to be created as usual.
pub fn grow_candidate_files(
    name: &str,
    key: VersionKey,
    map_path: &std::path::Path,
    blocks: u64,
) -> Result<(), OpsError> {
    let dir = map_path.parent().map_or_else(
        || std::path::PathBuf::from("."),
        std::path::Path::to_path_buf,
    );
    let fail = |what: &str, e: &dyn std::error::Error| {
        OpsError::Invalid(format!(
            "disk {name}: cannot grow the {what} of candidate {key}: {}",
            dovetail_layout::error_chain(e)
        ))
    };
    if let Ok(Some((mut r, _))) = dovetail_migrate::record::MigrationRecord::read(&dir, key.0) {
        if r.blocks < blocks {
            let old = r.blocks;
            r.blocks = blocks;
            r.write(&dir).map_err(|e| fail("migration record", &e))?;
            info!("disk {name}: migration record of candidate {key} grown from {old} to {blocks} blocks");
        }
    }
    if dovetail_migrate::mapfile::exists(map_path) {
        PresenceMap::grow(map_path, blocks, key.0).map_err(|e| fail("presence map", &e))?;
    }
    Ok(())
}

pub fn attach_candidate(
    store: &Arc<Store>,
    name: &str,
    trusted: Arc<dyn BlockLayout>,
) -> Result<Option<Candidate>, OpsError> {
    let info: DiskInfo = store.disk(name)?;
    let (Some(candidate_key), Some(rec)) = (info.candidate, info.tee.clone()) else {
        return Ok(None);
    };
    let members = store.members(name)?;
    if !members.is_empty() {
        // A two-member Tee over such a disk would leave the other members without the writes.
        return Err(OpsError::Invalid(format!(
            "disk {name} is teed to {} members (a voting tee): only the daemon serves it              (`ctl tee-remove` down to one candidate, or `disk untee`, for this command)",
            members.len() + 2
        )));
    }
    if rec.state == TeeState::Quarantined {
        warn!(
            "disk {name}: candidate {candidate_key} has been quarantined since {} ({}); serving \
             the trusted {} alone; `untee` drops the candidate",
            rec.changed, rec.reason, info.trusted
        );
        return Ok(None);
    }
    let policy = parse_policy(&rec.policy)?;
    let cand_info = store.version(candidate_key)?;
    let cand = open::open_version(store, name, candidate_key, &cand_info.layout, info.size)?;
    let parallax = Arc::new(cand);
    let mut candidate: Arc<dyn BlockLayout> = parallax.clone();
    let rules = parse_rules(&rec.faults)
        .map_err(|e| OpsError::Invalid(format!("disk {name}: fault rules: {e}")))?;
    if !rules.is_empty() {
        warn!(
            "disk {name}: injecting faults into candidate {candidate_key}: {}",
            rec.faults.join(" ")
        );
        candidate = Arc::new(
            FaultLayout::new(candidate, rules, FAULT_SEED).with_space(store.space(candidate_key)?),
        );
    }
    let metrics = Arc::new(VersionMetrics::default());
    let candidate: Arc<dyn BlockLayout> = Arc::new(Metered::new(candidate, metrics.clone()));
    let blocks = info.size.div_ceil(MAP_BLOCK);
    let map_path = store.map_path(candidate_key);
    warn_if_map_lost(&map_path, candidate_key, name);
    grow_candidate_files(name, candidate_key, &map_path, blocks)?;
    let presence =
        PresenceMap::open_or_create(&map_path, blocks, candidate_key.0).map_err(|e| {
            OpsError::Invalid(format!(
                "disk {name}: presence map {}: {}",
                map_path.display(),
                dovetail_layout::error_chain(&e)
            ))
        })?;
    let mut opts = TeeOptions::new(name, policy);
    opts.journal = crate::ops::bisect::journal_limits();
    let tee = Tee::new(trusted, candidate, Arc::new(presence), opts).map_err(|e| {
        OpsError::Invalid(format!(
            "disk {name}: cannot start the Tee: {}",
            dovetail_layout::error_chain(&e)
        ))
    })?;
    let tee = Arc::new(tee);
    crate::ops::bisect::watch(store, &tee, name);
    let (store2, disk) = (store.clone(), name.to_string());
    tee.on_quarantine(Box::new(move |event| {
        // The catalog keeps the reason alone: status prints it after "quarantined: ".
        let reason = quarantine_reason(&event.message);
        match store2.quarantine(&disk, &reason) {
            Ok(()) => warn!("disk {disk}: quarantine recorded in the store catalog"),
            Err(e) => warn!(
                "disk {disk}: cannot record the quarantine in the store catalog: {}",
                dovetail_layout::error_chain(&e)
            ),
        }
    }));
    info!(
        "disk {name}: teed: trusted {} ({}), candidate {candidate_key} ({}), policy {policy}; \
         the candidate holds {} of {blocks} blocks",
        info.trusted,
        info.layout,
        cand_info.layout,
        tee.presence().count()
    );
    Ok(Some(Candidate {
        tee,
        parallax,
        faulty: !rec.faults.is_empty(),
        key: candidate_key,
        layout: cand_info.layout,
        metrics,
    }))
}

/// A candidate whose presence map is gone although its migration record says a migration (or
/// promote's verification pass) was under way: the map is about to be recreated empty. Says so
/// loudly, and resets the verification cursor (it vouched for blocks of the lost map).
fn warn_if_map_lost(map_path: &std::path::Path, key: VersionKey, name: &str) {
    use dovetail_migrate::record::MigrationRecord;
    let Some(dir) = map_path.parent() else { return };
    if dovetail_migrate::mapfile::exists(map_path) {
        return;
    }
    let Ok(Some((mut r, _))) = MigrationRecord::read(dir, key.0) else {
        return;
    };
    if r.mode.is_none() && r.verified == 0 {
        return;
    }
    warn!(
        "disk {name}: THE PRESENCE MAP {} OF CANDIDATE {key} IS MISSING although a migration{} \
         was under way: it is recreated empty, every block counts as absent again, and the \
         copy-out restarts from block 0 (nothing is lost: absent blocks are served by the \
         trusted version)",
        map_path.display(),
        r.mode
            .map(|m| format!(" by {}", m.name()))
            .unwrap_or_default()
    );
    if r.verified > 0 {
        r.verified = 0;
        if let Err(e) = r.write(dir) {
            warn!(
                "disk {name}: cannot reset the verification cursor: {}",
                dovetail_layout::error_chain(&e)
            );
        }
    }
}

/// `dovetail disk tee`: attaches a new, empty candidate version of `layout` to disk `name`
/// (or changes the policy and fault rules of the one attached), and records the Tee.
/// The candidate layout `tee` uses for disk `name`: `asked`, or by default the layout of the
/// candidate it has (a `tee` then changes its policy), else its trusted version's layout, to
/// which an upgrade is always known.
pub fn candidate_layout(
    store: &Store,
    name: &str,
    asked: Option<&str>,
) -> Result<String, OpsError> {
    if let Some(l) = asked {
        return Ok(l.to_string());
    }
    let info = store.disk(name)?;
    Ok(match info.candidate {
        Some(k) => store.version(k)?.layout,
        None => info.layout,
    })
}

/// Refuses a `candidate` layout no known upgrade leads to from the `trusted` one (such a
/// candidate could never be migrated to, nor promoted), naming the possible ones.
pub fn check_upgrade(name: &str, trusted: &str, candidate: &str) -> Result<(), OpsError> {
    if dovetail_migrate::upgrade::known(trusted, candidate) {
        return Ok(());
    }
    let possible = dovetail_migrate::upgrade::targets(trusted, dovetail_layout::parallax::LAYOUTS);
    Err(OpsError::Invalid(format!(
        "disk {name}: no known upgrade from its trusted layout {trusted} to a {candidate} \
         candidate (it could never be migrated to nor promoted); possible candidates: {}",
        if possible.is_empty() {
            "none".to_string()
        } else {
            possible.join(", ")
        }
    )))
}

pub fn tee_disk(
    store: &Arc<Store>,
    name: &str,
    layout: &str,
    policy: &str,
    faults: &[String],
) -> Result<String, OpsError> {
    let policy = parse_policy(policy)?;
    parse_rules(faults).map_err(|e| OpsError::Invalid(format!("--fault: {e}")))?;
    let info = store.disk(name)?;
    let key = match (info.candidate, &info.tee) {
        (Some(_), Some(t)) if t.state == TeeState::Quarantined => {
            return Err(OpsError::Invalid(format!(
                "disk {name}: its candidate is quarantined ({}); `dovetail disk untee {name}` \
                 drops it first",
                t.reason
            )));
        }
        (Some(k), _) => {
            let have = store.version(k)?.layout;
            if have != layout {
                return Err(OpsError::Invalid(format!(
                    "disk {name} already has a {have} candidate ({k}); untee it to attach a \
                     {layout} one"
                )));
            }
            k
        }
        (None, _) => {
            check_upgrade(name, &info.layout, layout)?;
            store.add_version(name, layout)?
        }
    };
    store.set_tee(
        name,
        TeeRec {
            policy: policy.to_string(),
            faults: faults.to_vec(),
            state: TeeState::Active,
            reason: String::new(),
            changed: now_secs(),
        },
    )?;
    Ok(format!(
        "disk {name}: teed to candidate {key} ({layout}), policy {policy}{}",
        if faults.is_empty() {
            String::new()
        } else {
            format!(", faults {}", faults.join(" "))
        }
    ))
}

/// `dovetail disk untee`: drops disk `name`'s candidate and frees its extents.
pub fn untee_disk(store: &Arc<Store>, name: &str) -> Result<String, OpsError> {
    let before = store.info().free_extents;
    let key = store.drop_candidate(name)?;
    let freed = store.info().free_extents.saturating_sub(before);
    Ok(format!(
        "disk {name}: dropped candidate {key}, {freed} extent(s) freed"
    ))
}

/// `dovetail migrate`: copies every block disk `name`'s candidate lacks from its trusted
/// version, offline (no VM may be using the disk: the caller holds the store). Shows a
/// progress bar if `show_progress`. The Tee is closed cleanly at the end.
pub fn migrate_offline(
    store: &Arc<Store>,
    name: &str,
    rate: u64,
    show_progress: bool,
) -> Result<dovetail_migrate::Progress, OpsError> {
    use dovetail_migrate::{CopyOut, CopyOutOptions, JobState};
    let info = store.disk(name)?;
    let trusted_version = Arc::new(open::open_disk(store, name)?);
    let trusted: Arc<dyn BlockLayout> = trusted_version.clone();
    let Some(c) = attach_candidate(store, name, trusted)? else {
        return Err(OpsError::Invalid(format!(
            "disk {name} has no active candidate (`disk tee` attaches one; a quarantined one \
             must be dropped with `disk untee`)"
        )));
    };
    let upgrade =
        dovetail_migrate::upgrade::for_versions(&info.layout, Some(trusted_version), &c.parallax)
            .ok_or_else(|| {
            OpsError::Invalid(format!(
                "no upgrade from {} to {} is known",
                info.layout, c.layout
            ))
        })?;
    let job = CopyOut::start(
        &c.tee,
        Arc::from(upgrade),
        CopyOutOptions {
            rate,
            ..CopyOutOptions::default()
        },
        Box::new(|_, _| {}),
    )
    .map_err(|e| OpsError::Invalid(format!("disk {name}: {}", dovetail_layout::error_chain(&e))))?;
    let bar = if show_progress {
        let b = indicatif::ProgressBar::new(c.tee.presence().blocks());
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} blocks {per_sec} eta {eta}",
        ) {
            b.set_style(style.progress_chars("=> "));
        }
        b.set_message(format!("{name}: copy-out"));
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let state = loop {
        let s = job.wait(std::time::Duration::from_millis(200));
        bar.set_position(c.tee.presence().count());
        if s.finished() {
            break s;
        }
    };
    bar.finish_and_clear();
    let progress = job.progress();
    drop(job);
    c.tee.close().map_err(|e| {
        OpsError::Invalid(format!(
            "disk {name}: closing the Tee: {}",
            dovetail_layout::error_chain(&e)
        ))
    })?;
    if state != JobState::Done {
        return Err(OpsError::Invalid(format!(
            "disk {name}: the copy-out {}: {}",
            serde_json::to_value(state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            progress.error.clone().unwrap_or_else(|| {
                "the candidate was quarantined (see the log and `disk list`)".into()
            })
        )));
    }
    Ok(progress)
}

/// `dovetail promote`: offline, makes disk `name`'s candidate its trusted version, after the
/// same verification pass as the live promote (unless `no_verify`; at `rate` bytes per second
/// of each version, 0: no limit; resumed from the cursor of the migration record) and with the
/// same catalog role swap. Refused (nothing changed) when the candidate lacks blocks, has
/// fault rules, a block differs, or the trusted version has snapshots.
pub fn promote_offline(
    store: &Arc<Store>,
    name: &str,
    no_verify: bool,
    rate: u64,
) -> Result<String, OpsError> {
    use dovetail_migrate::promote::{self, NotReady};
    use dovetail_migrate::record::MigrationRecord;
    use dovetail_migrate::verify::{self, Outcome, VerifyProgress};
    let snaps = open::open_disk(store, name)?.snapshots();
    if let Err(NotReady::Snapshots(names)) =
        promote::check_snapshots(snaps.into_iter().map(|s| s.name).collect())
    {
        return Err(OpsError::Invalid(format!(
            "disk {name}: the trusted version has {} snapshot(s) ({}), which retire with it; \
             export and delete them first (`disk export --snapshot`, `disk delete-snapshot`)",
            names.len(),
            names.join(", ")
        )));
    }
    let trusted: Arc<dyn BlockLayout> = Arc::new(open::open_disk(store, name)?);
    let Some(c) = attach_candidate(store, name, trusted)? else {
        return Err(OpsError::Invalid(format!(
            "disk {name} has no active candidate (`disk tee` attaches one; a quarantined one \
             must be dropped with `disk untee`)"
        )));
    };
    let refuse = |why: String| {
        if let Err(e) = c.tee.close() {
            warn!(
                "disk {name}: closing the Tee: {}",
                dovetail_layout::error_chain(&e)
            );
        }
        Err(OpsError::Invalid(format!(
            "disk {name}: promote refused: {why}"
        )))
    };
    let blocks = c.tee.presence().blocks();
    match promote::check_candidate(c.tee.presence().count(), blocks, c.faulty) {
        // (Snapshots were checked above; check_candidate does not look at them.)
        Ok(()) | Err(NotReady::Snapshots(_)) => {}
        Err(NotReady::Incomplete { present, total }) => {
            return refuse(format!(
                "the candidate holds {present} of {total} blocks; `dovetail migrate` brings the \
                 rest over first"
            ))
        }
        Err(NotReady::FaultInjected) => {
            return refuse("the candidate has fault rules injected (testing)".into())
        }
    }
    let key = c.key;
    let maps = store.map_path(key).parent().map_or_else(
        || std::path::PathBuf::from("."),
        std::path::Path::to_path_buf,
    );
    if no_verify {
        warn!("disk {name}: promoting without the verification pass (--no-verify)");
    } else {
        let record = match MigrationRecord::read(&maps, key.0) {
            Ok(r) => r.map(|(r, _)| r),
            Err(e) => {
                warn!(
                    "disk {name}: ignoring the migration record: {}",
                    dovetail_layout::error_chain(&e)
                );
                None
            }
        };
        let from = MigrationRecord::verify_from(record.as_ref(), blocks);
        let progress = VerifyProgress::new(blocks, from, rate);
        let bar = indicatif::ProgressBar::new(blocks);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} blocks {per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(format!("{name}: verifying"));
        let outcome = verify::run(
            &c.tee,
            &progress,
            &mut |v| {
                bar.set_position(progress.status().blocks_verified);
                let mut r = MigrationRecord::for_candidate(record, key.0, blocks);
                r.verified = v;
                r.write(&maps).map_err(|e| dovetail_layout::error_chain(&e))
            },
            &|| false,
        );
        bar.finish_and_clear();
        if outcome != Outcome::Passed {
            return refuse(format!("{}; nothing was changed", outcome.describe()));
        }
        info!(
            "disk {name}: verification pass: every block of candidate {key} equals the trusted \
             version"
        );
    }
    c.tee.close().map_err(|e| {
        OpsError::Invalid(format!(
            "disk {name}: closing the Tee: {}",
            dovetail_layout::error_chain(&e)
        ))
    })?;
    let layout = c.layout.clone();
    drop(c);
    let old = store.promote(name)?;
    let _ = PresenceMap::remove(&store.map_path(key));
    if let Err(e) = MigrationRecord::remove(&maps, key.0) {
        warn!(
            "disk {name}: cannot remove the migration record: {}",
            dovetail_layout::error_chain(&e)
        );
    }
    Ok(format!(
        "disk {name}: promoted candidate {key} ({layout}) to trusted{}; {old} retired, its \
         extents freed",
        if no_verify {
            " without the verification pass"
        } else {
            " after the verification pass found every block equal"
        }
    ))
}

/// `dovetail disk upgrade`: the offline in-place upgrade of disk `name` to `layout`: a new
/// candidate of `layout` is attached (mirror-only), every block copied, and the candidate
/// promoted; the old version is retired. For when `layout` is already trusted.
pub fn upgrade_offline(store: &Arc<Store>, name: &str, layout: &str) -> Result<String, OpsError> {
    let info = store.disk(name)?;
    if info.candidate.is_some() {
        return Err(OpsError::Invalid(format!(
            "disk {name} already has a candidate; `disk untee` drops it, or migrate and promote it \
             live"
        )));
    }
    let snaps = open::open_disk(store, name)?.snapshots();
    if !snaps.is_empty() {
        return Err(OpsError::Invalid(format!(
            "disk {name} has {} snapshot(s), which retire with its trusted version; export and \
             delete them first",
            snaps.len()
        )));
    }
    tee_disk(store, name, layout, "mirror-only", &[])?;
    let progress = match migrate_offline(store, name, 0, true) {
        Ok(p) => p,
        Err(e) => {
            let _ = store.drop_candidate(name);
            return Err(e);
        }
    };
    // The same verification pass and catalog swap as `dovetail promote`.
    let promoted = match promote_offline(store, name, false, 0) {
        Ok(m) => m,
        Err(e) => {
            let _ = store.drop_candidate(name);
            return Err(e);
        }
    };
    let prefix = format!("disk {name}: ");
    Ok(format!(
        "disk {name}: upgraded to {layout}: {} blocks copied, {} zero blocks; {}",
        progress.copied_blocks,
        progress.zero_blocks,
        promoted.strip_prefix(&prefix).unwrap_or(&promoted)
    ))
}

/// The reason of a quarantine event's message ("candidate quarantined: REASON; serving the
/// trusted version alone"), or the whole message if it is not of that form.
fn quarantine_reason(message: &str) -> String {
    message
        .strip_prefix("candidate quarantined: ")
        .map(|m| {
            m.strip_suffix("; serving the trusted version alone")
                .unwrap_or(m)
        })
        .unwrap_or(message)
        .to_string()
}

#[cfg(test)]
mod quarantine_tests {
    use super::quarantine_reason;

    #[test]
    fn the_recorded_reason_says_quarantined_once() {
        assert_eq!(
            quarantine_reason(
                "candidate quarantined: read mismatch at sector 8; serving the trusted version \
                 alone"
            ),
            "read mismatch at sector 8"
        );
        assert_eq!(quarantine_reason("something else"), "something else");
    }
}
