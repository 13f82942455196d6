//! Host-side work on image files: patterns, byte ranges, holes, ext4 checks, root-disk images.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;

use crate::error::{Error, IoContext, Result};
use crate::host;
use crate::initramfs;

/// MiB, for offsets and lengths.
pub const MIB: u64 = 1 << 20;

/// `len` deterministic pseudo-random bytes (xorshift64*) for `seed`; never long runs of zeros.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    if state == 0 {
        state = 1;
    }
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `data` as the whole content of `path`.
pub fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    std::fs::write(path, data).at("writing", path)
}

/// Reads `len` bytes at `offset`.
pub fn read_range(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    let f = File::open(path).at("opening", path)?;
    let len = usize::try_from(len).map_err(|_| Error::Check(format!("length {len} too large")))?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .ctx(|| format!("reading {len} bytes at {offset} of {}", path.display()))?;
    Ok(buf)
}

/// Bytes in `[offset, offset + len)` that are backed by storage, per `SEEK_DATA`/`SEEK_HOLE`.
pub fn allocated_bytes(path: &Path, offset: u64, len: u64) -> Result<u64> {
    let f = File::open(path).at("opening", path)?;
    let fd = f.as_raw_fd();
    let end = offset.saturating_add(len);
    let seek = |pos: u64, whence: libc::c_int| -> Result<Option<u64>> {
        let pos = libc::off_t::try_from(pos)
            .map_err(|_| Error::Check(format!("offset {pos} out of range")))?;
        // SAFETY: lseek on a descriptor owned by `f`, which outlives this closure; no memory is
        // passed.
        let r = unsafe { libc::lseek(fd, pos, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data (or hole) at or after pos.
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(Error::io(format!("lseek on {}", path.display()), e));
        }
        Ok(u64::try_from(r).ok())
    };
    let mut total = 0;
    let mut pos = offset;
    while pos < end {
        let Some(data) = seek(pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        total += hole - data;
        pos = hole;
    }
    Ok(total)
}

/// Whether the filesystem holding `dir` reports punched holes through `SEEK_HOLE` (tmpfs, ext4 and
/// xfs do; some overlay setups do not).
pub fn holes_supported(dir: &Path) -> Result<bool> {
    let probe = tempfile::NamedTempFile::new_in(dir).at("creating a probe file in", dir)?;
    let f = probe.as_file();
    f.write_all_at(&vec![0xa5u8; 2 * MIB as usize], 0)
        .at("writing", probe.path())?;
    f.sync_all().at("syncing", probe.path())?;
    // SAFETY: fallocate on a descriptor owned by `probe`; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            MIB as libc::off_t,
        )
    };
    if rc != 0 {
        return Ok(false);
    }
    Ok(allocated_bytes(probe.path(), 0, MIB)? == 0)
}

/// sha256 of `data` as lowercase hex, by coreutils' `sha256sum` (the guest uses busybox's).
pub fn sha256(data: &[u8]) -> Result<String> {
    use std::io::Write;
    let tool = host::require_tool("sha256sum", "coreutils")?;
    let mut child = Command::new(&tool)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .at("running", &tool)?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| Error::Setup("sha256sum has no stdin".into()))?;
    // Feed from a thread: sha256sum's output pipe cannot fill, but keep the pattern deadlock-free.
    let data = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().at("running", &tool)?;
    feeder
        .join()
        .map_err(|_| Error::Setup("sha256sum feeder panicked".into()))?
        .at("writing to", &tool)?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.split_whitespace().next() {
        Some(hex) if out.status.success() && hex.len() == 64 => Ok(hex.to_string()),
        _ => Err(Error::Setup(format!("sha256sum printed {text:?}"))),
    }
}

/// fio's verify header magic (`FIO_HDR_MAGIC`), little-endian at the start of each block.
const FIO_HDR_MAGIC: u16 = 0xacca;

/// Checks that every `bs`-sized block of `[offset, offset + len)` of the image starts with a fio
/// verify header naming its own offset: proof on the host that the guest's verified writes landed
/// where the guest put them. Returns the number of blocks checked.
pub fn check_fio_blocks(path: &Path, offset: u64, len: u64, bs: u64) -> Result<u64> {
    let data = read_range(path, offset, len)?;
    let bs_usize = usize::try_from(bs).map_err(|_| Error::Check(format!("bad block size {bs}")))?;
    let mut bad = Vec::new();
    let mut blocks = 0;
    for (i, block) in data.chunks(bs_usize).enumerate() {
        blocks += 1;
        let at = offset + i as u64 * bs;
        if block.len() < 24 {
            bad.push(format!("block at {at}: only {} bytes", block.len()));
            continue;
        }
        let magic = u16::from_le_bytes([block[0], block[1]]);
        let mut off = [0u8; 8];
        off.copy_from_slice(&block[16..24]);
        let hdr_offset = u64::from_le_bytes(off);
        if magic != FIO_HDR_MAGIC || hdr_offset != at {
            bad.push(format!(
                "block at {at}: magic {magic:#06x}, header offset {hdr_offset}"
            ));
        }
    }
    if bad.is_empty() {
        Ok(blocks)
    } else {
        Err(Error::Check(format!(
            "{} of {blocks} fio blocks in {}..{} of {} are not where the guest wrote them; first: {}",
            bad.len(),
            offset,
            offset + len,
            path.display(),
            bad.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
        )))
    }
}

/// `e2fsck -fn`: fails unless the filesystem is clean. Returns its report.
pub fn e2fsck(image: &Path) -> Result<String> {
    let e2fsck = host::require_tool("e2fsck", "e2fsprogs")?;
    let out = host::run(Command::new(e2fsck).arg("-fn").arg(image))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(text)
}

/// Reads a file out of an ext4 image with `debugfs` (no mount needed).
pub fn debugfs_cat(image: &Path, path: &str) -> Result<Vec<u8>> {
    let debugfs = host::require_tool("debugfs", "e2fsprogs")?;
    let out = host::run(
        Command::new(debugfs)
            .arg("-R")
            .arg(format!("cat {path}"))
            .arg(image),
    )?;
    Ok(out.stdout)
}

/// Builds an ext4 image of `size` (`64M`) whose root holds busybox, the guest `/init`, the workload
/// helpers, `/workload.sh` and `/etc/dovetail/env` with `env`: a disk a guest can boot from with
/// [`crate::Guest::boot_from_disk`].
pub fn build_root_image(
    image: &Path,
    size: &str,
    workload: &str,
    env: &[(&str, &str)],
) -> Result<()> {
    let mke2fs = host::require_tool("mke2fs", "e2fsprogs")?;
    let parent = image.parent().unwrap_or(Path::new("."));
    let tree = tempfile::Builder::new()
        .prefix("rootfs-")
        .tempdir_in(parent)
        .at("creating a root tree in", parent)?;
    let root = tree.path().join("root");
    initramfs::rootfs_tree(&root)?;
    write_file(&root.join("workload.sh"), workload.as_bytes())?;
    let mut env_file = String::from("export DOVETAIL_DISKS='1'\n");
    for (k, v) in env {
        env_file.push_str(&format!("export {k}='{}'\n", v.replace('\'', "'\\''")));
    }
    write_file(&root.join("etc/dovetail/env"), env_file.as_bytes())?;
    host::run(
        Command::new(mke2fs)
            .args(["-q", "-F", "-t", "ext4", "-L", "dovetail-root", "-d"])
            .arg(&root)
            .arg(image)
            .arg(size),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_dense() {
        let a = pattern(4096, 7);
        assert_eq!(a, pattern(4096, 7));
        assert_ne!(a, pattern(4096, 8));
        assert_eq!(pattern(13, 7), a[..13]);
        assert!(a.windows(8).all(|w| w != [0u8; 8]));
    }

    #[test]
    fn fio_blocks_must_name_their_own_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let bs = 4096u64;
        let mut data = vec![0u8; 4 * bs as usize];
        for i in 0..4u64 {
            let at = (i * bs) as usize;
            data[at..at + 2].copy_from_slice(&FIO_HDR_MAGIC.to_le_bytes());
            data[at + 16..at + 24].copy_from_slice(&(8192 + i * bs).to_le_bytes());
        }
        write_file(&path, &data).expect("write");
        // The blocks were written for image offset 8192 onwards, so they check there only.
        assert!(check_fio_blocks(&path, 0, 4 * bs, bs).is_err());
        let mut image = vec![0u8; 8192];
        image.extend_from_slice(&data);
        write_file(&path, &image).expect("write");
        assert_eq!(check_fio_blocks(&path, 8192, 4 * bs, bs).expect("valid"), 4);
        // A block holding something else (a lost write) is caught.
        image[8192 + 2 * bs as usize] = 0;
        write_file(&path, &image).expect("write");
        let err = check_fio_blocks(&path, 8192, 4 * bs, bs).expect_err("lost write");
        assert!(err.to_string().contains("1 of 4"), "{err}");
    }

    #[test]
    fn allocation_follows_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        if !holes_supported(dir.path()).expect("probe") {
            assert!(!host::in_ci(), "the CI filesystem must support holes");
            return;
        }
        let path = dir.path().join("img");
        let f = File::create(&path).expect("create");
        f.set_len(8 * MIB).expect("size");
        assert_eq!(allocated_bytes(&path, 0, 8 * MIB).expect("scan"), 0);
        f.write_all_at(&vec![1u8; MIB as usize], 2 * MIB)
            .expect("write");
        f.sync_all().expect("sync");
        assert_eq!(allocated_bytes(&path, 0, 8 * MIB).expect("scan"), MIB);
        assert_eq!(
            allocated_bytes(&path, 2 * MIB, MIB / 2).expect("scan"),
            MIB / 2
        );
        assert_eq!(allocated_bytes(&path, 4 * MIB, 4 * MIB).expect("scan"), 0);
    }
}
