//! The daemon's events: a bounded ring of recent ones for `events`, and the bounded queues of
//! the clients that follow them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use dovetail_migrate::{Pause, TeeEvent};
use serde::Serialize;

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How many events the daemon keeps for `events` without `--follow`.
pub const EVENT_RING: usize = 256;
/// How many events a follower's queue holds before later ones are dropped for it.
pub const FOLLOWER_QUEUE: usize = 1024;

/// One thing that happened in the daemon, as `events` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonEvent {
    /// Per daemon, from 1.
    pub seq: u64,
    pub unix_ms: u64,
    pub disk: String,
    /// `candidate-attached`, `policy-changed`, `candidate-dropped`, `snapshot-taken`,
    /// `snapshot-deleted`, or, for what a Tee reported, the Tee event's kind (`mismatch`,
    /// `quarantined`, ...).
    pub kind: String,
    /// `daemon` or `tee`.
    pub source: &'static str,
    pub message: String,
    /// The pause of the disk's I/O the change took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause: Option<Pause>,
    /// The Tee's event with its provenance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tee: Option<TeeEvent>,
}

#[derive(Debug, Default)]
struct HubInner {
    seq: u64,
    ring: VecDeque<DaemonEvent>,
    followers: Vec<SyncSender<DaemonEvent>>,
}

/// The daemon's events: a bounded ring of recent ones and the queues of the clients following.
#[derive(Debug, Default)]
pub struct EventHub {
    inner: Mutex<HubInner>,
    /// Events a slow follower did not get.
    pub dropped: AtomicU64,
    following: AtomicU64,
}

impl EventHub {
    fn lock(&self) -> MutexGuard<'_, HubInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records and distributes an event (never blocks on a follower).
    pub fn publish(
        &self,
        disk: &str,
        kind: &str,
        source: &'static str,
        message: String,
        pause: Option<Pause>,
        tee: Option<TeeEvent>,
    ) {
        let mut g = self.lock();
        g.seq += 1;
        let ev = DaemonEvent {
            seq: g.seq,
            unix_ms: unix_ms(),
            disk: disk.to_string(),
            kind: kind.to_string(),
            source,
            message,
            pause,
            tee,
        };
        if g.ring.len() == EVENT_RING {
            g.ring.pop_front();
        }
        g.ring.push_back(ev.clone());
        g.followers.retain(|f| match f.try_send(ev.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }

    /// The recent events with a sequence number above `since`, oldest first.
    pub fn recent(&self, since: u64) -> Vec<DaemonEvent> {
        self.lock()
            .ring
            .iter()
            .filter(|e| e.seq > since)
            .cloned()
            .collect()
    }

    /// The recent events after `since` and a queue of every later one, taken atomically so
    /// none is missed or repeated.
    pub fn follow(self: &Arc<Self>, since: u64) -> (Vec<DaemonEvent>, Follower) {
        let (tx, rx) = std::sync::mpsc::sync_channel(FOLLOWER_QUEUE);
        let mut g = self.lock();
        let backlog = g.ring.iter().filter(|e| e.seq > since).cloned().collect();
        g.followers.push(tx);
        self.following.fetch_add(1, Ordering::SeqCst);
        (
            backlog,
            Follower {
                rx,
                hub: self.clone(),
            },
        )
    }

    /// [`EventHub::follow`] unless `max` clients follow already (then `None`); checked and
    /// counted under the hub's lock, so the bound holds however many ask at once.
    pub fn try_follow(
        self: &Arc<Self>,
        since: u64,
        max: u64,
    ) -> Option<(Vec<DaemonEvent>, Follower)> {
        let (tx, rx) = std::sync::mpsc::sync_channel(FOLLOWER_QUEUE);
        let mut g = self.lock();
        if self.following.load(Ordering::SeqCst) >= max {
            return None;
        }
        let backlog = g.ring.iter().filter(|e| e.seq > since).cloned().collect();
        g.followers.push(tx);
        self.following.fetch_add(1, Ordering::SeqCst);
        Some((
            backlog,
            Follower {
                rx,
                hub: self.clone(),
            },
        ))
    }

    /// Clients following the event stream now.
    pub fn followers(&self) -> u64 {
        self.following.load(Ordering::SeqCst)
    }
}

/// A client's queue of events; dropping it ends the following.
#[derive(Debug)]
pub struct Follower {
    pub rx: Receiver<DaemonEvent>,
    hub: Arc<EventHub>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.hub.following.fetch_sub(1, Ordering::SeqCst);
    }
}
