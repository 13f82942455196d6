//! `serve --config FILE`: the daemon's options in a TOML file, `dovetail config check FILE`,
//! and SIGHUP's reload.
//!
//! The file's keys are not a second list of options: they are read off `serve`'s clap
//! arguments (each key is an option's long name), and each value goes through that option's
//! own parser, so a new option has its key at once and the two cannot drift. The file's options
//! become command-line arguments placed before the real ones; an option given on the command
//! line (or conflicting with one given there) is not taken from the file. The merged line is
//! then parsed by clap as usual, so the file can say nothing the command line could not.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use clap::{Arg, ArgAction, CommandFactory, FromArgMatches, Parser};
use log::{error, info, warn};
use toml::de::{DeTable, DeValue};

use crate::face::cli::{parse_disk_policy, Cli, Command, ServeArgs};
use crate::face::CliError;

/// The largest configuration file read: the settings of a daemon take a few KiB, so a larger
/// file (or a device, or a FIFO that never ends) is refused before it is read into memory.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads `file` as UTF-8, refusing one of more than [`MAX_CONFIG_BYTES`] without reading it
/// all.
fn read_config_text(file: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(file)?
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("more than {MAX_CONFIG_BYTES} bytes, too large for a configuration file"),
        ));
    }
    Ok(text)
}

// ------------------------------------------------------------------------------------------
// The log level, changeable while the daemon runs.

/// env_logger's logger behind a lock, so SIGHUP can swap in one with another filter.
struct Reloadable {
    inner: RwLock<env_logger::Logger>,
}

impl log::Log for Reloadable {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .log(record);
    }

    fn flush(&self) {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).flush();
    }
}

static LOGGER: OnceLock<Reloadable> = OnceLock::new();
static DEFAULT_LEVEL: OnceLock<String> = OnceLock::new();

/// A logger for `spec` (`None`: RUST_LOG, else the default level).
fn build_logger(spec: Option<&str>) -> env_logger::Logger {
    let default = DEFAULT_LEVEL.get().map_or("info", String::as_str);
    match spec {
        Some(spec) => env_logger::Builder::new().parse_filters(spec).build(),
        None => {
            env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
                .build()
        }
    }
}

/// Installs the process's logger: RUST_LOG, else `default_level`, until [`set_log_level`].
pub fn init_logging(default_level: &str) {
    let _ = DEFAULT_LEVEL.set(default_level.to_string());
    let logger = build_logger(None);
    let max = logger.filter();
    let installed = LOGGER.get_or_init(|| Reloadable {
        inner: RwLock::new(logger),
    });
    if log::set_logger(installed).is_ok() {
        log::set_max_level(max);
    }
}

/// Logs from now on as `spec` says (`None`: RUST_LOG, else the default level).
pub fn set_log_level(spec: Option<&str>) {
    let Some(installed) = LOGGER.get() else {
        return;
    };
    let logger = build_logger(spec);
    let max = logger.filter();
    *installed.inner.write().unwrap_or_else(|p| p.into_inner()) = logger;
    log::set_max_level(max);
}

// ------------------------------------------------------------------------------------------
// Reading a config file.

/// One problem in a config file, at a line and column (1-based) when it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub at: Option<(usize, usize)>,
    pub message: String,
}

impl ConfigError {
    fn shown(&self, file: &Path) -> String {
        match self.at {
            Some((l, c)) => format!("{}:{l}:{c}: {}", file.display(), self.message),
            None => format!("{}: {}", file.display(), self.message),
        }
    }
}

/// Every error of one reading of a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lines: Vec<String> = self.errors.iter().map(|e| e.shown(&self.file)).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

/// Line and column (1-based, columns in characters) of byte `offset` of `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// `serve`'s options that can be keys: every argument with a long name but `--config` and
/// help/version.
fn serve_command() -> clap::Command {
    let cli = Cli::command();
    cli.find_subcommand("serve")
        .cloned()
        .unwrap_or_else(|| clap::Command::new("serve"))
}

fn keyed_args(serve: &clap::Command) -> Vec<Arg> {
    serve
        .get_arguments()
        .filter(|a| {
            !matches!(
                a.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            ) && a.get_long().is_some()
                && a.get_id() != "config"
                && !matches!(a.get_id().as_str(), "ceph_conf" | "ceph_id")
        })
        .cloned()
        .collect()
}

/// The keys a config file may hold (the long names of `serve`'s options).
pub fn keys() -> Vec<String> {
    keyed_args(&serve_command())
        .iter()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect()
}

/// A key of the file with its values as the option's arguments.
#[derive(Debug, Clone)]
struct Setting {
    id: String,
    long: String,
    /// Where the key is, for messages.
    at: (usize, usize),
    /// `--long=VALUE` (or `--long` for a switch) arguments; empty for a switch set to false.
    args: Vec<OsString>,
}

/// Reads `text` (the file `file`) into its settings, checking each key and value; every error
/// is collected.
fn read_settings(text: &str) -> Result<Vec<Setting>, Vec<ConfigError>> {
    let table = match DeTable::parse(text) {
        Ok(t) => t.into_inner(),
        Err(e) => {
            return Err(vec![ConfigError {
                at: e.span().map(|s| line_col(text, s.start)),
                message: format!("not valid TOML: {}", e.message().trim()),
            }])
        }
    };
    let serve = serve_command();
    let args = keyed_args(&serve);
    let mut errors = Vec::new();
    let mut settings = Vec::new();
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    for (key, value) in entries {
        let name: &str = key.get_ref();
        let at = line_col(text, key.span().start);
        let vat = line_col(text, value.span().start);
        let err = |at, message: String| ConfigError {
            at: Some(at),
            message,
        };
        let Some(arg) = args.iter().find(|a| a.get_long() == Some(name)) else {
            let hint = if name == "config" {
                "a config file cannot name another".to_string()
            } else if let Some(a) = args.iter().find(|a| {
                a.get_id().as_str() == name || a.get_long() == Some(&name.replace('_', "-"))
            }) {
                format!("did you mean {:?}?", a.get_long().unwrap_or_default())
            } else {
                "keys are the long names of `dovetail serve`'s options (`dovetail serve --help`)"
                    .to_string()
            };
            errors.push(err(at, format!("unknown key {name:?}: {hint}")));
            continue;
        };
        let long = name.to_string();
        let mut out = Vec::new();
        match arg.get_action() {
            ArgAction::SetTrue => match value.get_ref() {
                DeValue::Boolean(true) => out.push(OsString::from(format!("--{long}"))),
                DeValue::Boolean(false) => {}
                _ => {
                    errors.push(err(vat, format!("{long}: a switch: true or false")));
                    continue;
                }
            },
            action => {
                let many = matches!(action, ArgAction::Append);
                let values: Vec<_> = match value.get_ref() {
                    DeValue::Array(items) if many => items.iter().collect(),
                    DeValue::Array(_) => {
                        errors.push(err(vat, format!("{long}: takes one value, not a list")));
                        continue;
                    }
                    _ => vec![value],
                };
                for v in values {
                    let vat = line_col(text, v.span().start);
                    let s = match v.get_ref() {
                        DeValue::String(s) => s.to_string(),
                        DeValue::Integer(i) if i.radix() == 10 => i.as_str().to_string(),
                        DeValue::Integer(i) => i.to_string(),
                        DeValue::Float(f) => f.as_str().to_string(),
                        DeValue::Boolean(_) => {
                            errors.push(err(
                                vat,
                                format!("{long}: takes a value, not true or false"),
                            ));
                            continue;
                        }
                        DeValue::Datetime(_) | DeValue::Array(_) | DeValue::Table(_) => {
                            errors.push(err(
                                vat,
                                format!(
                                    "{long}: takes a string{}",
                                    if many { " or a list of strings" } else { "" }
                                ),
                            ));
                            continue;
                        }
                    };
                    // The option's own parser, alone (its relations to others are checked
                    // when the options are put together).
                    let check = clap::Command::new("config").no_binary_name(true).arg(
                        Arg::new("v")
                            .action(ArgAction::Set)
                            .allow_hyphen_values(true)
                            .value_parser(arg.get_value_parser().clone()),
                    );
                    if let Err(e) = check.try_get_matches_from([s.as_str()]) {
                        errors.push(err(vat, format!("{long} = {s:?}: {}", clap_reason(&e))));
                        continue;
                    }
                    out.push(OsString::from(format!("--{long}={s}")));
                }
            }
        }
        settings.push(Setting {
            id: arg.get_id().to_string(),
            long,
            at,
            args: out,
        });
    }
    if errors.is_empty() {
        Ok(settings)
    } else {
        Err(errors)
    }
}

/// A clap error's reason, without clap's usage lines and `error:` prefix.
fn clap_reason(e: &clap::Error) -> String {
    use clap::error::ContextKind;
    use std::error::Error;
    if let Some(source) = e.source() {
        return source.to_string();
    }
    let text = e.to_string();
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string();
    match e.get(ContextKind::InvalidValue) {
        Some(v) if !first.contains(&v.to_string()) => format!("{first} ({v})"),
        _ => first,
    }
}

/// The checks `serve` makes of its options together (`face::serve::check_args`): main hands
/// it over, so this module does not import the one that serves.
pub type CheckFn = fn(ServeArgs) -> Result<(), String>;

/// Where a `serve --config` came from: the file and the command line, so SIGHUP can read the
/// file again and merge it the same way.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// `serve`'s checks of the options together.
    pub check: CheckFn,
    pub file: PathBuf,
    /// `serve`'s arguments on the command line (after `serve`).
    pub cmdline: Vec<OsString>,
    /// The ids of the options given there.
    pub cmdline_ids: BTreeSet<String>,
}

/// What reading the config file with the command line gave.
#[derive(Debug)]
pub struct Loaded {
    pub args: ServeArgs,
    /// Every option's value in effect (long name → raw values), to tell what changed.
    pub effective: BTreeMap<String, Vec<String>>,
    /// Keys of the file not used because the command line gives (or conflicts with) them.
    pub overridden: Vec<String>,
}

impl ConfigSource {
    /// Reads the file and merges it with the command line.
    pub fn load(&self) -> Result<Loaded, ConfigErrors> {
        let fail = |errors| ConfigErrors {
            file: self.file.clone(),
            errors,
        };
        let text = read_config_text(&self.file).map_err(|e| {
            fail(vec![ConfigError {
                at: None,
                message: format!("cannot read it: {e}"),
            }])
        })?;
        let settings = read_settings(&text).map_err(fail)?;
        let serve = serve_command();
        let mut argv: Vec<OsString> = vec!["dovetail".into(), "serve".into()];
        let mut overridden = Vec::new();
        for s in &settings {
            if self.cmdline_ids.contains(&s.id) {
                overridden.push(format!("{} (given on the command line)", s.long));
                continue;
            }
            let conflicting = serve
                .get_arguments()
                .find(|a| a.get_id() == s.id.as_str())
                .map(|a| {
                    serve
                        .get_arg_conflicts_with(a)
                        .into_iter()
                        .filter(|c| self.cmdline_ids.contains(c.get_id().as_str()))
                        .filter_map(|c| c.get_long().map(|l| format!("--{l}")))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            if !conflicting.is_empty() {
                overridden.push(format!(
                    "{} (the command line gives {})",
                    s.long,
                    conflicting.join(", ")
                ));
                continue;
            }
            argv.extend(s.args.iter().cloned());
        }
        argv.extend(self.cmdline.iter().cloned());
        let matches = Cli::command().try_get_matches_from(argv).map_err(|e| {
            // Point at the key the message names, if any.
            let reason = clap_reason(&e);
            let at = settings
                .iter()
                .filter(|s| !self.cmdline_ids.contains(&s.id))
                .find(|s| reason.contains(&format!("--{}", s.long)))
                .map(|s| s.at);
            fail(vec![ConfigError {
                at,
                message: format!("with the command line: {reason}"),
            }])
        })?;
        let args = serve_args(&matches).map_err(fail)?;
        let effective = matches
            .subcommand_matches("serve")
            .map(effective_values)
            .unwrap_or_default();
        // The checks `serve` makes of its options together, with the key they name.
        if let Err(reason) = (self.check)(serve_args(&matches).map_err(fail)?) {
            let at = settings
                .iter()
                .find(|s| reason.contains(&format!("--{}", s.long)))
                .map(|s| s.at);
            return Err(fail(vec![ConfigError {
                at,
                message: reason,
            }]));
        }
        Ok(Loaded {
            args,
            effective,
            overridden,
        })
    }
}

/// `serve`'s arguments of a parsed command line.
fn serve_args(matches: &clap::ArgMatches) -> Result<ServeArgs, Vec<ConfigError>> {
    let one = |message: String| vec![ConfigError { at: None, message }];
    match Cli::from_arg_matches(matches) {
        Ok(Cli {
            command: Command::Serve(args),
            ..
        }) => Ok(args),
        Ok(_) => Err(one("not a serve command".into())),
        Err(e) => Err(one(clap_reason(&e))),
    }
}

/// Every option's raw values in `m` (long name → values; defaults included).
fn effective_values(m: &clap::ArgMatches) -> BTreeMap<String, Vec<String>> {
    let serve = serve_command();
    let mut out = BTreeMap::new();
    for a in keyed_args(&serve) {
        let Some(long) = a.get_long() else { continue };
        let values = m
            .try_get_raw(a.get_id().as_str())
            .ok()
            .flatten()
            .map(|vs| vs.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        out.insert(long.to_string(), values);
    }
    out
}

/// `main`'s parse of the command line: as clap's, but `serve --config FILE` merges FILE's
/// options in (see the module). Exits as clap does on a bad command line; a bad file is an
/// error printed by the caller.
pub fn parse_cli(check: CheckFn) -> Result<(Cli, Option<Arc<ConfigSource>>), ConfigErrors> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let is_serve_with_config = argv.get(1).is_some_and(|a| a == "serve")
        && argv
            .iter()
            .skip(2)
            .any(|a| a == "--config" || a.to_string_lossy().starts_with("--config="));
    if !is_serve_with_config {
        return Ok((Cli::parse_from(argv), None));
    }
    // A lenient parse to learn the file and which options the command line gives (the
    // options' relations may be met only with the file's).
    let lenient = Cli::command()
        .ignore_errors(true)
        .mut_subcommand("serve", |c| c.ignore_errors(true));
    let Ok(matches) = lenient.try_get_matches_from(&argv) else {
        return Ok((Cli::parse_from(argv), None));
    };
    let Some(serve) = matches.subcommand_matches("serve") else {
        return Ok((Cli::parse_from(argv), None));
    };
    let Some(file) = serve.get_one::<PathBuf>("config").cloned() else {
        return Ok((Cli::parse_from(argv), None));
    };
    let cmdline_ids = serve
        .ids()
        .filter(|id| {
            serve.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
        })
        .map(|id| id.to_string())
        .collect();
    // Absolute: SIGHUP reads the same file whatever the daemon's directory is then.
    let file = std::path::absolute(&file).unwrap_or(file);
    let source = ConfigSource {
        check,
        file,
        cmdline: argv[2..].to_vec(),
        cmdline_ids,
    };
    let loaded = source.load()?;
    Ok((
        Cli {
            command: Command::Serve(loaded.args),
            ceph_conf: matches.get_one::<PathBuf>("ceph_conf").cloned(),
            ceph_id: matches.get_one::<String>("ceph_id").cloned(),
        },
        Some(Arc::new(source)),
    ))
}

/// `dovetail config check FILE`.
pub fn run_check(file: &Path, check: CheckFn) -> Result<(), CliError> {
    let source = ConfigSource {
        check,
        file: file.to_path_buf(),
        cmdline: Vec::new(),
        cmdline_ids: BTreeSet::new(),
    };
    match source.load() {
        Ok(loaded) => {
            let text = read_config_text(file).unwrap_or_default();
            let set: Vec<String> = read_settings(&text)
                .unwrap_or_default()
                .iter()
                .map(|s| s.long.clone())
                .collect();
            println!(
                "{}: good: sets {} option(s){}{}",
                file.display(),
                set.len(),
                if set.is_empty() { "" } else { ": " },
                set.join(", ")
            );
            drop(loaded);
            Ok(())
        }
        Err(e) => {
            for err in &e.errors {
                eprintln!("{}", err.shown(file));
            }
            Err(CliError::Invalid(format!(
                "{}: {} error(s); nothing would be served with it",
                file.display(),
                e.errors.len()
            )))
        }
    }
}

// ------------------------------------------------------------------------------------------
// SIGHUP.

/// What a reload changes live, supplied by `serve`.
pub trait LiveSettings {
    /// Serves metrics on `addr` instead (or stops them).
    fn set_metrics(&self, addr: Option<std::net::SocketAddr>) -> Result<String, String>;
    /// Sets disk `name`'s candidate's policy if it has another one.
    fn set_policy(&self, name: &str, policy: &str) -> Result<Option<String>, String>;
    /// Starts serving disk `name` of the store on `socket` (`None`: served there already).
    fn add_disk(&self, name: &str, socket: &Path) -> Result<Option<String>, String>;
    /// Stops serving disk `name`, as `ctl detach` without `--force` does (`None`: it was not
    /// served). Refused (the reason) while a guest is connected.
    fn remove_disk(&self, name: &str) -> Result<Option<String>, String>;
    /// Serves disk `name` on `socket` instead of where it is served: detached, then served
    /// there. Refused (the reason, the disk still served where it was) as `remove_disk` is, or
    /// when `socket` cannot be listened on.
    fn move_disk(&self, name: &str, socket: &Path) -> Result<String, String>;
}

/// Whether `disk`'s value (`NAME=SOCKET`) names disk `name`.
fn names_disk(value: &str, name: &str) -> bool {
    value.split_once('=').map(|(n, _)| n) == Some(name)
}

/// The options in effect and how to read them again.
#[derive(Debug)]
pub struct Reloader {
    source: Arc<ConfigSource>,
    effective: BTreeMap<String, Vec<String>>,
}

/// Options SIGHUP applies live.
const LIVE_KEYS: &[&str] = &["metrics", "log-level", "policy", "disk"];

impl Reloader {
    /// For a daemon started from `source`; reads it once more for the options in effect.
    pub fn new(source: Arc<ConfigSource>) -> Option<Reloader> {
        match source.load() {
            Ok(l) => Some(Reloader {
                source,
                effective: l.effective,
            }),
            Err(e) => {
                warn!(
                    "config {}: cannot be read again: {e}",
                    source.file.display()
                );
                None
            }
        }
    }

    /// SIGHUP: reads the file again and applies what changed; a file that does not check
    /// changes nothing. Returns a summary for the service manager's status.
    pub fn reload(&mut self, live: &dyn LiveSettings) -> String {
        let file = self.source.file.display().to_string();
        info!("SIGHUP: reading {file} again");
        let loaded = match self.source.load() {
            Ok(l) => l,
            Err(e) => {
                error!("config {file}: not applied, nothing changed:\n{e}");
                return format!("reload failed: {file} has errors; nothing changed");
            }
        };
        for o in &loaded.overridden {
            info!("config {file}: {o}: the command line's value stays");
        }
        let old = std::mem::take(&mut self.effective);
        let new = loaded.effective;
        let mut applied = 0usize;
        let mut restart = Vec::new();
        // Changes refused for now (a disk whose guest is connected), tried at the next SIGHUP.
        let mut refused: Vec<String> = Vec::new();
        let mut kept_old = BTreeMap::new();
        for (key, values) in &new {
            let before = old.get(key).cloned().unwrap_or_default();
            if *values == before {
                continue;
            }
            let shown = |v: &[String]| {
                if v.is_empty() {
                    "(unset)".to_string()
                } else {
                    v.join(" ")
                }
            };
            match key.as_str() {
                "metrics" => {
                    let addr = values.first().and_then(|v| v.parse().ok());
                    match live.set_metrics(addr) {
                        Ok(m) => {
                            info!(
                                "config: metrics: {} -> {}: {m}",
                                shown(&before),
                                shown(values)
                            );
                            applied += 1;
                        }
                        Err(e) => {
                            error!(
                                "config: metrics: cannot change to {}: {e}; kept {}",
                                shown(values),
                                shown(&before)
                            );
                            kept_old.insert(key.clone(), before);
                        }
                    }
                }
                "log-level" => {
                    set_log_level(values.first().map(String::as_str));
                    info!("config: log-level: {} -> {}", shown(&before), shown(values));
                    applied += 1;
                }
                "policy" => {
                    let mut failed = false;
                    for v in values {
                        let Ok((name, policy)) = parse_disk_policy(v) else {
                            continue;
                        };
                        match live.set_policy(&name, &policy) {
                            Ok(Some(m)) => {
                                info!("config: disk {name}: {m}");
                                applied += 1;
                            }
                            Ok(None) => {}
                            Err(e) => {
                                error!("config: disk {name}: policy {policy} not applied: {e}");
                                failed = true;
                            }
                        }
                    }
                    for v in &before {
                        let name = v.split_once('=').map_or(v.as_str(), |(n, _)| n);
                        if !values
                            .iter()
                            .any(|n| n.split_once('=').map(|(n, _)| n) == Some(name))
                        {
                            info!("config: disk {name}: no policy in the file any more; its candidate keeps the one it has");
                        }
                    }
                    if failed {
                        // Tried again at the next SIGHUP.
                        kept_old.insert(key.clone(), before);
                    }
                }
                "disk" => {
                    let parse = |v: &String| {
                        v.split_once('=')
                            .map(|(n, s)| (n.to_string(), PathBuf::from(s)))
                    };
                    let was: Vec<_> = before.iter().filter_map(parse).collect();
                    let now: Vec<_> = values.iter().filter_map(parse).collect();
                    let mut served = before.clone();
                    for (name, socket) in &now {
                        match was.iter().find(|(n, _)| n == name) {
                            Some((_, s)) if s == socket => {}
                            Some((_, s)) => match live.move_disk(name, socket) {
                                Ok(m) => {
                                    info!(
                                        "config: disk {name}: socket {} -> {}: {m}",
                                        s.display(),
                                        socket.display()
                                    );
                                    served.retain(|v| !names_disk(v, name));
                                    served.push(format!("{name}={}", socket.display()));
                                    applied += 1;
                                }
                                Err(e) => {
                                    warn!(
                                        "config: disk {name}: not moved to {}, still served on \
                                         {}: {e}; tried again at the next SIGHUP",
                                        socket.display(),
                                        s.display()
                                    );
                                    refused
                                        .push(format!("disk {name} stays on {}: {e}", s.display()));
                                }
                            },
                            None => match live.add_disk(name, socket) {
                                Ok(None) => {
                                    served.push(format!("{name}={}", socket.display()));
                                }
                                Ok(Some(m)) => {
                                    info!("config: disk {name} added: {m}");
                                    served.push(format!("{name}={}", socket.display()));
                                    applied += 1;
                                }
                                Err(e) => error!("config: disk {name}: cannot serve it: {e}"),
                            },
                        }
                    }
                    for (name, socket) in &was {
                        if now.iter().any(|(n, _)| n == name) {
                            continue;
                        }
                        match live.remove_disk(name) {
                            Ok(m) => {
                                match m {
                                    Some(m) => {
                                        info!("config: disk {name} is no longer in the file: {m}");
                                        applied += 1;
                                    }
                                    None => info!(
                                        "config: disk {name} is no longer in the file (it was not served)"
                                    ),
                                }
                                served.retain(|v| !names_disk(v, name));
                            }
                            Err(e) => {
                                warn!(
                                    "config: disk {name} is no longer in the file but stays served \
                                     on {}: {e}; tried again at the next SIGHUP",
                                    socket.display()
                                );
                                refused.push(format!(
                                    "disk {name} stays on {}: {e}",
                                    socket.display()
                                ));
                            }
                        }
                    }
                    kept_old.insert(key.clone(), served);
                }
                _ => restart.push(format!("{key}: {} -> {}", shown(&before), shown(values))),
            }
        }
        for r in &restart {
            warn!("config: {r}: takes effect at the next restart");
        }
        // What is in effect now: the new values, but those not applied live.
        let mut effective = new;
        for (k, v) in &old {
            if !LIVE_KEYS.contains(&k.as_str()) {
                effective.insert(k.clone(), v.clone());
            }
        }
        effective.extend(kept_old);
        self.effective = effective;
        let summary = format!(
            "reloaded {file}: {applied} change(s) applied{}{}",
            if restart.is_empty() {
                String::new()
            } else {
                format!(", {} need a restart", restart.len())
            },
            if refused.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} not applied (tried again at the next SIGHUP): {}",
                    refused.len(),
                    refused.join("; ")
                )
            }
        );
        info!("{summary}");
        summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_serve_option_is_a_key() {
        let keys = keys();
        for k in [
            "store",
            "disk",
            "metrics",
            "log-level",
            "policy",
            "queues",
            "read-only",
        ] {
            assert!(keys.contains(&k.to_string()), "{k} missing from {keys:?}");
        }
        assert!(!keys.contains(&"config".to_string()));
        assert!(!keys.contains(&"help".to_string()));
    }

    #[test]
    fn errors_name_line_and_column() {
        let text = "store = \"/s\"\n\nqueues = 0\nbogus = 1\n";
        let errors = read_settings(text).expect_err("bad file");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].at, Some((3, 10)), "{errors:?}");
        assert!(errors[0].message.contains("queues"), "{errors:?}");
        assert_eq!(errors[1].at, Some((4, 1)), "{errors:?}");
        assert!(
            errors[1].message.contains("unknown key \"bogus\""),
            "{errors:?}"
        );
        let errors = read_settings("store = \n").expect_err("bad TOML");
        assert_eq!(errors[0].at.map(|a| a.0), Some(1), "{errors:?}");
    }

    /// A configuration file is read only up to its bound: a larger file, or a character
    /// device that never ends, is refused with a sentence saying so, its text unread.
    #[test]
    fn a_config_file_is_bounded_before_it_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let at = dir.path().join("dovetail.toml");
        std::fs::write(&at, "queues = 2\n").expect("write");
        assert_eq!(read_config_text(&at).expect("small"), "queues = 2\n");
        let big = format!("# {}\n", "x".repeat(MAX_CONFIG_BYTES as usize));
        std::fs::write(&at, big).expect("write");
        let e = read_config_text(&at).expect_err("too large");
        assert!(e.to_string().contains("too large"), "{e}");
        let e = read_config_text(Path::new("/dev/zero")).expect_err("never ends");
        assert!(e.to_string().contains("too large"), "{e}");
    }

    #[test]
    fn values_become_the_options_arguments() {
        let s =
            read_settings("read-only = true\ndisk = [\"a=/x.sock\", \"b=/y.sock\"]\nqueues = 2\n")
                .expect("good");
        let args: Vec<String> = s
            .iter()
            .flat_map(|s| s.args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(
            args,
            [
                "--read-only",
                "--disk=a=/x.sock",
                "--disk=b=/y.sock",
                "--queues=2"
            ]
        );
    }

    #[test]
    fn log_levels() {
        assert!(crate::face::cli::parse_log_level("debug").is_ok());
        assert!(crate::face::cli::parse_log_level("info,dovetail_store=debug").is_ok());
        assert!(
            crate::face::cli::parse_log_level("loud").is_ok(),
            "a bare module name"
        );
        assert!(crate::face::cli::parse_log_level("x=loud").is_err());
        assert!(crate::face::cli::parse_log_level("").is_err());
    }
}
