//! A frontend must not be able to take the daemon down through the guest memory it shares: one
//! VM's QEMU shrinking its memory file under the daemon's mapping would make the daemon's next
//! access raise SIGBUS, which stops the whole process and every disk it serves. The daemon
//! refuses a memory table whose files are not sealed against shrinking (F_SEAL_SHRINK, as
//! QEMU's memory-backend-memfd seals by default) unless started with --allow-unsealed-memory;
//! a sealed file cannot be shrunk at all.
//!
//! Through the real binary: one daemon serves two disks of a store; a verify load runs on disk
//! `b` while an attacker on disk `a` connects with unsealed memory (refused, with a logged
//! reason), then with sealed memory and tries to shrink it (the kernel refuses), and uses it.
//! The load must not notice: no error, no corrupt read, the daemon alive.

mod cli;

use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cli::{ok, path};
use dovetail_bench::driver::{header, Buf, Driver, DriverOptions, Req, GUEST_BASE};
use dovetail_bench::load::{self, Limit, Pattern, Workload};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, extra: &[&str]) -> Daemon {
        let log = dir.join("serve.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dovetail"));
        // SAFETY: the closure runs in the forked child before exec and only calls prctl, which
        // is async-signal-safe: the daemon is killed if the test goes away first.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .arg("serve")
            .arg("--store")
            .arg(dir.join("st"))
            .arg("--disk")
            .arg(format!("a={}", path(&dir.join("a.sock"))))
            .arg("--disk")
            .arg(format!("b={}", path(&dir.join("b.sock"))))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn dovetail serve");
        let mut d = Daemon { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(dir.join("a.sock").exists() && dir.join("b.sock").exists()) {
            d.assert_alive("at start");
            assert!(Instant::now() < deadline, "the sockets never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_alive(&mut self, what: &str) {
        if let Some(st) = self.child.try_wait().expect("try_wait") {
            panic!("{what}: the daemon exited ({st}):\n{}", self.log());
        }
    }

    fn stop(mut self) -> String {
        // SAFETY: kill only sends a signal to the child process this test spawned.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait().expect("wait");
        assert!(
            st.success(),
            "serve exits 0 on SIGTERM: {st}\n{}",
            self.log()
        );
        self.log()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn store(dir: &Path) {
    let st = dir.join("st");
    ok(&[
        "store",
        "create",
        path(&st),
        "--size",
        "64M",
        "--extent-size",
        "1M",
    ]);
    ok(&["disk", "create", path(&st), "a", "--size", "16M"]);
    ok(&["disk", "create", path(&st), "b", "--size", "16M"]);
}

fn options(seal: bool) -> DriverOptions {
    DriverOptions {
        seal_memory: seal,
        ..DriverOptions::new(1, 4 << 20)
    }
}

/// The file behind the driver's guest memory.
fn memfd(driver: &Driver) -> std::fs::File {
    let region = driver
        .memory()
        .find_region(GuestAddress(GUEST_BASE))
        .expect("the guest memory region");
    let fo = region.file_offset().expect("a file-backed region");
    fo.file().try_clone().expect("dup")
}

/// A 4 KiB read into guest memory 2 MiB in: past the first 64 KiB, where a shrunk memory file
/// would end. The frontend itself does not touch the buffer.
fn read_past_64k() -> Vec<Buf> {
    vec![
        Buf::Out(header(VIRTIO_BLK_T_IN, 0)),
        Buf::Raw {
            addr: GUEST_BASE + (2 << 20),
            len: 4096,
            writable: true,
        },
        Buf::In(1),
    ]
}

#[test]
fn unsealed_or_shrunk_guest_memory_never_stops_the_other_disks() {
    let t = tempfile::tempdir().expect("tempdir");
    store(t.path());
    let mut daemon = Daemon::start(t.path(), &[]);

    // The victim: a verify load on disk b for the whole attack.
    let stop = Arc::new(AtomicBool::new(false));
    let mut w = Workload::new(Pattern::RandRw);
    w.read_percent = 50;
    w.block_size = 4096;
    w.iodepth = 4;
    w.queues = 1;
    w.limit = Limit::Time(Duration::from_secs(30));
    w.verify = true;
    w.seed = 7;
    w.timeout = Duration::from_secs(20);
    w.stop = Some(stop.clone());
    w.progress = Some(Arc::new(load::Progress::default()));
    let b = t.path().join("b.sock");
    let progress = w.progress.clone().expect("progress");
    let victim = std::thread::spawn(move || {
        let (driver, device) = load::connect(&b, &w).expect("connect to disk b");
        let mut state = load::new_state(&w, &device).expect("verify state");
        load::run(&driver, &device, &w, Some(&mut state)).expect("the verify load on disk b")
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while progress.writes.load(Ordering::Relaxed) < 50 {
        assert!(
            Instant::now() < deadline,
            "the load on disk b never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let a = t.path().join("a.sock");
    // 1. Unsealed memory: the memory table is refused and the connection dropped, so there is
    //    nothing to shrink under the daemon. The attacker shrinks it anyway and tries again.
    for round in 0..5 {
        let e = Driver::connect(&a, options(false)).expect_err("unsealed memory is refused");
        assert!(
            e.to_string().contains("SET_MEM_TABLE"),
            "round {round}: {e}"
        );
        daemon.assert_alive("after an unsealed memory table");
    }
    // 2. Sealed memory: accepted and served; shrinking it is refused by the kernel, so the
    //    daemon's mapping can never lose its pages.
    let attacker = Driver::connect(&a, options(true)).expect("sealed memory is accepted");
    let file = memfd(&attacker);
    let e = file
        .set_len(64 << 10)
        .expect_err("a sealed memfd cannot shrink");
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    // The same kick the attack makes: the memory is all still there.
    let c = attacker.submit(0, &read_past_64k()).expect("the read");
    assert_eq!(c.status, Some(0), "{c:?}");
    // SAFETY: F_GET_SEALS only reads the memfd's seals.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    assert_eq!(seals & libc::F_SEAL_SHRINK, libc::F_SEAL_SHRINK);
    for i in 0..20 {
        attacker
            .submit(0, &Req::read(i * 8, 4096))
            .expect("a read on disk a")
            .assert_ok(4096);
    }
    drop(attacker);
    daemon.assert_alive("after the attacks");

    // The load on disk b ran throughout and noticed nothing.
    let before = progress.reads.load(Ordering::Relaxed) + progress.writes.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let report = victim.join().expect("the load thread");
    assert!(
        report.ops() > before,
        "disk b kept serving: {} ops",
        report.ops()
    );
    assert_eq!(report.io_errors, 0, "disk b saw no error");
    let v = report.verify.expect("verify summary");
    assert!(v.checked > 0, "reads were checked");
    assert!(
        v.corrupt.is_empty(),
        "no wrong data on disk b: {:?}",
        v.corrupt
    );

    let log = daemon.stop();
    let refusals = log
        .lines()
        .filter(|l| {
            l.contains("refusing the guest's memory table: guest memory region 0")
                && l.contains("not sealed against shrinking (no F_SEAL_SHRINK)")
                && l.contains("--allow-unsealed-memory")
        })
        .count();
    assert_eq!(
        refusals, 5,
        "each refusal is logged with its reason:\n{log}"
    );
}

/// What the refusal prevents, shown where the operator accepted the risk: with
/// --allow-unsealed-memory, a frontend that shrinks its memory file and kicks a queue stops the
/// whole daemon (SIGBUS). The same attack is what the default refuses above.
#[test]
fn allow_unsealed_memory_accepts_it_and_the_attack_then_stops_the_daemon() {
    let t = tempfile::tempdir().expect("tempdir");
    store(t.path());
    let mut daemon = Daemon::start(t.path(), &["--allow-unsealed-memory"]);
    let driver = Driver::connect(
        &t.path().join("a.sock"),
        DriverOptions {
            timeout: Duration::from_secs(5),
            ..options(false)
        },
    )
    .expect("accepted with the flag");
    driver
        .submit(0, &Req::read(0, 4096))
        .expect("a read")
        .assert_ok(4096);
    assert!(
        daemon.log().contains(
            "accepted (--allow-unsealed-memory): a frontend that shrinks it stops the daemon"
        ),
        "{}",
        daemon.log()
    );
    // The attack: shrink the memory under the daemon's mapping (keeping the rings and the
    // request's header and status, which the frontend itself writes), then kick the queue with
    // a read into a buffer past the new end.
    memfd(&driver)
        .set_len(64 << 10)
        .expect("an unsealed memfd shrinks");
    let _ = driver.submit(0, &read_past_64k());
    let st = daemon.child.wait().expect("wait");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGBUS), "{st}");
}
