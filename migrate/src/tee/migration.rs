//! Migration through the Tee: blocks copied to the candidate under their stripes, and the
//! checkpoint (candidate flush, then presence persist) that makes them durable.

use super::*;

impl Inner {
    /// Migrates the run of blocks `[first, first + count)` that the candidate does not hold yet:
    /// each is read from the trusted version under its stripe, held shared (so no guest write
    /// to it is in flight or starts until it is marked present; guest reads of the batch go
    /// on: they read the candidate only for blocks already present, which this leaves alone),
    /// turned into the candidate's block by `upgrade`, written to the candidate
    /// (all-zero blocks as `write_zeroes(unmap)`: holes stay holes, nothing is copied) and
    /// marked present. Blocks that became present meanwhile (a guest write migrated them) are
    /// skipped. Returns (blocks written with data, all-zero blocks), or `None` once the
    /// candidate is quarantined or the Tee closed.
    pub(crate) fn migrate_blocks(
        &self,
        first: u64,
        count: u64,
        upgrade: &dyn crate::upgrade::Upgrade,
        buf: &mut Vec<u8>,
    ) -> dovetail_layout::Result<Option<(u64, u64)>> {
        let Ok(_g) = self.gate() else {
            return Ok(None);
        };
        let last = (first + count).min(self.blocks).saturating_sub(1);
        if first > last {
            return Ok(Some((0, 0)));
        }
        // Shared: the other holders of shared stripes (reads, the lazy check, promote's
        // verification) read the candidate only for blocks already present, which this skips.
        let _stripes = self.stripes.lock(first, last, Mode::Shared);
        // One read of the whole batch from the trusted version, then one candidate call per
        // run of consecutive absent blocks of the same kind (data or all zero).
        let start = first * BLOCK;
        let len = (self.block_end(last) - start) as usize;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let absent: Vec<u64> = (first..=last)
            .filter(|&b| !self.presence.contains(b))
            .collect();
        if absent.is_empty() {
            return Ok(Some((0, 0)));
        }
        self.trusted
            .read_quiet(Sector(start / SECTOR_SIZE), &mut buf[..len])?;
        let (mut data, mut zero) = (0u64, 0u64);
        let mut i = 0;
        while i < absent.len() {
            if self.is_quarantined() {
                return Ok(None);
            }
            let b0 = absent[i];
            let block_of = |b: u64| {
                let o = ((b - first) * BLOCK) as usize;
                o..o + (self.block_end(b) - b * BLOCK) as usize
            };
            let is_zero = |b: u64| buf[block_of(b)].iter().all(|&x| x == 0);
            let kind = is_zero(b0);
            let mut j = i + 1;
            while j < absent.len() && absent[j] == absent[j - 1] + 1 && is_zero(absent[j]) == kind {
                j += 1;
            }
            let b1 = absent[j - 1];
            let at = Sector(b0 * BLOCK / SECTOR_SIZE);
            let run = block_of(b0).start..block_of(b1).end;
            let req = RequestInfo {
                op: "migrate",
                sector: at.0,
                sectors: run.len() as u64 / SECTOR_SIZE,
                seq: 0,
            };
            let written = if kind {
                zero += b1 - b0 + 1;
                self.call_candidate(|c| {
                    c.write_zeroes(at, Sectors(run.len() as u64 / SECTOR_SIZE), true)
                })
            } else {
                data += b1 - b0 + 1;
                for b in b0..=b1 {
                    let r = block_of(b);
                    if let Err(e) = upgrade.upgrade_block(b, &mut buf[r]) {
                        self.quarantine(
                            &format!("the upgrade code failed on block {b}: {}", error_chain(&e)),
                            Some(req),
                        );
                        return Ok(None);
                    }
                }
                self.call_candidate(|c| c.write(at, &buf[run.clone()]))
            };
            if let Err(f) = written {
                self.candidate_failed("migrate", Some(req), f);
                return Ok(None);
            }
            dovetail_store::failpoint::hit("copyout-batch");
            for b in b0..=b1 {
                if let Err(e) = upgrade.migrated(b) {
                    self.quarantine(
                        &format!("the upgrade code failed on block {b}: {}", error_chain(&e)),
                        Some(req),
                    );
                    return Ok(None);
                }
                self.presence.insert(b);
            }
            i = j;
        }
        Ok(Some((data, zero)))
    }

    /// Makes what migration copied durable: the candidate's data first, then the presence map
    /// (a bit on disk says the candidate holds the block durably).
    pub(crate) fn migration_checkpoint(&self) -> dovetail_layout::Result<bool> {
        let Ok(_g) = self.gate() else {
            return Ok(false);
        };
        if self.is_quarantined() {
            return Ok(false);
        }
        if let Err(f) = self.call_candidate(|c| c.flush()) {
            self.candidate_failed("flush (migration)", None, f);
            return Ok(false);
        }
        dovetail_store::failpoint::hit("copyout-checkpoint");
        if let Err(e) = self.presence.persist() {
            self.quarantine(
                &format!(
                    "the presence map could not be persisted: {}",
                    error_chain(&e)
                ),
                None,
            );
            return Ok(false);
        }
        Ok(true)
    }
}
