//! Crash safety of the store's commits: a seeded random workload of disk and version changes,
//! tee records, grants, root commits and synced data writes runs over simulated files; the
//! power is then cut at each sync point in turn (unsynced sectors torn at random, or all lost,
//! or all kept) and the store reopened. Every operation that returned must be visible, the one
//! in flight either whole or absent, the store must open, and `check` must pass.
//!
//! A grant zeroes its extent without syncing the data file (docs/format.md, *Grant*): after a
//! crash, sectors of a granted extent that its version did not write since the grant may hold
//! what the extent held before (a former owner's bytes), so those sectors are not compared;
//! every sector a version wrote (and synced) is.
//!
//! Also the upgrade from format version 1: the power is cut at each of its syncs, and the store
//! must then open (as version 1 or 2) with the same catalog, read-only and read-write.

use std::collections::HashMap;
use std::sync::Arc;

use dovetail_store::format::{encode_slot, Header, Meta, FORMAT_VERSION, UPGRADE_VERSION};
use dovetail_store::rng::SplitMix64;
use dovetail_store::sim::{Power, SimFile, Torn};
use dovetail_store::{check_on, DiskInfo, Store, TeeRec, TeeState, VersionInfo};

const EXT: u64 = 16 << 10;
const EXTENTS: u64 = 10;
const OPS: usize = 60;

/// Everything a reopened store must reproduce exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    generation: u64,
    free: u32,
    disks: Vec<DiskInfo>,
    versions: Vec<VersionInfo>,
    roots: Vec<Vec<u8>>,
    /// Every granted extent's bytes, per version in key order.
    data: Vec<Vec<Vec<u8>>>,
    /// Per version and extent as in `data`: which 512-byte sectors the version has not written
    /// since the grant (not part of the comparison, see [`Snapshot::seen_as`]).
    fresh: Vec<Vec<Vec<bool>>>,
}

/// Sectors not written since their extent's grant, per (version key, extent).
type Fresh = HashMap<(u64, u32), Vec<bool>>;

const SECTORS: usize = (EXT / 512) as usize;

impl Snapshot {
    /// `self` (a state read after a crash) with every sector that `want` says its version had
    /// not written since the grant replaced by `want`'s bytes: those may hold a former owner's
    /// bytes after a crash, which no layout reads.
    fn seen_as(&self, want: &Snapshot) -> Snapshot {
        let mut out = self.clone();
        for (v, extents) in out.data.iter_mut().enumerate() {
            for (x, bytes) in extents.iter_mut().enumerate() {
                let (Some(fresh), Some(theirs)) = (
                    want.fresh.get(v).and_then(|f| f.get(x)),
                    want.data.get(v).and_then(|d| d.get(x)),
                ) else {
                    continue;
                };
                for (i, &f) in fresh.iter().enumerate() {
                    if f {
                        bytes[i * 512..(i + 1) * 512]
                            .copy_from_slice(&theirs[i * 512..(i + 1) * 512]);
                    }
                }
            }
        }
        out.fresh = want.fresh.clone();
        out
    }

    /// Sectors not written since their grant that do not read as zeros.
    fn former_sectors(&self, want: &Snapshot) -> usize {
        let mut n = 0;
        for (v, extents) in self.data.iter().enumerate() {
            for (x, bytes) in extents.iter().enumerate() {
                let Some(fresh) = want.fresh.get(v).and_then(|f| f.get(x)) else {
                    continue;
                };
                n += fresh
                    .iter()
                    .enumerate()
                    .filter(|&(i, &f)| f && bytes[i * 512..(i + 1) * 512].iter().any(|&b| b != 0))
                    .count();
            }
        }
        n
    }
}

fn snapshot(store: &Arc<Store>, written: &Fresh) -> Snapshot {
    let versions = store.versions();
    let mut roots = Vec::new();
    let mut data = Vec::new();
    let mut fresh = Vec::new();
    for v in &versions {
        let space = store.space(v.key).expect("space");
        roots.push(space.root());
        data.push(
            v.extents
                .iter()
                .map(|&e| {
                    let mut buf = vec![0u8; EXT as usize];
                    space.read(e, 0, &mut buf).expect("read extent");
                    buf
                })
                .collect(),
        );
        fresh.push(
            v.extents
                .iter()
                .map(|&e| {
                    written
                        .get(&(v.key.0, e.0))
                        .cloned()
                        .unwrap_or_else(|| vec![false; SECTORS])
                })
                .collect(),
        );
    }
    let info = store.info();
    // A quarantine records the time it happened: not the same in a replay.
    let disks = store
        .disks()
        .into_iter()
        .map(|mut d| {
            if let Some(t) = d.tee.as_mut() {
                t.changed = 0;
            }
            d
        })
        .collect();
    Snapshot {
        generation: info.generation,
        free: info.free_extents,
        disks,
        versions,
        roots,
        data,
        fresh,
    }
}

fn pick<T: Clone>(rng: &mut SplitMix64, v: &[T]) -> Option<T> {
    (!v.is_empty()).then(|| v[rng.below(v.len() as u64) as usize].clone())
}

/// One random operation, chosen from the store's state (so a replay makes the same choices).
fn step(
    store: &Arc<Store>,
    rng: &mut SplitMix64,
    made: &mut u32,
    fresh: &mut Fresh,
) -> dovetail_store::Result<()> {
    let disks = store.disks();
    let versions = store.versions();
    match rng.below(12) {
        0 | 1 if disks.len() < 4 => {
            *made += 1;
            let size = (1 + rng.below(8)) << 20;
            store.create_disk(&format!("d{made}"), size, "parallax-v1")?;
        }
        2 => {
            let open: Vec<_> = disks.iter().filter(|d| d.candidate.is_none()).collect();
            if let Some(d) = pick(rng, &open) {
                store.add_version(&d.name, "parallax-v2")?;
            }
        }
        3 | 4 if store.info().free_extents > 0 => {
            if let Some(v) = pick(rng, &versions) {
                let e = store.space(v.key)?.grant_extent()?;
                fresh.insert((v.key.0, e.0), vec![true; SECTORS]);
            }
        }
        5 | 6 => {
            if let Some(v) = pick(rng, &versions) {
                let len = rng.below(300) as usize;
                let fill = rng.next_u64() as u8;
                store.space(v.key)?.commit_root(&vec![fill; len])?;
            }
        }
        7 | 8 => {
            let with: Vec<_> = versions.iter().filter(|v| !v.extents.is_empty()).collect();
            if let Some(v) = pick(rng, &with) {
                let e = pick(rng, &v.extents).expect("has extents");
                let at = rng.below(EXT / 512) * 512;
                let fill = rng.next_u64() as u8;
                let space = store.space(v.key)?;
                if let Some(f) = fresh.get_mut(&(v.key.0, e.0)) {
                    f[(at / 512) as usize] = false;
                }
                space.write(e, at, &[fill; 512])?;
                space.sync()?;
            }
        }
        9 => {
            if let Some(d) = pick(rng, &disks) {
                match (rng.below(3), d.candidate) {
                    (0, Some(_)) => drop(store.promote(&d.name)?),
                    (1, Some(_)) => drop(store.drop_candidate(&d.name)?),
                    _ => drop(store.delete_disk(&d.name)?),
                }
            }
        }
        10 => {
            let with: Vec<_> = disks.iter().filter(|d| d.candidate.is_some()).collect();
            if let Some(d) = pick(rng, &with) {
                let faults = (0..rng.below(3))
                    .map(|i| format!("fault-{i}-{}", rng.below(100)))
                    .collect();
                store.set_tee(
                    &d.name,
                    TeeRec {
                        policy: format!("policy-{}", rng.below(1000)),
                        faults,
                        state: TeeState::Active,
                        reason: String::new(),
                        changed: rng.below(1 << 40),
                    },
                )?;
            }
        }
        11 => {
            let with: Vec<_> = disks.iter().filter(|d| d.tee.is_some()).collect();
            if let Some(d) = pick(rng, &with) {
                let n = rng.below(1000);
                store.quarantine(&d.name, &format!("mismatch at block {n}"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Runs the workload; calls `after` once each operation has returned, with the sectors not
/// written since their grant. Returns the index of the operation the power cut interrupted,
/// if any.
fn workload(
    store: &Arc<Store>,
    seed: u64,
    power: &Power,
    mut after: impl FnMut(&Fresh),
) -> Option<usize> {
    let mut rng = SplitMix64::new(seed);
    let mut made = 0;
    let mut fresh = Fresh::new();
    for i in 0..OPS {
        match step(store, &mut rng, &mut made, &mut fresh) {
            Ok(()) => after(&fresh),
            Err(_) if power.is_cut() => return Some(i),
            Err(e) => panic!("operation {i} failed with the power on: {e}"),
        }
    }
    None
}

fn machine() -> (Arc<Power>, SimFile, SimFile) {
    let power = Power::new();
    (
        power.clone(),
        SimFile::new(power.clone()),
        SimFile::new(power),
    )
}

fn create(meta: &SimFile, data: &SimFile) -> Arc<Store> {
    Store::create_on(
        Box::new(meta.clone()),
        Box::new(data.clone()),
        EXTENTS * EXT,
        EXT,
    )
    .expect("create")
}

fn crash_everywhere(seed: u64) {
    // Reference run: the state after each operation.
    let (power, meta, data) = machine();
    let store = create(&meta, &data);
    let base = power.syncs();
    let mut snaps = vec![snapshot(&store, &Fresh::new())];
    assert_eq!(
        workload(&store, seed, &power, |f| snaps.push(snapshot(&store, f))),
        None
    );
    let sync_points = power.syncs() - base;
    assert!(
        sync_points > 20,
        "the workload should sync often ({sync_points})"
    );
    drop(store);

    let mut former = 0;
    for k in 1..=sync_points {
        for torn in [Torn::KeepNone, Torn::KeepAll, Torn::Random(seed ^ (k << 8))] {
            let (power, meta, data) = machine();
            let store = create(&meta, &data);
            power.crash_at_sync(power.syncs() + k);
            let failed = workload(&store, seed, &power, |_| {})
                .expect("the power is cut during the workload");
            drop(store);

            let after = Power::new();
            let meta = meta.after_crash(after.clone(), torn);
            let data = data.after_crash(
                after.clone(),
                match torn {
                    Torn::Random(s) => Torn::Random(s.rotate_left(17)),
                    t => t,
                },
            );
            let store = Store::open_on(Box::new(meta.clone()), Box::new(data.clone()))
                .unwrap_or_else(|e| panic!("seed {seed}, sync {k}, {torn:?}: reopen failed: {e}"));
            let got = snapshot(&store, &Fresh::new());
            former += got.former_sectors(&snaps[failed]);
            assert!(
                got.seen_as(&snaps[failed]) == snaps[failed]
                    || got.seen_as(&snaps[failed + 1]) == snaps[failed + 1],
                "seed {seed}, sync {k}, {torn:?}: operation {failed} was interrupted; \
                 state is neither before nor after it:\n{got:#?}\nbefore:\n{:#?}\nafter:\n{:#?}",
                snaps[failed],
                snaps[failed + 1]
            );
            let report =
                check_on(Box::new(meta.clone()), Box::new(data.clone()), &[]).expect("check runs");
            assert!(report.is_ok(), "seed {seed}, sync {k}, {torn:?}: {report}");

            // The store goes on committing after the crash, and those commits hold too.
            store
                .create_disk("after-crash", 1 << 20, "parallax-v1")
                .expect("commit after the crash");
            drop(store);
            let again = Store::open_on(Box::new(meta), Box::new(data)).expect("reopen");
            assert_eq!(again.info().generation, got.generation + 1);
            assert!(again.disk("after-crash").is_ok());
        }
    }
    eprintln!(
        "seed {seed}: {former} sectors of granted extents held a former owner's bytes after a \
         crash (never written by their new owner, so never read)"
    );
}

#[test]
fn every_returned_commit_survives_a_crash_at_any_sync_point_seed_1() {
    crash_everywhere(1);
}

#[test]
fn every_returned_commit_survives_a_crash_at_any_sync_point_seed_2() {
    crash_everywhere(0x5eed_0002);
}

#[test]
fn every_returned_commit_survives_a_crash_at_any_sync_point_seed_3() {
    crash_everywhere(0xdead_beef);
}

// ---- The upgrade from format version 1 ----

/// A slot's fields as docs/format.md puts them: (generation, payload).
fn slot_at(meta: &[u8], at: usize) -> (u64, Vec<u8>, u32) {
    let generation = u64::from_le_bytes(meta[at..at + 8].try_into().expect("8"));
    let len = u32::from_le_bytes(meta[at + 8..at + 12].try_into().expect("4")) as usize;
    let crc = u32::from_le_bytes(meta[at + 12..at + 16].try_into().expect("4"));
    let payload = meta
        .get(at + 16..at + 16 + len)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    (generation, payload, crc)
}

/// Rewrites the metadata file of a store this binary created (format version 3, one tier, as
/// `create_on` makes it) as the version-1 binary would have written the same catalogs (tee
/// records dropped): header version 1 (no tier table), each valid slot re-encoded with its
/// generation in format 1; other slots left as they are.
fn downgrade(meta: &[u8]) -> Vec<u8> {
    let h = Header::decode(&meta[..4096], std::path::Path::new("m")).expect("header");
    assert_eq!(h.version, FORMAT_VERSION);
    assert_eq!(h.tiers.len(), 1, "format version 1 has one data file");
    let mut out = meta.to_vec();
    out[..4096].copy_from_slice(
        &Header {
            version: 1,
            ..h.clone()
        }
        .encode(),
    );
    for i in 0..2 {
        let at = h.slot_offset(i) as usize;
        let (generation, payload, crc) = slot_at(meta, at);
        if generation == 0
            || dovetail_store::format::slot_crc(h.version, &meta[at..at + 12], &payload) != crc
        {
            continue;
        }
        let (mut m, _) = Meta::decode(&payload, h.version).expect("payload");
        for d in &mut m.disks {
            d.tee = None;
        }
        let slot = encode_slot(1, generation, &m.encode_for(1).expect("v1"));
        out[at..at + slot.len()].copy_from_slice(&slot);
    }
    out
}

/// The newest valid slot by the version-1 rules (what a version-1 binary reads): generation
/// and payload.
fn newest_v1(meta: &[u8]) -> (u64, Vec<u8>) {
    let h = Header::decode(&meta[..4096], std::path::Path::new("m")).expect("header");
    let mut best: Option<(u64, Vec<u8>)> = None;
    for i in 0..2 {
        let at = h.slot_offset(i) as usize;
        let (generation, payload, crc) = slot_at(meta, at);
        let want = crc32c::crc32c_append(crc32c::crc32c(&meta[at..at + 12]), &payload);
        if generation != 0 && want == crc && best.as_ref().is_none_or(|(g, _)| generation > *g) {
            best = Some((generation, payload));
        }
    }
    best.expect("a valid version-1 slot")
}

/// What must survive the upgrade: the catalog, the roots and the data, not the generation.
fn catalog(store: &Arc<Store>) -> Snapshot {
    Snapshot {
        generation: 0,
        ..snapshot(store, &Fresh::new())
    }
}

/// Version-1 stores to upgrade: after a workload (both slots valid), fresh (slot B empty), and
/// with the older slot damaged.
fn v1_stores() -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    for seed in [1u64, 0x5eed_0002, 0xdead_beef] {
        let (power, meta, data) = machine();
        let store = create(&meta, &data);
        assert_eq!(workload(&store, seed, &power, |_| {}), None);
        drop(store);
        let m = downgrade(&meta.durable_bytes());
        out.push((
            format!("workload {seed:#x}"),
            m.clone(),
            data.durable_bytes(),
        ));
        // The older slot torn: garbage where its payload was.
        let h = Header::decode(&m[..4096], std::path::Path::new("m")).expect("header");
        let newest = newest_v1(&m).0;
        let older = (0..2)
            .find(|&i| slot_at(&m, h.slot_offset(i) as usize).0 != newest)
            .expect("an older slot");
        let mut torn = m;
        let at = h.slot_offset(older) as usize + 16;
        torn[at..at + 64].fill(0x5a);
        out.push((
            format!("workload {seed:#x}, older slot torn"),
            torn,
            data.durable_bytes(),
        ));
    }
    let (_, meta, data) = machine();
    drop(create(&meta, &data));
    out.push((
        "fresh".into(),
        downgrade(&meta.durable_bytes()),
        data.durable_bytes(),
    ));
    out
}

#[test]
fn an_upgrade_cut_at_any_sync_leaves_a_store_with_the_same_catalog() {
    for (what, meta, data) in v1_stores() {
        let power = Power::new();
        let reference = Store::open_on_read_only(
            Box::new(SimFile::with_bytes(power.clone(), &meta)),
            Box::new(SimFile::with_bytes(power.clone(), &data)),
        )
        .expect("the version-1 store opens read-only");
        assert_eq!(reference.info().format_version, 1);
        let want = catalog(&reference);
        let generation = reference.info().generation;
        let v1_view = newest_v1(&meta);
        drop(reference);

        // Uninterrupted: two syncs.
        let power = Power::new();
        let s = Store::open_on(
            Box::new(SimFile::with_bytes(power.clone(), &meta)),
            Box::new(SimFile::with_bytes(power.clone(), &data)),
        )
        .expect("upgrade");
        assert_eq!(power.syncs(), 2, "{what}");
        assert_eq!(s.info().format_version, UPGRADE_VERSION);
        assert_eq!(s.info().generation, generation + 1);
        assert_eq!(catalog(&s), want, "{what}");
        drop(s);

        for k in 1..=2u64 {
            for torn in [Torn::KeepNone, Torn::KeepAll, Torn::Random(k ^ 0x70a2)] {
                let ctx = format!("{what}, cut at sync {k}, {torn:?}");
                let power = Power::new();
                let m = SimFile::with_bytes(power.clone(), &meta);
                let d = SimFile::with_bytes(power.clone(), &data);
                power.crash_at_sync(k);
                let e = Store::open_on(Box::new(m.clone()), Box::new(d.clone()))
                    .expect_err("the power is cut during the upgrade");
                assert!(power.is_cut(), "{ctx}: {e}");

                let after = Power::new();
                let m = m.after_crash(after.clone(), torn);
                let d = d.after_crash(after.clone(), torn);
                let bytes = m.durable_bytes();
                let version = u32::from_le_bytes(bytes[16..20].try_into().expect("4"));
                assert!(version == 1 || version == 2, "{ctx}: version {version}");
                if version == 1 {
                    // A version-1 binary would read the same slot as before.
                    assert_eq!(newest_v1(&bytes), v1_view, "{ctx}");
                }

                // Read-only: opens as it is, same catalog, writes nothing.
                let ro = Store::open_on_read_only(Box::new(m.clone()), Box::new(d.clone()))
                    .unwrap_or_else(|e| panic!("{ctx}: read-only open failed: {e}"));
                assert_eq!(ro.info().format_version, version, "{ctx}");
                assert_eq!(catalog(&ro), want, "{ctx}");
                drop(ro);
                assert!(m.durable_bytes() == bytes, "{ctx}: a read-only open wrote");
                let report =
                    check_on(Box::new(m.clone()), Box::new(d.clone()), &[]).expect("check runs");
                assert!(report.is_ok(), "{ctx}: {report}");

                // Read-write: (finishes the) upgrade, same catalog.
                let syncs = after.syncs();
                let rw = Store::open_on(Box::new(m.clone()), Box::new(d.clone()))
                    .unwrap_or_else(|e| panic!("{ctx}: read-write open failed: {e}"));
                assert_eq!(rw.info().format_version, UPGRADE_VERSION, "{ctx}");
                assert_eq!(
                    after.syncs() - syncs,
                    if version == 1 { 2 } else { 0 },
                    "{ctx}"
                );
                assert_eq!(catalog(&rw), want, "{ctx}");
                rw.create_disk("after-upgrade", 1 << 20, "parallax-v1")
                    .unwrap_or_else(|e| panic!("{ctx}: commit after the upgrade: {e}"));
                drop(rw);
                let again =
                    Store::open_on(Box::new(m.clone()), Box::new(d.clone())).expect("reopen");
                assert!(again.disk("after-upgrade").is_ok(), "{ctx}");
                drop(again);
                let report = check_on(Box::new(m), Box::new(d), &[]).expect("check runs");
                assert!(report.is_ok(), "{ctx}: {report}");
            }
        }
    }
}

/// Rewrites a store this binary created (format version 4, one tier, as `create_on` makes it)
/// as a version-3 binary would have written it: header version 3, every valid slot with a
/// version-3 checksum, and the data file without its tier header.
fn downgrade_to_v3(meta: &[u8], data: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let h = Header::decode(&meta[..4096], std::path::Path::new("m")).expect("header");
    (
        downgrade_to(meta, 3),
        data[..h.tier_len(0) as usize].to_vec(),
    )
}

/// Rewrites the metadata of a store this binary created as a binary of format `to` (3 or 4)
/// would have written it: header version `to`, every valid slot's payload re-encoded in that
/// format with its checksum. (The tier file is the caller's.)
fn downgrade_to(meta: &[u8], to: u32) -> Vec<u8> {
    let h = Header::decode(&meta[..4096], std::path::Path::new("m")).expect("header");
    assert_eq!(h.version, FORMAT_VERSION);
    let mut out = meta.to_vec();
    out[..4096].copy_from_slice(
        &Header {
            version: to,
            ..h.clone()
        }
        .encode(),
    );
    for i in 0..2 {
        let at = h.slot_offset(i) as usize;
        let (generation, payload, crc) = slot_at(meta, at);
        if generation == 0
            || dovetail_store::format::slot_crc(h.version, &meta[at..at + 12], &payload) != crc
        {
            continue;
        }
        let (m, _) = Meta::decode(&payload, h.version).expect("decode a valid slot");
        let slot = encode_slot(to, generation, &m.encode_for(to).expect("re-encode"));
        out[at..at + slot.len()].copy_from_slice(&slot);
    }
    out
}

/// Upgrades the format-`from` store `meta`/`data` to the current format: uninterrupted it takes
/// `syncs` syncs and keeps the catalog; cut at each of them (torn every way), the store left
/// opens read-only at the version its header names with the same catalog, checks clean,
/// finishes the upgrade on a read-write open and takes commits (a disk, an attachment) after it.
fn upgrade_cut_at_every_sync(
    seed: u64,
    meta: &[u8],
    data: &[u8],
    from: u32,
    syncs: u64,
    salt: u64,
) {
    let reference = Store::open_on_read_only(
        Box::new(SimFile::with_bytes(Power::new(), meta)),
        Box::new(SimFile::with_bytes(Power::new(), data)),
    )
    .unwrap_or_else(|e| panic!("the version-{from} store opens read-only: {e}"));
    assert_eq!(reference.info().format_version, from);
    let want = catalog(&reference);
    drop(reference);

    let power = Power::new();
    let s = Store::open_on(
        Box::new(SimFile::with_bytes(power.clone(), meta)),
        Box::new(SimFile::with_bytes(power.clone(), data)),
    )
    .expect("upgrade");
    assert_eq!(power.syncs(), syncs);
    assert_eq!(s.info().format_version, FORMAT_VERSION);
    assert_eq!(catalog(&s), want);
    drop(s);

    for k in 1..=syncs {
        for torn in [Torn::KeepNone, Torn::KeepAll, Torn::Random(k ^ salt)] {
            let ctx = format!("seed {seed:#x}, from version {from}, cut at sync {k}, {torn:?}");
            let power = Power::new();
            let m = SimFile::with_bytes(power.clone(), meta);
            let d = SimFile::with_bytes(power.clone(), data);
            power.crash_at_sync(k);
            let e = Store::open_on(Box::new(m.clone()), Box::new(d.clone()))
                .expect_err("the power is cut during the upgrade");
            assert!(power.is_cut(), "{ctx}: {e}");
            let after = Power::new();
            let m = m.after_crash(after.clone(), torn);
            let d = d.after_crash(after.clone(), torn);
            let bytes = m.durable_bytes();
            let version = u32::from_le_bytes(bytes[16..20].try_into().expect("4"));
            assert!(
                (from..=FORMAT_VERSION).contains(&version),
                "{ctx}: version {version}"
            );

            let ro = Store::open_on_read_only(Box::new(m.clone()), Box::new(d.clone()))
                .unwrap_or_else(|e| panic!("{ctx}: read-only open failed: {e}"));
            assert_eq!(ro.info().format_version, version, "{ctx}");
            assert_eq!(catalog(&ro), want, "{ctx}");
            drop(ro);
            let report =
                check_on(Box::new(m.clone()), Box::new(d.clone()), &[]).expect("check runs");
            assert!(report.is_ok(), "{ctx}: {report}");

            let rw = Store::open_on(Box::new(m.clone()), Box::new(d.clone()))
                .unwrap_or_else(|e| panic!("{ctx}: read-write open failed: {e}"));
            assert_eq!(rw.info().format_version, FORMAT_VERSION, "{ctx}");
            assert_eq!(catalog(&rw), want, "{ctx}");
            rw.create_disk("after-upgrade", 1 << 20, "parallax-v1")
                .unwrap_or_else(|e| panic!("{ctx}: commit after the upgrade: {e}"));
            rw.set_attachment(
                "after-upgrade",
                Some(dovetail_store::AttachRec {
                    socket: "/run/x.sock".into(),
                    queues: 1,
                    read_only: false,
                    serial: String::new(),
                }),
            )
            .unwrap_or_else(|e| panic!("{ctx}: an attachment after the upgrade: {e}"));
            drop(rw);
            let report = check_on(Box::new(m), Box::new(d), &[]).expect("check runs");
            assert!(report.is_ok(), "{ctx}: {report}");
        }
    }
}

#[test]
fn an_upgrade_to_tier_headers_cut_at_any_sync_leaves_a_store_with_the_same_catalog() {
    for seed in [1u64, 0x5eed_0003] {
        let (power, meta, data) = machine();
        let store = create(&meta, &data);
        assert_eq!(workload(&store, seed, &power, |_| {}), None);
        drop(store);
        let (meta, data) = downgrade_to_v3(&meta.durable_bytes(), &data.durable_bytes());
        // Three syncs (the tier file, the new slot, the header) to format 4, then two (the new
        // slot, the header) to format 5.
        upgrade_cut_at_every_sync(seed, &meta, &data, 3, 5, 0x7e3);
    }
}

#[test]
fn an_upgrade_to_attachment_records_cut_at_any_sync_leaves_a_store_with_the_same_catalog() {
    for seed in [1u64, 0x5eed_0005] {
        let (power, meta, data) = machine();
        let store = create(&meta, &data);
        assert_eq!(workload(&store, seed, &power, |_| {}), None);
        drop(store);
        let meta = downgrade_to(&meta.durable_bytes(), 4);
        let data = data.durable_bytes();
        // Two syncs (the new slot, the header).
        upgrade_cut_at_every_sync(seed, &meta, &data, 4, 2, 0x7e5);
    }
}
