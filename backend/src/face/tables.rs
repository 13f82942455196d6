//! The tables the store and disk commands print (`store create`, `disk list`).

use std::path::Path;

use dovetail_store::{human_size, Store};

/// What `store create` prints: the store, then one row per tier.
pub fn created_table(dir: &Path, i: &dovetail_store::StoreInfo) -> String {
    let mut out = format!(
        "created store {}: {} extents of {} ({}), uuid {}\n",
        dir.display(),
        i.extent_count,
        human_size(i.extent_size),
        human_size(i.extent_size * u64::from(i.extent_count)),
        dovetail_store::format_uuid(&i.uuid)
    );
    let mut rows = vec![[
        "TIER".to_string(),
        "PATH".to_string(),
        "SIZE".to_string(),
        "EXTENTS".to_string(),
    ]];
    for t in &i.tiers {
        rows.push([
            t.name.clone(),
            t.path.display().to_string(),
            human_size(i.extent_size * u64::from(t.extents)),
            format!(
                "{} ({}..={})",
                t.extents,
                t.first_extent,
                t.first_extent + t.extents - 1
            ),
        ]);
    }
    out.push_str(&table(&rows));
    out
}

/// Rows as columns padded to their widest cell, two spaces apart, one line each.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `disk list` table: one row per disk, then the store's free space.
pub fn disk_table(store: &Store) -> String {
    let info = store.info();
    let versions = store.versions();
    let extents = |k: dovetail_store::VersionKey| {
        versions
            .iter()
            .find(|v| v.key == k)
            .map_or(0, |v| v.extents.len())
    };
    let mut rows = vec![[
        "NAME".to_string(),
        "SIZE".to_string(),
        "LAYOUT".to_string(),
        "TRUSTED".to_string(),
        "CANDIDATE".to_string(),
        "EXTENTS".to_string(),
        "TEE".to_string(),
    ]];
    for d in store.disks() {
        let (cand, cand_extents) = match d.candidate {
            Some(c) => (
                format!(
                    "{} ({})",
                    c.0,
                    versions
                        .iter()
                        .find(|v| v.key == c)
                        .map_or("", |v| v.layout.as_str())
                ),
                extents(c),
            ),
            None => ("-".to_string(), 0),
        };
        rows.push([
            d.name,
            human_size(d.size),
            d.layout,
            d.trusted.0.to_string(),
            cand,
            (extents(d.trusted) + cand_extents).to_string(),
            match &d.tee {
                None => "-".to_string(),
                Some(t) if t.state == dovetail_store::TeeState::Quarantined => {
                    format!("{}, quarantined: {}", t.policy, t.reason)
                }
                Some(t) if t.faults.is_empty() => t.policy.clone(),
                Some(t) => format!("{}, faults {}", t.policy, t.faults.join(" ")),
            },
        ]);
    }
    let mut widths = [0usize; 7];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let line = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(&format!(
        "{} disk(s); {} of {} extents of {} free\n",
        rows.len() - 1,
        info.free_extents,
        info.extent_count,
        human_size(info.extent_size)
    ));
    out
}
