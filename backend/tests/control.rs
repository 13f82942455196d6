//! The control socket (docs/control.md): every command, malformed and hostile input, and live
//! reconfiguration of a disk while a guest (the in-process frontend, over a real vhost-user
//! socket) keeps writing and verifying its data.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{pattern, Req, TestDriver, TestServer};
use dovetail_backend::daemon::control::{self, ControlServer, MAX_CONNECTIONS, MAX_LINE};
use dovetail_backend::daemon::live::{EventHub, LiveDisk};
use dovetail_backend::daemon::served::Daemon;
use dovetail_store::Store;
use serde_json::{json, Value};

const SIZE: u64 = 16 << 20;

struct Setup {
    control: Option<ControlServer>,
    daemon: Arc<Daemon>,
    store: Arc<Store>,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(disks: &[&str]) -> Setup {
        let disks: Vec<(&str, &str)> = disks.iter().map(|d| (*d, "parallax-v1")).collect();
        Setup::with_layouts(&disks)
    }

    /// Disks `(name, layout)`.
    fn with_layouts(disks: &[(&str, &str)]) -> Setup {
        Setup::with_mover(disks, None)
    }

    /// Disks `(name, layout)`, the parallax-v2 ones with a tier mover running every `mover`.
    fn with_mover(disks: &[(&str, &str)], mover: Option<Duration>) -> Setup {
        Setup::with_store(disks, mover, |dir| {
            Store::create(&dir.join("store"), 512 << 20, 4 << 20).expect("store")
        })
    }

    /// Disks `(name, layout)` of the store `create` makes at `DIR/store` (given DIR).
    fn with_store(
        disks: &[(&str, &str)],
        mover: Option<Duration>,
        create: impl FnOnce(&Path) -> Arc<Store>,
    ) -> Setup {
        common::init_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        let store = create(dir.path());
        let events = Arc::new(EventHub::default());
        let mut live = Vec::new();
        for (name, layout) in disks {
            store.create_disk(name, SIZE, layout).expect("create disk");
            let sock = dir.path().join(format!("{name}.sock"));
            live.push(
                LiveDisk::open_store(&store, name, &sock, false, events.clone(), mover)
                    .expect("open disk"),
            );
        }
        // Live exports go to the test's directory.
        let security = dovetail_backend::access::Security {
            export_dir: Some(
                dovetail_backend::access::ExportDir::open(dir.path()).expect("export dir"),
            ),
            ..Default::default()
        };
        let daemon = Arc::new(
            Daemon::new(live, events, Some(dir.path().join("store"))).with_security(security),
        );
        let socket = dir.path().join("control.sock");
        let control =
            control::start(&socket, control::DEFAULT_MODE, daemon.clone()).expect("control");
        Setup {
            dir,
            store,
            daemon,
            control: Some(control),
            socket,
        }
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket)
    }
}

struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let s = UnixStream::connect(path).expect("connect to the control socket");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        Client {
            reader: BufReader::new(s.try_clone().expect("clone")),
            writer: s,
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    fn line(&mut self) -> Option<Value> {
        let mut l = String::new();
        match self.reader.read_line(&mut l) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&l).expect("the daemon sends JSON lines")),
            Err(e) => panic!("reading a reply: {e}"),
        }
    }

    /// Sends a request, returns the whole reply.
    fn raw(&mut self, req: &Value) -> Value {
        self.send_raw((req.to_string() + "\n").as_bytes());
        self.line().expect("a reply")
    }

    /// A request that must succeed: returns its result.
    fn ok(&mut self, req: Value) -> Value {
        let r = self.raw(&req);
        assert_eq!(r["ok"], json!(true), "{req} failed: {r}");
        assert_eq!(r["v"], json!(1));
        r["result"].clone()
    }

    /// A request that must fail with `code`: returns its message.
    fn err(&mut self, req: Value, code: &str) -> String {
        let r = self.raw(&req);
        assert_eq!(r["ok"], json!(false), "{req} must fail: {r}");
        assert_eq!(r["error"]["code"], json!(code), "{req}: {r}");
        r["error"]["message"]
            .as_str()
            .expect("a message")
            .to_string()
    }
}

fn status(c: &mut Client, disk: &str) -> Value {
    c.ok(json!({"cmd": "status", "disk": disk}))["disks"][0].clone()
}

#[test]
fn every_command_does_what_it_says() {
    let s = Setup::new(&["a", "b"]);
    let mut c = s.client();
    let mode = std::fs::metadata(&s.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the control socket is the user's alone"
    );

    // hello: protocol, disks, commands; the id is echoed.
    let r = c.raw(&json!({"v": 1, "id": "x-1", "cmd": "hello"}));
    assert_eq!(r["id"], json!("x-1"));
    assert_eq!(r["result"]["protocol"], json!(1));
    assert_eq!(r["result"]["disks"], json!(["a", "b"]));
    // status: every disk, or one.
    let all = c.ok(json!({"cmd": "status"}));
    assert_eq!(all["disks"].as_array().map(Vec::len), Some(2));
    let a = status(&mut c, "a");
    assert_eq!(a["name"], json!("a"));
    assert_eq!(a["size"], json!(SIZE));
    assert_eq!(a["trusted_version"], json!(1));
    assert_eq!(a["candidate"], Value::Null);
    c.err(json!({"cmd": "status", "disk": "zz"}), "unknown-disk");

    // tee: bad policy and layout are refused and change nothing.
    c.err(
        json!({"cmd": "tee", "disk": "a", "candidate": "parallax-v1", "policy": "yolo"}),
        "invalid",
    );
    c.err(
        json!({"cmd": "tee", "disk": "a", "candidate": "ext9", "policy": "mirror-only"}),
        "invalid",
    );
    assert_eq!(s.store.disk("a").expect("disk").candidate, None);
    let r = c.ok(
        json!({"cmd": "tee", "disk": "a", "candidate": "parallax-v1",
                        "policy": "sync-cross-checks"}),
    );
    assert!(
        r["pause"]["total_us"].is_u64(),
        "the pause is reported: {r}"
    );
    let key = s
        .store
        .disk("a")
        .expect("disk")
        .candidate
        .expect("a candidate");
    let a = status(&mut c, "a");
    assert_eq!(a["candidate"]["version"], json!(key.0));
    assert_eq!(a["candidate"]["policy"], json!("sync-cross-checks"));
    assert_eq!(a["candidate"]["state"], json!("active"));
    assert_eq!(a["pauses"]["pauses"], json!(1));
    // A second tee is a conflict.
    c.err(
        json!({"cmd": "tee", "disk": "a", "candidate": "parallax-v1", "policy": "mirror-only"}),
        "conflict",
    );

    // policy: changed in the daemon and in the catalog (a restart keeps it).
    c.err(
        json!({"cmd": "policy", "disk": "a", "policy": "nope"}),
        "invalid",
    );
    c.err(
        json!({"cmd": "policy", "disk": "b", "policy": "lazy-hashes"}),
        "conflict",
    );
    let r = c.ok(json!({"cmd": "policy", "disk": "a", "policy": "lazy-hashes"}));
    assert!(r["message"]
        .as_str()
        .is_some_and(|m| m.contains("sync-cross-checks to lazy-hashes")));
    assert_eq!(
        status(&mut c, "a")["candidate"]["policy"],
        json!("lazy-hashes")
    );
    assert_eq!(
        s.store.tee("a").expect("tee").expect("a record").policy,
        "lazy-hashes"
    );

    // snapshots of a served disk.
    let r = c.ok(json!({"cmd": "snapshot", "disk": "a", "name": "one"}));
    assert_eq!(r["snapshot"]["name"], json!("one"));
    c.err(
        json!({"cmd": "snapshot", "disk": "a", "name": "one"}),
        "conflict",
    );
    c.err(
        json!({"cmd": "snapshot", "disk": "a", "name": ""}),
        "invalid",
    );
    c.err(
        json!({"cmd": "snapshot", "disk": "a", "name": "a\u{7}b"}),
        "invalid",
    );
    let r = c.ok(json!({"cmd": "snapshots", "disk": "a"}));
    assert_eq!(r["snapshots"][0]["name"], json!("one"));
    let img = s.dir.path().join("one.img");
    c.err(
        json!({"cmd": "export", "disk": "a", "snapshot": "one", "to": "../up.img"}),
        "invalid",
    );
    c.err(
        json!({"cmd": "export", "disk": "a", "snapshot": "nope", "to": img}),
        "invalid",
    );
    assert!(!img.exists(), "a failed export leaves no file");
    let r = c.ok(json!({"cmd": "export", "disk": "a", "snapshot": "one", "to": img}));
    assert_eq!(r["data_bytes"], json!(0));
    assert_eq!(std::fs::metadata(&img).expect("exported").len(), SIZE);
    c.ok(json!({"cmd": "delete-snapshot", "disk": "a", "name": "one"}));
    c.err(
        json!({"cmd": "delete-snapshot", "disk": "a", "name": "one"}),
        "failed",
    );

    // metrics: the Prometheus text, with the disk's and the versions' families.
    let text = c.ok(json!({"cmd": "metrics"}))["text"]
        .as_str()
        .expect("text")
        .to_string();
    for family in [
        "dovetail_requests_total{disk=\"a\"",
        "dovetail_version_ops_total{disk=\"a\"",
        "role=\"candidate\"",
        "dovetail_tee_mismatches_total{disk=\"a\"} 0",
        "dovetail_pauses_total{disk=\"a\"} 3",
        "dovetail_grant_refusals_total{disk=\"a\"",
    ] {
        assert!(text.contains(family), "metrics lack {family}:\n{text}");
    }

    // untee, then abort on a fresh candidate; both free the candidate.
    c.ok(json!({"cmd": "untee", "disk": "a"}));
    assert_eq!(s.store.disk("a").expect("disk").candidate, None);
    assert_eq!(status(&mut c, "a")["candidate"], Value::Null);
    c.err(json!({"cmd": "untee", "disk": "a"}), "conflict");
    c.ok(json!({"cmd": "tee", "disk": "b", "candidate": "parallax-v1", "policy": "mirror-only"}));
    c.ok(json!({"cmd": "abort", "disk": "b"}));
    assert_eq!(s.store.disk("b").expect("disk").candidate, None);
    assert!(s.store.versions().iter().all(|v| v.key != key));

    // events: every change, in order, with its pause.
    let evs = c.ok(json!({"cmd": "events"}))["events"].clone();
    let kinds: Vec<&str> = evs
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "candidate-attached",
            "policy-changed",
            "snapshot-taken",
            "snapshot-deleted",
            "candidate-dropped",
            "candidate-attached",
            "candidate-dropped"
        ]
    );
    assert!(evs[0]["pause"]["total_us"].is_u64());
    let since = evs[2]["seq"].as_u64().expect("seq");
    let later = c.ok(json!({"cmd": "events", "since": since}))["events"].clone();
    assert_eq!(later.as_array().map(Vec::len), Some(4));

    // Commands reserved for later versions, and unknown ones.
    for reserved in control::RESERVED {
        c.err(json!({"cmd": reserved, "disk": "a"}), "not-available");
    }
    c.err(json!({"cmd": "format-everything"}), "unknown-command");
}

#[test]
fn events_can_be_followed() {
    let s = Setup::new(&["a"]);
    let mut follower = s.client();
    let r = follower.ok(json!({"cmd": "events", "follow": true}));
    assert_eq!(r["events"], json!([]));
    let mut c = s.client();
    c.ok(json!({"cmd": "tee", "disk": "a", "candidate": "parallax-v1", "policy": "mirror-only"}));
    c.ok(json!({"cmd": "policy", "disk": "a", "policy": "sync-read-checks"}));
    let first = follower.line().expect("an event");
    assert_eq!(first["event"]["kind"], json!("candidate-attached"));
    assert_eq!(first["event"]["disk"], json!("a"));
    let second = follower.line().expect("an event");
    assert_eq!(second["event"]["kind"], json!("policy-changed"));
    assert!(second["event"]["pause"]["total_us"].is_u64());
    drop(follower);
    // The daemon notices the follower left.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while s.daemon.events.followers() > 0 || s.daemon.connections.load(Ordering::SeqCst) > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the follower was not dropped"
        );
        c.ok(json!({"cmd": "status"}));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn malformed_requests_get_an_error_and_change_nothing() {
    let s = Setup::new(&["a"]);
    let mut c = s.client();
    let before = c.ok(json!({"cmd": "status"}));
    let cases: &[(&[u8], &str)] = &[
        (b"this is not json\n", "bad-json"),
        (b"{\"cmd\": \"status\"\n", "bad-json"),
        (b"[1, 2, 3]\n", "bad-request"),
        (b"\"status\"\n", "bad-request"),
        (b"{}\n", "bad-request"),
        (b"{\"cmd\": 7}\n", "bad-request"),
        (b"{\"cmd\": \"status\", \"v\": 2}\n", "unsupported-version"),
        (
            b"{\"cmd\": \"status\", \"v\": \"1\"}\n",
            "unsupported-version",
        ),
        (b"{\"cmd\": \"status\", \"dsk\": \"a\"}\n", "bad-request"),
        (b"{\"cmd\": \"tee\", \"disk\": \"a\"}\n", "bad-request"),
        (
            b"{\"cmd\": \"tee\", \"disk\": \"a\", \"candidate\": 1, \"policy\": \"mirror-only\"}\n",
            "bad-request",
        ),
        (
            b"{\"cmd\": \"policy\", \"disk\": [\"a\"], \"policy\": \"x\"}\n",
            "bad-request",
        ),
        (b"{\"cmd\": \"events\", \"since\": -1}\n", "bad-request"),
        (b"{\"cmd\": \"\\u0000\"}\n", "unknown-command"),
        (b"\xff\xfe\xfd\n", "bad-json"),
    ];
    for (line, code) in cases {
        c.send_raw(line);
        let r = c.line().expect("a reply to every line");
        assert_eq!(
            r["ok"],
            json!(false),
            "{}: {r}",
            String::from_utf8_lossy(line)
        );
        assert_eq!(
            r["error"]["code"],
            json!(code),
            "{}: {r}",
            String::from_utf8_lossy(line)
        );
    }
    // Blank lines are ignored, not answered.
    c.send_raw(b"\n  \n");
    c.ok(json!({"cmd": "hello"}));
    // Nothing changed, and the connection still works.
    let mut after = c.ok(json!({"cmd": "status"}));
    let mut before = before;
    for v in [&mut before, &mut after] {
        v["disks"][0]["requests"] = Value::Null;
    }
    assert_eq!(before, after);
    assert_eq!(s.store.disk("a").expect("disk").candidate, None);
    assert_eq!(s.daemon.events.recent(0).len(), 0);

    // An oversized line: a too-long error, then the connection is closed.
    let mut big = s.client();
    let huge = vec![b'x'; MAX_LINE + 10];
    big.send_raw(&huge);
    let r = big.line().expect("a reply");
    assert_eq!(r["error"]["code"], json!("too-long"), "{r}");
    assert!(
        big.line().is_none(),
        "the connection is closed after too-long"
    );
    // Others are unaffected.
    c.ok(json!({"cmd": "status"}));
}

#[test]
fn idle_clients_and_too_many_connections_cannot_lock_others_out() {
    let s = Setup::new(&["a"]);
    // Connections that say nothing (and one that sends half a line) hold no lock.
    let mut idle: Vec<UnixStream> = (0..MAX_CONNECTIONS - 2)
        .map(|_| UnixStream::connect(&s.socket).expect("connect"))
        .collect();
    idle[0].write_all(b"{\"cmd\": \"sta").expect("half a line");
    let mut c = s.client();
    c.ok(json!({"cmd": "tee", "disk": "a", "candidate": "parallax-v1", "policy": "mirror-only"}));
    // Fill the last slot, then one more is refused with `busy`.
    let _last = s.client();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while s.daemon.connections.load(Ordering::SeqCst) < MAX_CONNECTIONS {
        assert!(
            std::time::Instant::now() < deadline,
            "connections not counted"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut refused = s.client();
    let r = refused.line().expect("a busy reply");
    assert_eq!(r["error"]["code"], json!("busy"), "{r}");
    assert!(refused.line().is_none());
    // Closing some frees their slots.
    idle.truncate(10);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        // While the slots are still taken the daemon answers `busy` and closes at once, so
        // the request may meet a closed socket (EPIPE) or find no reply: not yet free.
        let mut again = s.client();
        let sent = again
            .writer
            .write_all((json!({"cmd": "status"}).to_string() + "\n").as_bytes());
        let r = sent.ok().and_then(|()| {
            let mut l = String::new();
            match again.reader.read_line(&mut l) {
                Ok(n) if n > 0 => serde_json::from_str::<Value>(&l).ok(),
                _ => None,
            }
        });
        if r.as_ref().is_some_and(|r| r["ok"] == json!(true)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slots were not freed: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c.ok(json!({"cmd": "untee", "disk": "a"}));
}

#[test]
fn a_client_that_does_not_read_its_replies_is_dropped_and_others_carry_on() {
    let s = Setup::new(&["a"]);
    let mut flood = UnixStream::connect(&s.socket).expect("connect");
    flood
        .set_write_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    // Metrics replies are large; never read them.
    let req = json!({"cmd": "metrics"}).to_string() + "\n";
    let mut sent = 0;
    while sent < 20_000 {
        if flood.write_all(req.as_bytes()).is_err() {
            break;
        }
        sent += 1;
    }
    let mut c = s.client();
    let t = std::time::Instant::now();
    c.ok(json!({"cmd": "status"}));
    c.ok(json!({"cmd": "tee", "disk": "a", "candidate": "parallax-v1", "policy": "mirror-only"}));
    c.ok(json!({"cmd": "untee", "disk": "a"}));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "a flooding client held others up for {:?}",
        t.elapsed()
    );
    // The flooder is disconnected once its writes time out (WRITE_TIMEOUT).
    let mut sink = Vec::new();
    flood
        .set_read_timeout(Some(control::WRITE_TIMEOUT * 3))
        .expect("timeout");
    std::thread::sleep(control::WRITE_TIMEOUT + Duration::from_secs(1));
    let _ = flood.read_to_end(&mut sink);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.daemon.connections.load(Ordering::SeqCst) > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the flooder was never dropped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The guest keeps writing and verifying on two queues while the disk gets a candidate, two
/// policy changes, a snapshot and loses the candidate again. Every request succeeds, every
/// read returns what was last written, and each change reports its pause.
#[test]
fn live_reconfiguration_under_guest_io_loses_nothing() {
    let mut s = Setup::new(&["vm"]);
    let live = s.daemon.disk("vm").expect("disk").clone();
    let server = TestServer::start(live.disk.clone(), 2);
    let driver = TestDriver::connect(server.socket(), 2, 32 << 20);
    let stop = AtomicBool::new(false);
    let rounds = AtomicU64::new(0);
    let mut pauses = Vec::new();
    std::thread::scope(|sc| {
        for q in 0..2usize {
            let (driver, stop, rounds) = (&driver, &stop, &rounds);
            sc.spawn(move || {
                const BLOCKS: u64 = 64;
                let base = q as u64 * BLOCKS * 8;
                let mut gen = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    gen += 1;
                    let data = |i: u64| pattern(gen * 1_000_003 + q as u64 * 10_007 + i, 4096);
                    let writes: Vec<_> = (0..BLOCKS)
                        .map(|i| Req::write(base + i * 8, &data(i)))
                        .collect();
                    for chunk in writes.chunks(16) {
                        for c in driver.submit_batch(q, chunk) {
                            c.assert_ok(0);
                        }
                    }
                    if gen % 3 == 0 {
                        driver.submit(q, &Req::flush()).assert_ok(0);
                    }
                    let reads: Vec<_> =
                        (0..BLOCKS).map(|i| Req::read(base + i * 8, 4096)).collect();
                    let mut i = 0;
                    for chunk in reads.chunks(16) {
                        for c in driver.submit_batch(q, chunk) {
                            c.assert_ok(4096);
                            assert!(c.data == data(i), "queue {q} round {gen}: block {i} wrong");
                            i += 1;
                        }
                    }
                    rounds.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        let mut c = s.client();
        let wait_rounds = |n: u64| {
            let target = rounds.load(Ordering::SeqCst) + n;
            while rounds.load(Ordering::SeqCst) < target {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        wait_rounds(2);
        for req in [
            json!({"cmd": "tee", "disk": "vm", "candidate": "parallax-v1",
                   "policy": "sync-cross-checks"}),
            json!({"cmd": "policy", "disk": "vm", "policy": "lazy-hashes"}),
            json!({"cmd": "snapshot", "disk": "vm", "name": "live"}),
            json!({"cmd": "policy", "disk": "vm", "policy": "async-new-primary"}),
            json!({"cmd": "untee", "disk": "vm"}),
        ] {
            let r = c.ok(req.clone());
            pauses.push((
                req["cmd"].clone(),
                r["pause"]["total_us"].as_u64().expect("pause"),
            ));
            wait_rounds(2);
        }
        stop.store(true, Ordering::SeqCst);
    });
    eprintln!("pauses under guest I/O (µs): {pauses:?}");
    assert_eq!(pauses.len(), 5);
    let st = s.daemon.disk("vm").expect("disk").status();
    assert_eq!(st.pauses.pauses, 5);
    assert!(st.candidate.is_none());
    let kinds: Vec<String> = s
        .daemon
        .events
        .recent(0)
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(
        !kinds.iter().any(|k| k == "mismatch" || k == "quarantined"),
        "the candidate never disagreed: {kinds:?}"
    );
    drop(driver);
    server.stop().expect("serve returns Ok");
    drop(s.control.take());
    s.daemon.close();
}

/// migrate, promote and deploy through the protocol, with their errors.
#[test]
fn migrate_promote_and_deploy() {
    let s = Setup::new(&["a", "b", "c", "d"]);
    let mut c = s.client();
    let a = s.daemon.disk("a").expect("disk").clone();
    let data: Vec<u8> = (0..1024u64 * 1024)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    a.disk
        .layout()
        .write(dovetail_layout::Sector(2048), &data)
        .expect("guest data before the upgrade");

    c.err(json!({"cmd": "migrate", "disk": "a"}), "conflict");
    c.err(json!({"cmd": "promote", "disk": "a"}), "conflict");
    c.ok(json!({"cmd": "tee", "disk": "a", "candidate": "parallax-v1", "policy": "sync-cross-checks"}));
    c.err(
        json!({"cmd": "migrate", "disk": "a", "mode": "teleport"}),
        "invalid",
    );
    c.err(
        json!({"cmd": "migrate", "disk": "a", "action": "pause"}),
        "conflict",
    );
    c.err(json!({"cmd": "promote", "disk": "a"}), "conflict");
    // copy-on-read: the guest reads 64 KiB (16 blocks); exactly those move.
    let r = c.ok(json!({"cmd": "migrate", "disk": "a", "mode": "copy-on-read", "rate": 0}));
    assert_eq!(r["migration"]["mode"], json!("copy-on-read"));
    assert_eq!(r["migration"]["blocks_present"], json!(0));
    let mut piece = vec![0u8; 64 << 10];
    a.disk
        .layout()
        .read(dovetail_layout::Sector(2048 + 128), &mut piece)
        .expect("guest read");
    assert!(piece == data[64 << 10..128 << 10]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m =
            c.ok(json!({"cmd": "migrate", "disk": "a", "action": "status"}))["migration"].clone();
        if m["blocks_present"] == json!(16) {
            assert_eq!(m["copy_out"]["state"], json!("running"), "{m}");
            assert_eq!(m["copy_out"]["copied_blocks"], json!(16), "{m}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "copy-on-read did not copy the read blocks: {m}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Switching to copy-out stops the copy-on-read job; the copy-out takes the rest.
    let r = c.ok(json!({"cmd": "migrate", "disk": "a", "rate": 0}));
    assert_eq!(r["migration"]["mode"], json!("copy-out"));
    let total = r["migration"]["blocks_total"].as_u64().expect("total");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m =
            c.ok(json!({"cmd": "migrate", "disk": "a", "action": "status"}))["migration"].clone();
        if m["copy_out"]["state"] == json!("done") {
            assert_eq!(m["blocks_present"].as_u64(), Some(total));
            assert_eq!(
                m["copy_out"]["copied_blocks"],
                json!(256 - 16),
                "1 MiB of data: 256 blocks, 16 of them moved by copy-on-read"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "copy-out did not finish: {m}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = s.store.disk("a").expect("disk");
    let r = c.ok(json!({"cmd": "promote", "disk": "a"}));
    assert!(r["pause"]["total_us"].is_u64());
    let after = s.store.disk("a").expect("disk");
    assert_eq!(
        Some(after.trusted),
        before.candidate,
        "the candidate is trusted now"
    );
    assert_eq!(after.candidate, None);
    assert!(
        s.store.versions().iter().all(|v| v.key != before.trusted),
        "old version retired"
    );
    let st = status(&mut c, "a");
    assert_eq!(st["trusted_version"], json!(after.trusted.0));
    assert_eq!(st["candidate"], Value::Null);
    let mut back = vec![0u8; data.len()];
    a.disk
        .layout()
        .read(dovetail_layout::Sector(2048), &mut back)
        .expect("read after promotion");
    assert!(back == data, "the promoted version holds the guest's data");
    // The promoted version keeps a reserve of extents granted ahead of need, as the version a
    // disk is opened with does: its one extent (1024 blocks) holds about 280 blocks (1 MiB of
    // data and the tree), less than an extent is free, so a second extent is granted though no
    // request needs it yet.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let granted = s
            .store
            .version(after.trusted)
            .expect("version")
            .extents
            .len();
        if granted >= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no extent granted ahead of need for the promoted version ({granted} granted)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c.err(json!({"cmd": "promote", "disk": "a"}), "conflict");

    // deploy: named disks, a reproducible sample, errors.
    c.err(
        json!({"cmd": "deploy", "layout": "parallax-v1", "policy": "mirror-only"}),
        "bad-request",
    );
    c.err(
        json!({"cmd": "deploy", "layout": "parallax-v1", "policy": "mirror-only", "sample": 0.0}),
        "invalid",
    );
    c.err(
        json!({"cmd": "deploy", "layout": "parallax-v1", "policy": "mirror-only", "disks": ["zz"]}),
        "unknown-disk",
    );
    let r = c.ok(
        json!({"cmd": "deploy", "layout": "parallax-v1", "policy": "mirror-only",
                        "disks": ["b"]}),
    );
    assert_eq!(r["deployed"][0]["disk"], json!("b"));
    let r = c.ok(
        json!({"cmd": "deploy", "layout": "parallax-v1", "policy": "lazy-hashes",
                        "disks": ["b"]}),
    );
    assert_eq!(r["skipped"][0]["code"], json!("conflict"), "{r}");
    // Eligible now: a, c, d (b has a candidate); 50 % of 3 is 2 disks.
    let r = c.ok(
        json!({"cmd": "deploy", "layout": "parallax-v1", "policy": "mirror-only",
                        "sample": 50.0, "seed": 7}),
    );
    let picked: Vec<String> = r["deployed"]
        .as_array()
        .expect("deployed")
        .iter()
        .filter_map(|d| d["disk"].as_str().map(str::to_string))
        .collect();
    assert_eq!(picked.len(), 2, "{r}");
    assert!(!picked.contains(&"b".to_string()));
    for name in &picked {
        assert!(s.store.disk(name).expect("disk").candidate.is_some());
    }
}

/// Writes (or reads) `blocks` 4 KiB blocks at block `first` of `disk` as one guest request.
fn io(disk: &LiveDisk, write: bool, first: u64, blocks: usize) {
    let at = dovetail_layout::Sector(first * 8);
    if write {
        let data = pattern(first, blocks * 4096);
        disk.disk.layout().write(at, &data).expect("guest write");
    } else {
        let mut buf = vec![0u8; blocks * 4096];
        disk.disk.layout().read(at, &mut buf).expect("guest read");
    }
}

fn first_blocks(regions: &Value) -> Vec<u64> {
    regions
        .as_array()
        .expect("regions")
        .iter()
        .map(|r| r["first_block"].as_u64().expect("first_block"))
        .collect()
}

fn sum(regions: &Value, field: &str) -> u64 {
    regions
        .as_array()
        .expect("regions")
        .iter()
        .map(|r| r[field].as_u64().expect("a count"))
        .sum()
}

/// `annotations` and `taint`: exact counts, top order, histogram sums, one block's record,
/// label ranges of exactly the blocks written while the label was on, snapshots, a parallax-v2
/// candidate of a parallax-v1 disk, and every error.
#[test]
fn annotations_and_taint_report_exactly_what_the_guest_did() {
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let s = Setup::with_layouts(&[("a", "parallax-v2"), ("b", "parallax-v1")]);
    let mut c = s.client();
    let a = s.daemon.disk("a").expect("disk").clone();
    let blocks = SIZE / 4096;

    // Nothing yet.
    let r = c.ok(json!({"cmd": "annotations", "disk": "a"}));
    assert_eq!(r["layout"], json!("parallax-v2"));
    assert_eq!(r["role"], json!("trusted"));
    assert_eq!(r["version"], json!(1));
    assert_eq!(r["blocks"], json!(blocks));
    assert_eq!(r["epoch_secs"], json!(600));
    let base = r["epoch_base"].as_u64().expect("epoch_base");
    assert!((t0.saturating_sub(5)..=t0 + 600).contains(&base), "{r}");
    assert_eq!(r["labels"], json!([]));
    assert_eq!(r["totals"]["reads"], json!(0));
    assert_eq!(r["totals"]["blocks"], json!(blocks));
    assert!(r.get("top").is_none() && r.get("histogram").is_none() && r.get("ranges").is_none());

    // Known guest I/O. A request is sequential when it starts where one of the last 8 ended;
    // otherwise its first block gets a random hit and the others sequential ones.
    io(&a, true, 100, 1); // block 100: random
    io(&a, true, 200, 4); // 200 random, 201..=203 sequential
    for _ in 0..3 {
        io(&a, false, 100, 1); // random each time
    }
    io(&a, false, 200, 4); // 200 random, 201..=203 sequential
    let r = c.ok(
        json!({"cmd": "annotations", "disk": "a", "top": 3, "histogram": 16,
                        "block": 100}),
    );
    let totals = &r["totals"];
    assert_eq!(totals["reads"], json!(7), "{r}");
    assert_eq!(totals["writes"], json!(5), "{r}");
    assert_eq!(totals["heat"], json!(12), "{r}");
    assert_eq!(totals["touched_blocks"], json!(5), "{r}");
    assert_eq!(totals["sequential_blocks"], json!(3), "{r}");
    assert_eq!(totals["random_blocks"], json!(2), "{r}");
    assert_eq!(totals["taint"], json!(0), "{r}");
    assert!(totals["last_read"].as_u64() >= Some(1), "{r}");
    assert!(totals["last_write"].as_u64() >= Some(1), "{r}");
    // Hottest first, ties by the lower block.
    assert_eq!(first_blocks(&r["top"]), [100, 200, 201], "{r}");
    assert_eq!(r["top"][0]["reads"], json!(3));
    assert_eq!(r["top"][0]["writes"], json!(1));
    assert_eq!(r["top"][0]["blocks"], json!(1));
    assert_eq!(r["region_blocks"], json!(1));
    // 16 buckets of 256 blocks; all the heat in the first.
    let h = &r["histogram"];
    assert_eq!(h.as_array().map(Vec::len), Some(16));
    assert_eq!(sum(h, "blocks"), blocks);
    assert_eq!(sum(h, "reads"), 7);
    assert_eq!(sum(h, "writes"), 5);
    assert_eq!(h[0]["heat"], json!(12));
    assert_eq!(h[1]["first_block"], json!(256));
    let b = &r["block"];
    assert_eq!(b["block"], json!(100));
    assert_eq!(b["annotation"]["reads"], json!(3));
    assert_eq!(b["annotation"]["writes"], json!(1));
    assert_eq!(b["annotation"]["pattern"], json!(0x04));
    assert_eq!(b["annotation"]["taint"], json!(0));
    assert_eq!(b["annotation"]["last_read"], totals["last_read"]);
    assert_eq!(b["class"], json!("random"));
    let r = c.ok(json!({"cmd": "annotations", "disk": "a", "block": 202}));
    assert_eq!(r["block"]["class"], json!("sequential"));
    assert_eq!(r["block"]["annotation"]["pattern"], json!(0x20));
    let r = c.ok(json!({"cmd": "annotations", "disk": "a", "block": 7}));
    assert_eq!(r["block"]["class"], json!("unknown"));
    assert_eq!(r["block"]["annotation"]["reads"], json!(0));
    // Regions of 64 blocks: 192..256 holds 8, 64..128 holds 4.
    let r = c.ok(json!({"cmd": "annotations", "disk": "a", "top": 10, "region_blocks": 64}));
    assert_eq!(first_blocks(&r["top"]), [192, 64], "{r}");
    assert_eq!(r["top"][0]["heat"], json!(8));
    assert_eq!(r["top"][0]["blocks"], json!(64));
    assert_eq!(r["top"][1]["heat"], json!(4));

    // A snapshot freezes the annotations as they are now.
    c.ok(json!({"cmd": "snapshot", "disk": "a", "name": "s1"}));

    // Taint: blocks written while "build" is on carry it; reads and later writes do not.
    let r = c.ok(json!({"cmd": "taint", "disk": "a", "label": "build", "on": true}));
    assert_eq!(r["versions"], json!(["trusted"]), "{r}");
    assert_eq!(
        r["labels"],
        json!([{"name": "build", "bit": 0, "active": true}])
    );
    assert!(
        r["message"].as_str().is_some_and(|m| m.contains("build")),
        "{r}"
    );
    io(&a, true, 300, 1);
    io(&a, true, 301, 1);
    io(&a, false, 100, 1);
    let r = c.ok(json!({"cmd": "taint", "disk": "a", "label": "build", "on": false}));
    assert_eq!(
        r["labels"],
        json!([{"name": "build", "bit": 0, "active": false}])
    );
    io(&a, true, 302, 1);
    io(&a, true, 4000, 1);
    c.ok(json!({"cmd": "taint", "disk": "a", "label": "scan", "on": true}));
    io(&a, true, 4001, 2);
    c.ok(json!({"cmd": "taint", "disk": "a", "label": "scan", "on": false}));
    // Turning a label off twice is harmless.
    c.ok(json!({"cmd": "taint", "disk": "a", "label": "scan", "on": false}));

    let r = c.ok(
        json!({"cmd": "annotations", "disk": "a", "label": "build", "block": 301,
                        "histogram": 4}),
    );
    assert_eq!(
        r["ranges"],
        json!([{"first_block": 300, "end_block": 302}]),
        "{r}"
    );
    assert_eq!(r["ranges_total"], json!(1));
    assert_eq!(r["label_blocks"], json!(2));
    assert_eq!(r["totals"]["reads"], json!(8), "{r}");
    assert_eq!(r["totals"]["writes"], json!(11), "{r}");
    assert_eq!(r["totals"]["taint"], json!(0b11));
    assert_eq!(
        r["labels"],
        json!([{"name": "build", "bit": 0, "active": false},
               {"name": "scan", "bit": 1, "active": false}])
    );
    assert_eq!(r["block"]["annotation"]["taint"], json!(1));
    assert_eq!(r["block"]["labels"], json!(["build"]));
    assert_eq!(r["block"]["class"], json!("sequential"), "301 follows 300");
    let h = &r["histogram"];
    assert_eq!(first_blocks(h), [0, 1024, 2048, 3072]);
    assert_eq!(
        h.as_array()
            .expect("histogram")
            .iter()
            .map(|b| b["heat"].as_u64().expect("heat"))
            .collect::<Vec<_>>(),
        [16, 0, 0, 3]
    );
    let r = c.ok(json!({"cmd": "annotations", "disk": "a", "label": "scan"}));
    assert_eq!(
        r["ranges"],
        json!([{"first_block": 4001, "end_block": 4003}]),
        "{r}"
    );
    // The snapshot's annotations are those from before the taint.
    let r = c.ok(json!({"cmd": "annotations", "disk": "a", "snapshot": "s1", "label": "build"}));
    assert_eq!(r["snapshot"], json!("s1"));
    assert_eq!(r["totals"]["reads"], json!(7), "{r}");
    assert_eq!(r["totals"]["writes"], json!(5), "{r}");
    assert_eq!(r["ranges"], json!([]), "{r}");

    // Errors.
    for (req, code) in [
        (json!({"cmd": "annotations", "disk": "zz"}), "unknown-disk"),
        (
            json!({"cmd": "taint", "disk": "zz", "label": "x", "on": true}),
            "unknown-disk",
        ),
        (json!({"cmd": "annotations", "disk": "b"}), "conflict"),
        (
            json!({"cmd": "taint", "disk": "b", "label": "x", "on": true}),
            "conflict",
        ),
        (
            json!({"cmd": "annotations", "disk": "a", "label": "nope"}),
            "invalid",
        ),
        (
            json!({"cmd": "annotations", "disk": "a", "top": 10_001}),
            "invalid",
        ),
        (
            json!({"cmd": "annotations", "disk": "a", "histogram": 0}),
            "invalid",
        ),
        (
            json!({"cmd": "annotations", "disk": "a", "histogram": 4097}),
            "invalid",
        ),
        (
            json!({"cmd": "annotations", "disk": "a", "top": 1, "region_blocks": 0}),
            "invalid",
        ),
        (
            json!({"cmd": "annotations", "disk": "a", "region_blocks": 4}),
            "invalid",
        ),
        (
            json!({"cmd": "annotations", "disk": "a", "block": blocks}),
            "invalid",
        ),
        (
            json!({"cmd": "annotations", "disk": "a", "version": "middle"}),
            "invalid",
        ),
        (
            json!({"cmd": "annotations", "disk": "a", "version": "candidate"}),
            "conflict",
        ),
        (
            json!({"cmd": "annotations", "disk": "a", "snapshot": "nope"}),
            "invalid",
        ),
        (
            json!({"cmd": "annotations", "disk": "a", "top": -1}),
            "bad-request",
        ),
        (
            json!({"cmd": "annotations", "disk": "a", "top": "3"}),
            "bad-request",
        ),
        (
            json!({"cmd": "annotations", "disk": "a", "block": 1.5}),
            "bad-request",
        ),
        (
            json!({"cmd": "annotations", "disk": "a", "bogus": 1}),
            "bad-request",
        ),
        (json!({"cmd": "annotations"}), "bad-request"),
        (
            json!({"cmd": "taint", "disk": "a", "label": "x"}),
            "bad-request",
        ),
        (
            json!({"cmd": "taint", "disk": "a", "label": "x", "on": "yes"}),
            "bad-request",
        ),
        (
            json!({"cmd": "taint", "disk": "a", "label": "x", "on": true, "extra": 0}),
            "bad-request",
        ),
        (
            json!({"cmd": "taint", "disk": "a", "label": "a b", "on": true}),
            "invalid",
        ),
        (
            json!({"cmd": "taint", "disk": "a", "label": "", "on": true}),
            "invalid",
        ),
    ] {
        c.err(req, code);
    }
    let e = c.err(json!({"cmd": "annotations", "disk": "b"}), "conflict");
    assert!(e.contains("parallax-v2"), "{e}");
    // No label was added by the failed requests.
    let r = c.ok(json!({"cmd": "annotations", "disk": "a"}));
    assert_eq!(r["labels"].as_array().map(Vec::len), Some(2));

    // A parallax-v2 candidate of a parallax-v1 disk: the default version, and taint applies
    // to it alone.
    c.ok(json!({"cmd": "tee", "disk": "b", "candidate": "parallax-v2", "policy": "mirror-only"}));
    let bd = s.daemon.disk("b").expect("disk").clone();
    let key = s
        .store
        .disk("b")
        .expect("disk")
        .candidate
        .expect("candidate");
    let r = c.ok(json!({"cmd": "taint", "disk": "b", "label": "t", "on": true}));
    assert_eq!(r["versions"], json!(["candidate"]));
    io(&bd, true, 5, 1);
    // mirror-only applies the candidate's writes in the background; FLUSH drains them.
    bd.disk.layout().flush().expect("flush");
    let r = c.ok(json!({"cmd": "annotations", "disk": "b", "label": "t"}));
    assert_eq!(r["role"], json!("candidate"));
    assert_eq!(r["version"], json!(key.0));
    assert_eq!(r["totals"]["writes"], json!(1), "{r}");
    assert_eq!(r["ranges"], json!([{"first_block": 5, "end_block": 6}]));
    let r = c.ok(json!({"cmd": "annotations", "disk": "b", "version": "candidate"}));
    assert_eq!(r["role"], json!("candidate"));
    let e = c.err(
        json!({"cmd": "annotations", "disk": "b", "version": "trusted"}),
        "conflict",
    );
    assert!(e.contains("parallax-v1"), "{e}");

    // The daemon's events record the taint changes.
    let kinds: Vec<String> = s
        .daemon
        .events
        .recent(0)
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| k.starts_with("taint-")).count(),
        6,
        "{kinds:?}"
    );
}

/// Waits (kicking the mover if asked) until `done` holds for the disk's `tiers` result.
fn wait_tiers(c: &mut Client, disk: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = c.ok(json!({"cmd": "tiers", "disk": disk}));
        if done(&r) {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{disk}: {what} never happened: {r}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The blocks in use of `class` in a `tiers` result's usage.
fn class_blocks(r: &Value, class: &str) -> u64 {
    r["usage"]
        .as_array()
        .expect("usage")
        .iter()
        .filter(|u| u["class"] == json!(class))
        .map(|u| u["blocks"].as_u64().expect("blocks"))
        .sum()
}

/// `tiers`: a parallax-v2 disk's defaults and usage; every setting changes what the next
/// `tiers` shows (and is an event); `move_now` runs a round of the mover, which follows the
/// new policy; `scrub` reports its repairs; bad input (copies 4, an unknown tier, compressed
/// hot data, an unknown class, a malformed request, a parallax-v1 disk) is refused with a clear
/// error and changes nothing.
#[test]
fn tiers_shows_and_changes_the_tiering_of_a_parallax_v2_disk() {
    let s = Setup::with_mover(
        &[("a", "parallax-v2"), ("b", "parallax-v1")],
        Some(Duration::from_secs(3600)),
    );
    let mut c = s.client();
    let a = s.daemon.disk("a").expect("disk").clone();
    io(&a, true, 0, 64);
    a.disk.layout().flush().expect("flush");

    // The defaults, the store's one tier, where the blocks are.
    let r = c.ok(json!({"cmd": "tiers", "disk": "a"}));
    assert_eq!(r["disk"], json!("a"));
    assert_eq!(r["layout"], json!("parallax-v2"));
    assert_eq!(r["version"], json!(1));
    let p = &r["policy"];
    assert_eq!(
        p["metadata"],
        json!({"copies": 2, "tier": "default", "compress": false}),
        "{r}"
    );
    assert_eq!(
        p["hot"],
        json!({"copies": 1, "tier": "default", "compress": false})
    );
    assert_eq!(
        p["cold"],
        json!({"copies": 1, "tier": "default", "compress": true})
    );
    assert_eq!(p["cold_after_secs"], json!(3600));
    assert_eq!(p["hot_accesses"], json!(2));
    assert_eq!(p["move_mib_s"], json!(32));
    let tiers = r["tiers"].as_array().expect("tiers");
    assert_eq!(tiers.len(), 1, "{r}");
    assert_eq!(tiers[0]["name"], json!("default"));
    assert_eq!(tiers[0]["extents"], json!(128));
    assert!(tiers[0]["free"].as_u64().expect("free") < 128, "{r}");
    let usage = r["usage"].as_array().expect("usage");
    assert!(
        usage
            .iter()
            .any(|u| u["class"] == json!("metadata") && u["copies"] == json!(2)),
        "metadata is kept twice: {r}"
    );
    assert!(class_blocks(&r, "metadata") > 0, "{r}");
    assert!(
        class_blocks(&r, "hot") >= 64,
        "the data written is hot: {r}"
    );
    assert_eq!(class_blocks(&r, "cold"), 0, "{r}");
    assert!(usage.iter().all(|u| u["compliant"] == json!(true)), "{r}");
    for k in ["repairs", "promoted", "demoted", "compressed_reads"] {
        assert_eq!(r[k], json!(0), "{k}: {r}");
    }
    assert_eq!(r["mover"]["state"], json!("running"), "{r}");
    assert_eq!(r["mover"]["interval_secs"], json!(3600.0));
    assert_eq!(r["changed"], json!([]));
    assert!(r.get("message").is_none(), "showing changes nothing: {r}");

    // Each setting, alone, shows in the next `tiers`.
    let show = |c: &mut Client| c.ok(json!({"cmd": "tiers", "disk": "a"}))["policy"].clone();
    let r = c.ok(json!({"cmd": "tiers", "disk": "a", "class": "cold", "copies": 2}));
    assert_eq!(r["changed"], json!(["cold copies 1 -> 2"]));
    assert!(
        r["message"]
            .as_str()
            .is_some_and(|m| m.contains("cold copies 1 -> 2")),
        "{r}"
    );
    assert_eq!(show(&mut c)["cold"]["copies"], json!(2));
    c.ok(json!({"cmd": "tiers", "disk": "a", "class": "cold", "compress": false}));
    assert_eq!(show(&mut c)["cold"]["compress"], json!(false));
    c.ok(json!({"cmd": "tiers", "disk": "a", "class": "cold", "compress": true}));
    assert_eq!(show(&mut c)["cold"]["compress"], json!(true));
    c.ok(json!({"cmd": "tiers", "disk": "a", "class": "metadata", "copies": 3}));
    assert_eq!(show(&mut c)["metadata"]["copies"], json!(3));
    c.ok(json!({"cmd": "tiers", "disk": "a", "class": "hot", "copies": 2}));
    assert_eq!(show(&mut c)["hot"]["copies"], json!(2));
    // The tier by name (the one tier there is: no change).
    let r = c.ok(json!({"cmd": "tiers", "disk": "a", "class": "hot", "tier": "default"}));
    assert_eq!(r["changed"], json!([]));
    let r = c.ok(json!({"cmd": "tiers", "disk": "a", "cold_after_secs": 60}));
    assert_eq!(r["changed"], json!(["cold_after_secs 3600 -> 60"]));
    assert_eq!(show(&mut c)["cold_after_secs"], json!(60));
    c.ok(json!({"cmd": "tiers", "disk": "a", "hot_accesses": 5}));
    assert_eq!(show(&mut c)["hot_accesses"], json!(5));
    c.ok(json!({"cmd": "tiers", "disk": "a", "move_mib_s": 7}));
    assert_eq!(show(&mut c)["move_mib_s"], json!(7));
    // "meta" names the metadata class too; several fields at once.
    let r = c.ok(
        json!({"cmd": "tiers", "disk": "a", "class": "meta", "copies": 2,
                        "hot_accesses": 2, "move_mib_s": 32}),
    );
    assert_eq!(
        r["changed"],
        json!([
            "metadata copies 3 -> 2",
            "hot_accesses 5 -> 2",
            "move_mib_s 7 -> 32"
        ])
    );
    let policy = show(&mut c);
    assert_eq!(policy["metadata"]["copies"], json!(2));
    assert_eq!(policy["hot"]["copies"], json!(2));
    assert_eq!(policy["cold"]["copies"], json!(2));

    // Bad input: a clear error, nothing changed.
    let bad: &[(Value, &str, &str)] = &[
        (
            json!({"class": "cold", "copies": 4}),
            "invalid",
            "cold: 4 copies; 1 to 3 are allowed",
        ),
        (json!({"class": "cold", "copies": 0}), "invalid", "1 to 3"),
        (json!({"class": "hot", "copies": 300}), "invalid", "1 to 3"),
        (
            json!({"class": "cold", "tier": "slow"}),
            "invalid",
            "no tier named \"slow\" (its tiers: default)",
        ),
        (
            json!({"class": "hot", "compress": true}),
            "invalid",
            "only cold data can be compressed",
        ),
        (
            json!({"class": "metadata", "compress": true}),
            "invalid",
            "only cold data can be compressed",
        ),
        (
            json!({"class": "warm", "copies": 1}),
            "invalid",
            "unknown block class \"warm\"",
        ),
        (
            json!({"cold_after_secs": 0}),
            "invalid",
            "cold_after_secs 0",
        ),
        (json!({"hot_accesses": 0}), "invalid", "hot_accesses 0"),
        (
            json!({"hot_accesses": 70000}),
            "invalid",
            "hot_accesses 70000",
        ),
        (json!({"move_mib_s": 0}), "invalid", "move_mib_s 0"),
        // One good part and one bad: neither is applied.
        (
            json!({"class": "cold", "copies": 1, "hot_accesses": 0}),
            "invalid",
            "hot_accesses 0",
        ),
        (json!({"copies": 1}), "bad-request", "\"class\" names it"),
        (json!({"class": "cold"}), "bad-request", "nothing to set"),
        (
            json!({"class": "cold", "copies": "two"}),
            "bad-request",
            "tiers:",
        ),
        (
            json!({"class": "cold", "copies": -1}),
            "bad-request",
            "tiers:",
        ),
        (json!({"speed": 9}), "bad-request", "unknown field"),
        (json!({"move_now": "yes"}), "bad-request", "tiers:"),
    ];
    let before = c.ok(json!({"cmd": "tiers", "disk": "a"}));
    for (args, code, says) in bad {
        let mut req = args.clone();
        req["cmd"] = json!("tiers");
        req["disk"] = json!("a");
        let e = c.err(req.clone(), code);
        assert!(e.contains(says), "{req}: {e:?} should say {says:?}");
    }
    let after = c.ok(json!({"cmd": "tiers", "disk": "a"}));
    assert_eq!(
        before["policy"], after["policy"],
        "bad input changed nothing"
    );
    let e = c.err(json!({"cmd": "tiers", "disk": "b"}), "conflict");
    assert_eq!(
        e,
        "disk b is parallax-v1, which has no block classes; upgrade it to parallax-v2"
    );
    c.err(
        json!({"cmd": "tiers", "disk": "b", "class": "cold", "copies": 2}),
        "conflict",
    );
    c.err(json!({"cmd": "tiers", "disk": "zz"}), "unknown-disk");
    c.err(json!({"cmd": "tiers"}), "bad-request");

    // move_now: a round runs, and puts every block where the new policy wants it (hot data
    // and metadata now twice, on two extents of the one tier).
    let rounds = after["mover"]["rounds"].as_u64().expect("rounds");
    let r = c.ok(json!({"cmd": "tiers", "disk": "a", "move_now": true}));
    assert!(
        r["message"]
            .as_str()
            .is_some_and(|m| m.contains("the mover runs a round now")),
        "{r}"
    );
    let r = wait_tiers(&mut c, "a", "a round of the mover", |r| {
        r["mover"]["rounds"].as_u64() > Some(rounds)
            && r["usage"].as_array().is_some_and(|u| {
                u.iter()
                    .filter(|u| u["blocks"].as_u64() > Some(0))
                    .all(|u| u["compliant"] == json!(true))
            })
    });
    assert!(r["placed"].as_u64() > Some(0), "{r}");
    assert!(class_blocks(&r, "hot") >= 64, "{r}");
    assert!(
        r["usage"]
            .as_array()
            .expect("usage")
            .iter()
            .filter(|u| u["blocks"].as_u64() > Some(0))
            .all(|u| u["copies"] == json!(2)),
        "{r}"
    );
    assert_eq!(r["mover"]["last_error"], Value::Null, "{r}");
    // The data reads back as written.
    let mut back = vec![0u8; 64 * 4096];
    a.disk
        .layout()
        .read(dovetail_layout::Sector(0), &mut back)
        .expect("read");
    assert!(back == pattern(0, 64 * 4096), "the data moved intact");

    // scrub: every copy is good.
    let r = c.ok(json!({"cmd": "tiers", "disk": "a", "scrub": true}));
    assert_eq!(r["scrub_repairs"], json!(0), "{r}");
    assert_eq!(r["repairs"], json!(0), "{r}");

    // The events: one per policy change, the mover's round that moved blocks, the scrub.
    let events = s.daemon.events.recent(0);
    let count = |kind: &str| events.iter().filter(|e| e.kind == kind).count();
    assert_eq!(count("tier-policy-changed"), 9, "{events:?}");
    assert!(count("tiers") >= 1, "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| e.kind == "tiers" && e.message.starts_with("mover round: ")),
        "{events:?}"
    );
    assert_eq!(count("tiers-failed"), 0, "{events:?}");
    assert_eq!(count("scrubbed"), 1, "{events:?}");

    // During a Tee, `tiers` is about the trusted version.
    c.ok(json!({"cmd": "tee", "disk": "a", "candidate": "parallax-v2", "policy": "mirror-only"}));
    let r = c.ok(json!({"cmd": "tiers", "disk": "a"}));
    assert_eq!(r["version"], json!(1));
    c.ok(json!({"cmd": "untee", "disk": "a"}));
}

/// The mover follows the trusted version: a parallax-v2 candidate promoted on a parallax-v1
/// disk gets one (until then `tiers` says how to get there); without `--mover-interval`, or
/// with 0, there is none and `move_now` says so.
#[test]
fn tiers_follow_promotion_and_a_disabled_mover() {
    let s = Setup::with_mover(&[("b", "parallax-v1")], Some(Duration::from_secs(1)));
    let mut c = s.client();
    let b = s.daemon.disk("b").expect("disk").clone();
    io(&b, true, 10, 32);
    c.ok(
        json!({"cmd": "tee", "disk": "b", "candidate": "parallax-v2",
                "policy": "sync-cross-checks"}),
    );
    let key = s
        .store
        .disk("b")
        .expect("disk")
        .candidate
        .expect("a candidate");
    let e = c.err(json!({"cmd": "tiers", "disk": "b"}), "conflict");
    assert!(
        e.contains("disk b is parallax-v1, which has no block classes; upgrade it to parallax-v2")
            && e.contains(&format!("its candidate {key} is parallax-v2")),
        "{e}"
    );
    c.ok(json!({"cmd": "migrate", "disk": "b", "rate": 0}));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m =
            c.ok(json!({"cmd": "migrate", "disk": "b", "action": "status"}))["migration"].clone();
        if m["copy_out"]["state"] == json!("done") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "copy-out: {m}");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.ok(json!({"cmd": "promote", "disk": "b"}));
    let r = c.ok(json!({"cmd": "tiers", "disk": "b"}));
    assert_eq!(r["version"], json!(key.0));
    assert_eq!(r["mover"]["state"], json!("running"), "{r}");
    assert_eq!(r["mover"]["interval_secs"], json!(1.0));
    // Its mover runs rounds over the new version (every second).
    let rounds = r["mover"]["rounds"].as_u64().expect("rounds");
    wait_tiers(&mut c, "b", "a round over the promoted version", |r| {
        r["mover"]["rounds"].as_u64() > Some(rounds)
    });
    let mut back = vec![0u8; 32 * 4096];
    b.disk
        .layout()
        .read(dovetail_layout::Sector(80), &mut back)
        .expect("read");
    assert!(back == pattern(10, 32 * 4096));

    // parallax-v2 to parallax-v2: the old version's mover stops before it is retired, the
    // new one's starts; neither fails.
    c.ok(
        json!({"cmd": "tee", "disk": "b", "candidate": "parallax-v2",
                "policy": "sync-cross-checks"}),
    );
    let key2 = s
        .store
        .disk("b")
        .expect("disk")
        .candidate
        .expect("a candidate");
    c.ok(json!({"cmd": "migrate", "disk": "b", "rate": 0}));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m =
            c.ok(json!({"cmd": "migrate", "disk": "b", "action": "status"}))["migration"].clone();
        if m["copy_out"]["state"] == json!("done") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "copy-out: {m}");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.ok(json!({"cmd": "promote", "disk": "b"}));
    assert!(
        s.store.versions().iter().all(|v| v.key != key),
        "the first parallax-v2 version is retired"
    );
    let r = c.ok(json!({"cmd": "tiers", "disk": "b"}));
    assert_eq!(r["version"], json!(key2.0));
    assert_eq!(r["mover"]["state"], json!("running"), "{r}");
    let rounds = r["mover"]["rounds"].as_u64().expect("rounds");
    let r = wait_tiers(
        &mut c,
        "b",
        "a round over the second promoted version",
        |r| r["mover"]["rounds"].as_u64() > Some(rounds),
    );
    assert_eq!(r["mover"]["last_error"], Value::Null, "{r}");
    assert!(
        s.daemon
            .events
            .recent(0)
            .iter()
            .all(|e| e.kind != "tiers-failed"),
        "{:?}",
        s.daemon.events.recent(0)
    );
    b.disk
        .layout()
        .read(dovetail_layout::Sector(80), &mut back)
        .expect("read");
    assert!(back == pattern(10, 32 * 4096));
    drop(c);
    s.daemon.close();

    // No mover.
    let s = Setup::with_layouts(&[("a", "parallax-v2")]);
    let mut c = s.client();
    let r = c.ok(json!({"cmd": "tiers", "disk": "a"}));
    assert_eq!(r["mover"]["state"], json!("off"), "{r}");
    assert_eq!(r["mover"]["interval_secs"], Value::Null);
    assert!(
        r["mover"]["reason"]
            .as_str()
            .is_some_and(|m| m.contains("--mover-interval 0")),
        "{r}"
    );
    let e = c.err(
        json!({"cmd": "tiers", "disk": "a", "move_now": true}),
        "conflict",
    );
    assert!(e.contains("tier mover is off"), "{e}");
    // The policy can still be set (the mover of a later daemon follows it).
    c.ok(json!({"cmd": "tiers", "disk": "a", "cold_after_secs": 5}));
}

/// `tiers` on a store of two tiers (made by `dovetail store create --tier`): tiers are named
/// in the policy and the usage, the defaults put metadata and hot data on the first tier and
/// cold data on the last, and moving a class to another tier by name moves its blocks there.
#[test]
fn tiers_are_named_on_a_two_tier_store() {
    let s = Setup::with_store(
        &[("a", "parallax-v2")],
        Some(Duration::from_secs(3600)),
        |dir| {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_dovetail"))
                .args(["store", "create"])
                .arg(dir.join("store"))
                .arg("--tier")
                .arg(format!("fast={}:128M", dir.join("fast.data").display()))
                .arg("--tier")
                .arg(format!("slow={}:256M", dir.join("slow.data").display()))
                .args(["--extent-size", "4M"])
                .env_remove("RUST_LOG")
                .output()
                .expect("run dovetail store create");
            assert!(out.status.success(), "store create: {out:?}");
            Store::open(&dir.join("store")).expect("open the store")
        },
    );
    let mut c = s.client();
    let a = s.daemon.disk("a").expect("disk").clone();
    io(&a, true, 0, 64);
    a.disk.layout().flush().expect("flush");
    let r = c.ok(json!({"cmd": "tiers", "disk": "a"}));
    assert_eq!(
        r["tiers"]
            .as_array()
            .expect("tiers")
            .iter()
            .map(|t| (t["name"].clone(), t["extents"].clone()))
            .collect::<Vec<_>>(),
        vec![(json!("fast"), json!(32)), (json!("slow"), json!(64))],
        "{r}"
    );
    let p = &r["policy"];
    assert_eq!(p["metadata"]["tier"], json!("fast"), "{r}");
    assert_eq!(p["hot"]["tier"], json!("fast"));
    assert_eq!(p["cold"]["tier"], json!("slow"));
    assert!(
        r["usage"]
            .as_array()
            .expect("usage")
            .iter()
            .filter(|u| u["blocks"].as_u64() > Some(0))
            .all(|u| u["tier"] == json!("fast")),
        "{r}"
    );
    // Hot data to the slow tier, by name; the mover moves it there.
    let r = c.ok(json!({"cmd": "tiers", "disk": "a", "class": "hot", "tier": "slow"}));
    assert_eq!(r["changed"], json!(["hot tier fast -> slow"]));
    assert_eq!(r["policy"]["hot"]["tier"], json!("slow"));
    let e = c.err(
        json!({"cmd": "tiers", "disk": "a", "class": "cold", "tier": "medium"}),
        "invalid",
    );
    assert!(e.contains("its tiers: fast, slow"), "{e}");
    let rounds = r["mover"]["rounds"].as_u64().expect("rounds");
    c.ok(json!({"cmd": "tiers", "disk": "a", "move_now": true}));
    let r = wait_tiers(&mut c, "a", "the hot data on the slow tier", |r| {
        r["mover"]["rounds"].as_u64() > Some(rounds)
            && r["usage"].as_array().is_some_and(|u| {
                u.iter()
                    .filter(|u| u["class"] == json!("hot") && u["blocks"].as_u64() > Some(0))
                    .all(|u| u["tier"] == json!("slow"))
            })
    });
    assert!(class_blocks(&r, "hot") >= 64, "{r}");
    let mut back = vec![0u8; 64 * 4096];
    a.disk
        .layout()
        .read(dovetail_layout::Sector(0), &mut back)
        .expect("read");
    assert!(back == pattern(0, 64 * 4096), "the data moved intact");
}

#[test]
fn every_name_follows_one_rule_and_a_key_twice_is_refused() {
    let s = Setup::with_layouts(&[("a", "parallax-v2")]);
    let mut c = s.client();
    let long = "n".repeat(5000);
    // Snapshot names: the same rule as disk names.
    for bad in ["../x", "a/b", "..", ".", "a b", "-x", "", long.as_str()] {
        let m = c.err(
            json!({"cmd": "snapshot", "disk": "a", "name": bad}),
            "invalid",
        );
        assert!(m.starts_with("snapshot name "), "{bad:?}: {m}");
        assert!(
            m.contains(
                "use 1 to 64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
            ),
            "{bad:?}: {m}"
        );
        assert!(m.len() < 300, "the message quotes a short prefix: {m}");
    }
    let m = c.err(
        json!({"cmd": "snapshot", "disk": "a", "name": long}),
        "invalid",
    );
    assert!(
        m.contains("… (5000 bytes)") && m.contains("longer than 64"),
        "{m}"
    );
    let m = c.err(
        json!({"cmd": "snapshot", "disk": "a", "name": "../x"}),
        "invalid",
    );
    assert!(m.contains("'/' is not allowed"), "{m}");
    c.ok(json!({"cmd": "snapshot", "disk": "a", "name": "before-upgrade.2026-12-06"}));
    // Taint labels: the same rule.
    for bad in ["a b", "../x", "-x", long.as_str()] {
        let m = c.err(
            json!({"cmd": "taint", "disk": "a", "label": bad, "on": true}),
            "invalid",
        );
        assert!(
            m.contains("taint label ") && m.contains("is invalid"),
            "{bad:?}: {m}"
        );
        assert!(m.len() < 300, "{m}");
    }
    c.ok(json!({"cmd": "taint", "disk": "a", "label": "cve-2026.1", "on": true}));
    // A long unknown disk or command is quoted by its prefix only.
    let m = c.err(json!({"cmd": "status", "disk": long}), "unknown-disk");
    assert!(m.len() < 300 && m.contains("(5000 bytes)"), "{m}");
    let m = c.err(json!({ "cmd": long }), "unknown-command");
    assert!(m.contains("(5000 bytes)") && m.len() < 1000, "{m}");

    // A key twice: an error, and neither command runs.
    for (line, key) in [
        (&b"{\"cmd\":\"status\",\"cmd\":\"hello\"}\n"[..], "cmd"),
        (
            &b"{\"cmd\":\"snapshot\",\"disk\":\"a\",\"name\":\"x1\",\"name\":\"x2\"}\n"[..],
            "name",
        ),
        (&b"{\"cmd\":\"status\",\"id\":1,\"id\":2}\n"[..], "id"),
    ] {
        c.send_raw(line);
        let r = c.line().expect("a reply");
        assert_eq!(r["ok"], json!(false), "{r}");
        assert_eq!(r["error"]["code"], json!("bad-request"), "{r}");
        let m = r["error"]["message"].as_str().expect("message");
        assert!(
            m.contains(&format!("the key \"{key}\" appears twice")),
            "{m}"
        );
    }
    let snaps: Vec<String> = s
        .daemon
        .disk("a")
        .expect("disk")
        .snapshots()
        .expect("snapshots")
        .iter()
        .map(|x| x.name.clone())
        .collect();
    assert_eq!(snaps, ["before-upgrade.2026-12-06"]);
}
