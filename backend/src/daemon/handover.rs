//! The handover channel between a running daemon and the binary replacing it (`dovetail ctl
//! upgrade`, SIGUSR2; docs/format.md, *The handover protocol*).
//!
//! The old process creates a private `AF_UNIX` `SOCK_SEQPACKET` socket pair, keeps one end and
//! starts the new binary with the other as an inherited fd named by [`ENV_FD`]. Every message
//! is one packet: a JSON object (at most [`MAX_FRAME`] bytes) with a `type`, and, for
//! `sockets` only, the listening sockets as `SCM_RIGHTS` fds in the same packet. The new
//! process speaks first (`hello` with its [`FORMAT`]); anything else, a packet too long, with
//! fds where none belong, a missing or unknown field, a hello naming another pid than the
//! child's, is refused, and the old process keeps serving.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The handover format this build speaks. Old and new must speak the same one. Format 2 adds
/// the live guest connections (`connection`, `connection-fds`) before the `sockets`.
pub const FORMAT: u32 = 2;

/// The environment variable naming the new process's end of the channel (an fd number).
pub const ENV_FD: &str = "DOVETAIL_HANDOVER_FD";

/// The longest message, in bytes.
pub const MAX_FRAME: usize = 64 * 1024;

/// The most fds one message carries (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// What a handed-over listening socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The control socket (`--control`).
    Control,
    /// A disk's vhost-user socket (`name` is the disk's).
    Disk,
    /// The metrics endpoint's TCP listener (`--metrics`).
    Metrics,
}

/// One listening socket of a `sockets` message; its fd is the one at the same position in the
/// message's `SCM_RIGHTS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketInfo {
    pub role: Role,
    /// The disk's name (`Disk`), else empty.
    #[serde(default)]
    pub name: String,
    /// The path the socket is bound at (`Control`, `Disk`; empty if none).
    #[serde(default)]
    pub path: String,
}

/// A message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Message {
    /// new → old, first: the format the new binary speaks, its pid and release.
    Hello {
        format: u32,
        pid: u32,
        version: String,
    },
    /// old → new (format 2), before `sockets`: a disk's live guest connection, paused and
    /// exported (`daemon::handover_conn`); its `fds` files follow in `connection-fds` messages.
    Connection {
        disk: String,
        state: Box<crate::daemon::handover_conn::ConnState>,
        fds: u32,
    },
    /// old → new (format 2): the next `count` files of the last `connection` (in the same
    /// packet; at most [`MAX_FDS`]).
    ConnectionFds { count: u32 },
    /// old → new: the old process stopped serving and released the store; here are its
    /// listening sockets (fds in the same packet, in this order).
    Sockets { sockets: Vec<SocketInfo> },
    /// new → old: the store and every disk are open, nothing is accepted yet.
    Ready,
    /// old → new: serve; the old process exits.
    Commit,
    /// Either side: the handover is off (`reason` says why); the new process exits, the old
    /// one serves on.
    Abort { reason: String },
}

impl Message {
    /// The message's `type` on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Connection { .. } => "connection",
            Message::ConnectionFds { .. } => "connection-fds",
            Message::Sockets { .. } => "sockets",
            Message::Ready => "ready",
            Message::Commit => "commit",
            Message::Abort { .. } => "abort",
        }
    }
}

/// Why a message could not be sent or was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("the handover channel failed")]
    Io(#[source] std::io::Error),
    #[error("no message from the other side within {0:?}")]
    Timeout(Duration),
    #[error("the other side closed the handover channel")]
    Closed,
    #[error("bad handover message: {0}")]
    Bad(String),
    #[error("the other side speaks handover format {theirs}, this build speaks {ours}")]
    Format { theirs: u32, ours: u32 },
    #[error("the handover was aborted by the other side: {0}")]
    Aborted(String),
}

/// One end of the handover channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// A connected pair: (the old process's end, the new process's end). Both are close-on-exec;
    /// the new end is made inheritable only in the child (see `face::upgrade`).
    pub fn pair() -> std::io::Result<(Channel, Channel)> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: socketpair writes two fds into the live two-element array.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both fds were just created by socketpair and are owned by nobody else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// The new process's end, from [`ENV_FD`] (then unset, so no child of the new process takes
    /// it). `None` without the variable; an error if it names no `SOCK_SEQPACKET` Unix socket.
    pub fn from_env() -> Result<Option<Channel>, HandoverError> {
        let Some(v) = std::env::var_os(ENV_FD) else {
            return Ok(None);
        };
        std::env::remove_var(ENV_FD);
        let bad = |why: &str| HandoverError::Bad(format!("{ENV_FD}={v:?}: {why}"));
        let fd: RawFd = v
            .to_str()
            .and_then(|s| s.parse().ok())
            .filter(|&fd| fd > 2)
            .ok_or_else(|| bad("not an fd number above 2"))?;
        let domain = crate::server::socket_option(fd, libc::SO_DOMAIN)
            .map_err(|e| bad(&format!("not a socket ({e})")))?;
        let kind =
            crate::server::socket_option(fd, libc::SO_TYPE).map_err(|e| bad(&e.to_string()))?;
        if domain != libc::AF_UNIX || kind != libc::SOCK_SEQPACKET {
            return Err(bad("not a Unix SOCK_SEQPACKET socket"));
        }
        // SAFETY: fcntl with F_SETFD only changes the flags of the fd handed to this process.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        // SAFETY: the fd is the channel's end the parent handed to this process, checked above,
        // taken once (the variable is unset): nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Some(Channel { fd }))
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The pid `SO_PEERCRED` gives for the other end: for a socket pair, the process that
    /// created it (so it identifies no child; the `hello` names the new process's pid).
    pub fn peer_pid(&self) -> std::io::Result<u32> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cred`, a live ucred.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(u32::try_from(cred.pid).unwrap_or(0))
    }

    /// Sends `msg` with `fds` (only a `sockets` message carries fds).
    pub fn send(&self, msg: &Message, fds: &[RawFd]) -> Result<(), HandoverError> {
        let body = serde_json::to_vec(msg).map_err(|e| HandoverError::Bad(e.to_string()))?;
        send_raw(self.fd.as_raw_fd(), &body, fds)
    }

    /// Waits up to `timeout` for the next message and its fds. A packet that is not one valid
    /// message, that was cut short, or that carries fds other than a `sockets` message's (one
    /// per socket) is refused; fds received with a refused packet are closed.
    pub fn recv(&self, timeout: Duration) -> Result<(Message, Vec<OwnedFd>), HandoverError> {
        let (body, fds) = recv_raw(self.fd.as_raw_fd(), timeout)?;
        let msg = parse(&body)?;
        let wanted = match &msg {
            Message::Sockets { sockets } => sockets.len(),
            Message::ConnectionFds { count } => *count as usize,
            _ => 0,
        };
        if fds.len() != wanted {
            return Err(HandoverError::Bad(format!(
                "a {} message with {} fds (wanted {wanted})",
                msg.kind(),
                fds.len()
            )));
        }
        Ok((msg, fds))
    }
}

/// A message from its bytes: one JSON object of the protocol, nothing else.
pub fn parse(body: &[u8]) -> Result<Message, HandoverError> {
    let shown = || {
        let n = body.len().min(80);
        String::from_utf8_lossy(&body[..n]).into_owned()
    };
    serde_json::from_slice(body).map_err(|e| HandoverError::Bad(format!("{e} in {:?}", shown())))
}

/// Sends one packet: `body` with `fds` as `SCM_RIGHTS`.
pub fn send_raw(fd: RawFd, body: &[u8], fds: &[RawFd]) -> Result<(), HandoverError> {
    if body.len() > MAX_FRAME || fds.len() > MAX_FDS {
        return Err(HandoverError::Bad(format!(
            "a message of {} bytes and {} fds is too large",
            body.len(),
            fds.len()
        )));
    }
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    // u64 for the cmsghdr's alignment.
    let mut control = vec![0u64; space.div_ceil(8).max(1)];
    let mut iov = libc::iovec {
        iov_base: body.as_ptr() as *mut libc::c_void,
        iov_len: body.len(),
    };
    // SAFETY: msghdr is plain data; all zeroes is a valid value.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if !fds.is_empty() {
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = space as _;
        // SAFETY: the control buffer is `space` bytes, enough for one cmsghdr with `fds`
        // (CMSG_SPACE), aligned for cmsghdr; CMSG_FIRSTHDR returns its start, CMSG_DATA the
        // data inside it, and exactly `fd_bytes` bytes are copied there.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&hdr);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), fd_bytes);
        }
    }
    loop {
        // SAFETY: `hdr` points at the live iovec and control buffer set up above.
        let n = unsafe { libc::sendmsg(fd, &hdr, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EPIPE) | Some(libc::ECONNRESET) => return Err(HandoverError::Closed),
            _ => return Err(HandoverError::Io(e)),
        }
    }
}

/// Receives one packet (up to `timeout`): its bytes and the fds it carried.
pub fn recv_raw(fd: RawFd, timeout: Duration) -> Result<(Vec<u8>, Vec<OwnedFd>), HandoverError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = [libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }];
        let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `p` is a live array of one pollfd and its length is passed with it.
        let rc = unsafe { libc::poll(p.as_mut_ptr(), 1, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(HandoverError::Io(e));
        }
        if rc == 0 {
            return Err(HandoverError::Timeout(timeout));
        }
        break;
    }
    // One byte more than a frame may hold, to tell a frame that is too long.
    let mut body = vec![0u8; MAX_FRAME + 1];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) };
    let mut control = vec![0u64; (space as usize).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: body.as_mut_ptr().cast(),
        iov_len: body.len(),
    };
    // SAFETY: msghdr is plain data; all zeroes is a valid value.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = (control.len() * 8) as _;
    let n = loop {
        // SAFETY: `hdr` points at the live body and control buffers of the lengths it gives.
        let n = unsafe { libc::recvmsg(fd, &mut hdr, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ECONNRESET) => return Err(HandoverError::Closed),
            _ => return Err(HandoverError::Io(e)),
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to msg_controllen with well-formed cmsghdrs;
    // CMSG_FIRSTHDR/CMSG_NXTHDR walk them within that length, and an SCM_RIGHTS header's data
    // holds (cmsg_len - CMSG_LEN(0)) / 4 fds, each new in this process and owned by nobody.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&hdr, c);
        }
    }
    if hdr.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 || n > MAX_FRAME {
        return Err(HandoverError::Bad(format!(
            "a message longer than {MAX_FRAME} bytes or with too many fds"
        )));
    }
    if n == 0 {
        return Err(HandoverError::Closed);
    }
    body.truncate(n);
    Ok((body, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    const T: Duration = Duration::from_secs(2);

    #[test]
    fn messages_are_the_bytes_docs_format_md_shows() {
        let hello = Message::Hello {
            format: 1,
            pid: 42,
            version: "0.1.0".into(),
        };
        assert_eq!(
            serde_json::to_string(&hello).expect("json"),
            r#"{"type":"hello","format":1,"pid":42,"version":"0.1.0"}"#
        );
        let s = Message::Sockets {
            sockets: vec![SocketInfo {
                role: Role::Disk,
                name: "vm1".into(),
                path: "/run/vm1.sock".into(),
            }],
        };
        assert_eq!(
            serde_json::to_string(&s).expect("json"),
            r#"{"type":"sockets","sockets":[{"role":"disk","name":"vm1","path":"/run/vm1.sock"}]}"#
        );
        assert_eq!(
            serde_json::to_string(&Message::Ready).expect("json"),
            r#"{"type":"ready"}"#
        );
        assert_eq!(
            serde_json::to_string(&Message::Commit).expect("json"),
            r#"{"type":"commit"}"#
        );
    }

    #[test]
    fn a_listening_socket_crosses_the_channel_and_still_accepts() {
        let (old, new) = Channel::pair().expect("pair");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let info = SocketInfo {
            role: Role::Disk,
            name: "d".into(),
            path: path.display().to_string(),
        };
        old.send(
            &Message::Sockets {
                sockets: vec![info.clone()],
            },
            &[listener.as_raw_fd()],
        )
        .expect("send");
        drop(listener);
        let (msg, fds) = new.recv(T).expect("recv");
        assert_eq!(
            msg,
            Message::Sockets {
                sockets: vec![info]
            }
        );
        assert_eq!(fds.len(), 1);
        let got = UnixListener::from(fds.into_iter().next().expect("fd"));
        let _c = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        got.accept().expect("the handed-over socket accepts");
        assert_eq!(new.peer_pid().expect("peer"), std::process::id());
    }

    #[test]
    fn bad_messages_are_refused() {
        let (old, new) = Channel::pair().expect("pair");
        let refused = |body: &[u8], fds: &[RawFd]| {
            send_raw(old.raw_fd(), body, fds).expect("send");
            match new.recv(T) {
                Err(HandoverError::Bad(m)) => m,
                other => panic!("{:?} accepted: {other:?}", String::from_utf8_lossy(body)),
            }
        };
        refused(b"not json", &[]);
        refused(br#"{"type":"upgrade-me"}"#, &[]);
        refused(br#"{"type":"hello","format":1}"#, &[]);
        refused(
            br#"{"type":"hello","format":1,"pid":1,"version":"x","extra":1}"#,
            &[],
        );
        refused(br#"{"type":"ready"} trailing"#, &[]);
        // fds where none belong, and too few for the sockets named.
        let f = tempfile::tempfile().expect("file");
        refused(br#"{"type":"ready"}"#, &[f.as_raw_fd()]);
        refused(
            br#"{"type":"sockets","sockets":[{"role":"control","name":"","path":""}]}"#,
            &[],
        );
        // A message longer than a frame.
        let long = vec![b' '; MAX_FRAME + 10];
        assert!(send_raw(old.raw_fd(), &long, &[]).is_err());
        // SAFETY: sending a too-long packet straight with send(2), to test the receiver.
        let n = unsafe {
            libc::send(
                old.raw_fd(),
                long.as_ptr().cast(),
                long.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        assert_eq!(n as usize, long.len());
        assert!(matches!(new.recv(T), Err(HandoverError::Bad(_))));
        // Silence, then a closed channel.
        assert!(matches!(
            new.recv(Duration::from_millis(50)),
            Err(HandoverError::Timeout(_))
        ));
        drop(old);
        assert!(matches!(new.recv(T), Err(HandoverError::Closed)));
    }
}
