//! Milestone 1: a single-threaded program is checkpointed and resumed, and continues exactly
//! where it stopped (memory, descriptors and offsets, signal state, sleeps in progress).

use migrate_tests::*;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

fn counter_args(mib: u32, tick_ms: u32, log: &Path) -> Vec<OsString> {
    vec![mib.to_string().into(), tick_ms.to_string().into(), log.as_os_str().to_owned()]
}

/// Starts counter.c under migrate-run; returns it and its pid (checked to be migrate-run's).
fn start_counter(dir: &Path, mib: u32, tick_ms: u32, log: &Path) -> (Managed, i32) {
    let mut p = migrate_run(dir, &cbin("counter"), counter_args(mib, tick_ms, log));
    let ready = p.wait_line("ready ", STARTUP);
    let pid: i32 = field_num(&ready, "pid");
    assert_eq!(pid, p.pid(), "migrate-run must exec the program in place (same pid): {ready}");
    (p, pid)
}

/// Waits for the next counter tick, checks it follows `prev` (if any) and the model.
fn next_counter_tick(p: &mut Managed, prev: Option<&CounterTick>) -> CounterTick {
    let line = p.wait_line("tick ", LINE);
    let t = CounterTick::parse(&line);
    t.check_model(&line);
    if let Some(prev) = prev {
        assert_eq!(t.n, prev.n + 1, "ticks must be consecutive: after {prev:?} got {line}");
        assert_eq!(
            (t.pid, t.heap, t.list),
            (prev.pid, prev.heap, prev.list),
            "pid/heap/list must not change: after {prev:?} got {line}"
        );
        assert_eq!(t.off, prev.off + counter_log_bytes(t.n), "log offset must advance by one tick: {line}");
    }
    t
}

/// After `migrate-checkpoint --kill`: the original must be gone; returns its last tick (reading
/// its stdout to EOF), checking the ticks it printed after `last`.
fn finish_killed_counter(orig: &mut Managed, mut last: CounterTick) -> CounterTick {
    let rest = orig.read_to_eof(LINE);
    for line in rest.iter().filter(|l| is_tick(l)) {
        let t = CounterTick::parse(line);
        t.check_model(line);
        assert_eq!(t.n, last.n + 1, "original's ticks must be consecutive: after {last:?} got {line}");
        last = t;
    }
    // With --kill the program is dead when migrate-checkpoint returns (allow for the reap).
    orig.wait_exit(Duration::from_secs(5));
    last
}

/// (a) Memory (heap buffer, linked list, .data/.bss), descriptors sharing an offset, and the
/// pid all continue exactly after checkpoint --kill and resume.
#[test]
fn counter_resumes_with_identical_state() {
    let dir = temp_dir();
    let log = dir.path().join("counter.log");
    let (mut orig, pid) = start_counter(dir.path(), 64, 50, &log);
    let mut last = next_counter_tick(&mut orig, None);
    assert_eq!(last.n, 1);
    assert_eq!(last.pid, pid);
    for _ in 2..=5 {
        last = next_counter_tick(&mut orig, Some(&last));
    }

    let image = checkpoint(pid, true, dir.path());
    assert!(image.starts_with(dir.path()), "image {} should be in --dir {}", image.display(), dir.path().display());
    let last = finish_killed_counter(&mut orig, last);

    let mut r = resume(&image);
    let line = r.wait_line("tick ", STARTUP);
    let first = CounterTick::parse(&line);
    assert_eq!(
        first.n,
        last.n + 1,
        "the resumed program must continue with the next tick: last was {last:?}, got {line}"
    );
    assert_eq!(first.pid, pid, "getpid() must return the original pid after resume: {line}");
    assert_eq!(first.heap, last.heap, "heap buffer checksum changed: {line}");
    assert_eq!(first.list, last.list, "linked list sum changed: {line}");
    first.check_model(&line);
    assert_eq!(first.off, last.off + counter_log_bytes(first.n), "log offset did not continue: {line}");

    let mut t = first;
    for _ in 0..3 {
        t = next_counter_tick(&mut r, Some(&t));
    }
    let rest = r.kill();
    let final_n = last_tick(&rest).max(t.n);
    check_counter_log(&log, final_n, final_n + 1);
}

/// (g) getppid is the process that ran migrate-run (migrate-run execs, it does not fork).
#[test]
fn counter_reports_parent_pid() {
    let dir = temp_dir();
    let log = dir.path().join("counter.log");
    let mut p = migrate_run(dir.path(), &cbin("counter"), counter_args(1, 50, &log));
    let ready = p.wait_line("ready ", STARTUP);
    assert_eq!(field_num::<i32>(&ready, "pid"), p.pid(), "{ready}");
    assert_eq!(field_num::<u32>(&ready, "ppid"), std::process::id(), "{ready}");
    next_counter_tick(&mut p, None);
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path without NUL");
    // SAFETY: c is a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}: {}", path.display(), std::io::Error::last_os_error());
}

/// Opens the FIFO for writing without blocking; retries (bounded) while it has no reader.
fn open_fifo_writer(path: &Path, timeout: Duration) -> Option<File> {
    let deadline = Instant::now() + timeout;
    loop {
        match std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(path) {
            Ok(f) => return Some(f),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("open {} for writing: {e}", path.display()),
        }
    }
}

/// (b) A program blocked in read() on a FIFO is checkpointed and resumed; the resumed program
/// reads what is written after the resume, then EOF when all writers close.
#[test]
fn fifo_reader_resumes_blocked_in_read() {
    let dir = temp_dir();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let mut orig = migrate_run(dir.path(), &cbin("fifo_reader"), [fifo.as_os_str()]);
    let ready = orig.wait_line("ready ", STARTUP);
    let pid: i32 = field_num(&ready, "pid");
    let mut w1 = match open_fifo_writer(&fifo, LINE) {
        Some(f) => f,
        None => panic!("fifo_reader never opened the FIFO\n{}", orig.report()),
    };
    orig.wait_line("opened", LINE);
    w1.write_all(b"one\n").expect("write one");
    orig.wait_line(|l: &str| l == "got one", LINE);

    let image = checkpoint(pid, true, dir.path());
    let rest = orig.read_to_eof(LINE);
    assert!(!rest.iter().any(|l| l == "eof"), "the original must not have seen EOF: {rest:?}");
    orig.wait_exit(Duration::from_secs(5));

    let mut r = resume(&image);
    // Succeeds once the resumed program has the FIFO open for reading again.
    let mut w2 = match open_fifo_writer(&fifo, STARTUP) {
        Some(f) => f,
        None => panic!("the resumed fifo_reader never reopened the FIFO\n{}", r.report()),
    };
    w2.write_all(b"two\n").expect("write two");
    r.wait_line(|l: &str| l == "got two", LINE);
    drop(w1);
    drop(w2);
    r.wait_line("eof", LINE);
    let status = r.wait_exit(LINE);
    assert_eq!(status.code(), Some(0), "resumed fifo_reader should exit 0\n{}", r.report());
}

/// The `at <ms>` value of a sleeper line.
fn at_ms(line: &str) -> i64 {
    let mut it = line.split_whitespace();
    while let Some(tok) = it.next() {
        if tok == "at" {
            if let Some(v) = it.next().and_then(|v| v.parse().ok()) {
                return v;
            }
        }
    }
    panic!("no `at <ms>` in {line:?}")
}

/// Checks the `slept` line reports a completed, successful sleep; returns the real time in ms
/// from `sleeping` to `slept`.
#[track_caller]
fn check_slept(sleeping: &str, slept: &str) -> i64 {
    let elapsed = at_ms(slept) - at_ms(sleeping);
    assert_eq!(
        field(slept, "rc"),
        Some("0"),
        "the sleep must complete (rc=0), it returned after {elapsed} ms: {sleeping} / {slept}"
    );
    assert_eq!(
        field(slept, "errno"),
        Some("0"),
        "the sleep succeeded but errno changed: the checkpoint's EINTR leaked into errno \
         (hooks must preserve errno): {sleeping} / {slept}"
    );
    elapsed
}

/// (c) A checkpoint --kill during sleep(3) and a resume ~1 s later: the resumed sleep finishes
/// the remaining time: not cut short, not restarted from the full duration.
fn sleeper_kill_and_resume(mode: &str) {
    let dir = temp_dir();
    let mut orig = migrate_run(dir.path(), &cbin("sleeper"), ["3", mode]);
    let ready = orig.wait_line("ready ", STARTUP);
    let pid: i32 = field_num(&ready, "pid");
    let sleeping = orig.wait_line("sleeping ", LINE);

    // Part of the scenario: checkpoint one second into the three-second sleep.
    std::thread::sleep(Duration::from_secs(1));
    let stop = Instant::now();
    let image = checkpoint(pid, true, dir.path());
    let rest = orig.read_to_eof(LINE);
    assert!(!rest.iter().any(|l| l.starts_with("slept")), "the checkpoint cut the original's sleep short: {rest:?}");
    orig.wait_exit(Duration::from_secs(5));

    // Part of the scenario: stay stopped for a second.
    std::thread::sleep(Duration::from_secs(1));
    let stopped = stop.elapsed();
    let mut r = resume(&image);
    let slept = r.wait_line("slept ", LINE);
    let elapsed = check_slept(&sleeping, &slept);
    let expected = 3000 + stopped.as_millis() as i64;
    assert!(
        (elapsed - expected).abs() <= 600,
        "sleep {mode}: {elapsed} ms from `sleeping` to `slept`, expected {expected} ms (3 s + {} ms stopped) ± 600\n{}",
        stopped.as_millis(),
        r.report()
    );
    let status = r.wait_exit(LINE);
    assert_eq!(status.code(), Some(0), "{}", r.report());
}

#[test]
fn sleeper_sleep_resumes_remaining_time() {
    sleeper_kill_and_resume("sleep");
}

#[test]
fn sleeper_nanosleep_resumes_remaining_time() {
    sleeper_kill_and_resume("nanosleep");
}

/// (c) `kill -USR2` during sleep(2) writes an image into --ckpt-dir and leaves the program
/// running; its sleep still lasts the full two seconds.
fn sleeper_usr2_left_running(mode: &str) {
    let dir = temp_dir();
    let mut p = migrate_run(dir.path(), &cbin("sleeper"), ["2", mode]);
    p.wait_line("ready ", STARTUP);
    let sleeping = p.wait_line("sleeping ", LINE);
    // Part of the scenario: checkpoint in the middle of the sleep.
    std::thread::sleep(Duration::from_millis(700));
    p.signal(libc::SIGUSR2);
    let slept = p.wait_line("slept ", LINE);
    let elapsed = check_slept(&sleeping, &slept);
    assert!(
        (1990..=2600).contains(&elapsed),
        "sleep {mode} with a USR2 checkpoint took {elapsed} ms, expected 2000..2600 (never early)\n{}",
        p.report()
    );
    let status = p.wait_exit(LINE);
    assert_eq!(status.code(), Some(0), "{}", p.report());
    let image = wait_for_image(dir.path(), LINE);
    if let Err(e) = migrate_image::ImageReader::open(&image).and_then(|r| r.verify_all()) {
        panic!("the USR2 image {} is not a valid image: {e}", image.display());
    }
}

#[test]
fn sleeper_sleep_usr2_checkpoint_left_running() {
    sleeper_usr2_left_running("sleep");
}

#[test]
fn sleeper_nanosleep_usr2_checkpoint_left_running() {
    sleeper_usr2_left_running("nanosleep");
}

/// (d) A blocked, pending SIGUSR1 with an SA_SIGINFO handler survives checkpoint and resume:
/// disposition, mask and pending set; unblocking delivers it to the handler.
#[test]
fn signals_pending_blocked_handler_survive() {
    let dir = temp_dir();
    let mut orig = migrate_run(dir.path(), &cbin("signals"), Vec::<&OsStr>::new());
    let ready = orig.wait_line("ready ", STARTUP);
    let pid: i32 = field_num(&ready, "pid");
    let pending = orig.wait_line("pending=", LINE);
    assert_eq!(
        pending,
        "pending=1",
        "under migrate-run, a blocked SIGUSR1 sent to itself must stay pending (before any checkpoint)\n{}",
        orig.report()
    );
    orig.send_line("show");
    let show = orig.wait_line("disp=", LINE);
    assert_eq!(show, "disp=ok mask=1 pending=1", "before the checkpoint");

    let image = checkpoint(pid, true, dir.path());
    let rest = orig.read_to_eof(LINE);
    assert!(!rest.iter().any(|l| l.starts_with("handler")), "the handler must not run at checkpoint: {rest:?}");
    orig.wait_exit(Duration::from_secs(5));

    let mut r = resume(&image);
    r.send_line("show");
    let show = r.wait_line("disp=", STARTUP);
    assert_eq!(show, "disp=ok mask=1 pending=1", "after resume: disposition, mask and pending signal must be restored");
    r.send_line("unblock");
    let handler = r.wait_line(|l: &str| l.starts_with("handler") || l == "unblocked", LINE);
    assert!(
        handler.starts_with("handler sig=10 "),
        "unblocking must run the handler first, got {handler:?}\n{}",
        r.report()
    );
    r.wait_line("unblocked", LINE);
    r.send_line("show");
    assert_eq!(r.wait_line("disp=", LINE), "disp=ok mask=0 pending=0");
    r.send_line("quit");
    r.wait_line("bye", LINE);
    let status = r.wait_exit(LINE);
    assert_eq!(status.code(), Some(0), "migrate-resume's status is the program's\n{}", r.report());
}

/// (e) One image resumed twice, both copies running side by side from the same state.
#[test]
fn one_image_resumed_twice_side_by_side() {
    let dir = temp_dir();
    let log = dir.path().join("counter.log");
    let (mut orig, pid) = start_counter(dir.path(), 16, 50, &log);
    let mut last = next_counter_tick(&mut orig, None);
    for _ in 2..=3 {
        last = next_counter_tick(&mut orig, Some(&last));
    }
    let image = checkpoint(pid, true, dir.path());
    let last = finish_killed_counter(&mut orig, last);

    // The first copy writes to the log, which then no longer matches the image: the second
    // copy needs --force (the file check itself is tested in errors.rs).
    let check_first = |r: &mut Managed, which: &str| {
        let line = r.wait_line("tick ", STARTUP);
        let t = CounterTick::parse(&line);
        assert_eq!(t.n, last.n + 1, "{which} copy: {line}");
        assert_eq!((t.pid, t.heap, t.list), (pid, last.heap, last.list), "{which} copy: {line}");
        assert_eq!(t.data, counter_data(t.n), "{which} copy: {line}");
    };
    let mut first = resume(&image);
    check_first(&mut first, "first");
    let mut second = resume_with(&["--force"], &image);
    check_first(&mut second, "second");
    // Both run side by side: each prints further ticks with the same state.
    for (which, r) in [("first", &mut first), ("second", &mut second)] {
        let line = r.wait_line("tick ", LINE);
        assert!(tick_number(&line) > last.n + 1, "{which} copy: {line}");
        assert_eq!(field_num::<i32>(&line, "pid"), pid, "{which} copy: {line}");
        assert_eq!(field_hex(&line, "heap"), last.heap, "{which} copy: {line}");
    }
    assert!(first.try_exit().is_none(), "the first copy must still run\n{}", first.report());
}

/// (f) The Rust counter: same pid and heap checksum, consecutive ticks.
#[test]
fn rust_counter_resumes() {
    let dir = temp_dir();
    let mut orig = migrate_run(dir.path(), &bin("rust-counter"), ["64", "50"]);
    let ready = orig.wait_line("ready ", STARTUP);
    let pid: i32 = field_num(&ready, "pid");
    assert_eq!(pid, orig.pid(), "{ready}");
    let mut last = String::new();
    for n in 1..=5 {
        last = orig.wait_line("tick ", LINE);
        assert_eq!(tick_number(&last), n, "{last}");
    }
    let heap = field_hex(&last, "heap");
    let image = checkpoint(pid, true, dir.path());
    for line in orig.read_to_eof(LINE).into_iter().filter(|l| is_tick(l)) {
        assert_eq!(tick_number(&line), tick_number(&last) + 1, "{line}");
        assert_eq!(field_hex(&line, "heap"), heap, "{line}");
        last = line;
    }
    orig.wait_exit(Duration::from_secs(5));
    let l = tick_number(&last);

    let mut r = resume(&image);
    for k in 1..=4 {
        let line = r.wait_line("tick ", if k == 1 { STARTUP } else { LINE });
        assert_eq!(tick_number(&line), l + k, "{line}");
        assert_eq!(field_num::<i32>(&line, "pid"), pid, "{line}");
        assert_eq!(field_hex(&line, "heap"), heap, "{line}");
    }
}

/// Checks counter-service's log: exactly service_line(1..=n) for some n in min..=max.
fn check_service_log(path: &Path, min: u64, max: u64) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(text.ends_with('\n'), "log {} ends with a partial line", path.display());
    let lines: Vec<&str> = text.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(*l, service_line(i as u64 + 1), "log {} line {}", path.display(), i + 1);
    }
    let n = lines.len() as u64;
    assert!((min..=max).contains(&n), "log {} has {n} lines, expected {min}..={max}", path.display());
}

/// (f) The demo service: its HashMap and event history continue; its O_APPEND log has every
/// tick exactly once.
#[test]
fn counter_service_resumes() {
    let dir = temp_dir();
    let log = dir.path().join("service.log");
    let mut orig = migrate_run(dir.path(), &bin("counter-service"), [log.as_os_str(), OsStr::new("50")]);
    let ready = orig.wait_line("ready ", STARTUP);
    let pid: i32 = field_num(&ready, "pid");
    let mut l = 0;
    for n in 1..=5 {
        assert_eq!(orig.wait_line("tick ", LINE), service_line(n));
        l = n;
    }
    let image = checkpoint(pid, true, dir.path());
    for line in orig.read_to_eof(LINE).into_iter().filter(|l| is_tick(l)) {
        assert_eq!(line, service_line(l + 1));
        l += 1;
    }
    orig.wait_exit(Duration::from_secs(5));

    let mut r = resume(&image);
    for k in 1..=4 {
        let line = r.wait_line("tick ", if k == 1 { STARTUP } else { LINE });
        assert_eq!(line, service_line(l + k), "the resumed service must continue with tick {}", l + k);
    }
    let rest = r.kill();
    let final_n = last_tick(&rest).max(l + 4);
    check_service_log(&log, final_n, final_n + 1);
}
