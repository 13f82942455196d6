//! A store's `maps/` directory as `store check` and `serve` see it: every candidate's presence
//! map and migration record checked (checksums, block count against the disk, owner is a
//! candidate), and orphans (files of a version that is not a candidate, e.g. left by a kill -9
//! right after a promote's commit) reported by `check` and removed when a store is opened for
//! serving. Files are opened without following symlinks (`dovetail_migrate::mapfile`).

use std::collections::BTreeMap;
use std::path::Path;

use dovetail_layout::error_chain;
use dovetail_migrate::mapfile::{Dir, Entry};
use dovetail_migrate::presence::{PresenceMap, BLOCKS_PER_PAGE, MAP_BLOCK};
use dovetail_migrate::record::MigrationRecord;
use dovetail_store::{DiskInfo, Store, VersionKey};
use log::{info, warn};

/// The version key a `maps/` file name belongs to: `<key>.map`, `<key>.migration` and their
/// `.tmp` files.
pub fn key_of(name: &str) -> Option<u64> {
    let base = name.strip_suffix(".tmp").unwrap_or(name);
    base.strip_suffix(".map")
        .or_else(|| base.strip_suffix(".migration"))
        .and_then(|k| k.parse().ok())
}

/// The names in `maps/` (the record objects of a store on RADOS), sorted (empty if there is
/// no such directory or they cannot be listed: logged).
fn names(maps: &Path) -> Vec<String> {
    Dir::names(maps).unwrap_or_else(|e| {
        warn!("cannot list {}: {e}", maps.display());
        Vec::new()
    })
}

/// Candidates by key: the disk each belongs to.
fn candidates(disks: &[DiskInfo]) -> BTreeMap<u64, &DiskInfo> {
    disks
        .iter()
        .filter_map(|d| d.candidate.map(|k| (k.0, d)))
        .collect()
}

/// What `store check` finds in `maps/` of the store in `dir`: `(violations, notes)`. `disks`
/// and `versions` are the catalog's (files of keys outside the catalog are the store check's
/// own note).
pub fn check(
    dir: &Path,
    disks: &[DiskInfo],
    versions: &[VersionKey],
) -> (Vec<String>, Vec<String>) {
    let maps = dir.join(dovetail_store::MAPS_DIR);
    let (mut bad, mut notes) = (Vec::new(), Vec::new());
    let cands = candidates(disks);
    for (&key, d) in &cands {
        let blocks = d.size.div_ceil(MAP_BLOCK);
        let map = maps.join(format!("{key}.map"));
        let record = match MigrationRecord::read(&maps, key) {
            Ok(r) => r.map(|(r, v)| {
                if v != dovetail_migrate::record::RECORD_VERSION {
                    notes.push(format!(
                        "maps/{key}.migration (disk {}) is format version {v}; serving rewrites it \
                         as version {}",
                        d.name,
                        dovetail_migrate::record::RECORD_VERSION
                    ));
                }
                r
            }),
            Err(e) => {
                bad.push(format!("disk {}: {}", d.name, error_chain(&e)));
                None
            }
        };
        if let Some(r) = &record {
            if r.blocks != 0 && r.blocks != blocks {
                bad.push(format!(
                    "disk {}: maps/{key}.migration is for {} blocks, but the disk has {blocks}",
                    d.name, r.blocks
                ));
            }
        }
        let exists = Dir::open(&maps, key)
            .and_then(|m| m.entry(&format!("{key}.map")))
            .map_or(Entry::Missing, |e| e);
        if exists == Entry::Missing {
            match &record {
                Some(r) if r.mode.is_some() || r.verified > 0 => {
                    bad.push(format!(
                    "disk {}: the presence map maps/{key}.map of candidate {key} is missing, but \
                     maps/{key}.migration records a migration{}: serving would start an empty \
                     map (every block absent; the copy-out restarts from block 0)",
                    d.name,
                    r.mode.map(|m| format!(" by {}", m.name())).unwrap_or_default()
                ))
                }
                _ => notes.push(format!(
                    "disk {}: candidate {key} has no presence map yet (created when first served)",
                    d.name
                )),
            }
            continue;
        }
        match PresenceMap::inspect(&map, blocks, key) {
            Ok(i) => {
                if !i.bad_pages.is_empty() {
                    bad.push(format!(
                        "disk {}: presence map maps/{key}.map: {} bitmap page(s) fail their \
                         checksum (pages {}; {BLOCKS_PER_PAGE} blocks each): damaged, or torn by \
                         a power cut; serving takes their blocks as absent and copies them again",
                        d.name,
                        i.bad_pages.len(),
                        i.bad_pages
                            .iter()
                            .take(8)
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                if i.version != dovetail_migrate::presence::MAP_FORMAT_VERSION {
                    notes.push(format!(
                        "disk {}: presence map maps/{key}.map is format version {}; serving \
                         upgrades it",
                        d.name, i.version
                    ));
                }
                notes.push(format!(
                    "disk {}: presence map of candidate {key}: {} of {} blocks present, {}",
                    d.name,
                    i.present,
                    i.blocks,
                    if i.clean {
                        "clean"
                    } else {
                        "not closed cleanly"
                    }
                ));
            }
            Err(e) => bad.push(format!(
                "disk {}: presence map maps/{key}.map: {}",
                d.name,
                error_chain(&e)
            )),
        }
    }
    for name in names(&maps) {
        let Some(key) = key_of(&name) else { continue };
        if cands.contains_key(&key) || !versions.iter().any(|v| v.0 == key) {
            continue;
        }
        notes.push(format!(
            "maps/{name} is an orphan: version {key} is not a candidate (left by a promote or \
             untee interrupted by a crash); serving removes it"
        ));
    }
    (bad, notes)
}

/// Removes every file of `maps/` that belongs to a version that is not a candidate of any
/// disk (orphans: e.g. the map of a version a promote made trusted just before a kill -9),
/// logging each. Anything else (names of no version) is left alone. Failures are logged.
pub fn clean_orphans(store: &Store) {
    let map = store.map_path(VersionKey(0));
    let Some(maps) = map.parent().map(Path::to_path_buf) else {
        return;
    };
    let mut cands: Vec<u64> = store
        .disks()
        .iter()
        .filter_map(|d| d.candidate.map(|k| k.0))
        .collect();
    // An N-version Tee's members after the candidate keep their maps too.
    for d in store.disks() {
        cands.extend(
            store
                .members(&d.name)
                .unwrap_or_default()
                .iter()
                .map(|m| m.key),
        );
    }
    let mut dir = None;
    for name in names(&maps) {
        let Some(key) = key_of(&name) else { continue };
        if cands.contains(&key) {
            continue;
        }
        if dir.is_none() {
            match Dir::open(&maps, key) {
                Ok(d) => dir = Some(d),
                Err(e) => {
                    warn!("cannot open {} to remove orphans: {e}", maps.display());
                    return;
                }
            }
        }
        let Some(d) = &dir else { return };
        match d.remove(&name) {
            Ok(()) => info!(
                "removed the orphan maps/{name}: version {key} is not a candidate (left by an \
                 interrupted promote or untee)"
            ),
            Err(e) => warn!("cannot remove the orphan maps/{name}: {e}"),
        }
    }
    if let Some(d) = dir {
        if let Err(e) = d.sync() {
            warn!("syncing {}: {e}", maps.display());
        }
    }
}
