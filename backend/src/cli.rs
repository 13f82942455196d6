//! Command line: `dovetail serve ...`. Parsing (clap) turns into a checked [`ServeConfig`],
//! which [`run_serve`] carries out.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use dovetail_layout::raw::RawOptions;
use dovetail_layout::{BlockLayout, RawLayout, SECTOR_SIZE};
use log::info;

use crate::device::{DeviceConfig, MAX_QUEUES};
use crate::disk::{Disk, SERIAL_LEN};
use crate::server::{self, ListenOn, Shutdown};

/// Image used when `--image` is not given.
pub const DEFAULT_IMAGE: &str = "dovetail.img";
/// Socket used when neither `--socket` nor `--socket-fd` is given.
pub const DEFAULT_SOCKET: &str = "dovetail.sock";
/// Size the default image is created at.
pub const DEFAULT_SIZE: &str = "1G";

#[derive(Debug, Parser)]
#[command(
    name = "dovetail",
    version,
    about = "A vhost-user-blk storage backend for QEMU virtual machines.",
    long_about = "Dovetail serves virtual disks to QEMU over vhost-user-blk \
(-chardev socket -device vhost-user-blk-pci).\n\n\
Run `dovetail serve` with no arguments to serve a 1 GiB image (dovetail.img, created if missing) \
on ./dovetail.sock; it prints the QEMU options that attach a VM to it.\n\n\
Logging goes to stderr; set RUST_LOG=debug (or warn, ...) to change how much is logged."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve one disk image to one guest at a time over a vhost-user-blk socket.
    ///
    /// The daemon keeps serving after a guest disconnects, so the next VM (or the same VM after
    /// a restart of this daemon, with QEMU's `-chardev socket,...,reconnect=1`) can attach.
    /// SIGINT or SIGTERM finish the requests in flight, flush the image, remove the socket and
    /// exit 0.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The raw disk image (a plain file or block device). Created at --size if it does not
    /// exist. Default: ./dovetail.img, created at 1G.
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,

    /// Unix socket to listen on; a stale socket file there is replaced.
    /// Default: ./dovetail.sock.
    #[arg(long, value_name = "PATH", conflicts_with = "socket_fd")]
    pub socket: Option<PathBuf>,

    /// Serve on an already-listening Unix socket inherited as this file descriptor (socket
    /// activation, libvirt, test harnesses) instead of binding --socket.
    #[arg(long, value_name = "N")]
    pub socket_fd: Option<i32>,

    /// Size to create the image at if it does not exist, e.g. 512M, 1G, 10G, or a byte count
    /// (a whole number of 512-byte sectors). If the image exists, it must be this size.
    #[arg(long, value_name = "SIZE")]
    pub size: Option<Size>,

    /// Serve the disk read-only: the guest sees VIRTIO_BLK_F_RO and writes fail.
    #[arg(long)]
    pub read_only: bool,

    /// Number of virtqueues offered to the guest (each gets its own worker thread).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=MAX_QUEUES as i64))]
    pub queues: u16,

    /// Serial number the guest reads with GET_ID (at most 20 bytes).
    #[arg(long, value_name = "ID", default_value = "dovetail")]
    pub serial: String,
}

/// A byte size with an optional K/M/G/T suffix (powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Size, String> {
        let t = s.trim();
        let (digits, shift) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let shift = match c.to_ascii_uppercase() {
                    'K' => 10,
                    'M' => 20,
                    'G' => 30,
                    'T' => 40,
                    _ => {
                        return Err(format!(
                            "unknown size suffix {c:?} in {s:?} (use K, M, G or T)"
                        ))
                    }
                };
                (&t[..i], shift)
            }
            _ => (t, 0),
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("{s:?} is not a size (e.g. 512M, 1G, 1073741824)"))?;
        let bytes = n
            .checked_mul(1u64 << shift)
            .ok_or_else(|| format!("size {s:?} is too large"))?;
        if bytes == 0 {
            return Err("size must be greater than zero".into());
        }
        if bytes % SECTOR_SIZE != 0 {
            return Err(format!(
                "size {s:?} is not a whole number of 512-byte sectors"
            ));
        }
        Ok(Size(bytes))
    }
}

/// Errors from the command line, before anything is served.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot open the disk image")]
    Image(#[source] dovetail_layout::Error),
    #[error(
        "image {path} is {actual} bytes but --size asks for {wanted}; resize it or drop --size"
    )]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        wanted: u64,
    },
    #[error("--size cannot create an image when --read-only is given and {0} does not exist")]
    ReadOnlyCreate(PathBuf),
    #[error(transparent)]
    Serial(#[from] crate::disk::SerialTooLong),
    #[error(transparent)]
    Serve(#[from] server::ServeError),
    #[error("cannot install the signal handlers")]
    Signals(#[source] std::io::Error),
}

/// A fully checked `serve` invocation.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub image: PathBuf,
    pub create_size: Option<u64>,
    pub listen: ListenOn,
    pub read_only: bool,
    pub queues: u16,
    pub serial: String,
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = CliError;

    fn try_from(a: ServeArgs) -> Result<ServeConfig, CliError> {
        // Only the default image gets a default size: an explicit image that does not exist
        // needs an explicit --size, so a typo in a path never creates a fresh empty disk.
        let (image, create_size) = match a.image {
            Some(p) => (p, a.size.map(|s| s.0)),
            None => {
                let size = a
                    .size
                    .unwrap_or(Size::from_str(DEFAULT_SIZE).unwrap_or(Size(1 << 30)));
                (PathBuf::from(DEFAULT_IMAGE), Some(size.0))
            }
        };
        if a.read_only && create_size.is_some() && !image.exists() {
            return Err(CliError::ReadOnlyCreate(image));
        }
        if a.serial.len() > SERIAL_LEN {
            return Err(crate::disk::SerialTooLong::new(&a.serial).into());
        }
        let listen = match (a.socket, a.socket_fd) {
            (_, Some(fd)) => ListenOn::Fd(fd),
            (Some(p), None) => ListenOn::Path(p),
            (None, None) => ListenOn::Path(PathBuf::from(DEFAULT_SOCKET)),
        };
        Ok(ServeConfig {
            image,
            create_size,
            listen,
            read_only: a.read_only,
            queues: a.queues,
            serial: a.serial,
        })
    }
}

/// The QEMU options that attach a VM to a disk served on `socket`.
pub fn qemu_command_line(socket: &Path, queues: u16) -> String {
    let socket = std::fs::canonicalize(socket).unwrap_or_else(|_| socket.to_path_buf());
    format!(
        "qemu-system-x86_64 -m 1G \\\n  \
         -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n  \
         -chardev socket,id=dovetail0,path={},reconnect=1 \\\n  \
         -device vhost-user-blk-pci,chardev=dovetail0,num-queues={queues} \\\n  \
         ...your kernel/boot options...",
        socket.display()
    )
}

/// Opens the image, starts listening, and serves until SIGINT/SIGTERM.
pub fn run_serve(cfg: ServeConfig) -> Result<(), CliError> {
    let layout = RawLayout::open(
        &cfg.image,
        RawOptions {
            create_size: cfg.create_size,
            read_only: cfg.read_only,
        },
    )
    .map_err(CliError::Image)?;
    let actual = layout.capacity().0 * SECTOR_SIZE;
    if let Some(wanted) = cfg.create_size {
        if wanted != actual {
            return Err(CliError::SizeMismatch {
                path: cfg.image,
                actual,
                wanted,
            });
        }
    }
    let disk = Arc::new(Disk::new(Arc::new(layout), cfg.read_only, &cfg.serial)?);

    let shutdown = Shutdown::new()?;
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])
        .map_err(CliError::Signals)?;
    let sig_shutdown = shutdown.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig_shutdown.is_requested() {
                    info!("signal {sig} received again; still shutting down");
                } else {
                    info!("signal {sig} received: finishing requests in flight and shutting down");
                }
                sig_shutdown.request();
            }
        })
        .map_err(CliError::Signals)?;

    let mut listener = server::listen(&cfg.listen)?;
    info!(
        "serving {} ({} bytes{}) on {} with {} queue(s), serial {:?}",
        cfg.image.display(),
        actual,
        if cfg.read_only { ", read-only" } else { "" },
        match &cfg.listen {
            ListenOn::Path(p) => p.display().to_string(),
            ListenOn::Fd(fd) => format!("inherited fd {fd}"),
        },
        cfg.queues,
        cfg.serial
    );
    if let ListenOn::Path(p) = &cfg.listen {
        println!(
            "dovetail: attach a VM with:\n{}",
            qemu_command_line(p, cfg.queues)
        );
    }
    let config = DeviceConfig {
        num_queues: usize::from(cfg.queues),
    };
    server::serve(disk, config, &mut listener, &shutdown)?;
    // Dropping the listener removes the socket file it created.
    drop(listener);
    info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!("1G".parse::<Size>(), Ok(Size(1 << 30)));
        assert_eq!("512M".parse::<Size>(), Ok(Size(512 << 20)));
        assert_eq!("4k".parse::<Size>(), Ok(Size(4096)));
        assert_eq!("1048576".parse::<Size>(), Ok(Size(1 << 20)));
        assert_eq!("2T".parse::<Size>(), Ok(Size(2 << 40)));
        assert!("0".parse::<Size>().is_err());
        assert!("100".parse::<Size>().is_err(), "not a whole sector");
        assert!("1X".parse::<Size>().is_err());
        assert!("G".parse::<Size>().is_err());
        assert!("99999999999T".parse::<Size>().is_err(), "overflow");
    }

    fn args(extra: &[&str]) -> Result<ServeConfig, String> {
        let mut v = vec!["dovetail", "serve"];
        v.extend_from_slice(extra);
        let cli = Cli::try_parse_from(v).map_err(|e| e.to_string())?;
        let Command::Serve(a) = cli.command;
        ServeConfig::try_from(a).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_serve_a_1g_image() {
        let c = args(&[]).expect("defaults");
        assert_eq!(c.image, PathBuf::from(DEFAULT_IMAGE));
        assert_eq!(c.create_size, Some(1 << 30));
        assert!(matches!(c.listen, ListenOn::Path(ref p) if p == Path::new(DEFAULT_SOCKET)));
        assert_eq!(c.queues, 1);
    }

    #[test]
    fn explicit_image_has_no_default_size() {
        let c = args(&["--image", "/x/y.img", "--socket", "/x/s"]).expect("parse");
        assert_eq!(c.create_size, None);
        let c = args(&["--image", "/x/y.img", "--size", "64M", "--socket-fd", "3"]).expect("parse");
        assert_eq!(c.create_size, Some(64 << 20));
        assert!(matches!(c.listen, ListenOn::Fd(3)));
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(args(&["--queues", "0"]).is_err());
        assert!(args(&["--queues", "65"]).is_err());
        assert!(args(&["--socket", "a", "--socket-fd", "3"]).is_err());
        let e = args(&["--serial", "this-serial-is-longer-than-20"]).expect_err("long serial");
        assert!(e.contains("20"), "{e}");
        let e = args(&["--size", "1.5G"]).expect_err("bad size");
        assert!(e.contains("1.5G"), "{e}");
    }
}
