/* waiter: a parent blocked in waitpid(2) on a child that keeps working.
 *
 * usage: waiter [ticks, default 30] [period ms, default 100]
 *
 * The parent forks a child and blocks in waitpid(child) until it ends. The child starts only
 * once the parent has printed its ready line (a one-byte gate through a pipe, closed at once
 * on both sides), then prints `child tick N` every period for N = 1..ticks and exits 3.
 *
 * Output (stdout, line buffered; one write per line):
 *   ready pid=<getpid> child=<child pid>
 *   child tick <N> pid=<getpid in the child> ppid=<getppid in the child>
 *   parent got <waitpid result> status=<exit status>|sig=<signal>
 *   BAD <what> ...    a system call failed or returned early (EINTR): never expected
 * The parent exits 0 after its `parent got` line.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
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

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 3) {
        fprintf(stderr, "usage: %s [ticks] [period ms]\n", argv[0]);
        return 2;
    }
    long ticks = argc > 1 ? strtol(argv[1], NULL, 10) : 30;
    long period = argc > 2 ? strtol(argv[2], NULL, 10) : 100;
    if (ticks < 1 || period < 1) {
        fprintf(stderr, "waiter: ticks and period must be >= 1\n");
        return 2;
    }
    int gate[2];
    if (pipe(gate) != 0) {
        perror("waiter: pipe");
        return 1;
    }
    pid_t child = fork();
    if (child < 0) {
        perror("waiter: fork");
        return 1;
    }
    if (child == 0) {
        close(gate[1]);
        char c;
        while (read(gate[0], &c, 1) < 0 && errno == EINTR)
            ;
        close(gate[0]);
        for (long n = 1; n <= ticks; n++) {
            printf("child tick %ld pid=%d ppid=%d\n", n, (int)getpid(), (int)getppid());
            if (n < ticks)
                sleep_ms(period);
        }
        exit(3);
    }
    close(gate[0]);
    printf("ready pid=%d child=%d\n", (int)getpid(), (int)child);
    if (write(gate[1], "g", 1) != 1)
        printf("BAD gate write errno=%d\n", errno);
    close(gate[1]);

    int st = 0;
    pid_t r;
    while ((r = waitpid(child, &st, 0)) < 0 && errno == EINTR)
        printf("BAD waitpid EINTR\n");
    if (r < 0)
        printf("parent got %d errno=%d\n", (int)r, errno);
    else if (WIFEXITED(st))
        printf("parent got %d status=%d\n", (int)r, WEXITSTATUS(st));
    else if (WIFSIGNALED(st))
        printf("parent got %d sig=%d\n", (int)r, WTERMSIG(st));
    else
        printf("parent got %d raw=%#x\n", (int)r, st);
    return 0;
}
