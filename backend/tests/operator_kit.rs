//! The operator's kit, through the real `dovetail` binary: shell completions and manual pages
//! generated from the command line's definitions, `dovetail ctl top` (as a script reads it and,
//! when tmux is there, in a terminal as a person watches it), the Grafana dashboard in
//! contrib/grafana/ against the metrics a running daemon serves, and the libvirt domain in
//! contrib/libvirt/ against libvirt's schema.

mod cli;
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cli::{dovetail, fails, ok, path, store_create};
use common::{Req, TestDriver};
use serde_json::Value;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The repository's root (this crate is backend/).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Whether `tool` is on PATH. Absent, a test that needs it fails in CI (scripts/test-deps.sh
/// installs it) and is skipped elsewhere, with a note.
fn have(tool: &str, package: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            !in_ci(),
            "{tool} is missing in CI: scripts/test-deps.sh installs {package}"
        );
        eprintln!("operator_kit: {tool} not found (apt-get install {package}); skipped");
    }
    found
}

#[test]
fn completions_name_every_subcommand_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let script = ok(&["completions", shell]);
        for word in [
            "serve",
            "store",
            "disk",
            "ctl",
            "migrate",
            "promote",
            "completions",
            "man",
            "top",
            "--control",
        ] {
            assert!(script.contains(word), "{shell}: no {word:?} in\n{script}");
        }
    }
    assert!(ok(&["completions", "bash"]).contains("complete -F _dovetail"));
    assert!(ok(&["completions", "zsh"]).starts_with("#compdef dovetail"));
    assert!(ok(&["completions", "fish"]).contains("complete -c dovetail"));
    let out = dovetail(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("invalid value 'tcsh'") && e.contains("bash"),
        "{e}"
    );
}

#[test]
fn the_man_page_documents_the_commands() {
    let page = ok(&["man"]);
    assert!(page.starts_with(".ie \\n(.g .ds Aq"), "not roff:\n{page}");
    assert!(page.contains(".TH dovetail 1"), "{page}");
    for word in [
        "serve",
        "store",
        "disk",
        "ctl",
        "completions",
        "vhost\\-user\\-blk",
    ] {
        assert!(page.contains(word), "no {word:?} in\n{page}");
    }
    // One page per command.
    let dir = tempfile::tempdir().expect("tempdir");
    ok(&["man", "--dir", path(dir.path())]);
    for page in [
        "dovetail.1",
        "dovetail-serve.1",
        "dovetail-store-create.1",
        "dovetail-ctl.1",
        "dovetail-ctl-top.1",
        "dovetail-completions.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH "), "{page}: {text}");
    }
    let top = std::fs::read_to_string(dir.path().join("dovetail-ctl-top.1")).expect("page");
    assert!(top.contains("\\-\\-iterations"), "{top}");
    let e = fails(&["man", "--dir", path(&dir.path().join("none"))]);
    assert!(e.contains("is not a directory"), "{e}");
}

/// A daemon serving disks `a` and `b` of a fresh store, with a control socket.
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    log: PathBuf,
}

impl Daemon {
    fn start(extra: &[&str], teed: bool) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = dir.path().join("st");
        store_create(&st);
        for d in ["a", "b"] {
            ok(&["disk", "create", path(&st), d, "--size", "32M"]);
        }
        if teed {
            ok(&[
                "disk",
                "tee",
                path(&st),
                "a",
                "--candidate",
                "parallax-v1",
                "--policy",
                "sync-read-checks",
            ]);
        }
        let log = dir.path().join("serve.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dovetail"));
        cmd.arg("serve")
            .arg("--store")
            .arg(&st)
            .arg("--disk")
            .arg(format!("a={}", dir.path().join("a.sock").display()))
            .arg("--disk")
            .arg(format!("b={}", dir.path().join("b.sock").display()))
            .arg("--control")
            .arg(dir.path().join("ctl.sock"))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"));
        let child = cmd.spawn().expect("spawn serve");
        let d = Daemon { child, dir, log };
        d.wait_until(|| d.ctl().exists() && d.socket("b").exists(), "the sockets");
        d
    }

    fn wait_until(&self, ready: impl Fn() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready() {
            assert!(
                Instant::now() < deadline,
                "{what} never appeared; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ctl(&self) -> PathBuf {
        self.dir.path().join("ctl.sock")
    }

    fn socket(&self, disk: &str) -> PathBuf {
        self.dir.path().join(format!("{disk}.sock"))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address `--metrics 127.0.0.1:0` got, from the log.
    fn metrics_addr(&self) -> String {
        self.wait_until(
            || self.log_text().contains("metrics on http://"),
            "the metrics address",
        );
        let log = self.log_text();
        let rest = &log[log.find("metrics on http://").expect("line") + 18..];
        rest[..rest.find('/').expect("path")].to_string()
    }

    fn stop(mut self) {
        // SAFETY: kill only sends a signal to the child process this test spawned.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "serve exits 0 on SIGTERM: {status}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes 4 KiB blocks with a flush every 8 to `socket` until `stop` is set; returns the number
/// of writes.
fn writer(socket: PathBuf, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> u64 {
    let driver = TestDriver::connect(&socket, 1, 4 << 20);
    let data = vec![0x5au8; 4096];
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        driver
            .submit(0, &Req::write((n % 4096) * 8, &data))
            .assert_ok(0);
        n += 1;
        if n % 8 == 0 {
            driver.submit(0, &Req::flush()).assert_ok(0);
        }
    }
    n
}

#[test]
fn ctl_top_shows_each_disks_rates_and_latency() {
    let d = Daemon::start(&[], false);
    let ctl = d.ctl();
    let ctl = path(&ctl);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (socket, stop) = (d.socket("a"), stop.clone());
        std::thread::spawn(move || writer(socket, stop))
    };
    // Wait until the guest is on, so every screen sees it writing.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok(&["ctl", "--control", ctl, "metrics"])
        .contains("dovetail_guest_connected{disk=\"a\"} 1")
    {
        assert!(Instant::now() < deadline, "the writer never connected");
        std::thread::sleep(Duration::from_millis(20));
    }

    // --json: one object per screen, per disk.
    let out = ok(&[
        "ctl",
        "--control",
        ctl,
        "--json",
        "top",
        "--iterations",
        "2",
        "--interval",
        "0.5",
    ]);
    let frames: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON screen"))
        .collect();
    assert_eq!(frames.len(), 2, "{out}");
    for f in &frames {
        let secs = f["interval_seconds"].as_f64().expect("interval");
        assert!((0.45..5.0).contains(&secs), "{f}");
        let disks = f["disks"].as_array().expect("disks");
        let names: Vec<&str> = disks.iter().filter_map(|d| d["disk"].as_str()).collect();
        assert_eq!(names, ["a", "b"], "{f}");
        let a = &disks[0];
        assert_eq!(a["guest_connected"], true, "{f}");
        let writes = a["write_iops"].as_f64().expect("write_iops");
        assert!(writes > 1.0, "the writer's writes show: {f}");
        assert!(a["flush_iops"].as_f64().expect("flush") > 0.0, "{f}");
        let mbs = a["write_bytes_per_sec"].as_f64().expect("bytes");
        // Every write is 4 KiB: the throughput is the write rate times 4096.
        assert!((mbs / writes - 4096.0).abs() < 1.0, "{f}");
        let p99 = a["p99_write_seconds"].as_f64().expect("p99 of the writes");
        assert!(p99 > 0.0 && p99 <= 1.0, "{f}");
        assert_eq!(a["read_iops"], 0.0, "{f}");
        assert!(a["p99_read_seconds"].is_null(), "{f}");
        let b = &disks[1];
        assert_eq!(b["iops"], 0.0, "an idle disk: {f}");
        assert_eq!(b["guest_connected"], false, "{f}");
    }

    // The table, as a pipe gets it: a title and one row per disk, screens one after the other.
    let out = ok(&[
        "ctl",
        "--control",
        ctl,
        "top",
        "--once",
        "--interval",
        "0.3",
        "a",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("dovetail top: "), "{out}");
    assert!(lines[0].contains("1 disk(s)"), "{out}");
    assert!(
        lines[1].starts_with("DISK")
            && lines[1].contains("IOPS")
            && lines[1].contains("WRITE MB/s")
            && lines[1].contains("P99 WRITE"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("a ") && lines[2].contains("yes"),
        "{out}"
    );
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        !out.contains('\x1b'),
        "no terminal codes in a pipe: {out:?}"
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = load.join().expect("writer");
    assert!(writes > 0);

    // Wrong input: a clear error, exit 1.
    let e = fails(&["ctl", "--control", ctl, "top", "--once", "nope"]);
    assert!(e.contains("serves no disk \"nope\""), "{e}");
    let e = fails(&["ctl", "--control", ctl, "top", "--interval", "0"]);
    assert!(e.contains("--interval 0: give 0.1 to 3600 seconds"), "{e}");
    let out = dovetail(&[
        "ctl",
        "--control",
        ctl,
        "top",
        "--once",
        "--iterations",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    d.stop();
}

/// `ctl top` in a real terminal: tmux runs it as a person would, the screen is read back
/// with `capture-pane`, and Ctrl-C ends it.
#[test]
fn ctl_top_redraws_in_a_terminal() {
    if !have("tmux", "tmux") {
        return;
    }
    let d = Daemon::start(&[], false);
    let session = format!("dovetail-top-{}", std::process::id());
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &session])
            .args(args)
            .output()
            .expect("run tmux")
    };
    let cmd = format!(
        "{} ctl --control {} top",
        env!("CARGO_BIN_EXE_dovetail"),
        d.ctl().display()
    );
    let out = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "160",
        "-y",
        "20",
        &cmd,
    ]);
    assert!(out.status.success(), "tmux new-session: {out:?}");
    struct Kill<'a>(&'a dyn Fn(&[&str]) -> std::process::Output);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            (self.0)(&["kill-server"]);
        }
    }
    // The pane stays (with its last screen) after top exits, so the test sees how it ended.
    let out = tmux(&["set-option", "-t", &session, "remain-on-exit", "on"]);
    assert!(out.status.success(), "tmux set-option: {out:?}");
    let _kill = Kill(&tmux);
    let screen = || String::from_utf8_lossy(&tmux(&["capture-pane", "-p"]).stdout).into_owned();

    // Three refreshes: the table stays at the top of the screen (redrawn, not scrolled).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut titles = Vec::new();
    while titles.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "top did not refresh 3 times; screen:\n{}",
            screen()
        );
        let s = screen();
        if let Some(first) = s.lines().next().filter(|l| l.starts_with("dovetail top: ")) {
            if titles.last() != Some(&first.to_string()) {
                titles.push(first.to_string());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let s = screen();
    let lines: Vec<&str> = s.lines().collect();
    assert!(lines[1].starts_with("DISK"), "{s}");
    assert!(
        lines[2].starts_with("a ") && lines[3].starts_with("b "),
        "{s}"
    );
    assert_eq!(
        s.matches("dovetail top: ").count(),
        1,
        "one screen at a time:\n{s}"
    );

    tmux(&["send-keys", "-t", &session, "C-c"]);
    let dead = || {
        String::from_utf8_lossy(
            &tmux(&["display-message", "-p", "-t", &session, "#{pane_dead}"]).stdout,
        )
        .trim()
            == "1"
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dead() {
        assert!(
            Instant::now() < deadline,
            "Ctrl-C did not end top:\n{}",
            screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // It ended at once, with its last screen left in place.
    let s = screen();
    assert!(s.contains("DISK") && s.contains("\na "), "{s}");
    d.stop();
}

/// `GET /metrics` on `addr`.
fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("reply");
    assert!(
        reply.starts_with("HTTP/1.") && reply.contains(" 200 "),
        "{reply}"
    );
    reply
}

/// Every `dovetail_*` name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("dovetail_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.push(name);
    }
    out
}

#[test]
fn the_grafana_dashboard_queries_only_what_the_daemon_serves() {
    let file = repo().join("contrib/grafana/dovetail.json");
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("dashboard")).expect("JSON");
    let mut exprs = Vec::new();
    let mut titles = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        titles.push(p["title"].as_str().unwrap_or_default().to_string());
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    for wanted in [
        "IOPS",
        "Throughput",
        "Request latency p99",
        "Tee mismatches",
        "Migration progress",
        "I/O pauses",
    ] {
        assert!(
            titles.iter().any(|t| t == wanted),
            "no panel {wanted:?}: {titles:?}"
        );
    }
    let mut names: Vec<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 20, "{names:?}");

    // A daemon with a teed disk (the Tee and migration families exist only then) that served
    // some I/O, scraped over HTTP as Prometheus does.
    let d = Daemon::start(&["--metrics", "127.0.0.1:0"], true);
    let addr = d.metrics_addr();
    {
        let driver = TestDriver::connect(&d.socket("a"), 1, 4 << 20);
        let data = vec![7u8; 8192];
        driver.submit(0, &Req::write(0, &data)).assert_ok(0);
        driver.submit(0, &Req::flush()).assert_ok(0);
        driver.submit(0, &Req::read(0, 8192)).assert_ok(8192);
    }
    let text = scrape(&addr);
    let served: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("dovetail_"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !served.contains(&n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the daemon does not serve: {missing:?}\n{text}"
    );
    // The disk variable's query names a served metric and label.
    let var = dash["templating"]["list"][1]["definition"]
        .as_str()
        .expect("disk variable");
    assert_eq!(var, "label_values(dovetail_requests_total, disk)");
    d.stop();
}

fn validate(xml: &Path) {
    let out = Command::new("virt-xml-validate")
        .arg(xml)
        .arg("domain")
        .output()
        .expect("run virt-xml-validate");
    assert!(
        out.status.success(),
        "virt-xml-validate {}: {}{}",
        xml.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_libvirt_domain_and_disk_element_are_valid() {
    if !have("virt-xml-validate", "libvirt-clients libxml2-utils") {
        return;
    }
    let contrib = repo().join("contrib/libvirt/dovetail-vm.xml");
    validate(&contrib);
    let text = std::fs::read_to_string(&contrib).expect("domain");
    for piece in [
        "<disk type='vhostuser' device='disk'>",
        "<source type='unix' path='/run/dovetail/vm1.sock'>",
        "<reconnect enabled='yes' timeout='1'/>",
        "<source type='memfd'/>",
        "<access mode='shared'/>",
    ] {
        assert!(text.contains(piece), "no {piece}");
    }

    // The element the daemon's code generates, in a domain of its own.
    use dovetail_backend::face::libvirt::{libvirt_disk_xml, MEMORY_BACKING_XML};
    let disk = libvirt_disk_xml("vm 2", Path::new("/run/dovetail/it's.sock"), "vdb", 4);
    let domain = format!(
        "<domain type='qemu'>\n<name>t</name>\n<memory unit='MiB'>256</memory>\n{MEMORY_BACKING_XML}\
         <os><type arch='x86_64'>hvm</type></os>\n<devices>\n{disk}</devices>\n</domain>\n"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("domain.xml");
    std::fs::write(&file, &domain).expect("write");
    validate(&file);

    // And what the schema refuses is caught: the validation is real.
    std::fs::write(
        &file,
        domain.replace("type='vhostuser'", "type='vhost-user'"),
    )
    .expect("write");
    let out = Command::new("virt-xml-validate")
        .arg(&file)
        .arg("domain")
        .output()
        .expect("run");
    assert!(!out.status.success(), "an invalid disk type must fail");
}
