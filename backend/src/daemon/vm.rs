//! What attaches a VM to a disk Dovetail serves: QEMU's options ([`qemu_command_line`]),
//! printed by `serve` and in `attach`'s reply, and the libvirt `<disk>` element
//! ([`libvirt_disk_xml`]; `contrib/libvirt/` has a whole domain; README: "Attaching a VM with
//! libvirt").
//!
//! libvirt (7.1 and later) drives QEMU's `vhost-user-blk-pci` from `<disk type='vhostuser'>`.
//! It refuses `<readonly/>`, `<serial>`, `cache=`, `discard=` and the like on such a disk
//! (they are the backend's business): a read-only disk or a serial number is set on the
//! Dovetail side (`serve --read-only`, `--serial`), and the guest sees them through the
//! virtio-blk configuration the daemon offers. The domain also needs shared memory
//! (`<memoryBacking>` with `<source type='memfd'/>` and `<access mode='shared'/>`), which
//! [`MEMORY_BACKING_XML`] holds.

use std::path::Path;

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

/// The `<memoryBacking>` element a domain with a vhost-user disk needs: guest memory in a
/// sealed memfd, shared with the daemon.
pub const MEMORY_BACKING_XML: &str = "<memoryBacking>\n  <source type='memfd'/>\n  <access \
                                      mode='shared'/>\n</memoryBacking>\n";

/// How a libvirt domain attaches one Dovetail disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtDisk<'a> {
    /// The Dovetail disk's name: becomes the device's user alias (`ua-dovetail-NAME`, with
    /// characters other than `A-Za-z0-9_-` replaced by `_`), which `virsh detach-device-alias`
    /// takes.
    pub name: &'a str,
    /// The disk's vhost-user socket.
    pub socket: &'a Path,
    /// The guest's device name (`vda`, `vdb`, ...): the target dev libvirt orders disks by.
    pub target: &'a str,
    /// Virtqueues (`<driver queues=N>`): at most what the daemon serves (`--queues`).
    pub queues: u16,
    /// Seconds between QEMU's attempts to reconnect after the daemon restarts (0: no
    /// `<reconnect>`, the VM stops if the daemon goes away).
    pub reconnect_secs: u32,
}

impl LibvirtDisk<'_> {
    /// The `<disk>` element, indented by two spaces per level, ending in a newline.
    pub fn xml(&self) -> String {
        let mut x = String::from("<disk type='vhostuser' device='disk'>\n");
        let queues = if self.queues > 1 {
            format!(" queues='{}'", self.queues)
        } else {
            String::new()
        };
        x.push_str(&format!("  <driver name='qemu' type='raw'{queues}/>\n"));
        let path = escape(&self.socket.to_string_lossy());
        if self.reconnect_secs > 0 {
            x.push_str(&format!("  <source type='unix' path='{path}'>\n"));
            x.push_str(&format!(
                "    <reconnect enabled='yes' timeout='{}'/>\n",
                self.reconnect_secs
            ));
            x.push_str("  </source>\n");
        } else {
            x.push_str(&format!("  <source type='unix' path='{path}'/>\n"));
        }
        x.push_str(&format!(
            "  <target dev='{}' bus='virtio'/>\n",
            escape(self.target)
        ));
        x.push_str(&format!("  <alias name='{}'/>\n", alias(self.name)));
        x.push_str("</disk>\n");
        x
    }
}

/// The `<disk>` element attaching Dovetail disk `name`, served on `socket`, as guest device
/// `target` (`vdb`) with `queues` virtqueues; QEMU reconnects every second if the daemon
/// restarts. See [`LibvirtDisk`] for the rest.
pub fn libvirt_disk_xml(name: &str, socket: &Path, target: &str, queues: u16) -> String {
    LibvirtDisk {
        name,
        socket,
        target,
        queues,
        reconnect_secs: 1,
    }
    .xml()
}

/// libvirt's user alias for disk `name`: `ua-` is the prefix libvirt keeps user aliases under.
fn alias(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("ua-dovetail-{safe}")
}

/// Escapes text for an XML attribute in single quotes.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_element_names_the_socket_queues_and_reconnect() {
        let x = libvirt_disk_xml("vm1", Path::new("/run/dovetail/vm1.sock"), "vda", 4);
        assert_eq!(
            x,
            "<disk type='vhostuser' device='disk'>\n  <driver name='qemu' type='raw' \
             queues='4'/>\n  <source type='unix' path='/run/dovetail/vm1.sock'>\n    \
             <reconnect enabled='yes' timeout='1'/>\n  </source>\n  <target dev='vda' \
             bus='virtio'/>\n  <alias name='ua-dovetail-vm1'/>\n</disk>\n"
        );
    }

    #[test]
    fn one_queue_and_no_reconnect_are_left_out_and_text_is_escaped() {
        let x = LibvirtDisk {
            name: "a b.c",
            socket: Path::new("/tmp/it's&<x>.sock"),
            target: "vdb",
            queues: 1,
            reconnect_secs: 0,
        }
        .xml();
        assert!(x.contains("<driver name='qemu' type='raw'/>"), "{x}");
        assert!(
            x.contains("<source type='unix' path='/tmp/it&apos;s&amp;&lt;x&gt;.sock'/>"),
            "{x}"
        );
        assert!(!x.contains("reconnect"), "{x}");
        assert!(x.contains("<alias name='ua-dovetail-a_b_c'/>"), "{x}");
    }
}
