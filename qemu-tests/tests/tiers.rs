//! Tiering under running guests: a store with two tiers (`fast` and `slow`, each its own file),
//! two parallax-v2 disks served by one daemon whose mover runs every second, with policies that
//! make blocks cold after one idle second and hot at one access. One guest runs the fio verify
//! workload, the other the ext4 workload, while the mover demotes (compresses onto the slow
//! tier) what they leave idle and promotes what they read again. Both guests must pass; `ctl
//! tiers` must show the mover moved blocks while they ran, metadata kept twice and no failed
//! pass; afterwards `store check` finds the store consistent (every copy of every block in use
//! equal, every compressed block intact) and the ext4 disk's snapshot exports to an image
//! `e2fsck` finds clean.

use std::path::Path;
use std::time::{Duration, Instant};

use dovetail_qemu_tests::{
    dovetail_cli as dovetail, dovetail_ctl, image, json_u64, say, scenario, workloads, Daemon,
    Error, Guest, Result,
};

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

/// `ctl tiers DISK --json`, and its demoted + promoted counters.
fn moved(control: &Path, disk: &str) -> Result<(u64, String)> {
    let reply = dovetail_ctl(control, &["--json", "tiers", disk])?;
    let demoted = json_u64(&reply, "demoted")
        .ok_or_else(|| Error::Check(format!("no demoted counter: {reply}")))?;
    let promoted = json_u64(&reply, "promoted").unwrap_or(0);
    Ok((demoted + promoted, reply))
}

#[test]
fn guests_pass_fio_verify_and_ext4_on_tiered_parallax_v2_disks_while_the_mover_runs() {
    scenario("tiers", |s| {
        let store = s.path("store");
        let st = store.as_os_str();
        let fast = s.path("fast.tier");
        let slow = s.path("slow.tier");
        let tier = |name: &str, p: &Path, size: &str| {
            std::ffi::OsString::from(format!("{name}={}:{size}", p.display()))
        };
        dovetail(&[
            os("store"),
            os("create"),
            st,
            os("--tier"),
            &tier("fast", &fast, "1G"),
            os("--tier"),
            &tier("slow", &slow, "1G"),
            os("--extent-size"),
            os("16M"),
        ])?;
        for disk in ["fio", "ext4"] {
            dovetail(&[
                os("disk"),
                os("create"),
                st,
                os(disk),
                os("--size"),
                os("256M"),
                os("--layout"),
                os("parallax-v2"),
            ])?;
        }
        let control = s.path("ctl.sock");
        let control_arg = control
            .to_str()
            .ok_or_else(|| Error::Setup(format!("{} is not UTF-8", control.display())))?;
        let mut daemon = Daemon::dovetail_store(&store, &["fio", "ext4"])
            .queues(2)
            .arg("--control")
            .arg(control_arg)
            .arg("--mover-interval")
            .arg("1")
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !control.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for disk in ["fio", "ext4"] {
            dovetail_ctl(
                &control,
                &["tiers", disk, "--cold-after", "1", "--hot-accesses", "1"],
            )?;
        }
        let fio = Guest::new("tiers-fio")
            .disk(daemon.socket_of("fio"))
            .queues(2)
            .env("RAND_MB", 32)
            .env("SEQ_MB", 64)
            .workload(workloads::FIO_VERIFY)
            .start()?;
        let ext4 = Guest::new("tiers-ext4")
            .disk(daemon.socket_of("ext4"))
            .queues(2)
            .workload(workloads::EXT4)
            .start()?;
        // The mover must move blocks of the fio disk while its guest is still running.
        let deadline = Instant::now() + Duration::from_secs(120);
        let moved_while_running = loop {
            let (n, reply) = moved(&control, "fio")?;
            if n > 0 {
                break reply;
            }
            if Instant::now() > deadline {
                return Err(Error::Check(format!(
                    "the mover moved nothing within 120 s of the guest's start: {reply}"
                )));
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        say(&format!(
            "tiers: while the guest ran: {}",
            moved_while_running.trim()
        ));
        fio.finish()?
            .expect_ok(&["queues", "fio-rand-4k", "fio-seq-1m", "all-queues-used"])?;
        ext4.finish()?.expect_ok(workloads::EXT4_STEPS)?;
        // Let the mover finish a round after the guests left, then look at the placement.
        std::thread::sleep(Duration::from_secs(3));
        for disk in ["fio", "ext4"] {
            let reply = dovetail_ctl(&control, &["tiers", disk])?;
            say(&format!("tiers {disk}:\n{}", reply.trim_end()));
            // The usage table: metadata in use on the fast tier, two copies, following policy.
            let meta_twice = reply.lines().any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.len() == 7 && w[..4] == ["metadata", "fast", "2", "no"] && w[6] == "ok"
            });
            if !meta_twice {
                return Err(Error::Check(format!(
                    "{disk}: no metadata kept twice on the fast tier: {reply}"
                )));
            }
            let (_, json) = moved(&control, disk)?;
            if !json.contains("\"last_error\":null") {
                return Err(Error::Check(format!(
                    "a mover pass failed on {disk}: {json}"
                )));
            }
        }
        daemon.terminate()?;
        let report = dovetail(&[os("store"), os("check"), st])?;
        if !report.contains("result: consistent") {
            return Err(Error::Check(format!("store check: {report}")));
        }
        dovetail(&[
            os("disk"),
            os("snapshot"),
            st,
            os("ext4"),
            os("--name"),
            os("after-guest"),
        ])?;
        let exported = s.path("ext4-snapshot.img");
        dovetail(&[
            os("disk"),
            os("export"),
            st,
            os("ext4"),
            os("--snapshot"),
            os("after-guest"),
            os("--to"),
            exported.as_os_str(),
        ])?;
        image::e2fsck(&exported)?;
        Ok(())
    });
}
