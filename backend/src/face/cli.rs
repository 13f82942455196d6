//! Command line: `dovetail serve ...`, `dovetail store ...`, `dovetail disk ...`. Parsing (clap)
//! turns `serve` into a checked [`ServeConfig`], which [`run_serve`] carries out; the store and
//! disk subcommands are carried out by [`run_store`] and [`run_disk`] over `dovetail-store`.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dovetail_layout::raw::RawOptions;
use dovetail_layout::{BlockLayout, RawLayout, SECTOR_SIZE};
use dovetail_store::{human_size, Store, StoreError, TierSpec};
use log::{info, warn};

use crate::device::{DeviceConfig, MAX_QUEUES};
use crate::disk::SERIAL_LEN;
use crate::ops::diskio;
use crate::daemon::live::{CommandError, Daemon, EventHub, FailedDisk, LiveDisk, StoreDisks};
use crate::server::{self, ListenOn, Shutdown};
use crate::ops::teed;
use crate::daemon::control;
use crate::metrics;

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
`dovetail store create` and `dovetail disk create` prepare an on-disk store: a directory \
holding the shared block store (extents granted to each disk's versions, crash-safe \
metadata) and a catalog of its disks. `dovetail store check` verifies one.\n\n\
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

    /// Create or check a store: the shared block store that disks' versions live in.
    ///
    /// A store is a directory holding `store.meta` (a header and two checksummed metadata
    /// slots: the extent grants and the catalog of disks and versions) and the extents, in
    /// `data.0` (a sparse file) or, for a store created with tiers, in one data file per tier
    /// (say a fast one on NVMe and a slow one on a disk). Only one process may have a store
    /// open for changes at a time.
    #[command(subcommand)]
    Store(StoreCommand),

    /// Create, list or delete the disks of a store.
    ///
    /// A disk is what one guest sees. Each disk has a trusted version (the layout instance
    /// serving it) and at times a candidate version being validated beside it; every version
    /// writes only to the extents granted to it.
    #[command(subcommand)]
    Disk(DiskCommand),

    /// Copy every block disk NAME's candidate lacks from its trusted version, offline (for a
    /// disk no daemon is serving; a served disk migrates with `dovetail ctl migrate`).
    ///
    /// Shows a progress bar. Interrupted (or crashed), it resumes where it was on the next
    /// run: blocks already in the candidate are not copied again. `dovetail promote` (offline),
    /// `dovetail ctl promote` (live) or the next `serve` then take it from there.
    Migrate(MigrateArgs),

    /// Make disk NAME's candidate its trusted version, offline (for a disk no daemon is
    /// serving; a served disk is promoted with `dovetail ctl promote`).
    ///
    /// The candidate must hold every block (`dovetail migrate` first), and the trusted version
    /// must have no snapshots (they retire with it: export and delete them first). First a
    /// verification pass compares every block of the candidate with the trusted version; a
    /// block that differs refuses the promote (naming the blocks) and changes nothing. The pass
    /// resumes where it stopped if interrupted. Then one catalog commit swaps the roles: the
    /// old version is retired and its extents freed.
    Promote(PromoteArgs),

    /// Talk to a running daemon over its control socket (`serve --control PATH`).
    ///
    /// Shows what the daemon serves and changes it live: attach a candidate version to a
    /// running disk, relax or tighten its policy, drop it, take snapshots, follow events, read
    /// metrics. Each change pauses only that disk's I/O, for the swap alone; the reply reports
    /// the pause. Tables by default, `--json` for scripts.
    Ctl(crate::face::ctl::CtlArgs),
}

/// Layouts a disk in a store may be created with.
pub use crate::ops::STORE_LAYOUTS;
/// Extent size when `--extent-size` is not given.
pub const DEFAULT_EXTENT_SIZE: &str = "64M";

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Create a store in DIR (created if missing): DIR/store.meta, and DIR/data.0 (--size) or
    /// one data file per tier (--tier).
    ///
    /// A tier is a data file of its own, e.g. a fast one on NVMe and a slow one on a disk
    /// (--tier fast=/nvme/ds.fast:64G --tier slow=/hdd/ds.slow:1T), holding a contiguous range
    /// of the store's extents, in the order given. A layout that does not ask for a tier gets
    /// the lowest free extent, so the first tier fills first. A layout with block classes
    /// (parallax-v2) places its metadata and hot data on the tier its policy names, by default
    /// the first tier ("fast"), and cold data on the last tier ("slow").
    ///
    /// Refuses if DIR already holds a store, or if any data file exists. Data files are sparse:
    /// space is taken only as versions write.
    Create(StoreCreateArgs),

    /// Verify every store-level invariant of the store in DIR and print a report.
    ///
    /// Checks the header (magic, format version, checksum), both metadata slots, the grant
    /// table against each version's extent list, the catalog (no version of a deleted disk,
    /// every referenced key exists), free-space accounting, the tier table, and each tier's
    /// data file (present and long enough); prints each tier's extents and free ones. Exits
    /// 0 when the store is consistent and 1 on any violation. A slot torn by a crash during a
    /// commit is reported as a note, not a violation: the previous generation is used.
    ///
    /// Works while a daemon serves the store: it checks the last committed metadata without
    /// taking the store from the daemon, and keeps the trees' checks only from a pass during
    /// which the daemon committed nothing (so no block was reused under the checker). If the
    /// daemon commits during every pass (a guest flushing all the time), the report says
    /// which checks could not be made (NOT CHECKED) and the exit status is 1, never a false
    /// "consistent".
    /// With --data, also reads every data block of every parallax-v2 version and snapshot and
    /// verifies it against its checksum, naming each bad block (disk, version, block).
    /// parallax-v1 keeps no data checksums: its destroyed data cannot be detected.
    Check(StoreCheckArgs),

    /// Upgrade the store in DIR to the current format, adopting its tier files.
    ///
    /// Since format version 4 every tier file carries a header naming its store and tier, and
    /// a file without the right one is refused: the store's metadata cannot make the daemon
    /// open another file. A format-3 store is upgraded by any read-write open when its data
    /// file is inside DIR (data.0); one whose tier files are elsewhere is refused until this
    /// command adopts them, because nothing in a format-3 store proves that the files its tier
    /// table names are its own. Check first that `dovetail store check DIR` lists this store's
    /// files; each must be a regular file of exactly the tier's size. Stores of other format
    /// versions are upgraded as any read-write open does, or left as they are.
    Upgrade(StoreDirArgs),
}

#[derive(Debug, Args)]
pub struct StoreCheckArgs {
    /// Directory holding the store.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,

    /// Also verify every parallax-v2 data block (of every version and snapshot, every copy)
    /// against its checksum. Reads all the data: takes as long as an export of every disk.
    #[arg(long)]
    pub data: bool,
}

#[derive(Debug, Args)]
pub struct StoreCreateArgs {
    /// Directory for the store.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,

    /// Size of the store's data, in one data file, DIR/data.0 (a single tier named
    /// `default`): a whole number of extents, e.g. 64G, 1T. Give either --size or --tier.
    #[arg(
        long,
        value_name = "SIZE",
        required_unless_present = "tiers",
        conflicts_with = "tiers"
    )]
    pub size: Option<Size>,

    /// A tier: NAME (1 to 16 of a-z 0-9 _ -), the PATH of its data file (created, must not
    /// exist; a relative path is taken from the current directory and recorded absolute) and
    /// its SIZE (a whole number of extents). Repeat for each tier, 1 to 8, fastest first:
    /// --tier fast=/nvme/ds.fast:64G --tier slow=/hdd/ds.slow:1T.
    #[arg(long = "tier", value_name = "NAME=PATH:SIZE")]
    pub tiers: Vec<TierArg>,

    /// Size of an extent, the unit of space granted to one version (a multiple of 4K; at most
    /// 65536 extents per store).
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_EXTENT_SIZE)]
    pub extent_size: Size,
}

#[derive(Debug, Args)]
pub struct StoreDirArgs {
    /// Directory holding the store.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Add disk NAME to the store in DIR, with an empty first (trusted) version.
    ///
    /// The version starts empty (an empty root record); its layout formats it on first use.
    /// The size may exceed the store's free space: extents are granted as the disk is written.
    Create(DiskCreateArgs),

    /// List the disks of the store in DIR with their versions and extents.
    ///
    /// Works while a daemon serves the store: it lists the last committed catalog.
    List(StoreDirArgs),

    /// Delete disk NAME and all its versions from the store in DIR, freeing their extents.
    Delete(DiskNameArgs),

    /// Copy the raw image FILE into disk NAME (created at the image's size if missing).
    ///
    /// All-zero 4 KiB blocks are skipped: they take no space in the disk. A teed disk is
    /// written through its Tee, so the candidate gets the data too.
    Import(DiskImportArgs),

    /// Copy disk NAME (or one of its snapshots) to a new raw image FILE, sparse where the disk
    /// holds zeroes. The file must not exist.
    Export(DiskExportArgs),

    /// Freeze disk NAME as a snapshot: later writes copy-on-write, the snapshot keeps the
    /// disk as it is now. The disk must not be being served (the daemon holds the store).
    Snapshot(DiskSnapshotArgs),

    /// List the snapshots of disk NAME.
    ///
    /// Works while a daemon serves the store (the last committed state; `ctl snapshots` asks
    /// the daemon).
    Snapshots(DiskNameArgs),

    /// Delete snapshot SNAPSHOT of disk NAME, freeing the blocks only it referenced.
    DeleteSnapshot(DiskSnapshotNameArgs),

    /// Serve disk NAME through a Tee: attach a new, empty candidate version of LAYOUT beside
    /// the trusted one (or change the policy of the one attached).
    ///
    /// `dovetail serve --store` then mirrors the guest's writes to both versions and validates
    /// the candidate as POLICY says (see README: policies and what each may expose). Blocks the
    /// candidate does not hold yet are served by the trusted version and not compared. A
    /// candidate that disagrees, fails, panics or writes outside its extents is quarantined:
    /// the guest carries on with the trusted version, and the quarantine is recorded in the
    /// catalog (`disk list` shows it) until `disk untee`. The disk must not be being served.
    Tee(DiskTeeArgs),

    /// Upgrade disk NAME in place to LAYOUT, offline: a new version of LAYOUT is made, every
    /// block copied to it, and it replaces the trusted version (which is retired, its extents
    /// freed). For a layout that is already trusted; new layouts go through `disk tee` and a
    /// validation period first. The disk must not be being served.
    Upgrade(DiskUpgradeArgs),

    /// Drop disk NAME's candidate version (quarantined or not) and free its extents; the disk
    /// is then served by its trusted version alone. The disk must not be being served.
    Untee(DiskNameArgs),

    /// Draw disk NAME's heat (reads + writes per part of the disk) as a PNG picture.
    ///
    /// The disk is cut into COLUMNS × ROWS equal parts, left to right and top to bottom from
    /// block 0, at most one part per 4 KiB block (ROWS = COLUMNS for a large disk, fewer for a
    /// small one); each part is a CELL × CELL square, black for never touched, then dark red to
    /// yellow to white on a log scale up to the hottest part. Needs a parallax-v2 version (which
    /// keeps annotations). Works while a daemon serves the store, from the annotations it last
    /// committed (`ctl annotations` asks the daemon for the live ones).
    Heatmap(DiskHeatmapArgs),

    /// Show disk NAME's annotations offline, as `dovetail ctl annotations` does for a served
    /// disk: totals, labels, hottest regions, a histogram, the blocks carrying a taint label,
    /// one block's record. Needs a parallax-v2 version. Works while a daemon serves the store,
    /// from the annotations it last committed (`ctl annotations` has the live ones).
    Annotations(DiskAnnotationsArgs),
}

#[derive(Debug, Args)]
pub struct DiskHeatmapArgs {
    /// Directory holding the store.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Name of the disk.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// The PNG file to write (replaced if it exists).
    #[arg(long, value_name = "FILE")]
    pub png: PathBuf,
    /// Parts of the disk per row of the picture.
    #[arg(long, value_name = "C", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub columns: u32,
    /// Side of one part's square, in pixels (from 4 up, parts are separated by a grid line).
    #[arg(long, value_name = "PIXELS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub cell: u32,
    /// Which version's annotations: `trusted` or `candidate` (default: the trusted version if
    /// it is parallax-v2, else the candidate).
    #[arg(long = "version", value_name = "ROLE", value_parser = ["trusted", "candidate"])]
    pub role: Option<String>,
}

#[derive(Debug, Args)]
pub struct DiskAnnotationsArgs {
    /// Directory holding the store.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Name of the disk.
    #[arg(value_name = "NAME")]
    pub name: String,
    #[command(flatten)]
    pub query: crate::face::ctl::AnnotationQueryArgs,
    /// Print the result as JSON (the `annotations` reply of docs/control.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DiskTeeArgs {
    /// Directory holding the store.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Name of the disk.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Layout of the candidate version: one the trusted version's layout can be upgraded to
    /// (parallax-v1 to parallax-v1 or parallax-v2, parallax-v2 to parallax-v2); default: the
    /// layout of the candidate attached, else the trusted version's layout.
    #[arg(long, value_name = "LAYOUT",
          value_parser = clap::builder::PossibleValuesParser::new(STORE_LAYOUTS))]
    pub candidate: Option<String>,
    /// Validation policy: sync-cross-checks, sync-read-checks, async-old-primary,
    /// barrier-writes-async, async-new-primary, lazy-hashes or mirror-only.
    #[arg(long, value_name = "POLICY", default_value = "sync-cross-checks")]
    pub policy: String,
    /// Inject faults into the candidate (testing; repeatable), like QEMU's blkdebug:
    /// KIND[:key=value,...] with KIND one of flip-read, stale-read, misdirect-write,
    /// drop-write, eio, panic, write-outside and keys op, prob, sector, nth, after, offset;
    /// e.g. `flip-read:prob=0.01`, `eio:nth=5,op=write`.
    #[arg(long = "fault", value_name = "RULE")]
    pub faults: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DiskUpgradeArgs {
    /// Directory holding the store.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Name of the disk.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// The layout to upgrade to.
    #[arg(long, value_name = "LAYOUT",
          value_parser = clap::builder::PossibleValuesParser::new(STORE_LAYOUTS))]
    pub to: String,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Directory holding the store.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Name of the disk.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Data bytes per second at most, e.g. 256M; 0 for no limit.
    #[arg(long, value_name = "RATE", default_value = "0")]
    pub rate: String,
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// Directory holding the store.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Name of the disk.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Skip the verification pass: trust the presence map as it is.
    #[arg(long)]
    pub no_verify: bool,
    /// The verification pass's read rate per version, e.g. 64M (0: no limit).
    #[arg(
        long,
        value_name = "RATE",
        default_value = "0",
        conflicts_with = "no_verify"
    )]
    pub verify_rate: String,
}

/// Runs `dovetail promote`.
pub fn run_promote(a: PromoteArgs) -> Result<(), CliError> {
    let rate = if a.verify_rate == "0" {
        0
    } else {
        a.verify_rate
            .parse::<Size>()
            .map_err(|e| CliError::Invalid(format!("--verify-rate: {e}")))?
            .0
    };
    let store = Store::open(&a.dir)?;
    let message = teed::promote_offline(&store, &a.name, a.no_verify, rate)?;
    println!("{message}");
    Ok(())
}

/// Runs `dovetail migrate`.
pub fn run_migrate(a: MigrateArgs) -> Result<(), CliError> {
    let rate = if a.rate == "0" {
        0
    } else {
        a.rate
            .parse::<Size>()
            .map_err(|e| CliError::Invalid(format!("--rate: {e}")))?
            .0
    };
    let store = Store::open(&a.dir)?;
    let p = teed::migrate_offline(&store, &a.name, rate, true)?;
    println!(
        "disk {}: every block is in the candidate ({} copied, {} zero blocks, {:.1} MiB/s); \
         `dovetail promote {} {}` promotes it (or `dovetail ctl promote` on a daemon serving it)",
        a.name,
        p.copied_blocks,
        p.zero_blocks,
        p.rate_bytes_per_second / f64::from(1 << 20),
        a.dir.display(),
        a.name
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct DiskImportArgs {
    /// Directory holding the store.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Name of the disk.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// The raw image to read (a multiple of 4096 bytes).
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
}

#[derive(Debug, Args)]
pub struct DiskExportArgs {
    /// Directory holding the store.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Name of the disk.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// The raw image to create.
    #[arg(long, value_name = "FILE")]
    pub to: PathBuf,
    /// Export this snapshot instead of the disk's current contents.
    #[arg(long, value_name = "SNAPSHOT")]
    pub snapshot: Option<String>,
}

#[derive(Debug, Args)]
pub struct DiskSnapshotArgs {
    /// Directory holding the store.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Name of the disk.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Name of the snapshot (default: snap-SECONDS, the time now).
    #[arg(long = "name", value_name = "SNAPSHOT")]
    pub snapshot: Option<String>,
}

#[derive(Debug, Args)]
pub struct DiskSnapshotNameArgs {
    /// Directory holding the store.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Name of the disk.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Name of the snapshot.
    #[arg(value_name = "SNAPSHOT")]
    pub snapshot: String,
}

#[derive(Debug, Args)]
pub struct DiskCreateArgs {
    /// Directory holding the store.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,

    /// Name of the new disk: 1 to 64 characters from A-Z a-z 0-9 . _ -, starting with a letter
    /// or digit.
    #[arg(value_name = "NAME")]
    pub name: String,

    /// Size the guest sees, a multiple of 4K, e.g. 10G.
    #[arg(long, value_name = "SIZE")]
    pub size: Size,

    /// Layout of the disk's first version.
    #[arg(long, value_name = "LAYOUT", default_value = "parallax-v1",
          value_parser = clap::builder::PossibleValuesParser::new(STORE_LAYOUTS))]
    pub layout: String,
}

#[derive(Debug, Args)]
pub struct DiskNameArgs {
    /// Directory holding the store.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,

    /// Name of the disk.
    #[arg(value_name = "NAME")]
    pub name: String,
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

    /// Size to create the image at if it does not exist, e.g. 512M, 1G, 10GiB, or a byte count
    /// (a whole number of 512-byte sectors). K/KiB, M/MiB, G/GiB, T/TiB are powers of 1024;
    /// KB, MB, GB, TB are refused as ambiguous. If the image exists, it must be this size.
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

    /// With --image: the disk's name on the control socket (`dovetail ctl status NAME`), in
    /// metrics, log lines and the printed QEMU options. Default: the image's file name (e.g.
    /// dovetail.img).
    #[arg(long, value_name = "NAME", conflicts_with = "store")]
    pub name: Option<String>,

    /// Serve disks of this store (see `dovetail store create`) instead of an image. Each
    /// --disk names one disk and the socket to serve it on; every disk gets its own socket,
    /// queues and worker threads. A disk's serial is its name (first 20 bytes).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["image", "size", "socket", "socket_fd"],
          requires = "disk")]
    pub store: Option<PathBuf>,

    /// With --store: serve disk NAME on the Unix socket SOCKET (repeat for more disks).
    #[arg(long, value_name = "NAME=SOCKET", requires = "store")]
    pub disk: Vec<DiskSocket>,

    /// Listen for control commands on the Unix socket PATH (newline-delimited JSON,
    /// docs/control.md; `dovetail ctl --control PATH` is its client): status, events and
    /// metrics, and live changes of a disk's versions and policy while its guest runs.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Permissions of the control socket, in octal. Anyone who can connect can change the
    /// disks' versions.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode,
          requires = "control")]
    pub control_mode: u32,

    /// Also let members of this group (a name or a gid) use the control socket: the socket
    /// gets this group (and mode 0660 unless --control-mode says otherwise), and a peer is
    /// served only if it is root, the daemon's user or a member (checked with SO_PEERCRED).
    #[arg(long, value_name = "GROUP", requires = "control")]
    pub control_group: Option<crate::access::Group>,

    /// Permissions of the disks' sockets, in octal (default 0600, or 0660 with
    /// --socket-group). Connecting needs write permission: to let QEMU running as another user
    /// (e.g. libvirt-qemu) attach, give its group with --socket-group.
    #[arg(long, value_name = "MODE", value_parser = parse_mode, conflicts_with = "socket_fd")]
    pub socket_mode: Option<u32>,

    /// Group of the disks' sockets (a name or a gid), set before anyone can connect.
    #[arg(long, value_name = "GROUP", conflicts_with = "socket_fd")]
    pub socket_group: Option<crate::access::Group>,

    /// Let `ctl export` write snapshots as files in this directory (which must exist): each
    /// export is a new file (never an existing one, never through a symlink), mode 0600,
    /// named by a plain file name. Without it, live export is refused.
    #[arg(long, value_name = "DIR", requires = "control")]
    pub export_dir: Option<PathBuf>,

    /// Accept fault rules (`ctl tee --fault`) from the control socket. For tests only: a
    /// fault rule corrupts or fails what a candidate reads or writes.
    #[arg(long)]
    pub allow_fault_injection: bool,

    /// Serve metrics in the Prometheus text format on http://ADDR/metrics; ADDR must be a
    /// loopback address with a port, e.g. 127.0.0.1:9187.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,

    /// With --store: every SECS seconds, the tier mover of each parallax-v2 disk observes
    /// which blocks are hot and which went cold, then moves blocks (at the disk's rate, `ctl
    /// tiers --rate`) until every block is where its class's policy wants it: hot blocks to
    /// the hot class, idle ones to the cold class (compressed by default), and blocks whose
    /// class's copies or tier changed. 0 disables the mover (`ctl tiers --move-now` then has
    /// nothing to run). Disks served read-only have no mover.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub mover_interval: u64,

    /// Accept guest memory whose file is not sealed against shrinking. By default a frontend's
    /// memory table is refused (and its connection dropped) unless every region's file carries
    /// F_SEAL_SHRINK, as QEMU's memory-backend-memfd sets by default (seal=on): a frontend that
    /// shrinks the file under the daemon's mapping would make the daemon die of SIGBUS, taking
    /// every disk it serves down. memory-backend-file (e.g. on hugetlbfs) cannot be sealed;
    /// with this flag it is accepted, and a frontend that shrinks it can stop the daemon (run
    /// one daemon per VM then).
    #[arg(long)]
    pub allow_unsealed_memory: bool,

    /// With --image: how the image meets the host's page cache. `none`: direct I/O (O_DIRECT),
    /// the host keeps no copy of the guest's data (the guest has its own cache), memory stays
    /// bounded, and the device's queue is kept full (recommended for production; the default
    /// for a block device). `writeback`: through the page cache (the default for a file). In
    /// both, a guest FLUSH is an fdatasync. Store disks go through the page cache.
    #[arg(long, value_name = "MODE", value_parser = parse_cache)]
    pub cache: Option<dovetail_layout::CacheMode>,

    /// How each queue carries out reads and writes: `auto` submits many at once with io_uring
    /// to a raw image (a pool of threads per queue for other layouts, or where the kernel has
    /// no io_uring), `threads` always uses the pool, `sync` runs one request at a time per
    /// queue, in order.
    #[arg(long, value_name = "ENGINE", default_value = "auto", value_parser = parse_engine)]
    pub io_engine: crate::disk::Engine,
}

fn parse_cache(s: &str) -> Result<dovetail_layout::CacheMode, String> {
    s.parse()
}

fn parse_engine(s: &str) -> Result<crate::disk::Engine, String> {
    s.parse()
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{s:?} is not an octal mode such as 0600"))?;
    if m > 0o777 {
        return Err(format!("mode {s} has bits beyond 0777"));
    }
    Ok(m)
}

/// `NAME=SOCKET` of `serve --store ... --disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSocket {
    pub name: String,
    pub socket: PathBuf,
}

impl FromStr for DiskSocket {
    type Err = String;

    fn from_str(s: &str) -> Result<DiskSocket, String> {
        match s.split_once('=') {
            Some((name, socket)) if !name.is_empty() && !socket.is_empty() => Ok(DiskSocket {
                name: name.to_string(),
                socket: PathBuf::from(socket),
            }),
            _ => Err(format!("{s:?} is not NAME=SOCKET")),
        }
    }
}

/// A `--tier NAME=PATH:SIZE` of `store create`: split at the first `=` and the last `:`, so a
/// path may hold either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierArg {
    pub name: String,
    pub path: PathBuf,
    pub size: Size,
}

impl FromStr for TierArg {
    type Err = String;

    fn from_str(s: &str) -> Result<TierArg, String> {
        let bad = |why: String| format!("{s:?} is not NAME=PATH:SIZE ({why})");
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| bad("no '=' after the tier's name".into()))?;
        if name.is_empty() {
            return Err(bad("the tier's name before '=' is empty".into()));
        }
        dovetail_store::format::check_tier_name(name).map_err(|e| bad(e.to_string()))?;
        let (path, size) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad("no ':' before the tier's size".into()))?;
        if path.is_empty() {
            return Err(bad(format!(
                "tier {name}'s path between '=' and ':' is empty"
            )));
        }
        if size.is_empty() {
            return Err(bad(format!("tier {name}'s size after ':' is empty")));
        }
        let size = size
            .parse::<Size>()
            .map_err(|e| bad(format!("tier {name}'s size: {e}")))?;
        Ok(TierArg {
            name: name.to_string(),
            path: PathBuf::from(path),
            size,
        })
    }
}

/// A byte size: a byte count, or a whole number with a suffix K, KiB, M, MiB, G, GiB, T or
/// TiB (any case; powers of 1024: 1G = 1GiB = 1073741824). KB, MB, GB and TB are refused as
/// ambiguous (powers of 1000 or 1024?).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Size, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, suffix) = (&t[..split], t[split..].trim_start());
        let not_a_size = || format!("{s:?} is not a size (e.g. 512M, 1G, 1GiB, 1073741824)");
        if digits.is_empty() || !suffix.chars().all(|c| c.is_ascii_alphabetic()) {
            return Err(not_a_size());
        }
        let shift = match suffix.to_ascii_lowercase().as_str() {
            "" => 0,
            "k" | "kib" => 10,
            "m" | "mib" => 20,
            "g" | "gib" => 30,
            "t" | "tib" => 40,
            "kb" | "mb" | "gb" | "tb" => {
                let unit = &suffix[..1];
                return Err(format!(
                    "size {s:?} is ambiguous ({suffix} may mean a power of 1000 or of 1024): \
                     write {digits}{unit} or {digits}{unit}iB (powers of 1024), or the byte count"
                ));
            }
            _ => {
                return Err(format!(
                    "unknown size suffix {suffix:?} in {s:?} (use K, KiB, M, MiB, G, GiB, T or \
                     TiB: powers of 1024)"
                ))
            }
        };
        let n: u64 = digits.parse().map_err(|_| not_a_size())?;
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
    #[error("disk {0:?} is named twice")]
    DuplicateDisk(String),
    #[error("disk {name} stopped serving")]
    DiskFailed {
        name: String,
        #[source]
        source: server::ServeError,
    },
    #[error("a disk's serve thread panicked")]
    DiskPanicked,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("store {dir} is not consistent: {count} violation(s) (listed above)")]
    Inconsistent { dir: PathBuf, count: usize },
    #[error("cannot {op}")]
    File {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Ops(#[from] crate::ops::OpsError),
    #[error(transparent)]
    Control(#[from] crate::daemon::control::ControlError),
    #[error("cannot serve metrics")]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(
        "store {dir}: not everything could be checked while a daemon serves it (NOT CHECKED above)"
    )]
    NotFullyChecked { dir: PathBuf },
    #[error("{0}")]
    KeptChanging(String),
}

/// Reads of a store beside its writer ([`read_store`]) start over at most this many times.
pub const READ_PASSES: u32 = 20;

/// Runs the read-only `f` over the store in `dir`, also while a daemon serves it: then over
/// the last committed state, again if the daemon committed while `f` read (blocks it read may
/// have been reused), until a pass saw no commit.
pub fn read_store<T, E>(
    dir: &Path,
    f: impl Fn(&Arc<Store>) -> Result<T, E>,
) -> Result<T, CliError>
where
    CliError: From<E>,
{
    for pass in 1..=READ_PASSES {
        let store = Store::open_reader(dir)?;
        if !store.beside_writer() {
            return Ok(f(&store)?);
        }
        let read = store.info().generation;
        let r = f(&store).map_err(CliError::from);
        if store.committed_generation()? == read {
            return r;
        }
        std::thread::sleep(Duration::from_millis(u64::from(pass) * 5));
    }
    Err(CliError::KeptChanging(format!(
        "the daemon serving {} committed during each of {READ_PASSES} reads; try again when \
         its disks are quieter, or ask it (`dovetail ctl`)",
        dir.display()
    )))
}

/// A fully checked `serve` invocation.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Serve these disks of a store instead of `image`.
    pub store: Option<(PathBuf, Vec<DiskSocket>)>,
    /// The control socket and its mode.
    pub control: Option<(PathBuf, u32)>,
    /// Who may connect to the disks' sockets.
    pub socket_perms: server::SocketPerms,
    /// The group also allowed on the control socket.
    pub control_group: Option<crate::access::Group>,
    /// Where live exports go (an existing directory).
    pub export_dir: Option<PathBuf>,
    /// Whether the control socket accepts fault rules.
    pub allow_fault_injection: bool,
    /// Where to serve metrics over HTTP.
    pub metrics: Option<std::net::SocketAddr>,
    pub image: PathBuf,
    pub create_size: Option<u64>,
    pub listen: ListenOn,
    pub read_only: bool,
    pub queues: u16,
    pub serial: String,
    /// With an image: the disk's name (`--name`; `None`: the image's file name).
    pub name: Option<String>,
    /// How often the tier mover of a parallax-v2 disk runs (`None`: never).
    pub mover_interval: Option<std::time::Duration>,
    /// Accept guest memory not sealed against shrinking (`--allow-unsealed-memory`).
    pub allow_unsealed_memory: bool,
    /// The image's cache mode (`--cache`; `None`: by the image's file type).
    pub cache: Option<dovetail_layout::CacheMode>,
    /// How queues carry out I/O (`--io-engine`).
    pub io_engine: crate::disk::Engine,
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
        if let Some(size) = create_size {
            if size > dovetail_layout::raw::MAX_FILE_SIZE {
                return Err(CliError::Invalid(format!(
                    "--size {size}: an image file is at most {} bytes (8 EiB - 1)",
                    dovetail_layout::raw::MAX_FILE_SIZE
                )));
            }
        }
        if let Some(addr) = a.metrics {
            if !addr.ip().is_loopback() {
                return Err(CliError::Invalid(format!(
                    "--metrics {addr}: metrics are served on a loopback address only (e.g. \
                     127.0.0.1:{})",
                    addr.port()
                )));
            }
        }
        if let Some(n) = &a.name {
            dovetail_store::names::check_name(dovetail_store::names::NameKind::Disk, n)
                .map_err(|e| CliError::Invalid(format!("--name: {e}")))?;
        }
        if a.serial.len() > SERIAL_LEN {
            return Err(crate::disk::SerialTooLong::new(&a.serial).into());
        }
        let listen = match (a.socket, a.socket_fd) {
            (_, Some(fd)) => ListenOn::Fd(fd),
            (Some(p), None) => ListenOn::Path(p),
            (None, None) => ListenOn::Path(PathBuf::from(DEFAULT_SOCKET)),
        };
        if let Some(d) = &a.export_dir {
            if !std::fs::metadata(d).is_ok_and(|m| m.is_dir()) {
                return Err(CliError::Invalid(format!(
                    "--export-dir {}: not an existing directory",
                    d.display()
                )));
            }
        }
        // With a group, the group gets what the owner has unless a mode is given.
        let socket_perms = server::SocketPerms {
            mode: a.socket_mode.unwrap_or(match a.socket_group {
                Some(_) => 0o660,
                None => 0o600,
            }),
            group: a.socket_group,
        };
        let control_mode = match (&a.control_group, a.control_mode) {
            (Some(_), crate::daemon::control::DEFAULT_MODE) => 0o660,
            (_, m) => m,
        };
        let store = match a.store {
            Some(_) if a.cache == Some(dovetail_layout::CacheMode::None) => {
                return Err(CliError::Invalid(
                    "--cache none is for --image: store disks are served through the page \
                     cache (--cache writeback) in this release"
                        .into(),
                ));
            }
            Some(dir) => {
                let mut seen = std::collections::HashSet::new();
                for d in &a.disk {
                    if !seen.insert(d.name.clone()) {
                        return Err(CliError::DuplicateDisk(d.name.clone()));
                    }
                }
                Some((dir, a.disk))
            }
            None => None,
        };
        Ok(ServeConfig {
            store,
            control: a.control.map(|p| (p, control_mode)),
            socket_perms,
            control_group: a.control_group,
            export_dir: a.export_dir,
            allow_fault_injection: a.allow_fault_injection,
            metrics: a.metrics,
            image,
            create_size,
            listen,
            read_only: a.read_only,
            queues: a.queues,
            serial: a.serial,
            name: a.name,
            mover_interval: (a.mover_interval > 0)
                .then(|| std::time::Duration::from_secs(a.mover_interval)),
            allow_unsealed_memory: a.allow_unsealed_memory,
            cache: a.cache,
            io_engine: a.io_engine,
        })
    }
}

/// A [`Shutdown`] requested by SIGINT or SIGTERM.
fn shutdown_on_signals() -> Result<Arc<Shutdown>, CliError> {
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
    Ok(shutdown)
}

/// Opens (or, the first time, creates) the trusted version of each named disk of the store and
/// serves each on its own socket, with its own queue workers, until SIGINT/SIGTERM.
fn run_serve_store(dir: &Path, disks: &[DiskSocket], cfg: &ServeConfig) -> Result<(), CliError> {
    let store = Store::open(dir).map_err(CliError::Store)?;
    // Files in maps/ of versions that are no candidate any more (an interrupted promote).
    crate::ops::maps::clean_orphans(&store);
    let events = Arc::new(EventHub::default());
    let mut served = Vec::new();
    let mut failed = Vec::new();
    let mut first_error = None;
    for d in disks {
        // A disk that cannot be opened (damaged, ...) does not stop the others: it is reported
        // as failed and `ctl reopen` retries it.
        let live = match LiveDisk::open_store(
            &store,
            &d.name,
            &d.socket,
            cfg.read_only,
            events.clone(),
            cfg.mover_interval,
        ) {
            Ok(live) => live,
            Err(e) => {
                let reason = dovetail_layout::error_chain(&e);
                failed.push(FailedDisk::record(&events, &d.name, &d.socket, reason, 1));
                first_error.get_or_insert(e);
                continue;
            }
        };
        let listener = server::listen_with(&ListenOn::Path(d.socket.clone()), &cfg.socket_perms)?;
        info!(
            "serving disk {} of {} ({} bytes) on {}",
            d.name,
            dir.display(),
            live.disk.capacity().0 * dovetail_layout::SECTOR_SIZE,
            d.socket.display()
        );
        println!(
            "dovetail: disk {}: attach a VM with:\n{}",
            d.name,
            qemu_command_line(&d.name, &d.socket, cfg.queues)
        );
        served.push((live, listener));
    }
    if let Some(e) = first_error {
        if served.is_empty() && cfg.control.is_none() {
            // Nothing to serve and no control socket to reopen a disk through.
            log::error!("no disk could be opened and there is no control socket (--control) to reopen one: stopping");
            return Err(e.into());
        }
        if cfg.control.is_none() {
            warn!(
                "{} disk(s) not served; without a control socket (--control) they can be \
                 retried only by restarting the daemon",
                failed.len()
            );
        }
    }
    let reopen = StoreDisks {
        store: store.clone(),
        read_only: cfg.read_only,
        mover_interval: cfg.mover_interval,
    };
    run_live(
        served,
        events,
        Some(dir.to_path_buf()),
        cfg,
        Some((reopen, failed)),
    )
}

/// A disk's serve loop's thread: its name and what the loop returned.
type DiskThread = std::thread::JoinHandle<(String, Result<(), server::ServeError>)>;

/// Starts the serve loop of `live` on `listener` in a thread of its own.
fn start_disk_thread(
    live: Arc<LiveDisk>,
    mut listener: vhost::vhost_user::Listener,
    config: DeviceConfig,
    shutdown: Arc<Shutdown>,
    remove_socket: bool,
) -> std::io::Result<DiskThread> {
    let name = live.name.clone();
    std::thread::Builder::new()
        .name(format!("disk-{name}"))
        .spawn(move || {
            let on_guest = |connected: bool| {
                if connected {
                    live.guests
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                live.connected
                    .store(connected, std::sync::atomic::Ordering::Relaxed);
            };
            let on_refused = || {
                live.refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            };
            let r = server::serve_observed(
                &name,
                live.disk.clone(),
                config,
                &mut listener,
                &shutdown,
                &on_guest,
                &on_refused,
            );
            if let Err(e) = &r {
                log::error!("disk {name} stopped: {}", dovetail_layout::error_chain(e));
            }
            drop(listener);
            if remove_socket {
                server::remove_socket(&live.socket);
            }
            // The other disks keep serving; only a signal stops them.
            (name, r)
        })
}

/// Serves every disk on its own thread, with the control socket and the metrics endpoint if
/// asked for, until SIGINT/SIGTERM; then closes the Tees. `store_disks`: the store the disks
/// come from and the disks that could not be opened, which `ctl reopen` retries.
fn run_live(
    served: Vec<(Arc<LiveDisk>, vhost::vhost_user::Listener)>,
    events: Arc<EventHub>,
    store: Option<PathBuf>,
    cfg: &ServeConfig,
    store_disks: Option<(StoreDisks, Vec<FailedDisk>)>,
) -> Result<(), CliError> {
    let security = crate::access::Security {
        control: crate::access::ControlAccess {
            group: cfg.control_group.clone(),
            ..Default::default()
        },
        export_dir: match &cfg.export_dir {
            Some(dir) => {
                Some(
                    crate::access::ExportDir::open(dir).map_err(|source| CliError::File {
                        op: format!("open the export directory {}", dir.display()),
                        source,
                    })?,
                )
            }
            None => None,
        },
        allow_fault_injection: cfg.allow_fault_injection,
    };
    // Socket files bound at a path are removed at shutdown (an inherited socket is not ours).
    let remove_sockets = cfg.store.is_some() || matches!(cfg.listen, ListenOn::Path(_));
    let mut daemon = Daemon::new(
        served.iter().map(|(d, _)| d.clone()).collect(),
        events,
        store,
    )
    .with_security(security);
    if let Some((sd, failed)) = store_disks {
        daemon = daemon.with_store_disks(sd, failed);
    }
    let daemon = Arc::new(daemon);
    let shutdown = shutdown_on_signals()?;
    let config = DeviceConfig {
        num_queues: usize::from(cfg.queues),
    };
    // The control socket and the metrics endpoint first: if one cannot start, nothing has been
    // served yet and the disks' socket files are removed again.
    let started = (|| -> Result<_, CliError> {
        let control = match &cfg.control {
            Some((path, mode)) => Some(control::start(path, *mode, daemon.clone())?),
            None => None,
        };
        let metrics = match cfg.metrics {
            Some(addr) => {
                let d = daemon.clone();
                let server = metrics::serve_http(addr, Arc::new(move || d.render_metrics()))?;
                info!("metrics on http://{}/metrics", server.local_addr());
                Some(server)
            }
            None => None,
        };
        Ok((control, metrics))
    })();
    let (control, metrics) = match started {
        Ok(s) => s,
        Err(e) => {
            if remove_sockets {
                for (live, _) in &served {
                    server::remove_socket(&live.socket);
                }
            }
            return Err(e);
        }
    };
    let threads: Arc<Mutex<Vec<DiskThread>>> = Arc::new(Mutex::new(Vec::new()));
    for (live, listener) in served {
        let t = start_disk_thread(live, listener, config, shutdown.clone(), remove_sockets)
            .map_err(CliError::Signals)?;
        threads.lock().unwrap_or_else(|p| p.into_inner()).push(t);
    }
    {
        let threads = threads.clone();
        let shutdown = shutdown.clone();
        let queues = cfg.queues;
        let perms = cfg.socket_perms.clone();
        daemon.set_launcher(Box::new(move |live: Arc<LiveDisk>| {
            let mut threads = threads.lock().unwrap_or_else(|p| p.into_inner());
            if shutdown.is_requested() {
                return Err(CommandError::new("failed", "the daemon is shutting down"));
            }
            let listener = server::listen_with(&ListenOn::Path(live.socket.clone()), &perms)
                .map_err(|e| CommandError::new("failed", dovetail_layout::error_chain(&e)))?;
            info!(
                "serving disk {} ({} bytes) on {}",
                live.name,
                live.disk.capacity().0 * dovetail_layout::SECTOR_SIZE,
                live.socket.display()
            );
            println!(
                "dovetail: disk {}: attach a VM with:\n{}",
                live.name,
                qemu_command_line(&live.name, &live.socket, queues)
            );
            let t =
                start_disk_thread(live, listener, config, shutdown.clone(), true).map_err(|e| {
                    CommandError::new("failed", format!("cannot start the disk's thread: {e}"))
                })?;
            threads.push(t);
            Ok(())
        }));
    }
    // Serve until a signal; without a control socket, also until every serve loop stopped
    // (nothing could start another one).
    while !shutdown.wait(Duration::from_millis(200)) {
        if control.is_none()
            && threads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .all(|t| t.is_finished())
        {
            break;
        }
    }
    let threads = std::mem::take(&mut *threads.lock().unwrap_or_else(|p| p.into_inner()));
    let mut failed = None;
    for t in threads {
        match t.join() {
            Ok((_, Ok(()))) => {}
            Ok((name, Err(e))) => failed = Some(CliError::DiskFailed { name, source: e }),
            Err(_) => failed = Some(CliError::DiskPanicked),
        }
    }
    drop(control);
    drop(metrics);
    daemon.close();
    info!("stopped");
    failed.map_or(Ok(()), Err)
}

/// The QEMU options that attach a VM to disk `name` served on `socket`. The chardev's id is
/// [`qemu_id`]`(name)`, so the lines of several disks can go into one VM.
pub fn qemu_command_line(name: &str, socket: &Path, queues: u16) -> String {
    let socket = std::fs::canonicalize(socket).unwrap_or_else(|_| socket.to_path_buf());
    let id = qemu_id(name);
    format!(
        "qemu-system-x86_64 -m 1G \\\n  \
         -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n  \
         -chardev socket,id={id},path={},reconnect=1 \\\n  \
         -device vhost-user-blk-pci,chardev={id},num-queues={queues} \\\n  \
         ...your kernel/boot options...",
        socket.display()
    )
}

/// A QEMU object id for disk `name`: `dovetail-NAME`, every character QEMU does not take in
/// an id (it takes letters, digits, `-`, `.` and `_`) replaced by `_`.
pub fn qemu_id(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("dovetail-{clean}")
}

/// Opens the image, starts listening, and serves until SIGINT/SIGTERM.
pub fn run_serve(cfg: ServeConfig) -> Result<(), CliError> {
    check_sockets(&cfg)?;
    crate::device::allow_unsealed_memory(cfg.allow_unsealed_memory);
    crate::disk::set_default_engine(cfg.io_engine);
    if let Some((dir, disks)) = &cfg.store {
        return run_serve_store(dir, disks, &cfg);
    }
    let created = cfg.create_size.is_some() && std::fs::symlink_metadata(&cfg.image).is_err();
    let layout = RawLayout::open(
        &cfg.image,
        RawOptions {
            create_size: cfg.create_size,
            read_only: cfg.read_only,
            cache: cfg.cache,
        },
    )
    .map_err(CliError::Image)?;
    info!(
        "image {}: cache mode {}, I/O engine {:?}",
        cfg.image.display(),
        layout.cache(),
        cfg.io_engine
    );
    let image = cfg.image.clone();
    let guests = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let result = serve_image(layout, cfg, guests.clone());
    // An image this run created that no guest ever saw holds only zeroes: a failure to get it
    // served leaves no file behind (a retry creates it again).
    if result.is_err() && created && guests.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        match std::fs::remove_file(&image) {
            Ok(()) => info!("removed {}, created by this run", image.display()),
            Err(e) => log::warn!("cannot remove {}: {e}", image.display()),
        }
    }
    result
}

/// Refuses, before anything is created, socket paths `serve` could not listen on: each disk's
/// socket (`--socket`, `--disk NAME=SOCKET`) and the control socket must be short enough for
/// a Unix socket address, in an existing directory this process may create files in, not
/// another kind of file, not served by a running process, and not shared by two disks.
fn check_sockets(cfg: &ServeConfig) -> Result<(), CliError> {
    let mut sockets: Vec<(String, &Path)> = Vec::new();
    match &cfg.store {
        Some((_, disks)) => {
            sockets.extend(
                disks
                    .iter()
                    .map(|d| (format!("disk {}", d.name), &*d.socket)),
            );
        }
        None => {
            if let ListenOn::Path(p) = &cfg.listen {
                sockets.push(("the disk's --socket".to_string(), p));
            }
        }
    }
    if let Some((p, _)) = &cfg.control {
        sockets.push(("--control".to_string(), p));
    }
    let mut seen: Vec<(PathBuf, &str)> = Vec::new();
    for (who, path) in &sockets {
        check_socket_path(who, path)?;
        let key = same_file_key(path);
        if let Some((_, first)) = seen.iter().find(|(k, _)| *k == key) {
            return Err(CliError::Invalid(format!(
                "{first} and {who} are both given the socket {}: every disk and the control \
                 socket need a socket path of their own",
                path.display()
            )));
        }
        seen.push((key, who));
    }
    Ok(())
}

/// `path` with its directory resolved (symbolic links, `..`), so two spellings of one socket
/// compare equal.
fn same_file_key(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match (std::fs::canonicalize(dir), path.file_name()) {
        (Ok(d), Some(name)) => d.join(name),
        _ => path.to_path_buf(),
    }
}

/// One socket path of [`check_sockets`]; `who` names its use in the message.
fn check_socket_path(who: &str, path: &Path) -> Result<(), CliError> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    let bad = |why: String| {
        CliError::Invalid(format!(
            "cannot listen on {} ({who}): {why}",
            path.display()
        ))
    };
    // sockaddr_un holds 108 bytes, the terminating NUL included.
    const SUN_PATH: usize = 108;
    let len = path.as_os_str().as_bytes().len();
    if len >= SUN_PATH {
        return Err(bad(format!(
            "the path is {len} bytes; a Unix socket path is at most {} (use a shorter or \
             relative path)",
            SUN_PATH - 1
        )));
    }
    if path.file_name().is_none() {
        return Err(bad("the path names no file".into()));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(bad(format!("{} is not a directory", dir.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad(format!("directory {} does not exist", dir.display())))
        }
        Err(e) => return Err(bad(format!("cannot look at {}: {e}", dir.display()))),
    }
    let c_dir = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| bad("the path holds a NUL byte".into()))?;
    // SAFETY: `c_dir` is a NUL-terminated string that outlives the call; access only reads it.
    if unsafe { libc::access(c_dir.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Err(bad(format!(
            "cannot create files in directory {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        )));
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(bad("a file that is not a socket is in the way".into()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(bad("another process is already serving on it".into()));
        }
    }
    Ok(())
}

/// The rest of [`run_serve`] for a raw image, once it is open; `guests` counts the guests that
/// connected.
fn serve_image(
    layout: RawLayout,
    cfg: ServeConfig,
    guests: Arc<std::sync::atomic::AtomicU64>,
) -> Result<(), CliError> {
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
    let name = cfg.name.clone().unwrap_or_else(|| {
        cfg.image
            .file_name()
            .map_or_else(|| "image".to_string(), |n| n.to_string_lossy().into_owned())
    });
    let socket = match &cfg.listen {
        ListenOn::Path(p) => p.clone(),
        ListenOn::Fd(fd) => PathBuf::from(format!("fd:{fd}")),
    };
    let events = Arc::new(EventHub::default());
    let live = LiveDisk::open_image(
        &name,
        &cfg.image,
        Arc::new(layout),
        &socket,
        cfg.read_only,
        &cfg.serial,
        events.clone(),
    )?;
    let listener = server::listen_with(&cfg.listen, &cfg.socket_perms)?;
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
            qemu_command_line(&name, p, cfg.queues)
        );
    }
    let r = run_live(vec![(live.clone(), listener)], events, None, &cfg, None);
    guests.store(
        live.guests.load(std::sync::atomic::Ordering::Relaxed),
        std::sync::atomic::Ordering::Relaxed,
    );
    r
}

/// Carries out `dovetail store ...`, printing what was done (or the report) on stdout.
pub fn run_store(cmd: StoreCommand) -> Result<(), CliError> {
    match cmd {
        StoreCommand::Create(a) => {
            let store = match a.size {
                Some(size) if a.tiers.is_empty() => Store::create(&a.dir, size.0, a.extent_size.0)?,
                None if !a.tiers.is_empty() => {
                    let tiers: Vec<TierSpec> = a
                        .tiers
                        .iter()
                        .map(|t| TierSpec {
                            name: t.name.clone(),
                            path: t.path.clone(),
                            size: t.size.0,
                        })
                        .collect();
                    Store::create_tiered(&a.dir, &tiers, a.extent_size.0)?
                }
                _ => {
                    return Err(CliError::Invalid(
                        "give either --size or one --tier per tier".into(),
                    ))
                }
            };
            print!("{}", created_table(&a.dir, &store.info()));
            Ok(())
        }
        StoreCommand::Check(a) => {
            let checks = if a.data {
                dovetail_layout::parallax::ParallaxCheck::ALL_DATA
            } else {
                dovetail_layout::parallax::ParallaxCheck::ALL
            };
            let mut report = dovetail_store::check_reader(&a.dir, &checks)?;
            if report.info.is_some() {
                // Presence maps and migration records of the candidates (maps/).
                let keys: Vec<_> = report.versions.iter().map(|v| v.key).collect();
                let (bad, notes) = crate::ops::maps::check(&a.dir, &report.disks, &keys);
                if report.beside_writer {
                    // The daemon may be rewriting them as they are read: worth knowing, not
                    // proof of damage.
                    report.notes.extend(bad.into_iter().map(|b| {
                        format!("{b} (read while the daemon serves the store; check again with it stopped)")
                    }));
                } else {
                    report.violations.extend(bad);
                }
                report.notes.extend(notes);
            }
            println!("{report}");
            if report.is_ok() && report.unchecked.is_some() {
                Err(CliError::NotFullyChecked { dir: a.dir })
            } else if report.is_ok() {
                Ok(())
            } else {
                Err(CliError::Inconsistent {
                    dir: a.dir,
                    count: report.violations.len(),
                })
            }
        }
        StoreCommand::Upgrade(a) => upgrade_store(&a.dir),
    }
}

/// `dovetail store upgrade`: opens the store adopting its tier files, and says what it is now.
fn upgrade_store(dir: &std::path::Path) -> Result<(), CliError> {
    let store = Store::open_adopting_tiers(dir)?;
    let info = store.info();
    println!(
        "store {} is format version {}; its tier files:",
        dir.display(),
        info.format_version
    );
    for t in &info.tiers {
        println!("  tier {}: {}", t.name, t.path.display());
    }
    Ok(())
}

/// Carries out `dovetail disk ...`, printing what was done (or the listing) on stdout.
pub fn run_disk(cmd: DiskCommand) -> Result<(), CliError> {
    match cmd {
        DiskCommand::Create(a) => {
            let store = Store::open(&a.dir)?;
            let key = store.create_disk(&a.name, a.size.0, &a.layout)?;
            println!(
                "created disk {} ({}, {}) in {}: trusted {key}",
                a.name,
                human_size(a.size.0),
                a.layout,
                a.dir.display()
            );
            Ok(())
        }
        DiskCommand::List(a) => {
            let table = read_store(&a.dir, |store| Ok::<_, CliError>(disk_table(store)))?;
            print!("{table}");
            Ok(())
        }
        DiskCommand::Delete(a) => {
            let store = Store::open(&a.dir)?;
            let freed = store.delete_disk(&a.name)?;
            println!(
                "deleted disk {} from {}: {freed} extent(s) freed",
                a.name,
                a.dir.display()
            );
            Ok(())
        }
        DiskCommand::Import(a) => {
            let store = Store::open(&a.dir)?;
            let c = diskio::import(&store, &a.name, &a.from)?;
            println!(
                "imported {} into disk {}: {} of data, {} of zeroes skipped",
                a.from.display(),
                a.name,
                human_size(c.data),
                human_size(c.bytes - c.data)
            );
            Ok(())
        }
        DiskCommand::Export(a) => {
            let store = Store::open(&a.dir)?;
            let c = diskio::export(&store, &a.name, a.snapshot.as_deref(), &a.to)?;
            println!(
                "exported disk {}{} to {}: {} of data in a {} sparse image",
                a.name,
                a.snapshot
                    .map(|s| format!(" (snapshot {s})"))
                    .unwrap_or_default(),
                a.to.display(),
                human_size(c.data),
                human_size(c.bytes)
            );
            Ok(())
        }
        DiskCommand::Snapshot(a) => {
            let store = Store::open(&a.dir)?;
            let name = a.snapshot.unwrap_or_else(|| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                format!("snap-{now}")
            });
            let s = diskio::snapshot(&store, &a.name, &name)?;
            println!(
                "disk {}: snapshot {} of generation {}",
                a.name, s.name, s.generation
            );
            Ok(())
        }
        DiskCommand::Snapshots(a) => {
            let list = read_store(&a.dir, |store| diskio::snapshots(store, &a.name))?;
            println!("{:<24} {:>10} {:>20}", "SNAPSHOT", "GENERATION", "CREATED");
            for s in &list {
                println!(
                    "{:<24} {:>10} {:>20}",
                    s.name,
                    s.generation,
                    crate::face::ctl::utc_time(s.created)
                );
            }
            println!("{} snapshot(s) of disk {}", list.len(), a.name);
            Ok(())
        }
        DiskCommand::DeleteSnapshot(a) => {
            let store = Store::open(&a.dir)?;
            diskio::delete_snapshot(&store, &a.name, &a.snapshot)?;
            println!("disk {}: deleted snapshot {}", a.name, a.snapshot);
            Ok(())
        }
        DiskCommand::Tee(a) => {
            let store = Store::open(&a.dir)?;
            let layout = teed::candidate_layout(&store, &a.name, a.candidate.as_deref())?;
            let done = teed::tee_disk(&store, &a.name, &layout, &a.policy, &a.faults)?;
            println!("{done}");
            Ok(())
        }
        DiskCommand::Upgrade(a) => {
            let store = Store::open(&a.dir)?;
            println!("{}", teed::upgrade_offline(&store, &a.name, &a.to)?);
            Ok(())
        }
        DiskCommand::Untee(a) => {
            let store = Store::open(&a.dir)?;
            println!("{}", teed::untee_disk(&store, &a.name)?);
            Ok(())
        }
        DiskCommand::Heatmap(a) => {
            println!("{}", read_store(&a.dir, |store| heatmap(store, &a))?);
            Ok(())
        }
        DiskCommand::Annotations(a) => {
            let r = read_store(&a.dir, |store| offline_annotations(store, &a))?;
            if a.json {
                println!("{r}");
            } else {
                println!("{}", crate::face::ctl::annotations_text(&r));
            }
            Ok(())
        }
    }
}

/// One version's annotations, read offline.
enum OfflineTable {
    /// The version, opened (its table lives in it).
    Open(dovetail_layout::Parallax),
    /// A version never opened yet: nothing recorded.
    Fresh(dovetail_annotations::Table),
}

/// A disk version that keeps annotations, opened offline.
struct Annotated {
    role: &'static str,
    key: dovetail_store::VersionKey,
    layout: String,
    table: OfflineTable,
}

impl Annotated {
    fn table(&self) -> &dovetail_annotations::Table {
        match &self.table {
            OfflineTable::Open(p) => p.annotations().unwrap_or_else(|| {
                unreachable!("opened only after checking the layout is parallax-v2")
            }),
            OfflineTable::Fresh(t) => t,
        }
    }

    fn labels(&self) -> Vec<dovetail_layout::parallax::Label> {
        match &self.table {
            OfflineTable::Open(p) => p.labels(),
            OfflineTable::Fresh(_) => Vec::new(),
        }
    }
}

/// Opens the version of disk `name` whose annotations `role` asks for (default: the trusted
/// version if it keeps annotations, else the candidate), refusing a parallax-v1 one.
fn open_annotated(
    store: &Arc<Store>,
    name: &str,
    role: Option<&str>,
) -> Result<Annotated, CliError> {
    let info = store.disk(name)?;
    let trusted = ("trusted", info.trusted, info.layout.clone());
    let candidate = match info.candidate {
        Some(k) => Some(("candidate", k, store.version(k)?.layout)),
        None => None,
    };
    let keeps = |l: &str| l == "parallax-v2";
    let (role, key, layout) = match role {
        Some("candidate") => candidate
            .ok_or_else(|| CliError::Invalid(format!("disk {name} has no candidate version")))?,
        Some(_) => trusted,
        None if keeps(&trusted.2) => trusted,
        None => match candidate {
            Some(c) if keeps(&c.2) => c,
            _ => trusted,
        },
    };
    if !keeps(&layout) {
        return Err(CliError::Invalid(format!(
            "disk {name}: the {role} {key} is {layout}, which keeps no annotations; \
             parallax-v2 does (`disk tee --candidate parallax-v2`, or `disk create --layout \
             parallax-v2`)"
        )));
    }
    let table = if store.version(key)?.root_len == 0 {
        // Never opened: nothing was read or written yet.
        OfflineTable::Fresh(dovetail_annotations::Table::new(
            info.size / 4096,
            dovetail_annotations::Epochs {
                base: 0,
                secs: dovetail_layout::parallax::EPOCH_SECS,
            },
        ))
    } else {
        OfflineTable::Open(crate::ops::open::open_version(store, name, key, &layout, info.size)?)
    };
    Ok(Annotated {
        role,
        key,
        layout,
        table,
    })
}

/// `disk annotations`: the `annotations` result of docs/control.md, computed offline.
fn offline_annotations(
    store: &Arc<Store>,
    a: &DiskAnnotationsArgs,
) -> Result<serde_json::Value, CliError> {
    let v = open_annotated(store, &a.name, a.query.role.as_deref())?;
    let as_cli = |e: crate::daemon::live::CommandError| CliError::Invalid(e.message);
    let frozen =
        match (&a.query.snapshot, &v.table) {
            (Some(s), OfflineTable::Open(p)) => Some(p.snapshot_annotations(s).map_err(
                |source| crate::ops::OpsError::OpenDisk {
                    name: format!("{}@{s}", a.name),
                    source,
                },
            )?),
            (Some(s), OfflineTable::Fresh(_)) => {
                return Err(CliError::Invalid(format!(
                    "disk {}: no snapshot named {s:?}",
                    a.name
                )))
            }
            (None, _) => None,
        };
    let live_labels;
    let (table, labels) = match &frozen {
        Some((t, l)) => (t, l.as_slice()),
        None => {
            live_labels = v.labels();
            (v.table(), live_labels.as_slice())
        }
    };
    control::annotations_result(
        &control::AnnotatedView {
            disk: &a.name,
            layout: &v.layout,
            version: Some(v.key.0),
            role: v.role,
            snapshot: a.query.snapshot.as_deref(),
            table,
            labels,
        },
        &a.query.query(),
    )
    .map_err(as_cli)
}

/// `disk heatmap`: writes the PNG, returns the one-line summary.
fn heatmap(store: &Arc<Store>, a: &DiskHeatmapArgs) -> Result<String, CliError> {
    let v = open_annotated(store, &a.name, a.role.as_deref())?;
    let table = v.table();
    let blocks = table.blocks();
    let columns = u64::from(a.columns);
    // At most one part per block: fewer rows for a small disk.
    let rows = blocks.min(columns * columns).div_ceil(columns).max(1);
    let parts = table.histogram((columns * rows) as usize);
    let heat: Vec<u64> = parts.iter().map(|r| r.heat).collect();
    let mut png = Vec::new();
    dovetail_annotations::render_heatmap_png(&heat, a.columns, a.cell, &mut png).map_err(
        |source| CliError::File {
            op: format!("draw the heatmap of disk {}", a.name),
            source,
        },
    )?;
    std::fs::write(&a.png, &png).map_err(|source| CliError::File {
        op: format!("write {}", a.png.display()),
        source,
    })?;
    let side = u64::from(a.cell);
    let mut line = format!(
        "disk {}: heatmap of {} version {} ({}) written to {}: {}x{} pixels, {} buckets of {} \
         block(s) ({} columns x {} rows)",
        a.name,
        v.layout,
        v.key.0,
        v.role,
        a.png.display(),
        columns * side,
        rows * side,
        parts.len(),
        parts.first().map_or(0, |p| p.blocks),
        columns,
        rows
    );
    let hottest = parts
        .iter()
        .enumerate()
        .filter(|(_, p)| p.heat > 0)
        .max_by_key(|(i, p)| (p.heat, std::cmp::Reverse(*i)));
    match hottest {
        Some((i, p)) => line.push_str(&format!(
            "; hottest bucket {i} (blocks {}-{}): {} reads, {} writes",
            p.first_block,
            (p.first_block + p.blocks).saturating_sub(1),
            p.reads,
            p.writes
        )),
        None => line.push_str("; no block was read or written yet"),
    }
    Ok(line)
}

/// What `store create` prints: the store, then one row per tier.
pub fn created_table(dir: &Path, i: &dovetail_store::StoreInfo) -> String {
    let mut out = format!(
        "created store {}: {} extents of {} ({}), uuid {}\n",
        dir.display(),
        i.extent_count,
        human_size(i.extent_size),
        human_size(i.extent_size * u64::from(i.extent_count)),
        dovetail_store::format_uuid(&i.uuid)
    );
    let mut rows = vec![[
        "TIER".to_string(),
        "PATH".to_string(),
        "SIZE".to_string(),
        "EXTENTS".to_string(),
    ]];
    for t in &i.tiers {
        rows.push([
            t.name.clone(),
            t.path.display().to_string(),
            human_size(i.extent_size * u64::from(t.extents)),
            format!(
                "{} ({}..={})",
                t.extents,
                t.first_extent,
                t.first_extent + t.extents - 1
            ),
        ]);
    }
    out.push_str(&table(&rows));
    out
}

/// Rows as columns padded to their widest cell, two spaces apart, one line each.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `disk list` table: one row per disk, then the store's free space.
pub fn disk_table(store: &Store) -> String {
    let info = store.info();
    let versions = store.versions();
    let extents = |k: dovetail_store::VersionKey| {
        versions
            .iter()
            .find(|v| v.key == k)
            .map_or(0, |v| v.extents.len())
    };
    let mut rows = vec![[
        "NAME".to_string(),
        "SIZE".to_string(),
        "LAYOUT".to_string(),
        "TRUSTED".to_string(),
        "CANDIDATE".to_string(),
        "EXTENTS".to_string(),
        "TEE".to_string(),
    ]];
    for d in store.disks() {
        let (cand, cand_extents) = match d.candidate {
            Some(c) => (
                format!(
                    "{} ({})",
                    c.0,
                    versions
                        .iter()
                        .find(|v| v.key == c)
                        .map_or("", |v| v.layout.as_str())
                ),
                extents(c),
            ),
            None => ("-".to_string(), 0),
        };
        rows.push([
            d.name,
            human_size(d.size),
            d.layout,
            d.trusted.0.to_string(),
            cand,
            (extents(d.trusted) + cand_extents).to_string(),
            match &d.tee {
                None => "-".to_string(),
                Some(t) if t.state == dovetail_store::TeeState::Quarantined => {
                    format!("{}, quarantined: {}", t.policy, t.reason)
                }
                Some(t) if t.faults.is_empty() => t.policy.clone(),
                Some(t) => format!("{}, faults {}", t.policy, t.faults.join(" ")),
            },
        ]);
    }
    let mut widths = [0usize; 7];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let line = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(&format!(
        "{} disk(s); {} of {} extents of {} free\n",
        rows.len() - 1,
        info.free_extents,
        info.extent_count,
        human_size(info.extent_size)
    ));
    out
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

    #[test]
    fn sizes_take_iec_suffixes_and_refuse_ambiguous_ones() {
        for (text, bytes) in [
            ("1GiB", 1u64 << 30),
            ("1gib", 1 << 30),
            ("1 GiB", 1 << 30),
            ("64KiB", 64 << 10),
            ("512MiB", 512 << 20),
            ("2TiB", 2 << 40),
            ("8191T", 8191 << 40),
        ] {
            assert_eq!(text.parse::<Size>(), Ok(Size(bytes)), "{text}");
        }
        for text in ["1GB", "1gb", "512MB", "4KB", "1kB", "2TB"] {
            let e = text.parse::<Size>().expect_err(text);
            assert!(e.contains("is ambiguous"), "{text}: {e}");
        }
        let e = "1GB".parse::<Size>().expect_err("GB");
        assert!(e.contains("write 1G or 1GiB"), "{e}");
        for text in ["1B", "1PiB", "1Gi", "1.5G", "-1G", "G", "1G1"] {
            assert!(text.parse::<Size>().is_err(), "{text}");
        }
        let e = "1X".parse::<Size>().expect_err("X");
        assert!(e.contains("use K, KiB, M, MiB, G, GiB, T or TiB"), "{e}");
        for text in ["1.5G", "G", "-1G", "1G1", ""] {
            let e = text.parse::<Size>().expect_err(text);
            assert!(e.contains("is not a size"), "{text}: {e}");
        }
    }

    #[test]
    fn qemu_ids_differ_per_disk_and_are_ones_qemu_takes() {
        assert_eq!(qemu_id("vm1"), "dovetail-vm1");
        assert_eq!(qemu_id("my disk.img"), "dovetail-my_disk.img");
        assert_eq!(qemu_id("a,b=c"), "dovetail-a_b_c");
        let line = qemu_command_line("vm1", Path::new("/x/vm1.sock"), 2);
        assert!(
            line.contains("-chardev socket,id=dovetail-vm1,path=/x/vm1.sock"),
            "{line}"
        );
        assert!(line.contains("chardev=dovetail-vm1,num-queues=2"), "{line}");
        assert!(!line.contains("dovetail0"), "{line}");
    }

    #[test]
    fn control_mode_needs_control_and_name_is_checked() {
        let e = args(&["--control-mode", "0660"]).expect_err("no --control");
        assert!(e.contains("--control"), "{e}");
        args(&["--control", "c.sock", "--control-mode", "0660"]).expect("with --control");
        let c = args(&["--name", "vm1"]).expect("--name");
        assert_eq!(c.name.as_deref(), Some("vm1"));
        let e = args(&["--name", "a b"]).expect_err("bad name");
        assert!(e.contains("disk name \"a b\" is invalid"), "{e}");
    }

    fn args(extra: &[&str]) -> Result<ServeConfig, String> {
        let mut v = vec!["dovetail", "serve"];
        v.extend_from_slice(extra);
        let cli = Cli::try_parse_from(v).map_err(|e| e.to_string())?;
        let Command::Serve(a) = cli.command else {
            return Err("not a serve command".into());
        };
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
    fn store_mode_names_disks_and_sockets() {
        let c = args(&[
            "--store",
            "st",
            "--disk",
            "a=/s/a.sock",
            "--disk",
            "b=b.sock",
        ])
        .expect("store mode");
        let (dir, disks) = c.store.expect("store");
        assert_eq!(dir, PathBuf::from("st"));
        assert_eq!(
            disks,
            vec![
                DiskSocket {
                    name: "a".into(),
                    socket: "/s/a.sock".into()
                },
                DiskSocket {
                    name: "b".into(),
                    socket: "b.sock".into()
                }
            ]
        );
        assert!(args(&["--store", "st"]).is_err(), "no --disk");
        assert!(args(&["--disk", "a=x"]).is_err(), "--disk without --store");
        assert!(
            args(&["--store", "st", "--disk", "a"]).is_err(),
            "not NAME=SOCKET"
        );
        assert!(args(&["--store", "st", "--disk", "a=x", "--image", "i"]).is_err());
        let e = args(&["--store", "st", "--disk", "a=x", "--disk", "a=y"]).expect_err("twice");
        assert!(e.contains("\"a\""), "{e}");
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

    #[test]
    fn store_and_disk_subcommands_parse_with_defaults() {
        let cli = Cli::try_parse_from(["dovetail", "store", "create", "/s", "--size", "1G"])
            .expect("parse");
        let Command::Store(StoreCommand::Create(a)) = cli.command else {
            panic!("wrong command: {cli:?}");
        };
        assert_eq!(
            (a.size, a.extent_size),
            (Some(Size(1 << 30)), Size(64 << 20))
        );
        assert!(a.tiers.is_empty());
        let cli = Cli::try_parse_from([
            "dovetail",
            "store",
            "create",
            "/s",
            "--tier",
            "fast=/nvme/a=b:c.img:64G",
            "--tier",
            "slow=rel/ds.slow:1T",
        ])
        .expect("parse");
        let Command::Store(StoreCommand::Create(a)) = cli.command else {
            panic!("wrong command: {cli:?}");
        };
        assert_eq!(a.size, None);
        assert_eq!(
            a.tiers,
            [
                TierArg {
                    name: "fast".into(),
                    path: "/nvme/a=b:c.img".into(),
                    size: Size(64 << 30),
                },
                TierArg {
                    name: "slow".into(),
                    path: "rel/ds.slow".into(),
                    size: Size(1 << 40),
                },
            ]
        );
        let cli = Cli::try_parse_from(["dovetail", "disk", "create", "/s", "vm1", "--size", "10G"])
            .expect("parse");
        let Command::Disk(DiskCommand::Create(a)) = cli.command else {
            panic!("wrong command: {cli:?}");
        };
        assert_eq!((a.name.as_str(), a.layout.as_str()), ("vm1", "parallax-v1"));
        assert!(matches!(
            Cli::try_parse_from(["dovetail", "disk", "list", "/s"]).map(|c| c.command),
            Ok(Command::Disk(DiskCommand::List(_)))
        ));
        assert!(matches!(
            Cli::try_parse_from(["dovetail", "disk", "delete", "/s", "vm1"]).map(|c| c.command),
            Ok(Command::Disk(DiskCommand::Delete(_)))
        ));
        assert!(matches!(
            Cli::try_parse_from(["dovetail", "store", "check", "/s"]).map(|c| c.command),
            Ok(Command::Store(StoreCommand::Check(_)))
        ));
    }

    #[test]
    fn store_and_disk_subcommands_refuse_bad_input() {
        let bad: [&[&str]; 7] = [
            &["dovetail", "store", "create", "/s"],
            &[
                "dovetail", "store", "create", "/s", "--size", "1G", "--tier", "a=/x:1G",
            ],
            &["dovetail", "store", "create", "/s", "--tier", "a=/x"],
            &["dovetail", "store", "create", "/s", "--size", "1.5G"],
            &[
                "dovetail", "disk", "create", "/s", "vm1", "--size", "1G", "--layout", "nope",
            ],
            &["dovetail", "disk", "create", "/s", "--size", "1G"],
            &["dovetail", "disk", "delete", "/s"],
        ];
        for argv in bad {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?}");
        }
    }

    #[test]
    fn a_malformed_tier_says_which_piece_is_wrong() {
        let cases = [
            ("fast", "no '=' after the tier's name"),
            ("=/x:1G", "the tier's name before '=' is empty"),
            ("Fast=/x:1G", "tier name \"Fast\" is invalid"),
            ("fast=/x", "no ':' before the tier's size"),
            ("fast=:1G", "tier fast's path between '=' and ':' is empty"),
            ("fast=/x:", "tier fast's size after ':' is empty"),
            ("fast=/x:1Q", "tier fast's size: unknown size suffix"),
        ];
        for (arg, words) in cases {
            let e = arg.parse::<TierArg>().expect_err(arg);
            assert!(e.contains(words), "{arg}: {e}");
            assert!(e.contains("is not NAME=PATH:SIZE"), "{arg}: {e}");
        }
    }
}
