//! The control channel: an abstract Unix socket "migrate/ctl/<real pid>" per process, served
//! by its checkpoint thread, and an eventfd the checkpoint signal's handler writes to. Two kinds
//! of peers talk to it: migrate-checkpoint (a user request: this process coordinates the tree's
//! checkpoint) and another member's checkpoint thread coordinating one (this process is a
//! member). Only the process's owner or root is served: peer credentials are checked on every
//! connection.
//!
//! Protocol (lines; the coordinator's `write` carries the image descriptor with SCM_RIGHTS):
//! ```text
//! user → any member:      checkpoint kill=<0|1> bins=<0|1> [compress=1] [hold=1] [fork=1] [incr=1] [lock=<table>] dir=<path> [+ image fd]
//!                                                                         → [frozen <ms>] ok <image> | error <msg>
//!                         `frozen <ms>` comes as soon as the tree runs again (with fork=1, before
//!                         the image is complete; never with kill=1 or hold=1)
//!                         with hold=1 (image fd required):               → ok held <bytes>, then
//!                         commit → committed (the tree dies) | abort → aborted (it goes on)
//! coordinator → member:   freeze                                          → frozen <own fds> | error <msg>
//!                         write <proc> <pos> bins=<0|1> kill=<0|1> [compress=1] [parent=<hex path>] [+ image fd]    → written <end> <n> <vpid> <vppid> <vpgid> <vsid>\n<n bytes: postcard sections> | error <msg>
//!                         write <proc> <pos> bins=<0|1> kill=0 fork=1 [compress=1] [parent=<hex path>] [+ image fd] → forked <reserved end> | error <msg>
//!                         release                                         → released
//!                         (after `forked`: the member runs again but keeps the connection)
//!                         collect                                         → written … | error <msg>
//!                         (after `forked` and `release`; closing instead stops the writer child)
//!                         kill                                            → (the member dies)
//! ```

use super::Request;
use crate::state::{CONTROL_FD, OWN_FD_BASE, WAKE_FD};
use crate::sys;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::Ordering;

/// Moves `fd` to a fixed number in libmigrate's range.
fn move_to(fd: i32, number: i32) -> sys::SysResult<i32> {
    let high = sys::dup3(fd, number, libc::O_CLOEXEC)?;
    let _ = sys::close(fd);
    Ok(high)
}

/// Moves `fd` to the lowest free number in libmigrate's range (kept out of the program's way and
/// out of the descriptor tables that checkpoints record).
pub fn move_high(fd: i32) -> i32 {
    match sys::fcntl(fd, libc::F_DUPFD_CLOEXEC, (OWN_FD_BASE + 3) as usize) {
        Ok(high) => {
            let _ = sys::close(fd);
            let high = high as i32;
            super::set_transient_any(high);
            high
        }
        Err(_) => {
            super::set_transient_any(fd);
            fd
        }
    }
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
    let name = socket_name(sys::getpid());
    let (addr, len) = sys::abstract_addr(name.as_bytes());
    if let Err(e) = sys::bind(sock, &addr, len).and_then(|_| sys::listen(sock, 64)) {
        let _ = sys::close(sock);
        return Err(e);
    }
    let sock = move_to(sock, OWN_FD_BASE)?;
    CONTROL_FD.store(sock, Ordering::Release);
    let wake = sys::eventfd(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?;
    let wake = move_to(wake, OWN_FD_BASE + 1)?;
    WAKE_FD.store(wake, Ordering::Release);
    Ok(())
}

pub fn parse_request(line: &[u8]) -> Option<Request> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let rest = line.strip_prefix(b"checkpoint ")?;
    let mut req = Request::new();
    let (head, dir) = match rest.windows(4).position(|w| w == b"dir=") {
        Some(p) => (&rest[..p], Some(&rest[p + 4..])),
        None => (rest, None),
    };
    for word in head.split(|&c| c == b' ') {
        match word {
            b"kill=1" => req.kill = true,
            b"bins=1" => req.with_binaries = true,
            b"hold=1" => req.hold = true,
            b"compress=1" => req.compress = true,
            b"compress=0" => req.compress = false,
            b"incr=1" => req.incremental = true,
            b"fork=1" => req.fork = true,
            b"kill=0" | b"bins=0" | b"hold=0" | b"incr=0" | b"fork=0" | b"" => {}
            w if w.starts_with(b"lock=") => {
                let name = &w[5..];
                // An nftables identifier: it ends up in an `nft` command line.
                if !name.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_') {
                    return None;
                }
                req.lock = String::from_utf8_lossy(name).into_owned();
            }
            _ => return None,
        }
    }
    req.dir = dir.filter(|d| !d.is_empty()).map(|d| d.to_vec());
    Some(req)
}

/// Hex for a path inside a space-separated command.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| alloc::format!("{b:02x}")).collect()
}

pub fn unhex(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.chunks(2).map(|p| core::str::from_utf8(p).ok().and_then(|p| u8::from_str_radix(p, 16).ok())).collect()
}

/// What woke the checkpoint thread.
pub enum Incoming {
    /// A checkpoint request (from migrate-checkpoint, or the signal when `conn` is None).
    User(Request, Option<Conn>),
    /// Another member coordinates a checkpoint of the tree; its first command was `freeze`.
    Coordinator(Conn),
}

/// Waits for the next request.
pub fn next_incoming() -> Incoming {
    loop {
        let ctl = CONTROL_FD.load(Ordering::Acquire);
        let wake = WAKE_FD.load(Ordering::Acquire);
        let mut fds = [
            libc::pollfd { fd: ctl, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake, events: libc::POLLIN, revents: 0 },
        ];
        match sys::poll(&mut fds, super::periodic_wait_ms()) {
            Ok(0) => {
                let req = super::periodic_request();
                return Incoming::User(req, None);
            }
            Ok(_) => {}
            Err(_) => continue,
        }
        if fds[1].revents & libc::POLLIN != 0 {
            let mut b = [0u8; 8];
            let _ = sys::read(wake, &mut b);
            return Incoming::User(Request::new(), None);
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        let Ok(fd) = sys::accept4(ctl, libc::SOCK_CLOEXEC) else { continue };
        let mut conn = Conn::new(move_high(fd));
        let me = sys::getuid();
        match sys::peer_uid(conn.fd) {
            Ok(uid) if uid == me || uid == 0 => {}
            Ok(uid) => {
                crate::info!(
                    "refused a checkpoint request from uid {uid}: only the owner (uid {me}) or root may checkpoint"
                );
                conn.reply(b"error permission denied: only the process owner or root may checkpoint it\n");
                continue;
            }
            Err(_) => {
                conn.reply(b"error cannot identify the requesting user\n");
                continue;
            }
        }
        let line = match conn.read_line(5) {
            Ok(l) => l,
            Err(_) => {
                conn.close();
                continue;
            }
        };
        if line == b"freeze" {
            return Incoming::Coordinator(conn);
        }
        match parse_request(&line) {
            Some(mut req) => {
                req.image_fd = conn.received_fd.take();
                if req.hold && req.image_fd.is_none() {
                    conn.reply(b"error a held checkpoint needs an image descriptor sent with the request\n");
                    continue;
                }
                if req.fork && (req.kill || req.hold || req.image_fd.is_some()) {
                    conn.reply(
                        b"error a forked checkpoint leaves the program running while a file is written; \
                          it cannot be combined with kill, hold or an image descriptor\n",
                    );
                    continue;
                }
                return Incoming::User(req, Some(conn));
            }
            None => conn.reply(b"error malformed request (expected `checkpoint kill=<0|1> bins=<0|1> dir=<path>`)\n"),
        }
    }
}

/// A connection (to migrate-checkpoint, a coordinator or a member), with a read buffer.
///
/// Deliberately without `Drop`: only [`Conn::close`] closes the descriptor, so that a restored
/// process can drop the connections of the process it was taken from (freeing their buffers)
/// without closing a descriptor number that now means something else.
pub struct Conn {
    pub fd: i32,
    buf: Vec<u8>,
    /// A descriptor received with the last command.
    pub received_fd: Option<i32>,
}

impl Conn {
    pub fn new(fd: i32) -> Self {
        Conn { fd, buf: Vec::new(), received_fd: None }
    }

    /// Connects to member `pid`'s control socket.
    pub fn connect(pid: i32) -> Result<Conn, String> {
        let sock = sys::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
            .map_err(|e| format!("cannot create a socket: {e}"))?;
        let sock = move_high(sock);
        let name = socket_name(pid);
        let (addr, len) = sys::abstract_addr(name.as_bytes());
        if let Err(e) = sys::connect(sock, &addr, len) {
            let _ = sys::close(sock);
            super::clear_transient_fd(sock);
            return Err(format!("cannot reach process {pid}'s control socket: {e}"));
        }
        Ok(Conn::new(sock))
    }

    pub fn send(&self, data: &[u8]) -> Result<(), String> {
        sys::write_all(self.fd, data).map_err(|e| format!("lost the connection: {e}"))
    }

    pub fn send_with_fd(&self, data: &[u8], fd: i32) -> Result<(), String> {
        let n = sys::send_with_fd(self.fd, data, fd).map_err(|e| format!("lost the connection: {e}"))?;
        if n < data.len() {
            self.send(&data[n..])?;
        }
        Ok(())
    }

    fn fill(&mut self, timeout_s: i64) -> Result<(), String> {
        sys::set_rcv_timeout(self.fd, timeout_s);
        let mut chunk = [0u8; 4096];
        match sys::recv_with_fd(self.fd, &mut chunk) {
            Ok((0, _)) => Err("the peer closed the connection".into()),
            Ok((n, fd)) => {
                if let Some(fd) = fd {
                    self.received_fd = Some(move_high(fd));
                }
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(sys::Errno(libc::EAGAIN)) => Err(format!("no answer within {timeout_s} s")),
            Err(sys::Errno(libc::EINTR)) => Ok(()),
            Err(e) => Err(format!("lost the connection: {e}")),
        }
    }

    /// The next line, without its newline.
    pub fn read_line(&mut self, timeout_s: i64) -> Result<Vec<u8>, String> {
        loop {
            if let Some(p) = self.buf.iter().position(|&c| c == b'\n') {
                let line = self.buf[..p].to_vec();
                self.buf.drain(..=p);
                return Ok(line);
            }
            if self.buf.len() > 65536 {
                return Err("overlong line".into());
            }
            self.fill(timeout_s)?;
        }
    }

    pub fn read_exact(&mut self, n: usize, timeout_s: i64) -> Result<Vec<u8>, String> {
        while self.buf.len() < n {
            self.fill(timeout_s)?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Answers and closes (for one-shot requests).
    pub fn reply(self, line: &[u8]) {
        let _ = sys::write_all(self.fd, line);
        self.close();
    }

    pub fn close(self) {
        let _ = sys::close(self.fd);
        super::clear_transient_fd(self.fd);
        if let Some(fd) = self.received_fd {
            let _ = sys::close(fd);
            super::clear_transient_fd(fd);
        }
    }
}

/// Text of an error for a one-line reply.
pub fn error_line(msg: &str) -> Vec<u8> {
    let mut line = String::from("error ");
    line.push_str(&msg.replace('\n', " "));
    line.push('\n');
    line.into_bytes()
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
        assert!(!r.kill && r.dir.is_none() && !r.fork && !r.compress);
        let r = parse_request(b"checkpoint kill=0 bins=0 compress=1 dir=/x\n").unwrap();
        assert!(r.compress && !r.with_binaries);
        let r = parse_request(b"checkpoint kill=0 bins=0 fork=1 dir=/x\n").unwrap();
        assert!(r.fork && !r.kill);
        assert!(parse_request(b"hello\n").is_none());
        let r = parse_request(b"checkpoint kill=1 bins=0 lock=migrate_lock_7_ff dir=/x\n").unwrap();
        assert_eq!(r.lock, "migrate_lock_7_ff");
        // The name ends up in an nft command line: nothing but an identifier.
        assert!(parse_request(b"checkpoint kill=1 lock=a;b dir=\n").is_none());
    }

    /// A deterministic mutation fuzz of the request parser (any local user of the process's
    /// uid can write to the socket): valid lines with bytes flipped, inserted, removed,
    /// duplicated and spliced, and random lines. No panic; a request comes only from a
    /// `checkpoint ` line; the lock is an identifier; the directory is what follows `dir=`.
    /// MIGRATE_FUZZ_CASES sets the number of lines (default 20000).
    #[test]
    fn parse_request_takes_any_line() {
        let seeds: [&[u8]; 6] = [
            b"checkpoint kill=1 bins=1 dir=/tmp/a b\n",
            b"checkpoint kill=0 bins=0 hold=1 lock=migrate_lock_7_ff dir=/x\n",
            b"checkpoint kill=1 lock=a dir=\n",
            b"checkpoint \n",
            b"checkpoint dir=dir=dir=\n",
            b"freeze\n",
        ];
        let tokens: [&[u8]; 8] = [b" ", b"dir=", b"lock=", b"kill=1", b"hold=1", b"\n", b"checkpoint ", b"\xff"];
        let cases: u64 = std::env::var("MIGRATE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
        let mut x = 0x243f_6a88_85a3_08d3u64;
        let mut next = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n.max(1) as u64) as usize
        };
        let mut accepted = 0;
        for _ in 0..cases {
            let mut line = seeds[next(seeds.len())].to_vec();
            for _ in 0..1 + next(4) {
                let at = next(line.len() + 1);
                match next(7) {
                    0 if !line.is_empty() => {
                        let i = at.min(line.len() - 1);
                        line[i] ^= 1 << next(8);
                    }
                    1 => line.insert(at, next(256) as u8),
                    2 if at < line.len() => {
                        line.remove(at);
                    }
                    3 => line.splice(at..at, tokens[next(tokens.len())].iter().copied()).for_each(drop),
                    4 => line.truncate(at),
                    5 => line = (0..next(80)).map(|_| next(256) as u8).collect(),
                    _ => {
                        let from = next(line.len() + 1);
                        let piece = line[from..].to_vec();
                        line.splice(at..at, piece).for_each(drop);
                    }
                }
            }
            let Some(r) = parse_request(&line) else { continue };
            let body = line.strip_suffix(b"\n").unwrap_or(&line);
            assert!(body.starts_with(b"checkpoint "), "{line:?}");
            assert!(r.lock.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_'), "{line:?}");
            let dir = body.windows(4).position(|w| w == b"dir=").map(|p| &body[p + 4..]).filter(|d| !d.is_empty());
            assert_eq!(r.dir.as_deref(), dir, "{line:?}");
            accepted += 1;
        }
        assert!(accepted * 20 > cases, "only {accepted} of {cases} lines parsed: the mutations miss the grammar");
    }
}
