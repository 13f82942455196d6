//! The guest kernel: Debian's current `linux-image-*-amd64`, downloaded once with apt and cached.
//!
//! `apt-cache depends linux-image-amd64` names the package; `apt-get download` fetches it and
//! `dpkg -x` unpacks it. The cache keeps the kernel image and the module directories a storage test
//! guest can use (virtio, block, filesystems, crypto, lib), not the whole 400 MB tree, under
//! `<cache>/kernel/<package>/`. When apt cannot answer (no package lists), any cached kernel is used.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::error::{Error, IoContext, Result};
use crate::host::{self, FileLock};

/// An unpacked guest kernel.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    /// The Debian package it came from, e.g. `linux-image-6.1.0-56-amd64`.
    pub package: String,
    /// `uname -r` of the guest, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// The bzImage, as the package has it.
    pub vmlinuz: PathBuf,
    /// What to pass to `-kernel`: the uncompressed `vmlinux` QEMU boots through its PVH entry
    /// (no decompression in the guest; see [`crate::vmlinux`]) or, when this kernel cannot be
    /// booted that way, the bzImage.
    pub boot_image: PathBuf,
    /// `lib/modules/<release>`.
    pub modules: PathBuf,
}

/// Module directories kept from the package, relative to `lib/modules/<release>/kernel`.
const KEPT_MODULE_DIRS: &[&str] = &[
    "arch",
    "block",
    "crypto",
    "fs",
    "lib",
    "mm",
    "virt",
    "drivers/block",
    "drivers/char",
    "drivers/firmware",
    "drivers/md",
    "drivers/nvdimm",
    "drivers/scsi",
    "drivers/virtio",
];

const READY: &str = "ready";
/// The uncompressed kernel, extracted from `vmlinuz` on first use.
const VMLINUX: &str = "vmlinux";
/// Written instead of [`VMLINUX`] when this kernel cannot boot uncompressed; holds why.
const NO_VMLINUX: &str = "vmlinux.none";

/// The guest kernel, downloaded on first use (once per process; other processes wait on a lock).
pub fn guest_kernel() -> Result<GuestKernel> {
    static KERNEL: OnceLock<Result<GuestKernel, String>> = OnceLock::new();
    KERNEL
        .get_or_init(|| locate().map_err(|e| format!("{e:?}")))
        .clone()
        .map_err(Error::Setup)
}

fn locate() -> Result<GuestKernel> {
    let k = locate_package()?;
    with_boot_image(k)
}

/// Sets [`GuestKernel::boot_image`]: the cached `vmlinux`, extracted now (once per cache, under
/// the cache lock) if no earlier run tried.
fn with_boot_image(mut k: GuestKernel) -> Result<GuestKernel> {
    let dir = k
        .vmlinuz
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let vmlinux = dir.join(VMLINUX);
    let none = dir.join(NO_VMLINUX);
    if !vmlinux.is_file() && !none.is_file() {
        let _lock = FileLock::acquire(&dir.join(".lock"))?;
        if !vmlinux.is_file() && !none.is_file() {
            let started = std::time::Instant::now();
            match crate::vmlinux::extract(&k.vmlinuz, &vmlinux)? {
                None => crate::say(&format!(
                    "extracted {} in {:.1}s: guests boot it without decompressing",
                    vmlinux.display(),
                    started.elapsed().as_secs_f64()
                )),
                Some(why) => {
                    crate::say(&format!(
                        "guests boot the compressed {}: {why}",
                        k.vmlinuz.display()
                    ));
                    std::fs::write(&none, format!("{why}\n")).at("writing", &none)?;
                }
            }
        }
    }
    k.boot_image = if vmlinux.is_file() {
        vmlinux
    } else {
        k.vmlinuz.clone()
    };
    Ok(k)
}

fn locate_package() -> Result<GuestKernel> {
    let root = host::cache_dir().join("kernel");
    let package = match current_package() {
        Ok(p) => p,
        Err(e) => {
            return any_cached(&root)?.ok_or(e);
        }
    };
    let dir = root.join(&package);
    if let Some(k) = load(&dir, &package)? {
        return Ok(k);
    }
    let _lock = FileLock::acquire(&root.join(".lock"))?;
    // Another process may have finished the download while this one waited.
    if let Some(k) = load(&dir, &package)? {
        return Ok(k);
    }
    download(&root, &package)?;
    load(&dir, &package)?.ok_or_else(|| {
        Error::Setup(format!(
            "kernel cache {} is incomplete after download",
            dir.display()
        ))
    })
}

/// Asks apt which image package `linux-image-amd64` currently depends on.
fn current_package() -> Result<String> {
    let apt_cache = host::require_tool("apt-cache", "apt")?;
    let out = host::run_stdout(&apt_cache, &["depends", "linux-image-amd64"])?;
    parse_depends(&out).ok_or_else(|| {
        Error::Setup(
            "apt-cache names no kernel package for linux-image-amd64: run `apt-get update` \
             (scripts/test-deps.sh does)"
                .to_string(),
        )
    })
}

/// The first `Depends: linux-image-…` of `apt-cache depends` output.
fn parse_depends(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.contains(' '))
        .map(str::to_string)
}

fn load(dir: &Path, package: &str) -> Result<Option<GuestKernel>> {
    let ready = dir.join(READY);
    if !ready.is_file() {
        return Ok(None);
    }
    let release = std::fs::read_to_string(&ready)
        .at("reading", &ready)?
        .trim()
        .to_string();
    let k = GuestKernel {
        package: package.to_string(),
        vmlinuz: dir.join("vmlinuz"),
        boot_image: dir.join("vmlinuz"),
        modules: dir.join("modules").join(&release),
        release,
    };
    if k.vmlinuz.is_file() && k.modules.is_dir() {
        Ok(Some(k))
    } else {
        Ok(None)
    }
}

fn any_cached(root: &Path) -> Result<Option<GuestKernel>> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(None);
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("linux-image-"))
        .collect();
    names.sort();
    for name in names.iter().rev() {
        if let Some(k) = load(&root.join(name), name)? {
            return Ok(Some(k));
        }
    }
    Ok(None)
}

fn download(root: &Path, package: &str) -> Result<()> {
    let apt_get = host::require_tool("apt-get", "apt")?;
    let dpkg = host::require_tool("dpkg", "dpkg")?;
    let work = root.join(format!(".download-{}", std::process::id()));
    if work.exists() {
        std::fs::remove_dir_all(&work).at("removing", &work)?;
    }
    std::fs::create_dir_all(&work).at("creating", &work)?;
    crate::say(&format!(
        "downloading guest kernel {package} (once; cached under {})",
        root.display()
    ));
    host::run(
        Command::new(&apt_get)
            .arg("download")
            .arg(package)
            .current_dir(&work),
    )?;
    let deb = std::fs::read_dir(&work)
        .at("listing", &work)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| Error::Setup(format!("apt-get download {package} left no .deb")))?;
    let unpacked = work.join("x");
    host::run(Command::new(&dpkg).arg("-x").arg(&deb).arg(&unpacked))?;

    let boot = unpacked.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .at("listing", &boot)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| Error::Setup(format!("{package} holds no boot/vmlinuz-*")))?;
    let release = vmlinuz
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_string()
        })
        .unwrap_or_default();
    let src_modules = unpacked.join("lib/modules").join(&release);

    let staging = work.join("staging");
    let dst_modules = staging.join("modules").join(&release);
    std::fs::create_dir_all(dst_modules.join("kernel")).at("creating", &dst_modules)?;
    std::fs::rename(&vmlinuz, staging.join("vmlinuz")).at("moving", &vmlinuz)?;
    for sub in KEPT_MODULE_DIRS {
        let from = src_modules.join("kernel").join(sub);
        if !from.is_dir() {
            continue;
        }
        let to = dst_modules.join("kernel").join(sub);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).at("creating", parent)?;
        }
        std::fs::rename(&from, &to).at("moving", &from)?;
    }
    for entry in std::fs::read_dir(&src_modules)
        .at("listing", &src_modules)?
        .filter_map(|e| e.ok())
    {
        let p = entry.path();
        if p.is_file() {
            std::fs::rename(&p, dst_modules.join(entry.file_name())).at("moving", &p)?;
        }
    }
    std::fs::write(staging.join(READY), format!("{release}\n")).at("writing", &staging)?;

    let dir = root.join(package);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).at("removing", &dir)?;
    }
    std::fs::rename(&staging, &dir).at("moving", &staging)?;
    std::fs::remove_dir_all(&work).at("removing", &work)?;

    // Older kernels are of no further use.
    for entry in std::fs::read_dir(root)
        .at("listing", root)?
        .filter_map(|e| e.ok())
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("linux-image-") && name != package {
            // Best effort: a leftover directory costs disk space, nothing else.
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_cache_depends() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_depends(out).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(parse_depends("linux-image-amd64\n"), None);
        let virtual_dep =
            "linux-image-amd64\n  Depends: <linux-image-x>\n  Depends: linux-image-6.12.1-amd64\n";
        assert_eq!(
            parse_depends(virtual_dep).as_deref(),
            Some("linux-image-6.12.1-amd64")
        );
    }
}
