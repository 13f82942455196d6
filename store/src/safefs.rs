//! Opening and creating a store's files without being led elsewhere: files inside the store's
//! directory are opened relative to its descriptor, a symlink is never followed at the last
//! component (`O_NOFOLLOW`), only regular files are accepted, and every file the store creates
//! is created exclusively (`O_EXCL`) with mode 0600 (it holds guests' data).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Mode of every file the store creates.
pub const FILE_MODE: u32 = 0o600;

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} holds a NUL byte", p.display()),
        )
    })
}

/// The error of an `open` that met a symlink or another kind of file than a regular one.
fn not_regular(what: &Path, kind: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} is {kind}, not a regular file; refusing to use it (a store's files are never \
             symlinks or special files)",
            what.display()
        ),
    )
}

/// Makes the error of an `O_NOFOLLOW` open that met a symlink (`ELOOP`) say so.
fn explain(e: io::Error, what: &Path) -> io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        not_regular(what, "a symlink")
    } else {
        e
    }
}

/// Checks that `f` (opened as `what`) is a regular file.
fn regular(f: File, what: &Path) -> io::Result<File> {
    use std::os::unix::fs::FileTypeExt;
    let t = f.metadata()?.file_type();
    if t.is_file() {
        return Ok(f);
    }
    let kind = if t.is_dir() {
        "a directory"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(not_regular(what, kind))
}

fn access(write: bool) -> libc::c_int {
    if write {
        libc::O_RDWR
    } else {
        libc::O_RDONLY
    }
}

/// A store's directory, open: files in it are reached through its descriptor.
#[derive(Debug)]
pub struct Dir {
    fd: File,
    path: std::path::PathBuf,
}

impl Dir {
    /// Opens directory `path`.
    pub fn open(path: &Path) -> io::Result<Dir> {
        let c = cstring(path)?;
        // SAFETY: open reads the NUL-terminated path; the descriptor it returns is owned by the
        // File made from it just below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Dir {
            // SAFETY: `fd` was just opened and nothing else owns it.
            fd: unsafe { File::from_raw_fd(fd) },
            path: path.to_path_buf(),
        })
    }

    fn at(&self, name: &str, flags: libc::c_int) -> io::Result<File> {
        let what = self.path.join(name);
        let c = cstring(Path::new(name))?;
        // SAFETY: openat reads the NUL-terminated name relative to this directory's live
        // descriptor; the descriptor it returns is owned by the File made from it below.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                FILE_MODE as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(explain(io::Error::last_os_error(), &what));
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        regular(unsafe { File::from_raw_fd(fd) }, &what)
    }

    /// Opens the existing regular file `name` in the directory (read-write if `write`).
    pub fn open_file(&self, name: &str, write: bool) -> io::Result<File> {
        self.at(name, access(write))
    }

    /// Opens the existing regular file at relative path `rel` below the directory
    /// (read-write if `write`), one component at a time through descriptors, following no
    /// symlink on the way: every directory on the path is opened with `O_NOFOLLOW`, and a
    /// `..`, `.` or absolute path, which could lead out of the directory, is refused.
    pub fn open_below(&self, rel: &Path, write: bool) -> io::Result<File> {
        use std::path::Component;
        let what = self.path.join(rel);
        let mut names = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(n) => names.push(n),
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "{} is not a plain path below {}; refusing to use it",
                            rel.display(),
                            self.path.display()
                        ),
                    ))
                }
            }
        }
        let Some((last, parents)) = names.split_last() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an empty path names no file",
            ));
        };
        let mut here: Option<File> = None;
        for n in parents {
            let at = here.as_ref().map_or(self.fd.as_raw_fd(), |f| f.as_raw_fd());
            let c = cstring(Path::new(n))?;
            // SAFETY: openat reads the NUL-terminated name relative to a live directory
            // descriptor (this directory's or one opened just before); the descriptor it
            // returns is owned by the File made from it below.
            let fd = unsafe {
                libc::openat(
                    at,
                    c.as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                return Err(match e.raw_os_error() {
                    Some(libc::ELOOP) | Some(libc::ENOTDIR) => io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: {} on its path is a symlink or not a directory; refusing to \
                             follow it",
                            what.display(),
                            Path::new(n).display()
                        ),
                    ),
                    _ => e,
                });
            }
            // SAFETY: `fd` was just opened and nothing else owns it.
            here = Some(unsafe { File::from_raw_fd(fd) });
        }
        let at = here.as_ref().map_or(self.fd.as_raw_fd(), |f| f.as_raw_fd());
        let c = cstring(Path::new(last))?;
        // SAFETY: as above: a live directory descriptor and a NUL-terminated name; the
        // returned descriptor is owned by the File made from it below.
        let fd = unsafe {
            libc::openat(
                at,
                c.as_ptr(),
                access(write) | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(explain(io::Error::last_os_error(), &what));
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        regular(unsafe { File::from_raw_fd(fd) }, &what)
    }

    /// Creates `name` in the directory, read-write, mode 0600: exclusively, so an existing
    /// file, or a symlink planted there, is refused (`AlreadyExists`).
    pub fn create_new(&self, name: &str) -> io::Result<File> {
        self.at(name, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL)
    }

    /// Removes `name` from the directory if it is there (never what a symlink points to).
    pub fn remove_if_present(&self, name: &str) -> io::Result<()> {
        let c = cstring(Path::new(name))?;
        // SAFETY: unlinkat reads the NUL-terminated name relative to the live descriptor.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) } != 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::NotFound {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Renames `from` to `to`, both in the directory.
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (a, b) = (cstring(Path::new(from))?, cstring(Path::new(to))?);
        let fd = self.fd.as_raw_fd();
        // SAFETY: renameat reads the two NUL-terminated names relative to the live descriptor.
        if unsafe { libc::renameat(fd, a.as_ptr(), fd, b.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Makes the directory's entries durable.
    pub fn sync(&self) -> io::Result<()> {
        self.fd.sync_all()
    }
}

/// Opens the existing regular file at `path` (read-write if `write`) without following a
/// symlink at its last component.
pub fn open_file(path: &Path, write: bool) -> io::Result<File> {
    let c = cstring(path)?;
    // SAFETY: open reads the NUL-terminated path; the descriptor it returns is owned by the
    // File made from it below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            access(write) | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(explain(io::Error::last_os_error(), path));
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    regular(unsafe { File::from_raw_fd(fd) }, path)
}

/// Creates the file at `path`, read-write, mode 0600, exclusively (an existing file or a
/// symlink there is refused with `AlreadyExists`).
pub fn create_new(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn symlinks_and_special_files_are_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let target = t.path().join("target");
        std::fs::write(&target, b"precious").expect("write");
        std::os::unix::fs::symlink(&target, t.path().join("link")).expect("symlink");
        let d = Dir::open(t.path()).expect("dir");
        let e = d.open_file("link", true).expect_err("a symlink is refused");
        assert!(e.to_string().contains("is a symlink"), "{e}");
        let e = d
            .create_new("link")
            .expect_err("a symlink is not created over");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        let e = open_file(&t.path().join("link"), false).expect_err("by path too");
        assert!(e.to_string().contains("is a symlink"), "{e}");
        std::fs::create_dir(t.path().join("sub")).expect("mkdir");
        let e = d
            .open_file("sub", false)
            .expect_err("a directory is refused");
        assert!(e.to_string().contains("is a directory"), "{e}");
        let e = open_file(Path::new("/dev/null"), false).expect_err("a device is refused");
        assert!(e.to_string().contains("character device"), "{e}");
        assert_eq!(std::fs::read(&target).expect("read"), b"precious");
    }

    #[test]
    fn paths_below_a_directory_follow_no_symlink() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(t.path().join("sub")).expect("mkdir");
        std::fs::write(t.path().join("sub/f"), b"mine").expect("write");
        let elsewhere = tempfile::tempdir().expect("tempdir");
        std::fs::write(elsewhere.path().join("f"), b"theirs").expect("write");
        std::os::unix::fs::symlink(elsewhere.path(), t.path().join("link")).expect("symlink");
        let d = Dir::open(t.path()).expect("dir");
        let mut s = String::new();
        use std::io::Read;
        d.open_below(Path::new("sub/f"), false)
            .expect("a plain path")
            .read_to_string(&mut s)
            .expect("read");
        assert_eq!(s, "mine");
        let e = d
            .open_below(Path::new("link/f"), true)
            .expect_err("a symlinked directory is refused");
        assert!(e.to_string().contains("symlink"), "{e}");
        for bad in ["../f", "./sub/f", "/etc/passwd", ""] {
            assert!(d.open_below(Path::new(bad), false).is_err(), "{bad}");
        }
        let e = d
            .open_below(Path::new("sub"), false)
            .expect_err("a directory is refused");
        assert!(e.to_string().contains("is a directory"), "{e}");
    }

    #[test]
    fn created_files_are_0600() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = Dir::open(t.path()).expect("dir");
        d.create_new("a").expect("create");
        create_new(&t.path().join("b")).expect("create");
        for n in ["a", "b"] {
            let m = std::fs::metadata(t.path().join(n)).expect("stat").mode();
            assert_eq!(m & 0o777, 0o600, "{n}");
        }
        d.rename("a", "c").expect("rename");
        d.remove_if_present("c").expect("remove");
        d.remove_if_present("c").expect("absent is fine");
        assert!(!t.path().join("c").exists());
    }
}
