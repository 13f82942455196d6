//! The store on RADOS against a real one-host cluster started by this test: creating, the
//! object mapping (data across object boundaries, unwritten bytes as zeros, extents given back
//! as removed objects), metadata committed and read back after a reopen, one writer at a time,
//! and a takeover that fences the old holder (its metadata commits and data writes refused,
//! nothing of them visible).

#[path = "../../rados/tests/ceph/mod.rs"]
mod ceph;

use std::path::Path;
use std::time::Duration;

use dovetail_store::{rados, ExtentId, Store, StoreError, StoreFile, TierSpec};

const MIB: u64 = 1 << 20;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn a_store_on_rados() {
    let Some(cluster) = ceph::TestCluster::start(&["dovetail", "slow"]) else {
        return;
    };
    rados::set_connection(Some(cluster.conf.clone()), Some("admin".into()));
    let url = Path::new("rados:dovetail/st");

    // Create; a second create there is refused; malformed names are refused.
    let store = Store::create(url, 64 * MIB, 8 * MIB).expect("create");
    assert!(store.on_rados());
    assert!(matches!(
        Store::create(url, 64 * MIB, 8 * MIB),
        Err(StoreError::StoreExists(_))
    ));
    let e = Store::create(Path::new("rados:dovetail/Bad"), 64 * MIB, 8 * MIB).expect_err("refused");
    assert!(e.to_string().contains("POOL/NAME"), "{e}");
    let e = Store::create(Path::new("rados:dovetail/odd"), 60 * MIB, 6 * MIB).expect_err("refused");
    assert!(e.to_string().contains("one object per 4 MiB"), "{e}");
    let info = store.info();
    assert_eq!((info.extent_count, info.free_extents), (8, 8));
    let e = Store::open(Path::new("rados:dovetail/none")).expect_err("no store there");
    assert!(e.to_string().contains("none.meta does not exist"), "{e}");

    // A version's extent: a write across the 4 MiB object boundary reads back; what was never
    // written reads as zeros.
    let key = store
        .create_disk("d", 16 * MIB, "parallax-v1")
        .expect("disk");
    let space = store.space(key).expect("space");
    let e = space.grant_extent().expect("grant");
    let data = pattern(7, 64 << 10);
    let at = 4 * MIB - 20_000;
    space.write(e, at, &data).expect("write");
    let mut back = vec![0u8; data.len()];
    space.read(e, at, &mut back).expect("read");
    assert_eq!(back, data);
    let mut zeros = vec![1u8; 8192];
    space.read(e, 6 * MIB, &mut zeros).expect("read unwritten");
    assert!(zeros.iter().all(|&b| b == 0));
    space.sync().expect("sync");
    space.commit_root(b"root one").expect("commit");
    let generation = store.info().generation;

    // One writer at a time; readers beside it see its last commit.
    assert!(matches!(Store::open(url), Err(StoreError::InUse(_))));
    let reader = Store::open_reader(url).expect("reader");
    assert_eq!(reader.committed_generation().expect("gen"), generation);
    assert_eq!(reader.version(key).expect("version").root_len, 8);
    drop(reader);

    // Reopened: the catalog, the grant, the root record and the data are there.
    drop(space);
    drop(store);
    let store = Store::open(url).expect("reopen");
    assert_eq!(store.info().generation, generation);
    assert_eq!(store.disk("d").expect("disk").trusted, key);
    let space = store.space(key).expect("space");
    assert_eq!(space.extents(), vec![e]);
    assert_eq!(space.root(), b"root one");
    let mut back = vec![0u8; data.len()];
    space.read(e, at, &mut back).expect("read");
    assert_eq!(back, data);

    let pool = dovetail_rados::Cluster::connect(&dovetail_rados::ConnectOptions {
        conf: Some(cluster.conf.clone()),
        id: Some("admin".into()),
        ..Default::default()
    })
    .expect("connect")
    .pool("dovetail")
    .expect("pool");
    // Asynchronous writes: many in flight, each read right after sees its data (a read waits
    // for its object's writes), and a sync leaves none in flight.
    let scratch = rados::ObjectFile::new(
        std::sync::Arc::new(
            dovetail_rados::Cluster::connect(&dovetail_rados::ConnectOptions {
                conf: Some(cluster.conf.clone()),
                id: Some("admin".into()),
                ..Default::default()
            })
            .expect("connect")
            .pool("dovetail")
            .expect("pool"),
        ),
        "scratch.".into(),
        4 * MIB,
        64 * MIB,
    );
    let piece = |i: u64| pattern(i as u8, 48 << 10);
    for i in 0..128u64 {
        scratch
            .write_at(i * (48 << 10) + 777, &piece(i))
            .expect("aio write");
    }
    for i in (0..128u64).rev() {
        let mut b = vec![0u8; 48 << 10];
        scratch.read_at(i * (48 << 10) + 777, &mut b).expect("read");
        assert!(b == piece(i), "piece {i} reads back at once");
    }
    scratch.sync().expect("sync");
    assert_eq!(scratch.writes_in_flight(), 0);
    // Zeroing part of an object keeps the rest of it; a whole object is removed.
    let at = 4 * MIB - 8192;
    scratch.zero_range(at, 4096).expect("zero a part");
    let mut b = vec![1u8; 12288];
    scratch.read_at(at - 4096, &mut b).expect("read");
    let mut want = vec![0u8; 12288];
    for i in 0..128u64 {
        let (lo, hi) = (i * (48 << 10) + 777, (i + 1) * (48 << 10) + 777);
        for (k, w) in want.iter_mut().enumerate() {
            let o = at - 4096 + k as u64;
            if (lo..hi).contains(&o) && !(at..at + 4096).contains(&o) {
                *w = piece(i)[(o - lo) as usize];
            }
        }
    }
    assert!(b == want, "only the zeroed 4 KiB read as zeros");
    scratch
        .zero_range(4 * MIB, 4 * MIB)
        .expect("zero an object");
    assert_eq!(pool.stat("scratch.0000000000000001").expect("stat"), None);
    scratch
        .zero_range(40 * MIB + 512, 4096)
        .expect("zero part of an object never written");
    assert_eq!(pool.stat("scratch.000000000000000a").expect("stat"), None);

    // An extent given back: its objects are gone, and it reads as zeros when granted again.
    let obj = |i: u64| format!("st.data.0.{i:016x}");
    let first = u64::from(e.0) * 2; // 8 MiB extents, 4 MiB objects
    assert!(pool.stat(&obj(first)).expect("stat").is_some());
    assert!(pool.stat(&obj(first + 1)).expect("stat").is_some());
    store.ungrant(key, e).expect("ungrant");
    assert_eq!(pool.stat(&obj(first)).expect("stat"), None);
    assert_eq!(pool.stat(&obj(first + 1)).expect("stat"), None);
    let again = space.grant_extent().expect("grant again");
    assert_eq!(again, e, "the lowest free extent");
    space.read(again, at, &mut back).expect("read");
    assert!(back.iter().all(|&b| b == 0));
    space.write(again, 0, b"kept").expect("write");
    space.commit_root(b"root two").expect("commit");

    // A lock broken without fencing: the holder's next commit is refused all the same (the
    // lock is asserted in the commit's own operation), and changes nothing.
    let lockers = pool.lockers("st.meta", rados::LOCK_NAME).expect("lockers");
    assert_eq!(lockers.len(), 1, "{lockers:?}");
    pool.break_lock("st.meta", rados::LOCK_NAME, &lockers[0])
        .expect("break");
    let refused = space.commit_root(b"unlocked").expect_err("lock lost");
    assert!(refused.to_string().contains("no longer holds"), "{refused}");
    assert_eq!(space.root(), b"root two");
    let reader = Store::open_reader(url).expect("reader");
    assert_eq!(reader.version(key).expect("version").root_len, 8);
    drop(reader);
    // Held again by a new open (nobody holds it now), which commits.
    drop(space);
    drop(store);
    let store = Store::open(url).expect("reopen after the lock was broken");
    let space = store.space(key).expect("space");
    assert_eq!(space.root(), b"root two");

    // Takeover: the holder is fenced and its lock broken; the new holder commits. The fenced
    // holder's commit and data writes are refused, and nothing of them is visible.
    let taker = Store::take_over(url, Some(Duration::from_secs(600))).expect("take over");
    let late = space.commit_root(b"late root").expect_err("fenced commit");
    assert!(
        late.to_string().contains("fenced") || late.to_string().contains("lock"),
        "{late}"
    );
    // Writes are asynchronous: the refusal comes with the sync that waits for them.
    let _ = space.write(again, 0, b"late");
    let late = space.sync().expect_err("a fenced write's sync");
    assert!(format!("{late:?}").contains("errno 108"), "{late:?}");
    let tspace = taker.space(key).expect("space");
    assert_eq!(tspace.root(), b"root two");
    let mut four = [0u8; 4];
    tspace.read(again, 0, &mut four).expect("read");
    assert_eq!(&four, b"kept");
    tspace
        .commit_root(b"root three")
        .expect("the new holder commits");
    assert!(matches!(
        Store::take_over(Path::new("/tmp/x"), None),
        Err(StoreError::Invalid(_))
    ));
    let _ = ExtentId(0);
    drop((tspace, taker, space));

    // Tiers as pools: a tier of its own is a pool of its own (`rados:POOL`), the store's own
    // pool recorded as `data.T`. A grant of the slow tier lands in pool `slow` as
    // `tt.data.1.*`; reopened, the tiers, the grant and the data are there and check clean.
    let turl = Path::new("rados:dovetail/tt");
    let tier = |name: &str, path: &str, size: u64| TierSpec {
        name: name.into(),
        path: path.into(),
        size,
    };
    let e = Store::create_tiered(
        turl,
        &[
            tier("fast", "rados:dovetail", 16 * MIB),
            tier("slow", "rados:nopool", 32 * MIB),
        ],
        4 * MIB,
    )
    .expect_err("a tier in a pool that does not exist");
    assert!(e.to_string().contains("nopool"), "{e}");
    let e = Store::create_tiered(turl, &[tier("fast", "rados:bad/pool", 16 * MIB)], 4 * MIB)
        .expect_err("not a pool name");
    assert!(e.to_string().contains("not a pool name"), "{e}");
    let ts = Store::create_tiered(
        turl,
        &[
            tier("fast", "rados:dovetail", 16 * MIB),
            tier("slow", "rados:slow", 32 * MIB),
        ],
        4 * MIB,
    )
    .expect("create a store of two tiers");
    let info = ts.info();
    assert_eq!(info.tiers.len(), 2);
    assert_eq!((info.tiers[1].first_extent, info.tiers[1].extents), (4, 8));
    let key = ts.create_disk("t", 8 * MIB, "parallax-v1").expect("disk");
    let sp = ts.space(key).expect("space");
    let cold = sp.grant_extent_on(1).expect("a slow extent");
    assert_eq!(sp.extent_tier(cold), 1);
    let hot = sp.grant_extent_on(0).expect("a fast extent");
    sp.write(cold, 4096, &pattern(3, 8192)).expect("write slow");
    sp.write(hot, 0, &pattern(4, 4096)).expect("write fast");
    sp.sync().expect("sync");
    sp.commit_root(b"tiered").expect("commit");
    let slow = dovetail_rados::Cluster::connect(&dovetail_rados::ConnectOptions {
        conf: Some(cluster.conf.clone()),
        id: Some("admin".into()),
        ..Default::default()
    })
    .expect("connect")
    .pool("slow")
    .expect("pool slow");
    let cold_obj = format!("tt.data.1.{:016x}", u64::from(cold.0 - 4));
    assert!(
        slow.stat(&cold_obj).expect("stat").is_some(),
        "{cold_obj} in pool slow"
    );
    assert_eq!(
        pool.stat(&cold_obj).expect("stat"),
        None,
        "not in the store's pool"
    );
    let hot_obj = format!("tt.data.0.{:016x}", u64::from(hot.0));
    assert!(
        pool.stat(&hot_obj).expect("stat").is_some(),
        "{hot_obj} in pool dovetail"
    );
    drop(sp);
    drop(ts);
    let ts = Store::open(turl).expect("reopen the tiered store");
    let names: Vec<String> = ts.info().tiers.iter().map(|t| t.name.clone()).collect();
    assert_eq!(names, ["fast", "slow"]);
    assert!(
        ts.info().tiers[1]
            .path
            .to_string_lossy()
            .starts_with("slow/tt.data.1."),
        "{:?}",
        ts.info().tiers[1].path
    );
    let sp = ts.space(key).expect("space");
    let mut back = vec![0u8; 8192];
    sp.read(cold, 4096, &mut back).expect("read slow");
    assert!(back == pattern(3, 8192));
    drop(sp);
    drop(ts);
    let report = dovetail_store::check(turl).expect("check");
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    // A slow tier's objects gone missing (its tier header with them): the open says which.
    slow.remove(&format!("tt.data.1.{:016x}", 8u64))
        .expect("remove the tier header");
    let e = Store::open(turl).expect_err("the slow tier's header is gone");
    assert!(e.to_string().contains("slow"), "{e}");
}
