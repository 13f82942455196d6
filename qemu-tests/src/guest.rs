//! One QEMU guest: its command line, its serial console, and the result lines it prints.

use std::cell::RefCell;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};
use crate::host;
use crate::initramfs::{self, Cpio, Flavor};
use crate::kernel;

/// `DOVETAIL-RESULT: ok NAME [DETAIL]` or `DOVETAIL-RESULT: fail NAME REASON`.
pub const RESULT_PREFIX: &str = "DOVETAIL-RESULT: ";
/// `DOVETAIL-INFO: KEY VALUE`.
pub const INFO_PREFIX: &str = "DOVETAIL-INFO: ";
/// `DOVETAIL-WAIT: TOKEN`: the guest is idle until the host sends `TOKEN`.
pub const WAIT_PREFIX: &str = "DOVETAIL-WAIT: ";
/// `DOVETAIL-DONE: STATUS`: the workload ended; the guest powers off next.
pub const DONE_PREFIX: &str = "DOVETAIL-DONE: ";
/// `DOVETAIL-BOOTED: SECONDSs ...`: /init reached the workload.
pub const BOOTED_PREFIX: &str = "DOVETAIL-BOOTED: ";

/// Lines of console shown in errors.
const TAIL_LINES: usize = 40;

thread_local! {
    /// The running scenario's directory, the default home of guest logs.
    pub(crate) static SCENARIO_DIR: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
}

/// A guest to boot: builder for the QEMU command line and the workload.
#[derive(Debug, Clone)]
pub struct Guest {
    name: String,
    log_dir: Option<PathBuf>,
    disks: Vec<PathBuf>,
    queues: u16,
    cpus: Option<u16>,
    memory_mib: u32,
    reconnect: bool,
    workload: String,
    env: Vec<(String, String)>,
    files: Vec<(String, u32, Vec<u8>)>,
    timeout: Duration,
    root_disk: bool,
    kernel_args: Vec<String>,
    /// More QEMU options, after the disks (`-qmp ...`, `-incoming ...`).
    qemu_args: Vec<String>,
}

impl Guest {
    /// A guest named `name` (used for log file names; unique within a scenario).
    pub fn new(name: &str) -> Self {
        Guest {
            name: name.to_string(),
            log_dir: None,
            disks: Vec::new(),
            queues: 1,
            cpus: None,
            memory_mib: 512,
            reconnect: false,
            workload: String::new(),
            env: Vec::new(),
            files: Vec::new(),
            timeout: Duration::from_secs(180),
            root_disk: false,
            kernel_args: Vec::new(),
            qemu_args: Vec::new(),
        }
    }

    /// Adds QEMU options (after the disks), e.g. a QMP socket or `-incoming` for a live
    /// migration's destination.
    pub fn qemu_args(mut self, args: &[&str]) -> Self {
        self.qemu_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Where the console, QEMU and initrd files go (default: the running scenario's directory).
    pub fn log_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.log_dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// Attaches a vhost-user-blk disk served on `socket`; the first is `/dev/vda`, then `vdb`...
    pub fn disk(mut self, socket: impl AsRef<Path>) -> Self {
        self.disks.push(socket.as_ref().to_path_buf());
        self
    }

    /// Virtqueues per disk (`num-queues`, default 1). Unless [`Guest::cpus`] says otherwise the
    /// guest gets as many vCPUs (up to 4), since Linux uses at most one queue per CPU.
    pub fn queues(mut self, n: u16) -> Self {
        self.queues = n.max(1);
        self
    }

    /// Guest vCPUs.
    pub fn cpus(mut self, n: u16) -> Self {
        self.cpus = Some(n.max(1));
        self
    }

    /// Guest memory in MiB (default 512).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Connects the disks with `reconnect=1`, so QEMU survives the daemon restarting.
    pub fn reconnect(mut self) -> Self {
        self.reconnect = true;
        self
    }

    /// The shell script /init runs, with the helpers of `guest/dovetail.sh` (`check`, `ok`,
    /// `fail`, `info`, `wait_host`, ...).
    pub fn workload(mut self, script: &str) -> Self {
        self.workload = script.to_string();
        self
    }

    /// An environment variable for the workload.
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// A file placed in the guest at `path` (parent directories are created).
    pub fn file(mut self, path: &str, data: impl Into<Vec<u8>>) -> Self {
        self.files.push((path.to_string(), 0o644, data.into()));
        self
    }

    /// Hard limit for the whole run (default 180 s, scaled by `DOVETAIL_VM_TIMEOUT_SCALE`): QEMU is
    /// killed and the run fails when it passes.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Boots the root filesystem from the first disk (`root=/dev/vda`) through a small initramfs
    /// that only loads modules and `switch_root`s; the disk must hold `/init` (see
    /// [`crate::image::build_root_image`]). The workload set here is ignored: it lives on the disk.
    pub fn boot_from_disk(mut self) -> Self {
        self.root_disk = true;
        self
    }

    /// An extra kernel command-line argument.
    pub fn kernel_arg(mut self, arg: &str) -> Self {
        self.kernel_args.push(arg.to_string());
        self
    }

    /// Boots and waits for the guest to power off: [`Guest::start`] then [`RunningGuest::finish`].
    pub fn boot(self) -> Result<GuestRun> {
        self.start()?.finish()
    }

    fn env_file(&self) -> String {
        let mut s = String::new();
        let mut vars = vec![
            ("DOVETAIL_DISKS".to_string(), self.disks.len().to_string()),
            ("DOVETAIL_GUEST".to_string(), self.name.clone()),
            ("DOVETAIL_QUEUES".to_string(), self.queues.to_string()),
        ];
        vars.extend(self.env.iter().cloned());
        for (k, v) in vars {
            s.push_str(&format!("export {k}='{}'\n", v.replace('\'', "'\\''")));
        }
        s
    }

    fn extra_archive(&self) -> Vec<u8> {
        let mut cpio = Cpio::new();
        cpio.file("/workload.sh", 0o755, self.workload.as_bytes());
        cpio.file("/etc/dovetail/env", 0o644, self.env_file().as_bytes());
        let mut dirs: Vec<String> = Vec::new();
        for (path, mode, data) in &self.files {
            let mut parent = String::new();
            let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
            for part in &parts[..parts.len().saturating_sub(1)] {
                parent.push('/');
                parent.push_str(part);
                if !dirs.contains(&parent) {
                    cpio.dir(&parent);
                    dirs.push(parent.clone());
                }
            }
            cpio.file(path, *mode, data);
        }
        cpio.finish()
    }

    /// Boots the guest and returns while it runs, for scenarios that act while the workload waits
    /// ([`RunningGuest::wait_for`], [`RunningGuest::resume`]).
    pub fn start(self) -> Result<RunningGuest> {
        let qemu = host::qemu_binary()?;
        let kernel = kernel::guest_kernel()?;
        let dir = match &self.log_dir {
            Some(d) => d.clone(),
            None => SCENARIO_DIR
                .with(|d| d.borrow().clone())
                .unwrap_or_else(|| host::runs_dir().join(format!("adhoc-{}", std::process::id()))),
        };
        std::fs::create_dir_all(&dir).at("creating", &dir)?;
        let console_log = dir.join(format!("{}.console.log", self.name));
        let qemu_log = dir.join(format!("{}.qemu.log", self.name));

        let initrd = if self.root_disk {
            initramfs::base_initramfs(Flavor::SwitchRoot)?
        } else {
            let base = initramfs::base_initramfs(Flavor::Full)?;
            let initrd = dir.join(format!("{}.initrd", self.name));
            initramfs::write_initrd(&base, &self.extra_archive(), &initrd)?;
            initrd
        };

        // `cryptomgr.notests`: the crypto self-tests at boot only cost time under TCG, and with
        // two multi-vCPU guests on a two-CPU host one of them can spin in them long enough for
        // the soft-lockup watchdog (seen as a boot that never reaches the workload).
        let mut append = vec!["console=ttyS0", "quiet", "panic=-1", "cryptomgr.notests"];
        if self.root_disk {
            append.extend(["root=/dev/vda", "rw"]);
        }
        let mut append = append.join(" ");
        for a in &self.kernel_args {
            append.push(' ');
            append.push_str(a);
        }
        let cpus = self.cpus.unwrap_or(self.queues.min(4));
        let mem = format!("{}M", self.memory_mib);

        let mut cmd = Command::new(&qemu);
        cmd.args(["-accel", "tcg", "-nodefaults", "-no-reboot"])
            // QEMU's default CPU model (qemu64) lacks SSE4.2, so fio computes its crc32c verify
            // headers with a table in software, byte by byte under TCG; with the `crc32`
            // instruction (emulated by one helper call per 8 bytes) the fio-bound scenarios run
            // faster. The other flags are the ones a crc32c or popcount user checks alongside.
            .args(["-cpu", "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt"])
            .args(["-display", "none", "-monitor", "none"])
            .args(["-m", &mem, "-smp", &cpus.to_string()])
            .args([
                "-chardev",
                "stdio,id=con,signal=off",
                "-serial",
                "chardev:con",
            ])
            .arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
            .args(["-numa", "node,memdev=mem"])
            .arg("-kernel")
            .arg(&kernel.boot_image)
            .arg("-initrd")
            .arg(&initrd)
            .arg("-append")
            .arg(&append);
        for (i, socket) in self.disks.iter().enumerate() {
            let path = socket.to_string_lossy().replace(',', ",,");
            let reconnect = if self.reconnect { ",reconnect=1" } else { "" };
            cmd.arg("-chardev")
                .arg(format!("socket,id=disk{i},path={path}{reconnect}"))
                .arg("-device")
                .arg(format!(
                    "vhost-user-blk-pci,chardev=disk{i},num-queues={}",
                    self.queues
                ));
        }

        cmd.args(&self.qemu_args);
        let qemu_err = File::create(&qemu_log).at("creating", &qemu_log)?;
        let mut header = File::create(&console_log).at("creating", &console_log)?;
        writeln!(header, "=== qemu-tests: {} ===", host::describe(&cmd))
            .at("writing", &console_log)?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(qemu_err)
            .spawn()
            .ctx(|| format!("cannot start `{}`", host::describe(&cmd)))?;
        let started = Instant::now();
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::Setup("QEMU has no stdout pipe".into()))?;
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::Builder::new()
            .name(format!("console-{}", self.name))
            .spawn(move || read_console(stdout, header, tx))
            .ctx(|| "spawning the console reader".into())?;
        let timeout = host::scaled(self.timeout);
        Ok(RunningGuest {
            name: self.name,
            child: Some(child),
            stdin,
            rx,
            reader: Some(reader),
            lines: Vec::new(),
            started,
            deadline: started + timeout,
            timeout,
            console_log,
            qemu_log,
            eof: false,
        })
    }
}

/// Copies the console to `log` and sends it line by line, until QEMU closes it.
fn read_console(mut out: impl Read, mut log: File, tx: mpsc::Sender<String>) {
    let mut buf = [0u8; 4096];
    let mut line: Vec<u8> = Vec::new();
    loop {
        let n = match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // The log is for humans; losing it must not stop the test from reading the console.
        let _ = log.write_all(&buf[..n]);
        for &b in &buf[..n] {
            if b == b'\n' {
                let text = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_string();
                line.clear();
                if tx.send(text).is_err() {
                    return;
                }
            } else {
                line.push(b);
            }
        }
    }
    if !line.is_empty() {
        let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
    }
}

/// A booted guest whose console the test reads while it runs. Dropping it kills QEMU.
#[derive(Debug)]
pub struct RunningGuest {
    name: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    rx: Receiver<String>,
    reader: Option<JoinHandle<()>>,
    lines: Vec<String>,
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    console_log: PathBuf,
    qemu_log: PathBuf,
    eof: bool,
}

impl RunningGuest {
    /// The console log file.
    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    /// Console lines read so far.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    fn context(&self) -> String {
        context(&self.console_log, &self.qemu_log, &self.lines, false)
    }

    fn fail(&self, reason: String) -> Error {
        Error::Guest {
            guest: self.name.clone(),
            reason,
            context: self.context(),
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Best effort: QEMU may have exited already.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The next console line; `None` once QEMU closed the console. Fails (killing QEMU) when the
    /// run's timeout passes.
    fn next_line(&mut self) -> Result<Option<String>> {
        if self.eof {
            return Ok(None);
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(line) => {
                self.lines.push(line.clone());
                Ok(Some(line))
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.eof = true;
                Ok(None)
            }
            Err(RecvTimeoutError::Timeout) => {
                self.kill();
                Err(self.fail(format!("timed out after {:?}; QEMU killed", self.timeout)))
            }
        }
    }

    /// Reads the console until a line contains `needle` and returns that line.
    pub fn wait_for_line(&mut self, needle: &str) -> Result<String> {
        while let Some(line) = self.next_line()? {
            if line.contains(needle) {
                return Ok(line);
            }
        }
        let status = self.reap();
        Err(self.fail(format!(
            "QEMU exited ({status}) before the console showed {needle:?}"
        )))
    }

    /// Waits until the workload calls `wait_host TOKEN` (the guest is then idle, blocked reading
    /// the console).
    pub fn wait_for(&mut self, token: &str) -> Result<()> {
        self.wait_for_line(&format!("{WAIT_PREFIX}{token}"))
            .map(|_| ())
    }

    /// Releases a guest blocked in `wait_host TOKEN`.
    pub fn resume(&mut self, token: &str) -> Result<()> {
        self.send_line(token)
    }

    /// Writes a line to the guest's serial console.
    pub fn send_line(&mut self, text: &str) -> Result<()> {
        let name = self.name.clone();
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| Error::Setup(format!("guest `{name}` has no console input")))?;
        stdin
            .write_all(format!("{text}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .ctx(|| format!("writing to the console of guest `{name}`"))
    }

    fn reap(&mut self) -> String {
        let Some(child) = self.child.as_mut() else {
            return "killed".to_string();
        };
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if Instant::now() < self.deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => {
                    self.kill();
                    return "still running at the timeout; killed".to_string();
                }
                Err(e) => return format!("unknown: {e}"),
            }
        }
    }

    /// Waits for the guest to power off (or the timeout) and parses what it printed.
    pub fn finish(mut self) -> Result<GuestRun> {
        while self.next_line()?.is_some() {}
        // The console closed: QEMU is exiting. Wait for it within the same deadline.
        let status = self.reap();
        // Reaped (or killed at the deadline): nothing left for Drop to kill.
        self.child = None;
        if let Some(reader) = self.reader.take() {
            // The reader ends at EOF, which was seen; a panic there is a harness bug.
            if reader.join().is_err() {
                return Err(self.fail("console reader panicked".into()));
            }
        }
        let elapsed = self.started.elapsed();
        let run = GuestRun::parse(
            &self.name,
            std::mem::take(&mut self.lines),
            status,
            elapsed,
            self.console_log.clone(),
            self.qemu_log.clone(),
        );
        crate::say(&format!(
            "guest `{}`: {} in {:.1}s (booted after {}), {} ok, {} failed",
            run.name,
            match &run.exit {
                GuestExit::Done(s) => format!("workload exit {s}"),
                GuestExit::Died { qemu } => format!("no workload end, QEMU {qemu}"),
            },
            elapsed.as_secs_f64(),
            run.boot_time()
                .map(|d| format!("{:.1}s", d.as_secs_f64()))
                .unwrap_or_else(|| "?".into()),
            run.results.iter().filter(|r| r.ok).count(),
            run.failures().len(),
        ));
        Ok(run)
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a console line is a kernel message (`[    3.14] ...`).
fn is_kernel_line(line: &str) -> bool {
    line.strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .is_some_and(|(stamp, _)| {
            let stamp = stamp.trim();
            !stamp.is_empty() && stamp.chars().all(|c| c.is_ascii_digit() || c == '.')
        })
}

/// Log paths and the console tail for an error. For a workload that ran to its end the tail
/// leaves out kernel messages (the full log has them), so the failed checks' output shows.
fn context(console_log: &Path, qemu_log: &Path, lines: &[String], workload_ended: bool) -> String {
    let shown: Vec<&str> = lines
        .iter()
        .map(String::as_str)
        .filter(|l| !workload_ended || !is_kernel_line(l))
        .collect();
    let tail = &shown[shown.len().saturating_sub(TAIL_LINES)..];
    let qemu_err = host::tail_of_file(qemu_log, 10);
    format!(
        "console log: {}\nQEMU log: {}\n--- last console lines{} ---\n{}\n--- QEMU stderr ---\n{}",
        console_log.display(),
        qemu_log.display(),
        if workload_ended {
            " (kernel messages left out)"
        } else {
            ""
        },
        tail.join("\n"),
        qemu_err
    )
}

/// How the run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// /init printed `DOVETAIL-DONE: STATUS`: the workload ran to its end with this status.
    Done(i32),
    /// QEMU exited without the workload ending (kernel panic, guest crash, QEMU error).
    Died {
        /// QEMU's exit status, as text.
        qemu: String,
    },
}

/// One `DOVETAIL-RESULT` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestResult {
    /// The check's name.
    pub name: String,
    /// `ok` or `fail`.
    pub ok: bool,
    /// The rest of the line: timing for ok, the reason for fail.
    pub detail: String,
}

/// What a finished guest printed.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// The guest's name.
    pub name: String,
    /// How it ended.
    pub exit: GuestExit,
    /// Every console line.
    pub lines: Vec<String>,
    /// The result lines, in order.
    pub results: Vec<GuestResult>,
    /// Wall time from QEMU's start to its exit.
    pub elapsed: Duration,
    /// The console log file.
    pub console_log: PathBuf,
    /// QEMU's stderr.
    pub qemu_log: PathBuf,
}

fn after<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    line.find(prefix).map(|i| &line[i + prefix.len()..])
}

impl GuestRun {
    /// Parses console lines (exposed for the harness's own tests).
    pub fn parse(
        name: &str,
        lines: Vec<String>,
        qemu_status: String,
        elapsed: Duration,
        console_log: PathBuf,
        qemu_log: PathBuf,
    ) -> GuestRun {
        let mut results = Vec::new();
        let mut done = None;
        for line in &lines {
            if let Some(rest) = after(line, RESULT_PREFIX) {
                let mut parts = rest.trim().splitn(3, ' ');
                let verdict = parts.next().unwrap_or_default();
                let name = parts.next().unwrap_or_default().to_string();
                let detail = parts.next().unwrap_or_default().to_string();
                match verdict {
                    "ok" => results.push(GuestResult {
                        name,
                        ok: true,
                        detail,
                    }),
                    // Anything malformed counts as a failure rather than being ignored.
                    _ => results.push(GuestResult {
                        name: if name.is_empty() {
                            "malformed-result".into()
                        } else {
                            name
                        },
                        ok: false,
                        detail: if verdict == "fail" {
                            detail
                        } else {
                            format!("malformed result line: {line}")
                        },
                    }),
                }
            } else if let Some(rest) = after(line, DONE_PREFIX) {
                done = Some(rest.trim().parse::<i32>().unwrap_or(-1));
            }
        }
        let exit = match done {
            Some(status) => GuestExit::Done(status),
            None => GuestExit::Died { qemu: qemu_status },
        };
        GuestRun {
            name: name.to_string(),
            exit,
            lines,
            results,
            elapsed,
            console_log,
            qemu_log,
        }
    }

    /// The last result named `name`.
    pub fn result(&self, name: &str) -> Option<&GuestResult> {
        self.results.iter().rev().find(|r| r.name == name)
    }

    /// Failed results.
    pub fn failures(&self) -> Vec<&GuestResult> {
        self.results.iter().filter(|r| !r.ok).collect()
    }

    /// The value of the last `DOVETAIL-INFO: KEY VALUE` line.
    pub fn info(&self, key: &str) -> Option<&str> {
        self.lines.iter().rev().find_map(|l| {
            let rest = after(l, INFO_PREFIX)?;
            let (k, v) = rest.split_once(' ').unwrap_or((rest, ""));
            (k == key).then(|| v.trim())
        })
    }

    /// Seconds from kernel start to the workload (from the guest's uptime).
    pub fn boot_time(&self) -> Option<Duration> {
        self.lines.iter().find_map(|l| {
            let rest = after(l, BOOTED_PREFIX)?;
            let secs = rest.split_whitespace().next()?.trim_end_matches('s');
            secs.parse::<f64>().ok().map(Duration::from_secs_f64)
        })
    }

    /// Whether `line` appeared on the console (substring match).
    pub fn saw(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l.contains(line))
    }

    /// Passes when the workload ran to its end with status 0, printed no failure, and printed an
    /// ok result for every name in `names`.
    pub fn expect_ok(&self, names: &[&str]) -> Result<&Self> {
        let mut problems = Vec::new();
        match &self.exit {
            GuestExit::Done(0) => {}
            GuestExit::Done(s) => problems.push(format!("workload exited with status {s}")),
            GuestExit::Died { qemu } => problems.push(format!(
                "the guest stopped before the workload ended (QEMU: {qemu})"
            )),
        }
        for f in self.failures() {
            problems.push(format!("FAIL {}: {}", f.name, f.detail));
        }
        // Named checks that failed are already listed above; report the ones that never ran.
        for name in names {
            if self.result(name).is_none() {
                problems.push(format!("no result for `{name}`"));
            }
        }
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(Error::Guest {
                guest: self.name.clone(),
                reason: problems.join("\n  "),
                context: context(
                    &self.console_log,
                    &self.qemu_log,
                    &self.lines,
                    matches!(self.exit, GuestExit::Done(_)),
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(lines: &[&str]) -> GuestRun {
        GuestRun::parse(
            "t",
            lines.iter().map(|s| s.to_string()).collect(),
            "exit status: 0".into(),
            Duration::from_secs(1),
            PathBuf::from("c.log"),
            PathBuf::from("q.log"),
        )
    }

    #[test]
    fn all_ok_passes() {
        let r = run(&[
            "DOVETAIL-BOOTED: 4.50s kernel 6.1 cpus 1",
            "DOVETAIL-RESULT: ok a 1.00s",
            "[   3.1] noise DOVETAIL-RESULT: ok b",
            "DOVETAIL-INFO: queues 4",
            "DOVETAIL-DONE: 0",
        ]);
        assert!(r.expect_ok(&["a", "b"]).is_ok());
        assert_eq!(r.info("queues"), Some("4"));
        assert_eq!(r.info("absent"), None);
        assert_eq!(r.boot_time(), Some(Duration::from_secs_f64(4.5)));
        assert_eq!(r.exit, GuestExit::Done(0));
    }

    #[test]
    fn a_failure_fails_even_with_every_named_result_ok() {
        let r = run(&[
            "DOVETAIL-RESULT: ok a",
            "DOVETAIL-RESULT: fail c exit 1: fio",
            "DOVETAIL-DONE: 0",
        ]);
        let e = r.expect_ok(&["a"]).expect_err("a fail line must fail");
        assert!(e.to_string().contains("FAIL c: exit 1: fio"), "{e}");
    }

    #[test]
    fn missing_result_or_end_fails() {
        let r = run(&["DOVETAIL-RESULT: ok a", "DOVETAIL-DONE: 0"]);
        assert!(r.expect_ok(&["a", "b"]).is_err());
        let r = run(&["DOVETAIL-RESULT: ok a", "Kernel panic"]);
        assert!(matches!(r.exit, GuestExit::Died { .. }));
        assert!(r.expect_ok(&["a"]).is_err());
        let r = run(&["DOVETAIL-RESULT: ok a", "DOVETAIL-DONE: 3"]);
        assert!(r.expect_ok(&["a"]).is_err());
    }

    #[test]
    fn malformed_result_is_a_failure() {
        let r = run(&["DOVETAIL-RESULT: maybe a", "DOVETAIL-DONE: 0"]);
        assert_eq!(r.failures().len(), 1);
        assert!(r.expect_ok(&[]).is_err());
    }

    #[test]
    fn kernel_lines_are_recognised() {
        assert!(is_kernel_line(
            "[    3.662294] virtio_blk virtio0: 1/0/0 queues"
        ));
        assert!(!is_kernel_line("DOVETAIL-RESULT: ok a"));
        assert!(!is_kernel_line("[ -f x ] && y"));
        assert!(!is_kernel_line("  | fio: verify failed"));
    }

    #[test]
    fn env_file_quotes_values() {
        let g = Guest::new("g")
            .disk("/tmp/x.sock")
            .env("A", "it's")
            .env("B", 3);
        let env = g.env_file();
        assert!(env.contains("export DOVETAIL_DISKS='1'\n"), "{env}");
        assert!(env.contains("export A='it'\\''s'\n"), "{env}");
        assert!(env.contains("export B='3'\n"), "{env}");
    }
}
