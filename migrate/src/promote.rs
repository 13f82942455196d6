//! Promote's decision steps, apart from the I/O that carries them out (the daemon's
//! `LiveDisk::promote`, the offline `dovetail promote`): whether a candidate may become its
//! disk's trusted version. The callers word the refusal for their user.

/// Why a candidate cannot be promoted yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// The candidate holds `present` of its `total` blocks: a migration brings the rest first.
    Incomplete { present: u64, total: u64 },
    /// Fault rules are injected into the candidate (testing): it never becomes trusted.
    FaultInjected,
    /// The trusted version has these snapshots, which would retire with it.
    Snapshots(Vec<String>),
}

/// Checks the candidate itself: it holds every block and has no fault rules.
pub fn check_candidate(present: u64, total: u64, faulty: bool) -> Result<(), NotReady> {
    if present < total {
        return Err(NotReady::Incomplete { present, total });
    }
    if faulty {
        return Err(NotReady::FaultInjected);
    }
    Ok(())
}

/// Checks the trusted version: no snapshot of it may retire with it (`names`: its snapshots).
pub fn check_snapshots(names: Vec<String>) -> Result<(), NotReady> {
    if names.is_empty() {
        Ok(())
    } else {
        Err(NotReady::Snapshots(names))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_candidate_is_ready_only_complete_and_without_faults() {
        assert_eq!(check_candidate(8, 8, false), Ok(()));
        assert_eq!(
            check_candidate(7, 8, false),
            Err(NotReady::Incomplete {
                present: 7,
                total: 8
            })
        );
        // Missing blocks are said first: a migration is the next step either way.
        assert_eq!(
            check_candidate(7, 8, true),
            Err(NotReady::Incomplete {
                present: 7,
                total: 8
            })
        );
        assert_eq!(check_candidate(8, 8, true), Err(NotReady::FaultInjected));
        assert_eq!(check_snapshots(Vec::new()), Ok(()));
        assert_eq!(
            check_snapshots(vec!["s1".into()]),
            Err(NotReady::Snapshots(vec!["s1".into()]))
        );
    }
}
