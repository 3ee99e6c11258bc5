//! The event descriptors services are built on: an epoll loop (edge-triggered and one-shot
//! registrations with user data) over a periodic timerfd, an eventfd (semaphore mode, counter
//! carried over) and a signalfd, checkpointed with --kill and resumed: the loop goes on.

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
