//! Timers across a checkpoint: alarm() and POSIX timers (periodic and one-shot, signal
//! notified) come back under their ids with the time they had left; the time the program
//! spent checkpointed does not count. A SIGEV_THREAD timer (glibc's helper thread blocks every
//! signal) is refused up front with a clear error, and the program runs on.

use migrate_tests::*;
use std::time::Duration;

fn ticks_field(line: &str) -> i64 {
    field_num(line, "ticks")
}

#[test]
fn alarm_and_posix_timers_continue_with_their_remaining_time() {
    let tmp = temp_dir();
    let dir = tmp.path();
    // alarm(3); one-shot timer at 2 s; periodic 100 ms ticks counting running time.
    let mut p = migrate_run(dir, &cbin("timers"), ["3"]);
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    p.wait_line("tick 5", LINE);
    let image = checkpoint(pid, true, dir);
    let before = p.read_to_eof(LINE);
    p.wait_exit(Duration::from_secs(10));
    let last = last_tick(&before).max(5);
    assert!(last < 20, "checkpointed before the one-shot timer: {before:?}");
    let inspect = inspect_output(&[], &image);
    assert!(inspect.stdout.contains("ITIMER_REAL"), "inspect lists the alarm: {}", inspect.stdout);
    // Downtime between checkpoint and resume: a timer that counted it would fire ~10 ticks early.
    std::thread::sleep(Duration::from_millis(1000));

    let mut s = resume(&image);
    let first = s.wait_line("tick ", STARTUP);
    let first = tick_number(&first);
    assert!(first > last && first <= last + 3, "ticks resume after {last}: got {first}");
    let oneshot = ticks_field(&s.wait_line("oneshot ", QUICK));
    let alarm = ticks_field(&s.wait_line("alarm ", QUICK));
    assert!((16..=24).contains(&oneshot), "the 2 s timer fired after {oneshot} ticks of running time");
    assert!((26..=34).contains(&alarm), "alarm(3) fired after {alarm} ticks of running time");
    s.wait_line("done", QUICK);
    let status = s.wait_exit(QUICK);
    assert!(status.success(), "timers program: {}", describe_status(status));
    let bad: Vec<String> = s.lines_so_far().into_iter().filter(|l| l.starts_with("BAD")).collect();
    assert!(bad.is_empty(), "a timer id stopped working: {bad:?}");
}

#[test]
fn sigev_thread_timers_are_refused_and_the_program_runs_on() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let mut p = migrate_run(dir, &cbin("timers"), ["30", "thread"]);
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    p.wait_line("tick 2", LINE);
    let out = checkpoint_output(pid, true, dir);
    out.assert_fails("checkpoint with a SIGEV_THREAD timer", 6, &["SIGEV_THREAD", "not supported"]);
    assert!(images_in(dir).is_empty(), "no image left behind");
    // Still running, ticking on.
    p.wait_line(|l: &str| is_tick(l) && tick_number(l) >= 4, LINE);
    p.kill();
}
