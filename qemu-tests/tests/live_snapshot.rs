//! A snapshot taken while the guest runs is exported and its filesystem checks clean. The guest
//! makes ext4 on a parallax-v1 disk of a store, writes files, prints their sha256 sums and freezes
//! the filesystem (`fsfreeze`: ext4 flushes its journal and marks itself clean); the host takes a
//! snapshot over the control socket (`dovetail ctl snapshot`, which reports the pause of the
//! disk's I/O). The guest thaws, changes the filesystem (new files, one overwritten, one deleted)
//! and keeps rewriting a file while the host exports the snapshot to a raw image
//! (`dovetail ctl export`, written by the running daemon). On the host, `e2fsck -fn` finds the
//! exported filesystem clean, `debugfs` reads the frozen files out of it with the sums the guest
//! printed, and the files written after the snapshot are not in it. The guest checks its live
//! filesystem too. Afterwards `store check` finds the store consistent and the offline
//! `dovetail disk export` of the same snapshot is byte-identical to the live export.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use dovetail_qemu_tests::{
    create_store, dovetail_cli as dovetail, dovetail_ctl, host, image, json_u64, say, scenario,
    workloads, Daemon, Error, Guest, Result,
};

/// `debugfs -R "ls -p DIR" IMAGE`: the names in DIR of the ext4 image (`-p` prints
/// `/inode/mode/uid/gid/name/size/` per entry).
fn debugfs_ls(image: &Path, dir: &str) -> Result<Vec<String>> {
    let debugfs = host::require_tool("debugfs", "e2fsprogs")?;
    let out = host::run(
        Command::new(debugfs)
            .arg("-R")
            .arg(format!("ls -p {dir}"))
            .arg(image),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split('/').nth(5))
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect())
}

/// Whether two files hold the same bytes.
fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    let open =
        |p: &Path| File::open(p).map_err(|e| Error::Setup(format!("opening {}: {e}", p.display())));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = read_full(&mut fa, &mut ba, a)?;
        let nb = read_full(&mut fb, &mut bb, b)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8], path: &Path) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(Error::Setup(format!("reading {}: {e}", path.display()))),
        }
    }
    Ok(n)
}

#[test]
fn snapshot_of_a_frozen_ext4_is_exported_live_and_checks_clean() {
    scenario("live-snapshot", |s| {
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
            .arg("--export-dir")
            .arg(
                s.dir()
                    .to_str()
                    .ok_or_else(|| Error::Setup("the scratch directory is not UTF-8".into()))?,
            )
            .spawn()?;

        let mut guest = Guest::new("ext4-snapshot")
            .disk(daemon.socket_of("vd"))
            .queues(2)
            .workload(workloads::EXT4_SNAPSHOT)
            .start()?;
        // The filesystem is frozen while the guest waits here.
        guest.wait_for("snapshot-taken")?;
        let reply = dovetail_ctl(&control, &["--json", "snapshot", "vd", "--name", "frozen"])?;
        let pause_us = json_u64(&reply, "total_us")
            .ok_or_else(|| Error::Check(format!("`ctl snapshot` reported no pause: {reply}")))?;
        guest.resume("snapshot-taken")?;

        // The guest thaws, changes the filesystem and keeps writing while the host exports.
        guest.wait_for("exported")?;
        let exported = s.path("frozen.img");
        let exported_arg = exported
            .to_str()
            .ok_or_else(|| Error::Setup(format!("{} is not UTF-8", exported.display())))?;
        let t0 = Instant::now();
        let reply = dovetail_ctl(
            &control,
            &[
                "--json",
                "export",
                "vd",
                "--snapshot",
                "frozen",
                "--to",
                exported_arg,
            ],
        )?;
        let export_time = t0.elapsed();
        let data_bytes = json_u64(&reply, "data_bytes").unwrap_or(0);
        // Let the guest's writer run on briefly after the export, then release it.
        std::thread::sleep(Duration::from_millis(500));
        guest.resume("exported")?;
        let run = guest.finish()?;
        run.expect_ok(workloads::EXT4_SNAPSHOT_STEPS)?;

        say(&format!(
            "live-snapshot: snapshot paused I/O {:.3} ms; live export of {} MiB of data in {:.2}s \
             while the guest rewrote its file ({}); guest ran {:.1}s",
            pause_us as f64 / 1000.0,
            data_bytes >> 20,
            export_time.as_secs_f64(),
            run.result("churn")
                .map(|r| r.detail.as_str())
                .unwrap_or("?"),
            run.elapsed.as_secs_f64()
        ));

        // The snapshot's filesystem is clean and holds the files as they were when frozen.
        image::e2fsck(&exported)?;
        for file in ["file1", "file2", "file3", "file6", "dir/sub/s50"] {
            let key = format!("sum-{}", file.replace('/', "_"));
            let want = run
                .info(&key)
                .ok_or_else(|| Error::Check(format!("the guest printed no {key}")))?;
            let data = image::debugfs_cat(&exported, &format!("/{file}"))?;
            let got = image::sha256(&data)?;
            if got != want {
                return Err(Error::Check(format!(
                    "/{file} in the snapshot ({} bytes) has sha256 {got}, the guest had {want} \
                     when it froze the filesystem",
                    data.len()
                )));
            }
        }
        let root = debugfs_ls(&exported, "/")?;
        for name in ["file1", "file2", "file6", "dir"] {
            if !root.iter().any(|n| n == name) {
                return Err(Error::Check(format!(
                    "the snapshot's root lacks {name}: {root:?}"
                )));
            }
        }
        if let Some(late) = root
            .iter()
            .find(|n| n.starts_with("after") || n.as_str() == "churn")
        {
            return Err(Error::Check(format!(
                "{late}, written after the snapshot, is in it: {root:?}"
            )));
        }

        let list = dovetail_ctl(&control, &["snapshots", "vd"])?;
        if !list
            .lines()
            .any(|l| l.split_whitespace().next() == Some("frozen"))
        {
            return Err(Error::Check(format!(
                "`ctl snapshots vd` does not list frozen:\n{list}"
            )));
        }

        daemon.terminate()?;
        let log = std::fs::read_to_string(daemon.log_path())
            .map_err(|e| Error::Setup(format!("reading the daemon's log: {e}")))?;
        if !log
            .lines()
            .any(|l| l.contains("snapshot frozen") && l.contains("I/O paused"))
        {
            return Err(Error::Check(format!(
                "the daemon's log does not show the snapshot with its pause:\n{}",
                host::tail_of(&log, 30)
            )));
        }
        let report = dovetail(&["store".as_ref(), "check".as_ref(), st])?;
        if !report.contains("result: consistent") {
            return Err(Error::Check(format!("store check: {report}")));
        }
        // The same snapshot exported offline is the same image.
        let offline = s.path("frozen-offline.img");
        dovetail(&[
            "disk".as_ref(),
            "export".as_ref(),
            st,
            "vd".as_ref(),
            "--snapshot".as_ref(),
            "frozen".as_ref(),
            "--to".as_ref(),
            offline.as_os_str(),
        ])?;
        if !same_bytes(&exported, &offline)? {
            return Err(Error::Check(format!(
                "the live export {} and the offline export {} of snapshot frozen differ",
                exported.display(),
                offline.display()
            )));
        }
        Ok(())
    });
}
