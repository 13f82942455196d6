//! The daemon's sandbox (SECURITY.md, "Least privilege"): dropping root once everything is
//! open (`serve --user/--group`), Landlock confining the file system to the store, the
//! sockets' directories and the export/import directories (`--landlock`), and a seccomp filter
//! per thread kind (`--seccomp trap|log|off`).
//!
//! The seccomp allow-lists follow what each kind of thread calls (its code and the libraries'
//! under it: std, glibc, io-uring, vhost-user-backend, tiny_http), and are checked by running
//! the suites under `trap`: the in-process I/O suites (`DOVETAIL_TEST_SECCOMP`) and the crash
//! suites' daemon (`DOVETAIL_TEST_SANDBOX`) make no forbidden call. A queue worker, which parses
//! guest-controlled rings, may do I/O on files it already has open, set up its io_uring ring
//! and start its I/O threads, wait and wake; it can open nothing, map nothing executable, make
//! no socket and start no process. Filters stack: a thread also keeps the filter of the thread
//! that started it (at least the control kind's, which the main thread takes first), so the
//! kinds that start others (control, serve loops) allow what those need.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use dovetail_store::thread_kind::{self, ThreadKind};
use log::{error, info, warn};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// What a thread's forbidden system call does (`--seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SeccompMode {
    /// No filter.
    #[default]
    Off,
    /// The call goes through and the kernel logs it (audit log): to find what a filter lacks.
    Log,
    /// SIGSYS: the daemon logs the call and the thread, and dies.
    Trap,
}

impl std::fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SeccompMode::Off => "off",
            SeccompMode::Log => "log",
            SeccompMode::Trap => "trap",
        })
    }
}

static MODE: OnceLock<SeccompMode> = OnceLock::new();

/// Turns the per-thread filters on for this process (once; threads started from now on install
/// theirs). `Off` installs nothing.
pub fn enable_seccomp(mode: SeccompMode) {
    if mode == SeccompMode::Off || MODE.set(mode).is_err() {
        return;
    }
    if mode == SeccompMode::Trap {
        install_sigsys_reporter();
    }
    thread_kind::set_hook(enter);
    info!("seccomp: a filter per thread kind, forbidden calls {mode}");
}

/// The mode [`enable_seccomp`] set, if any.
pub fn seccomp_mode() -> SeccompMode {
    MODE.get().copied().unwrap_or_default()
}

thread_local! {
    static ENTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs `kind`'s filter on the calling thread (once per thread; a no-op when seccomp is off).
/// Fails closed: a filter that cannot be built or installed stops the daemon (SIGABRT, the log
/// saying why) rather than leaving the thread unfiltered.
pub fn enter(kind: ThreadKind) {
    // Its CPU priority first (crate::priority); the filters allow a thread only its own.
    crate::priority::entered(kind);
    let Some(&mode) = MODE.get() else {
        return;
    };
    if ENTERED.with(|e| e.replace(true)) {
        return;
    }
    let installed = program(kind, mode).and_then(|progs| {
        progs
            .iter()
            .try_for_each(|prog| seccompiler::apply_filter(prog).map_err(|e| e.to_string()))
    });
    if let Err(e) = installed {
        error!("seccomp: cannot install the {kind:?} filter on this thread: {e}; stopping");
        eprintln!("dovetail: seccomp: cannot install the {kind:?} filter: {e}; stopping");
        std::process::abort();
    }
}

/// The compiled filters of each kind, built once: the refusals ([`refused`]: `EACCES`, stacked
/// first) and the allow-list ([`allowed`]; anything else traps or is logged).
fn program(kind: ThreadKind, mode: SeccompMode) -> Result<&'static [BpfProgram], String> {
    type Programs = BTreeMap<u8, &'static [BpfProgram]>;
    static PROGRAMS: OnceLock<std::sync::Mutex<Programs>> = OnceLock::new();
    let key = kind as u8;
    let mut map = PROGRAMS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(p) = map.get(&key) {
        return Ok(p);
    }
    let mismatch = match mode {
        SeccompMode::Trap | SeccompMode::Off => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let arch: seccompiler::TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("architecture {}: {e:?}", std::env::consts::ARCH))?;
    let compile = |filter: Result<SeccompFilter, seccompiler::BackendError>| {
        filter
            .and_then(BpfProgram::try_from)
            .map_err(|e| e.to_string())
    };
    let mut progs = Vec::new();
    let refusals = refused(kind);
    if !refusals.is_empty() {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
            refusals.iter().map(|&nr| (nr, Vec::new())).collect();
        if no_exec(kind) {
            // W^X for the threads that parse guest memory: no new executable mapping.
            let exec = u64::from(libc::PROT_EXEC.unsigned_abs());
            let rule = SeccompCondition::new(
                2,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(exec),
                exec,
            )
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(|e| e.to_string())?;
            for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
                rules.insert(nr, vec![rule.clone()]);
            }
        }
        progs.push(compile(SeccompFilter::new(
            rules.into_iter().collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
            arch,
        ))?);
    }
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed(kind)
        .into_iter()
        .chain(refusals.iter().copied())
        .map(|nr| (nr, Vec::new()))
        .collect();
    // Signals only to this process: kill(getpid(), ...), tgkill(getpid(), tid, ...) (abort,
    // raise, a crash point's SIGKILL), never another process.
    // SAFETY: getpid has no preconditions.
    let pid = u64::from(unsafe { libc::getpid() }.unsigned_abs());
    let own = |args: &[u8]| {
        args.iter()
            .map(|&a| SeccompCondition::new(a, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, pid))
            .collect::<Result<Vec<_>, _>>()
            .and_then(SeccompRule::new)
            .map_err(|e| e.to_string())
    };
    for nr in [libc::SYS_kill, libc::SYS_tgkill] {
        rules.insert(nr, vec![own(&[0])?]);
    }
    // Comparing two of this process's descriptors (vhost-user's shutdown of a disk).
    rules.insert(libc::SYS_kcmp, vec![own(&[0, 1])?]);
    // A thread's own CPU priority (crate::priority, as each kind starts): PRIO_PROCESS with
    // who 0, the calling thread, never another thread or process.
    let own_thread = [
        SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            u64::from(libc::PRIO_PROCESS),
        ),
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, 0),
    ]
    .into_iter()
    .collect::<Result<Vec<_>, _>>()
    .and_then(SeccompRule::new)
    .map_err(|e| e.to_string())?;
    for nr in [libc::SYS_getpriority, libc::SYS_setpriority] {
        rules.insert(nr, vec![own_thread.clone()]);
    }
    progs.push(compile(SeccompFilter::new(
        rules.into_iter().collect(),
        mismatch,
        SeccompAction::Allow,
        arch,
    ))?);
    // Leaked once per kind: a filter lives as long as the process.
    let progs: &'static [BpfProgram] = Box::leak(progs.into_boxed_slice());
    map.insert(key, progs);
    Ok(progs)
}

/// Whether `kind` is refused (`EACCES`) any `mmap` or `mprotect` asking for `PROT_EXEC`: the
/// threads that parse guest memory, which never load code.
pub fn no_exec(kind: ThreadKind) -> bool {
    matches!(kind, ThreadKind::Worker | ThreadKind::Engine)
}

/// The system calls `kind` is refused with `EACCES` rather than stopped: a queue worker's
/// attempt to open a file (a panic's backtrace reads the executable) fails without killing.
pub fn refused(kind: ThreadKind) -> &'static [i64] {
    match kind {
        ThreadKind::Worker | ThreadKind::Engine => OPEN,
        _ => &[],
    }
}

/// The system calls `kind` may make (besides `kill`, `tgkill` and `kcmp` on this process only,
/// always).
pub fn allowed(kind: ThreadKind) -> Vec<i64> {
    let mut v: Vec<i64> = BASE.to_vec();
    match kind {
        // A queue worker starts its I/O threads and its helper and sets up its io_uring ring
        // itself, on its first requests.
        ThreadKind::Worker => {
            v.extend_from_slice(FILE_IO);
            v.extend_from_slice(URING);
            v.extend_from_slice(THREAD_START);
        }
        ThreadKind::Engine => {
            v.extend_from_slice(FILE_IO);
            v.extend_from_slice(URING);
        }
        ThreadKind::Background => {
            v.extend_from_slice(FILE_IO);
            v.extend_from_slice(URING);
            v.extend_from_slice(OPEN);
            v.extend_from_slice(FILES);
            v.extend_from_slice(THREAD_START);
            v.extend_from_slice(THREADS);
            v.extend_from_slice(SEND);
        }
        ThreadKind::Metrics => {
            v.extend_from_slice(FILE_IO);
            v.extend_from_slice(SOCKETS);
            v.extend_from_slice(SEND);
            v.extend_from_slice(OPEN);
            v.push(libc::SYS_getdents64);
        }
        ThreadKind::Serve | ThreadKind::Control => {
            v.extend_from_slice(FILE_IO);
            v.extend_from_slice(URING);
            v.extend_from_slice(OPEN);
            v.extend_from_slice(FILES);
            v.extend_from_slice(THREAD_START);
            v.extend_from_slice(THREADS);
            v.extend_from_slice(SOCKETS);
            v.extend_from_slice(SEND);
            v.extend_from_slice(MEMORY_MAPS);
            // The main thread, a control kind, applies Landlock once the store is open.
            v.extend_from_slice(&[
                libc::SYS_landlock_create_ruleset,
                libc::SYS_landlock_add_rule,
                libc::SYS_landlock_restrict_self,
            ]);
        }
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// Opening a file.
const OPEN: &[i64] = &[
    libc::SYS_openat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_open,
];

/// Starting a thread (pthread_create: glibc tries clone3, then clone).
const THREAD_START: &[i64] = &[libc::SYS_clone, libc::SYS_clone3];

/// Every thread: memory, locks, time, signals, exiting, logging to stderr, and the credential
/// calls glibc makes on every thread when the daemon drops root (`setxid` broadcast).
const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    // A thread installs its own kind's filter over the one it inherited (only narrower).
    libc::SYS_seccomp,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setgroups,
    libc::SYS_membarrier,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_pwait,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_epoll_wait,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
    libc::SYS_statx,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_lseek,
    libc::SYS_fcntl,
];

/// I/O on files already open: reads, writes, syncs, holes, sizes.
const FILE_IO: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_readv,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync_file_range,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_ioctl,
    libc::SYS_fadvise64,
    libc::SYS_copy_file_range,
    libc::SYS_dup,
    libc::SYS_flock,
];

/// io_uring.
const URING: &[i64] = &[
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

/// Opening, creating, renaming and removing files and directories.
const FILES: &[i64] = &[
    libc::SYS_mkdirat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_getcwd,
    libc::SYS_umask,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_memfd_create,
    libc::SYS_utimensat,
    libc::SYS_getdents64,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_readlink,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_unlink,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_rename,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_mkdir,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_rmdir,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_access,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_stat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_lstat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_chmod,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_chown,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_lchown,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_link,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_symlink,
];

/// Starting threads.
const THREADS: &[i64] = &[
    libc::SYS_sched_setaffinity,
    libc::SYS_getrlimit,
    libc::SYS_prlimit64,
    libc::SYS_getrusage,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_epoll_create1,
];

/// Writing to a socket already connected (event followers, replies).
const SEND: &[i64] = &[
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
];

/// Making, accepting and connecting sockets.
const SOCKETS: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_epoll_create1,
    libc::SYS_pipe2,
    libc::SYS_dup3,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
];

/// Mapping guest memory and userfaults (the vhost-user memory table).
const MEMORY_MAPS: &[i64] = &[libc::SYS_mlock, libc::SYS_munlock, libc::SYS_msync];

// --------------------------------------------------------------------------------------------
// SIGSYS: say which call was forbidden before dying.

/// A SIGSYS handler that writes the forbidden call's number and the thread's name to stderr,
/// then dies of SIGSYS (as with no handler), so the log says what the filter lacked.
fn install_sigsys_reporter() {
    // SAFETY: a zeroed sigaction is valid; the handler only makes async-signal-safe calls
    // (prctl, write, sigaction, raise), and SA_SIGINFO matches its three-argument signature.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            warn!(
                "seccomp: cannot install the SIGSYS reporter: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // siginfo_t for SIGSYS (asm-generic/siginfo.h): si_signo, si_errno, si_code, padding to
    // 16 bytes, then _call_addr (a pointer) and _syscall (an int) at byte 24 on 64-bit Linux.
    // SAFETY: the kernel hands a valid siginfo_t of at least 128 bytes.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into `name`.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(16);
    let mut buf = [0u8; 160];
    let mut len = 0;
    let mut put = |s: &[u8]| {
        for &b in s {
            if len < buf.len() {
                buf[len] = b;
                len += 1;
            }
        }
    };
    put(b"dovetail: seccomp: thread ");
    put(&name[..name_len]);
    put(b" made forbidden system call ");
    let mut digits = [0u8; 12];
    let mut n = nr.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b" (see `ausyscall`); stopping (SIGSYS)\n");
    // SAFETY: write, sigaction and raise are async-signal-safe; `buf[..len]` is initialised.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::raise(libc::SIGSYS);
    }
}

/// Test-only (the `sandbox-forbidden-call` crash point): the system call no queue worker may
/// make (a socket), so a test can see the filter stop one.
pub fn forbidden_call_for_tests() -> std::io::Result<()> {
    // SAFETY: socket(2) has no memory effects; the descriptor is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is ours, just made.
    unsafe { libc::close(fd) };
    Ok(())
}

// --------------------------------------------------------------------------------------------
// Users and groups.

/// The user `serve --user` runs as: its uid, its primary group, and the name given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub name: String,
}

impl std::str::FromStr for User {
    type Err = String;

    /// A user name of this host, or a numeric uid (its primary group then is the group of the
    /// same number unless `--group` says otherwise).
    fn from_str(s: &str) -> Result<User, String> {
        if s.is_empty() {
            return Err("a user name or number cannot be empty".into());
        }
        let by_number = s.parse::<libc::uid_t>().ok();
        let c = std::ffi::CString::new(s).map_err(|_| format!("{s:?} is not a user name"))?;
        // SAFETY: a zeroed passwd (integers and null pointers) is valid; getpwnam_r/getpwuid_r
        // write only within `pw`, `buf` (of its true length) and `out`, and leave `out` null
        // when there is no such user.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0u8; 16 * 1024];
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: as above.
        let rc = unsafe {
            match by_number {
                Some(uid) => {
                    libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut out)
                }
                None => libc::getpwnam_r(
                    c.as_ptr(),
                    &mut pw,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut out,
                ),
            }
        };
        if rc != 0 {
            return Err(format!(
                "cannot look user {s:?} up: {}",
                std::io::Error::from_raw_os_error(rc)
            ));
        }
        match (out.is_null(), by_number) {
            (false, _) => Ok(User {
                uid: pw.pw_uid,
                gid: pw.pw_gid,
                name: s.to_string(),
            }),
            (true, Some(uid)) => Ok(User {
                uid,
                gid: uid,
                name: s.to_string(),
            }),
            (true, None) => Err(format!(
                "no user {s:?} on this host (give a user name from /etc/passwd or a number)"
            )),
        }
    }
}

/// Who the daemon becomes once everything is open (`--user`, `--group`), with the groups it
/// keeps (the sockets' and the control socket's, so it can still give new sockets their group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
    pub user: String,
}

impl Identity {
    pub fn new(
        user: &User,
        group: Option<&crate::access::Group>,
        also: &[Option<&crate::access::Group>],
    ) -> Identity {
        let gid = group.map_or(user.gid, |g| g.gid);
        let mut groups: Vec<libc::gid_t> = std::iter::once(gid)
            .chain(also.iter().flatten().map(|g| g.gid))
            .collect();
        groups.sort_unstable();
        groups.dedup();
        Identity {
            uid: user.uid,
            gid,
            groups,
            user: user.name.clone(),
        }
    }

    /// Refuses, before anything is opened, a store this user could not write once root is
    /// gone (every new version, map and snapshot is a new file in it).
    pub fn check_writable(&self, what: &str, dir: &Path) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir).map_err(|e| format!("{what} {}: {e}", dir.display()))?;
        let mode = meta.mode();
        let ok = (meta.uid() == self.uid && mode & 0o300 == 0o300)
            || (self.groups.contains(&meta.gid()) && mode & 0o030 == 0o030)
            || mode & 0o003 == 0o003;
        if ok {
            return Ok(());
        }
        Err(format!(
            "{what} {} is owned by uid {} gid {} mode {:o}: the daemon runs as {} (uid {}, gid \
             {}) once started and could not write it (e.g. `chown -R {}:{} {}`)",
            dir.display(),
            meta.uid(),
            meta.gid(),
            mode & 0o7777,
            self.user,
            self.uid,
            self.gid,
            self.uid,
            self.gid,
            dir.display()
        ))
    }

    /// Becomes this user for good: supplementary groups, group, then user (every thread of the
    /// process: glibc sets them on all), and checks that root cannot come back.
    pub fn drop_to(&self) -> Result<(), String> {
        let os = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
        // SAFETY: setgroups reads `groups.len()` gids from a live slice.
        if unsafe { libc::setgroups(self.groups.len(), self.groups.as_ptr()) } != 0 {
            return Err(os("setgroups"));
        }
        // SAFETY: plain system calls on integers.
        if unsafe { libc::setresgid(self.gid, self.gid, self.gid) } != 0 {
            return Err(os("setresgid"));
        }
        // SAFETY: as above.
        if unsafe { libc::setresuid(self.uid, self.uid, self.uid) } != 0 {
            return Err(os("setresuid"));
        }
        // SAFETY: as above.
        if self.uid != 0 && unsafe { libc::setuid(0) } == 0 {
            return Err("root could be regained after dropping it".into());
        }
        // After the change of credentials the process is not dumpable; the operator's tools
        // (gdb, /proc/PID/...) still work as root.
        Ok(())
    }
}

// --------------------------------------------------------------------------------------------
// Landlock.

/// The directories the daemon may touch once Landlock applies: `rw` fully (the store, the
/// sockets' directories, the export and import directories, an image's directory), `ro`
/// read-only (the config file, /proc for its own metrics).
#[derive(Debug, Default, Clone)]
pub struct Paths {
    pub rw: Vec<PathBuf>,
    pub ro: Vec<PathBuf>,
}

/// Confines the calling thread and every thread it starts to `paths` (best effort: on a kernel
/// without Landlock, or with an older ABI, as much as it has; the log says which). Call before
/// any other thread starts.
pub fn landlock(paths: &Paths) -> Result<(), String> {
    use landlock::{
        path_beneath_rules, Access, AccessFs, LandlockStatus, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus, ABI,
    };
    let abi = ABI::V5;
    let all = AccessFs::from_all(abi);
    let exists = |p: &&PathBuf| p.exists();
    let rw: Vec<&PathBuf> = paths.rw.iter().filter(exists).collect();
    let ro: Vec<&PathBuf> = paths.ro.iter().filter(exists).collect();
    let status = Ruleset::default()
        .handle_access(all)
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(&rw, all)))
        .and_then(|r| r.add_rules(path_beneath_rules(&ro, AccessFs::from_read(abi))))
        .and_then(|r| r.restrict_self())
        .map_err(|e| format!("Landlock: {e}"))?;
    let kernel = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => format!("ABI {}", effective_abi as i32),
        LandlockStatus::NotEnabled => "Landlock not enabled".to_string(),
        LandlockStatus::NotImplemented => "no Landlock".to_string(),
    };
    let list = |v: &[&PathBuf]| {
        v.iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match status.ruleset {
        RulesetStatus::FullyEnforced => info!(
            "Landlock ({kernel}) fully enforced: files only under {} (read-only: {})",
            list(&rw),
            list(&ro)
        ),
        RulesetStatus::PartiallyEnforced => info!(
            "Landlock ({kernel}) partly enforced (the kernel lacks some rights): files only under \
             {} (read-only: {})",
            list(&rw),
            list(&ro)
        ),
        RulesetStatus::NotEnforced => {
            warn!("Landlock not enforced ({kernel}): the file system is not confined")
        }
    }
    Ok(())
}
