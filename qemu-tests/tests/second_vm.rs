//! One daemon, two guests in turn: the first writes an ext4 filesystem with files and their
//! checksums and powers off; the daemon keeps running; a second guest connects to the same socket
//! and verifies everything the first wrote.

use dovetail_qemu_tests::{image, scenario, workloads, Daemon, DaemonKind, Error, Guest};

#[test]
fn second_vm_reads_what_the_first_wrote() {
    scenario("second-vm", |s| {
        let image = s.path("disk.img");
        let kind = DaemonKind::under_test();
        // qemu-storage-daemon's vhost-user-blk export has no serial number option.
        let serial = (kind == DaemonKind::Dovetail).then_some("dovetail-second-vm");
        let mut builder = Daemon::of_kind(kind, &image).size("256M");
        if let Some(id) = serial {
            builder = builder.serial(id);
        }
        let mut daemon = builder.spawn()?;
        let pid = daemon.pid();

        let guest = |name: &str, phase: &str| {
            let mut g = Guest::new(name)
                .disk(daemon.socket())
                .env("PHASE", phase)
                .workload(workloads::HANDOVER);
            if let Some(id) = serial {
                g = g.env("EXPECT_SERIAL", id);
            }
            g
        };
        let first = guest("first", "write").boot()?;
        first.expect_ok(&["mkfs", "mount", "write-files", "umount"])?;
        let second = guest("second", "verify").boot()?;
        second.expect_ok(&["mount", "verify", "umount", "fsck"])?;
        if serial.is_some() {
            second.expect_ok(&["serial"])?;
        }
        if first.info("sums") != second.info("sums") || first.info("sums").is_none() {
            return Err(Error::Check(format!(
                "SHA256SUMS differs between guests: {:?} vs {:?}",
                first.info("sums"),
                second.info("sums")
            )));
        }
        if !daemon.is_running() || daemon.pid() != pid {
            return Err(Error::Check(
                "the daemon did not keep running between the guests".into(),
            ));
        }
        daemon.terminate()?;
        image::e2fsck(&image)?;
        Ok(())
    });
}
