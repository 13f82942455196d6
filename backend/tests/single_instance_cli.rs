//! Single-instance blocks as an operator turns them on: `store create --single-instance`, and
//! `store upgrade --single-instance` for an existing store; a teed disk whose copy-out carries
//! every block to the candidate as a reference, not a second copy, with `store check` proving
//! every referenced block held and none leaked.

mod cli;

use std::os::unix::fs::MetadataExt;

use cli::{ok, path};

/// Bytes the store's data file takes on its filesystem.
fn allocated(dir: &std::path::Path) -> u64 {
    std::fs::metadata(dir.join("data.0"))
        .expect("data file")
        .blocks()
        * 512
}

/// A disk of 4 MiB of distinct blocks, imported, teed to a parallax-v1 candidate and copied
/// out; returns the data file's allocated bytes.
fn teed_and_copied(d: &str, dir: &std::path::Path, image: &std::path::Path) -> u64 {
    ok(&[
        "disk",
        "create",
        d,
        "vm",
        "--size",
        "4M",
        "--layout",
        "parallax-v1",
    ]);
    ok(&["disk", "import", "--from", path(image), d, "vm"]);
    ok(&[
        "disk",
        "tee",
        d,
        "vm",
        "--candidate",
        "parallax-v1",
        "--policy",
        "mirror-only",
    ]);
    let out = ok(&["migrate", d, "vm"]);
    assert!(out.contains("every block is in the candidate"), "{out}");
    allocated(dir)
}

#[test]
fn a_copied_out_candidate_references_the_trusted_versions_blocks() {
    let t = tempfile::tempdir().expect("tempdir");
    let image = t.path().join("img");
    let mut bytes = vec![0u8; 4 << 20];
    for (i, c) in bytes.chunks_mut(8).enumerate() {
        c.copy_from_slice(
            &(i as u64)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(1)
                .to_le_bytes(),
        );
    }
    std::fs::write(&image, &bytes).expect("write the image");

    // Without: the candidate holds a second copy.
    let plain = t.path().join("plain");
    ok(&[
        "store",
        "create",
        path(&plain),
        "--size",
        "16M",
        "--extent-size",
        "1M",
    ]);
    let two_copies = teed_and_copied(path(&plain), &plain, &image);

    // With: one copy, held by both versions.
    let si = t.path().join("si");
    let out = ok(&[
        "store",
        "create",
        path(&si),
        "--size",
        "16M",
        "--extent-size",
        "1M",
        "--single-instance",
    ]);
    assert!(out.contains("single-instance blocks: on"), "{out}");
    let one_copy = teed_and_copied(path(&si), &si, &image);
    assert!(
        two_copies >= 2 * (4 << 20) && one_copy < (4 << 20) + (1 << 20),
        "data file: {two_copies} bytes without single-instance blocks, {one_copy} with"
    );
    let report = ok(&["store", "check", path(&si)]);
    assert!(report.contains("format version 6"), "{report}");
    assert!(
        report.contains("1024 blocks in use, 2048 holds (1024 blocks saved)"),
        "{report}"
    );
    assert!(report.contains("result: consistent"), "{report}");
    // The disk (its blocks all in the pool) reads back the image.
    let out_img = t.path().join("out");
    ok(&["disk", "export", "--to", path(&out_img), path(&si), "vm"]);
    assert_eq!(std::fs::read(&out_img).expect("read the export"), bytes);

    // An existing store opts in: upgraded to format 6, what it held stays, new copies share.
    let report = ok(&["store", "check", path(&plain)]);
    assert!(report.contains("format version 5"), "{report}");
    let out = ok(&["store", "upgrade", path(&plain), "--single-instance"]);
    assert!(out.contains("format version 6"), "{out}");
    assert!(out.contains("single-instance blocks: on"), "{out}");
    ok(&["disk", "untee", path(&plain), "vm"]);
    ok(&[
        "disk",
        "tee",
        path(&plain),
        "vm",
        "--candidate",
        "parallax-v1",
        "--policy",
        "mirror-only",
    ]);
    ok(&["migrate", path(&plain), "vm"]);
    let report = ok(&["store", "check", path(&plain)]);
    assert!(report.contains("result: consistent"), "{report}");
    // The trusted version's blocks predate the pool: the new candidate's 1024 blocks went into
    // the pool once, held by it alone.
    assert!(
        report.contains("1024 blocks in use, 1024 holds"),
        "{report}"
    );
}
