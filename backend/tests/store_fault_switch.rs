//! `serve --store-faults RULES` and the control verb `store-faults`: the store's own fault
//! layer under a live daemon, switched on and off at run time (test builds only).
//!
//! With `--features failpoints` (as CI builds the daemon): a daemon over a store with a
//! parallax-v1 disk starts with `eio:op=sync;slow:ms=30,op=write` switched off; a write and
//! FLUSH succeed; `ctl store-faults on` makes writes wait 30 ms and the next FLUSH fail (IOERR,
//! the failed-sync rule reopens the version from its last commit); `status` counts what was
//! injected; `off` lets the disk flush again, and what the first FLUSH made stable reads back.
//! A bad rule is refused at start, an unknown action by the verb, and a daemon started without
//! the option says so. Without the feature (a production build): the option and the verb are
//! refused, saying that the build lacks fault injection.
//!
//! `cargo test -p dovetail-backend --features failpoints --test store_fault_switch` (and
//! without `--features failpoints` for the production build's refusals).

mod cli;
mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cli::{ok, path, store_create};
use serde_json::Value;

/// `dovetail serve --store DIR/st --control DIR/ctl.sock EXTRA...`, logging to
/// `DIR/serve.log`; waits for the control socket and every one of `sockets`.
struct Serving {
    child: Child,
    dir: PathBuf,
}

impl Serving {
    fn start(dir: &Path, extra: &[&str], sockets: &[PathBuf]) -> Serving {
        let _ = std::fs::remove_file(dir.join("ctl.sock"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("serve.log"))
            .expect("log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_dovetail"))
            .args(["serve", "--store", path(&dir.join("st"))])
            .args(["--control", path(&dir.join("ctl.sock"))])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dir.join("ctl.sock").exists() || sockets.iter().any(|s| !s.exists()) {
            if let Some(st) = child.try_wait().expect("try_wait") {
                panic!("the daemon exited at start ({st}):\n{}", log_of(dir));
            }
            assert!(Instant::now() < deadline, "no sockets:\n{}", log_of(dir));
            std::thread::sleep(Duration::from_millis(10));
        }
        Serving {
            child,
            dir: dir.to_path_buf(),
        }
    }

    /// One request on the control socket; the whole reply.
    fn call(&self, request: &str) -> Value {
        let s = UnixStream::connect(self.dir.join("ctl.sock")).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        (&s).write_all(format!("{request}\n").as_bytes())
            .expect("send");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("reply");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
    }

    /// `store-faults` with `action`: the result of an `ok` reply.
    fn faults(&self, action: &str) -> Value {
        let r = self.call(&format!(r#"{{"cmd":"store-faults","action":"{action}"}}"#));
        assert_eq!(r["ok"], Value::Bool(true), "{r}\n{}", log_of(&self.dir));
        r["result"].clone()
    }

    fn stop(mut self) {
        // SAFETY: kill only sends a signal to the child process this test spawned.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait().expect("wait");
        // A version whose sync failed may refuse its last flush at the stop; the exit status
        // is not what this test is about, the log is there if it matters.
        let _ = st;
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        // SAFETY: as in `stop`; the child may already have exited (then it is a no-op).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// The last 40 lines of the daemon's log.
fn log_of(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A store in `DIR/st` with a 16 MiB parallax-v1 disk `a`.
fn store_with_disk(dir: &Path) {
    let st = dir.join("st");
    store_create(&st);
    ok(&[
        "disk",
        "create",
        path(&st),
        "a",
        "--size",
        "16M",
        "--layout",
        "parallax-v1",
    ]);
}

#[cfg(feature = "failpoints")]
mod with_fault_injection {
    use super::*;
    use common::{pattern, Req, TestDriver, S_IOERR};

    #[test]
    fn store_faults_switch_on_and_off_under_a_live_daemon() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        store_with_disk(dir);
        let sock = dir.join("a.sock");
        let disk = format!("a={}", path(&sock));
        let d = Serving::start(
            dir,
            &[
                "--disk",
                &disk,
                "--store-faults",
                "eio:op=sync; slow:op=write,ms=30",
            ],
            std::slice::from_ref(&sock),
        );
        let st = d.faults("status");
        assert_eq!(st["enabled"], Value::Bool(false), "off at start: {st}");
        assert_eq!(
            st["rules"],
            serde_json::json!(["eio:op=sync", "slow:ms=30,op=write"]),
            "the rules in canonical form"
        );
        assert_eq!(st["counts"]["total"], 0);

        let driver = TestDriver::connect(&sock, 1, 4 << 20);
        let stable = pattern(1, 64 * 1024);
        driver.submit(0, &Req::write(0, &stable)).assert_ok(0);
        driver.submit(0, &Req::flush()).assert_ok(0);
        assert_eq!(d.faults("status")["counts"]["total"], 0, "off: nothing");

        assert_eq!(d.faults("on")["enabled"], Value::Bool(true));
        let t = Instant::now();
        driver
            .submit(0, &Req::write(0, &pattern(2, 64 * 1024)))
            .assert_ok(0);
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(30),
            "a slowed write took {took:?}"
        );
        let f = driver.submit(0, &Req::flush());
        assert_eq!(f.status, Some(S_IOERR), "the FLUSH whose sync failed");
        let c = d.faults("off");
        assert_eq!(c["enabled"], Value::Bool(false));
        let n = |k: &str| c["counts"][k].as_u64().unwrap_or(0);
        assert!(n("syncs") >= 1 && n("eio") >= 1, "{c}");
        assert!(n("slow") >= 1 && n("slow_ms") >= 30, "{c}");
        assert_eq!(n("total"), n("eio") + n("slow"), "{c}");
        assert_eq!(c["last"]["file"], "tier default", "{c}");

        // Off: the version was reopened from its last commit; the disk flushes again (once the
        // recovery ran: a FLUSH in between fails), and the stable data is what reads back.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if driver.submit(0, &Req::flush()).status == Some(common::S_OK) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no FLUSH succeeds after the faults went off:\n{}",
                log_of(dir)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let r = driver.submit(0, &Req::read(0, stable.len() as u32));
        r.assert_ok(stable.len() as u32);
        assert!(
            r.data == stable,
            "the last commit's data, not the lost overwrite"
        );
        let after = d.faults("status");
        assert_eq!(
            after["counts"]["total"], c["counts"]["total"],
            "nothing injected while off"
        );
        let events = d.call(r#"{"cmd":"events"}"#);
        assert!(
            events["result"]["events"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["kind"] == "sync-failed"),
            "{events}"
        );
        // An unknown action is refused, and changes nothing.
        let bad = d.call(r#"{"cmd":"store-faults","action":"sometimes"}"#);
        assert_eq!(bad["ok"], Value::Bool(false));
        assert!(
            bad["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("unknown action")),
            "{bad}"
        );
        assert_eq!(d.faults("status")["enabled"], Value::Bool(false));
        // `ctl` says the same as the socket.
        let out = ok(&[
            "ctl",
            "--control",
            path(&dir.join("ctl.sock")),
            "store-faults",
        ]);
        let v: Value = serde_json::from_str(&out).expect("ctl prints JSON");
        assert_eq!(v["enabled"], Value::Bool(false));
        drop(driver);
        d.stop();
    }

    #[test]
    fn bad_rules_and_a_daemon_without_them_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        store_with_disk(dir);
        let st = dir.join("st");
        let err = cli::fails(&[
            "serve",
            "--store",
            path(&st),
            "--store-faults",
            "eio:op=fsync",
        ]);
        assert!(
            err.contains("bad file fault rule") && err.contains("fsync"),
            "{err}"
        );
        let err = cli::fails(&[
            "serve",
            "--image",
            path(&dir.join("i.img")),
            "--store-faults",
            "eio",
        ]);
        assert!(err.contains("--store-faults needs --store"), "{err}");
        let d = Serving::start(dir, &[], &[]);
        let r = d.call(r#"{"cmd":"store-faults"}"#);
        assert_eq!(r["ok"], Value::Bool(false));
        assert!(
            r["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("without --store-faults")),
            "{r}"
        );
        d.stop();
    }
}

#[cfg(not(feature = "failpoints"))]
#[test]
fn a_production_build_refuses_store_faults() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    store_with_disk(dir);
    let err = cli::fails(&[
        "serve",
        "--store",
        path(&dir.join("st")),
        "--store-faults",
        "eio:op=sync",
    ]);
    assert!(
        err.contains("no fault injection") && err.contains("failpoints"),
        "{err}"
    );
    let d = Serving::start(dir, &[], &[]);
    let r = d.call(r#"{"cmd":"store-faults","action":"on"}"#);
    assert_eq!(r["ok"], Value::Bool(false));
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no fault injection")),
        "{r}"
    );
    d.stop();
}
