//! Scenario 7: scenario 1 against qemu-storage-daemon. It proves the harness, the guest and the
//! workload on a known-good server, so a failure elsewhere that passes here points at dovetail.

mod common;

use dovetail_qemu_tests::{scenario, DaemonKind};

#[test]
fn qsd_fio_verify_one_queue() {
    scenario("qsd-fio-verify-1q", |s| {
        common::fio_verify(s, DaemonKind::QemuStorageDaemon, 1)
    });
}

#[test]
fn qsd_fio_verify_four_queues() {
    scenario("qsd-fio-verify-4q", |s| {
        common::fio_verify(s, DaemonKind::QemuStorageDaemon, 4)
    });
}
