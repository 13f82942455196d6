//! libvirt attaches a VM to a Dovetail disk: the domain of `contrib/libvirt/dovetail-vm.xml`
//! (adapted only where a test host needs it: TCG, a kernel and initrd to boot, the console
//! in a file, a unique name) is defined and started on `qemu:///system` of a `libvirtd` the
//! test starts by hand when none runs. The guest boots its root filesystem from the served disk
//! (2 queues, QEMU as libvirt-qemu:kvm reaching the socket through `serve --socket-group
//! kvm`), runs fio verify on it, and then has the disk grown live, 192 -> 256 MiB, with
//! `dovetail ctl resize` over the daemon's control socket: it must see the new size at once
//! (no rescan), grow its mounted ext4 with `resize2fs` and use the new space. It powers off;
//! libvirt must see a clean shutdown, the daemon must exit 0, and on the host the image must be
//! 256 MiB, its filesystem too, and check clean.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dovetail_qemu_tests::{
    dovetail_ctl, host, initramfs, kernel, scenario, Daemon, Error, GuestRun, Result,
};

/// What the guest runs from its root filesystem on /dev/vda.
const WORKLOAD: &str = r#"
expect_eq root-device "$(awk '$2 == "/" { print $1 }' /proc/mounts)" /dev/vda
expect_eq queues "$(ls /sys/block/vda/mq | wc -l)" 2
mkdir -p /fio
# Two jobs (one per vCPU, so both virtqueues carry requests), each on a file of its own.
common="--directory=/fio --ioengine=libaio --direct=1 --iodepth=16 --numjobs=2 --group_reporting
 --cpus_allowed=0-1 --cpus_allowed_policy=split
 --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 --verify_state_save=0"
check fio-rand-4k fio --name=rand4k $common --size=4M --rw=randwrite --bs=4k
check fio-seq-1m fio --name=seq1m $common --size=8M --rw=write --bs=1M
check write-probe sh -c "echo dovetail-libvirt-ok >/probe.txt && sync"
rm -rf /fio
# The host grows the disk live once it reads `grow-ready`: the new size must show in
# /sys/block/vda/size without a rescan (the config-change interrupt), then ext4 grows online.
old=$(cat /sys/block/vda/size)
free_kb=$(df -P -k / | awk 'NR == 2 { print $4 }')
fs_kb=$(df -P -k / | awk 'NR == 2 { print $2 }')
info old-sectors "$old"
info grow-ready "$old"
t=0
new=$old
while [ "$new" -le "$old" ] && [ $t -lt 1200 ]; do
    sleep 0.1
    t=$((t + 1))
    new=$(cat /sys/block/vda/size)
done
info new-sectors "$new"
if [ "$new" -gt "$old" ]; then
    ok new-size "$old -> $new sectors $((t * 100)) ms after grow-ready"
    check resize2fs /usr/sbin/resize2fs /dev/vda
    grown_kb=$(df -P -k / | awk 'NR == 2 { print $2 }')
    info fs-kb "$fs_kb -> $grown_kb"
    if [ "$grown_kb" -gt "$fs_kb" ]; then ok fs-grown "$fs_kb -> $grown_kb KiB"
    else fail fs-grown "still $grown_kb KiB after resize2fs"; fi
    # More than the old filesystem had free, even counting the blocks reserved for root (5%, under
    # 10 MiB): only the new blocks (about 60 MiB) can hold it.
    big_kb=$((free_kb + 32768))
    check fill-new-space fallocate -l ${big_kb}K /big
    check write-tail dd if=/dev/urandom of=/tail.bin bs=1M count=4 conv=fsync
    sum=$(sha256sum </tail.bin)
    echo 3 >/proc/sys/vm/drop_caches
    expect_eq tail-reread "$(sha256sum </tail.bin)" "$sum"
    check free-again rm -f /big /tail.bin
else
    fail new-size "still $old sectors 120 s after grow-ready"
fi
"#;

const CONNECT: &str = "qemu:///system";

fn io(what: impl Into<String>, source: std::io::Error) -> Error {
    Error::Io {
        what: what.into(),
        source,
    }
}

fn virsh(args: &[&str]) -> Result<String> {
    let virsh = host::require_tool("virsh", "libvirt-clients")?;
    let out = host::run(Command::new(virsh).arg("-c").arg(CONNECT).args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether a libvirt daemon answers on qemu:///system.
fn libvirt_answers() -> bool {
    host::find_tool("virsh").is_some_and(|v| {
        Command::new(v)
            .args(["-c", CONNECT, "uri"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// The libvirt daemons: `virtlogd` (QEMU's log and console files go through it) and
/// `libvirtd`, each the one already running (left alone) or started here, without systemd, and
/// stopped (SIGTERM) when dropped.
struct Libvirtd {
    children: Vec<(String, Child)>,
}

impl Libvirtd {
    fn ensure(dir: &Path) -> Result<Libvirtd> {
        let mut d = Libvirtd {
            children: Vec::new(),
        };
        // A socket file left by a virtlogd that is gone refuses connections: start one then too.
        let virtlogd_answers =
            || std::os::unix::net::UnixStream::connect("/run/libvirt/virtlogd-sock").is_ok();
        if !virtlogd_answers() {
            d.spawn("virtlogd", &dir.join("virtlogd.log"))?;
            d.wait("virtlogd", &dir.join("virtlogd.log"), virtlogd_answers)?;
        }
        if libvirt_answers() {
            dovetail_qemu_tests::say("libvirt: using the running libvirt daemon");
        } else {
            d.spawn("libvirtd", &dir.join("libvirtd.log"))?;
            d.wait("libvirtd", &dir.join("libvirtd.log"), libvirt_answers)?;
        }
        if !d.children.is_empty() {
            let names: Vec<&str> = d.children.iter().map(|(n, _)| n.as_str()).collect();
            dovetail_qemu_tests::say(&format!("libvirt: started {}", names.join(" and ")));
        }
        Ok(d)
    }

    fn spawn(&mut self, program: &str, log: &Path) -> Result<()> {
        let path = host::require_tool(program, "libvirt-daemon-system")?;
        let err =
            std::fs::File::create(log).map_err(|e| io(format!("creating {}", log.display()), e))?;
        let child = Command::new(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|e| io(format!("starting {}", path.display()), e))?;
        self.children.push((program.to_string(), child));
        Ok(())
    }

    fn wait(&mut self, program: &str, log: &Path, ready: impl Fn() -> bool) -> Result<()> {
        let deadline = Instant::now() + host::scaled(Duration::from_secs(30));
        while !ready() {
            if let Some((_, child)) = self.children.iter_mut().find(|(n, _)| n == program) {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(Error::Setup(format!(
                        "{program} exited ({status}) before it was ready:\n{}",
                        host::tail_of_file(log, 20)
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Setup(format!(
                    "{program} was not ready within 30 s:\n{}",
                    host::tail_of_file(log, 20)
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        // libvirtd first, then virtlogd.
        while let Some((_, mut child)) = self.children.pop() {
            // SAFETY: kill only sends a signal to a daemon this test spawned.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            let mut done = false;
            while !done && Instant::now() < deadline {
                done = matches!(child.try_wait(), Ok(Some(_)));
                if !done {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            if !done {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Undefines (and destroys, if it runs) the test's domain when dropped.
struct Domain(String);

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.0]);
        let _ = virsh(&["undefine", &self.0]);
    }
}

/// Copies `tool` and the libraries `ldd` names for it into the root tree.
fn copy_with_libraries(tool: &str, root: &Path) -> Result<()> {
    let src = host::find_tool(tool)
        .ok_or_else(|| Error::Setup(format!("{tool} not found (scripts/test-deps.sh)")))?;
    let mut files = vec![src.clone()];
    let ldd = host::run(Command::new("ldd").arg(&src))?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let lib = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(lib) = lib.filter(|l| l.starts_with('/')) {
            files.push(PathBuf::from(lib));
        }
    }
    for f in files {
        let to = root.join(f.strip_prefix("/").unwrap_or(&f));
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| io(format!("creating {}", parent.display()), e))?;
        }
        std::fs::copy(&f, &to)
            .map_err(|e| io(format!("copying {} to {}", f.display(), to.display()), e))?;
    }
    Ok(())
}

/// An ext4 image whose root holds busybox, the guest /init, fio and the workload.
fn build_root(image: &Path, scratch: &Path) -> Result<()> {
    let root = scratch.join("rootfs");
    initramfs::rootfs_tree_with_fio(&root)?;
    copy_with_libraries("resize2fs", &root)?;
    copy_with_libraries("fallocate", &root)?;
    std::fs::write(root.join("workload.sh"), WORKLOAD).map_err(|e| io("writing workload.sh", e))?;
    std::fs::write(
        root.join("etc/dovetail/env"),
        "export DOVETAIL_DISKS='1'\nexport DOVETAIL_QUEUES='2'\n",
    )
    .map_err(|e| io("writing the env file", e))?;
    let mke2fs = host::require_tool("mke2fs", "e2fsprogs")?;
    host::run(
        Command::new(mke2fs)
            .args(["-q", "-F", "-t", "ext4", "-L", "dovetail-root", "-d"])
            .arg(&root)
            .arg(image)
            .arg("192M"),
    )?;
    std::fs::remove_dir_all(&root).map_err(|e| io("removing the root tree", e))
}

/// The ext4 filesystem's block count and block size, from `dumpe2fs -h`.
fn fs_geometry(image: &Path) -> Result<(u64, u64)> {
    let dumpe2fs = host::require_tool("dumpe2fs", "e2fsprogs")?;
    let out = host::run(Command::new(dumpe2fs).arg("-h").arg(image))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| Error::Check(format!("dumpe2fs -h shows no {key:?}:\n{text}")))
    };
    Ok((field("Block count:")?, field("Block size:")?))
}

/// `text` with `from` replaced by `to`; fails if `from` is not there (the contrib file changed).
fn swap(text: String, from: &str, to: &str) -> Result<String> {
    if !text.contains(from) {
        return Err(Error::Check(format!(
            "contrib/libvirt/dovetail-vm.xml no longer holds {from:?}; update this test"
        )));
    }
    Ok(text.replacen(from, to, 1))
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io(format!("chmod {mode:o} {}", p.display()), e))
}

#[test]
fn libvirt_boots_a_guest_from_a_dovetail_disk() {
    scenario("libvirt", |s| {
        // QEMU runs as libvirt-qemu: it must reach the socket, kernel, initrd and console.
        set_mode(s.dir(), 0o755)?;
        let libvirtd = Libvirtd::ensure(s.dir())?;

        let image = s.path("root.img");
        build_root(&image, s.dir())?;
        let control = s.path("ctl.sock");
        let mut daemon = Daemon::dovetail(&image)
            .queues(2)
            .arg("--control")
            .arg(
                control
                    .to_str()
                    .ok_or_else(|| Error::Setup("the scenario path is not UTF-8".into()))?,
            )
            .arg("--socket-group")
            .arg("kvm")
            .spawn()?;

        let k = kernel::guest_kernel()?;
        // The uncompressed kernel when there is one (no decompression under TCG; see
        // `GuestKernel::boot_image`).
        let vmlinuz = s.path("kernel");
        let initrd = s.path("initrd.gz");
        std::fs::copy(&k.boot_image, &vmlinuz).map_err(|e| io("copying the kernel", e))?;
        std::fs::copy(
            initramfs::base_initramfs(initramfs::Flavor::SwitchRoot)?,
            &initrd,
        )
        .map_err(|e| io("copying the initrd", e))?;
        let console = s.path("guest.console.log");
        std::fs::write(&console, b"").map_err(|e| io("creating the console", e))?;
        for f in [&vmlinuz, &initrd, &console] {
            set_mode(f, 0o644)?;
        }

        let name = format!("dovetail-test-{}", std::process::id());
        let contrib = host::workspace_dir().join("contrib/libvirt/dovetail-vm.xml");
        let xml = std::fs::read_to_string(&contrib)
            .map_err(|e| io(format!("reading {}", contrib.display()), e))?;
        let xml = swap(xml, "<domain type='kvm'>", "<domain type='qemu'>")?;
        let xml = swap(
            xml,
            "<name>dovetail-vm</name>",
            &format!("<name>{name}</name>"),
        )?;
        let xml = swap(
            xml,
            "<memory unit='MiB'>1024</memory>",
            "<memory unit='MiB'>512</memory>",
        )?;
        let xml = swap(
            xml,
            "<currentMemory unit='MiB'>1024</currentMemory>",
            "<currentMemory unit='MiB'>512</currentMemory>",
        )?;
        let xml = swap(
            xml,
            "<on_reboot>restart</on_reboot>",
            "<on_reboot>destroy</on_reboot>",
        )?;
        let xml = swap(
            xml,
            "path='/run/dovetail/vm1.sock'",
            &format!("path='{}'", daemon.socket().display()),
        )?;
        let xml = swap(
            xml,
            "<type arch='x86_64' machine='pc'>hvm</type>",
            &format!(
                "<type arch='x86_64' machine='pc'>hvm</type>\n    <kernel>{}</kernel>\n    \
                 <initrd>{}</initrd>\n    <cmdline>console=ttyS0 quiet panic=-1 \
                 cryptomgr.notests root=/dev/vda rw</cmdline>",
                vmlinuz.display(),
                initrd.display()
            ),
        )?;
        let xml = swap(
            xml,
            "<serial type='pty'>",
            &format!(
                "<serial type='file'>\n      <source path='{}'/>",
                console.display()
            ),
        )?;
        let xml = swap(
            xml,
            "<console type='pty'>\n      <target type='serial' port='0'/>\n    </console>\n",
            "",
        )?;
        let domain_xml = s.path("domain.xml");
        std::fs::write(&domain_xml, &xml).map_err(|e| io("writing domain.xml", e))?;

        virsh(&["define", &domain_xml.to_string_lossy()])?;
        let domain = Domain(name.clone());
        let started = Instant::now();
        virsh(&["start", &name])?;

        // The guest powers off when its workload ends; libvirt then sees the domain shut off.
        // Midway it says `grow-ready`: the disk then grows live, 192 -> 256 MiB.
        let deadline = started + host::scaled(Duration::from_secs(240));
        let mut grown = None;
        let state = loop {
            if grown.is_none()
                && std::fs::read_to_string(&console)
                    .is_ok_and(|c| c.contains("DOVETAIL-INFO: grow-ready"))
            {
                let reply = dovetail_ctl(&control, &["--json", "resize", "root.img", "256M"])?;
                if !reply.contains("\"guest_told\":true") {
                    return Err(Error::Check(format!(
                        "`ctl resize` did not tell the guest: {reply}"
                    )));
                }
                grown = Some(started.elapsed());
            }
            let state = virsh(&["domstate", "--reason", &name])?;
            if state.trim_start().starts_with("shut off") {
                break state.trim().to_string();
            }
            if Instant::now() > deadline {
                return Err(Error::Check(format!(
                    "the domain is still `{}` after 240 s; console:\n{}",
                    state.trim(),
                    host::tail_of_file(&console, 30)
                )));
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        dovetail_qemu_tests::say(&format!(
            "libvirt: domain ran {:.1}s, then `{state}`",
            started.elapsed().as_secs_f64()
        ));
        let lines: Vec<String> = std::fs::read_to_string(&console)
            .map_err(|e| io("reading the console", e))?
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect();
        let run = GuestRun::parse(
            "libvirt",
            lines,
            state.clone(),
            started.elapsed(),
            console.clone(),
            s.path("qemu.log"),
        );
        run.expect_ok(&[
            "root-device",
            "queues",
            "fio-rand-4k",
            "fio-seq-1m",
            "write-probe",
            "new-size",
            "resize2fs",
            "fs-grown",
            "fill-new-space",
            "write-tail",
            "tail-reread",
            "free-again",
        ])?;
        let (old, new) = (run.info("old-sectors"), run.info("new-sectors"));
        if old != Some("393216") || new != Some("524288") {
            return Err(Error::Check(format!(
                "the guest saw {old:?} -> {new:?} sectors, expected 393216 -> 524288"
            )));
        }
        dovetail_qemu_tests::say(&format!(
            "libvirt: grown at {:.1}s; {}; ext4 {} KiB",
            grown.map_or(0.0, |d| d.as_secs_f64()),
            run.result("new-size").map_or("?", |r| r.detail.as_str()),
            run.info("fs-kb").unwrap_or("?"),
        ));
        if !state.contains("(shutdown)") {
            return Err(Error::Check(format!(
                "libvirt saw `{state}`, not a guest shutdown"
            )));
        }
        drop(domain);
        daemon.terminate()?;
        drop(libvirtd);

        let len = std::fs::metadata(&image)
            .map_err(|e| io("reading the image's size", e))?
            .len();
        if len != 256 << 20 {
            return Err(Error::Check(format!(
                "the image is {len} bytes after the resize, not 256 MiB"
            )));
        }
        let report = dovetail_qemu_tests::image::e2fsck(&image)?;
        let (blocks, block) = fs_geometry(&image)?;
        if blocks * block != 256 << 20 {
            return Err(Error::Check(format!(
                "the filesystem on the host is {blocks} blocks of {block} bytes, not 256 MiB"
            )));
        }
        let probe = dovetail_qemu_tests::image::debugfs_cat(&image, "/probe.txt")?;
        if String::from_utf8_lossy(&probe).trim() != "dovetail-libvirt-ok" {
            return Err(Error::Check(format!(
                "/probe.txt in the image holds {:?}; e2fsck: {report}",
                String::from_utf8_lossy(&probe)
            )));
        }
        Ok(())
    });
}
