//! Sockets that several processes of a tree share (a pre-forking server's listener): created
//! here once — bound again at their address, with their options, listening — and handed down.
//! A shared established TCP connection is rebuilt with TCP repair, or comes back reset.

use crate::exit::{fail, TARGET};
use anyhow::Result;
use migrate_image::FdKind;

/// Creates the socket `kind` describes (an `FdKind::Socket`).
pub fn create(kind: &FdKind) -> Result<i32> {
    let FdKind::Socket { domain, sock_type, protocol, flags, listening, backlog, local, peer, options, tcp, .. } = kind
    else {
        return Err(fail(TARGET, "a shared socket without a description"));
    };
    let where_ = super::inspect::sockaddr_text(local);
    let is_tcp = matches!(*domain, libc::AF_INET | libc::AF_INET6) && *sock_type == libc::SOCK_STREAM;
    if let (true, false, Some(peer)) = (is_tcp, *listening, peer) {
        let what = format!("the connection from {where_} to {}", super::inspect::sockaddr_text(peer));
        let reset = std::env::var_os("MIGRATE_TCP_RESET").is_some_and(|v| v == "1");
        let (fd, why) = migrate_tcprepair::rebuild_or_reset(*domain, local, peer, options, tcp.as_ref(), reset)
            .map_err(|e| fail(TARGET, format!("cannot recreate {what}: {e}")))?;
        if let Some(why) = why {
            crate::exit::warn(
                "resume",
                &format!("{what} was reset ({why}): the program sees ECONNRESET and can reconnect"),
            );
        }
        // SAFETY: our own descriptor.
        unsafe { libc::fcntl(fd, libc::F_SETFL, (*flags as i32) & libc::O_NONBLOCK) };
        return Ok(fd);
    }
    // SAFETY: plain socket calls on a descriptor we own, with the saved address bytes.
    unsafe {
        let fd = libc::socket(*domain, *sock_type | libc::SOCK_CLOEXEC, *protocol);
        if fd < 0 {
            return Err(fail(
                TARGET,
                format!("cannot create a socket for {where_}: {}", std::io::Error::last_os_error()),
            ));
        }
        for &(level, name, v) in options {
            libc::setsockopt(fd, level, name, &v as *const i32 as *const libc::c_void, 4);
        }
        let one: i32 = 1;
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one as *const i32 as *const libc::c_void, 4);
        if local.len() > 2 && libc::bind(fd, local.as_ptr() as *const libc::sockaddr, local.len() as u32) < 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(fail(TARGET, format!("cannot bind {where_}: {e}; stop what holds it, or resume elsewhere")));
        }
        let reuse = options.iter().find(|o| o.0 == libc::SOL_SOCKET && o.1 == libc::SO_REUSEADDR).map_or(0, |o| o.2);
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &reuse as *const i32 as *const libc::c_void, 4);
        if *listening && libc::listen(fd, *backlog) < 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(fail(TARGET, format!("cannot listen on {where_}: {e}")));
        }
        if !*listening {
            if let Some(p) = peer {
                libc::connect(fd, p.as_ptr() as *const libc::sockaddr, p.len() as u32);
            }
        }
        libc::fcntl(fd, libc::F_SETFL, (*flags as i32) & libc::O_NONBLOCK);
        Ok(fd)
    }
}
