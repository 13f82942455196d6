//! The daemon SIGKILLed while the guest's fio verify is running, with QEMU's `reconnect=1` and
//! QEMU's inflight region (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): QEMU takes the region from the
//! first daemon and hands it to each restarted one, which runs the requests the dead one had in
//! flight before anything new. The guest must see no error and no verify mismatch, in the rounds
//! across the kills and in a region written before them (the `live-verify` workload, with a
//! FLUSH every 4 writes). How many requests were in flight at the kills is printed: a TCG guest
//! submits slowly and the daemon completes most requests in well under a millisecond, so some
//! kills find none (the in-process test `backend/tests/inflight_restart.rs` makes sure).

use std::time::{Duration, Instant};

use dovetail_qemu_tests::{say, scenario, workloads, Daemon, Error, Guest};

const KILLS: usize = 3;

#[test]
fn sigkill_under_fio_verify_loses_no_request() {
    scenario("restart-busy", |s| {
        let image = s.path("disk.img");
        let mut daemon = Daemon::under_test(&image).size("256M").queues(2).spawn()?;
        let started = Instant::now();
        let mut guest = Guest::new("restart-busy")
            .disk(daemon.socket())
            .queues(2)
            .reconnect()
            .env("RAND_MB", 8)
            .env("SEQ_MB", 16)
            .env("MIN_ROUNDS", 2)
            // A FLUSH after every 4 writes: each spends the image's fdatasync in the daemon, so
            // a kill is likely to find one (and the writes behind it) in flight.
            .env("FIO_EXTRA", "--fsync=4")
            .workload(workloads::LIVE_VERIFY)
            .start()?;
        // The verify loop runs in the background once the guest waits for the host.
        guest.wait_for("changes-done")?;
        let mut outage = Vec::new();
        for _ in 0..KILLS {
            std::thread::sleep(Duration::from_millis(1200));
            let killed = Instant::now();
            daemon.kill9()?;
            daemon.restart()?;
            daemon.wait_for_client(Duration::from_secs(30))?;
            outage.push(killed.elapsed());
        }
        guest.resume("changes-done")?;
        let run = guest.finish()?;
        run.expect_ok(workloads::LIVE_VERIFY_STEPS)?;
        daemon.terminate()?;
        let log = std::fs::read_to_string(daemon.log_path())
            .map_err(|e| Error::Check(format!("reading the daemon's log: {e}")))?;
        let resubmitted: usize = log
            .lines()
            .filter_map(|l| {
                let at = l.find(" request(s) in flight resubmitted")?;
                l[..at].rsplit(' ').next()?.parse::<usize>().ok()
            })
            .sum();
        say(&format!(
            "restart-busy: {KILLS} SIGKILLs under fio verify, {resubmitted} requests in flight \
             run again, reconnected after {}, {} verify rounds, 0 errors; guest ran {:.1}s",
            outage
                .iter()
                .map(|d| format!("{:.1}s", d.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", "),
            run.result("verify-rounds")
                .map(|r| r.detail.as_str())
                .unwrap_or("?"),
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    });
}
