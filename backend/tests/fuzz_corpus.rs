//! The fuzz targets' smoke run, on stable (CI): every committed seed (`fuzz/seeds/<target>/`)
//! and every minimized crash kept as a regression (`fuzz/regressions/<target>/`) goes through
//! the target's entry point in `dovetail_backend::fuzzing`, which is what the cargo-fuzz
//! binaries call. Each target must have a non-empty seed directory and a `fuzz_targets/` file.
//! A counting allocator also checks that no single allocation of an input's run is out of
//! proportion to the input (what libFuzzer's `-malloc_limit_mb` checks): a length field must not
//! size an allocation by itself.
//!
//! The seeds are generated from real structures (a store with disks, versions and tee records,
//! parallax-v1/v2 versions with snapshots, labels and extent groups, annotation pages, presence
//! maps, virtio requests, control lines) by the ignored test `generate_seeds`:
//!
//! ```text
//! cargo test -p dovetail-backend --test fuzz_corpus -- --ignored generate_seeds
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeSet;
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dovetail_backend::fuzzing::TARGETS;

/// The system allocator, noting the largest single allocation this thread made.
struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: allocations made while the thread-local is torn down are not noted.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so `System`'s
// guarantees are ours; `note` neither allocates nor unwinds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's promises on `layout` are passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` and `layout` come from this allocator, which is `System`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` and `layout` come from this allocator, which is `System`'s.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The largest single allocation one run of `target` on `len` bytes may make: 1 MiB plus 16
/// bytes per input byte, or what the target needs by design (virtio_request: a guest's
/// indirect table of 65535 descriptors; parallax_open: the annotation table of the largest
/// tree it opens, 16 bytes per block of 2^21 sectors).
fn allocation_budget(target: &str, len: usize) -> usize {
    let base = match target {
        "virtio_request" => 4 << 20,
        "parallax_open" => 8 << 20,
        _ => 1 << 20,
    };
    base + 16 * len
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir`, sorted; none if it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// The names of the subdirectories of `dir`.
fn subdirs(dir: &Path) -> BTreeSet<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return BTreeSet::new();
    };
    entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_dir())
        .map(|p| {
            p.file_name()
                .expect("a named directory")
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

#[test]
fn replay_seeds_and_regressions() {
    let fuzz = fuzz_dir();
    let names: BTreeSet<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    // Every target is a cargo-fuzz binary, and every binary a target.
    let bins: BTreeSet<String> = files(&fuzz.join("fuzz_targets"))
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .map(|p| {
            p.file_stem()
                .expect("a file name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(bins, names, "fuzz/fuzz_targets/*.rs and fuzzing::TARGETS");
    // Seeds and regressions are only kept for targets that exist.
    for dir in ["seeds", "regressions"] {
        let stray: Vec<String> = subdirs(&fuzz.join(dir))
            .difference(&names)
            .cloned()
            .collect();
        assert!(stray.is_empty(), "fuzz/{dir}/ has no target for {stray:?}");
    }

    let mut failures = Vec::new();
    let (mut total_seeds, mut total_regressions) = (0, 0);
    for (name, target) in TARGETS {
        let seeds = files(&fuzz.join("seeds").join(name));
        assert!(
            !seeds.is_empty(),
            "fuzz/seeds/{name}/ is missing or empty (run generate_seeds)"
        );
        let regressions = files(&fuzz.join("regressions").join(name));
        let mut bytes = 0;
        for path in seeds.iter().chain(&regressions) {
            let data = fs::read(path).expect("read a seed");
            bytes += data.len();
            LARGEST.with(|l| l.set(0));
            if catch_unwind(AssertUnwindSafe(|| target(&data))).is_err() {
                failures.push(path.display().to_string());
            }
            let largest = LARGEST.with(Cell::get);
            if largest > allocation_budget(name, data.len()) {
                failures.push(format!(
                    "{}: an allocation of {largest} bytes for {} input bytes",
                    path.display(),
                    data.len()
                ));
            }
        }
        println!(
            "{name}: {} seeds, {} regressions, {bytes} bytes",
            seeds.len(),
            regressions.len()
        );
        total_seeds += seeds.len();
        total_regressions += regressions.len();
    }
    println!(
        "{} targets: {total_seeds} seeds, {total_regressions} regressions",
        TARGETS.len()
    );
    assert!(failures.is_empty(), "inputs that fail: {failures:#?}");
}

// ---------------------------------------------------------------------------------------------
// The seed generator
// ---------------------------------------------------------------------------------------------

mod gen {
    use super::*;

    use dovetail_annotations::{Annotation, Epochs, Table, PAGE_BYTES};
    use dovetail_backend::daemon::control::{self, AnnotatedView, AnnotationQuery};
    use dovetail_backend::daemon::live::{MoverStatus, TiersReport};
    use dovetail_layout::parallax::format::{encode_compressed, RootRecord, NODE_MAGIC};
    use dovetail_layout::parallax::Label;
    use dovetail_layout::{BlockLayout, Parallax, ParallaxOptions, Sector, Sectors};
    use dovetail_migrate::presence::PresenceMap;
    use dovetail_store::format::{encode_slot, Header, Meta, HEADER_SIZE, SLOT_HEADER};
    use dovetail_store::mem::{MemPool, MemSpace};
    use dovetail_store::{ExtentId, Store, TeeRec, TeeState, VersionKey, VersionSpace};
    use serde_json::{json, Value};

    /// Writes the seeds of one target (replacing files of the same names).
    struct Seeds {
        dir: PathBuf,
        count: usize,
    }

    impl Seeds {
        fn new(target: &str) -> Seeds {
            let dir = fuzz_dir().join("seeds").join(target);
            fs::create_dir_all(&dir).expect("create the seed directory");
            Seeds { dir, count: 0 }
        }

        fn put(&mut self, name: &str, bytes: &[u8]) {
            assert!(
                bytes.len() <= 80 << 10,
                "seed {name} is {} bytes",
                bytes.len()
            );
            fs::write(self.dir.join(name), bytes).expect("write a seed");
            self.count += 1;
        }
    }

    fn with_mode(mode: u8, bytes: &[u8]) -> Vec<u8> {
        let mut v = vec![mode];
        v.extend_from_slice(bytes);
        v
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn no_persister() -> ParallaxOptions {
        ParallaxOptions {
            cache_bytes: 1 << 20,
            persist_every: None,
        }
    }

    // ---- virtio_request ----------------------------------------------------------------------

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    const PAYLOAD: u64 = 0x3000;

    /// One input of `fuzzing::virtio_request`: flags, heads, the 16-entry descriptor table, and
    /// guest bytes placed at their address (at or above 0x3000).
    struct Chain {
        flags: u8,
        heads: Vec<u8>,
        descs: Vec<(u64, u32, u16, u16)>,
        guest: Vec<u8>,
    }

    impl Chain {
        fn new(flags: u8, descs: &[(u64, u32, u16, u16)]) -> Chain {
            Chain {
                flags,
                heads: vec![0],
                descs: descs.to_vec(),
                guest: Vec::new(),
            }
        }

        fn at(mut self, addr: u64, bytes: &[u8]) -> Chain {
            let off = (addr - PAYLOAD) as usize;
            if self.guest.len() < off + bytes.len() {
                self.guest.resize(off + bytes.len(), 0);
            }
            self.guest[off..off + bytes.len()].copy_from_slice(bytes);
            self
        }

        fn heads(mut self, heads: &[u8]) -> Chain {
            self.heads = heads.to_vec();
            self.flags = (self.flags & 3) | (((heads.len() - 1) as u8) << 2);
            self
        }

        fn bytes(&self) -> Vec<u8> {
            let mut v = vec![self.flags];
            v.extend_from_slice(&self.heads);
            let mut table = vec![0u8; 16 * 16];
            for (i, &(addr, len, flags, next)) in self.descs.iter().enumerate() {
                table[16 * i..16 * i + 16].copy_from_slice(&desc(addr, len, flags, next));
            }
            v.extend_from_slice(&table);
            v.extend_from_slice(&self.guest);
            v
        }
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        d
    }

    fn header(req_type: u32, sector: u64) -> Vec<u8> {
        let mut h = vec![0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    fn segment(sector: u64, num: u32, flags: u32) -> Vec<u8> {
        let mut s = vec![0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        s
    }

    fn virtio_request() -> usize {
        use virtio_bindings::virtio_blk::*;
        let mut s = Seeds::new("virtio_request");
        let (hdr, data, status) = (0x3000, 0x4000, 0x5000);
        let read = |flags: u8| {
            Chain::new(
                flags,
                &[
                    (hdr, 16, NEXT, 1),
                    (data, 4096, WRITE | NEXT, 2),
                    (status, 1, WRITE, 0),
                ],
            )
            .at(hdr, &header(VIRTIO_BLK_T_IN, 8))
        };
        s.put("read-4k", &read(0).bytes());
        s.put("read-4k-raw", &read(2).bytes());
        let mut out = header(VIRTIO_BLK_T_OUT, 4);
        out.extend_from_slice(&pattern(1024, 9));
        let write = |flags: u8| {
            Chain::new(flags, &[(hdr, 16 + 1024, NEXT, 1), (status, 1, WRITE, 0)]).at(hdr, &out)
        };
        s.put("write-header-and-data-in-one", &write(0).bytes());
        s.put("write-raw", &write(2).bytes());
        s.put("write-read-only", &write(1).bytes());
        // Data across the boundary of two adjacent memory regions, split unevenly.
        s.put(
            "write-straddling-regions",
            &Chain::new(
                0,
                &[
                    (hdr, 16, NEXT, 1),
                    (0xfe00, 0x400, NEXT, 2),
                    (0x6000, 0x200, NEXT, 3),
                    (status, 1, WRITE, 0),
                ],
            )
            .at(hdr, &header(VIRTIO_BLK_T_OUT, 100))
            .at(0xfe00, &pattern(0x200, 3))
            .bytes(),
        );
        s.put(
            "read-into-third-region-and-hole",
            &Chain::new(
                2,
                &[
                    (hdr, 16, NEXT, 1),
                    (0x2_0000, 2048, WRITE | NEXT, 2),
                    (0x1_c000, 2048, WRITE | NEXT, 3),
                    (status, 1, WRITE, 0),
                ],
            )
            .at(hdr, &header(VIRTIO_BLK_T_IN, 0))
            .bytes(),
        );
        s.put(
            "flush",
            &Chain::new(0, &[(hdr, 16, NEXT, 1), (status, 1, WRITE, 0)])
                .at(hdr, &header(VIRTIO_BLK_T_FLUSH, 0))
                .bytes(),
        );
        s.put(
            "get-id",
            &Chain::new(
                0,
                &[
                    (hdr, 16, NEXT, 1),
                    (data, 20, WRITE | NEXT, 2),
                    (status, 1, WRITE, 0),
                ],
            )
            .at(hdr, &header(VIRTIO_BLK_T_GET_ID, 0))
            .bytes(),
        );
        let mut discard = header(VIRTIO_BLK_T_DISCARD, 0);
        discard.extend_from_slice(&segment(8, 8, 0));
        discard.extend_from_slice(&segment(64, 16, 0));
        s.put(
            "discard-two-segments",
            &Chain::new(0, &[(hdr, 48, NEXT, 1), (status, 1, WRITE, 0)])
                .at(hdr, &discard)
                .bytes(),
        );
        let mut zeroes = header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        zeroes.extend_from_slice(&segment(120, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP));
        s.put(
            "write-zeroes-unmap-raw",
            &Chain::new(
                2,
                &[
                    (hdr, 16, NEXT, 1),
                    (0x3800, 16, NEXT, 2),
                    (status, 1, WRITE, 0),
                ],
            )
            .at(hdr, &zeroes[..16])
            .at(0x3800, &zeroes[16..])
            .bytes(),
        );
        // An indirect table holding the whole read.
        let mut table = Vec::new();
        table.extend_from_slice(&desc(hdr, 16, NEXT, 1));
        table.extend_from_slice(&desc(data, 512, WRITE | NEXT, 2));
        table.extend_from_slice(&desc(status, 1, WRITE, 0));
        s.put(
            "indirect-read",
            &Chain::new(0, &[(0x6000, 48, INDIRECT, 0)])
                .at(hdr, &header(VIRTIO_BLK_T_IN, 127))
                .at(0x6000, &table)
                .bytes(),
        );
        s.put(
            "misordered",
            &Chain::new(
                0,
                &[
                    (status, 1, WRITE | NEXT, 1),
                    (hdr, 16, NEXT, 2),
                    (0x5800, 1, WRITE, 0),
                ],
            )
            .at(hdr, &header(VIRTIO_BLK_T_IN, 0))
            .bytes(),
        );
        s.put(
            "no-status",
            &Chain::new(0, &[(hdr, 16, 0, 0)])
                .at(hdr, &header(VIRTIO_BLK_T_FLUSH, 0))
                .bytes(),
        );
        s.put(
            "read-past-the-end",
            &Chain::new(
                0,
                &[
                    (hdr, 16, NEXT, 1),
                    (data, 1024, WRITE | NEXT, 2),
                    (status, 1, WRITE, 0),
                ],
            )
            .at(hdr, &header(VIRTIO_BLK_T_IN, 127))
            .bytes(),
        );
        s.put(
            "unknown-type",
            &Chain::new(0, &[(hdr, 16, NEXT, 1), (status, 1, WRITE, 0)])
                .at(hdr, &header(99, 0))
                .bytes(),
        );
        // Four chains on one queue: write, read back, discard, flush.
        let mut four = Chain::new(
            0,
            &[
                (hdr, 16 + 1024, NEXT, 1),
                (status, 1, WRITE, 0),
                (0x7000, 16, NEXT, 3),
                (data, 1024, WRITE | NEXT, 4),
                (status + 1, 1, WRITE, 0),
                (0x7100, 32, NEXT, 6),
                (status + 2, 1, WRITE, 0),
                (0x7200, 16, NEXT, 8),
                (status + 3, 1, WRITE, 0),
            ],
        )
        .at(hdr, &out)
        .at(0x7000, &header(VIRTIO_BLK_T_IN, 4))
        .at(
            0x7100,
            &[header(VIRTIO_BLK_T_DISCARD, 0), segment(4, 2, 0)].concat(),
        )
        .at(0x7200, &header(VIRTIO_BLK_T_FLUSH, 0))
        .heads(&[0, 2, 5, 7]);
        s.put("four-chains", &four.bytes());
        four.flags |= 2;
        s.put("four-chains-raw", &four.bytes());
        s.count
    }

    // ---- control_request and ctl_reply ----------------------------------------------------------

    fn control_request() -> usize {
        let mut s = Seeds::new("control_request");
        let lines: &[(&str, Value)] = &[
            ("hello", json!({"v": 1, "id": 1, "cmd": "hello"})),
            ("status", json!({"cmd": "status"})),
            (
                "status-disk",
                json!({"id": "x", "cmd": "status", "disk": "vm1"}),
            ),
            (
                "tee",
                json!({"cmd": "tee", "disk": "vm1", "candidate": "parallax-v2",
                       "policy": "sync-cross-checks", "faults": ["flip-read:prob=0.01"]}),
            ),
            (
                "policy",
                json!({"cmd": "policy", "disk": "vm1", "policy": "lazy-hashes"}),
            ),
            ("untee", json!({"cmd": "untee", "disk": "vm1"})),
            ("abort", json!({"cmd": "abort", "disk": "vm1"})),
            (
                "migrate",
                json!({"cmd": "migrate", "disk": "vm1", "mode": "copy-on-read", "rate": 1048576}),
            ),
            (
                "migrate-status",
                json!({"cmd": "migrate", "disk": "vm1", "action": "status"}),
            ),
            ("promote", json!({"cmd": "promote", "disk": "vm1"})),
            (
                "deploy-disks",
                json!({"cmd": "deploy", "layout": "parallax-v2", "policy": "mirror-only",
                       "disks": []}),
            ),
            (
                "deploy-sample",
                json!({"cmd": "deploy", "layout": "parallax-v2",
                       "policy": "async-old-primary", "sample": 50.0, "seed": 7}),
            ),
            (
                "snapshot",
                json!({"cmd": "snapshot", "disk": "vm1", "name": "before"}),
            ),
            ("snapshots", json!({"cmd": "snapshots", "disk": "vm1"})),
            (
                "delete-snapshot",
                json!({"cmd": "delete-snapshot", "disk": "vm1", "name": "before"}),
            ),
            (
                "export",
                json!({"cmd": "export", "disk": "vm1", "snapshot": "s", "to": "relative.img"}),
            ),
            ("events", json!({"cmd": "events", "since": 3})),
            ("events-follow", json!({"cmd": "events", "follow": true})),
            ("metrics", json!({"cmd": "metrics"})),
            (
                "taint",
                json!({"cmd": "taint", "disk": "vm1", "label": "untrusted", "on": true}),
            ),
            (
                "annotations",
                json!({"cmd": "annotations", "disk": "vm1", "version": "trusted", "top": 10,
                       "region_blocks": 16, "histogram": 64, "label": "untrusted",
                       "block": 5}),
            ),
            (
                "tiers",
                json!({"cmd": "tiers", "disk": "vm1", "class": "cold", "copies": 2,
                       "tier": "slow", "compress": true, "cold_after_secs": 60,
                       "hot_accesses": 4, "move_mib_s": 16, "move_now": true, "scrub": true}),
            ),
            ("unknown-field", json!({"cmd": "hello", "extra": 1})),
            ("unknown-command", json!({"cmd": "reboot"})),
            ("bad-version", json!({"v": 2, "cmd": "hello"})),
            ("cmd-not-string", json!({"cmd": 5})),
            ("not-an-object", json!([{"cmd": "hello"}])),
        ];
        let mut all = String::new();
        for (name, v) in lines {
            let line = v.to_string();
            s.put(name, line.as_bytes());
            all.push_str(&line);
            all.push('\n');
        }
        s.put("not-json", b"{\"cmd\": \"hello\"");
        all.push_str("\n  \n{bad\n");
        s.put("every-command", all.as_bytes());
        s.count
    }

    fn ctl_reply() -> usize {
        let mut s = Seeds::new("ctl_reply");
        let table = Table::new(
            40,
            Epochs {
                base: 1_700_000_000,
                secs: 600,
            },
        );
        table.record_write_at(0, 16384, 3);
        table.record_read_at(4096, 65536, 5);
        table.set(
            30,
            Annotation {
                reads: 7,
                writes: 2,
                last_read: 9,
                last_write: 8,
                pattern: 0x21,
                taint: 0b11,
            },
        );
        let labels = vec![
            Label {
                name: "untrusted".into(),
                bit: 0,
                active: true,
            },
            Label {
                name: "pii".into(),
                bit: 1,
                active: false,
            },
        ];
        let view = AnnotatedView {
            disk: "vm1",
            layout: "parallax-v2",
            version: Some(3),
            role: "trusted",
            snapshot: None,
            table: &table,
            labels: &labels,
        };
        let q = AnnotationQuery {
            top: Some(3),
            region_blocks: Some(4),
            histogram: Some(8),
            label: Some("pii".into()),
            block: Some(30),
        };
        let ann = control::annotations_result(&view, &q).expect("an annotations result");
        s.put("annotations", ann.to_string().as_bytes());
        let bare = control::annotations_result(&view, &AnnotationQuery::default())
            .expect("an annotations result");
        s.put("annotations-totals", bare.to_string().as_bytes());

        let p = v2_parallax_in_mem(64);
        let status = p
            .tier_status()
            .expect("a parallax-v2 version has a tier status");
        let report = TiersReport {
            version: Some(3),
            layout: "parallax-v2".into(),
            status,
            mover: MoverStatus {
                state: "running",
                reason: None,
                interval_secs: Some(30.0),
                rounds: 2,
                last_round: None,
                last_error: None,
            },
            changes: vec!["cold_after_secs 3600 -> 60".into()],
            scrub_repairs: Some(1),
            kicked: true,
        };
        let tiers = control::tiers_result("vm1", &report);
        s.put("tiers", tiers.to_string().as_bytes());
        s.put("not-json", b"{\"disk\": ");
        s.count
    }

    // ---- the store ---------------------------------------------------------------------------

    /// A real store in `dir`: two disks, a parallax-v1 trusted version with data and a
    /// snapshot, a parallax-v2 candidate under a tee, a quarantined tee. Returns the store.
    fn real_store(dir: &Path) -> Arc<Store> {
        let store = Store::create(dir, 16 << 20, 1 << 20).expect("create a store");
        let k1 = store
            .create_disk("vm1", 4 << 20, "parallax-v1")
            .expect("create vm1");
        let p = Parallax::create_layout(
            store.space(k1).expect("a space"),
            "parallax-v1",
            Sectors(8192),
            no_persister(),
        )
        .expect("create parallax-v1");
        p.write(Sector(0), &pattern(8192, 1)).expect("write");
        p.snapshot("before-upgrade").expect("snapshot");
        p.write(Sector(8), &pattern(4096, 2)).expect("write");
        p.flush().expect("flush");
        drop(p);
        let k2 = store
            .add_version("vm1", "parallax-v2")
            .expect("add a candidate");
        let p2 = Parallax::create_layout(
            store.space(k2).expect("a space"),
            "parallax-v2",
            Sectors(8192),
            no_persister(),
        )
        .expect("create parallax-v2");
        p2.define_label("untrusted").expect("a label");
        p2.write(Sector(16), &pattern(4096, 3)).expect("write");
        p2.flush().expect("flush");
        drop(p2);
        store
            .set_tee(
                "vm1",
                TeeRec {
                    policy: "sync-cross-checks".into(),
                    faults: vec!["flip-read:prob=0.01".into(), "eio:nth=5,op=write".into()],
                    state: TeeState::Active,
                    reason: String::new(),
                    changed: 1_700_000_000,
                },
            )
            .expect("set a tee");
        store
            .create_disk("vm2", 1 << 20, "parallax-v1")
            .expect("create vm2");
        store
            .add_version("vm2", "parallax-v1")
            .expect("a candidate");
        store
            .set_tee(
                "vm2",
                TeeRec {
                    policy: "lazy-hashes".into(),
                    faults: Vec::new(),
                    state: TeeState::Active,
                    reason: String::new(),
                    changed: 1_700_000_000,
                },
            )
            .expect("set a tee");
        store
            .quarantine("vm2", "read mismatch at sector 8\n(candidate 5)")
            .expect("quarantine");
        store
    }

    /// The slots of a real `store.meta`: (generation, payload) of each valid one.
    fn real_slots(meta: &[u8], h: &Header) -> Vec<Option<(u64, Vec<u8>)>> {
        (0..2)
            .map(|i| {
                let at = h.slot_offset(i) as usize;
                let head = &meta[at..at + SLOT_HEADER];
                let generation = u64::from_le_bytes(head[0..8].try_into().expect("8 bytes"));
                let len = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
                (generation != 0).then(|| {
                    (
                        generation,
                        meta[at + SLOT_HEADER..at + SLOT_HEADER + len].to_vec(),
                    )
                })
            })
            .collect()
    }

    /// A compact `store.meta`: `h` with the smallest slot size that holds the slots, then the
    /// two slots (`None`: empty).
    fn compact_meta(h: &Header, slots: &[Option<(u64, Vec<u8>)>]) -> Vec<u8> {
        let mut h = h.clone();
        let need = slots
            .iter()
            .flatten()
            .map(|(_, p)| SLOT_HEADER + p.len())
            .max()
            .unwrap_or(0) as u64;
        let min = 40 + 12 * u64::from(h.extent_count);
        h.slot_size = need.max(min).div_ceil(4096) * 4096;
        let mut b = h.encode();
        for slot in slots {
            let mut bytes = match slot {
                Some((g, p)) => encode_slot(h.version, *g, p),
                None => vec![0u8; SLOT_HEADER],
            };
            bytes.resize(h.slot_size as usize, 0);
            b.extend_from_slice(&bytes);
        }
        assert_eq!(b.len() as u64, HEADER_SIZE + 2 * h.slot_size);
        b
    }

    /// The catalog without tee records (format version 1 has none).
    fn without_tees(payload: &[u8]) -> Vec<u8> {
        let (mut m, _) = Meta::decode(payload, 3).expect("a real payload decodes");
        for d in &mut m.disks {
            d.tee = None;
        }
        m.encode_for(1).expect("format 1 without tees")
    }

    fn stores() -> (usize, usize, usize) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = real_store(dir.path());
        let roots: Vec<Vec<u8>> = store
            .versions()
            .iter()
            .map(|v| store.space(v.key).expect("a space").root())
            .collect();
        drop(store);
        let meta = fs::read(dir.path().join("store.meta")).expect("read store.meta");
        let h = Header::decode(&meta, dir.path()).expect("a real header");
        let slots = real_slots(&meta, &h);
        let newest = slots
            .iter()
            .flatten()
            .max_by_key(|(g, _)| *g)
            .expect("a valid slot")
            .1
            .clone();

        let mut header = Seeds::new("store_header");
        header.put("v4-one-tier", &with_mode(0, &h.encode()));
        let tiered = Header::with_tiers(
            h.uuid,
            1 << 20,
            vec![
                dovetail_store::format::TierRec {
                    name: "fast".into(),
                    extents: 16,
                    path: "/nvme/ds.fast".into(),
                },
                dovetail_store::format::TierRec {
                    name: "slow".into(),
                    extents: 256,
                    path: "/hdd/ds.slow".into(),
                },
            ],
        );
        header.put("v4-two-tiers", &with_mode(0, &tiered.encode()));
        let mut tiered_v3 = tiered.clone();
        tiered_v3.version = 3;
        header.put("v3-two-tiers", &with_mode(0, &tiered_v3.encode()));
        let eight = Header::with_tiers(
            h.uuid,
            4096,
            (0..8)
                .map(|i| dovetail_store::format::TierRec {
                    name: format!("tier-{i}"),
                    extents: 1 + i,
                    path: format!("/mnt/disk{i}/{}", "d".repeat(400)).into(),
                })
                .collect(),
        );
        header.put("v4-eight-tiers", &with_mode(1, &eight.encode()));
        for version in [1, 2] {
            let mut old = h.clone();
            old.version = version;
            header.put(&format!("v{version}"), &with_mode(0, &old.encode()));
        }

        let mut catalog = Seeds::new("store_catalog");
        catalog.put("v3-real", &with_mode(2, &newest));
        catalog.put("v2-real", &with_mode(1, &newest));
        catalog.put("v1-real", &with_mode(0, &without_tees(&newest)));
        catalog.put(
            "v3-empty",
            &with_mode(2, &Meta::empty(16).encode_for(3).expect("encode")),
        );

        let mut open = Seeds::new("store_open");
        open.put("v4-real", &with_mode(0, &compact_meta(&h, &slots)));
        let mut v3 = h.clone();
        v3.version = 3;
        let v3_slots: Vec<_> = slots.to_vec();
        open.put(
            "v3-to-upgrade",
            &with_mode(0, &compact_meta(&v3, &v3_slots)),
        );
        let newest_gen = slots.iter().flatten().map(|(g, _)| *g).max().unwrap_or(1);
        open.put(
            "v4-slot-b-empty",
            &with_mode(
                0,
                &compact_meta(&h, &[Some((newest_gen, newest.clone())), None]),
            ),
        );
        let mut v2 = h.clone();
        v2.version = 2;
        open.put(
            "v2",
            &with_mode(
                0,
                &compact_meta(
                    &v2,
                    &[
                        Some((newest_gen - 1, newest.clone())),
                        Some((newest_gen, newest.clone())),
                    ],
                ),
            ),
        );
        let mut v1 = h.clone();
        v1.version = 1;
        let old = without_tees(&newest);
        open.put(
            "v1-to-upgrade",
            &with_mode(0, &compact_meta(&v1, &[Some((newest_gen, old)), None])),
        );
        let mut two = tiered.clone();
        two.extent_count = 16;
        two.tiers[0].extents = 4;
        two.tiers[1].extents = 12;
        open.put(
            "v4-two-tiers",
            &with_mode(
                0,
                &compact_meta(&two, &[Some((newest_gen, newest.clone())), None]),
            ),
        );

        let mut root = Seeds::new("parallax_root");
        for (i, r) in roots.iter().enumerate() {
            if !r.is_empty() {
                root.put(&format!("store-version-{i}"), &with_mode(0, r));
            }
        }
        (header.count, catalog.count, open.count + root.count)
    }

    /// Seeds of the tier table (`store_tiers`: the table of a real tiered header) and of tier
    /// file headers (`tier_header`: the headers a real two-tier store wrote into its files).
    fn tier_seeds() -> (usize, usize) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (fast, slow) = (dir.path().join("ds.fast"), dir.path().join("ds.slow"));
        let spec = |name: &str, path: &Path, size: u64| dovetail_store::TierSpec {
            name: name.into(),
            path: path.to_path_buf(),
            size,
        };
        let store = Store::create_tiered(
            &dir.path().join("st"),
            &[spec("fast", &fast, 2 << 20), spec("slow", &slow, 6 << 20)],
            1 << 20,
        )
        .expect("a tiered store");
        drop(store);
        let meta = fs::read(dir.path().join("st").join("store.meta")).expect("read store.meta");
        let mut tiers = Seeds::new("store_tiers");
        tiers.put("two-tiers-real", &with_mode(1, &meta[68..4096]));
        tiers.put("two-tiers-swapped", &with_mode(3, &meta[68..4096]));
        let eight = Header::with_tiers(
            [1; 16],
            4096,
            (0..8)
                .map(|i| dovetail_store::format::TierRec {
                    name: format!("tier-{i}"),
                    extents: 1 + i,
                    path: format!("/mnt/disk{i}/{}", "d".repeat(400)).into(),
                })
                .collect(),
        );
        tiers.put("eight-long-paths", &with_mode(1, &eight.encode()[68..]));
        let one = Header::new([1; 16], 4096, 4);
        tiers.put("one-relative", &with_mode(1, &one.encode()[68..]));

        let mut headers = Seeds::new("tier_header");
        for (name, file, extents) in [("fast", &fast, 2u64), ("slow", &slow, 6)] {
            let bytes = fs::read(file).expect("read a tier file");
            let at = (extents << 20) as usize;
            headers.put(name, &with_mode(0, &bytes[at..at + 4096]));
        }
        (tiers.count, headers.count)
    }

    // ---- parallax ----------------------------------------------------------------------------

    /// Extents the `parallax_open` target grants, in its order: alternately on its two tiers of
    /// four extents.
    const HARNESS_EXTENTS: [u32; 4] = [0, 4, 1, 5];
    const EXTENT_BLOCKS: usize = 4;

    fn mem_space() -> Arc<MemSpace> {
        let pool = MemPool::with_tiers(&[("fast", 4), ("slow", 4)]);
        Arc::new(MemSpace::new(
            pool,
            VersionKey(1),
            (EXTENT_BLOCKS * 4096) as u64,
        ))
    }

    fn v2_parallax_in_mem(sectors: u64) -> Parallax {
        Parallax::create_layout(mem_space(), "parallax-v2", Sectors(sectors), no_persister())
            .expect("create parallax-v2")
    }

    /// The `parallax_open` input for a version in `space`: mode, extents, root, blocks.
    fn open_input(space: &MemSpace, mode: u8) -> Vec<u8> {
        let granted = space.extents();
        let n = HARNESS_EXTENTS
            .iter()
            .rposition(|e| granted.contains(&ExtentId(*e)))
            .expect("an extent")
            + 1;
        for e in &granted {
            assert!(
                HARNESS_EXTENTS[..n].contains(&e.0),
                "extent {} is not one the target grants",
                e.0
            );
        }
        let root = space.root();
        let mut v = vec![mode, (n - 1) as u8];
        v.extend_from_slice(&(root.len() as u16).to_le_bytes());
        v.extend_from_slice(&root);
        let mut blocks = Vec::new();
        for &e in &HARNESS_EXTENTS[..n] {
            let mut b = vec![0u8; EXTENT_BLOCKS * 4096];
            if granted.contains(&ExtentId(e)) {
                space.read(ExtentId(e), 0, &mut b).expect("read an extent");
            }
            blocks.extend_from_slice(&b);
        }
        // Trailing zero blocks carry nothing: the target zero-fills.
        while blocks.len() >= 4096 && blocks[blocks.len() - 4096..].iter().all(|&x| x == 0) {
            blocks.truncate(blocks.len() - 4096);
        }
        v.extend_from_slice(&blocks);
        v
    }

    fn parallax() -> usize {
        let mut open = Seeds::new("parallax_open");
        let mut node = Seeds::new("parallax_node");
        let mut root = Seeds::new("parallax_root");
        let mut page = Seeds::new("annotation_page");

        // parallax-v1: 8 blocks, a snapshot, then more writes.
        let s1 = mem_space();
        let p = Parallax::create_layout(s1.clone(), "parallax-v1", Sectors(64), no_persister())
            .expect("create parallax-v1");
        p.write(Sector(0), &pattern(8192, 4)).expect("write");
        p.snapshot("s1").expect("snapshot");
        p.write(Sector(8), &pattern(4096, 5)).expect("write");
        p.write(Sector(40), &pattern(1024, 6)).expect("write");
        p.flush().expect("flush");
        drop(p);
        open.put("v1-snapshot", &open_input(&s1, 0));
        open.put("v1-snapshot-write", &open_input(&s1, 4));
        root.put("v1-snapshot", &with_mode(0, &s1.root()));

        // parallax-v2: labels, annotations, metadata in two copies on the two tiers.
        let s2 = mem_space();
        let p = Parallax::create_layout(s2.clone(), "parallax-v2", Sectors(56), no_persister())
            .expect("create parallax-v2");
        p.define_label("untrusted").expect("label");
        p.set_taint("untrusted", true).expect("taint on");
        p.write(Sector(0), &pattern(4096, 7)).expect("write");
        p.write(Sector(24), &pattern(2048, 8)).expect("write");
        let mut buf = vec![0u8; 4096];
        p.read(Sector(0), &mut buf).expect("read");
        p.snapshot("annotated").expect("snapshot");
        p.flush().expect("flush");
        drop(p);
        open.put("v2-labels", &open_input(&s2, 0));
        open.put("v2-labels-write", &open_input(&s2, 6));
        root.put("v2-labels", &with_mode(0, &s2.root()));

        // A v2 extension of version 1 (written before tiering): cut the tiering section.
        let rec = RootRecord::decode(&s2.root()).expect("a real record");
        let snaps: usize = rec.snapshots.iter().map(|s| 26 + s.name.len()).sum();
        let ext = 48 + snaps;
        let labels: usize = rec
            .v2
            .as_ref()
            .map_or(0, |v| v.labels.iter().map(|l| 1 + l.len()).sum());
        let mut old = s2.root()[..ext + 32 + labels].to_vec();
        old[ext..ext + 4].copy_from_slice(&1u32.to_le_bytes());
        old[12..16].fill(0);
        let crc = crc32c::crc32c(&old);
        old[12..16].copy_from_slice(&crc.to_le_bytes());
        RootRecord::decode(&old).expect("an extension of version 1 decodes");
        root.put("v2-extension-v1", &with_mode(0, &old));

        // Tree nodes and annotation pages of both versions.
        for (tag, space) in [("v1", &s1), ("v2", &s2)] {
            for e in space.extents() {
                for i in 0..EXTENT_BLOCKS {
                    let mut b = vec![0u8; 4096];
                    space
                        .read(e, (i * 4096) as u64, &mut b)
                        .expect("read a block");
                    if b[..8] == NODE_MAGIC {
                        let mut v = vec![2u8];
                        v.extend_from_slice(&[0u8; 17]);
                        v.extend_from_slice(&b);
                        node.put(&format!("{tag}-extent{}-block{i}", e.0), &v);
                    }
                    if b[..4] == *b"DTAN" {
                        let blocks: u16 = 7 - 1;
                        let mut v = vec![0u8];
                        v.extend_from_slice(&blocks.to_le_bytes());
                        v.push(0);
                        v.extend_from_slice(&1u16.to_le_bytes());
                        v.extend_from_slice(&b);
                        page.put(&format!("{tag}-extent{}-block{i}", e.0), &v);
                    }
                }
            }
        }
        // A node with explicit expectations: level 1, its own pointer, any generation.
        if let Some(n) = fs::read_dir(&node.dir)
            .expect("the node seeds")
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().contains("v1-"))
        {
            let mut v = fs::read(n).expect("a node seed");
            v[0] = 0;
            v[1] = v[18 + 8];
            let self_ptr: [u8; 8] = v[18 + 24..18 + 32].try_into().expect("8 bytes");
            v[2..10].copy_from_slice(&self_ptr);
            v[10..18].copy_from_slice(&u64::MAX.to_le_bytes());
            node.put("explicit-expectations", &v);
        }

        // Annotation pages from a table: a disk of 600 blocks, three pages.
        let table = Table::new(
            600,
            Epochs {
                base: 1_700_000_000,
                secs: 600,
            },
        );
        table.set_active_taint(0b101);
        table.record_write_at(0, 1 << 20, 4);
        table.record_read_at(300 * 4096, 8192, 6);
        table.record_read_at(599 * 4096, 4096, 7);
        for p in 0..table.pages() {
            let mut b = vec![0u8; PAGE_BYTES];
            table.encode_page(p, &mut b);
            let mut v = vec![0u8];
            v.extend_from_slice(&599u16.to_le_bytes());
            v.push(p as u8);
            v.extend_from_slice(&0b111u16.to_le_bytes());
            v.extend_from_slice(&b);
            page.put(&format!("table-600-page{p}"), &v);
        }
        let mut zero = vec![0u8, 9, 0, 0, 0, 0];
        zero.extend_from_slice(&[0u8; 64]);
        page.put("all-zero", &zero);

        open.count + node.count + root.count + page.count
    }

    fn compressed_block() -> usize {
        let mut s = Seeds::new("compressed_block");
        let text: Vec<u8> = b"Dovetail keeps cold blocks compressed with zstd. "
            .iter()
            .copied()
            .cycle()
            .take(4096)
            .collect();
        s.put("plain-text", &with_mode(4, &text));
        let block = encode_compressed(&text).expect("text compresses");
        s.put("block", &with_mode(0, &block));
        let len = u16::from_le_bytes([block[4], block[5]]) as usize;
        s.put("frame", &with_mode(2, &block[12..12 + len]));
        let zeros = encode_compressed(&[0u8; 4096]).expect("zeros compress");
        s.put("block-of-zeros", &with_mode(0, &zeros));
        s.put("pattern", &with_mode(4, &pattern(4096, 11)));
        s.count
    }

    /// Checksum pages as parallax-v2 writes them: the crc32c of real 4 KiB blocks, for disks
    /// ending inside, at the end of and past the page.
    fn checksum_page() -> usize {
        use dovetail_layout::parallax::{encode_sums_page, SUMS_PER_PAGE};
        let mut s = Seeds::new("checksum_page");
        let per = SUMS_PER_PAGE;
        for (name, blocks, page, mode) in [
            ("first-page-of-100-blocks", 100u64, 0u64, 0u8),
            ("full-second-page", 3 * per, 1, 0),
            ("last-partial-page", 2 * per + 7, 2, 0),
            ("repaired-checksum", per, 0, 1),
        ] {
            let first = page * per;
            let sums: Vec<u32> = (0..per)
                .map(|i| first + i)
                .map(|b| {
                    if b < blocks {
                        crc32c::crc32c(&pattern(4096, b as u8))
                    } else {
                        0
                    }
                })
                .collect();
            let mut buf = vec![0u8; 4096];
            encode_sums_page(page, &sums, &mut buf);
            if mode & 1 != 0 {
                buf[12] ^= 0xff;
            }
            let mut input = vec![mode];
            input.extend_from_slice(&blocks.to_le_bytes());
            input.extend_from_slice(&(page as u32).to_le_bytes());
            input.extend_from_slice(&buf);
            s.put(name, &input);
        }
        s.count
    }

    /// Rewrites `fuzz/seeds/checksum_page/` only.
    #[test]
    #[ignore]
    fn generate_checksum_page_seeds() {
        println!("checksum_page: {} seeds", checksum_page());
    }

    fn presence_map() -> usize {
        let mut s = Seeds::new("presence_map");
        let dir = tempfile::tempdir().expect("tempdir");
        for (blocks, key, fill, clean) in [
            (100u64, 3u64, &[(0u64, 10u64), (63, 2), (99, 1)][..], true),
            (4097, 7, &[(0, 4097)][..], true),
            (40000, 12, &[(1, 1), (8191, 3), (32768, 100)][..], false),
            (0, 1, &[][..], true),
        ] {
            let path = dir.path().join(format!("{key}.map"));
            let map = PresenceMap::create(&path, blocks, key).expect("create a map");
            for &(first, n) in fill {
                map.insert_range(first, n);
            }
            map.persist().expect("persist");
            if clean {
                map.close_clean().expect("close clean");
            } else {
                map.mark_dirty().expect("mark dirty");
            }
            drop(map);
            let bytes = fs::read(&path).expect("read the map");
            s.put(
                &format!("v2-{blocks}-blocks{}", if clean { "" } else { "-dirty" }),
                &with_mode(0, &bytes),
            );
            // The same bits in format version 1 (the upgrade path).
            let present: Vec<u64> = fill
                .iter()
                .flat_map(|&(first, n)| first..(first + n).min(blocks))
                .collect();
            let v1 = dir.path().join("v1.map");
            dovetail_migrate::presence::write_v1_for_tests(&v1, blocks, key, &present, clean);
            s.put(
                &format!("{blocks}-blocks{}", if clean { "" } else { "-dirty" }),
                &with_mode(0, &fs::read(&v1).expect("read the v1 map")),
            );
        }
        s.count
    }

    fn migration_record() -> usize {
        use dovetail_migrate::record::{MigrationMode, MigrationRecord};
        let mut s = Seeds::new("migration_record");
        let records = [
            (Some(MigrationMode::CopyOut), 64 << 20, 4096, 0),
            (Some(MigrationMode::CopyOnRead), 0, 40000, 1234),
            (Some(MigrationMode::UpgradeOnWrite), 128 << 10, 1, 1),
            (None, 0, 4096, 4096),
        ];
        for (i, (mode, rate, blocks, verified)) in records.into_iter().enumerate() {
            let r = MigrationRecord {
                key: 7,
                mode,
                rate,
                blocks,
                verified,
            };
            s.put(&format!("v2-{i}"), &with_mode(0, &r.encode()));
            // The same, expected under the key it states (mode bit 1).
            let r = MigrationRecord { key: 12, ..r };
            s.put(&format!("v2-{i}-own-key"), &with_mode(2, &r.encode()));
        }
        s.put(
            "v1-copy-out",
            &with_mode(0, br#"{"version":1,"mode":"copy-out","rate":67108864}"#),
        );
        s.put(
            "v1-copy-on-read",
            &with_mode(0, br#"{"version":1,"mode":"copy-on-read","rate":0}"#),
        );
        s.count
    }

    fn fault_rule() -> usize {
        let mut s = Seeds::new("fault_rule");
        let rules = [
            "flip-read",
            "flip-read:prob=0.01",
            "flip-read:sector=2048",
            "stale-read",
            "misdirect-write:offset=16",
            "drop-write:prob=0.5",
            "eio:nth=5,op=write",
            "panic:nth=3",
            "write-outside:nth=1",
            "eio:after=100,op=flush",
            " eio : op = discard , after = 2 , nth = 4 , sector = 63 ",
            "misdirect-write:offset=18446744073709551615,sector=60",
        ];
        for (i, r) in rules.iter().enumerate() {
            s.put(&format!("rule-{i:02}"), r.as_bytes());
        }
        s.put(
            "tee-record-rules",
            b"stale-read\nflip-read:prob=0.25,sector=8\nmisdirect-write:offset=60\neio:nth=2,op=any",
        );
        for p in dovetail_migrate::Policy::ALL {
            s.put(&format!("policy-{p}"), p.to_string().as_bytes());
        }
        s.put(
            "reason",
            b"  candidate mismatch at sector 8:\n  trusted 0x5a, candidate 0xa5\t(policy sync-cross-checks)  ",
        );
        s.put("names", b"vm-1.disk_0");
        s.count
    }

    /// Regenerates `fuzz/seeds/` from real structures.
    #[test]
    #[ignore = "writes fuzz/seeds/; run by hand after a format change"]
    fn generate_seeds() {
        let mut counts = vec![
            ("virtio_request", virtio_request()),
            ("control_request", control_request()),
            ("ctl_reply", ctl_reply()),
        ];
        let (h, c, o) = stores();
        counts.push(("store_header", h));
        counts.push(("store_catalog", c));
        counts.push(("store_open + store roots", o));
        let (t, th) = tier_seeds();
        counts.push(("store_tiers", t));
        counts.push(("tier_header", th));
        counts.push(("parallax + annotation pages", parallax()));
        counts.push(("compressed_block", compressed_block()));
        counts.push(("checksum_page", checksum_page()));
        counts.push(("presence_map", presence_map()));
        counts.push(("migration_record", migration_record()));
        counts.push(("fault_rule", fault_rule()));
        for (name, n) in counts {
            println!("{name}: {n} seeds");
        }
    }
}
