//! `dovetail ctl`: the client of a running daemon's control socket. It sends one request
//! (docs/control.md), prints the reply as a table (or as JSON with `--json`), and exits 0 when
//! the daemon carried the command out, 1 when it answered with an error.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use dovetail_store::human_size;
use serde_json::Value;

use crate::daemon::proto::{
    AnnotationsArgs, AttachArgs, BisectArgs, DeployArgs, DetachArgs, DiskArgs, DiskCreateArgs,
    EventsArgs, ExportArgs, ImportArgs, MigrateArgs, NoArgs, PolicyArgs, PromoteArgs, Reply,
    Request, SnapshotArgs, SnapshotNameArgs, StatusArgs, TaintArgs, TeeAddArgs, TeeArgs,
    TeeRemoveArgs, TiersArgs,
};
use crate::face::render::{
    annotations_text, event_line, labels_text, migration_text, pause_text, s, table, tiers_text, u,
    utc_time,
};
use crate::face::{CliError, Size};

/// The longest reply line `dovetail ctl` reads: 64 MiB, several times the largest reply the
/// daemon sends (an annotations query of `MAX_RANGES` ranges), so that whatever listens on the
/// path given cannot make the client read without end.
pub const MAX_REPLY_LINE: u64 = 64 << 20;

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The daemon's control socket (`dovetail serve --control PATH`).
    #[arg(long, value_name = "PATH")]
    pub control: PathBuf,
    /// Print the daemon's reply as JSON (one object per line) instead of tables (also accepted
    /// after the subcommand).
    #[arg(long, global = true)]
    pub json: bool,
    /// Give up waiting for a reply after this many seconds (0: wait as long as it takes).
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Grow DISK to SIZE (e.g. 20G, a multiple of 4K) while the guest runs.
    ///
    /// Every layout grows (raw images, parallax-v1, parallax-v2); the guest is told at once
    /// (the vhost-user config-change message: its kernel logs the capacity change and the
    /// block device's size changes). Shrinking is refused, as is a size beyond what the store
    /// holds; a teed disk's candidate grows with it.
    Resize {
        disk: String,
        size: crate::face::Size,
    },
    /// Show every served disk (or DISK): versions, policy, quarantine, requests, pauses.
    Status {
        /// Only this disk.
        disk: Option<String>,
    },
    /// Attach a new, empty candidate version to a running disk, validated under POLICY.
    ///
    /// The daemon prepares the candidate, then pauses the disk's I/O only for the swap (the
    /// reply reports the pause). The guest's later writes go to both versions.
    Tee {
        disk: String,
        /// Layout of the candidate version: one the trusted version's layout can be upgraded
        /// to (parallax-v1 to parallax-v1 or parallax-v2, parallax-v2 to parallax-v2); default:
        /// the trusted version's layout. Given 2 to 4 times: an N-version Tee that votes per
        /// block, repairs the minority and quarantines a member that keeps losing (the store
        /// must be of format version 7: `dovetail store upgrade --voting`); fault rules go to
        /// the first candidate.
        #[arg(long = "candidate", value_name = "LAYOUT")]
        candidate: Vec<String>,
        /// Validation policy (see README: policies and what each may expose).
        #[arg(long, value_name = "POLICY")]
        policy: String,
        /// Inject faults into the candidate (testing; repeatable); see `dovetail disk tee`.
        #[arg(long = "fault", value_name = "RULE")]
        faults: Vec<String>,
    },
    /// Add a new, empty member of LAYOUT to DISK's N-version Tee; it is recorded, joins
    /// during a pause, then is filled from the majority in the background.
    TeeAdd {
        disk: String,
        #[arg(long, value_name = "LAYOUT")]
        candidate: String,
    },
    /// Remove member MEMBER (its version key, as `status` shows it) from DISK's N-version
    /// Tee and free its extents.
    TeeRemove { disk: String, member: u64 },
    /// Change the validation policy of DISK's candidate.
    Policy { disk: String, policy: String },
    /// Try again to open DISK, which the daemon could not open (`status` lists it as failed,
    /// with the reason), and serve it on its socket if it opens now; no restart needed.
    Reopen { disk: String },
    /// Take DISK over from the daemon that owns it on a store shared by several daemons
    /// (`serve --shared-store`): the owner is fenced first (on RADOS its client address is
    /// blocklisted, so the cluster refuses whatever it still sends; on a store directory its
    /// lock goes when its process exits), then this daemon takes the disk's lock and serves it.
    Takeover { disk: String },
    /// Drop DISK's candidate and free its extents; the trusted version serves alone.
    Untee { disk: String },
    /// Abandon DISK's upgrade: drop its candidate and free its extents (as `untee`).
    Abort { disk: String },
    /// Migrate every block of DISK to its candidate (or pause, resume, cancel that).
    ///
    /// `copy-out` (the default) copies every block the candidate does not hold yet from the
    /// trusted version in the background, rate limited, skipping holes; it survives a crash or
    /// a restart of the daemon and resumes where it was; blocks the guest reads go first.
    /// `copy-on-read` brings over only the blocks the guest reads (and writes), copied by the
    /// same job in the background just after the read. `upgrade-on-write` lets only the guest's
    /// writes bring blocks over. With --wait, shows a progress bar until the job finishes (exit
    /// 0 when every block is in the candidate).
    Migrate {
        disk: String,
        #[arg(long, value_name = "MODE", default_value = "copy-out",
              value_parser = ["copy-out", "copy-on-read", "upgrade-on-write"])]
        mode: String,
        /// Data bytes per second at most, e.g. 64M (default 64M; 0: no limit).
        #[arg(long, value_name = "RATE")]
        rate: Option<String>,
        /// Pause the running copy-out.
        #[arg(long, conflicts_with_all = ["resume", "cancel", "status"])]
        pause: bool,
        /// Resume a paused copy-out.
        #[arg(long, conflicts_with_all = ["cancel", "status"])]
        resume: bool,
        /// Stop the copy-out (what it copied stays in the candidate).
        #[arg(long, conflicts_with = "status")]
        cancel: bool,
        /// Only show the migration's progress.
        #[arg(long)]
        status: bool,
        /// Wait for the copy-out to finish, with a progress bar.
        #[arg(long)]
        wait: bool,
    },
    /// Make DISK's candidate its trusted version once it holds every block; the old version
    /// is retired (its grants revoked, its extents freed). First a verification pass compares
    /// every block of the candidate with the trusted version (resumed where it stopped after a
    /// crash; progress in `migrate DISK --status`); a block that differs refuses the promote
    /// and the disk stays teed. Refused while the trusted version has snapshots (export and
    /// delete them first). Waits as long as the pass takes (--timeout does not apply).
    Promote {
        disk: String,
        /// Skip the verification pass: trust the presence map as it is.
        #[arg(long)]
        no_verify: bool,
        /// The verification pass's read rate per version, e.g. 64M (default 256M; 0: no
        /// limit).
        #[arg(long, value_name = "RATE", conflicts_with = "no_verify")]
        verify_rate: Option<String>,
        /// An N-version Tee's member to promote (its version key, as `status` shows it);
        /// default: the first candidate holding every block.
        #[arg(long, value_name = "KEY")]
        member: Option<u64>,
    },
    /// Attach a candidate of LAYOUT under POLICY to chosen disks of this daemon: --disks names
    /// them, --sample picks a percentage of the disks without a candidate (reproducibly, by
    /// --seed). Widen the group later with another deploy.
    Deploy {
        /// Layout of the candidates (default: each disk's trusted layout); a disk whose
        /// trusted layout cannot be upgraded to it is skipped.
        #[arg(long, value_name = "LAYOUT")]
        layout: Option<String>,
        #[arg(long, value_name = "POLICY")]
        policy: String,
        /// Comma-separated disk names.
        #[arg(
            long,
            value_name = "A,B,...",
            value_delimiter = ',',
            conflicts_with = "sample",
            required_unless_present = "sample"
        )]
        disks: Vec<String>,
        /// Percentage of the disks without a candidate, e.g. 25%.
        #[arg(long, value_name = "PERCENT")]
        sample: Option<String>,
        #[arg(long, value_name = "SEED", default_value_t = 0)]
        seed: u64,
    },
    /// Take a snapshot of DISK's trusted version while the guest runs.
    ///
    /// Every request completed before the snapshot is in it. For a filesystem that checks
    /// clean, freeze it in the guest first (`fsfreeze -f`), as for any crash-consistent copy.
    Snapshot {
        disk: String,
        /// Name of the snapshot (default: snap-UNIXTIME).
        #[arg(long)]
        name: Option<String>,
    },
    /// List DISK's snapshots.
    Snapshots { disk: String },
    /// Delete snapshot NAME of DISK.
    DeleteSnapshot { disk: String, name: String },
    /// Write snapshot SNAPSHOT of DISK to a new sparse raw image FILE (written by the daemon,
    /// mode 0600, in the directory `serve --export-dir` names; without one, live export is
    /// refused).
    Export {
        disk: String,
        #[arg(long, value_name = "SNAPSHOT")]
        snapshot: String,
        /// A new file's name in the daemon's export directory (or a path in that directory).
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
    /// Print the daemon's recent events; with --follow, keep printing new ones.
    Events {
        /// Keep the connection open and print events as they happen (until interrupted).
        #[arg(long)]
        follow: bool,
        /// Only events with a sequence number above N.
        #[arg(long, value_name = "N", default_value_t = 0)]
        since: u64,
    },
    /// Print the daemon's metrics in the Prometheus text format.
    Metrics,
    /// Turn taint label LABEL of DISK on or off (parallax-v2 versions only).
    ///
    /// While a label is on, every block the guest writes carries it, for good: `annotations
    /// DISK --label LABEL` lists them afterwards (e.g. everything written while a suspect
    /// package was being installed). The label is defined on first use (at most 16 per disk)
    /// and applies to every parallax-v2 version of the disk (trusted and candidate); the change
    /// is committed before the command returns, so it survives a crash. No pause.
    Taint {
        /// The served disk.
        disk: String,
        /// The label: 1 to 64 of A-Z a-z 0-9 - _ . (defined on first use).
        label: String,
        /// Blocks written from now on carry LABEL.
        #[arg(long, conflicts_with = "off", required_unless_present = "off")]
        on: bool,
        /// Stop adding LABEL to written blocks (those that carry it keep it).
        #[arg(long)]
        off: bool,
    },
    /// Show what DISK's annotations say: reads and writes per block, hot regions, a histogram
    /// of the disk, the blocks carrying a taint label, one block's record.
    ///
    /// Annotations are kept by parallax-v2 versions: per 4 KiB block, how many guest requests
    /// read and wrote it, when last (to the disk's epoch: 10 minutes), whether it is accessed
    /// sequentially or at random, and its taint labels (see `ctl taint`). Without options, shows the totals and
    /// the labels. Times are local.
    Annotations {
        /// The served disk.
        disk: String,
        #[command(flatten)]
        query: AnnotationQueryArgs,
    },
    /// Show or change DISK's tiering (parallax-v2): the policy of each block class, the
    /// store's tiers, where the blocks are, the mover.
    ///
    /// Blocks are in one of three classes: metadata (tree nodes, annotation pages), hot data
    /// and cold data (not read or written for --cold-after seconds). Each class has a number
    /// of copies (on distinct extents, on distinct tiers where the store has enough), the tier
    /// holding the first copy, and, for cold data, zstd compression. Defaults: metadata 2
    /// copies, hot 1, cold 1 compressed on the last tier; cold after 3600 s, hot at 2
    /// accesses per mover interval, 32 MiB/s. The daemon's mover (`serve --mover-interval`)
    /// moves blocks to where their class's policy says, at --rate. Without options, shows the
    /// tiering; options change the policy (committed: a restart keeps it), one class per
    /// call.
    Tiers {
        /// The served disk.
        disk: String,
        /// The class --copies, --tier and --compress/--no-compress apply to: metadata, hot or
        /// cold.
        #[arg(long, value_name = "CLASS")]
        class: Option<String>,
        /// Copies of each block of the class, 1 to 3.
        #[arg(long, value_name = "N", requires = "class")]
        copies: Option<u64>,
        /// The store's tier (by name) that holds the first copy of the class's blocks.
        #[arg(long, value_name = "NAME", requires = "class")]
        tier: Option<String>,
        /// Keep the class's blocks zstd-compressed (cold only).
        #[arg(long, requires = "class", conflicts_with = "no_compress")]
        compress: bool,
        /// Keep the class's blocks uncompressed.
        #[arg(long, requires = "class")]
        no_compress: bool,
        /// A data block not read or written for SECS seconds is cold (the mover demotes it).
        #[arg(long, value_name = "SECS")]
        cold_after: Option<u64>,
        /// A block read or written N times between two mover rounds is hot (promoted).
        #[arg(long, value_name = "N")]
        hot_accesses: Option<u64>,
        /// The mover's budget, in MiB of blocks moved per second.
        #[arg(long, value_name = "MIB_S")]
        rate: Option<u64>,
        /// Tell the mover to run a round now instead of at the end of its interval.
        #[arg(long)]
        move_now: bool,
        /// Read every copy of the replicated blocks and rewrite the bad ones from a good one;
        /// prints how many were repaired.
        #[arg(long)]
        scrub: bool,
    },
    /// Per-disk IOPS, MB/s and p99 latency, refreshed every second (like top(1)).
    ///
    /// Each screen shows what the guests did since the previous one: requests per second
    /// (all, reads, writes, flushes), data read and written (MB: 10^6 bytes), the 99th percentile latency of the
    /// reads, writes and flushes completed in the interval (the upper bound of its histogram
    /// bucket), errors and I/O pauses. In a terminal the screen is redrawn in place until
    /// Ctrl-C; otherwise (or with --json, one object per line) screens follow each other.
    Top {
        /// Only these disks (default: every disk the daemon serves).
        disks: Vec<String>,
        /// Seconds between screens (0.1 to 3600).
        #[arg(long, value_name = "SECS", default_value_t = 1.0)]
        interval: f64,
        /// Print N screens, then exit (default: until interrupted).
        #[arg(long, value_name = "N", conflicts_with = "once")]
        iterations: Option<u64>,
        /// Print one screen (one interval), then exit: --iterations 1.
        #[arg(long)]
        once: bool,
    },
    /// Create disk DISK in the daemon's store, live: SIZE bytes (`10G`), LAYOUT
    /// (default parallax-v1). It is served once attached.
    DiskCreate {
        disk: String,
        #[arg(long, value_name = "SIZE")]
        size: Size,
        #[arg(long, value_name = "LAYOUT")]
        layout: Option<String>,
    },
    /// Serve DISK on a new vhost-user socket, live; recorded in the store's catalog first, so
    /// a restarted `serve --store DIR` serves it again. Prints the QEMU options and the libvirt
    /// `<disk>` element that attach a VM to it.
    Attach {
        disk: String,
        /// The socket to create (a relative path is taken from this directory).
        #[arg(long, value_name = "PATH", required_unless_present = "socket_fd")]
        socket: Option<PathBuf>,
        /// Instead of a path: hand the daemon this listening Unix socket (a descriptor this
        /// process inherited), over the control socket (SCM_RIGHTS); the path it is bound at
        /// is recorded.
        #[arg(long, value_name = "FD")]
        socket_fd: Option<i32>,
        /// Virtqueues offered to the guest.
        #[arg(long, value_name = "N", default_value_t = 1,
              value_parser = clap::value_parser!(u16).range(1..=64))]
        queues: u16,
        /// The virtio-blk serial (at most 20 bytes; default: the disk's name).
        #[arg(long, value_name = "ID")]
        serial: Option<String>,
        /// Serve it read-only.
        #[arg(long)]
        read_only: bool,
        /// The destination of a live migration (a shared store): serve the socket at once, but
        /// take the disk from the daemon owning it only when a guest starts its queues (as
        /// `serve --incoming`). Not recorded in the catalog: a restarted daemon does not serve
        /// it (attach it again).
        #[arg(long)]
        incoming: bool,
    },
    /// Stop serving DISK, live (its attachment leaves the catalog first). Refused while a
    /// guest is connected unless --force, and while the disk is teed or migrating.
    Detach {
        disk: String,
        /// Detach under a connected guest: its requests in flight complete, the disk is
        /// flushed, the connection is closed.
        #[arg(long)]
        force: bool,
    },
    /// Delete DISK and its versions from the daemon's store, live. Refused while it is
    /// attached, teed or migrating.
    DiskDelete { disk: String },
    /// Write the raw image FILE into DISK, live: DISK must not be attached (it is created at
    /// the image's size if it does not exist). FILE is a plain name in the directory `serve
    /// --import-dir` names (never read through a symlink).
    Import {
        disk: String,
        /// The image, in the daemon's import directory.
        file: PathBuf,
    },
    /// Name the first guest request after which DISK's versions disagree on a block.
    ///
    /// Replays the Tee's request journal (`serve --tee-journal N`) against fresh versions of
    /// the same layouts (and fault rules) in a scratch store, reads the block after every
    /// request, names the first one after which the versions differ, and confirms it with
    /// another fresh pair. The report (RELIABILITY.md, "Divergence bisection reports") is
    /// saved in the store's bisect/ directory, printed, and published as a `bisected` event.
    Bisect {
        disk: String,
        /// The 4 KiB block to bisect (default: the block of the Tee's first mismatch, else
        /// the first journaled block the versions differ on).
        #[arg(long, value_name = "N")]
        block: Option<u64>,
        /// Also write the report (JSON) to FILE, from this client (for a bug report); never
        /// over an existing file or through a symlink.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Replace the daemon by a new binary without closing its sockets.
    ///
    /// The daemon starts the new binary (--exec, default: the binary at the path it was
    /// started from) with its own arguments and hands it the control socket, every disk's
    /// socket and the metrics listener once its requests in flight completed and it flushed and
    /// closed the store; connections made meanwhile wait. A new binary that exits, speaks
    /// another handover format or does not take over within --deadline leaves the old daemon
    /// serving (exit 1). Connected guests are handed over live (handover format 2): their
    /// queues pause, requests in flight complete, and the new daemon resumes the same
    /// connection (no reconnect); if the new binary fails, the old daemon resumes them. Waits
    /// until the new daemon answers on the control socket. SIGUSR2 to the daemon does the same
    /// with the defaults.
    Upgrade {
        /// The new binary (an absolute path).
        #[arg(long, value_name = "PATH")]
        exec: Option<PathBuf>,
        /// `reconnect`: disconnect connected guests and let them reconnect to the new daemon
        /// (also taken when the new binary speaks another handover format: the old daemon
        /// shuts down and executes it in its place).
        #[arg(long, value_name = "FALLBACK", value_parser = ["reconnect"])]
        fallback: Option<String>,
        /// Seconds the new binary has for each step of the takeover.
        #[arg(long, value_name = "SECS", default_value_t = 5.0)]
        deadline: f64,
    },
    /// Test builds only: switch the store's fault injection (`serve --store-faults`) on or
    /// off, or show it (`status`): the rules and the faults injected so far, as JSON.
    StoreFaults {
        /// `on`, `off` or `status`.
        #[arg(value_parser = ["on", "off", "status"], default_value = "status")]
        action: String,
    },
}

/// What to show of a disk's annotations (`ctl annotations`, `disk annotations`).
#[derive(Debug, Clone, Default, Args)]
pub struct AnnotationQueryArgs {
    /// Which version's annotations: `trusted` or `candidate` (default: the trusted version if
    /// it is parallax-v2, else the candidate).
    #[arg(long = "version", value_name = "ROLE", value_parser = ["trusted", "candidate"])]
    pub role: Option<String>,
    /// The N hottest regions (heat = reads + writes), hottest first (N at most 10000).
    #[arg(long, value_name = "N")]
    pub top: Option<u64>,
    /// Size of the --top regions in 4 KiB blocks, aligned to multiples of R (default 1).
    #[arg(long, value_name = "R", requires = "top")]
    pub region_blocks: Option<u64>,
    /// Cut the disk into B equal parts (1 to 4096) and show each one's reads and writes, with a
    /// bar of its heat.
    #[arg(long, value_name = "B")]
    pub histogram: Option<u64>,
    /// List the blocks carrying taint label L (written while L was on), as ranges of blocks.
    #[arg(long, value_name = "L")]
    pub label: Option<String>,
    /// Show the annotation of block B (4 KiB blocks, from 0).
    #[arg(long, value_name = "B")]
    pub block: Option<u64>,
    /// Read the annotations as snapshot S froze them instead of the live ones.
    #[arg(long, value_name = "S")]
    pub snapshot: Option<String>,
}

impl AnnotationQueryArgs {
    /// The query part (everything but the version and the snapshot).
    pub fn query(&self) -> crate::daemon::control::AnnotationQuery {
        crate::daemon::control::AnnotationQuery {
            top: self.top,
            region_blocks: self.region_blocks,
            histogram: self.histogram,
            label: self.label.clone(),
            block: self.block,
        }
    }
}

/// A connection to the control socket.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    pub fn connect(path: &std::path::Path, timeout: Option<Duration>) -> Result<Client, CliError> {
        let stream = UnixStream::connect(path).map_err(|source| CliError::File {
            op: format!(
                "connect to control socket {} (is `dovetail serve --control {}` running?)",
                path.display(),
                path.display()
            ),
            source,
        })?;
        stream
            .set_read_timeout(timeout)
            .and_then(|()| stream.set_write_timeout(timeout))
            .map_err(|source| CliError::File {
                op: "set the control socket's timeouts".into(),
                source,
            })?;
        let writer = stream.try_clone().map_err(|source| CliError::File {
            op: "clone the control socket".into(),
            source,
        })?;
        Ok(Client {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
        })
    }

    /// Sends `request` and returns the reply's result, or the daemon's error as
    /// `CliError::Invalid("code: message")`.
    pub fn call(&mut self, request: &Request) -> Result<Value, CliError> {
        let id = self.next_id;
        self.next_id += 1;
        self.writer
            .write_all(request.line(id).as_bytes())
            .map_err(|source| CliError::File {
                op: "send the request".into(),
                source,
            })?;
        let reply = self.read_line()?.ok_or_else(|| {
            CliError::Invalid("the daemon closed the control connection without a reply".into())
        })?;
        Reply::outcome(&reply).map_err(CliError::Invalid)
    }

    /// [`Client::call`], passing the file descriptor `fd` with the request line
    /// (SCM_RIGHTS): `attach` with `"fd": true` serves the disk on it.
    pub fn call_passing(&mut self, request: &Request, fd: i32) -> Result<Value, CliError> {
        use std::os::unix::io::AsRawFd;
        let id = self.next_id;
        self.next_id += 1;
        let line = request.line(id);
        let bytes = line.as_bytes();
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        // SAFETY: an all-zero msghdr is a valid value of the plain C struct.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer holds one cmsghdr with room for one fd (CMSG_SPACE);
        // sendmsg only reads `msg`, `iov` (over `bytes`) and `control`, all live here.
        let sent = unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd);
            libc::sendmsg(self.writer.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
        };
        if sent < 0 {
            return Err(CliError::File {
                op: format!("send the request with file descriptor {fd}"),
                source: std::io::Error::last_os_error(),
            });
        }
        if (sent as usize) < bytes.len() {
            self.writer
                .write_all(&bytes[sent as usize..])
                .map_err(|source| CliError::File {
                    op: "send the request".into(),
                    source,
                })?;
        }
        let reply = self.read_line()?.ok_or_else(|| {
            CliError::Invalid("the daemon closed the control connection without a reply".into())
        })?;
        Reply::outcome(&reply).map_err(CliError::Invalid)
    }

    /// The next line from the daemon, parsed; `None` at end of stream. A line longer than
    /// [`MAX_REPLY_LINE`] is refused, read no further.
    pub fn read_line(&mut self) -> Result<Option<Value>, CliError> {
        use std::io::Read;
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_REPLY_LINE + 1)
            .read_line(&mut line)
            .map_err(|source| CliError::File {
                op: "read the daemon's reply".into(),
                source,
            })?;
        if n == 0 {
            return Ok(None);
        }
        if line.len() as u64 > MAX_REPLY_LINE {
            return Err(CliError::Invalid(format!(
                "the daemon sent a line of more than {MAX_REPLY_LINE} bytes; is it a Dovetail \
                 control socket?"
            )));
        }
        serde_json::from_str(&line).map(Some).map_err(|e| {
            CliError::Invalid(format!("the daemon sent something that is not JSON: {e}"))
        })
    }
}

fn request(cmd: &CtlCommand) -> Result<Request, CliError> {
    Ok(match cmd {
        CtlCommand::Status { disk } => Request::Status(StatusArgs { disk: disk.clone() }),
        CtlCommand::Tee {
            disk,
            candidate,
            policy,
            faults,
        } => Request::Tee(TeeArgs {
            disk: disk.clone(),
            candidate: candidate.first().cloned(),
            policy: policy.clone(),
            faults: faults.clone(),
            more_candidates: candidate.iter().skip(1).cloned().collect(),
        }),
        CtlCommand::TeeAdd { disk, candidate } => Request::TeeAdd(TeeAddArgs {
            disk: disk.clone(),
            candidate: candidate.clone(),
        }),
        CtlCommand::TeeRemove { disk, member } => Request::TeeRemove(TeeRemoveArgs {
            disk: disk.clone(),
            member: *member,
        }),
        CtlCommand::Policy { disk, policy } => Request::Policy(PolicyArgs {
            disk: disk.clone(),
            policy: policy.clone(),
        }),
        CtlCommand::Untee { disk } => Request::Untee(DiskArgs { disk: disk.clone() }),
        CtlCommand::Reopen { disk } => Request::Reopen(DiskArgs { disk: disk.clone() }),
        CtlCommand::Takeover { disk } => Request::Takeover(DiskArgs { disk: disk.clone() }),
        CtlCommand::DiskCreate { disk, size, layout } => Request::DiskCreate(DiskCreateArgs {
            disk: disk.clone(),
            size: size.0,
            layout: layout.clone(),
        }),
        CtlCommand::Attach {
            disk,
            socket,
            socket_fd,
            queues,
            serial,
            read_only,
            incoming,
        } => {
            // The daemon does not know this process's directory.
            let socket = match socket {
                Some(p) if p.is_relative() => Some(
                    std::env::current_dir()
                        .map_err(|source| CliError::File {
                            op: "find the current directory".into(),
                            source,
                        })?
                        .join(p),
                ),
                other => other.clone(),
            };
            Request::Attach(AttachArgs {
                disk: disk.clone(),
                socket,
                queues: Some(*queues),
                serial: serial.clone(),
                read_only: *read_only,
                fd: socket_fd.is_some(),
                incoming: *incoming,
            })
        }
        CtlCommand::Detach { disk, force } => Request::Detach(DetachArgs {
            disk: disk.clone(),
            force: *force,
        }),
        CtlCommand::DiskDelete { disk } => Request::DiskDelete(DiskArgs { disk: disk.clone() }),
        CtlCommand::Import { disk, file } => Request::Import(ImportArgs {
            disk: disk.clone(),
            from: file.clone(),
        }),
        CtlCommand::Abort { disk } => Request::Abort(DiskArgs { disk: disk.clone() }),
        CtlCommand::Upgrade {
            exec,
            fallback,
            deadline,
        } => {
            if !(0.1..=600.0).contains(deadline) {
                return Err(CliError::Invalid(format!(
                    "--deadline {deadline}: between 0.1 and 600 seconds"
                )));
            }
            let exec = match exec {
                Some(p) if p.is_relative() => Some(
                    std::env::current_dir()
                        .map_err(|source| CliError::File {
                            op: "find the current directory".into(),
                            source,
                        })?
                        .join(p),
                ),
                other => other.clone(),
            };
            Request::Upgrade(crate::daemon::proto::UpgradeArgs {
                exec,
                fallback: fallback.clone(),
                deadline_ms: Some((deadline * 1000.0) as u64),
            })
        }
        CtlCommand::StoreFaults { action } => {
            Request::StoreFaults(crate::daemon::proto::StoreFaultsArgs {
                action: Some(action.clone()),
            })
        }
        CtlCommand::Bisect { disk, block, .. } => Request::Bisect(BisectArgs {
            disk: disk.clone(),
            block: *block,
        }),
        CtlCommand::Migrate {
            disk,
            mode,
            rate,
            pause,
            resume,
            cancel,
            status,
            wait: _,
        } => {
            let action = if *pause {
                "pause"
            } else if *resume {
                "resume"
            } else if *cancel {
                "cancel"
            } else if *status {
                "status"
            } else {
                "start"
            };
            let rate = match rate {
                Some(r) if r == "0" => Some(0),
                Some(r) => Some(
                    r.parse::<Size>()
                        .map_err(|e| CliError::Invalid(format!("--rate: {e}")))?
                        .0,
                ),
                None => None,
            };
            Request::Migrate(MigrateArgs {
                disk: disk.clone(),
                mode: Some(mode.clone()),
                rate,
                action: Some(action.into()),
            })
        }
        CtlCommand::Promote {
            disk,
            no_verify,
            verify_rate,
            member,
        } => Request::Promote(PromoteArgs {
            disk: disk.clone(),
            no_verify: *no_verify,
            member: *member,
            verify_rate: verify_rate
                .as_deref()
                .map(|r| parse_rate(r, "--verify-rate"))
                .transpose()?,
        }),
        CtlCommand::Deploy {
            layout,
            policy,
            disks,
            sample,
            seed,
        } => match sample {
            Some(p) => {
                let pct: f64 = p.trim_end_matches('%').parse().map_err(|_| {
                    CliError::Invalid(format!("--sample {p:?} is not a percentage"))
                })?;
                Request::Deploy(DeployArgs {
                    layout: layout.clone(),
                    policy: policy.clone(),
                    disks: None,
                    sample: Some(pct),
                    seed: Some(*seed),
                })
            }
            None => Request::Deploy(DeployArgs {
                layout: layout.clone(),
                policy: policy.clone(),
                disks: Some(disks.clone()),
                sample: None,
                seed: None,
            }),
        },
        CtlCommand::Snapshot { disk, name } => Request::Snapshot(SnapshotArgs {
            disk: disk.clone(),
            name: name.clone(),
        }),
        CtlCommand::Snapshots { disk } => Request::Snapshots(DiskArgs { disk: disk.clone() }),
        CtlCommand::DeleteSnapshot { disk, name } => Request::DeleteSnapshot(SnapshotNameArgs {
            disk: disk.clone(),
            name: name.clone(),
        }),
        CtlCommand::Export { disk, snapshot, to } => {
            // A plain name is the daemon's to place (in its export directory); a path is made
            // absolute, as the daemon's working directory is not the client's.
            let to = if to.components().count() == 1 && !to.as_os_str().is_empty() {
                to.clone()
            } else {
                std::path::absolute(to).map_err(|source| CliError::File {
                    op: format!("resolve {}", to.display()),
                    source,
                })?
            };
            Request::Export(ExportArgs {
                disk: disk.clone(),
                snapshot: snapshot.clone(),
                to,
            })
        }
        CtlCommand::Events { follow, since } => Request::Events(EventsArgs {
            since: *since,
            follow: *follow,
        }),
        CtlCommand::Metrics => Request::Metrics(NoArgs {}),
        CtlCommand::Taint {
            disk, label, on, ..
        } => Request::Taint(TaintArgs {
            disk: disk.clone(),
            label: label.clone(),
            on: *on,
        }),
        CtlCommand::Resize { disk, size } => Request::Resize(crate::daemon::proto::ResizeArgs {
            disk: disk.clone(),
            size: size.0,
        }),
        CtlCommand::Tiers {
            disk,
            class,
            copies,
            tier,
            compress,
            no_compress,
            cold_after,
            hot_accesses,
            rate,
            move_now,
            scrub,
        } => Request::Tiers(TiersArgs {
            disk: disk.clone(),
            class: class.clone(),
            copies: copies.map(u64::from),
            tier: tier.clone(),
            compress: match (compress, no_compress) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            cold_after_secs: cold_after.map(u64::from),
            hot_accesses: hot_accesses.map(u64::from),
            move_mib_s: rate.map(u64::from),
            move_now: *move_now,
            scrub: *scrub,
        }),
        CtlCommand::Annotations { disk, query: q } => Request::Annotations(AnnotationsArgs {
            disk: disk.clone(),
            version: q.role.clone(),
            snapshot: q.snapshot.clone(),
            top: q.top,
            region_blocks: q.region_blocks,
            histogram: q.histogram,
            label: q.label.clone(),
            block: q.block,
        }),
        CtlCommand::Top { .. } => Request::Metrics(NoArgs {}),
    })
}

/// `ctl top --interval`: 0.1 s to an hour.
fn top_interval(secs: f64) -> Result<Duration, CliError> {
    if !(0.1..=3600.0).contains(&secs) {
        return Err(CliError::Invalid(format!(
            "--interval {secs}: give 0.1 to 3600 seconds"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A rate argument: `0` or a size (`64M`), in bytes per second.
fn parse_rate(r: &str, what: &str) -> Result<u64, CliError> {
    if r == "0" {
        return Ok(0);
    }
    Ok(r.parse::<Size>()
        .map_err(|e| CliError::Invalid(format!("{what}: {e}")))?
        .0)
}

/// Runs `dovetail ctl`.
pub fn run_ctl(a: CtlArgs) -> Result<(), CliError> {
    let timeout = (a.timeout > 0).then(|| Duration::from_secs(a.timeout));
    let mut client = Client::connect(&a.control, timeout)?;
    if let CtlCommand::Top {
        disks,
        interval,
        iterations,
        once,
    } = &a.command
    {
        let interval = top_interval(*interval)?;
        let options = crate::face::top::TopOptions {
            disks: disks.clone(),
            interval,
            iterations: if *once { Some(1) } else { *iterations },
            json: a.json,
            control: a.control.display().to_string(),
        };
        let metrics = || {
            let r = client.call(&Request::Metrics(NoArgs {}))?;
            r.get("text")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| CliError::Invalid("the daemon's metrics reply has no text".into()))
        };
        return crate::face::top::run_top(metrics, &options);
    }
    let req = request(&a.command)?;
    if let CtlCommand::Promote { .. } = a.command {
        // The verification pass takes as long as reading the disk twice does.
        let _ = client.reader.get_ref().set_read_timeout(None);
    }
    let result = match &a.command {
        CtlCommand::Attach {
            socket_fd: Some(fd),
            ..
        } => client.call_passing(&req, *fd)?,
        _ => client.call(&req)?,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut print = |s: String| {
        // A closed stdout (e.g. `| head`) ends the command quietly.
        let _ = writeln!(out, "{s}");
    };
    if a.json {
        print(result.to_string());
    } else {
        print(human(&a.command, &result));
    }
    if let CtlCommand::Upgrade { deadline, .. } = &a.command {
        return wait_for_upgrade(&a.control, &result, *deadline, a.json);
    }
    if let CtlCommand::Bisect { out: Some(f), .. } = &a.command {
        crate::face::bisect_out::write_new_report(f, result.get("report").unwrap_or(&Value::Null))?;
        if !a.json {
            print(format!("report written to {}", f.display()));
        }
    }
    if let CtlCommand::Migrate {
        disk, wait: true, ..
    } = &a.command
    {
        return wait_for_migration(&mut client, disk, a.json);
    }
    if let CtlCommand::Events { follow: true, .. } = a.command {
        // Events keep coming: no timeout while following.
        let _ = client.reader.get_ref().set_read_timeout(None);
        while let Some(line) = client.read_line()? {
            let Some(ev) = line.get("event") else {
                continue;
            };
            if a.json {
                print(ev.to_string());
            } else {
                print(event_line(ev));
            }
        }
    }
    Ok(())
}

/// After `upgrade` started: asks `hello` on the control socket until the new daemon answers
/// (success) or the old one answers that the upgrade failed.
fn wait_for_upgrade(
    control: &std::path::Path,
    started: &Value,
    deadline: f64,
    json_out: bool,
) -> Result<(), CliError> {
    let old = u(started, "old_pid");
    let new = u(started, "new_pid");
    // The old daemon drains and flushes before the new one gets the sockets: allow for that.
    let limit = std::time::Instant::now() + Duration::from_secs_f64(deadline * 3.0 + 60.0);
    let mut last_error = None;
    while std::time::Instant::now() < limit {
        std::thread::sleep(Duration::from_millis(100));
        let hello = Client::connect(control, Some(Duration::from_secs(5)))
            .and_then(|mut c| c.call(&Request::Hello(NoArgs {})));
        let h = match hello {
            Ok(h) => h,
            Err(e) => {
                last_error = Some(e);
                continue;
            }
        };
        let pid = u(&h, "pid");
        let state = h.get("upgrade").map(|v| s(v, "state")).unwrap_or_default();
        if pid == new && state != "running" {
            if json_out {
                println!(
                    "{}",
                    serde_json::json!({"upgraded": true, "old_pid": old, "pid": pid})
                );
            } else {
                println!("upgraded: pid {pid} serves (was pid {old})");
            }
            return Ok(());
        }
        if pid == old && state == "failed" {
            let reason = h.get("upgrade").map(|v| s(v, "reason")).unwrap_or_default();
            return Err(CliError::Invalid(format!(
                "upgrade failed: {reason}; pid {old} serves on"
            )));
        }
    }
    Err(CliError::Invalid(format!(
        "no answer from the upgraded daemon on {}{}",
        control.display(),
        last_error.map_or(String::new(), |e| format!(" ({e})"))
    )))
}

/// Polls the migration of `disk` with a progress bar until the copy-out finishes.
fn wait_for_migration(client: &mut Client, disk: &str, json_out: bool) -> Result<(), CliError> {
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {pos}/{len} blocks {per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("{disk}: migration"));
    if json_out {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    loop {
        let r = client.call(&Request::Migrate(MigrateArgs {
            disk: disk.to_string(),
            mode: None,
            rate: None,
            action: Some("status".into()),
        }))?;
        let m = r.get("migration").cloned().unwrap_or(Value::Null);
        bar.set_length(u(&m, "blocks_total"));
        bar.set_position(u(&m, "blocks_present"));
        let state = m
            .get("copy_out")
            .map(|c| s(c, "state"))
            .unwrap_or_else(|| "-".into());
        match state.as_str() {
            "running" | "paused" => {}
            "done" => {
                bar.finish_and_clear();
                if json_out {
                    println!("{m}");
                } else {
                    println!(
                        "disk {disk}: copy-out done: {} of {} blocks in the candidate",
                        u(&m, "blocks_present"),
                        u(&m, "blocks_total")
                    );
                }
                return Ok(());
            }
            other => {
                bar.abandon();
                return Err(CliError::Invalid(format!(
                    "disk {disk}: the copy-out is {other}: {}",
                    m.get("copy_out").map(|c| s(c, "error")).unwrap_or_default()
                )));
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn human(cmd: &CtlCommand, r: &Value) -> String {
    match cmd {
        CtlCommand::Status { .. } => {
            let mut rows = vec![[
                "DISK",
                "SIZE",
                "TRUSTED",
                "CANDIDATE",
                "POLICY",
                "STATE",
                "PRESENT",
                "MIGRATION",
                "GUEST",
                "REQUESTS",
                "PAUSES",
                "LAST",
                "MAX",
            ]
            .map(String::from)
            .to_vec()];
            let empty = vec![];
            for d in r.get("disks").and_then(Value::as_array).unwrap_or(&empty) {
                let trusted = match d.get("trusted_version").and_then(Value::as_u64) {
                    Some(k) => format!("{k} ({})", s(d, "trusted_layout")),
                    None => s(d, "trusted_layout"),
                };
                let c = d.get("candidate").filter(|c| !c.is_null());
                let requests: u64 = d
                    .get("requests")
                    .and_then(Value::as_object)
                    .map_or(0, |ops| ops.values().map(|o| u(o, "requests")).sum());
                let pauses = d.get("pauses").cloned().unwrap_or(Value::Null);
                rows.push(vec![
                    s(d, "name"),
                    human_size(u(d, "size")),
                    trusted,
                    c.map_or("-".into(), |c| {
                        format!("{} ({})", u(c, "version"), s(c, "layout"))
                    }),
                    c.map_or("-".into(), |c| s(c, "policy")),
                    c.map_or("-".into(), |c| s(c, "state")),
                    c.map_or("-".into(), |c| {
                        format!("{}/{}", u(c, "blocks_present"), u(c, "blocks_total"))
                    }),
                    d.get("migration")
                        .filter(|m| !m.is_null() && !m["mode"].is_null())
                        .map_or("-".into(), |m| {
                            match m.get("copy_out").filter(|c| !c.is_null()) {
                                Some(c) => format!("{} {}", s(m, "mode"), s(c, "state")),
                                None => s(m, "mode"),
                            }
                        }),
                    if d.get("guest_connected") == Some(&Value::Bool(true)) {
                        "connected".into()
                    } else {
                        "-".into()
                    },
                    requests.to_string(),
                    u(&pauses, "pauses").to_string(),
                    format!("{:.3}ms", u(&pauses, "last_us") as f64 / 1e3),
                    format!("{:.3}ms", u(&pauses, "max_us") as f64 / 1e3),
                ]);
            }
            let failed = r.get("failed").and_then(Value::as_array).unwrap_or(&empty);
            let mut text = if rows.len() == 1 && !failed.is_empty() {
                String::new()
            } else {
                table(rows)
            };
            for f in failed {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&format!(
                    "disk {}: FAILED, not served (socket {} not listening): {} ({} attempt(s)); \
                     after repairing it: dovetail ctl reopen {}",
                    s(f, "name"),
                    s(f, "socket"),
                    s(f, "reason"),
                    u(f, "attempts"),
                    s(f, "name")
                ));
            }
            for d in r.get("disks").and_then(Value::as_array).unwrap_or(&empty) {
                if let Some(why) = d.get("failed").and_then(Value::as_str) {
                    text.push_str(&format!("\ndisk {}: FAILED: {why}", s(d, "name")));
                }
                text.push_str(&crate::face::voting_text::members(d));
                if let Some(c) = d.get("candidate").filter(|c| !c.is_null()) {
                    if s(c, "state") == "quarantined" {
                        text.push_str(&format!(
                            "\ndisk {}: candidate {} quarantined: {}",
                            s(d, "name"),
                            u(c, "version"),
                            s(c, "reason")
                        ));
                    }
                }
            }
            text
        }
        CtlCommand::Reopen { disk } | CtlCommand::Takeover { disk } => {
            format!("disk {disk}: {}", s(r, "message"))
        }
        CtlCommand::DiskCreate { .. }
        | CtlCommand::Detach { .. }
        | CtlCommand::DiskDelete { .. }
        | CtlCommand::Import { .. } => s(r, "message"),
        CtlCommand::Attach { .. } => format!(
            "{}\nQEMU options:\n  {}\nlibvirt <disk> element (the domain needs shared memory: \
             <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>):\n{}",
            s(r, "message"),
            s(r, "qemu"),
            s(r, "libvirt")
        ),
        CtlCommand::Tee { disk, .. }
        | CtlCommand::TeeAdd { disk, .. }
        | CtlCommand::TeeRemove { disk, .. }
        | CtlCommand::Policy { disk, .. }
        | CtlCommand::Untee { disk }
        | CtlCommand::Abort { disk } => {
            format!("disk {disk}: {}; {}", s(r, "message"), pause_text(r))
        }
        CtlCommand::Migrate { disk, .. } => {
            migration_text(disk, r.get("migration").unwrap_or(&Value::Null))
        }
        CtlCommand::Promote { disk, .. } => {
            format!("disk {disk}: {}; {}", s(r, "message"), pause_text(r))
        }
        CtlCommand::Deploy { .. } => {
            let empty = vec![];
            let mut lines = Vec::new();
            for d in r
                .get("deployed")
                .and_then(Value::as_array)
                .unwrap_or(&empty)
            {
                lines.push(format!(
                    "disk {}: {}; {}",
                    s(d, "disk"),
                    s(d, "message"),
                    pause_text(d)
                ));
            }
            for d in r.get("skipped").and_then(Value::as_array).unwrap_or(&empty) {
                lines.push(format!(
                    "disk {}: skipped: {}",
                    s(d, "disk"),
                    s(d, "reason")
                ));
            }
            if lines.is_empty() {
                lines.push("no disk chosen".into());
            }
            lines.join("\n")
        }
        CtlCommand::Snapshot { disk, .. } => {
            let snap = r.get("snapshot").cloned().unwrap_or(Value::Null);
            format!(
                "disk {disk}: snapshot {} of generation {}; {}",
                s(&snap, "name"),
                u(&snap, "generation"),
                pause_text(r)
            )
        }
        CtlCommand::Snapshots { .. } => {
            let mut rows = vec![vec![
                "SNAPSHOT".to_string(),
                "GENERATION".to_string(),
                "CREATED".to_string(),
            ]];
            let empty = vec![];
            for sn in r
                .get("snapshots")
                .and_then(Value::as_array)
                .unwrap_or(&empty)
            {
                rows.push(vec![
                    s(sn, "name"),
                    u(sn, "generation").to_string(),
                    utc_time(u(sn, "created")),
                ]);
            }
            table(rows)
        }
        CtlCommand::DeleteSnapshot { disk, .. } => format!("disk {disk}: {}", s(r, "message")),
        CtlCommand::Export { disk, snapshot, .. } => format!(
            "disk {disk}: exported snapshot {snapshot} to {} ({} of data)",
            s(r, "to"),
            human_size(u(r, "data_bytes"))
        ),
        CtlCommand::Events { .. } => {
            let empty = vec![];
            r.get("events")
                .and_then(Value::as_array)
                .unwrap_or(&empty)
                .iter()
                .map(event_line)
                .collect::<Vec<_>>()
                .join("\n")
        }
        CtlCommand::Metrics => s(r, "text").trim_end().to_string(),
        CtlCommand::Taint { disk, .. } => {
            let empty = vec![];
            let labels = r.get("labels").and_then(Value::as_array).unwrap_or(&empty);
            format!(
                "disk {disk}: {}\nlabels: {}",
                s(r, "message"),
                labels_text(labels)
            )
        }
        CtlCommand::Annotations { .. } => annotations_text(r),
        CtlCommand::Tiers { .. } => tiers_text(r),
        // `top` prints its own screens (face::top).
        CtlCommand::Top { .. } => String::new(),
        CtlCommand::Resize { disk, .. } => format!("disk {disk}: {}", s(r, "message")),
        CtlCommand::Bisect { .. } => crate::face::bisect_out::bisect_text(r),
        CtlCommand::Upgrade { .. } => s(r, "message"),
        CtlCommand::StoreFaults { .. } => {
            serde_json::to_string_pretty(r).unwrap_or_else(|_| r.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--candidate` once is today's `tee` request byte for byte; more make a voting Tee's.
    #[test]
    fn tee_candidates_map_to_the_request() {
        let tee = |c: &[&str]| {
            request(&CtlCommand::Tee {
                disk: "vd".into(),
                candidate: c.iter().map(|s| s.to_string()).collect(),
                policy: "sync-read-checks".into(),
                faults: Vec::new(),
            })
            .expect("request")
            .line(1)
        };
        assert_eq!(
            tee(&["parallax-v2"]),
            "{\"candidate\":\"parallax-v2\",\"cmd\":\"tee\",\"disk\":\"vd\",\"faults\":[],\"id\":1,\"policy\":\"sync-read-checks\",\"v\":1}\n"
        );
        assert!(tee(&["parallax-v1", "parallax-v2", "parallax-v1"])
            .contains("\"more_candidates\":[\"parallax-v2\",\"parallax-v1\"]"));
        assert!(!tee(&[]).contains("candidate"));
    }

    /// Whatever listens at the path given cannot make `dovetail ctl` read without end: a line
    /// past [`MAX_REPLY_LINE`] is refused, the client having read one byte more than the bound.
    #[test]
    fn a_reply_line_is_bounded_before_it_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ctl.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            s.write_all(b"{\"v\":1}\n").expect("a good line");
            let chunk = vec![b' '; 1 << 20];
            // Blanks without end (JSON would accept them): stops when the client hangs up.
            while s.write_all(&chunk).is_ok() {}
        });
        let mut c = Client::connect(&path, Some(Duration::from_secs(10))).expect("connect");
        assert_eq!(
            c.read_line().expect("first line"),
            Some(serde_json::json!({"v": 1}))
        );
        let e = c.read_line().expect_err("an endless line");
        assert!(
            e.to_string()
                .contains(&format!("more than {MAX_REPLY_LINE} bytes")),
            "{e}"
        );
        drop(c);
        server.join().expect("the server ends");
    }
}
