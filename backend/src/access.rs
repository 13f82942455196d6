//! Who may reach the daemon and what it may create: Unix sockets created with their final mode
//! and group atomically, the credentials of a control-socket peer (`SO_PEERCRED`), groups by
//! name, and the export directory live exports are confined to. SECURITY.md is the threat model
//! these serve.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

/// A group given on the command line (`--socket-group`, `--control-group`): its id, and the
/// name it was given by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub gid: libc::gid_t,
    pub name: String,
}

impl std::str::FromStr for Group {
    type Err = String;

    /// A group name of this host, or a numeric gid.
    fn from_str(s: &str) -> Result<Group, String> {
        if s.is_empty() {
            return Err("a group name or number cannot be empty".into());
        }
        if let Ok(gid) = s.parse::<libc::gid_t>() {
            return Ok(Group {
                gid,
                name: s.to_string(),
            });
        }
        let Ok(c) = CString::new(s) else {
            return Err(format!("{s:?} is not a group name"));
        };
        let mut grp: libc::group = unsafe_zeroed_group();
        let mut buf = vec![0u8; 16 * 1024];
        let mut out: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is to a live local (`grp`, `buf` with its true length, `out`);
        // getgrnam_r writes only within them and leaves `out` null when there is no such group.
        let rc = unsafe {
            libc::getgrnam_r(
                c.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut out,
            )
        };
        if rc != 0 {
            return Err(format!(
                "cannot look group {s:?} up: {}",
                io::Error::from_raw_os_error(rc)
            ));
        }
        if out.is_null() {
            return Err(format!(
                "no group {s:?} on this host (give a group name from /etc/group or a number)"
            ));
        }
        Ok(Group {
            gid: grp.gr_gid,
            name: s.to_string(),
        })
    }
}

fn unsafe_zeroed_group() -> libc::group {
    // SAFETY: `group` is a plain C struct of integers and pointers; all zeroes (null pointers)
    // is a valid value, and getgrnam_r overwrites it before it is read.
    unsafe { std::mem::zeroed() }
}

/// The process's umask is process-wide: changes of it are serialised here.
static UMASK: Mutex<()> = Mutex::new(());

/// Binds a Unix socket at `path` that has, from the instant it exists, permissions `mode` and,
/// when `group` is given, that group: the socket is bound with the umask set to give exactly
/// `mode`; with a group, it is bound in a private directory (0700, next to `path`), given its
/// group there and renamed into place, so nobody can connect before it has both. Then the path
/// is checked with `lstat`: a socket owned by this process's user, with that mode and group.
/// Never changes anything by path after the socket is reachable.
///
/// `path` must not exist (the caller removes a stale socket first) or be a stale socket.
pub fn bind_socket(path: &Path, mode: u32, group: Option<&Group>) -> io::Result<UnixListener> {
    let listener = match group {
        None => bind_with_umask(path, mode)?,
        Some(g) => bind_in_private_dir(path, mode, g)?,
    };
    verify_socket(path, mode, group)?;
    Ok(listener)
}

fn bind_with_umask(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let _guard = UMASK.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: umask only changes this process's file creation mask; it is restored right
    // after the bind, under the lock that every change of it here takes.
    let old = unsafe { libc::umask(!mode & 0o777) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    bound
}

fn bind_in_private_dir(path: &Path, mode: u32, group: &Group) -> io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if path.file_name().is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        ));
    }
    let mut tmp = None;
    for n in 0..100u32 {
        let candidate = parent.join(format!(".dovetail-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&candidate) {
            Ok(()) => {
                tmp = Some(candidate);
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    let tmp = tmp.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("cannot make a private directory in {}", parent.display()),
        )
    })?;
    let inner = tmp.join("s");
    let r = (|| {
        let listener = bind_with_umask(&inner, mode)?;
        let c = cstr(&inner)?;
        // SAFETY: lchown reads the NUL-terminated path; the directory holding it is ours and
        // 0700, so the name is the socket just bound; it does not follow symlinks.
        if unsafe { libc::lchown(c.as_ptr(), u32::MAX, group.gid) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "cannot give socket {} group {} ({}): {e}",
                    path.display(),
                    group.name,
                    group.gid
                ),
            ));
        }
        std::fs::rename(&inner, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&tmp);
    r
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} holds a NUL byte", p.display()),
        )
    })
}

/// Checks with `lstat` that `path` is a socket of this process's user with permissions `mode`
/// and, when given, group `group`.
pub fn verify_socket(path: &Path, mode: u32, group: Option<&Group>) -> io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::symlink_metadata(path)?;
    let mismatch = |what: String| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not the socket just created ({what}): something changed it",
                path.display()
            ),
        ))
    };
    if !meta.file_type().is_socket() {
        return mismatch("not a socket".into());
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid {
        return mismatch(format!("owner {} instead of {uid}", meta.uid()));
    }
    if meta.mode() & 0o7777 != mode {
        return mismatch(format!(
            "mode {:04o} instead of {mode:04o}",
            meta.mode() & 0o7777
        ));
    }
    if let Some(g) = group {
        if meta.gid() != g.gid {
            return mismatch(format!("group {} instead of {}", meta.gid(), g.gid));
        }
    }
    Ok(())
}

/// The credentials of the process at the other end of a Unix socket, from `SO_PEERCRED`
/// (as they were when it connected), and its supplementary groups (`SO_PEERGROUPS`, empty
/// where the kernel does not report them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
}

/// The peer of the connected Unix socket `fd`.
pub fn peer(fd: RawFd) -> io::Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a live ucred.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut glen = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `glen` bytes into `groups`, which holds that many.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut glen,
        )
    };
    if rc == 0 {
        groups.truncate(glen as usize / std::mem::size_of::<libc::gid_t>());
    } else {
        groups.clear();
    }
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
        groups,
    })
}

/// Who may use the control socket, besides being able to connect to it: root, the daemon's
/// own user, and members of `group` (primary or supplementary).
#[derive(Debug, Clone)]
pub struct ControlAccess {
    pub owner: libc::uid_t,
    pub group: Option<Group>,
}

impl Default for ControlAccess {
    fn default() -> Self {
        ControlAccess {
            // SAFETY: geteuid has no preconditions.
            owner: unsafe { libc::geteuid() },
            group: None,
        }
    }
}

impl ControlAccess {
    /// `Ok` if `peer` may send commands; else why not.
    pub fn check(&self, peer: &Peer) -> Result<(), String> {
        if peer.uid == 0 || peer.uid == self.owner {
            return Ok(());
        }
        if let Some(g) = &self.group {
            if peer.gid == g.gid || peer.groups.contains(&g.gid) {
                return Ok(());
            }
            return Err(format!(
                "user {} (pid {}) is not allowed to control this daemon: only root, user {} \
                 and members of group {} ({}) are",
                peer.uid, peer.pid, self.owner, g.name, g.gid
            ));
        }
        Err(format!(
            "user {} (pid {}) is not allowed to control this daemon: only root and user {} are \
             (`serve --control-group GROUP` admits a group)",
            peer.uid, peer.pid, self.owner
        ))
    }
}

/// The directory `serve --export-dir` names: live exports create files only in it, by a
/// plain name, relative to its descriptor (opened once at start).
#[derive(Debug)]
pub struct ExportDir {
    pub path: PathBuf,
    dir: File,
}

impl ExportDir {
    /// Opens directory `path` (which must exist).
    pub fn open(path: &Path) -> io::Result<ExportDir> {
        let c = cstr(path)?;
        // SAFETY: open reads the NUL-terminated path; the returned descriptor is owned by the
        // File made from it just below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("cannot open export directory {}: {e}", path.display()),
            ));
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let dir = unsafe { File::from_raw_fd(fd) };
        Ok(ExportDir {
            path: path.to_path_buf(),
            dir,
        })
    }

    /// The file name an export's `to` names in this directory: a plain name, or an absolute
    /// path whose directory is this one (as given to `--export-dir`, compared as written).
    pub fn name_of<'a>(&self, to: &'a Path) -> Result<&'a OsStr, String> {
        let plain = |p: &'a Path| -> Option<&'a OsStr> {
            let mut c = p.components();
            match (c.next(), c.next()) {
                (Some(Component::Normal(n)), None) => Some(n),
                _ => None,
            }
        };
        if let Some(n) = plain(to) {
            if !to.as_os_str().as_bytes().contains(&b'/') {
                return Ok(n);
            }
        }
        if to.is_absolute() {
            if let (Some(parent), Some(name)) = (to.parent(), to.file_name()) {
                if same_dir(parent, &self.path) && plain(Path::new(name)).is_some() {
                    return Ok(name);
                }
            }
        }
        Err(format!(
            "export: \"to\" must be a plain file name (no '/', not . or ..) created in the \
             export directory {}, not {}",
            self.path.display(),
            to.display()
        ))
    }

    /// Creates `name` in the directory: exclusively (an existing file, or a symlink, is
    /// refused), mode 0600, never following a symlink.
    pub fn create(&self, name: &OsStr) -> io::Result<File> {
        let c = CString::new(name.as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the name"))?;
        create_at(self.dir.as_raw_fd(), &c)
    }

    /// Opens `name` in the directory for reading (a live import): never through a symlink
    /// (`O_NOFOLLOW`), and only a regular file.
    pub fn open_file(&self, name: &OsStr) -> io::Result<File> {
        let c = CString::new(name.as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the name"))?;
        // SAFETY: openat reads the NUL-terminated name relative to the live directory
        // descriptor; the returned descriptor is owned by the File made from it just below.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        Ok(file)
    }

    /// Removes `name` from the directory (an export that failed after creating its file).
    pub fn remove(&self, name: &OsStr) -> io::Result<()> {
        let c = CString::new(name.as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the name"))?;
        // SAFETY: unlinkat reads the NUL-terminated name relative to the live directory
        // descriptor; it removes the name only (never follows a symlink).
        if unsafe { libc::unlinkat(self.dir.as_raw_fd(), c.as_ptr(), 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// What the control socket lets its peers do, as `serve` was told.
#[derive(Debug, Default)]
pub struct Security {
    /// Who may send commands.
    pub control: ControlAccess,
    /// Where `export` may create files (`None`: live export is refused).
    pub export_dir: Option<ExportDir>,
    /// Where `import` may read images from (`None`: live import is refused).
    pub import_dir: Option<ExportDir>,
    /// Whether `tee` accepts fault rules (`serve --allow-fault-injection`).
    pub allow_fault_injection: bool,
}

/// Lexical equality of two directory paths, ignoring `.` components and trailing slashes.
fn same_dir(a: &Path, b: &Path) -> bool {
    let norm = |p: &Path| -> Vec<PathBuf> {
        p.components()
            .filter(|c| !matches!(c, Component::CurDir))
            .map(|c| PathBuf::from(c.as_os_str()))
            .collect()
    };
    norm(a) == norm(b)
}

/// `openat(dir, name, O_WRONLY|O_CREAT|O_EXCL|O_NOFOLLOW, 0600)`.
fn create_at(dir: RawFd, name: &CStr) -> io::Result<File> {
    // SAFETY: openat reads the NUL-terminated name relative to the live directory descriptor
    // `dir`; the returned descriptor is owned by the File made from it just below.
    let fd = unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_name_and_number() {
        assert_eq!("0".parse::<Group>().expect("gid 0").gid, 0);
        assert_eq!("root".parse::<Group>().expect("root").gid, 0);
        let e = "no-such-group-here"
            .parse::<Group>()
            .expect_err("no such group");
        assert!(e.contains("no group \"no-such-group-here\""), "{e}");
    }

    #[test]
    fn export_names_are_plain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let x = ExportDir::open(dir.path()).expect("open");
        assert_eq!(x.name_of(Path::new("a.img")).expect("plain"), "a.img");
        assert_eq!(
            x.name_of(&dir.path().join("b.img")).expect("in the dir"),
            "b.img"
        );
        for bad in ["../a", "a/b", "..", ".", "/tmp/x", "", "a/", "./a"] {
            assert!(x.name_of(Path::new(bad)).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sockets_get_their_mode_and_group() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s.sock");
        let _l = bind_socket(&p, 0o640, None).expect("bind");
        assert_eq!(
            std::fs::symlink_metadata(&p).expect("lstat").mode() & 0o7777,
            0o640
        );
        // SAFETY: getegid has no preconditions.
        let gid = unsafe { libc::getegid() };
        let g = Group {
            gid,
            name: "mine".into(),
        };
        let q = dir.path().join("g.sock");
        let _m = bind_socket(&q, 0o660, Some(&g)).expect("bind with a group");
        let meta = std::fs::symlink_metadata(&q).expect("lstat");
        assert_eq!((meta.mode() & 0o7777, meta.gid()), (0o660, gid));
        // Only the socket is left in the directory: the private one is gone.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
