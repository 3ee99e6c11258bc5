/* Timers across a checkpoint: a periodic POSIX timer (SIGRTMIN, sigev value checked, overruns
 * counted), a one-shot POSIX timer on CLOCK_REALTIME (SIGRTMIN+1) and alarm(). Prints "tick N"
 * as the periodic timer runs (N counts 100 ms periods of running time), "oneshot ticks=N" and
 * "alarm ticks=N" when the one-shots fire, "BAD ..." if a timer id stopped working.
 * With "thread" as second argument the one-shot is a SIGEV_THREAD timer instead. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static timer_t periodic, oneshot;
static volatile sig_atomic_t ticks, alarmed, thread_fired, bad;

static void on_tick(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    if (si->si_value.sival_ptr != (void *)0x5eed) { bad = 1; return; }
    int over = timer_getoverrun(periodic);
    if (over < 0) { bad = 2; return; }
    ticks += 1 + over;
}
static void on_alarm(int sig) { (void)sig; alarmed = 1; }
static void on_thread_timer(union sigval v) {
    if (v.sival_int != 77) bad = 3;
    thread_fired = 1;
}
static void on_oneshot(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    if (si->si_value.sival_int != 77) bad = 4;
    thread_fired = 1;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int alarm_s = argc > 1 ? atoi(argv[1]) : 3;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_tick;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGRTMIN, &sa, NULL);
    sa.sa_sigaction = on_oneshot;
    sigaction(SIGRTMIN + 1, &sa, NULL);
    signal(SIGALRM, on_alarm);

    struct sigevent ev;
    memset(&ev, 0, sizeof ev);
    ev.sigev_notify = SIGEV_SIGNAL;
    ev.sigev_signo = SIGRTMIN;
    ev.sigev_value.sival_ptr = (void *)0x5eed;
    if (timer_create(CLOCK_MONOTONIC, &ev, &periodic)) { perror("timer_create"); return 1; }
    memset(&ev, 0, sizeof ev);
    if (argc > 2 && strcmp(argv[2], "thread") == 0) {
        ev.sigev_notify = SIGEV_THREAD;
        ev.sigev_notify_function = on_thread_timer;
    } else {
        ev.sigev_notify = SIGEV_SIGNAL;
        ev.sigev_signo = SIGRTMIN + 1;
    }
    ev.sigev_value.sival_int = 77;
    if (timer_create(CLOCK_REALTIME, &ev, &oneshot)) { perror("timer_create oneshot"); return 1; }

    struct itimerspec per = { .it_interval = { 0, 100000000 }, .it_value = { 0, 100000000 } };
    struct itimerspec once = { .it_value = { alarm_s - 1, 0 } };
    timer_settime(periodic, 0, &per, NULL);
    timer_settime(oneshot, 0, &once, NULL);
    alarm(alarm_s);
    printf("ready pid=%d\n", (int)getpid());

    int shown = 0, alarm_shown = 0, thread_shown = 0;
    for (;;) {
        pause();
        if (bad) { printf("BAD %d\n", (int)bad); return 1; }
        if (ticks != shown) { shown = ticks; printf("tick %d\n", shown); }
        if (thread_fired && !thread_shown) { thread_shown = 1; printf("oneshot ticks=%d\n", shown); }
        if (alarmed && !alarm_shown) { alarm_shown = 1; printf("alarm ticks=%d\n", shown); }
        if (alarm_shown && thread_shown && shown >= 40) { printf("done\n"); return 0; }
    }
}
