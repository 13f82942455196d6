//! `dovetail ctl upgrade` twice while the guest's fio verify runs, with no `reconnect=1`: the
//! guest's vhost-user connection is handed from each daemon to the next (handover format 2),
//! so QEMU never sees a disconnect. The guest must see no error and no verify mismatch, in the
//! rounds across the upgrades and in a region written before them (the `live-verify`
//! workload). How long the guest's queues stood still at each handover (from the pause in the
//! old daemon to the resume in the new one, as the new one logs it) and how long each `ctl
//! upgrade` took (it includes starting the new binary, before the pause) are printed.

use std::time::{Duration, Instant};

use dovetail_qemu_tests::{dovetail_ctl, json_u64, say, scenario, workloads, Daemon, Error, Guest};

const UPGRADES: usize = 2;

#[test]
fn two_live_upgrades_under_fio_verify_keep_the_guest_connected() {
    scenario("upgrade-live", |s| {
        let image = s.path("disk.img");
        let control = s.path("ctl.sock");
        let control_arg = control.display().to_string();
        let daemon = Daemon::dovetail(&image)
            .size("256M")
            .queues(2)
            .arg("--control")
            .arg(&control_arg)
            .spawn()?;
        let first = daemon.pid().unwrap_or(0);
        let started = Instant::now();
        let mut guest = Guest::new("upgrade-live")
            .disk(daemon.socket())
            .queues(2)
            .env("RAND_MB", 8)
            .env("SEQ_MB", 16)
            .env("MIN_ROUNDS", 2)
            .workload(workloads::LIVE_VERIFY)
            .start()?;
        guest.wait_for("changes-done")?;
        let mut took = Vec::new();
        let mut pids = vec![u64::from(first)];
        for _ in 0..UPGRADES {
            std::thread::sleep(Duration::from_millis(1200));
            let t = Instant::now();
            let out = dovetail_ctl(&control, &["--json", "upgrade"])?;
            took.push(t.elapsed());
            // {"upgraded":true,"old_pid":N,"pid":M}
            let now =
                json_u64(&out, "pid").ok_or_else(|| Error::Check(format!("no pid in {out}")))?;
            if pids.contains(&now) {
                return Err(Error::Check(format!("still pid {now} after the upgrade")));
            }
            pids.push(now);
        }
        guest.resume("changes-done")?;
        let run = guest.finish()?;
        run.expect_ok(workloads::LIVE_VERIFY_STEPS)?;
        let log = std::fs::read_to_string(daemon.log_path())
            .map_err(|e| Error::Check(format!("reading the daemon's log: {e}")))?;
        let adopted = log
            .matches("its connection handed over, not reconnected")
            .count();
        // How long the guest's queues stood still at each handover, as the new daemons logged.
        let still: Vec<String> = log
            .lines()
            .filter_map(|l| {
                let at = l.find("its queues stood still ")? + "its queues stood still ".len();
                Some(l[at..].trim_end_matches(')').to_string())
            })
            .collect();
        let last = *pids.last().unwrap_or(&0) as libc::pid_t;
        // SAFETY: kill(2) of the daemon the last upgrade handed over to (the pid it reported).
        unsafe { libc::kill(last, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::path::Path::new(&format!("/proc/{last}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if adopted != UPGRADES {
            return Err(Error::Check(format!(
                "{adopted} connections adopted in the daemons' log, {UPGRADES} wanted"
            )));
        }
        say(&format!(
            "upgrade-live: {UPGRADES} live upgrades under fio verify (pids {pids:?}), the guest's \
             queues stood still {}, ctl upgrade took {}, {} verify rounds, 0 errors, no \
             reconnect; guest ran {:.1}s",
            still.join(", "),
            took.iter()
                .map(|d| format!("{:.0}ms", d.as_secs_f64() * 1000.0))
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
