//! A one-host Ceph cluster for a test (scripts/ceph-cluster.sh: one monitor, one memstore
//! OSD, no authentication, loopback), started by the test and stopped when it is dropped.
//! Without the Ceph packages a test is skipped with a message, except in CI (CI=true), where
//! it fails: scripts/test-deps.sh installs them. Shared by the bindings' tests and those of the store on RADOS
//! (`#[path]`-included from other crates' tests).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestCluster {
    dir: tempfile::TempDir,
    pub conf: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-cluster.sh")
}

impl TestCluster {
    /// Starts a cluster with the pools `pools`; `None` (after a message) when Ceph is not
    /// installed outside CI.
    pub fn start(pools: &[&str]) -> Option<TestCluster> {
        let have = Command::new("sh")
            .args([
                "-c",
                "command -v ceph-mon && command -v ceph-osd && command -v ceph",
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !have {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the Ceph packages are missing in CI: scripts/test-deps.sh installs ceph-mon ceph-osd ceph-common"
            );
            eprintln!("SKIPPED: ceph-mon/ceph-osd/ceph not installed (scripts/test-deps.sh installs them)");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new(script())
            .arg("start")
            .arg(dir.path().join("ceph"))
            .args(pools)
            .env("CEPH_MEMSTORE_BYTES", "536870912")
            .output()
            .expect("run scripts/ceph-cluster.sh");
        assert!(
            out.status.success(),
            "the test cluster did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(conf.exists(), "no config at {}", conf.display());
        Some(TestCluster { dir, conf })
    }

    /// A scratch directory that lives as long as the cluster.
    pub fn scratch(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path().join("ceph"))
            .status();
    }
}
