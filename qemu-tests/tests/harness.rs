//! The harness catches what it must: a failing check, a guest that never finishes (killed at the
//! timeout), and it passes values from the guest. Guests without disks, so no daemon is involved.

use std::time::Duration;

use dovetail_qemu_tests::{scenario, Error, Guest, GuestExit};

#[test]
fn reports_failures_and_values() {
    scenario("harness-results", |_| {
        let run = Guest::new("results")
            .env("GREETING", "it's here")
            .file("/data/hello.txt", "hello from the host\n")
            .workload(
                r#"
expect_eq env "$GREETING" "it's here"
check file grep -q "hello from the host" /data/hello.txt
check broken false
info answer 42
"#,
            )
            .boot()?;
        if run.exit != GuestExit::Done(0) {
            return Err(Error::Check(format!("unexpected exit {:?}", run.exit)));
        }
        if run.info("answer") != Some("42") {
            return Err(Error::Check(format!(
                "info answer: {:?}",
                run.info("answer")
            )));
        }
        if !run.result("env").is_some_and(|r| r.ok) || !run.result("file").is_some_and(|r| r.ok) {
            return Err(Error::Check(format!("results: {:?}", run.results)));
        }
        match run.expect_ok(&["env", "file"]) {
            Err(Error::Guest { reason, .. }) if reason.contains("FAIL broken") => Ok(()),
            other => Err(Error::Check(format!(
                "a failed check must fail the run, got {other:?}"
            ))),
        }
    });
}

#[test]
fn kills_a_guest_at_the_timeout() {
    scenario("harness-timeout", |_| {
        // Long enough for the guest to boot and print `ok started` on a loaded 2-core machine
        // (a boot to /init takes a few seconds under TCG), short because the test waits it out.
        let result = Guest::new("hang")
            .workload("ok started\nsleep 600\n")
            .timeout(Duration::from_secs(20))
            .boot();
        match result {
            Err(Error::Guest {
                reason, context, ..
            }) if reason.contains("timed out") && context.contains("ok started") => Ok(()),
            other => Err(Error::Check(format!(
                "a hung guest must time out, got {other:?}"
            ))),
        }
    });
}
