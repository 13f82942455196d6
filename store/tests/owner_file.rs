//! Disk ownership on a file store shared by several processes (`Store::open_shared`): one
//! owner per disk (a second acquire is refused, naming the owner), changes of a disk refused
//! to a handle that does not own it, every handle seeing the others' commits, concurrent
//! grants from two handles never handing one extent out twice, and a takeover after the owner
//! is killed with SIGKILL keeping every flushed write.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dovetail_store::{ExtentId, Store, StoreError};

mod owner_common;

use owner_common::{check_grants, run_grant_stress, stamp};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// What the child process of [`takeover_after_the_owner_is_killed`] is to do: the store's
/// directory.
const CHILD: &str = "DOVETAIL_OWNER_CHILD_STORE";

#[test]
fn two_daemons_share_a_store_one_owner_per_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    drop(Store::create(d, 16 * MIB, 256 * KIB).expect("create"));
    let s1 = Store::open_shared(d).expect("first shared open");
    let s2 = Store::open_shared(d).expect("second shared open");
    assert!(s1.is_shared() && s2.is_shared());
    // A process holding the store alone is refused while shared opens run.
    assert!(matches!(Store::open(d), Err(StoreError::InUse(_))));

    let ka = s1.create_disk("a", MIB, "raw-test").expect("disk a");
    // s2 sees s1's disk at its next look at the catalog.
    assert_eq!(s2.disk("a").expect("a seen by s2").trusted, ka);
    let kb = s2.create_disk("b", MIB, "raw-test").expect("disk b");
    assert_ne!(ka, kb);

    s1.acquire_disk("a").expect("s1 owns a");
    s2.acquire_disk("b").expect("s2 owns b");
    let e = s2.acquire_disk("a").expect_err("a is s1's");
    match &e {
        StoreError::DiskOwned { disk, owner } => {
            assert_eq!(disk, "a");
            assert!(
                owner.contains(&format!("pid {}", std::process::id())),
                "{owner}"
            );
        }
        other => panic!("not DiskOwned: {other}"),
    }
    assert!(e.to_string().contains("takeover"), "{e}");
    assert!(s1.owns_disk("a") && !s2.owns_disk("a"));

    // s1 writes a's data and commits its root; s2 may change nothing of a.
    let a1 = s1.space(ka).expect("space a on s1");
    let ea = a1.grant_extent().expect("grant on a");
    let data = stamp(ka, ea, 8192);
    a1.write(ea, 4096, &data).expect("write");
    a1.sync().expect("sync");
    a1.commit_root(b"a-root-1").expect("commit a on s1");
    let a2 = s2.space(ka).expect("space a on s2");
    for (what, r) in [
        ("root commit", a2.commit_root(b"intruder").map(|_| ())),
        ("grant", a2.grant_extent().map(|_| ())),
        ("delete", s2.delete_disk("a").map(|_| ())),
    ] {
        let e = r.expect_err(what);
        assert!(
            e.to_string().contains("not owned by this daemon"),
            "{what}: {e}"
        );
    }
    // ... but sees what s1 committed.
    assert_eq!(a2.root(), b"a-root-1");
    let mut back = vec![0u8; data.len()];
    a2.read(ea, 4096, &mut back).expect("read a on s2");
    assert_eq!(back, data);

    // Released, the disk is s2's to take.
    assert!(s1.release_disk("a").expect("release"));
    s2.acquire_disk("a").expect("s2 takes a after the release");
    a2.commit_root(b"a-root-2").expect("commit a on s2");
    assert_eq!(a1.root(), b"a-root-2");
    assert!(a1
        .commit_root(b"late")
        .expect_err("s1 no longer owns a")
        .to_string()
        .contains("not owned"));

    drop((a1, a2, s1, s2));
    // Everything is in the store for the next process, which may hold it alone again.
    let s = Store::open(d).expect("open alone");
    assert_eq!(s.version(ka).expect("a").root_len, b"a-root-2".len());
    assert_eq!(s.disks().len(), 2);
    assert!(s.version(kb).is_ok());
}

#[test]
fn concurrent_grants_from_two_handles_never_overlap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // 128 extents of 64 KiB: the handles compete for them.
    drop(Store::create(d, 8 * MIB, 64 * KIB).expect("create"));
    let handles = [
        Store::open_shared(d).expect("open 1"),
        Store::open_shared(d).expect("open 2"),
    ];
    let mut keys = Vec::new();
    for (i, s) in handles.iter().enumerate() {
        let name = format!("d{i}");
        keys.push(s.create_disk(&name, MIB, "raw-test").expect("disk"));
        s.acquire_disk(&name).expect("own");
    }
    let held = run_grant_stress(&handles, &keys, 0x5eed_0001, 40);
    check_grants(&handles, &keys, &held);
}

/// The child: owns disk `a` of the store in `$CHILD`, makes one write durable and commits it,
/// says READY, writes more without a flush and waits to be killed.
fn child(d: &Path) {
    let s = Store::open_shared(d).expect("child open");
    s.acquire_disk("a").expect("child owns a");
    let key = s.disk("a").expect("a").trusted;
    let space = s.space(key).expect("space");
    let e = space.grant_extent().expect("grant");
    space.write(e, 0, &stamp(key, e, 65536)).expect("write");
    space.sync().expect("sync");
    space.commit_root(&e.0.to_le_bytes()).expect("commit");
    println!("READY");
    space
        .write(e, 65536, &[0xee; 4096])
        .expect("unflushed write");
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn takeover_after_the_owner_is_killed() {
    if let Some(d) = std::env::var_os(CHILD) {
        child(Path::new(&d));
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let s = Store::create(d, 16 * MIB, 256 * KIB).expect("create");
    let key = s.create_disk("a", MIB, "raw-test").expect("disk");
    drop(s);
    let mut kid = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "takeover_after_the_owner_is_killed",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, d)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the owner");
    let out = kid.stdout.take().expect("stdout");
    let mut lines = BufReader::new(out).lines();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.contains("READY"))),
        "the owner never got ready"
    );

    let s = Store::open_shared(d).expect("open beside the owner");
    match s.acquire_disk("a") {
        Err(StoreError::DiskOwned { owner, .. }) => {
            assert!(owner.contains(&format!("pid {}", kid.id())), "{owner}")
        }
        other => panic!("acquire of an owned disk: {other:?}"),
    }
    let e = s
        .take_over_disk("a", None)
        .expect_err("a file store's live owner is not taken over");
    assert!(e.to_string().contains("stop it"), "{e}");

    kid.kill().expect("SIGKILL the owner");
    let killed = Instant::now();
    let _ = kid.wait();
    let fenced = s.take_over_disk("a", None).expect("take over");
    let took = killed.elapsed();
    assert!(fenced.is_empty(), "nothing to fence on a file store");
    let space = s.space(key).expect("space");
    let root = space.root();
    let e = ExtentId(u32::from_le_bytes(root[..4].try_into().expect("root")));
    let mut b = vec![0u8; 65536];
    space.read(e, 0, &mut b).expect("read");
    assert!(b == stamp(key, e, 65536), "a flushed write is missing");
    // The new owner commits at once.
    space.commit_root(b"after takeover").expect("commit");
    eprintln!("file store: from the owner's SIGKILL to the disk taken over: {took:?}");
}

/// Ownership leases (docs/format.md, *Lease record*): only the owner's renewals change a
/// disk's record, other handles read it, and an expired-lease takeover never fences the
/// calling process itself nor, when it may not signal, anyone: it names the holder.
#[test]
fn the_owner_renews_a_lease_that_other_handles_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    drop(Store::create(d, 16 * MIB, 256 * KIB).expect("create"));
    let s1 = Store::open_shared(d).expect("first shared open");
    let s2 = Store::open_shared(d).expect("second shared open");
    s1.create_disk("a", MIB, "raw-test").expect("disk a");
    s1.acquire_disk("a").expect("s1 owns a");
    assert_eq!(s2.disk_lease("a").expect("read"), None, "no renewal yet");
    assert!(s1.renew_leases().is_empty());
    let first = s2.disk_lease("a").expect("read").expect("a record");
    assert_eq!(first.pid, u64::from(std::process::id()));
    assert!(
        std::fs::metadata(d.join("owners/a.lease"))
            .expect("file")
            .len()
            == 24
    );
    // A handle that does not own a renews nothing of it.
    assert!(s2.renew_leases().is_empty());
    assert_eq!(s2.disk_lease("a").expect("read"), Some(first));
    assert!(s1.renew_leases().is_empty());
    let second = s2.disk_lease("a").expect("read").expect("a record");
    assert!(second.counter > first.counter, "{first:?} then {second:?}");
    // The holder is this very process: never fenced, whatever the caller may do.
    let e = s2.take_over_expired("a", true).expect_err("its own pid");
    assert!(e.to_string().contains("does not fence"), "{e}");
    let e = s2
        .take_over_expired("a", false)
        .expect_err("may not signal");
    assert!(e.to_string().contains("held by pid"), "{e}");
    assert!(s1.owns_disk("a") && !s2.owns_disk("a"));
    // Released: nothing to fence, the lock is taken.
    assert!(s1.release_disk("a").expect("release"));
    let fenced = s2.take_over_expired("a", true).expect("take over");
    assert!(fenced.is_empty(), "{fenced:?}");
    assert!(s2.owns_disk("a"));
    // A record of another length is refused, not guessed at.
    std::fs::write(d.join("owners/a.lease"), [1u8; 23]).expect("truncate");
    assert!(s1.disk_lease("a").is_err());
}
