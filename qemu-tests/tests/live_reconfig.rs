//! Live reconfiguration without the guest noticing: a guest runs fio verify rounds continuously
//! (random 4 KiB and sequential 1 MiB writes, crc32c, read back and checked) on a parallax-v1 disk
//! of a store while the host, over the daemon's control socket (`dovetail ctl`), attaches a
//! parallax-v1 candidate under `sync-cross-checks`, changes its policy to `lazy-hashes` and then
//! `mirror-only`, and drops it again. The guest must see zero verify errors: in every round, in a
//! whole round run after the last change, and in a region it wrote before the changes and
//! re-verifies after them. Every change must report the pause of the disk's I/O it took (printed,
//! not bounded: timing targets live in the benchmarks) and be logged by the daemon; `ctl status`
//! must show the candidate and its policy at each step (and guest reads compared while
//! `sync-cross-checks` is in force, with no mismatch), no candidate after `untee`, and 4 pauses;
//! `store check` must find the store consistent afterwards.

use std::path::Path;
use std::time::{Duration, Instant};

use dovetail_qemu_tests::{
    create_store, dovetail_cli as dovetail, dovetail_ctl, json_u64, say, scenario, workloads,
    Daemon, Error, Guest, Result,
};

/// The pause one change took, from the `"pause"` object of a `ctl --json` reply.
struct Pause {
    what: String,
    drain_us: u64,
    change_us: u64,
    total_us: u64,
}

impl Pause {
    fn of(what: &str, reply: &str) -> Result<Pause> {
        let field = |key: &str| {
            json_u64(reply, key)
                .ok_or_else(|| Error::Check(format!("`{what}` reported no pause ({key}): {reply}")))
        };
        Ok(Pause {
            what: what.to_string(),
            drain_us: field("drain_us")?,
            change_us: field("change_us")?,
            total_us: field("total_us")?,
        })
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// The string value of the first `"key":"value"` in compact JSON.
fn json_str<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":\"");
    let start = json.find(&pat)? + pat.len();
    let rest = &json[start..];
    Some(&rest[..rest.find('"')?])
}

/// `ctl --json status vd`, checked to show a candidate under `policy` that is active and has
/// neither mismatched nor been quarantined.
fn status_with_candidate(control: &Path, policy: &str) -> Result<String> {
    let status = dovetail_ctl(control, &["--json", "status", "vd"])?;
    let problem = if status.contains("\"candidate\":null") {
        Some("no candidate".to_string())
    } else if json_str(&status, "policy") != Some(policy) {
        Some(format!("policy is not {policy}"))
    } else if json_str(&status, "state") != Some("active") {
        Some("the candidate is not active".to_string())
    } else if json_u64(&status, "mismatches") != Some(0)
        || json_u64(&status, "quarantines") != Some(0)
    {
        Some("the candidate mismatched or was quarantined".to_string())
    } else {
        None
    };
    match problem {
        Some(p) => Err(Error::Check(format!("ctl status vd: {p}: {status}"))),
        None => Ok(status),
    }
}

/// The disk's pause count from `ctl --json status` (`"pauses":{...,"pauses":N}`).
fn pause_count(status: &str) -> Option<u64> {
    let at = status.find("\"pauses\":{")?;
    json_u64(&status[at + 10..], "pauses")
}

#[test]
fn fio_verify_runs_through_tee_policy_changes_and_untee() {
    scenario("live-reconfig", |s| {
        let store = s.path("store");
        let st = store.as_os_str();
        create_store(&store, "1G", &[("vd", "256M")])?;
        let control = s.path("ctl.sock");
        let control_arg = control
            .to_str()
            .ok_or_else(|| Error::Setup(format!("{} is not UTF-8", control.display())))?;
        let mut daemon = Daemon::dovetail_store(&store, &["vd"])
            .queues(2)
            .arg("--control")
            .arg(control_arg)
            .spawn()?;
        // The daemon binds the control socket next to the disk sockets; give it a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !control.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = dovetail_ctl(&control, &["--json", "status", "vd"])?;
        if !status.contains("\"candidate\":null") {
            return Err(Error::Check(format!(
                "a fresh disk already has a candidate: {status}"
            )));
        }

        let started = Instant::now();
        let mut guest = Guest::new("live-verify")
            .disk(daemon.socket_of("vd"))
            .queues(2)
            .env("RAND_MB", 16)
            .env("SEQ_MB", 32)
            .workload(workloads::LIVE_VERIFY)
            .start()?;
        // The guest's verify loop is running once it waits for the host.
        guest.wait_for("changes-done")?;
        let loop_started = Instant::now();
        std::thread::sleep(Duration::from_secs(2));

        let mut pauses = Vec::new();
        let reply = dovetail_ctl(
            &control,
            &[
                "--json",
                "tee",
                "vd",
                "--candidate",
                "parallax-v1",
                "--policy",
                "sync-cross-checks",
            ],
        )?;
        pauses.push(Pause::of("tee", &reply)?);
        status_with_candidate(&control, "sync-cross-checks")?;
        // Under sync-cross-checks the guest's reads of blocks the candidate holds are compared:
        // wait until fio's verify phase has read some of what it wrote since the tee.
        let dwell = Instant::now() + Duration::from_secs(3);
        let deadline = Instant::now() + Duration::from_secs(60);
        let compared = loop {
            let status = status_with_candidate(&control, "sync-cross-checks")?;
            let compared = json_u64(&status, "compared_reads").unwrap_or(0);
            if compared > 0 && Instant::now() >= dwell {
                break compared;
            }
            if Instant::now() > deadline {
                return Err(Error::Check(format!(
                    "no guest read was compared within 60 s of the tee: {status}"
                )));
            }
            std::thread::sleep(Duration::from_millis(250));
        };

        let reply = dovetail_ctl(&control, &["--json", "policy", "vd", "lazy-hashes"])?;
        pauses.push(Pause::of("policy lazy-hashes", &reply)?);
        status_with_candidate(&control, "lazy-hashes")?;
        std::thread::sleep(Duration::from_secs(3));

        let reply = dovetail_ctl(&control, &["--json", "policy", "vd", "mirror-only"])?;
        pauses.push(Pause::of("policy mirror-only", &reply)?);
        std::thread::sleep(Duration::from_secs(3));
        let status = status_with_candidate(&control, "mirror-only")?;
        let present = json_u64(&status, "blocks_present").unwrap_or(0);
        if present == 0 {
            return Err(Error::Check(format!(
                "the candidate holds no block after 8 s of guest writes: {status}"
            )));
        }

        let reply = dovetail_ctl(&control, &["--json", "untee", "vd"])?;
        pauses.push(Pause::of("untee", &reply)?);
        let status = dovetail_ctl(&control, &["--json", "status", "vd"])?;
        if !status.contains("\"candidate\":null") {
            return Err(Error::Check(format!(
                "after untee the disk still has a candidate: {status}"
            )));
        }
        if pause_count(&status) != Some(4) {
            return Err(Error::Check(format!(
                "ctl status does not count 4 pauses: {status}"
            )));
        }
        let changes = loop_started.elapsed();

        // The guest runs one more full verify round, on the trusted version alone, and stops.
        guest.resume("changes-done")?;
        let run = guest.finish()?;
        run.expect_ok(workloads::LIVE_VERIFY_STEPS)?;

        say(&format!(
            "live-reconfig pauses: {}",
            pauses
                .iter()
                .map(|p| format!(
                    "{} {:.3} ms (drain {:.3}, change {:.3})",
                    p.what,
                    ms(p.total_us),
                    ms(p.drain_us),
                    ms(p.change_us)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        say(&format!(
            "live-reconfig: {} verify rounds ({}) over {:.1}s of changes; {compared} reads compared \
             under sync-cross-checks; candidate held {present} blocks; guest ran {:.1}s",
            run.result("verify-rounds")
                .map(|r| r.detail.as_str())
                .unwrap_or("?"),
            run.info("round-times").unwrap_or("?"),
            changes.as_secs_f64(),
            started.elapsed().as_secs_f64(),
        ));

        daemon.terminate()?;
        let log = std::fs::read_to_string(daemon.log_path())
            .map_err(|e| Error::Setup(format!("reading the daemon's log: {e}")))?;
        let paused: Vec<&str> = log.lines().filter(|l| l.contains("I/O paused")).collect();
        let expected = [
            "attached candidate",
            "policy changed from sync-cross-checks to lazy-hashes",
            "policy changed from lazy-hashes to mirror-only",
            "dropped candidate",
        ];
        if paused.len() != expected.len()
            || !expected
                .iter()
                .zip(&paused)
                .all(|(what, line)| line.contains(what))
        {
            return Err(Error::Check(format!(
                "the daemon's log should show the {} changes with their pauses, in order ({expected:?}); \
                 its `I/O paused` lines:\n{}",
                expected.len(),
                paused.join("\n")
            )));
        }
        let report = dovetail(&["store".as_ref(), "check".as_ref(), st])?;
        if !report.contains("result: consistent") {
            return Err(Error::Check(format!("store check: {report}")));
        }
        Ok(())
    });
}
