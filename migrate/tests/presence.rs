//! The presence map file (docs/format.md, "Presence map, format version 2"): round trips,
//! what persist makes durable, corruption and mismatch errors, page checksums, the clean flag,
//! gap search, concurrent inserts, and a page torn by a power cut.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dovetail_migrate::presence::{PresenceError, PresenceMap, BLOCKS_PER_PAGE, MAP_BLOCK};
use dovetail_store::le::{le_u32, le_u64};

/// Blocks per bitmap page: 511 words of 64 bits (the page's last 8 bytes are its checksum).
const BPP: u64 = BLOCKS_PER_PAGE;

fn tempdir() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().expect("tempdir");
    let p = t.path().join("7.map");
    (t, p)
}

/// Whether block `b` is set in a map file's bytes, read as the document says.
fn bit(file: &[u8], b: u64) -> bool {
    let (page, r) = (b / BPP, b % BPP);
    file[4096 + (page * 4096 + r / 8) as usize] & (1 << (r % 8)) != 0
}

/// The checksum of bitmap page `page` of the map of `key`, as the document says: crc32c of
/// the key and page index (u64 each) then the page's first 4092 bytes.
fn page_crc(file: &[u8], key: u64, page: u64) -> u32 {
    let at = 4096 + page as usize * 4096;
    let mut b = key.to_le_bytes().to_vec();
    b.extend_from_slice(&page.to_le_bytes());
    b.extend_from_slice(&file[at..at + 4092]);
    crc32c::crc32c(&b)
}

/// Rewrites bitmap page `page`'s checksum after an edit.
fn reseal_page(file: &mut [u8], key: u64, page: u64) {
    let crc = page_crc(file, key, page);
    let at = 4096 + page as usize * 4096 + 4092;
    file[at..at + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Rewrites the header's checksum after an edit (bytes 36..40: crc32c of bytes 0..36).
fn reseal(file: &mut [u8]) {
    let crc = crc32c::crc32c(&file[..36]);
    file[36..40].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn a_new_map_is_what_the_document_says_and_opens_again() {
    let (_t, path) = tempdir();
    let blocks = 100_000;
    let m = PresenceMap::create(&path, blocks, 7).expect("create");
    assert_eq!((m.blocks(), m.count()), (blocks, 0));
    assert!(m.was_clean(), "a new map is clean");
    assert_eq!(m.next_absent(0), Some(0));
    drop(m);
    assert!(!Path::new(&format!("{}.tmp", path.display())).exists());

    let f = std::fs::read(&path).expect("read");
    // 4096 + ceil(100000 / 32704) = 4 pages of 4096.
    assert_eq!(f.len(), 4096 + 16384);
    assert_eq!(&f[0..8], b"DVTLPMAP");
    assert_eq!(le_u32(&f, 8), 2, "format version");
    for page in 0..4 {
        let at = 4096 + page as usize * 4096;
        assert_eq!(le_u32(&f, at + 4092), page_crc(&f, 7, page), "page {page}");
        assert_eq!(le_u32(&f, at + 4088), 0, "reserved");
    }
    assert_eq!(le_u32(&f, 12), 4096, "block size");
    assert_eq!(le_u64(&f, 16), blocks);
    assert_eq!(le_u64(&f, 24), 7, "version key");
    assert_eq!(le_u32(&f, 32), 1, "flags: clean");
    assert_eq!(le_u32(&f, 36), crc32c::crc32c(&f[..36]));
    assert!(f[40..4096].iter().all(|&b| b == 0));
    for page in 0..4 {
        let at = 4096 + page * 4096;
        assert!(f[at..at + 4092].iter().all(|&b| b == 0), "no block present");
    }
    assert_eq!(MAP_BLOCK, 4096);

    let m = PresenceMap::open(&path, blocks, 7).expect("open");
    assert_eq!((m.blocks(), m.count()), (blocks, 0));
    assert!(m.was_clean());

    // A map of 0 blocks and one of exactly one page are fine too.
    let (_t2, p2) = tempdir();
    PresenceMap::create(&p2, 0, 1).expect("empty");
    assert_eq!(std::fs::metadata(&p2).expect("meta").len(), 4096);
    PresenceMap::open(&p2, 0, 1).expect("open empty");
    let (_t3, p3) = tempdir();
    PresenceMap::create(&p3, BPP, 1).expect("one page");
    assert_eq!(std::fs::metadata(&p3).expect("meta").len(), 8192);
    let (_t4, p4) = tempdir();
    PresenceMap::create(&p4, BPP + 1, 1).expect("two pages");
    assert_eq!(std::fs::metadata(&p4).expect("meta").len(), 12288);
}

#[test]
fn create_refuses_an_existing_file_and_open_or_create_opens_it() {
    let (_t, path) = tempdir();
    let m = PresenceMap::open_or_create(&path, 1000, 3).expect("creates");
    m.insert(10);
    m.persist().expect("persist");
    drop(m);
    let e = PresenceMap::create(&path, 1000, 3).expect_err("exists");
    assert!(
        matches!(e, PresenceError::Io { ref source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists),
        "{e}"
    );
    let m = PresenceMap::open_or_create(&path, 1000, 3).expect("opens");
    assert!(m.contains(10));
    // A stale temporary file from an interrupted create is no obstacle.
    let (_t2, p2) = tempdir();
    std::fs::write(format!("{}.tmp", p2.display()), b"junk").expect("write");
    PresenceMap::create(&p2, 1000, 3).expect("create over a stale tmp");
    // Opening a missing file is an I/O error naming the file.
    let (_t3, p3) = tempdir();
    let e = PresenceMap::open(&p3, 1000, 3).expect_err("missing");
    assert!(e.to_string().contains(&p3.display().to_string()), "{e}");
}

#[test]
fn persisted_bits_survive_reopen_and_later_ones_need_not() {
    let (_t, path) = tempdir();
    let blocks = 200_000;
    let m = PresenceMap::create(&path, blocks, 9).expect("create");
    m.mark_dirty().expect("dirty");
    let singles = [0u64, 1, 63, 64, 32767, 32768, 65535, 199_999];
    for &b in &singles {
        m.insert(b);
    }
    m.insert_range(100_000, 40_000); // across a page boundary (131072)
    m.insert_range(70, 3);
    let persisted: std::collections::BTreeSet<u64> =
        (0..blocks).filter(|&b| m.contains(b)).collect();
    assert_eq!(m.count(), persisted.len() as u64);
    assert_eq!(m.count(), singles.len() as u64 + 40_000 + 3);
    m.persist().expect("persist");
    let file = std::fs::read(&path).expect("read");
    for b in 0..blocks {
        assert_eq!(bit(&file, b), m.contains(b), "block {b} on disk");
    }
    // Inserted after the last persist: not required to survive.
    m.insert(5);
    m.insert_range(150_000, 100);
    drop(m);

    let m = PresenceMap::open(&path, blocks, 9).expect("open");
    assert!(!m.was_clean(), "no close_clean");
    for &b in &persisted {
        assert!(m.contains(b), "persisted block {b} lost");
    }
    for b in 0..blocks {
        if m.contains(b) {
            assert!(
                persisted.contains(&b) || b == 5 || (150_000..150_100).contains(&b),
                "block {b} was never inserted"
            );
        }
    }
    assert_eq!(
        m.count(),
        (0..blocks).filter(|&b| m.contains(b)).count() as u64
    );
}

#[test]
fn persist_writes_only_the_pages_that_changed() {
    let (_t, path) = tempdir();
    let m = PresenceMap::create(&path, 5 * BPP, 1).expect("create");
    m.insert(0); // page 0
    m.insert(3 * BPP + 1); // page 3
    m.persist().expect("persist");
    // Plant a marker in page 3 on disk behind the map's back.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    f.write_all_at(&[0xff], 4096 + 3 * 4096 + 100)
        .expect("poke");
    // Change page 0 and page 4 only; persist must leave page 3 alone.
    m.insert(1);
    m.insert(4 * BPP);
    m.insert(3 * BPP + 1); // already present: page 3 is not dirtied
    m.persist().expect("persist");
    let file = std::fs::read(&path).expect("read");
    assert_eq!(file[4096 + 3 * 4096 + 100], 0xff, "page 3 was rewritten");
    assert!(bit(&file, 1) && bit(&file, 4 * BPP));
    // Nothing changed: persist writes nothing.
    m.persist().expect("persist");
    drop(m);
    // The planted byte broke page 3's checksum: the page reads as all-absent, is reported,
    // and the other pages are untouched.
    let m = PresenceMap::open(&path, 5 * BPP, 1).expect("open");
    assert_eq!(m.bad_pages(), &[3]);
    assert!(!m.contains(3 * BPP + 800) && !m.contains(3 * BPP + 1));
    assert!(m.contains(0) && m.contains(1) && m.contains(4 * BPP));
    assert_eq!(m.count(), 3);
    drop(m);
    // Resealed, the planted bits read back.
    let mut file = std::fs::read(&path).expect("read");
    reseal_page(&mut file, 1, 3);
    std::fs::write(&path, &file).expect("write");
    let m = PresenceMap::open(&path, 5 * BPP, 1).expect("open");
    assert!(m.bad_pages().is_empty());
    assert!(m.contains(3 * BPP + 800), "the planted bits read back");
}

#[test]
fn corruption_and_mismatches_are_refused_clearly() {
    let (_t, path) = tempdir();
    let blocks = 50_000;
    let m = PresenceMap::create(&path, blocks, 4).expect("create");
    m.insert_range(0, 1000);
    m.close_clean().expect("close");
    drop(m);
    let good = std::fs::read(&path).expect("read");
    let try_open = |bytes: &[u8]| {
        std::fs::write(&path, bytes).expect("write");
        PresenceMap::open(&path, blocks, 4)
    };
    let corrupt = |bytes: &[u8], words: &str| match try_open(bytes) {
        Err(PresenceError::Corrupt(s)) => assert!(s.contains(words), "{s} lacks {words:?}"),
        other => panic!("{words}: {other:?}"),
    };

    // Any header byte flipped: the magic, or a field under the checksum.
    for at in [0usize, 7, 12, 16, 20, 24, 32, 36, 39] {
        let mut b = good.clone();
        b[at] ^= 0x10;
        let what = if at < 8 { "bad magic" } else { "checksum" };
        corrupt(&b, what);
    }
    // Reserved bytes and flag bits, even under a valid checksum.
    let mut b = good.clone();
    b[40] = 1;
    corrupt(&b, "reserved");
    let mut b = good.clone();
    b[32] = 0x3;
    reseal(&mut b);
    corrupt(&b, "reserved");
    let mut b = good.clone();
    b[12..16].copy_from_slice(&512u32.to_le_bytes());
    reseal(&mut b);
    corrupt(&b, "block size 512");
    // Another format version is named.
    let mut b = good.clone();
    b[8..12].copy_from_slice(&3u32.to_le_bytes());
    match try_open(&b) {
        Err(
            e @ PresenceError::Version {
                found: 3,
                supported: 2,
                ..
            },
        ) => {
            assert!(e.to_string().contains("format version 3"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    // Truncated or extended files; a bit past the last block.
    corrupt(&good[..good.len() - 4096], "truncated");
    corrupt(&good[..100], "shorter than the 4096-byte header");
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 4096]);
    corrupt(&longer, "bytes, but a map of 50000 blocks");
    // A bit past the last block or reserved page bytes, under a valid page checksum.
    let last_page = (blocks - 1) / BPP;
    let mut b = good.clone();
    let r = blocks % BPP;
    b[4096 + (last_page * 4096 + r / 8) as usize] |= 1 << (r % 8);
    reseal_page(&mut b, 4, last_page);
    corrupt(&b, "past the last");
    let mut b = good.clone();
    b[4096 + last_page as usize * 4096 + 4087] = 1;
    reseal_page(&mut b, 4, last_page);
    corrupt(&b, "past the last");
    let mut b = good.clone();
    b[4096 + last_page as usize * 4096 + 4088] = 1;
    reseal_page(&mut b, 4, last_page);
    corrupt(&b, "reserved bytes");
    // A damaged page (no valid checksum) is no error: it reads as all-absent.
    let mut b = good.clone();
    b[4096 + 10] ^= 0x40;
    let m = try_open(&b).expect("a damaged page opens");
    assert_eq!((m.bad_pages(), m.count()), (&[0u64][..], 0));
    drop(m);

    // A valid map of another version or disk size.
    std::fs::write(&path, &good).expect("restore");
    match PresenceMap::open(&path, blocks, 5) {
        Err(PresenceError::Mismatch(s)) => {
            assert!(s.contains("belongs to version 4, not version 5"), "{s}")
        }
        other => panic!("{other:?}"),
    }
    match PresenceMap::open(&path, blocks + 1, 4) {
        Err(PresenceError::Mismatch(s)) => {
            assert!(
                s.contains("tracks 50000 blocks, but the disk has 50001"),
                "{s}"
            )
        }
        other => panic!("{other:?}"),
    }
    match PresenceMap::open_or_create(&path, blocks, 5) {
        Err(PresenceError::Mismatch(_)) => {}
        other => panic!("open_or_create must not replace a mismatched map: {other:?}"),
    }
    let m = PresenceMap::open(&path, blocks, 4).expect("the good bytes open");
    assert_eq!(m.count(), 1000);
}

#[test]
fn the_clean_flag_records_an_orderly_shutdown() {
    let (_t, path) = tempdir();
    let flags = |p: &Path| le_u32(&std::fs::read(p).expect("read"), 32);
    let m = PresenceMap::create(&path, 1000, 2).expect("create");
    assert!(m.was_clean());
    assert_eq!(flags(&path), 1);
    m.mark_dirty().expect("dirty");
    assert_eq!(flags(&path), 0, "durably cleared");
    m.mark_dirty().expect("twice is fine");
    m.insert(3);
    drop(m); // a crash, as far as the file knows

    let m = PresenceMap::open(&path, 1000, 2).expect("open");
    assert!(!m.was_clean());
    m.insert(4);
    m.close_clean().expect("close");
    assert_eq!(flags(&path), 1);
    drop(m);

    let m = PresenceMap::open(&path, 1000, 2).expect("open");
    assert!(m.was_clean());
    assert!(m.contains(4), "close_clean persists first");
    assert!(!m.contains(3), "never persisted");
    // Opening does not change the flag; only mark_dirty does.
    assert_eq!(flags(&path), 1);
    m.mark_dirty().expect("dirty");
    assert!(m.was_clean(), "was_clean is what open found");
    drop(m);
    assert!(!PresenceMap::open(&path, 1000, 2).expect("open").was_clean());
}

#[test]
fn next_absent_finds_gaps() {
    let m = PresenceMap::in_memory(300);
    assert_eq!(m.next_absent(0), Some(0));
    assert_eq!(m.next_absent(299), Some(299));
    assert_eq!(m.next_absent(300), None);
    m.insert_range(0, 64);
    assert_eq!(m.next_absent(0), Some(64));
    m.insert_range(64, 200);
    assert_eq!(m.next_absent(0), Some(264));
    assert_eq!(m.next_absent(270), Some(270));
    m.insert(270);
    assert_eq!(m.next_absent(270), Some(271));
    m.insert_range(264, 36);
    assert_eq!(m.next_absent(0), None);
    assert_eq!(m.next_absent(u64::MAX), None);
    // Padding bits in the last word never count as absent blocks.
    let m = PresenceMap::in_memory(65);
    m.insert_range(0, 65);
    assert_eq!(m.next_absent(0), None);
    assert!(m.contains_all(0, 65));
}

#[test]
fn threads_inserting_disjoint_ranges_count_exactly_while_persisting() {
    let (_t, path) = tempdir();
    let blocks: u64 = 8 * 70_001;
    let m = Arc::new(PresenceMap::create(&path, blocks, 1).expect("create"));
    m.mark_dirty().expect("dirty");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let persister = {
        let (m, stop) = (m.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                m.persist().expect("persist");
                n += 1;
            }
            n
        })
    };
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let m = m.clone();
            std::thread::spawn(move || {
                // Thread t owns [t * 70001, (t + 1) * 70001): ranges that share words and
                // pages with their neighbours. Even blocks one by one, then the rest in runs.
                let first = t * 70_001;
                for b in (first..first + 70_001).step_by(2) {
                    m.insert(b);
                    assert!(m.contains(b));
                }
                let mut b = first + 1;
                while b < first + 70_001 {
                    let n = (b % 97).min(first + 70_001 - b);
                    m.insert_range(b, n);
                    b += n.max(1);
                }
                m.insert_range(first, 70_001);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(persister.join().expect("persister") > 0);
    assert_eq!(m.count(), blocks);
    assert!(m.contains_all(0, blocks));
    assert_eq!(m.next_absent(0), None);
    m.persist().expect("persist");
    drop(m);
    let m = PresenceMap::open(&path, blocks, 1).expect("open");
    assert_eq!(m.count(), blocks);
}

#[test]
fn a_page_torn_by_a_power_cut_reads_as_absent_never_as_present() {
    let (_t, path) = tempdir();
    let blocks = 3 * BPP;
    let m = PresenceMap::create(&path, blocks, 6).expect("create");
    // Old: every third block of page 1 and of page 2.
    for b in (BPP..3 * BPP).step_by(3) {
        m.insert(b);
    }
    m.persist().expect("persist");
    let old = std::fs::read(&path).expect("read");
    // New: also every fifth block.
    for b in (BPP..3 * BPP).step_by(5) {
        m.insert(b);
    }
    m.persist().expect("persist");
    let new = std::fs::read(&path).expect("read");
    drop(m);
    assert_ne!(old, new);

    // Page 1 is bytes 8192..12288; a power cut keeps each of its 512-byte sectors old or new.
    let page = 4096 + 4096;
    let mut torn = new.clone();
    let mut kept_new = Vec::new();
    for s in 0..8 {
        let keep_new = (s * 5 + 1) % 3 != 0;
        kept_new.push(keep_new);
        if !keep_new {
            let r = page + s * 512..page + (s + 1) * 512;
            torn[r.clone()].copy_from_slice(&old[r]);
        }
    }
    assert!(kept_new.contains(&true) && kept_new.contains(&false));
    std::fs::write(&path, &torn).expect("write");

    // The torn page fails its checksum: all its blocks read as absent (the conservative
    // answer: served by the trusted version, copied again); page 2 reads as new.
    let m = PresenceMap::open(&path, blocks, 6).expect("a torn page opens");
    assert_eq!(m.bad_pages(), &[1]);
    let mut count = 0;
    for b in 0..blocks {
        let (n, got) = (bit(&new, b), m.contains(b));
        assert!(!got || n, "block {b}: present but never persisted");
        if (BPP..2 * BPP).contains(&b) {
            assert!(!got, "block {b} of the torn page");
        } else {
            assert_eq!(got, n, "block {b}");
        }
        count += u64::from(got);
    }
    assert_eq!(m.count(), count);
    // The next persist rewrites the page whole: consistent again.
    m.persist().expect("persist");
    drop(m);
    let m = PresenceMap::open(&path, blocks, 6).expect("open");
    assert!(m.bad_pages().is_empty());
    assert_eq!(m.count(), count);
}

#[test]
fn remove_deletes_the_file_and_tolerates_a_missing_one() {
    let (_t, path) = tempdir();
    drop(PresenceMap::create(&path, 10, 1).expect("create"));
    PresenceMap::remove(&path).expect("remove");
    assert!(!path.exists());
    PresenceMap::remove(&path).expect("already gone");
    PresenceMap::create(&path, 10, 1).expect("create again");
}

#[test]
fn maps_are_send_sync_and_debug() {
    fn shared<T: Send + Sync + std::fmt::Debug>() {}
    shared::<PresenceMap>();
    let m = PresenceMap::in_memory(10);
    m.insert(1);
    let d = format!("{m:?}");
    assert!(d.contains("present: 1"), "{d}");
    assert!(PresenceMap::create(Path::new("/nonexistent-dir/x.map"), 10, 1).is_err());
    let e = PresenceMap::open(Path::new("/"), 1u64 << 40, 1).expect_err("too many blocks");
    assert!(matches!(e, PresenceError::Invalid(_)), "{e}");
}

#[test]
fn grow_keeps_the_bits_adds_absent_blocks_and_never_shrinks() {
    let (_t, path) = tempdir();
    let old = BLOCKS_PER_PAGE + 100;
    let new = 3 * BLOCKS_PER_PAGE + 7;
    {
        let m = PresenceMap::create(&path, old, 9).expect("create");
        for b in [0, 63, 64, BLOCKS_PER_PAGE, old - 1] {
            m.insert(b);
        }
        m.close_clean().expect("close");
    }
    assert_eq!(PresenceMap::grow(&path, new, 9).expect("grow"), old);
    let len = std::fs::metadata(&path).expect("stat").len();
    assert_eq!(
        len,
        4096 + 4 * 4096,
        "the grown file's length is the format's"
    );
    let m = PresenceMap::open(&path, new, 9).expect("open grown");
    assert_eq!(m.blocks(), new);
    assert_eq!(m.count(), 5);
    for b in [0, 63, 64, BLOCKS_PER_PAGE, old - 1] {
        assert!(m.contains(b), "block {b} kept");
    }
    assert!(
        !m.contains(old) && !m.contains(new - 1),
        "new blocks absent"
    );
    assert!(m.was_clean(), "the clean flag is kept");
    drop(m);
    // Again: nothing to do. Smaller or of another key: refused, the map unchanged.
    assert_eq!(PresenceMap::grow(&path, new, 9).expect("again"), new);
    assert!(matches!(
        PresenceMap::grow(&path, old, 9),
        Err(PresenceError::Mismatch(_))
    ));
    assert!(matches!(
        PresenceMap::grow(&path, new + 1, 8),
        Err(PresenceError::Mismatch(_))
    ));
    PresenceMap::open(&path, new, 9).expect("still the grown map");
}
