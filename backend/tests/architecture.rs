//! ARCHITECTURE.md's crate table, checked against the real dependency graph so it cannot drift:
//! `cargo metadata` says what each workspace crate depends on, the table's "may depend on"
//! column says what it may, and every difference fails with the crate, the dependency and the
//! row to fix. A new crate needs only a new row. Also checks that the production binary's
//! dependency graph turns on no test harness (`test-utils`).
//!
//! The column's grammar (ARCHITECTURE.md says it under the table): items separated by commas;
//! each item's dependency is its last word once parentheses, `**`, backticks and backslashes are
//! dropped (so an item may start with prose: "and only it may use vhost"); a crate of the
//! workspace is named by its directory (`store`) or its package (`dovetail-store`); `x-*`
//! allows every dependency whose name starts with `x-`; `std` is always allowed; "the crates
//! above" allows the crates of the rows above; after a `;`, "in tests: a, b" lists the
//! workspace crates allowed as dev-dependencies only. Normal and build dependencies must be
//! allowed, and every name the row gives must be a dependency of its kind (no stale entries); a
//! dev-dependency on another workspace crate must be allowed too (other dev-dependencies are
//! not checked).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// One dependency of a workspace crate, as cargo metadata gives it.
#[derive(Debug)]
struct Dep {
    /// The package name (`vhost-user-backend`, `dovetail-store`).
    name: String,
    /// Normal and build dependencies: true; dev-dependencies: false.
    normal: bool,
    /// A workspace crate (a path dependency): its directory name.
    internal_dir: Option<String>,
}

/// One workspace crate: its directory (relative to the workspace root) and dependencies.
#[derive(Debug)]
struct Crate {
    package: String,
    deps: Vec<Dep>,
}

/// One row of the table.
#[derive(Debug)]
struct Row {
    /// The directory the first column names (`store` for "`store/` (`dovetail-store`)").
    dir: String,
    /// The normal items of "may depend on".
    allowed: Vec<String>,
    /// The items after "in tests:".
    tests: Vec<String>,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("backend/ has a parent")
        .to_path_buf()
}

/// The workspace's crates by directory, from `cargo metadata --no-deps` (no network, no
/// resolution: the manifests as written).
fn workspace() -> BTreeMap<String, Crate> {
    let root = workspace_root();
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(&root)
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata's JSON");
    // A directory relative to the workspace root (`store`), as the table names it.
    let relative = |p: &Path| -> String {
        p.strip_prefix(&root)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned()
    };
    let mut crates = BTreeMap::new();
    for p in meta["packages"].as_array().expect("packages") {
        let deps = p["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            .map(|d| Dep {
                name: d["name"].as_str().expect("a dependency's name").to_string(),
                normal: !d["kind"].is_string() || d["kind"] == "build",
                internal_dir: d["path"].as_str().map(|path| relative(Path::new(path))),
            })
            .collect();
        let manifest = Path::new(p["manifest_path"].as_str().expect("manifest_path"));
        let dir = relative(manifest.parent().expect("a manifest's directory"));
        let package = p["name"].as_str().expect("name").to_string();
        crates.insert(dir, Crate { package, deps });
    }
    crates
}

/// Splits a table line into its cells (an escaped `\|` stays inside its cell).
fn cells(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.trim().trim_matches('|').chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                out.last_mut().expect("a cell").push('|');
                chars.next();
            }
            '|' => out.push(String::new()),
            _ => out.last_mut().expect("a cell").push(c),
        }
    }
    out.into_iter().map(|c| c.trim().to_string()).collect()
}

/// Splits on `sep` outside parentheses.
fn split_top(s: &str, sep: char) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ => {}
        }
        if c == sep && depth == 0 {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// An item of the column reduced to the name it allows (see the module's doc).
fn item_name(item: &str) -> Option<String> {
    let mut plain = String::new();
    let mut depth = 0i32;
    for c in item.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            '`' | '\\' => {}
            _ if depth == 0 => plain.push(c),
            _ => {}
        }
    }
    let plain = plain.replace("**", "");
    let plain = plain.trim();
    if plain.is_empty() {
        return None;
    }
    if plain == "the crates above" {
        return Some(plain.to_string());
    }
    plain.split_whitespace().last().map(str::to_string)
}

fn items(list: &str) -> Vec<String> {
    split_top(list, ',')
        .iter()
        .filter_map(|i| item_name(i))
        .collect()
}

/// The rows of ARCHITECTURE.md's "## Crates" table.
fn table(doc: &str) -> Vec<Row> {
    let section = doc
        .split("\n## ")
        .find(|s| s.starts_with("Crates"))
        .expect("ARCHITECTURE.md has a \"## Crates\" section");
    let lines: Vec<&str> = section
        .lines()
        .filter(|l| l.trim_start().starts_with('|'))
        .collect();
    let header = cells(lines.first().expect("the crate table"));
    let col = header
        .iter()
        .position(|h| h == "may depend on")
        .expect("a \"may depend on\" column");
    let mut rows = Vec::new();
    for line in &lines[2..] {
        let c = cells(line);
        let first = &c[0];
        let dir = first
            .split('`')
            .find(|t| t.ends_with('/'))
            .unwrap_or_else(|| panic!("the row {first:?} names no directory (`dir/`)"))
            .trim_end_matches('/')
            .to_string();
        let may = c
            .get(col)
            .unwrap_or_else(|| panic!("the row of {dir}/ has no \"may depend on\" cell"));
        let parts = split_top(may, ';');
        let allowed = items(&parts[0]);
        let mut tests = Vec::new();
        for extra in &parts[1..] {
            let extra = extra.trim();
            let list = extra.strip_prefix("in tests:").unwrap_or_else(|| {
                panic!("the row of {dir}/: after a `;` comes \"in tests: ...\", not {extra:?}")
            });
            tests.extend(items(list));
        }
        rows.push(Row {
            dir,
            allowed,
            tests,
        });
    }
    rows
}

/// Whether `name` (from the table) allows the dependency `dep`.
fn allows(name: &str, dep: &Dep, crates: &BTreeMap<String, Crate>) -> bool {
    if let Some(dir) = &dep.internal_dir {
        let package = crates.get(dir).map(|c| c.package.as_str());
        return name == dir || Some(name) == package;
    }
    match name.strip_suffix('*') {
        Some(prefix) => dep.name.starts_with(prefix),
        None => name == dep.name,
    }
}

/// Every difference between the table and the graph, one line each.
fn problems(rows: &[Row], crates: &BTreeMap<String, Crate>) -> Vec<String> {
    let mut out = Vec::new();
    let row_dirs: BTreeSet<&str> = rows.iter().map(|r| r.dir.as_str()).collect();
    for (dir, c) in crates {
        if !row_dirs.contains(dir.as_str()) {
            out.push(format!(
                "{} ({dir}/) has no row in ARCHITECTURE.md's crate table",
                c.package
            ));
        }
    }
    for (i, row) in rows.iter().enumerate() {
        let Some(c) = crates.get(&row.dir) else {
            out.push(format!(
                "ARCHITECTURE.md's row {}/ is no crate of the workspace",
                row.dir
            ));
            continue;
        };
        let above: Vec<&str> = rows[..i].iter().map(|r| r.dir.as_str()).collect();
        let named: Vec<&str> = row
            .allowed
            .iter()
            .map(String::as_str)
            .filter(|n| *n != "std" && *n != "the crates above")
            .collect();
        let everything_above = row.allowed.iter().any(|n| n == "the crates above");
        let ok_normal = |d: &Dep| {
            named.iter().any(|n| allows(n, d, crates))
                || (everything_above
                    && d.internal_dir
                        .as_deref()
                        .is_some_and(|x| above.contains(&x)))
        };
        for d in &c.deps {
            if d.internal_dir.as_deref() == Some(row.dir.as_str()) {
                continue; // a crate's dev-dependency on itself, for its test features
            }
            if d.normal && !ok_normal(d) {
                out.push(format!(
                    "{} depends on {}, which its row ({}/) does not allow",
                    c.package, d.name, row.dir
                ));
            }
            if !d.normal
                && d.internal_dir.is_some()
                && !ok_normal(d)
                && !row.tests.iter().any(|n| allows(n, d, crates))
            {
                out.push(format!(
                    "{}'s tests depend on {}, which its row ({}/) does not allow \
                     (\"; in tests: ...\")",
                    c.package, d.name, row.dir
                ));
            }
        }
        let stale = named
            .iter()
            .map(|n| (*n, true))
            .chain(row.tests.iter().map(|n| (n.as_str(), false)));
        for (n, normal) in stale {
            if !c
                .deps
                .iter()
                .any(|d| d.normal == normal && allows(n, d, crates))
            {
                out.push(format!(
                    "the row of {}/ allows {n}, which {} does not depend on (a stale entry?)",
                    row.dir, c.package
                ));
            }
        }
    }
    out
}

#[test]
fn the_crate_table_matches_cargo_metadata() {
    let doc = std::fs::read_to_string(workspace_root().join("ARCHITECTURE.md"))
        .expect("read ARCHITECTURE.md");
    let rows = table(&doc);
    assert!(
        rows.len() >= 7,
        "the crate table has too few rows: {rows:?}"
    );
    let found = problems(&rows, &workspace());
    assert!(
        found.is_empty(),
        "ARCHITECTURE.md's crate table and the dependency graph disagree:\n  {}",
        found.join("\n  ")
    );
}

/// The checker itself: a dependency the row does not allow, a stale entry, a missing row, a
/// dev-only crate, wildcards and "the crates above".
#[test]
fn the_checker_finds_each_kind_of_drift() {
    let doc = "# A\n\n## Crates\n\n| crate | what | may depend on |\n| --- | --- | --- |\n\
        | `low/` (`x-low`) | l | std, libc (the C library), **and only it may use** `vhost` |\n\
        | `mid/` | m | low, virtio-\\*; in tests: top |\n\
        | `top/` | t | the crates above, clap |\n\n## Next\n";
    let rows = table(doc);
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].allowed, ["std", "libc", "vhost"]);
    assert_eq!(rows[1].allowed, ["low", "virtio-*"]);
    assert_eq!(rows[1].tests, ["top"]);
    let dep = |name: &str, normal: bool, dir: Option<&str>| Dep {
        name: name.to_string(),
        normal,
        internal_dir: dir.map(str::to_string),
    };
    let krate = |package: &str, deps: Vec<Dep>| Crate {
        package: package.to_string(),
        deps,
    };
    let mut crates = BTreeMap::new();
    crates.insert(
        "low".to_string(),
        krate(
            "x-low",
            vec![dep("libc", true, None), dep("vhost", true, None)],
        ),
    );
    crates.insert(
        "mid".to_string(),
        krate(
            "x-mid",
            vec![
                dep("x-low", true, Some("low")),
                dep("virtio-queue", true, None),
                dep("x-top", false, Some("top")),
                dep("x-mid", false, Some("mid")),
                dep("proptest", false, None),
            ],
        ),
    );
    crates.insert(
        "top".to_string(),
        krate(
            "x-top",
            vec![
                dep("x-low", true, Some("low")),
                dep("x-mid", true, Some("mid")),
                dep("clap", true, None),
            ],
        ),
    );
    assert_eq!(problems(&rows, &crates), Vec::<String>::new());

    // A dependency the row does not allow, and a stale entry.
    crates.get_mut("low").expect("low").deps[1] = dep("serde", true, None);
    // A dev-dependency on a workspace crate the row does not list.
    crates
        .get_mut("top")
        .expect("top")
        .deps
        .push(dep("x-new", false, Some("new")));
    // A crate without a row.
    crates.insert("new".to_string(), krate("x-new", vec![]));
    let found = problems(&rows, &crates);
    assert_eq!(
        found,
        [
            "x-new (new/) has no row in ARCHITECTURE.md's crate table",
            "x-low depends on serde, which its row (low/) does not allow",
            "the row of low/ allows vhost, which x-low does not depend on (a stale entry?)",
            "x-top's tests depend on x-new, which its row (top/) does not allow \
             (\"; in tests: ...\")",
        ],
        "{found:#?}"
    );
}

/// The production binary's dependency graph (normal and build edges, as `cargo build -p
/// dovetail-backend --release` resolves it) turns on no test harness: `test-utils` (store's
/// simulated files and fault injection, the backend's fuzz targets) is only for tests, bench/
/// and fuzz/.
#[test]
fn the_production_graph_has_no_test_harnesses() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "--locked",
            "-p",
            "dovetail-backend",
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "-f",
            "{p} [{f}]",
        ])
        .current_dir(workspace_root())
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        tree.contains("dovetail-store v"),
        "the graph names the store: {tree}"
    );
    let harness: Vec<&str> = tree
        .lines()
        .filter(|l| l.contains("test-utils") || l.contains("failpoints"))
        .collect();
    assert!(
        harness.is_empty(),
        "the production graph turns test features on:\n{}",
        harness.join("\n")
    );
}
