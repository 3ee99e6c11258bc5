//! Clock continuity: the resumed tree runs in a new time namespace whose CLOCK_MONOTONIC and
//! CLOCK_BOOTTIME carry on from the values the program read when it was frozen, so neither
//! jumps by the difference between hosts (or by the time the image waited). Deadlines the
//! program keeps as absolute monotonic times (event loops, timeouts) stay valid.
//!
//! unshare(CLONE_NEWTIME) moves only the processes created (or exec'd) afterwards into the new
//! namespace; its offsets can be written until the first one enters. Offsets are relative to
//! the host's clocks, so our own namespace's offsets (if migrate-resume itself runs in one) are
//! added to the difference we see.
//!
//! **Without privilege.** A time namespace needs CAP_SYS_ADMIN in the user namespace that owns
//! it. An ordinary user (unshare fails with EPERM) gets one through a user namespace of its
//! own: setgroups "deny", uid_map "U U 1", gid_map "G G 1" with our own ids, so the program
//! keeps seeing its uid and gid. A short-lived child makes that user namespace — together with
//! a time namespace in one unshare, which proves ours will be allowed there — and writes the
//! maps; only when all of that worked does migrate-resume join it (setns) and make the time
//! namespace as root would. Any failure leaves migrate-resume as it was: a warning, and the
//! host's clocks.
//!
//! What the user namespace costs, and so when it is not taken:
//! - Capabilities count only in the namespace that holds them. Exact pids (clone3 `set_tid`)
//!   need CAP_CHECKPOINT_RESTORE where the pid namespace lives, ports below 1024 need
//!   CAP_NET_BIND_SERVICE where the network namespace lives: if migrate-resume holds any
//!   capability, no user namespace is made (warning, host clocks). An ordinary user holds
//!   none, so exact pids were not available anyway and fall back to translated ones.
//! - The program runs as before otherwise: same uid and gid, no capability (its uid is not 0
//!   in the namespace, so exec clears them), the same mount, pid, network and IPC namespaces,
//!   so its files, signals, sockets and System V objects behave as before, and a later
//!   checkpoint by its owner works as usual.
//! - Ids that are not ours are not mapped and read as the overflow id 65534: owners of other
//!   users' files in stat(), supplementary groups in getgroups(), a root peer in SO_PEERCRED.
//!   Hence root's `migrate-checkpoint` is refused by the program's control socket (the owner's
//!   is not; root can still send the checkpoint signal). Set-user-ID and file-capability
//!   programs it execs (sudo, su, passwd) gain nothing, since root is not mapped.
//!
//! `--host-clocks` skips all of this.

use crate::exit::warn;
use migrate_image::ClockEntry;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

const CLOCK_MONOTONIC: &str = "monotonic";
const CLOCK_BOOTTIME: &str = "boottime";

fn now_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// Our own namespace's offsets (monotonic, boottime) in ns: /proc/self/timens_offsets lines
/// "monotonic SECS NANOS" (clock names or numbers, depending on the kernel).
fn own_offsets() -> (i128, i128) {
    let text = fs::read_to_string("/proc/self/timens_offsets").unwrap_or_default();
    let mut mono = 0;
    let mut boot = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 3 {
            continue;
        }
        let ns = f[1].parse::<i128>().unwrap_or(0) * 1_000_000_000 + f[2].parse::<i128>().unwrap_or(0);
        match f[0] {
            "monotonic" | "1" => mono = ns,
            "boottime" | "7" => boot = ns,
            _ => {}
        }
    }
    (mono, boot)
}

/// "NAME SECS NANOS" with 0 <= NANOS < 1e9, as the kernel wants it.
fn offset_line(name: &str, ns: i128) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let nanos = ns.rem_euclid(1_000_000_000);
    format!("{name} {secs} {nanos}\n")
}

/// The offsets that make the new namespace's clocks read `saved` now.
pub fn offsets_for(saved: &ClockEntry, host_mono: i128, host_boot: i128, own: (i128, i128)) -> (i128, i128) {
    (saved.monotonic_ns as i128 - host_mono + own.0, saved.boottime_ns as i128 - host_boot + own.1)
}

/// Enters a fresh time namespace for the processes forked or exec'd from here on — through a
/// user namespace of our own when unprivileged. When neither works, says what the program will
/// see and goes on.
pub fn enter(saved: &ClockEntry) {
    let why = match try_enter(saved) {
        Ok(()) => return,
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => match through_user_namespace(saved) {
            Ok(()) => return,
            Err(u) => format!("time namespace: {e}; {u}"),
        },
        Err(e) => format!("time namespace: {e}"),
    };
    warn(
        "resume",
        &format!(
            "cannot give the program its own clocks ({why}); CLOCK_MONOTONIC and CLOCK_BOOTTIME \
             will read this host's values (run as root to keep them continuous; --host-clocks \
             asks for the host's values)"
        ),
    );
}

fn try_enter(saved: &ClockEntry) -> io::Result<()> {
    let own = own_offsets();
    // SAFETY: unshare(2) with a namespace flag; affects only our future children and exec.
    if unsafe { libc::unshare(libc::CLONE_NEWTIME) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (mono, boot) = offsets_for(saved, now_ns(libc::CLOCK_MONOTONIC), now_ns(libc::CLOCK_BOOTTIME), own);
    let text = offset_line(CLOCK_MONOTONIC, mono) + &offset_line(CLOCK_BOOTTIME, boot);
    fs::write("/proc/self/timens_offsets", text)
}

/// The unprivileged way: join a user namespace where our ids map to themselves, and make the
/// time namespace from there. On error nothing has changed — unless the very last step fails,
/// which leaves us in a user namespace with our own ids but the host's clocks.
fn through_user_namespace(saved: &ClockEntry) -> Result<(), String> {
    let caps = held_capabilities();
    if caps != 0 {
        return Err(format!(
            "no user namespace made for it: migrate-resume holds capabilities ({caps:#x}) that would no \
             longer count there"
        ));
    }
    let (uid, gid) =
        own_ids().ok_or("no user namespace made for it: real and effective ids differ, and it maps only one")?;
    let ns = prepare_user_namespace(uid, gid).map_err(|e| format!("user namespace: {e}"))?;
    join(&ns).map_err(|e| format!("user namespace: cannot join it: {e}"))?;
    try_enter(saved).map_err(|e| format!("time namespace inside the user namespace: {e}"))
}

/// Capabilities this process holds in any set that could act (permitted, effective, ambient).
/// Unreadable counts as none: the maps below need /proc too.
fn held_capabilities() -> u64 {
    capabilities_in(&fs::read_to_string("/proc/self/status").unwrap_or_default())
}

/// The CapPrm, CapEff and CapAmb masks of a /proc/PID/status text, or'ed.
fn capabilities_in(status: &str) -> u64 {
    status
        .lines()
        .filter_map(|l| {
            let (key, value) = l.split_once(':')?;
            ["CapPrm", "CapEff", "CapAmb"].contains(&key).then(|| u64::from_str_radix(value.trim(), 16).ok())?
        })
        .fold(0, |a, b| a | b)
}

/// Our uid and gid, when real, effective and saved ids agree: an unprivileged user namespace
/// maps one id of each, and any other would read as 65534 there.
fn own_ids() -> Option<(u32, u32)> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    let (mut rg, mut eg, mut sg) = (0, 0, 0);
    // SAFETY: getresuid/getresgid write three ids each into variables we own.
    let ok = unsafe { libc::getresuid(&mut r, &mut e, &mut s) == 0 && libc::getresgid(&mut rg, &mut eg, &mut sg) == 0 };
    (ok && r == e && e == s && rg == eg && eg == sg).then_some((e, eg))
}

/// What the helper child could not do, by the step number it reports.
const STEPS: [&str; 5] = [
    "",
    "unshare(CLONE_NEWUSER|CLONE_NEWTIME)",
    "writing /proc/self/setgroups",
    "writing /proc/self/uid_map",
    "writing /proc/self/gid_map",
];

/// A user namespace where `uid` and `gid` map to themselves, made by a short-lived child so
/// that this process changes nothing unless the namespace is complete. The child makes a time
/// namespace in the same unshare (both or neither), proving ours will be allowed there.
fn prepare_user_namespace(uid: u32, gid: u32) -> io::Result<OwnedFd> {
    let (mut ours, theirs) = UnixStream::pair()?;
    // SAFETY: fork in migrate-resume, which is single-threaded here; the child only runs the
    // code below and leaves with _exit.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(io::Error::last_os_error());
    }
    if child == 0 {
        drop(ours);
        let mut theirs = theirs;
        let mut report = [0u8; 5];
        if let Err((step, e)) = make_user_namespace(uid, gid) {
            report[0] = step;
            report[1..].copy_from_slice(&e.raw_os_error().unwrap_or(libc::EIO).to_ne_bytes());
        }
        let _ = theirs.write_all(&report);
        // Alive (and so its namespace) until the parent has opened it: EOF then.
        let _ = theirs.read(&mut [0u8; 1]);
        // SAFETY: ending the helper without running the parent's destructors or atexit handlers.
        unsafe { libc::_exit(0) }
    }
    drop(theirs);
    let mut report = [0u8; 5];
    // The child makes one system call and writes three small files: never slow.
    let result = ours
        .set_read_timeout(Some(Duration::from_secs(10)))
        .and_then(|_| ours.read_exact(&mut report))
        .map_err(|e| io::Error::new(e.kind(), format!("the helper process did not report ({e})")))
        .and_then(|_| {
            let step = report[0] as usize;
            if step == 0 {
                return fs::File::open(format!("/proc/{child}/ns/user")).map(OwnedFd::from);
            }
            let errno = i32::from_ne_bytes([report[1], report[2], report[3], report[4]]);
            let e = io::Error::from_raw_os_error(errno);
            let hint = match (step, errno) {
                (1, libc::ENOSPC) => " (the user.max_user_namespaces limit)",
                (1, libc::EPERM | libc::EACCES) => " (unprivileged user namespaces are disabled or forbidden here)",
                _ => "",
            };
            Err(io::Error::new(e.kind(), format!("{}: {e}{hint}", STEPS.get(step).copied().unwrap_or("setup"))))
        });
    drop(ours);
    if result.is_err() {
        // SAFETY: killing our own helper child, which may be stuck; reaped just below.
        unsafe { libc::kill(child, libc::SIGKILL) };
    }
    let mut status = 0;
    // SAFETY: reaping our own child; `status` is a valid out-pointer.
    unsafe { libc::waitpid(child, &mut status, 0) };
    result
}

/// In the helper child: the namespaces and the maps (setgroups "deny" first: the kernel wants it
/// before an unprivileged gid_map).
fn make_user_namespace(uid: u32, gid: u32) -> Result<(), (u8, io::Error)> {
    // SAFETY: unshare(2) of this helper process alone.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWTIME) } != 0 {
        return Err((1, io::Error::last_os_error()));
    }
    fs::write("/proc/self/setgroups", "deny").map_err(|e| (2, e))?;
    fs::write("/proc/self/uid_map", format!("{uid} {uid} 1\n")).map_err(|e| (3, e))?;
    fs::write("/proc/self/gid_map", format!("{gid} {gid} 1\n")).map_err(|e| (4, e))
}

/// setns into the user namespace. The kernel refuses (EINVAL) while another thread shares our
/// thread group or fs_struct — for a moment also after a thread was joined (the image reader's
/// hashing threads): retried briefly.
fn join(ns: &OwnedFd) -> io::Result<()> {
    let mut tries = 0;
    loop {
        // SAFETY: setns(2) with a user-namespace descriptor we own; changes only this process.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWUSER) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        tries += 1;
        if e.raw_os_error() != Some(libc::EINVAL) || tries >= 200 {
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_make_the_clocks_continue() {
        let saved = ClockEntry { monotonic_ns: 5_000_000_000, boottime_ns: 6_000_000_000, realtime_ns: 0 };
        // Host clocks ahead: negative offsets; our own namespace's offsets count too.
        assert_eq!(offsets_for(&saved, 9_000_000_000, 9_000_000_000, (0, 0)), (-4_000_000_000, -3_000_000_000));
        assert_eq!(offsets_for(&saved, 9_000_000_000, 9_000_000_000, (1, 2)), (-3_999_999_999, -2_999_999_998));
        assert_eq!(offset_line("monotonic", -1_500_000_000), "monotonic -2 500000000\n");
        assert_eq!(offset_line("boottime", 2_000_000_001), "boottime 2 1\n");
    }

    #[test]
    fn capabilities_count_only_the_sets_that_act() {
        let none = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n\
                    CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n";
        assert_eq!(capabilities_in(none), 0, "a full bounding set is not a capability held");
        let ckpt = none.replace("CapAmb:\t0000000000000000", "CapAmb:\t0000010000000000");
        assert_eq!(capabilities_in(&ckpt), 1 << 40);
        assert_eq!(capabilities_in(""), 0);
    }
}
