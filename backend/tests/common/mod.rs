//! Test plumbing shared by the integration tests: a daemon running `serve` in a background
//! thread, and the in-process vhost-user frontend from `dovetail-bench` acting as the guest
//! driver.
//!
//! The driver (`dovetail_bench::driver`) owns guest memory (a memfd shared with the daemon),
//! negotiates over the daemon's socket like QEMU does, lays out one split virtqueue per queue in
//! that memory, and submits descriptor chains on them, waiting for completions on the call
//! eventfd with a timeout. [`TestDriver`] turns its errors into test failures.

#![allow(dead_code)]

use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dovetail_backend::{listen, serve, DeviceConfig, Disk, ListenOn, ServeError, Shutdown};
use dovetail_store::thread_kind::ThreadKind;
// Each test binary uses its own subset.
use dovetail_backend::disk::Engine;
#[allow(unused_imports)]
pub use dovetail_bench::driver::{
    header, BlkConfig, Buf, Completion, DriverOptions, RangeSeg, Req, GUEST_BASE, S_IOERR, S_OK,
    S_UNSUPP, WRITE_ZEROES_UNMAP,
};
use dovetail_bench::driver::{Driver, DriverError};
#[allow(unused_imports)]
pub use dovetail_bench::fill::pattern;
use dovetail_layout::raw::RawOptions;
use dovetail_layout::{CacheMode, RawLayout};

/// Serial given to disks made by the helpers below.
pub const SERIAL: &str = "dovetail-test-0001";
/// How long any wait on the daemon may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Enables `RUST_LOG=...` output in tests (once per process).
pub fn init_logging() {
    let _ = env_logger::builder().is_test(true).try_init();
}

// ------------------------------------------------------------------------------------------------
// Disks and the daemon.

/// The cache mode of the raw images the helpers open: `DOVETAIL_TEST_CACHE` (`none` or
/// `writeback`, the default), so every in-process I/O test can run on both
/// (scripts/test.sh runs them again with `none`).
pub fn test_cache() -> CacheMode {
    match std::env::var("DOVETAIL_TEST_CACHE") {
        Ok(v) => v.parse().expect("DOVETAIL_TEST_CACHE"),
        Err(_) => CacheMode::Writeback,
    }
}

/// The I/O engine of the disks the helpers make: `DOVETAIL_TEST_ENGINE` (`auto`, the
/// default, `threads` or `sync`).
pub fn test_engine() -> Engine {
    match std::env::var("DOVETAIL_TEST_ENGINE") {
        Ok(v) => v.parse().expect("DOVETAIL_TEST_ENGINE"),
        Err(_) => Engine::Auto,
    }
}

/// A raw image of `size` bytes at `path` (created if missing) with this cache mode, served
/// with this engine.
pub fn raw_disk_with(
    path: &Path,
    size: Option<u64>,
    read_only: bool,
    cache: CacheMode,
    engine: Engine,
) -> Arc<Disk> {
    let layout = RawLayout::open(
        path,
        RawOptions {
            create_size: size,
            read_only,
            cache: Some(cache),
        },
    )
    .expect("open raw image");
    Arc::new(
        Disk::new(Arc::new(layout), read_only, SERIAL)
            .expect("serial fits")
            .with_engine(engine),
    )
}

/// Creates a zero-filled raw image of `size` bytes at `path` and serves it.
pub fn raw_disk(path: &Path, size: u64, read_only: bool) -> Arc<Disk> {
    raw_disk_with(path, Some(size), read_only, test_cache(), test_engine())
}

/// Opens an existing raw image.
pub fn open_raw_disk(path: &Path, read_only: bool) -> Arc<Disk> {
    raw_disk_with(path, None, read_only, test_cache(), test_engine())
}

/// `DOVETAIL_TEST_SECCOMP` (`trap` or `log`): the in-process server's threads (its serve
/// loops, queue workers, I/O threads) run under the daemon's seccomp filters, as
/// `serve --seccomp MODE` runs them. Whether it is set.
pub fn test_seccomp() -> bool {
    let Ok(mode) = std::env::var("DOVETAIL_TEST_SECCOMP") else {
        return false;
    };
    let mode = <dovetail_backend::sandbox::SeccompMode as clap::ValueEnum>::from_str(&mode, true)
        .expect("DOVETAIL_TEST_SECCOMP is trap, log or off");
    dovetail_backend::sandbox::enable_seccomp(mode);
    mode != dovetail_backend::sandbox::SeccompMode::Off
}

/// `serve` running in a background thread on a socket in a temporary directory.
#[derive(Debug)]
pub struct TestServer {
    dir: tempfile::TempDir,
    socket: PathBuf,
    shutdown: Arc<Shutdown>,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
}

impl TestServer {
    /// Listens on a fresh socket and serves `disk` with `num_queues` queues.
    pub fn start(disk: Arc<Disk>, num_queues: usize) -> TestServer {
        init_logging();
        let dir = tempfile::tempdir().expect("socket tempdir");
        let socket = dir.path().join("vhost-user-blk.sock");
        // Bound before the thread starts, so a frontend may connect as soon as this returns.
        let mut listener = listen(&ListenOn::Path(socket.clone())).expect("listen");
        let shutdown = Shutdown::new().expect("shutdown event");
        let stop = shutdown.clone();
        let sandboxed = test_seccomp();
        let thread = std::thread::Builder::new()
            .name("serve".into())
            .spawn(move || {
                if sandboxed {
                    dovetail_backend::sandbox::enter(ThreadKind::Serve);
                }
                serve(disk, DeviceConfig { num_queues }, &mut listener, &stop)
            })
            .expect("spawn serve thread");
        TestServer {
            dir,
            socket,
            shutdown,
            thread: Some(thread),
        }
    }

    /// The socket a frontend connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Asks `serve` to stop and returns what it returned; fails the test if it does not return
    /// within [`TIMEOUT`].
    pub fn stop(mut self) -> Result<(), ServeError> {
        self.shutdown.request();
        let thread = self.thread.take().expect("server still running");
        let deadline = Instant::now() + TIMEOUT;
        while !thread.is_finished() {
            assert!(
                Instant::now() < deadline,
                "serve did not return within {TIMEOUT:?} of a shutdown request"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        thread.join().expect("serve thread panicked")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // Reached only when a test failed before `stop`: do not hang the test binary on it.
        if let Some(thread) = self.thread.take() {
            self.shutdown.request();
            let deadline = Instant::now() + TIMEOUT;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The driver.

/// The load generator's vhost-user frontend, with every error failing the test at once (with
/// the driver's message), so tests read as plain calls.
#[derive(Debug)]
pub struct TestDriver(Driver);

impl Deref for TestDriver {
    type Target = Driver;

    fn deref(&self) -> &Driver {
        &self.0
    }
}

impl TestDriver {
    /// Connects with default options: queue size 256, EVENT_IDX on.
    pub fn connect(path: &Path, num_queues: usize, mem_size: usize) -> TestDriver {
        Self::connect_with(path, DriverOptions::new(num_queues, mem_size))
    }

    /// Connects, negotiates, shares guest memory and starts `options.num_queues` queues.
    pub fn connect_with(path: &Path, options: DriverOptions) -> TestDriver {
        TestDriver(Driver::connect(path, options).unwrap_or_else(|e| {
            panic!("driver setup failed: {}", dovetail_layout::error_chain(&e))
        }))
    }

    /// Submits one chain on `queue` and waits for its completion.
    #[track_caller]
    pub fn submit(&self, queue: usize, bufs: &[Buf]) -> Completion {
        ok(self.0.submit(queue, bufs))
    }

    /// Submits every chain at once (in groups that fit) and returns their completions in order.
    #[track_caller]
    pub fn submit_batch<R: AsRef<[Buf]>>(&self, queue: usize, requests: &[R]) -> Vec<Completion> {
        ok(self.0.submit_batch(queue, requests))
    }

    #[track_caller]
    pub fn config(&self, offset: u32, len: u32) -> Vec<u8> {
        ok(self.0.config(offset, len))
    }

    #[track_caller]
    pub fn blk_config(&self) -> BlkConfig {
        ok(self.0.blk_config())
    }

    #[track_caller]
    pub fn submitted(&self, queue: usize) -> u64 {
        ok(self.0.submitted(queue))
    }

    #[track_caller]
    pub fn stop_queue(&self, queue: usize) -> u16 {
        ok(self.0.stop_queue(queue))
    }

    #[track_caller]
    pub fn restart_queue(&self, queue: usize, fresh: bool) {
        ok(self.0.restart_queue(queue, fresh))
    }
}

#[track_caller]
fn ok<T>(r: Result<T, DriverError>) -> T {
    r.unwrap_or_else(|e| panic!("driver: {}", dovetail_layout::error_chain(&e)))
}

/// Reads `len` bytes of the image file at `offset`.
pub fn image_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).expect("open image");
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).expect("read image");
    b
}

/// Reads the first `size` bytes of the disk behind `driver`, `chunk` bytes a request (each
/// read must complete whole and OK).
pub fn read_disk(driver: &TestDriver, size: usize, chunk: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    for i in 0..size / chunk {
        let c = driver.submit(0, &Req::read((i * chunk / 512) as u64, chunk as u32));
        c.assert_ok(chunk as u32);
        out.extend_from_slice(&c.data);
    }
    out
}
