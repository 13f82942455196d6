//! `ctl bisect` and `serve --auto-bisect` through a daemon's control socket: a Tee whose
//! candidate (parallax-v1 under a fault rule) drops one write; the bisection names that write,
//! confirmed against fresh versions in a scratch store, saves its report in the store's
//! bisect/ directory (0600) and publishes a `bisected` event naming the file. A voting Tee of
//! three members whose member 1 drops that write: the bisection names the write and member 1.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dovetail_backend::access::Security;
use dovetail_backend::daemon::control;
use dovetail_backend::daemon::live::{EventHub, LiveDisk};
use dovetail_backend::daemon::served::Daemon;
use dovetail_layout::{BlockLayout, Sector};
use dovetail_migrate::journal::JournalLimits;
use dovetail_store::Store;
use serde_json::{json, Value};

const SIZE: u64 = 16 << 20;

/// Every test of this binary configures the daemon the same way (the setting is per process).
fn configure() {
    dovetail_backend::ops::bisect::configure(Some(JournalLimits::requests(4096)), true);
}

/// The tests run one at a time: one checks that no scratch store of this process is left.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Setup {
    _serial: std::sync::MutexGuard<'static, ()>,
    _control: control::ControlServer,
    daemon: Arc<Daemon>,
    live: Arc<LiveDisk>,
    store: Arc<Store>,
    dir: tempfile::TempDir,
}

fn setup() -> Setup {
    setup_with(false)
}

/// `members`: a store of format 7, which takes voting Tees.
fn setup_with(members: bool) -> Setup {
    let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    common::init_logging();
    configure();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::create(&dir.path().join("store"), 256 << 20, 4 << 20).expect("store");
    store.create_disk("a", SIZE, "parallax-v1").expect("disk");
    let store = if members {
        store.enable_members().expect("format 7")
    } else {
        store
    };
    let events = Arc::new(EventHub::default());
    let live = LiveDisk::open_store(
        &store,
        "a",
        &dir.path().join("a.sock"),
        false,
        events.clone(),
        None,
    )
    .expect("open");
    let security = Security {
        allow_fault_injection: true,
        ..Default::default()
    };
    let daemon = Arc::new(
        Daemon::new(vec![live.clone()], events, Some(dir.path().join("store")))
            .with_security(security),
    );
    let control = control::start(
        &dir.path().join("control.sock"),
        control::DEFAULT_MODE,
        daemon.clone(),
    )
    .expect("control");
    Setup {
        _serial: serial,
        _control: control,
        daemon,
        live,
        store,
        dir,
    }
}

fn call(dir: &Path, req: Value) -> Value {
    let s = UnixStream::connect(dir.join("control.sock")).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut w = s.try_clone().expect("clone");
    w.write_all((req.to_string() + "\n").as_bytes())
        .expect("send");
    let mut l = String::new();
    BufReader::new(s).read_line(&mut l).expect("reply");
    serde_json::from_str(&l).expect("json")
}

fn ok(dir: &Path, req: Value) -> Value {
    let r = call(dir, req.clone());
    assert_eq!(r["ok"], json!(true), "{req}: {r}");
    r["result"].clone()
}

/// Writes 200 requests through the served disk; request `bad` (1-based, as the journal
/// numbers them) is the only one covering sector 800 (block 100), which the rule drops.
fn guest_writes(live: &LiveDisk, bad: u64) -> Vec<u8> {
    let mut bad_data = Vec::new();
    for i in 1..=200u64 {
        let data: Vec<u8> = (0..4096u64).map(|b| (b * 31 + i * 7) as u8 | 1).collect();
        let at = if i == bad { 800 } else { 8 * (200 + i) };
        if i == bad {
            bad_data = data.clone();
        }
        live.switch.write(Sector(at), &data).expect("write");
    }
    bad_data
}

fn reports(store_dir: &Path) -> Vec<std::path::PathBuf> {
    match std::fs::read_dir(store_dir.join("bisect")) {
        Ok(d) => d.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn ctl_bisect_names_the_dropped_write_and_saves_the_report() {
    let s = setup();
    let d = s.dir.path();
    // Without a candidate there is nothing to compare.
    let r = call(d, json!({"cmd": "bisect", "disk": "a"}));
    assert_eq!(r["error"]["code"], json!("conflict"), "{r}");
    ok(
        d,
        json!({"cmd": "tee", "disk": "a", "candidate": "parallax-v1", "policy": "mirror-only",
               "faults": ["drop-write:sector=803"]}),
    );
    let data = guest_writes(&s.live, 57);
    // A bad block argument is refused with a clear message.
    let r = call(
        d,
        json!({"cmd": "bisect", "disk": "a", "block": 1u64 << 40}),
    );
    assert_eq!(r["ok"], json!(false), "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("past the disk's end"),
        "{r}"
    );
    let r = ok(d, json!({"cmd": "bisect", "disk": "a"}));
    let rep = &r["report"];
    assert_eq!(rep["format"], json!(1));
    assert_eq!(rep["block"], json!(100), "{rep}");
    assert_eq!(rep["block_from"], json!("scan"));
    assert_eq!(rep["first_bad"]["seq"], json!(57), "{rep}");
    assert_eq!(rep["first_bad"]["op"], json!("write"));
    assert_eq!(rep["first_bad"]["sector"], json!(800));
    assert_eq!(rep["first_bad"]["sectors"], json!(data.len() / 512));
    let hash = rep["first_bad"]["hash"].as_str().expect("hash");
    assert!(
        hash.len() == 32 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
        "{hash}"
    );
    assert_eq!(rep["confirmed"], json!(true), "{rep}");
    assert_eq!(rep["after"]["reference_agrees_with"], json!("trusted"));
    assert_eq!(rep["window"]["entries"], json!(200));
    // Saved, 0600, the same report.
    let file = r["file"].as_str().expect("saved");
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(file).expect("read")).expect("json");
    assert_eq!(saved["first_bad"], rep["first_bad"]);
    let mode = std::fs::metadata(file).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(file.starts_with(&*d.join("store").join("bisect").to_string_lossy()));
    // The event names the file.
    let evs = ok(d, json!({"cmd": "events"}));
    let ev = evs["events"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .rev()
                .find(|e| e["kind"] == json!("bisected"))
                .cloned()
        })
        .expect("bisected event");
    assert!(ev["message"].as_str().unwrap_or("").contains(file), "{ev}");
    assert_eq!(ev["tee"]["request"]["seq"], json!(57));
    // The scratch stores are gone (polled: the other test's automatic bisection removes its
    // own just after its event).
    let prefix = format!("dovetail-bisect-{}-", std::process::id());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
            .expect("tmp")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect();
        if leftovers.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "scratch stores left: {leftovers:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(s.daemon);
    drop(s.store);
}

#[test]
fn auto_bisect_runs_on_the_first_mismatch() {
    let s = setup();
    let d = s.dir.path();
    ok(
        d,
        json!({"cmd": "tee", "disk": "a", "candidate": "parallax-v1",
               "policy": "sync-cross-checks", "faults": ["drop-write:sector=803"]}),
    );
    // sync-cross-checks reads every write back: request 57 is the mismatch (and the
    // candidate is quarantined; the trusted version serves on).
    guest_writes(&s.live, 57);
    let deadline = Instant::now() + Duration::from_secs(30);
    let file = loop {
        if let Some(f) = reports(&d.join("store")).into_iter().next() {
            break f;
        }
        assert!(Instant::now() < deadline, "no report within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    };
    // The file appears before its event: wait for the event too.
    let ev = loop {
        let evs = ok(d, json!({"cmd": "events"}));
        if let Some(e) = evs["events"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["kind"] == json!("bisected")).cloned())
        {
            break e;
        }
        assert!(Instant::now() < deadline, "no bisected event within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&file).expect("read");
    let rep: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(rep["block_from"], json!("event"));
    assert_eq!(rep["block"], json!(100));
    assert_eq!(rep["first_bad"]["seq"], json!(57), "{rep}");
    assert_eq!(rep["confirmed"], json!(true));
    assert!(
        ev["message"]
            .as_str()
            .unwrap_or("")
            .contains(&*file.to_string_lossy()),
        "{ev}"
    );
    drop(s.daemon);
    drop(s.store);
}

#[test]
fn ctl_bisect_of_a_voting_tee_names_the_write_and_the_member_that_left_the_majority() {
    let s = setup_with(true);
    let d = s.dir.path();
    ok(
        d,
        json!({"cmd": "tee", "disk": "a", "candidate": "parallax-v1",
               "more_candidates": ["parallax-v2"], "policy": "mirror-only",
               "faults": ["drop-write:sector=803"]}),
    );
    // The fills (every block copied from the trusted version) before the guest writes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = ok(d, json!({"cmd": "status", "disk": "a"}))["disks"][0]["voting"].clone();
        let filled = v["members"].as_array().is_some_and(|m| {
            m.iter()
                .all(|m| m["held_blocks"] == json!(SIZE / 4096) && m["state"] == json!("voting"))
        });
        if filled {
            break;
        }
        assert!(Instant::now() < deadline, "members never filled: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    guest_writes(&s.live, 57);
    let r = ok(d, json!({"cmd": "bisect", "disk": "a", "block": 100}));
    let rep = &r["report"];
    assert_eq!(rep["members"], json!(3), "{rep}");
    assert_eq!(rep["first_bad"]["seq"], json!(57), "{rep}");
    assert_eq!(rep["first_bad"]["sector"], json!(800));
    assert_eq!(rep["diverged"], json!([1]), "{rep}");
    assert_eq!(rep["confirmed"], json!(true), "{rep}");
    assert_eq!(
        rep["after"]["reference_agrees_with"],
        json!([0, 2]),
        "{rep}"
    );
    // The live members: member 1 is outside the majority.
    assert_eq!(rep["live"]["outside"], json!([1]), "{rep}");
    let file = r["file"].as_str().expect("saved");
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(file).expect("read")).expect("json");
    assert_eq!(saved["diverged"], json!([1]));
    // With no block named, the journal's blocks are scanned (mirror-only lost no vote).
    let r = ok(d, json!({"cmd": "bisect", "disk": "a"}));
    assert_eq!(r["report"]["block"], json!(100), "{r}");
    assert_eq!(r["report"]["block_from"], json!("scan"), "{r}");
    assert_eq!(r["report"]["first_bad"]["seq"], json!(57), "{r}");
    drop(s.daemon);
    drop(s.store);
}

#[test]
fn auto_bisect_of_a_voting_tee_runs_on_the_first_lost_vote() {
    let s = setup_with(true);
    let d = s.dir.path();
    ok(
        d,
        json!({"cmd": "tee", "disk": "a", "candidate": "parallax-v1",
               "more_candidates": ["parallax-v2"], "policy": "sync-read-checks",
               "faults": ["drop-write:sector=803"]}),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = ok(d, json!({"cmd": "status", "disk": "a"}))["disks"][0]["voting"].clone();
        let filled = v["members"].as_array().is_some_and(|m| {
            m.iter()
                .all(|m| m["held_blocks"] == json!(SIZE / 4096) && m["state"] == json!("voting"))
        });
        if filled {
            break;
        }
        assert!(Instant::now() < deadline, "members never filled: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let data = guest_writes(&s.live, 57);
    // A read of block 100: member 1 (which dropped the write) loses the vote.
    let mut buf = vec![0u8; 4096];
    s.live.switch.read(Sector(800), &mut buf).expect("read");
    assert!(buf == data, "the guest got the majority's data");
    let file = loop {
        if let Some(f) = reports(&d.join("store")).into_iter().next() {
            break f;
        }
        assert!(Instant::now() < deadline, "no report within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    };
    let rep: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("json");
    assert_eq!(rep["block_from"], json!("event"), "{rep}");
    assert_eq!(rep["block"], json!(100), "{rep}");
    assert_eq!(rep["member"], json!(1), "{rep}");
    assert_eq!(rep["first_bad"]["seq"], json!(57), "{rep}");
    assert_eq!(rep["confirmed"], json!(true), "{rep}");
    drop(s.daemon);
    drop(s.store);
}
