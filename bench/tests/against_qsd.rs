//! The load generator against qemu-storage-daemon (the peer the benchmarks compare with), when it
//! is installed: negotiation, GET_CONFIG, multi-queue I/O and verify mode all work against a
//! backend that is not dovetail.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dovetail_bench::load::{self, Limit, Pattern, Workload};

const MIB: u64 = 1 << 20;

struct Qsd(Child);

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qsd_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-storage-daemon"))
        .find(|p| p.is_file())
}

fn start(bin: &Path, image: &Path, socket: &Path, queues: usize) -> Qsd {
    let child = Command::new(bin)
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={},cache.direct=off",
            image.display()
        ))
        .args(["--blockdev", "driver=raw,node-name=d0,file=f0", "--export"])
        .arg(format!(
            "type=vhost-user-blk,id=e0,addr.type=unix,addr.path={},node-name=d0,writable=on,\
             num-queues={queues}",
            socket.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start qemu-storage-daemon");
    let qsd = Qsd(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon made no socket"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    qsd
}

#[test]
fn verified_randrw_against_qemu_storage_daemon() {
    let Some(bin) = qsd_binary() else {
        // CI installs it (scripts/test-deps.sh); there a missing peer is a failure.
        assert!(
            std::env::var_os("CI").is_none(),
            "qemu-storage-daemon is not installed (scripts/test-deps.sh installs it)"
        );
        eprintln!("qemu-storage-daemon is not installed; skipped");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; (16 * MIB) as usize]).expect("image");
    let socket = dir.path().join("qsd.sock");
    let _qsd = start(&bin, &image, &socket, 2);

    let fill = Workload {
        iodepth: 8,
        queues: 2,
        limit: Limit::Passes(1),
        verify: true,
        ..Workload::new(Pattern::Write)
    };
    let (driver, device) = load::connect(&socket, &fill).expect("connect");
    assert_eq!(device.capacity, 16 * MIB);
    assert!(!device.read_only);
    let mut state = load::new_state(&fill, &device).expect("state");
    let r = load::run(&driver, &device, &fill, Some(&mut state)).expect("fill");
    assert_eq!((r.writes, r.io_errors), (16 * MIB / 4096, 0));

    let mixed = Workload {
        pattern: Pattern::RandRw,
        read_percent: 50,
        limit: Limit::Time(Duration::from_millis(300)),
        ..fill.clone()
    };
    let r = load::run(&driver, &device, &mixed, Some(&mut state)).expect("randrw");
    assert!(r.reads > 0 && r.writes > 0);
    assert_eq!(r.io_errors, 0);
    let v = r.verify.expect("verify summary");
    assert!(v.corrupt.is_empty(), "corrupt: {:?}", v.corrupt);
    assert_eq!(v.unknown, 0);
}
