//! parallax-v2's annotations and taint labels: loaded, updated by requests, written at
//! commits, checked.

use super::*;

impl Parallax {
    /// parallax-v2: the disk's annotations (`None` for parallax-v1).
    pub fn annotations(&self) -> Option<&Table> {
        self.inner.ann.as_ref().map(|a| &a.table)
    }

    /// parallax-v2: the taint labels (empty for parallax-v1).
    pub fn labels(&self) -> Vec<Label> {
        labels_of(self.inner.read().v2.as_ref())
    }

    /// parallax-v2: turns taint label `name` on (every block written from now on gets it) or
    /// off, defining it on first use (at most [`MAX_LABELS`]). Committed before it returns, so
    /// the label and whether it is on survive a crash. Returns the label.
    pub fn set_taint(&self, name: &str, on: bool) -> Result<Label> {
        self.change_label(name, Some(on))
    }

    /// parallax-v2: defines taint label `name` (off) if the disk does not have it yet.
    pub fn define_label(&self, name: &str) -> Result<Label> {
        self.change_label(name, None)
    }

    /// Turns label `name` on or off (`None`: leaves it as it is), defining it if needed; turning
    /// off a label the disk does not have is an error.
    fn change_label(&self, name: &str, on: Option<bool>) -> Result<Label> {
        let inner = &*self.inner;
        let Some(ann) = &inner.ann else {
            return Err(Error::InvalidArgument(format!(
                "{} is a parallax-v1 disk, which keeps no annotations",
                inner.space.key()
            )));
        };
        dovetail_store::names::check_name(dovetail_store::names::NameKind::Label, name)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        // The change and the capture are one instant under the state lock; the commit is
        // persisted without it, like a FLUSH's.
        let (bit, active, committed) = inner.commit_change(
            |st| {
                let before = st.v2.clone();
                let Some(v2) = st.v2.as_mut() else {
                    return Err(Error::Corrupt("parallax-v2 state lost".to_string()));
                };
                let bit = match v2.labels.iter().position(|l| l == name) {
                    Some(i) => i,
                    None if on == Some(false) => {
                        return Err(Error::InvalidArgument(format!(
                            "the disk has no taint label named {name:?}"
                        )))
                    }
                    None if v2.labels.len() < MAX_LABELS => {
                        v2.labels.push(name.to_string());
                        v2.labels.len() - 1
                    }
                    None => {
                        return Err(Error::InvalidArgument(format!(
                            "taint label {name:?}: the disk has {MAX_LABELS} labels already"
                        )))
                    }
                };
                match on {
                    Some(true) => v2.active |= 1 << bit,
                    Some(false) => v2.active &= !(1u16 << bit),
                    None => {}
                }
                let active = v2.active;
                if Some(&*v2) == before.as_ref() {
                    // Nothing changes: no commit.
                    return Ok(commit::Change::Nothing((bit, active, None)));
                }
                // Blocks written from the capture on carry the new taint set (a failed
                // commit puts the old one back).
                let was = ann.table.active_taint();
                ann.table.set_active_taint(active);
                Ok(commit::Change::Commit(
                    (bit, active, Some((before, was))),
                    st.snapshots.clone(),
                ))
            },
            |st, (_, _, before)| {
                if let Some((v2, was)) = before {
                    st.v2 = v2;
                    ann.table.set_active_taint(was);
                }
            },
        )?;
        let label = Label {
            name: name.to_string(),
            bit: bit as u8,
            active: active & (1 << bit) != 0,
        };
        if committed.is_none() {
            return Ok(label);
        }
        log::info!(
            "parallax-v2: {}: taint label {name:?} {}",
            inner.space.key(),
            match on {
                Some(true) => "on",
                Some(false) => "off",
                None => "defined",
            }
        );
        Ok(label)
    }

    /// parallax-v2: the annotations as snapshot `name` froze them (with its labels).
    pub fn snapshot_annotations(&self, name: &str) -> Result<(Table, Vec<Label>)> {
        let inner = &*self.inner;
        let Some(ann) = &inner.ann else {
            return Err(Error::InvalidArgument(format!(
                "{} is a parallax-v1 disk, which keeps no annotations",
                inner.space.key()
            )));
        };
        let st = inner.read();
        let snap = st
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| Error::NoSuchSnapshot(name.to_string()))?;
        let table = Table::new(ann.table.blocks(), ann.table.epochs());
        let mut buf = vec![0u8; BLOCK_SIZE];
        for page in 0..table.pages() {
            inner.read_tree(
                &st,
                snap.root,
                snap.gen,
                (ann.at + page) * BLOCK_SIZE as u64,
                &mut buf,
            )?;
            table
                .load_page(page, &buf, u16::MAX)
                .map_err(|e| Error::Corrupt(format!("snapshot {name:?}: {e}")))?;
        }
        // Labels defined since keep their bits; the snapshot's blocks carry only older ones.
        Ok((table, labels_of(st.v2.as_ref())))
    }
}

fn labels_of(v2: Option<&V2Ext>) -> Vec<Label> {
    v2.map(|v| {
        v.labels
            .iter()
            .enumerate()
            .map(|(i, name)| Label {
                name: name.clone(),
                bit: i as u8,
                active: v.active & (1 << i) != 0,
            })
            .collect()
    })
    .unwrap_or_default()
}

impl Inner {
    /// parallax-v2: whether annotations changed since the last commit.
    /// A closed handle (grown into another) has nothing to commit.
    pub(super) fn annotations_dirty(&self) -> bool {
        !self.closed.load(std::sync::atomic::Ordering::SeqCst)
            && self.ann.as_ref().is_some_and(|a| a.table.dirty_pages() > 0)
    }

    /// parallax-v2: loads every annotation page of the live tree into the table. A page that
    /// fails validation is reported, reset to zeros and rewritten at the next commit: the
    /// annotations are never garbage, and the disk's data stays available.
    pub(super) fn load_annotations(&self, st: &State) -> Result<()> {
        let Some(ann) = &self.ann else {
            return Ok(());
        };
        let mask = label_mask(st.v2.as_ref());
        let mut buf = vec![0u8; BLOCK_SIZE];
        for page in 0..ann.table.pages() {
            self.read_tree(
                st,
                st.root,
                st.gen + 1,
                (ann.at + page) * BLOCK_SIZE as u64,
                &mut buf,
            )?;
            if let Err(e) = ann.table.load_page(page, &buf, mask) {
                log::warn!(
                    "parallax-v2: {}: annotation page {page} is bad ({e}); its blocks' \
                     annotations start again from zero",
                    self.space.key()
                );
                ann.table.mark_dirty(page);
            }
        }
        Ok(())
    }

    /// parallax-v2: puts the dirty annotation pages and checksum pages into the tree (as a
    /// commit is captured, under the state lock); their bytes go to `out`, which the commit
    /// writes with its nodes after releasing the lock ([`Inner::persist`]).
    pub(super) fn write_annotations(
        &self,
        st: &mut State,
        cache: &mut NodeCache,
        out: &mut Vec<(u64, Box<[u8; BLOCK_SIZE]>)>,
    ) -> Result<()> {
        self.write_sums(st, cache, out)?;
        let Some(ann) = &self.ann else {
            return Ok(());
        };
        let pages = ann.table.take_dirty();
        self.watch_taken(&pages, &[]);
        for (i, &page) in pages.iter().enumerate() {
            let mut buf = Box::new([0u8; BLOCK_SIZE]);
            ann.table.encode_page(page, &mut buf[..]);
            if let Err(e) = self.place_page(st, cache, ann.at + page, buf, out) {
                for &p in &pages[i..] {
                    ann.table.mark_dirty(p);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// parallax-v2: checks every annotation page of the live tree.
    pub(super) fn check_annotations(&self, st: &State) -> Vec<String> {
        let Some(ann) = &self.ann else {
            return Vec::new();
        };
        let scratch = Table::new(ann.table.blocks(), ann.table.epochs());
        let mask = label_mask(st.v2.as_ref());
        let mut buf = vec![0u8; BLOCK_SIZE];
        let mut problems = Vec::new();
        for page in 0..scratch.pages() {
            let at = (ann.at + page) * BLOCK_SIZE as u64;
            let r = self
                .read_tree(st, st.committed_root, st.gen, at, &mut buf)
                .map_err(|e| crate::error_chain(&e))
                .and_then(|()| {
                    scratch
                        .load_page(page, &buf, mask)
                        .map_err(|e| e.to_string())
                });
            if let Err(e) = r {
                problems.push(format!("annotation page {page}: {e}"));
            }
        }
        problems
    }

    pub(super) fn annotate_read(&self, at: Sector, len: usize) {
        if let Some(a) = &self.ann {
            a.table.record_read(at.0 * SECTOR_SIZE, len as u64);
        }
    }

    pub(super) fn annotate_write(&self, at: Sector, len: u64) {
        if let Some(a) = &self.ann {
            a.table.record_write(at.0 * SECTOR_SIZE, len);
        }
    }
}

/// The bits of the labels a disk defines.
fn label_mask(v2: Option<&V2Ext>) -> u16 {
    match v2.map_or(0, |v| v.labels.len()) {
        n if n >= 16 => u16::MAX,
        n => (1u16 << n) - 1,
    }
}
