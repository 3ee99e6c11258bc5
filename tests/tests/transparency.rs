//! Transparency: a program under migrate cannot tell. Its exit status and stdin pass through
//! migrate-run and migrate-resume; the checkpoint signal is hidden from its own view of signal
//! handling; `ps` shows the same command line, environment and name after a resume; and no
//! timed wait returns early or with EINTR because of a checkpoint.

use migrate_tests::*;
use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// 1. Exit status and stdin passthrough (examples/c/exiter.c)

/// Starts exiter under migrate-run; returns it and its pid (checked to be migrate-run's).
fn start_exiter(dir: &Path) -> (Managed, i32) {
    let mut p = migrate_run(dir, &cbin("exiter"), Vec::<&OsStr>::new());
    let ready = p.wait_line("ready ", STARTUP);
    let pid: i32 = field_num(&ready, "pid");
    assert_eq!(pid, p.pid(), "migrate-run must exec the program in place (same pid): {ready}");
    (p, pid)
}

#[test]
fn exit_code_passes_through_migrate_run() {
    let dir = temp_dir();
    let (mut p, _) = start_exiter(dir.path());
    p.send_line("7");
    p.wait_line(|l: &str| l == "exiting 7", LINE);
    let status = p.wait_exit(LINE);
    assert_eq!(status.code(), Some(7), "migrate-run's exit status must be the program's (7)\n{}", p.report());
}

#[test]
fn death_by_sigterm_passes_through_migrate_run() {
    let dir = temp_dir();
    let (mut p, _) = start_exiter(dir.path());
    p.signal(libc::SIGTERM);
    let status = p.wait_exit(LINE);
    assert_eq!(
        status.signal(),
        Some(libc::SIGTERM),
        "a program killed by SIGTERM: migrate-run's status must be killed by signal 15, got {}\n{}",
        describe_status(status),
        p.report()
    );
}

#[test]
fn raised_signal_passes_through_migrate_run() {
    let dir = temp_dir();
    let (mut p, _) = start_exiter(dir.path());
    p.send_line("signal 1");
    p.wait_line(|l: &str| l == "raising 1", LINE);
    let status = p.wait_exit(LINE);
    assert_eq!(
        status.signal(),
        Some(libc::SIGHUP),
        "a program that raises SIGHUP (default action): migrate-run's status must be killed by signal 1, got {}\n{}",
        describe_status(status),
        p.report()
    );
}

#[test]
fn exit_code_and_stdin_pass_through_migrate_resume() {
    let dir = temp_dir();
    let (mut orig, pid) = start_exiter(dir.path());
    let image = checkpoint(pid, true, dir.path());
    let rest = orig.read_to_eof(LINE);
    assert!(rest.is_empty(), "the original must print nothing more (it waits on stdin): {rest:?}");
    orig.wait_exit(Duration::from_secs(5));

    let mut r = resume(&image);
    // The resumed program reads migrate-resume's stdin (the original was blocked reading its own).
    r.send_line("9");
    let line = r.wait_line(|_: &str| true, STARTUP);
    assert_eq!(line, "exiting 9", "the resumed program must read `9` from migrate-resume's stdin\n{}", r.report());
    let status = r.wait_exit(LINE);
    assert_eq!(status.code(), Some(9), "migrate-resume's exit status must be the program's (9)\n{}", r.report());
}

// ---------------------------------------------------------------------------------------------
// 2. Checkpoint signal virtualization (examples/c/sigclash.c)

fn start_sigclash(cmd: Command) -> (Managed, i32) {
    let mut p = Managed::spawn("sigclash", cmd);
    let ready = p.wait_line("ready ", STARTUP);
    let pid: i32 = field_num(&ready, "pid");
    assert_eq!(pid, p.pid(), "migrate-run must exec the program in place (same pid): {ready}");
    (p, pid)
}

/// Sends `tick` and expects `tick <n>`.
#[track_caller]
fn sigclash_tick(p: &mut Managed, n: u64) {
    p.send_line("tick");
    let line = p.wait_line("tick ", LINE);
    assert_eq!(line, format!("tick {n}"), "the program must answer `tick` in order\n{}", p.report());
}

/// Sends `query` and returns the `handler=... blocked=...` answer.
fn sigclash_query(p: &mut Managed) -> String {
    p.send_line("query");
    p.wait_line("handler=", LINE)
}

#[track_caller]
fn assert_own_handler_never_ran(p: &mut Managed, what: &str) {
    let lines = p.lines_so_far();
    assert!(
        !lines.iter().any(|l| l == "own-handler"),
        "{what}: the program's own SIGUSR2 handler must never run\n{}",
        p.report()
    );
}

/// The program installs a handler for SIGUSR2 (migrate's default checkpoint signal) and blocks
/// it: `kill -USR2` must still checkpoint it, leave it running, never run its handler, and the
/// program must see its own handler and its own mask. migrate warns about the clash.
#[test]
fn checkpoint_signal_is_virtualized() {
    let dir = temp_dir();
    let (mut p, _) = start_sigclash(migrate_run_cmd(dir.path(), &cbin("sigclash"), Vec::<&OsStr>::new()));
    sigclash_tick(&mut p, 1);
    // The program's view before any checkpoint; checked below, after the checkpoint parts.
    let before = sigclash_query(&mut p);

    p.signal(libc::SIGUSR2);
    let image = wait_for_image(dir.path(), CKPT);
    if let Err(e) = migrate_image::ImageReader::open(&image).and_then(|r| r.verify_all()) {
        panic!("the USR2 image {} is not a valid image: {e}", image.display());
    }
    assert!(p.try_exit().is_none(), "kill -USR2 must leave the program running\n{}", p.report());
    sigclash_tick(&mut p, 2);

    let warning =
        p.wait_stderr_line(|l: &str| l.contains("signal 12") || l.contains("migrate uses"), LINE).to_lowercase();
    assert!(warning.contains("signal 12"), "the warning should name the signal (12): {warning}");

    let after = sigclash_query(&mut p);
    assert_own_handler_never_ran(&mut p, "after kill -USR2");
    for (when, query) in [("before any checkpoint", &before), ("after the USR2 checkpoint", &after)] {
        assert_eq!(
            query,
            "handler=ok blocked=1",
            "{when}: the program must see its own view of SIGUSR2: sigaction() must return its own handler \
             (handler=ok) and sigprocmask() must report SIGUSR2 blocked, as the program asked (blocked=1)\n{}",
            p.report()
        );
    }

    p.send_line("quit");
    p.wait_line("bye", LINE);
    let status = p.wait_exit(LINE);
    assert_eq!(status.code(), Some(0), "{}", p.report());
    assert_own_handler_never_ran(&mut p, "at exit");
}

/// With `--signal USR1`, SIGUSR2 is the program's own: `kill -USR1` and migrate-checkpoint
/// both produce images, and the program's handler and mask for SIGUSR2 are its own.
#[test]
fn other_checkpoint_signal_leaves_usr2_to_the_program() {
    let dir = temp_dir();
    let mut cmd = Command::new(bin("migrate-run"));
    cmd.arg("--signal").arg("USR1").arg("--ckpt-dir").arg(dir.path()).arg("--").arg(cbin("sigclash"));
    let (mut p, pid) = start_sigclash(cmd);
    sigclash_tick(&mut p, 1);

    p.signal(libc::SIGUSR1);
    let image = wait_for_image(dir.path(), CKPT);
    if let Err(e) = migrate_image::ImageReader::open(&image).and_then(|r| r.verify_all()) {
        panic!("the USR1 image {} is not a valid image: {e}", image.display());
    }
    assert!(p.try_exit().is_none(), "kill -USR1 must leave the program running\n{}", p.report());
    sigclash_tick(&mut p, 2);

    let other = temp_dir();
    let image2 = checkpoint(pid, false, other.path());
    assert!(p.try_exit().is_none(), "migrate-checkpoint must leave the program running\n{}", p.report());
    sigclash_tick(&mut p, 3);
    if let Err(e) = migrate_image::ImageReader::open(&image2).and_then(|r| r.verify_all()) {
        panic!("the migrate-checkpoint image {} is not a valid image: {e}", image2.display());
    }

    let query = sigclash_query(&mut p);
    assert_eq!(query, "handler=ok blocked=1", "SIGUSR2 is the program's own with --signal USR1\n{}", p.report());
    assert_own_handler_never_ran(&mut p, "with --signal USR1 (SIGUSR2 is blocked and never sent)");
    let clash: Vec<String> = p.stderr_so_far().into_iter().filter(|l| l.contains("migrate uses")).collect();
    assert!(clash.is_empty(), "no clash warning with --signal USR1: {clash:?}");

    p.send_line("quit");
    p.wait_line("bye", LINE);
    let status = p.wait_exit(LINE);
    assert_eq!(status.code(), Some(0), "{}", p.report());
}

// ---------------------------------------------------------------------------------------------
// 3. What ps shows

/// /proc/<pid>/<what>, panicking with the reason.
#[track_caller]
fn proc_file(pid: i32, what: &str) -> Vec<u8> {
    let path = format!("/proc/{pid}/{what}");
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// A NUL-separated /proc file as a list of strings.
fn nul_list(bytes: &[u8]) -> Vec<String> {
    bytes.split(|&b| b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

#[test]
fn ps_shows_the_same_command_line_environment_and_name_after_resume() {
    let dir = temp_dir();
    let log = dir.path().join("counter.log");
    let mut orig = migrate_run(dir.path(), &cbin("counter"), [OsStr::new("1"), OsStr::new("50"), log.as_os_str()]);
    let ready = orig.wait_line("ready ", STARTUP);
    let pid: i32 = field_num(&ready, "pid");
    assert_eq!(pid, orig.pid(), "{ready}");
    orig.wait_line("tick ", LINE);
    let cmdline = proc_file(pid, "cmdline");
    let environ = proc_file(pid, "environ");
    let comm = proc_file(pid, "comm");
    let image = checkpoint(pid, true, dir.path());
    orig.read_to_eof(LINE);
    orig.wait_exit(Duration::from_secs(5));

    let mut r = resume(&image);
    let line = r.wait_line("tick ", STARTUP);
    assert_eq!(field_num::<i32>(&line, "pid"), pid, "getpid() is the original pid after resume: {line}");
    // The resumed process is migrate-resume's own (it execs), or — when the original pid could
    // be recreated (root, pid free) — its child with the original pid.
    let rpid = if std::path::Path::new(&format!("/proc/{pid}")).exists() { pid } else { r.pid() };
    assert!(r.try_exit().is_none(), "the resumed program must be running\n{}", r.report());
    let exe = std::fs::read_link(format!("/proc/{rpid}/exe")).expect("read /proc/<resumed>/exe");
    let want = std::fs::canonicalize(cbin("counter")).expect("canonicalize counter");
    assert_eq!(exe, want, "the resumed process (pid {rpid}) must run the program");
    if is_root() {
        assert_eq!(rpid, pid, "as root, the original pid (free again) is recreated for real");
    }

    let r_cmdline = proc_file(rpid, "cmdline");
    let r_environ = proc_file(rpid, "environ");
    let r_comm = proc_file(rpid, "comm");
    assert_eq!(
        nul_list(&r_cmdline),
        nul_list(&cmdline),
        "/proc/<pid>/cmdline of the resumed program must be the original's"
    );
    assert_eq!(r_cmdline, cmdline, "/proc/<pid>/cmdline must be byte-identical to the original's");
    let r_env = nul_list(&r_environ);
    let leaked: Vec<&String> = r_env.iter().filter(|v| v.starts_with("MIGRATE_RESTORE=")).collect();
    assert!(
        leaked.is_empty(),
        "/proc/<pid>/environ of the resumed program shows migrate-resume's variable: {leaked:?}"
    );
    let o_env = nul_list(&environ);
    let missing: Vec<&String> = o_env.iter().filter(|v| !r_env.contains(v)).collect();
    let extra: Vec<&String> = r_env.iter().filter(|v| !o_env.contains(v)).collect();
    assert!(
        missing.is_empty() && extra.is_empty() && r_environ == environ,
        "/proc/<pid>/environ of the resumed program must be the original's: missing {missing:?}, extra {extra:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&r_comm),
        String::from_utf8_lossy(&comm),
        "/proc/<pid>/comm of the resumed program must be the original's"
    );
    r.wait_line("tick ", LINE);
}

// ---------------------------------------------------------------------------------------------
// 4. No EINTR leaks (examples/c/waiters.c)

const WAIT_MODES: [&str; 11] = [
    "poll",
    "epoll",
    "select",
    "pselect",
    "ppoll",
    "sem_timedwait",
    "sigtimedwait",
    "sigwaitinfo",
    "nanosleep",
    "clock_nanosleep",
    "usleep",
];

/// waiters.c's period: each call waits this long.
const PERIOD_MS: i64 = 300;
/// No call may return sooner than this (an early return).
const MIN_MS: i64 = 250;

/// (rc, errno) of a call that waited out its period, per mode.
fn timeout_result(mode: &str) -> (i64, i32) {
    match mode {
        "sem_timedwait" => (-1, libc::ETIMEDOUT),
        "sigtimedwait" => (-1, libc::EAGAIN),
        "sigwaitinfo" => (libc::SIGWINCH as i64, 0),
        _ => (0, 0),
    }
}

fn is_iter(line: &str) -> bool {
    line.starts_with("iter ")
}

#[track_caller]
fn iter_number(line: &str) -> u64 {
    match line.split_whitespace().nth(1).and_then(|n| n.parse().ok()) {
        Some(n) if is_iter(line) => n,
        _ => panic!("not an iter line: {line:?}"),
    }
}

/// Checks one `iter` line: no EINTR, the timeout result, no early return. Err with the reason.
fn check_iter(mode: &str, line: &str) -> Result<(), String> {
    if line.contains("EINTR!") {
        return Err(format!("{mode}: the call failed with EINTR: {line}"));
    }
    let (rc, errno) =
        match (field(line, "rc").and_then(|v| v.parse().ok()), field(line, "errno").and_then(|v| v.parse().ok())) {
            (Some(rc), Some(e)) => (rc, e),
            _ => return Err(format!("{mode}: malformed line {line:?}")),
        };
    let ms: i64 =
        field(line, "ms").and_then(|v| v.parse().ok()).ok_or_else(|| format!("{mode}: no ms= in {line:?}"))?;
    let want = timeout_result(mode);
    if (rc, errno) != want {
        return Err(format!(
            "{mode}: expected the timeout result rc={} errno={} (waited out, nothing ready), got: {line}",
            want.0, want.1
        ));
    }
    if ms < MIN_MS {
        return Err(format!("{mode}: the call returned after {ms} ms, early (period {PERIOD_MS} ms): {line}"));
    }
    Ok(())
}

/// Starts waiters in `mode` under migrate-run in `dir`.
fn start_waiters(dir: &Path, mode: &str) -> (Managed, i32) {
    let mut p = migrate_run(dir, &cbin("waiters"), [mode, &PERIOD_MS.to_string()]);
    let ready = p.wait_line("ready ", STARTUP);
    let pid: i32 = field_num(&ready, "pid");
    assert_eq!(pid, p.pid(), "{mode}: {ready}");
    (p, pid)
}

/// Waits for the iteration numbered `n`.
#[track_caller]
fn wait_iter(p: &mut Managed, n: u64, timeout: Duration) -> String {
    p.wait_line(move |l: &str| is_iter(l) && l.split_whitespace().nth(1) == Some(n.to_string().as_str()), timeout)
}

/// Three left-running checkpoints, each during a different iteration, then two more
/// iterations: every iteration must be the timeout result, never EINTR, never early.
fn waiters_left_running(mode: &str) {
    let dir = temp_dir();
    let (mut p, pid) = start_waiters(dir.path(), mode);
    let mut at = iter_number(&wait_iter(&mut p, 2, STARTUP));
    for k in 1..=3 {
        let ckpt = temp_dir();
        checkpoint(pid, false, ckpt.path());
        assert!(p.try_exit().is_none(), "{mode}: checkpoint {k} must leave the program running\n{}", p.report());
        // The next checkpoint interrupts a later call: wait for an iteration that ended after this one.
        let seen = p.lines_so_far().iter().filter(|l| is_iter(l)).map(|l| iter_number(l)).max().unwrap_or(at);
        at = iter_number(&wait_iter(&mut p, seen + 1, LINE));
    }
    wait_iter(&mut p, at + 2, LINE);
    let lines = p.lines_so_far();
    let problems: Vec<String> = lines.iter().filter(|l| is_iter(l)).filter_map(|l| check_iter(mode, l).err()).collect();
    let report = p.report();
    p.kill();
    assert!(problems.is_empty(), "{mode}: with three left-running checkpoints:\n  {}\n{report}", problems.join("\n  "));
}

/// Every wait mode at once (each in its own thread and process), to keep the run short.
#[test]
fn no_eintr_and_no_early_return_across_left_running_checkpoints() {
    let handles: Vec<(&str, std::thread::JoinHandle<()>)> =
        WAIT_MODES.iter().map(|&m| (m, std::thread::spawn(move || waiters_left_running(m)))).collect();
    let mut failures = Vec::new();
    for (mode, h) in handles {
        if let Err(e) = h.join() {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(non-string panic)".to_string());
            failures.push(format!("=== mode {mode} FAILED:\n{msg}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} modes failed:\n{}", failures.len(), WAIT_MODES.len(), failures.join("\n"));
}

/// A checkpoint --kill in the middle of a wait and a resume: the resumed call finishes its wait
/// with the timeout result, neither EINTR nor early.
fn waiters_kill_and_resume(mode: &str) {
    let dir = temp_dir();
    let (mut orig, pid) = start_waiters(dir.path(), mode);
    wait_iter(&mut orig, 2, STARTUP);
    let image = checkpoint(pid, true, dir.path());
    let rest = orig.read_to_eof(LINE);
    orig.wait_exit(Duration::from_secs(5));
    let orig_lines = orig.lines_so_far();
    let last = orig_lines.iter().filter(|l| is_iter(l)).map(|l| iter_number(l)).max().unwrap_or(0);
    for l in orig_lines.iter().filter(|l| is_iter(l)) {
        if let Err(e) = check_iter(mode, l) {
            panic!("{mode}: the original, before it was killed: {e}\n(after the checkpoint it printed {rest:?})");
        }
    }

    let mut r = resume(&image);
    let first = r.wait_line("iter ", STARTUP);
    assert_eq!(
        iter_number(&first),
        last + 1,
        "{mode}: the resumed program continues the interrupted iteration: {first}"
    );
    if let Err(e) = check_iter(mode, &first) {
        panic!("{mode}: the first iteration after resume (the call the checkpoint interrupted): {e}\n{}", r.report());
    }
    let second = r.wait_line("iter ", LINE);
    if let Err(e) = check_iter(mode, &second) {
        panic!("{mode}: the second iteration after resume: {e}\n{}", r.report());
    }
}

#[test]
fn poll_resumed_after_kill_times_out_normally() {
    waiters_kill_and_resume("poll");
}

#[test]
fn nanosleep_resumed_after_kill_times_out_normally() {
    waiters_kill_and_resume("nanosleep");
}
