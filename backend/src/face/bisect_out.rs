//! What `ctl bisect` prints and the report file its `--out` writes.

use std::io::Write;

use serde_json::Value;

use crate::face::render::{s, u};
use crate::face::CliError;

/// `ctl bisect`'s reply for a person: the verdict, the request, where the report is.
pub fn bisect_text(r: &Value) -> String {
    let rep = r.get("report").cloned().unwrap_or(Value::Null);
    let mut out = s(&rep, "verdict");
    if let Some(e) = rep.get("first_bad").filter(|e| !e.is_null()) {
        out += &format!(
            "\nfirst bad request: #{} {} sector {} +{} sectors, data xxh3-128 {}",
            u(e, "seq"),
            s(e, "op"),
            u(e, "sector"),
            u(e, "sectors"),
            e.get("hash").and_then(Value::as_str).unwrap_or("-")
        );
    }
    let w = rep.get("window").cloned().unwrap_or(Value::Null);
    out += &format!(
        "\njournal: requests {}..{} ({} kept, {} forgotten); {} requests replayed",
        u(&w, "first_seq"),
        u(&w, "last_seq"),
        u(&w, "entries"),
        u(&w, "forgotten"),
        u(&rep, "replayed")
    );
    match r.get("file").and_then(Value::as_str) {
        Some(f) => out += &format!("\nreport: {f}"),
        None => out += &format!("\nreport not saved: {}", s(r, "not_saved")),
    }
    out
}

/// Writes `report` as JSON to the new file `path` (0600; never over a file or a symlink).
pub fn write_new_report(path: &std::path::Path, report: &Value) -> Result<(), CliError> {
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |e: std::io::Error| {
        CliError::Invalid(format!(
            "cannot write the report to {}: {e}",
            path.display()
        ))
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    let mut text = serde_json::to_vec_pretty(report).map_err(|e| fail(std::io::Error::other(e)))?;
    text.push(b'\n');
    f.write_all(&text).map_err(fail)?;
    f.sync_all().map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;

    fn reply() -> Value {
        json!({
            "report": {
                "verdict": "block 2: the versions' views first differ after request 2",
                "first_bad": {"seq": 2, "op": "write", "sector": 16, "sectors": 1,
                              "hash": "00112233445566778899aabbccddeeff"},
                "window": {"first_seq": 1, "last_seq": 9, "entries": 9, "forgotten": 0},
                "replayed": 5
            },
            "file": "/s/bisect/bisect-a-2-1.json",
            "not_saved": null
        })
    }

    #[test]
    fn the_text_names_the_request_the_window_and_the_file() {
        let t = bisect_text(&reply());
        assert!(t.starts_with("block 2: the versions"), "{t}");
        assert!(
            t.contains("first bad request: #2 write sector 16 +1 sectors, data xxh3-128 0011"),
            "{t}"
        );
        assert!(
            t.contains("journal: requests 1..9 (9 kept, 0 forgotten); 5 requests replayed"),
            "{t}"
        );
        assert!(t.ends_with("report: /s/bisect/bisect-a-2-1.json"), "{t}");
        let mut r = reply();
        r["file"] = Value::Null;
        r["not_saved"] = json!("the store has no directory");
        r["report"]["first_bad"] = Value::Null;
        let t = bisect_text(&r);
        assert!(!t.contains("first bad request"), "{t}");
        assert!(
            t.ends_with("report not saved: the store has no directory"),
            "{t}"
        );
    }

    #[test]
    fn the_out_file_is_new_0600_json_and_never_replaces_anything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.json");
        let rep = reply()["report"].clone();
        write_new_report(&path, &rep).expect("write");
        let back: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        assert_eq!(back, rep);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // An existing file and a symlink are refused, and left as they were.
        let e = write_new_report(&path, &json!({})).expect_err("exists");
        assert!(e.to_string().contains("cannot write the report"), "{e}");
        let target = dir.path().join("target");
        std::fs::write(&target, b"keep").expect("target");
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        write_new_report(&link, &rep).expect_err("symlink");
        assert_eq!(std::fs::read(&target).expect("target"), b"keep");
    }
}
