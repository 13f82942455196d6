//! Per-block metadata kept by the `parallax-v2` layout: read/write counts, last access, access
//! pattern and taint labels, with queries over them.
//!
//! Empty so far; see ARCHITECTURE.md for where it sits.
