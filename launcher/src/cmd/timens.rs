//! Clock continuity: the resumed tree runs in a new time namespace whose CLOCK_MONOTONIC and
//! CLOCK_BOOTTIME carry on from the values the program read when it was frozen, so neither
//! jumps by the difference between hosts (or by the time the image waited). Deadlines the
//! program keeps as absolute monotonic times (event loops, timeouts) stay valid.
//!
//! unshare(CLONE_NEWTIME) moves only the processes created (or exec'd) afterwards into the new
//! namespace; its offsets can be written until the first one enters. Offsets are relative to
//! the host's clocks, so our own namespace's offsets (if migrate-resume itself runs in one) are
//! added to the difference we see.

use crate::exit::warn;
use migrate_image::ClockEntry;
use std::fs;
use std::io;

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

/// Enters a fresh time namespace for the processes forked or exec'd from here on. Without the
/// privilege (CAP_SYS_ADMIN) or kernel support, says what the program will see and goes on.
pub fn enter(saved: &ClockEntry) {
    match try_enter(saved) {
        Ok(()) => {}
        Err(e) => warn(
            "resume",
            &format!(
                "cannot give the program its own clocks (time namespace: {e}); CLOCK_MONOTONIC \
                 and CLOCK_BOOTTIME will read this host's values (run as root to keep them continuous)"
            ),
        ),
    }
}

fn try_enter(saved: &ClockEntry) -> io::Result<()> {
    let own = own_offsets();
    // SAFETY: unshare(2) with a namespace flag; affects only our future children.
    if unsafe { libc::unshare(libc::CLONE_NEWTIME) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (mono, boot) = offsets_for(saved, now_ns(libc::CLOCK_MONOTONIC), now_ns(libc::CLOCK_BOOTTIME), own);
    let text = offset_line(CLOCK_MONOTONIC, mono) + &offset_line(CLOCK_BOOTTIME, boot);
    fs::write("/proc/self/timens_offsets", text)
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
}
