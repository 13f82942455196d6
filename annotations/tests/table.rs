//! Behaviour of `Table`: counting and classification, taint, dirty tracking, the page codec,
//! queries and the heat picture.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use dovetail_annotations::{
    pattern_hit, render_heatmap_png, Annotation, AnnotationError, Epochs, Pattern, Region, Table,
    FORMAT_VERSION, PAGE_BYTES, PAGE_HEADER, RECORDS_PER_PAGE, RECORD_BYTES,
};
use proptest::prelude::*;

const KIB: u64 = 1024;
const BLOCK: u64 = 4096;

fn epochs() -> Epochs {
    Epochs {
        base: 1_000_000,
        secs: 60,
    }
}

fn table(blocks: u64) -> Table {
    Table::new(blocks, epochs())
}

fn ann(reads: u32, writes: u32, pattern: u8, taint: u16) -> Annotation {
    Annotation {
        reads,
        writes,
        last_read: if reads > 0 { 1 } else { 0 },
        last_write: if writes > 0 { 1 } else { 0 },
        pattern,
        taint,
    }
}

/// Rewrites the checksum of an encoded page after a test edited it.
fn reseal(page: &mut [u8]) {
    page[12..16].fill(0);
    let crc = crc32c::crc32c(page);
    page[12..16].copy_from_slice(&crc.to_le_bytes());
}

fn corrupt_message(r: Result<(), AnnotationError>) -> String {
    match r {
        Err(AnnotationError::Corrupt(m)) => m,
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

// ---- counting and classification ----

#[test]
fn sequential_64k_reads_across_1m() {
    let t = table(256);
    for i in 0..16 {
        t.record_read_at(i * 64 * KIB, 64 * KIB, 7);
    }
    for b in 0..256 {
        let a = t.get(b);
        assert_eq!(a.reads, 1, "block {b}");
        assert_eq!(a.writes, 0);
        assert_eq!(a.last_read, 7);
        assert_eq!(a.last_write, 0);
        if b == 0 {
            assert_eq!(a.class(), Pattern::Random, "block 0");
            assert_eq!(a.pattern, 0x01);
        } else {
            assert_eq!(a.class(), Pattern::Sequential, "block {b}");
            assert_eq!(a.pattern, 0x10);
        }
    }
    let tot = t.totals();
    assert_eq!(tot.reads, 256);
    assert_eq!(tot.sequential_blocks, 255);
    assert_eq!(tot.random_blocks, 1);
    assert_eq!(tot.touched_blocks, 256);
}

#[test]
fn shuffled_4k_reads_are_random() {
    let t = table(256);
    // Stride 97 (odd, so a permutation of 0..256): the block after one read 8 or fewer requests
    // earlier never comes next.
    for i in 0..256u64 {
        let b = (i * 97) % 256;
        t.record_read_at(b * BLOCK, BLOCK, 1);
    }
    for b in 0..256 {
        let a = t.get(b);
        assert_eq!(
            (a.reads, a.pattern, a.class()),
            (1, 0x01, Pattern::Random),
            "block {b}"
        );
    }
    assert_eq!(t.totals().random_blocks, 256);
}

#[test]
fn multi_block_and_unaligned_requests() {
    let t = table(200);
    // 16 KiB at block 10, 100, 50: first block random, the other three sequential.
    for b in [10u64, 100, 50] {
        t.record_read_at(b * BLOCK, 16 * KIB, 2);
    }
    for b in [10u64, 100, 50] {
        assert_eq!(t.get(b).pattern, 0x01);
        for k in 1..4 {
            assert_eq!(t.get(b + k).pattern, 0x10);
            assert_eq!(t.get(b + k).reads, 1);
        }
        assert_eq!(t.get(b + 4), Annotation::default());
    }
    // 8 KiB starting 100 bytes into block 150 touches 150, 151, 152.
    t.record_write_at(150 * BLOCK + 100, 8 * KIB, 3);
    assert_eq!(t.get(149).writes, 0);
    for b in 150..153 {
        assert_eq!(t.get(b).writes, 1);
        assert_eq!(t.get(b).last_write, 3);
    }
    assert_eq!(t.get(153).writes, 0);
    // The next write starts where that one ended: sequential, all blocks.
    t.record_write_at(150 * BLOCK + 100 + 8 * KIB, 512, 3);
    assert_eq!(t.get(152).writes, 2);
    assert_eq!(t.get(152).pattern, 0x20);
    // A request interleaved from elsewhere does not break the stream (8 ends are kept).
    t.record_read_at(0, 512, 3);
    t.record_write_at(150 * BLOCK + 100 + 8 * KIB + 512, 512, 3);
    assert_eq!(t.get(152).pattern, 0x30);
}

#[test]
fn partial_block_sequential_writes() {
    let t = table(4);
    for i in 0..16 {
        t.record_write_at(i * 512, 512, 4);
    }
    let a0 = t.get(0);
    assert_eq!(
        (a0.writes, a0.sequential_hits(), a0.random_hits()),
        (8, 7, 1)
    );
    assert_eq!(a0.class(), Pattern::Sequential);
    let a1 = t.get(1);
    assert_eq!(
        (a1.writes, a1.sequential_hits(), a1.random_hits()),
        (8, 8, 0)
    );
    assert_eq!(a1.last_write, 4);
    assert_eq!(a1.reads, 0);
    assert_eq!(t.get(2), Annotation::default());
}

#[test]
fn len_zero_and_past_the_end_are_ignored() {
    let t = table(10);
    t.record_read_at(0, 0, 1);
    t.record_write(BLOCK, 0);
    assert_eq!(t.totals().heat, 0);
    assert_eq!(t.dirty_pages(), 0);
    // Entirely past the end.
    t.record_read_at(10 * BLOCK, BLOCK, 1);
    t.record_write_at(u64::MAX - 10, 100, 1);
    t.record_read_at(u64::MAX, u64::MAX, 1);
    assert_eq!(t.totals().heat, 0);
    // Straddling the end: only block 9 counts.
    t.record_read_at(9 * BLOCK, 4 * BLOCK, 1);
    assert_eq!(t.get(9).reads, 1);
    assert_eq!(t.totals().reads, 1);
    assert_eq!(t.get(10), Annotation::default());
    assert_eq!(t.get(u64::MAX), Annotation::default());
    t.set(10, ann(1, 1, 0, 0));
    assert_eq!(t.totals().heat, 1);
    // An empty disk.
    let e = table(0);
    e.record_write_at(0, 4096, 1);
    assert_eq!(e.pages(), 0);
    assert_eq!(e.totals(), Region::default());
    assert!(e.histogram(4).is_empty());
    assert!(e.top(4, 1).is_empty());
    assert!(e.take_dirty().is_empty());
}

#[test]
fn saturation() {
    let t = table(4);
    t.set(
        0,
        Annotation {
            reads: u32::MAX - 1,
            writes: u32::MAX,
            pattern: 0xf3,
            ..Annotation::default()
        },
    );
    for _ in 0..3 {
        t.record_read_at(0, 4096, 1);
        t.record_write_at(0, 4096, 1);
    }
    let a = t.get(0);
    assert_eq!(a.reads, u32::MAX);
    assert_eq!(a.writes, u32::MAX);
    assert_eq!(a.heat(), 2 * u64::from(u32::MAX));
    // Six random hits from 0xf3: 3 -> ... the nibbles stay in range and random wins.
    let mut expect = 0xf3u8;
    for _ in 0..6 {
        expect = pattern_hit(expect, false);
    }
    assert_eq!(a.pattern, expect);
    assert_eq!(a.pattern, 0xf9);
    // A sequential hit on a full sequential nibble halves both.
    t.set(
        1,
        Annotation {
            pattern: 0xf4,
            ..Annotation::default()
        },
    );
    t.record_read_at(4096 + 100, 1, 1); // random start: 0xf5
    t.record_read_at(4096 + 101, 1, 1); // sequential: halve to 0x72, then 0x82
    assert_eq!(t.get(1).pattern, 0x82);
}

#[test]
fn epochs_are_stamped_and_never_go_back() {
    let t = table(4);
    t.record_read_at(0, 4096, 5);
    t.record_read_at(0, 4096, 3);
    t.record_write_at(0, 4096, 9);
    t.record_write_at(0, 4096, 2);
    let a = t.get(0);
    assert_eq!((a.last_read, a.last_write), (5, 9));
    // The wall clock: epochs of one hour starting two and a half hours ago -> epoch 3.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let e = Epochs {
        base: now - 9000,
        secs: 3600,
    };
    let t = Table::new(4, e);
    assert_eq!(t.epochs(), e);
    t.record_read(0, 4096);
    t.record_write(4096, 4096);
    assert_eq!(t.get(0).last_read, 3);
    assert_eq!(t.get(1).last_write, 3);
    assert_eq!(e.start_of(3), Some(now - 9000 + 7200));
}

// ---- taint ----

#[test]
fn taint_on_and_off() {
    let t = table(600);
    t.record_write_at(0, 4096, 1);
    assert_eq!(t.get(0).taint, 0);
    t.set_active_taint(0b101);
    assert_eq!(t.active_taint(), 0b101);
    t.record_write_at(10 * BLOCK, 3 * BLOCK, 1);
    t.record_read_at(20 * BLOCK, BLOCK, 1); // reads never taint
    t.set_active_taint(0b010);
    t.record_write_at(12 * BLOCK, 2 * BLOCK, 1);
    t.record_write_at(300 * BLOCK, BLOCK, 1);
    t.set_active_taint(0);
    t.record_write_at(400 * BLOCK, BLOCK, 1);
    t.record_write_at(10 * BLOCK, BLOCK, 1); // keeps its labels
    assert_eq!(t.get(10).taint, 0b101);
    assert_eq!(t.get(11).taint, 0b101);
    assert_eq!(t.get(12).taint, 0b111);
    assert_eq!(t.get(13).taint, 0b010);
    assert_eq!(t.get(20).taint, 0);
    assert_eq!(t.get(300).taint, 0b010);
    assert_eq!(t.get(400).taint, 0);
    assert_eq!(t.ranges_with(0b001), vec![(10, 13)]);
    assert_eq!(t.ranges_with(0b010), vec![(12, 14), (300, 301)]);
    assert_eq!(t.ranges_with(0b011), vec![(10, 14), (300, 301)]);
    assert_eq!(t.ranges_with(0b1000), vec![]);
    assert_eq!(t.ranges_with(0), vec![]);
    assert_eq!(t.totals().taint, 0b111);

    let _ = t.take_dirty();
    t.clear_taint(0b010);
    assert_eq!(t.take_dirty(), vec![0, 1]);
    assert_eq!(t.get(12).taint, 0b101);
    assert_eq!(t.get(13).taint, 0);
    assert_eq!(t.get(300).taint, 0);
    assert_eq!(t.get(300).writes, 1);
    assert_eq!(t.ranges_with(0b010), vec![]);
    // Clearing a label no block has dirties nothing.
    t.clear_taint(0b1000);
    assert_eq!(t.dirty_pages(), 0);
    t.clear_taint(0b001);
    assert_eq!(t.take_dirty(), vec![0]);
    assert_eq!(t.totals().taint, 0b100);
}

#[test]
fn taint_reaches_the_disk_end() {
    let t = table(5);
    t.set_active_taint(1 << 15);
    t.record_write_at(3 * BLOCK, 10 * BLOCK, 1);
    assert_eq!(t.ranges_with(1 << 15), vec![(3, 5)]);
}

// ---- dirty tracking ----

#[test]
fn dirty_pages_exact() {
    let t = table(1000); // pages: [0,255) [255,510) [510,765) [765,1000)
    assert_eq!(t.pages(), 4);
    assert_eq!(Table::pages_for(0), 0);
    assert_eq!(Table::pages_for(255), 1);
    assert_eq!(Table::pages_for(256), 2);
    assert!(t.take_dirty().is_empty());
    t.record_read_at(300 * BLOCK, BLOCK, 1);
    assert_eq!(t.dirty_pages(), 1);
    assert_eq!(t.take_dirty(), vec![1]);
    assert!(t.take_dirty().is_empty());
    assert_eq!(t.dirty_pages(), 0);
    // Blocks 254..=256 span pages 0 and 1.
    t.record_write_at(254 * BLOCK, 3 * BLOCK, 1);
    t.record_write_at(999 * BLOCK, BLOCK, 1);
    assert_eq!(t.take_dirty(), vec![0, 1, 3]);
    t.set(600, ann(1, 0, 0, 0));
    assert_eq!(t.take_dirty(), vec![2]);
    t.mark_dirty(3);
    t.mark_dirty(0);
    t.mark_dirty(4); // past the end: ignored
    t.mark_dirty(u64::MAX);
    assert_eq!(t.dirty_pages(), 2);
    assert_eq!(t.take_dirty(), vec![0, 3]);
    // Loading a page does not dirty it.
    let mut buf = vec![0u8; PAGE_BYTES];
    t.encode_page(2, &mut buf);
    t.load_page(2, &buf, u16::MAX).expect("load");
    assert_eq!(t.dirty_pages(), 0);

    // Across dirty-bitset words.
    let big = table(255 * 200);
    for p in [199u64, 63, 64, 130, 0] {
        big.record_read_at(p * 255 * BLOCK, BLOCK, 1);
    }
    big.record_read_at(255 * 128 * BLOCK - 1, 2, 1); // pages 127 and 128
    assert_eq!(big.take_dirty(), vec![0, 63, 64, 127, 128, 130, 199]);
}

#[test]
fn concurrent_updates_lose_nothing() {
    const THREADS: u64 = 4;
    const REQUESTS: u64 = 50_000;
    let blocks = 3000u64;
    let t = Arc::new(table(blocks));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A flusher taking dirty pages all along.
    let flusher = {
        let (t, done) = (Arc::clone(&t), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            let mut buf = vec![0u8; PAGE_BYTES];
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                for p in t.take_dirty() {
                    t.encode_page(p, &mut buf);
                    seen.insert(p);
                }
            }
            seen
        })
    };
    let workers: Vec<_> = (0..THREADS)
        .map(|k| {
            let t = Arc::clone(&t);
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ k;
                let mut touched = 0u64;
                for i in 0..REQUESTS {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let block = x % blocks;
                    let len = (x >> 40) % (4 * BLOCK) + 1;
                    let start = block * BLOCK + (x >> 20) % 512;
                    let end = (start + len).min(blocks * BLOCK);
                    if start < blocks * BLOCK {
                        touched += (end - 1) / BLOCK - start / BLOCK + 1;
                    }
                    if i % 2 == 0 {
                        t.record_read_at(start, len, 1);
                    } else {
                        t.record_write_at(start, len, 1);
                    }
                }
                touched
            })
        })
        .collect();
    let touched: u64 = workers.into_iter().map(|w| w.join().expect("worker")).sum();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut seen = flusher.join().expect("flusher");
    seen.extend(t.take_dirty());
    let tot = t.totals();
    assert_eq!(tot.heat, touched);
    assert!(tot.reads > 0 && tot.writes > 0);
    // Every page with a touched block was handed out at least once.
    let pages_touched: BTreeSet<u64> = (0..blocks)
        .filter(|&b| t.get(b).heat() > 0)
        .map(|b| b / RECORDS_PER_PAGE)
        .collect();
    assert!(pages_touched.is_subset(&seen));
}

// ---- page codec ----

fn filled(blocks: u64) -> Table {
    let t = table(blocks);
    for b in 0..blocks {
        let v = (b as u32).wrapping_mul(2_654_435_761);
        t.set(
            b,
            Annotation {
                reads: v,
                writes: v.rotate_left(7),
                last_read: (v >> 3) as u16,
                last_write: (v >> 17) as u16,
                pattern: (v >> 9) as u8,
                taint: (v >> 11) as u16 & 0x0fff,
            },
        );
    }
    let _ = t.take_dirty();
    t
}

#[test]
fn encode_load_round_trip() {
    let blocks = 3 * 255 + 100;
    let src = filled(blocks);
    let dst = table(blocks);
    let mut buf = vec![0xaau8; PAGE_BYTES];
    for p in 0..src.pages() {
        src.encode_page(p, &mut buf);
        assert_eq!(&buf[0..4], b"DTAN");
        assert_eq!(u16::from_le_bytes([buf[4], buf[5]]), FORMAT_VERSION);
        assert_eq!(&buf[6..8], &[0, 0]);
        assert_eq!(
            u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as u64,
            p
        );
        let stored = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
        let mut z = buf.clone();
        z[12..16].fill(0);
        assert_eq!(stored, crc32c::crc32c(&z));
        // Record 0 is block 255·p, as Annotation::encode writes it.
        let mut rec = [0u8; RECORD_BYTES];
        src.get(p * 255).encode(&mut rec);
        assert_eq!(&buf[PAGE_HEADER..PAGE_HEADER + RECORD_BYTES], &rec);
        dst.load_page(p, &buf, 0x0fff).expect("load");
    }
    // The last page's records past the end are zero.
    src.encode_page(3, &mut buf);
    assert!(buf[PAGE_HEADER + 100 * RECORD_BYTES..]
        .iter()
        .all(|&b| b == 0));
    for b in 0..blocks {
        assert_eq!(dst.get(b), src.get(b), "block {b}");
    }
    assert_eq!(dst.totals(), src.totals());
    assert_eq!(dst.dirty_pages(), 0);
}

#[test]
fn all_zero_page_loads_as_zeros() {
    let t = filled(600);
    let zero = vec![0u8; PAGE_BYTES];
    t.load_page(1, &zero, 0).expect("zero page");
    for b in 255..510 {
        assert_eq!(t.get(b), Annotation::default());
    }
    assert_ne!(t.get(254), Annotation::default());
    assert_ne!(t.get(510), Annotation::default());
    assert_eq!(t.dirty_pages(), 0);
}

#[test]
fn every_single_bit_flip_is_rejected() {
    let src = filled(300);
    let mut page = vec![0u8; PAGE_BYTES];
    src.encode_page(0, &mut page);
    let dst = filled(300);
    // Make dst differ from src so "unchanged" is meaningful.
    dst.set(3, Annotation::default());
    let before: Vec<Annotation> = (0..300).map(|b| dst.get(b)).collect();
    for bit in 0..PAGE_BYTES * 8 {
        let mut p = page.clone();
        p[bit / 8] ^= 1 << (bit % 8);
        let r = dst.load_page(0, &p, u16::MAX);
        assert!(r.is_err(), "flip of bit {bit} accepted");
        let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("page 0"), "{msg}");
    }
    for b in 0..300 {
        assert_eq!(dst.get(b), before[b as usize]);
    }
    // The unflipped page loads.
    dst.load_page(0, &page, u16::MAX).expect("clean page");
    assert_eq!(dst.get(3), src.get(3));
}

#[test]
fn wrong_page_index_is_rejected() {
    let src = filled(1000);
    let dst = table(1000);
    let mut page = vec![0u8; PAGE_BYTES];
    src.encode_page(1, &mut page);
    let msg = corrupt_message(dst.load_page(2, &page, u16::MAX));
    assert!(
        msg.contains("page 2") && msg.contains("index of page 1"),
        "{msg}"
    );
    assert_eq!(dst.totals().heat, 0);
    dst.load_page(1, &page, u16::MAX).expect("right index");
}

#[test]
fn unknown_taint_bits_are_rejected() {
    let t = table(10);
    t.set(4, ann(1, 1, 0, 0b1001));
    let mut page = vec![0u8; PAGE_BYTES];
    t.encode_page(0, &mut page);
    let dst = table(10);
    let msg = corrupt_message(dst.load_page(0, &page, 0b0111));
    assert!(msg.contains("record 4") && msg.contains("taint"), "{msg}");
    assert_eq!(dst.get(4), Annotation::default());
    dst.load_page(0, &page, 0b1001).expect("known labels");
    assert_eq!(dst.get(4).taint, 0b1001);
}

#[test]
fn other_damage_is_rejected() {
    let t = filled(300); // page 1 holds blocks 255..300, records 45.. are past the end
    let mut good = vec![0u8; PAGE_BYTES];
    t.encode_page(1, &mut good);
    let dst = table(300);

    // Non-zero record past the disk's end, checksum recomputed.
    let mut p = good.clone();
    p[PAGE_HEADER + 200 * RECORD_BYTES + 3] = 1;
    reseal(&mut p);
    let msg = corrupt_message(dst.load_page(1, &p, u16::MAX));
    assert!(
        msg.contains("record 200") && msg.contains("past the disk's end"),
        "{msg}"
    );

    // Non-zero reserved byte in a record.
    let mut p = good.clone();
    p[PAGE_HEADER + 7 * RECORD_BYTES + 13] = 0x80;
    reseal(&mut p);
    let msg = corrupt_message(dst.load_page(1, &p, u16::MAX));
    assert!(
        msg.contains("record 7") && msg.contains("reserved"),
        "{msg}"
    );

    // Non-zero reserved header field.
    let mut p = good.clone();
    p[7] = 1;
    reseal(&mut p);
    let msg = corrupt_message(dst.load_page(1, &p, u16::MAX));
    assert!(msg.contains("reserved"), "{msg}");

    // Another format version.
    let mut p = good.clone();
    p[4] = 2;
    reseal(&mut p);
    assert!(matches!(
        dst.load_page(1, &p, u16::MAX),
        Err(AnnotationError::UnsupportedVersion {
            page: 1,
            version: 2
        })
    ));

    // Bad magic, bad checksum, wrong length, page out of range.
    let mut p = good.clone();
    p[0] = b'X';
    assert!(corrupt_message(dst.load_page(1, &p, u16::MAX)).contains("magic"));
    let mut p = good.clone();
    p[2000] ^= 0x10;
    assert!(corrupt_message(dst.load_page(1, &p, u16::MAX)).contains("checksum"));
    assert!(corrupt_message(dst.load_page(1, &good[..4095], u16::MAX)).contains("4095 bytes"));
    assert!(matches!(
        dst.load_page(2, &good, u16::MAX),
        Err(AnnotationError::PageOutOfRange { page: 2, pages: 2 })
    ));
    assert_eq!(dst.totals().heat, 0);
    dst.load_page(1, &good, u16::MAX).expect("good page");
    assert_eq!(dst.get(299), t.get(299));
}

// ---- queries ----

/// Blocks 0..20 with hand-picked annotations.
fn hand_built() -> Table {
    let t = table(20);
    t.set(0, ann(1, 0, 0x01, 0)); // random
    t.set(3, ann(5, 2, 0x31, 0b01)); // seq
    t.set(
        4,
        Annotation {
            reads: 0,
            writes: 7,
            last_read: 0,
            last_write: 9,
            pattern: 0x12,
            taint: 0b10,
        },
    ); // random
    t.set(10, ann(3, 4, 0x11, 0)); // unknown class, heat 7
    t.set(
        11,
        Annotation {
            reads: 2,
            writes: 0,
            last_read: 6,
            last_write: 0,
            pattern: 0x20,
            taint: 0b01,
        },
    );
    t.set(19, ann(0, 1, 0x10, 0b100));
    t
}

#[test]
fn top_single_blocks() {
    let t = hand_built();
    let top = t.top(3, 1);
    // Heat: 3 -> 7, 4 -> 7, 10 -> 7 (ties by lower block), 11 -> 2, 0 -> 1, 19 -> 1.
    assert_eq!(
        top.iter()
            .map(|r| (r.first_block, r.heat))
            .collect::<Vec<_>>(),
        vec![(3, 7), (4, 7), (10, 7)]
    );
    assert_eq!(
        top[0],
        Region {
            first_block: 3,
            blocks: 1,
            reads: 5,
            writes: 2,
            heat: 7,
            touched_blocks: 1,
            sequential_blocks: 1,
            random_blocks: 0,
            taint: 0b01,
            last_read: 1,
            last_write: 1,
        }
    );
    let all = t.top(100, 1);
    assert_eq!(
        all.iter().map(|r| r.first_block).collect::<Vec<_>>(),
        vec![3, 4, 10, 11, 0, 19]
    );
    assert!(t.top(0, 1).is_empty());
    assert_eq!(t.top(2, 0), t.top(2, 1));
}

#[test]
fn top_regions() {
    let t = hand_built();
    // Regions of 8: [0,8) heat 15, [8,16) heat 9, [16,20) heat 1.
    let top = t.top(10, 8);
    assert_eq!(top.len(), 3);
    assert_eq!(
        top[0],
        Region {
            first_block: 0,
            blocks: 8,
            reads: 6,
            writes: 9,
            heat: 15,
            touched_blocks: 3,
            sequential_blocks: 1,
            random_blocks: 2,
            taint: 0b11,
            last_read: 1,
            last_write: 9,
        }
    );
    assert_eq!(
        top[1],
        Region {
            first_block: 8,
            blocks: 8,
            reads: 5,
            writes: 4,
            heat: 9,
            touched_blocks: 2,
            sequential_blocks: 1,
            random_blocks: 0,
            taint: 0b01,
            last_read: 6,
            last_write: 1,
        }
    );
    assert_eq!(
        (top[2].first_block, top[2].blocks, top[2].heat, top[2].taint),
        (16, 4, 1, 0b100)
    );
    // Equal heat: lower first block first.
    let t = table(8);
    t.set(6, ann(2, 0, 0, 0));
    t.set(1, ann(1, 1, 0, 0));
    let top = t.top(1, 2);
    assert_eq!((top[0].first_block, top[0].heat), (0, 2));
    let top = t.top(5, 2);
    assert_eq!(
        top.iter().map(|r| r.first_block).collect::<Vec<_>>(),
        vec![0, 6]
    );
}

#[test]
fn histogram_parts() {
    let t = hand_built();
    let h = t.histogram(4); // parts of 5 blocks
    assert_eq!(h.len(), 4);
    assert_eq!(
        h.iter()
            .map(|r| (r.first_block, r.blocks, r.heat, r.touched_blocks))
            .collect::<Vec<_>>(),
        vec![(0, 5, 15, 3), (5, 5, 0, 0), (10, 5, 9, 2), (15, 5, 1, 1)]
    );
    assert_eq!(h[0].random_blocks, 2);
    assert_eq!(h[2].last_read, 6);
    // 20 blocks in 6 parts of ceil(20/6) = 4 blocks: the last part is empty.
    let h = t.histogram(6);
    assert_eq!(
        h.iter()
            .map(|r| (r.first_block, r.blocks))
            .collect::<Vec<_>>(),
        vec![(0, 4), (4, 4), (8, 4), (12, 4), (16, 4), (20, 0)]
    );
    assert_eq!(h.iter().map(|r| r.heat).sum::<u64>(), t.totals().heat);
    // 20 blocks in 3 parts of 7: the last is shorter.
    let h = t.histogram(3);
    assert_eq!(
        h.iter()
            .map(|r| (r.first_block, r.blocks))
            .collect::<Vec<_>>(),
        vec![(0, 7), (7, 7), (14, 6)]
    );
    // Clamped to 1..=blocks.
    assert_eq!(t.histogram(0), vec![t.totals()]);
    let h = t.histogram(1000);
    assert_eq!(h.len(), 20);
    assert!(h
        .iter()
        .enumerate()
        .all(|(i, r)| r.first_block == i as u64 && r.blocks == 1));
}

#[test]
fn totals_and_ranges() {
    let t = hand_built();
    assert_eq!(
        t.totals(),
        Region {
            first_block: 0,
            blocks: 20,
            reads: 11,
            writes: 14,
            heat: 25,
            touched_blocks: 6,
            sequential_blocks: 3,
            random_blocks: 2,
            taint: 0b111,
            last_read: 6,
            last_write: 9,
        }
    );
    assert_eq!(t.ranges_with(0b01), vec![(3, 4), (11, 12)]);
    assert_eq!(t.ranges_with(0b11), vec![(3, 5), (11, 12)]);
    assert_eq!(t.ranges_with(0b100), vec![(19, 20)]);
    assert_eq!(t.ranges_with(u16::MAX), vec![(3, 5), (11, 12), (19, 20)]);
    assert_eq!(t.region(18, 100).blocks, 2);
    assert_eq!(t.region(100, 1).blocks, 0);
}

#[test]
fn serializes() {
    fn assert_serialize<T: serde::Serialize>() {}
    assert_serialize::<Annotation>();
    assert_serialize::<Pattern>();
    assert_serialize::<Region>();
    let debug = format!("{:?}", table(10));
    assert!(debug.starts_with("Table {") && debug.len() < 200, "{debug}");
}

// ---- heat picture ----

#[test]
fn heatmap_png_decodes() {
    let heat: Vec<u64> = (0..10).map(|i| i * i).collect();
    let mut out = Vec::new();
    render_heatmap_png(&heat, 4, 8, &mut out).expect("render");
    let decoder = png::Decoder::new(std::io::Cursor::new(&out));
    let mut reader = decoder.read_info().expect("png header");
    let (w, h) = (reader.info().width, reader.info().height);
    assert_eq!((w, h), (32, 24)); // 4 columns x 3 rows of 8 px
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).expect("png data");
    assert_eq!(frame.color_type, png::ColorType::Rgb);
    let px = |x: usize, y: usize| {
        let i = (y * w as usize + x) * 3;
        [buf[i], buf[i + 1], buf[i + 2]]
    };
    assert_eq!(px(0, 0), [0, 0, 0]); // heat 0
    assert_eq!(px(8 + 1, 16 + 1), [255, 255, 255]); // cell 9 = the maximum
    assert_eq!(px(8 * 3 + 1, 16 + 1), [0, 0, 0]); // past the last part
    assert_eq!(px(7, 0), [48, 48, 48]); // grid
    let mid = px(8 * 3 + 1, 1); // heat 9 of 81
    assert!(mid[0] == 255 && mid[2] < 255, "{mid:?}");

    // One pixel per cell, no grid; an empty input still makes a (1-row) picture.
    let mut out = Vec::new();
    render_heatmap_png(&[], 5, 1, &mut out).expect("render");
    let reader = png::Decoder::new(std::io::Cursor::new(&out))
        .read_info()
        .expect("png");
    assert_eq!((reader.info().width, reader.info().height), (5, 1));
}

// ---- a reference model ----

/// The classification rule written out plainly.
#[derive(Default)]
struct Model {
    blocks: Vec<Annotation>,
    ends: VecDeque<u64>,
}

impl Model {
    fn apply(&mut self, write: bool, start: u64, len: u64, epoch: u16, taint: u16) {
        if len == 0 {
            return;
        }
        let end = start.saturating_add(len);
        let sequential = self.ends.contains(&start);
        self.ends.push_back(end);
        if self.ends.len() > 8 {
            self.ends.pop_front();
        }
        let n = self.blocks.len() as u64;
        for b in start / BLOCK..=(end - 1) / BLOCK {
            if b >= n {
                break;
            }
            let a = &mut self.blocks[b as usize];
            if write {
                a.writes = a.writes.saturating_add(1);
                a.last_write = a.last_write.max(epoch);
                a.taint |= taint;
            } else {
                a.reads = a.reads.saturating_add(1);
                a.last_read = a.last_read.max(epoch);
            }
            a.hit(sequential || b != start / BLOCK);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn table_matches_model(
        blocks in 1u64..40,
        ops in proptest::collection::vec(
            (any::<bool>(), 0u64..48, 0u64..4096, 0u64..20_000, 1u16..50, 0u16..8, any::<bool>()),
            1..200,
        ),
    ) {
        let t = table(blocks);
        let mut m = Model { blocks: vec![Annotation::default(); blocks as usize], ..Model::default() };
        let mut last_end = 0u64;
        for (write, block, offset, len, epoch, taint, follow) in ops {
            // Half the requests continue the previous one, to exercise sequential streams.
            let start = if follow { last_end } else { block * BLOCK + offset };
            last_end = start + len;
            t.set_active_taint(taint);
            if write {
                t.record_write_at(start, len, epoch);
            } else {
                t.record_read_at(start, len, epoch);
            }
            m.apply(write, start, len, epoch, taint);
        }
        for b in 0..blocks {
            prop_assert_eq!(t.get(b), m.blocks[b as usize], "block {}", b);
        }
        // The pages round-trip.
        let copy = table(blocks);
        let mut buf = vec![0u8; PAGE_BYTES];
        for p in t.take_dirty() {
            t.encode_page(p, &mut buf);
            copy.load_page(p, &buf, 0b111).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        prop_assert_eq!(copy.totals(), t.totals());
        prop_assert_eq!(copy.ranges_with(0b111), t.ranges_with(0b111));
    }
}

// ---- cost ----

/// `cargo test -p dovetail-annotations --release -- --ignored --nocapture record_cost`
#[test]
#[ignore]
fn record_cost() {
    let blocks = 1u64 << 18; // 1 GiB
    let t = table(blocks);
    let n = 5_000_000u64;
    let mut x = 0x1234_5678_9abc_def1u64;
    let starts: Vec<u64> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % blocks) * BLOCK
        })
        .collect();
    for (name, wall_clock) in [
        ("record_read (coarse clock)", true),
        ("record_read_at", false),
    ] {
        let t0 = std::time::Instant::now();
        for i in 0..n {
            let s = starts[(i % 4096) as usize];
            if wall_clock {
                t.record_read(s, 4096);
            } else {
                t.record_read_at(s, 4096, 1);
            }
        }
        let per = t0.elapsed().as_nanos() as f64 / n as f64;
        println!("{name}: random 4 KiB: {per:.1} ns/request");
        let t0 = std::time::Instant::now();
        for i in 0..n {
            if wall_clock {
                t.record_read((i % blocks) * BLOCK, 4096);
            } else {
                t.record_read_at((i % blocks) * BLOCK, 4096, 1);
            }
        }
        let per = t0.elapsed().as_nanos() as f64 / n as f64;
        println!("{name}: sequential 4 KiB: {per:.1} ns/request");
    }
    let t0 = std::time::Instant::now();
    for i in 0..n / 16 {
        t.record_write((i * 16 % blocks) * BLOCK, 64 * 1024);
    }
    let per = t0.elapsed().as_nanos() as f64 / (n / 16) as f64;
    println!("record_write 64 KiB: {per:.1} ns/request");
    assert!(t.totals().heat > 0);

    // Several I/O threads at once (they share the recent-request ring).
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    let t = Arc::new(t);
    let starts = Arc::new(starts);
    let t0 = std::time::Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|k| {
            let (t, starts) = (Arc::clone(&t), Arc::clone(&starts));
            std::thread::spawn(move || {
                for i in 0..n {
                    t.record_read(starts[((i + k as u64 * 977) % 4096) as usize], 4096);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    let per = t0.elapsed().as_nanos() as f64 / n as f64;
    println!("record_read random 4 KiB, {threads} threads: {per:.1} ns/request per thread");
}
