//! The live-upgrade measurement (BENCHMARKS.md, "Live upgrade"); `#[ignore]`d, run by hand:
//!
//! ```text
//! nice -n 5 cargo test -p dovetail-qemu-tests --test upgrade_bench -- --ignored --nocapture
//! ```
//!
//! A guest runs fio randrw 4 KiB at queue depth 16 (the `upgrade-bench` workload) in two phases of
//! `RUNTIME_S` seconds; `UPGRADE_AFTER` into each, the host upgrades the daemon: in the first with
//! `dovetail ctl upgrade` (the live handover, the guest's connection adopted by the new process),
//! in the second with `dovetail ctl upgrade --fallback reconnect` to a binary that speaks another
//! handover format (a wrapper that says hello with format 1 and otherwise executes the real
//! daemon), so the old daemon drains, executes it in place and QEMU reconnects (`reconnect=1`).
//! For each phase the guest reports its slowest request and the longest time no request
//! completed. The same VM and disk serve both phases, on a raw image and then on a parallax-v1
//! disk of a store; the table is printed at the end.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dovetail_qemu_tests::{
    create_store, dovetail_binary, dovetail_cli, dovetail_ctl, json_u64, say, scenario, workloads,
    Daemon, Error, Guest, Result,
};

/// How long fio runs in each phase.
const RUNTIME_S: u64 = 10;

/// When the host upgrades the daemon, after the guest's fio started.
const UPGRADE_AFTER: Duration = Duration::from_secs(4);

/// The copy-out's rate limit on the teed disk.
const COPY_RATE: &str = "1M";

/// The teed disk's data, in MiB: at `COPY_RATE`, the copy-out takes longer than both phases.
const COPY_MIB: usize = 48;

/// One phase's outcome.
struct Phase {
    /// The guest's `info` line: slowest, gap, when, I/Os, IOPS, p99.
    guest: String,
    /// How long `ctl upgrade` took.
    ctl: Duration,
    /// How long the guest's queues stood still at the handover, as the new daemon logged it.
    still: Option<String>,
    /// The teed disk's copy-out just before and just after the upgrade (state, blocks present,
    /// rate limit).
    copy: Option<(String, String)>,
}

#[test]
#[ignore = "a measurement (about 2 minutes of VM time): run it by hand, see BENCHMARKS.md"]
fn live_upgrade_against_the_reconnect_fallback_under_fio_randrw() {
    scenario("upgrade-bench", |s| {
        let wrapper = format1_wrapper(s.dir())?;
        let mut rows = Vec::new();

        // A raw image.
        let control = s.path("raw-ctl.sock");
        let daemon = Daemon::dovetail(s.path("raw.img"))
            .size("256M")
            .queues(1)
            .arg("--control")
            .arg(&control.display().to_string())
            .spawn()?;
        rows.push((
            "raw",
            measure(
                "upgrade-bench-raw",
                &daemon,
                daemon.socket(),
                &control,
                &wrapper,
                None,
            )?,
        ));

        // A parallax-v1 disk of a store.
        let store = s.path("store");
        create_store(&store, "1G", &[("bench", "256M")])?;
        let control = s.path("px-ctl.sock");
        let daemon = Daemon::dovetail_store(&store, &["bench"])
            .queues(1)
            .arg("--control")
            .arg(&control.display().to_string())
            .spawn()?;
        let socket = daemon.socket_of("bench");
        rows.push((
            "parallax-v1",
            measure(
                "upgrade-bench-px",
                &daemon,
                &socket,
                &control,
                &wrapper,
                None,
            )?,
        ));

        // A parallax-v1 disk teed to a parallax-v2 candidate (sync-cross-checks), its copy-out
        // running at COPY_RATE across both upgrades.
        // The disk holds COPY_MIB of data (at 128 MiB, away from fio's span), imported, so the
        // copy-out has that much to copy and runs across both upgrades.
        let store = s.path("store-tee");
        create_store(&store, "1G", &[])?;
        let image = s.path("import.img");
        {
            use std::os::unix::fs::FileExt;
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let data: Vec<u8> = (0..COPY_MIB << 20)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let f = std::fs::File::create(&image)
                .map_err(|e| Error::Setup(format!("creating {}: {e}", image.display())))?;
            f.set_len(256 << 20)
                .and_then(|()| f.write_all_at(&data, 128 << 20))
                .map_err(|e| Error::Setup(format!("writing {}: {e}", image.display())))?;
        }
        dovetail_cli(&[
            "disk".as_ref(),
            "import".as_ref(),
            "--from".as_ref(),
            image.as_os_str(),
            store.as_os_str(),
            "bench".as_ref(),
        ])?;
        let control = s.path("tee-ctl.sock");
        let daemon = Daemon::dovetail_store(&store, &["bench"])
            .queues(1)
            .arg("--control")
            .arg(&control.display().to_string())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !control.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        dovetail_ctl(
            &control,
            &[
                "--json",
                "tee",
                "bench",
                "--candidate",
                "parallax-v2",
                "--policy",
                "sync-cross-checks",
            ],
        )?;
        dovetail_ctl(
            &control,
            &["--json", "migrate", "bench", "--rate", COPY_RATE],
        )?;
        let socket = daemon.socket_of("bench");
        rows.push((
            "parallax-v2 teed, copying out",
            measure(
                "upgrade-bench-tee",
                &daemon,
                &socket,
                &control,
                &wrapper,
                Some("bench"),
            )?,
        ));

        say("upgrade-bench: fio randrw 4k QD16, 1 queue, one upgrade per phase");
        for (disk, phases) in &rows {
            for p in phases {
                if let Some((before, after)) = &p.copy {
                    say(&format!(
                        "  {disk}: copy-out before the upgrade {before}, after {after}"
                    ));
                }
            }
            let [live, reconnect] = phases;
            say(&format!(
                "  {disk:12} live handover:      {} (ctl upgrade {:.0}ms, queues stood still {})",
                live.guest,
                live.ctl.as_secs_f64() * 1000.0,
                live.still.as_deref().unwrap_or("?")
            ));
            say(&format!(
                "  {disk:12} reconnect fallback: {} (ctl upgrade {:.0}ms)",
                reconnect.guest,
                reconnect.ctl.as_secs_f64() * 1000.0
            ));
        }
        Ok(())
    });
}

/// Runs the two phases in one guest against `daemon` and stops the daemon afterwards.
fn measure(
    name: &str,
    daemon: &Daemon,
    socket: &Path,
    control: &Path,
    wrapper: &Path,
    teed: Option<&str>,
) -> Result<[Phase; 2]> {
    let mut guest = Guest::new(name)
        .disk(socket)
        .queues(1)
        .reconnect()
        .env("PHASES", "live reconnect")
        .env("RUNTIME", RUNTIME_S)
        .env("UPGRADE_AFTER", UPGRADE_AFTER.as_secs())
        .timeout(Duration::from_secs(300))
        .workload(workloads::UPGRADE_BENCH)
        .start()?;
    let first = u64::from(daemon.pid().unwrap_or(0));
    let wrapper = wrapper.display().to_string();
    let mut took = Vec::new();
    let mut copies = Vec::new();
    let mut pid = first;
    for (phase, args) in [
        ("live", vec!["--json", "upgrade"]),
        (
            "reconnect",
            vec![
                "--json",
                "upgrade",
                "--exec",
                &wrapper,
                "--fallback",
                "reconnect",
            ],
        ),
    ] {
        guest.wait_for(phase)?;
        std::thread::sleep(UPGRADE_AFTER);
        let before = match teed {
            Some(disk) => Some(copy_out(control, disk)?),
            None => None,
        };
        let t = Instant::now();
        let out = dovetail_ctl(control, &args)?;
        took.push(t.elapsed());
        if let (Some(disk), Some(before)) = (teed, before) {
            // The reconnect fallback's daemon binds its control socket afresh.
            let deadline = Instant::now() + Duration::from_secs(20);
            let after = loop {
                match copy_out(control, disk) {
                    Ok(c) => break c,
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            if !after.starts_with("running") {
                return Err(Error::Check(format!(
                    "the copy-out did not carry over the {phase} upgrade: {before} before, {after} after"
                )));
            }
            copies.push(Some((before, after)));
        } else {
            copies.push(None);
        }
        if phase == "live" {
            // {"upgraded":true,"old_pid":N,"pid":M}
            let now =
                json_u64(&out, "pid").ok_or_else(|| Error::Check(format!("no pid in {out}")))?;
            if now == pid {
                return Err(Error::Check(format!("still pid {now} after the upgrade")));
            }
            pid = now;
        }
        guest.resume(phase)?;
    }
    let run = guest.finish()?;
    run.expect_ok(&["phase-live", "phase-reconnect"])?;
    let log = std::fs::read_to_string(daemon.log_path())
        .map_err(|e| Error::Check(format!("reading the daemon's log: {e}")))?;
    // The fallback executes in place: the pid the live upgrade handed to serves on.
    // SAFETY: kill(2) of the daemon the live upgrade handed over to (the pid it reported).
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let still = log.lines().find_map(|l| {
        let at = l.find("its queues stood still ")? + "its queues stood still ".len();
        Some(l[at..].trim_end_matches(')').to_string())
    });
    // The old daemon's steps, as it logged them: the flush ahead (I/O running), then inside
    // the pause its serve loops' end (requests in flight completed, the disk flushed) and the
    // disks' and store's close.
    let step = |needle: &str| {
        log.lines().find_map(|l| {
            let at = l.find(needle)? + needle.len();
            let ms = l[at..].split(" ms").next()?;
            Some(format!("{ms} ms"))
        })
    };
    let still = still.map(|s| {
        format!(
            "{s}; old daemon: flush ahead {}, paused and flushed {}, closed {}",
            step("flushed ahead of the pause in ").unwrap_or_else(|| "?".into()),
            step("the disks flushed in ").unwrap_or_else(|| "?".into()),
            step("the disks and the store closed in ").unwrap_or_else(|| "?".into()),
        )
    });
    if log
        .matches("its connection handed over, not reconnected")
        .count()
        != 1
    {
        return Err(Error::Check(
            "the live upgrade did not hand the guest's connection over".into(),
        ));
    }
    let phase = |n: usize, key: &str| -> Result<Phase> {
        Ok(Phase {
            guest: run
                .info(key)
                .ok_or_else(|| Error::Check(format!("no {key} figures from the guest")))?
                .to_string(),
            ctl: took[n],
            still: if n == 0 { still.clone() } else { None },
            copy: copies[n].clone(),
        })
    };
    Ok([phase(0, "live")?, phase(1, "reconnect")?])
}

/// A new binary that speaks handover format 1 when started by an upgrade (so `--fallback
/// reconnect` is taken) and is the real daemon when executed plainly (as the old process does
/// in place).
fn format1_wrapper(dir: &Path) -> Result<PathBuf> {
    let bin = dovetail_binary()?;
    let p = dir.join("dovetail-format1");
    let script = format!(
        "#!/usr/bin/env python3\nimport json, os, socket, sys, time\n\
         fd = os.environ.get('DOVETAIL_HANDOVER_FD')\n\
         if fd is None:\n    os.execv({bin:?}, [{bin:?}] + sys.argv[1:])\n\
         s = socket.socket(fileno=int(fd))\n\
         s.send(json.dumps({{'type': 'hello', 'format': 1, 'pid': os.getpid(), 'version': 'format1'}}).encode())\n\
         time.sleep(5)\n",
    );
    std::fs::write(&p, script)
        .map_err(|e| Error::Setup(format!("writing {}: {e}", p.display())))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::Setup(format!("chmod {}: {e}", p.display())))?;
    Ok(p)
}

/// The copy-out of `disk`'s Tee: `STATE, N blocks present, rate R B/s`.
fn copy_out(control: &Path, disk: &str) -> Result<String> {
    let reply = dovetail_ctl(control, &["--json", "migrate", disk, "--status"])?;
    let at = reply
        .find("\"copy_out\"")
        .ok_or_else(|| Error::Check(format!("no copy_out in {reply}")))?;
    let c = &reply[at..];
    let state = c
        .find("\"state\":\"")
        .map(|i| &c[i + 9..])
        .and_then(|r| r.find('"').map(|j| &r[..j]))
        .unwrap_or("?");
    Ok(format!(
        "{state}, {} blocks present, rate {} B/s",
        json_u64(c, "blocks_present").map_or("?".into(), |n| n.to_string()),
        json_u64(c, "rate_limit").map_or("?".into(), |n| n.to_string())
    ))
}
