//! A rough look at the request path's overhead (ignored by default; run with
//! `cargo test --release -p dovetail-migrate --test tee_overhead -- --ignored --nocapture`).
//! The real benchmarks are in bench/.

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::*;
use dovetail_layout::{BlockLayout, MemLayout, Sectors};
use dovetail_migrate::{Policy, TeeOptions};

const CAP: Sectors = Sectors(64 << 11); // 64 MiB

fn run(d: &dyn BlockLayout) -> f64 {
    let data = pattern(1, 64 << 10);
    let mut buf = vec![0u8; 64 << 10];
    let start = Instant::now();
    for round in 0..4 {
        for i in 0..1024u64 {
            write_scattered(d, i * 128, &data).expect("write");
        }
        d.flush().expect("flush");
        for i in 0..1024u64 {
            buf = read_scattered(d, ((i * 7 + round) % 1024) * 128, buf.len()).expect("read");
        }
    }
    d.flush().expect("flush");
    start.elapsed().as_secs_f64()
}

#[test]
#[ignore]
fn overhead_against_a_single_version() {
    let base = run(&MemLayout::new(CAP));
    for policy in Policy::ALL {
        let tee = tee_over(
            Arc::new(MemLayout::new(CAP)),
            Arc::new(MemLayout::new(CAP)),
            TeeOptions::new("bench", policy),
        );
        let t = run(&tee);
        assert!(!tee.quarantined());
        println!("{policy:>22}: {:.2}x ({t:.3}s vs {base:.3}s)", t / base);
        tee.close().expect("close");
    }
}
