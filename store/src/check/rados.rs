//! `store check` on a store on RADOS: the same store-level invariants as a file store's (its
//! header, the catalog, the grant table, the tier header in its data objects), read from its
//! metadata object, then each version handed to its layout's check. A process holding the
//! store does not stop it: a pass counts only if the generation did not change during it.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::{LayoutCheck, Report, BESIDE_WRITER_PASSES};
use crate::format::{validate, Header, Meta};
use crate::rados::{ObjectFile, RadosMeta, RadosUrl};
use crate::space::{Result, StoreError};
use crate::store::{tier_header_problem, tier_status, Store, StoreInfo};

/// Checks the store at `url`, then each version whose layout has a checker in `layouts`.
pub fn check(url: &RadosUrl, layouts: &[&dyn LayoutCheck]) -> Result<Report> {
    let rm = RadosMeta::connect(url)?;
    let holders = rm.holders()?;
    for pass in 1..=BESIDE_WRITER_PASSES {
        let before = rm.generation()?;
        let mut r = check_once(&rm, url, layouts, !holders.is_empty())?;
        let after = rm.generation()?;
        let read = r.info.as_ref().map(|i| i.generation);
        if r.info.is_none() || (before == after && read == Some(before)) {
            if !holders.is_empty() {
                r.beside_writer = true;
                r.notes.push(format!(
                    "the store is held by {} (a daemon serving it): checked its last committed \
                     metadata, generation {before}, in pass {pass}",
                    holders.join(", ")
                ));
            }
            return Ok(r);
        }
        std::thread::sleep(std::time::Duration::from_millis(u64::from(pass) * 5));
    }
    let mut r = check_once(&rm, url, &[], true)?;
    r.beside_writer = true;
    r.unchecked = Some(format!(
        "the layout-level checks (each version's tree): the store's holder committed during \
         each of {BESIDE_WRITER_PASSES} passes; run the check again when the disks are quieter"
    ));
    Ok(r)
}

fn check_once(
    rm: &RadosMeta,
    url: &RadosUrl,
    layouts: &[&dyn LayoutCheck],
    beside_writer: bool,
) -> Result<Report> {
    let location = url.path();
    let mut r = Report {
        location: location.clone(),
        ..Report::default()
    };
    let loaded = match rm.load() {
        Ok(l) => l,
        Err(e @ (StoreError::Io { .. } | StoreError::NotAStore { .. })) => return Err(e),
        Err(e) => {
            r.violations.push(format!("metadata object: {e}"));
            return Ok(r);
        }
    };
    let header = match Header::decode(&loaded.header, &location) {
        Ok(h) => h,
        Err(e) => {
            r.violations.push(format!("header: {e}"));
            return Ok(r);
        }
    };
    r.slots.clear();
    let (m, recorded_free) = match Meta::decode(&loaded.catalog, header.version) {
        Ok(x) => x,
        Err(e) => {
            r.violations.push(format!("catalog: {e}"));
            return Ok(r);
        }
    };
    r.violations.extend(validate(&header, &m, recorded_free));
    let mut tiers = tier_status(&header, None, &m.owners);
    for (i, t) in tiers.iter_mut().enumerate() {
        let place = match header.tiers.get(i).map(|rec| url.tier_pool(&rec.path)) {
            Some(Ok(pool)) if pool != url.pool => format!("{pool}/"),
            _ => String::new(),
        };
        t.path = PathBuf::from(format!("{place}{}*", url.data_prefix(i)));
    }
    r.info = Some(StoreInfo {
        format_version: header.version,
        uuid: header.uuid,
        extent_size: header.extent_size,
        extent_count: header.extent_count,
        free_extents: m.free_extents(),
        generation: loaded.generation,
        tiers,
    });
    r.disks = m.disks.iter().map(|d| Store::disk_info(&m, d)).collect();
    r.versions = m.versions.iter().map(Store::version_info).collect();
    for (t, rec) in header.tiers.iter().enumerate() {
        let pool = match url.tier_pool(&rec.path).and_then(|p| rm.data_in(&p)) {
            Ok(p) => p,
            Err(e) => {
                r.violations.push(format!("tier {}: {e}", rec.name));
                continue;
            }
        };
        let file = ObjectFile::new(
            pool,
            url.data_prefix(t),
            loaded.object_size.max(1),
            header.tier_file_len(t),
        );
        if let Some(problem) = tier_header_problem(&file, &header, t)? {
            r.violations
                .push(format!("tier {}: its data objects' {problem}", rec.name));
        }
    }
    if !r.violations.is_empty() {
        return Ok(r);
    }
    let mut unchecked = BTreeSet::new();
    let mut work = Vec::new();
    for v in &r.versions {
        match layouts.iter().find(|c| c.layout() == v.layout) {
            Some(c) => work.push((v.clone(), *c)),
            None => {
                unchecked.insert(v.layout.clone());
            }
        }
    }
    for l in unchecked {
        r.notes.push(format!(
            "no layout-level check for {l}: only store-level invariants were checked for its versions"
        ));
    }
    if work.is_empty() {
        return Ok(r);
    }
    let store = Store::open_rados(url, true, beside_writer)?;
    for (v, c) in work {
        let space = store.space(v.key)?;
        for problem in c.check(&v, space) {
            r.violations.push(format!(
                "{} (disk {:?}, {}): {problem}",
                v.key, v.disk, v.layout
            ));
        }
    }
    Ok(r)
}
