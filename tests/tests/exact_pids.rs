//! `migrate-resume --exact-pids`: as root, the resumed process gets its original pid and its
//! threads their original tids for real (clone3 set_tid), so raw system calls see them too.
//! Without permission (or with the pid taken) it says why and falls back to the table.

use migrate_tests::*;
use std::fs;
use std::path::Path;
use std::time::Duration;

fn tids(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// A multi-threaded program (examples/c/waiters.c in sigwaitinfo mode has a helper thread).
fn start(dir: &Path) -> (Managed, i32) {
    let mut p = migrate_run(dir, &cbin("waiters"), ["sigwaitinfo"]);
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    p.wait_line("iter 1 ", LINE);
    (p, pid)
}

#[test]
fn exact_pids_restores_the_original_pid_and_tids() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let (mut p, pid) = start(dir);
    let before = tids(pid);
    assert!(before.len() >= 3, "expected the program's threads and libmigrate's: {before:?}");
    let image = checkpoint(pid, true, dir);
    p.wait_exit(Duration::from_secs(10));
    drop(p); // reaped: the pid is free again

    let mut r = resume_with(&["--exact-pids"], &image);
    r.wait_line("iter ", STARTUP);
    if !is_root() {
        let err = r.stderr_so_far().join("\n");
        assert!(err.contains("--exact-pids"), "without root, resume must say why it falls back: {err}");
        println!("SKIP: not root, --exact-pids falls back (checked the message)");
        return;
    }
    let child = tids(pid);
    assert_eq!(child, before, "the process and every thread must have their original ids back");
    // migrate-resume stays as the parent and passes signals on: SIGTERM ends the program.
    r.signal(libc::SIGTERM);
    let status = r.wait_exit(Duration::from_secs(10));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM), "the program's end must pass through: {status:?}");
}

#[test]
fn exact_pids_falls_back_when_the_pid_is_taken() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let (mut p, pid) = start(dir);
    let image = checkpoint(pid, false, dir); // the original keeps running and keeps its pid
    let mut r = resume_with(&["--exact-pids"], &image);
    let line = r.wait_line("iter ", STARTUP);
    assert!(!line.contains("EINTR!"), "{line}");
    let err = r.stderr_so_far().join("\n");
    assert!(
        err.contains("--exact-pids") && err.contains("translation table"),
        "resume must say why it falls back: {err}"
    );
    r.kill();
    p.kill();
}
