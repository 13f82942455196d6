//! Safe Rust over librados, for a Dovetail store kept in a Ceph cluster.
//!
//! * [`Cluster`]: one connection (a RADOS client instance, with its own address that a fencing
//!   peer can blocklist) made from a `ceph.conf` and a client id;
//! * [`Pool`]: an I/O context on one pool: whole-object and ranged reads and writes, both
//!   synchronous and asynchronous ([`Pool::aio_write`], [`Pool::aio_read`]: the completion runs a
//!   closure on librados' finisher thread, so a queue keeps many requests in flight), object
//!   size, removal, and omap reads;
//! * [`WriteOp`]: a compound write operation applied atomically to one object: create, write,
//!   omap set/remove, and the guards that make metadata changes safe across daemons (an object
//!   version assertion, an omap value comparison, and [`WriteOp::assert_locked`], the `lock`
//!   class's check that the caller still holds an exclusive lock). If any guard fails, nothing of
//!   the operation is applied;
//! * exclusive locks ([`Pool::lock_exclusive`], [`Pool::unlock`], [`Pool::break_lock`],
//!   [`Pool::lockers`]) and fencing ([`Cluster::blocklist`]): a client whose address is on the
//!   cluster's blocklist has every later operation refused by the OSDs (`EBLOCKLISTED`).
//!
//! The C declarations are in [`ffi`] (hand-written; see Cargo.toml for why). Errors carry the
//! operation, the object and the errno, so an operator reads what failed where.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod ffi;

use std::ffi::{CStr, CString};
use std::fmt;
use std::os::raw::{c_char, c_int, c_void};
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

/// `EBLOCKLISTED` (Ceph's name for `ESHUTDOWN`): what the OSDs answer a fenced client.
pub const EBLOCKLISTED: i32 = libc::ESHUTDOWN;

/// A librados failure: the operation, the object or pool it was about, and the errno.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("rados {op} {target}: {} (errno {errno})", strerror(*errno))]
    Os {
        op: &'static str,
        target: String,
        errno: i32,
    },
    #[error("rados {op}: {what} contains a NUL byte")]
    Nul { op: &'static str, what: String },
    #[error("rados {op} {target}: {detail}")]
    Invalid {
        op: &'static str,
        target: String,
        detail: String,
    },
}

impl Error {
    /// The errno of a failed call (0 for errors found before librados was called).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Os { errno, .. } => *errno,
            _ => 0,
        }
    }

    /// Whether the cluster refused the call because this client is fenced.
    pub fn is_blocklisted(&self) -> bool {
        self.errno() == EBLOCKLISTED
    }
}

pub type Result<T> = std::result::Result<T, Error>;

fn strerror(errno: i32) -> String {
    if errno == EBLOCKLISTED {
        return "client is blocklisted (fenced)".to_string();
    }
    std::io::Error::from_raw_os_error(errno).to_string()
}

fn cstr(op: &'static str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Nul {
        op,
        what: format!("{s:?}"),
    })
}

/// librados returns 0 or a positive count on success and `-errno` on failure.
fn check(ret: c_int, op: &'static str, target: &str) -> Result<c_int> {
    if ret < 0 {
        Err(Error::Os {
            op,
            target: target.to_string(),
            errno: -ret,
        })
    } else {
        Ok(ret)
    }
}

struct Handle(ffi::rados_t);

// SAFETY: a connected `rados_t` may be used from any thread at once (librados serialises its own
// state internally; Ceph's own clients share one handle between threads).
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from a successful rados_create and is shut down exactly once,
        // here, after every Pool (which holds an Arc of it) is gone.
        unsafe { ffi::rados_shutdown(self.0) }
    }
}

/// Where and as whom to connect.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// The cluster's configuration file (`ceph.conf`): monitors, and client settings.
    pub conf: Option<std::path::PathBuf>,
    /// The client id (the `admin` of `client.admin`); `None` is librados' default.
    pub id: Option<String>,
    /// How long to wait for the monitors before giving up (`client_mount_timeout`); librados'
    /// own default is 300 s.
    pub mount_timeout: Option<Duration>,
    /// How long one OSD or monitor operation may take before it fails with ETIMEDOUT
    /// (`rados_osd_op_timeout`, `rados_mon_op_timeout`); `None` waits forever (librados' default).
    pub op_timeout: Option<Duration>,
    /// Further `key=value` settings, applied after the file.
    pub settings: Vec<(String, String)>,
}

/// One connection to a cluster: a RADOS client instance with its own address.
#[derive(Clone)]
pub struct Cluster {
    handle: Arc<Handle>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("instance", &self.instance_id())
            .finish()
    }
}

impl Cluster {
    /// Connects as `opts` says.
    pub fn connect(opts: &ConnectOptions) -> Result<Cluster> {
        let id = opts.id.as_deref().map(|i| cstr("connect", i)).transpose()?;
        let mut raw: ffi::rados_t = ptr::null_mut();
        // SAFETY: `raw` is a valid out pointer; `id` is NUL-terminated or null (the default id).
        let r =
            unsafe { ffi::rados_create(&mut raw, id.as_ref().map_or(ptr::null(), |c| c.as_ptr())) };
        check(r, "create", opts.id.as_deref().unwrap_or("client"))?;
        // From here on, dropping `handle` shuts the half-made connection down.
        let handle = Handle(raw);
        if let Some(conf) = &opts.conf {
            let path = cstr("connect", &conf.to_string_lossy())?;
            // SAFETY: the handle is live and unconnected; `path` is NUL-terminated.
            let r = unsafe { ffi::rados_conf_read_file(handle.0, path.as_ptr()) };
            check(r, "read config", &conf.display().to_string())?;
        }
        let mut settings = opts.settings.clone();
        if let Some(t) = opts.mount_timeout {
            settings.push(("client_mount_timeout".into(), secs(t)));
        }
        if let Some(t) = opts.op_timeout {
            settings.push(("rados_osd_op_timeout".into(), secs(t)));
            settings.push(("rados_mon_op_timeout".into(), secs(t)));
        }
        for (k, v) in &settings {
            let (ck, cv) = (cstr("set option", k)?, cstr("set option", v)?);
            // SAFETY: the handle is live and unconnected; both strings are NUL-terminated.
            let r = unsafe { ffi::rados_conf_set(handle.0, ck.as_ptr(), cv.as_ptr()) };
            check(r, "set option", k)?;
        }
        // SAFETY: the handle is live, configured and not yet connected.
        let r = unsafe { ffi::rados_connect(handle.0) };
        check(
            r,
            "connect",
            &opts
                .conf
                .as_ref()
                .map_or("the default cluster".to_string(), |c| {
                    c.display().to_string()
                }),
        )?;
        Ok(Cluster {
            handle: Arc::new(handle),
        })
    }

    /// This client's instance id (the `N` of `client.N`, which lock holders are named by).
    pub fn instance_id(&self) -> u64 {
        // SAFETY: the handle is connected for as long as `self` lives.
        unsafe { ffi::rados_get_instance_id(self.handle.0) }
    }

    /// This client's address, as the cluster knows it (what [`Cluster::blocklist`] takes).
    pub fn addr(&self) -> Result<String> {
        let mut out: *mut c_char = ptr::null_mut();
        // SAFETY: the handle is connected; `out` receives a buffer librados allocates.
        let r = unsafe { ffi::rados_getaddrs(self.handle.0, &mut out) };
        check(r, "getaddrs", "client")?;
        if out.is_null() {
            return Err(Error::Invalid {
                op: "getaddrs",
                target: "client".into(),
                detail: "librados returned no address".into(),
            });
        }
        // SAFETY: on success `out` is a NUL-terminated string librados allocated; it is read
        // once and given back with rados_buffer_free.
        let s = unsafe { CStr::from_ptr(out) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: `out` came from librados and is freed exactly once.
        unsafe { ffi::rados_buffer_free(out) };
        Ok(s)
    }

    /// The cluster's fsid.
    pub fn fsid(&self) -> Result<String> {
        let mut buf = [0 as c_char; 64];
        // SAFETY: `buf` is writable for its whole length, which is passed.
        let r = unsafe { ffi::rados_cluster_fsid(self.handle.0, buf.as_mut_ptr(), buf.len()) };
        check(r, "fsid", "cluster")?;
        // SAFETY: librados wrote a NUL-terminated string into `buf` (37 bytes fit in 64).
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }

    /// Fences the client at `addr`: the OSDs refuse its operations from now on (for
    /// `expire` or, with `None`, the cluster's default of one hour). Call before breaking a lock
    /// that client holds, so it cannot write after the lock changed hands.
    pub fn blocklist(&self, addr: &str, expire: Option<Duration>) -> Result<()> {
        let c = cstr("blocklist", addr)?;
        let secs = expire.map_or(0, |d| d.as_secs().clamp(1, u32::MAX as u64) as u32);
        // SAFETY: the handle is connected; librados reads the NUL-terminated address and does
        // not keep or modify it (the C signature lacks `const`).
        let r = unsafe { ffi::rados_blocklist_add(self.handle.0, c.as_ptr() as *mut c_char, secs) };
        check(r, "blocklist", addr)?;
        Ok(())
    }

    /// Waits until this client has the cluster's latest OSD map (after a blocklist, so that
    /// this client's next operations carry an epoch in which the fenced client is refused).
    pub fn wait_for_latest_osdmap(&self) -> Result<()> {
        // SAFETY: the handle is connected.
        let r = unsafe { ffi::rados_wait_for_latest_osdmap(self.handle.0) };
        check(r, "wait for osdmap", "cluster")?;
        Ok(())
    }

    /// An I/O context on `pool`.
    pub fn pool(&self, pool: &str) -> Result<Pool> {
        let c = cstr("open pool", pool)?;
        let mut io: ffi::rados_ioctx_t = ptr::null_mut();
        // SAFETY: the handle is connected; `c` is NUL-terminated; `io` is a valid out pointer.
        let r = unsafe { ffi::rados_ioctx_create(self.handle.0, c.as_ptr(), &mut io) };
        check(r, "open pool", pool)?;
        Ok(Pool {
            io,
            name: pool.to_string(),
            _cluster: self.handle.clone(),
        })
    }
}

fn secs(d: Duration) -> String {
    format!("{}", d.as_secs().max(1))
}

/// An I/O context on one pool of a [`Cluster`].
pub struct Pool {
    io: ffi::rados_ioctx_t,
    name: String,
    // Keeps the connection up while the context lives.
    _cluster: Arc<Handle>,
}

// SAFETY: librados allows I/O on one ioctx from several threads at once; this type never changes
// the context's state (snapshot context, namespace, locator) after creation.
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool").field("name", &self.name).finish()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: the context came from a successful rados_ioctx_create; its cluster handle is
        // still up (held by `_cluster`). Asynchronous operations hold their own reference.
        unsafe { ffi::rados_ioctx_destroy(self.io) }
    }
}

/// One holder of a lock, as [`Pool::lockers`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locker {
    /// The entity, e.g. `client.4123`.
    pub client: String,
    pub cookie: String,
    /// The holder's address: what [`Cluster::blocklist`] fences.
    pub addr: String,
}

type AioDone = Box<dyn FnOnce(Result<usize>, Vec<u8>) + Send + 'static>;

struct AioCtx {
    op: &'static str,
    oid: CString,
    buf: Vec<u8>,
    done: Option<AioDone>,
}

unsafe extern "C" fn aio_complete(c: ffi::rados_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the `Box<AioCtx>` leaked by `Pool::aio_submit` for this completion and
    // nothing else; librados calls this callback exactly once.
    let mut ctx = unsafe { Box::from_raw(arg as *mut AioCtx) };
    // SAFETY: `c` is the completion this callback was registered on; it is complete.
    let r = unsafe { ffi::rados_aio_get_return_value(c) };
    // SAFETY: our reference to the completion is given back once; librados keeps its own until
    // the callback returns.
    unsafe { ffi::rados_aio_release(c) };
    let res = check(r, ctx.op, &ctx.oid.to_string_lossy()).map(|n| n as usize);
    let buf = std::mem::take(&mut ctx.buf);
    if let Some(done) = ctx.done.take() {
        done(res, buf);
    }
}

impl Pool {
    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn target(&self, oid: &str) -> String {
        format!("{}/{}", self.name, oid)
    }

    /// Replaces `oid`'s whole content with `data` (creating it).
    pub fn write_full(&self, oid: &str, data: &[u8]) -> Result<()> {
        let c = cstr("write", oid)?;
        // SAFETY: `c` is NUL-terminated; `data` is readable for `data.len()` bytes during the
        // call (librados copies it before returning).
        let r = unsafe {
            ffi::rados_write_full(
                self.io,
                c.as_ptr(),
                data.as_ptr() as *const c_char,
                data.len(),
            )
        };
        check(r, "write", &self.target(oid))?;
        Ok(())
    }

    /// Reads up to `buf.len()` bytes of `oid` from `off`; returns how many it read (fewer past
    /// the object's end). ENOENT when the object does not exist.
    pub fn read(&self, oid: &str, off: u64, buf: &mut [u8]) -> Result<usize> {
        let c = cstr("read", oid)?;
        // SAFETY: `c` is NUL-terminated; `buf` is writable for `buf.len()` bytes for the call.
        let r = unsafe {
            ffi::rados_read(
                self.io,
                c.as_ptr(),
                buf.as_mut_ptr() as *mut c_char,
                buf.len(),
                off,
            )
        };
        Ok(check(r, "read", &self.target(oid))? as usize)
    }

    /// `oid`'s size in bytes, or `None` when it does not exist.
    pub fn stat(&self, oid: &str) -> Result<Option<u64>> {
        let c = cstr("stat", oid)?;
        let (mut size, mut mtime) = (0u64, 0 as libc::time_t);
        // SAFETY: `c` is NUL-terminated; both out pointers are valid.
        let r = unsafe { ffi::rados_stat(self.io, c.as_ptr(), &mut size, &mut mtime) };
        if r == -libc::ENOENT {
            return Ok(None);
        }
        check(r, "stat", &self.target(oid))?;
        Ok(Some(size))
    }

    /// Removes `oid`; `false` when it did not exist.
    pub fn remove(&self, oid: &str) -> Result<bool> {
        let c = cstr("remove", oid)?;
        // SAFETY: `c` is NUL-terminated.
        let r = unsafe { ffi::rados_remove(self.io, c.as_ptr()) };
        if r == -libc::ENOENT {
            return Ok(false);
        }
        check(r, "remove", &self.target(oid))?;
        Ok(true)
    }

    fn aio_submit(
        &self,
        op: &'static str,
        oid: &str,
        off: u64,
        buf: Vec<u8>,
        done: AioDone,
    ) -> Result<()> {
        let ctx = Box::new(AioCtx {
            op,
            oid: cstr(op, oid)?,
            buf,
            done: Some(done),
        });
        let arg = Box::into_raw(ctx);
        let mut c: ffi::rados_completion_t = ptr::null_mut();
        // SAFETY: `arg` stays valid until the callback takes it back; `c` is a valid out pointer.
        let r = unsafe {
            ffi::rados_aio_create_completion2(arg as *mut c_void, Some(aio_complete), &mut c)
        };
        if r < 0 {
            // SAFETY: the completion was not made, so the callback will never run: take the
            // context back here.
            drop(unsafe { Box::from_raw(arg) });
            return check(r, op, &self.target(oid)).map(|_| ());
        }
        // SAFETY: `arg` is live (owned by the pending completion); its oid and buffer stay put
        // (the Vec's heap block does not move) until the callback runs.
        let (oidp, bufp, len) = unsafe {
            let a = &mut *arg;
            (a.oid.as_ptr(), a.buf.as_mut_ptr(), a.buf.len())
        };
        // SAFETY: the ioctx is live; `oidp` is NUL-terminated and `bufp` valid for `len` bytes
        // until the completion's callback, which owns both, runs.
        let r = unsafe {
            if op == "aio read" {
                ffi::rados_aio_read(self.io, oidp, c, bufp as *mut c_char, len, off)
            } else {
                ffi::rados_aio_write(self.io, oidp, c, bufp as *const c_char, len, off)
            }
        };
        if r < 0 {
            // SAFETY: the operation was refused at submission, so the callback never runs: give
            // back the completion and the context here.
            unsafe {
                ffi::rados_aio_release(c);
                drop(Box::from_raw(arg));
            }
            return check(r, op, &self.target(oid)).map(|_| ());
        }
        Ok(())
    }

    /// Writes `data` at `off` of `oid` asynchronously. `done` runs once, on librados' finisher
    /// thread, with the result and the buffer given back; it must not block for long.
    pub fn aio_write(
        &self,
        oid: &str,
        off: u64,
        data: Vec<u8>,
        done: impl FnOnce(Result<usize>, Vec<u8>) + Send + 'static,
    ) -> Result<()> {
        self.aio_submit("aio write", oid, off, data, Box::new(done))
    }

    /// Reads `buf.len()` bytes at `off` of `oid` asynchronously into `buf`; `done` gets the
    /// count read (fewer past the object's end) and the buffer.
    pub fn aio_read(
        &self,
        oid: &str,
        off: u64,
        buf: Vec<u8>,
        done: impl FnOnce(Result<usize>, Vec<u8>) + Send + 'static,
    ) -> Result<()> {
        self.aio_submit("aio read", oid, off, buf, Box::new(done))
    }

    /// Waits until every asynchronous write submitted on this context so far is safe.
    pub fn aio_flush(&self) -> Result<()> {
        // SAFETY: the ioctx is live.
        let r = unsafe { ffi::rados_aio_flush(self.io) };
        check(r, "aio flush", &self.name)?;
        Ok(())
    }

    /// Every omap key/value of `oid` whose key starts with `prefix`, in key order. ENOENT if
    /// the object does not exist.
    pub fn omap_get(&self, oid: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        const PAGE: u64 = 512;
        let coid = cstr("omap get", oid)?;
        let cprefix = cstr("omap get", prefix)?;
        let mut out = Vec::new();
        let mut after = CString::default();
        loop {
            // SAFETY: creating a read op has no preconditions; it is released below.
            let op = unsafe { ffi::rados_create_read_op() };
            let mut iter: ffi::rados_omap_iter_t = ptr::null_mut();
            let (mut more, mut prval) = (0u8, 0 as c_int);
            // SAFETY: `op` is live; the strings are NUL-terminated and outlive the operate call;
            // the out pointers are valid until then.
            let r = unsafe {
                ffi::rados_read_op_omap_get_vals2(
                    op,
                    after.as_ptr(),
                    cprefix.as_ptr(),
                    PAGE,
                    &mut iter,
                    &mut more,
                    &mut prval,
                );
                ffi::rados_read_op_operate(op, self.io, coid.as_ptr(), 0)
            };
            let mut page = Vec::new();
            if r >= 0 && prval >= 0 {
                loop {
                    let (mut k, mut v) = (ptr::null_mut(), ptr::null_mut());
                    let (mut kl, mut vl) = (0usize, 0usize);
                    // SAFETY: `iter` was filled by the successful operate and is read until its
                    // end (a null key).
                    let r = unsafe {
                        ffi::rados_omap_get_next2(iter, &mut k, &mut v, &mut kl, &mut vl)
                    };
                    if r < 0 || k.is_null() {
                        break;
                    }
                    // SAFETY: librados hands `kl` bytes at `k` and `vl` bytes at `v` (null when
                    // empty), valid until the iterator ends.
                    let (key, val) = unsafe {
                        (
                            std::slice::from_raw_parts(k as *const u8, kl).to_vec(),
                            if v.is_null() {
                                Vec::new()
                            } else {
                                std::slice::from_raw_parts(v as *const u8, vl).to_vec()
                            },
                        )
                    };
                    page.push((String::from_utf8_lossy(&key).into_owned(), val));
                }
            }
            // SAFETY: the iterator (if any) and the op are released once each.
            unsafe {
                if !iter.is_null() {
                    ffi::rados_omap_get_end(iter);
                }
                ffi::rados_release_read_op(op);
            }
            check(r, "omap get", &self.target(oid))?;
            check(prval, "omap get", &self.target(oid))?;
            let last = page.last().map(|(k, _)| k.clone());
            out.extend(page);
            match last {
                Some(k) if more != 0 => after = cstr("omap get", &k)?,
                _ => break,
            }
        }
        Ok(out)
    }

    /// Takes (or, with `renew`, renews) the exclusive lock `name` on `oid` for this client
    /// under `cookie`, for `duration` (`None`: until unlocked or broken). EBUSY when another
    /// client or cookie holds it.
    pub fn lock_exclusive(
        &self,
        oid: &str,
        name: &str,
        cookie: &str,
        desc: &str,
        duration: Option<Duration>,
        renew: bool,
    ) -> Result<()> {
        let (o, n, c, d) = (
            cstr("lock", oid)?,
            cstr("lock", name)?,
            cstr("lock", cookie)?,
            cstr("lock", desc)?,
        );
        let mut tv = duration.map(|d| libc::timeval {
            tv_sec: d.as_secs() as libc::time_t,
            tv_usec: d.subsec_micros() as libc::suseconds_t,
        });
        let flags = if renew {
            ffi::LIBRADOS_LOCK_FLAG_MAY_RENEW
        } else {
            0
        };
        // SAFETY: the strings are NUL-terminated; `tv` is a valid timeval or null (no expiry).
        let r = unsafe {
            ffi::rados_lock_exclusive(
                self.io,
                o.as_ptr(),
                n.as_ptr(),
                c.as_ptr(),
                d.as_ptr(),
                tv.as_mut()
                    .map_or(ptr::null_mut(), |t| t as *mut libc::timeval),
                flags,
            )
        };
        check(r, "lock", &format!("{} ({name})", self.target(oid)))?;
        Ok(())
    }

    /// Gives back the lock `name` on `oid` held by this client under `cookie`.
    pub fn unlock(&self, oid: &str, name: &str, cookie: &str) -> Result<()> {
        let (o, n, c) = (
            cstr("unlock", oid)?,
            cstr("unlock", name)?,
            cstr("unlock", cookie)?,
        );
        // SAFETY: the strings are NUL-terminated.
        let r = unsafe { ffi::rados_unlock(self.io, o.as_ptr(), n.as_ptr(), c.as_ptr()) };
        check(r, "unlock", &format!("{} ({name})", self.target(oid)))?;
        Ok(())
    }

    /// Breaks `locker`'s hold on the lock `name` of `oid`. Fence the holder first
    /// ([`Cluster::blocklist`]), or it may go on writing as if it still held the lock.
    pub fn break_lock(&self, oid: &str, name: &str, locker: &Locker) -> Result<()> {
        let (o, n, cl, ck) = (
            cstr("break lock", oid)?,
            cstr("break lock", name)?,
            cstr("break lock", &locker.client)?,
            cstr("break lock", &locker.cookie)?,
        );
        // SAFETY: the strings are NUL-terminated.
        let r = unsafe {
            ffi::rados_break_lock(self.io, o.as_ptr(), n.as_ptr(), cl.as_ptr(), ck.as_ptr())
        };
        check(r, "break lock", &format!("{} ({name})", self.target(oid)))?;
        Ok(())
    }

    /// Who holds the lock `name` on `oid` (empty when nobody does or the object is missing).
    pub fn lockers(&self, oid: &str, name: &str) -> Result<Vec<Locker>> {
        let (o, n) = (cstr("lockers", oid)?, cstr("lockers", name)?);
        let mut cap = 256usize;
        loop {
            let mut exclusive: c_int = 0;
            let (mut tag, mut clients, mut cookies, mut addrs) = (
                vec![0u8; cap],
                vec![0u8; cap],
                vec![0u8; cap],
                vec![0u8; cap],
            );
            let (mut tl, mut cl, mut kl, mut al) = (cap, cap, cap, cap);
            // SAFETY: every buffer is writable for the length passed beside it; the lengths are
            // in/out (librados writes back what it needed).
            let r = unsafe {
                ffi::rados_list_lockers(
                    self.io,
                    o.as_ptr(),
                    n.as_ptr(),
                    &mut exclusive,
                    tag.as_mut_ptr() as *mut c_char,
                    &mut tl,
                    clients.as_mut_ptr() as *mut c_char,
                    &mut cl,
                    cookies.as_mut_ptr() as *mut c_char,
                    &mut kl,
                    addrs.as_mut_ptr() as *mut c_char,
                    &mut al,
                )
            };
            if r == -(libc::ERANGE as isize) {
                let need = tl.max(cl).max(kl).max(al);
                if need <= cap || need > 1 << 20 {
                    return Err(Error::Invalid {
                        op: "lockers",
                        target: self.target(oid),
                        detail: format!("librados asked for a {need}-byte buffer"),
                    });
                }
                cap = need;
                continue;
            }
            if r == -(libc::ENOENT as isize) {
                return Ok(Vec::new());
            }
            check(
                r as c_int,
                "lockers",
                &format!("{} ({name})", self.target(oid)),
            )?;
            let split = |b: &[u8], len: usize| -> Vec<String> {
                b[..len.min(b.len())]
                    .split(|&c| c == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            };
            let (c, k, a) = (split(&clients, cl), split(&cookies, kl), split(&addrs, al));
            let count = r as usize;
            if c.len() < count || k.len() < count || a.len() < count {
                return Err(Error::Invalid {
                    op: "lockers",
                    target: self.target(oid),
                    detail: format!("{count} lockers but {} names, {} cookies", c.len(), k.len()),
                });
            }
            return Ok((0..count)
                .map(|i| Locker {
                    client: c[i].clone(),
                    cookie: k[i].clone(),
                    addr: a[i].clone(),
                })
                .collect());
        }
    }

    /// Applies `op` to `oid` atomically: every step or none. Returns the object's version after
    /// the operation (for a later [`WriteOp::assert_version`]): librados keeps one "last
    /// version" per context, so metadata written with version guards wants a context of its own
    /// used by one thread at a time.
    pub fn operate(&self, oid: &str, op: WriteOp) -> Result<u64> {
        let c = cstr("write op", oid)?;
        // SAFETY: `op.raw` is a live write op whose every buffer is owned by `op` and outlives
        // this call; `c` is NUL-terminated; a null mtime means "now".
        let r = unsafe {
            ffi::rados_write_op_operate2(op.raw, self.io, c.as_ptr(), ptr::null_mut(), 0)
        };
        let target = self.target(oid);
        // A guard that failed reports through its own return value: name it.
        for (what, prval) in op.guards.iter() {
            if **prval < 0 {
                return Err(Error::Os {
                    op: what,
                    target,
                    errno: -**prval,
                });
            }
        }
        check(r, "write op", &target)?;
        // SAFETY: the ioctx is live; the version is that of this thread's last operation on it.
        Ok(unsafe { ffi::rados_get_last_version(self.io) })
    }

    /// The names of every object of the pool (its default namespace), in no particular order.
    /// A listing walks the whole pool: for small pools and rare calls (cleanup, checks).
    pub fn list_objects(&self) -> Result<Vec<String>> {
        let mut ctx: ffi::rados_list_ctx_t = ptr::null_mut();
        // SAFETY: the ioctx is live; `ctx` is a valid out pointer, closed below on success.
        let r = unsafe { ffi::rados_nobjects_list_open(self.io, &mut ctx) };
        check(r, "list objects", &self.name)?;
        let mut names = Vec::new();
        let out = loop {
            let mut entry: *const c_char = ptr::null();
            // SAFETY: `ctx` is the open listing; a null key or namespace out pointer is allowed;
            // `entry` points into the listing's own buffer until the next call, and is copied
            // before that.
            let r = unsafe {
                ffi::rados_nobjects_list_next(ctx, &mut entry, ptr::null_mut(), ptr::null_mut())
            };
            if r == -libc::ENOENT {
                break Ok(names);
            }
            if let Err(e) = check(r, "list objects", &self.name) {
                break Err(e);
            }
            if entry.is_null() {
                continue;
            }
            // SAFETY: librados hands out a NUL-terminated name, valid until the next call.
            let name = unsafe { CStr::from_ptr(entry) };
            names.push(name.to_string_lossy().into_owned());
        };
        // SAFETY: `ctx` was opened above and is closed once.
        unsafe { ffi::rados_nobjects_list_close(ctx) };
        out
    }

    /// The version of `oid` (the object's user version), or `None` if it does not exist.
    pub fn version(&self, oid: &str) -> Result<Option<u64>> {
        let mut one = [0u8; 1];
        match self.read(oid, 0, &mut one) {
            // SAFETY: the ioctx is live; the version is that of the read just made.
            Ok(_) => Ok(Some(unsafe { ffi::rados_get_last_version(self.io) })),
            Err(e) if e.errno() == libc::ENOENT => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A compound write operation on one object, applied atomically by [`Pool::operate`].
pub struct WriteOp {
    raw: ffi::rados_write_op_t,
    // Buffers the operation points into, kept until it is applied and released.
    bufs: Vec<Vec<u8>>,
    cstrs: Vec<CString>,
    // The return values of guard steps, boxed so their addresses stay put.
    guards: Vec<(&'static str, Box<c_int>)>,
}

impl fmt::Debug for WriteOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteOp")
            .field("buffers", &self.bufs.len())
            .field("guards", &self.guards.len())
            .finish()
    }
}

// SAFETY: the operation is only built and applied by its owner; it holds no thread-bound state.
unsafe impl Send for WriteOp {}

impl Drop for WriteOp {
    fn drop(&mut self) {
        // SAFETY: `raw` came from rados_create_write_op and is released once.
        unsafe { ffi::rados_release_write_op(self.raw) }
    }
}

impl Default for WriteOp {
    fn default() -> Self {
        Self::new()
    }
}

impl WriteOp {
    pub fn new() -> WriteOp {
        WriteOp {
            // SAFETY: no preconditions; released in Drop.
            raw: unsafe { ffi::rados_create_write_op() },
            bufs: Vec::new(),
            cstrs: Vec::new(),
            guards: Vec::new(),
        }
    }

    fn keep(&mut self, b: &[u8]) -> (*const c_char, usize) {
        self.bufs.push(b.to_vec());
        let v = self.bufs.last().expect("just pushed");
        (v.as_ptr() as *const c_char, v.len())
    }

    fn keep_c(&mut self, s: &str) -> Result<*const c_char> {
        self.cstrs.push(cstr("write op", s)?);
        Ok(self.cstrs.last().expect("just pushed").as_ptr())
    }

    /// Creates the object; with `exclusive`, the whole operation fails (EEXIST) if it exists.
    pub fn create(self, exclusive: bool) -> WriteOp {
        let flag = if exclusive {
            ffi::LIBRADOS_CREATE_EXCLUSIVE
        } else {
            0
        };
        // SAFETY: `raw` is live; a null category is allowed (unused since Ceph 0.87).
        unsafe { ffi::rados_write_op_create(self.raw, flag, ptr::null()) };
        self
    }

    /// Fails the whole operation (ENOENT) unless the object exists.
    pub fn assert_exists(self) -> WriteOp {
        // SAFETY: `raw` is live.
        unsafe { ffi::rados_write_op_assert_exists(self.raw) };
        self
    }

    /// Fails the whole operation (ERANGE or EOVERFLOW) unless the object's version is `ver`.
    pub fn assert_version(self, ver: u64) -> WriteOp {
        // SAFETY: `raw` is live.
        unsafe { ffi::rados_write_op_assert_version(self.raw, ver) };
        self
    }

    /// Fails the whole operation (ECANCELED) unless omap `key` holds exactly `val`.
    pub fn omap_cmp_eq(mut self, key: &str, val: &[u8]) -> WriteOp {
        let (k, kl) = self.keep(key.as_bytes());
        let (v, vl) = self.keep(val);
        let mut prval = Box::new(0 as c_int);
        let p: *mut c_int = &mut *prval;
        // SAFETY: `raw` is live; the key and value buffers and `prval` are owned by `self` and
        // outlive the operation.
        unsafe {
            ffi::rados_write_op_omap_cmp2(self.raw, k, ffi::LIBRADOS_CMPXATTR_OP_EQ, v, kl, vl, p)
        };
        self.guards.push(("omap compare", prval));
        self
    }

    /// Fails the whole operation unless this client holds the exclusive lock `name` under
    /// `cookie` (the `lock` object class's `assert_locked`; EBUSY or ENOENT otherwise).
    pub fn assert_locked(mut self, name: &str, cookie: &str) -> WriteOp {
        let input = encode_lock_assert(name, cookie);
        let (buf, len) = self.keep(&input);
        let mut prval = Box::new(0 as c_int);
        let p: *mut c_int = &mut *prval;
        // SAFETY: `raw` is live; the class and method names are static NUL-terminated strings;
        // the input buffer and `prval` are owned by `self` and outlive the operation.
        unsafe {
            ffi::rados_write_op_exec(
                self.raw,
                c"lock".as_ptr(),
                c"assert_locked".as_ptr(),
                buf,
                len,
                p,
            )
        };
        self.guards.push(("assert lock", prval));
        self
    }

    /// Writes `data` at `off`.
    pub fn write(mut self, off: u64, data: &[u8]) -> WriteOp {
        let (b, l) = self.keep(data);
        // SAFETY: `raw` is live; the buffer is owned by `self` and outlives the operation.
        unsafe { ffi::rados_write_op_write(self.raw, b, l, off) };
        self
    }

    /// Makes `len` bytes at `off` read as zeros (space released where the OSD can; an object
    /// that does not exist is created, as by a write).
    pub fn zero(self, off: u64, len: u64) -> WriteOp {
        // SAFETY: `raw` is live; the step takes no buffer.
        unsafe { ffi::rados_write_op_zero(self.raw, off, len) };
        self
    }

    /// Replaces the object's whole content with `data`.
    pub fn write_full(mut self, data: &[u8]) -> WriteOp {
        let (b, l) = self.keep(data);
        // SAFETY: `raw` is live; the buffer is owned by `self` and outlives the operation.
        unsafe { ffi::rados_write_op_write_full(self.raw, b, l) };
        self
    }

    /// Sets omap keys.
    pub fn omap_set(mut self, pairs: &[(&str, &[u8])]) -> Result<WriteOp> {
        let mut keys = Vec::with_capacity(pairs.len());
        let mut vals = Vec::with_capacity(pairs.len());
        let mut klens = Vec::with_capacity(pairs.len());
        let mut vlens = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            keys.push(self.keep_c(k)?);
            klens.push(k.len());
            let (vp, vl) = self.keep(v);
            vals.push(vp);
            vlens.push(vl);
        }
        // SAFETY: `raw` is live; the arrays have `pairs.len()` entries each and every pointer
        // in them points into buffers owned by `self`; librados copies the arrays themselves.
        unsafe {
            ffi::rados_write_op_omap_set2(
                self.raw,
                keys.as_ptr(),
                vals.as_ptr(),
                klens.as_ptr(),
                vlens.as_ptr(),
                pairs.len(),
            )
        };
        Ok(self)
    }

    /// Removes omap keys.
    pub fn omap_rm(mut self, keys: &[&str]) -> Result<WriteOp> {
        let mut ptrs = Vec::with_capacity(keys.len());
        let mut lens = Vec::with_capacity(keys.len());
        for k in keys {
            ptrs.push(self.keep_c(k)?);
            lens.push(k.len());
        }
        // SAFETY: `raw` is live; both arrays have `keys.len()` entries pointing into `self`.
        unsafe {
            ffi::rados_write_op_omap_rm_keys2(self.raw, ptrs.as_ptr(), lens.as_ptr(), keys.len())
        };
        Ok(self)
    }
}

/// The input of the `lock` class's `assert_locked` method (Ceph's `cls_lock_assert_op`, in
/// Ceph's encoding): a versioned envelope (struct version 1, compat 1, u32 payload length) around
/// the lock name, the lock type (1: exclusive), the cookie and the tag (empty: what
/// `rados_lock_exclusive` takes locks with), strings as a u32 length and the bytes, little-endian.
fn encode_lock_assert(name: &str, cookie: &str) -> Vec<u8> {
    let mut body = Vec::new();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend_from_slice(&(x.len() as u32).to_le_bytes());
        b.extend_from_slice(x.as_bytes());
    };
    s(&mut body, name);
    body.push(1);
    s(&mut body, cookie);
    s(&mut body, "");
    let mut out = vec![1u8, 1];
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_assert_input_is_cephs_encoding() {
        let b = encode_lock_assert("owner", "ck");
        assert_eq!(&b[..2], &[1, 1], "struct v1, compat 1");
        let len = u32::from_le_bytes(b[2..6].try_into().expect("four bytes")) as usize;
        assert_eq!(len, b.len() - 6);
        assert_eq!(&b[6..10], &5u32.to_le_bytes());
        assert_eq!(&b[10..15], b"owner");
        assert_eq!(b[15], 1, "exclusive");
        assert_eq!(&b[16..20], &2u32.to_le_bytes());
        assert_eq!(&b[20..22], b"ck");
        assert_eq!(&b[22..26], &0u32.to_le_bytes(), "empty tag");
        assert_eq!(b.len(), 26);
    }

    #[test]
    fn errors_name_the_operation_and_object() {
        let e = check(-libc::ENOENT, "read", "pool/obj").expect_err("an error");
        let m = e.to_string();
        assert!(m.contains("read pool/obj") && m.contains("errno 2"), "{m}");
        let f = check(-EBLOCKLISTED, "write", "pool/obj").expect_err("an error");
        assert!(
            f.is_blocklisted() && f.to_string().contains("fenced"),
            "{f}"
        );
        assert!(matches!(
            cstr("read", "a\0b"),
            Err(Error::Nul { op: "read", .. })
        ));
    }
}
