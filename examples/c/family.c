/* family: a small process tree that exercises what a tree checkpoint must carry: a pipe between
 * two members with data in flight, an unreaped zombie, a file description shared by two
 * members (one offset), and waitpid on children.
 *
 * usage: family <log file> [ticks, default 45] [period ms, default 50]
 *
 * The parent opens <log file> O_WRONLY|O_CREAT|O_TRUNC (no O_APPEND: the members share one
 * offset through the inherited description), creates a pipe, and forks:
 *   - a child that exits at once with status 7 and stays unreaped (a zombie) until tick
 *     ticks-5; the parent waits for it to have exited (waitid WNOWAIT) before going on;
 *   - the consumer, which reads the pipe one byte at a time (so unread lines stay in the pipe)
 *     and handles each line N: prints `child got N ...`, appends `cN\n` to the log, and for
 *     N < 10 sleeps 300 ms, so that lines pile up in the pipe early on.
 * Then, every period, for N = 1..ticks, the parent appends `pN\n` to the log, writes `N\n` to
 * the pipe and prints `parent wrote N`. At N = ticks-5 it reaps the zombie; at N = ticks it
 * closes the pipe, waits for the consumer and exits 0. Every log entry is one write(2).
 *
 * Output (stdout, line buffered; one write per line, so lines of the members never mix):
 *   ready pid=<getpid> consumer=<consumer pid> zombie=<zombie pid>
 *   parent wrote <N>
 *   child got <N> ppid=<getppid in the consumer> ok|GAP      (GAP: N is not previous+1)
 *   reaped <waitpid result> status=<exit status>|sig=<signal>
 *   child eof last=<last N read>                              (the consumer, at EOF; exit 0)
 *   child done <waitpid result> status=<exit status>|sig=<signal>
 *   BAD <what> ...    a system call failed or returned early (EINTR): never expected
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void sleep_ms(long ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
        if (errno != EINTR) {
            printf("BAD nanosleep errno=%d\n", errno);
            return;
        }
        printf("BAD nanosleep EINTR pid=%d\n", (int)getpid());
    }
}

static void write_all(int fd, const char *buf, size_t len, const char *what)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            printf("BAD write %s errno=%d\n", what, errno);
            if (errno == EINTR)
                continue;
            exit(1);
        }
        buf += n;
        len -= (size_t)n;
    }
}

static void log_entry(int fd, char who, long n)
{
    char buf[32];
    int len = snprintf(buf, sizeof buf, "%c%ld\n", who, n);
    /* One write(2) per entry: the shared offset decides where it lands. */
    ssize_t w = write(fd, buf, (size_t)len);
    if (w != len)
        printf("BAD log write %c%ld rc=%zd errno=%d\n", who, n, w, errno);
}

static void describe(const char *what, pid_t r, int st)
{
    if (r < 0)
        printf("%s %d errno=%d\n", what, (int)r, errno);
    else if (WIFEXITED(st))
        printf("%s %d status=%d\n", what, (int)r, WEXITSTATUS(st));
    else if (WIFSIGNALED(st))
        printf("%s %d sig=%d\n", what, (int)r, WTERMSIG(st));
    else
        printf("%s %d raw=%#x\n", what, (int)r, st);
}

static pid_t wait_for(pid_t pid, int *st)
{
    for (;;) {
        pid_t r = waitpid(pid, st, 0);
        if (r < 0 && errno == EINTR) {
            printf("BAD waitpid EINTR pid=%d\n", (int)getpid());
            continue;
        }
        return r;
    }
}

static void consume(int rfd, int log)
{
    long prev = 0;
    char line[64];
    size_t len = 0;
    for (;;) {
        char c;
        ssize_t n = read(rfd, &c, 1);
        if (n < 0) {
            printf("BAD consumer read errno=%d\n", errno);
            if (errno == EINTR)
                continue;
            exit(1);
        }
        if (n == 0)
            break;
        if (c != '\n') {
            if (len < sizeof line - 1)
                line[len++] = c;
            continue;
        }
        line[len] = '\0';
        len = 0;
        long v = strtol(line, NULL, 10);
        printf("child got %ld ppid=%d %s\n", v, (int)getppid(), v == prev + 1 ? "ok" : "GAP");
        prev = v;
        log_entry(log, 'c', v);
        if (v < 10)
            sleep_ms(300);
    }
    if (len != 0)
        printf("BAD consumer partial line at eof len=%zu\n", len);
    printf("child eof last=%ld\n", prev);
    exit(0);
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2 || argc > 4) {
        fprintf(stderr, "usage: %s <log file> [ticks] [period ms]\n", argv[0]);
        return 2;
    }
    long ticks = argc > 2 ? strtol(argv[2], NULL, 10) : 45;
    long period = argc > 3 ? strtol(argv[3], NULL, 10) : 50;
    if (ticks < 6 || period < 1) {
        fprintf(stderr, "family: ticks must be >= 6 and period >= 1\n");
        return 2;
    }
    int log = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (log < 0) {
        perror("family: open log");
        return 1;
    }
    int p[2];
    if (pipe(p) != 0) {
        perror("family: pipe");
        return 1;
    }

    pid_t zombie = fork();
    if (zombie < 0) {
        perror("family: fork");
        return 1;
    }
    if (zombie == 0)
        _exit(7);

    pid_t consumer = fork();
    if (consumer < 0) {
        perror("family: fork");
        return 1;
    }
    if (consumer == 0) {
        close(p[1]);
        consume(p[0], log);
    }
    close(p[0]);

    /* The zombie must have exited (but stay unreaped) before anything else happens. */
    siginfo_t info;
    memset(&info, 0, sizeof info);
    while (waitid(P_PID, (id_t)zombie, &info, WEXITED | WNOWAIT) != 0) {
        if (errno != EINTR) {
            perror("family: waitid");
            return 1;
        }
    }

    printf("ready pid=%d consumer=%d zombie=%d\n", (int)getpid(), (int)consumer, (int)zombie);
    for (long n = 1; n <= ticks; n++) {
        log_entry(log, 'p', n);
        char buf[32];
        int len = snprintf(buf, sizeof buf, "%ld\n", n);
        write_all(p[1], buf, (size_t)len, "pipe");
        printf("parent wrote %ld\n", n);
        if (n == ticks - 5) {
            int st = 0;
            pid_t r = wait_for(zombie, &st);
            describe("reaped", r, st);
        }
        if (n < ticks)
            sleep_ms(period);
    }
    close(p[1]);
    int st = 0;
    pid_t r = wait_for(consumer, &st);
    describe("child done", r, st);
    return 0;
}
