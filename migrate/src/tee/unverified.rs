//! The blocks an unclean stop left unverified, until the resync has compared them (module docs
//! of [`super`], *Unclean stop and resync*).

use super::*;

/// Blocks the resync has not compared yet (bit set = unverified). The bitmap is allocated on
/// the first block marked, so a Tee started cleanly pays nothing for it.
#[derive(Debug)]
pub(crate) struct Unverified {
    blocks: u64,
    words: std::sync::OnceLock<Box<[AtomicU64]>>,
    count: AtomicU64,
}

impl Unverified {
    pub(super) fn new(blocks: u64) -> Unverified {
        Unverified {
            blocks,
            words: std::sync::OnceLock::new(),
            count: AtomicU64::new(0),
        }
    }

    pub fn any(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }

    fn word(&self, b: u64) -> Option<&AtomicU64> {
        self.words.get()?.get((b / 64) as usize)
    }

    pub fn get(&self, b: u64) -> bool {
        self.any()
            && self
                .word(b)
                .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (b % 64)) != 0)
    }

    pub(super) fn set(&self, b: u64) {
        let words = self.words.get_or_init(|| {
            (0..self.blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect()
        });
        if let Some(w) = words.get((b / 64) as usize) {
            if w.fetch_or(1 << (b % 64), Ordering::AcqRel) & (1 << (b % 64)) == 0 {
                self.count.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    pub fn clear(&self, first: u64, last: u64) {
        if !self.any() {
            return;
        }
        for b in first..=last {
            if let Some(w) = self.word(b) {
                if w.fetch_and(!(1 << (b % 64)), Ordering::AcqRel) & (1 << (b % 64)) != 0 {
                    self.count.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }
}
