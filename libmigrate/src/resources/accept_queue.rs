//! Connections waiting in a TCP listener's accept queue at a checkpoint with --kill: the
//! kernel completed their handshakes, their clients think they are connected, but the program
//! has not accepted them yet. The kernel offers no way to put a connection back into an
//! accept queue, so:
//! - dump: they are accepted from the frozen listener and saved with TCP repair (they then
//!   die silently with the process, like every other connection);
//! - restore: each is rebuilt with TCP repair, and a loopback *stand-in* connection to the
//!   listener is opened for it. The stand-in makes the listener readable exactly as the waiting
//!   connection did (poll, epoll and select all see it); when the program accepts it, the accept
//!   hook puts the rebuilt connection on the descriptor accept() returned;
//! - a checkpoint that fails after taking them hands them back the same way.
//!
//! A stand-in is recognised by its address: the accepted socket's peer is the stand-in's own
//! local address, unique on this host. Listeners another process of the tree also holds (a
//! pre-forking server) keep their queue: any process could accept a stand-in there.

use crate::resources::sockets::name_of;
use crate::sys;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use migrate_image::QueuedConnection;

const MAX: usize = 512;

/// A rebuilt (or handed back) connection and its stand-in, until the program accepts it.
struct Parked {
    conn: AtomicI32,
    standin: AtomicI32,
}

static PARKED: [Parked; MAX] = [const { Parked { conn: AtomicI32::new(-1), standin: AtomicI32::new(-1) } }; MAX];
/// How many slots are in use: the accept hooks' fast path when zero.
static PARKED_COUNT: AtomicUsize = AtomicUsize::new(0);

/// Set while a checkpoint with --kill writes this process: listeners give up their queue.
pub static TAKE_WAITING: AtomicBool = AtomicBool::new(false);

/// Connections taken out of accept queues by the current checkpoint: (connection, listener).
static TAKEN: [(AtomicI32, AtomicI32); MAX] = [const { (AtomicI32::new(-1), AtomicI32::new(-1)) }; MAX];

/// Whether another process of the tree holds socket `fd` too.
fn held_elsewhere(fd: i32) -> bool {
    let Ok(st) = sys::fstat(fd) else { return true };
    let me = sys::getpid();
    let mut want = alloc::format!("socket:[{}]", st.st_ino).into_bytes();
    want.shrink_to_fit();
    let mut found = false;
    if let Some(r) = crate::tree::registry() {
        r.for_each(|real, _, _| {
            if found || real == me || real <= 0 {
                return;
            }
            let dir = alloc::format!("/proc/{real}/fd");
            for name in sys::fs::list_dir(dir.as_bytes()).unwrap_or_default() {
                let mut path = dir.clone().into_bytes();
                path.push(b'/');
                path.extend_from_slice(&name);
                if sys::fs::read_link(&path).is_ok_and(|t| t == want) {
                    found = true;
                    return;
                }
            }
        });
    }
    found
}

fn remember_taken(conn: i32, listener: i32) -> bool {
    for (c, l) in &TAKEN {
        if c.compare_exchange(-1, conn, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            l.store(listener, Ordering::Release);
            return true;
        }
    }
    false
}

/// Takes the waiting connections out of listener `fd` and saves them, at a checkpoint with
/// --kill. Stops (handing back what it took from this listener) when TCP repair is refused.
pub fn take_waiting(fd: i32) -> Vec<QueuedConnection> {
    let mut out = Vec::new();
    if !TAKE_WAITING.load(Ordering::Acquire) || held_elsewhere(fd) {
        return out;
    }
    // Exactly as many as wait (tcpi_unacked is a listener's queue length): the listener may be
    // blocking, and an accept must not wait.
    let n = sys::tcp_info(fd).map_or(0, |i| i.tcpi_unacked);
    for _ in 0..n {
        let Ok(conn) = sys::accept4(fd, libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) else { break };
        // A stand-in of an earlier resume becomes the connection it stands for.
        substitute(conn, libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK);
        let saved = migrate_tcprepair::dump(conn).map(|tcp| QueuedConnection {
            local: name_of(conn, false).unwrap_or_default(),
            peer: name_of(conn, true).unwrap_or_default(),
            tcp,
        });
        match saved {
            Ok(q) if remember_taken(conn, fd) => out.push(q),
            _ => {
                // Not saved: it goes back, and the rest stay in the queue (reported as waiting).
                park(conn, fd);
                break;
            }
        }
    }
    out
}

/// The checkpoint failed (or the program goes on): the connections it took are accepted
/// again by the program, through stand-ins.
pub fn hand_back_taken() {
    for (c, l) in &TAKEN {
        let conn = c.swap(-1, Ordering::AcqRel);
        if conn >= 0 {
            park(conn, l.load(Ordering::Acquire));
        }
    }
}

/// The checkpoint succeeded: what it took dies with the process (or, in a restored process,
/// the numbers are stale).
pub fn forget_taken() {
    for (c, _) in &TAKEN {
        c.store(-1, Ordering::Release);
    }
}

/// Whether `fd` is a connection the current checkpoint took from an accept queue (it is saved
/// with its listener, not as a descriptor of the program).
pub fn is_taken_fd(fd: i32) -> bool {
    TAKEN.iter().any(|(c, _)| c.load(Ordering::Acquire) == fd)
}

/// The listener's own address with a wildcard replaced by loopback: where a stand-in connects.
fn standin_target(listener: i32) -> Option<Vec<u8>> {
    let mut addr = name_of(listener, false)?;
    let family = u16::from_ne_bytes([*addr.first()?, *addr.get(1)?]) as i32;
    match family {
        libc::AF_INET if addr.len() >= 8 => {
            if addr[4..8] == [0, 0, 0, 0] {
                addr[4..8].copy_from_slice(&[127, 0, 0, 1]);
            }
        }
        libc::AF_INET6 if addr.len() >= 24 => {
            if addr[8..24].iter().all(|&b| b == 0) {
                addr[23] = 1;
            }
        }
        _ => return None,
    }
    Some(addr)
}

/// Opens a stand-in to `listener` for connection `conn` and parks the pair. Without a
/// stand-in the connection could never be accepted: it is closed (its peer sees a reset).
fn park(conn: i32, listener: i32) {
    let standin = standin_target(listener).and_then(|target| {
        let family = u16::from_ne_bytes([target[0], target[1]]) as i32;
        let s = sys::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0).ok()?;
        match sys::connect_addr(s, &target) {
            Ok(()) | Err(sys::Errno(libc::EINPROGRESS)) => Some(s),
            Err(_) => {
                let _ = sys::close(s);
                None
            }
        }
    });
    let Some(standin) = standin else {
        let _ = sys::close(conn);
        return;
    };
    crate::debug!("parked connection fd {conn} behind stand-in fd {standin}");
    for slot in &PARKED {
        if slot.conn.compare_exchange(-1, conn, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            slot.standin.store(standin, Ordering::Release);
            PARKED_COUNT.fetch_add(1, Ordering::AcqRel);
            return;
        }
    }
    let _ = sys::close(standin);
    let _ = sys::close(conn);
}

/// Called by the accept hooks with the descriptor accept() returned: if it is a stand-in's
/// server side, the parked connection takes its place (with the flags accept4 asked for).
/// Returns whether it did.
pub fn substitute(accepted: i32, flags: i32) -> bool {
    if PARKED_COUNT.load(Ordering::Acquire) == 0 {
        return false;
    }
    let Some(peer) = name_of(accepted, true) else { return false };
    for slot in &PARKED {
        let standin = slot.standin.load(Ordering::Acquire);
        if standin < 0 || name_of(standin, false).as_deref() != Some(peer.as_slice()) {
            continue;
        }
        // Claimed once, even if two threads accept at the same time.
        if slot.standin.compare_exchange(standin, -1, Ordering::AcqRel, Ordering::Acquire).is_err() {
            continue;
        }
        let conn = slot.conn.load(Ordering::Acquire);
        crate::debug!("accepted stand-in fd {standin}: connection fd {conn} takes descriptor {accepted}");
        let cloexec = if flags & libc::SOCK_CLOEXEC != 0 { libc::O_CLOEXEC } else { 0 };
        let _ = sys::dup3(conn, accepted, cloexec);
        let nonblock = if flags & libc::SOCK_NONBLOCK != 0 { libc::O_NONBLOCK } else { 0 };
        let _ = sys::fcntl(accepted, libc::F_SETFL, nonblock as usize);
        let _ = sys::close(conn);
        let _ = sys::close(standin);
        slot.conn.store(-1, Ordering::Release);
        PARKED_COUNT.fetch_sub(1, Ordering::AcqRel);
        return true;
    }
    false
}

/// Descriptors the parked connections and their stand-ins hold: not the program's own.
pub fn is_parked_fd(fd: i32) -> bool {
    PARKED_COUNT.load(Ordering::Acquire) > 0
        && PARKED.iter().any(|s| s.conn.load(Ordering::Acquire) == fd || s.standin.load(Ordering::Acquire) == fd)
}

/// Restore, in the restored process: the connections that waited in each listener's queue
/// are rebuilt now (before the network lock is lifted, so that their peers' retransmissions
/// find them); `park_restored` then makes them acceptable.
pub fn rebuild(p: &migrate_image::ProcessEntry) -> Vec<(i32, i32)> {
    // Whatever the image's copy of these tables said belonged to the process it was taken from.
    TAKE_WAITING.store(false, Ordering::Release);
    forget_taken();
    for slot in &PARKED {
        slot.conn.store(-1, Ordering::Release);
        slot.standin.store(-1, Ordering::Release);
    }
    PARKED_COUNT.store(0, Ordering::Release);
    let mut out = Vec::new();
    for f in &p.fds {
        let migrate_image::FdKind::Socket { domain, queued, options, .. } = &f.kind else { continue };
        for q in queued {
            match migrate_tcprepair::restore(*domain, &q.local, &q.peer, options, &q.tcp) {
                Ok(conn) => out.push((conn, f.fd)),
                Err(e) => crate::info!(
                    "a connection from {} waiting to be accepted could not be rebuilt ({e}); its client sees a reset",
                    crate::resources::sockets::describe(&q.peer)
                ),
            }
        }
    }
    out
}

/// Parks the rebuilt connections behind stand-ins on their listeners.
pub fn park_restored(rebuilt: Vec<(i32, i32)>) {
    for (conn, listener) in rebuilt {
        park(conn, listener);
    }
}
