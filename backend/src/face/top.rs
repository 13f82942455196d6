//! `dovetail ctl top`: per-disk IOPS, throughput and p99 latency of a running daemon, refreshed
//! every interval in a terminal (like top(1)), or printed a given number of times for scripts.
//!
//! Each refresh reads the daemon's metrics over the control socket (the `metrics` request, the
//! Prometheus text `/metrics` serves) and shows the difference from the previous reading: the
//! request and byte counters give the rates, and the latency histograms' bucket counts give
//! the 99th percentile of the requests completed in the interval alone (an upper bound, exact to
//! the bucket, as the daemon's own percentiles are).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::face::render::{table, utc_time};
use crate::face::CliError;

/// What `ctl top` was asked for.
#[derive(Debug, Clone)]
pub struct TopOptions {
    /// Only these disks (empty: every disk).
    pub disks: Vec<String>,
    /// Time between two readings.
    pub interval: Duration,
    /// Screens to print before exiting (`None`: until interrupted).
    pub iterations: Option<u64>,
    /// One JSON object per screen instead of a table.
    pub json: bool,
    /// The control socket, for the title.
    pub control: String,
}

/// The operations `top` shows, as the metrics' `op` label names them.
const OPS: [&str; 5] = ["read", "write", "flush", "discard", "write-zeroes"];

/// One disk's counters at one reading.
#[derive(Debug, Clone, Default, PartialEq)]
struct DiskSample {
    /// `op` → requests.
    requests: BTreeMap<String, u64>,
    /// `op` → data bytes.
    bytes: BTreeMap<String, u64>,
    /// `op` → errors.
    errors: BTreeMap<String, u64>,
    /// `op` → cumulative latency buckets `(le, count)`, in increasing `le`.
    buckets: BTreeMap<String, Vec<(f64, u64)>>,
    guest_connected: Option<bool>,
    failed: bool,
    pauses: u64,
}

/// Every disk's counters at one reading, by disk name.
type Sample = BTreeMap<String, DiskSample>;

/// One disk's rates over an interval.
#[derive(Debug, Clone, PartialEq)]
struct DiskRates {
    disk: String,
    guest_connected: Option<bool>,
    failed: bool,
    /// `None` for a disk first seen in this reading (no previous one to subtract).
    rates: Option<Rates>,
}

#[derive(Debug, Clone, PartialEq)]
struct Rates {
    iops: f64,
    read_iops: f64,
    write_iops: f64,
    flush_iops: f64,
    read_bytes_per_sec: f64,
    write_bytes_per_sec: f64,
    errors: u64,
    pauses: u64,
    /// Upper bucket bounds of the interval's 99th percentile (`f64::INFINITY`: over a second;
    /// `None`: no such request completed).
    p99_read: Option<f64>,
    p99_write: Option<f64>,
    p99_flush: Option<f64>,
}

/// A sample line's labels, `(name, value)` in order.
type Labels = Vec<(String, String)>;

/// Splits `name{k="v",...} value` into its parts; `None` for comments and malformed lines.
fn parse_line(line: &str) -> Option<(&str, Labels, &str)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (head, value) = line.rsplit_once(' ')?;
    let Some((name, rest)) = head.split_once('{') else {
        return Some((head, Vec::new(), value));
    };
    let body = rest.strip_suffix('}')?;
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        let mut key = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut val = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => val.push('\n'),
                    c => val.push(c),
                },
                '"' => break,
                c => val.push(c),
            }
        }
        labels.push((key, val));
        match chars.next() {
            Some(',') => {}
            None => break,
            Some(_) => return None,
        }
    }
    Some((name, labels, value))
}

fn label<'a>(labels: &'a [(String, String)], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Reads every disk's counters out of a Prometheus exposition.
fn parse_sample(text: &str) -> Sample {
    let mut out = Sample::new();
    for line in text.lines() {
        let Some((name, labels, value)) = parse_line(line) else {
            continue;
        };
        let Some(disk) = label(&labels, "disk") else {
            continue;
        };
        let op = label(&labels, "op").unwrap_or("").to_string();
        let as_u64 = || value.parse::<f64>().ok().map_or(0, |v| v.max(0.0) as u64);
        match name {
            "dovetail_requests_total" => {
                out.entry(disk.into())
                    .or_default()
                    .requests
                    .insert(op, as_u64());
            }
            "dovetail_request_bytes_total" => {
                out.entry(disk.into())
                    .or_default()
                    .bytes
                    .insert(op, as_u64());
            }
            "dovetail_request_errors_total" => {
                out.entry(disk.into())
                    .or_default()
                    .errors
                    .insert(op, as_u64());
            }
            "dovetail_request_duration_seconds_bucket" => {
                let le = match label(&labels, "le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(le) => match le.parse::<f64>() {
                        Ok(v) => v,
                        Err(_) => continue,
                    },
                    None => continue,
                };
                out.entry(disk.into())
                    .or_default()
                    .buckets
                    .entry(op)
                    .or_default()
                    .push((le, as_u64()));
            }
            "dovetail_guest_connected" => {
                out.entry(disk.into()).or_default().guest_connected = Some(value != "0");
            }
            "dovetail_disk_failed" => {
                out.entry(disk.into()).or_default().failed = value != "0";
            }
            "dovetail_pauses_total" => {
                out.entry(disk.into()).or_default().pauses = as_u64();
            }
            _ => {}
        }
    }
    for d in out.values_mut() {
        for b in d.buckets.values_mut() {
            b.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
    }
    out
}

/// `now - before`, or `now` when the counter restarted (the disk was served anew).
fn delta(now: u64, before: u64) -> u64 {
    if now >= before {
        now - before
    } else {
        now
    }
}

/// The upper bound of the bucket holding the 99th percentile of the requests counted between
/// two readings of a cumulative histogram.
fn p99(now: Option<&Vec<(f64, u64)>>, before: Option<&Vec<(f64, u64)>>) -> Option<f64> {
    let now = now?;
    let empty = Vec::new();
    let before = before.unwrap_or(&empty);
    let restarted = now.last().map_or(0, |b| b.1) < before.last().map_or(0, |b| b.1);
    let counts: Vec<(f64, u64)> = now
        .iter()
        .map(|&(le, c)| {
            let old = if restarted {
                0
            } else {
                before.iter().find(|b| b.0 == le).map_or(0, |b| b.1).min(c)
            };
            (le, c - old)
        })
        .collect();
    let total = counts.last().map_or(0, |b| b.1);
    if total == 0 {
        return None;
    }
    let rank = ((0.99 * total as f64).ceil() as u64).clamp(1, total);
    counts.iter().find(|b| b.1 >= rank).map(|b| b.0)
}

fn rates(now: &Sample, before: &Sample, secs: f64, only: &[String]) -> Vec<DiskRates> {
    let secs = secs.max(1e-6);
    now.iter()
        .filter(|(name, _)| only.is_empty() || only.iter().any(|o| o == *name))
        .map(|(name, d)| {
            let rates = before.get(name).map(|b| {
                let req = |op: &str| {
                    delta(
                        d.requests.get(op).copied().unwrap_or(0),
                        b.requests.get(op).copied().unwrap_or(0),
                    )
                };
                let bytes = |op: &str| {
                    delta(
                        d.bytes.get(op).copied().unwrap_or(0),
                        b.bytes.get(op).copied().unwrap_or(0),
                    )
                };
                let all: u64 = OPS.iter().map(|op| req(op)).sum();
                let errors: u64 = d
                    .errors
                    .iter()
                    .map(|(op, &n)| delta(n, b.errors.get(op).copied().unwrap_or(0)))
                    .sum();
                Rates {
                    iops: all as f64 / secs,
                    read_iops: req("read") as f64 / secs,
                    write_iops: req("write") as f64 / secs,
                    flush_iops: req("flush") as f64 / secs,
                    read_bytes_per_sec: bytes("read") as f64 / secs,
                    write_bytes_per_sec: bytes("write") as f64 / secs,
                    errors,
                    pauses: delta(d.pauses, b.pauses),
                    p99_read: p99(d.buckets.get("read"), b.buckets.get("read")),
                    p99_write: p99(d.buckets.get("write"), b.buckets.get("write")),
                    p99_flush: p99(d.buckets.get("flush"), b.buckets.get("flush")),
                }
            });
            DiskRates {
                disk: name.clone(),
                guest_connected: d.guest_connected,
                failed: d.failed,
                rates,
            }
        })
        .collect()
}

/// A latency bound as `250us`, `2.5ms`, `1s`, `>1s`; `-` when nothing completed.
fn latency_text(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if !v.is_finite() => ">1s".into(),
        Some(v) if v < 1e-3 => format!("{}us", trim(v * 1e6)),
        Some(v) if v < 1.0 => format!("{}ms", trim(v * 1e3)),
        Some(v) => format!("{}s", trim(v)),
    }
}

/// `2.5`, `10`, `0.25`: at most 3 significant decimals, no trailing zeros.
fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn count_text(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn screen(rows: &[DiskRates], o: &TopOptions, secs: f64) -> String {
    let mut t = vec![[
        "DISK",
        "GUEST",
        "IOPS",
        "READ/s",
        "WRITE/s",
        "FLUSH/s",
        "READ MB/s",
        "WRITE MB/s",
        "P99 READ",
        "P99 WRITE",
        "P99 FLUSH",
        "ERRORS",
        "PAUSES",
    ]
    .map(String::from)
    .to_vec()];
    for r in rows {
        let guest = if r.failed {
            "FAILED".to_string()
        } else {
            match r.guest_connected {
                Some(true) => "yes".into(),
                Some(false) => "no".into(),
                None => "-".into(),
            }
        };
        let mut row = vec![r.disk.clone(), guest];
        match &r.rates {
            Some(x) => row.extend([
                count_text(x.iops),
                count_text(x.read_iops),
                count_text(x.write_iops),
                count_text(x.flush_iops),
                format!("{:.1}", x.read_bytes_per_sec / 1e6),
                format!("{:.1}", x.write_bytes_per_sec / 1e6),
                latency_text(x.p99_read),
                latency_text(x.p99_write),
                latency_text(x.p99_flush),
                x.errors.to_string(),
                x.pauses.to_string(),
            ]),
            None => row.extend(std::iter::repeat_n("-".to_string(), 11)),
        }
        t.push(row);
    }
    let title = format!(
        "dovetail top: {}: {} disk(s), {}, over the last {:.1}s",
        o.control,
        rows.len(),
        utc_time(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        ),
        secs
    );
    if rows.is_empty() {
        return format!("{title}\nno disk served");
    }
    format!("{title}\n{}", table(t))
}

fn json_frame(rows: &[DiskRates], secs: f64) -> Value {
    let finite = |v: Option<f64>| v.filter(|v| v.is_finite());
    json!({
        "interval_seconds": secs,
        "disks": rows.iter().map(|r| {
            let mut d = json!({
                "disk": r.disk,
                "guest_connected": r.guest_connected,
                "failed": r.failed,
            });
            if let Some(x) = &r.rates {
                d["iops"] = json!(x.iops);
                d["read_iops"] = json!(x.read_iops);
                d["write_iops"] = json!(x.write_iops);
                d["flush_iops"] = json!(x.flush_iops);
                d["read_bytes_per_sec"] = json!(x.read_bytes_per_sec);
                d["write_bytes_per_sec"] = json!(x.write_bytes_per_sec);
                d["p99_read_seconds"] = json!(finite(x.p99_read));
                d["p99_write_seconds"] = json!(finite(x.p99_write));
                d["p99_flush_seconds"] = json!(finite(x.p99_flush));
                d["errors"] = json!(x.errors);
                d["pauses"] = json!(x.pauses);
            }
            d
        }).collect::<Vec<_>>(),
    })
}

fn read(
    metrics: &mut impl FnMut() -> Result<String, CliError>,
) -> Result<(Sample, Instant), CliError> {
    let text = metrics()?;
    Ok((parse_sample(&text), Instant::now()))
}

/// Runs `ctl top` until `o.iterations` screens are printed (or forever); `metrics` returns the
/// daemon's metrics in the Prometheus text format (the control socket's `metrics` request).
pub fn run_top(
    mut metrics: impl FnMut() -> Result<String, CliError>,
    o: &TopOptions,
) -> Result<(), CliError> {
    let stdout = std::io::stdout();
    let terminal = stdout.is_terminal() && !o.json;
    let (mut before, mut at) = read(&mut metrics)?;
    for n in &o.disks {
        if !before.contains_key(n) {
            return Err(CliError::Invalid(format!(
                "the daemon serves no disk {n:?} (`dovetail ctl status` lists them)"
            )));
        }
    }
    let mut shown = 0u64;
    loop {
        if o.iterations.is_some_and(|n| shown >= n) {
            return Ok(());
        }
        std::thread::sleep(o.interval.saturating_sub(at.elapsed()));
        let (now, now_at) = read(&mut metrics)?;
        let secs = now_at.duration_since(at).as_secs_f64();
        let rows = rates(&now, &before, secs, &o.disks);
        let text = if o.json {
            format!("{}\n", json_frame(&rows, secs))
        } else if terminal {
            // Home, clear the screen, draw: the table stays in place, as in top(1).
            format!("\x1b[H\x1b[2J{}\n", screen(&rows, o, secs))
        } else {
            let sep = if shown > 0 { "\n" } else { "" };
            format!("{sep}{}\n", screen(&rows, o, secs))
        };
        let mut out = stdout.lock();
        if out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            // A closed stdout (`| head`) ends the command quietly.
            return Ok(());
        }
        drop(out);
        shown += 1;
        before = now;
        at = now_at;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP dovetail_requests_total x\n\
# TYPE dovetail_requests_total counter\n\
dovetail_requests_total{disk=\"a\",op=\"read\"} 100\n\
dovetail_requests_total{disk=\"a\",op=\"write\"} 50\n\
dovetail_request_bytes_total{disk=\"a\",op=\"read\"} 409600\n\
dovetail_request_duration_seconds_bucket{disk=\"a\",op=\"read\",le=\"0.0001\"} 90\n\
dovetail_request_duration_seconds_bucket{disk=\"a\",op=\"read\",le=\"0.001\"} 99\n\
dovetail_request_duration_seconds_bucket{disk=\"a\",op=\"read\",le=\"+Inf\"} 100\n\
dovetail_guest_connected{disk=\"a\"} 1\n\
dovetail_disk_failed{disk=\"b \\\"q\\\"\"} 1\n\
dovetail_uptime_seconds 3.5\n";

    #[test]
    fn the_exposition_is_read_per_disk() {
        let s = parse_sample(TEXT);
        let a = &s["a"];
        assert_eq!(a.requests["read"], 100);
        assert_eq!(a.requests["write"], 50);
        assert_eq!(a.bytes["read"], 409600);
        assert_eq!(a.buckets["read"].len(), 3);
        assert_eq!(a.guest_connected, Some(true));
        assert!(s["b \"q\""].failed);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn rates_and_p99_cover_the_interval_only() {
        let before = parse_sample(TEXT);
        let mut now = before.clone();
        let a = now.get_mut("a").expect("a");
        a.requests.insert("read".into(), 300);
        a.bytes.insert("read".into(), 409600 + 200 * 4096);
        // The 200 new reads all took between 1 ms and +Inf... except 1.
        a.buckets.insert(
            "read".into(),
            vec![(0.0001, 91), (0.001, 100), (f64::INFINITY, 300)],
        );
        let r = rates(&now, &before, 2.0, &[]);
        let x = r[0].rates.as_ref().expect("rates");
        assert_eq!(x.read_iops, 100.0);
        assert_eq!(x.iops, 100.0);
        assert_eq!(x.read_bytes_per_sec, 409600.0);
        assert_eq!(x.p99_read, Some(f64::INFINITY));
        assert_eq!(x.p99_write, None);
        assert_eq!(latency_text(x.p99_read), ">1s");
        // A counter that went backwards (the disk served anew) counts from zero.
        assert_eq!(delta(5, 10), 5);
        let only = rates(&now, &before, 1.0, &["a".to_string()]);
        assert_eq!(only.len(), 1);
    }

    #[test]
    fn latencies_print_in_their_unit() {
        assert_eq!(latency_text(Some(0.00025)), "250us");
        assert_eq!(latency_text(Some(0.0025)), "2.5ms");
        assert_eq!(latency_text(Some(0.25)), "250ms");
        assert_eq!(latency_text(Some(1.0)), "1s");
        assert_eq!(latency_text(None), "-");
    }

    #[test]
    fn malformed_lines_are_skipped() {
        assert!(parse_line("x{a=\"1\" 2").is_none());
        assert!(parse_line("# HELP x y").is_none());
        assert_eq!(
            parse_line("x{a=\"1\",b=\"2\"} 3"),
            Some((
                "x",
                vec![("a".into(), "1".into()), ("b".into(), "2".into())],
                "3"
            ))
        );
    }
}
