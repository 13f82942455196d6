//! Promote proves what it trusts, and a store's `maps/` is checked and kept safe, through the
//! real `dovetail` binary:
//!
//! - a damaged presence map (bytes 4096..4608 set to 0xff, as a user found) is reported by
//!   `store check`, not believed by `serve`, and `ctl promote` is refused; a map forged with
//!   valid checksums is caught by the verification pass, which names the blocks and leaves the
//!   disk teed; `disk export` still gives the original bytes;
//! - the offline `dovetail promote` runs the same pass;
//! - `store check` reports a map with a bad header, a deleted map of a migration under way, and
//!   orphans (which `serve` removes);
//! - `ctl migrate --rate` on a running copy-out persists the new rate;
//! - symlinks planted in `maps/` are refused and their targets left unchanged.

mod cli;
mod serve;

use std::path::{Path, PathBuf};

use cli::{dovetail, fails, ok, path};
use dovetail_migrate::presence::PresenceMap;
use serve::{ctl_ok, ctl_output, log_tail, Daemon};

const TAG: &str = "promote_verify";
const SIZE: usize = 16 << 20;
const BLOCKS: u64 = (SIZE / 4096) as u64;

/// A random 16 MiB image at `DIR/src.img`.
fn source_image(dir: &Path) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(dir.join("src.img"), &data).expect("write the source image");
    data
}

/// The setup: store `DIR/st`, disk `vd` imported from 16 MiB of random data, teed to a
/// parallax-v1 candidate under mirror-only, served once and stopped (so its map exists).
/// Returns the data and the candidate's map path.
fn teed_disk(dir: &Path) -> (Vec<u8>, PathBuf) {
    let st = dir.join("st");
    ok(&["store", "create", path(&st), "--size", "1G"]);
    let data = source_image(dir);
    ok(&[
        "disk",
        "import",
        path(&st),
        "vd",
        "--from",
        path(&dir.join("src.img")),
    ]);
    ok(&[
        "disk",
        "tee",
        path(&st),
        "vd",
        "--candidate",
        "parallax-v1",
        "--policy",
        "mirror-only",
    ]);
    Daemon::start(dir, TAG, "first serve", &[]).terminate();
    (data, the_map(dir))
}

/// The one presence map in `DIR/st/maps`.
fn the_map(dir: &Path) -> PathBuf {
    let maps: Vec<PathBuf> = std::fs::read_dir(dir.join("st/maps"))
        .expect("maps/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "map"))
        .collect();
    assert_eq!(maps.len(), 1, "one presence map: {maps:?}");
    maps[0].clone()
}

fn key_of(map: &Path) -> u64 {
    map.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("a key")
}

fn store_check(dir: &Path) -> (bool, String) {
    let out = dovetail(&["store", "check", path(&dir.join("st"))]);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn export(dir: &Path) -> Vec<u8> {
    let to = dir.join("out.img");
    let _ = std::fs::remove_file(&to);
    ok(&[
        "disk",
        "export",
        path(&dir.join("st")),
        "vd",
        "--to",
        path(&to),
    ]);
    std::fs::read(&to).expect("read the export")
}

/// Marks every block of the map present with valid checksums: a consistent forgery.
fn forge(map: &Path) {
    let m = PresenceMap::open(map, BLOCKS, key_of(map)).expect("open the map");
    m.insert_range(0, BLOCKS);
    m.close_clean().expect("close the forged map");
}

fn ctl_fails(dir: &Path, args: &[&str]) -> String {
    let out = ctl_output(dir, args);
    assert!(!out.status.success(), "ctl {args:?} should fail: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_damaged_or_forged_presence_map_never_promotes_an_empty_candidate() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    let (data, map) = teed_disk(dir);
    let key = key_of(&map);

    // The user's damage: bytes 4096..4608 (the first sector of the bitmap) set to 0xff.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&map)
        .expect("open the map");
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xff; 512], 4096).expect("damage");
    drop(f);
    let (consistent, report) = store_check(dir);
    assert!(
        !consistent,
        "store check must not pass a damaged map:\n{report}"
    );
    assert!(
        report.contains(&format!("maps/{key}.map")) && report.contains("fail their checksum"),
        "{report}"
    );

    let d = Daemon::start(dir, TAG, "damaged map", &[]);
    let status = ctl_ok(dir, &["--json", "status", "vd"]);
    assert!(
        !status.contains(&format!("\"blocks_present\":{BLOCKS}")),
        "serve must not believe the candidate holds every block: {status}"
    );
    let e = ctl_fails(dir, &["promote", "vd"]);
    assert!(e.contains(&format!("holds 0 of {BLOCKS} blocks")), "{e}");
    d.terminate();
    assert!(
        log_tail(dir, 80).contains("failed their checksum"),
        "{}",
        log_tail(dir, 80)
    );

    // A forgery with valid checksums: only the verification pass can catch it.
    forge(&map);
    let d = Daemon::start(dir, TAG, "forged map", &[]);
    let e = ctl_fails(dir, &["promote", "vd"]);
    assert!(
        e.contains("promote refused")
            && e.contains(&format!("{BLOCKS} block(s) of the candidate differ"))
            && e.contains("4 KiB blocks 0, 1, 2,")
            && e.contains("more"),
        "{e}"
    );
    let st = ctl_ok(dir, &["--json", "status", "vd"]);
    assert!(
        st.contains(&format!("\"version\":{key}")) && st.contains("\"state\":\"active\""),
        "the disk stays teed to its candidate: {st}"
    );
    let m = ctl_ok(dir, &["migrate", "vd", "--status"]);
    assert!(
        m.contains("verification pass failed") && m.contains("block(s) differ"),
        "{m}"
    );
    let ev = ctl_ok(dir, &["--json", "events"]);
    assert!(ev.contains("verify-mismatch"), "{ev}");
    d.terminate();

    // Offline, the same.
    let e = fails(&["promote", path(&dir.join("st")), "vd"]);
    assert!(e.contains("differ from the trusted version"), "{e}");
    assert_eq!(
        export(dir),
        data,
        "the trusted version still holds the data"
    );
    // The candidate was never made trusted.
    let list = ok(&["disk", "list", path(&dir.join("st"))]);
    assert!(list.contains(&key.to_string()), "{list}");
}

#[test]
fn promote_verifies_then_swaps_live_and_offline() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    let (data, _) = teed_disk(dir);
    let st = dir.join("st");
    let out = ok(&["migrate", path(&st), "vd"]);
    assert!(out.contains("dovetail promote"), "{out}");
    // Offline: the pass runs, then the catalog swap.
    let out = ok(&["promote", path(&st), "vd"]);
    assert!(
        out.contains("after the verification pass found every block equal"),
        "{out}"
    );
    assert_eq!(export(dir), data);
    assert_eq!(
        std::fs::read_dir(st.join("maps")).expect("maps").count(),
        0,
        "the map and record of the promoted candidate are gone"
    );

    // Live: the pass shows in migrate --status, and passes.
    ok(&[
        "disk",
        "tee",
        path(&st),
        "vd",
        "--candidate",
        "parallax-v1",
        "--policy",
        "mirror-only",
    ]);
    let d = Daemon::start(dir, TAG, "live promote", &[]);
    ctl_ok(dir, &["migrate", "vd", "--rate", "0", "--wait"]);
    let out = ctl_ok(dir, &["promote", "vd", "--verify-rate", "64M"]);
    assert!(out.contains("promoted candidate"), "{out}");
    assert!(log_tail(dir, 40).contains("verification pass: every block"));
    d.terminate();
    assert_eq!(export(dir), data);
    let (consistent, report) = store_check(dir);
    assert!(consistent, "{report}");
}

#[test]
fn store_check_reports_bad_headers_lost_maps_and_orphans() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    let (_, map) = teed_disk(dir);
    let key = key_of(&map);
    let st = dir.join("st");

    // A bad header (magic): check reports it (it used to pass and then stop serve).
    let good = std::fs::read(&map).expect("read the map");
    let mut bad = good.clone();
    bad[0] = b'X';
    std::fs::write(&map, &bad).expect("write");
    let (consistent, report) = store_check(dir);
    assert!(!consistent && report.contains("bad magic"), "{report}");
    std::fs::write(&map, &good).expect("restore");

    // A deleted map of a migration under way: reported, and loudly logged when served.
    let d = Daemon::start(dir, TAG, "start a slow migration", &[]);
    ctl_ok(dir, &["migrate", "vd", "--rate", "64K"]);
    d.terminate();
    std::fs::remove_file(&map).expect("delete the map");
    let (consistent, report) = store_check(dir);
    assert!(
        !consistent && report.contains("is missing") && report.contains("restarts from block 0"),
        "{report}"
    );
    let d = Daemon::start(dir, TAG, "lost map", &[]);
    d.terminate();
    let log = log_tail(dir, 60);
    assert!(
        log.contains("IS MISSING") && log.contains("restarts from block 0"),
        "{log}"
    );

    // Orphans: the map and record of a version that is trusted now (a kill -9 right after the
    // promote's commit leaves them); check reports them, serve removes them.
    ok(&["migrate", path(&st), "vd"]);
    ok(&["promote", path(&st), "vd"]);
    let orphan_map = st.join(format!("maps/{key}.map"));
    let orphan_rec = st.join(format!("maps/{key}.migration"));
    std::fs::write(&orphan_map, &good).expect("plant an orphan map");
    std::fs::write(
        &orphan_rec,
        b"{\"version\":1,\"mode\":\"copy-out\",\"rate\":0}\n",
    )
    .expect("plant an orphan record");
    let (consistent, report) = store_check(dir);
    assert!(consistent, "orphans are harmless: {report}");
    assert!(
        report.contains(&format!("maps/{key}.map is an orphan"))
            && report.contains(&format!("maps/{key}.migration is an orphan")),
        "{report}"
    );
    let d = Daemon::start(dir, TAG, "orphans", &[]);
    d.terminate();
    assert!(!orphan_map.exists() && !orphan_rec.exists());
    assert!(log_tail(dir, 40).contains("removed the orphan"));
}

#[test]
fn a_new_copy_out_rate_survives_a_restart() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    let (_, map) = teed_disk(dir);
    let key = key_of(&map);
    let record = dir.join(format!("st/maps/{key}.migration"));
    let d = Daemon::start(dir, TAG, "rate", &[]);
    ctl_ok(dir, &["migrate", "vd", "--rate", "64K"]);
    ctl_ok(dir, &["migrate", "vd", "--rate", "128K"]);
    let rec = std::fs::read(&record).expect("the record");
    assert_eq!(rec.len(), 64);
    assert_eq!(&rec[0..8], b"DVTLMREC");
    assert_eq!(
        u64::from_le_bytes(rec[24..32].try_into().expect("8 bytes")),
        128 << 10
    );
    d.terminate();
    let d = Daemon::start(dir, TAG, "rate after restart", &[]);
    // The copy-out thread logs its rate once it has resumed, a moment after the daemon listens.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let log = loop {
        let log = log_tail(dir, 30);
        if log.contains("rate 128 KiB/s") || std::time::Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(log.contains("rate 128 KiB/s"), "{log}");
    ctl_ok(dir, &["migrate", "vd", "--rate", "0"]);
    d.terminate();
    let log = log_tail(dir, 30);
    assert!(log.contains("rate changed to no limit"), "{log}");
    assert!(!log.contains("0 MiB/s"), "{log}");
}

#[test]
fn symlinks_planted_in_maps_are_refused_and_their_targets_unchanged() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    let (_, map) = teed_disk(dir);
    let key = key_of(&map);
    let target = dir.join("precious");
    std::fs::write(&target, b"not yours").expect("target");

    // At the record's temporary name: `ctl migrate` is refused, the target untouched.
    let tmp = dir.join(format!("st/maps/{key}.migration.tmp"));
    std::os::unix::fs::symlink(&target, &tmp).expect("symlink");
    let d = Daemon::start(dir, TAG, "symlink at the record's tmp", &[]);
    let e = ctl_fails(dir, &["migrate", "vd", "--rate", "64K"]);
    assert!(e.contains("not a regular file"), "{e}");
    d.terminate();
    assert_eq!(std::fs::read(&target).expect("target"), b"not yours");
    std::fs::remove_file(&tmp).expect("remove the symlink");

    // At the map's path: opening the disk's candidate is refused.
    std::fs::remove_file(&map).expect("remove the map");
    std::os::unix::fs::symlink(&target, &map).expect("symlink");
    let e = fails(&["migrate", path(&dir.join("st")), "vd"]);
    assert!(e.contains("symbolic link"), "{e}");
    let (consistent, report) = store_check(dir);
    assert!(!consistent && report.contains("symbolic link"), "{report}");
    assert_eq!(std::fs::read(&target).expect("target"), b"not yours");
}

#[test]
fn maps_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    let (_, map) = teed_disk(dir);
    let d = Daemon::start(dir, TAG, "modes", &[]);
    ctl_ok(dir, &["migrate", "vd", "--rate", "64K"]);
    d.terminate();
    for e in std::fs::read_dir(map.parent().expect("maps")).expect("maps") {
        let p = e.expect("entry").path();
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
    }
}
