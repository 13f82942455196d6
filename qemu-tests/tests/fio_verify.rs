//! Scenario 1: fio verify (crc32c) through one virtqueue and through four.

mod common;

use dovetail_qemu_tests::{scenario, DaemonKind};

#[test]
fn fio_verify_one_queue() {
    scenario("fio-verify-1q", |s| {
        common::fio_verify(s, DaemonKind::under_test(), 1)
    });
}

#[test]
fn fio_verify_four_queues() {
    scenario("fio-verify-4q", |s| {
        common::fio_verify(s, DaemonKind::under_test(), 4)
    });
}
