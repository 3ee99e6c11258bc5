//! Connected Unix sockets. The kernel tells a Unix socket's peer only through sock_diag
//! (netlink, UNIX_DIAG_PEER); the bytes waiting on a socket are read without consuming them
//! through a copy of a holder's descriptor (pidfd_getfd) with MSG_PEEK from SO_PEEK_OFF 0.

use crate::sys;
use alloc::vec::Vec;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const UDIAG_SHOW_PEER: u32 = 4;
const UNIX_DIAG_PEER: u16 = 2;

/// A Unix socket as sock_diag reports it.
#[derive(Clone, Copy, Debug)]
pub struct UnixSock {
    pub ino: u64,
    pub sock_type: i32,
    pub peer: u64,
}

/// Every Unix socket of this network namespace with its peer.
pub fn all() -> Result<Vec<UnixSock>, sys::Errno> {
    let fd = sys::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG)?;
    let mut req = [0u8; 16 + 24];
    let total = req.len() as u32;
    req[0..4].copy_from_slice(&total.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req[16] = libc::AF_UNIX as u8;
    req[20..24].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req[28..32].copy_from_slice(&UDIAG_SHOW_PEER.to_ne_bytes());
    let sent = sys::send(fd, &req, 0);
    let mut out = Vec::new();
    let mut buf = alloc::vec![0u8; 65536];
    let result = sent.and_then(|_| loop {
        let n = sys::recv(fd, &mut buf, 0)?;
        let mut off = 0;
        let mut done = false;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or([0; 4])) as usize;
            let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            if len < 16 || off + len > n {
                break;
            }
            if kind == libc::NLMSG_DONE as u16 || kind == libc::NLMSG_ERROR as u16 {
                done = true;
                break;
            }
            let msg = &buf[off + 16..off + len];
            if msg.len() >= 16 {
                let sock_type = msg[1] as i32;
                let ino = u32::from_ne_bytes(msg[4..8].try_into().unwrap_or([0; 4])) as u64;
                let mut peer = 0u64;
                let mut a = 16;
                while a + 4 <= msg.len() {
                    let alen = u16::from_ne_bytes([msg[a], msg[a + 1]]) as usize;
                    let atype = u16::from_ne_bytes([msg[a + 2], msg[a + 3]]);
                    if alen < 4 || a + alen > msg.len() {
                        break;
                    }
                    if atype == UNIX_DIAG_PEER && alen >= 8 {
                        peer = u32::from_ne_bytes(msg[a + 4..a + 8].try_into().unwrap_or([0; 4])) as u64;
                    }
                    a += (alen + 3) & !3;
                }
                out.push(UnixSock { ino, sock_type, peer });
            }
            off += (len + 3) & !3;
        }
        if done {
            break Ok(());
        }
    });
    let _ = sys::close(fd);
    result.map(|_| out)
}

/// The bytes waiting to be read on descriptor `fd` of process `real` (stream sockets), without
/// consuming them; SO_PEEK_OFF is put back as it was.
pub fn queued(real: i32, fd: i32) -> Vec<u8> {
    let mut out = Vec::new();
    let Ok(pidfd) = sys::pidfd_open(real) else { return out };
    let Ok(copy) = sys::pidfd_getfd(pidfd, fd) else {
        let _ = sys::close(pidfd);
        return out;
    };
    let old = sys::getsockopt_int(copy, libc::SOL_SOCKET, libc::SO_PEEK_OFF).unwrap_or(-1);
    if sys::setsockopt_int(copy, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).is_ok() {
        let mut buf = alloc::vec![0u8; 65536];
        while out.len() < 64 << 20 {
            match sys::recv(copy, &mut buf, libc::MSG_PEEK | libc::MSG_DONTWAIT) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        let _ = sys::setsockopt_int(copy, libc::SOL_SOCKET, libc::SO_PEEK_OFF, old);
    }
    let _ = sys::close(copy);
    let _ = sys::close(pidfd);
    out
}
