//! The one rule for every name an operator gives: disks, layouts, tiers, snapshots and taint
//! labels. A name is 1 to [`NameKind::max_len`] characters from `A-Z a-z 0-9 . _ -` and starts
//! with a letter or digit (tier names: lowercase letters and no `.`, as store format 3 records
//! them).
//! So a name is never empty, never `.` or `..`, never holds a `/`, a space or a control
//! character, and is safe in a file name, a log line, a metric label and a shell command.
//!
//! Names read back from disk are checked by each format's own reader, which also accepts what
//! earlier versions allowed (e.g. snapshot names of up to 255 bytes of UTF-8), so stores written
//! before keep opening.
//!
//! Messages about a bad name quote at most [`SHOWN_CHARS`] characters of it ([`shown`]).

use std::fmt;

/// The longest disk name, in bytes (the catalog's fixed field).
pub const MAX_DISK_NAME: usize = 64;
/// The longest layout name, in bytes (the catalog's fixed field).
pub const MAX_LAYOUT_NAME: usize = 32;
/// The longest tier name, in bytes (the store header's fixed field).
pub const MAX_TIER_NAME: usize = 16;

/// What a name names; sets its longest length and what the messages call it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Disk,
    Layout,
    Tier,
    Snapshot,
    Label,
}

impl NameKind {
    /// The longest name of this kind, in bytes (= characters).
    pub const fn max_len(self) -> usize {
        match self {
            NameKind::Disk => MAX_DISK_NAME,
            NameKind::Layout => MAX_LAYOUT_NAME,
            NameKind::Tier => MAX_TIER_NAME,
            NameKind::Snapshot => MAX_SNAPSHOT_NAME,
            NameKind::Label => MAX_LABEL_NAME,
        }
    }

    /// What a message calls a name of this kind.
    pub const fn what(self) -> &'static str {
        match self {
            NameKind::Disk => "disk name",
            NameKind::Layout => "layout name",
            NameKind::Tier => "tier name",
            NameKind::Snapshot => "snapshot name",
            NameKind::Label => "taint label",
        }
    }

    /// The characters a name of this kind may hold, as messages list them.
    fn charset(self) -> &'static str {
        match self {
            NameKind::Tier => "a-z 0-9 _ -",
            _ => "A-Z a-z 0-9 . _ -",
        }
    }

    fn letter_ok(self, c: char) -> bool {
        match self {
            NameKind::Tier => c.is_ascii_lowercase(),
            _ => c.is_ascii_alphabetic(),
        }
    }

    fn char_ok(self, c: char) -> bool {
        self.letter_ok(c)
            || c.is_ascii_digit()
            || matches!(c, '_' | '-')
            || (c == '.' && self != NameKind::Tier)
    }
}

/// The longest snapshot name given since the one rule (snapshots read back may be longer).
pub const MAX_SNAPSHOT_NAME: usize = 64;
/// The longest taint label name.
pub const MAX_LABEL_NAME: usize = 64;
/// How many characters of a bad name a message quotes.
pub const SHOWN_CHARS: usize = 40;

/// A name that breaks the rule, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameError {
    pub kind: NameKind,
    /// The name as messages show it ([`shown`]).
    pub shown: String,
    pub why: String,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} is invalid: {}; use 1 to {} characters from {}, starting with a letter or \
             digit",
            self.kind.what(),
            self.shown,
            self.why,
            self.kind.max_len(),
            self.kind.charset()
        )
    }
}

impl std::error::Error for NameError {}

/// `name` quoted for a message: whole when short, else its first [`SHOWN_CHARS`] characters,
/// `…` and its length, so a huge name never floods a reply or a log.
pub fn shown(name: &str) -> String {
    match name.char_indices().nth(SHOWN_CHARS) {
        None => format!("{name:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &name[..cut], name.len()),
    }
}

/// Checks a new name of `kind` against the rule.
pub fn check_name(kind: NameKind, name: &str) -> Result<(), NameError> {
    let err = |why: String| {
        Err(NameError {
            kind,
            shown: shown(name),
            why,
        })
    };
    let Some(first) = name.chars().next() else {
        return err("it is empty".into());
    };
    if name.len() > kind.max_len() {
        return err(format!(
            "it is {} bytes, longer than {}",
            name.len(),
            kind.max_len()
        ));
    }
    if let Some(c) = name.chars().find(|&c| !kind.char_ok(c)) {
        return err(format!("{c:?} is not allowed"));
    }
    if !(kind.letter_ok(first) || first.is_ascii_digit()) {
        return err(format!("it starts with {first:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [NameKind; 5] = [
        NameKind::Disk,
        NameKind::Layout,
        NameKind::Tier,
        NameKind::Snapshot,
        NameKind::Label,
    ];

    #[test]
    fn one_rule_for_every_kind() {
        for kind in ALL {
            for good in ["a", "0", "vm-1_root", "2026-12-06", "x--y"] {
                assert_eq!(check_name(kind, good), Ok(()), "{kind:?} {good:?}");
            }
            let longest = "x".repeat(kind.max_len());
            assert_eq!(check_name(kind, &longest), Ok(()), "{kind:?}");
            for bad in [
                "", ".", "..", "../x", "a/b", "/a", "a b", " a", "a\n", "-x", "_x", ".x", "a\0",
                "é", "a:b", "a=b", "a*", "a\\b",
            ] {
                let e = check_name(kind, bad).expect_err(bad);
                assert_eq!(e.kind, kind);
            }
            assert!(
                check_name(kind, &format!("{longest}x")).is_err(),
                "{kind:?}"
            );
        }
        // Tiers keep to lowercase and no dots, as the store header records them.
        assert!(check_name(NameKind::Tier, "Fast").is_err());
        assert!(check_name(NameKind::Tier, "a.b").is_err());
        assert_eq!(check_name(NameKind::Disk, "Fast"), Ok(()));
        assert_eq!(check_name(NameKind::Snapshot, "v1.2..3"), Ok(()));
    }

    #[test]
    fn messages_say_why_and_quote_a_short_prefix() {
        let e = check_name(NameKind::Snapshot, "../x").expect_err("slash");
        assert_eq!(
            e.to_string(),
            "snapshot name \"../x\" is invalid: '/' is not allowed; use 1 to 64 characters \
             from A-Z a-z 0-9 . _ -, starting with a letter or digit"
        );
        let e = check_name(NameKind::Snapshot, "..").expect_err("dots");
        assert!(e.to_string().contains("it starts with '.'"), "{e}");
        let e = check_name(NameKind::Label, "").expect_err("empty");
        assert!(
            e.to_string()
                .contains("taint label \"\" is invalid: it is empty"),
            "{e}"
        );
        let long = "a".repeat(5000);
        let e = check_name(NameKind::Snapshot, &long).expect_err("long");
        let m = e.to_string();
        assert!(m.len() < 250, "{m}");
        assert!(
            m.contains(&format!("\"{}\"… (5000 bytes)", "a".repeat(SHOWN_CHARS))),
            "{m}"
        );
        assert!(m.contains("it is 5000 bytes, longer than 64"), "{m}");
        let e = check_name(NameKind::Tier, "Fast").expect_err("upper");
        assert!(e.to_string().contains("from a-z 0-9 _ -,"), "{e}");
        // Multi-byte characters are cut on a character boundary.
        assert_eq!(
            shown(&"é".repeat(100)),
            format!("{:?}… (200 bytes)", "é".repeat(40))
        );
    }
}
