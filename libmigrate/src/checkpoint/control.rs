//! The control channel: an abstract Unix socket "migrate/ctl/<real pid>" that migrate-checkpoint
//! talks to, and an eventfd the checkpoint signal's handler writes to. Only the process's owner
//! (or root) is served: the peer's credentials are checked on every connection.

use super::{clear_transient, set_transient, Request};
use crate::state::{self, CONTROL_FD, OWN_FD_BASE, WAKE_FD};
use crate::sys;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::Ordering;

/// Moves `fd` to libmigrate's range of descriptor numbers.
fn move_high(fd: i32, slot: i32) -> sys::SysResult<i32> {
    let high = sys::dup3(fd, OWN_FD_BASE + slot, libc::O_CLOEXEC)?;
    let _ = sys::close(fd);
    Ok(high)
}

pub fn socket_name(pid: i32) -> crate::log::StackBuf<64> {
    let mut name = crate::log::StackBuf::<64>::new();
    let _ = write!(name, "migrate/ctl/{pid}");
    name
}

/// Creates the listening socket and the wake eventfd (at start, after fork, after restore).
pub fn open_channel() -> sys::SysResult<()> {
    for fd in [CONTROL_FD.swap(-1, Ordering::AcqRel), WAKE_FD.swap(-1, Ordering::AcqRel)] {
        if fd >= 0 {
            let _ = sys::close(fd);
        }
    }
    let sock = sys::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)?;
    // SAFETY: sockaddr_un is plain bytes.
    let mut addr: libc::sockaddr_un = unsafe { core::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    let name = socket_name(sys::getpid());
    for (i, &b) in name.as_bytes().iter().enumerate() {
        addr.sun_path[i + 1] = b as libc::c_char;
    }
    let len = (core::mem::size_of::<libc::sa_family_t>() + 1 + name.as_bytes().len()) as u32;
    if let Err(e) = sys::bind(sock, &addr, len).and_then(|_| sys::listen(sock, 8)) {
        let _ = sys::close(sock);
        return Err(e);
    }
    let sock = move_high(sock, 0)?;
    CONTROL_FD.store(sock, Ordering::Release);
    let wake = sys::eventfd(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?;
    let wake = move_high(wake, 1)?;
    WAKE_FD.store(wake, Ordering::Release);
    Ok(())
}

fn parse_request(line: &[u8]) -> Option<Request> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let rest = line.strip_prefix(b"checkpoint ")?;
    let mut req = Request { kill: false, with_binaries: false, dir: None };
    let (head, dir) = match rest.windows(4).position(|w| w == b"dir=") {
        Some(p) => (&rest[..p], Some(&rest[p + 4..])),
        None => (rest, None),
    };
    for word in head.split(|&c| c == b' ') {
        match word {
            b"kill=1" => req.kill = true,
            b"bins=1" => req.with_binaries = true,
            b"kill=0" | b"bins=0" | b"" => {}
            _ => return None,
        }
    }
    req.dir = dir.filter(|d| !d.is_empty()).map(|d| d.to_vec());
    Some(req)
}

/// Waits for the next checkpoint request. Returns it with the connection to answer on (-1 when
/// it came from the checkpoint signal).
pub fn next_request() -> (Request, i32) {
    loop {
        let ctl = CONTROL_FD.load(Ordering::Acquire);
        let wake = WAKE_FD.load(Ordering::Acquire);
        let mut fds = [
            libc::pollfd { fd: ctl, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake, events: libc::POLLIN, revents: 0 },
        ];
        match sys::poll(&mut fds, -1) {
            Ok(_) => {}
            Err(_) => continue,
        }
        if fds[1].revents & libc::POLLIN != 0 {
            let mut b = [0u8; 8];
            let _ = sys::read(wake, &mut b);
            return (Request { kill: false, with_binaries: false, dir: None }, -1);
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        let Ok(conn) = sys::accept4(ctl, libc::SOCK_CLOEXEC) else {
            continue;
        };
        set_transient(0, conn);
        let me = sys::getuid();
        match sys::peer_uid(conn) {
            Ok(uid) if uid == me || uid == 0 => {}
            Ok(uid) => {
                crate::info!(
                    "refused a checkpoint request from uid {uid}: only the owner (uid {me}) or root may checkpoint"
                );
                reply(conn, b"error permission denied: only the process owner or root may checkpoint it\n");
                continue;
            }
            Err(_) => {
                reply(conn, b"error cannot identify the requesting user\n");
                continue;
            }
        }
        sys::set_rcv_timeout(conn, 5);
        let mut line: Vec<u8> = Vec::with_capacity(256);
        let mut buf = [0u8; 512];
        while !line.contains(&b'\n') && line.len() < 8192 {
            match sys::read(conn, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => line.extend_from_slice(&buf[..n]),
            }
        }
        match parse_request(&line) {
            Some(req) => return (req, conn),
            None => reply(conn, b"error malformed request (expected `checkpoint kill=<0|1> bins=<0|1> dir=<path>`)\n"),
        }
    }
}

/// Answers on a connection and closes it.
pub fn reply(conn: i32, line: &[u8]) {
    if conn >= 0 {
        let _ = sys::write_all(conn, line);
        let _ = sys::close(conn);
        clear_transient(0);
    }
}

pub fn own_fds_ok() -> bool {
    state::CONTROL_FD.load(Ordering::Relaxed) >= 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        let r = parse_request(b"checkpoint kill=1 bins=1 dir=/tmp/a b\n").unwrap();
        assert!(r.kill && r.with_binaries);
        assert_eq!(r.dir.as_deref(), Some(&b"/tmp/a b"[..]));
        let r = parse_request(b"checkpoint kill=0 dir=\n").unwrap();
        assert!(!r.kill && r.dir.is_none());
        assert!(parse_request(b"hello\n").is_none());
    }
}
