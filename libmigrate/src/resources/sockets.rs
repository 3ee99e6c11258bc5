//! Sockets on their own (connected pairs inside the tree are shared objects, see shared.rs).
//! Dump: domain, type, protocol, whether it listens (and its backlog, from the listen hook), its
//! local and peer addresses, and the integer options that matter to services. Restore: a
//! listening or bound socket is created and bound again at the same address with its options.
//! An established TCP connection is read with TCP repair (migrate-tcprepair, CAP_NET_ADMIN)
//! and rebuilt so the peer notices nothing; where repair is not allowed, or the image lacks
//! its state, or migrate-resume --tcp-reset asks, it comes back as a socket whose next use
//! fails with ECONNRESET — the program sees the peer reset and reconnects, instead of talking
//! to something else.

use crate::sys;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicI32, Ordering};
use migrate_image::FdKind;

/// Backlogs given to listen(), by descriptor (the kernel does not report them).
pub static BACKLOG: [AtomicI32; 4096] = [const { AtomicI32::new(0) }; 4096];

/// The options worth carrying: (level, option); SO_RCVBUF/SO_SNDBUF are halved back (the
/// kernel doubles what is set).
const OPTIONS: &[(i32, i32)] = &[
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::SOL_SOCKET, libc::SO_BROADCAST),
    (libc::SOL_SOCKET, libc::SO_OOBINLINE),
    (libc::SOL_SOCKET, libc::SO_RCVBUF),
    (libc::SOL_SOCKET, libc::SO_SNDBUF),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
    (libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT),
    (libc::IPPROTO_TCP, libc::TCP_FASTOPEN),
    (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
];

pub(crate) fn name_of(fd: i32, peer: bool) -> Option<Vec<u8>> {
    let mut buf = [0u8; 128];
    let mut len = buf.len() as u32;
    let nr = if peer { libc::SYS_getpeername } else { libc::SYS_getsockname };
    // SAFETY: a 128-byte buffer (larger than any sockaddr) and its length.
    let r =
        unsafe { sys::syscall6(nr, fd as usize, buf.as_mut_ptr() as usize, &mut len as *mut u32 as usize, 0, 0, 0) };
    (r == 0).then(|| buf[..(len as usize).min(buf.len())].to_vec())
}

/// Describes socket `fd` of this process.
pub fn dump(fd: i32, flags: u32) -> FdKind {
    let opt = |level, name| sys::getsockopt_int(fd, level, name);
    let (Ok(domain), Ok(sock_type), Ok(protocol)) = (
        opt(libc::SOL_SOCKET, libc::SO_DOMAIN),
        opt(libc::SOL_SOCKET, libc::SO_TYPE),
        opt(libc::SOL_SOCKET, libc::SO_PROTOCOL),
    ) else {
        return FdKind::Unsupported { what: format!("socket {fd} (its kind cannot be read)") };
    };
    if !matches!(domain, libc::AF_INET | libc::AF_INET6 | libc::AF_UNIX | libc::AF_NETLINK) {
        return FdKind::Unsupported { what: format!("socket of family {domain}") };
    }
    let listening = opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN).unwrap_or(0) != 0;
    let is_tcp = matches!(domain, libc::AF_INET | libc::AF_INET6) && sock_type == libc::SOCK_STREAM;
    let mut options = Vec::new();
    for &(level, name) in OPTIONS {
        if (level == libc::IPPROTO_TCP && !is_tcp) || (level == libc::IPPROTO_IPV6 && domain != libc::AF_INET6) {
            continue;
        }
        if let Ok(mut v) = opt(level, name) {
            if level == libc::SOL_SOCKET && (name == libc::SO_RCVBUF || name == libc::SO_SNDBUF) {
                v /= 2;
            }
            options.push((level, name, v));
        }
    }
    if domain == libc::AF_NETLINK {
        // Multicast groups beyond the 32 that fit in the bound address's nl_groups.
        options.extend(netlink_groups(fd).into_iter().map(|g| (libc::SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, g)));
    }
    let backlog = BACKLOG.get(fd as usize).map_or(0, |b| b.load(Ordering::Relaxed));
    // For a listener, tcpi_unacked is the accept queue's length.
    // At a checkpoint with --kill the waiting connections are taken and carried; what is left
    // (tcpi_unacked is a listener's accept queue length) is reported.
    let queued = if listening && is_tcp { super::accept_queue::take_waiting(fd) } else { Vec::new() };
    let waiting = if listening && is_tcp { sys::tcp_info(fd).map_or(0, |i| i.tcpi_unacked) } else { 0 };
    let peer = name_of(fd, true);
    let tcp = if is_tcp && !listening && peer.is_some() && migrate_tcprepair::is_established(fd) {
        match migrate_tcprepair::dump(fd) {
            Ok(c) => Some(c),
            Err(e) => {
                if !e.not_permitted() {
                    crate::info!(
                        "cannot save TCP connection on fd {fd} with TCP repair ({e}); it will come back reset"
                    );
                }
                None
            }
        }
    } else {
        None
    };
    FdKind::Socket {
        domain,
        sock_type,
        protocol,
        flags,
        listening,
        backlog: if backlog > 0 { backlog } else { libc::SOMAXCONN },
        local: name_of(fd, false).unwrap_or_default(),
        peer,
        options,
        waiting,
        tcp,
        queued,
    }
}

const NETLINK_ADD_MEMBERSHIP: i32 = 1;
const NETLINK_LIST_MEMBERSHIPS: i32 = 9;

/// The multicast groups a netlink socket joined (NETLINK_LIST_MEMBERSHIPS: a bitmap).
fn netlink_groups(fd: i32) -> Vec<i32> {
    let mut words = [0u32; 32];
    let mut len = core::mem::size_of_val(&words) as u32;
    // SAFETY: a 128-byte buffer and its length; the kernel writes at most that.
    let r = unsafe {
        sys::syscall6(
            libc::SYS_getsockopt,
            fd as usize,
            libc::SOL_NETLINK as usize,
            NETLINK_LIST_MEMBERSHIPS as usize,
            words.as_mut_ptr() as usize,
            &mut len as *mut u32 as usize,
            0,
        )
    };
    if r < 0 {
        return Vec::new();
    }
    let n = (len as usize / 4).min(words.len());
    (0..n * 32).filter(|&g| words[g / 32] & (1 << (g % 32)) != 0).map(|g| g as i32 + 1).collect()
}

/// A readable address for messages.
pub fn describe(addr: &[u8]) -> String {
    if addr.len() < 2 {
        return "an unnamed socket".into();
    }
    let family = u16::from_ne_bytes([addr[0], addr[1]]) as i32;
    match family {
        libc::AF_INET if addr.len() >= 8 => {
            let port = u16::from_be_bytes([addr[2], addr[3]]);
            format!("{}.{}.{}.{}:{port}", addr[4], addr[5], addr[6], addr[7])
        }
        libc::AF_INET6 if addr.len() >= 24 => {
            let port = u16::from_be_bytes([addr[2], addr[3]]);
            let words: Vec<String> =
                addr[8..24].chunks(2).map(|w| format!("{:x}", u16::from_be_bytes([w[0], w[1]]))).collect();
            format!("[{}]:{port}", words.join(":"))
        }
        libc::AF_NETLINK if addr.len() >= 12 => {
            let groups = u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]);
            format!("netlink (groups {groups:#x})")
        }
        libc::AF_UNIX => {
            let path = &addr[2..];
            if path.first() == Some(&0) {
                format!("@{}", String::from_utf8_lossy(&path[1..]))
            } else {
                String::from_utf8_lossy(path.split(|&c| c == 0).next().unwrap_or(&[])).into_owned()
            }
        }
        _ => format!("an address of family {family}"),
    }
}

fn bind(fd: i32, addr: &[u8]) -> sys::SysResult<()> {
    // SAFETY: the saved sockaddr bytes and their length.
    let r = unsafe { sys::syscall6(libc::SYS_bind, fd as usize, addr.as_ptr() as usize, addr.len(), 0, 0, 0) };
    if r < 0 {
        Err(sys::Errno(-r as i32))
    } else {
        Ok(())
    }
}

/// Puts every established TCP connection of this process into repair mode, so that its
/// death after a checkpoint with --kill closes them silently: no FIN, no RST, and the peers
/// wait for the resume (the network lock holds their packets meanwhile).
pub fn silence_connections() {
    let names = sys::fs::list_dir(b"/proc/self/fd").unwrap_or_default();
    for fd in names.iter().filter_map(|n| sys::fs::parse_dec(n)).map(|n| n as i32) {
        let is_tcp = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL) == Ok(libc::IPPROTO_TCP);
        if is_tcp && migrate_tcprepair::is_established(fd) {
            let _ = migrate_tcprepair::silence(fd);
        }
    }
}

/// An established connection: rebuilt with TCP repair, or reset.
fn restore_connection(
    domain: i32,
    local: &[u8],
    peer: &[u8],
    options: &[(i32, i32, i32)],
    tcp: Option<&migrate_image::TcpConnection>,
) -> Result<i32, String> {
    let what = || format!("the connection from {} to {}", describe(local), describe(peer));
    let reset = crate::env::var("MIGRATE_TCP_RESET").is_some_and(|v| v == "1");
    let (fd, why) = migrate_tcprepair::rebuild_or_reset(domain, local, peer, options, tcp, reset)
        .map_err(|e| format!("cannot build a reset connection ({e})"))?;
    match why {
        None => crate::debug!("{} continues (TCP repair)", what()),
        Some(why) => crate::info!("{} was reset ({why}): the program sees ECONNRESET and can reconnect", what()),
    }
    Ok(fd)
}

/// Recreates a socket described by `dump`.
pub fn restore(kind: &FdKind) -> Result<i32, String> {
    let FdKind::Socket { domain, sock_type, protocol, flags, listening, backlog, local, peer, options, tcp, .. } = kind
    else {
        return Err("not a socket".into());
    };
    let is_tcp = matches!(*domain, libc::AF_INET | libc::AF_INET6) && *sock_type == libc::SOCK_STREAM;
    if let (true, false, Some(peer)) = (is_tcp, *listening, peer) {
        let fd = restore_connection(*domain, local, peer, options, tcp.as_ref())?;
        let _ = sys::fcntl(fd, libc::F_SETFL, (*flags as i32 & libc::O_NONBLOCK) as usize);
        return Ok(fd);
    }
    let fd = sys::socket(*domain, *sock_type | libc::SOCK_CLOEXEC, *protocol)
        .map_err(|e| format!("cannot create a socket: {e}"))?;
    for &(level, name, v) in options {
        let _ = sys::setsockopt_int(fd, level, name, v);
    }
    if *domain == libc::AF_NETLINK {
        // Its port id was the old process's: the kernel assigns a new one. Queued messages are
        // lost, as if the socket had overrun.
        let mut addr = local.clone();
        if addr.len() >= 8 {
            addr[4..8].fill(0);
        }
        if addr.len() >= 12 {
            if let Err(e) = bind(fd, &addr) {
                let _ = sys::close(fd);
                return Err(format!("cannot bind a netlink socket: {e}"));
            }
        }
        let _ = sys::fcntl(fd, libc::F_SETFL, (*flags as i32 & libc::O_NONBLOCK) as usize);
        return Ok(fd);
    }
    let bound = local.len() > 2 && !(*domain == libc::AF_UNIX && local.len() <= 2);
    let unnamed_inet =
        matches!(*domain, libc::AF_INET | libc::AF_INET6) && local.len() >= 4 && local[2] == 0 && local[3] == 0;
    if bound && !unnamed_inet {
        if *domain == libc::AF_UNIX && local.get(2).is_some_and(|&c| c != 0) {
            // A path socket's file outlives its process: remove the stale one before binding.
            let path: Vec<u8> = local[2..].split(|&c| c == 0).next().unwrap_or(&[]).to_vec();
            if let Ok(st) = sys::stat(&sys::fs::cpath(&path)) {
                if st.st_mode & libc::S_IFMT == libc::S_IFSOCK {
                    let _ = sys::unlinkat(libc::AT_FDCWD, &sys::fs::cpath(&path));
                }
            }
        }
        // Leftover TIME_WAIT connections of the old process must not block the address.
        let reuse = options.iter().find(|o| o.1 == libc::SO_REUSEADDR && o.0 == libc::SOL_SOCKET).map_or(0, |o| o.2);
        let _ = sys::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
        if let Err(e) = bind(fd, local) {
            let _ = sys::close(fd);
            return Err(if e.0 == libc::EADDRINUSE {
                format!("{} is in use on this host; stop what holds it, or resume elsewhere", describe(local))
            } else {
                format!("cannot bind {}: {e}", describe(local))
            });
        }
        let _ = sys::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, reuse);
    }
    if *listening {
        sys::listen(fd, *backlog).map_err(|e| format!("cannot listen on {}: {e}", describe(local)))?;
    } else if let Some(peer) = peer {
        // A connected datagram socket, or a Unix stream to a server outside: connect again.
        // SAFETY: the saved peer address bytes.
        let r = unsafe { sys::syscall6(libc::SYS_connect, fd as usize, peer.as_ptr() as usize, peer.len(), 0, 0, 0) };
        if r < 0 {
            crate::info!(
                "could not reconnect to {} ({}); the socket stays unconnected",
                describe(peer),
                sys::Errno(-r as i32)
            );
        }
    }
    let _ = sys::fcntl(fd, libc::F_SETFL, (*flags as i32 & libc::O_NONBLOCK) as usize);
    Ok(fd)
}
