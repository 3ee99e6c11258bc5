//! `migrate-run bash -i` on a pseudo-terminal, driven like a user would: a foreground job
//! (the counter) runs, the whole session is checkpointed with --kill, and migrate-resume on a
//! new terminal brings back the shell and its job: the counter continues at the next tick,
//! Ctrl-Z stops it, `fg` continues it, Ctrl-C ends it, and the shell still has its variables
//! and its pid.

use migrate_tests::*;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A pseudo-terminal whose master side we read and write; everything read is kept.
struct Pty {
    master: File,
    seen: Arc<Mutex<(String, bool)>>,
    slave: Option<OwnedFd>,
}

impl Pty {
    fn open() -> Pty {
        let (mut m, mut s) = (-1, -1);
        let ws = libc::winsize { ws_row: 40, ws_col: 120, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: openpty writes two descriptors we then own; the other pointers may be null.
        let rc = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: fresh descriptors from openpty, owned from here on.
        let (master, slave) = unsafe { (File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        let seen = Arc::new(Mutex::new((String::new(), false)));
        let mut reader = master.try_clone().unwrap();
        let sink = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break, // EIO: every slave descriptor is closed
                    Ok(n) => sink.lock().unwrap().0.push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
            sink.lock().unwrap().1 = true;
        });
        Pty { master, seen, slave: Some(slave) }
    }

    /// Starts `cmd` as a session leader with this terminal as its controlling terminal and
    /// stdio; our own copy of the slave side is closed (so reads end when the session does).
    fn spawn(&mut self, mut cmd: Command) -> Child {
        let slave = self.slave.take().expect("one program per terminal");
        cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: between fork and exec: setsid and TIOCSCTTY are async-signal-safe system
        // calls; close_range marks inherited descriptors close-on-exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close_range(3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int);
                Ok(())
            });
        }
        cmd.spawn().expect("spawn on the pty")
    }

    fn send(&mut self, s: &str) {
        self.master.write_all(s.as_bytes()).unwrap();
    }

    fn text(&self) -> String {
        self.seen.lock().unwrap().0.clone()
    }

    /// Waits until the output after byte `from` matches `pred`; returns the end of the match
    /// search (the output length then) and the matching line.
    fn wait(&self, from: usize, what: &str, pred: impl Fn(&str) -> bool, timeout: Duration) -> (usize, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text();
            let tail = text.get(from..).unwrap_or("");
            if let Some(line) = tail.split(['\n', '\r']).find(|l| pred(l)) {
                return (text.len(), line.to_string());
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {timeout:?}; terminal shows:\n{text}\nprocesses:\n{}",
                session_report()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_closed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.seen.lock().unwrap().1 {
            assert!(Instant::now() < deadline, "terminal still open after {timeout:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Our processes on terminals: state, wait channel and signal masks (for a failure report).
fn session_report() -> String {
    let mut out = String::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let tty = stat.rsplit(") ").next().and_then(|r| r.split_whitespace().nth(4)).unwrap_or("0");
        if tty == "0" {
            continue;
        }
        let pick = |k: &str| status.lines().find(|l| l.starts_with(k)).unwrap_or("").to_string();
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        out += &format!(
            "{pid} {} {} pgrp/tpgid {:?} wchan {wchan} {} {} {}\n",
            pick("Name"),
            pick("State"),
            stat.rsplit(") ").next().map(|r| r.split_whitespace().skip(2).take(6).collect::<Vec<_>>()),
            pick("SigPnd"),
            pick("ShdPnd"),
            pick("SigBlk")
        );
    }
    out
}

/// SIGKILLs every process of session `sid` (a shell puts its jobs in groups of their own).
fn kill_session(sid: i32) {
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        // SAFETY: getsid(2) reads another process's session id.
        if unsafe { libc::getsid(pid) } == sid {
            // SAFETY: kill(2) on a process of the session this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Kills the session a child leads when the test ends, passing or failing.
struct SessionGuard(i32);
impl Drop for SessionGuard {
    fn drop(&mut self) {
        kill_session(self.0);
    }
}

fn tick_of(line: &str) -> Option<u64> {
    let rest = line.trim().strip_prefix("tick ")?;
    rest.split_whitespace().next()?.parse().ok()
}

fn last_tick(text: &str) -> u64 {
    text.split(['\n', '\r']).filter_map(tick_of).max().expect("a tick on the terminal")
}

fn shell_cmd(program: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args).env("TERM", "dumb").env("PS1", "$ ").env("HISTFILE", "/dev/null").env_remove("PROMPT_COMMAND");
    c
}

#[test]
fn interactive_bash_with_a_foreground_job_resumes_with_job_control() {
    let tmp = temp_dir();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let log = dir.join("counter.log");
    let mut t1 = Pty::open();
    let ckpt = dir.to_string_lossy().into_owned();
    let mut run =
        t1.spawn(shell_cmd(&bin("migrate-run"), &["--ckpt-dir", &ckpt, "bash", "--norc", "--noprofile", "-i"]));
    let _g1 = SessionGuard(run.id() as i32);

    t1.send("x=41; echo marker-$((x+1)) pid=$$\n");
    let (at, marker) = t1.wait(0, "the shell's answer", |l| l.starts_with("marker-42 pid="), STARTUP);
    let shell_pid: i32 = field_num(&marker, "pid");
    assert_eq!(shell_pid, run.id() as i32, "migrate-run execs the shell");
    t1.send(&format!("{} 1 100 {}\n", cbin("counter").display(), log.display()));
    t1.wait(at, "the job's third tick", |l| tick_of(l).is_some_and(|n| n >= 3), STARTUP);

    let image = checkpoint(shell_pid, true, &dir);
    let status = run.wait().unwrap();
    assert!(!status.success(), "the checkpointed shell was killed");
    t1.wait_closed(LINE);
    let last = last_tick(&t1.text());

    // A new terminal, as after logging in on the target host.
    let mut t2 = Pty::open();
    let mut resume = t2.spawn(shell_cmd(&bin("migrate-resume"), &[&image.to_string_lossy()]));
    let _g2 = SessionGuard(resume.id() as i32);
    let (at, first) = t2.wait(0, "a tick after the resume", |l| tick_of(l).is_some(), STARTUP);
    assert_eq!(tick_of(&first), Some(last + 1), "the job continues at the next tick");

    // Job control on the new terminal: stop, continue, interrupt.
    t2.send("\x1a");
    let (at, _) = t2.wait(at, "the job stopped", |l| l.contains("Stopped"), QUICK);
    let stopped_at = last_tick(&t2.text());
    t2.send("fg\n");
    let (at, _) = t2.wait(at, "the job continued by fg", |l| tick_of(l).is_some_and(|n| n > stopped_at), QUICK);
    t2.send("\x03");
    t2.send("echo after-$x pid=$$\n");
    let (_, after) = t2.wait(at, "the shell after Ctrl-C", |l| l.starts_with("after-41 pid="), QUICK);
    assert_eq!(field_num::<i32>(&after, "pid"), shell_pid, "the same shell, same $$");

    t2.send("exit\n");
    let deadline = Instant::now() + QUICK;
    loop {
        if let Some(st) = resume.try_wait().unwrap() {
            assert!(st.success(), "the resumed shell exits 0: {st:?}\n{}", t2.text());
            break;
        }
        assert!(Instant::now() < deadline, "the resumed shell did not exit:\n{}", t2.text());
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_file(&image);
}
