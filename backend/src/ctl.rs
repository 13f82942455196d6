//! `dovetail ctl`: the client of a running daemon's control socket. It sends one request
//! (docs/control.md), prints the reply as a table (or as JSON with `--json`), and exits 0 when
//! the daemon carried the command out, 1 when it answered with an error.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use dovetail_store::human_size;
use serde_json::{json, Value};

use crate::cli::CliError;

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The daemon's control socket (`dovetail serve --control PATH`).
    #[arg(long, value_name = "PATH")]
    pub control: PathBuf,
    /// Print the daemon's reply as JSON (one object per line) instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Give up waiting for a reply after this many seconds (0: wait as long as it takes).
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Show every served disk (or DISK): versions, policy, quarantine, requests, pauses.
    Status {
        /// Only this disk.
        disk: Option<String>,
    },
    /// Attach a new, empty candidate version to a running disk, validated under POLICY.
    ///
    /// The daemon prepares the candidate, then pauses the disk's I/O only for the swap (the
    /// reply reports the pause). The guest's later writes go to both versions.
    Tee {
        disk: String,
        /// Layout of the candidate version.
        #[arg(long, value_name = "LAYOUT", default_value = "parallax-v1")]
        candidate: String,
        /// Validation policy (see README: policies and what each may expose).
        #[arg(long, value_name = "POLICY")]
        policy: String,
        /// Inject faults into the candidate (testing; repeatable); see `dovetail disk tee`.
        #[arg(long = "fault", value_name = "RULE")]
        faults: Vec<String>,
    },
    /// Change the validation policy of DISK's candidate.
    Policy { disk: String, policy: String },
    /// Drop DISK's candidate and free its extents; the trusted version serves alone.
    Untee { disk: String },
    /// Abandon DISK's upgrade: drop its candidate and free its extents (as `untee`).
    Abort { disk: String },
    /// Migrate every block of DISK to its candidate (or pause, resume, cancel that).
    ///
    /// `copy-out` (the default) copies every block the candidate does not hold yet from the
    /// trusted version in the background, rate limited, skipping holes; it survives a crash or
    /// a restart of the daemon and resumes where it was; blocks the guest reads go first.
    /// `copy-on-read` brings over only the blocks the guest reads (and writes), copied by the
    /// same job in the background just after the read. `upgrade-on-write` lets only the guest's
    /// writes bring blocks over. With --wait, shows a progress bar until the job finishes (exit
    /// 0 when every block is in the candidate).
    Migrate {
        disk: String,
        #[arg(long, value_name = "MODE", default_value = "copy-out",
              value_parser = ["copy-out", "copy-on-read", "upgrade-on-write"])]
        mode: String,
        /// Data bytes per second at most, e.g. 64M (default 64M; 0: no limit).
        #[arg(long, value_name = "RATE")]
        rate: Option<String>,
        /// Pause the running copy-out.
        #[arg(long, conflicts_with_all = ["resume", "cancel", "status"])]
        pause: bool,
        /// Resume a paused copy-out.
        #[arg(long, conflicts_with_all = ["cancel", "status"])]
        resume: bool,
        /// Stop the copy-out (what it copied stays in the candidate).
        #[arg(long, conflicts_with = "status")]
        cancel: bool,
        /// Only show the migration's progress.
        #[arg(long)]
        status: bool,
        /// Wait for the copy-out to finish, with a progress bar.
        #[arg(long)]
        wait: bool,
    },
    /// Make DISK's candidate its trusted version once it holds every block; the old version
    /// is retired (its grants revoked, its extents freed).
    Promote { disk: String },
    /// Attach a candidate of LAYOUT under POLICY to chosen disks of this daemon: --disks names
    /// them, --sample picks a percentage of the disks without a candidate (reproducibly, by
    /// --seed). Widen the group later with another deploy.
    Deploy {
        #[arg(long, value_name = "LAYOUT", default_value = "parallax-v1")]
        layout: String,
        #[arg(long, value_name = "POLICY")]
        policy: String,
        /// Comma-separated disk names.
        #[arg(
            long,
            value_name = "A,B,...",
            value_delimiter = ',',
            conflicts_with = "sample",
            required_unless_present = "sample"
        )]
        disks: Vec<String>,
        /// Percentage of the disks without a candidate, e.g. 25%.
        #[arg(long, value_name = "PERCENT")]
        sample: Option<String>,
        #[arg(long, value_name = "SEED", default_value_t = 0)]
        seed: u64,
    },
    /// Take a snapshot of DISK's trusted version while the guest runs.
    ///
    /// Every request completed before the snapshot is in it. For a filesystem that checks
    /// clean, freeze it in the guest first (`fsfreeze -f`), as for any crash-consistent copy.
    Snapshot {
        disk: String,
        /// Name of the snapshot (default: snap-UNIXTIME).
        #[arg(long)]
        name: Option<String>,
    },
    /// List DISK's snapshots.
    Snapshots { disk: String },
    /// Delete snapshot NAME of DISK.
    DeleteSnapshot { disk: String, name: String },
    /// Write snapshot SNAPSHOT of DISK to a new sparse raw image FILE (written by the daemon).
    Export {
        disk: String,
        #[arg(long, value_name = "SNAPSHOT")]
        snapshot: String,
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
    /// Print the daemon's recent events; with --follow, keep printing new ones.
    Events {
        /// Keep the connection open and print events as they happen (until interrupted).
        #[arg(long)]
        follow: bool,
        /// Only events with a sequence number above N.
        #[arg(long, value_name = "N", default_value_t = 0)]
        since: u64,
    },
    /// Print the daemon's metrics in the Prometheus text format.
    Metrics,
}

/// A connection to the control socket.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    pub fn connect(path: &std::path::Path, timeout: Option<Duration>) -> Result<Client, CliError> {
        let stream = UnixStream::connect(path).map_err(|source| CliError::File {
            op: format!(
                "connect to control socket {} (is `dovetail serve --control {}` running?)",
                path.display(),
                path.display()
            ),
            source,
        })?;
        stream
            .set_read_timeout(timeout)
            .and_then(|()| stream.set_write_timeout(timeout))
            .map_err(|source| CliError::File {
                op: "set the control socket's timeouts".into(),
                source,
            })?;
        let writer = stream.try_clone().map_err(|source| CliError::File {
            op: "clone the control socket".into(),
            source,
        })?;
        Ok(Client {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
        })
    }

    /// Sends `request` (an object with "cmd") and returns the reply's result, or the daemon's
    /// error as `CliError::Invalid("code: message")`.
    pub fn call(&mut self, mut request: Value) -> Result<Value, CliError> {
        let id = self.next_id;
        self.next_id += 1;
        if let Value::Object(m) = &mut request {
            m.insert("v".into(), json!(crate::control::PROTOCOL));
            m.insert("id".into(), json!(id));
        }
        let line = request.to_string() + "\n";
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| CliError::File {
                op: "send the request".into(),
                source,
            })?;
        let reply = self.read_line()?.ok_or_else(|| {
            CliError::Invalid("the daemon closed the control connection without a reply".into())
        })?;
        if reply.get("ok") == Some(&Value::Bool(true)) {
            Ok(reply.get("result").cloned().unwrap_or(Value::Null))
        } else {
            let e = reply.get("error");
            let field = |k: &str| {
                e.and_then(|e| e.get(k))
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string()
            };
            Err(CliError::Invalid(format!(
                "{}: {}",
                field("code"),
                field("message")
            )))
        }
    }

    /// The next line from the daemon, parsed; `None` at end of stream.
    pub fn read_line(&mut self) -> Result<Option<Value>, CliError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| CliError::File {
                op: "read the daemon's reply".into(),
                source,
            })?;
        if n == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line).map(Some).map_err(|e| {
            CliError::Invalid(format!("the daemon sent something that is not JSON: {e}"))
        })
    }
}

fn request(cmd: &CtlCommand) -> Result<Value, CliError> {
    Ok(match cmd {
        CtlCommand::Status { disk } => match disk {
            Some(d) => json!({"cmd": "status", "disk": d}),
            None => json!({"cmd": "status"}),
        },
        CtlCommand::Tee {
            disk,
            candidate,
            policy,
            faults,
        } => json!({"cmd": "tee", "disk": disk, "candidate": candidate, "policy": policy,
                    "faults": faults}),
        CtlCommand::Policy { disk, policy } => {
            json!({"cmd": "policy", "disk": disk, "policy": policy})
        }
        CtlCommand::Untee { disk } => json!({"cmd": "untee", "disk": disk}),
        CtlCommand::Abort { disk } => json!({"cmd": "abort", "disk": disk}),
        CtlCommand::Migrate {
            disk,
            mode,
            rate,
            pause,
            resume,
            cancel,
            status,
            wait: _,
        } => {
            let action = if *pause {
                "pause"
            } else if *resume {
                "resume"
            } else if *cancel {
                "cancel"
            } else if *status {
                "status"
            } else {
                "start"
            };
            let mut req = json!({"cmd": "migrate", "disk": disk, "mode": mode, "action": action});
            if let Some(r) = rate {
                let bytes = if r == "0" {
                    0
                } else {
                    r.parse::<crate::cli::Size>()
                        .map_err(|e| CliError::Invalid(format!("--rate: {e}")))?
                        .0
                };
                req["rate"] = json!(bytes);
            }
            req
        }
        CtlCommand::Promote { disk } => json!({"cmd": "promote", "disk": disk}),
        CtlCommand::Deploy {
            layout,
            policy,
            disks,
            sample,
            seed,
        } => match sample {
            Some(p) => {
                let pct: f64 = p.trim_end_matches('%').parse().map_err(|_| {
                    CliError::Invalid(format!("--sample {p:?} is not a percentage"))
                })?;
                json!({"cmd": "deploy", "layout": layout, "policy": policy, "sample": pct,
                       "seed": seed})
            }
            None => json!({"cmd": "deploy", "layout": layout, "policy": policy, "disks": disks}),
        },
        CtlCommand::Snapshot { disk, name } => match name {
            Some(n) => json!({"cmd": "snapshot", "disk": disk, "name": n}),
            None => json!({"cmd": "snapshot", "disk": disk}),
        },
        CtlCommand::Snapshots { disk } => json!({"cmd": "snapshots", "disk": disk}),
        CtlCommand::DeleteSnapshot { disk, name } => {
            json!({"cmd": "delete-snapshot", "disk": disk, "name": name})
        }
        CtlCommand::Export { disk, snapshot, to } => {
            let to = std::path::absolute(to).map_err(|source| CliError::File {
                op: format!("resolve {}", to.display()),
                source,
            })?;
            json!({"cmd": "export", "disk": disk, "snapshot": snapshot, "to": to})
        }
        CtlCommand::Events { follow, since } => {
            json!({"cmd": "events", "follow": follow, "since": since})
        }
        CtlCommand::Metrics => json!({"cmd": "metrics"}),
    })
}

/// Runs `dovetail ctl`.
pub fn run_ctl(a: CtlArgs) -> Result<(), CliError> {
    let timeout = (a.timeout > 0).then(|| Duration::from_secs(a.timeout));
    let mut client = Client::connect(&a.control, timeout)?;
    let req = request(&a.command)?;
    let result = client.call(req)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut print = |s: String| {
        // A closed stdout (e.g. `| head`) ends the command quietly.
        let _ = writeln!(out, "{s}");
    };
    if a.json {
        print(result.to_string());
    } else {
        print(human(&a.command, &result));
    }
    if let CtlCommand::Migrate {
        disk, wait: true, ..
    } = &a.command
    {
        return wait_for_migration(&mut client, disk, a.json);
    }
    if let CtlCommand::Events { follow: true, .. } = a.command {
        // Events keep coming: no timeout while following.
        let _ = client.reader.get_ref().set_read_timeout(None);
        while let Some(line) = client.read_line()? {
            let Some(ev) = line.get("event") else {
                continue;
            };
            if a.json {
                print(ev.to_string());
            } else {
                print(event_line(ev));
            }
        }
    }
    Ok(())
}

/// Polls the migration of `disk` with a progress bar until the copy-out finishes.
fn wait_for_migration(client: &mut Client, disk: &str, json_out: bool) -> Result<(), CliError> {
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {pos}/{len} blocks {per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("{disk}: migration"));
    if json_out {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    loop {
        let r = client.call(json!({"cmd": "migrate", "disk": disk, "action": "status"}))?;
        let m = r.get("migration").cloned().unwrap_or(Value::Null);
        bar.set_length(u(&m, "blocks_total"));
        bar.set_position(u(&m, "blocks_present"));
        let state = m
            .get("copy_out")
            .map(|c| s(c, "state"))
            .unwrap_or_else(|| "-".into());
        match state.as_str() {
            "running" | "paused" => {}
            "done" => {
                bar.finish_and_clear();
                if json_out {
                    println!("{m}");
                } else {
                    println!(
                        "disk {disk}: copy-out done: {} of {} blocks in the candidate",
                        u(&m, "blocks_present"),
                        u(&m, "blocks_total")
                    );
                }
                return Ok(());
            }
            other => {
                bar.abandon();
                return Err(CliError::Invalid(format!(
                    "disk {disk}: the copy-out is {other}: {}",
                    m.get("copy_out").map(|c| s(c, "error")).unwrap_or_default()
                )));
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn migration_text(disk: &str, m: &Value) -> String {
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
    t
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn pause_text(v: &Value) -> String {
    match v.get("pause") {
        Some(p) if !p.is_null() => format!(
            "I/O paused {:.3} ms (in-flight drain {:.3} ms)",
            u(p, "total_us") as f64 / 1e3,
            u(p, "drain_us") as f64 / 1e3
        ),
        _ => String::new(),
    }
}

fn event_line(ev: &Value) -> String {
    let p = pause_text(ev);
    format!(
        "{:>5} {} {:<10} {:<20} {}{}",
        u(ev, "seq"),
        u(ev, "unix_ms"),
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

fn table(rows: Vec<Vec<String>>) -> String {
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

fn human(cmd: &CtlCommand, r: &Value) -> String {
    match cmd {
        CtlCommand::Status { .. } => {
            let mut rows = vec![[
                "DISK",
                "SIZE",
                "TRUSTED",
                "CANDIDATE",
                "POLICY",
                "STATE",
                "PRESENT",
                "MIGRATION",
                "GUEST",
                "REQUESTS",
                "PAUSES",
                "LAST",
                "MAX",
            ]
            .map(String::from)
            .to_vec()];
            let empty = vec![];
            for d in r.get("disks").and_then(Value::as_array).unwrap_or(&empty) {
                let trusted = match d.get("trusted_version").and_then(Value::as_u64) {
                    Some(k) => format!("{k} ({})", s(d, "trusted_layout")),
                    None => s(d, "trusted_layout"),
                };
                let c = d.get("candidate").filter(|c| !c.is_null());
                let requests: u64 = d
                    .get("requests")
                    .and_then(Value::as_object)
                    .map_or(0, |ops| ops.values().map(|o| u(o, "requests")).sum());
                let pauses = d.get("pauses").cloned().unwrap_or(Value::Null);
                rows.push(vec![
                    s(d, "name"),
                    human_size(u(d, "size")),
                    trusted,
                    c.map_or("-".into(), |c| {
                        format!("{} ({})", u(c, "version"), s(c, "layout"))
                    }),
                    c.map_or("-".into(), |c| s(c, "policy")),
                    c.map_or("-".into(), |c| s(c, "state")),
                    c.map_or("-".into(), |c| {
                        format!("{}/{}", u(c, "blocks_present"), u(c, "blocks_total"))
                    }),
                    d.get("migration")
                        .filter(|m| !m.is_null() && !m["mode"].is_null())
                        .map_or("-".into(), |m| {
                            match m.get("copy_out").filter(|c| !c.is_null()) {
                                Some(c) => format!("{} {}", s(m, "mode"), s(c, "state")),
                                None => s(m, "mode"),
                            }
                        }),
                    if d.get("guest_connected") == Some(&Value::Bool(true)) {
                        "connected".into()
                    } else {
                        "-".into()
                    },
                    requests.to_string(),
                    u(&pauses, "pauses").to_string(),
                    format!("{:.3}ms", u(&pauses, "last_us") as f64 / 1e3),
                    format!("{:.3}ms", u(&pauses, "max_us") as f64 / 1e3),
                ]);
            }
            let mut text = table(rows);
            for d in r.get("disks").and_then(Value::as_array).unwrap_or(&empty) {
                if let Some(c) = d.get("candidate").filter(|c| !c.is_null()) {
                    if s(c, "state") == "quarantined" {
                        text.push_str(&format!(
                            "\ndisk {}: candidate {} quarantined: {}",
                            s(d, "name"),
                            u(c, "version"),
                            s(c, "reason")
                        ));
                    }
                }
            }
            text
        }
        CtlCommand::Tee { disk, .. }
        | CtlCommand::Policy { disk, .. }
        | CtlCommand::Untee { disk }
        | CtlCommand::Abort { disk } => {
            format!("disk {disk}: {}; {}", s(r, "message"), pause_text(r))
        }
        CtlCommand::Migrate { disk, .. } => {
            migration_text(disk, r.get("migration").unwrap_or(&Value::Null))
        }
        CtlCommand::Promote { disk } => {
            format!("disk {disk}: {}; {}", s(r, "message"), pause_text(r))
        }
        CtlCommand::Deploy { .. } => {
            let empty = vec![];
            let mut lines = Vec::new();
            for d in r
                .get("deployed")
                .and_then(Value::as_array)
                .unwrap_or(&empty)
            {
                lines.push(format!(
                    "disk {}: {}; {}",
                    s(d, "disk"),
                    s(d, "message"),
                    pause_text(d)
                ));
            }
            for d in r.get("skipped").and_then(Value::as_array).unwrap_or(&empty) {
                lines.push(format!(
                    "disk {}: skipped: {}",
                    s(d, "disk"),
                    s(d, "reason")
                ));
            }
            if lines.is_empty() {
                lines.push("no disk chosen".into());
            }
            lines.join("\n")
        }
        CtlCommand::Snapshot { disk, .. } => {
            let snap = r.get("snapshot").cloned().unwrap_or(Value::Null);
            format!(
                "disk {disk}: snapshot {} of generation {}; {}",
                s(&snap, "name"),
                u(&snap, "generation"),
                pause_text(r)
            )
        }
        CtlCommand::Snapshots { .. } => {
            let mut rows = vec![vec![
                "SNAPSHOT".to_string(),
                "GENERATION".to_string(),
                "CREATED".to_string(),
            ]];
            let empty = vec![];
            for sn in r
                .get("snapshots")
                .and_then(Value::as_array)
                .unwrap_or(&empty)
            {
                rows.push(vec![
                    s(sn, "name"),
                    u(sn, "generation").to_string(),
                    u(sn, "created").to_string(),
                ]);
            }
            table(rows)
        }
        CtlCommand::DeleteSnapshot { disk, .. } => format!("disk {disk}: {}", s(r, "message")),
        CtlCommand::Export { disk, snapshot, .. } => format!(
            "disk {disk}: exported snapshot {snapshot} to {} ({} of data)",
            s(r, "to"),
            human_size(u(r, "data_bytes"))
        ),
        CtlCommand::Events { .. } => {
            let empty = vec![];
            r.get("events")
                .and_then(Value::as_array)
                .unwrap_or(&empty)
                .iter()
                .map(event_line)
                .collect::<Vec<_>>()
                .join("\n")
        }
        CtlCommand::Metrics => s(r, "text").trim_end().to_string(),
    }
}
