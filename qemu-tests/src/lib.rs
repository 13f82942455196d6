//! VM boot test harness: real QEMU (TCG), a real Debian guest kernel, disks served over
//! vhost-user-blk by the `dovetail` binary (or by `qemu-storage-daemon` as a control).
//!
//! A scenario is one `#[test]` in `tests/`:
//!
//! ```no_run
//! use dovetail_qemu_tests::{scenario, workloads, Daemon, Guest};
//!
//! #[test]
//! fn fio_verify() {
//!     scenario("fio-verify", |s| {
//!         let daemon = Daemon::dovetail(s.path("disk.img")).size("256M").spawn()?;
//!         let run = Guest::new("fio")
//!             .disk(daemon.socket())
//!             .workload(workloads::FIO_VERIFY)
//!             .boot()?;
//!         run.expect_ok(&["fio-rand-4k", "fio-seq-1m"])?;
//!         Ok(())
//!     });
//! }
//! ```
//!
//! The guest's `/init` (`guest/init`) loads the virtio and ext4 modules, runs the workload with the
//! helpers of `guest/dovetail.sh` and powers off; the workload prints `DOVETAIL-RESULT: ok NAME` or
//! `DOVETAIL-RESULT: fail NAME REASON` lines, which [`GuestRun::expect_ok`] checks. Each scenario
//! gets its own directory under `<target>/qemu-tests-runs/`, removed when it passes and kept (with
//! its console, QEMU and daemon logs) when it fails.

use std::io::Write;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

mod daemon;
mod error;
mod guest;
pub mod host;
pub mod image;
pub mod initramfs;
pub mod kernel;
mod vmlinux;

pub use daemon::{
    create_store, dovetail_binary, dovetail_cli, dovetail_ctl, json_u64, parse_size, Daemon,
    DaemonBuilder, DaemonKind,
};
pub use error::{Error, Result};
pub use guest::{Guest, GuestExit, GuestResult, GuestRun, RunningGuest};

/// Guest workloads shared by scenarios (`guest/workloads/*.sh`).
pub mod workloads {
    /// fio verify (crc32c): random 4 KiB and sequential 1 MiB writes at iodepth 16, read back and
    /// checked. Env: `JOBS` (parallel jobs, default 1), `RAND_MB`, `SEQ_MB`, `EXPECT_QUEUES`.
    pub const FIO_VERIFY: &str = include_str!("../guest/workloads/fio-verify.sh");
    /// mkfs.ext4, files, sync, sha256, remount, verify, e2fsck.
    pub const EXT4: &str = include_str!("../guest/workloads/ext4.sh");
    /// The result lines [`EXT4`] prints when every step passes.
    pub const EXT4_STEPS: &[&str] = &[
        "mkfs",
        "mount",
        "write-files",
        "sync",
        "checksum",
        "umount",
        "remount",
        "verify",
        "fsck",
    ];
    /// Runs from a root filesystem on /dev/vda and writes /probe.txt.
    pub const ROOT_DISK: &str = include_str!("../guest/workloads/root-disk.sh");
    /// Discard and write-zeroes, read back as zeroes.
    pub const DISCARD: &str = include_str!("../guest/workloads/discard.sh");
    /// Reads of a read-only disk; writes and discards must fail.
    pub const READ_ONLY: &str = include_str!("../guest/workloads/read-only.sh");
    /// Writes and flushes, waits while the host restarts the daemon, then verifies and writes more.
    pub const RESTART: &str = include_str!("../guest/workloads/restart.sh");
    /// First VM: ext4 with files and their checksums. Second VM: verifies them.
    pub const HANDOVER: &str = include_str!("../guest/workloads/handover.sh");
    /// fio verify rounds in a background loop while the host reconfigures the disk live; waits in
    /// `wait_host changes-done`. Env: `JOBS`, `RAND_MB` (16), `SEQ_MB` (32), `MIN_ROUNDS` (3),
    /// `FIO_EXTRA` (more fio options for the rounds).
    pub const LIVE_VERIFY: &str = include_str!("../guest/workloads/live-verify.sh");
    /// fio randrw 4 KiB QD16 for `RUNTIME` s per phase of `PHASES`, each phase waiting for the
    /// host (`wait_host PHASE`) while fio runs; reports each phase's slowest request, longest
    /// completion gap and p99 as `info PHASE ...` (`upgrade_bench.rs`).
    pub const UPGRADE_BENCH: &str = include_str!("../guest/workloads/upgrade-bench.sh");
    /// A VM live-migrated between two daemons: writes, `wait_host migrate`, then verifies on the
    /// destination and writes more (`live_migration.rs`).
    pub const LIVE_MIGRATION: &str = include_str!("../guest/workloads/live-migration.sh");
    /// fio verify rounds while the host grows the disk (`wait_host resized`); then the new
    /// size is checked and written past the old end. Env: `RAND_MB` (8), `PAST_MB` (16).
    pub const RESIZE: &str = include_str!("../guest/workloads/resize.sh");
    /// The result lines [`RESIZE`] prints when every step passes.
    pub const RESIZE_STEPS: &[&str] =
        &["new-size", "verify-rounds", "past-old-end", "new-last-mib"];
    /// The result lines [`LIVE_VERIFY`] prints when every step passes.
    pub const LIVE_VERIFY_STEPS: &[&str] = &["write-ref", "verify-rounds", "verify-ref"];
    /// ext4 with checksummed files, frozen for the host's live snapshot (`wait_host
    /// snapshot-taken`), then changed while the host exports it (`wait_host exported`).
    pub const EXT4_SNAPSHOT: &str = include_str!("../guest/workloads/ext4-snapshot.sh");
    /// The result lines [`EXT4_SNAPSHOT`] prints when every step passes.
    pub const EXT4_SNAPSHOT_STEPS: &[&str] = &[
        "mkfs",
        "mount",
        "write-files",
        "sync",
        "checksum",
        "freeze",
        "thaw",
        "write-after",
        "churn",
        "verify-live",
        "umount",
        "fsck",
    ];
    /// ext4 and fio verify on a voting Tee's disk, then two whole-disk reads with `wait_host
    /// first-pass` between them (the host reads the members' counters there).
    pub const EXT4_VOTE: &str = include_str!("../guest/workloads/ext4-vote.sh");
    /// The result lines [`EXT4_VOTE`] prints when every step passes.
    pub const EXT4_VOTE_STEPS: &[&str] = &[
        "mkfs",
        "mount",
        "fio-verify",
        "write-files",
        "sync",
        "checksum",
        "remount",
        "verify",
        "read-disk",
        "reread-disk",
        "remount-again",
        "verify-again",
        "fsck",
    ];
}

/// Writes a line straight to the process's stderr, past the test harness's output capture, so
/// timings and skip notices show in a plain `cargo test` run.
pub fn say(text: &str) {
    // Best effort: a closed stderr must not fail a test.
    let _ = writeln!(std::io::stderr().lock(), "qemu-tests: {text}");
}

/// A running scenario: its private directory and name.
#[derive(Debug)]
pub struct Scenario {
    name: String,
    dir: PathBuf,
}

impl Scenario {
    /// The scenario's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The scenario's private directory (images, sockets, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `file` inside the scenario's directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

/// Why a scenario cannot run on this machine, if it cannot.
fn preflight() -> Result<()> {
    host::check_host_tools()
}

/// Runs one VM scenario: skips it if `DOVETAIL_SKIP_VM_TESTS` is set, fails if the machine lacks
/// QEMU or the guest tools (in CI and elsewhere: never a silent skip), gives `body` a fresh
/// directory, and panics with the error and the paths of the kept logs if `body` fails.
pub fn scenario(name: &str, body: impl FnOnce(&Scenario) -> Result<()>) {
    if host::skip_requested() {
        say(&format!(
            "skipped VM scenario `{name}` ({} is set)",
            host::ENV_SKIP
        ));
        return;
    }
    if let Err(e) = preflight() {
        let why = if host::in_ci() {
            "CI=true: the VM tests must run in CI"
        } else {
            "set DOVETAIL_SKIP_VM_TESTS=1 to skip the VM tests on this machine"
        };
        panic!("VM scenario `{name}` cannot run: {e:?}\n({why})");
    }
    let runs = host::runs_dir();
    if let Err(e) = std::fs::create_dir_all(&runs) {
        panic!("cannot create {}: {e}", runs.display());
    }
    let dir = match tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir_in(&runs)
    {
        Ok(d) => d.keep(),
        Err(e) => panic!(
            "cannot create a scenario directory in {}: {e}",
            runs.display()
        ),
    };
    let s = Scenario {
        name: name.to_string(),
        dir: dir.clone(),
    };
    guest::SCENARIO_DIR.with(|d| *d.borrow_mut() = Some(dir.clone()));
    let started = Instant::now();
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| body(&s)));
    guest::SCENARIO_DIR.with(|d| *d.borrow_mut() = None);
    let secs = started.elapsed().as_secs_f64();
    match outcome {
        Ok(Ok(())) => {
            say(&format!("scenario `{name}` passed in {secs:.1}s"));
            if host::keep_runs() {
                say(&format!("kept {}", dir.display()));
            } else if let Err(e) = std::fs::remove_dir_all(&dir) {
                say(&format!("could not remove {}: {e}", dir.display()));
            }
        }
        Ok(Err(e)) => {
            let logs = describe_logs(&dir);
            say(&format!(
                "scenario `{name}` FAILED after {secs:.1}s; logs kept in {}",
                dir.display()
            ));
            panic!("scenario `{name}` failed: {e:?}\n\n{logs}");
        }
        Err(p) => {
            say(&format!(
                "scenario `{name}` FAILED after {secs:.1}s; logs kept in {}\n{}",
                dir.display(),
                describe_logs(&dir)
            ));
            panic::resume_unwind(p);
        }
    }
}

/// Lists the kept logs of a failed scenario, with the tail of each daemon log.
fn describe_logs(dir: &Path) -> String {
    let mut out = format!("kept scenario directory: {}\n", dir.display());
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect()
        })
        .unwrap_or_default();
    logs.sort();
    for log in &logs {
        out.push_str(&format!("  {}\n", log.display()));
    }
    for log in logs
        .iter()
        .filter(|p| p.to_string_lossy().ends_with(".daemon.log"))
    {
        out.push_str(&format!(
            "--- {} (last lines) ---\n{}\n",
            log.display(),
            host::tail_of_file(log, 25)
        ));
    }
    out
}
