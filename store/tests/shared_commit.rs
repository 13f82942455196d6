//! A root commit of a store with single-instance blocks does not hold the pool's lock while its
//! metadata is written and synced: another version shares blocks meanwhile. The blocks the
//! commit starts holding stay allocated through it, even when the version lets one go after
//! the commit's cut while it runs: a share of new bytes during the commit never gets such a
//! block.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dovetail_store::file::StoreFile;
use dovetail_store::sim::{Power, SimFile};
use dovetail_store::{SharedRef, Store, VersionSpace};

const EXT: u64 = 16 << 10;
const EXTENTS: u64 = 12;

/// The metadata file, whose sync waits for a go once armed (and says it started).
#[derive(Debug)]
struct GatedMeta {
    inner: SimFile,
    armed: AtomicBool,
    entered: Mutex<Sender<()>>,
    go: Mutex<Receiver<()>>,
}

impl StoreFile for GatedMeta {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.inner.write_at(offset, buf)
    }
    fn sync(&self) -> std::io::Result<()> {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.entered.lock().expect("lock").send(()).expect("send");
            self.go
                .lock()
                .expect("lock")
                .recv_timeout(Duration::from_secs(10))
                .expect("go");
        }
        self.inner.sync()
    }
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }
    fn set_size(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_size(len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.zero_range(offset, len)
    }
}

/// A view of the gated file for the store (the test keeps the gate).
#[derive(Debug)]
struct Shared(Arc<GatedMeta>);

impl StoreFile for Shared {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_at(offset, buf)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.sync()
    }
    fn size(&self) -> std::io::Result<u64> {
        self.0.size()
    }
    fn set_size(&self, len: u64) -> std::io::Result<()> {
        self.0.set_size(len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.zero_range(offset, len)
    }
}

fn block(fill: u8) -> Vec<u8> {
    vec![fill; 4096]
}

fn root_of(refs: &[SharedRef]) -> Vec<u8> {
    let mut r = Vec::new();
    for s in refs {
        r.extend_from_slice(&s.extent.0.to_le_bytes());
        r.extend_from_slice(&s.block.to_le_bytes());
    }
    r
}

#[test]
fn shares_go_on_during_a_root_commit_and_its_new_holds_stay_allocated() {
    let power = Power::new();
    let (entered_tx, entered) = channel();
    let (go, go_rx) = channel();
    let gate = Arc::new(GatedMeta {
        inner: SimFile::new(power.clone()),
        armed: AtomicBool::new(false),
        entered: Mutex::new(entered_tx),
        go: Mutex::new(go_rx),
    });
    let s = Store::create_on(
        Box::new(Shared(gate.clone())),
        Box::new(SimFile::new(power)),
        EXTENTS * EXT,
        EXT,
    )
    .expect("create")
    .enable_single_instance()
    .expect("single-instance");
    let t = s.create_disk("vm", 1 << 20, "toy").expect("disk");
    let c = s.add_version("vm", "toy").expect("version");
    let (t, c): (Arc<dyn VersionSpace>, Arc<dyn VersionSpace>) =
        (s.space(t).expect("space"), s.space(c).expect("space"));
    let a = t.share(&block(1)).expect("share").expect("shared");
    let cut = t.shared_cut();
    gate.armed.store(true, Ordering::SeqCst);
    let committing = {
        let t = t.clone();
        std::thread::spawn(move || t.commit_root_cut(&root_of(&[a]), cut))
    };
    entered
        .recv_timeout(Duration::from_secs(10))
        .expect("the commit reached its metadata sync");
    // The commit waits in its sync: its version lets the block go (after the cut: for its
    // next commit), and the other version shares new bytes meanwhile and does not get the
    // block the commit is making durable.
    t.release_shared(a).expect("release during the commit");
    let (tx, rx) = channel();
    let sharer = {
        let c = c.clone();
        std::thread::spawn(move || {
            let r = c.share(&block(2));
            tx.send(()).expect("send");
            r
        })
    };
    rx.recv_timeout(Duration::from_secs(5))
        .expect("a share completes while a root commit syncs its metadata");
    let b = sharer
        .join()
        .expect("sharer")
        .expect("share")
        .expect("shared");
    assert_ne!(
        b, a,
        "a block a commit in flight holds was handed out again"
    );
    go.send(()).expect("go");
    committing
        .join()
        .expect("committer")
        .expect("the commit succeeds");
    let mut buf = vec![0u8; 4096];
    s.read_shared(a, &mut buf).expect("read the held block");
    assert_eq!(buf, block(1), "the held block keeps its bytes");
    s.read_shared(b, &mut buf).expect("read the new block");
    assert_eq!(buf, block(2));
    assert_eq!(s.pool_status().used, 2, "both blocks in use");
    // The release is the next commit's: then the block is free for new bytes.
    t.commit_root(&root_of(&[])).expect("commit the release");
    assert_eq!(s.pool_status().used, 1);
    assert_eq!(
        t.share(&block(3)).expect("share"),
        Some(a),
        "reused once free"
    );
}
