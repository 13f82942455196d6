//! parallax-v2 data checksums: a crc32c of every guest data block, kept in memory (one atomic
//! per block, so a write updates its block's entry without a lock) and stored as *checksum
//! pages* in tree blocks after the annotation pages, so they are copy-on-write, committed
//! atomically with the data and frozen by snapshots, like the annotations. Byte-by-byte
//! format: docs/format.md ("Checksum page").
//!
//! An entry of 0 means *no checksum*: the block is unwritten, or was written before the disk
//! had checksums (extension version 1 or 2) and has not been rewritten since. A block whose
//! crc32c happens to be 0 is stored as 0 too, so it goes unverified (one chance in 2^32).

use dovetail_store::ExtentId;

use super::cache::NodeCache;
use super::format::{
    decode_compressed, depth_for, make_ptr, show_ptr, RootRecord, BLOCK_SIZE, NULL,
    SECTORS_PER_BLOCK,
};
use super::sumpage::{block_sum, decode_page, PER_PAGE};
use super::{locate, Inner, Run, State};
use crate::{Error, IoBufs, Result, Sectors};
/// Where the checksums of the tree being read come from.
#[derive(Debug, Clone, Copy)]
pub(super) enum Source {
    /// The live tree: the in-memory table.
    Live,
    /// Another tree (a snapshot, the committed tree): its own checksum pages.
    Tree { root: u64, gen: u64 },
}

/// Most bad blocks [`Inner::check_data`] lists one by one before summarising.
const MAX_LISTED: usize = 64;

impl Inner {
    /// The checksums of the tree at `root`: the live table when it is the live tree (a
    /// snapshot taken just now shares the live root, and then its checksums too).
    pub(super) fn sums_source(&self, st: &State, root: u64, gen: u64) -> Source {
        if root == st.root {
            Source::Live
        } else {
            Source::Tree { root, gen }
        }
    }

    /// Whether tree block `b` is a guest block whose checksum is kept.
    #[inline]
    pub(super) fn is_checked(&self, b: u64) -> bool {
        self.sums.as_ref().is_some_and(|(s, _)| b < s.blocks())
    }

    /// Records the checksum of guest block `b`, which now holds `data` (4 KiB).
    #[inline]
    pub(super) fn note_sum(&self, b: u64, data: &[u8]) {
        if let Some((s, _)) = &self.sums {
            if b < s.blocks() && data.len() == BLOCK_SIZE {
                s.set(b, block_sum(data));
            }
        }
    }

    /// Forgets the checksums of guest blocks `first..first + n` (a write to them failed).
    pub(super) fn forget_sums(&self, first: u64, n: u64) {
        if let Some((s, _)) = &self.sums {
            for b in first..first.saturating_add(n).min(s.blocks()) {
                s.set(b, 0);
            }
        }
    }

    /// Reads the whole block at `ptr`, which holds tree block `b` of the live tree, verified
    /// against its checksum when it has one.
    pub(super) fn read_block_live(&self, ptr: u64, b: u64, out: &mut [u8]) -> Result<()> {
        let want = match &self.sums {
            Some((s, _)) => s.get(b),
            None => 0,
        };
        self.read_block_checked(ptr, b, want, out)
    }

    /// Reads the whole block at `ptr` (tree block `b`) into `out` (4 KiB) from a copy whose
    /// checksum is `want` (0: none to check), repairing bad copies from a good one; an error
    /// naming the block when no copy matches: never wrong data.
    pub(super) fn read_block_checked(
        &self,
        ptr: u64,
        b: u64,
        want: u32,
        out: &mut [u8],
    ) -> Result<()> {
        if want == 0 {
            return self.read_data(ptr, 0, out);
        }
        let (extent, index) = locate(ptr)?;
        match self.members(extent) {
            Some(m) if !m.kind.compressed && m.all().len() > 1 => {
                let at = u64::from(index) * BLOCK_SIZE as u64;
                if self.read_copies(extent, at, out, &|d| block_sum(d) == want)? {
                    return Ok(());
                }
            }
            _ => {
                self.read_data(ptr, 0, out)?;
                if block_sum(out) == want {
                    return Ok(());
                }
            }
        }
        Err(bad_block(b, ptr, block_sum(out), want))
    }

    /// The checksums of `n` tree blocks from `first` in the tree `src` (0 past the guest's
    /// blocks, and for blocks without one).
    fn expected(&self, st: &State, src: Source, first: u64, n: u64) -> Result<Vec<u32>> {
        let Some((sums, _)) = &self.sums else {
            return Ok(vec![0; n as usize]);
        };
        let mut out = Vec::with_capacity(n as usize);
        let mut page: Option<(u64, Vec<u32>)> = None;
        for b in first..first + n {
            if b >= sums.blocks() {
                out.push(0);
                continue;
            }
            match src {
                Source::Live => out.push(sums.get(b)),
                Source::Tree { root, gen } => {
                    let p = b / PER_PAGE;
                    if page.as_ref().is_none_or(|(q, _)| *q != p) {
                        page = Some((p, self.tree_sums_page(st, root, gen, p)?));
                    }
                    out.push(page.as_ref().map_or(0, |(_, l)| l[(b % PER_PAGE) as usize]));
                }
            }
        }
        Ok(out)
    }

    /// Checksum page `page` of the tree at `root` (all zero if it was never written).
    fn tree_sums_page(&self, st: &State, root: u64, gen: u64, page: u64) -> Result<Vec<u32>> {
        let mut list = vec![0u32; PER_PAGE as usize];
        let Some((sums, at)) = &self.sums else {
            return Ok(list);
        };
        let ptr = self.resolve_shared(&st.alloc, root, gen, at + page)?;
        if ptr == NULL {
            return Ok(list);
        }
        let mut buf = vec![0u8; BLOCK_SIZE];
        self.read_data(ptr, 0, &mut buf)?;
        decode_page(&buf, page, sums.blocks(), &mut list).map_err(|why| {
            Error::Corrupt(format!("checksum page {page} at {}: {why}", show_ptr(ptr)))
        })?;
        Ok(list)
    }

    /// Reads run `r` of the tree `src` into `out` (the run's bytes), verifying every guest
    /// block that has a checksum (partial blocks are read whole to be verified).
    pub(super) fn read_run_checked(
        &self,
        st: &State,
        src: Source,
        r: &Run,
        out: &mut [u8],
    ) -> Result<()> {
        if !self.is_checked(r.block) {
            return self.read_data(r.ptr, r.off, out);
        }
        let n = (r.off + r.len).div_ceil(BLOCK_SIZE);
        let expect = self.expected(st, src, r.block, n as u64)?;
        if expect.iter().all(|&s| s == 0) {
            return self.read_data(r.ptr, r.off, out);
        }
        let (extent, index) = locate(r.ptr)?;
        if r.off == 0 && r.len % BLOCK_SIZE == 0 {
            self.read_data(r.ptr, 0, out)?;
            for (k, chunk) in out.chunks_mut(BLOCK_SIZE).enumerate() {
                if expect[k] != 0 && block_sum(chunk) != expect[k] {
                    let ptr = make_ptr(extent, index + k as u32);
                    self.read_block_checked(ptr, r.block + k as u64, expect[k], chunk)?;
                }
            }
            return Ok(());
        }
        let mut tmp = [0u8; BLOCK_SIZE];
        let (mut done, mut within) = (0usize, r.off);
        for (k, &want) in expect.iter().enumerate() {
            let ptr = make_ptr(extent, index + k as u32);
            self.read_block_checked(ptr, r.block + k as u64, want, &mut tmp)?;
            let m = (BLOCK_SIZE - within).min(r.len - done);
            out[done..done + m].copy_from_slice(&tmp[within..within + m]);
            done += m;
            within = 0;
        }
        Ok(())
    }

    /// [`read_run_checked`](Inner::read_run_checked) into a guest's buffers (`iov`: the
    /// run's part of `bufs`): whole blocks of one copy go straight from the store into them
    /// and are verified there; anything else goes through a buffer of ours.
    pub(super) fn read_run_into_checked(
        &self,
        st: &State,
        src: Source,
        r: &Run,
        bufs: IoBufs<'_>,
        iov: &[libc::iovec],
    ) -> Result<()> {
        let (extent, index) = locate(r.ptr)?;
        let single = self
            .members(extent)
            .is_none_or(|m| !m.kind.compressed && m.all().len() == 1);
        let whole = r.off == 0 && r.len % BLOCK_SIZE == 0;
        if !(single && whole && matches!(src, Source::Live)) {
            let mut tmp = vec![0u8; r.len];
            self.read_run_checked(st, src, r, &mut tmp)?;
            // SAFETY: the iovecs lie within `bufs`, valid for writes while it lives (the
            // contract of `IoBufs::new`), which outlasts this call; `tmp` is ours and as long.
            unsafe { dovetail_store::file::copy_to_iovecs(&tmp, iov) };
            return Ok(());
        }
        // SAFETY: as above.
        unsafe {
            self.space
                .read_raw(extent, u64::from(index) * BLOCK_SIZE as u64, iov)
        }?;
        let mut block = [0u8; BLOCK_SIZE];
        let mut part = Vec::with_capacity(4);
        for k in 0..r.len / BLOCK_SIZE {
            let b = r.block + k as u64;
            let want = match &self.sums {
                Some((s, _)) => s.get(b),
                None => 0,
            };
            if want == 0 {
                continue;
            }
            part.clear();
            bufs.iovecs(r.at + k * BLOCK_SIZE, BLOCK_SIZE, &mut part);
            let mut at = 0usize;
            for v in &part {
                // SAFETY: each iovec lies within `bufs`, valid for reads while it lives, and
                // is at most as long as what is left of `block` (they cover 4 KiB in all).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        v.iov_base as *const u8,
                        block[at..].as_mut_ptr(),
                        v.iov_len,
                    )
                };
                at += v.iov_len;
            }
            if block_sum(&block) == want {
                continue;
            }
            let ptr = make_ptr(extent, index + k as u32);
            self.read_block_checked(ptr, b, want, &mut block)?;
            // SAFETY: as above; `block` is ours and 4 KiB, as long as `part`.
            unsafe { dovetail_store::file::copy_to_iovecs(&block, &part) };
        }
        Ok(())
    }

    /// Loads the checksum pages of the live tree into the table. A page that fails
    /// validation fails the open (like a bad tree node): its blocks could not be verified.
    pub(super) fn load_sums(&self, st: &State) -> Result<()> {
        let Some((sums, _)) = &self.sums else {
            return Ok(());
        };
        for page in 0..sums.pages() {
            let list = self.tree_sums_page(st, st.root, st.gen + 1, page)?;
            let lo = page * PER_PAGE;
            for (i, v) in list.into_iter().enumerate() {
                let b = lo + i as u64;
                if b < sums.blocks() {
                    sums.restore(b, v);
                }
            }
        }
        Ok(())
    }

    /// Puts the changed checksum pages into the tree (as a commit is captured); their bytes
    /// go to `out`, for the commit to write with its nodes.
    pub(super) fn write_sums(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        out: &mut Vec<(u64, Box<[u8; BLOCK_SIZE]>)>,
    ) -> Result<()> {
        let Some((sums, at)) = &self.sums else {
            return Ok(());
        };
        let pages = sums.take_dirty();
        self.watch_taken(&[], &pages);
        for (i, &page) in pages.iter().enumerate() {
            let mut buf = Box::new([0u8; BLOCK_SIZE]);
            sums.encode(page, &mut buf[..]);
            if let Err(e) = self.place_page(st, cache, at + page, buf, out) {
                for &p in &pages[i..] {
                    sums.mark_dirty(p);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Verifies every copy of every guest data block of the live tree and of every snapshot
    /// against its checksum; names each bad block (and counts those without a checksum).
    /// Takes the cache's lock itself (after reading the snapshots' checksum pages, which
    /// takes it too).
    pub(super) fn check_data(&self, st: &State) -> Vec<String> {
        let mut problems = Vec::new();
        let Some((sums, _)) = &self.sums else {
            return problems;
        };
        let mut trees: Vec<(String, u64, u64, Source)> = vec![(
            "the live tree".to_string(),
            st.root,
            st.gen + 1,
            Source::Live,
        )];
        for s in &st.snapshots {
            trees.push((
                format!("snapshot {:?}", s.name),
                s.root,
                s.gen,
                self.sums_source(st, s.root, s.gen),
            ));
        }
        let mut bad = 0usize;
        let mut raw = [0u8; BLOCK_SIZE];
        let mut plain = [0u8; BLOCK_SIZE];
        for (name, root, gen, src) in trees {
            // A snapshot's checksums, read before the walk locks the cache.
            let mut table: Vec<u32> = Vec::new();
            if let Source::Tree { root, gen } = src {
                for p in 0..sums.pages() {
                    match self.tree_sums_page(st, root, gen, p) {
                        Ok(list) => table.extend(list),
                        Err(e) => {
                            problems.push(format!("{name}: {}", crate::error_chain(&e)));
                            break;
                        }
                    }
                }
            }
            let mut cache = self.cache();
            let mut visit = |b: u64, ptr: u64| -> Result<()> {
                if b >= sums.blocks() {
                    return Ok(());
                }
                let want = match src {
                    Source::Live => sums.get(b),
                    Source::Tree { .. } => table.get(b as usize).copied().unwrap_or(0),
                };
                if want == 0 {
                    return Ok(());
                }
                let (extent, index) = locate(ptr)?;
                let m = self.members(extent);
                let copies: Vec<ExtentId> = m.map_or(vec![extent], |m| m.all().to_vec());
                let compressed = m.is_some_and(|m| m.kind.compressed);
                for e in copies {
                    let at = u64::from(index) * BLOCK_SIZE as u64;
                    let got = match self.space.read(e, at, &mut raw) {
                        Err(err) => Err(crate::error_chain(&Error::from(err))),
                        Ok(()) if compressed => decode_compressed(&raw, &mut plain)
                            .map(|()| block_sum(&plain))
                            .map_err(|why| format!("compressed block: {why}")),
                        Ok(()) => Ok(block_sum(&raw)),
                    };
                    let why = match got {
                        Ok(sum) if sum == want => continue,
                        Ok(sum) => format!("crc32c {sum:#010x}, expected {want:#010x}"),
                        Err(why) => why,
                    };
                    bad += 1;
                    if bad <= MAX_LISTED {
                        problems.push(format!(
                            "{name}: block {b} (the copy at {} block {index}) fails its data \
                             checksum: {why}",
                            e
                        ));
                    }
                }
                Ok(())
            };
            if let Err(e) = self.walk_data(&st.alloc, &mut cache, root, gen, &mut visit) {
                problems.push(format!("{name}: {}", crate::error_chain(&e)));
            }
        }
        if bad > MAX_LISTED {
            problems.push(format!("... and {} more bad data blocks", bad - MAX_LISTED));
        }
        problems
    }
}

fn bad_block(b: u64, ptr: u64, got: u32, want: u32) -> Error {
    Error::Corrupt(format!(
        "data block {b} (at {}) fails its checksum (crc32c {got:#010x}, expected \
         {want:#010x}): its data was destroyed or damaged on the store",
        show_ptr(ptr)
    ))
}

/// parallax-v2 written before data checksums (extension version 1 or 2): the tree grows by
/// the checksum pages, in memory, and the next commit writes extension version 3. Blocks
/// written before have no checksum until they are rewritten. A tree that would need another
/// level for the pages stays as it is (no checksums; migrating the disk to a new
/// parallax-v2 version gives it them).
pub(super) fn upgrade(record: &mut RootRecord, key: dovetail_store::VersionKey) {
    let Some(v2) = record.v2.as_mut() else {
        return;
    };
    if v2.sums {
        return;
    }
    let blocks = v2.tree_blocks(true);
    if depth_for(blocks) != record.depth {
        log::warn!(
            "parallax-v2: {key}: written before data checksums, and its tree would need another \
             level to hold them: it stays without data checksums (migrate it to a new \
             parallax-v2 version to get them)"
        );
        return;
    }
    v2.sums = true;
    record.capacity = Sectors(blocks * SECTORS_PER_BLOCK);
    log::info!(
        "parallax-v2: {key}: upgraded to data checksums (extension version 3, written at the \
         next commit); blocks written before have none until they are rewritten"
    );
}
