//! Migration under a running guest: the guest runs fio verify rounds continuously (random 4 KiB
//! and sequential 1 MiB writes, crc32c, read back and checked; the `live-verify` workload) on a
//! parallax-v1 disk of a store holding imported data, while the host, over the control socket,
//! attaches a parallax-v1 candidate under `sync-cross-checks`, starts the copy-out (rate limited),
//! relaxes the policy to `lazy-hashes` while the copy-out runs, waits for the copy-out to bring
//! every block over, and promotes the candidate to trusted. The guest must see zero verify
//! errors: in every round, in a whole round run after the promotion (served by the former
//! candidate alone) and in a reference region it wrote before the tee, which only the copy-out
//! brought to the candidate. `ctl status` must show the copy-out progressing, no mismatch or
//! quarantine, and after `promote` the former candidate as trusted and no candidate; afterwards
//! `store check` passes, `disk list` shows the new trusted version, and the data imported before
//! the guest started (never written by it) exports unchanged. Prints the copy-out's rate and the
//! pauses of tee, policy and promote. Run twice: into a parallax-v1 candidate and into a
//! parallax-v2 one, whose annotations must then show where the guest wrote.

use std::path::Path;
use std::time::{Duration, Instant};

use dovetail_qemu_tests::{
    dovetail_cli as dovetail, dovetail_ctl, json_u64, say, scenario, workloads, Daemon, Error,
    Guest, Result,
};

const MIB: u64 = 1 << 20;
const DISK_MIB: u64 = 256;
/// Imported before the guest starts, where the live-verify workload never writes (it writes
/// 0-16 MiB, 64-96 MiB and 192-224 MiB).
const IMPORT_AT_MIB: u64 = 128;
const IMPORT_MIB: u64 = 32;
/// The copy-out's rate limit while the guest runs.
const COPY_RATE: &str = "12M";

/// The text after the first `"key":` in compact JSON (the key's value and what follows).
fn after<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":");
    json.find(&pat).map(|at| &json[at + pat.len()..])
}

/// The string value of the first `"key":"value"`.
fn json_str<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let rest = after(json, key)?.strip_prefix('"')?;
    Some(&rest[..rest.find('"')?])
}

/// The number (integer or float) of the first `"key":N`.
fn json_f64(json: &str, key: &str) -> Option<f64> {
    let rest = after(json, key)?;
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// A `"pause"` object's total and drain in ms, as text.
fn pause_of(what: &str, reply: &str) -> Result<(u64, String)> {
    let p = after(reply, "pause")
        .ok_or_else(|| Error::Check(format!("`{what}` reported no pause: {reply}")))?;
    let total = json_u64(p, "total_us")
        .ok_or_else(|| Error::Check(format!("`{what}`: no total_us: {reply}")))?;
    let drain = json_u64(p, "drain_us").unwrap_or(0);
    let change = json_u64(p, "change_us").unwrap_or(0);
    Ok((
        total,
        format!(
            "{what} {:.3} ms (drain {:.3}, change {:.3})",
            total as f64 / 1e3,
            drain as f64 / 1e3,
            change as f64 / 1e3
        ),
    ))
}

/// `ctl --json status vd`, checked: a candidate under `policy`, active, never mismatched or
/// quarantined. Returns the reply.
fn status_with_candidate(control: &Path, policy: &str) -> Result<String> {
    let status = dovetail_ctl(control, &["--json", "status", "vd"])?;
    let cand = after(&status, "candidate").unwrap_or("null");
    let problem = if cand.starts_with("null") {
        Some("no candidate".to_string())
    } else if json_str(cand, "policy") != Some(policy) {
        Some(format!("policy is not {policy}"))
    } else if json_str(cand, "state") != Some("active") {
        Some("the candidate is not active".to_string())
    } else if json_u64(cand, "mismatches") != Some(0) || json_u64(cand, "quarantines") != Some(0) {
        Some("the candidate mismatched or was quarantined".to_string())
    } else {
        None
    };
    match problem {
        Some(p) => Err(Error::Check(format!("ctl status vd: {p}: {status}"))),
        None => Ok(status),
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), for the imported data.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

#[test]
fn fio_verify_runs_through_copy_out_relaxed_policy_and_promote() {
    migration_scenario("migrate", "parallax-v1");
}

/// The same, into a parallax-v2 candidate (the annotated layout): afterwards its annotations
/// show the guest's workload.
#[test]
fn a_parallax_v1_disk_upgrades_to_parallax_v2_under_fio_verify() {
    migration_scenario("migrate-v2", "parallax-v2");
}

/// `ctl annotations vd --histogram 16` after the promotion to parallax-v2 and a whole verify
/// round served by it: 16 MiB parts; writes are counted where the guest wrote since the tee
/// (0-16 MiB, maybe 64-96 MiB) and nowhere else (not where only the copy-out wrote: the imported
/// data at 128-160 MiB, the reference region), and the reference region it verified after the
/// promotion shows reads. Returns a summary line.
fn check_annotations(control: &Path) -> Result<String> {
    let reply = dovetail_ctl(
        control,
        &["--json", "annotations", "vd", "--histogram", "16"],
    )?;
    if json_str(&reply, "layout") != Some("parallax-v2") {
        return Err(Error::Check(format!(
            "annotations of a parallax-v2 trusted: {reply}"
        )));
    }
    let hist =
        after(&reply, "histogram").ok_or_else(|| Error::Check(format!("no histogram: {reply}")))?;
    let parts: Vec<(u64, u64, u64)> = hist
        .split("\"first_block\":")
        .skip(1)
        .take(16)
        .map(|p| {
            let first = p
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(u64::MAX);
            (
                first,
                json_u64(p, "reads").unwrap_or(0),
                json_u64(p, "writes").unwrap_or(0),
            )
        })
        .collect();
    if parts.len() != 16 {
        return Err(Error::Check(format!(
            "16 histogram parts expected: {reply}"
        )));
    }
    let mut summary = Vec::new();
    for (i, &(first, reads, writes)) in parts.iter().enumerate() {
        let mib = i as u64 * 16;
        if first != mib * MIB / 4096 {
            return Err(Error::Check(format!(
                "part {i} starts at block {first}: {reply}"
            )));
        }
        // Random 4 KiB rounds (two of every three) write 0-16 MiB; sequential rounds write
        // 64-96 MiB (maybe none ran after the tee); the reference region, 192-224 MiB, was
        // written before the tee (the copy-out brought it over, uncounted) and is read back
        // after the promotion.
        let may_write = matches!(mib, 0 | 64 | 80);
        if mib == 0 && writes == 0 {
            return Err(Error::Check(format!(
                "no writes counted in 0-16 MiB, which the guest keeps writing: {reply}"
            )));
        }
        if matches!(mib, 192 | 208) && reads == 0 {
            return Err(Error::Check(format!(
                "no reads counted in {mib}-{} MiB, which the guest verified after the \
                 promotion: {reply}",
                mib + 16
            )));
        }
        if !may_write && writes != 0 {
            return Err(Error::Check(format!(
                "{writes} writes counted in {mib}-{} MiB, which the guest never writes: {reply}",
                mib + 16
            )));
        }
        summary.push(format!("{mib}M:{reads}r/{writes}w"));
    }
    Ok(summary.join(" "))
}

fn migration_scenario(name: &str, layout: &str) {
    scenario(name, |s| {
        // The disk: imported from an image that holds random data at 128-160 MiB.
        let store = s.path("store");
        let st = store.as_os_str();
        dovetail(&[os("store"), os("create"), st, os("--size"), os("1G")])?;
        let image = s.path("import.img");
        let imported = random_bytes(0x5eed_1234, (IMPORT_MIB * MIB) as usize);
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::create(&image)
                .map_err(|e| Error::Setup(format!("creating {}: {e}", image.display())))?;
            f.set_len(DISK_MIB * MIB)
                .and_then(|()| f.write_all_at(&imported, IMPORT_AT_MIB * MIB))
                .map_err(|e| Error::Setup(format!("writing {}: {e}", image.display())))?;
        }
        let out = dovetail(&[
            os("disk"),
            os("import"),
            os("--from"),
            image.as_os_str(),
            st,
            os("vd"),
        ])?;
        say(&format!("{name}: {}", out.trim()));
        let _ = std::fs::remove_file(&image);

        let control = s.path("ctl.sock");
        let control_arg = control
            .to_str()
            .ok_or_else(|| Error::Setup(format!("{} is not UTF-8", control.display())))?;
        let mut daemon = Daemon::dovetail_store(&store, &["vd"])
            .queues(2)
            .arg("--control")
            .arg(control_arg)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !control.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = dovetail_ctl(&control, &["--json", "status", "vd"])?;
        let trusted_before = json_u64(&status, "trusted_version")
            .ok_or_else(|| Error::Check(format!("no trusted version: {status}")))?;

        let started = Instant::now();
        let mut guest = Guest::new(name)
            .disk(daemon.socket_of("vd"))
            .queues(2)
            .env("RAND_MB", 16)
            .env("SEQ_MB", 32)
            .workload(workloads::LIVE_VERIFY)
            .start()?;
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
                layout,
                "--policy",
                "sync-cross-checks",
            ],
        )?;
        pauses.push(pause_of("tee", &reply)?);
        let status = status_with_candidate(&control, "sync-cross-checks")?;
        let candidate = after(&status, "candidate")
            .and_then(|c| json_u64(c, "version"))
            .ok_or_else(|| Error::Check(format!("no candidate version: {status}")))?;

        // Copy-out, rate limited, under sync-cross-checks first.
        let reply = dovetail_ctl(&control, &["--json", "migrate", "vd", "--rate", COPY_RATE])?;
        if json_str(&reply, "state") != Some("running") {
            return Err(Error::Check(format!("the copy-out did not start: {reply}")));
        }
        let copy_started = Instant::now();
        // Let it run under the strict policy until it has made progress and the guest's reads
        // of present blocks have been compared.
        let deadline = Instant::now() + Duration::from_secs(60);
        let (present_strict, compared) = loop {
            let status = status_with_candidate(&control, "sync-cross-checks")?;
            let m = after(&status, "migration").unwrap_or("");
            let present = json_u64(m, "blocks_present").unwrap_or(0);
            let compared = json_u64(&status, "compared_reads").unwrap_or(0);
            if present > 0 && compared > 0 && copy_started.elapsed() >= Duration::from_millis(1500)
            {
                break (present, compared);
            }
            if Instant::now() > deadline {
                return Err(Error::Check(format!(
                    "no copy-out progress or compared read within 60 s: {status}"
                )));
            }
            std::thread::sleep(Duration::from_millis(250));
        };

        // Relax the policy while the copy-out runs.
        let reply = dovetail_ctl(&control, &["--json", "policy", "vd", "lazy-hashes"])?;
        pauses.push(pause_of("policy lazy-hashes", &reply)?);
        let status = status_with_candidate(&control, "lazy-hashes")?;
        let m = after(&status, "migration").unwrap_or("");
        let total = json_u64(m, "blocks_total").unwrap_or(0);
        let present_relaxed = json_u64(m, "blocks_present").unwrap_or(0);
        if json_str(m, "state") != Some("running") || present_relaxed >= total {
            return Err(Error::Check(format!(
                "the copy-out should still run when the policy is relaxed: {m}"
            )));
        }

        // Wait for every block (polling the job's status: its figures are this copy-out's),
        // then promote.
        let deadline = Instant::now() + Duration::from_secs(600);
        let done = loop {
            let reply = dovetail_ctl(&control, &["--json", "migrate", "vd", "--status"])?;
            match json_str(&reply, "state") {
                Some("running") => {}
                Some("done") => break reply,
                _ => {
                    return Err(Error::Check(format!(
                        "the copy-out stopped before every block was present: {reply}"
                    )))
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Check(format!(
                    "the copy-out did not finish within 600 s: {reply}"
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let copy_secs = copy_started.elapsed().as_secs_f64();
        if json_u64(&done, "blocks_present") != json_u64(&done, "blocks_total") {
            return Err(Error::Check(format!(
                "the copy-out is done but not every block is present: {done}"
            )));
        }
        // `migrate --wait` on the finished copy-out agrees.
        let out = dovetail_ctl(&control, &["--json", "migrate", "vd", "--wait"])?;
        if json_u64(&out, "blocks_present") != Some(total) {
            return Err(Error::Check(format!("migrate --wait: {out}")));
        }
        status_with_candidate(&control, "lazy-hashes")?;
        let reply = dovetail_ctl(&control, &["--json", "promote", "vd"])?;
        let (promote_us, promote_text) = pause_of("promote", &reply)?;
        pauses.push((promote_us, promote_text));
        let status = dovetail_ctl(&control, &["--json", "status", "vd"])?;
        if !status.contains("\"candidate\":null")
            || !status.contains("\"migration\":null")
            || json_u64(&status, "trusted_version") != Some(candidate)
        {
            return Err(Error::Check(format!(
                "after promote, version {candidate} should be trusted with no candidate: {status}"
            )));
        }
        let changes = loop_started.elapsed();

        // One more whole round on the promoted version, then the reference region (written
        // before the tee: only the copy-out brought it to the candidate).
        std::thread::sleep(Duration::from_secs(1));
        guest.resume("changes-done")?;
        let run = guest.finish()?;
        run.expect_ok(workloads::LIVE_VERIFY_STEPS)?;
        if layout == "parallax-v2" {
            say(&format!(
                "{name}: annotations after promotion (16 MiB parts, reads/writes): {}",
                check_annotations(&control)?
            ));
        }

        let copy = after(&done, "copy_out").unwrap_or("");
        let rate = json_f64(copy, "rate_bytes_per_second").unwrap_or(0.0) / MIB as f64;
        let copied = json_u64(copy, "copied_blocks").unwrap_or(0);
        let zero = json_u64(copy, "zero_blocks").unwrap_or(0);
        let job_secs = json_f64(copy, "elapsed_seconds").unwrap_or(0.0);
        say(&format!(
            "{name}: copy-out of {total} blocks: {copied} copied ({} MiB), {zero} zero blocks \
             skipped, {:.1} MiB/s (limit {COPY_RATE}/s) over {job_secs:.1} s (ctl saw {copy_secs:.1} \
             s); {present_strict} blocks present when relaxed after {compared} compared reads",
            copied * 4096 / MIB,
            rate
        ));
        say(&format!(
            "{name} pauses: {}",
            pauses
                .iter()
                .map(|(_, t)| t.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        say(&format!(
            "{name}: {} verify rounds ({}) over {:.1}s of changes; guest ran {:.1}s",
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
        for needle in [
            "copy-out started",
            "copy-out finished",
            "policy changed from sync-cross-checks to lazy-hashes",
            "promoted candidate",
        ] {
            if !log.contains(needle) {
                return Err(Error::Check(format!("the daemon's log lacks {needle:?}")));
            }
        }
        let report = dovetail(&[os("store"), os("check"), st])?;
        if !report.contains("result: consistent") {
            return Err(Error::Check(format!("store check: {report}")));
        }
        let list = dovetail(&[os("disk"), os("list"), st])?;
        let row: Vec<&str> = list
            .lines()
            .find(|l| l.starts_with("vd "))
            .map(|l| l.split_whitespace().collect())
            .unwrap_or_default();
        // NAME SIZE(2) LAYOUT TRUSTED CANDIDATE ...
        if row.get(4) != Some(&candidate.to_string().as_str()) || row.get(5) != Some(&"-") {
            return Err(Error::Check(format!(
                "disk list should show version {candidate} (was {trusted_before}) as vd's \
                 trusted version and no candidate:\n{list}"
            )));
        }

        // The imported data, which only the copy-out moved, exports unchanged.
        let export = s.path("export.img");
        dovetail(&[
            os("disk"),
            os("export"),
            st,
            os("vd"),
            os("--to"),
            export.as_os_str(),
        ])?;
        let got = {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::open(&export)
                .map_err(|e| Error::Setup(format!("opening {}: {e}", export.display())))?;
            let mut b = vec![0u8; imported.len()];
            f.read_exact_at(&mut b, IMPORT_AT_MIB * MIB)
                .map_err(|e| Error::Setup(format!("reading {}: {e}", export.display())))?;
            b
        };
        if got != imported {
            let at = got
                .chunks(4096)
                .zip(imported.chunks(4096))
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(Error::Check(format!(
                "the imported data differs after the migration, first at block {} of the disk",
                IMPORT_AT_MIB * MIB / 4096 + at as u64
            )));
        }
        let _ = std::fs::remove_file(&export);
        Ok(())
    });
}
