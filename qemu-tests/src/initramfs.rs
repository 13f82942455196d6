//! Guest images built by `qemu-tests/guest/build-initramfs.sh`, cached by a hash of their inputs,
//! and the small per-guest archive that carries a test's workload.
//!
//! Linux unpacks concatenated initramfs archives in order, so each guest's initrd is the cached base
//! archive followed by an uncompressed newc archive holding `/workload.sh`, `/etc/dovetail/env` and
//! any extra files: the base is built once, and a workload change costs nothing.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, IoContext, Result};
use crate::host::{self, FileLock, Fnv};
use crate::kernel::{self, GuestKernel};

/// Which base image to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavor {
    /// The test userland (busybox, fio, e2fsprogs, util-linux tools) and the modules; runs
    /// `/workload.sh`.
    Full,
    /// Only loads the modules and `switch_root`s into the disk named by `root=`.
    SwitchRoot,
}

impl Flavor {
    fn arg(self) -> &'static str {
        match self {
            Flavor::Full => "full",
            Flavor::SwitchRoot => "switchroot",
        }
    }
}

/// The guest-side sources: `qemu-tests/guest/`.
pub fn guest_dir() -> PathBuf {
    host::crate_dir().join("guest")
}

fn script() -> PathBuf {
    guest_dir().join("build-initramfs.sh")
}

/// Host programs copied into the guest; a package upgrade changes their size or time and so the key.
const GUEST_TOOLS: &[&str] = &[
    "busybox",
    "fio",
    "mke2fs",
    "e2fsck",
    "tune2fs",
    "dumpe2fs",
    "blkdiscard",
    "fallocate",
];

fn cache_key(flavor: Flavor, kernel: &GuestKernel) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let mut h = Fnv::new();
    h.update(flavor.arg().as_bytes());
    h.update(kernel.package.as_bytes());
    h.update(kernel.release.as_bytes());
    let dir = guest_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .at("listing", &dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for f in files {
        h.update(
            f.file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
        h.update(&std::fs::read(&f).at("reading", &f)?);
    }
    for tool in GUEST_TOOLS {
        let Some(path) = host::find_tool(tool) else {
            continue;
        };
        h.update(path.as_os_str().as_encoded_bytes());
        if let Ok(m) = std::fs::metadata(&path) {
            h.update(&m.len().to_le_bytes());
            h.update(&m.mtime().to_le_bytes());
        }
    }
    Ok(h.hex())
}

/// The cached base initramfs for `flavor`, built on first use.
pub fn base_initramfs(flavor: Flavor) -> Result<PathBuf> {
    static BUILT: OnceLock<Mutex<HashMap<Flavor, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(HashMap::new()));
    // A poisoned map only means another test panicked mid-build; its entries are still valid.
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = built.get(&flavor) {
        return Ok(p.clone());
    }
    let path = build(flavor)?;
    built.insert(flavor, path.clone());
    Ok(path)
}

fn build(flavor: Flavor) -> Result<PathBuf> {
    let kernel = kernel::guest_kernel()?;
    let dir = host::cache_dir().join("initramfs");
    let name = format!("{}-{}.cpio.gz", flavor.arg(), cache_key(flavor, &kernel)?);
    let out = dir.join(&name);
    if out.is_file() {
        return Ok(out);
    }
    let _lock = FileLock::acquire(&dir.join(".lock"))?;
    if out.is_file() {
        return Ok(out);
    }
    let started = std::time::Instant::now();
    host::run(
        Command::new("sh")
            .arg(script())
            .arg("--flavor")
            .arg(flavor.arg())
            .arg("--modules")
            .arg(&kernel.modules)
            .arg("--out")
            .arg(&out),
    )?;
    crate::say(&format!(
        "built {} in {:.1}s",
        out.display(),
        started.elapsed().as_secs_f64()
    ));
    // Archives built from older inputs are of no further use.
    let prefix = format!("{}-", flavor.arg());
    for entry in std::fs::read_dir(&dir)
        .at("listing", &dir)?
        .filter_map(|e| e.ok())
    {
        let n = entry.file_name().to_string_lossy().into_owned();
        if n.starts_with(&prefix) && n.ends_with(".cpio.gz") && n != name {
            // Best effort: a stale archive only costs disk space.
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(out)
}

/// Fills `dir` with a root filesystem tree (busybox, `/init`, the workload helpers) for
/// `mke2fs -d`.
pub fn rootfs_tree(dir: &Path) -> Result<()> {
    host::run(
        Command::new("sh")
            .arg(script())
            .arg("--flavor")
            .arg("rootfs")
            .arg("--out")
            .arg(dir),
    )?;
    Ok(())
}

/// [`rootfs_tree`] with fio as the initramfs has it: its optional engines' libraries (ceph,
/// glusterfs, RDMA, pmem, nbd) replaced by stubs (`guest/build-initramfs.sh`), so the guest
/// neither stores nor loads them.
pub fn rootfs_tree_with_fio(dir: &Path) -> Result<()> {
    host::run(
        Command::new("sh")
            .arg(script())
            .arg("--flavor")
            .arg("rootfs")
            .arg("--with-fio")
            .arg("--out")
            .arg(dir),
    )?;
    Ok(())
}

/// Writes `base` followed by `extra` (an uncompressed newc archive) to `out`.
pub fn write_initrd(base: &Path, extra: &[u8], out: &Path) -> Result<()> {
    std::fs::copy(base, out).at("copying initramfs to", out)?;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(out)
        .at("opening", out)?;
    let len = f.metadata().at("reading size of", out)?.len();
    // The kernel looks for the next archive's magic only at 4-byte boundaries and skips zeros.
    let pad = (512 - len % 512) % 512;
    let pad = usize::try_from(pad).map_err(|_| Error::Check("padding overflow".into()))?;
    f.write_all(&vec![0u8; pad]).at("writing", out)?;
    f.write_all(extra).at("writing", out)?;
    f.sync_all().at("syncing", out)?;
    Ok(())
}

/// Builds an uncompressed cpio archive in the "newc" format the kernel unpacks.
#[derive(Debug, Default)]
pub struct Cpio {
    buf: Vec<u8>,
    next_ino: u32,
}

impl Cpio {
    /// An empty archive.
    pub fn new() -> Self {
        Cpio {
            buf: Vec::new(),
            next_ino: 1,
        }
    }

    /// Adds a directory (parents must be added first or exist in an earlier archive).
    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.entry(path, 0o040_755, &[]);
        self
    }

    /// Adds a regular file with permission bits `mode` (e.g. 0o755).
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.entry(path, 0o100_000 | (mode & 0o7777), data);
        self
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) {
        let name = path.trim_start_matches('/');
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & 0o040_000 != 0 { 2 } else { 1 };
        // newc sizes are 32-bit; test files are far smaller.
        let size = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let namesize = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
        let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, namesize, 0];
        self.buf.extend_from_slice(b"070701");
        for v in fields {
            self.buf.extend_from_slice(format!("{v:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.align();
        self.buf.extend_from_slice(&data[..size as usize]);
        self.align();
    }

    fn align(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_round_trips_through_the_cpio_tool() {
        let Some(cpio) = host::find_tool("cpio") else {
            // The VM tests themselves report a missing cpio; this unit test needs the tool too.
            assert!(!host::in_ci(), "cpio is missing in CI");
            return;
        };
        let mut a = Cpio::new();
        a.dir("etc").dir("etc/dovetail");
        a.file("/etc/dovetail/env", 0o644, b"export A='1'\n");
        a.file("workload.sh", 0o755, b"ok x\n");
        let bytes = a.finish();
        assert_eq!(bytes.len() % 4, 0);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(cpio)
            .args(["-i", "-d", "--quiet"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn cpio");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&bytes)
            .expect("write archive");
        assert!(child.wait().expect("cpio").success());
        assert_eq!(
            std::fs::read(dir.path().join("etc/dovetail/env")).expect("env"),
            b"export A='1'\n"
        );
        assert_eq!(
            std::fs::read(dir.path().join("workload.sh")).expect("workload"),
            b"ok x\n"
        );
    }
}
