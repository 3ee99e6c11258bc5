//! Timers: setitimer/alarm interval timers and timer_create POSIX timers.
//!
//! Dump (frozen, on the checkpoint thread): each armed interval timer with the time it had left,
//! and each POSIX timer listed in /proc/self/timers (id, clock, signal, sigev value, target
//! thread) with timer_gettime's remainder. Restore (in the restored process, after the switch,
//! before any program thread runs): the POSIX timers are created again under their old ids
//! (PR_TIMER_CREATE_RESTORE_IDS, Linux 6.17+) and every timer is armed with its remainder, so
//! the time the program spent stopped does not count, as for its interrupted sleeps.

use crate::state;
use crate::sys::{self, fs};
use alloc::vec::Vec;
use migrate_image::{ItimerEntry, PosixTimerEntry, TimersEntry};

/// prctl: make timer_create take the id it is given (linux/prctl.h, 6.17+).
const PR_TIMER_CREATE_RESTORE_IDS: i32 = 77;
const SIGEV_THREAD_ID: i32 = 4;

fn timeval_ns(t: &libc::timeval) -> u64 {
    t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000
}
fn ns_timeval(ns: u64) -> libc::timeval {
    libc::timeval { tv_sec: (ns / 1_000_000_000) as i64, tv_usec: ((ns % 1_000_000_000) / 1000) as i64 }
}

pub fn dump() -> TimersEntry {
    let mut t = TimersEntry::default();
    for which in [libc::ITIMER_REAL, libc::ITIMER_VIRTUAL, libc::ITIMER_PROF] {
        if let Ok(v) = sys::getitimer(which) {
            let value_ns = timeval_ns(&v.it_value);
            if value_ns > 0 {
                t.itimers.push(ItimerEntry { which, value_ns, interval_ns: timeval_ns(&v.it_interval) });
            }
        }
    }
    let text = fs::read_file(b"/proc/self/timers").unwrap_or_default();
    t.posix = parse_proc_timers(&text);
    for p in &mut t.posix {
        if let Ok(v) = sys::timer_gettime(p.id) {
            p.value_ns = sys::ns_from_timespec(&v.it_value);
            p.interval_ns = sys::ns_from_timespec(&v.it_interval);
        }
        if p.notify & SIGEV_THREAD_ID != 0 {
            p.target_vtid = state::to_virt(p.target_vtid);
        }
    }
    t
}

/// glibc's SIGTIMER (the first real-time signal), which its SIGEV_THREAD helper thread waits for.
const SIGTIMER: i32 = 32;

/// Why this process cannot be checkpointed because of its timers, if it cannot: glibc runs
/// SIGEV_THREAD timers through a helper thread that blocks every signal in sigwaitinfo, so it
/// can never enter our suspend handler (saving it would need ptrace).
pub fn unsupported() -> Option<alloc::string::String> {
    let text = fs::read_file(b"/proc/self/timers").ok()?;
    let helper =
        parse_proc_timers(&text).into_iter().find(|t| t.notify & SIGEV_THREAD_ID != 0 && t.signo == SIGTIMER)?;
    Some(alloc::format!(
        "the program uses a SIGEV_THREAD POSIX timer (timer_create), run by glibc's helper thread {} \
         that blocks every signal; such timers are not supported yet (SIGEV_SIGNAL timers are)",
        helper.target_vtid
    ))
}

/// /proc/PID/timers: blocks of "ID: n", "signal: signo/sival(hex)", "notify: kind/pid|tid.N",
/// "ClockID: c". `target_vtid` holds the real tid here.
fn parse_proc_timers(text: &[u8]) -> Vec<PosixTimerEntry> {
    let mut out: Vec<PosixTimerEntry> = Vec::new();
    for line in text.split(|&c| c == b'\n') {
        let line = core::str::from_utf8(line).unwrap_or("");
        let Some((key, value)) = line.split_once(": ") else { continue };
        if key == "ID" {
            out.push(PosixTimerEntry {
                id: value.trim().parse().unwrap_or(-1),
                clock: 0,
                notify: 0,
                signo: 0,
                sival: 0,
                target_vtid: 0,
                value_ns: 0,
                interval_ns: 0,
            });
            continue;
        }
        let Some(cur) = out.last_mut() else { continue };
        match key {
            "signal" => {
                let (signo, sival) = value.split_once('/').unwrap_or((value, "0"));
                cur.signo = signo.trim().parse().unwrap_or(0);
                cur.sival = u64::from_str_radix(sival.trim(), 16).unwrap_or(0);
            }
            "notify" => {
                let (kind, target) = value.split_once('/').unwrap_or((value, ""));
                cur.notify = match kind {
                    "none" => libc::SIGEV_NONE,
                    "thread" => libc::SIGEV_THREAD,
                    _ => libc::SIGEV_SIGNAL,
                };
                if let Some(tid) = target.strip_prefix("tid.") {
                    cur.notify |= SIGEV_THREAD_ID;
                    cur.target_vtid = tid.trim().parse().unwrap_or(0);
                }
            }
            "ClockID" => cur.clock = value.trim().parse().unwrap_or(0),
            _ => {}
        }
    }
    out.retain(|t| t.id >= 0);
    out
}

/// Creates the POSIX timers again and arms every timer with what it had left. Failures are
/// reported (the program would see EINVAL or miss a signal) but do not stop the resume.
pub fn restore(t: &TimersEntry) {
    for it in &t.itimers {
        let v = libc::itimerval { it_interval: ns_timeval(it.interval_ns), it_value: ns_timeval(it.value_ns) };
        if let Err(e) = sys::setitimer(it.which, &v) {
            crate::info!("cannot re-arm interval timer {}: {e}", it.which);
        }
    }
    if t.posix.is_empty() {
        return;
    }
    let exact_ids = sys::prctl(PR_TIMER_CREATE_RESTORE_IDS, 1, 0).is_ok();
    for p in &t.posix {
        let mut ev = [0u8; 64];
        ev[0..8].copy_from_slice(&p.sival.to_ne_bytes());
        ev[8..12].copy_from_slice(&p.signo.to_ne_bytes());
        ev[12..16].copy_from_slice(&p.notify.to_ne_bytes());
        if p.notify & SIGEV_THREAD_ID != 0 {
            ev[16..20].copy_from_slice(&state::to_real(p.target_vtid).to_ne_bytes());
        }
        let mut id = p.id;
        if let Err(e) = sys::timer_create(p.clock, &ev, &mut id) {
            crate::info!("cannot recreate POSIX timer {} (clock {}): {e}; the program will see EINVAL", p.id, p.clock);
            continue;
        }
        if id != p.id {
            crate::info!(
                "POSIX timer {} came back as {id} (this kernel cannot choose timer ids: Linux 6.17+ needed)",
                p.id
            );
            let _ = sys::timer_delete(id);
            continue;
        }
        if p.value_ns > 0 {
            let v = libc::itimerspec {
                it_interval: sys::timespec_from_ns(p.interval_ns),
                it_value: sys::timespec_from_ns(p.value_ns),
            };
            if let Err(e) = sys::timer_settime(id, &v) {
                crate::info!("cannot re-arm POSIX timer {}: {e}", p.id);
            }
        }
    }
    if exact_ids {
        let _ = sys::prctl(PR_TIMER_CREATE_RESTORE_IDS, 0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_timers() {
        let text = b"ID: 7\nsignal: 36/0000000000001234\nnotify: signal/pid.13350\nClockID: 1\n\
ID: 0\nsignal: 32/00007f0000000010\nnotify: signal/tid.99\nClockID: 0\n";
        let t = parse_proc_timers(text);
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].id, t[0].signo, t[0].sival, t[0].notify, t[0].clock), (7, 36, 0x1234, 0, 1));
        assert_eq!((t[1].id, t[1].notify, t[1].target_vtid), (0, SIGEV_THREAD_ID, 99));
        assert_eq!(t[1].sival, 0x7f00_0000_0010);
    }
}
