//! Crash safety of the store's commits: a seeded random workload of disk and version changes,
//! grants, root commits and synced data writes runs over simulated files; the power is then cut
//! at each sync point in turn (unsynced sectors torn at random, or all lost, or all kept) and
//! the store reopened. Every operation that returned must be visible, the one in flight either
//! whole or absent, the store must open, and `check` must pass.

use std::sync::Arc;

use dovetail_store::sim::{Power, SimFile, SplitMix64, Torn};
use dovetail_store::{check_on, DiskInfo, Store, VersionInfo};

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
    /// crc32c of every granted extent's bytes, per version in key order.
    data: Vec<Vec<u32>>,
}

fn snapshot(store: &Arc<Store>) -> Snapshot {
    let versions = store.versions();
    let mut roots = Vec::new();
    let mut data = Vec::new();
    let mut buf = vec![0u8; EXT as usize];
    for v in &versions {
        let space = store.space(v.key).expect("space");
        roots.push(space.root());
        data.push(
            v.extents
                .iter()
                .map(|&e| {
                    space.read(e, 0, &mut buf).expect("read extent");
                    crc32c::crc32c(&buf)
                })
                .collect(),
        );
    }
    let info = store.info();
    Snapshot {
        generation: info.generation,
        free: info.free_extents,
        disks: store.disks(),
        versions,
        roots,
        data,
    }
}

fn pick<T: Clone>(rng: &mut SplitMix64, v: &[T]) -> Option<T> {
    (!v.is_empty()).then(|| v[rng.below(v.len() as u64) as usize].clone())
}

/// One random operation, chosen from the store's state (so a replay makes the same choices).
fn step(store: &Arc<Store>, rng: &mut SplitMix64, made: &mut u32) -> dovetail_store::Result<()> {
    let disks = store.disks();
    let versions = store.versions();
    match rng.below(10) {
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
                store.space(v.key)?.grant_extent()?;
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
        _ => {}
    }
    Ok(())
}

/// Runs the workload; calls `after` once each operation has returned. Returns the index of the
/// operation the power cut interrupted, if any.
fn workload(
    store: &Arc<Store>,
    seed: u64,
    power: &Power,
    mut after: impl FnMut(),
) -> Option<usize> {
    let mut rng = SplitMix64::new(seed);
    let mut made = 0;
    for i in 0..OPS {
        match step(store, &mut rng, &mut made) {
            Ok(()) => after(),
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
    let mut snaps = vec![snapshot(&store)];
    assert_eq!(
        workload(&store, seed, &power, || snaps.push(snapshot(&store))),
        None
    );
    let sync_points = power.syncs() - base;
    assert!(
        sync_points > 20,
        "the workload should sync often ({sync_points})"
    );
    drop(store);

    for k in 1..=sync_points {
        for torn in [Torn::KeepNone, Torn::KeepAll, Torn::Random(seed ^ (k << 8))] {
            let (power, meta, data) = machine();
            let store = create(&meta, &data);
            power.crash_at_sync(power.syncs() + k);
            let failed = workload(&store, seed, &power, || {})
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
            let got = snapshot(&store);
            assert!(
                got == snaps[failed] || got == snaps[failed + 1],
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
