//! The text `dovetail ctl` prints for the daemon's replies (tables, times, annotation summaries),
//! and what the offline commands print in the same form.

use serde_json::Value;

pub fn migration_text(disk: &str, m: &Value) -> String {
    let mut t = format!(
        "disk {disk}: migration by {}: {} of {} blocks in the candidate",
        s(m, "mode"),
        u(m, "blocks_present"),
        u(m, "blocks_total")
    );
    if let Some(c) = m.get("copy_out").filter(|c| !c.is_null()) {
        t.push_str(&format!(
            "; copy-out {}: {} blocks copied, {} zero blocks, {:.1} MiB/s{}",
            s(c, "state"),
            u(c, "copied_blocks"),
            u(c, "zero_blocks"),
            c.get("rate_bytes_per_second")
                .and_then(Value::as_f64)
                .unwrap_or(0.0)
                / (1 << 20) as f64,
            c.get("eta_seconds")
                .and_then(Value::as_f64)
                .map(|e| format!(", eta {e:.0} s"))
                .unwrap_or_default()
        ));
    }
    if let Some(v) = m.get("verify").filter(|v| !v.is_null()) {
        t.push_str(&format!(
            "; promote's verification pass {}: {} of {} blocks compared{}",
            s(v, "state"),
            u(v, "blocks_verified"),
            u(v, "blocks_total"),
            match u(v, "mismatched_blocks") {
                0 => String::new(),
                n => format!(
                    ", {n} block(s) differ (first: {})",
                    v.get("first_mismatches")
                        .and_then(Value::as_array)
                        .map(|a| a
                            .iter()
                            .map(Value::to_string)
                            .collect::<Vec<_>>()
                            .join(", "))
                        .unwrap_or_default()
                ),
            }
        ));
    }
    t
}

pub fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

pub fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

pub fn pause_text(v: &Value) -> String {
    match v.get("pause") {
        Some(p) if !p.is_null() => format!(
            "I/O paused {:.3} ms (in-flight drain {:.3} ms)",
            u(p, "total_us") as f64 / 1e3,
            u(p, "drain_us") as f64 / 1e3
        ),
        _ => String::new(),
    }
}

pub fn event_line(ev: &Value) -> String {
    let p = pause_text(ev);
    format!(
        "{:>5} {} {:<10} {:<20} {}{}",
        u(ev, "seq"),
        utc_time(u(ev, "unix_ms") / 1000),
        s(ev, "disk"),
        s(ev, "kind"),
        s(ev, "message"),
        if p.is_empty() {
            String::new()
        } else {
            format!(" ({p})")
        }
    )
}

pub fn table(rows: Vec<Vec<String>>) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn yes_no(v: &Value, k: &str) -> &'static str {
    if v.get(k) == Some(&Value::Bool(true)) {
        "yes"
    } else {
        "no"
    }
}

/// A `tiers` result as text: what was done, the policy per class, the store's tiers, where
/// the blocks are, the counters and the mover.
pub fn tiers_text(r: &Value) -> String {
    let empty = vec![];
    let mut out = Vec::new();
    if let Some(m) = r.get("message").and_then(Value::as_str) {
        out.push(format!("disk {}: {m}", s(r, "disk")));
    }
    let version = match r.get("version").and_then(Value::as_u64) {
        Some(k) => format!("version {k}"),
        None => "version".into(),
    };
    out.push(format!(
        "disk {}: {version} ({}), tiering policy:",
        s(r, "disk"),
        s(r, "layout")
    ));
    let policy = r.get("policy").cloned().unwrap_or(Value::Null);
    let mut rows = vec![["CLASS", "COPIES", "TIER", "COMPRESS"]
        .map(String::from)
        .to_vec()];
    for c in ["metadata", "hot", "cold"] {
        let p = policy.get(c).cloned().unwrap_or(Value::Null);
        rows.push(vec![
            c.to_string(),
            u(&p, "copies").to_string(),
            s(&p, "tier"),
            yes_no(&p, "compress").to_string(),
        ]);
    }
    out.push(table(rows));
    out.push(format!(
        "cold after {} s idle; hot at {} access(es) per mover interval; mover rate {} MiB/s",
        u(&policy, "cold_after_secs"),
        u(&policy, "hot_accesses"),
        u(&policy, "move_mib_s")
    ));
    out.push(String::new());
    let mut rows = vec![["TIER", "EXTENTS", "FREE"].map(String::from).to_vec()];
    for t in r.get("tiers").and_then(Value::as_array).unwrap_or(&empty) {
        rows.push(vec![
            s(t, "name"),
            u(t, "extents").to_string(),
            u(t, "free").to_string(),
        ]);
    }
    out.push(table(rows));
    out.push(String::new());
    let usage = r.get("usage").and_then(Value::as_array).unwrap_or(&empty);
    if usage.is_empty() {
        out.push("no blocks in use".into());
    } else {
        let mut rows = vec![[
            "CLASS",
            "TIER",
            "COPIES",
            "COMPRESSED",
            "GROUPS",
            "BLOCKS",
            "POLICY",
        ]
        .map(String::from)
        .to_vec()];
        for g in usage {
            rows.push(vec![
                s(g, "class"),
                s(g, "tier"),
                u(g, "copies").to_string(),
                yes_no(g, "compressed").to_string(),
                u(g, "groups").to_string(),
                u(g, "blocks").to_string(),
                if g.get("compliant") == Some(&Value::Bool(true)) {
                    "ok".into()
                } else {
                    "to move".into()
                },
            ]);
        }
        out.push(table(rows));
    }
    out.push(String::new());
    out.push(format!(
        "moved: {} promoted to hot, {} demoted to cold, {} placed by policy; {} bad cop{} \
         repaired; {}",
        u(r, "promoted"),
        u(r, "demoted"),
        u(r, "placed"),
        u(r, "repairs"),
        if u(r, "repairs") == 1 { "y" } else { "ies" },
        plural(u(r, "compressed_reads"), "compressed read")
    ));
    let m = r.get("mover").cloned().unwrap_or(Value::Null);
    let state = match m.get("interval_secs").and_then(Value::as_f64) {
        Some(i) if s(&m, "state") == "running" => format!("running every {i} s"),
        _ => format!("{} ({})", s(&m, "state"), s(&m, "reason")),
    };
    let last = match m.get("last_round").filter(|l| !l.is_null()) {
        Some(l) => format!(
            "; last round: {} promoted, {} demoted, {} placed, {} without room ({:.1} s)",
            u(l, "promoted"),
            u(l, "demoted"),
            u(l, "placed"),
            u(l, "no_room"),
            l.get("secs").and_then(Value::as_f64).unwrap_or(0.0)
        ),
        None => String::new(),
    };
    out.push(format!(
        "mover: {state}, {}{last}",
        plural(u(&m, "rounds"), "round")
    ));
    if let Some(e) = m.get("last_error").filter(|e| !e.is_null()) {
        out.push(format!(
            "mover: last failure at {}: {}",
            local_time(u(e, "unix_ms") / 1000),
            s(e, "message")
        ));
    }
    out.join("\n")
}

/// `name (bit N, on|off), ...` or `none`.
pub fn labels_text(labels: &[Value]) -> String {
    if labels.is_empty() {
        return "none".into();
    }
    labels
        .iter()
        .map(|l| {
            format!(
                "{} (bit {}, {})",
                s(l, "name"),
                u(l, "bit"),
                if l.get("active") == Some(&Value::Bool(true)) {
                    "on"
                } else {
                    "off"
                }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Unix seconds as UTC, `YYYY-MM-DD HH:MM:SSZ` (e.g. `2026-12-06 21:15:56Z`): what `ctl
/// snapshots`, `ctl events` and `disk snapshots` print (`--json` keeps the numbers).
pub fn utc_time(unix: u64) -> String {
    let days = unix / 86_400;
    let rem = unix % 86_400;
    // Days since 1970-01-01 to a civil date (Howard Hinnant's days_from_civil, inverted).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Unix seconds as local time, `YYYY-MM-DD HH:MM`.
pub fn local_time(unix: u64) -> String {
    let Ok(t) = libc::time_t::try_from(unix) else {
        return format!("@{unix}");
    };
    // SAFETY: `libc::tm` is plain data (integers and a pointer); all zeroes is a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r reads `t` and writes only `tm`, both live locals; it is thread-safe.
    let r = unsafe { libc::localtime_r(&t, &mut tm) };
    if r.is_null() {
        return format!("@{unix}");
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min
    )
}

/// When epoch `epoch` of the reply's epochs started, as local time (`never` for 0).
pub fn epoch_text(r: &Value, epoch: u64) -> String {
    let epochs = dovetail_annotations::Epochs {
        base: u(r, "epoch_base"),
        secs: u32::try_from(u(r, "epoch_secs")).unwrap_or(u32::MAX),
    };
    match u16::try_from(epoch).ok().and_then(|e| epochs.start_of(e)) {
        Some(t) => local_time(t),
        None => "never".into(),
    }
}

/// The names of the labels whose bits are in `taint`, comma-separated (`-` for none).
pub fn taint_names(r: &Value, taint: u64) -> String {
    let empty = vec![];
    let names: Vec<String> = r
        .get("labels")
        .and_then(Value::as_array)
        .unwrap_or(&empty)
        .iter()
        .filter(|l| u(l, "bit") < 16 && taint & (1 << u(l, "bit")) != 0)
        .map(|l| s(l, "name"))
        .collect();
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}

pub fn plural(n: u64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// An `annotations` result as text: the totals and labels, then what was asked for (top
/// regions, histogram, label ranges, one block). Used by `ctl annotations` and `disk
/// annotations`.
pub fn annotations_text(r: &Value) -> String {
    let empty = vec![];
    let mut out = Vec::new();
    let version = match r.get("version").and_then(Value::as_u64) {
        Some(k) => format!("version {k}"),
        None => "version".into(),
    };
    let snapshot = match r.get("snapshot").and_then(Value::as_str) {
        Some(sn) => format!("snapshot {sn} of "),
        None => String::new(),
    };
    out.push(format!(
        "disk {}: {snapshot}{} {version} ({}), {} of 4 KiB; access times to {} s",
        s(r, "disk"),
        s(r, "layout"),
        s(r, "role"),
        plural(u(r, "blocks"), "block"),
        u(r, "epoch_secs"),
    ));
    let t = r.get("totals").cloned().unwrap_or(Value::Null);
    out.push(format!(
        "totals: {}, {}; {} of {} blocks touched ({} sequential, {} random); last read {}, \
         last write {}",
        plural(u(&t, "reads"), "read"),
        plural(u(&t, "writes"), "write"),
        u(&t, "touched_blocks"),
        u(&t, "blocks"),
        u(&t, "sequential_blocks"),
        u(&t, "random_blocks"),
        epoch_text(r, u(&t, "last_read")),
        epoch_text(r, u(&t, "last_write")),
    ));
    out.push(format!(
        "labels: {}",
        labels_text(r.get("labels").and_then(Value::as_array).unwrap_or(&empty))
    ));
    if let Some(top) = r.get("top").and_then(Value::as_array) {
        out.push(String::new());
        let rb = u(r, "region_blocks").max(1);
        out.push(format!(
            "top {} of {}:",
            plural(top.len() as u64, "region"),
            plural(rb, "block")
        ));
        if !top.is_empty() {
            let mut rows = vec![[
                "FIRST",
                "BLOCKS",
                "READS",
                "WRITES",
                "HEAT",
                "TOUCHED",
                "CLASSES",
                "LABELS",
                "LAST READ",
                "LAST WRITE",
            ]
            .map(String::from)
            .to_vec()];
            for g in top {
                rows.push(vec![
                    u(g, "first_block").to_string(),
                    u(g, "blocks").to_string(),
                    u(g, "reads").to_string(),
                    u(g, "writes").to_string(),
                    u(g, "heat").to_string(),
                    u(g, "touched_blocks").to_string(),
                    format!(
                        "{} seq, {} rnd",
                        u(g, "sequential_blocks"),
                        u(g, "random_blocks")
                    ),
                    taint_names(r, u(g, "taint")),
                    epoch_text(r, u(g, "last_read")),
                    epoch_text(r, u(g, "last_write")),
                ]);
            }
            out.push(table(rows));
        }
    }
    if let Some(h) = r.get("histogram").and_then(Value::as_array) {
        out.push(String::new());
        out.push(format!(
            "histogram: {} of {} (heat = reads + writes):",
            plural(h.len() as u64, "bucket"),
            plural(h.first().map_or(0, |b| u(b, "blocks")), "block")
        ));
        let max = h.iter().map(|b| u(b, "heat")).max().unwrap_or(0);
        const BAR: u64 = 40;
        let mut rows = vec![["FIRST", "BLOCKS", "READS", "WRITES", "HEAT", ""]
            .map(String::from)
            .to_vec()];
        for b in h {
            let heat = u(b, "heat");
            let width = if heat == 0 || max == 0 {
                0
            } else {
                ((u128::from(heat) * u128::from(BAR)).div_ceil(u128::from(max))) as usize
            };
            rows.push(vec![
                u(b, "first_block").to_string(),
                u(b, "blocks").to_string(),
                u(b, "reads").to_string(),
                u(b, "writes").to_string(),
                heat.to_string(),
                "#".repeat(width),
            ]);
        }
        out.push(table(rows));
    }
    if let Some(ranges) = r.get("ranges").and_then(Value::as_array) {
        out.push(String::new());
        let total = u(r, "ranges_total");
        out.push(format!(
            "label {}: {} in {}{}",
            s(r, "label"),
            plural(u(r, "label_blocks"), "block"),
            plural(total, "range"),
            if total > ranges.len() as u64 {
                format!(" (the first {} listed)", ranges.len())
            } else {
                String::new()
            }
        ));
        for g in ranges {
            let (first, end) = (u(g, "first_block"), u(g, "end_block"));
            let span = if end == first + 1 {
                first.to_string()
            } else {
                format!("{first}-{}", end.saturating_sub(1))
            };
            out.push(format!(
                "  {span} ({})",
                plural(end.saturating_sub(first), "block")
            ));
        }
    }
    if let Some(b) = r.get("block").filter(|b| !b.is_null()) {
        let a = b.get("annotation").cloned().unwrap_or(Value::Null);
        let pattern = u(&a, "pattern");
        out.push(String::new());
        out.push(format!(
            "block {}: {}, {}; class {} ({} sequential, {} random hits); labels {}; last read \
             {}, last write {}",
            u(b, "block"),
            plural(u(&a, "reads"), "read"),
            plural(u(&a, "writes"), "write"),
            s(b, "class"),
            pattern >> 4,
            pattern & 0x0f,
            taint_names(r, u(&a, "taint")),
            epoch_text(r, u(&a, "last_read")),
            epoch_text(r, u(&a, "last_write")),
        ));
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_time_prints_a_civil_date() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(utc_time(1_796_591_756), "2026-12-06 21:15:56Z");
        assert_eq!(utc_time(4_102_444_799), "2099-12-31 23:59:59Z");
        assert_eq!(utc_time(253_402_300_799), "9999-12-31 23:59:59Z");
    }
}
