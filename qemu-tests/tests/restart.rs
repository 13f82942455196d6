//! Scenario 6: the daemon is restarted under a running guest connected with `reconnect=1`, first
//! after SIGKILL, then after SIGTERM.
//!
//! Case tested: the guest is idle during each restart. It writes with fio and flushes, prints
//! `DOVETAIL-WAIT: TOKEN` and blocks reading its console; only then does the harness stop the
//! daemon, start it again, wait for QEMU to reconnect and release the guest. No request is in
//! flight across the restart, so the queue rewind QEMU does on reconnect hands nothing to the new
//! daemon. A SIGKILL with requests in flight is not covered: without the inflight-tracking protocol
//! feature it is only safe if completions were in order (see README.md). After each restart the
//! guest must do new verified I/O and verify the data it flushed before the first one; the host
//! checks all of it in the image at the end.

use std::time::Duration;

use dovetail_qemu_tests::image::{self, MIB};
use dovetail_qemu_tests::{scenario, workloads, Daemon, Error, Guest, RunningGuest};

/// Restarts the daemon while the guest waits at `token`, then lets the guest go on.
fn restart_at(
    guest: &mut RunningGuest,
    daemon: &mut Daemon,
    token: &str,
    stop: impl FnOnce(&mut Daemon) -> dovetail_qemu_tests::Result<()>,
) -> dovetail_qemu_tests::Result<()> {
    guest.wait_for(token)?;
    let old_pid = daemon.pid();
    stop(daemon)?;
    // Let QEMU see the hang-up before the new daemon appears.
    std::thread::sleep(Duration::from_millis(500));
    daemon.restart()?;
    if daemon.pid() == old_pid {
        return Err(Error::Check("the daemon was not restarted".into()));
    }
    daemon.wait_for_client(Duration::from_secs(30))?;
    // QEMU sets the device up again right after connecting; give it a moment to finish.
    std::thread::sleep(Duration::from_secs(1));
    guest.resume(token)
}

#[test]
fn restart_under_idle_guest() {
    scenario("restart", |s| {
        let image = s.path("disk.img");
        let mut daemon = Daemon::under_test(&image).size("256M").spawn()?;
        let mut guest = Guest::new("restart")
            .disk(daemon.socket())
            .reconnect()
            .workload(workloads::RESTART)
            .start()?;
        restart_at(&mut guest, &mut daemon, "kill", Daemon::kill9)?;
        restart_at(&mut guest, &mut daemon, "term", Daemon::terminate)?;
        guest.finish()?.expect_ok(&[
            "write-before",
            "io-after-kill",
            "verify-after-kill",
            "io-after-term",
            "verify-after-term",
        ])?;
        daemon.terminate()?;
        image::check_fio_blocks(&image, 0, 32 * MIB, 64 * 1024)?;
        image::check_fio_blocks(&image, 64 * MIB, 16 * MIB, 4096)?;
        image::check_fio_blocks(&image, 96 * MIB, 16 * MIB, 4096)?;
        Ok(())
    });
}
