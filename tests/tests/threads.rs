//! Threads and the PID problem: multi-threaded programs (pthreads and std::thread) continue
//! exactly after a resume, with their virtual pid and tids, their locks, condition variables,
//! semaphores, thread-local and thread-specific data, names and signal handlers; threads keep
//! being created and joined across checkpoints; ids seen through every interface stay the
//! original ones.

use migrate_tests::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Common steps

/// Starts `program` under migrate-run, waits for `ready pid=` and checks it is migrate-run's pid.
fn start(dir: &Path, program: &Path) -> (Managed, i32) {
    let mut p = migrate_run(dir, program, std::iter::empty::<&str>());
    let ready = p.wait_line("ready ", STARTUP);
    let pid: i32 = field_num(&ready, "pid");
    assert_eq!(pid, p.pid(), "migrate-run must exec the program in place (same pid): {ready}");
    (p, pid)
}

/// `migrate-checkpoint --kill`, then the original's remaining stdout (to EOF, checked for `BAD`)
/// and its exit. Returns the image and the lines printed after the last wait. The target is
/// the process's real pid (after a resume it differs from the virtual one the program prints).
fn checkpoint_kill(p: &mut Managed, dir: &Path) -> (PathBuf, Vec<String>) {
    let pid = p.pid();
    let out = checkpoint_output(pid, true, dir);
    if !out.status.success() {
        let r = p.report();
        panic!("migrate-checkpoint --kill {pid} failed: {}\nprogram: {r}", out.describe());
    }
    let image = PathBuf::from(out.stdout.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default());
    assert!(image.is_file(), "migrate-checkpoint reported {} which is not a file: {}", image.display(), out.describe());
    let rest = p.read_to_eof(LINE);
    assert_no_bad(p, "before the checkpoint");
    // With --kill the program is dead when migrate-checkpoint returns (allow for the reap).
    p.wait_exit(Duration::from_secs(5));
    (image, rest)
}

/// Sends `stop`, expects `joined ok=1` and exit status 0.
fn stop_and_join(p: &mut Managed) -> String {
    p.send_line("stop");
    let joined = next_unless_bad(p, "joined ", LINE);
    if field(&joined, "ok") != Some("1") {
        let r = p.report();
        panic!("joining the threads after the resume failed: {joined}\n{r}");
    }
    let status = p.wait_exit(LINE);
    assert_eq!(status.code(), Some(0), "the program should exit 0 after `{joined}`\n{}", p.report());
    assert_no_bad(p, "at exit");
    joined
}

// ---------------------------------------------------------------------------------------------
// threadpool.c

/// One `tick` line of examples/c/threadpool.c.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PoolTick {
    n: u64,
    pid: i32,
    counter: u64,
    pings: u64,
    sems: u64,
    timeouts: u64,
    sigs: u64,
    names: String,
    merr: u64,
    line: String,
}

impl PoolTick {
    #[track_caller]
    fn parse(line: &str) -> PoolTick {
        PoolTick {
            n: tick_number(line),
            pid: field_num(line, "pid"),
            counter: field_num(line, "counter"),
            pings: field_num(line, "pings"),
            sems: field_num(line, "sems"),
            timeouts: field_num(line, "timeouts"),
            sigs: field_num(line, "sigs"),
            names: field(line, "names").unwrap_or("").to_string(),
            merr: field_num(line, "merr"),
            line: line.to_string(),
        }
    }

    /// The counters as (name, value), in a fixed order.
    fn counters(&self) -> [(&'static str, u64); 5] {
        [
            ("counter", self.counter),
            ("pings", self.pings),
            ("sems", self.sems),
            ("timeouts", self.timeouts),
            ("sigs", self.sigs),
        ]
    }

    /// Checks what must hold in every tick: the original pid, names intact, no mutex failure.
    #[track_caller]
    fn check(&self, pid: i32, context: &str) {
        assert_eq!(self.pid, pid, "{context}: getpid() must return the original pid: {}", self.line);
        assert_eq!(self.names, "ok", "{context}: a thread's name (pthread_getname_np) changed: {}", self.line);
        assert_eq!(self.merr, 0, "{context}: main's robust/error-checking mutex checks failed: {}", self.line);
    }

    /// Every counter is at least the one in `prev` (`strict`: greater, for the counters that
    /// grow every tick).
    #[track_caller]
    fn check_after(&self, prev: &PoolTick, strict: bool, context: &str) {
        for ((name, now), (_, before)) in self.counters().into_iter().zip(prev.counters()) {
            if strict {
                assert!(now > before, "{context}: {name} did not grow: {} then {}", prev.line, self.line);
            } else {
                assert!(now >= before, "{context}: {name} went back: {} then {}", prev.line, self.line);
            }
        }
    }
}

fn next_pool_tick(p: &mut Managed, pid: i32, timeout: Duration, context: &str) -> PoolTick {
    let line = next_unless_bad(p, "tick ", timeout);
    let t = PoolTick::parse(&line);
    t.check(pid, context);
    t
}

/// Starts threadpool and waits for tick `upto`, checking ticks are consecutive.
fn start_threadpool(dir: &Path, upto: u64) -> (Managed, i32, PoolTick) {
    let (mut p, pid) = start(dir, &cbin("threadpool"));
    let mut last = next_pool_tick(&mut p, pid, LINE, "before the checkpoint");
    assert_eq!(last.n, 1, "{}", last.line);
    while last.n < upto {
        let t = next_pool_tick(&mut p, pid, LINE, "before the checkpoint");
        assert_eq!(t.n, last.n + 1, "ticks must be consecutive: {} then {}", last.line, t.line);
        t.check_after(&last, false, "before the checkpoint");
        last = t;
    }
    (p, pid, last)
}

/// Checkpoints threadpool with --kill and returns the image and its last tick.
fn kill_threadpool(p: &mut Managed, pid: i32, dir: &Path, mut last: PoolTick) -> (PathBuf, PoolTick) {
    let (image, rest) = checkpoint_kill(p, dir);
    for line in rest.iter().filter(|l| is_tick(l)) {
        let t = PoolTick::parse(line);
        t.check(pid, "before the checkpoint");
        assert_eq!(t.n, last.n + 1, "the original's ticks must be consecutive: {} then {line}", last.line);
        last = t;
    }
    (image, last)
}

/// Resumes threadpool and checks its first tick continues `last` exactly.
fn resume_threadpool(image: &Path, pid: i32, last: &PoolTick, context: &str) -> (Managed, PoolTick) {
    let mut r = resume(image);
    let first = next_pool_tick(&mut r, pid, STARTUP, context);
    assert_eq!(
        first.n,
        last.n + 1,
        "{context}: the first tick after the resume must be the next one: last before was `{}`, first after is `{}`",
        last.line,
        first.line
    );
    first.check_after(last, false, context);
    (r, first)
}

/// (1) Workers, ping-pong, semaphore, timed waits, signals to a thread, names, TLS and TSD all
/// continue after checkpoint --kill and resume; every thread joins with its expected value.
#[test]
fn threadpool_continues_after_resume() {
    let dir = temp_dir();
    let (mut orig, pid, last) = start_threadpool(dir.path(), 3);
    let (image, last) = kill_threadpool(&mut orig, pid, dir.path(), last);

    let (mut r, first) = resume_threadpool(&image, pid, &last, "after the resume");
    let mut t = first.clone();
    for _ in 0..3 {
        let u = next_pool_tick(&mut r, pid, LINE, "after the resume");
        assert_eq!(u.n, t.n + 1, "ticks must be consecutive: {} then {}", t.line, u.line);
        u.check_after(&t, false, "after the resume");
        t = u;
    }
    // Three ticks (300 ms) later every thread has made progress.
    t.check_after(&first, true, "after the resume (three ticks on)");
    stop_and_join(&mut r);
}

/// (7) Threads created after a resume run and join, and `stop` still joins every thread.
#[test]
fn threads_created_after_resume_run_and_join() {
    let dir = temp_dir();
    let (mut orig, pid, _) = start_threadpool(dir.path(), 1);
    orig.send_line("spawn");
    let before = next_unless_bad(&mut orig, "spawned ", LINE);
    let ok = next_unless_bad(&mut orig, "spawn ", LINE);
    assert_eq!(field(&ok, "ok"), Some("1"), "spawn before the checkpoint: {ok}");
    let last = next_pool_tick(&mut orig, pid, LINE, "before the checkpoint");
    let (image, last) = kill_threadpool(&mut orig, pid, dir.path(), last);

    let (mut r, _) = resume_threadpool(&image, pid, &last, "after the resume");
    for k in 0..3 {
        r.send_line("spawn");
        let spawned = next_unless_bad(&mut r, "spawned ", LINE);
        let tid: i32 = field_num(&spawned, "tid");
        let sys: i32 = field_num(&spawned, "sys");
        assert!(tid > 0 && tid != pid, "spawn {k} after the resume: gettid() in a new thread: {spawned}");
        assert!(sys > 0, "spawn {k} after the resume: {spawned}");
        let ok = next_unless_bad(&mut r, "spawn ", LINE);
        assert_eq!(field(&ok, "ok"), Some("1"), "spawn {k} after the resume (before: {before}): {ok}\n{}", r.report());
    }
    let t = next_pool_tick(&mut r, pid, LINE, "after spawning threads");
    assert!(t.n > last.n + 1, "{}", t.line);
    stop_and_join(&mut r);
}

/// A robust and an error-checking mutex held by a thread across checkpoint --kill and resume:
/// after the resume the holder still owns them (glibc records the owner's kernel tid in the
/// mutex): relocking the error-checking one must say EDEADLK and both unlocks must succeed.
#[test]
fn mutexes_held_across_resume_keep_their_owner() {
    let dir = temp_dir();
    let (mut orig, pid, _) = start_threadpool(dir.path(), 1);
    orig.send_line("hold");
    let held = next_unless_bad(&mut orig, "held ", LINE);
    assert_eq!((field(&held, "robust"), field(&held, "errchk")), (Some("0"), Some("0")), "taking the mutexes: {held}");
    let last = next_pool_tick(&mut orig, pid, LINE, "while holding");
    let (image, last) = kill_threadpool(&mut orig, pid, dir.path(), last);

    let (mut r, _) = resume_threadpool(&image, pid, &last, "after the resume");
    r.send_line("release");
    let released = r.wait_line("released ", LINE);
    assert!(
        field(&released, "ok") == Some("1"),
        "a mutex held across the resume no longer belongs to its holder (expected relock={} i.e. EDEADLK, \
         robust=0 and errchk=0 for the unlocks; 110 = ETIMEDOUT: the relock blocked, 1 = EPERM: \
         unlock refused because the owner tid stored in the mutex is the pre-checkpoint kernel tid): \
         {released}\n{}",
        libc::EDEADLK,
        r.report()
    );
    // Main can take both mutexes again.
    let t = next_pool_tick(&mut r, pid, LINE, "after the release");
    let t = next_pool_tick(&mut r, pid, LINE, &format!("after the release (tick {})", t.n + 1));
    assert_eq!(t.merr, 0, "{}", t.line);
    stop_and_join(&mut r);
}

/// (5) The race detector: 20 cycles of checkpoint --kill and resume of threadpool; after every
/// resume the ticks continue exactly and the counters never go back; at the end every thread
/// joins with its expected value.
#[test]
fn threads_survive_20_checkpoint_resume_cycles() {
    const CYCLES: usize = 20;
    let started = Instant::now();
    let dir = temp_dir();
    let (mut p, pid, mut last) = start_threadpool(dir.path(), 2);
    let mut durations = Vec::new();
    for cycle in 1..=CYCLES {
        let t0 = Instant::now();
        // Each cycle's images go to a directory of their own (the image names carry a counter
        // that a resumed process continues, but keep the cycles independent of that).
        let cdir = dir.path().join(format!("c{cycle}"));
        std::fs::create_dir(&cdir).expect("create cycle dir");
        let (image, l) = kill_threadpool(&mut p, pid, &cdir, last);
        let context = format!("cycle {cycle}/{CYCLES}");
        let (r, first) = resume_threadpool(&image, pid, &l, &context);
        p = r;
        // One more tick, so that every cycle also runs the resumed threads for a while.
        let t = next_pool_tick(&mut p, pid, LINE, &context);
        assert_eq!(t.n, first.n + 1, "{context}: {} then {}", first.line, t.line);
        t.check_after(&first, false, &context);
        last = t;
        durations.push(t0.elapsed());
    }
    // Between the last two resumes every thread must still make progress.
    let t = next_pool_tick(&mut p, pid, LINE, "after the last cycle");
    let mut u = t.clone();
    for _ in 0..3 {
        u = next_pool_tick(&mut p, pid, LINE, "after the last cycle");
    }
    u.check_after(&t, true, "after the last cycle (three ticks on)");
    let joined = stop_and_join(&mut p);
    eprintln!(
        "{CYCLES} cycles in {:?} (per cycle: min {:?}, max {:?}); {joined}",
        started.elapsed(),
        durations.iter().min().expect("cycles"),
        durations.iter().max().expect("cycles")
    );
}

// ---------------------------------------------------------------------------------------------
// rust-threads

/// (2) std::thread: channel, Mutex, atomics and a parked thread continue after a resume.
#[test]
fn rust_threads_continue_after_resume() {
    let dir = temp_dir();
    let (mut orig, pid) = start(dir.path(), &bin("rust-threads"));
    let check = |line: &str, context: &str| {
        assert_eq!(field_num::<i32>(line, "pid"), pid, "{context}: std::process::id() must be the original: {line}");
        assert_eq!(field(line, "ok"), Some("1"), "{context}: sum != expected (lost or repeated messages): {line}");
    };
    let mut last = String::new();
    for n in 1..=3 {
        last = next_unless_bad(&mut orig, "tick ", LINE);
        assert_eq!(tick_number(&last), n, "{last}");
        check(&last, "before the checkpoint");
    }
    let (image, rest) = checkpoint_kill(&mut orig, dir.path());
    for line in rest.into_iter().filter(|l| is_tick(l)) {
        assert_eq!(tick_number(&line), tick_number(&last) + 1, "{last} then {line}");
        check(&line, "before the checkpoint");
        last = line;
    }

    let mut r = resume(&image);
    let first = next_unless_bad(&mut r, "tick ", STARTUP);
    assert_eq!(tick_number(&first), tick_number(&last) + 1, "last before: {last}; first after: {first}");
    check(&first, "after the resume");
    let mut prev = first.clone();
    for _ in 0..3 {
        let line = next_unless_bad(&mut r, "tick ", LINE);
        assert_eq!(tick_number(&line), tick_number(&prev) + 1, "{prev} then {line}");
        check(&line, "after the resume");
        prev = line;
    }
    for key in ["received", "atomic", "parks"] {
        let (a, b): (u64, u64) = (field_num(&first, key), field_num(&prev, key));
        let l: u64 = field_num(&last, key);
        assert!(a >= l && b > a, "{key} must keep growing after the resume: {last} / {first} / {prev}");
    }
    stop_and_join(&mut r);
}

// ---------------------------------------------------------------------------------------------
// threadchurn.c

/// The n of a `round <n> ok=1` line, checking ok=1.
#[track_caller]
fn round_number(line: &str) -> u64 {
    let n = line.split_whitespace().nth(1).and_then(|v| v.parse().ok());
    match n {
        Some(n) if line.starts_with("round ") && field(line, "ok") == Some("1") => n,
        _ => panic!("not a good round line: {line:?}"),
    }
}

/// (3) Threads created and joined in a tight loop: ten left-running checkpoints, then one with
/// --kill and a resume; every round checks its threads' return values and tids.
#[test]
fn thread_churn_survives_checkpoints() {
    let dir = temp_dir();
    let (mut p, pid) = start(dir.path(), &cbin("threadchurn"));
    let mut last = round_number(&next_unless_bad(&mut p, "round ", LINE));
    for k in 1..=10 {
        let out = checkpoint_output(pid, false, dir.path());
        if !out.status.success() {
            let r = p.report();
            panic!("left-running checkpoint {k}/10 of threadchurn failed: {}\nprogram: {r}", out.describe());
        }
        // The program keeps churning after each checkpoint.
        let line = next_unless_bad(&mut p, "round ", LINE);
        let n = round_number(&line);
        assert_eq!(field_num::<i32>(&line, "pid"), pid, "{line}");
        assert!(n > last, "rounds must advance after checkpoint {k}: {last} then {line}");
        last = n;
    }
    assert_eq!(images_in(dir.path()).len(), 10, "ten left-running checkpoints must leave ten images");
    let ckdir = dir.path().join("kill");
    std::fs::create_dir(&ckdir).expect("create dir");
    let (image, rest) = checkpoint_kill(&mut p, &ckdir);
    for line in rest.iter().filter(|l| l.starts_with("round ")) {
        let n = round_number(line);
        assert_eq!(n, last + 100, "rounds before the kill: {last} then {line}");
        last = n;
    }

    let mut r = resume(&image);
    let first = next_unless_bad(&mut r, "round ", STARTUP);
    let n = round_number(&first);
    assert!(
        n > last && n <= last + 100,
        "the resumed program must continue its rounds: last before the kill was {last}, first after is `{first}`"
    );
    assert_eq!(field_num::<i32>(&first, "pid"), pid, "{first}");
    let mut prev = n;
    for _ in 0..5 {
        let line = next_unless_bad(&mut r, "round ", LINE);
        let m = round_number(&line);
        assert_eq!(m, prev + 100, "rounds after the resume: {prev} then {line}");
        prev = m;
    }
    assert!(r.try_exit().is_none(), "threadchurn must still run\n{}", r.report());
    assert_no_bad(&mut r, "after the resume");
}

// ---------------------------------------------------------------------------------------------
// pids.c

/// The `ids` line of pids.c.
#[derive(Debug, Clone)]
struct Ids {
    pid: i32,
    ppid: i32,
    tid: i32,
    sys_pid: i32,
    sys_tid: i32,
    pgrp: i32,
    sid: i32,
    pgid: i32,
}

impl Ids {
    #[track_caller]
    fn parse(line: &str) -> Ids {
        Ids {
            pid: field_num(line, "pid"),
            ppid: field_num(line, "ppid"),
            tid: field_num(line, "tid"),
            sys_pid: field_num(line, "sys_pid"),
            sys_tid: field_num(line, "sys_tid"),
            pgrp: field_num(line, "pgrp"),
            sid: field_num(line, "sid"),
            pgid: field_num(line, "pgid"),
        }
    }
}

/// Sends a pids.c command and returns its answer line.
fn ask_within(p: &mut Managed, cmd: &str, timeout: Duration) -> String {
    p.send_line(cmd);
    p.wait_line(|l: &str| l.starts_with(&format!("{cmd} ")) || l.starts_with("unknown"), timeout)
}

fn ask(p: &mut Managed, cmd: &str) -> String {
    ask_within(p, cmd, LINE)
}

/// Starts pids.c and checks its ids before any checkpoint (all real, all consistent).
fn start_pids(dir: &Path) -> (Managed, Ids, i32) {
    let (mut p, pid) = start(dir, &cbin("pids"));
    let line = p.wait_line("ids ", LINE);
    let ids = Ids::parse(&line);
    let me = std::process::id() as i32;
    // Managed::spawn puts migrate-run in a process group of its own; it execs the program.
    assert_eq!(
        (ids.pid, ids.ppid, ids.tid, ids.sys_pid, ids.sys_tid, ids.pgrp, ids.pgid),
        (pid, me, pid, pid, pid, pid, pid),
        "ids before any checkpoint: {line}"
    );
    let tl = ask(&mut p, "threadid");
    let tid: i32 = field_num(&tl, "tid");
    assert_eq!(field_num::<i32>(&tl, "sys"), tid, "{tl}");
    assert!(tid != pid, "{tl}");
    (p, ids, tid)
}

/// Records a mismatch instead of stopping at the first one, so one run reports them all.
fn expect_eq<T: PartialEq + std::fmt::Debug>(fails: &mut Vec<String>, what: &str, got: T, want: T, line: &str) {
    if got != want {
        fails.push(format!("{what}: got {got:?}, expected {want:?} (line `{line}`)"));
    }
}

/// (4a) After checkpoint --kill and resume, every id the program can see is the original one:
/// getpid/getppid/gettid, the raw syscall(SYS_getpid/SYS_gettid), getpgrp/getpgid/getsid, a
/// helper thread's tid; kill(getpid()) and a raw tgkill(getpid(), gettid()) reach the process
/// itself; /proc/<getpid()> is the process itself.
#[test]
fn pids_are_the_original_ones_through_every_interface() {
    let dir = temp_dir();
    let (mut orig, ids0, tid0) = start_pids(dir.path());
    let pid = ids0.pid;
    let (image, _) = checkpoint_kill(&mut orig, dir.path());

    let mut r = resume(&image);
    let mut fails = Vec::new();
    let line = ask_within(&mut r, "ids", STARTUP);
    let ids = Ids::parse(&line);
    let me = std::process::id() as i32;
    expect_eq(&mut fails, "getpid()", ids.pid, pid, &line);
    expect_eq(&mut fails, "getppid() (migrate-resume execs: the parent is the test)", ids.ppid, me, &line);
    expect_eq(&mut fails, "gettid() of main", ids.tid, ids0.tid, &line);
    expect_eq(&mut fails, "syscall(SYS_getpid)", ids.sys_pid, pid, &line);
    expect_eq(&mut fails, "syscall(SYS_gettid)", ids.sys_tid, ids0.tid, &line);
    expect_eq(&mut fails, "getpgrp()", ids.pgrp, ids0.pgrp, &line);
    expect_eq(&mut fails, "getsid(0)", ids.sid, ids0.sid, &line);
    expect_eq(&mut fails, "getpgid(0)", ids.pgid, ids0.pgid, &line);

    let line = ask(&mut r, "selfkill");
    expect_eq(&mut fails, "kill(getpid(), SIGUSR1) handler runs", field_num::<i32>(&line, "got"), 1, &line);
    let line = ask(&mut r, "tgkill");
    expect_eq(
        &mut fails,
        "syscall(SYS_tgkill, getpid(), gettid(), SIGUSR1) handler runs (total)",
        field_num::<i32>(&line, "got"),
        2,
        &line,
    );
    let line = ask(&mut r, "proc");
    expect_eq(&mut fails, "/proc/<getpid()>/status readable", field(&line, "ok"), Some("1"), &line);
    expect_eq(&mut fails, "Name: in /proc/<getpid()>/status", field(&line, "name"), Some("pids"), &line);
    let line = ask(&mut r, "threadid");
    expect_eq(&mut fails, "gettid() in the helper thread", field_num::<i32>(&line, "tid"), tid0, &line);
    expect_eq(&mut fails, "syscall(SYS_gettid) in the helper thread", field_num::<i32>(&line, "sys"), tid0, &line);

    r.send_line("quit");
    r.wait_line("bye", LINE);
    let status = r.wait_exit(LINE);
    assert!(
        fails.is_empty(),
        "after the resume, {} id check(s) failed:\n  {}\n(exit: {})\n{}",
        fails.len(),
        fails.join("\n  "),
        describe_status(status),
        r.report()
    );
    assert_eq!(status.code(), Some(0), "{}", r.report());
}

/// (4b) Two copies of one image side by side both see the original pid, and kill(getpid())
/// in each reaches only itself.
#[test]
fn two_copies_of_one_image_each_signal_only_themselves() {
    let dir = temp_dir();
    let (mut orig, ids0, _) = start_pids(dir.path());
    let pid = ids0.pid;
    let (image, _) = checkpoint_kill(&mut orig, dir.path());

    let mut a = resume(&image);
    let mut b = resume(&image);
    for (which, r) in [("first", &mut a), ("second", &mut b)] {
        let line = ask_within(r, "ids", STARTUP);
        assert_eq!(field_num::<i32>(&line, "pid"), pid, "{which} copy: getpid() must be the original pid: {line}");
    }
    let got = |r: &mut Managed, cmd: &str| -> i32 { field_num(&ask(r, cmd), "got") };
    let a1 = got(&mut a, "selfkill");
    let b1 = got(&mut b, "selfkill");
    let a2 = got(&mut a, "count");
    let a3 = got(&mut a, "selfkill");
    let b2 = got(&mut b, "count");
    assert_eq!(
        (a1, b1, a2, a3, b2),
        (1, 1, 1, 2, 1),
        "handler runs (first selfkill, second selfkill, first count, first selfkill, second count): \
         each kill(getpid()) must reach its own copy only\nfirst: {}\nsecond: {}",
        a.report(),
        b.report()
    );
    for r in [&mut a, &mut b] {
        r.send_line("quit");
        r.wait_line("bye", LINE);
        let status = r.wait_exit(LINE);
        assert_eq!(status.code(), Some(0), "{}", r.report());
    }
}

// ---------------------------------------------------------------------------------------------
// mainexit.c

/// (6) The main thread has called pthread_exit (a zombie thread-group leader) while two threads
/// run on: checkpoint --kill and resume continue the ticks.
#[test]
fn main_thread_exit_then_checkpoint_and_resume() {
    let dir = temp_dir();
    let (mut orig, pid) = start(dir.path(), &cbin("mainexit"));
    let mut last = String::new();
    for n in 1..=3 {
        last = next_unless_bad(&mut orig, "tick ", LINE);
        assert_eq!(tick_number(&last), n, "{last}");
        assert_eq!(field_num::<i32>(&last, "pid"), pid, "{last}");
    }
    let tid: i32 = field_num(&last, "tid");
    let (image, rest) = checkpoint_kill(&mut orig, dir.path());
    for line in rest.into_iter().filter(|l| is_tick(l)) {
        assert_eq!(tick_number(&line), tick_number(&last) + 1, "{last} then {line}");
        last = line;
    }

    let mut r = resume(&image);
    let first = next_unless_bad(&mut r, "tick ", STARTUP);
    assert_eq!(tick_number(&first), tick_number(&last) + 1, "last before: {last}; first after: {first}");
    assert_eq!(field_num::<i32>(&first, "pid"), pid, "getpid() after the resume: {first}");
    assert_eq!(field_num::<i32>(&first, "tid"), tid, "the ticker's gettid() after the resume: {first}");
    let mut prev = first.clone();
    for _ in 0..3 {
        let line = next_unless_bad(&mut r, "tick ", LINE);
        assert_eq!(tick_number(&line), tick_number(&prev) + 1, "{prev} then {line}");
        prev = line;
    }
    let (n0, n1): (u64, u64) = (field_num(&first, "naps"), field_num(&prev, "naps"));
    assert!(n1 > n0, "the napping thread must run after the resume: {first} / {prev}");
    assert!(r.try_exit().is_none(), "mainexit must still run\n{}", r.report());
}
