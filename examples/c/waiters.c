/* waiters: a loop of timed waits on things that never become ready, to check that a
 * checkpoint never makes a blocking call return early or fail with EINTR.
 *
 * usage: waiters <mode> [period ms, default 300]
 *
 * mode (the call each iteration waits in, for about one period):
 *   poll, ppoll, select, pselect, epoll  on the read end of a pipe nobody writes to
 *                                        (epoll: epoll_wait on an epoll set holding it)
 *   sem_timedwait     an unposted semaphore, absolute CLOCK_REALTIME deadline now + period
 *   sigtimedwait      SIGWINCH, blocked and never sent, with a relative timeout of one period
 *   sigwaitinfo       SIGWINCH, blocked; a helper thread sends it to the main thread with
 *                     pthread_kill every period
 *   nanosleep, clock_nanosleep (CLOCK_MONOTONIC, relative), usleep   one period
 *
 * Output (stdout, line buffered):
 *   ready pid=<getpid> mode=<mode> period=<ms>
 *   iter <n> rc=<return value> errno=<errno after the call> ms=<CLOCK_MONOTONIC ms in the call>
 * with " EINTR!" appended when the call reported EINTR (clock_nanosleep: returned EINTR).
 * errno is set to 0 before each call. The expected ("timeout") results are:
 *   poll, ppoll, select, pselect, epoll, nanosleep, clock_nanosleep, usleep: rc=0 errno=0
 *   sem_timedwait: rc=-1 errno=ETIMEDOUT     sigtimedwait: rc=-1 errno=EAGAIN
 *   sigwaitinfo: rc=SIGWINCH errno=0
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <time.h>
#include <unistd.h>

static long period_ms = 300;
static pthread_t main_thread;

static long long mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static struct timespec period_ts(void)
{
    struct timespec ts = {.tv_sec = period_ms / 1000, .tv_nsec = (period_ms % 1000) * 1000000L};
    return ts;
}

static void *kicker(void *arg)
{
    (void)arg;
    for (;;) {
        usleep((useconds_t)(period_ms * 1000));
        pthread_kill(main_thread, SIGWINCH);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s <mode> [period ms]\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1];
    if (argc == 3)
        period_ms = strtol(argv[2], NULL, 10);
    if (period_ms <= 0 || period_ms >= 1000) {
        fprintf(stderr, "waiters: period must be 1..999 ms\n");
        return 2;
    }

    static const char *const modes[] = {
        "poll", "ppoll", "select", "pselect", "epoll", "sem_timedwait",
        "sigtimedwait", "sigwaitinfo", "nanosleep", "clock_nanosleep", "usleep",
    };
    int known = 0;
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++)
        known |= strcmp(mode, modes[i]) == 0;
    if (!known) {
        fprintf(stderr, "waiters: unknown mode %s\n", mode);
        return 2;
    }

    /* Only what the mode waits on is created, so that an image holds nothing else (migrate
     * cannot restore every kind of descriptor, epoll sets for one). */
    int fd_mode = strcmp(mode, "poll") == 0 || strcmp(mode, "ppoll") == 0 || strcmp(mode, "select") == 0 ||
                  strcmp(mode, "pselect") == 0 || strcmp(mode, "epoll") == 0;
    int pfd[2] = {-1, -1};
    if (fd_mode && pipe(pfd) != 0) {
        perror("waiters: pipe");
        return 1;
    }
    int ep = -1;
    if (strcmp(mode, "epoll") == 0) {
        ep = epoll_create1(EPOLL_CLOEXEC);
        if (ep < 0) {
            perror("waiters: epoll_create1");
            return 1;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = pfd[0]};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, pfd[0], &ev) != 0) {
            perror("waiters: epoll_ctl");
            return 1;
        }
    }
    sem_t sem;
    if (sem_init(&sem, 0, 0) != 0) {
        perror("waiters: sem_init");
        return 1;
    }
    sigset_t winch;
    sigemptyset(&winch);
    sigaddset(&winch, SIGWINCH);
    if (sigprocmask(SIG_BLOCK, &winch, NULL) != 0) {
        perror("waiters: sigprocmask");
        return 1;
    }

    main_thread = pthread_self();
    if (strcmp(mode, "sigwaitinfo") == 0) {
        pthread_t t;
        /* The helper inherits the blocked SIGWINCH: only the main thread's sigwaitinfo takes it. */
        if (pthread_create(&t, NULL, kicker, NULL) != 0) {
            fprintf(stderr, "waiters: pthread_create failed\n");
            return 1;
        }
    }

    printf("ready pid=%d mode=%s period=%ld\n", (int)getpid(), mode, period_ms);

    for (unsigned long n = 1;; n++) {
        long rc;
        int eintr;
        long long t0 = mono_ms();
        errno = 0;
        if (strcmp(mode, "poll") == 0) {
            struct pollfd p = {.fd = pfd[0], .events = POLLIN};
            rc = poll(&p, 1, (int)period_ms);
        } else if (strcmp(mode, "ppoll") == 0) {
            struct pollfd p = {.fd = pfd[0], .events = POLLIN};
            struct timespec ts = period_ts();
            rc = ppoll(&p, 1, &ts, NULL);
        } else if (strcmp(mode, "select") == 0) {
            fd_set r;
            FD_ZERO(&r);
            FD_SET(pfd[0], &r);
            struct timeval tv = {.tv_sec = 0, .tv_usec = period_ms * 1000};
            rc = select(pfd[0] + 1, &r, NULL, NULL, &tv);
        } else if (strcmp(mode, "pselect") == 0) {
            fd_set r;
            FD_ZERO(&r);
            FD_SET(pfd[0], &r);
            struct timespec ts = period_ts();
            rc = pselect(pfd[0] + 1, &r, NULL, NULL, &ts, NULL);
        } else if (strcmp(mode, "epoll") == 0) {
            struct epoll_event out;
            rc = epoll_wait(ep, &out, 1, (int)period_ms);
        } else if (strcmp(mode, "sem_timedwait") == 0) {
            struct timespec dl;
            clock_gettime(CLOCK_REALTIME, &dl);
            dl.tv_nsec += (period_ms % 1000) * 1000000L;
            dl.tv_sec += period_ms / 1000 + dl.tv_nsec / 1000000000L;
            dl.tv_nsec %= 1000000000L;
            rc = sem_timedwait(&sem, &dl);
        } else if (strcmp(mode, "sigtimedwait") == 0) {
            struct timespec ts = period_ts();
            siginfo_t info;
            rc = sigtimedwait(&winch, &info, &ts);
        } else if (strcmp(mode, "sigwaitinfo") == 0) {
            siginfo_t info;
            rc = sigwaitinfo(&winch, &info);
        } else if (strcmp(mode, "nanosleep") == 0) {
            struct timespec ts = period_ts(), rem;
            rc = nanosleep(&ts, &rem);
        } else if (strcmp(mode, "clock_nanosleep") == 0) {
            struct timespec ts = period_ts(), rem;
            rc = clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, &rem);
        } else {
            rc = usleep((useconds_t)(period_ms * 1000));
        }
        int e = errno;
        long long ms = mono_ms() - t0;
        if (strcmp(mode, "clock_nanosleep") == 0)
            eintr = rc == EINTR;
        else
            eintr = rc == -1 && e == EINTR;
        printf("iter %lu rc=%ld errno=%d ms=%lld%s\n", n, rc, e, ms, eintr ? " EINTR!" : "");
    }
}
