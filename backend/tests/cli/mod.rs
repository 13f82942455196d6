//! Running the real `dovetail` binary as an operator does: its stdout, stderr and exit status.
#![allow(dead_code)]

pub mod named_daemon;
pub mod store_daemon;

use std::path::Path;
use std::process::{Command, Output};

/// Runs `dovetail ARGS` with the default log level.
pub fn dovetail(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dovetail"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run dovetail")
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let out = dovetail(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs a command that must fail with exit status 1; returns its stderr.
pub fn fails(args: &[&str]) -> String {
    let out = dovetail(args);
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail: {out:?}");
    String::from_utf8(out.stderr).expect("utf-8 stderr")
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `dovetail store create ST --size 256M --extent-size 4M`: the store most CLI tests start from.
pub fn store_create(st: &Path) -> String {
    ok(&[
        "store",
        "create",
        path(st),
        "--size",
        "256M",
        "--extent-size",
        "4M",
    ])
}
