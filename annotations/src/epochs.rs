//! Coarse time for the `last_read` / `last_write` fields.

use std::time::{SystemTime, UNIX_EPOCH};

/// Coarse time: epoch `n ≥ 1` covers the unix seconds `[base + (n-1)·secs, base + n·secs)`;
/// epoch 0 means "never". Epochs saturate at `u16::MAX` (with `secs = 3600` that is 7.5 years
/// after `base`). Times before `base` count as epoch 1, and `secs = 0` is treated as 1.
///
/// The layout chooses `base` and `secs` (typically when the disk version is created) and keeps
/// them in its own metadata; they are not part of an annotation page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Epochs {
    /// Unix seconds at which epoch 1 starts.
    pub base: u64,
    /// Length of an epoch in seconds.
    pub secs: u32,
}

impl Epochs {
    /// Epochs of `secs` seconds starting now.
    pub fn starting_now(secs: u32) -> Epochs {
        Epochs {
            base: unix_now(),
            secs,
        }
    }

    /// The epoch of the current wall-clock time.
    pub fn now(&self) -> u16 {
        self.at(unix_now())
    }

    /// The epoch containing `unix_secs` (never 0).
    pub fn at(&self, unix_secs: u64) -> u16 {
        let secs = u64::from(self.secs.max(1));
        let n = unix_secs.saturating_sub(self.base) / secs + 1;
        u16::try_from(n).unwrap_or(u16::MAX)
    }

    /// The first unix second of `epoch`, or `None` for epoch 0 ("never").
    pub fn start_of(&self, epoch: u16) -> Option<u64> {
        if epoch == 0 {
            return None;
        }
        let secs = u64::from(self.secs.max(1));
        Some(self.base.saturating_add((u64::from(epoch) - 1) * secs))
    }
}

/// Wall-clock unix seconds (0 if the clock is before 1970).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_arithmetic() {
        let e = Epochs {
            base: 1000,
            secs: 60,
        };
        assert_eq!(e.at(0), 1);
        assert_eq!(e.at(1000), 1);
        assert_eq!(e.at(1059), 1);
        assert_eq!(e.at(1060), 2);
        assert_eq!(e.at(u64::MAX), u16::MAX);
        assert_eq!(e.start_of(0), None);
        assert_eq!(e.start_of(1), Some(1000));
        assert_eq!(e.start_of(3), Some(1120));
        for t in [1000u64, 1234, 99_999] {
            let n = e.at(t);
            let s = e.start_of(n).unwrap_or(0);
            assert!(s <= t && t < s + 60);
        }
        let z = Epochs { base: 5, secs: 0 };
        assert_eq!(z.at(7), 3);
        let now = Epochs::starting_now(3600);
        assert_eq!(now.now(), 1);
    }
}
