//! fio verify in a real guest against a sandboxed daemon: `serve --cache none --seccomp trap
//! --landlock`, and as root also `--user nobody --group nogroup` (SECURITY.md, *Least
//! privilege*): every request of the guest goes through threads under their seccomp filters
//! on direct I/O (io_uring), fio finds no error, and the daemon's log shows the filters, the
//! Landlock rules and (as root) the user it dropped to.

use dovetail_qemu_tests::image::{self, MIB};
use dovetail_qemu_tests::{scenario, workloads, Daemon, DaemonKind, Error, Guest};

#[test]
fn fio_verify_under_the_sandbox() {
    scenario("fio-verify-sandbox", |s| {
        let image = s.path("disk.img");
        // SAFETY: geteuid only reads the process's credentials.
        let root = unsafe { libc::geteuid() } == 0;
        let mut builder = Daemon::of_kind(DaemonKind::Dovetail, &image)
            .size("128M")
            .queues(2);
        for a in ["--cache", "none", "--seccomp", "trap", "--landlock"] {
            builder = builder.arg(a);
        }
        if root {
            // The image and socket are opened before the daemon drops to nobody; QEMU (root
            // here) reaches the socket whatever its owner. The daemon removes its socket when
            // it stops, as nobody: the socket's directory must be nobody's (as a deployment's
            // run directory is the daemon user's).
            let dir = image.parent().unwrap_or(std::path::Path::new("."));
            std::os::unix::fs::chown(dir, Some(65534), Some(65534))
                .map_err(|e| Error::Check(format!("chown {}: {e}", dir.display())))?;
            for a in ["--user", "nobody", "--group", "nogroup"] {
                builder = builder.arg(a);
            }
        }
        let mut daemon = builder.spawn()?;
        Guest::new("fio-sandbox")
            .disk(daemon.socket())
            .queues(2)
            .env("RAND_MB", 8)
            .env("SEQ_MB", 16)
            .workload(workloads::FIO_VERIFY)
            .boot()?
            .expect_ok(&["queues", "fio-rand-4k", "fio-seq-1m", "all-queues-used"])?;
        let pid = daemon.pid();
        let uid = pid.and_then(|p| {
            let st = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            st.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1)?.parse::<u32>().ok())
        });
        daemon.terminate()?;
        let log = std::fs::read_to_string(daemon.log_path()).unwrap_or_default();
        let check = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(Error::Check(format!("{what}; daemon log:\n{log}")))
            }
        };
        check(
            log.contains("seccomp: a filter per thread kind, forbidden calls"),
            "the daemon's log does not show the seccomp filters installed",
        )?;
        check(
            log.contains("Landlock (ABI") || log.contains("Landlock not enforced"),
            "the daemon's log does not say what Landlock did",
        )?;
        check(
            !log.contains("forbidden system call"),
            "a thread made a forbidden system call",
        )?;
        if root {
            check(
                uid == Some(65534),
                &format!("the daemon's effective uid while serving was {uid:?}, not nobody's"),
            )?;
            check(
                log.contains("running as user nobody (uid 65534"),
                "the daemon's log does not say it runs as nobody",
            )?;
        }
        image::check_fio_blocks(&image, 0, 8 * MIB, 4096)?;
        image::check_fio_blocks(&image, 8 * MIB, 16 * MIB, MIB)?;
        Ok(())
    });
}
