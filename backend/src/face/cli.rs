//! Command line: the clap arguments of `dovetail serve ...`, `dovetail store ...`, `dovetail
//! disk ...`, `migrate`, `promote` and `ctl`. `face::serve` turns `serve`'s into a checked
//! `ServeConfig` and carries it out; `face::store_cmd` and `face::disk_cmd` carry out the
//! store and disk subcommands over `dovetail-store`.

use std::path::PathBuf;
use std::str::FromStr;

use clap::{Args, Parser, Subcommand};

use crate::device::MAX_QUEUES;
use crate::face::Size;

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
    /// Ceph's configuration file, for a store on RADOS (`rados:POOL/NAME`, accepted wherever
    /// a store directory is). Default: $CEPH_CONF, else /etc/ceph/ceph.conf.
    #[arg(long, global = true, value_name = "FILE")]
    pub ceph_conf: Option<PathBuf>,
    /// The Ceph client id (`admin` for client.admin) for a store on RADOS.
    #[arg(long, global = true, value_name = "ID")]
    pub ceph_id: Option<String>,
}

// Parsed once per run: `serve`'s many options make its variant the largest, which costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve one disk image to one guest at a time over a vhost-user-blk socket.
    ///
    /// The daemon keeps serving after a guest disconnects, so the next VM (or the same VM after
    /// a restart of this daemon, with QEMU's `-chardev socket,...,reconnect=1`) can attach.
    /// SIGINT or SIGTERM finish the requests in flight, flush the image, remove the socket and
    /// exit 0. SIGHUP reads the --config file again and applies what changed. Under systemd it
    /// takes the sockets of socket activation, notifies readiness and feeds the watchdog.
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

    /// Check a `serve --config` file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script: `dovetail completions bash >
    /// /etc/bash_completion.d/dovetail` (zsh: a `_dovetail` file on $fpath; fish:
    /// ~/.config/fish/completions/dovetail.fish).
    Completions(CompletionsArgs),

    /// Print the manual page dovetail(1) in roff (`dovetail man | man -l -`), or write one page
    /// per command with --dir.
    Man(ManArgs),
}

#[derive(Debug, Args)]
/// `dovetail completions` (carried out by `face::kit`).
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish (also elvish, powershell).
    #[arg(value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

/// `dovetail man` (carried out by `face::kit`).
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write one page per command into DIR (dovetail.1, dovetail-serve.1, dovetail-ctl-top.1,
    /// ...) instead of printing dovetail(1) on stdout. DIR must exist.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
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
    ///
    /// With --single-instance, also turns single-instance blocks on (format version 6; see
    /// `store create --single-instance`): an existing store opts in this way, offline. Blocks
    /// already written stay where they are; writes from then on share.
    Upgrade(StoreUpgradeArgs),

    /// Take a store on RADOS (rados:POOL/NAME) from a dead or hung daemon: fence it, then
    /// break its lock, so another daemon can open the store.
    ///
    /// The holder's client address is blocklisted first (the cluster then refuses whatever it
    /// still sends, so it can change nothing), then its lock on the store is broken. Run it
    /// only for a holder that is gone or must go: a fenced daemon stops serving with errors.
    /// Prints the addresses fenced (none if nobody held the store).
    Takeover(StoreDirArgs),
}

#[derive(Debug, Args)]
pub struct StoreUpgradeArgs {
    /// Directory holding the store.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,

    /// Turn single-instance blocks on (upgrades the store to format version 6, which older
    /// binaries cannot open). The store must not be being served.
    #[arg(long)]
    pub single_instance: bool,
    /// Let disks be teed to 2 to 4 candidates (an N-version Tee: `ctl tee --candidate L1
    /// --candidate L2`): upgrades the store to format version 7, which records the members
    /// after the candidate and which older binaries cannot open. The store must not be being
    /// served.
    #[arg(long)]
    pub voting: bool,
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
    /// --tier fast=/nvme/ds.fast:64G --tier slow=/hdd/ds.slow:1T. For a store on RADOS a tier
    /// is a pool: PATH `rados:POOL` (an existing pool) holds that tier's objects.
    #[arg(long = "tier", value_name = "NAME=PATH:SIZE")]
    pub tiers: Vec<TierArg>,

    /// Size of an extent, the unit of space granted to one version (a multiple of 4K; at most
    /// 65536 extents per store).
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_EXTENT_SIZE)]
    pub extent_size: Size,

    /// Keep identical 4 KiB data blocks of the store's versions once (single-instance blocks,
    /// format version 6): a Tee's members writing the same data, and the blocks a copy-out
    /// carries to a candidate, share one checksummed copy. parallax-v1 versions share;
    /// parallax-v2 versions keep writing blocks of their own.
    #[arg(long)]
    pub single_instance: bool,
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

    /// Grow disk NAME to SIZE (e.g. 20G, a multiple of 4K). The disk must not be being
    /// served (`dovetail ctl resize` grows a served disk and tells its guest).
    ///
    /// Shrinking is refused, as is a size beyond what the store holds (all its tiers). A
    /// teed disk's candidate, presence map and migration record grow with it.
    Resize(DiskResizeArgs),

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
pub struct DiskResizeArgs {
    /// Directory holding the store.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Name of the disk.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Its new size, e.g. 20G (a multiple of 4K, not below its size).
    #[arg(value_name = "SIZE")]
    pub size: Size,
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

    /// With --store: open the store shared with other daemons (on this host for a store
    /// directory, on any host for rados:POOL/NAME). Each disk is served by one daemon at a
    /// time, the one holding its lock; a disk another daemon owns is reported as failed,
    /// naming the owner, and `dovetail ctl takeover DISK` fences that owner and serves it here.
    #[arg(long, requires = "store")]
    pub shared_store: bool,

    /// With --shared-store: take over a disk this daemon is to serve (listed here, in the
    /// config file, or attached to it) from its owner when the owner has not renewed the
    /// disk's lease for DURATION (e.g. 10s, 1500ms, 2m; at least 3s): the owner is fenced
    /// first (on RADOS its client blocklisted; on a store directory the hung process holding
    /// the lock is killed). Owners renew every second; one that renews is never taken over.
    #[arg(long, value_name = "DURATION", requires = "shared_store",
          value_parser = crate::daemon::served::parse_takeover_after)]
    pub takeover_after: Option<std::time::Duration>,

    /// With --shared-store: serve disk NAME (one this daemon is to serve) on its socket at
    /// once, but own it only when a guest starts its queues, waiting for its owner to let it
    /// go: the destination of a QEMU live migration (`-incoming`). The source daemon lets the
    /// disk go, flushed, when the migration ends. May be given for several disks.
    #[arg(long, value_name = "NAME", requires = "shared_store")]
    pub incoming: Vec<String>,

    /// With --incoming: how long a guest's first request waits for the disk's owner to let
    /// it go (e.g. 15s, 500ms, 2m) before the disk's requests fail with IOERR and the event
    /// `disk-acquire-failed` says why.
    #[arg(long, value_name = "DURATION", requires = "shared_store",
          value_parser = crate::daemon::live::parse_incoming_timeout)]
    pub incoming_timeout: Option<std::time::Duration>,

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
    /// queues and worker threads. A disk's serial is its name (first 20 bytes). Without
    /// --disk, every disk the store's catalog says is attached (`dovetail ctl attach`) is
    /// served as its attachment says; --disk is for one-off runs and records nothing.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["image", "size", "socket", "socket_fd"])]
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

    /// Let `ctl import` read raw images from this directory (which must exist), by a plain
    /// file name, never through a symlink. Without it, live import is refused.
    #[arg(long, value_name = "DIR", requires = "control")]
    pub import_dir: Option<PathBuf>,

    /// Run as this user (a name or a uid) once the store, the sockets, the control socket and
    /// the export/import directories are open: the daemon starts as root, opens them, then
    /// drops root for good (supplementary groups: --group and the sockets' and control
    /// socket's groups, so new sockets still get their group). The store must be writable by
    /// this user (`chown -R USER: STORE`).
    #[arg(long, value_name = "USER")]
    pub user: Option<crate::sandbox::User>,

    /// With --user: run with this group (a name or a gid) instead of the user's own.
    #[arg(long, value_name = "GROUP", requires = "user")]
    pub group: Option<crate::access::Group>,

    /// A seccomp filter per thread kind (queue workers, serve loops, control, metrics,
    /// background store work, I/O engines), each allowing only the system calls that kind
    /// makes: `trap` kills the daemon on a forbidden call (its log names the call and the
    /// thread), `log` lets it through and the kernel logs it, `off` installs none.
    #[arg(long, value_name = "MODE", default_value = "off")]
    pub seccomp: crate::sandbox::SeccompMode,

    /// Confine the daemon's file access with Landlock to the store, the sockets' directories,
    /// the export/import directories and the image's directory (read-only: the config file
    /// and /proc). Best effort: a kernel without Landlock (or with an older ABI) confines
    /// less, and the log says how much applied. Disks attached later must have their sockets
    /// in one of those directories.
    #[arg(long)]
    pub landlock: bool,

    /// Accept fault rules (`ctl tee --fault`) from the control socket. For tests only: a
    /// fault rule corrupts or fails what a candidate reads or writes.
    #[arg(long)]
    pub allow_fault_injection: bool,

    /// TEST BUILDS ONLY (`--features dovetail-backend/failpoints`; a production build refuses
    /// it): with --store, open the store's tier files through the store's fault layer with
    /// these rules (`RULE[;RULE...]`, repeatable; kinds eio, enospc, short-write, slow, e.g.
    /// `eio:op=sync,prob=0.2;slow:ms=20,prob=0.1`), off until `ctl store-faults on` (or
    /// --store-faults-on); `ctl store-faults off|status` switches them off and counts them.
    #[arg(long, value_name = "RULES")]
    pub store_faults: Vec<String>,

    /// With --store-faults: inject from the start.
    #[arg(long, requires = "store_faults")]
    pub store_faults_on: bool,

    /// With --store: every Tee keeps a journal of its last N mutating guest requests (op,
    /// sectors, xxh3-128 and the data; at most --tee-journal-bytes of data), so `ctl bisect`
    /// can name the first request after which its versions disagree. 0 (the default) keeps
    /// none. Memory per teed disk: about N x 100 bytes plus the data bound.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub tee_journal: usize,

    /// The most guest data a Tee's journal keeps (the oldest requests are forgotten first).
    #[arg(long, value_name = "SIZE", default_value = "64M")]
    pub tee_journal_bytes: crate::face::Size,

    /// Bisect a Tee's journal on its own when its versions first disagree (a mismatch
    /// event): the report goes to the store's bisect/ directory and a `bisected` event.
    /// Needs --tee-journal.
    #[arg(long)]
    pub auto_bisect: bool,

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

    /// How the disks' data meets the host's page cache. `none`: direct I/O (O_DIRECT), the
    /// host keeps no copy of the guest's data (the guest has its own cache), memory stays
    /// bounded, and the device's queue is kept full (recommended for production; the default
    /// for a block device). `writeback`: through the page cache (the default for a file and
    /// for a store). With --store it applies to the whole store, all its disks: the tier
    /// files' data goes direct (store.meta and the maps stay buffered), so one disk's FLUSH
    /// writes back none of another disk's data. In both, a guest FLUSH is an fdatasync.
    #[arg(long, value_name = "MODE", value_parser = parse_cache)]
    pub cache: Option<dovetail_layout::CacheMode>,

    /// How each queue carries out reads and writes: `auto` submits many at once with io_uring
    /// to a raw image (a pool of threads per queue for other layouts, or where the kernel has
    /// no io_uring), `threads` always uses the pool, `sync` runs one request at a time per
    /// queue, in order.
    #[arg(long, value_name = "ENGINE", default_value = "auto", value_parser = parse_engine)]
    pub io_engine: crate::disk::Engine,

    /// How many nice levels the control plane's threads (the control socket's verbs: disk
    /// creation and formatting, catalog commits; the metrics endpoint) run below the threads
    /// serving the guests, so management never takes the CPU from guest I/O (0: the same
    /// priority). Needs room to come back up (root, CAP_SYS_NICE or RLIMIT_NICE, systemd's
    /// LimitNICE=); without it every thread stays at the daemon's priority, as the log says.
    #[arg(long, value_name = "N", default_value_t = crate::priority::DEFAULT_CONTROL_NICE,
          value_parser = clap::value_parser!(i32).range(0..=19))]
    pub control_nice: i32,

    /// Read the options from this TOML file (docs: README, "A config file"; example:
    /// contrib/dovetail.toml): each key is an option's long name (`store = "/srv/store"`,
    /// `disk = ["vm1=/run/dovetail/vm1.sock"]`, `read-only = true`); an option also given on
    /// the command line takes the command line's value. SIGHUP re-reads the file and applies
    /// what can change live (metrics address, log level, policies, new disks), logging what
    /// changed and what needs a restart; a file that does not check changes nothing.
    /// `dovetail config check FILE` checks one.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// What to log: a level (error, warn, info, debug, trace, off) or RUST_LOG's directives
    /// (`info,dovetail_store=debug`). Overrides RUST_LOG; SIGHUP applies a changed one.
    /// Default: RUST_LOG, else info.
    #[arg(long, value_name = "LEVEL", value_parser = parse_log_level)]
    pub log_level: Option<String>,

    /// With --store: the Tee validation policy of disk NAME's candidate (as `ctl policy`),
    /// set when the daemon starts and on SIGHUP if the disk's candidate has another (repeat
    /// for more disks).
    #[arg(long, value_name = "NAME=POLICY", requires = "store",
          value_parser = parse_disk_policy)]
    pub policy: Vec<(String, String)>,
}

/// `--log-level`: a level or RUST_LOG's directives (`info,dovetail_store=debug`).
pub fn parse_log_level(s: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let bad_level = |l: &str| {
        format!(
            "{l:?} is not a log level (one of {}; or MODULE=LEVEL directives joined by commas)",
            LEVELS.join(", ")
        )
    };
    if s.trim().is_empty() {
        return Err(bad_level(s));
    }
    for directive in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = match directive.split_once('=') {
            Some((module, level)) => {
                if module.is_empty()
                    || !module
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                {
                    return Err(format!("{directive:?}: {module:?} is not a module path"));
                }
                level
            }
            // A bare word is a level, or a module logged at every level.
            None => {
                if LEVELS.contains(&directive.to_ascii_lowercase().as_str())
                    || directive
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                {
                    continue;
                }
                return Err(bad_level(directive));
            }
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(bad_level(level));
        }
    }
    Ok(s.to_string())
}

/// `--policy NAME=POLICY`.
pub fn parse_disk_policy(s: &str) -> Result<(String, String), String> {
    let Some((name, policy)) = s
        .split_once('=')
        .filter(|(n, p)| !n.is_empty() && !p.is_empty())
    else {
        return Err(format!("{s:?} is not NAME=POLICY"));
    };
    crate::ops::teed::parse_policy(policy).map_err(|e| e.to_string())?;
    Ok((name.to_string(), policy.to_string()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::face::serve::ServeConfig;
    use crate::server::ListenOn;
    use std::path::Path;

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
        // Without --disk: the disks the catalog says are attached.
        let c = args(&["--store", "st"]).expect("--store alone");
        assert!(matches!(c.store, Some((_, ref disks)) if disks.is_empty()));
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

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check FILE as `serve --config FILE` would read it: TOML syntax, every key an option of
    /// `serve`, every value one the option takes, and the options together. Prints each error
    /// with its line and column and exits 1; prints the options it sets and exits 0 if FILE
    /// is good. Does not look at the files and sockets the options name.
    Check(ConfigCheckArgs),
}

#[derive(Debug, Args)]
pub struct ConfigCheckArgs {
    /// The config file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}
