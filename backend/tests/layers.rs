//! The backend's layers (ARCHITECTURE.md, The backend in layers) stay layers: no module imports
//! one of a layer above it, and no files import each other in a circle
//! (`scripts/modcycles.py`, which scripts/test.sh also runs).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The layers, top first; a file belongs to the first whose directory holds it, the request path
/// is every other file of `src/` (lib.rs, main.rs and the fuzz targets' `fuzzing.rs`, which
/// drive every layer, excepted).
const LAYERS: &[(&str, &str)] = &[
    ("face", "faces"),
    ("daemon", "daemon"),
    ("ops", "operations"),
];
const HARNESSES: &[&str] = &["lib.rs", "main.rs", "fuzzing.rs"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The layer of a file (its index in [`LAYERS`]; the request path is `LAYERS.len()`), `None`
/// for the harnesses.
fn layer_of(rel: &Path) -> Option<usize> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    if rel.components().count() == 1 {
        return (!HARNESSES.contains(&first)).then_some(LAYERS.len());
    }
    Some(
        LAYERS
            .iter()
            .position(|(dir, _)| *dir == first)
            .unwrap_or(LAYERS.len()),
    )
}

/// The production text of a file: comments and the `#[cfg(test)] mod tests` at its end cut off.
fn production_text(text: &str) -> String {
    let text = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default();
    text.lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn no_module_imports_a_layer_above_it() {
    let src = src();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut wrong = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).expect("under src");
        let Some(own) = layer_of(rel) else { continue };
        let text = production_text(&std::fs::read_to_string(f).expect("read"));
        for (dir, name) in LAYERS.iter().take(own) {
            if text.contains(&format!("crate::{dir}")) {
                wrong.push(format!(
                    "{} imports the {name} (crate::{dir}), a layer above it",
                    rel.display()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // The check sees the layers at all: every one holds files.
    for (dir, _) in LAYERS {
        assert!(src.join(dir).is_dir(), "src/{dir} is gone: update LAYERS");
    }
}

#[test]
fn the_backend_has_no_import_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("python3")
        .arg(root.join("scripts/modcycles.py"))
        .arg(src())
        .output()
        .expect("python3 runs scripts/modcycles.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim() == "no circles",
        "import circles in backend/src:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_circle_check_finds_a_circle() {
    // The tool itself, on two modules that import each other: it must say so and fail.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("lib.rs"), "pub mod a;\npub mod b;\n").expect("lib");
    std::fs::write(dir.path().join("a.rs"), "use crate::b::B;\npub struct A;\n").expect("a");
    std::fs::write(dir.path().join("b.rs"), "use crate::a::A;\npub struct B;\n").expect("b");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("python3")
        .arg(root.join("scripts/modcycles.py"))
        .arg(dir.path())
        .output()
        .expect("python3 runs scripts/modcycles.py");
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "circle of 2 files: a.rs, b.rs"
    );
}
