//! `migrate-checkpoint`: ask a managed process over its control socket to write an image.
//!
//! Protocol (libmigrate implements the other side): connect to the abstract AF_UNIX stream
//! socket `\0migrate/ctl/<pid>`, send `checkpoint kill=<0|1> bins=<0|1> [fork=1] [incr=1] [compress=1] dir=<absolute dir or empty>\n`,
//! read one line back: `ok <absolute image path>\n` or `error <message>\n`, possibly preceded by
//! `frozen <ms>\n` as soon as the program runs again (with --fork, before the image is done).

use crate::cli::CheckpointArgs;
use crate::exit::{fail, CHECKPOINT, PROCESS, USAGE};
use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long to keep retrying the connection to a process that is still starting up.
const STARTUP_GRACE: Duration = Duration::from_secs(2);
/// Longest reply line accepted.
const MAX_REPLY: usize = 64 << 10;
/// How often the progress line is updated while the image is written.
const PROGRESS_PERIOD: Duration = Duration::from_millis(200);

/// The abstract socket name (without the leading NUL) of a process's control socket.
pub fn control_socket_name(pid: i32) -> String {
    format!("migrate/ctl/{pid}")
}

/// The request line for a checkpoint.
pub fn request_line(
    kill: bool,
    with_binaries: bool,
    fork: bool,
    incremental: bool,
    compress: bool,
    lock: Option<&str>,
    dir: Option<&Path>,
) -> String {
    let dir = dir.map(|d| d.display().to_string()).unwrap_or_default();
    let lock = lock.map(|l| format!("lock={l} ")).unwrap_or_default();
    let fork = if fork { "fork=1 " } else { "" };
    let incr = if incremental { "incr=1 " } else { "" };
    // Only when asked: a program started by an older libmigrate knows no such word.
    let compress = if compress { "compress=1 " } else { "" };
    format!(
        "checkpoint kill={} bins={} {fork}{incr}{compress}{lock}dir={dir}\n",
        u8::from(kill),
        u8::from(with_binaries)
    )
}

/// The frozen time in a `frozen <ms>` line, which comes before the reply as soon as the
/// program runs again.
pub fn parse_frozen(line: &str) -> Option<u64> {
    line.strip_prefix("frozen ")?.trim().parse().ok()
}

/// A parsed reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Ok(String),
    Error(String),
}

/// Parses one reply line (without its newline).
pub fn parse_reply(line: &str) -> Result<Reply, String> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    if let Some(path) = line.strip_prefix("ok ") {
        if path.is_empty() {
            return Err("an ok reply without an image path".into());
        }
        return Ok(Reply::Ok(path.to_string()));
    }
    if let Some(msg) = line.strip_prefix("error ") {
        return Ok(Reply::Error(msg.to_string()));
    }
    if line == "error" {
        return Ok(Reply::Error("unspecified error".into()));
    }
    Err(format!("unexpected reply {line:?}"))
}

/// The process to talk to: `pid` itself, or — when `pid` is a migrate-resume that stays as the
/// parent of the program it resumed (original pids recreated) — that program.
pub(crate) fn target_of(pid: i32) -> i32 {
    let is_resume = std::fs::read_link(format!("/proc/{pid}/exe"))
        .is_ok_and(|e| e.file_name().is_some_and(|n| n == "migrate-resume"));
    if !is_resume {
        return pid;
    }
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let kids: Vec<i32> = children.split_whitespace().filter_map(|c| c.parse().ok()).collect();
    match kids.as_slice() {
        [only] => *only,
        _ => pid,
    }
}

pub fn main(args: CheckpointArgs) -> anyhow::Result<()> {
    if args.fork && (args.kill || args.to.is_some()) {
        return Err(fail(
            USAGE,
            format!(
                "--fork leaves the program running while its image is written in the background; with {} the program \
                 stops for good, so there is nothing to gain: drop --fork",
                if args.kill { "--kill" } else { "--to" }
            ),
        ));
    }
    if let Some(to) = args.to.clone() {
        return super::send::main(args, &to);
    }
    let pid = target_of(args.pid);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.timeout);
    let dir = match &args.dir {
        Some(d) if d.as_os_str().is_empty() => None,
        Some(d) => {
            let abs = std::path::absolute(d)
                .map_err(|e| fail(USAGE, format!("cannot make {} absolute: {e}", d.display())))?;
            if abs.as_os_str().as_encoded_bytes().contains(&b'\n') {
                return Err(fail(USAGE, format!("--dir {:?} contains a newline; choose another directory", d)));
            }
            Some(abs)
        }
        None => None,
    };

    check_process(pid)?;
    let mut stream = connect(pid, deadline)?;
    // The program dies with the checkpoint: its TCP traffic is held until the resume.
    let lock = if args.kill && !args.no_network_lock { super::netlock::lock(pid) } else { None };
    let request = request_line(
        args.kill,
        args.with_binaries,
        args.fork,
        args.incremental,
        args.compress,
        lock.as_ref().map(|l| l.name.as_str()),
        dir.as_deref(),
    );
    let mut frozen_ms = None;
    let json = args.json;
    let mut on_frozen = |ms: u64| {
        frozen_ms = Some(ms);
        if !json {
            // As soon as the program runs again (with --fork, before the image is complete).
            eprintln!("migrate-checkpoint: process {pid} frozen {ms} ms");
        }
    };
    let reply = set_timeout(&stream, pid, deadline, args.timeout)
        .and_then(|_| {
            stream.write_all(request.as_bytes()).map_err(|e| io_failure(pid, e, args.timeout, "sending the request"))
        })
        .and_then(|_| {
            let mut progress = Progress::new(pid);
            let reply =
                read_reply_with(&mut stream, pid, deadline, args.timeout, progress.as_mut(), Some(&mut on_frozen));
            if let Some(p) = progress {
                p.finish();
            }
            reply
        });
    let parsed = match reply {
        Ok(line) => match parse_reply(&line) {
            Ok(Reply::Ok(path)) => Ok(PathBuf::from(path)),
            Ok(Reply::Error(msg)) => Err(fail(CHECKPOINT, msg)),
            Err(why) => Err(fail(CHECKPOINT, format!("process {pid} gave an {why}; is it the same migrate version?"))),
        },
        Err(e) => Err(e),
    };
    let image = match parsed {
        Ok(image) => image,
        Err(e) => {
            // The program goes on: so does its traffic.
            if let Some(l) = lock {
                l.release();
            }
            return Err(e);
        }
    };
    drop(stream);
    if args.kill && !wait_gone(pid, deadline) {
        return Err(fail(
            CHECKPOINT,
            format!(
                "the image {} was written, but process {pid} did not exit within {} s (--timeout)",
                image.display(),
                args.timeout
            ),
        ));
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut out = io::stdout().lock();
    if args.json {
        let v = serde_json::json!({
            "image": image.display().to_string(),
            "pid": pid,
            "killed": args.kill,
            "network_lock": lock.as_ref().map(|l| l.name.clone()),
            "seconds": seconds,
            "frozen_ms": frozen_ms,
            "fork": args.fork,
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(out, "{}", image.display())?;
    }
    Ok(())
}

/// Checks that the process exists and that we may checkpoint it (its owner or root).
pub(crate) fn check_process(pid: i32) -> anyhow::Result<()> {
    let md = match std::fs::metadata(format!("/proc/{pid}")) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(fail(PROCESS, format!("no process {pid}"))),
        Err(e) => return Err(fail(PROCESS, format!("cannot look at process {pid}: {e}"))),
    };
    // /proc/self belongs to our effective uid.
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    if me != 0 && md.uid() != me {
        return Err(fail(
            PROCESS,
            format!(
                "permission denied: process {pid} belongs to uid {}; run migrate-checkpoint as that user or as root",
                md.uid()
            ),
        ));
    }
    Ok(())
}

/// Connects to the control socket, retrying briefly while the process is still starting.
pub(crate) fn connect(pid: i32, deadline: Instant) -> anyhow::Result<UnixStream> {
    let addr = SocketAddr::from_abstract_name(control_socket_name(pid).as_bytes())
        .map_err(|e| fail(PROCESS, format!("cannot build the control socket address of process {pid}: {e}")))?;
    let grace = (Instant::now() + STARTUP_GRACE).min(deadline);
    loop {
        let err = match UnixStream::connect_addr(&addr) {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(fail(PROCESS, format!("process {pid} exited before it could be checkpointed")));
        }
        let managed = maps_mention_libmigrate(pid);
        let starting = still_migrate_run(pid);
        if (managed == Some(true) || starting) && Instant::now() < grace {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        return Err(match managed {
            Some(false) if !starting => fail(
                PROCESS,
                format!("process {pid} is not running under migrate-run (start it with migrate-run)"),
            ),
            None => fail(
                PROCESS,
                format!(
                    "process {pid} does not answer on its control socket ({err}) and its memory map is unreadable; \
                     it is probably not running under migrate-run (start it with migrate-run)"
                ),
            ),
            _ => fail(
                PROCESS,
                format!(
                    "process {pid} does not answer on its control socket ({err}); it may be starting, exiting or blocking the checkpoint thread"
                ),
            ),
        });
    }
}

/// Whether /proc/PID/maps lists libmigrate.so (`None` if it cannot be read).
fn maps_mention_libmigrate(pid: i32) -> Option<bool> {
    let maps = std::fs::read(format!("/proc/{pid}/maps")).ok()?;
    let needle = crate::preload::LIB_NAME.as_bytes();
    Some(maps.windows(needle.len()).any(|w| w == needle))
}

/// Whether PID is still migrate-run itself, about to exec the program.
fn still_migrate_run(pid: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n == "migrate-run"))
        .unwrap_or(false)
}

fn remaining(deadline: Instant) -> Option<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    (!left.is_zero()).then_some(left)
}

fn timed_out(pid: i32, timeout: f64) -> anyhow::Error {
    fail(
        CHECKPOINT,
        format!("process {pid} did not finish the checkpoint within {timeout} s (--timeout); try a longer --timeout"),
    )
}

pub(crate) fn set_timeout(stream: &UnixStream, pid: i32, deadline: Instant, timeout: f64) -> anyhow::Result<()> {
    let left = remaining(deadline).ok_or_else(|| timed_out(pid, timeout))?;
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))?;
    Ok(())
}

fn io_failure(pid: i32, e: io::Error, timeout: f64, doing: &str) -> anyhow::Error {
    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
        return timed_out(pid, timeout);
    }
    fail(CHECKPOINT, format!("lost the control connection to process {pid} while {doing}: {e}"))
}

/// Reads the one reply line, bounded by the deadline.
pub(crate) fn read_reply(stream: &mut UnixStream, pid: i32, deadline: Instant, timeout: f64) -> anyhow::Result<String> {
    read_reply_with(stream, pid, deadline, timeout, None, None)
}

/// `read_reply`, updating `progress` every PROGRESS_PERIOD while waiting, and passing the
/// time of a `frozen <ms>` line that comes first to `on_frozen`.
fn read_reply_with(
    stream: &mut UnixStream,
    pid: i32,
    deadline: Instant,
    timeout: f64,
    mut progress: Option<&mut Progress>,
    mut on_frozen: Option<&mut dyn FnMut(u64)>,
) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&buf[..end]).into_owned();
            match parse_frozen(&line) {
                Some(ms) => {
                    buf.drain(..=end);
                    if let Some(p) = progress.as_mut() {
                        p.clear();
                    }
                    if let Some(f) = on_frozen.as_mut() {
                        f(ms);
                    }
                    continue;
                }
                None => return Ok(line),
            }
        }
        let left = remaining(deadline).ok_or_else(|| timed_out(pid, timeout))?;
        let wait = if progress.is_some() { left.min(PROGRESS_PERIOD) } else { left };
        stream.set_read_timeout(Some(wait))?;
        match stream.read(&mut chunk) {
            Ok(0) => {
                if buf.is_empty() {
                    return Err(fail(
                        CHECKPOINT,
                        format!(
                            "process {pid} closed its control socket without answering; it may have crashed during the checkpoint (see its stderr)"
                        ),
                    ));
                }
                break;
            }
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.contains(&b'\n') {
                    continue;
                }
                if buf.len() > MAX_REPLY {
                    return Err(fail(CHECKPOINT, format!("process {pid} sent an overlong reply")));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
                    && progress.is_some()
                    && remaining(deadline).is_some() =>
            {
                if let Some(p) = progress.as_mut() {
                    p.update();
                }
            }
            Err(e) => return Err(io_failure(pid, e, timeout, "waiting for the reply")),
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The checkpoint's progress on a terminal: the image's size as the process writes it, and the
/// rate. Nothing when stderr is not a terminal.
///
/// The image is found among the process's descriptors: while it writes one, the coordinating
/// process (the one we asked) holds it open as `<dir>/.<name>-<pid>.mig.tmp`, whichever
/// directory it was given or defaults to. It is opened here once found, so its size can be read
/// until the reply, also after it is renamed to its final name.
struct Progress {
    pid: i32,
    started: Instant,
    image: Option<File>,
    shown: bool,
}

impl Progress {
    fn new(pid: i32) -> Option<Progress> {
        io::stderr().is_terminal().then(|| Progress { pid, started: Instant::now(), image: None, shown: false })
    }

    fn update(&mut self) {
        if self.image.is_none() {
            self.image = find_image_being_written(self.pid);
        }
        let Some(len) = self.image.as_ref().and_then(|f| f.metadata().ok()).map(|m| m.len()) else {
            return;
        };
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        eprint!(
            "\r\x1b[Kmigrate-checkpoint: process {}: {:.1} MB written, {:.0} MB/s",
            self.pid,
            len as f64 / 1e6,
            len as f64 / 1e6 / secs
        );
        self.shown = true;
    }

    /// Clears the progress line.
    fn finish(mut self) {
        self.clear();
    }

    /// Clears the progress line (it comes back at the next update).
    fn clear(&mut self) {
        if self.shown {
            eprint!("\r\x1b[K");
            self.shown = false;
        }
    }
}

/// The image file process `pid` is writing (a descriptor to `*.mig.tmp`), opened for reading.
fn find_image_being_written(pid: i32) -> Option<File> {
    let dir = format!("/proc/{pid}/fd");
    let mut fds: Vec<u32> =
        std::fs::read_dir(&dir).ok()?.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
    // libmigrate keeps its own descriptors (the image among them) at high numbers.
    fds.sort_unstable_by(|a, b| b.cmp(a));
    fds.into_iter().find_map(|fd| {
        let link = format!("{dir}/{fd}");
        let target = std::fs::read_link(&link).ok()?;
        let name = target.file_name()?.to_str()?;
        (name.starts_with('.') && name.ends_with(".mig.tmp")).then(|| File::open(&link).ok())?
    })
}

/// Waits until the process is gone (exited, zombie included); false on timeout.
pub(crate) fn wait_gone(pid: i32, deadline: Instant) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory
    // of ours is involved.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd >= 0 {
        // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        loop {
            let Some(left) = remaining(deadline) else {
                return false;
            };
            let mut pfd = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: `pfd` is one valid pollfd that lives across the call; nfds is 1.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r > 0 {
                return true;
            }
            if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break;
            }
        }
    } else if io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return true;
    }
    // Fallback: watch /proc.
    loop {
        if !alive(pid) {
            return true;
        }
        if remaining(deadline).is_none() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether the process exists and is not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_reply() {
        assert_eq!(request_line(false, false, false, false, false, None, None), "checkpoint kill=0 bins=0 dir=\n");
        assert_eq!(
            request_line(false, false, false, true, false, None, None),
            "checkpoint kill=0 bins=0 incr=1 dir=\n"
        );
        assert_eq!(
            request_line(true, true, false, false, true, Some("migrate_lock_1_a"), Some(Path::new("/tmp/a b"))),
            "checkpoint kill=1 bins=1 compress=1 lock=migrate_lock_1_a dir=/tmp/a b\n"
        );
        assert_eq!(
            request_line(false, false, true, false, false, None, None),
            "checkpoint kill=0 bins=0 fork=1 dir=\n"
        );
        assert_eq!(parse_frozen("frozen 12"), Some(12));
        assert_eq!(parse_frozen("ok /tmp/frozen 12"), None);
        assert_eq!(parse_reply("ok /tmp/x.img"), Ok(Reply::Ok("/tmp/x.img".into())));
        assert_eq!(parse_reply("error disk full"), Ok(Reply::Error("disk full".into())));
        assert!(parse_reply("ok ").is_err());
        assert!(parse_reply("hello").is_err());
        assert_eq!(control_socket_name(42), "migrate/ctl/42");
    }

    #[test]
    fn liveness() {
        assert!(alive(std::process::id() as i32));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        assert!(wait_gone(pid, Instant::now() + Duration::from_secs(5)));
        child.wait().unwrap();
        assert!(!alive(pid));
    }
}
