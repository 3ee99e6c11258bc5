//! CLOCK_MONOTONIC and CLOCK_BOOTTIME continuity: by default a resumed program runs in a time
//! namespace whose clocks carry on from where they were at the checkpoint, so neither the time
//! the image waited nor a different host's uptime shows; CLOCK_REALTIME tells the real time.
//! `--host-clocks` opts out (the stopped time then shows).

use migrate_tests::*;
use std::time::Duration;

const DOWNTIME: Duration = Duration::from_millis(1500);

fn clocks(line: &str) -> (i64, i64, i64) {
    (field_num(line, "mono"), field_num(line, "boot"), field_num(line, "real"))
}

/// Runs the clocks program, checkpoints it with --kill, waits DOWNTIME, resumes it with
/// `extra` and returns the clocks of the last line before and the first line after.
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
    let stderr = s.stderr_so_far().join("\n");
    s.kill();
    (clocks(&last), clocks(&first), stderr)
}

#[test]
fn monotonic_and_boottime_continue_across_a_resume() {
    let (before, after, stderr) = around_a_resume(&[]);
    let down = DOWNTIME.as_millis() as i64;
    assert!(after.2 - before.2 >= down, "realtime moved on by the downtime: {before:?} -> {after:?}");
    if !is_root() {
        assert!(stderr.contains("time namespace"), "unprivileged: says why the clocks jump: {stderr}");
        return;
    }
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
