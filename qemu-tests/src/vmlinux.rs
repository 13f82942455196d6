//! The guest kernel as an uncompressed ELF `vmlinux` that QEMU boots directly (the PVH entry
//! point), instead of the compressed `vmlinuz` (bzImage).
//!
//! A bzImage decompresses itself before the kernel starts: Debian's is a 66 MB kernel packed with
//! xz, and under TCG that takes seconds of emulated CPU on every boot (more than the rest of the
//! boot to `/init` on a loaded 2-core machine), all of it before the guest's clock starts, so the
//! guest's own boot time never shows it. QEMU loads an ELF kernel that carries the
//! `XEN_ELFNOTE_PHYS32_ENTRY` note (`CONFIG_PVH`) straight into guest memory and enters it there,
//! with `-initrd` and `-append` as usual.
//!
//! The payload is found the way Linux's `scripts/extract-vmlinux` finds it: at each compression
//! magic in the bzImage, decompress with the host tool and keep the first output that is a
//! complete x86-64 ELF with the PVH note. When none is (another format, no PVH, a missing tool)
//! the guest boots the bzImage as before.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::{IoContext, Result};
use crate::host;

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit PVH entry point QEMU needs to boot an ELF kernel.
const PVH_NOTE_TYPE: u32 = 18;
const PT_NOTE: u32 = 4;
const EM_X86_64: u16 = 62;

/// Compression formats a bzImage payload may use, by magic, with the host tool that undoes them
/// (writing to stdout and ignoring what follows the payload, where it can).
const FORMATS: &[(&[u8], &str, &[&str])] = &[
    (b"\xfd7zXZ\x00", "xz", &["-dcq", "--single-stream"]),
    (b"\x28\xb5\x2f\xfd", "zstd", &["-dcq"]),
    (b"\x1f\x8b\x08", "gzip", &["-dcq"]),
];

/// How many occurrences of each magic to try (the payload is the first in practice; a byte
/// sequence that only looks like a magic fails to decompress and the next is tried).
const TRIES_PER_FORMAT: usize = 3;

/// Extracts the uncompressed kernel of the bzImage `vmlinuz` into `out`. Returns `Ok(None)` on
/// success, `Ok(Some(reason))` when this kernel cannot be booted that way (then `out` does not
/// exist), `Err` for I/O errors of the cache itself.
pub(crate) fn extract(vmlinuz: &Path, out: &Path) -> Result<Option<String>> {
    let image = std::fs::read(vmlinuz).at("reading", vmlinuz)?;
    let tmp = out.with_extension("tmp");
    let payload = out.with_extension("payload");
    let mut reasons = Vec::new();
    for (magic, tool, args) in FORMATS {
        let offsets = find_all(&image, magic, TRIES_PER_FORMAT);
        if offsets.is_empty() {
            continue;
        }
        let Some(program) = host::find_tool(tool) else {
            reasons.push(format!("no `{tool}` to unpack the {tool} payload"));
            continue;
        };
        for at in offsets {
            std::fs::write(&payload, &image[at..]).at("writing", &payload)?;
            let sink = File::create(&tmp).at("creating", &tmp)?;
            // The exit status is not the verdict: gzip and zstd complain about the bytes after the
            // payload. The output is, below.
            let _ = Command::new(&program)
                .args(*args)
                .arg(&payload)
                .stdin(Stdio::null())
                .stdout(sink)
                .stderr(Stdio::null())
                .status();
            let elf = std::fs::read(&tmp).at("reading", &tmp)?;
            match check_pvh_elf(&elf) {
                Ok(()) => {
                    std::fs::remove_file(&payload).at("removing", &payload)?;
                    std::fs::rename(&tmp, out).at("moving", &tmp)?;
                    return Ok(None);
                }
                Err(why) => reasons.push(format!("{tool} payload at byte {at}: {why}")),
            }
        }
    }
    for f in [&tmp, &payload] {
        if f.exists() {
            std::fs::remove_file(f).at("removing", f)?;
        }
    }
    if reasons.is_empty() {
        reasons.push("no xz, zstd or gzip payload found".to_string());
    }
    Ok(Some(reasons.join("; ")))
}

fn find_all(haystack: &[u8], needle: &[u8], max: usize) -> Vec<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .take(max)
        .collect()
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<usize> {
    let v = u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?);
    usize::try_from(v).ok()
}

/// Passes when `elf` is a whole little-endian x86-64 ELF64 (every program header's bytes are in
/// the file: a truncated decompression fails here) with the PVH entry note.
pub(crate) fn check_pvh_elf(elf: &[u8]) -> std::result::Result<(), String> {
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file".into());
    }
    // EI_CLASS 2 (64-bit), EI_DATA 1 (little-endian).
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not a little-endian ELF64".into());
    }
    if u16_at(elf, 0x12) != Some(EM_X86_64) {
        return Err("not an x86-64 ELF".into());
    }
    let bad = || "truncated ELF headers".to_string();
    let phoff = u64_at(elf, 0x20).ok_or_else(bad)?;
    let phentsize = usize::from(u16_at(elf, 0x36).ok_or_else(bad)?);
    let phnum = usize::from(u16_at(elf, 0x38).ok_or_else(bad)?);
    if phentsize < 56 {
        return Err(format!("program header entries of {phentsize} bytes"));
    }
    let mut pvh = false;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i.checked_mul(phentsize).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        let p_type = u32_at(elf, ph).ok_or_else(bad)?;
        let offset = u64_at(elf, ph + 8).ok_or_else(bad)?;
        let filesz = u64_at(elf, ph + 32).ok_or_else(bad)?;
        let end = offset.checked_add(filesz).ok_or_else(bad)?;
        if end > elf.len() {
            return Err(format!(
                "segment {i} ends at byte {end}, the file has {}: truncated",
                elf.len()
            ));
        }
        if p_type == PT_NOTE && has_pvh_note(&elf[offset..end]) {
            pvh = true;
        }
    }
    if pvh {
        Ok(())
    } else {
        Err("no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY; a kernel without CONFIG_PVH)".into())
    }
}

/// Whether a PT_NOTE segment holds a note named "Xen" of type `XEN_ELFNOTE_PHYS32_ENTRY`.
fn has_pvh_note(mut notes: &[u8]) -> bool {
    let align4 = |n: usize| n.div_ceil(4) * 4;
    while notes.len() >= 12 {
        let (Some(namesz), Some(descsz), Some(kind)) =
            (u32_at(notes, 0), u32_at(notes, 4), u32_at(notes, 8))
        else {
            return false;
        };
        let (namesz, descsz) = (namesz as usize, descsz as usize);
        let name_end = 12 + align4(namesz);
        let Some(name) = notes.get(12..12 + namesz) else {
            return false;
        };
        if kind == PVH_NOTE_TYPE && name == b"Xen\0" {
            return true;
        }
        let next = name_end + align4(descsz);
        match notes.get(next..) {
            Some(rest) => notes = rest,
            None => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 x86-64 file: one PT_NOTE segment holding `notes`.
    fn elf_with_notes(notes: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[0x12..0x14].copy_from_slice(&EM_X86_64.to_le_bytes());
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        e[64..68].copy_from_slice(&PT_NOTE.to_le_bytes());
        e[72..80].copy_from_slice(&120u64.to_le_bytes());
        e[96..104].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        e.extend_from_slice(notes);
        e
    }

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n.extend_from_slice(desc);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n
    }

    #[test]
    fn finds_the_pvh_note_after_others() {
        let mut notes = note(b"GNU\0", 3, &[1; 20]);
        notes.extend(note(b"Xen\0", 6, b"linux\0"));
        notes.extend(note(b"Xen\0", PVH_NOTE_TYPE, &[0; 8]));
        assert_eq!(check_pvh_elf(&elf_with_notes(&notes)), Ok(()));
    }

    #[test]
    fn rejects_no_note_truncation_and_other_files() {
        let notes = note(b"Xen\0", 6, b"linux\0");
        let e = check_pvh_elf(&elf_with_notes(&notes)).expect_err("no PVH note");
        assert!(e.contains("PVH"), "{e}");

        let full = elf_with_notes(&note(b"Xen\0", PVH_NOTE_TYPE, &[0; 8]));
        let e = check_pvh_elf(&full[..full.len() - 1]).expect_err("truncated");
        assert!(e.contains("truncated"), "{e}");
        assert!(check_pvh_elf(&full[..40]).is_err());

        let mut other = full.clone();
        other[0x12] = 3; // EM_386
        assert!(check_pvh_elf(&other).is_err());
        assert!(check_pvh_elf(b"MZ not an elf").is_err());
        assert!(check_pvh_elf(b"").is_err());
    }

    #[test]
    fn a_bad_note_size_stops_the_walk() {
        let mut notes = note(b"GNU\0", 3, &[1; 4]);
        notes[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        notes.extend(note(b"Xen\0", PVH_NOTE_TYPE, &[0; 8]));
        assert!(check_pvh_elf(&elf_with_notes(&notes)).is_err());
    }

    #[test]
    fn finds_magics_in_order() {
        assert_eq!(find_all(b"xxabyyabab", b"ab", 2), vec![2, 6]);
        assert!(find_all(b"xyz", b"ab", 3).is_empty());
    }
}
