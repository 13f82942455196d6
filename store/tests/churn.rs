//! A store whose disks are created, used and deleted all day (a VM host's daemon): what it
//! keeps in memory per disk goes with the disk.

use std::sync::Arc;

use dovetail_store::Store;

const EXT: u64 = 64 << 10;

#[test]
fn a_deleted_disk_leaves_no_version_counters_behind() {
    let t = tempfile::tempdir().expect("tempdir");
    let s: Arc<Store> = Store::create(&t.path().join("store"), 8 * EXT, EXT).expect("store");
    let keep = s.create_disk("keep", 1 << 20, "parallax-v1").expect("disk");
    let kept = s.space(keep).expect("space");
    for i in 0..40 {
        let name = format!("churn{i}");
        let key = s
            .create_disk(&name, 1 << 20, "parallax-v1")
            .expect("create");
        let space = s.space(key).expect("space");
        let e = space.grant_extent().expect("grant");
        space.write(e, 0, &[0x5a; 4096]).expect("write");
        space.sync().expect("sync");
        assert_eq!(
            s.tracked_versions(),
            2,
            "cycle {i}: the kept disk and this one"
        );
        assert_eq!(s.delete_disk(&name).expect("delete"), 1);
        assert_eq!(
            s.tracked_versions(),
            1,
            "cycle {i}: the deleted disk's counters are gone, the kept disk's stay"
        );
        // The space still held by a caller fails cleanly, as before.
        assert!(space.write(e, 0, &[1; 512]).is_err());
    }
    assert!(!s.lost_writes(keep));
    let e = kept.grant_extent().expect("grant");
    kept.write(e, 0, &[7; 4096])
        .expect("the kept disk still writes");
    kept.sync().expect("and syncs");
}
