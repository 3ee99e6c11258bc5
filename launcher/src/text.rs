//! Small formatting helpers shared by the commands.

/// A UTC timestamp like `2026-11-03 14:05:09.123 UTC` from nanoseconds since the epoch.
pub fn utc_time(ns: i128) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let millis = ns.rem_euclid(1_000_000_000) / 1_000_000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{millis:03} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i128) -> (i128, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A byte count with a binary unit (`4.0 KiB`), exact below 1 KiB.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `rwx` with dashes from PROT_* bits.
pub fn prot(p: u32) -> String {
    use migrate_image::{PROT_EXEC, PROT_READ, PROT_WRITE};
    let bit = |b: u32, c: char| if p & b != 0 { c } else { '-' };
    [bit(PROT_READ, 'r'), bit(PROT_WRITE, 'w'), bit(PROT_EXEC, 'x')].iter().collect()
}

/// An rlimit value (`unlimited` for RLIM_INFINITY).
pub fn limit(v: u64) -> String {
    if v == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

/// The name of an rlimit resource (`RLIMIT_STACK`), or its number.
pub fn rlimit_name(resource: u32) -> String {
    const NAMES: [&str; 16] = [
        "CPU",
        "FSIZE",
        "DATA",
        "STACK",
        "CORE",
        "RSS",
        "NPROC",
        "NOFILE",
        "MEMLOCK",
        "AS",
        "LOCKS",
        "SIGPENDING",
        "MSGQUEUE",
        "NICE",
        "RTPRIO",
        "RTTIME",
    ];
    match NAMES.get(resource as usize) {
        Some(n) => format!("RLIMIT_{n}"),
        None => format!("rlimit {resource}"),
    }
}

/// Open-file status flags as text (`O_RDWR|O_APPEND`).
pub fn open_flags(flags: u32) -> String {
    let f = flags as i32;
    let mut parts = vec![match f & libc::O_ACCMODE {
        libc::O_RDONLY => "O_RDONLY",
        libc::O_WRONLY => "O_WRONLY",
        _ => "O_RDWR",
    }];
    for (bit, name) in [
        (libc::O_APPEND, "O_APPEND"),
        (libc::O_NONBLOCK, "O_NONBLOCK"),
        (libc::O_SYNC, "O_SYNC"),
        (libc::O_DSYNC, "O_DSYNC"),
        (libc::O_DIRECT, "O_DIRECT"),
        (libc::O_NOATIME, "O_NOATIME"),
        (libc::O_PATH, "O_PATH"),
        (libc::O_ASYNC, "O_ASYNC"),
    ] {
        if bit == libc::O_DSYNC && f & libc::O_SYNC == libc::O_SYNC {
            continue;
        }
        if f & bit == bit {
            parts.push(name);
        }
    }
    parts.join("|")
}

/// An inotify watch mask as text (`IN_CREATE|IN_MOVED_TO|IN_ONESHOT`); unknown bits in hex.
pub fn inotify_mask(mask: u32) -> String {
    const NAMES: [(u32, &str); 17] = [
        (libc::IN_ACCESS, "IN_ACCESS"),
        (libc::IN_MODIFY, "IN_MODIFY"),
        (libc::IN_ATTRIB, "IN_ATTRIB"),
        (libc::IN_CLOSE_WRITE, "IN_CLOSE_WRITE"),
        (libc::IN_CLOSE_NOWRITE, "IN_CLOSE_NOWRITE"),
        (libc::IN_OPEN, "IN_OPEN"),
        (libc::IN_MOVED_FROM, "IN_MOVED_FROM"),
        (libc::IN_MOVED_TO, "IN_MOVED_TO"),
        (libc::IN_CREATE, "IN_CREATE"),
        (libc::IN_DELETE, "IN_DELETE"),
        (libc::IN_DELETE_SELF, "IN_DELETE_SELF"),
        (libc::IN_MOVE_SELF, "IN_MOVE_SELF"),
        (libc::IN_ONLYDIR, "IN_ONLYDIR"),
        (libc::IN_DONT_FOLLOW, "IN_DONT_FOLLOW"),
        (libc::IN_EXCL_UNLINK, "IN_EXCL_UNLINK"),
        (libc::IN_MASK_ADD, "IN_MASK_ADD"),
        (libc::IN_ONESHOT, "IN_ONESHOT"),
    ];
    let mut parts: Vec<String> = NAMES.iter().filter(|(b, _)| mask & b != 0).map(|(_, n)| n.to_string()).collect();
    let rest = NAMES.iter().fold(mask, |m, (b, _)| m & !b);
    if rest != 0 {
        parts.push(format!("{rest:#x}"));
    }
    if parts.is_empty() {
        "0".into()
    } else {
        parts.join("|")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(utc_time(951_782_400_000_000_000 + 1_500_000), "2000-02-29 00:00:00.001 UTC");
        assert_eq!(utc_time(1_700_000_000_123_000_000), "2023-11-14 22:13:20.123 UTC");
        assert_eq!(utc_time(-1_000_000_000), "1969-12-31 23:59:59.000 UTC");
    }

    #[test]
    fn units_and_bits() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(4096), "4.0 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(prot(5), "r-x");
        assert_eq!(limit(u64::MAX), "unlimited");
        assert_eq!(rlimit_name(3), "RLIMIT_STACK");
        assert_eq!(rlimit_name(99), "rlimit 99");
        assert_eq!(open_flags((libc::O_WRONLY | libc::O_APPEND) as u32), "O_WRONLY|O_APPEND");
        assert_eq!(open_flags(libc::O_SYNC as u32), "O_RDONLY|O_SYNC");
        assert_eq!(inotify_mask(0x8400_0100), "IN_CREATE|IN_EXCL_UNLINK|IN_ONESHOT");
        assert_eq!(inotify_mask(0x0200_0002), "IN_MODIFY|IN_DONT_FOLLOW");
        assert_eq!(inotify_mask(0x1000_0000), "0x10000000");
    }
}
