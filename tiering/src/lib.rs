//! Tiering: block classes with their own replication and placement, and the background mover.
//!
//! Empty so far; see ARCHITECTURE.md for where it sits.
