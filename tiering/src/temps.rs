//! Block temperatures and the placement decision: which class each guest block should be in,
//! from how often and how recently it was accessed.

use std::time::Instant;

use dovetail_annotations::Table;

use crate::policy::{Class, Kind, TierPolicy};

/// A set of block numbers (one bit each).
#[derive(Debug, Default, Clone)]
pub struct BlockSet {
    words: Vec<u64>,
}

impl BlockSet {
    pub fn get(&self, b: u64) -> bool {
        self.words
            .get((b / 64) as usize)
            .is_some_and(|w| w & (1 << (b % 64)) != 0)
    }

    pub fn set(&mut self, b: u64) {
        let i = (b / 64) as usize;
        if self.words.len() <= i {
            self.words.resize(i + 1, 0);
        }
        self.words[i] |= 1 << (b % 64);
    }
}

/// What the mover knows about each guest block's temperature (memory only: after a restart
/// every block starts lukewarm, neither hot nor cold), and where it is in its round.
#[derive(Debug, Default)]
pub struct Temps {
    /// `reads + writes` at the last observation.
    heat: Vec<u64>,
    /// Seconds since `start` of the last observed access.
    touched: Vec<u32>,
    /// Accessed at least `hot_accesses` times between the last two observations.
    hot: BlockSet,
    /// Found not to compress into one block.
    pub incompressible: BlockSet,
    start: Option<Instant>,
    /// Where the next pass resumes (a guest block).
    pub cursor: u64,
    /// Whether the tree's nodes were checked against the metadata policy this round.
    pub nodes_checked: bool,
}

fn secs_since(start: Instant) -> u32 {
    start.elapsed().as_secs().min(u64::from(u32::MAX)) as u32
}

impl Temps {
    /// Records the heat of every guest block of `table`; marks hot those accessed at least
    /// `hot_accesses` times since the last observation.
    pub fn observe(&mut self, table: &Table, hot_accesses: u16) {
        let t = self;
        let start = *t.start.get_or_insert_with(Instant::now);
        let now = secs_since(start);
        let blocks = table.blocks() as usize;
        if t.heat.len() != blocks {
            t.heat = (0..blocks as u64).map(|b| table.get(b).heat()).collect();
            t.touched = vec![now; blocks];
            t.hot = BlockSet::default();
            return;
        }
        let mut hot = BlockSet::default();
        for b in 0..blocks {
            let h = table.get(b as u64).heat();
            let last = t.heat[b];
            if h != last {
                t.touched[b] = now;
                if h.saturating_sub(last) >= u64::from(hot_accesses) {
                    hot.set(b as u64);
                }
                t.heat[b] = h;
            }
        }
        t.hot = hot;
    }

    /// The class guest block `b`, now in `current`, should be in (`None`: no opinion, keep
    /// it where it is).
    pub fn wanted(&self, policy: &TierPolicy, b: u64, current: Class) -> Option<Class> {
        let t = self;
        let start = t.start?;
        let i = b as usize;
        if i >= t.touched.len() {
            return None;
        }
        if t.hot.get(b) {
            return Some(Class::Hot);
        }
        let idle = secs_since(start).saturating_sub(t.touched[i]);
        if idle >= policy.cold_after_secs {
            return Some(Class::Cold);
        }
        (current == Class::Meta).then_some(Class::Hot)
    }

    /// The placement decision for tree block `b`, now kept as `current` in a group that
    /// follows its class's policy or not (`compliant`): `Some(kind)` to move it there, `None`
    /// to leave it. `metadata`: the block is not guest data (an annotation or checksum page),
    /// so it belongs to the metadata class whatever its temperature.
    pub fn decide(
        &self,
        policy: &TierPolicy,
        b: u64,
        metadata: bool,
        current: Kind,
        compliant: bool,
    ) -> Option<Kind> {
        let want_class = if metadata {
            Class::Meta
        } else {
            self.wanted(policy, b, current.class)
                .unwrap_or(current.class)
        };
        let compress = want_class == Class::Cold
            && policy.class(Class::Cold).compress
            && !self.incompressible.get(b);
        let want = Kind {
            class: want_class,
            compressed: compress,
        };
        let recompress = want_class == Class::Cold && compress && !current.compressed;
        if want_class == current.class && compliant && !recompress {
            return None;
        }
        Some(want)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sets_grow_as_needed() {
        let mut s = BlockSet::default();
        assert!(!s.get(1000));
        s.set(1000);
        s.set(3);
        assert!(s.get(1000) && s.get(3) && !s.get(4) && !s.get(999));
    }

    #[test]
    fn before_any_observation_nothing_moves_but_to_follow_the_policy() {
        let t = Temps::default();
        let p = TierPolicy::defaults(2);
        assert_eq!(t.wanted(&p, 0, Class::Hot), None);
        assert_eq!(t.decide(&p, 0, false, Kind::HOT, true), None);
        // A block in a group that no longer follows its class's policy moves, to its class.
        assert_eq!(t.decide(&p, 0, false, Kind::HOT, false), Some(Kind::HOT));
        // A metadata page kept as data goes to the metadata class.
        assert_eq!(t.decide(&p, 7, true, Kind::HOT, true), Some(Kind::META));
    }
}
