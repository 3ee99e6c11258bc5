//! Signal names and numbers, as the command line and migrate-inspect spell them.

/// Standard signal names by number (x86_64 Linux), without the `SIG` prefix.
const NAMES: [(i32, &str); 31] = [
    (1, "HUP"),
    (2, "INT"),
    (3, "QUIT"),
    (4, "ILL"),
    (5, "TRAP"),
    (6, "ABRT"),
    (7, "BUS"),
    (8, "FPE"),
    (9, "KILL"),
    (10, "USR1"),
    (11, "SEGV"),
    (12, "USR2"),
    (13, "PIPE"),
    (14, "ALRM"),
    (15, "TERM"),
    (16, "STKFLT"),
    (17, "CHLD"),
    (18, "CONT"),
    (19, "STOP"),
    (20, "TSTP"),
    (21, "TTIN"),
    (22, "TTOU"),
    (23, "URG"),
    (24, "XCPU"),
    (25, "XFSZ"),
    (26, "VTALRM"),
    (27, "PROF"),
    (28, "WINCH"),
    (29, "IO"),
    (30, "PWR"),
    (31, "SYS"),
];

/// Aliases accepted on input.
const ALIASES: [(&str, i32); 3] = [("IOT", 6), ("POLL", 29), ("CLD", 17)];

/// The highest signal number.
pub fn sigrtmax() -> i32 {
    libc::SIGRTMAX()
}

/// The lowest real-time signal a program may use (glibc keeps the two below it).
pub fn sigrtmin() -> i32 {
    libc::SIGRTMIN()
}

/// The real-time signal libmigrate reserves to suspend threads (SIGRTMAX-1).
pub fn suspend_signal() -> i32 {
    sigrtmax() - 1
}

/// Parses a signal name (`USR2`, `SIGUSR2`, `usr2`, `RTMIN+3`, `SIGRTMAX-2`) or number.
pub fn parse_name(s: &str) -> Result<i32, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty signal name".into());
    }
    let bad = || format!("unknown signal {s:?}; use a name like USR2, HUP or RTMIN+3, or a number");
    if let Ok(n) = t.parse::<i32>() {
        if n < 1 || n > sigrtmax() {
            return Err(format!("signal number {n} is out of range (1..={})", sigrtmax()));
        }
        return Ok(n);
    }
    let upper = t.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(&(n, _)) = NAMES.iter().find(|(_, nm)| *nm == name) {
        return Ok(n);
    }
    if let Some(&(_, n)) = ALIASES.iter().find(|(nm, _)| *nm == name) {
        return Ok(n);
    }
    let rt = |base: i32, rest: &str| -> Result<i32, String> {
        let n = if rest.is_empty() {
            base
        } else if let Some(k) = rest.strip_prefix('+') {
            base + k.parse::<i32>().map_err(|_| bad())?
        } else if let Some(k) = rest.strip_prefix('-') {
            base - k.parse::<i32>().map_err(|_| bad())?
        } else {
            return Err(bad());
        };
        if n < sigrtmin() || n > sigrtmax() {
            return Err(format!("{s} is outside the real-time signal range ({}..={})", sigrtmin(), sigrtmax()));
        }
        Ok(n)
    };
    if let Some(rest) = name.strip_prefix("RTMIN") {
        return rt(sigrtmin(), rest);
    }
    if let Some(rest) = name.strip_prefix("RTMAX") {
        return rt(sigrtmax(), rest);
    }
    Err(bad())
}

/// Parses the checkpoint signal of migrate-run: any signal except those that cannot be
/// caught and those glibc or libmigrate reserve.
pub fn parse_checkpoint_signal(s: &str) -> Result<i32, String> {
    let n = parse_name(s)?;
    if n == libc::SIGKILL || n == libc::SIGSTOP {
        return Err(format!("SIG{} cannot be caught; choose another signal, e.g. USR2", name(n)));
    }
    if n == suspend_signal() {
        return Err(format!("signal {n} (SIGRTMAX-1) is reserved by migrate to suspend threads; choose another"));
    }
    if n > 31 && n < sigrtmin() {
        return Err(format!("signal {n} is reserved by glibc; choose another, e.g. USR2 or RTMIN+3"));
    }
    Ok(n)
}

/// The conventional name of a signal, without `SIG` (`USR2`, `RTMIN+3`), or its number.
pub fn name(n: i32) -> String {
    if let Some(&(_, nm)) = NAMES.iter().find(|(k, _)| *k == n) {
        return nm.to_string();
    }
    let (min, max) = (sigrtmin(), sigrtmax());
    if n == min {
        "RTMIN".into()
    } else if n == max {
        "RTMAX".into()
    } else if n > min && n < max && n - min <= max - n {
        format!("RTMIN+{}", n - min)
    } else if n > min && n < max {
        format!("RTMAX-{}", max - n)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(parse_name("USR2"), Ok(12));
        assert_eq!(parse_name("SIGUSR2"), Ok(12));
        assert_eq!(parse_name("usr1"), Ok(10));
        assert_eq!(parse_name("sigHup"), Ok(1));
        assert_eq!(parse_name("12"), Ok(12));
        assert_eq!(parse_name("IOT"), Ok(6));
        assert_eq!(parse_name("RTMIN"), Ok(sigrtmin()));
        assert_eq!(parse_name("RTMIN+3"), Ok(sigrtmin() + 3));
        assert_eq!(parse_name("SIGRTMAX-2"), Ok(sigrtmax() - 2));
        assert_eq!(parse_name("RTMAX"), Ok(64));
        assert!(parse_name("0").is_err());
        assert!(parse_name("65").is_err());
        assert!(parse_name("-1").is_err());
        assert!(parse_name("FOO").is_err());
        assert!(parse_name("").is_err());
        assert!(parse_name("RTMIN+99").is_err());
        assert!(parse_name("RTMIN*2").is_err());
        assert!(parse_name("RTMINx").is_err());
    }

    #[test]
    fn checkpoint_signal_refusals() {
        assert_eq!(parse_checkpoint_signal("USR2"), Ok(12));
        assert_eq!(parse_checkpoint_signal("RTMIN+3"), Ok(sigrtmin() + 3));
        assert!(parse_checkpoint_signal("KILL").unwrap_err().contains("cannot be caught"));
        assert!(parse_checkpoint_signal("SIGSTOP").is_err());
        assert!(parse_checkpoint_signal("9").is_err());
        assert!(parse_checkpoint_signal("RTMAX-1").unwrap_err().contains("reserved"));
        assert!(parse_checkpoint_signal("63").is_err());
        assert!(parse_checkpoint_signal("32").unwrap_err().contains("glibc"));
    }

    #[test]
    fn names_round_trip() {
        for n in 1..=sigrtmax() {
            if (32..sigrtmin()).contains(&n) {
                continue;
            }
            assert_eq!(parse_name(&name(n)), Ok(n), "{}", name(n));
        }
        assert_eq!(name(12), "USR2");
        assert_eq!(name(sigrtmax() - 1), "RTMAX-1");
    }
}
