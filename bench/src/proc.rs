//! Child processes and cleanup.
//!
//! Every child runs in its own process group (or its own session), and a [`Group`] guard kills
//! the whole group with SIGKILL when it is dropped, whatever the path out of the code that made
//! it. SIGINT, SIGTERM and SIGHUP are caught: a cleanup thread then kills every live group and
//! removes the work directory (which holds images of up to a GiB on tmpfs) before exiting.
//!
//! The release profile aborts on panic, so drop guards only run on ordinary returns: the code
//! of this crate reports every failure as an error instead of panicking.

use anyhow::{bail, Context, Result};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// How long a killed child may take to be reaped before we stop waiting for it.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);

/// Process groups (= leader pids) of the children alive now. The lock is held across
/// spawn-and-register, so the interrupt cleanup never misses a child that is being started.
static LIVE: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// The work directory to remove if the benchmark is interrupted.
static WORK_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Write end of the socket that wakes the cleanup thread (-1 until installed).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

fn live() -> MutexGuard<'static, Vec<i32>> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn work_dir() -> MutexGuard<'static, Option<PathBuf>> {
    WORK_DIR.lock().unwrap_or_else(PoisonError::into_inner)
}

fn kill_group(pgid: i32) {
    if pgid > 0 {
        // SAFETY: kill(2) has no memory effects; a negative pid addresses the process group
        // `pgid`, which is one of our children's (pgid > 0 is checked, so never -1 = "all").
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = WAKE_FD.load(Ordering::Relaxed);
    let byte = sig as u8;
    // SAFETY: write(2) is async-signal-safe; `byte` is a live local and one byte is written.
    unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
}

/// Catches SIGINT, SIGTERM and SIGHUP: a thread then kills every live child group, removes the
/// work directory and exits with 128 + the signal number. Call once, before starting children.
pub fn install_interrupt_cleanup() -> Result<()> {
    let (mut wake_rx, wake_tx) = UnixStream::pair().context("cannot create the signal wake-up socket")?;
    WAKE_FD.store(wake_tx.into_raw_fd(), Ordering::SeqCst);
    thread::Builder::new()
        .name("interrupt-cleanup".into())
        .spawn(move || {
            let mut byte = [0u8];
            if wake_rx.read_exact(&mut byte).is_err() {
                return;
            }
            let sig = i32::from(byte[0]);
            // Keep the lock until exit, so that no new child can start meanwhile.
            let live = live();
            for &pgid in live.iter() {
                kill_group(pgid);
            }
            if let Some(dir) = work_dir().take() {
                let _ = std::fs::remove_dir_all(&dir);
            }
            eprintln!("migrate-bench: interrupted (signal {sig}); children killed, work directory removed");
            std::process::exit(128 + sig);
        })
        .context("cannot start the interrupt-cleanup thread")?;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: an all-zero sigaction is a valid value (no flags, empty mask, SIG_DFL).
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: `sa` is initialized and outlives the call; the handler only performs an
        // atomic load and write(2), both async-signal-safe. Caught signals revert to their
        // default disposition in children at exec, so the children are not affected.
        if unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error()).context("sigaction");
        }
    }
    Ok(())
}

/// How a child is detached from the benchmark's process group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detach {
    /// A new process group (setpgid(0, 0)).
    Group,
    /// A new session (setsid), as a shell job run with `setsid` would be.
    Session,
}

/// A child process and its process group, killed with SIGKILL when dropped.
///
/// A thread waits for the leader, so its exit time is taken the moment waitpid returns.
pub struct Group {
    name: String,
    pid: i32,
    exit: Receiver<(io::Result<ExitStatus>, Instant)>,
    status: Option<(ExitStatus, Instant)>,
}

impl Group {
    /// Starts `cmd` (stdin from /dev/null) detached as `detach` says. Returns its piped stdout
    /// and stderr, if the caller asked for pipes.
    pub fn spawn(
        cmd: &mut Command,
        name: &str,
        detach: Detach,
    ) -> Result<(Group, Option<ChildStdout>, Option<ChildStderr>)> {
        cmd.stdin(Stdio::null());
        match detach {
            Detach::Group => {
                cmd.process_group(0);
            }
            Detach::Session => {
                // SAFETY: the closure runs in the child between fork and exec; it only calls
                // setsid(2), which is async-signal-safe, and touches no shared state.
                unsafe {
                    cmd.pre_exec(|| if libc::setsid() < 0 { Err(io::Error::last_os_error()) } else { Ok(()) });
                }
            }
        }
        let mut live = live();
        let mut child =
            cmd.spawn().with_context(|| format!("cannot start {name} ({})", cmd.get_program().display()))?;
        let pid = child.id() as i32;
        live.push(pid);
        drop(live);
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (tx, rx) = mpsc::channel();
        let waiter = thread::Builder::new().name(format!("wait-{pid}")).spawn(move || {
            let status = child.wait();
            let _ = tx.send((status, Instant::now()));
        });
        let group = Group { name: name.to_string(), pid, exit: rx, status: None };
        // On failure, dropping `group` kills the child.
        waiter.with_context(|| format!("cannot start a thread to wait for {name}"))?;
        Ok((group, stdout, stderr))
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    fn record(&mut self, got: (io::Result<ExitStatus>, Instant)) -> Result<(ExitStatus, Instant)> {
        let status = got.0.with_context(|| format!("waitpid for {} (pid {})", self.name, self.pid))?;
        self.status = Some((status, got.1));
        Ok((status, got.1))
    }

    /// The leader's exit status if it has exited, without waiting.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if let Some((status, _)) = self.status {
            return Ok(Some(status));
        }
        match self.exit.try_recv() {
            Ok(got) => Ok(Some(self.record(got)?.0)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => bail!("lost track of {} (pid {})", self.name, self.pid),
        }
    }

    /// Waits at most `timeout` for the leader to exit; returns its status and exit time.
    pub fn wait(&mut self, timeout: Duration) -> Result<(ExitStatus, Instant)> {
        if let Some(done) = self.status {
            return Ok(done);
        }
        match self.exit.recv_timeout(timeout) {
            Ok(got) => self.record(got),
            Err(RecvTimeoutError::Timeout) => {
                bail!("{} (pid {}) did not exit within {:.0} s", self.name, self.pid, timeout.as_secs_f64())
            }
            Err(RecvTimeoutError::Disconnected) => bail!("lost track of {} (pid {})", self.name, self.pid),
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // Also after the leader exited: the group may hold others (a CRIU-restored program
        // gets back the pid, and so the group, of the one that was dumped).
        kill_group(self.pid);
        if self.status.is_none() {
            let _ = self.exit.recv_timeout(REAP_TIMEOUT);
        }
        live().retain(|&p| p != self.pid);
    }
}

/// A command that ran to completion.
pub struct Finished {
    pub status: ExitStatus,
    /// From just before the spawn to the moment waitpid returned.
    pub elapsed: Duration,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Fails with the command's stderr unless it exited with status 0.
    pub fn check(self, what: &str) -> Result<Finished> {
        if !self.status.success() {
            bail!("{what} failed ({}): {}", self.status, tail(&self.stderr, 20));
        }
        Ok(self)
    }
}

/// Reads `r` to the end in a thread; the text arrives on the returned channel.
fn read_all(r: Option<impl Read + Send + 'static>) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    match r {
        Some(mut r) => {
            let _ = thread::Builder::new().name("read-output".into()).spawn(move || {
                let mut buf = Vec::new();
                let _ = r.read_to_end(&mut buf);
                let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
            });
        }
        None => {
            let _ = tx.send(String::new());
        }
    }
    rx
}

/// Runs `cmd` in its own process group with stdout and stderr captured, timing it by the wall
/// clock; kills it if it has not exited within `timeout`.
pub fn run(cmd: &mut Command, name: &str, timeout: Duration) -> Result<Finished> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let (mut group, stdout, stderr) = Group::spawn(cmd, name, Detach::Group)?;
    let (out, err) = (read_all(stdout), read_all(stderr));
    let (status, end) = group.wait(timeout)?;
    // Bounded: something it left behind could keep the pipes open.
    let stdout = out.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    let stderr = err.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    Ok(Finished { status, elapsed: end.saturating_duration_since(start), stdout, stderr })
}

/// Forwards the lines of a child's stdout to a channel, then drains it to the end (so the child
/// never writes into a pipe without a reader).
pub fn line_reader(stdout: ChildStdout) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let _ = thread::Builder::new().name("read-lines".into()).spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let _ = tx.send(String::from_utf8_lossy(&line).trim_end().to_string());
                }
            }
        }
    });
    rx
}

/// The last `n` lines of `text`, trimmed, or "(nothing)".
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim().lines().collect();
    let tail = lines[lines.len().saturating_sub(n)..].join("\n");
    if tail.is_empty() {
        "(no output)".into()
    } else {
        tail
    }
}

/// The contents of a log file written by a child, for an error message.
pub fn log_tail(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => tail(&String::from_utf8_lossy(&bytes), 20),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// A fresh directory, removed (with everything in it) when dropped or on interrupt.
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// Creates `parent/migrate-bench.<pid>[.<n>]`.
    pub fn create(parent: &Path) -> Result<WorkDir> {
        let parent = std::path::absolute(parent).with_context(|| format!("bad directory {}", parent.display()))?;
        for n in 0..1000 {
            let name = match n {
                0 => format!("migrate-bench.{}", std::process::id()),
                n => format!("migrate-bench.{}.{n}", std::process::id()),
            };
            let path = parent.join(name);
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    *work_dir() = Some(path.clone());
                    return Ok(WorkDir { path });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot create a directory in {}", parent.display())),
            }
        }
        bail!("cannot find a free directory name in {}", parent.display())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let mut registered = work_dir();
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("migrate-bench: warning: cannot remove {}: {e}", self.path.display());
        }
        *registered = None;
    }
}
