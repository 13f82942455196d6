//! `dovetail ctl upgrade` 5 times in a row while the guest's fio verify runs: the guest's
//! vhost-user connection is handed from each daemon to the next (handover format 2), so QEMU
//! never sees a disconnect (each new daemon logs the connection as handed over, not
//! reconnected). Then, in the same VM and the same fio verify, the daemon is SIGKILLed and
//! restarted 5 times in a row: QEMU (`reconnect=1`) reconnects and hands its inflight region to
//! each restarted daemon, which runs the requests the dead one had in flight first. The guest
//! must see no error and no verify mismatch, in the rounds across the upgrades and kills and in
//! a region written before them (the `live-verify` workload). An ext4 file system on the same
//! disk is filled before the upgrades and rewritten (each file fsynced, its sha256 noted)
//! throughout them and the kills; every file's sum is checked after them from the disk, and
//! `e2fsck -fn` finds it clean. After the last upgrade and before the kills the disk is grown
//! (`ctl resize`): the new daemon tells QEMU on the backend request channel it adopted, and the
//! guest sees the new size without a rescan. How long the guest's queues stood
//! still at each handover (from the pause in the old daemon to the resume in the new one, as the
//! new one logs it), how long each `ctl upgrade` took (it includes starting the new binary,
//! before the pause) and how long each kill left the guest without a daemon are printed.

use std::time::{Duration, Instant};

use dovetail_qemu_tests::{dovetail_ctl, json_u64, say, scenario, workloads, Daemon, Error, Guest};

const UPGRADES: usize = 5;

/// SIGKILLs and restarts after the upgrades.
const KILLS: usize = 5;

/// The ext4 file system's size in MiB (at 224 MiB of the 256 MiB disk).
const EXT4_MB: usize = 32;

/// What the disk is grown to after the upgrades.
const GROWN: &str = "288M";

#[test]
fn five_live_upgrades_then_five_sigkills_under_fio_verify_lose_nothing() {
    scenario("upgrade-live", |s| {
        let image = s.path("disk.img");
        let control = s.path("ctl.sock");
        let control_arg = control.display().to_string();
        // Made here, not by `--size`: the restarts after the kills serve the grown image with
        // the same arguments.
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(256 << 20))
            .map_err(|e| Error::Setup(format!("creating {}: {e}", image.display())))?;
        let mut daemon = Daemon::dovetail(&image)
            .queues(2)
            .arg("--control")
            .arg(&control_arg)
            .spawn()?;
        let first = daemon.pid().unwrap_or(0);
        let started = Instant::now();
        let mut guest = Guest::new("upgrade-live")
            .disk(daemon.socket())
            .queues(2)
            // For the kills; the upgrades must not need it (checked in the daemons' log).
            .reconnect()
            .env("RAND_MB", 8)
            .env("SEQ_MB", 16)
            .env("MIN_ROUNDS", 2)
            // A FLUSH after every 4 writes: each spends the image's fdatasync in the daemon, so
            // a handover or a kill is likely to find one (and the writes behind it) in flight.
            .env("FIO_EXTRA", "--fsync=4")
            .env("EXT4_MB", EXT4_MB)
            .env("RESIZE", 1)
            .workload(workloads::LIVE_VERIFY)
            .start()?;
        guest.wait_for("resized")?;
        let mut took = Vec::new();
        let mut pids = vec![u64::from(first)];
        for _ in 0..UPGRADES {
            std::thread::sleep(Duration::from_millis(800));
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
        // Grown by the last upgrade's daemon: it tells QEMU on the adopted backend request
        // channel; the guest checks the new size before the kills.
        let out = dovetail_ctl(&control, &["resize", "disk.img", GROWN])?;
        if !out.contains("the guest was told") {
            return Err(Error::Check(format!(
                "ctl resize did not tell the guest: {out}"
            )));
        }
        guest.resume("resized")?;
        guest.wait_for("changes-done")?;
        // The handed-over connections, counted before the kills' reconnections.
        let log = std::fs::read_to_string(daemon.log_path())
            .map_err(|e| Error::Check(format!("reading the daemon's log: {e}")))?;
        let adopted = log
            .matches("its connection handed over, not reconnected")
            .count();
        // QEMU connected once, at the start: the upgrades adopted its connection, and a
        // disconnect would have shown as another connect (`reconnect=1`).
        let connects = log.lines().filter(|l| l.ends_with(" connected")).count();
        // How long the guest's queues stood still at each handover, as the new daemons logged.
        let still: Vec<String> = log
            .lines()
            .filter_map(|l| {
                let at = l.find("its queues stood still ")? + "its queues stood still ".len();
                Some(l[at..].trim_end_matches(')').to_string())
            })
            .collect();
        // The last upgrade's daemon is not this process's child: SIGKILL it by its pid, then
        // restart the daemon (a child again) and SIGKILL that one, and so on.
        let mut outage = Vec::new();
        for k in 0..KILLS {
            std::thread::sleep(Duration::from_millis(800));
            let killed = Instant::now();
            if k == 0 {
                let last = *pids.last().unwrap_or(&0) as libc::pid_t;
                // SAFETY: kill(2) of the daemon the last upgrade handed over to (the pid it
                // reported, alive: it serves the guest).
                unsafe { libc::kill(last, libc::SIGKILL) };
                let deadline = Instant::now() + Duration::from_secs(10);
                while std::path::Path::new(&format!("/proc/{last}")).exists()
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
            } else {
                daemon.kill9()?;
            }
            daemon.restart()?;
            daemon.wait_for_client(Duration::from_secs(30))?;
            outage.push(killed.elapsed());
        }
        guest.resume("changes-done")?;
        let run = guest.finish()?;
        let steps = [
            workloads::LIVE_VERIFY_STEPS,
            &[
                "new-size",
                "ext4-mkfs",
                "ext4-files",
                "ext4-during",
                "ext4-cached",
                "ext4-fsck",
                "ext4-verify",
            ],
        ]
        .concat();
        run.expect_ok(&steps)?;
        daemon.terminate()?;
        if adopted != UPGRADES {
            return Err(Error::Check(format!(
                "{adopted} connections adopted in the daemons' log, {UPGRADES} wanted"
            )));
        }
        if connects != 1 {
            return Err(Error::Check(format!(
                "QEMU connected {connects} times before the kills: an upgrade disconnected it"
            )));
        }
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
            "upgrade-live: {UPGRADES} live upgrades under fio verify (pids {pids:?}), the guest's \
             queues stood still {}, ctl upgrade took {}, no reconnect; then {KILLS} SIGKILLs, \
             reconnected after {}, {resubmitted} requests in flight run again; {} verify \
             rounds, 0 errors; grown {}; ext4 {}, {} files checked, e2fsck clean; guest ran \
             {:.1}s",
            still.join(", "),
            took.iter()
                .map(|d| format!("{:.0}ms", d.as_secs_f64() * 1000.0))
                .collect::<Vec<_>>()
                .join(", "),
            outage
                .iter()
                .map(|d| format!("{:.1}s", d.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", "),
            run.result("verify-rounds")
                .map(|r| r.detail.as_str())
                .unwrap_or("?"),
            run.result("new-size")
                .map(|r| r.detail.as_str())
                .unwrap_or("?"),
            run.result("ext4-during")
                .map(|r| r.detail.as_str())
                .unwrap_or("?"),
            run.info("ext4-files").unwrap_or("?"),
            started.elapsed().as_secs_f64()
        ));
        say(&format!(
            "upgrade-live: guest steps: {}; fio rounds {}",
            run.results
                .iter()
                .map(|r| format!("{} {}", r.name, r.detail))
                .collect::<Vec<_>>()
                .join(", "),
            run.info("round-times").unwrap_or("?")
        ));
        Ok(())
    });
}
