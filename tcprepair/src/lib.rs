//! TCP repair (Linux `TCP_REPAIR`, needs CAP_NET_ADMIN): reading an established connection's
//! state and rebuilding it on a new socket so the peer notices nothing; where that cannot be
//! done, a socket that reports ECONNRESET on its next use.
//!
//! The order of the rebuild is the one the kernel accepts (verified on the target kernels):
//! repair on; both queue sequence numbers; bind and connect (no handshake in repair mode);
//! timestamp; negotiated options; the receive queue, then the sent-but-unacknowledged part of
//! the send queue; the window (only once rcv_nxt is final); repair off; the unsent part is
//! sent normally.
//!
//! Used inside a frozen or half-restored program (libmigrate) as well as by migrate-resume:
//! only libc's thin system-call wrappers (async-signal-safe) and the caller's allocator, no
//! stdio, no locks.

#![no_std]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use migrate_image::TcpConnection;

const REPAIR_ON: i32 = 1;
const REPAIR_OFF: i32 = 0;
/// Off without the window probe: for a connection that simply goes on after being read.
const REPAIR_OFF_NO_PROBE: i32 = -1;
const NO_QUEUE: i32 = 0;
const RECV_QUEUE: i32 = 1;
const SEND_QUEUE: i32 = 2;
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
pub const TCPI_OPT_SACK: u8 = 2;
pub const TCPI_OPT_WSCALE: u8 = 4;
const SIOCINQ: u64 = libc::FIONREAD;
const SIOCOUTQ: u64 = libc::TIOCOUTQ;
const SIOCOUTQNSD: u64 = 0x894b;
const TCP_ESTABLISHED: u8 = 1;

/// A failed step and the kernel's error number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Error {
    pub step: &'static str,
    pub errno: i32,
}

impl Error {
    /// The kernel refused TCP repair itself (no CAP_NET_ADMIN in the network namespace).
    pub fn not_permitted(&self) -> bool {
        self.errno == libc::EPERM
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.errno {
            libc::EPERM => "operation not permitted (TCP repair needs CAP_NET_ADMIN)",
            libc::EADDRINUSE => "address in use",
            libc::EADDRNOTAVAIL => "address not available (is the connection still open on this host?)",
            libc::EINVAL => "invalid argument",
            libc::ENOMEM => "out of socket memory",
            libc::ENOPROTOOPT => "the kernel lacks TCP repair",
            libc::EAGAIN => "would block",
            _ => "",
        };
        if name.is_empty() {
            write!(f, "{}: error {}", self.step, self.errno)
        } else {
            write!(f, "{}: {name}", self.step)
        }
    }
}

type Result<T> = core::result::Result<T, Error>;

fn errno() -> i32 {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

fn check(step: &'static str, r: isize) -> Result<usize> {
    if r < 0 {
        Err(Error { step, errno: errno() })
    } else {
        Ok(r as usize)
    }
}

fn set_raw<T>(fd: i32, level: i32, name: i32, v: &T, step: &'static str) -> Result<()> {
    // SAFETY: `v` points to a live value of its own size.
    let r = unsafe {
        libc::setsockopt(fd, level, name, v as *const T as *const libc::c_void, core::mem::size_of::<T>() as u32)
    };
    check(step, r as isize).map(|_| ())
}

fn set_int(fd: i32, name: i32, v: i32, step: &'static str) -> Result<()> {
    set_raw(fd, libc::IPPROTO_TCP, name, &v, step)
}

fn get_raw<T: Copy>(fd: i32, name: i32, mut v: T, step: &'static str) -> Result<T> {
    let mut len = core::mem::size_of::<T>() as u32;
    // SAFETY: `v` is a live value and `len` its size; the kernel writes at most `len` bytes.
    let r = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, name, &mut v as *mut T as *mut libc::c_void, &mut len) };
    check(step, r as isize).map(|_| v)
}

fn ioctl_int(fd: i32, request: u64, step: &'static str) -> Result<i32> {
    let mut v: i32 = 0;
    // SAFETY: the socket queue ioctls write one int.
    let r = unsafe { libc::ioctl(fd, request, &mut v as *mut i32) };
    check(step, r as isize).map(|_| v)
}

fn tcp_info(fd: i32) -> Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain data; all-zero is a valid value.
    let zero: libc::tcp_info = unsafe { core::mem::zeroed() };
    get_raw(fd, libc::TCP_INFO, zero, "TCP_INFO")
}

/// Whether `fd` is a TCP socket in the ESTABLISHED state.
pub fn is_established(fd: i32) -> bool {
    tcp_info(fd).is_ok_and(|i| i.tcpi_state == TCP_ESTABLISHED)
}

/// Copies `len` bytes of the selected queue without consuming them (repair mode).
fn peek(fd: i32, len: usize, step: &'static str) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    if len == 0 {
        return Ok(buf);
    }
    // SAFETY: a buffer of `len` bytes.
    let r = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, len, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    let n = check(step, r)?;
    if n != len {
        return Err(Error { step, errno: libc::EAGAIN });
    }
    Ok(buf)
}

/// Reads the state of established connection `fd` with TCP repair. The connection is left as
/// it was (repair off, without a window probe): the program goes on using it.
pub fn dump(fd: i32) -> Result<TcpConnection> {
    set_int(fd, libc::TCP_REPAIR, REPAIR_ON, "TCP_REPAIR")?;
    let result = read_state(fd);
    let _ = set_int(fd, libc::TCP_REPAIR_QUEUE, NO_QUEUE, "TCP_REPAIR_QUEUE");
    let _ = set_int(fd, libc::TCP_REPAIR, REPAIR_OFF_NO_PROBE, "TCP_REPAIR");
    result
}

fn read_state(fd: i32) -> Result<TcpConnection> {
    let info = tcp_info(fd)?;
    if info.tcpi_state != TCP_ESTABLISHED {
        return Err(Error { step: "the connection is not established", errno: libc::EINVAL });
    }
    let inq = ioctl_int(fd, SIOCINQ, "SIOCINQ")? as usize;
    let outq = ioctl_int(fd, SIOCOUTQ, "SIOCOUTQ")? as usize;
    let unsent = ioctl_int(fd, SIOCOUTQNSD, "SIOCOUTQNSD")? as u32;
    set_int(fd, libc::TCP_REPAIR_QUEUE, RECV_QUEUE, "TCP_REPAIR_QUEUE")?;
    let recv_seq = get_raw(fd, libc::TCP_QUEUE_SEQ, 0u32, "TCP_QUEUE_SEQ")?;
    let recv_queue = peek(fd, inq, "reading the receive queue")?;
    set_int(fd, libc::TCP_REPAIR_QUEUE, SEND_QUEUE, "TCP_REPAIR_QUEUE")?;
    let send_seq = get_raw(fd, libc::TCP_QUEUE_SEQ, 0u32, "TCP_QUEUE_SEQ")?;
    let send_queue = peek(fd, outq, "reading the send queue")?;
    let mss = get_raw(fd, libc::TCP_MAXSEG, 0u32, "TCP_MAXSEG")?;
    let timestamp = get_raw(fd, libc::TCP_TIMESTAMP, 0u32, "TCP_TIMESTAMP")?;
    let window = get_raw(fd, libc::TCP_REPAIR_WINDOW, [0u32; 5], "TCP_REPAIR_WINDOW")?;
    Ok(TcpConnection {
        send_seq,
        recv_seq,
        send_queue,
        unsent: unsent.min(outq as u32),
        recv_queue,
        mss,
        snd_wscale: info.tcpi_snd_rcv_wscale & 0xf,
        rcv_wscale: info.tcpi_snd_rcv_wscale >> 4,
        options: info.tcpi_options,
        timestamp,
        window,
    })
}

/// Puts connection `fd` into repair mode so that closing it (the process exits after a
/// checkpoint with --kill) sends neither FIN nor RST: the peer keeps waiting for the resume.
pub fn silence(fd: i32) -> Result<()> {
    set_int(fd, libc::TCP_REPAIR, REPAIR_ON, "TCP_REPAIR")
}

/// Writes `data` into the selected queue in repair mode, in chunks the socket's memory
/// accounting accepts.
fn refill(fd: i32, mut data: &[u8], step: &'static str) -> Result<()> {
    let mut chunk = data.len().max(1);
    while !data.is_empty() {
        let n = chunk.min(data.len());
        // SAFETY: `n` bytes of `data`.
        let r = unsafe { libc::send(fd, data.as_ptr() as *const libc::c_void, n, libc::MSG_DONTWAIT) };
        if r < 0 {
            let e = errno();
            if (e == libc::ENOMEM || e == libc::EAGAIN) && chunk > 4096 {
                chunk /= 2;
                continue;
            }
            return Err(Error { step, errno: e });
        }
        data = &data[r as usize..];
    }
    Ok(())
}

fn addr_call(
    f: unsafe extern "C" fn(i32, *const libc::sockaddr, u32) -> i32,
    fd: i32,
    addr: &[u8],
    step: &'static str,
) -> Result<()> {
    // SAFETY: the saved sockaddr bytes and their length.
    let r = unsafe { f(fd, addr.as_ptr() as *const libc::sockaddr, addr.len() as u32) };
    check(step, r as isize).map(|_| ())
}

/// Rebuilds connection `c` from `local` to `peer` (raw sockaddr bytes) on a new socket with
/// the integer `options` (level, name, value); returns its descriptor (close-on-exec).
pub fn restore(domain: i32, local: &[u8], peer: &[u8], options: &[(i32, i32, i32)], c: &TcpConnection) -> Result<i32> {
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, libc::IPPROTO_TCP) };
    let fd = check("socket", fd as isize)? as i32;
    match rebuild(fd, local, peer, options, c) {
        Ok(()) => Ok(fd),
        Err(e) => {
            // Still in repair mode if it failed there: closing sends nothing to the peer.
            // SAFETY: our own descriptor.
            unsafe { libc::close(fd) };
            Err(e)
        }
    }
}

fn rebuild(fd: i32, local: &[u8], peer: &[u8], options: &[(i32, i32, i32)], c: &TcpConnection) -> Result<()> {
    // Options first: repair mode's forced address reuse must not be undone by SO_REUSEADDR,
    // and the buffer sizes must be in place before the queues are refilled.
    for &(level, name, v) in options {
        let _ = set_raw(fd, level, name, &v, "setsockopt");
    }
    set_int(fd, libc::TCP_REPAIR, REPAIR_ON, "TCP_REPAIR")?;
    set_int(fd, libc::TCP_REPAIR_QUEUE, RECV_QUEUE, "TCP_REPAIR_QUEUE")?;
    set_raw(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_QUEUE_SEQ,
        &c.recv_seq.wrapping_sub(c.recv_queue.len() as u32),
        "TCP_QUEUE_SEQ",
    )?;
    set_int(fd, libc::TCP_REPAIR_QUEUE, SEND_QUEUE, "TCP_REPAIR_QUEUE")?;
    set_raw(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_QUEUE_SEQ,
        &c.send_seq.wrapping_sub(c.send_queue.len() as u32),
        "TCP_QUEUE_SEQ",
    )?;
    addr_call(libc::bind, fd, local, "bind")?;
    addr_call(libc::connect, fd, peer, "connect")?;
    if c.options & TCPI_OPT_TIMESTAMPS != 0 {
        set_raw(fd, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP, &c.timestamp, "TCP_TIMESTAMP")?;
    }
    let mut opts: Vec<[u32; 2]> = vec![[TCPOPT_MAXSEG, c.mss]];
    if c.options & TCPI_OPT_WSCALE != 0 {
        opts.push([TCPOPT_WINDOW, c.snd_wscale as u32 | (c.rcv_wscale as u32) << 16]);
    }
    if c.options & TCPI_OPT_SACK != 0 {
        opts.push([TCPOPT_SACK_PERM, 0]);
    }
    if c.options & TCPI_OPT_TIMESTAMPS != 0 {
        opts.push([TCPOPT_TIMESTAMP, 0]);
    }
    // SAFETY: an array of struct tcp_repair_opt (two u32 each) and its byte length.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_OPTIONS,
            opts.as_ptr() as *const libc::c_void,
            core::mem::size_of_val(opts.as_slice()) as u32,
        )
    };
    check("TCP_REPAIR_OPTIONS", r as isize)?;
    set_int(fd, libc::TCP_REPAIR_QUEUE, RECV_QUEUE, "TCP_REPAIR_QUEUE")?;
    refill(fd, &c.recv_queue, "refilling the receive queue")?;
    let unsent = (c.unsent as usize).min(c.send_queue.len());
    let (sent, not_sent) = c.send_queue.split_at(c.send_queue.len() - unsent);
    set_int(fd, libc::TCP_REPAIR_QUEUE, SEND_QUEUE, "TCP_REPAIR_QUEUE")?;
    refill(fd, sent, "refilling the send queue")?;
    set_int(fd, libc::TCP_REPAIR_QUEUE, NO_QUEUE, "TCP_REPAIR_QUEUE")?;
    // Only valid once rcv_nxt is final; an older kernel without it keeps the default window.
    let _ = set_raw(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW, &c.window, "TCP_REPAIR_WINDOW");
    set_int(fd, libc::TCP_REPAIR, REPAIR_OFF, "TCP_REPAIR")?;
    // What the program had written but the kernel had not sent yet goes out normally.
    let mut rest = not_sent;
    while !rest.is_empty() {
        // SAFETY: the remaining unsent bytes.
        let r = unsafe { libc::send(fd, rest.as_ptr() as *const libc::c_void, rest.len(), libc::MSG_DONTWAIT) };
        rest = &rest[check("sending the unsent data", r)?..];
    }
    Ok(())
}

/// Why a connection came back reset instead of rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// The resume asked for it (migrate-resume --tcp-reset).
    Asked,
    /// The image holds no repair state (no CAP_NET_ADMIN at checkpoint).
    NotSaved,
    /// The rebuild failed.
    Failed(Error),
}

impl fmt::Display for ResetReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResetReason::Asked => write!(f, "migrate-resume --tcp-reset"),
            ResetReason::NotSaved => {
                write!(f, "its state was not saved (TCP repair needs CAP_NET_ADMIN at checkpoint)")
            }
            ResetReason::Failed(e) => write!(f, "it could not be rebuilt with TCP repair: {e}"),
        }
    }
}

/// An established connection as it comes back: rebuilt from `tcp`, or — without it, when the
/// rebuild fails, or when `reset` asks — a socket that reports ECONNRESET, with the reason.
/// Never a descriptor that talks to something else.
pub fn rebuild_or_reset(
    domain: i32,
    local: &[u8],
    peer: &[u8],
    options: &[(i32, i32, i32)],
    tcp: Option<&TcpConnection>,
    reset: bool,
) -> Result<(i32, Option<ResetReason>)> {
    let why = match tcp {
        _ if reset => ResetReason::Asked,
        None => ResetReason::NotSaved,
        Some(c) => match restore(domain, local, peer, options, c) {
            Ok(fd) => return Ok((fd, None)),
            Err(e) => ResetReason::Failed(e),
        },
    };
    reset_socket(domain).map(|fd| (fd, Some(why)))
}

fn loopback(domain: i32) -> Vec<u8> {
    if domain == libc::AF_INET6 {
        let mut a = vec![0u8; 28];
        a[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        a[23] = 1; // ::1
        a
    } else {
        let mut a = vec![0u8; 16];
        a[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        a[4..8].copy_from_slice(&[127, 0, 0, 1]);
        a
    }
}

/// A TCP socket that reports ECONNRESET on its next use: connected over loopback to a
/// listener of ours whose accepted end is closed with a zero linger (RST). For a connection
/// that cannot be carried: the program sees the peer reset and reconnects, instead of talking
/// to something else.
pub fn reset_socket(domain: i32) -> Result<i32> {
    // SAFETY: plain socket creation.
    let l =
        check("socket", unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) } as isize)? as i32;
    let result = reset_via(l, domain);
    // SAFETY: our own descriptor.
    unsafe { libc::close(l) };
    result
}

fn reset_via(l: i32, domain: i32) -> Result<i32> {
    addr_call(libc::bind, l, &loopback(domain), "bind")?;
    // SAFETY: our own socket.
    check("listen", unsafe { libc::listen(l, 1) } as isize)?;
    let mut addr = [0u8; 128];
    let mut len = addr.len() as u32;
    // SAFETY: a 128-byte buffer, larger than any sockaddr.
    check("getsockname", unsafe { libc::getsockname(l, addr.as_mut_ptr() as *mut libc::sockaddr, &mut len) } as isize)?;
    // SAFETY: plain socket creation.
    let c =
        check("socket", unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) } as isize)? as i32;
    if let Err(e) = addr_call(libc::connect, c, &addr[..len as usize], "connect") {
        // SAFETY: our own descriptor.
        unsafe { libc::close(c) };
        return Err(e);
    }
    // SAFETY: accepting on our own listener, no address wanted.
    let a = unsafe { libc::accept4(l, core::ptr::null_mut(), core::ptr::null_mut(), libc::SOCK_CLOEXEC) };
    if a < 0 {
        let e = Error { step: "accept", errno: errno() };
        // SAFETY: our own descriptor.
        unsafe { libc::close(c) };
        return Err(e);
    }
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    let _ = set_raw(a, libc::SOL_SOCKET, libc::SO_LINGER, &linger, "SO_LINGER");
    // SAFETY: our own descriptor; closing it with a zero linger sends RST to `c`.
    unsafe { libc::close(a) };
    Ok(c)
}
