//! Scenario 5: `--read-only`. The guest sees a read-only disk, reads a host-written pattern back,
//! every write, discard, write-zeroes and mkfs fails, and the image is byte-identical afterwards.
//!
//! A Linux guest refuses writes to a disk that advertises VIRTIO_BLK_F_RO before they reach the
//! daemon (EPERM), so the daemon's own rejection of a write request (VIRTIO_BLK_S_IOERR) cannot be
//! driven from here; that belongs to the backend's request tests.

use dovetail_qemu_tests::image::{self, MIB};
use dovetail_qemu_tests::{scenario, workloads, Daemon, Error, Guest};

const IMAGE_MB: u64 = 64;
const CHECK_AT: u64 = 4;
const CHECK_MB: u64 = 8;

#[test]
fn read_only_disk() {
    scenario("read-only", |s| {
        let image = s.path("disk.img");
        let len = usize::try_from(IMAGE_MB * MIB).map_err(|_| Error::Check("size".into()))?;
        let pattern = image::pattern(len, 5);
        image::write_file(&image, &pattern)?;
        let start = (CHECK_AT * MIB) as usize;
        let check_sha = image::sha256(&pattern[start..start + (CHECK_MB * MIB) as usize])?;

        let mut daemon = Daemon::under_test(&image).read_only().spawn()?;
        let run = Guest::new("read-only")
            .disk(daemon.socket())
            .env("CHECK_AT", CHECK_AT)
            .env("CHECK_MB", CHECK_MB)
            .env("CHECK_SHA", &check_sha)
            .workload(workloads::READ_ONLY)
            .boot()?;
        run.expect_ok(&[
            "ro-flag",
            "read-pattern",
            "read-all",
            "write-rejected",
            "discard-rejected",
            "zeroout-rejected",
            "mkfs-rejected",
            "read-pattern-after",
        ])?;
        daemon.terminate()?;

        if std::fs::read(&image).map_err(|e| Error::Check(format!("reading the image: {e}")))?
            != pattern
        {
            return Err(Error::Check(
                "the read-only image changed while served".into(),
            ));
        }
        Ok(())
    });
}
