//! Scenario 1: fio verify (crc32c) through one virtqueue and through four, and through four on
//! direct I/O (`--cache none`: O_DIRECT and io_uring, many requests in flight per queue).

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

#[test]
fn fio_verify_four_queues_cache_none() {
    scenario("fio-verify-4q-cache-none", |s| {
        common::fio_verify_with(s, DaemonKind::under_test(), 4, &["--cache", "none"])
    });
}
