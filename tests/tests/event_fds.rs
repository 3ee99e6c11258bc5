//! The event descriptors services are built on: an epoll loop (edge-triggered and one-shot
//! registrations with user data) over a periodic timerfd, an eventfd (semaphore mode, counter
//! carried over) and a signalfd, checkpointed with --kill and resumed: the loop goes on. And
//! inotify: watches come back with the numbers the program holds (also across a gap left by a
//! removed watch, and for watches added before an exec), a watched path gone at resume is
//! reported and skipped.

use migrate_tests::*;
use std::fs;
use std::path::{Path, PathBuf};

const PROG_C: &str = r#"
#include <stdio.h>
#include <stdint.h>
#include <unistd.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <sys/signalfd.h>
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    sigset_t m; sigemptyset(&m); sigaddset(&m, SIGUSR1); sigprocmask(SIG_BLOCK, &m, NULL);
    int sfd = signalfd(-1, &m, SFD_NONBLOCK);
    int efd = eventfd(1000, EFD_NONBLOCK | EFD_SEMAPHORE);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct itimerspec its = { .it_interval = {0, 50000000}, .it_value = {0, 50000000} };
    timerfd_settime(tfd, 0, &its, NULL);
    int ep = epoll_create1(0);
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = 0x7100 };
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev);
    ev.events = EPOLLIN; ev.data.u64 = 0x5100;
    epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &ev);
    ev.events = EPOLLIN | EPOLLET | EPOLLONESHOT; ev.data.u64 = 0xe100;
    epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev);
    printf("ready pid=%d\n", (int)getpid());
    long ticks = 0;
    for (;;) {
        struct epoll_event out[4];
        int n = epoll_wait(ep, out, 4, 1000);
        if (n < 0) { perror("epoll_wait"); return 1; }
        for (int i = 0; i < n; i++) {
            uint64_t v;
            if (out[i].data.u64 == 0x7100) {
                if (read(tfd, &v, 8) == 8) {
                    ticks += (long)v;
                    uint64_t one;  /* semaphore mode: each read takes 1 */
                    long left = -1;
                    if (read(efd, &one, 8) == 8) left = 0;
                    printf("tick %ld sem_read=%d\n", ticks, left == 0);
                }
            } else if (out[i].data.u64 == 0x5100) {
                struct signalfd_siginfo si;
                if (read(sfd, &si, sizeof si) == sizeof si) printf("signal %u\n", si.ssi_signo);
            } else if (out[i].data.u64 == 0xe100) {
                printf("eventfd ready (one-shot)\n");
            } else {
                printf("BAD data %llx\n", (unsigned long long)out[i].data.u64);
            }
        }
    }
}
"#;

fn build(dir: &Path) -> PathBuf {
    compile_c(dir, "eventloop", PROG_C, &[])
}

#[test]
fn epoll_timerfd_eventfd_signalfd_loop_continues() {
    let tmp = temp_dir();
    let dir = fs::canonicalize(tmp.path()).unwrap();
    let prog = build(&dir);
    let mut p = migrate_run(&dir, &prog, Vec::<String>::new());
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    p.wait_line("tick 5 ", LINE);
    let image = checkpoint(pid, true, &dir);
    let mut lines = p.lines_so_far();
    lines.extend(p.read_to_eof(LINE));
    p.wait_exit(std::time::Duration::from_secs(10)); // reaped: its pid is free for the resume
    let last = last_tick(&lines);
    let inspect = inspect_output(&[], &image);
    for needle in ["eventfd count", "timerfd clock 1", "signalfd", "epoll watching"] {
        assert!(inspect.stdout.contains(needle), "inspect shows {needle}: {}", inspect.stdout);
    }
    let mut r = resume(&image);
    let first = r.wait_line("tick ", STARTUP);
    assert!(tick_number(&first) > last, "the timer keeps counting from {last}: {first}");
    assert!(first.contains("sem_read=1"), "the eventfd counter came back (semaphore reads still succeed): {first}");
    let rpid = if Path::new(&format!("/proc/{pid}")).exists() { pid } else { r.pid() };
    // SAFETY: sending SIGUSR1 to the resumed program (blocked there, read through its signalfd).
    unsafe { libc::kill(rpid, libc::SIGUSR1) };
    r.wait_line("signal 10", LINE);
    let next = r.wait_line("tick ", LINE);
    assert!(!next.contains("BAD"), "{next}");
    let all = r.lines_so_far();
    assert!(all.iter().all(|l| !l.contains("BAD")), "epoll user data came back: {all:?}");
    r.kill();
}

/// Watches `DIR` (wd 1), `DIR/b` (removed again: wd 2 stays unused) and `cl` relative to `DIR`
/// (wd 3; a symbolic link to `DIR/c`), keeps a dup of the instance, then prints every event
/// it reads, and `idle N` whenever 100 ms pass without one. `exec` as second argument:
/// re-executes itself after adding the watches (`after-exec FD`), so the new program's
/// libmigrate never saw them added.
const INOTIFY_C: &str = r#"
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/inotify.h>
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *dir = argv[1];
    int fd;
    if (argc > 3 && strcmp(argv[2], "after-exec") == 0) {
        fd = atoi(argv[3]);
        printf("exec'd\n");
    } else {
        fd = inotify_init1(0);
        char b[4096];
        snprintf(b, sizeof b, "%s/b", dir);
        if (chdir(dir) != 0) { perror("chdir"); return 1; }
        int w1 = inotify_add_watch(fd, dir, IN_CREATE | IN_MOVED_TO);
        int w2 = inotify_add_watch(fd, b, IN_CREATE);
        inotify_rm_watch(fd, w2);
        int w3 = inotify_add_watch(fd, "cl", IN_CREATE | IN_DELETE);
        printf("watches %d %d removed %d\n", w1, w3, w2);
        if (dup(fd) < 0) { printf("BAD dup\n"); return 1; }  /* a second descriptor of it */
        if (w1 < 0 || w3 < 0) { printf("BAD inotify_add_watch\n"); return 1; }
        if (argc > 2 && strcmp(argv[2], "exec") == 0) {
            char num[16];
            snprintf(num, sizeof num, "%d", fd);
            execl(argv[0], argv[0], dir, "after-exec", num, (char *)NULL);
            perror("execl");
            return 1;
        }
    }
    printf("ready pid=%d\n", (int)getpid());
    long idle = 0;
    char buf[4096] __attribute__((aligned(8)));
    for (;;) {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        int r = poll(&p, 1, 100);
        if (r < 0) { printf("BAD poll\n"); return 1; }
        if (r == 0) { printf("idle %ld\n", ++idle); continue; }
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0) { printf("BAD read %zd\n", n); return 1; }
        for (char *q = buf; q < buf + n; ) {
            struct inotify_event *e = (struct inotify_event *)q;
            printf("event wd=%d mask=%x name=%s\n", e->wd, e->mask, e->len ? e->name : "");
            q += sizeof *e + e->len;
        }
    }
}
"#;

const IN_CREATE_HEX: &str = "100";

/// Starts the inotify program on `DIR/w` (with directories `b`, `c` and the link `cl` to `c`)
/// in mode `mode`, waits until an event of the watch on `w` is seen, checkpoints it with
/// --kill and returns the image and `w`.
fn inotify_checkpoint(dir: &Path, mode: &str) -> (PathBuf, PathBuf) {
    let prog = compile_c(dir, "inotify", INOTIFY_C, &[]);
    let w = dir.join("w");
    fs::create_dir_all(w.join("b")).unwrap();
    fs::create_dir_all(w.join("c")).unwrap();
    std::os::unix::fs::symlink("c", w.join("cl")).unwrap();
    let mut p = migrate_run(dir, &prog, [w.as_os_str(), std::ffi::OsStr::new(mode)]);
    let line = p.wait_line("watches ", STARTUP);
    assert_eq!(line, "watches 1 3 removed 2", "the kernel numbers watches 1, 2, 3");
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    fs::write(w.join("before"), b"").unwrap();
    p.wait_line(format!("event wd=1 mask={IN_CREATE_HEX} name=before").as_str(), LINE);
    let image = checkpoint(pid, true, dir);
    p.read_to_eof(LINE);
    p.wait_exit(std::time::Duration::from_secs(10));
    (image, w)
}

/// After a resume: once the program runs again (an `idle` line), a file created in `w` and one
/// in `w/c` (if `c_too`) raise events with the original numbers, and nothing else arrives.
fn expect_events_after_resume(r: &mut Managed, w: &Path, c_too: bool) {
    r.wait_line("idle ", STARTUP);
    fs::write(w.join("after"), b"").unwrap();
    r.wait_line(format!("event wd=1 mask={IN_CREATE_HEX} name=after").as_str(), LINE);
    if c_too {
        fs::write(w.join("c").join("inner"), b"").unwrap();
        r.wait_line(format!("event wd=3 mask={IN_CREATE_HEX} name=inner").as_str(), LINE);
    }
    let events: Vec<String> = r.lines_so_far().into_iter().filter(|l| !l.starts_with("idle ")).collect();
    let expected = if c_too { 2 } else { 1 };
    assert_eq!(events.len(), expected, "only the program's own events, no trace of the restore: {events:?}");
    assert!(events.iter().all(|l| !l.contains("BAD")), "{events:?}");
}

#[test]
fn inotify_watches_keep_their_numbers() {
    let tmp = temp_dir();
    let dir = fs::canonicalize(tmp.path()).unwrap();
    let (image, w) = inotify_checkpoint(&dir, "plain");
    let inspect = inspect_output(&[], &image);
    let shown = &inspect.stdout;
    assert!(shown.contains("inotify, 2 watches"), "inspect shows the instance: {shown}");
    assert!(shown.contains(&format!("wd 1    {} IN_MOVED_TO|IN_CREATE", w.display())), "{shown}");
    // The path as the program gave it (made absolute), not the directory's own: recorded by
    // the hook, not found by file handle.
    let via_link = format!("wd 3    {} IN_CREATE|IN_DELETE", w.join("cl").display());
    assert!(shown.contains(&via_link), "recorded path: {shown}");
    let mut r = resume(&image);
    expect_events_after_resume(&mut r, &w, true);
    r.kill();
}

#[test]
fn inotify_watch_on_a_vanished_path_is_skipped_with_a_message() {
    let tmp = temp_dir();
    let dir = fs::canonicalize(tmp.path()).unwrap();
    let (image, w) = inotify_checkpoint(&dir, "plain");
    fs::remove_dir(w.join("c")).unwrap();
    let mut r = resume(&image);
    let msg = r.wait_stderr_line(|l: &str| l.contains("watch 3 on"), STARTUP);
    assert!(msg.contains("not restored") && msg.contains("ENOENT"), "{msg}");
    expect_events_after_resume(&mut r, &w, false);
    r.kill();
}

#[test]
fn inotify_watches_added_before_an_exec_are_found_by_file_handle() {
    let tmp = temp_dir();
    let dir = fs::canonicalize(tmp.path()).unwrap();
    let (image, w) = inotify_checkpoint(&dir, "exec");
    if !is_root() {
        // Without CAP_DAC_READ_SEARCH the paths stay unknown: the image says so and resume
        // refuses the descriptor, naming it.
        eprintln!("skipped: finding watch paths by file handle needs root; checking the refusal instead");
        resume_output(&[], &image).assert_fails("resume", 4, &["fd 3", "inotify", "CAP_DAC_READ_SEARCH"]);
        return;
    }
    // Found by handle: the directory's own path, not the link the program named.
    let inspect = inspect_output(&[], &image);
    let by_handle = format!("wd 3    {} IN_CREATE|IN_DELETE", w.join("c").display());
    assert!(inspect.stdout.contains(&by_handle), "{}", inspect.stdout);
    let mut r = resume(&image);
    expect_events_after_resume(&mut r, &w, true);
    r.kill();
}

/// A periodic timerfd that expired while the program was not reading it: the kernel shows no
/// time left (it re-arms only on read). After a resume its expiration is still there and it
/// keeps expiring — not disarmed for good.
const EXPIRED_TIMERFD_C: &str = r#"
#include <stdio.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <sys/timerfd.h>
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int tfd = timerfd_create(CLOCK_MONOTONIC, 0);
    struct itimerspec its = { .it_interval = {0, 20000000}, .it_value = {0, 20000000} };
    timerfd_settime(tfd, 0, &its, NULL);
    struct timespec nap = {0, 150000000};
    nanosleep(&nap, NULL); /* several expirations, none read */
    printf("ready pid=%d\n", (int)getpid());
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 1; /* "go" after the resume */
    for (int i = 0; i < 3; i++) {
        uint64_t v = 0;
        if (read(tfd, &v, 8) != 8) { printf("BAD read\n"); return 1; }
        printf("expired %llu\n", (unsigned long long)v);
    }
    return 0;
}
"#;

#[test]
fn an_expired_unread_timerfd_keeps_its_expirations_and_its_period() {
    let tmp = temp_dir();
    let dir = fs::canonicalize(tmp.path()).unwrap();
    let prog = compile_c(&dir, "expired", EXPIRED_TIMERFD_C, &[]);
    let mut p = migrate_run(&dir, &prog, Vec::<String>::new());
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    let image = checkpoint(pid, true, &dir);
    p.wait_exit(std::time::Duration::from_secs(10));
    let inspect = inspect_output(&[], &image);
    assert!(inspect.stdout.contains("timerfd"), "{}", inspect.stdout);
    let mut r = resume(&image);
    r.send_line("go");
    let first: u64 = r.wait_line("expired ", STARTUP).trim_start_matches("expired ").parse().unwrap();
    // (The kernel counts one expiration until the read works out the overruns, and the time of
    // that expiry is not shown: the overruns of the frozen period are not recovered.)
    assert!(first >= 1, "the unread expiration came back: {first}");
    // Two more periods: without re-arming, these reads would block for ever.
    r.wait_line("expired ", LINE);
    r.wait_line("expired ", LINE);
    assert!(r.wait_exit(std::time::Duration::from_secs(10)).success(), "{}", r.report());
}
