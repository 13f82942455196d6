//! The bindings against a real one-host Ceph cluster (scripts/ceph-cluster.sh: one monitor, one
//! memstore OSD, no authentication), started by this test and stopped when it ends. Without the
//! Ceph packages the test is skipped with a message, except in CI (CI=true), where it fails:
//! scripts/test-deps.sh installs them.

use dovetail_rados::{Cluster, ConnectOptions, Pool, WriteOp, EBLOCKLISTED};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod ceph;

use ceph::TestCluster;

fn opts(tc: &TestCluster) -> ConnectOptions {
    ConnectOptions {
        conf: Some(tc.conf.clone()),
        id: Some("admin".into()),
        mount_timeout: Some(Duration::from_secs(15)),
        op_timeout: Some(Duration::from_secs(20)),
        settings: Vec::new(),
    }
}

fn connect(tc: &TestCluster) -> Cluster {
    Cluster::connect(&opts(tc)).expect("connect")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn against_a_real_cluster() {
    let Some(tc) = TestCluster::start(&["dovetail", "second"]) else {
        return;
    };
    let a = connect(&tc);
    let pool = a.pool("dovetail").expect("pool");
    assert!(!a.fsid().expect("fsid").is_empty());

    objects_round_trip(&pool);
    async_io_keeps_many_in_flight(&pool);
    compound_operations_apply_all_or_nothing(&pool);
    omap_pages_through_many_keys(&pool);
    errors_are_clear(&tc, &a);
    fencing_refuses_the_old_owner(&tc, &a);
}

fn objects_round_trip(pool: &Pool) {
    let data = pattern(1, 4 << 20);
    pool.write_full("obj.a", &data).expect("write_full");
    assert_eq!(pool.stat("obj.a").expect("stat"), Some(4 << 20));
    let mut back = vec![0u8; 4096];
    assert_eq!(pool.read("obj.a", 8192, &mut back).expect("read"), 4096);
    assert_eq!(back, data[8192..8192 + 4096]);
    // Past the end: a short read, not an error.
    let n = pool
        .read("obj.a", (4 << 20) - 100, &mut back)
        .expect("read end");
    assert_eq!(n, 100);
    assert_eq!(pool.stat("obj.missing").expect("stat"), None);
    let e = pool
        .read("obj.missing", 0, &mut back)
        .expect_err("an error");
    assert_eq!(e.errno(), libc::ENOENT, "{e}");
    assert!(pool.remove("obj.a").expect("remove"));
    assert!(!pool.remove("obj.a").expect("remove again"));
}

fn async_io_keeps_many_in_flight(pool: &Pool) {
    const N: usize = 64;
    let (tx, rx) = mpsc::channel();
    for i in 0..N {
        let tx = tx.clone();
        pool.aio_write(
            &format!("aio.{}", i % 8),
            (i / 8) as u64 * 4096,
            pattern(i as u8, 4096),
            move |r, buf| {
                tx.send((i, r.map_err(|e| e.to_string()), buf.len()))
                    .expect("send")
            },
        )
        .expect("submit write");
    }
    let mut done = [false; N];
    for _ in 0..N {
        let (i, r, len) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("completion");
        assert_eq!(r, Ok(0), "write {i}");
        assert_eq!(len, 4096, "the buffer is given back");
        assert!(!done[i], "write {i} completed twice");
        done[i] = true;
    }
    pool.aio_flush().expect("aio flush");
    let (tx, rx) = mpsc::channel();
    for i in 0..N {
        let tx = tx.clone();
        pool.aio_read(
            &format!("aio.{}", i % 8),
            (i / 8) as u64 * 4096,
            vec![0u8; 4096],
            move |r, buf| {
                tx.send((i, r.map_err(|e| e.to_string()), buf))
                    .expect("send")
            },
        )
        .expect("submit read");
    }
    for _ in 0..N {
        let (i, r, buf) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("completion");
        assert_eq!(r, Ok(4096), "read {i}");
        assert_eq!(buf, pattern(i as u8, 4096), "read {i} data");
    }
    // An asynchronous read of a missing object completes with its error.
    let t = tx.clone();
    pool.aio_read("aio.none", 0, vec![0u8; 16], move |r, b| {
        t.send((999, r.map_err(|e| e.to_string()), b))
            .expect("send")
    })
    .expect("submit");
    let (_, r, _) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("completion");
    let msg = r.expect_err("an error");
    assert!(
        msg.contains("aio read") && msg.contains("aio.none"),
        "{msg}"
    );
}

fn compound_operations_apply_all_or_nothing(pool: &Pool) {
    let v1 = pool
        .operate(
            "meta",
            WriteOp::new()
                .create(true)
                .write_full(b"header-1")
                .omap_set(&[("catalog", b"one"), ("grant.0", b"disk-a")])
                .expect("omap set"),
        )
        .expect("create meta");
    // Exclusive create again: refused.
    let e = pool
        .operate("meta", WriteOp::new().create(true))
        .expect_err("an error");
    assert_eq!(e.errno(), libc::EEXIST, "{e}");
    // A stale version: nothing of the operation is applied.
    let e = pool
        .operate(
            "meta",
            WriteOp::new()
                .assert_version(v1 + 7)
                .write_full(b"header-X")
                .omap_set(&[("catalog", b"stale")])
                .expect("omap set"),
        )
        .expect_err("an error");
    assert!(
        e.errno() == libc::ERANGE || e.errno() == libc::EOVERFLOW,
        "stale version: {e}"
    );
    let omap = pool.omap_get("meta", "").expect("omap");
    assert_eq!(
        omap,
        vec![
            ("catalog".to_string(), b"one".to_vec()),
            ("grant.0".to_string(), b"disk-a".to_vec())
        ]
    );
    let mut h = [0u8; 8];
    pool.read("meta", 0, &mut h).expect("read");
    assert_eq!(&h, b"header-1");
    // The right version and a matching compare: applied together.
    let v2 = pool
        .operate(
            "meta",
            WriteOp::new()
                .assert_version(v1)
                .omap_cmp_eq("catalog", b"one")
                .omap_set(&[("catalog", b"two")])
                .expect("set")
                .omap_rm(&["grant.0"])
                .expect("rm"),
        )
        .expect("guarded update");
    assert!(v2 > v1);
    assert_eq!(pool.version("meta").expect("version"), Some(v2));
    // A compare that fails: ECANCELED, named as the compare.
    let e = pool
        .operate(
            "meta",
            WriteOp::new()
                .omap_cmp_eq("catalog", b"one")
                .omap_set(&[("catalog", b"three")])
                .expect("set"),
        )
        .expect_err("an error");
    assert_eq!(e.errno(), libc::ECANCELED, "{e}");
    assert!(e.to_string().contains("omap compare"), "{e}");
    assert_eq!(
        pool.omap_get("meta", "").expect("omap"),
        vec![("catalog".to_string(), b"two".to_vec())]
    );
}

fn omap_pages_through_many_keys(pool: &Pool) {
    let keys: Vec<String> = (0..1300).map(|i| format!("k.{i:05}")).collect();
    for chunk in keys.chunks(400) {
        let pairs: Vec<(&str, &[u8])> = chunk.iter().map(|k| (k.as_str(), k.as_bytes())).collect();
        pool.operate("many", WriteOp::new().omap_set(&pairs).expect("set"))
            .expect("omap set");
    }
    pool.operate(
        "many",
        WriteOp::new().omap_set(&[("other", b"x")]).expect("set"),
    )
    .expect("omap set");
    let got = pool.omap_get("many", "k.").expect("omap get");
    assert_eq!(got.len(), 1300, "every key of the prefix, across pages");
    assert!(got
        .iter()
        .zip(&keys)
        .all(|((k, v), want)| k == want && v == want.as_bytes()));
}

fn errors_are_clear(tc: &TestCluster, a: &Cluster) {
    let e = a.pool("no-such-pool").expect_err("an error");
    assert_eq!(e.errno(), libc::ENOENT, "{e}");
    assert!(e.to_string().contains("open pool no-such-pool"), "{e}");
    // A cluster nobody serves: refused within the mount timeout, not after librados' 300 s.
    let dead = tc.scratch().join("dead.conf");
    std::fs::write(
        &dead,
        "[global]\nmon host = v2:127.0.0.1:9\nauth client required = none\n",
    )
    .expect("write conf");
    let t = Instant::now();
    let e = Cluster::connect(&ConnectOptions {
        conf: Some(dead),
        mount_timeout: Some(Duration::from_secs(2)),
        ..opts(tc)
    })
    .expect_err("an error");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    assert!(e.to_string().contains("connect"), "{e}");
}

fn fencing_refuses_the_old_owner(tc: &TestCluster, a: &Cluster) {
    let pool_a = a.pool("second").expect("pool");
    let b = connect(tc);
    let pool_b = b.pool("second").expect("pool");
    assert_ne!(a.instance_id(), b.instance_id());

    pool_a
        .lock_exclusive("disk.x", "owner", "daemon-a", "served by a", None, false)
        .expect("a locks");
    let e = pool_b
        .lock_exclusive("disk.x", "owner", "daemon-b", "served by b", None, false)
        .expect_err("an error");
    assert_eq!(e.errno(), libc::EBUSY, "a second owner is refused: {e}");
    // Renewing one's own lock is allowed.
    pool_a
        .lock_exclusive("disk.x", "owner", "daemon-a", "served by a", None, true)
        .expect("a renews");

    let lockers = pool_b.lockers("disk.x", "owner").expect("lockers");
    assert_eq!(lockers.len(), 1);
    assert_eq!(lockers[0].client, format!("client.{}", a.instance_id()));
    assert_eq!(lockers[0].cookie, "daemon-a");
    // The lock names the holder's address with its protocol ("v1:"); rados_getaddrs without.
    let bare = |s: &str| s.strip_prefix("v1:").unwrap_or(s).to_string();
    assert_eq!(bare(&lockers[0].addr), bare(&a.addr().expect("addr")));

    // Metadata changes guarded by the lock: the holder's apply, anyone else's are refused.
    pool_a
        .operate(
            "disk.x",
            WriteOp::new()
                .assert_locked("owner", "daemon-a")
                .omap_set(&[("root", b"gen-1")])
                .expect("set"),
        )
        .expect("the holder commits");
    let e = pool_b
        .operate(
            "disk.x",
            WriteOp::new()
                .assert_locked("owner", "daemon-a")
                .omap_set(&[("root", b"gen-b")])
                .expect("set"),
        )
        .expect_err("an error");
    assert!(e.to_string().contains("assert lock"), "{e}");

    // Takeover: fence a, then break its lock, then take it.
    b.blocklist(&lockers[0].addr, Some(Duration::from_secs(600)))
        .expect("blocklist a");
    b.wait_for_latest_osdmap().expect("osdmap");
    pool_b
        .break_lock("disk.x", "owner", &lockers[0])
        .expect("break a's lock");
    pool_b
        .lock_exclusive("disk.x", "owner", "daemon-b", "served by b", None, false)
        .expect("b locks");
    pool_b
        .operate(
            "disk.x",
            WriteOp::new()
                .assert_locked("owner", "daemon-b")
                .omap_set(&[("root", b"gen-2")])
                .expect("set"),
        )
        .expect("the new holder commits");

    // The fenced client's data and metadata writes are refused, and nothing it tried is visible.
    let e = pool_a
        .write_full("disk.x.data", b"late write")
        .expect_err("an error");
    assert_eq!(e.errno(), EBLOCKLISTED, "{e}");
    assert!(e.is_blocklisted());
    let e = pool_a
        .operate(
            "disk.x",
            WriteOp::new().omap_set(&[("root", b"late")]).expect("set"),
        )
        .expect_err("an error");
    assert_eq!(e.errno(), EBLOCKLISTED, "{e}");
    assert_eq!(pool_b.stat("disk.x.data").expect("stat"), None);
    assert_eq!(
        pool_b.omap_get("disk.x", "root").expect("omap"),
        vec![("root".to_string(), b"gen-2".to_vec())]
    );
}
