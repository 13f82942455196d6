//! Scenario 2: ext4 on a served disk: mkfs, files, sync, checksums, remount, verify, e2fsck in the
//! guest, then e2fsck on the host image after the daemon flushed and exited. Two queues (and two
//! vCPUs), so the filesystem's I/O is spread over both queue workers.

use dovetail_qemu_tests::{image, scenario, workloads, Daemon, Guest};

#[test]
fn ext4_write_remount_verify() {
    scenario("ext4", |s| {
        let image = s.path("disk.img");
        let mut daemon = Daemon::under_test(&image).size("256M").queues(2).spawn()?;
        Guest::new("ext4")
            .disk(daemon.socket())
            .queues(2)
            .workload(workloads::EXT4)
            .boot()?
            .expect_ok(workloads::EXT4_STEPS)?;
        daemon.terminate()?;
        image::e2fsck(&image)?;
        Ok(())
    });
}
