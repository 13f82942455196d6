//! A disk formatted in the catalog commit that creates it (`Parallax::initial_root` with
//! `Store::create_disk_with_root`): its first open commits nothing, and it is the same disk
//! `Parallax::create_layout` makes on first use.

use dovetail_layout::{BlockLayout, Parallax, Sector, Sectors};
use dovetail_store::Store;

const EXTENT: u64 = 1 << 20;

#[test]
fn a_disk_created_with_its_root_opens_as_the_disk_create_layout_makes() {
    let t = tempfile::tempdir().expect("tempdir");
    let store = Store::create(&t.path().join("st"), 32 * EXTENT, EXTENT).expect("store");
    let size = Sectors(16 << 11); // 16 MiB
    for layout in ["parallax-v1", "parallax-v2"] {
        let root = Parallax::initial_root(layout, size, store.tiers().len()).expect("root");
        let a = store
            .create_disk_with_root(&format!("a-{layout}"), 16 << 20, layout, &root)
            .expect("create with its root");
        assert_eq!(store.version(a).expect("version").root_len, root.len());
        // The same disk as one formatted on first use (parallax-v2's record holds its
        // creation time, so only parallax-v1's bytes can be compared).
        let b = store
            .create_disk(&format!("b-{layout}"), 16 << 20, layout)
            .expect("create");
        let made = Parallax::create_layout(
            store.space(b).expect("space"),
            layout,
            size,
            Default::default(),
        )
        .expect("format on first use");
        drop(made);
        if layout == "parallax-v1" {
            assert_eq!(store.space(b).expect("space").root(), root);
        }
        // Its open commits nothing: the store's metadata is not written.
        let meta =
            std::fs::read(t.path().join("st").join(dovetail_store::META_FILE)).expect("meta");
        let disk = Parallax::open(store.space(a).expect("space")).expect("open");
        assert_eq!(disk.layout(), layout);
        assert_eq!(disk.capacity(), size);
        let after =
            std::fs::read(t.path().join("st").join(dovetail_store::META_FILE)).expect("meta");
        assert!(
            meta == after,
            "{layout}: opening the disk committed to the catalog"
        );
        // And it serves: a write read back, durable across a reopen.
        let data = vec![0xa5u8; 8192];
        disk.write(Sector(64), &data).expect("write");
        disk.flush().expect("flush");
        drop(disk);
        let disk = Parallax::open(store.space(a).expect("space")).expect("reopen");
        let mut back = vec![0u8; 8192];
        disk.read(Sector(64), &mut back).expect("read");
        assert!(back == data, "{layout}: read back differs");
        let mut zeros = vec![1u8; 4096];
        disk.read(Sector(0), &mut zeros).expect("read");
        assert!(
            zeros.iter().all(|&b| b == 0),
            "{layout}: an unwritten block reads zeros"
        );
    }
}
