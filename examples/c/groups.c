/* groups: a process tree with several sessions and process groups.
 *
 * usage: groups [rounds, default 300] [period ms, default 200]
 *
 * The parent P forks child A, which calls setsid() (a daemon-like session leader), and child
 * B, which calls setpgid(0, 0) (its own process group, in P's session; P calls setpgid(B, B)
 * too, as shells do). B forks a grandchild C, which stays in B's group. Every process prints
 * its ids once it is in place, then again every period, `rounds` times; then it reaps its
 * children (if any) and exits 0.
 *
 * Output (stdout, line buffered; one write per line):
 *   ready pid=<getpid of P>                                      (first, before any fork)
 *   ids name=<P|A|B|C> pid=<getpid> ppid=<getppid> pgid=<getpgid(0)> sid=<getsid(0)>
 *   ids2 name=<P|A|B|C> pid=... ppid=... pgid=... sid=...  round=<n>   (every period)
 *   BAD <what> ...    a system call failed or returned early (EINTR): never expected
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long rounds = 300;
static long period = 200;

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

static void print_ids(const char *tag, const char *name, long round)
{
    if (round > 0)
        printf("%s name=%s pid=%d ppid=%d pgid=%d sid=%d round=%ld\n", tag, name, (int)getpid(), (int)getppid(),
               (int)getpgid(0), (int)getsid(0), round);
    else
        printf("%s name=%s pid=%d ppid=%d pgid=%d sid=%d\n", tag, name, (int)getpid(), (int)getppid(),
               (int)getpgid(0), (int)getsid(0));
}

/* Prints the ids, then re-prints them every period; reaps children; exits. */
static void live(const char *name)
{
    print_ids("ids", name, 0);
    for (long n = 1; n <= rounds; n++) {
        sleep_ms(period);
        print_ids("ids2", name, n);
    }
    while (wait(NULL) > 0 || errno == EINTR)
        ;
    exit(0);
}

static pid_t spawn(void)
{
    pid_t pid = fork();
    if (pid < 0) {
        perror("groups: fork");
        exit(1);
    }
    return pid;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 3) {
        fprintf(stderr, "usage: %s [rounds] [period ms]\n", argv[0]);
        return 2;
    }
    if (argc > 1)
        rounds = strtol(argv[1], NULL, 10);
    if (argc > 2)
        period = strtol(argv[2], NULL, 10);
    if (rounds < 1 || period < 1) {
        fprintf(stderr, "groups: rounds and period must be >= 1\n");
        return 2;
    }
    printf("ready pid=%d\n", (int)getpid());

    pid_t a = spawn();
    if (a == 0) {
        if (setsid() < 0)
            printf("BAD setsid errno=%d\n", errno);
        live("A");
    }

    pid_t b = spawn();
    if (b == 0) {
        if (setpgid(0, 0) != 0)
            printf("BAD setpgid B errno=%d\n", errno);
        pid_t c = spawn();
        if (c == 0)
            live("C");
        live("B");
    }
    /* The same placement from the parent's side; EACCES once B has exec'd cannot happen
     * (B never execs), ESRCH cannot either (B is unreaped). */
    if (setpgid(b, b) != 0)
        printf("BAD setpgid(B) from P errno=%d\n", errno);
    live("P");
}
