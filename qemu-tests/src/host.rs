//! The host side: where things live, finding tools, running commands, locking the cache.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::error::{Error, IoContext, Result};

/// Opts out of every VM test (they print "skipped" and pass).
pub const ENV_SKIP: &str = "DOVETAIL_SKIP_VM_TESTS";
/// The dovetail binary to test instead of building it with cargo.
pub const ENV_BIN: &str = "DOVETAIL_BIN";
/// The QEMU system emulator to use instead of `qemu-system-x86_64` from PATH.
pub const ENV_QEMU: &str = "DOVETAIL_QEMU";
/// Where the guest kernel and initramfs are cached (default `<target>/qemu-tests-cache`).
pub const ENV_CACHE: &str = "DOVETAIL_QEMU_CACHE";
/// Keep every scenario's directory (images, console and daemon logs), not only failed ones.
pub const ENV_KEEP: &str = "DOVETAIL_KEEP_RUNS";
/// `qsd` runs the scenarios against qemu-storage-daemon instead of dovetail.
pub const ENV_DAEMON: &str = "DOVETAIL_TEST_DAEMON";
/// Multiplies every timeout, for slow machines.
pub const ENV_TIMEOUT_SCALE: &str = "DOVETAIL_VM_TIMEOUT_SCALE";

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// `DOVETAIL_SKIP_VM_TESTS` is set.
pub fn skip_requested() -> bool {
    env_flag(ENV_SKIP)
}

/// Running in CI (`CI=true`): a missing tool is a failure there, never a skip.
pub fn in_ci() -> bool {
    env_flag("CI")
}

pub(crate) fn keep_runs() -> bool {
    env_flag(ENV_KEEP)
}

/// `d` scaled by `DOVETAIL_VM_TIMEOUT_SCALE` (default 1).
pub fn scaled(d: Duration) -> Duration {
    let scale = std::env::var(ENV_TIMEOUT_SCALE)
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(1.0);
    d.mul_f64(scale)
}

/// The workspace root (the directory holding the workspace Cargo.toml).
pub fn workspace_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// This crate's directory (`qemu-tests/`).
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, else the one this test binary was built in, else
/// `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if dir.is_absolute() {
            dir
        } else {
            workspace_dir().join(dir)
        };
    }
    // Test binaries live in <target>/<profile>/deps/; cargo marks <target> with CACHEDIR.TAG.
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe
            .ancestors()
            .skip(1)
            .find(|d| d.join("CACHEDIR.TAG").is_file())
        {
            return dir.to_path_buf();
        }
    }
    workspace_dir().join("target")
}

/// Where downloads and built guest images are cached between runs.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os(ENV_CACHE).filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => target_dir().join("qemu-tests-cache"),
    }
}

/// Where scenario directories are created.
pub fn runs_dir() -> PathBuf {
    target_dir().join("qemu-tests-runs")
}

/// Finds an executable on PATH, then in the sbin directories a non-root PATH may lack.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Like [`find_tool`], as an error naming the package to install.
pub fn require_tool(name: &str, package: &str) -> Result<PathBuf> {
    find_tool(name).ok_or_else(|| {
        Error::Setup(format!(
            "`{name}` not found: install the Debian package `{package}` (scripts/test-deps.sh installs everything the VM tests need)"
        ))
    })
}

/// The QEMU system emulator: `DOVETAIL_QEMU` or `qemu-system-x86_64` on PATH.
pub fn qemu_binary() -> Result<PathBuf> {
    match std::env::var_os(ENV_QEMU).filter(|q| !q.is_empty()) {
        Some(q) => find_tool(&q.to_string_lossy()).ok_or_else(|| {
            Error::Setup(format!(
                "{ENV_QEMU}={} is not an executable",
                q.to_string_lossy()
            ))
        }),
        None => require_tool("qemu-system-x86_64", "qemu-system-x86"),
    }
}

/// Every host tool the VM tests need, checked up front so a machine missing several learns all of
/// them at once.
pub fn check_host_tools() -> Result<()> {
    let mut missing = Vec::new();
    if let Err(e) = qemu_binary() {
        missing.push(e.to_string());
    }
    for (tool, package) in [
        ("busybox", "busybox-static"),
        ("fio", "fio"),
        ("mke2fs", "e2fsprogs"),
        ("e2fsck", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
        ("cpio", "cpio"),
        ("gzip", "gzip"),
        ("blkdiscard", "util-linux"),
        ("fallocate", "util-linux"),
    ] {
        if let Err(e) = require_tool(tool, package) {
            missing.push(e.to_string());
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::Setup(missing.join("\n")))
    }
}

/// Renders a command for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion, capturing its output; a non-zero exit is an [`Error::Command`] holding
/// the tail of what it printed.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .ctx(|| format!("cannot run `{}`", describe(cmd)))?;
    if out.status.success() {
        Ok(out)
    } else {
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Err(Error::Command {
            command: describe(cmd),
            status: out.status.to_string(),
            output: tail_of(&text, 30),
        })
    }
}

/// Shorthand for [`run`] returning stdout as a string.
pub fn run_stdout<S: AsRef<OsStr>>(program: S, args: &[&str]) -> Result<String> {
    let out = run(Command::new(program).args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `n` lines of `text`.
pub fn tail_of(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last `n` lines of a file, or a note saying why there are none.
pub fn tail_of_file(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => tail_of(&String::from_utf8_lossy(&bytes), n),
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// An exclusive `flock` on a file, released on drop. Serialises cache updates between test
/// processes (several test binaries, or nextest's process per test).
#[derive(Debug)]
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    pub(crate) fn acquire(path: &Path) -> Result<FileLock> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).at("creating", dir)?;
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .at("opening lock file", path)?;
        loop {
            // SAFETY: flock on a descriptor this function owns; it touches no memory.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(FileLock { _file: file });
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::io(format!("locking {}", path.display()), err));
            }
        }
    }
}

/// FNV-1a, 64 bit: a stable hash for cache keys (std's hasher may change between releases).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separate fields so ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }

    pub(crate) fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail_of("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_of("a", 5), "a");
        assert_eq!(tail_of("", 5), "");
    }

    #[test]
    fn fnv_separates_fields() {
        let mut a = Fnv::new();
        a.update(b"ab");
        a.update(b"c");
        let mut b = Fnv::new();
        b.update(b"a");
        b.update(b"bc");
        assert_ne!(a.hex(), b.hex());
        assert_eq!(a.hex().len(), 16);
    }
}
