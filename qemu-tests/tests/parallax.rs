//! Disks of a store, on the parallax-v1 layout: one daemon serves two disks, each on its own
//! socket, to two guests running at the same time: one runs the fio verify workload, the other
//! the ext4 workload. Afterwards the ext4 disk is snapshotted and the snapshot exported to a raw
//! image whose filesystem `e2fsck` finds clean, and `dovetail store check` finds the store
//! consistent. (The snapshot is taken with the daemon stopped: snapshots of a disk being served
//! need the control socket.)

use dovetail_qemu_tests::{
    create_store, dovetail_cli as dovetail, image, scenario, workloads, Daemon, Error, Guest,
};

#[test]
fn two_guests_on_parallax_disks_of_one_store() {
    scenario("parallax", |s| {
        let store = s.path("store");
        let st = store.as_os_str();
        create_store(&store, "1G", &[("fio", "256M"), ("ext4", "256M")])?;
        let mut daemon = Daemon::dovetail_store(&store, &["fio", "ext4"])
            .queues(2)
            .spawn()?;
        let fio = Guest::new("parallax-fio")
            .disk(daemon.socket_of("fio"))
            .queues(2)
            .env("RAND_MB", 32)
            .env("SEQ_MB", 64)
            .workload(workloads::FIO_VERIFY)
            .start()?;
        let ext4 = Guest::new("parallax-ext4")
            .disk(daemon.socket_of("ext4"))
            .queues(2)
            .workload(workloads::EXT4)
            .start()?;
        fio.finish()?
            .expect_ok(&["queues", "fio-rand-4k", "fio-seq-1m", "all-queues-used"])?;
        ext4.finish()?.expect_ok(workloads::EXT4_STEPS)?;
        daemon.terminate()?;
        // Freeze the ext4 disk, export the snapshot to a raw image, and check its filesystem
        // on the host.
        dovetail(&[
            "disk".as_ref(),
            "snapshot".as_ref(),
            st,
            "ext4".as_ref(),
            "--name".as_ref(),
            "after-guest".as_ref(),
        ])?;
        let exported = s.path("ext4-snapshot.img");
        dovetail(&[
            "disk".as_ref(),
            "export".as_ref(),
            st,
            "ext4".as_ref(),
            "--snapshot".as_ref(),
            "after-guest".as_ref(),
            "--to".as_ref(),
            exported.as_os_str(),
        ])?;
        image::e2fsck(&exported)?;
        let report = dovetail(&["store".as_ref(), "check".as_ref(), st])?;
        if !report.contains("result: consistent") {
            return Err(Error::Check(format!("store check: {report}")));
        }
        Ok(())
    });
}
