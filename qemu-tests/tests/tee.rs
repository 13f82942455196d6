//! A disk served through a Tee whose candidate is faulty: `dovetail disk tee` attaches a
//! parallax-v1 candidate that flips bits in its reads, under `sync-cross-checks`. The guest runs
//! the fio verify workload (crc32c on every block it reads back) and must see zero verify errors:
//! every read of a block the candidate holds is compared before the guest gets its data, and the
//! first flipped bit quarantines the candidate while the guest carries on with the trusted
//! version. Afterwards the daemon's log names the quarantine, the store's catalog records it
//! (`disk list`), `store check` finds the store consistent, and `disk untee` drops the candidate.

use dovetail_qemu_tests::{
    create_store, dovetail_cli as dovetail, scenario, workloads, Daemon, Error, Guest,
};

#[test]
fn faulty_candidate_is_quarantined_and_the_guest_sees_no_error() {
    scenario("tee", |s| {
        let store = s.path("store");
        let st = store.as_os_str();
        create_store(&store, "1G", &[("vd", "256M")])?;
        dovetail(&[
            "disk".as_ref(),
            "tee".as_ref(),
            st,
            "vd".as_ref(),
            "--candidate".as_ref(),
            "parallax-v1".as_ref(),
            "--policy".as_ref(),
            "sync-cross-checks".as_ref(),
            "--fault".as_ref(),
            "flip-read:prob=0.02".as_ref(),
        ])?;
        let mut daemon = Daemon::dovetail_store(&store, &["vd"]).queues(2).spawn()?;
        let guest = Guest::new("tee-fio")
            .disk(daemon.socket_of("vd"))
            .queues(2)
            .env("RAND_MB", 32)
            .env("SEQ_MB", 64)
            .workload(workloads::FIO_VERIFY)
            .start()?;
        guest
            .finish()?
            .expect_ok(&["queues", "fio-rand-4k", "fio-seq-1m", "all-queues-used"])?;
        daemon.terminate()?;
        let log = std::fs::read_to_string(daemon.log_path())
            .map_err(|e| Error::Setup(format!("reading the daemon's log: {e}")))?;
        if !log.contains("quarantined") {
            return Err(Error::Check(format!(
                "the daemon's log does not report a quarantine:\n{log}"
            )));
        }
        let list = dovetail(&["disk".as_ref(), "list".as_ref(), st])?;
        if !list.contains("quarantined") {
            return Err(Error::Check(format!(
                "`disk list` does not show the quarantine:\n{list}"
            )));
        }
        let report = dovetail(&["store".as_ref(), "check".as_ref(), st])?;
        if !report.contains("result: consistent") {
            return Err(Error::Check(format!("store check: {report}")));
        }
        let untee = dovetail(&["disk".as_ref(), "untee".as_ref(), st, "vd".as_ref()])?;
        let list = dovetail(&["disk".as_ref(), "list".as_ref(), st])?;
        if list.contains("quarantined") {
            return Err(Error::Check(format!(
                "after `{untee}` the disk is still teed:\n{list}"
            )));
        }
        Ok(())
    });
}
