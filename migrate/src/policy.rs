//! The Tee's validation policies (the Dovetail paper's Table 1 and Figure 3).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How closely a [`Tee`](crate::tee::Tee) watches its candidate version. Ordered from the most
/// to the least validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Reads go to both versions and are compared before the guest's request completes; writes go
    /// to both and the candidate's copy is re-read and compared. The guest always gets the
    /// trusted answer.
    SyncCrossChecks,
    /// Reads compared synchronously; writes mirrored synchronously, not re-read.
    SyncReadChecks,
    /// The guest is answered by the trusted version; the candidate's reads are checked (by hash)
    /// and its writes applied in the background stream.
    AsyncOldPrimary,
    /// Reads are answered by the candidate (for blocks it holds) and verified in the background;
    /// a write waits until every earlier read is verified, and is refused if one was wrong.
    BarrierWritesAsync,
    /// The candidate is the primary: reads answered and writes applied by it synchronously; the
    /// trusted version gets the writes in the background stream and checks the reads there.
    AsyncNewPrimary,
    /// Writes mirrored in the background; a background job periodically hashes large regions
    /// of both versions and compares them.
    LazyHashes,
    /// Writes mirrored in the background; nothing validated.
    MirrorOnly,
}

impl Policy {
    /// Every policy, from the most to the least validation.
    pub const ALL: [Policy; 7] = [
        Policy::SyncCrossChecks,
        Policy::SyncReadChecks,
        Policy::AsyncOldPrimary,
        Policy::BarrierWritesAsync,
        Policy::AsyncNewPrimary,
        Policy::LazyHashes,
        Policy::MirrorOnly,
    ];

    /// The kebab-case name used on the command line, the control socket and in events.
    pub fn name(self) -> &'static str {
        match self {
            Policy::SyncCrossChecks => "sync-cross-checks",
            Policy::SyncReadChecks => "sync-read-checks",
            Policy::AsyncOldPrimary => "async-old-primary",
            Policy::BarrierWritesAsync => "barrier-writes-async",
            Policy::AsyncNewPrimary => "async-new-primary",
            Policy::LazyHashes => "lazy-hashes",
            Policy::MirrorOnly => "mirror-only",
        }
    }

    /// What a faulty candidate can do to the guest or the disk under this policy, in one line.
    pub fn exposure(self) -> &'static str {
        match self {
            Policy::SyncCrossChecks => {
                "none: every read and write is checked before the guest sees it; the guest always gets the trusted answer"
            }
            Policy::SyncReadChecks => {
                "none: every read is checked before the guest sees it; a bad candidate write is caught when read back"
            }
            Policy::AsyncOldPrimary => {
                "none: the guest is answered by the trusted version; candidate faults are found after the fact"
            }
            Policy::BarrierWritesAsync => {
                "to the application only: a bad read may reach the guest, but no write issued after it reaches the trusted version"
            }
            Policy::AsyncNewPrimary => {
                "on disk and to the application: bad reads reach the guest and data derived from them reaches the trusted version"
            }
            Policy::LazyHashes => {
                "none to the guest (it reads the trusted version); candidate faults are found late, by periodic region hashes"
            }
            Policy::MirrorOnly => {
                "none to the guest (it reads the trusted version); candidate data faults go unnoticed, only errors quarantine"
            }
        }
    }

    /// What the Tee does under this policy, in one line.
    pub fn describe(self) -> &'static str {
        match self {
            Policy::SyncCrossChecks => {
                "reads compared synchronously; writes mirrored synchronously and re-read from the candidate"
            }
            Policy::SyncReadChecks => "reads compared synchronously; writes mirrored synchronously",
            Policy::AsyncOldPrimary => {
                "trusted answers; candidate writes and read checks (by XXH3-128 hash) in the background stream"
            }
            Policy::BarrierWritesAsync => {
                "candidate answers reads of blocks it holds, verified in the background; writes wait for earlier reads' verification"
            }
            Policy::AsyncNewPrimary => {
                "candidate answers and takes writes synchronously; trusted gets writes and checks reads in the background stream"
            }
            Policy::LazyHashes => {
                "writes mirrored in the background; periodic XXH3-128 comparison of large regions of both versions"
            }
            Policy::MirrorOnly => "writes mirrored in the background; no validation",
        }
    }

    /// Whether the guest's reads and writes are answered by the candidate (for blocks it holds).
    pub(crate) fn candidate_answers_reads(self) -> bool {
        matches!(self, Policy::BarrierWritesAsync | Policy::AsyncNewPrimary)
    }

    /// Whether the candidate's writes are applied synchronously, under the request's stripes.
    pub(crate) fn candidate_writes_sync(self) -> bool {
        matches!(
            self,
            Policy::SyncCrossChecks
                | Policy::SyncReadChecks
                | Policy::BarrierWritesAsync
                | Policy::AsyncNewPrimary
        )
    }

    /// Whether guest reads of blocks the candidate holds are checked (now or in the background).
    pub(crate) fn checks_reads(self) -> bool {
        !matches!(self, Policy::LazyHashes | Policy::MirrorOnly)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not one of [`Policy::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tee policy {0:?} (expected one of sync-cross-checks, sync-read-checks, async-old-primary, barrier-writes-async, async-new-primary, lazy-hashes, mirror-only)")]
pub struct UnknownPolicy(pub String);

impl FromStr for Policy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Policy, UnknownPolicy> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownPolicy(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_fromstr_display_and_serde() {
        for p in Policy::ALL {
            assert_eq!(p.to_string().parse::<Policy>(), Ok(p));
            let json = serde_json::to_string(&p).expect("serialize");
            assert_eq!(json, format!("\"{}\"", p.name()));
            let back: Policy = serde_json::from_str(&json).expect("deserialize");
            assert_eq!(back, p);
            assert!(!p.exposure().is_empty() && !p.describe().is_empty());
        }
        assert!("sync".parse::<Policy>().is_err());
    }
}
