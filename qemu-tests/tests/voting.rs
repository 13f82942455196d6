//! A disk served through a three-member voting Tee, one member fault-injecting, under a real
//! guest. The store is upgraded for voting (`store upgrade --voting`), the daemon allows fault
//! injection, and `dovetail ctl tee vd --candidate parallax-v1 --candidate parallax-v2` attaches
//! two members under `sync-read-checks`; the first candidate (member 1) drops a few of its writes
//! and flips a bit in a few of its reads. The guest makes ext4, runs fio verify (crc32c) on a
//! file of it, writes files, remounts and checks their sums, then reads the whole disk.
//!
//! What must hold: no error in the guest (every read answered by the majority); member 1 lost
//! votes and was repaired (`ctl status`), the sound members lost none, and the events name
//! member 1's version as out-voted; member 1 was not quarantined (its losses stay under the
//! threshold). Then the guest reads the whole disk again, remounts and checks the sums again:
//! no member loses a vote in that pass, so all three members hold the same data in every block
//! (every read votes over every member holding the block, and all three hold every block).
//! Finally `store check` finds the store consistent after the daemon stopped.

use std::path::Path;
use std::time::{Duration, Instant};

use dovetail_qemu_tests::{
    create_store, dovetail_cli as dovetail, dovetail_ctl, json_u64, say, scenario, workloads,
    Daemon, Error, Guest, Result,
};

/// Disk size: 64 MiB, in 4 KiB blocks.
const BLOCKS: u64 = 16384;

/// Member 1's faults. Its fill (one write per block, before the guest starts) counts towards a
/// rule's `nth`, as do the reads the other members' fill makes of it (how many depends on
/// timing, at most one per block): so each rule names the Nth operation after those, and hits
/// once. Five of the guest's writes are dropped and two of its reads get a flipped bit: member 1
/// loses at most 7 votes, under the quarantine threshold (16), so every loss must end in a
/// repair.
fn faults() -> Vec<String> {
    let writes = [200, 1000, 2500, 4000, 5500].map(|n| format!("drop-write:nth={}", BLOCKS + n));
    let reads = [1500, 3000].map(|n| format!("flip-read:nth={}", BLOCKS + n));
    writes.into_iter().chain(reads).collect()
}

/// Member `i`'s object in `ctl --json status` output (compact JSON, keys sorted).
fn member(status: &str, i: usize) -> Result<&str> {
    let at = status
        .find("\"members\":[")
        .ok_or_else(|| Error::Check(format!("status has no voting members: {status}")))?;
    let rest = &status[at + 11..];
    let list = &rest[..rest.find(']').unwrap_or(rest.len())];
    let key = format!("\"member\":{i},");
    list.split("},{")
        .find(|m| m.contains(&key))
        .ok_or_else(|| Error::Check(format!("status has no member {i}: {status}")))
}

fn field(obj: &str, key: &str) -> Result<u64> {
    json_u64(obj, key).ok_or_else(|| Error::Check(format!("no {key} in {obj}")))
}

fn status(control: &Path) -> Result<String> {
    dovetail_ctl(control, &["--json", "status", "vd"])
}

#[test]
fn ext4_and_fio_verify_on_a_three_member_tee_with_a_faulty_member() {
    scenario("voting", |s| {
        let store = s.path("store");
        let st = store.as_os_str();
        create_store(&store, "1G", &[("vd", "64M")])?;
        dovetail(&[
            "store".as_ref(),
            "upgrade".as_ref(),
            st,
            "--voting".as_ref(),
        ])?;
        let control = s.path("ctl.sock");
        let control_arg = control
            .to_str()
            .ok_or_else(|| Error::Setup(format!("{} is not UTF-8", control.display())))?;
        let mut daemon = Daemon::dovetail_store(&store, &["vd"])
            .queues(2)
            .arg("--control")
            .arg(control_arg)
            .arg("--allow-fault-injection")
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !control.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }

        let mut args = vec![
            "--json",
            "tee",
            "vd",
            "--candidate",
            "parallax-v1",
            "--candidate",
            "parallax-v2",
            "--policy",
            "sync-read-checks",
        ];
        let faults = faults();
        for f in &faults {
            args.push("--fault");
            args.push(f);
        }
        let reply = dovetail_ctl(&control, &args)?;
        if !reply.contains("3 members") {
            return Err(Error::Check(format!("tee did not make 3 members: {reply}")));
        }
        // The new members are filled from the trusted version in the background.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = status(&control)?;
            let filled = (0..3).try_fold(true, |all, i| {
                let m = member(&st, i)?;
                Ok::<_, Error>(
                    all && field(m, "held_blocks")? == BLOCKS && m.contains("\"state\":\"voting\""),
                )
            })?;
            if filled {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Check(format!("members not filled in 30 s: {st}")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }

        let mut guest = Guest::new("voting")
            .disk(daemon.socket_of("vd"))
            .queues(2)
            .env("FIO_MB", 16)
            .workload(workloads::EXT4_VOTE)
            .start()?;
        guest.wait_for("first-pass")?;
        // Repairs run right after the vote; give the last ones a moment.
        std::thread::sleep(Duration::from_millis(300));
        let first = status(&control)?;
        let m1 = member(&first, 1)?;
        let (lost, repairs) = (field(m1, "votes_lost")?, field(m1, "repairs")?);
        say(&format!(
            "voting: member 1 lost {lost} votes, {repairs} repairs after ext4 + fio verify and a \
             whole-disk read"
        ));
        if lost == 0 || repairs == 0 {
            return Err(Error::Check(format!(
                "the faulty member lost no vote or was never repaired: {m1}"
            )));
        }
        if !m1.contains("\"state\":\"voting\"") || field(m1, "stale_blocks")? != 0 {
            return Err(Error::Check(format!(
                "the faulty member is not voting with every block repaired: {m1}"
            )));
        }
        for i in [0, 2] {
            let m = member(&first, i)?;
            if field(m, "votes_lost")? != 0 || field(m, "errors")? != 0 {
                return Err(Error::Check(format!("sound member {i} lost a vote: {m}")));
            }
        }
        let version = field(m1, "version")?;
        let events = dovetail_ctl(&control, &["--json", "events"])?;
        if !events.contains("outvoted") || !events.contains(&format!("(version {version})")) {
            return Err(Error::Check(format!(
                "the events do not name member 1 (version {version}) as out-voted: {events}"
            )));
        }

        guest.resume("first-pass")?;
        let run = guest.finish()?;
        run.expect_ok(workloads::EXT4_VOTE_STEPS)?;
        let last = status(&control)?;
        for i in 0..3 {
            let m = member(&last, i)?;
            let before = field(member(&first, i)?, "votes_lost")?;
            if field(m, "votes_lost")? != before || !m.contains("\"state\":\"voting\"") {
                return Err(Error::Check(format!(
                    "member {i} lost votes in the second whole-disk read (the members differ): \
                     before {before}, now {m}"
                )));
            }
        }
        if json_u64(&last, "quarantines") != Some(0) || json_u64(&last, "no_majority") != Some(0) {
            return Err(Error::Check(format!(
                "a member was quarantined or a block had no majority: {last}"
            )));
        }
        daemon.terminate()?;
        let report = dovetail(&["store".as_ref(), "check".as_ref(), st])?;
        if !report.contains("result: consistent") {
            return Err(Error::Check(format!("store check: {report}")));
        }
        Ok(())
    });
}
