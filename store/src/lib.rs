//! The shared block store: a file per tier cut into fixed-size extents, each extent granted to
//! one version key, with the grant checked on every write.
//!
//! Empty so far: the `raw` layout keeps its own image file. The store arrives with the
//! `parallax-v1` layout; see ARCHITECTURE.md for where it sits.
