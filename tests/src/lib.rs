//! Test harness for the migrate integration tests.
//!
//! * [`bin`] / [`cbin`] locate the migrate binaries (built by `cargo build --workspace` into the
//!   target dir) and the C example programs (built by this package's build script).
//! * [`Managed`] runs a process in its own process group with piped stdio, collects its output
//!   line by line in background threads, and offers bounded waits on it. Dropping it kills the
//!   process and its group and reaps it.
//! * [`migrate_run`], [`checkpoint`], [`resume`], [`run_tool`] drive the CLI.
//! * Models of the example programs' output ([`CounterTick`], [`counter_data`],
//!   [`counter_log_offset`], [`check_counter_log`], [`service_expect`]) let tests check exact
//!   continuity after a resume.
//!
//! Every wait is bounded and panics with all output seen so far; no wait is a fixed sleep.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

pub use tempfile::TempDir;

/// Time allowed for a managed program to print its first line (buffers are filled at start).
pub const STARTUP: Duration = Duration::from_secs(30);
/// Time allowed between two expected lines of a running program.
pub const LINE: Duration = Duration::from_secs(15);
/// Time allowed for one `migrate-checkpoint` run.
pub const CKPT: Duration = Duration::from_secs(120);
/// Time allowed for a tool that is expected to fail quickly (bad image, mismatch, ...).
pub const QUICK: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Locating binaries

/// The directory holding the workspace's binaries: the parent of the `deps` directory the
/// running test executable lives in (`target/<profile>`). `MIGRATE_BIN_DIR` overrides it.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MIGRATE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("test executable has a parent directory");
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// A workspace binary (`migrate-run`, `migrate-checkpoint`, `migrate-resume`, `migrate-inspect`,
/// `rust-counter`, `counter-service`, ...). Panics with a clear message if it was not built.
#[track_caller]
pub fn bin(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    if !path.is_file() {
        panic!(
            "{name} not found at {}: run `cargo build --workspace` first (cargo test does not build \
             other packages' binaries)",
            path.display()
        );
    }
    path
}

/// The directory the build script compiled the C examples into.
pub const CBIN_DIR: &str = env!("MIGRATE_CBIN_DIR");

/// A C example program (`counter`, `fifo_reader`, `sleeper`, `signals`, `hello_static`).
#[track_caller]
pub fn cbin(name: &str) -> PathBuf {
    let path = Path::new(CBIN_DIR).join(name);
    assert!(path.is_file(), "C example {name} missing at {} (build script output)", path.display());
    path
}

/// A fresh temporary directory, removed when dropped.
pub fn temp_dir() -> TempDir {
    tempfile::Builder::new().prefix("migrate-test-").tempdir().expect("create temp dir")
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

// ---------------------------------------------------------------------------------------------
// Managed processes

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Out,
    Err,
}

enum Event {
    Line(Stream, String),
    Eof(Stream),
}

/// What [`Managed::wait_line`] looks for: a `&str` is a prefix, a closure `|l: &str| ...` a
/// predicate.
pub trait Matcher {
    fn matches(&self, line: &str) -> bool;
    fn describe(&self) -> String;
}

impl Matcher for &str {
    fn matches(&self, line: &str) -> bool {
        line.starts_with(*self)
    }
    fn describe(&self) -> String {
        format!("a line starting with {self:?}")
    }
}

impl<F: Fn(&str) -> bool> Matcher for F {
    fn matches(&self, line: &str) -> bool {
        self(line)
    }
    fn describe(&self) -> String {
        "a line matching the predicate".to_string()
    }
}

fn spawn_reader<R: Read + Send + 'static>(r: R, stream: Stream, tx: Sender<Event>) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    while buf.last() == Some(&b'\n') || buf.last() == Some(&b'\r') {
                        buf.pop();
                    }
                    let line = String::from_utf8_lossy(&buf).into_owned();
                    if tx.send(Event::Line(stream, line)).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(Event::Eof(stream));
    });
}

/// A process started in its own process group, with stdin, stdout and stderr piped and no
/// other descriptor inherited from the test.
pub struct Managed {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    rx: Receiver<Event>,
    out: Vec<String>,
    err: Vec<String>,
    /// Index in `out` of the first line not yet returned by a wait.
    cursor: usize,
    out_eof: bool,
    err_eof: bool,
    status: Option<ExitStatus>,
}

impl Managed {
    /// Spawns `cmd` in a new process group (pgid = its pid) with all stdio piped.
    pub fn spawn(name: impl Into<String>, mut cmd: Command) -> Managed {
        let name = name.into();
        cmd.process_group(0).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // The test process inherits descriptors (cargo's jobserver pipe) that a program started
        // from a shell would not have: pass on only stdin, stdout and stderr. CLOEXEC rather
        // than close keeps std's own exec-error pipe working.
        // SAFETY: the closure runs between fork and exec and only makes one async-signal-safe
        // system call; its failure (a kernel without close_range) is harmless.
        unsafe {
            cmd.pre_exec(|| {
                libc::close_range(3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{name}: cannot spawn {cmd:?}: {e}"));
        let (tx, rx) = mpsc::channel();
        spawn_reader(child.stdout.take().expect("stdout piped"), Stream::Out, tx.clone());
        spawn_reader(child.stderr.take().expect("stderr piped"), Stream::Err, tx);
        let stdin = child.stdin.take();
        Managed {
            name,
            child,
            stdin,
            rx,
            out: Vec::new(),
            err: Vec::new(),
            cursor: 0,
            out_eof: false,
            err_eof: false,
            status: None,
        }
    }

    /// The process id (for `migrate-run`, the program's own pid: migrate-run execs it).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn record(&mut self, ev: Event) {
        match ev {
            Event::Line(Stream::Out, l) => self.out.push(l),
            Event::Line(Stream::Err, l) => self.err.push(l),
            Event::Eof(Stream::Out) => self.out_eof = true,
            Event::Eof(Stream::Err) => self.err_eof = true,
        }
    }

    /// Takes everything the reader threads have delivered so far, without waiting.
    fn drain(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(ev) => self.record(ev),
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return,
            }
        }
    }

    /// Waits for one event until `deadline`; false on timeout (or if both streams are closed).
    fn pump(&mut self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(ev) => {
                self.record(ev);
                true
            }
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => false,
        }
    }

    /// A report of everything seen so far, for failure messages.
    pub fn report(&mut self) -> String {
        self.drain();
        let status = match self.status {
            Some(s) => format!("exited: {}", describe_status(s)),
            None => match self.child.try_wait() {
                Ok(Some(s)) => {
                    self.status = Some(s);
                    format!("exited: {}", describe_status(s))
                }
                _ => "still running".to_string(),
            },
        };
        format!(
            "[{} pid {}] {status}\n--- stdout ({} lines{}) ---\n{}\n--- stderr{} ---\n{}\n---",
            self.name,
            self.child.id(),
            self.out.len(),
            if self.out_eof { ", closed" } else { "" },
            self.out.join("\n"),
            if self.err_eof { " (closed)" } else { "" },
            self.err.join("\n"),
        )
    }

    /// Waits for the next stdout line (after the last one a wait returned) that matches, and
    /// returns it. Panics with the whole output on timeout or when stdout closes first.
    #[track_caller]
    pub fn wait_line<M: Matcher>(&mut self, m: M, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.out[self.cursor..].iter().position(|l| m.matches(l)) {
                let idx = self.cursor + i;
                self.cursor = idx + 1;
                return self.out[idx].clone();
            }
            self.cursor = self.out.len();
            if self.out_eof {
                let r = self.report();
                panic!("{}: stdout closed while waiting for {}\n{r}", self.name, m.describe());
            }
            if !self.pump(deadline) && Instant::now() >= deadline {
                let r = self.report();
                panic!("{}: timed out after {timeout:?} waiting for {}\n{r}", self.name, m.describe());
            }
        }
    }

    /// Like [`Managed::wait_line`] but returns `None` instead of panicking when stdout closes.
    #[track_caller]
    pub fn wait_line_or_eof<M: Matcher>(&mut self, m: M, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.out[self.cursor..].iter().position(|l| m.matches(l)) {
                let idx = self.cursor + i;
                self.cursor = idx + 1;
                return Some(self.out[idx].clone());
            }
            self.cursor = self.out.len();
            if self.out_eof {
                return None;
            }
            if !self.pump(deadline) && Instant::now() >= deadline {
                let r = self.report();
                panic!("{}: timed out after {timeout:?} waiting for {}\n{r}", self.name, m.describe());
            }
        }
    }

    /// All stdout lines received so far (including ones already returned by waits).
    pub fn lines_so_far(&mut self) -> Vec<String> {
        self.drain();
        self.out.clone()
    }

    /// All stderr lines received so far.
    pub fn stderr_so_far(&mut self) -> Vec<String> {
        self.drain();
        self.err.clone()
    }

    /// Reads stdout until it closes and returns the lines not yet returned by a wait.
    #[track_caller]
    pub fn read_to_eof(&mut self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        while !self.out_eof {
            if !self.pump(deadline) && Instant::now() >= deadline {
                let r = self.report();
                panic!("{}: timed out after {timeout:?} waiting for stdout to close\n{r}", self.name);
            }
        }
        let rest = self.out[self.cursor..].to_vec();
        self.cursor = self.out.len();
        rest
    }

    /// Waits (bounded) until both stdout and stderr are closed; returns whether they did.
    fn settle(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !(self.out_eof && self.err_eof) {
            if !self.pump(deadline) && Instant::now() >= deadline {
                return false;
            }
        }
        true
    }

    /// Writes `line` and a newline to the process's stdin.
    #[track_caller]
    pub fn send_line(&mut self, line: &str) {
        let res = match self.stdin.as_mut() {
            Some(w) => w.write_all(format!("{line}\n").as_bytes()).and_then(|_| w.flush()),
            None => panic!("{}: stdin already closed", self.name),
        };
        if let Err(e) = res {
            let r = self.report();
            panic!("{}: cannot write {line:?} to stdin: {e}\n{r}", self.name);
        }
    }

    /// Closes the process's stdin (it reads EOF).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// True once the process has exited, without reaping it.
    fn exited_nowait(&self) -> bool {
        // SAFETY: siginfo_t is plain data; all-zero is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child with a valid out pointer; WNOWAIT leaves it reapable.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                self.child.id() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is valid to read for the SIGCHLD-style info waitid fills in.
        rc == 0 && unsafe { info.si_pid() } != 0
    }

    /// Kills whatever is left of the process group; the leader is known to be a zombie or
    /// still running and unreaped, so its pid (= pgid) cannot have been reused.
    fn kill_group(&self) {
        let pid = self.child.id() as i32;
        // SAFETY: plain kill(2) calls on our own unreaped child and its group.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
    }

    fn reap(&mut self) -> ExitStatus {
        let s = self.child.wait().unwrap_or_else(|e| panic!("{}: wait: {e}", self.name));
        self.status = Some(s);
        s
    }

    /// Non-blocking: the exit status if the process has exited (reaping it).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() && self.exited_nowait() {
            self.kill_group();
            self.reap();
        }
        self.status
    }

    /// Waits for the process to exit and returns its status. Whatever else is left in its
    /// process group is killed. Panics with the output on timeout.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_exit() {
                return s;
            }
            if Instant::now() >= deadline {
                let r = self.report();
                panic!("{}: timed out after {timeout:?} waiting for exit\n{r}", self.name);
            }
            // Exit polling interval; the deadline bounds the wait.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process (and its group) with SIGKILL, reaps it, and returns the stdout lines
    /// not yet returned by a wait, up to EOF.
    pub fn kill(&mut self) -> Vec<String> {
        if self.status.is_none() {
            self.kill_group();
            self.reap();
        }
        self.settle(Duration::from_secs(10));
        self.drain();
        let rest = self.out[self.cursor..].to_vec();
        self.cursor = self.out.len();
        rest
    }

    /// Sends `sig` to the process.
    #[track_caller]
    pub fn signal(&self, sig: i32) {
        assert!(self.status.is_none(), "{}: signal to a reaped process", self.name);
        // SAFETY: kill(2) on our own unreaped child.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "{}: kill({sig}): {}", self.name, std::io::Error::last_os_error());
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        self.kill_group();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        eprintln!("warning: {} (pid {}) did not die after SIGKILL", self.name, self.child.id());
    }
}

/// "exit code 3", "killed by signal 9", ...
pub fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{s:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Running the tools

/// The result of a tool run to completion.
#[derive(Debug)]
pub struct ToolOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl ToolOutput {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// For assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}\n---",
            describe_status(self.status),
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }

    /// Asserts the exit code and that stderr mentions every one of `needles` (case-insensitive).
    #[track_caller]
    pub fn assert_fails(&self, what: &str, code: i32, needles: &[&str]) {
        assert_eq!(self.code(), Some(code), "{what}: expected exit code {code}, got {}", self.describe());
        let err = self.stderr.to_lowercase();
        for n in needles {
            assert!(err.contains(&n.to_lowercase()), "{what}: stderr should mention {n:?}: {}", self.describe());
        }
    }
}

/// Runs `cmd` to completion (stdin closed) in its own process group; on timeout kills it and
/// panics with its output.
pub fn run_tool(name: &str, cmd: Command, timeout: Duration) -> ToolOutput {
    let mut m = Managed::spawn(name, cmd);
    m.close_stdin();
    let status = m.wait_exit(timeout);
    m.settle(Duration::from_secs(5));
    m.drain();
    ToolOutput { status, stdout: join_lines(&m.out), stderr: join_lines(&m.err) }
}

fn join_lines(lines: &[String]) -> String {
    let mut s = lines.join("\n");
    if !lines.is_empty() {
        s.push('\n');
    }
    s
}

/// `migrate-run --ckpt-dir DIR -- PROGRAM ARGS...` as a command, to customize before spawning.
pub fn migrate_run_cmd<I, S>(ckpt_dir: &Path, program: &Path, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(bin("migrate-run"));
    cmd.arg("--ckpt-dir").arg(ckpt_dir).arg("--").arg(program).args(args);
    cmd
}

/// Starts PROGRAM under `migrate-run --ckpt-dir DIR`.
pub fn migrate_run<I, S>(ckpt_dir: &Path, program: &Path, args: I) -> Managed
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let name = program.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Managed::spawn(name, migrate_run_cmd(ckpt_dir, program, args))
}

/// Runs `migrate-checkpoint [--kill] --dir DIR PID` and returns its output, whatever it is.
pub fn checkpoint_output(pid: i32, kill: bool, dir: &Path) -> ToolOutput {
    let mut cmd = Command::new(bin("migrate-checkpoint"));
    if kill {
        cmd.arg("--kill");
    }
    cmd.arg("--dir").arg(dir).arg(pid.to_string());
    run_tool("migrate-checkpoint", cmd, CKPT)
}

/// Checkpoints `pid` into `dir` (asserting success) and returns the image path (the last line
/// of migrate-checkpoint's stdout).
#[track_caller]
pub fn checkpoint(pid: i32, kill: bool, dir: &Path) -> PathBuf {
    let out = checkpoint_output(pid, kill, dir);
    assert!(
        out.status.success(),
        "migrate-checkpoint{} {pid} failed: {}",
        if kill { " --kill" } else { "" },
        out.describe()
    );
    let last = out.stdout.lines().rev().map(str::trim).find(|l| !l.is_empty());
    let path = match last {
        Some(l) => PathBuf::from(l),
        None => panic!("migrate-checkpoint printed no image path: {}", out.describe()),
    };
    assert!(path.is_file(), "migrate-checkpoint reported {} which is not a file: {}", path.display(), out.describe());
    path
}

/// `migrate-resume [EXTRA...] IMAGE` as a command.
pub fn resume_cmd(extra: &[&str], image: &Path) -> Command {
    let mut cmd = Command::new(bin("migrate-resume"));
    cmd.args(extra).arg(image);
    cmd
}

/// Starts `migrate-resume IMAGE` (in its own process group; it execs into the program).
pub fn resume(image: &Path) -> Managed {
    resume_with(&[], image)
}

/// Starts `migrate-resume EXTRA... IMAGE`.
pub fn resume_with(extra: &[&str], image: &Path) -> Managed {
    Managed::spawn("migrate-resume", resume_cmd(extra, image))
}

/// Runs `migrate-resume EXTRA... IMAGE` expecting it to fail quickly.
pub fn resume_output(extra: &[&str], image: &Path) -> ToolOutput {
    run_tool("migrate-resume", resume_cmd(extra, image), QUICK)
}

/// Runs `migrate-inspect EXTRA... IMAGE` to completion.
pub fn inspect_output(extra: &[&str], image: &Path) -> ToolOutput {
    let mut cmd = Command::new(bin("migrate-inspect"));
    cmd.args(extra).arg(image);
    run_tool("migrate-inspect", cmd, QUICK)
}

/// The `*.mig` files in `dir`.
#[track_caller]
pub fn images_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension() == Some(OsStr::new("mig")))
        .collect();
    v.sort();
    v
}

/// Waits (bounded, polling) until an image file appears in `dir`.
#[track_caller]
pub fn wait_for_image(dir: &Path, timeout: Duration) -> PathBuf {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(p) = images_in(dir).into_iter().next() {
            return p;
        }
        if Instant::now() >= deadline {
            let entries: Vec<String> = std::fs::read_dir(dir)
                .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            panic!("no *.mig image appeared in {} within {timeout:?}; entries: {entries:?}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing output lines

/// The value of `key=value` in a whitespace-separated line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|tok| tok.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// `field` parsed as a number; panics with the line if absent or malformed.
#[track_caller]
pub fn field_num<T: std::str::FromStr>(line: &str, key: &str) -> T {
    match field(line, key).and_then(|v| v.parse().ok()) {
        Some(v) => v,
        None => panic!("line {line:?} has no numeric {key}="),
    }
}

/// `field` parsed as hexadecimal.
#[track_caller]
pub fn field_hex(line: &str, key: &str) -> u64 {
    match field(line, key).and_then(|v| u64::from_str_radix(v, 16).ok()) {
        Some(v) => v,
        None => panic!("line {line:?} has no hex {key}="),
    }
}

/// The numbers `N` of the lines `<prefix>N...` (the token right after the prefix).
#[track_caller]
pub fn numbers_after(lines: &[String], prefix: &str) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|r| {
            r.split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no number after {prefix:?} in {r:?}"))
        })
        .collect()
}

/// Panics with the whole output if any line seen so far reports a failed check (`BAD ...`).
#[track_caller]
pub fn assert_no_bad(p: &mut Managed, when: &str) {
    let lines = p.lines_so_far();
    if let Some(b) = lines.iter().find(|l| l.starts_with("BAD")) {
        let r = p.report();
        panic!("{when}: a process reported a failed check: {b}\n{r}");
    }
}

/// Waits for the next line starting with `prefix`; a `BAD` line on the way fails the test.
#[track_caller]
pub fn next_unless_bad(p: &mut Managed, prefix: &str, timeout: Duration) -> String {
    let line = p.wait_line(|l: &str| l.starts_with(prefix) || l.starts_with("BAD"), timeout);
    if line.starts_with("BAD") {
        let r = p.report();
        panic!("{}: a process reported a failed check while waiting for {prefix:?}: {line}\n{r}", p.name());
    }
    line
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Compiles the C program `source` into `dir/<name>` with `$MIGRATE_CC` (default gcc), `-O1`
/// and `flags`; returns the executable's path.
#[track_caller]
pub fn compile_c(dir: &Path, name: &str, source: &str, flags: &[&str]) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let prog = dir.join(name);
    let cc = std::env::var("MIGRATE_CC").unwrap_or_else(|_| "gcc".into());
    let ok = Command::new(cc).arg("-O1").args(flags).arg("-o").arg(&prog).arg(&src).status().unwrap().success();
    assert!(ok, "building {name}.c failed");
    prog
}

/// The n of a `tick <n> ...` line.
#[track_caller]
pub fn tick_number(line: &str) -> u64 {
    let mut it = line.split_whitespace();
    match (it.next(), it.next().and_then(|n| n.parse().ok())) {
        (Some("tick"), Some(n)) => n,
        _ => panic!("not a tick line: {line:?}"),
    }
}

/// Is this a `tick <n> ...` line?
pub fn is_tick(line: &str) -> bool {
    line.starts_with("tick ")
}

/// The largest tick number among `lines` (0 if none).
pub fn last_tick(lines: &[String]) -> u64 {
    lines.iter().filter(|l| is_tick(l)).map(|l| tick_number(l)).max().unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Models of the example programs

/// One `tick` line of examples/c/counter.c.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterTick {
    pub n: u64,
    pub pid: i32,
    pub heap: u64,
    pub list: u64,
    pub data: u64,
    pub off: u64,
}

impl CounterTick {
    #[track_caller]
    pub fn parse(line: &str) -> CounterTick {
        CounterTick {
            n: tick_number(line),
            pid: field_num(line, "pid"),
            heap: field_hex(line, "heap"),
            list: field_num(line, "list"),
            data: field_hex(line, "data"),
            off: field_num(line, "off"),
        }
    }

    /// Checks the fields that are functions of n alone.
    #[track_caller]
    pub fn check_model(&self, line: &str) {
        assert_eq!(self.data, counter_data(self.n), "data= of tick {} does not follow the model: {line}", self.n);
        assert_eq!(self.off, counter_log_offset(self.n), "off= of tick {} does not follow the model: {line}", self.n);
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// The `data=` counter.c prints at tick n (mirrors its .data/.bss updates and checksum).
pub fn counter_data(n: u64) -> u64 {
    let mut data: [u64; 16] = std::array::from_fn(|i| i as u64 + 1);
    let mut bss: [u64; 16] = std::array::from_fn(|i| (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    for k in 1..=n {
        let i = (k % 16) as usize;
        bss[i] = bss[i].wrapping_add(k);
        data[(k.wrapping_mul(7) % 16) as usize] ^= k.wrapping_mul(FNV_PRIME);
    }
    data.iter().chain(bss.iter()).fold(FNV_OFFSET, |h, &v| (h ^ v).wrapping_mul(FNV_PRIME))
}

/// Bytes counter.c writes to its log at tick n: "A n\n" + "B n\n".
pub fn counter_log_bytes(n: u64) -> u64 {
    2 * (3 + n.to_string().len() as u64)
}

/// The `off=` counter.c prints at tick n (log size after n ticks).
pub fn counter_log_offset(n: u64) -> u64 {
    (1..=n).map(counter_log_bytes).sum()
}

/// Checks that counter.c's log is exactly `A 1, B 1, A 2, B 2, ...` with no gap, repeat or
/// partial line, covering at least `min_ticks` and at most `max_ticks` complete-or-half ticks
/// (a kill may land between the A and the B write). Returns the number of lines.
#[track_caller]
pub fn check_counter_log(path: &Path, min_ticks: u64, max_ticks: u64) -> usize {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "log {} ends with a partial line: {:?}",
        path.display(),
        tail(&text)
    );
    let lines: Vec<&str> = text.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        let want = format!("{} {}", if i % 2 == 0 { 'A' } else { 'B' }, i / 2 + 1);
        if *l != want {
            let from = i.saturating_sub(4);
            let to = (i + 4).min(lines.len());
            panic!(
                "log {} line {} is {l:?}, expected {want:?} (gap, repeat or overwrite); lines {from}..{to}: {:?}",
                path.display(),
                i + 1,
                &lines[from..to]
            );
        }
    }
    let n = lines.len() as u64;
    assert!(
        n >= 2 * min_ticks && n <= 2 * max_ticks,
        "log {} has {n} lines, expected between {} and {} (ticks {min_ticks}..={max_ticks}); tail: {:?}",
        path.display(),
        2 * min_ticks,
        2 * max_ticks,
        tail(&text)
    );
    lines.len()
}

fn tail(s: &str) -> &str {
    let mut start = s.len().saturating_sub(200);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// (`total=`, `state=`) that counter-service prints at tick n.
pub fn service_expect(n: u64) -> (u64, u64) {
    let mut counters: BTreeMap<String, u64> = BTreeMap::new();
    for k in 1..=n {
        *counters.entry(format!("c{}", k % 5)).or_insert(0) += k;
    }
    let total = counters.values().sum();
    let mut h = FNV_OFFSET;
    for (k, v) in &counters {
        for b in format!("{k}={v};").bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
    }
    (total, h)
}

/// The line counter-service prints and logs at tick n.
pub fn service_line(n: u64) -> String {
    let (total, state) = service_expect(n);
    format!("tick {n} total={total} state={state:016x}")
}

// ---------------------------------------------------------------------------------------------
// Mounts (root only)

/// A tmpfs mounted for the duration of a test; unmounted (lazily if busy) when dropped.
pub struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    /// `mount -t tmpfs -o OPTIONS tmpfs PATH`; `Err` with the reason if it fails.
    pub fn new(path: &Path, options: &str) -> Result<TmpfsMount, String> {
        std::fs::create_dir_all(path).map_err(|e| format!("create {}: {e}", path.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs -o {options} tmpfs {}: {} {}",
                path.display(),
                describe_status(out.status),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(TmpfsMount { path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.path).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        if !ok {
            let lazy = Command::new("umount").arg("-l").arg(&self.path).status().is_ok_and(|s| s.success());
            if !lazy {
                eprintln!("warning: could not unmount {}", self.path.display());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stderr waits

impl Managed {
    /// Waits until some stdout line (any seen so far, or a new one) matches, and returns it,
    /// whatever the cursor of [`Managed::wait_line`] (for lines of several processes whose
    /// order is not fixed). Panics with the whole output on timeout or when stdout closes first.
    #[track_caller]
    pub fn wait_line_seen<M: Matcher>(&mut self, m: M, timeout: Duration) -> String {
        self.wait_seen(false, m, timeout)
    }

    /// Waits until some stderr line (any seen so far, or a new one) matches, and returns it.
    /// Panics with the whole output on timeout or when stderr closes first.
    #[track_caller]
    pub fn wait_stderr_line<M: Matcher>(&mut self, m: M, timeout: Duration) -> String {
        self.wait_seen(true, m, timeout)
    }

    #[track_caller]
    fn wait_seen<M: Matcher>(&mut self, stderr: bool, m: M, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let (stream, on) = if stderr { ("stderr", " on stderr") } else { ("stdout", "") };
        loop {
            self.drain();
            let (lines, eof) = if stderr { (&self.err, self.err_eof) } else { (&self.out, self.out_eof) };
            if let Some(l) = lines.iter().find(|l| m.matches(l)) {
                return l.clone();
            }
            if eof {
                let r = self.report();
                panic!("{}: {stream} closed while waiting for {}{on}\n{r}", self.name, m.describe());
            }
            if !self.pump(deadline) && Instant::now() >= deadline {
                let r = self.report();
                panic!("{}: timed out after {timeout:?} waiting for {}{on}\n{r}", self.name, m.describe());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rewriting images

/// Copies image `src` to `dst` through the image crate, letting `edit` change the metadata on
/// the way: every section is read (checksum-verified) and written again in the same order
/// with the same kind, so section indices (`VmaEntry::data_section`) stay valid; memory pages
/// stay page-aligned; the metadata section is re-encoded from the edited `ImageMeta`. With an
/// `edit` that changes nothing, the copy is equivalent to the original (same metadata, same
/// section contents). Panics with a clear message on any error.
#[track_caller]
pub fn rewrite_image(src: &Path, dst: &Path, edit: impl FnOnce(&mut migrate_image::ImageMeta)) {
    use migrate_image::{ImageReader, ImageWriter, SectionKind, PAGE_SIZE};
    let reader = ImageReader::open(src).unwrap_or_else(|e| panic!("rewrite_image: open {}: {e}", src.display()));
    assert_eq!(
        reader.flags,
        0,
        "rewrite_image: {} has header flags {:#x}, which ImageWriter cannot reproduce",
        src.display(),
        reader.flags
    );
    let mut meta = reader.meta().unwrap_or_else(|e| panic!("rewrite_image: metadata of {}: {e}", src.display()));
    edit(&mut meta);
    let file = std::fs::File::create(dst).unwrap_or_else(|e| panic!("rewrite_image: create {}: {e}", dst.display()));
    let sections = reader.sections().to_vec();
    let mut writer = ImageWriter::new(file, sections.len())
        .unwrap_or_else(|e| panic!("rewrite_image: start {}: {e}", dst.display()));
    let mut metas = 0;
    for (i, s) in sections.iter().enumerate() {
        let index = match s.kind {
            SectionKind::Meta { proc: 0 } => {
                metas += 1;
                writer.add_meta(0, &meta)
            }
            kind => {
                let bytes = reader
                    .read_section(i)
                    .unwrap_or_else(|e| panic!("rewrite_image: section {i} of {}: {e}", src.display()));
                let aligned = matches!(kind, SectionKind::Pages { .. }) || s.offset % PAGE_SIZE == 0;
                writer.add_section_bytes(kind, &bytes, aligned)
            }
        }
        .unwrap_or_else(|e| panic!("rewrite_image: write section {i} to {}: {e}", dst.display()));
        assert_eq!(index as usize, i, "rewrite_image: section {i} of {} was written as {index}", src.display());
    }
    assert_eq!(metas, 1, "rewrite_image: {} has {metas} metadata sections, expected 1", src.display());
    let (mut file, _) = writer.finish().unwrap_or_else(|e| panic!("rewrite_image: finish {}: {e}", dst.display()));
    std::io::Write::flush(&mut file).unwrap_or_else(|e| panic!("rewrite_image: flush {}: {e}", dst.display()));
    // The copy must read back as a valid image carrying exactly the edited metadata.
    let check = ImageReader::open(dst).unwrap_or_else(|e| panic!("rewrite_image: reopen {}: {e}", dst.display()));
    check.verify_all().unwrap_or_else(|e| panic!("rewrite_image: verify {}: {e}", dst.display()));
    let back = check.meta().unwrap_or_else(|e| panic!("rewrite_image: metadata of {}: {e}", dst.display()));
    assert!(back == meta, "rewrite_image: {} does not read back the metadata written", dst.display());
}

// ---------------------------------------------------------------------------------------------
// Process trees

/// Whether process `pid`'s command line or environment contains `marker` (false if it is gone,
/// a zombie, or unreadable).
pub fn process_mentions(pid: i32, marker: &[u8]) -> bool {
    if marker.is_empty() {
        return false;
    }
    ["cmdline", "environ"]
        .iter()
        .any(|f| std::fs::read(format!("/proc/{pid}/{f}")).is_ok_and(|b| b.windows(marker.len()).any(|w| w == marker)))
}

/// Every live process (other than this one) whose command line or environment mentions `marker`.
pub fn processes_mentioning(marker: &[u8]) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me && process_mentions(pid, marker))
        .collect()
}

/// Kills, when dropped (a failed test included), every process of a tree under test: the pids
/// the test recorded and every process whose command line or environment mentions the marker
/// — a test's temporary directory, which migrate-run puts in every managed process's
/// environment (`MIGRATE_CKPT_DIR`) and migrate-resume in every resumed one's (the image path).
/// A recorded pid is killed only while it still mentions the marker, so a pid reused by an
/// unrelated process is left alone. Bounded: gives up (with a warning) after 10 s.
pub struct TreeGuard {
    marker: Vec<u8>,
    pids: Vec<i32>,
}

impl TreeGuard {
    pub fn new(marker: &Path) -> TreeGuard {
        TreeGuard { marker: marker.as_os_str().as_encoded_bytes().to_vec(), pids: Vec::new() }
    }

    /// Records a pid the test learned (a child a program printed, ...).
    pub fn add(&mut self, pid: i32) {
        if pid > 0 && !self.pids.contains(&pid) {
            self.pids.push(pid);
        }
    }

    /// Kills everything now (also done on drop); returns the pids it signalled.
    pub fn kill_all(&mut self) -> Vec<i32> {
        let mut killed = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut found: Vec<i32> =
                self.pids.iter().copied().filter(|&p| process_mentions(p, &self.marker)).collect();
            for p in processes_mentioning(&self.marker) {
                if !found.contains(&p) {
                    found.push(p);
                }
            }
            if found.is_empty() {
                return killed;
            }
            for &p in &found {
                // SAFETY: kill(2) on a process just checked to belong to this test.
                unsafe { libc::kill(p, libc::SIGKILL) };
                if !killed.contains(&p) {
                    killed.push(p);
                }
            }
            if Instant::now() >= deadline {
                eprintln!("warning: processes {found:?} of a test tree survived SIGKILL for 10 s");
                return killed;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Connects to the port, retrying until `timeout` (the resumed listener appears when
/// migrate-resume has recreated it).
pub fn connect_within(port: u16, timeout: Duration) -> std::net::TcpStream {
    let deadline = Instant::now() + timeout;
    loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                return s;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("nothing listens on 127.0.0.1:{port} after {timeout:?}: {e}"),
        }
    }
}

/// `lockclient` (examples/lockserver) driving ADDR with `clients` connections holding `hold`
/// locks each until the file `stop` exists; returns once it reports operations done. Its
/// reply timeout is far above a checkpoint and resume: the stall is measured, not limited.
pub fn lockclient(addr: &str, clients: u64, hold: u64, stop: &Path) -> Managed {
    let mut cmd = Command::new(bin("lockclient"));
    cmd.args(["--addr", addr, "--clients", &clients.to_string(), "--hold", &hold.to_string()])
        .arg("--until-file")
        .arg(stop)
        .args(["--reply-timeout", "100"]);
    let mut client = Managed::spawn("lockclient", cmd);
    client.wait_line(|l: &str| l.starts_with("progress ") && field_num::<u64>(l, "ops") > 0, STARTUP);
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_model_matches_the_program() {
        // Values printed by examples/c/counter.c (they do not depend on the pid or seed).
        assert_eq!(counter_data(1), 0x0c03_d603_1afd_362b);
        assert_eq!(counter_data(5), 0x2f55_374c_b590_e18f);
        assert_eq!(counter_log_offset(1), 8);
        assert_eq!(counter_log_offset(9), 72);
        assert_eq!(counter_log_offset(10), 82);
    }

    #[test]
    fn service_model_matches_the_program() {
        assert_eq!(service_line(1), "tick 1 total=1 state=875786cbae57fd74");
        assert_eq!(service_line(7), "tick 7 total=28 state=63473f097adcd2b0");
    }

    #[test]
    fn fields_parse() {
        let l = "tick 12 pid=42 heap=00ff list=7 data=0a off=99";
        assert_eq!(tick_number(l), 12);
        assert_eq!(field(l, "pid"), Some("42"));
        assert_eq!(field_hex(l, "heap"), 0xff);
        assert_eq!(field_num::<u64>(l, "off"), 99);
        assert_eq!(field(l, "he"), None);
    }

    #[test]
    fn counter_runs_unmanaged() {
        // The C program itself, without migrate: the model must match real output.
        let dir = temp_dir();
        let log = dir.path().join("log");
        let mut cmd = Command::new(cbin("counter"));
        cmd.arg("1").arg("1").arg(&log);
        let mut p = Managed::spawn("counter", cmd);
        let ready = p.wait_line("ready ", STARTUP);
        assert_eq!(field_num::<i32>(&ready, "pid"), p.pid());
        assert_eq!(field_num::<u32>(&ready, "ppid"), std::process::id());
        let first = CounterTick::parse(&p.wait_line("tick ", LINE));
        for n in 2..=20 {
            let line = p.wait_line("tick ", LINE);
            let t = CounterTick::parse(&line);
            assert_eq!(t.n, n);
            t.check_model(&line);
            assert_eq!((t.heap, t.list, t.pid), (first.heap, first.list, first.pid));
        }
        let rest = p.kill();
        let last = last_tick(&rest).max(20);
        check_counter_log(&log, last, last + 1);
    }
}
