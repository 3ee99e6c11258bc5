//! CLOCK_MONOTONIC and CLOCK_BOOTTIME continuity: by default a resumed program runs in a time
//! namespace whose clocks carry on from where they were at the checkpoint, so neither the time
//! the image waited nor a different host's uptime shows; CLOCK_REALTIME tells the real time.
//! `--host-clocks` opts out (the stopped time then shows). An unprivileged user gets the time
//! namespace through a user namespace of its own that maps just its uid and gid.

use migrate_tests::*;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const DOWNTIME: Duration = Duration::from_millis(1500);

fn clocks(line: &str) -> (i64, i64, i64) {
    (field_num(line, "mono"), field_num(line, "boot"), field_num(line, "real"))
}

/// Runs the clocks program, checkpoints it with --kill, waits DOWNTIME, resumes it with
/// `extra` and returns the clocks of the last line before and the first line after, and
/// migrate-resume's stderr.
fn around_a_resume(extra: &[&str]) -> ((i64, i64, i64), (i64, i64, i64), String) {
    let tmp = temp_dir();
    let dir = tmp.path();
    let mut p = migrate_run(dir, &cbin("clocks"), Vec::<String>::new());
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    p.wait_line("tick 3 ", LINE);
    let image = checkpoint(pid, true, dir);
    p.read_to_eof(LINE);
    p.wait_exit(Duration::from_secs(10));
    let before = p.lines_so_far();
    let last = before.iter().rev().find(|l| l.starts_with("tick ")).expect("a tick before").clone();
    // Not a synchronization: the image waiting before its resume is the scenario.
    std::thread::sleep(DOWNTIME);
    let mut s = resume_with(extra, &image);
    let first = s.wait_line("tick ", STARTUP);
    // kill() reads stderr to its end: a warning cannot still be on its way.
    s.kill();
    let stderr = s.stderr_so_far().join("\n");
    (clocks(&last), clocks(&first), stderr)
}

#[test]
fn monotonic_and_boottime_continue_across_a_resume() {
    let (before, after, stderr) = around_a_resume(&[]);
    let down = DOWNTIME.as_millis() as i64;
    assert!(after.2 - before.2 >= down, "realtime moved on by the downtime: {before:?} -> {after:?}");
    if !is_root() {
        if let Err(why) = user_namespaces() {
            assert!(stderr.contains("time namespace"), "no user namespace ({why}): says why the clocks jump: {stderr}");
            return;
        }
    }
    assert!(!stderr.contains("time namespace"), "the clocks were kept, without a warning: {stderr}");
    let mono = after.0 - before.0;
    let boot = after.1 - before.1;
    assert!((0..down / 2).contains(&mono), "CLOCK_MONOTONIC moved {mono} ms across a {down} ms downtime");
    assert!((0..down / 2).contains(&boot), "CLOCK_BOOTTIME moved {boot} ms across a {down} ms downtime");
}

#[test]
fn host_clocks_shows_the_stopped_time() {
    let (before, after, _) = around_a_resume(&["--host-clocks"]);
    let down = DOWNTIME.as_millis() as i64;
    assert!(after.0 - before.0 >= down, "with --host-clocks the downtime shows: {before:?} -> {after:?}");
}

// ---------------------------------------------------------------------------------------------
// Without privilege

/// The user the unprivileged flow runs as when the tests run as root.
const NOBODY: u32 = 65534;

/// The clocks program, also printing the ids it sees.
const ID_CLOCKS: &str = r#"
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static long long ms(clockid_t c) {
    struct timespec t;
    clock_gettime(c, &t);
    return t.tv_sec * 1000LL + t.tv_nsec / 1000000;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready pid=%d\n", (int)getpid());
    for (int i = 1;; i++) {
        printf("tick %d mono=%lld boot=%lld real=%lld uid=%d gid=%d\n", i, ms(CLOCK_MONOTONIC),
               ms(CLOCK_BOOTTIME), ms(CLOCK_REALTIME), (int)getuid(), (int)getgid());
        usleep(100000);
    }
}
"#;

/// The uid and gid the unprivileged flow runs as: nobody when we are root, else ourselves.
fn unprivileged_ids() -> (u32, u32) {
    if is_root() {
        (NOBODY, NOBODY)
    } else {
        // SAFETY: getuid/getgid have no preconditions.
        unsafe { (libc::getuid(), libc::getgid()) }
    }
}

/// Makes `cmd` run as the unprivileged user (no supplementary groups) when we are root.
fn as_unprivileged(cmd: &mut Command) {
    if !is_root() {
        return;
    }
    // SAFETY: runs between fork and exec and makes only async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(NOBODY) != 0 || libc::setuid(NOBODY) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Whether the unprivileged user may make a user namespace with a time namespace in it here
/// (distributions can forbid it); `Err` says why not.
fn user_namespaces() -> Result<(), String> {
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "exit 0"]);
    as_unprivileged(&mut cmd);
    // SAFETY: runs between fork and exec and makes one async-signal-safe system call.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWTIME) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("the probe ended with {}", describe_status(s))),
        Err(e) => {
            let sysctls: Vec<String> = [
                "/proc/sys/user/max_user_namespaces",
                "/proc/sys/kernel/unprivileged_userns_clone",
                "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
            ]
            .iter()
            .filter_map(|p| Some(format!("{p}={}", std::fs::read_to_string(p).ok()?.trim())))
            .collect();
            Err(format!("unshare(CLONE_NEWUSER|CLONE_NEWTIME) as an unprivileged user: {e} ({})", sysctls.join(", ")))
        }
    }
}

/// The migrate binaries as the unprivileged user can run them: in place if it can reach them,
/// else copies in `dir` (libmigrate.so beside them).
struct Tools {
    run: PathBuf,
    checkpoint: PathBuf,
    resume: PathBuf,
    lib: Option<PathBuf>,
}

impl Tools {
    fn for_unprivileged(dir: &Path) -> Tools {
        let lib = target_dir().join("libmigrate.so");
        let (run, checkpoint, resume) = (bin("migrate-run"), bin("migrate-checkpoint"), bin("migrate-resume"));
        let mut probe = Command::new("/bin/sh");
        probe.args(["-c", r#"test -x "$1" && test -x "$2" && test -x "$3" && test -r "$4""#, "sh"]);
        probe.args([&run, &checkpoint, &resume, &lib]);
        as_unprivileged(&mut probe);
        if probe.status().is_ok_and(|s| s.success()) {
            return Tools { run, checkpoint, resume, lib: None };
        }
        eprintln!("the unprivileged user cannot reach {}: using copies", target_dir().display());
        let bin_dir = dir.join("bin");
        std::fs::create_dir(&bin_dir).unwrap();
        let copy = |from: &Path| {
            let to = bin_dir.join(from.file_name().unwrap());
            std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
            to
        };
        Tools { run: copy(&run), checkpoint: copy(&checkpoint), resume: copy(&resume), lib: Some(copy(&lib)) }
    }

    /// `tool`, run as the unprivileged user from `dir`.
    fn command(&self, tool: &Path, dir: &Path) -> Command {
        let mut cmd = Command::new(tool);
        cmd.current_dir(dir).env("XDG_RUNTIME_DIR", dir);
        if let Some(lib) = &self.lib {
            cmd.env("MIGRATE_LIB", lib);
        }
        as_unprivileged(&mut cmd);
        cmd
    }

    fn run(&self, dir: &Path, program: &Path) -> Managed {
        let mut cmd = self.command(&self.run, dir);
        cmd.arg("--ckpt-dir").arg(dir).arg("--").arg(program);
        Managed::spawn("id-clocks", cmd)
    }

    /// `migrate-checkpoint --kill`; the image's path.
    #[track_caller]
    fn checkpoint(&self, dir: &Path, pid: i32) -> PathBuf {
        let mut cmd = self.command(&self.checkpoint, dir);
        cmd.arg("--kill").arg("--dir").arg(dir).arg(pid.to_string());
        let out = run_tool("migrate-checkpoint", cmd, CKPT);
        assert!(out.status.success(), "unprivileged migrate-checkpoint --kill {pid} failed: {}", out.describe());
        let last = out.stdout.lines().rev().map(str::trim).find(|l| !l.is_empty());
        PathBuf::from(last.unwrap_or_else(|| panic!("no image path printed: {}", out.describe())))
    }

    fn resume(&self, dir: &Path, image: &Path) -> Managed {
        let mut cmd = self.command(&self.resume, dir);
        cmd.arg(image);
        Managed::spawn("migrate-resume", cmd)
    }
}

/// The numbers of /proc/PID/uid_map, as seen from here.
fn uid_map(pid: i32) -> Vec<u64> {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap_or_else(|e| panic!("uid_map of {pid}: {e}"));
    text.split_whitespace().map(|n| n.parse().unwrap()).collect()
}

/// Checks one resume's clocks: the last tick before, the first after.
#[track_caller]
fn assert_continued(round: &str, last: &str, first: &str) {
    let (before, after) = (clocks(last), clocks(first));
    let down = DOWNTIME.as_millis() as i64;
    assert!(after.2 - before.2 >= down, "{round}: realtime moved on by the downtime: {before:?} -> {after:?}");
    let mono = after.0 - before.0;
    let boot = after.1 - before.1;
    assert!((0..down / 2).contains(&mono), "{round}: CLOCK_MONOTONIC moved {mono} ms across a {down} ms downtime");
    assert!((0..down / 2).contains(&boot), "{round}: CLOCK_BOOTTIME moved {boot} ms across a {down} ms downtime");
}

/// The whole flow as an ordinary user (nobody when the tests run as root): run, checkpoint,
/// resume — the clocks continue, the program keeps its uid and gid, in a user namespace that
/// maps only them — then checkpoint the resumed program (its control socket answers from inside
/// that namespace) and resume it once more.
#[test]
fn an_unprivileged_user_keeps_its_clocks_too() {
    if let Err(why) = user_namespaces() {
        eprintln!("SKIP: unprivileged user namespaces are not available here: {why}");
        return;
    }
    let (uid, gid) = unprivileged_ids();
    let tmp = temp_dir();
    let dir = tmp.path();
    let program = compile_c(dir, "id-clocks", ID_CLOCKS, &[]);
    if is_root() {
        std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let tools = Tools::for_unprivileged(dir);

    let mut p = tools.run(dir, &program);
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    let tick = p.wait_line("tick 3 ", LINE);
    assert_eq!((field_num::<u32>(&tick, "uid"), field_num::<u32>(&tick, "gid")), (uid, gid), "runs unprivileged");
    let image = tools.checkpoint(dir, pid);
    p.read_to_eof(LINE);
    p.wait_exit(Duration::from_secs(10));
    let last = p.lines_so_far().into_iter().rev().find(|l| l.starts_with("tick ")).expect("a tick before");
    // Not a synchronization: the image waiting before its resume is the scenario.
    std::thread::sleep(DOWNTIME);

    let mut s = tools.resume(dir, &image);
    let first = s.wait_line("tick ", STARTUP);
    assert_continued("first resume", &last, &first);
    assert_eq!((field_num::<u32>(&first, "uid"), field_num::<u32>(&first, "gid")), (uid, gid), "ids kept");
    assert_eq!(uid_map(s.pid()), [uid as u64, uid as u64, 1], "in a user namespace mapping just its uid");
    s.wait_line("tick ", LINE);
    let image = tools.checkpoint(dir, s.pid());
    s.read_to_eof(LINE);
    s.wait_exit(Duration::from_secs(10));
    s.kill(); // reads stderr to its end
    let last = s.lines_so_far().into_iter().rev().find(|l| l.starts_with("tick ")).expect("a tick before");
    let mut stderr = s.stderr_so_far();
    std::thread::sleep(DOWNTIME);

    let mut s = tools.resume(dir, &image);
    let first = s.wait_line("tick ", STARTUP);
    s.kill();
    stderr.extend(s.stderr_so_far());
    assert_continued("second resume", &last, &first);
    let stderr = stderr.join("\n");
    assert!(!stderr.contains("time namespace"), "no warning about the clocks: {stderr}");
}
