//! The daemon serving an N-version Tee: a disk teed over the control socket to two
//! candidates (three members, the first candidate a fault-injecting one), driven by an
//! in-process vhost-user frontend. Reads return the majority's data, the member whose write
//! was dropped is repaired (its bytes on disk checked after the daemon stops), the member whose
//! reads keep flipping bits is quarantined past the threshold and the catalog says so;
//! `tee-add` and `tee-remove` change the membership while a guest writes and reads; a daemon
//! stopped without closing anything restarts with the membership of the last commit. `resize`
//! grows every member and the vote covers the new blocks; `migrate copy-out` and `promote`
//! work on the grown Tee.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pattern, Req, TestDriver, TestServer};
use dovetail_backend::daemon::control::{self, ControlServer};
use dovetail_backend::daemon::live::{EventHub, LiveDisk};
use dovetail_backend::daemon::served::Daemon;
use dovetail_layout::{BlockLayout, Sector};
use dovetail_store::{MemberState, Store, TeeState, VersionKey};
use serde_json::{json, Value};

const SIZE: u64 = 4 << 20;
const BLOCKS: u64 = SIZE / 4096;
const SPB: u64 = 8;

struct Daemonised {
    daemon: Arc<Daemon>,
    live: Arc<LiveDisk>,
    control: ControlServer,
    socket: PathBuf,
}

/// A daemon serving disk `vd` of the store at `dir/store` (format 7), with fault injection
/// allowed, and its control socket.
fn serve(dir: &Path, store: &Arc<Store>) -> Daemonised {
    let events = Arc::new(EventHub::default());
    let live = LiveDisk::open_store(
        store,
        "vd",
        &dir.join("vd.sock"),
        false,
        events.clone(),
        None,
    )
    .expect("open disk");
    let security = dovetail_backend::access::Security {
        allow_fault_injection: true,
        ..Default::default()
    };
    let daemon = Arc::new(
        Daemon::new(vec![live.clone()], events, Some(dir.join("store"))).with_security(security),
    );
    let socket = dir.join("control.sock");
    let _ = std::fs::remove_file(&socket);
    let control = control::start(&socket, control::DEFAULT_MODE, daemon.clone()).expect("control");
    Daemonised {
        daemon,
        live,
        control,
        socket,
    }
}

fn new_store(dir: &Path) -> Arc<Store> {
    common::init_logging();
    let store = Store::create(&dir.join("store"), 256 << 20, 4 << 20).expect("store");
    store.create_disk("vd", SIZE, "parallax-v1").expect("disk");
    store.enable_members().expect("format 7")
}

fn request(socket: &Path, req: Value) -> Value {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all((req.to_string() + "\n").as_bytes())
        .expect("send");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("reply");
    serde_json::from_str(&line).expect("JSON")
}

fn ok(socket: &Path, req: Value) -> Value {
    let r = request(socket, req.clone());
    assert_eq!(r["ok"], json!(true), "{req}: {r}");
    r["result"].clone()
}

fn voting(socket: &Path) -> Value {
    ok(socket, json!({"cmd": "status", "disk": "vd"}))["disks"][0]["voting"].clone()
}

/// Waits until every live member holds every block (the fills are done).
fn wait_filled(socket: &Path) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = voting(socket);
        let members = v["members"].as_array().expect("members").clone();
        if members
            .iter()
            .all(|m| m["state"] == json!("quarantined") || m["held_blocks"] == json!(BLOCKS))
            && !members.iter().any(|m| m["state"] == json!("filling"))
        {
            return v;
        }
        assert!(Instant::now() < deadline, "members never filled: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon's events as text, once `done` holds for them (at most 30 s: then as they are).
fn wait_events(socket: &Path, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = ok(socket, json!({"cmd": "events"})).to_string();
        if done(&text) || Instant::now() >= deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn member_keys(v: &Value) -> Vec<u64> {
    v["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["version"].as_u64().expect("version"))
        .collect()
}

/// Reads block `b` of version `key` of `vd` straight from the store.
fn version_block(store: &Arc<Store>, key: u64, b: u64) -> Vec<u8> {
    let layout = store.version(VersionKey(key)).expect("version").layout;
    let v = dovetail_backend::ops::open::open_version(store, "vd", VersionKey(key), &layout, SIZE)
        .expect("open version");
    let mut buf = vec![0u8; 4096];
    v.read(Sector(b * SPB), &mut buf).expect("read");
    buf
}

#[test]
fn three_members_outvote_repair_and_quarantine_a_faulty_one() {
    let t = tempfile::tempdir().expect("tempdir");
    let store = new_store(t.path());
    let d = serve(t.path(), &store);
    // Member 1 drops its second write of block 10 (the first is its fill's) and flips a bit
    // of every read of block 20.
    let r = ok(
        &d.socket,
        json!({"cmd": "tee", "disk": "vd", "candidate": "parallax-v1",
               "more_candidates": ["parallax-v2"], "policy": "sync-read-checks",
               "faults": ["drop-write:sector=80,nth=2", "flip-read:sector=160"]}),
    );
    assert!(
        r["message"]
            .as_str()
            .expect("message")
            .contains("3 members"),
        "{r}"
    );
    // The new members are filled from the trusted version first.
    wait_filled(&d.socket);
    let server = TestServer::start(d.live.disk.clone(), 1);
    let driver = TestDriver::connect(server.socket(), 1, 8 << 20);
    let data = |b: u64| pattern(900 + b, 4096);
    for b in 0..32 {
        driver
            .submit(0, &Req::write(b * SPB, &data(b)))
            .assert_ok(0);
    }
    driver.submit(0, &Req::flush()).assert_ok(0);
    let v = wait_filled(&d.socket);
    let keys = member_keys(&v);
    assert_eq!(keys.len(), 3, "{v}");
    // Every read answers the majority's data.
    for b in 0..32 {
        let c = driver.submit(0, &Req::read(b * SPB, 4096));
        c.assert_ok(4096);
        assert!(c.data == data(b), "block {b} read back wrong");
    }
    let v = voting(&d.socket);
    let m1 = &v["members"][1];
    assert!(m1["votes_lost"].as_u64().expect("lost") >= 2, "{v}");
    assert!(m1["repairs"].as_u64().expect("repairs") >= 1, "{v}");
    assert_eq!(v["members"][2]["votes_lost"], json!(0), "{v}");
    assert_eq!(m1["state"], json!("voting"), "{v}");
    // The guest's flush makes the repairs durable in every live member.
    driver.submit(0, &Req::flush()).assert_ok(0);
    // Block 20 keeps losing: past the threshold (16) member 1 is quarantined.
    for _ in 0..20 {
        let c = driver.submit(0, &Req::read(20 * SPB, 4096));
        c.assert_ok(4096);
        assert!(c.data == data(20), "block 20 read back wrong");
    }
    let v = voting(&d.socket);
    assert_eq!(v["members"][1]["state"], json!("quarantined"), "{v}");
    assert!(v["counters"]["quarantines"].as_u64() == Some(1), "{v}");
    let cand =
        ok(&d.socket, json!({"cmd": "status", "disk": "vd"}))["disks"][0]["candidate"].clone();
    assert_eq!(cand["state"], json!("quarantined"), "{cand}");
    assert_eq!(cand["blocks_present"], json!(BLOCKS), "{cand}");
    let info = store.disk("vd").expect("disk");
    assert_eq!(info.candidate, Some(VersionKey(keys[1])));
    assert_eq!(
        info.tee.as_ref().map(|t| t.state),
        Some(TeeState::Quarantined),
        "the quarantine is committed to the catalog"
    );
    // The events name the member, its version, the block and the first differing byte.
    // The Tee's events reach the daemon's ring through a relay thread, which a loaded
    // machine may not have run yet: wait for them.
    let wanted = format!("first differing byte 0 (version {})", keys[1]);
    let text = wait_events(&d.socket, |t| t.contains("outvoted") && t.contains(&wanted));
    assert!(text.contains("outvoted"), "{text}");
    assert!(text.contains(&wanted), "{text}");
    // Metrics per member.
    let mut out = dovetail_backend::metrics::Exposition::default();
    d.live.render_metrics(&mut out);
    let metrics = out.finish();
    assert!(
        metrics.contains(&format!(
            "dovetail_tee_member_quarantined{{disk=\"vd\",version=\"{}\",member=\"1\"}} 1",
            keys[1]
        )),
        "{metrics}"
    );
    // Reads still right with member 1 out.
    for b in 0..32 {
        let c = driver.submit(0, &Req::read(b * SPB, 4096));
        c.assert_ok(4096);
        assert!(
            c.data == data(b),
            "block {b} read back wrong after the quarantine"
        );
    }
    drop(driver);
    server.stop().expect("serve stops");
    d.control.stop();
    d.daemon.close();
    drop((d.daemon, d.live));
    // Block 10 of member 1, whose write was dropped, was repaired on disk.
    assert_eq!(version_block(&store, keys[1], 10), data(10));
    assert_eq!(version_block(&store, keys[2], 10), data(10));
    // A restart keeps member 1 out: quarantined from the start, as the catalog says.
    let d = serve(t.path(), &store);
    let v = voting(&d.socket);
    assert_eq!(member_keys(&v), keys, "{v}");
    assert_eq!(v["members"][1]["state"], json!("quarantined"), "{v}");
    assert_eq!(v["members"][2]["state"], json!("voting"), "{v}");
    d.control.stop();
    d.daemon.close();
}

#[test]
fn tee_add_and_remove_under_io_and_the_membership_survives_a_crash() {
    let t = tempfile::tempdir().expect("tempdir");
    let store = new_store(t.path());
    let d = serve(t.path(), &store);
    ok(
        &d.socket,
        json!({"cmd": "tee", "disk": "vd", "candidate": "parallax-v1",
               "more_candidates": ["parallax-v1"], "policy": "sync-read-checks"}),
    );
    let server = TestServer::start(d.live.disk.clone(), 1);
    let driver = Arc::new(TestDriver::connect(server.socket(), 1, 8 << 20));
    let stop = Arc::new(AtomicBool::new(false));
    let data = |b: u64, round: u64| pattern(round * 1000 + b, 4096);
    // The guest writes and reads back blocks 0..64 in rounds until told to stop.
    let guest = {
        let (driver, stop) = (driver.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) || round < 2 {
                round += 1;
                for b in 0..64 {
                    driver
                        .submit(0, &Req::write(b * SPB, &data(b, round)))
                        .assert_ok(0);
                }
                driver.submit(0, &Req::flush()).assert_ok(0);
                for b in 0..64 {
                    let c = driver.submit(0, &Req::read(b * SPB, 4096));
                    c.assert_ok(4096);
                    assert!(c.data == data(b, round), "round {round}: block {b} wrong");
                }
            }
            round
        })
    };
    let v = wait_filled(&d.socket);
    let first = member_keys(&v);
    let r = ok(
        &d.socket,
        json!({"cmd": "tee-add", "disk": "vd", "candidate": "parallax-v2"}),
    );
    assert!(r["pause"].is_object(), "the pause is reported: {r}");
    let v = wait_filled(&d.socket);
    let keys = member_keys(&v);
    assert_eq!(keys.len(), 4, "{v}");
    let added = keys[3];
    assert_eq!(
        store.members("vd").expect("members")[1].state,
        MemberState::Voting,
        "the filled member is recorded voting"
    );
    // The candidate leaves; the member after it takes its place.
    ok(
        &d.socket,
        json!({"cmd": "tee-remove", "disk": "vd", "member": first[1]}),
    );
    let err = request(
        &d.socket,
        json!({"cmd": "tee-remove", "disk": "vd", "member": first[0]}),
    );
    assert_eq!(err["ok"], json!(false), "{err}");
    // The added member holds every block: it becomes the trusted version, the former trusted
    // version a member.
    let r = ok(
        &d.socket,
        json!({"cmd": "promote", "disk": "vd", "member": added}),
    );
    assert!(r["pause"].is_object(), "{r}");
    stop.store(true, Ordering::Relaxed);
    let rounds = guest.join().expect("the guest saw every byte right");
    assert!(rounds >= 2);
    let v = voting(&d.socket);
    assert_eq!(member_keys(&v), vec![added, first[2], first[0]], "{v}");
    for m in v["members"].as_array().expect("members") {
        assert_eq!(m["votes_lost"], json!(0), "{v}");
    }
    let info = store.disk("vd").expect("disk");
    assert_eq!(info.trusted, VersionKey(added));
    assert_eq!(info.candidate, Some(VersionKey(first[2])));
    assert!(
        store.version(VersionKey(first[1])).is_err(),
        "its version is gone"
    );
    // An unclean stop: nothing closed (presence maps left unclean, no last flush beyond the
    // guest's), every handle dropped; then a restart from the catalog on disk.
    drop(Arc::try_unwrap(driver).ok());
    server.stop().expect("serve stops");
    let Daemonised {
        daemon,
        live,
        control,
        ..
    } = d;
    control.stop();
    drop((daemon, live));
    drop(store);
    // The daemon's threads let go of the store as they wind down.
    let deadline = Instant::now() + Duration::from_secs(10);
    let store = loop {
        match Store::open(&t.path().join("store")) {
            Ok(s) => break s,
            Err(dovetail_store::StoreError::InUse(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("reopen the store: {e}"),
        }
    };
    let info = store.disk("vd").expect("disk");
    assert_eq!(info.trusted, VersionKey(added));
    assert_eq!(info.candidate, Some(VersionKey(first[2])));
    let d = serve(t.path(), &store);
    let v = voting(&d.socket);
    assert_eq!(member_keys(&v), vec![added, first[2], first[0]], "{v}");
    let server = TestServer::start(d.live.disk.clone(), 1);
    let driver = TestDriver::connect(server.socket(), 1, 8 << 20);
    for b in 0..64 {
        let c = driver.submit(0, &Req::read(b * SPB, 4096));
        c.assert_ok(4096);
        assert!(
            c.data == data(b, rounds),
            "after the restart: block {b} wrong"
        );
    }
    let v = voting(&d.socket);
    for m in v["members"].as_array().expect("members") {
        assert_eq!(m["state"], json!("voting"), "{v}");
    }
    drop(driver);
    server.stop().expect("serve stops");
    d.control.stop();
    d.daemon.close();
    drop((d.daemon, d.live));
    // The offline commands that would serve the disk through a two-member Tee refuse it.
    let e = dovetail_backend::ops::teed::migrate_offline(&store, "vd", 0, false)
        .expect_err("offline migrate of a voting tee");
    assert!(e.to_string().contains("voting tee"), "{e}");
}

/// Waits until every live member holds `blocks` blocks and none is filling.
fn wait_filled_to(socket: &Path, blocks: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = voting(socket);
        let members = v["members"].as_array().expect("members").clone();
        if members
            .iter()
            .all(|m| m["state"] == json!("quarantined") || m["held_blocks"] == json!(blocks))
            && !members.iter().any(|m| m["state"] == json!("filling"))
        {
            return v;
        }
        assert!(Instant::now() < deadline, "members never filled: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_voting_tee_grows_with_resize_votes_on_the_new_blocks_and_migrates_and_promotes() {
    let t = tempfile::tempdir().expect("tempdir");
    let store = new_store(t.path());
    let d = serve(t.path(), &store);
    let grown = 2 * SIZE;
    let grown_blocks = grown / 4096;
    // Member 1 flips a bit of every read of a block past the old end (block BLOCKS + 10).
    let flipped = BLOCKS + 10;
    ok(
        &d.socket,
        json!({"cmd": "tee", "disk": "vd", "candidate": "parallax-v1",
               "more_candidates": ["parallax-v2"], "policy": "sync-read-checks",
               "faults": [format!("flip-read:sector={}", flipped * SPB)]}),
    );
    wait_filled(&d.socket);
    let data = |b: u64| pattern(4000 + b, 4096);
    for b in (0..BLOCKS).step_by(7) {
        d.live
            .switch
            .write(Sector(b * SPB), &data(b))
            .expect("write");
    }
    let r = ok(
        &d.socket,
        json!({"cmd": "resize", "disk": "vd", "size": grown}),
    );
    assert_eq!(r["size"], json!(grown), "{r}");
    assert_eq!(d.live.switch.capacity().0 * 512, grown);
    // Every member grew: each is filled over the new blocks and holds them all.
    let v = wait_filled_to(&d.socket, grown_blocks);
    assert_eq!(member_keys(&v).len(), 3, "{v}");
    assert!(v["members"]
        .as_array()
        .expect("members")
        .iter()
        .all(|m| m["state"] == json!("voting")));
    assert_eq!(store.disk("vd").expect("disk").size, grown);
    // Writes past the old end reach every member; reads there are voted on: member 1's
    // flipped read of block `flipped` is outvoted, the guest gets the majority's data.
    for b in BLOCKS..grown_blocks {
        d.live
            .switch
            .write(Sector(b * SPB), &data(b))
            .expect("write");
    }
    let lost_before = voting(&d.socket)["members"][1]["votes_lost"]
        .as_u64()
        .expect("lost");
    let mut buf = vec![0u8; 4096];
    for b in (0..grown_blocks).step_by(7).chain([flipped]) {
        d.live.switch.read(Sector(b * SPB), &mut buf).expect("read");
        assert!(buf == data(b), "block {b}");
    }
    d.live
        .switch
        .read(Sector(flipped * SPB), &mut buf)
        .expect("read");
    assert!(buf == data(flipped), "the flipped read reached the guest");
    let v = voting(&d.socket);
    assert!(
        v["members"][1]["votes_lost"].as_u64().expect("lost") > lost_before,
        "the new block was not voted on: {v}"
    );
    assert_eq!(v["members"][2]["votes_lost"], json!(0), "{v}");
    // migrate copy-out: the members hold every block already; its status says so.
    let r = ok(
        &d.socket,
        json!({"cmd": "migrate", "disk": "vd", "mode": "copy-out"}),
    );
    assert_eq!(r["migration"]["mode"], json!("copy-out"), "{r}");
    assert_eq!(r["migration"]["blocks_total"], json!(grown_blocks), "{r}");
    assert_eq!(r["migration"]["blocks_present"], json!(grown_blocks), "{r}");
    let st = ok(&d.socket, json!({"cmd": "status", "disk": "vd"}))["disks"][0]["migration"].clone();
    assert_eq!(st["blocks_present"], json!(grown_blocks), "{st}");
    let r = request(
        &d.socket,
        json!({"cmd": "migrate", "disk": "vd", "mode": "copy-on-read"}),
    );
    assert_eq!(r["error"]["code"], json!("invalid"), "{r}");
    // Promote member 2 (holds every block, injects nothing): it serves as the trusted one.
    let keys = member_keys(&v);
    ok(
        &d.socket,
        json!({"cmd": "promote", "disk": "vd", "member": keys[2]}),
    );
    assert_eq!(store.disk("vd").expect("disk").trusted, VersionKey(keys[2]));
    for b in (BLOCKS..grown_blocks).chain((0..BLOCKS).step_by(7)) {
        d.live.switch.read(Sector(b * SPB), &mut buf).expect("read");
        assert!(buf == data(b), "block {b} after the promote");
    }
    d.live.switch.flush().expect("flush");
    // A daemon stopped without closing anything restarts with the grown members.
    d.control.stop();
    drop((d.daemon, d.live));
    let d = serve(t.path(), &store);
    assert_eq!(d.live.switch.capacity().0 * 512, grown);
    let v = wait_filled_to(&d.socket, grown_blocks);
    assert_eq!(member_keys(&v)[0], keys[2], "{v}");
    for b in (BLOCKS..grown_blocks).chain((0..BLOCKS).step_by(7)) {
        d.live.switch.read(Sector(b * SPB), &mut buf).expect("read");
        assert!(buf == data(b), "block {b} after the restart");
    }
    d.control.stop();
    d.daemon.close();
}
