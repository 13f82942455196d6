//! Opening, creating, renaming and removing the files of a store's `maps/` directory (presence
//! maps, migration records, their temporary files) without following symbolic links.
//!
//! Every operation goes through a descriptor of the directory itself (opened with
//! `O_DIRECTORY | O_NOFOLLOW`, so `maps/` being a symlink is refused too) and the `*at` system
//! calls with a plain file name: a file is opened with `O_NOFOLLOW` and must be a regular file;
//! a new file is created with `O_CREAT | O_EXCL | O_NOFOLLOW` and mode 0600 (the data it
//! describes is a guest's). A symlink planted at any of these names is refused with an error
//! naming it; its target is never opened, truncated or written.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Mode of every file created in `maps/`.
pub const FILE_MODE: libc::mode_t = 0o600;

/// A `maps/` directory, open.
#[derive(Debug)]
pub struct MapsDir {
    dir: File,
    path: PathBuf,
}

/// What is at a name of the directory, not following a symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Missing,
    Regular,
    /// A symlink, a directory, a FIFO...: never opened.
    Other,
}

fn cname(name: &str) -> io::Result<CString> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a file name with a NUL byte"))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl MapsDir {
    /// Opens the directory at `path` (its last component must not be a symlink).
    pub fn open(path: &Path) -> io::Result<MapsDir> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
        // SAFETY: `c` is a valid NUL-terminated string that outlives the call; the returned
        // descriptor (checked below) is owned by the File and by nothing else.
        let fd = cvt(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })
        .map_err(|e| refine(e, path))?;
        // SAFETY: `fd` is a fresh descriptor this function owns.
        let dir = unsafe { File::from_raw_fd(fd) };
        Ok(MapsDir {
            dir,
            path: path.to_path_buf(),
        })
    }

    /// The directory of file `path`, and the file's name in it.
    pub fn of(path: &Path) -> io::Result<(MapsDir, String)> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} has no usable file name", path.display()),
                )
            })?
            .to_string();
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Ok((MapsDir::open(parent)?, name))
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What is at `name` (without following a symlink).
    pub fn entry(&self, name: &str) -> io::Result<Entry> {
        let c = cname(name)?;
        // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: the directory descriptor is open for the life of `self`, `c` is a valid
        // NUL-terminated name and `st` a valid, writable `stat` for the call's duration.
        let r = unsafe {
            libc::fstatat(
                self.dir.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::NotFound {
                Ok(Entry::Missing)
            } else {
                Err(e)
            };
        }
        Ok(if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            Entry::Regular
        } else {
            Entry::Other
        })
    }

    /// Opens the regular file `name` (read-only, or read-write), never through a symlink.
    pub fn open_file(&self, name: &str, write: bool) -> io::Result<File> {
        let c = cname(name)?;
        let access = if write { libc::O_RDWR } else { libc::O_RDONLY };
        // SAFETY: the directory descriptor is open for the life of `self`, `c` is a valid
        // NUL-terminated name; the returned descriptor (checked) is owned by the File below.
        // O_NONBLOCK keeps a FIFO planted here from blocking the open; it does nothing to a
        // regular file.
        let fd = cvt(unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                c.as_ptr(),
                access | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK,
            )
        })
        .map_err(|e| refine(e, &self.path.join(name)))?;
        // SAFETY: `fd` is a fresh descriptor this function owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let meta = file.metadata()?;
        if !meta.file_type().is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not a regular file (mode {:o}); refusing to use it",
                    self.path.join(name).display(),
                    meta.mode()
                ),
            ));
        }
        Ok(file)
    }

    /// Creates the new regular file `name` (mode 0600, read-write); fails if anything, even a
    /// dangling symlink, is at that name.
    pub fn create_file(&self, name: &str) -> io::Result<File> {
        let c = cname(name)?;
        // SAFETY: as in `open_file`; O_EXCL with O_CREAT never follows a symlink at `name`.
        let fd = cvt(unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDWR
                    | libc::O_CREAT
                    | libc::O_EXCL
                    | libc::O_NOFOLLOW
                    | libc::O_CLOEXEC
                    | libc::O_NOCTTY,
                libc::c_uint::from(FILE_MODE),
            )
        })
        .map_err(|e| refine(e, &self.path.join(name)))?;
        // SAFETY: `fd` is a fresh descriptor this function owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Removes a leftover temporary file `name` if it is a regular file; a symlink or anything
    /// else there is refused (with an error naming it), never followed nor removed.
    pub fn remove_stale(&self, name: &str) -> io::Result<()> {
        match self.entry(name)? {
            Entry::Missing => Ok(()),
            Entry::Regular => self.remove(name),
            Entry::Other => Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} is not a regular file (a symlink?); refusing to use or remove it",
                    self.path.join(name).display()
                ),
            )),
        }
    }

    /// Hard-links `from` to `to` (fails if `to` exists).
    pub fn link(&self, from: &str, to: &str) -> io::Result<()> {
        let (a, b) = (cname(from)?, cname(to)?);
        let fd = self.dir.as_raw_fd();
        // SAFETY: valid descriptor and NUL-terminated names for the call's duration; flags 0:
        // a symlink at `from` would be linked itself, not followed.
        cvt(unsafe { libc::linkat(fd, a.as_ptr(), fd, b.as_ptr(), 0) })?;
        Ok(())
    }

    /// Renames `from` over `to` (a symlink at `to` is replaced, not followed).
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (a, b) = (cname(from)?, cname(to)?);
        let fd = self.dir.as_raw_fd();
        // SAFETY: valid descriptor and NUL-terminated names for the call's duration.
        cvt(unsafe { libc::renameat(fd, a.as_ptr(), fd, b.as_ptr()) })?;
        Ok(())
    }

    /// Removes `name` (whatever it is, but not a directory; a symlink is removed itself).
    pub fn remove(&self, name: &str) -> io::Result<()> {
        let c = cname(name)?;
        // SAFETY: valid descriptor and NUL-terminated name for the call's duration.
        cvt(unsafe { libc::unlinkat(self.dir.as_raw_fd(), c.as_ptr(), 0) })?;
        Ok(())
    }

    /// Makes the directory's entries durable.
    pub fn sync(&self) -> io::Result<()> {
        self.dir.sync_all()
    }
}

/// Where a store keeps a disk's small records (presence maps, migration records): its `maps/`
/// directory (a file store), or the records of a store on RADOS (`rados:POOL/NAME/maps`, objects;
/// `dovetail_store::rados::RadosDir`). The presence map and the migration record are read and
/// written through this, so they do not care which; their bytes are the same in both.
#[derive(Debug)]
pub enum Dir {
    Files(MapsDir),
    Rados(dovetail_store::rados::RadosDir),
}

/// One record, open: a file of `maps/`, or a record object of a store on RADOS.
#[derive(Debug)]
pub enum MapFile {
    File(File),
    Rados {
        dir: dovetail_store::rados::RadosDir,
        name: String,
    },
}

impl Dir {
    /// Opens the records at `path` (a `maps/` directory, or `rados:POOL/NAME/maps`), those of
    /// version `key` (on RADOS, through the store handle serving it).
    pub fn open(path: &Path, key: u64) -> io::Result<Dir> {
        match dovetail_store::rados::RadosDir::of_dir(path, Some(key)) {
            Some(r) => r.map(Dir::Rados),
            None => MapsDir::open(path).map(Dir::Files),
        }
    }

    /// The records holding the record at `path`, and its name.
    pub fn of(path: &Path, key: u64) -> io::Result<(Dir, String)> {
        if !Dir::is_rados(path) {
            let (d, name) = MapsDir::of(path)?;
            return Ok((Dir::Files(d), name));
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} has no usable record name", path.display()),
                )
            })?
            .to_string();
        let parent = path.parent().unwrap_or(Path::new(""));
        Ok((Dir::open(parent, key)?, name))
    }

    /// Whether the records at `path` are objects of a store on RADOS.
    pub fn is_rados(path: &Path) -> bool {
        path.to_str()
            .is_some_and(|s| s.starts_with(dovetail_store::rados::SCHEME))
    }

    /// The directory's (or records') path.
    pub fn path(&self) -> &Path {
        match self {
            Dir::Files(d) => d.path(),
            Dir::Rados(r) => r.path(),
        }
    }

    /// What is at `name` (a record object is always regular).
    pub fn entry(&self, name: &str) -> io::Result<Entry> {
        match self {
            Dir::Files(d) => d.entry(name),
            Dir::Rados(r) => Ok(match r.stat(name)? {
                Some(_) => Entry::Regular,
                None => Entry::Missing,
            }),
        }
    }

    /// Opens record `name` (read-only, or read-write).
    pub fn open_file(&self, name: &str, write: bool) -> io::Result<MapFile> {
        match self {
            Dir::Files(d) => d.open_file(name, write).map(MapFile::File),
            Dir::Rados(r) => match r.stat(name)? {
                Some(_) => Ok(MapFile::Rados {
                    dir: r.clone(),
                    name: name.to_string(),
                }),
                None => Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} does not exist", r.object(name)),
                )),
            },
        }
    }

    /// Removes record `name`; NotFound if there is none.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match self {
            Dir::Files(d) => d.remove(name),
            Dir::Rados(r) => {
                if r.remove(name)? {
                    Ok(())
                } else {
                    Err(io::Error::from(io::ErrorKind::NotFound))
                }
            }
        }
    }

    /// Makes the records' names durable (a RADOS operation is durable when acknowledged).
    pub fn sync(&self) -> io::Result<()> {
        match self {
            Dir::Files(d) => d.sync(),
            Dir::Rados(_) => Ok(()),
        }
    }

    /// Every name in the directory (the records of the store on RADOS), sorted; empty if the
    /// directory does not exist.
    pub fn names(path: &Path) -> io::Result<Vec<String>> {
        if let Some(r) = dovetail_store::rados::RadosDir::of_dir(path, None) {
            return r?.list();
        }
        let entries = match std::fs::read_dir(path) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut v: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        Ok(v)
    }
}

/// Whether anything is at `path` (a file of `maps/`, not following a symlink, or a record
/// object of a store on RADOS); errors count as "something" only where they are not NotFound.
pub fn exists(path: &Path) -> bool {
    if Dir::is_rados(path) {
        return Dir::of(path, key_hint(path))
            .and_then(|(d, n)| d.entry(&n))
            .is_ok_and(|e| e != Entry::Missing);
    }
    path.symlink_metadata().is_ok()
}

/// The version key a record's name starts with (`<key>.map`, `<key>.migration`), else 0.
fn key_hint(path: &Path) -> u64 {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('.').next())
        .and_then(|k| k.parse().ok())
        .unwrap_or(0)
}

impl MapFile {
    /// Bytes in the record.
    pub fn size(&self) -> io::Result<u64> {
        match self {
            MapFile::File(f) => f.metadata().map(|m| m.len()),
            MapFile::Rados { dir, name } => dir.stat(name)?.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} is gone", dir.object(name)),
                )
            }),
        }
    }

    /// Reads exactly `buf.len()` bytes at `off`.
    pub fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        match self {
            MapFile::File(f) => f.read_exact_at(buf, off),
            MapFile::Rados { dir, name } => dir.read_exact_at(name, off, buf),
        }
    }

    /// Writes all of `data` at `off` (on RADOS one operation: all of it or nothing).
    pub fn write_all_at(&self, data: &[u8], off: u64) -> io::Result<()> {
        match self {
            MapFile::File(f) => f.write_all_at(data, off),
            MapFile::Rados { dir, name } => dir.write_at(name, off, data),
        }
    }

    /// `fdatasync` of a file; nothing on RADOS (a write is durable when acknowledged).
    pub fn sync_data(&self) -> io::Result<()> {
        match self {
            MapFile::File(f) => f.sync_data(),
            MapFile::Rados { .. } => Ok(()),
        }
    }
}

/// ELOOP from `O_NOFOLLOW` says "a symlink is there": say so.
fn refine(e: io::Error, path: &Path) -> io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        io::Error::new(
            e.kind(),
            format!(
                "{} is a symbolic link; refusing to follow it",
                path.display()
            ),
        )
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn symlinks_are_refused_and_new_files_are_private() {
        let t = tempfile::tempdir().expect("test step");
        let target = t.path().join("target");
        std::fs::write(&target, b"precious").expect("test step");
        let maps = t.path().join("maps");
        std::fs::create_dir(&maps).expect("test step");
        std::os::unix::fs::symlink(&target, maps.join("1.map")).expect("test step");
        let d = MapsDir::open(&maps).expect("test step");
        let e = d.open_file("1.map", true).expect_err("must fail");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(d.entry("1.map").expect("test step"), Entry::Other);
        assert!(d.create_file("1.map").is_err());
        assert!(d.remove_stale("1.map").is_err());
        assert_eq!(std::fs::read(&target).expect("test step"), b"precious");
        let mut f = d.create_file("2.map").expect("test step");
        f.write_all(b"x").expect("test step");
        let mode = std::fs::metadata(maps.join("2.map"))
            .expect("test step")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(d.open_file("../target", false).is_err());
        std::os::unix::fs::symlink(&maps, t.path().join("maps2")).expect("test step");
        assert!(MapsDir::open(&t.path().join("maps2")).is_err());
    }
}
