//! File descriptors. Dump: /proc/thread-self/fd (not only what hooks saw: libc's internal opens bypass
//! them), with fstat, fcntl flags, the offset, and kcmp to find descriptors that share one open
//! file description (dup). Restore: each descriptor reopened at its number and offset, dups
//! re-shared with dup3; standard streams that led outside (terminal, pipe, socket) are connected
//! to migrate-resume's own.

use crate::resources::{path_string, Files};
use crate::state;
use crate::sys::{self, fs};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use migrate_image::{FdEntry, FdKind};

const KEPT_STATUS_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_APPEND
    | libc::O_NONBLOCK
    | libc::O_DSYNC
    | libc::O_SYNC
    | libc::O_DIRECT
    | libc::O_NOATIME
    | libc::O_LARGEFILE
    | libc::O_PATH;

fn is_tty_rdev(rdev: u64) -> bool {
    let major = libc::major(rdev);
    // 4: tty/console, 5: /dev/tty, /dev/ptmx; 136..=143: pseudo-terminal slaves.
    matches!(major, 4 | 5 | 136..=143)
}

pub fn dump(files: &mut Files) -> Result<Vec<FdEntry>, String> {
    let names = fs::list_dir(b"/proc/thread-self/fd").map_err(|e| format!("cannot list /proc/thread-self/fd: {e}"))?;
    let mut fds: Vec<i32> = names.iter().filter_map(|n| fs::parse_dec(n)).map(|n| n as i32).collect();
    fds.sort_unstable();
    fds.retain(|&fd| {
        !state::is_own_fd(fd) && !crate::checkpoint::is_transient_fd(fd) && !super::accept_queue::is_parked_fd(fd)
    });
    // (fd, inode, access mode) of every pipe end, to tell self-pipes from pipes to the outside.
    let pipe_ends: Vec<(i32, u64, i32)> = fds
        .iter()
        .filter_map(|&fd| {
            let st = sys::fstat(fd).ok()?;
            let acc = sys::fcntl(fd, libc::F_GETFL, 0).ok()? as i32 & libc::O_ACCMODE;
            (st.st_mode & libc::S_IFMT == libc::S_IFIFO).then_some((fd, st.st_ino, acc))
        })
        .collect();
    let mut pipes_seen: Vec<u64> = Vec::new();
    let mut out: Vec<FdEntry> = Vec::with_capacity(fds.len());
    for fd in fds {
        // A connection taken from a listener's queue just now may sit on the listing's old number.
        if super::accept_queue::is_taken_fd(fd) {
            continue;
        }
        let Ok(st) = sys::fstat(fd) else { continue }; // closed meanwhile (the listing's own fd)
        let link = fs::read_link(format!("/proc/thread-self/fd/{fd}").as_bytes()).unwrap_or_default();
        let path = path_string(&link);
        let flags = sys::fcntl(fd, libc::F_GETFL, 0).unwrap_or(0) as i32 & KEPT_STATUS_FLAGS;
        let cloexec = sys::fcntl(fd, libc::F_GETFD, 0).unwrap_or(0) as i32 & libc::FD_CLOEXEC != 0;
        let pos = sys::lseek(fd, 0, libc::SEEK_CUR).unwrap_or(0);
        let fmt = st.st_mode & libc::S_IFMT;
        let kind = match fmt {
            libc::S_IFREG if path.ends_with(" (deleted)") && path.starts_with('/') => {
                // Its own entry (the path may name another file by now), from the descriptor.
                files.list.push(migrate_image::FileIdentity {
                    path: path.trim_end_matches(" (deleted)").into(),
                    dev: st.st_dev,
                    ino: st.st_ino,
                    size: st.st_size as u64,
                    mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
                    hash: None,
                });
                FdKind::Deleted { file: (files.list.len() - 1) as u32, flags: flags as u32, pos }
            }
            libc::S_IFREG if path.ends_with(" (deleted)") => {
                FdKind::Unsupported { what: format!("deleted file {path}") }
            }
            libc::S_IFREG if path.starts_with('/') => {
                FdKind::Regular { file: files.intern_path(&path, false), flags: flags as u32, pos }
            }
            libc::S_IFDIR => FdKind::Directory { path, flags: flags as u32, pos },
            libc::S_IFCHR if fd <= 2 && is_tty_rdev(st.st_rdev) => {
                let mut termios = alloc::vec![0u8; core::mem::size_of::<libc::termios>()];
                let mut ws = [0u16; 4];
                let mut foreground: i32 = 0;
                // SAFETY: TCGETS fills a struct termios, TIOCGWINSZ a struct winsize (4 u16),
                // TIOCGPGRP a pid_t.
                unsafe {
                    let _ = sys::ioctl_ptr(fd, libc::TCGETS, termios.as_mut_ptr());
                    let _ = sys::ioctl_ptr(fd, libc::TIOCGWINSZ, ws.as_mut_ptr() as *mut u8);
                    let _ = sys::ioctl_ptr(fd, libc::TIOCGPGRP, &mut foreground as *mut i32 as *mut u8);
                }
                FdKind::Terminal {
                    what: format!("terminal {path}"),
                    flags: flags as u32,
                    termios,
                    rows: ws[0],
                    cols: ws[1],
                    foreground_vpgid: if foreground > 0 { state::pgid_to_virt(foreground) } else { 0 },
                }
            }
            libc::S_IFCHR if path.starts_with("/dev/") => {
                FdKind::CharDevice { path, rdev: st.st_rdev, flags: flags as u32 }
            }
            libc::S_IFIFO | libc::S_IFSOCK if fd <= 2 => FdKind::Inherited { what: path, flags: flags as u32 },
            libc::S_IFIFO if path.starts_with('/') => FdKind::Fifo { path, flags: flags as u32 },
            libc::S_IFIFO => {
                let write_end = flags & libc::O_ACCMODE == libc::O_WRONLY;
                let has_peer = pipe_ends
                    .iter()
                    .any(|&(other, ino, acc)| other != fd && ino == st.st_ino && (acc == libc::O_WRONLY) != write_end);
                if !has_peer {
                    FdKind::Detached { what: path, write_end, flags: flags as u32 }
                } else {
                    let capacity = sys::fcntl(fd, libc::F_GETPIPE_SZ, 0).unwrap_or(65536) as u32;
                    let data = if pipes_seen.contains(&st.st_ino) {
                        Vec::new()
                    } else {
                        pipes_seen.push(st.st_ino);
                        let reader = pipe_ends
                            .iter()
                            .find(|&&(_, ino, acc)| ino == st.st_ino && acc != libc::O_WRONLY)
                            .map(|e| e.0);
                        reader.map(|r| peek_pipe(r, capacity)).transpose()?.unwrap_or_default()
                    };
                    FdKind::Pipe { pipe: st.st_ino, write_end, flags: flags as u32, capacity, data }
                }
            }
            libc::S_IFSOCK => super::sockets::dump(fd, flags as u32),
            _ if path.starts_with("anon_inode:") => anon_inode(fd, &path, flags as u32),
            _ => {
                FdKind::Unsupported { what: if path.is_empty() { format!("descriptor of mode {fmt:o}") } else { path } }
            }
        };
        let shares_with = out
            .iter()
            .position(|prev| prev.shares_with.is_none() && sys::kcmp_file(sys::getpid(), prev.fd, fd) == Ok(0))
            .map(|i| i as u32);
        out.push(FdEntry { fd, cloexec, shares_with, kind });
    }
    Ok(out)
}

/// An epoll instance's registrations: (target descriptor, events, user data).
type EpollTargets = Vec<(i32, u32, u64)>;

/// The fields of /proc/thread-self/fdinfo/<fd>: (key, value) lines.
fn fdinfo_lines(fd: i32) -> Vec<(String, String)> {
    let text = fs::read_file(format!("/proc/thread-self/fdinfo/{fd}").as_bytes()).unwrap_or_default();
    text.split(|&c| c == b'\n')
        .filter_map(|l| {
            let l = String::from_utf8_lossy(l);
            let (k, v) = l.split_once(':')?;
            Some((k.trim().into(), v.trim().into()))
        })
        .collect()
}

fn field<'a>(lines: &'a [(String, String)], key: &str) -> &'a str {
    lines.iter().find(|(k, _)| k == key).map_or("", |(_, v)| v.as_str())
}

/// "(sec, nsec)" as nanoseconds.
fn timespec_ns(v: &str) -> u64 {
    let v = v.trim_matches(|c| c == '(' || c == ')');
    let mut it = v.split(',').map(|p| p.trim().parse::<u64>().unwrap_or(0));
    it.next().unwrap_or(0) * 1_000_000_000 + it.next().unwrap_or(0)
}

/// eventfd, timerfd, signalfd, epoll and pidfd, from fdinfo; inotify in inotify.rs.
fn anon_inode(fd: i32, path: &str, flags: u32) -> FdKind {
    let info = fdinfo_lines(fd);
    match path {
        "anon_inode:[eventfd]" => FdKind::EventFd {
            count: u64::from_str_radix(field(&info, "eventfd-count"), 16).unwrap_or(0),
            semaphore: field(&info, "eventfd-semaphore") == "1",
            flags,
        },
        "anon_inode:[timerfd]" => FdKind::TimerFd {
            clock: field(&info, "clockid").parse().unwrap_or(libc::CLOCK_MONOTONIC),
            value_ns: timespec_ns(field(&info, "it_value")),
            interval_ns: timespec_ns(field(&info, "it_interval")),
            ticks: field(&info, "ticks").parse().unwrap_or(0),
            flags,
        },
        "anon_inode:[signalfd]" => {
            FdKind::SignalFd { mask: u64::from_str_radix(field(&info, "sigmask"), 16).unwrap_or(0), flags }
        }
        "anon_inode:[eventpoll]" => {
            // Each registration: "tfd: 3 events: 80000019 data: abcdef  pos:0 ino:11 sdev:10".
            let text = fs::read_file(format!("/proc/thread-self/fdinfo/{fd}").as_bytes()).unwrap_or_default();
            let targets = text
                .split(|&c| c == b'\n')
                .filter_map(|l| {
                    let l = String::from_utf8_lossy(l);
                    let rest = l.strip_prefix("tfd:")?;
                    let mut w = rest.split_whitespace();
                    let tfd = w.next()?.parse().ok()?;
                    let events = u32::from_str_radix(w.nth(1)?, 16).ok()?;
                    let data = u64::from_str_radix(w.nth(1)?, 16).ok()?;
                    Some((tfd, events, data))
                })
                .collect();
            FdKind::Epoll { flags, targets }
        }
        "anon_inode:[pidfd]" => FdKind::PidFd { vpid: state::to_virt(field(&info, "Pid").parse().unwrap_or(0)), flags },
        "anon_inode:inotify" => super::inotify::dump(fd, flags),
        _ => FdKind::Unsupported { what: path.into() },
    }
}

/// The bytes in a pipe, copied without consuming them: tee() into a scratch pipe, read that.
fn peek_pipe(read_end: i32, capacity: u32) -> Result<Vec<u8>, String> {
    let mut scratch = [0i32; 2];
    sys::pipe2(&mut scratch, libc::O_CLOEXEC | libc::O_NONBLOCK)
        .map_err(|e| format!("cannot create a scratch pipe: {e}"))?;
    let _ = sys::fcntl(scratch[1], libc::F_SETPIPE_SZ, capacity as usize);
    let mut data = Vec::new();
    let copied = sys::tee(read_end, scratch[1], capacity as usize, libc::SPLICE_F_NONBLOCK);
    if let Ok(n) = copied {
        data.resize(n, 0);
        let mut got = 0;
        while got < n {
            match sys::read(scratch[0], &mut data[got..]) {
                Ok(0) | Err(_) => break,
                Ok(k) => got += k,
            }
        }
        data.truncate(got);
    }
    let _ = sys::close(scratch[0]);
    let _ = sys::close(scratch[1]);
    Ok(data)
}

fn reopen(path: &str, flags: i32) -> Result<i32, String> {
    let open_flags = (flags & KEPT_STATUS_FLAGS & !libc::O_NOATIME) | libc::O_CLOEXEC | libc::O_NOCTTY;
    sys::open(&fs::cpath(path.as_bytes()), open_flags, 0).map_err(|e| format!("cannot reopen {path}: {e}"))
}

/// Opens a named FIFO without waiting for the other side, then restores blocking mode.
fn reopen_fifo(path: &str, flags: i32) -> Result<i32, String> {
    let fd = reopen(path, flags | libc::O_NONBLOCK)?;
    if flags & libc::O_NONBLOCK == 0 {
        let cur = sys::fcntl(fd, libc::F_GETFL, 0).unwrap_or(0);
        let _ = sys::fcntl(fd, libc::F_SETFL, cur & !(libc::O_NONBLOCK as usize));
    }
    Ok(fd)
}

/// Recreates the saved descriptor table. Called in the new process before the address space
/// switch, when no descriptor of libmigrate's own is open yet.
/// `handed` lists descriptors shared with other processes of the tree: (saved number, the
/// descriptor migrate-resume handed it down at).
/// `deleted` holds the contents of files deleted while open (by `files` index); with
/// `keep_deleted` they come back visible on disk instead of unlinked.
pub fn restore(
    p: &migrate_image::ProcessEntry,
    force: bool,
    handed: &[(i32, i32)],
    deleted: &[(u32, Vec<u8>)],
    keep_deleted: bool,
) -> Result<(), String> {
    // Close what the new process has but the saved one had not (inherited from migrate-resume).
    if let Ok(names) = fs::list_dir(b"/proc/thread-self/fd") {
        for n in names {
            if let Some(fd) = fs::parse_dec(&n).map(|v| v as i32) {
                let inherited_std = fd <= 2
                    && p.fds
                        .iter()
                        .any(|f| f.fd == fd && matches!(f.kind, FdKind::Inherited { .. } | FdKind::Terminal { .. }));
                let handed_down = fd == crate::tree::REGISTRY_FD || handed.iter().any(|&(_, from)| from == fd);
                if !inherited_std && !handed_down {
                    let _ = sys::close(fd);
                }
            }
        }
    }
    // Pipes between descriptors of this process: created up front above every saved number,
    // refilled with their in-flight bytes, then placed like any other descriptor.
    let above = p.fds.iter().map(|f| f.fd).max().unwrap_or(2) + 1;
    let mut pipes: Vec<(u64, i32, i32)> = Vec::new();
    let mut epolls: Vec<(i32, EpollTargets)> = Vec::new();
    for f in &p.fds {
        let FdKind::Pipe { pipe, capacity, data, .. } = &f.kind else { continue };
        if pipes.iter().any(|&(id, _, _)| id == *pipe) {
            if !data.is_empty() {
                let &(_, _, w) = pipes.iter().find(|&&(id, _, _)| id == *pipe).unwrap_or(&(0, -1, -1));
                sys::write_all(w, data).map_err(|e| format!("cannot refill pipe:[{pipe}]: {e}"))?;
            }
            continue;
        }
        let mut ends = [0i32; 2];
        sys::pipe2(&mut ends, libc::O_CLOEXEC).map_err(|e| format!("cannot create a pipe: {e}"))?;
        let r = sys::fcntl(ends[0], libc::F_DUPFD_CLOEXEC, above as usize)
            .map_err(|e| format!("cannot place a pipe: {e}"))? as i32;
        let w = sys::fcntl(ends[1], libc::F_DUPFD_CLOEXEC, above as usize)
            .map_err(|e| format!("cannot place a pipe: {e}"))? as i32;
        let _ = sys::close(ends[0]);
        let _ = sys::close(ends[1]);
        let _ = sys::fcntl(w, libc::F_SETPIPE_SZ, *capacity as usize);
        sys::write_all(w, data).map_err(|e| format!("cannot refill pipe:[{pipe}]: {e}"))?;
        pipes.push((*pipe, r, w));
    }
    for f in &p.fds {
        let cloexec = if f.cloexec { libc::O_CLOEXEC } else { 0 };
        if let Some(&(_, from)) = handed.iter().find(|&&(fd, _)| fd == f.fd) {
            sys::dup3(from, f.fd, cloexec).map_err(|e| format!("cannot place shared descriptor {}: {e}", f.fd))?;
            continue;
        }
        if let Some(first) = f.shares_with {
            let target = p.fds[first as usize].fd;
            sys::dup3(target, f.fd, cloexec)
                .map_err(|e| format!("cannot duplicate descriptor {target} to {}: {e}", f.fd))?;
            continue;
        }
        let opened = match &f.kind {
            FdKind::Regular { file, flags, pos } => {
                let path = &p.files[*file as usize].path;
                let fd = reopen(path, *flags as i32)?;
                if flags & libc::O_APPEND as u32 == 0 || *pos != 0 {
                    sys::lseek(fd, *pos as i64, libc::SEEK_SET)
                        .map_err(|e| format!("cannot seek {path} to {pos}: {e}"))?;
                }
                Some(fd)
            }
            FdKind::Deleted { file, flags, pos } => {
                let path = &p.files[*file as usize].path;
                let contents = deleted.iter().find(|(f, _)| f == file).map(|(_, c)| c.as_slice()).unwrap_or(&[]);
                let fd = recreate_deleted(path, contents, *flags as i32, keep_deleted)?;
                sys::lseek(fd, *pos as i64, libc::SEEK_SET).map_err(|e| format!("cannot seek {path} to {pos}: {e}"))?;
                Some(fd)
            }
            FdKind::Directory { path, flags, pos } => {
                let fd = reopen(path, *flags as i32 | libc::O_DIRECTORY)?;
                let _ = sys::lseek(fd, *pos as i64, libc::SEEK_SET);
                Some(fd)
            }
            FdKind::Socket { .. } => Some(super::sockets::restore(&f.kind)?),
            FdKind::EventFd { count, semaphore, flags } => {
                let mut ef = libc::EFD_CLOEXEC;
                if *semaphore {
                    ef |= libc::EFD_SEMAPHORE;
                }
                // SAFETY: eventfd2 with an initial value that fits its u32 argument.
                let r = unsafe {
                    sys::syscall6(libc::SYS_eventfd2, (*count).min(u32::MAX as u64) as usize, ef as usize, 0, 0, 0, 0)
                };
                if r < 0 {
                    return Err(format!("cannot recreate eventfd {}: {}", f.fd, sys::Errno(-r as i32)));
                }
                let fd = r as i32;
                if *count > u32::MAX as u64 {
                    let _ = sys::write(fd, &(*count - u32::MAX as u64).to_ne_bytes());
                }
                set_status_flags(fd, *flags as i32);
                Some(fd)
            }
            FdKind::TimerFd { clock, value_ns, interval_ns, ticks, flags } => {
                // SAFETY: timerfd_create with a saved clock id.
                let r = unsafe {
                    sys::syscall6(libc::SYS_timerfd_create, *clock as usize, libc::TFD_CLOEXEC as usize, 0, 0, 0, 0)
                };
                if r < 0 {
                    return Err(format!("cannot recreate timerfd {} (clock {clock}): {}", f.fd, sys::Errno(-r as i32)));
                }
                let fd = r as i32;
                // Armed again with the time that was left (relative), and the same interval. A
                // timer that had expired without being read yet shows 0 left (the kernel re-arms
                // a periodic timerfd only when it is read): it expires at once instead, or it
                // would stay disarmed for good and its expiration would be lost.
                // (With its unread expirations put back below, the next one is a period away.)
                let left = match (*value_ns, *interval_ns) {
                    (0, 0) => 0,
                    (0, period) if *ticks > 0 => period,
                    (0, _) => 1,
                    (v, _) => v,
                };
                let spec = libc::itimerspec {
                    it_interval: sys::timespec_from_ns(*interval_ns),
                    it_value: sys::timespec_from_ns(left),
                };
                // SAFETY: a valid itimerspec for timerfd_settime.
                unsafe {
                    sys::syscall6(
                        libc::SYS_timerfd_settime,
                        fd as usize,
                        0,
                        &spec as *const libc::itimerspec as usize,
                        0,
                        0,
                        0,
                    )
                };
                if *ticks > 0 {
                    const TFD_IOC_SET_TICKS: u64 = 0x4008_5400;
                    let mut t = *ticks;
                    // SAFETY: the ioctl reads one u64.
                    let set = unsafe { sys::ioctl_ptr(fd, TFD_IOC_SET_TICKS, &mut t as *mut u64 as *mut u8) };
                    if set.is_err() {
                        // A kernel without it: at least one expiration is seen at once.
                        let spec = libc::itimerspec {
                            it_interval: sys::timespec_from_ns(*interval_ns),
                            it_value: sys::timespec_from_ns(1),
                        };
                        // SAFETY: a valid itimerspec for timerfd_settime.
                        unsafe {
                            sys::syscall6(
                                libc::SYS_timerfd_settime,
                                fd as usize,
                                0,
                                &spec as *const libc::itimerspec as usize,
                                0,
                                0,
                                0,
                            )
                        };
                    }
                }
                set_status_flags(fd, *flags as i32);
                Some(fd)
            }
            FdKind::SignalFd { mask, flags } => {
                // SAFETY: signalfd4 reads an 8-byte kernel signal set.
                let r = unsafe {
                    sys::syscall6(
                        libc::SYS_signalfd4,
                        usize::MAX,
                        mask as *const u64 as usize,
                        8,
                        libc::SFD_CLOEXEC as usize,
                        0,
                        0,
                    )
                };
                if r < 0 {
                    return Err(format!("cannot recreate signalfd {}: {}", f.fd, sys::Errno(-r as i32)));
                }
                set_status_flags(r as i32, *flags as i32);
                Some(r as i32)
            }
            FdKind::Epoll { targets, .. } => {
                // SAFETY: epoll_create1 has no pointer arguments.
                let r = unsafe { sys::syscall6(libc::SYS_epoll_create1, libc::EPOLL_CLOEXEC as usize, 0, 0, 0, 0, 0) };
                if r < 0 {
                    return Err(format!("cannot recreate epoll instance {}: {}", f.fd, sys::Errno(-r as i32)));
                }
                epolls.push((f.fd, targets.clone()));
                Some(r as i32)
            }
            FdKind::PidFd { vpid, .. } => match sys::pidfd_open(*vpid) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    crate::info!("pidfd {} of process {vpid} cannot be recreated ({e}); it reads as /dev/null", f.fd);
                    Some(reopen("/dev/null", libc::O_RDONLY)?)
                }
            },
            FdKind::Inotify { flags, watches } => {
                let fd = super::inotify::restore(f.fd, watches)?;
                set_status_flags(fd, *flags as i32);
                Some(fd)
            }
            FdKind::Fifo { path, flags } => Some(reopen_fifo(path, *flags as i32)?),
            FdKind::CharDevice { path, flags, .. } => Some(reopen(path, *flags as i32)?),
            FdKind::Pipe { pipe, write_end, flags, .. } => {
                let &(_, r, w) = pipes.iter().find(|&&(id, _, _)| id == *pipe).ok_or("pipe table inconsistent")?;
                let end = sys::fcntl(if *write_end { w } else { r }, libc::F_DUPFD_CLOEXEC, 0)
                    .map_err(|e| format!("cannot place a pipe: {e}"))? as i32;
                set_status_flags(end, *flags as i32);
                Some(end)
            }
            FdKind::Detached { write_end, flags, .. } => {
                // A pipe whose other end is closed: reads see EOF, writes fail with EPIPE.
                let mut ends = [0i32; 2];
                sys::pipe2(&mut ends, libc::O_CLOEXEC).map_err(|e| format!("cannot create a pipe: {e}"))?;
                let (keep, drop) = if *write_end { (ends[1], ends[0]) } else { (ends[0], ends[1]) };
                let _ = sys::close(drop);
                set_status_flags(keep, *flags as i32);
                Some(keep)
            }
            FdKind::Terminal { what, flags, termios, rows, cols, .. } => {
                if sys::fcntl(f.fd, libc::F_GETFD, 0).is_err() {
                    crate::debug!("descriptor {} ({what}) is not open in migrate-resume; using /dev/null", f.fd);
                    Some(reopen("/dev/null", *flags as i32)?)
                } else {
                    let mut now = alloc::vec![0u8; core::mem::size_of::<libc::termios>()];
                    let mut ws = [0u16; 4];
                    // SAFETY: as at dump time; TCSETS reads a struct termios of the saved size.
                    unsafe {
                        if sys::ioctl_ptr(f.fd, libc::TCGETS, now.as_mut_ptr()).is_ok() && termios.len() == now.len() {
                            let mut saved = termios.clone();
                            let _ = sys::ioctl_ptr(f.fd, libc::TCSETS, saved.as_mut_ptr());
                        }
                        if sys::ioctl_ptr(f.fd, libc::TIOCGWINSZ, ws.as_mut_ptr() as *mut u8).is_ok()
                            && (ws[0], ws[1]) != (*rows, *cols)
                        {
                            WINDOW_CHANGED.store(true, core::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    None
                }
            }
            FdKind::Inherited { what, flags } => {
                if sys::fcntl(f.fd, libc::F_GETFD, 0).is_err() {
                    crate::debug!("descriptor {} ({what}) is not open in migrate-resume; using /dev/null", f.fd);
                    Some(reopen("/dev/null", *flags as i32)?)
                } else {
                    None
                }
            }
            FdKind::Unsupported { what } => {
                if !force {
                    return Err(format!(
                        "descriptor {} ({what}) cannot be restored by this version of migrate; pass --force to resume with /dev/null in its place",
                        f.fd
                    ));
                }
                Some(reopen("/dev/null", libc::O_RDWR)?)
            }
        };
        match opened {
            Some(fd) if fd != f.fd => {
                sys::dup3(fd, f.fd, cloexec).map_err(|e| format!("cannot place descriptor {}: {e}", f.fd))?;
                let _ = sys::close(fd);
            }
            Some(fd) => {
                let _ = sys::fcntl(fd, libc::F_SETFD, if f.cloexec { libc::FD_CLOEXEC as usize } else { 0 });
            }
            None => {
                let _ = sys::fcntl(f.fd, libc::F_SETFD, if f.cloexec { libc::FD_CLOEXEC as usize } else { 0 });
            }
        }
    }
    for (_, r, w) in pipes {
        let _ = sys::close(r);
        let _ = sys::close(w);
    }
    // Registrations last: every target descriptor exists now.
    for (ep, targets) in epolls {
        for (tfd, events, data) in targets {
            let ev = libc::epoll_event { events, u64: data };
            // SAFETY: a valid epoll_event for EPOLL_CTL_ADD.
            let r = unsafe {
                sys::syscall6(
                    libc::SYS_epoll_ctl,
                    ep as usize,
                    libc::EPOLL_CTL_ADD as usize,
                    tfd as usize,
                    &ev as *const libc::epoll_event as usize,
                    0,
                    0,
                )
            };
            if r < 0 {
                crate::info!("cannot re-register descriptor {tfd} in epoll instance {ep}: {}", sys::Errno(-r as i32));
            }
        }
    }
    Ok(())
}

/// Set when a terminal the program had is now another size (it gets SIGWINCH once running).
/// After the whole tree is restored (its groups exist): the member of the group that had a
/// terminal's foreground takes it again on migrate-resume's terminal. SIGTTOU is blocked around
/// the call (we may be in a background group of that terminal until then).
pub fn retake_foreground(p: &migrate_image::ProcessEntry) {
    for f in &p.fds {
        let FdKind::Terminal { foreground_vpgid, .. } = f.kind else { continue };
        if foreground_vpgid == 0 || foreground_vpgid != p.vpgid {
            continue;
        }
        let Ok(mut pgrp) = sys::getpgid(0) else { continue };
        let ttou = 1u64 << (libc::SIGTTOU - 1);
        let mut old = 0u64;
        if sys::rt_sigprocmask(libc::SIG_BLOCK, Some(&ttou), Some(&mut old)).is_err() {
            continue;
        }
        // SAFETY: TIOCSPGRP reads a pid_t; a descriptor that is not our terminal just fails.
        if let Err(e) = unsafe { sys::ioctl_ptr(f.fd, libc::TIOCSPGRP, &mut pgrp as *mut i32 as *mut u8) } {
            crate::debug!("cannot give the terminal on fd {} back to group {}: {e}", f.fd, p.vpgid);
        }
        let _ = sys::rt_sigprocmask(libc::SIG_SETMASK, Some(&old), None);
        return;
    }
}

pub static WINDOW_CHANGED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// A file deleted while open, back with its contents: unlinked again (an O_TMPFILE in its old
/// directory, or the directory of /tmp when that is gone), or — `keep` — visible at its old
/// path (or beside it, if that name is taken). Opened with the saved flags.
fn recreate_deleted(path: &str, contents: &[u8], flags: i32, keep: bool) -> Result<i32, String> {
    let dir = path.rsplit_once('/').map_or("/", |(d, _)| if d.is_empty() { "/" } else { d });
    let dir = if sys::stat(&fs::cpath(dir.as_bytes())).is_ok() { dir } else { "/tmp" };
    let tmp = sys::open(&fs::cpath(dir.as_bytes()), libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC, 0o600)
        .map_err(|e| format!("cannot recreate deleted file {path} in {dir}: {e}"))?;
    if let Err(e) = sys::write_all(tmp, contents) {
        let _ = sys::close(tmp);
        return Err(format!("cannot recreate deleted file {path}: {e}"));
    }
    if keep {
        let proc_path = fs::cpath(format!("/proc/self/fd/{tmp}").as_bytes());
        let mut target = String::from(path);
        for n in 0..100 {
            if n > 0 {
                target = format!("{path}.restored-{n}");
            }
            // SAFETY: NUL-terminated paths alive for the call.
            let r = unsafe {
                sys::syscall6(
                    libc::SYS_linkat,
                    libc::AT_FDCWD as usize,
                    proc_path.as_ptr() as usize,
                    libc::AT_FDCWD as usize,
                    fs::cpath(target.as_bytes()).as_ptr() as usize,
                    libc::AT_SYMLINK_FOLLOW as usize,
                    0,
                )
            };
            if r == 0 {
                crate::info!("deleted file {path} restored visibly as {target} (--keep-deleted)");
                break;
            }
        }
    }
    // A description with the saved flags (access mode, O_APPEND, …) on the same file.
    let again = sys::open(
        &fs::cpath(format!("/proc/self/fd/{tmp}").as_bytes()),
        (flags & KEPT_STATUS_FLAGS & !libc::O_NOATIME) | libc::O_CLOEXEC,
        0,
    )
    .map_err(|e| format!("cannot reopen recreated file {path}: {e}"))?;
    let _ = sys::close(tmp);
    Ok(again)
}

fn set_status_flags(fd: i32, flags: i32) {
    let _ = sys::fcntl(fd, libc::F_SETFL, (flags & (libc::O_NONBLOCK | libc::O_APPEND)) as usize);
}
