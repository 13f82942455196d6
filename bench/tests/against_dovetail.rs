//! The load generator against an in-process dovetail daemon on a temporary raw image: a short
//! mixed run completes cleanly, and verify mode finds exactly the block corrupted behind the
//! daemon's back.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dovetail_backend::{listen, serve, DeviceConfig, Disk, ListenOn, ServeError, Shutdown};
use dovetail_bench::load::{self, Limit, Pattern, Workload};
use dovetail_bench::verify::{SectorFault, VerifyState};
use dovetail_layout::raw::RawOptions;
use dovetail_layout::RawLayout;

const MIB: u64 = 1 << 20;
const BS: u32 = 4096;

/// `serve` on a fresh raw image in a temporary directory, in a background thread.
struct Daemon {
    dir: tempfile::TempDir,
    socket: PathBuf,
    shutdown: Arc<Shutdown>,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Daemon {
    fn start(size: u64, num_queues: usize) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("blk.sock");
        let layout = RawLayout::open(
            &dir.path().join("disk.img"),
            RawOptions {
                create_size: Some(size),
                read_only: false,
                cache: None,
            },
        )
        .expect("create raw image");
        let disk = Arc::new(Disk::new(Arc::new(layout), false, "bench-test").expect("serial"));
        let mut listener = listen(&ListenOn::Path(socket.clone())).expect("listen");
        let shutdown = Shutdown::new().expect("shutdown event");
        let stop = shutdown.clone();
        let thread = std::thread::spawn(move || {
            serve(disk, DeviceConfig { num_queues }, &mut listener, &stop)
        });
        Daemon {
            dir,
            socket,
            shutdown,
            thread: Some(thread),
        }
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("disk.img")
    }

    fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown.request();
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

fn workload(pattern: Pattern, limit: Limit) -> Workload {
    Workload {
        block_size: BS,
        iodepth: 8,
        queues: 2,
        limit,
        verify: true,
        ..Workload::new(pattern)
    }
}

#[test]
fn short_randrw_run_completes_without_errors() {
    let daemon = Daemon::start(32 * MIB, 2);
    let w = Workload {
        read_percent: 50,
        ..workload(Pattern::RandRw, Limit::Time(Duration::from_millis(500)))
    };
    let (driver, device) = load::connect(daemon.socket(), &w).expect("connect");
    assert_eq!(device.capacity, 32 * MIB);
    let mut state = load::new_state(&w, &device).expect("state");
    let report = load::run(&driver, &device, &w, Some(&mut state)).expect("run");

    assert!(report.reads > 0 && report.writes > 0, "{report:?}");
    assert!(report.iops() > 0.0);
    assert_eq!(report.io_errors, 0);
    assert_eq!(report.latency.len(), report.ops());
    let v = report.verify.as_ref().expect("verify summary");
    assert!(v.corrupt.is_empty(), "corrupt blocks: {:?}", v.corrupt);
    // Every acknowledged write is on record, and nothing is left in flight.
    let acked = state.blocks.iter().filter(|b| b.acked != 0).count() as u64;
    assert!(acked > 0 && acked <= report.writes);
    assert!(state.blocks.iter().all(|b| b.in_flight == 0));
    assert_eq!(state.next_seq, report.writes + 1);
}

#[test]
fn verify_pass_reports_exactly_the_corrupted_block() {
    let daemon = Daemon::start(16 * MIB, 2);
    let blocks = 16 * MIB / u64::from(BS);

    // Write every block once, then read every block back: all clean.
    let fill = workload(Pattern::Write, Limit::Passes(1));
    let (driver, device) = load::connect(daemon.socket(), &fill).expect("connect");
    let mut state = load::new_state(&fill, &device).expect("state");
    let r = load::run(&driver, &device, &fill, Some(&mut state)).expect("fill");
    assert_eq!((r.writes, r.io_errors), (blocks, 0));
    assert!(state
        .blocks
        .iter()
        .all(|b| b.acked != 0 && b.in_flight == 0));

    let check = workload(Pattern::Read, Limit::Passes(1));
    let r = load::run(&driver, &device, &check, Some(&mut state)).expect("clean pass");
    let v = r.verify.expect("verify summary");
    assert_eq!((r.reads, v.checked, v.unknown), (blocks, blocks, 0));
    assert!(
        v.corrupt.is_empty(),
        "clean image reported corrupt: {:?}",
        v.corrupt
    );

    // Damage 100 bytes inside the fourth sector of block 1234, behind the daemon's back.
    let victim = 1234u64;
    let sector_at = victim * u64::from(BS) + 3 * 512;
    let image = std::fs::OpenOptions::new()
        .write(true)
        .open(daemon.image())
        .expect("open image");
    image
        .write_all_at(&[0xee; 100], sector_at + 100)
        .expect("corrupt the image");

    // The state survives a save and load, as it would between two processes.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state");
    state.save(&path).expect("save state");
    let mut state = VerifyState::load_or_new(&path, BS, 0, blocks).expect("load state");

    let r = load::run(&driver, &device, &check, Some(&mut state)).expect("second pass");
    let v = r.verify.expect("verify summary");
    assert_eq!(v.checked, blocks);
    assert_eq!(v.corrupt.len(), 1, "corrupt blocks: {:?}", v.corrupt);
    let c = &v.corrupt[0];
    assert_eq!(c.block, victim);
    assert_eq!(c.offset, victim * u64::from(BS));
    assert_eq!(c.bad_sectors, 1);
    assert_eq!(c.first_bad_offset, sector_at);
    assert_eq!(c.fault, SectorFault::BadCrc);
}

/// `dovetail-bench` itself, as a user runs it.
fn bench_cli(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_dovetail-bench"))
        .args(args)
        .output()
        .expect("run dovetail-bench")
}

#[test]
fn verify_after_crash_works_at_the_default_iodepth_through_the_binary() {
    // `verify --after-crash` reads in 1 MiB pieces; the rings and data area of a connection are
    // sized from bs x iodepth (4 KiB x 1 by default), so a 1 MiB read used not to fit.
    let daemon = Daemon::start(8 * MIB, 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let socket = daemon.socket().as_os_str();
    let out = bench_cli(&[
        "run".as_ref(),
        "--socket".as_ref(),
        socket,
        "--pattern".as_ref(),
        "write".as_ref(),
        "--passes".as_ref(),
        "1".as_ref(),
        "--flush-every".as_ref(),
        "64".as_ref(),
        "--state".as_ref(),
        state.as_os_str(),
    ]);
    assert!(out.status.success(), "run: {out:?}");
    for iodepth in ["1", "4"] {
        let out = bench_cli(&[
            "verify".as_ref(),
            "--socket".as_ref(),
            socket,
            "--state".as_ref(),
            state.as_os_str(),
            "--after-crash".as_ref(),
            "--iodepth".as_ref(),
            iodepth.as_ref(),
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "verify --after-crash: {out:?}");
        let blocks = 8 * MIB / u64::from(BS);
        assert!(
            stdout.contains(&format!(
                "after the crash: {blocks} blocks checked, {blocks} with a stable write, 0 \
                 holding a later write, 0 lost"
            )),
            "{stdout}"
        );
    }

    // A damaged block is still found, and the command fails.
    let image = std::fs::OpenOptions::new()
        .write(true)
        .open(daemon.image())
        .expect("open image");
    image
        .write_all_at(&[0xee; 16], 77 * u64::from(BS) + 600)
        .expect("corrupt the image");
    let out = bench_cli(&[
        "verify".as_ref(),
        "--socket".as_ref(),
        socket,
        "--state".as_ref(),
        state.as_os_str(),
        "--after-crash".as_ref(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stdout.contains(", 1 lost"), "{stdout}");
}
