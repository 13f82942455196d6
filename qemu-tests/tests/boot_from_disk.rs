//! Scenario 3: the guest's root filesystem is the served disk. A small initramfs loads the virtio
//! and ext4 modules and switch_roots to /dev/vda; /init and the workload run from the disk. The
//! host then reads what the guest wrote straight out of the image.

use dovetail_qemu_tests::{image, scenario, workloads, Daemon, Error, Guest};

#[test]
fn boot_from_served_disk() {
    scenario("boot-from-disk", |s| {
        let image = s.path("root.img");
        image::build_root_image(&image, "64M", workloads::ROOT_DISK, &[])?;
        let mut daemon = Daemon::under_test(&image).spawn()?;
        let run = Guest::new("root-disk")
            .disk(daemon.socket())
            .boot_from_disk()
            .boot()?;
        run.expect_ok(&[
            "root-device",
            "root-fstype",
            "root-rw",
            "write-probe",
            "write-data",
            "reread",
        ])?;
        daemon.terminate()?;

        image::e2fsck(&image)?;
        let probe = run
            .info("probe")
            .ok_or_else(|| Error::Check("the guest printed no probe".into()))?;
        let on_disk = image::debugfs_cat(&image, "/probe.txt")?;
        let on_disk = String::from_utf8_lossy(&on_disk);
        if on_disk.trim() != probe {
            return Err(Error::Check(format!(
                "/probe.txt in the image holds {on_disk:?}, the guest wrote {probe:?}"
            )));
        }
        let data = image::debugfs_cat(&image, "/data.bin")?;
        let want = run
            .info("data-sha256")
            .ok_or_else(|| Error::Check("the guest printed no data-sha256".into()))?;
        let got = image::sha256(&data)?;
        if got != want || data.len() != 8 << 20 {
            return Err(Error::Check(format!(
                "/data.bin in the image: {} bytes, sha256 {got}; the guest wrote 8 MiB with sha256 {want}",
                data.len()
            )));
        }
        Ok(())
    });
}
