//! Migration between layout versions: the Tee (a `BlockLayout` over a trusted and a candidate
//! version) with its validation policies, upgrade-on-write, copy-out, promote/retire and
//! deployment.
//!
//! Empty so far; see ARCHITECTURE.md for where it sits.
