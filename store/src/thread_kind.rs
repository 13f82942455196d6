//! What kind of work a thread does, for the daemon's seccomp filter (one allow-list per kind,
//! `dovetail_backend::sandbox`). Each long-lived thread the crates start calls [`entered`]
//! first thing (a short-lived one keeps the filter of the thread that started it); without a
//! hook (tests, tools, a daemon run with `--seccomp off`) that does nothing.

use std::sync::OnceLock;

/// The kinds of threads, each with its own seccomp allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// A queue worker (or its helper): parses guest rings, reads and writes open files.
    Worker,
    /// An I/O engine's thread (io_uring completions, a pool thread): I/O on open files only.
    Engine,
    /// Store work in the background: commits, reserves, Tee streams, copy-outs, the mover,
    /// health checks, event relays. Opens and creates files; no sockets.
    Background,
    /// A disk's vhost-user serve loop: the protocol socket, guest memory, its queue workers.
    Serve,
    /// The control socket: every verb, so everything the daemon does.
    Control,
    /// The metrics endpoint: a TCP listener on loopback.
    Metrics,
}

static HOOK: OnceLock<fn(ThreadKind)> = OnceLock::new();

/// Sets what [`entered`] calls (once per process; later calls are ignored).
pub fn set_hook(hook: fn(ThreadKind)) {
    let _ = HOOK.set(hook);
}

/// The calling thread starts doing `kind`'s work: installs its filter, if the daemon has one.
pub fn entered(kind: ThreadKind) {
    if let Some(hook) = HOOK.get() {
        hook(kind);
    }
}
