//! Block classes and their policies: how many copies of a block are kept, on which tier,
//! compressed or not, and when the mover calls a block hot or cold. A policy is validated here
//! only ([`TierPolicy::validate`]), wherever it comes from (a root record, the command line,
//! the control socket).

/// Most copies a block class may keep.
pub const MAX_COPIES: u8 = 3;

/// A parallax-v2 block class: what a block holds, which decides how many copies it has, on
/// which tier, and whether it is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// Tree nodes and annotation pages.
    Meta = 0,
    /// Guest data written or read recently.
    Hot = 1,
    /// Guest data not touched for a while (see [`TierPolicy::cold_after_secs`]).
    Cold = 2,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Meta, Class::Hot, Class::Cold];

    pub fn name(self) -> &'static str {
        match self {
            Class::Meta => "metadata",
            Class::Hot => "hot",
            Class::Cold => "cold",
        }
    }

    /// The class named `name` (`metadata`/`meta`, `hot`, `cold`).
    pub fn parse(name: &str) -> Option<Class> {
        match name {
            "metadata" | "meta" => Some(Class::Meta),
            "hot" => Some(Class::Hot),
            "cold" => Some(Class::Cold),
            _ => None,
        }
    }

    /// The class numbered `b` (`Class as u8`), as records store it.
    pub fn from_bits(b: u8) -> Option<Class> {
        Class::ALL.get(usize::from(b)).copied()
    }
}

/// How one block class is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassPolicy {
    /// Copies of each block, 1 to [`MAX_COPIES`], on distinct extents (on distinct tiers
    /// where the store has enough).
    pub copies: u8,
    /// The tier (index in the store's tier list) holding the first copy.
    pub tier: u8,
    /// Whether blocks are stored zstd-compressed (cold data only).
    pub compress: bool,
}

/// A parallax-v2 disk's tiering policy: one [`ClassPolicy`] per [`Class`] and the mover's
/// thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierPolicy {
    /// Indexed by `Class as usize`.
    pub classes: [ClassPolicy; 3],
    /// A data block neither read nor written for this long is cold: the mover demotes it.
    pub cold_after_secs: u32,
    /// A block read or written at least this often between two passes of the mover is hot:
    /// the mover promotes it.
    pub hot_accesses: u16,
    /// The mover's budget, in MiB of blocks moved per second.
    pub move_mib_s: u16,
}

impl TierPolicy {
    /// The defaults for a store of `tiers` tiers: metadata x2 and hot data x1 on the first
    /// tier, cold data x1 compressed on the last; cold after an hour, hot at 2 accesses,
    /// 32 MiB/s.
    pub fn defaults(tiers: usize) -> TierPolicy {
        let last = tiers.saturating_sub(1).min(255) as u8;
        TierPolicy {
            classes: [
                ClassPolicy {
                    copies: 2,
                    tier: 0,
                    compress: false,
                },
                ClassPolicy {
                    copies: 1,
                    tier: 0,
                    compress: false,
                },
                ClassPolicy {
                    copies: 1,
                    tier: last,
                    compress: true,
                },
            ],
            cold_after_secs: 3600,
            hot_accesses: 2,
            move_mib_s: 32,
        }
    }

    pub fn class(&self, c: Class) -> &ClassPolicy {
        &self.classes[c as usize]
    }

    /// Checks the policy against a store of `tiers` tiers.
    pub fn validate(&self, tiers: usize) -> std::result::Result<(), String> {
        for c in Class::ALL {
            let p = self.class(c);
            if !(1..=MAX_COPIES).contains(&p.copies) {
                return Err(format!(
                    "{} data: {} copies, 1 to {MAX_COPIES} are allowed",
                    c.name(),
                    p.copies
                ));
            }
            if usize::from(p.tier) >= tiers {
                return Err(format!(
                    "{}: tier {} does not exist (the store has {tiers})",
                    c.name(),
                    p.tier
                ));
            }
            if p.compress && c != Class::Cold {
                return Err(format!("{}: only cold data can be compressed", c.name()));
            }
        }
        if self.cold_after_secs == 0 {
            return Err("cold-after must be at least 1 second".to_string());
        }
        if self.hot_accesses == 0 {
            return Err("hot-accesses must be at least 1".to_string());
        }
        if self.move_mib_s == 0 {
            return Err("the mover's rate must be at least 1 MiB/s".to_string());
        }
        Ok(())
    }
}

/// Which blocks go together: a class, and whether its blocks are compressed (the kinds of
/// block a layout allocates from separate groups of extents).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    pub class: Class,
    pub compressed: bool,
}

impl Kind {
    pub const META: Kind = Kind {
        class: Class::Meta,
        compressed: false,
    };
    pub const HOT: Kind = Kind {
        class: Class::Hot,
        compressed: false,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiering_policies_are_validated() {
        let mut p = TierPolicy::defaults(2);
        assert_eq!(p.validate(2), Ok(()));
        assert!(p.validate(1).is_err(), "the cold tier is tier 1");
        p.classes[0].copies = 4;
        assert!(p.validate(2).is_err());
        p.classes[0].copies = 3;
        p.classes[1].compress = true;
        assert_eq!(
            p.validate(2),
            Err("hot: only cold data can be compressed".to_string())
        );
        p.classes[1].compress = false;
        p.cold_after_secs = 0;
        assert_eq!(
            p.validate(2),
            Err("cold-after must be at least 1 second".to_string())
        );
    }

    #[test]
    fn classes_parse_by_name_and_number() {
        for c in Class::ALL {
            assert_eq!(Class::parse(c.name()), Some(c));
            assert_eq!(Class::from_bits(c as u8), Some(c));
        }
        assert_eq!(Class::parse("meta"), Some(Class::Meta));
        assert_eq!(Class::parse("warm"), None);
        assert_eq!(Class::from_bits(3), None);
    }
}
