//! `dovetail disk ...`, `dovetail migrate` and `dovetail promote`: the offline disk commands.

use std::sync::Arc;

use dovetail_store::{human_size, Store};

use crate::daemon::control;
use crate::face::cli::{
    DiskAnnotationsArgs, DiskCommand, DiskHeatmapArgs, MigrateArgs, PromoteArgs,
};
use crate::face::store_cmd::read_store;
use crate::face::tables::disk_table;
use crate::face::{CliError, Size};
use crate::ops::diskio;
use crate::ops::teed;

/// Runs `dovetail promote`.
pub fn run_promote(a: PromoteArgs) -> Result<(), CliError> {
    let rate = if a.verify_rate == "0" {
        0
    } else {
        a.verify_rate
            .parse::<Size>()
            .map_err(|e| CliError::Invalid(format!("--verify-rate: {e}")))?
            .0
    };
    let store = Store::open(&a.dir)?;
    let message = teed::promote_offline(&store, &a.name, a.no_verify, rate)?;
    println!("{message}");
    Ok(())
}

/// Runs `dovetail migrate`.
pub fn run_migrate(a: MigrateArgs) -> Result<(), CliError> {
    let rate = if a.rate == "0" {
        0
    } else {
        a.rate
            .parse::<Size>()
            .map_err(|e| CliError::Invalid(format!("--rate: {e}")))?
            .0
    };
    let store = Store::open(&a.dir)?;
    let p = teed::migrate_offline(&store, &a.name, rate, true)?;
    println!(
        "disk {}: every block is in the candidate ({} copied, {} zero blocks, {:.1} MiB/s); \
         `dovetail promote {} {}` promotes it (or `dovetail ctl promote` on a daemon serving it)",
        a.name,
        p.copied_blocks,
        p.zero_blocks,
        p.rate_bytes_per_second / f64::from(1 << 20),
        a.dir.display(),
        a.name
    );
    Ok(())
}

/// Carries out `dovetail disk ...`, printing what was done (or the listing) on stdout.
pub fn run_disk(cmd: DiskCommand) -> Result<(), CliError> {
    match cmd {
        DiskCommand::Create(a) => {
            let store = Store::open(&a.dir)?;
            let key = store.create_disk(&a.name, a.size.0, &a.layout)?;
            println!(
                "created disk {} ({}, {}) in {}: trusted {key}",
                a.name,
                human_size(a.size.0),
                a.layout,
                a.dir.display()
            );
            Ok(())
        }
        DiskCommand::List(a) => {
            let table = read_store(&a.dir, |store| Ok::<_, CliError>(disk_table(store)))?;
            print!("{table}");
            Ok(())
        }
        DiskCommand::Delete(a) => {
            let store = Store::open(&a.dir)?;
            let freed = store.delete_disk(&a.name)?;
            println!(
                "deleted disk {} from {}: {freed} extent(s) freed",
                a.name,
                a.dir.display()
            );
            Ok(())
        }
        DiskCommand::Import(a) => {
            let store = Store::open(&a.dir)?;
            let c = diskio::import(&store, &a.name, &a.from)?;
            println!(
                "imported {} into disk {}: {} of data, {} of zeroes skipped",
                a.from.display(),
                a.name,
                human_size(c.data),
                human_size(c.bytes - c.data)
            );
            Ok(())
        }
        DiskCommand::Export(a) => {
            let store = Store::open(&a.dir)?;
            let c = diskio::export(&store, &a.name, a.snapshot.as_deref(), &a.to)?;
            println!(
                "exported disk {}{} to {}: {} of data in a {} sparse image",
                a.name,
                a.snapshot
                    .map(|s| format!(" (snapshot {s})"))
                    .unwrap_or_default(),
                a.to.display(),
                human_size(c.data),
                human_size(c.bytes)
            );
            Ok(())
        }
        DiskCommand::Snapshot(a) => {
            let store = Store::open(&a.dir)?;
            let name = a.snapshot.unwrap_or_else(|| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                format!("snap-{now}")
            });
            let s = diskio::snapshot(&store, &a.name, &name)?;
            println!(
                "disk {}: snapshot {} of generation {}",
                a.name, s.name, s.generation
            );
            Ok(())
        }
        DiskCommand::Resize(a) => {
            let store = Store::open(&a.dir)?;
            let old = diskio::resize(&store, &a.name, a.size.0)?;
            println!(
                "disk {}: grown from {} to {}",
                a.name,
                human_size(old),
                human_size(a.size.0)
            );
            Ok(())
        }
        DiskCommand::Snapshots(a) => {
            let list = read_store(&a.dir, |store| diskio::snapshots(store, &a.name))?;
            println!("{:<24} {:>10} {:>20}", "SNAPSHOT", "GENERATION", "CREATED");
            for s in &list {
                println!(
                    "{:<24} {:>10} {:>20}",
                    s.name,
                    s.generation,
                    crate::face::render::utc_time(s.created)
                );
            }
            println!("{} snapshot(s) of disk {}", list.len(), a.name);
            Ok(())
        }
        DiskCommand::DeleteSnapshot(a) => {
            let store = Store::open(&a.dir)?;
            diskio::delete_snapshot(&store, &a.name, &a.snapshot)?;
            println!("disk {}: deleted snapshot {}", a.name, a.snapshot);
            Ok(())
        }
        DiskCommand::Tee(a) => {
            let store = Store::open(&a.dir)?;
            let layout = teed::candidate_layout(&store, &a.name, a.candidate.as_deref())?;
            let done = teed::tee_disk(&store, &a.name, &layout, &a.policy, &a.faults)?;
            println!("{done}");
            Ok(())
        }
        DiskCommand::Upgrade(a) => {
            let store = Store::open(&a.dir)?;
            println!("{}", teed::upgrade_offline(&store, &a.name, &a.to)?);
            Ok(())
        }
        DiskCommand::Untee(a) => {
            let store = Store::open(&a.dir)?;
            println!("{}", teed::untee_disk(&store, &a.name)?);
            Ok(())
        }
        DiskCommand::Heatmap(a) => {
            println!("{}", read_store(&a.dir, |store| heatmap(store, &a))?);
            Ok(())
        }
        DiskCommand::Annotations(a) => {
            let r = read_store(&a.dir, |store| offline_annotations(store, &a))?;
            if a.json {
                println!("{r}");
            } else {
                println!("{}", crate::face::render::annotations_text(&r));
            }
            Ok(())
        }
    }
}

/// One version's annotations, read offline.
enum OfflineTable {
    /// The version, opened (its table lives in it).
    Open(dovetail_layout::Parallax),
    /// A version never opened yet: nothing recorded.
    Fresh(dovetail_annotations::Table),
}

/// A disk version that keeps annotations, opened offline.
struct Annotated {
    role: &'static str,
    key: dovetail_store::VersionKey,
    layout: String,
    table: OfflineTable,
}

impl Annotated {
    fn table(&self) -> &dovetail_annotations::Table {
        match &self.table {
            OfflineTable::Open(p) => p.annotations().unwrap_or_else(|| {
                unreachable!("opened only after checking the layout is parallax-v2")
            }),
            OfflineTable::Fresh(t) => t,
        }
    }

    fn labels(&self) -> Vec<dovetail_layout::parallax::Label> {
        match &self.table {
            OfflineTable::Open(p) => p.labels(),
            OfflineTable::Fresh(_) => Vec::new(),
        }
    }
}

/// Opens the version of disk `name` whose annotations `role` asks for (default: the trusted
/// version if it keeps annotations, else the candidate), refusing a parallax-v1 one.
fn open_annotated(
    store: &Arc<Store>,
    name: &str,
    role: Option<&str>,
) -> Result<Annotated, CliError> {
    let info = store.disk(name)?;
    let trusted = ("trusted", info.trusted, info.layout.clone());
    let candidate = match info.candidate {
        Some(k) => Some(("candidate", k, store.version(k)?.layout)),
        None => None,
    };
    let keeps = |l: &str| l == "parallax-v2";
    let (role, key, layout) = match role {
        Some("candidate") => candidate
            .ok_or_else(|| CliError::Invalid(format!("disk {name} has no candidate version")))?,
        Some(_) => trusted,
        None if keeps(&trusted.2) => trusted,
        None => match candidate {
            Some(c) if keeps(&c.2) => c,
            _ => trusted,
        },
    };
    if !keeps(&layout) {
        return Err(CliError::Invalid(format!(
            "disk {name}: the {role} {key} is {layout}, which keeps no annotations; \
             parallax-v2 does (`disk tee --candidate parallax-v2`, or `disk create --layout \
             parallax-v2`)"
        )));
    }
    let table = if store.version(key)?.root_len == 0 {
        // Never opened: nothing was read or written yet.
        OfflineTable::Fresh(dovetail_annotations::Table::new(
            info.size / 4096,
            dovetail_annotations::Epochs {
                base: 0,
                secs: dovetail_layout::parallax::EPOCH_SECS,
            },
        ))
    } else {
        OfflineTable::Open(crate::ops::open::open_version(
            store, name, key, &layout, info.size,
        )?)
    };
    Ok(Annotated {
        role,
        key,
        layout,
        table,
    })
}

/// `disk annotations`: the `annotations` result of docs/control.md, computed offline.
fn offline_annotations(
    store: &Arc<Store>,
    a: &DiskAnnotationsArgs,
) -> Result<serde_json::Value, CliError> {
    let v = open_annotated(store, &a.name, a.query.role.as_deref())?;
    let as_cli = |e: crate::daemon::live::CommandError| CliError::Invalid(e.message);
    let frozen = match (&a.query.snapshot, &v.table) {
        (Some(s), OfflineTable::Open(p)) => {
            Some(
                p.snapshot_annotations(s)
                    .map_err(|source| crate::ops::OpsError::OpenDisk {
                        name: format!("{}@{s}", a.name),
                        source,
                    })?,
            )
        }
        (Some(s), OfflineTable::Fresh(_)) => {
            return Err(CliError::Invalid(format!(
                "disk {}: no snapshot named {s:?}",
                a.name
            )))
        }
        (None, _) => None,
    };
    let live_labels;
    let (table, labels) = match &frozen {
        Some((t, l)) => (t, l.as_slice()),
        None => {
            live_labels = v.labels();
            (v.table(), live_labels.as_slice())
        }
    };
    control::annotations_result(
        &control::AnnotatedView {
            disk: &a.name,
            layout: &v.layout,
            version: Some(v.key.0),
            role: v.role,
            snapshot: a.query.snapshot.as_deref(),
            table,
            labels,
        },
        &a.query.query(),
    )
    .map_err(as_cli)
}

/// `disk heatmap`: writes the PNG, returns the one-line summary.
fn heatmap(store: &Arc<Store>, a: &DiskHeatmapArgs) -> Result<String, CliError> {
    let v = open_annotated(store, &a.name, a.role.as_deref())?;
    let table = v.table();
    let blocks = table.blocks();
    let columns = u64::from(a.columns);
    // At most one part per block: fewer rows for a small disk.
    let rows = blocks.min(columns * columns).div_ceil(columns).max(1);
    let parts = table.histogram((columns * rows) as usize);
    let heat: Vec<u64> = parts.iter().map(|r| r.heat).collect();
    let mut png = Vec::new();
    dovetail_annotations::render_heatmap_png(&heat, a.columns, a.cell, &mut png).map_err(
        |source| CliError::File {
            op: format!("draw the heatmap of disk {}", a.name),
            source,
        },
    )?;
    std::fs::write(&a.png, &png).map_err(|source| CliError::File {
        op: format!("write {}", a.png.display()),
        source,
    })?;
    let side = u64::from(a.cell);
    let mut line = format!(
        "disk {}: heatmap of {} version {} ({}) written to {}: {}x{} pixels, {} buckets of {} \
         block(s) ({} columns x {} rows)",
        a.name,
        v.layout,
        v.key.0,
        v.role,
        a.png.display(),
        columns * side,
        rows * side,
        parts.len(),
        parts.first().map_or(0, |p| p.blocks),
        columns,
        rows
    );
    let hottest = parts
        .iter()
        .enumerate()
        .filter(|(_, p)| p.heat > 0)
        .max_by_key(|(i, p)| (p.heat, std::cmp::Reverse(*i)));
    match hottest {
        Some((i, p)) => line.push_str(&format!(
            "; hottest bucket {i} (blocks {}-{}): {} reads, {} writes",
            p.first_block,
            (p.first_block + p.blocks).saturating_sub(1),
            p.reads,
            p.writes
        )),
        None => line.push_str("; no block was read or written yet"),
    }
    Ok(line)
}
