//! Scenario bodies shared by several test files.

use dovetail_qemu_tests::image::{self, MIB};
use dovetail_qemu_tests::{workloads, Daemon, DaemonKind, Guest, Result, Scenario};

/// Scenario 1 (and 7 with qemu-storage-daemon): fio verify of random 4 KiB and sequential 1 MiB
/// writes through `queues` virtqueues, then a host-side look at the image: every block fio wrote
/// carries fio's header with its own offset.
pub fn fio_verify(s: &Scenario, kind: DaemonKind, queues: u16) -> Result<()> {
    fio_verify_with(s, kind, queues, &[])
}

/// [`fio_verify`] with extra daemon arguments (e.g. `--cache none`).
pub fn fio_verify_with(s: &Scenario, kind: DaemonKind, queues: u16, args: &[&str]) -> Result<()> {
    let image = s.path("disk.img");
    let mut builder = Daemon::of_kind(kind, &image).size("256M").queues(queues);
    for a in args {
        builder = builder.arg(a);
    }
    let mut daemon = builder.spawn()?;
    Guest::new(&format!("fio-{queues}q"))
        .disk(daemon.socket())
        .queues(queues)
        .env("RAND_MB", 32)
        .env("SEQ_MB", 64)
        .workload(workloads::FIO_VERIFY)
        .boot()?
        .expect_ok(&["queues", "fio-rand-4k", "fio-seq-1m", "all-queues-used"])?;
    daemon.terminate()?;
    image::check_fio_blocks(&image, 0, 32 * MIB, 4096)?;
    image::check_fio_blocks(&image, 32 * MIB, 64 * MIB, MIB)?;
    Ok(())
}
