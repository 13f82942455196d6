//! The grammar every fault rule shares: `KIND[:key=value{,key=value}]`, with spaces around
//! the kind, keys and values ignored, each key one of the rule family's own and given at most
//! once, and the conditions all families count the same way (`after`, `nth`, `prob`). The
//! guest-request faults (`dovetail_layout::fault`) and the store-file faults
//! ([`crate::faultfile`]) parse their rules through it, so both say the same thing about the
//! same mistake.

/// A rule split into its kind and its parameters, each key one of the caller's, once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec<'a> {
    /// The kind, as written (trimmed); the caller looks it up.
    pub kind: &'a str,
    /// The `key=value` parameters in the order written, the values trimmed and not empty.
    pub params: Vec<(&'static str, &'a str)>,
}

/// What is wrong with a rule, whatever its family.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyntaxProblem {
    #[error("the rule is empty (expected KIND[:key=value,...])")]
    Empty,
    #[error("nothing follows ':' (expected key=value[,key=value...])")]
    NoParams,
    #[error("empty parameter (two commas in a row, or a trailing comma)")]
    EmptyParam,
    #[error("parameter {0:?} is not of the form key=value")]
    NotKeyValue(String),
    #[error("unknown parameter {key:?} (expected one of {})", .known.join(", "))]
    UnknownKey {
        key: String,
        known: &'static [&'static str],
    },
    #[error("parameter {0:?} is given twice")]
    DuplicateKey(&'static str),
    #[error("parameter {0:?} has no value")]
    MissingValue(&'static str),
    #[error("{value:?} is not a valid {key}: expected {expected}")]
    BadValue {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("prob={0} is out of range: a probability is between 0 and 1")]
    ProbOutOfRange(String),
    #[error("nth=0: operations are counted from 1")]
    NthZero,
    #[error("nth={nth} with after={after} can never hit: after must be below nth")]
    NeverHits { nth: u64, after: u64 },
}

/// Splits rule `s` into its kind and parameters, checking every key against `keys`.
pub fn split<'a>(s: &'a str, keys: &'static [&'static str]) -> Result<Spec<'a>, SyntaxProblem> {
    let spec = s.trim();
    if spec.is_empty() {
        return Err(SyntaxProblem::Empty);
    }
    let (kind, params) = match spec.split_once(':') {
        Some((k, p)) => (k.trim(), Some(p)),
        None => (spec, None),
    };
    let mut out = Spec {
        kind,
        params: Vec::new(),
    };
    let Some(params) = params else {
        return Ok(out);
    };
    if params.trim().is_empty() {
        return Err(SyntaxProblem::NoParams);
    }
    for part in params.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(SyntaxProblem::EmptyParam);
        }
        let (key, value) = part
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .ok_or_else(|| SyntaxProblem::NotKeyValue(part.to_string()))?;
        let Some(&key) = keys.iter().find(|&&k| k == key) else {
            return Err(SyntaxProblem::UnknownKey {
                key: key.to_string(),
                known: keys,
            });
        };
        if out.params.iter().any(|&(k, _)| k == key) {
            return Err(SyntaxProblem::DuplicateKey(key));
        }
        if value.is_empty() {
            return Err(SyntaxProblem::MissingValue(key));
        }
        out.params.push((key, value));
    }
    Ok(out)
}

/// `value` of `key` as a whole number; `expected` words what it should be.
pub fn number(
    key: &'static str,
    value: &str,
    expected: &'static str,
) -> Result<u64, SyntaxProblem> {
    value.parse::<u64>().map_err(|_| SyntaxProblem::BadValue {
        key,
        value: value.to_string(),
        expected,
    })
}

/// `nth=`: a count of 1 or more.
pub fn nth(key: &'static str, value: &str) -> Result<u64, SyntaxProblem> {
    match number(key, value, "a count of 1 or more")? {
        0 => Err(SyntaxProblem::NthZero),
        n => Ok(n),
    }
}

/// `prob=`: a probability between 0 and 1 (NaN and the infinities refused), with one
/// spelling of zero (`-0` reads as `0`).
pub fn probability(key: &'static str, value: &str) -> Result<f64, SyntaxProblem> {
    let p = value.parse::<f64>().map_err(|_| SyntaxProblem::BadValue {
        key,
        value: value.to_string(),
        expected: "a probability between 0 and 1",
    })?;
    if !(0.0..=1.0).contains(&p) {
        return Err(SyntaxProblem::ProbOutOfRange(value.to_string()));
    }
    Ok(if p == 0.0 { 0.0 } else { p })
}

/// What is wrong with a rule's counting conditions, parsed or built by hand: a probability out
/// of range, `nth=0`, or an `after` that leaves `nth` nothing to hit.
pub fn check_counts(prob: f64, nth: Option<u64>, after: u64) -> Option<SyntaxProblem> {
    if !(0.0..=1.0).contains(&prob) {
        return Some(SyntaxProblem::ProbOutOfRange(prob.to_string()));
    }
    match nth {
        Some(0) => Some(SyntaxProblem::NthZero),
        Some(nth) if after >= nth => Some(SyntaxProblem::NeverHits { nth, after }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &[&str] = &["op", "nth"];

    #[test]
    fn a_rule_splits_into_its_kind_and_parameters() {
        let s = split(" eio : nth = 2 , op=read ", KEYS).expect("a valid rule");
        assert_eq!(s.kind, "eio");
        assert_eq!(s.params, vec![("nth", "2"), ("op", "read")]);
        assert_eq!(split("eio", KEYS).map(|s| s.params), Ok(vec![]));
    }

    #[test]
    fn every_mistake_is_named() {
        let p = |s| split(s, KEYS).expect_err("a bad rule");
        assert_eq!(p("  "), SyntaxProblem::Empty);
        assert_eq!(p("eio: "), SyntaxProblem::NoParams);
        assert_eq!(p("eio:nth=1,,op=read"), SyntaxProblem::EmptyParam);
        assert_eq!(p("eio:nth"), SyntaxProblem::NotKeyValue("nth".into()));
        assert_eq!(p("eio:nth=1,nth=2"), SyntaxProblem::DuplicateKey("nth"));
        assert_eq!(p("eio:op="), SyntaxProblem::MissingValue("op"));
        let unknown = p("eio:size=1");
        assert_eq!(
            unknown.to_string(),
            "unknown parameter \"size\" (expected one of op, nth)"
        );
        assert_eq!(nth("nth", "0"), Err(SyntaxProblem::NthZero));
        assert!(matches!(
            number("nth", "x", "a count"),
            Err(SyntaxProblem::BadValue { .. })
        ));
        assert_eq!(probability("prob", "-0"), Ok(0.0));
        assert_eq!(
            probability("prob", "nan"),
            Err(SyntaxProblem::ProbOutOfRange("nan".into()))
        );
        assert_eq!(
            check_counts(1.0, Some(3), 3),
            Some(SyntaxProblem::NeverHits { nth: 3, after: 3 })
        );
        assert_eq!(check_counts(0.5, Some(3), 2), None);
    }
}
