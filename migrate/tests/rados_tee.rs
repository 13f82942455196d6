//! The Tee, copy-out and promote on a store on Ceph RADOS (a real one-host cluster started by
//! this test): the candidate's presence map and migration record are objects of the store
//! (`NAME.maps.<key>.map`, `NAME.maps.<key>.migration`), read and written through the same
//! `PresenceMap` / `MigrationRecord` code as the files of a store directory. A parallax-v1 disk
//! teed to a parallax-v2 candidate takes writes through the Tee, is copied out and promoted,
//! and reads back identical; a copy-out cut off mid-way (its job dropped, nothing closed)
//! resumes from the persisted map after the store is reopened and copies only what was left;
//! a truncated or overwritten record is a clear error.

#[path = "../../rados/tests/ceph/mod.rs"]
mod ceph;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dovetail_layout::{BlockLayout, Parallax, ParallaxOptions, Sector, Sectors};
use dovetail_migrate::presence::{PresenceError, PresenceMap, MAP_BLOCK};
use dovetail_migrate::record::{MigrationMode, MigrationRecord, RecordError};
use dovetail_migrate::{
    CopyOut, CopyOutOptions, Identity, JobState, Policy, Scope, Tee, TeeOptions,
};
use dovetail_store::rados::{self, RadosDir};
use dovetail_store::{Store, VersionKey};

const MIB: u64 = 1 << 20;
const DISK: u64 = 8 * MIB;
const BLOCKS: u64 = DISK / MAP_BLOCK;
const CHUNK: usize = 64 << 10;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(131) ^ seed.wrapping_mul(0x9E37)) as u8)
        .collect()
}

fn opts() -> ParallaxOptions {
    ParallaxOptions {
        persist_every: None,
        ..Default::default()
    }
}

fn read_all(d: &dyn BlockLayout) -> Vec<u8> {
    let mut out = vec![0u8; DISK as usize];
    for (i, c) in out.chunks_mut(CHUNK).enumerate() {
        d.read(Sector(i as u64 * CHUNK as u64 / 512), c)
            .expect("read");
    }
    out
}

/// A trusted parallax-v1 version of disk `name` with data in every chunk but every fourth
/// (left as holes), flushed; returns it and the bytes it holds.
fn trusted(store: &Arc<Store>, name: &str, seed: u64) -> (VersionKey, Arc<Parallax>, Vec<u8>) {
    let key = store
        .create_disk(name, DISK, "parallax-v1")
        .expect("create disk");
    let disk = Parallax::create(store.space(key).expect("space"), Sectors(DISK / 512))
        .expect("format parallax-v1");
    let mut model = vec![0u8; DISK as usize];
    for (i, c) in model.chunks_mut(CHUNK).enumerate() {
        if i % 4 == 3 {
            continue;
        }
        c.copy_from_slice(&pattern(seed + i as u64, CHUNK));
        disk.write(Sector(i as u64 * CHUNK as u64 / 512), c)
            .expect("fill");
    }
    disk.flush().expect("flush");
    (key, Arc::new(disk), model)
}

fn maps_dir(store: &Store, key: VersionKey) -> PathBuf {
    store
        .map_path(key)
        .parent()
        .expect("a maps directory")
        .to_path_buf()
}

fn fast(rate: u64) -> CopyOutOptions {
    CopyOutOptions {
        rate,
        batch_blocks: 16,
        checkpoint_every: Duration::from_millis(50),
        scope: Scope::Everything,
    }
}

#[test]
fn tee_copy_out_and_promote_on_rados() {
    let Some(cluster) = ceph::TestCluster::start(&["dovetail"]) else {
        return;
    };
    rados::set_connection(Some(cluster.conf.clone()), Some("admin".into()));
    let url = Path::new("rados:dovetail/tee");
    let store = Store::create(url, 96 * MIB, 4 * MIB).expect("create the store");

    // --- A Tee of parallax-v1 -> parallax-v2: writes through it, copy-out, promote. ---
    let (tkey, trusted_v, mut model) = trusted(&store, "d", 1);
    let ckey = store
        .add_version("d", "parallax-v2")
        .expect("a candidate on RADOS");
    let cand = Arc::new(
        Parallax::create_layout(
            store.space(ckey).expect("space"),
            "parallax-v2",
            Sectors(DISK / 512),
            opts(),
        )
        .expect("format parallax-v2"),
    );
    let map_path = store.map_path(ckey);
    assert_eq!(
        map_path,
        Path::new(&format!("rados:dovetail/tee/maps/{}.map", ckey.0))
    );
    let maps = maps_dir(&store, ckey);
    let presence = Arc::new(PresenceMap::create(&map_path, BLOCKS, ckey.0).expect("map"));
    assert!(
        PresenceMap::create(&map_path, BLOCKS, ckey.0).is_err(),
        "a map is never created over another"
    );
    let objects = RadosDir::of_dir(&maps, Some(ckey.0))
        .expect("a rados: name")
        .expect("the store's records");
    let map_name = format!("{}.map", ckey.0);
    let map_len = 4096 + BLOCKS.div_ceil(32_704) * 4096;
    assert_eq!(objects.stat(&map_name).expect("stat"), Some(map_len));
    let mut record = MigrationRecord::new(ckey.0, BLOCKS);
    record.mode = Some(MigrationMode::CopyOut);
    record.rate = 0;
    record.write(&maps).expect("write the migration record");
    assert_eq!(
        MigrationRecord::read(&maps, ckey.0)
            .expect("read")
            .map(|(r, _)| r),
        Some(record)
    );

    let tee = Tee::new(
        trusted_v.clone(),
        cand.clone(),
        presence.clone(),
        TeeOptions::new("d", Policy::SyncCrossChecks),
    )
    .expect("tee");
    // Guest writes through the Tee reach both versions and mark the blocks present.
    for i in [1u64, 7, 40, 99] {
        let data = pattern(500 + i, CHUNK);
        let at = i as usize * CHUNK;
        tee.write(Sector(at as u64 / 512), &data)
            .expect("write through the tee");
        model[at..at + CHUNK].copy_from_slice(&data);
    }
    tee.flush().expect("flush the tee");
    let written = presence.count();
    assert_eq!(written, 4 * (CHUNK as u64 / MAP_BLOCK));
    // The flush persisted the map: a second reader of the object sees the blocks.
    let seen = PresenceMap::inspect(&map_path, BLOCKS, ckey.0).expect("inspect");
    assert_eq!(seen.present, written);

    let job =
        CopyOut::start(&tee, Arc::new(Identity), fast(0), Box::new(|_, _| {})).expect("copy-out");
    assert_eq!(job.wait(Duration::from_secs(60)), JobState::Done);
    assert_eq!(presence.count(), BLOCKS);
    tee.drain();
    assert!(!tee.quarantined(), "{:?}", tee.events());
    assert_eq!(read_all(&tee), model, "the Tee reads the model");
    tee.close().expect("close the tee");
    assert_eq!(read_all(&*cand), model, "the candidate holds every byte");
    let inspected = PresenceMap::inspect(&map_path, BLOCKS, ckey.0).expect("inspect");
    assert!(
        inspected.clean && inspected.present == BLOCKS,
        "{inspected:?}"
    );
    drop(tee);
    drop(trusted_v);

    // Promote: the candidate becomes trusted, the old version is retired with its map.
    let retired = store.promote("d").expect("promote");
    assert_eq!(retired, tkey);
    PresenceMap::remove(&map_path).expect("remove the map");
    MigrationRecord::remove(&maps, ckey.0).expect("remove the record");
    assert_eq!(objects.stat(&map_name).expect("stat"), None);
    assert_eq!(MigrationRecord::read(&maps, ckey.0).expect("read"), None);
    drop(cand);
    assert_eq!(store.disk("d").expect("disk").trusted, ckey);
    let promoted = Parallax::open_with(store.space(ckey).expect("space"), opts()).expect("open");
    assert_eq!(
        read_all(&promoted),
        model,
        "the promoted version reads back identical"
    );
    drop(promoted);

    // --- A copy-out cut off mid-way resumes from the persisted map and completes. ---
    let (tkey, trusted_v, model) = trusted(&store, "e", 9);
    let ckey = store.add_version("e", "parallax-v2").expect("candidate");
    let cand = Arc::new(
        Parallax::create_layout(
            store.space(ckey).expect("space"),
            "parallax-v2",
            Sectors(DISK / 512),
            opts(),
        )
        .expect("format"),
    );
    let map_path = store.map_path(ckey);
    let maps = maps_dir(&store, ckey);
    let mut record = MigrationRecord::new(ckey.0, BLOCKS);
    record.mode = Some(MigrationMode::CopyOut);
    record.write(&maps).expect("record");
    let presence = Arc::new(PresenceMap::create(&map_path, BLOCKS, ckey.0).expect("map"));
    presence.mark_dirty().expect("mark dirty");
    let tee = Tee::new(
        trusted_v.clone(),
        cand.clone(),
        presence.clone(),
        TeeOptions::new("e", Policy::AsyncOldPrimary),
    )
    .expect("tee");
    // 2 MiB/s: the 6 MiB of data take ~3 s; the job is dropped after about a third.
    let job = CopyOut::start(&tee, Arc::new(Identity), fast(2 * MIB), Box::new(|_, _| {}))
        .expect("copy-out");
    let persisted = |p: &Path| {
        PresenceMap::inspect(p, BLOCKS, ckey.0)
            .map(|i| i.present)
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while persisted(&map_path) < BLOCKS / 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint persisted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The "crash": the job cut off, nothing closed, and another handle takes the store over
    // (as a daemon on another host would): the old holder is fenced first.
    job.cancel();
    drop(job);
    drop(tee);
    drop(cand);
    drop(trusted_v);
    let old_store = store;
    let store = Store::take_over(url, Some(Duration::from_secs(600))).expect("take over");
    // The fenced holder can no longer move the map.
    let absent = presence.next_absent(0).expect("an absent block");
    presence.insert(absent);
    let e = presence
        .persist()
        .expect_err("a fenced holder's persist is refused");
    let msg = dovetail_layout::error_chain(&e);
    assert!(msg.contains("fenced") || msg.contains("blocklist"), "{msg}");
    drop(presence);
    let map_path = store.map_path(ckey);
    let maps = maps_dir(&store, ckey);
    let (found, _) = MigrationRecord::read(&maps, ckey.0)
        .expect("read")
        .expect("the record survived");
    assert_eq!(found.mode, Some(MigrationMode::CopyOut));
    let presence = Arc::new(PresenceMap::open(&map_path, BLOCKS, ckey.0).expect("reopen map"));
    assert!(!presence.was_clean(), "the map was never closed");
    let resumed_from = presence.count();
    assert!(
        (BLOCKS / 4..BLOCKS).contains(&resumed_from),
        "{resumed_from} of {BLOCKS} blocks persisted"
    );
    let trusted_v = Arc::new(
        Parallax::open_with(store.space(tkey).expect("space"), opts()).expect("open trusted"),
    );
    let cand = Arc::new(
        Parallax::open_with(store.space(ckey).expect("space"), opts()).expect("open candidate"),
    );
    let tee = Tee::new(
        trusted_v.clone(),
        cand.clone(),
        presence.clone(),
        TeeOptions::new("e", Policy::AsyncOldPrimary),
    )
    .expect("tee");
    let job =
        CopyOut::start(&tee, Arc::new(Identity), fast(0), Box::new(|_, _| {})).expect("resume");
    assert_eq!(job.wait(Duration::from_secs(60)), JobState::Done);
    let p = job.progress();
    assert_eq!(
        p.copied_blocks + p.zero_blocks,
        BLOCKS - resumed_from,
        "only the blocks not persisted are copied again"
    );
    tee.close().expect("close");
    drop(tee);
    assert_eq!(read_all(&*cand), model, "the resumed copy is identical");

    // --- A damaged record is a clear error, never a panic. ---
    let objects = RadosDir::of_dir(&maps, Some(ckey.0))
        .expect("a rados: name")
        .expect("records");
    let map_name = format!("{}.map", ckey.0);
    let mut head = vec![0u8; 4096];
    objects
        .read_exact_at(&map_name, 0, &mut head)
        .expect("read the header");
    objects.replace(&map_name, &head).expect("truncate the map");
    match PresenceMap::open(&map_path, BLOCKS, ckey.0) {
        Err(PresenceError::Corrupt(m)) => assert!(m.contains("truncated"), "{m}"),
        other => panic!("a truncated map must be refused as corrupt: {other:?}"),
    }
    head[100] ^= 1;
    objects.replace(&map_name, &head).expect("damage");
    assert!(matches!(
        PresenceMap::open(&map_path, BLOCKS, ckey.0),
        Err(PresenceError::Corrupt(_))
    ));
    let rec_name = format!("{}.migration", ckey.0);
    let mut rec = vec![0u8; 64];
    objects
        .read_exact_at(&rec_name, 0, &mut rec)
        .expect("read the record");
    rec[20] ^= 0x40;
    objects.replace(&rec_name, &rec).expect("damage the record");
    match MigrationRecord::read(&maps, ckey.0) {
        Err(e @ RecordError::Corrupt { .. }) => {
            assert!(e.to_string().contains("corrupt"), "{e}")
        }
        other => panic!("a damaged record must be refused: {other:?}"),
    }
    objects
        .replace(&rec_name, &rec[..10])
        .expect("truncate the record");
    assert!(matches!(
        MigrationRecord::read(&maps, ckey.0),
        Err(RecordError::Corrupt { .. })
    ));
    // Listing finds both records of the candidate.
    let names = objects.list().expect("list");
    assert_eq!(names, vec![map_name.clone(), rec_name.clone()]);
    // Dropping the candidate (untee) removes its presence map object with it.
    drop(cand);
    assert_eq!(store.drop_candidate("e").expect("untee"), ckey);
    assert_eq!(objects.stat(&map_name).expect("stat"), None);
    MigrationRecord::remove(&maps, ckey.0).expect("remove the record");
    assert_eq!(objects.list().expect("list"), Vec::<String>::new());
    drop(old_store);

    // A disk over 2 TiB cannot have a candidate on RADOS (its map is one object): refused
    // before anything is committed, as is growing a teed disk past it.
    let big = Store::create(Path::new("rados:dovetail/big"), 3 << 40, 1 << 30).expect("big");
    big.create_disk("huge", (2 << 40) + (1 << 30), "parallax-v1")
        .expect("a huge disk");
    let generation = big.info().generation;
    let e = big
        .add_version("huge", "parallax-v2")
        .expect_err("too big to tee on RADOS");
    assert!(e.to_string().contains("at most"), "{e}");
    assert_eq!(big.info().generation, generation, "nothing committed");
    assert!(big.disk("huge").expect("disk").candidate.is_none());
    big.create_disk("edge", rados::MAX_TEED_DISK, "parallax-v1")
        .expect("a 2 TiB disk");
    big.add_version("edge", "parallax-v2")
        .expect("a 2 TiB disk can be teed");
    let e = big
        .resize_disk("edge", rados::MAX_TEED_DISK + (1 << 30))
        .expect_err("a teed disk cannot grow past 2 TiB");
    assert!(e.to_string().contains("at most"), "{e}");
    assert_eq!(
        big.disk("edge").expect("disk").size,
        rados::MAX_TEED_DISK,
        "the size is unchanged"
    );
}
