//! The daemon's sandbox (SECURITY.md, "Least privilege"): the seccomp filter of a queue worker
//! lets its I/O through and stops a forbidden call; Landlock leaves a thread only the
//! directories it was given; and the real `dovetail serve`, started as root with `--user`,
//! `--seccomp trap` and `--landlock`, runs as that user, serves a verified load, snapshots and
//! exports, and cannot create a socket outside its directories.

mod cli;
mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cli::{ok, path};
use dovetail_backend::sandbox::{self, Paths, SeccompMode};
use dovetail_bench::load::{self, Limit, Pattern, Workload};
use dovetail_bench::verify::VerifyState;
use dovetail_store::thread_kind::ThreadKind;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dovetail")
}

/// The environment variable that makes this test binary, started again by a test, act as the
/// child of that test (a filter that traps kills the whole process).
const CHILD: &str = "DOVETAIL_SANDBOX_CHILD";

/// Runs test `name` of this binary again in a child with `CHILD=case`; its output and status.
fn run_child(name: &str, case: &str, dir: &Path) -> std::process::Output {
    Command::new(std::env::current_exe().expect("current exe"))
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, case)
        .env("DOVETAIL_SANDBOX_DIR", dir)
        .stdin(Stdio::null())
        .output()
        .expect("run the test binary again")
}

/// In the child: what a queue worker does under its filter, each step printed, then a socket.
fn worker_child(mode: SeccompMode) {
    let dir = std::path::PathBuf::from(std::env::var_os("DOVETAIL_SANDBOX_DIR").expect("dir"));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(dir.join("data"))
        .expect("data file");
    sandbox::enable_seccomp(mode);
    let worker = std::thread::Builder::new()
        .name("sbx-worker".into())
        .spawn(move || {
            sandbox::enter(ThreadKind::Worker);
            use std::os::unix::fs::FileExt;
            file.write_all_at(b"sandboxed", 4096).expect("pwrite");
            file.sync_data().expect("fdatasync");
            let mut back = [0u8; 9];
            file.read_exact_at(&mut back, 4096).expect("pread");
            assert_eq!(&back, b"sandboxed");
            println!("step: file I/O ok");
            // The io_uring engine's ring, set up by the worker itself.
            match dovetail_layout::engine::Uring::new(8) {
                Ok(_) => println!("step: io_uring ok"),
                Err(e) => println!("step: io_uring unavailable ({e})"),
            }
            // The thread-pool fallback's threads, started by the worker itself.
            let t = std::thread::Builder::new()
                .name("sbx-io0".into())
                .spawn(|| {
                    dovetail_store::thread_kind::entered(ThreadKind::Engine);
                    7
                })
                .expect("spawn an I/O thread");
            assert_eq!(t.join().expect("join"), 7);
            println!("step: thread ok");
            let opened = fs::File::open(dir.join("data"));
            println!(
                "step: open {}",
                match &opened {
                    Ok(_) => "allowed".to_string(),
                    Err(e) => format!("refused errno {}", e.raw_os_error().unwrap_or(0)),
                }
            );
            // No executable mapping (W^X for the threads that parse guest memory).
            // SAFETY: an anonymous private mapping at an address the kernel picks; unmapped
            // below if it was made.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                let e = std::io::Error::last_os_error();
                println!(
                    "step: exec mapping refused errno {}",
                    e.raw_os_error().unwrap_or(0)
                );
            } else {
                println!("step: exec mapping made");
                // SAFETY: the mapping just made, of that length.
                unsafe { libc::munmap(p, 4096) };
            }
            let made = sandbox::forbidden_call_for_tests();
            println!("step: socket made {made:?}");
        })
        .expect("spawn");
    worker.join().expect("the worker ended");
}

#[test]
fn seccomp_lets_a_worker_do_io_and_traps_its_socket() {
    match std::env::var(CHILD).as_deref() {
        Ok("trap") => return worker_child(SeccompMode::Trap),
        Ok("log") => return worker_child(SeccompMode::Log),
        Ok(_) => return,
        Err(_) => {}
    }
    let t = tempfile::tempdir().expect("tempdir");
    let name = "seccomp_lets_a_worker_do_io_and_traps_its_socket";
    let out = run_child(name, "trap", t.path());
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let all = format!(
        "status {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{all}");
    for step in [
        "step: file I/O ok",
        "step: thread ok",
        &format!("step: open refused errno {}", libc::EACCES),
        &format!("step: exec mapping refused errno {}", libc::EACCES),
    ] {
        assert!(stdout.contains(step), "missing {step:?}: {all}");
    }
    assert!(
        stdout.contains("step: io_uring ok") || stdout.contains("step: io_uring unavailable"),
        "{all}"
    );
    assert!(!stdout.contains("step: socket made"), "{all}");
    assert!(
        stderr.contains(&format!(
            "dovetail: seccomp: thread sbx-worker made forbidden system call {}",
            libc::SYS_socket
        )),
        "{all}"
    );

    // `log` lets the same call through (the kernel logs it).
    let out = run_child(name, "log", t.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}: {stdout}", out.status);
    assert!(stdout.contains("step: socket made Ok(())"), "{stdout}");
}

#[test]
fn landlock_leaves_a_thread_only_its_directories() {
    let t = tempfile::tempdir().expect("tempdir");
    let (inside, outside) = (t.path().join("in"), t.path().join("out"));
    fs::create_dir(&inside).expect("mkdir");
    fs::create_dir(&outside).expect("mkdir");
    fs::write(outside.join("f"), b"x").expect("write");
    fs::write(t.path().join("config"), b"c").expect("write");
    let paths = Paths {
        rw: vec![inside.clone()],
        ro: vec![t.path().join("config")],
    };
    let config = t.path().join("config");
    // Landlock confines the calling thread and those it starts: a thread of its own.
    let seen = std::thread::spawn(move || {
        sandbox::landlock(&paths).expect("landlock");
        let errno = |r: std::io::Result<()>| r.err().and_then(|e| e.raw_os_error());
        (
            errno(fs::write(inside.join("new"), b"ok")),
            errno(fs::read(outside.join("f")).map(|_| ())),
            errno(fs::write(outside.join("new"), b"no")),
            errno(fs::read("/etc/passwd").map(|_| ())),
            errno(fs::read(&config).map(|_| ())),
            errno(fs::write(&config, b"w")),
        )
    })
    .join()
    .expect("join");
    let acces = Some(libc::EACCES);
    assert_eq!(seen, (None, acces, acces, acces, None, acces));
    assert_eq!(fs::read(t.path().join("in/new")).expect("read"), b"ok");
    assert!(!t.path().join("out/new").exists());
    // The other threads (this one) were not confined.
    fs::read("/etc/passwd").expect("this thread is not confined");
}

/// Waits for `child` to exit; kills it after `timeout`.
fn exit_status(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("the daemon did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ctl(control: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(["ctl", "--control", path(control)])
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run dovetail ctl")
}

/// A line of /proc/PID/status (`Uid:` ...) or of one of its threads'.
fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in {status}"))
        .trim()
        .to_string()
}

/// SAFETY-free chown through the standard library.
fn chown_tree(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).expect("chown");
    if p.is_dir() {
        for e in fs::read_dir(p).expect("read_dir") {
            chown_tree(&e.expect("entry").path(), uid, gid);
        }
    }
}

#[test]
fn the_daemon_runs_confined_as_the_user_asked() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED the_daemon_runs_confined_as_the_user_asked: needs root");
        return;
    }
    const NOBODY: u32 = 65534;
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    let (st, run, exp, other) = (
        dir.join("st"),
        dir.join("run"),
        dir.join("exp"),
        dir.join("other"),
    );
    for d in [&run, &exp, &other] {
        fs::create_dir(d).expect("mkdir");
    }
    cli::store_create(&st);
    ok(&[
        "disk",
        "create",
        path(&st),
        "vd",
        "--size",
        "16M",
        "--layout",
        "parallax-v2",
    ]);
    for d in [&st, &run, &exp, &other] {
        chown_tree(d, NOBODY, NOBODY);
    }
    let (sock, control, log) = (
        run.join("vd.sock"),
        run.join("ctl.sock"),
        dir.join("serve.log"),
    );
    // A free loopback port for the metrics endpoint (its thread has a filter of its own).
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    // The sandbox's options from a config file, read again (SIGHUP) under Landlock as nobody.
    let config = dir.join("dovetail.toml");
    let settings = "user = \"nobody\"\nsocket-group = \"daemon\"\nseccomp = \"trap\"\n\
                    landlock = true\n";
    fs::write(&config, format!("{settings}log-level = \"info\"\n")).expect("config");
    let mut child = Command::new(bin())
        .args(["serve", "--store", path(&st)])
        .args(["--disk", &format!("vd={}", path(&sock)), "--queues", "2"])
        .args(["--control", path(&control), "--export-dir", path(&exp)])
        .args(["--metrics", &metrics, "--config", path(&config)])
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn dovetail serve");
    let log_text = || fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(sock.exists() && control.exists()) {
        if let Some(s) = child.try_wait().expect("try_wait") {
            panic!("the daemon exited at start ({s}):\n{}", log_text());
        }
        assert!(Instant::now() < deadline, "no sockets:\n{}", log_text());
        std::thread::sleep(Duration::from_millis(5));
    }
    // Running as nobody (after start), with the sockets' group kept, no way back to root.
    let pid = child.id();
    let wait_for_drop = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let s = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        if status_field(&s, "Uid:").starts_with(&NOBODY.to_string()) {
            break s;
        }
        assert!(
            Instant::now() < wait_for_drop,
            "still root:\n{s}\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let ids = |f: &str| -> Vec<u32> {
        status_field(&status, f)
            .split_whitespace()
            .map(|n| n.parse().expect("id"))
            .collect()
    };
    assert_eq!(ids("Uid:"), vec![NOBODY; 4], "{status}");
    assert_eq!(ids("Gid:"), vec![NOBODY; 4], "{status}");
    assert_eq!(ids("Groups:"), vec![1, NOBODY], "{status}");
    assert_eq!(status_field(&status, "NoNewPrivs:"), "1", "{status}");
    // The guest's socket: the mode and group asked for (0660 with a group), not the umask's.
    let meta = fs::metadata(&sock).expect("socket");
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, 1));

    // A verified load with FLUSHes on two queues, under every filter.
    let mut w = Workload::new(Pattern::RandRw);
    w.read_percent = 30;
    w.iodepth = 4;
    w.queues = 2;
    w.limit = Limit::Time(Duration::from_millis(1500));
    w.verify = true;
    w.flush_every = 8;
    w.timeout = Duration::from_secs(10);
    let (driver, device) =
        load::connect(&sock, &w).unwrap_or_else(|e| panic!("connect: {e}\n{}", log_text()));
    let mut state: VerifyState = load::new_state(&w, &device).expect("state");
    let r = load::run(&driver, &device, &w, Some(&mut state))
        .unwrap_or_else(|e| panic!("load: {e}\n{}", log_text()));
    assert!(r.writes > 0 && r.flushes > 0, "{} writes", r.writes);
    assert_eq!(r.io_errors, 0, "{}", log_text());
    let mut pass = w.clone();
    pass.pattern = Pattern::Read;
    pass.limit = Limit::Passes(1);
    pass.flush_every = 0;
    let r = load::run(&driver, &device, &pass, Some(&mut state)).expect("read pass");
    let v = r.verify.expect("verify summary");
    assert!(v.corrupt.is_empty(), "{} blocks wrong", v.corrupt.len());
    assert!(v.checked > 0);
    // The metrics endpoint answers under its own filter, with the load's counters.
    let mut conn = std::net::TcpStream::connect(&metrics).expect("connect to the metrics");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(conn, "GET /metrics HTTP/1.0\r\nHost: {metrics}\r\n\r\n").expect("request");
    let mut reply = String::new();
    conn.read_to_string(&mut reply).expect("reply");
    assert!(
        reply.contains(" 200 ")
            && reply.contains("dovetail_requests_total{disk=\"vd\",op=\"write\"}"),
        "{reply}\n{}",
        log_text()
    );
    // Every thread of the daemon runs under a filter (the main thread takes the control
    // kind's before it starts any).
    let tasks: Vec<(String, String)> = fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .map(|e| {
            let s = fs::read_to_string(e.expect("task").path().join("status")).expect("status");
            (status_field(&s, "Name:"), status_field(&s, "Seccomp:"))
        })
        .collect();
    let unfiltered: Vec<_> = tasks.iter().filter(|(_, mode)| mode != "2").collect();
    assert!(unfiltered.is_empty(), "unfiltered threads: {unfiltered:?}");
    assert!(tasks.len() > 4, "{tasks:?}");

    // The control plane under its filter and Landlock: a snapshot, an export into the export
    // directory, a new disk attached beside the others; not a socket elsewhere.
    let c = |args: &[&str]| {
        let out = ctl(&control, args);
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (done, out) = c(&["snapshot", "vd", "--name", "s1"]);
    assert!(done, "{out}\n{}", log_text());
    let (done, out) = c(&["export", "vd", "--snapshot", "s1", "--to", "s1.img"]);
    assert!(done, "{out}\n{}", log_text());
    let exported = fs::metadata(exp.join("s1.img")).expect("exported");
    assert_eq!((exported.uid(), exported.len()), (NOBODY, 16 << 20));
    let (done, out) = c(&["disk-create", "vd2", "--size", "4M"]);
    assert!(done, "{out}\n{}", log_text());
    let outside = other.join("vd2.sock");
    let (done, out) = c(&["attach", "vd2", "--socket", path(&outside)]);
    assert!(!done, "attached outside the sandbox: {out}");
    assert!(!outside.exists(), "{out}");
    assert!(out.contains("ermission denied"), "{out}");
    let _ = c(&["detach", "vd2"]);
    let (done, out) = c(&["attach", "vd2", "--socket", path(&run.join("vd2.sock"))]);
    assert!(done, "{out}\n{}", log_text());
    assert!(run.join("vd2.sock").exists());
    // Attached by a control thread of a daemon that is no longer root: its serve loop runs at
    // the daemon's priority (the control threads below it only if RLIMIT_NICE lets a thread
    // come back up: raised while root when the daemon may, else no thread is lowered).
    let nice_of = |name: &str| -> Vec<i32> {
        fs::read_dir(format!("/proc/{pid}/task"))
            .expect("tasks")
            .filter_map(|t| fs::read_to_string(t.ok()?.path().join("stat")).ok())
            .filter(|st| st.contains(&format!("({name})")))
            .map(|st| {
                let rest: Vec<&str> = st[st.rfind(')').expect(")") + 2..]
                    .split_whitespace()
                    .collect();
                rest[16].parse().expect("nice")
            })
            .collect()
    };
    // SAFETY: getpriority about the calling thread has no preconditions.
    let base = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    assert_eq!(nice_of("disk-vd2"), vec![base], "{}", log_text());
    let lowered = log_text().contains("priority: control threads at nice");
    let control = if lowered { (base + 10).min(19) } else { base };
    assert_eq!(nice_of("control"), vec![control], "{}", log_text());
    assert!(
        lowered || log_text().contains("could not come back up"),
        "{}",
        log_text()
    );

    // SIGHUP: the config file is read again (its user and group looked up again) and applied.
    fs::write(&config, format!("{settings}log-level = \"debug\"\n")).expect("config");
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) }, 0);
    let reloaded = Instant::now() + Duration::from_secs(10);
    while !log_text().contains("1 change(s) applied") {
        assert!(Instant::now() < reloaded, "no reload:\n{}", log_text());
        std::thread::sleep(Duration::from_millis(20));
    }

    drop(driver);
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
    let s = exit_status(&mut child, Duration::from_secs(20));
    let text = log_text();
    assert!(s.success(), "{s}\n{text}");
    assert!(text.contains("running as user nobody (uid 65534"), "{text}");
    assert!(text.contains("Landlock (ABI"), "{text}");
    assert!(!text.contains("forbidden system call"), "{text}");
    let report = ok(&["store", "check", path(&st)]);
    assert!(report.contains("result: consistent"), "{report}");
}

/// With the crash points built in: the real daemon's queue worker makes a forbidden call
/// (`sandbox-forbidden-call`) and `--seccomp trap` stops the daemon, its log naming the call.
#[test]
fn a_forbidden_call_from_a_queue_worker_stops_the_daemon() {
    if !dovetail_store::failpoint::ENABLED {
        eprintln!(
            "SKIPPED a_forbidden_call_from_a_queue_worker_stops_the_daemon: needs --features \
             dovetail-backend/failpoints"
        );
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let (sock, img, log) = (
        t.path().join("d.sock"),
        t.path().join("d.img"),
        t.path().join("serve.log"),
    );
    let mut child = Command::new(bin())
        .args(["serve", "--image", path(&img), "--size", "16M"])
        .args(["--socket", path(&sock), "--seccomp", "trap"])
        .env("RUST_LOG", "info")
        .env("FAILPOINTS", "sandbox-forbidden-call=return")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The request never completes: the daemon dies under it.
    let sock2 = sock.clone();
    let guest = std::thread::spawn(move || {
        let d = common::TestDriver::connect(&sock2, 1, 4 << 20);
        let _ = d.submit(0, &common::Req::write(8, &common::pattern(1, 4096)));
    });
    let s = exit_status(&mut child, Duration::from_secs(20));
    let _ = guest.join();
    let mut text = String::new();
    fs::File::open(&log)
        .and_then(|mut f| f.read_to_string(&mut text))
        .expect("log");
    assert_eq!(s.signal(), Some(libc::SIGSYS), "{s}\n{text}");
    assert!(
        text.contains(&format!(
            "made forbidden system call {} (see `ausyscall`)",
            libc::SYS_socket
        )),
        "{text}"
    );
    let _ = std::io::stderr().flush();
}
