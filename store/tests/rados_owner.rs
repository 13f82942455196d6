//! Disk ownership on a store on RADOS shared by several daemons (`Store::open_shared`), against
//! a one-host cluster started by this test: one owner per disk, a takeover that fences the
//! owner (its data writes and commits refused by the cluster, nothing of them visible) while
//! the fenced daemon's other disk, on a handle of its own, is served on; concurrent grants
//! from two handles never overlapping; and a failover after the owner's SIGKILL with every
//! flushed write kept, timed.

#[path = "../../rados/tests/ceph/mod.rs"]
mod ceph;
mod owner_common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dovetail_store::{rados, ExtentId, Store, StoreError};
use owner_common::{check_grants, run_grant_stress, stamp};

const MIB: u64 = 1 << 20;
/// Set (to the cluster's configuration file) only in the owner process this test kills.
const CHILD: &str = "DOVETAIL_RADOS_OWNER_CHILD_CONF";
const URL: &str = "rados:dovetail/own";

/// The child: owns disk `f`, makes one write durable and commits it, says READY, then writes
/// on without a flush until it is killed.
fn child(conf: &Path) {
    rados::set_connection(Some(conf.to_path_buf()), Some("admin".into()));
    let s = Store::open_shared(Path::new(URL)).expect("child open");
    s.acquire_disk("f").expect("child owns f");
    let key = s.disk("f").expect("f").trusted;
    let space = s.space(key).expect("space");
    let e = space.grant_extent().expect("grant");
    space.write(e, 0, &stamp(key, e, 65536)).expect("write");
    space.sync().expect("sync");
    space.commit_root(&e.0.to_le_bytes()).expect("commit");
    println!("READY");
    loop {
        let _ = space.write(e, 65536, &[0xee; 4096]);
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn rados_disks_owned_fenced_and_failed_over() {
    if let Some(conf) = std::env::var_os(CHILD) {
        child(Path::new(&conf));
        return;
    }
    let Some(cluster) = ceph::TestCluster::start(&["dovetail"]) else {
        return;
    };
    rados::set_connection(Some(cluster.conf.clone()), Some("admin".into()));
    let url = Path::new(URL);
    drop(Store::create(url, 128 * MIB, 4 * MIB).expect("create"));

    // Daemon A serves disks x and y, each through a handle (a client) of its own; daemon B
    // has one handle.
    let ax = Store::open_shared(url).expect("A's handle for x");
    let ay = Store::open_shared(url).expect("A's handle for y");
    let b = Store::open_shared(url).expect("B");
    let kx = ax.create_disk("x", 8 * MIB, "raw-test").expect("x");
    let ky = ay.create_disk("y", 8 * MIB, "raw-test").expect("y");
    assert_eq!(b.disk("x").expect("B sees x").trusted, kx);
    ax.acquire_disk("x").expect("A owns x");
    ay.acquire_disk("y").expect("A owns y");
    match b.acquire_disk("x") {
        Err(StoreError::DiskOwned { owner, .. }) => assert!(owner.contains("client."), "{owner}"),
        other => panic!("acquire of an owned disk: {other:?}"),
    }
    let bx = b.space(kx).expect("B's space of x");
    let refused = bx.commit_root(b"intruder").expect_err("B does not own x");
    assert!(refused.to_string().contains("not owned"), "{refused}");

    // A writes x, flushes, commits.
    let axs = ax.space(kx).expect("A's space of x");
    let e = axs.grant_extent().expect("grant");
    let flushed = stamp(kx, e, 8192);
    axs.write(e, 0, &flushed).expect("write");
    axs.sync().expect("sync");
    axs.commit_root(b"x-1").expect("commit");

    // A renews x's lease (the omap key, set under x's lock); B reads it and renews nothing of x.
    assert!(ax.renew_leases().is_empty(), "A renews x");
    let before = b.disk_lease("x").expect("read").expect("x's lease");
    assert_eq!(before.pid, u64::from(std::process::id()));
    assert!(b.renew_leases().is_empty());
    assert_eq!(b.disk_lease("x").expect("read"), Some(before));

    // B takes x over: A's client for x is fenced first.
    let fenced = b
        .take_over_disk("x", Some(Duration::from_secs(600)))
        .expect("take over");
    assert_eq!(fenced.len(), 1, "{fenced:?}");
    assert!(b.owns_disk("x"));
    // The fenced handle's writes are refused by the cluster (asynchronous: the sync that waits
    // for them reports it) and so are its commits.
    let _ = axs.write(e, 0, &[0xaa; 8192]);
    let late = axs.sync().expect_err("fenced data write");
    let chain = format!("{late}: {:?}", std::error::Error::source(&late));
    assert!(chain.to_lowercase().contains("blocklist"), "{chain}");
    let late = axs.commit_root(b"x-late").expect_err("fenced commit");
    assert!(late.to_string().contains("fenced"), "{late}");
    assert!(
        ax.lost_disks().iter().any(|(d, _)| d == "x"),
        "{:?}",
        ax.lost_disks()
    );
    assert!(!ax.owns_disk("x"));
    // The new owner's renewal passes the lock assertion and changes the record.
    assert!(b.renew_leases().is_empty(), "B renews x");
    assert_ne!(b.disk_lease("x").expect("read"), Some(before));
    // Nothing A wrote after the fence is visible; what it flushed before is.
    assert_eq!(bx.root(), b"x-1");
    let mut back = vec![0u8; flushed.len()];
    bx.read(e, 0, &mut back).expect("read");
    assert!(back == flushed, "the fenced owner's late write is visible");
    bx.commit_root(b"x-2").expect("B commits x");
    // A serves y on: its handle for y was not fenced.
    let ays = ay.space(ky).expect("A's space of y");
    let ey = ays.grant_extent().expect("grant on y");
    ays.write(ey, 0, b"y data").expect("write y");
    ays.sync().expect("sync y");
    ays.commit_root(b"y-1")
        .expect("A commits y after x was taken");

    // Concurrent grants from B (x) and A (y) never hand one extent out twice (from empty
    // versions, so the catalog holds just what the threads hold).
    b.ungrant(kx, e).expect("B gives x's extent back");
    ay.ungrant(ky, ey).expect("A gives y's extent back");
    let started = Instant::now();
    let held = run_grant_stress(&[b.clone(), ay.clone()], &[kx, ky], 0x5eed_00aa, 16);
    check_grants(&[b.clone(), ay.clone()], &[kx, ky], &held);
    eprintln!("grant stress on RADOS: {:?}", started.elapsed());
    for (key, extents) in &held {
        let owner = if *key == kx { &b } else { &ay };
        for &e in extents {
            owner.ungrant(*key, e).expect("give back");
        }
    }
    drop((bx, axs, ays, ax, ay));

    // Failover: the owner of f is killed with SIGKILL, B takes f over.
    let kf = b.create_disk("f", 8 * MIB, "raw-test").expect("f");
    let mut kid = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "rados_disks_owned_fenced_and_failed_over",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, &cluster.conf)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the owner");
    let out = kid.stdout.take().expect("stdout");
    assert!(
        BufReader::new(out)
            .lines()
            .any(|l| l.is_ok_and(|l| l.contains("READY"))),
        "the owner never got ready"
    );
    kid.kill().expect("SIGKILL");
    let killed = Instant::now();
    let _ = kid.wait();
    let fenced = b
        .take_over_disk("f", Some(Duration::from_secs(600)))
        .expect("take f over");
    let fs = b.space(kf).expect("space of f");
    let root = fs.root();
    let took = killed.elapsed();
    assert_eq!(fenced.len(), 1, "{fenced:?}");
    let ef = ExtentId(u32::from_le_bytes(root[..4].try_into().expect("root")));
    let mut back = vec![0u8; 65536];
    fs.read(ef, 0, &mut back).expect("read f");
    assert!(
        back == stamp(kf, ef, 65536),
        "a flushed write of f is missing"
    );
    fs.commit_root(b"f after failover").expect("commit f");
    eprintln!("RADOS: from the owner's SIGKILL to disk f taken over and its root read: {took:?}");
}
