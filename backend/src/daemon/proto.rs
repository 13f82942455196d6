//! The control protocol's types (docs/control.md), the one definition the server
//! (`daemon::control`) and the client (`face::ctl`) share: a [`Request`] is tagged by its command
//! name (`"cmd"`) with its arguments beside it, a [`Reply`] carries a result or a
//! [`CommandError`] with its [`ErrorCode`].
//!
//! Requests are read strictly: a field named twice (`crate::strict_json`), an unknown or
//! ill-typed argument is `bad-request`. Replies are written with their keys in order, as
//! `serde_json` writes an object, so the bytes on the wire are the ones docs/control.md shows.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// The protocol version this daemon speaks.
pub const PROTOCOL: u64 = 1;

/// The commands this daemon carries out (the names of [`Request`]'s variants on the wire).
pub const COMMANDS: &[&str] = &[
    "hello",
    "status",
    "tee",
    "policy",
    "untee",
    "abort",
    "migrate",
    "promote",
    "deploy",
    "snapshot",
    "snapshots",
    "delete-snapshot",
    "export",
    "events",
    "metrics",
    "taint",
    "annotations",
    "tiers",
    "reopen",
    "takeover",
    "resize",
    "disk-create",
    "attach",
    "detach",
    "disk-delete",
    "import",
    "bisect",
    "tee-add",
    "tee-remove",
    "upgrade",
    "store-faults",
];

/// Commands reserved for what later versions add; they answer `not-available` for now.
pub const RESERVED: &[&str] = &[];

/// The machine-readable part of an error reply (docs/control.md, Errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    BadJson,
    BadRequest,
    UnsupportedVersion,
    TooLong,
    Busy,
    Forbidden,
    Evicted,
    UnknownCommand,
    NotAvailable,
    UnknownDisk,
    DiskFailed,
    Invalid,
    Conflict,
    Failed,
}

impl ErrorCode {
    /// Every code, in the order docs/control.md lists them.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::BadJson,
        ErrorCode::BadRequest,
        ErrorCode::UnsupportedVersion,
        ErrorCode::TooLong,
        ErrorCode::Busy,
        ErrorCode::Forbidden,
        ErrorCode::Evicted,
        ErrorCode::UnknownCommand,
        ErrorCode::NotAvailable,
        ErrorCode::UnknownDisk,
        ErrorCode::DiskFailed,
        ErrorCode::Invalid,
        ErrorCode::Conflict,
        ErrorCode::Failed,
    ];

    /// The code as it is on the wire (`bad-request`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad-json",
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::UnsupportedVersion => "unsupported-version",
            ErrorCode::TooLong => "too-long",
            ErrorCode::Busy => "busy",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Evicted => "evicted",
            ErrorCode::UnknownCommand => "unknown-command",
            ErrorCode::NotAvailable => "not-available",
            ErrorCode::UnknownDisk => "unknown-disk",
            ErrorCode::DiskFailed => "disk-failed",
            ErrorCode::Invalid => "invalid",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Failed => "failed",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a control command failed: the `error` object of a reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    pub code: ErrorCode,
    pub message: String,
}

impl CommandError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> CommandError {
        CommandError {
            code,
            message: message.into(),
        }
    }
}

/// An optional argument that, when present, must be a `T` (`null` is refused, as for a
/// required one).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `hello`, `metrics`: no arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// `store-faults`: switches the store's file fault injection (test builds started with `serve
/// --store-faults`; `daemon::store_faults`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFaultsArgs {
    /// `on`, `off` or `status` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

/// `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
}

/// `reopen`, `untee`, `abort`, `snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskArgs {
    pub disk: String,
}

/// `tee`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeeArgs {
    pub disk: String,
    /// Default: the trusted version's layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
    pub policy: String,
    #[serde(default)]
    pub faults: Vec<String>,
    /// Candidates after the first (an N-version Tee of 3 to 5 members; `candidate` is then
    /// required). Fault rules go to the first candidate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_candidates: Vec<String>,
}

/// `tee-add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeeAddArgs {
    pub disk: String,
    /// The new member's layout.
    pub candidate: String,
}

/// `tee-remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeeRemoveArgs {
    pub disk: String,
    /// The member's version key, as `status` shows it.
    pub member: u64,
}

/// `policy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyArgs {
    pub disk: String,
    pub policy: String,
}

/// `snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotArgs {
    pub disk: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `delete-snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotNameArgs {
    pub disk: String,
    pub name: String,
}

/// `bisect`: the first journaled request after which `disk`'s versions differ on `block`
/// (default: the block of the Tee's first mismatch, or the first the versions differ on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BisectArgs {
    pub disk: String,
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub block: Option<u64>,
}

/// `resize`: grows `disk` to `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeArgs {
    pub disk: String,
    pub size: u64,
}

/// `export`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportArgs {
    pub disk: String,
    pub snapshot: String,
    pub to: PathBuf,
}

/// `migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateArgs {
    pub disk: String,
    /// Default: `copy-out` ([`MigrateArgs::mode`]).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
    /// Default: `start` ([`MigrateArgs::action`]).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub action: Option<String>,
}

impl MigrateArgs {
    pub fn mode(&self) -> &str {
        self.mode.as_deref().unwrap_or("copy-out")
    }

    pub fn action(&self) -> &str {
        self.action.as_deref().unwrap_or("start")
    }
}

/// `promote`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteArgs {
    pub disk: String,
    /// Skip the verification pass (the presence map is trusted as it is).
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_verify: bool,
    /// The verification pass's limit in bytes per second of each version (0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_rate: Option<u64>,
    /// An N-version Tee's member to promote (its version key); default: the first candidate
    /// holding every block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<u64>,
}

/// `deploy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployArgs {
    /// Default: each disk's trusted layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<String>,
    pub policy: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<String>>,
    /// Percent of the disks without a candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<f64>,
    /// Default 0.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub seed: Option<u64>,
}

/// `events`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsArgs {
    #[serde(default)]
    pub since: u64,
    #[serde(default)]
    pub follow: bool,
}

/// `taint`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaintArgs {
    pub disk: String,
    pub label: String,
    pub on: bool,
}

/// `tiers`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TiersArgs {
    pub disk: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copies: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_after_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot_accesses: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub move_mib_s: Option<u64>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub move_now: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub scrub: bool,
}

/// `annotations`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnotationsArgs {
    pub disk: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region_blocks: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<u64>,
}

/// `disk-create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskCreateArgs {
    pub disk: String,
    /// Bytes, a positive multiple of 4096.
    pub size: u64,
    /// Default: `parallax-v1`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub layout: Option<String>,
}

/// `attach`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachArgs {
    pub disk: String,
    /// An absolute path to bind the disk's socket at; with `fd`, the path the passed socket is
    /// bound at is used, and this must be absent or name the same path.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub socket: Option<PathBuf>,
    /// Default 1.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub queues: Option<u16>,
    /// Default: the disk's name (its first 20 bytes).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub read_only: bool,
    /// A listening Unix socket came with the request line (SCM_RIGHTS): serve the disk on it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub fd: bool,
    /// The destination of a live migration (a shared store): serve the socket now, take the
    /// disk from its owner when a guest starts its queues. Not recorded in the catalog.
    #[serde(default, skip_serializing_if = "is_false")]
    pub incoming: bool,
}

/// `import`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportArgs {
    pub disk: String,
    /// A plain file name in the directory `serve --import-dir` names.
    pub from: PathBuf,
}

/// `detach`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetachArgs {
    pub disk: String,
    /// Detach even while a guest is connected: its requests in flight complete, the disk is
    /// flushed and the connection closed.
    #[serde(default, skip_serializing_if = "is_false")]
    pub force: bool,
}

/// `upgrade`: start a new daemon binary and hand it this one's sockets and disks
/// (docs/control.md, `upgrade`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeArgs {
    /// The new binary (default: the one this daemon was started from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<PathBuf>,
    /// `reconnect`: when live connections cannot be handed over (a guest is connected, or the
    /// new binary speaks another handover format), disconnect the guests and let the new
    /// daemon serve them when they reconnect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// How long the new binary has for each step of the takeover, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
}

/// One request: `{"cmd": NAME, ARGUMENTS...}` (plus the envelope's `v` and `id`, which
/// [`Request::line`] adds and [`parse_request`] takes off).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Hello(NoArgs),
    Status(StatusArgs),
    Reopen(DiskArgs),
    Takeover(DiskArgs),
    Tee(TeeArgs),
    Policy(PolicyArgs),
    Untee(DiskArgs),
    Abort(DiskArgs),
    Migrate(MigrateArgs),
    Promote(PromoteArgs),
    Deploy(DeployArgs),
    Snapshot(SnapshotArgs),
    Snapshots(DiskArgs),
    DeleteSnapshot(SnapshotNameArgs),
    Export(ExportArgs),
    Events(EventsArgs),
    Metrics(NoArgs),
    Taint(TaintArgs),
    Annotations(AnnotationsArgs),
    Tiers(TiersArgs),
    Resize(ResizeArgs),
    DiskCreate(DiskCreateArgs),
    Attach(AttachArgs),
    Detach(DetachArgs),
    DiskDelete(DiskArgs),
    Import(ImportArgs),
    Bisect(BisectArgs),
    TeeAdd(TeeAddArgs),
    TeeRemove(TeeRemoveArgs),
    Upgrade(UpgradeArgs),
    StoreFaults(StoreFaultsArgs),
}

impl Request {
    /// The command's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello(_) => "hello",
            Request::Status(_) => "status",
            Request::Reopen(_) => "reopen",
            Request::Takeover(_) => "takeover",
            Request::Tee(_) => "tee",
            Request::Policy(_) => "policy",
            Request::Untee(_) => "untee",
            Request::Abort(_) => "abort",
            Request::Migrate(_) => "migrate",
            Request::Promote(_) => "promote",
            Request::Deploy(_) => "deploy",
            Request::Snapshot(_) => "snapshot",
            Request::Snapshots(_) => "snapshots",
            Request::DeleteSnapshot(_) => "delete-snapshot",
            Request::Export(_) => "export",
            Request::Events(_) => "events",
            Request::Metrics(_) => "metrics",
            Request::Taint(_) => "taint",
            Request::Annotations(_) => "annotations",
            Request::Tiers(_) => "tiers",
            Request::Resize(_) => "resize",
            Request::DiskCreate(_) => "disk-create",
            Request::Attach(_) => "attach",
            Request::Detach(_) => "detach",
            Request::DiskDelete(_) => "disk-delete",
            Request::Import(_) => "import",
            Request::Bisect(_) => "bisect",
            Request::TeeAdd(_) => "tee-add",
            Request::TeeRemove(_) => "tee-remove",
            Request::Upgrade(_) => "upgrade",
            Request::StoreFaults(_) => "store-faults",
        }
    }

    /// The request as a JSON object, with the envelope: `v` ([`PROTOCOL`]) and `id`.
    pub fn to_json(&self, id: u64) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            m.insert("v".into(), Value::from(PROTOCOL));
            m.insert("id".into(), Value::from(id));
        }
        v
    }

    /// The request line a client sends (newline-terminated).
    pub fn line(&self, id: u64) -> String {
        self.to_json(id).to_string() + "\n"
    }
}

/// A reply: `{"v":1,"id":ID,"ok":true,"result":{...}}` or
/// `{"v":1,"id":ID,"ok":false,"error":{"code":CODE,"message":TEXT}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub v: u64,
    /// The request's `id`, `null` if it had none (or could not be read).
    #[serde(default)]
    pub id: Value,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CommandError>,
}

impl Reply {
    pub fn ok(id: Value, result: Value) -> Reply {
        Reply {
            v: PROTOCOL,
            id,
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn error(id: Value, e: &CommandError) -> Reply {
        Reply {
            v: PROTOCOL,
            id,
            ok: false,
            result: None,
            error: Some(e.clone()),
        }
    }

    /// The reply line (newline-terminated), its keys in order.
    pub fn line(&self) -> String {
        serde_json::to_value(self)
            .unwrap_or(Value::Null)
            .to_string()
            + "\n"
    }

    /// What a client makes of a reply line it read as JSON: the result (`null` if the reply
    /// has none), or the daemon's error as `code: message` (`?` for what the reply lacks).
    /// Tolerant of any shape: it is the daemon's word, not ours.
    pub fn outcome(reply: &Value) -> Result<Value, String> {
        if reply.get("ok") == Some(&Value::Bool(true)) {
            return Ok(reply.get("result").cloned().unwrap_or(Value::Null));
        }
        let e = reply.get("error");
        let field = |k: &str| {
            e.and_then(|e| e.get(k))
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string()
        };
        Err(format!("{}: {}", field("code"), field("message")))
    }
}

/// An event line on a followed connection: `{"v":1,"event":{...}}` (newline-terminated).
pub fn event_line<E: Serialize>(event: &E) -> String {
    let mut m = Map::new();
    m.insert("v".into(), Value::from(PROTOCOL));
    m.insert(
        "event".into(),
        serde_json::to_value(event).unwrap_or(Value::Null),
    );
    Value::Object(m).to_string() + "\n"
}

/// Reads one request line: its `id` (`null` if absent or unreadable) and the request, or why
/// it cannot be carried out (`bad-json`, `bad-request`, `unsupported-version`,
/// `unknown-command`, `not-available`).
pub fn parse_request(line: &[u8]) -> (Value, Result<Request, CommandError>) {
    let mut id = Value::Null;
    let r = parse_into(line, &mut id);
    (id, r)
}

fn parse_into(line: &[u8], id: &mut Value) -> Result<Request, CommandError> {
    let v: Value = crate::strict_json::from_slice(line).map_err(|e| match e {
        crate::strict_json::StrictError::Syntax(e) => {
            CommandError::new(ErrorCode::BadJson, format!("the request is not JSON: {e}"))
        }
        crate::strict_json::StrictError::DuplicateKey(m) => {
            CommandError::new(ErrorCode::BadRequest, m)
        }
    })?;
    let Value::Object(mut obj) = v else {
        return Err(CommandError::new(
            ErrorCode::BadRequest,
            "a request is a JSON object such as {\"cmd\":\"status\"}",
        ));
    };
    if let Some(i) = obj.remove("id") {
        *id = i;
    }
    match obj.remove("v") {
        None => {}
        Some(Value::Number(n)) if n.as_u64() == Some(PROTOCOL) => {}
        Some(other) => {
            return Err(CommandError::new(
                ErrorCode::UnsupportedVersion,
                format!("this daemon speaks protocol {PROTOCOL}, the request asks for {other}"),
            ))
        }
    }
    let cmd = match obj.get("cmd") {
        Some(Value::String(c)) => c.clone(),
        Some(_) => {
            return Err(CommandError::new(
                ErrorCode::BadRequest,
                "\"cmd\" must be a string",
            ))
        }
        None => {
            return Err(CommandError::new(
                ErrorCode::BadRequest,
                "the request has no \"cmd\"",
            ))
        }
    };
    if RESERVED.contains(&cmd.as_str()) {
        return Err(CommandError::new(
            ErrorCode::NotAvailable,
            format!(
                "{cmd} is reserved for a later version of the protocol; this daemon cannot do it yet"
            ),
        ));
    }
    if !COMMANDS.contains(&cmd.as_str()) {
        return Err(CommandError::new(
            ErrorCode::UnknownCommand,
            format!(
                "unknown command {}; known: {}",
                dovetail_store::names::shown(&cmd),
                COMMANDS.join(", ")
            ),
        ));
    }
    Request::deserialize(Value::Object(obj))
        .map_err(|e| CommandError::new(ErrorCode::BadRequest, format!("{cmd}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Request, CommandError> {
        parse_request(v.to_string().as_bytes()).1
    }

    #[test]
    fn every_command_is_a_variant_and_back() {
        for &cmd in COMMANDS {
            // The fewest arguments each command takes.
            let mut v = json!({"cmd": cmd, "disk": "d", "policy": "sync-compare",
                               "name": "s", "snapshot": "s", "to": "f", "label": "l",
                               "on": true, "size": 4096, "from": "f",
                               "candidate": "parallax-v1", "member": 3});
            let obj = v.as_object_mut().expect("object");
            let keep: &[&str] = match cmd {
                "hello" | "metrics" | "events" | "upgrade" | "store-faults" => &["cmd"],
                "status" | "reopen" | "takeover" | "untee" | "abort" | "snapshots" | "migrate"
                | "promote" | "annotations" | "tiers" | "bisect" => &["cmd", "disk"],
                "tee" | "policy" => &["cmd", "disk", "policy"],
                "deploy" => &["cmd", "policy"],
                "snapshot" | "delete-snapshot" => &["cmd", "disk", "name"],
                "export" => &["cmd", "disk", "snapshot", "to"],
                "taint" => &["cmd", "disk", "label", "on"],
                "resize" => &["cmd", "disk", "size"],
                "attach" | "detach" | "disk-delete" => &["cmd", "disk"],
                "disk-create" => &["cmd", "disk", "size"],
                "import" => &["cmd", "disk", "from"],
                "tee-add" => &["cmd", "disk", "candidate"],
                "tee-remove" => &["cmd", "disk", "member"],
                other => panic!("a command without a case here: {other}"),
            };
            obj.retain(|k, _| keep.contains(&k.as_str()));
            let r = parse(v.clone()).unwrap_or_else(|e| panic!("{cmd}: {e}"));
            assert_eq!(r.name(), cmd);
            // What the client sends is what the server reads.
            let sent: Value = serde_json::from_str(&r.line(7)).expect("a JSON line");
            assert_eq!(sent["v"], json!(1));
            assert_eq!(sent["id"], json!(7));
            assert_eq!(parse(sent).expect("again"), r, "{cmd}");
        }
    }

    #[test]
    fn requests_are_the_bytes_docs_control_md_shows() {
        let r = Request::Status(StatusArgs { disk: None });
        assert_eq!(r.line(1), "{\"cmd\":\"status\",\"id\":1,\"v\":1}\n");
        let r = Request::Migrate(MigrateArgs {
            disk: "vm1".into(),
            mode: None,
            rate: None,
            action: Some("status".into()),
        });
        assert_eq!(
            r.line(2),
            "{\"action\":\"status\",\"cmd\":\"migrate\",\"disk\":\"vm1\",\"id\":2,\"v\":1}\n"
        );
        let r = Request::Tee(TeeArgs {
            disk: "vm1".into(),
            candidate: None,
            policy: "sync-compare".into(),
            faults: Vec::new(),
            more_candidates: Vec::new(),
        });
        assert_eq!(
            r.line(3),
            "{\"cmd\":\"tee\",\"disk\":\"vm1\",\"faults\":[],\"id\":3,\"policy\":\"sync-compare\",\"v\":1}\n"
        );
    }

    #[test]
    fn replies_are_the_bytes_docs_control_md_shows() {
        assert_eq!(
            Reply::ok(json!(1), json!({"message": "m"})).line(),
            "{\"id\":1,\"ok\":true,\"result\":{\"message\":\"m\"},\"v\":1}\n"
        );
        let e = CommandError::new(ErrorCode::UnknownDisk, "no disk x");
        assert_eq!(
            Reply::error(Value::Null, &e).line(),
            "{\"error\":{\"code\":\"unknown-disk\",\"message\":\"no disk x\"},\"id\":null,\"ok\":false,\"v\":1}\n"
        );
        assert_eq!(
            event_line(&json!({"seq": 1})),
            "{\"event\":{\"seq\":1},\"v\":1}\n"
        );
    }

    #[test]
    fn error_codes_are_their_wire_names() {
        for c in ErrorCode::ALL {
            assert_eq!(serde_json::to_value(c).expect("code"), json!(c.as_str()));
            assert_eq!(
                serde_json::from_value::<ErrorCode>(json!(c.as_str())).expect("back"),
                c
            );
        }
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let code = |v: Value| parse(v).expect_err("refused").code;
        assert_eq!(
            code(json!({"cmd": "status", "dsk": "a"})),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(json!({"cmd": "tee", "disk": "a"})),
            ErrorCode::BadRequest
        );
        assert_eq!(code(json!({"cmd": "nope"})), ErrorCode::UnknownCommand);
        assert_eq!(code(json!({"cmd": 7})), ErrorCode::BadRequest);
        assert_eq!(
            code(json!({"cmd": "status", "v": 2})),
            ErrorCode::UnsupportedVersion
        );
        // An optional argument given as null is as wrong as a required one.
        assert_eq!(
            code(json!({"cmd": "migrate", "disk": "a", "mode": null})),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(json!({"cmd": "deploy", "policy": "p", "sample": 5, "seed": null})),
            ErrorCode::BadRequest
        );
        let e = parse(json!({"cmd": "status", "dsk": "a"})).expect_err("unknown field");
        assert!(
            e.message.starts_with("status: unknown field `dsk`"),
            "{}",
            e.message
        );
        let e = parse(json!({"cmd": "tee", "disk": "a"})).expect_err("no policy");
        assert_eq!(e.message, "tee: missing field `policy`");
        let (id, r) = parse_request(b"{\"cmd\":\"status\",\"id\":\"x\",\"cmd\":\"hello\"}");
        assert_eq!(r.expect_err("duplicate").code, ErrorCode::BadRequest);
        assert_eq!(id, Value::Null, "nothing is read from a refused line");
    }
}
