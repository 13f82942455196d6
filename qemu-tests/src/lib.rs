//! VM boot test harness.
