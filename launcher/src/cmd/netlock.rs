//! The network lock. Between a checkpoint with --kill and the resume, the tree's TCP
//! connections exist nowhere: a peer's packet would meet a closed port and draw an RST, ending
//! the connection. So migrate-checkpoint drops the tree's TCP traffic first (an nftables table
//! of its own, `inet migrate_lock_<pid>_<n>`, in the program's network namespace): the peers
//! retransmit, and get through once the resumed program's rebuilt connections exist. The same
//! holds a new client's SYN instead of refusing it. The table's name goes into the image;
//! migrate-resume deletes it once the tree is restored, just before the program runs on.
//!
//! What is matched: every local port the tree listens on (both directions), and the exact
//! address/port pair of every other TCP connection of the tree.

use crate::exit::warn;
use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

/// One drop rule's match, for both hooks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Match {
    /// A listening port on `addr` (None: any address).
    Port { addr: Option<Addr>, port: u16 },
    /// One connection.
    Pair { local: Addr, local_port: u16, remote: Addr, remote_port: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Addr {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl Addr {
    fn family(&self) -> &'static str {
        match self {
            Addr::V4(_) => "ip",
            Addr::V6(_) => "ip6",
        }
    }
    fn text(&self) -> String {
        match self {
            Addr::V4(a) => std::net::Ipv4Addr::from(*a).to_string(),
            Addr::V6(a) => std::net::Ipv6Addr::from(*a).to_string(),
        }
    }
    fn is_any(&self) -> bool {
        match self {
            Addr::V4(a) => a.iter().all(|&b| b == 0),
            Addr::V6(a) => a.iter().all(|&b| b == 0),
        }
    }
}

/// Parses a /proc/net/tcp{,6} address: hex words in host byte order, `:` and a hex port. An
/// IPv4-mapped IPv6 address is IPv4 on the wire.
fn parse_addr(text: &str) -> Option<(Addr, u16)> {
    let (a, p) = text.split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    let words: Vec<u32> =
        (0..a.len() / 8).map(|i| u32::from_str_radix(&a[i * 8..i * 8 + 8], 16).ok()).collect::<Option<_>>()?;
    match words.as_slice() {
        [w] => Some((Addr::V4(w.to_ne_bytes()), port)),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (k, w) in [a, b, c, d].iter().enumerate() {
                bytes[k * 4..k * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            if bytes[..10].iter().all(|&x| x == 0) && bytes[10] == 0xff && bytes[11] == 0xff {
                return Some((Addr::V4([bytes[12], bytes[13], bytes[14], bytes[15]]), port));
            }
            Some((Addr::V6(bytes), port))
        }
        _ => None,
    }
}

/// The matches for the TCP sockets in `table` (a /proc/net/tcp{,6} text) whose inode is in
/// `inodes`.
fn matches_in(table: &str, inodes: &BTreeSet<u64>, out: &mut BTreeSet<Match>) {
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let Ok(inode) = f[9].parse::<u64>() else { continue };
        if !inodes.contains(&inode) {
            continue;
        }
        let (Some((local, lport)), Some((remote, rport))) = (parse_addr(f[1]), parse_addr(f[2])) else { continue };
        match f[3] {
            "0A" => {
                out.insert(Match::Port { addr: (!local.is_any()).then_some(local), port: lport });
            }
            "07" => {} // closed
            _ => {
                out.insert(Match::Pair { local, local_port: lport, remote, remote_port: rport });
            }
        }
    }
}

/// `pid` and every process below it.
pub(crate) fn tree_of(pid: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        if let Some(ppid) = after.split_whitespace().nth(1).and_then(|v| v.parse::<i32>().ok()) {
            children.entry(ppid).or_default().push(p);
        }
    }
    let mut all = vec![pid];
    let mut k = 0;
    while k < all.len() {
        all.extend(children.get(&all[k]).cloned().unwrap_or_default());
        k += 1;
    }
    all
}

fn socket_inodes(pids: &[i32]) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for p in pids {
        for entry in std::fs::read_dir(format!("/proc/{p}/fd")).into_iter().flatten().flatten() {
            let Ok(target) = std::fs::read_link(entry.path()) else { continue };
            let t = target.to_string_lossy();
            if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                if let Ok(n) = n.parse() {
                    out.insert(n);
                }
            }
        }
    }
    out
}

fn rules(matches: &BTreeSet<Match>) -> (Vec<String>, Vec<String>) {
    let (mut input, mut output) = (Vec::new(), Vec::new());
    for m in matches {
        match m {
            Match::Port { addr, port } => {
                let (to, from) = match addr {
                    Some(a) => {
                        (format!("{} daddr {} ", a.family(), a.text()), format!("{} saddr {} ", a.family(), a.text()))
                    }
                    None => (String::new(), String::new()),
                };
                input.push(format!("{to}tcp dport {port} drop"));
                output.push(format!("{from}tcp sport {port} drop"));
            }
            Match::Pair { local, local_port, remote, remote_port } => {
                let fam = local.family();
                input.push(format!(
                    "{fam} saddr {} {fam} daddr {} tcp sport {remote_port} tcp dport {local_port} drop",
                    remote.text(),
                    local.text()
                ));
                output.push(format!(
                    "{fam} saddr {} {fam} daddr {} tcp sport {local_port} tcp dport {remote_port} drop",
                    local.text(),
                    remote.text()
                ));
            }
        }
    }
    (input, output)
}

fn script(name: &str, matches: &BTreeSet<Match>) -> String {
    let (input, output) = rules(matches);
    let mut s = format!("table inet {name} {{\n");
    for (chain, hook, list) in [("hold_in", "input", input), ("hold_out", "output", output)] {
        s.push_str(&format!("  chain {chain} {{\n    type filter hook {hook} priority -300; policy accept;\n"));
        for r in list {
            s.push_str(&format!("    {r}\n"));
        }
        s.push_str("  }\n");
    }
    s.push_str("}\n");
    s
}

/// The network namespace of `pid`, if it is not ours (kept open: the process may be gone by
/// the time the lock is lifted).
fn netns_of(pid: i32) -> Result<Option<std::fs::File>, String> {
    let ours = std::fs::read_link("/proc/self/ns/net").ok();
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
    if ours == theirs {
        return Ok(None);
    }
    std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .map(Some)
        .map_err(|e| format!("cannot open the network namespace of process {pid}: {e}"))
}

/// `nft` with `args` (and `stdin`), in network namespace `netns` (None: ours).
fn nft(args: &[&str], stdin: Option<&str>, netns: Option<&std::fs::File>) -> Result<(), String> {
    let mut cmd = Command::new("nft");
    cmd.args(args).stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    if let Some(ns) = netns {
        let fd = ns.as_raw_fd();
        // SAFETY: setns is async-signal-safe; `ns` stays open in the parent until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    run_nft(cmd, stdin)
}

fn run_nft(mut cmd: Command, stdin: Option<&str>) -> Result<(), String> {
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            "nft is not installed (install nftables)".to_string()
        } else {
            format!("cannot run nft: {e}")
        }
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| format!("nft failed: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("nft: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A network lock in place.
pub struct Lock {
    pub name: String,
    netns: Option<std::fs::File>,
}

impl Lock {
    /// Lifts the lock (the checkpoint failed and the program goes on, or it runs elsewhere).
    pub fn release(self) {
        if let Err(e) = nft(&["delete", "table", "inet", &self.name], None, self.netns.as_ref()) {
            warn("checkpoint", &format!("cannot lift the network lock {}: {e}", self.name));
        }
    }
}

/// Holds the TCP traffic of `pid`'s tree. None when it has no TCP sockets, or when the lock
/// cannot be set (said as a warning: the connections are still saved, but a peer that sends
/// before the resume gets a reset).
pub fn lock(pid: i32) -> Option<Lock> {
    let inodes = socket_inodes(&tree_of(pid));
    let mut matches = BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
            matches_in(&text, &inodes, &mut matches);
        }
    }
    if matches.is_empty() {
        return None;
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let name = format!("migrate_lock_{pid}_{nanos:x}");
    let installed =
        netns_of(pid).and_then(|ns| nft(&["-f", "-"], Some(&script(&name, &matches)), ns.as_ref()).map(|_| ns));
    match installed {
        Ok(netns) => Some(Lock { name, netns }),
        Err(e) => {
            warn(
                "checkpoint",
                &format!(
                    "cannot hold the program's TCP traffic until the resume ({e}); its connections are saved, but a peer that sends before the resume will be reset"
                ),
            );
            None
        }
    }
}

/// Deletes lock `name` in our network namespace; a lock that is not here (the image came from
/// another host, or it was lifted) is fine.
pub fn unlock(name: &str) -> Result<(), String> {
    match nft(&["delete", "table", "inet", name], None, None) {
        Ok(()) => Ok(()),
        Err(e) if e.contains("No such file") || e.contains("not installed") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Starts a detached helper that lifts lock `name` once all `processes` of the resumed tree
/// say they are restored, then lets them go on. Returns the descriptor the tree inherits
/// (MIGRATE_READY_FD; not close-on-exec). A restore that fails closes it without a word: the
/// lock then stays, so that the connections survive a retry, and the helper says so.
pub fn spawn_unlocker(name: &str, processes: usize) -> std::io::Result<OwnedFd> {
    let (ours, theirs) = UnixStream::pair()?;
    // SAFETY: fork in migrate-resume, which is single-threaded here; the child only runs Rust
    // code of its own and exits.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(theirs);
            // SAFETY: a second fork so that the helper is nobody's child in the program's tree.
            if unsafe { libc::fork() } != 0 {
                // SAFETY: leaving the intermediate child without running destructors.
                unsafe { libc::_exit(0) };
            }
            // SAFETY: a new session: the terminal's Ctrl-C goes to the program, not here.
            unsafe { libc::setsid() };
            let code = unlocker(ours, name, processes);
            // SAFETY: ending the helper.
            unsafe { libc::_exit(code) }
        }
        child => {
            drop(ours);
            let mut status = 0;
            // SAFETY: reaping the intermediate child, which exits at once.
            unsafe { libc::waitpid(child, &mut status, 0) };
            let fd = theirs.as_raw_fd();
            // SAFETY: clearing close-on-exec on our own descriptor so the program inherits it.
            unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
            // SAFETY: taking over the descriptor from the UnixStream, which forgets it.
            Ok(unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(theirs)) })
        }
    }
}

fn unlocker(mut sock: UnixStream, name: &str, processes: usize) -> i32 {
    // Every process writes one byte when restored; EOF first means the restore failed.
    let _ = sock.set_read_timeout(Some(Duration::from_secs(600)));
    let mut seen = 0;
    let mut buf = [0u8; 64];
    while seen < processes {
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => {
                eprintln!(
                    "migrate-resume: the resume did not complete; the network lock stays so the connections survive a retry (lift it with: nft delete table inet {name})"
                );
                return 1;
            }
            Ok(n) => seen += n,
        }
    }
    let result = unlock(name);
    if let Err(e) = &result {
        eprintln!("migrate-resume: cannot lift the network lock {name}: {e}");
    }
    let _ = sock.write_all(&vec![1u8; processes]);
    i32::from(result.is_err())
}

/// Said when migrate-resume fails before the program runs: the lock stays, on purpose.
pub struct KeptNotice(pub String);

impl Drop for KeptNotice {
    fn drop(&mut self) {
        let name = &self.0;
        warn(
            "resume",
            &format!(
                "the program's TCP traffic stays held (network lock {name}) so that its connections survive a retry; if you give up instead, lift it with: nft delete table inet {name}"
            ),
        );
    }
}

/// The raw descriptor number, for the environment.
pub fn env_value(fd: &OwnedFd) -> String {
    let raw: RawFd = fd.as_raw_fd();
    raw.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_addresses() {
        assert_eq!(parse_addr("0100007F:1F90"), Some((Addr::V4([127, 0, 0, 1]), 8080)));
        // ::ffff:127.0.0.1 is IPv4 on the wire.
        assert_eq!(parse_addr("0000000000000000FFFF00000100007F:0050"), Some((Addr::V4([127, 0, 0, 1]), 80)));
        let (a, p) = parse_addr("00000000000000000000000001000000:18EB").unwrap();
        assert_eq!((a.text(), p), ("::1".to_string(), 6379));
        assert_eq!(parse_addr("zz:1"), None);
    }

    #[test]
    fn listeners_and_connections_become_rules() {
        let table =
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1\n\
   1: 0100007F:18EB 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 222 1\n\
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 333 1\n";
        let mut m = BTreeSet::new();
        matches_in(table, &[111, 222].into_iter().collect(), &mut m);
        let text = script("t", &m);
        assert!(text.contains("ip daddr 127.0.0.1 tcp dport 6379 drop"), "{text}");
        assert!(text.contains("ip saddr 127.0.0.1 ip daddr 127.0.0.1 tcp sport 50000 tcp dport 6379 drop"), "{text}");
        assert!(!text.contains("dport 22"), "not ours: {text}");
    }
}
