//! Commits racing a busy guest: fio verify (crc32c, random 4 KiB then sequential 1 MiB writes,
//! read back and checked) on 4 queues of a parallax-v2 disk in a store with two tiers, while
//! the host takes `ctl snapshot` again and again, parallax-v2's annotation timer commits every
//! 5 s and the tier mover (every second, blocks cold after one idle second) moves blocks
//! between the tiers. The guest must pass; every snapshot must be listed; the mover must have
//! moved blocks while the guest ran; the last snapshot taken during the writes must hold, in
//! every block, either nothing (zeros) or the fio block the guest wrote there (a snapshot is a
//! consistent image of acknowledged writes, never a torn or misplaced block); and the disk's
//! final state must hold every block fio wrote at its own offset, with `store check` consistent.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dovetail_qemu_tests::image::{self, MIB};
use dovetail_qemu_tests::{
    dovetail_cli as dovetail, dovetail_ctl, json_u64, say, scenario, workloads, Daemon, Error,
    Guest, Result,
};

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

/// The region fio's random 4 KiB writes cover, then its sequential 1 MiB writes (the
/// workload's RAND_MB and SEQ_MB).
const RAND_MB: u64 = 32;
const SEQ_MB: u64 = 64;
/// The annotation timer's period (parallax-v2's default): the guest must write for longer, so
/// timer commits run under its writes.
const TIMER: Duration = Duration::from_secs(5);
/// Time between two snapshots.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(1500);

/// demoted + promoted from `ctl --json tiers vd`.
fn moved(control: &Path) -> Result<u64> {
    let reply = dovetail_ctl(control, &["--json", "tiers", "vd"])?;
    let demoted = json_u64(&reply, "demoted")
        .ok_or_else(|| Error::Check(format!("no demoted counter: {reply}")))?;
    Ok(demoted + json_u64(&reply, "promoted").unwrap_or(0))
}

/// fio's verify header magic, little-endian at the start of each block it writes.
const FIO_HDR_MAGIC: u16 = 0xacca;

/// Every `bs` block of `[offset, offset + len)` of `path` whose first 4 KiB is not all zeros
/// starts with a fio verify header naming its own offset. A block whose first 4 KiB is zero
/// was not written when the snapshot was taken (or, for a 1 MiB block, only its later part
/// was: a write in flight, not yet acknowledged). Returns how many held a header.
fn zero_or_fio_blocks(path: &Path, offset: u64, len: u64, bs: u64) -> Result<u64> {
    let data = image::read_range(path, offset, len)?;
    let mut written = 0;
    let mut bad = Vec::new();
    for (i, block) in data.chunks(bs as usize).enumerate() {
        let at = offset + i as u64 * bs;
        if block[..block.len().min(4096)].iter().all(|&b| b == 0) {
            continue;
        }
        let magic = u16::from_le_bytes([block[0], block[1]]);
        let mut off = [0u8; 8];
        off.copy_from_slice(&block[16..24]);
        if magic == FIO_HDR_MAGIC && u64::from_le_bytes(off) == at {
            written += 1;
        } else {
            bad.push(format!(
                "block at {at}: magic {magic:#06x}, header offset {}",
                u64::from_le_bytes(off)
            ));
        }
    }
    if bad.is_empty() {
        Ok(written)
    } else {
        Err(Error::Check(format!(
            "{} blocks of {} in {offset}..{} are neither zero nor the fio block written there; \
             first: {}",
            bad.len(),
            path.display(),
            offset + len,
            bad.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
        )))
    }
}

#[test]
fn fio_verify_on_four_queues_passes_while_snapshots_timer_commits_and_the_mover_run() {
    scenario("commits-under-load", |s| {
        let store = s.path("store");
        let st = store.as_os_str();
        let tier = |name: &str, file: &str| {
            std::ffi::OsString::from(format!("{name}={}:1G", s.path(file).display()))
        };
        dovetail(&[
            os("store"),
            os("create"),
            st,
            os("--tier"),
            &tier("fast", "fast.tier"),
            os("--tier"),
            &tier("slow", "slow.tier"),
            os("--extent-size"),
            os("16M"),
        ])?;
        dovetail(&[
            os("disk"),
            os("create"),
            st,
            os("vd"),
            os("--size"),
            os("256M"),
            os("--layout"),
            os("parallax-v2"),
        ])?;
        let control = s.path("ctl.sock");
        let control_arg = control
            .to_str()
            .ok_or_else(|| Error::Setup(format!("{} is not UTF-8", control.display())))?;
        let mut daemon = Daemon::dovetail_store(&store, &["vd"])
            .queues(4)
            .arg("--control")
            .arg(control_arg)
            .arg("--mover-interval")
            .arg("1")
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !control.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        dovetail_ctl(
            &control,
            &["tiers", "vd", "--cold-after", "1", "--hot-accesses", "1"],
        )?;

        let mut guest = Guest::new("commits-fio-4q")
            .disk(daemon.socket_of("vd"))
            .queues(4)
            .env("RAND_MB", RAND_MB)
            .env("SEQ_MB", SEQ_MB)
            // However fast the host, the guest writes for longer than the timer's period.
            .env("MIN_SECS", (TIMER + Duration::from_secs(2)).as_secs())
            .workload(workloads::FIO_VERIFY)
            .start()?;
        // The workload prints the disk's size just before fio starts.
        guest.wait_for_line("disk-mib")?;
        let fio_started = Instant::now();

        // Snapshots, one every SNAPSHOT_EVERY, and the mover's counter, until the guest is done.
        let done = Arc::new(AtomicBool::new(false));
        let host = {
            let done = Arc::clone(&done);
            let control = control.clone();
            std::thread::spawn(move || -> Result<(Vec<String>, Vec<f64>, u64)> {
                let mut names = Vec::new();
                let mut pauses_ms = Vec::new();
                let mut moved_max = 0;
                while !done.load(Ordering::Acquire) {
                    let name = format!("under-load-{}", names.len() + 1);
                    let reply =
                        dovetail_ctl(&control, &["--json", "snapshot", "vd", "--name", &name])?;
                    pauses_ms.push(json_u64(&reply, "total_us").unwrap_or(0) as f64 / 1000.0);
                    names.push(name);
                    moved_max = moved_max.max(moved(&control)?);
                    let until = Instant::now() + SNAPSHOT_EVERY;
                    while Instant::now() < until && !done.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                Ok((names, pauses_ms, moved_max))
            })
        };
        let run = guest.finish();
        let fio_s = fio_started.elapsed();
        done.store(true, Ordering::Release);
        let (names, pauses_ms, moved_during) = host
            .join()
            .map_err(|_| Error::Check("the snapshot thread panicked".into()))??;
        run?.expect_ok(&["queues", "fio-rand-4k", "fio-seq-1m", "all-queues-used"])?;
        say(&format!(
            "commits-under-load: fio ran {:.1} s; {} snapshots (pauses {:?} ms); the mover \
             moved {moved_during} blocks meanwhile",
            fio_s.as_secs_f64(),
            names.len(),
            pauses_ms
        ));
        if fio_s < TIMER + Duration::from_secs(1) {
            return Err(Error::Check(format!(
                "the guest wrote for {fio_s:?} only: no annotation timer commit ({TIMER:?}) \
                 is sure to have run under its writes"
            )));
        }
        if names.len() < 3 {
            return Err(Error::Check(format!(
                "only {} snapshots were taken while the guest ran",
                names.len()
            )));
        }
        if moved_during == 0 {
            return Err(Error::Check(
                "the mover moved no block while the guest ran".into(),
            ));
        }
        let listed = dovetail_ctl(&control, &["--json", "snapshots", "vd"])?;
        for name in &names {
            if !listed.contains(&format!("\"name\":\"{name}\"")) {
                return Err(Error::Check(format!(
                    "snapshot {name} is not listed: {listed}"
                )));
            }
        }
        daemon.terminate()?;

        let report = dovetail(&[os("store"), os("check"), st])?;
        if !report.contains("result: consistent") {
            return Err(Error::Check(format!("store check: {report}")));
        }
        // The last snapshot taken while fio wrote: zeros or the guest's own blocks.
        let last = names
            .last()
            .ok_or_else(|| Error::Check("no snapshot".into()))?;
        let snap = s.path("last-snapshot.img");
        dovetail(&[
            os("disk"),
            os("export"),
            st,
            os("vd"),
            os("--snapshot"),
            os(last),
            os("--to"),
            snap.as_os_str(),
        ])?;
        let rand = zero_or_fio_blocks(&snap, 0, RAND_MB * MIB, 4096)?;
        let seq = zero_or_fio_blocks(&snap, RAND_MB * MIB, SEQ_MB * MIB, MIB)?;
        say(&format!(
            "commits-under-load: snapshot {last} holds {rand} random and {seq} sequential fio \
             blocks, the rest zeros"
        ));
        // The disk as the guest left it: every block fio wrote, at its own offset.
        dovetail(&[
            os("disk"),
            os("snapshot"),
            st,
            os("vd"),
            os("--name"),
            os("after-guest"),
        ])?;
        let after = s.path("after-guest.img");
        dovetail(&[
            os("disk"),
            os("export"),
            st,
            os("vd"),
            os("--snapshot"),
            os("after-guest"),
            os("--to"),
            after.as_os_str(),
        ])?;
        image::check_fio_blocks(&after, 0, RAND_MB * MIB, 4096)?;
        image::check_fio_blocks(&after, RAND_MB * MIB, SEQ_MB * MIB, MIB)?;
        Ok(())
    });
}
