/* pids: every way a program learns or uses its own process and thread ids, driven from stdin.
 *
 * usage: pids
 *
 * A helper thread (SIGUSR1 blocked, so process-directed SIGUSR1 always reaches main) answers
 * `threadid` requests. SIGUSR1's handler (installed on the first `selfkill` or `tgkill`)
 * counts its runs.
 *
 * Output (stdout, line buffered):
 *   ready pid=<getpid>
 *   ids pid=<getpid()> ppid=<getppid()> tid=<gettid()> sys_pid=<syscall(SYS_getpid)>
 *       sys_tid=<syscall(SYS_gettid)> pgrp=<getpgrp()> sid=<getsid(0)> pgid=<getpgid(0)>
 *                                        at start and on `ids`
 * then one command per stdin line:
 *   ids       -> the ids line again
 *   selfkill  -> selfkill got=<handler runs so far> rc=<kill rc> errno=<errno>
 *                (after kill(getpid(), SIGUSR1))
 *   tgkill    -> tgkill got=<handler runs so far> rc=<rc> errno=<errno>
 *                (after syscall(SYS_tgkill, getpid(), gettid(), SIGUSR1))
 *   count     -> count got=<handler runs so far>
 *   proc      -> proc ok=<1 if the Pid: line of /proc/<getpid()>/status was read>
 *                name=<its Name: line, - if none> pid=<its Pid: value> errno=<fopen's errno, 0 if it opened>
 *   threadid  -> threadid tid=<gettid() in the helper thread> sys=<syscall(SYS_gettid) there>
 *   quit      -> bye, exit 0
 *   other     -> unknown <command>
 * EOF on stdin -> exit 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static volatile sig_atomic_t got;

static void on_usr1(int sig)
{
    (void)sig;
    got++;
}

static void install_handler(void)
{
    static int installed;
    if (installed)
        return;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL) != 0) {
        perror("pids: sigaction");
        exit(1);
    }
    installed = 1;
}

static void print_ids(void)
{
    printf("ids pid=%d ppid=%d tid=%d sys_pid=%ld sys_tid=%ld pgrp=%d sid=%d pgid=%d\n", (int)getpid(),
           (int)getppid(), (int)gettid(), (long)syscall(SYS_getpid), (long)syscall(SYS_gettid), (int)getpgrp(),
           (int)getsid(0), (int)getpgid(0));
}

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int requests, answers;

static void *helper(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&mu);
    for (;;) {
        while (requests == answers)
            pthread_cond_wait(&cv, &mu);
        printf("threadid tid=%d sys=%ld\n", (int)gettid(), (long)syscall(SYS_gettid));
        answers++;
        pthread_cond_broadcast(&cv);
    }
    return NULL;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    /* The helper inherits SIGUSR1 blocked; main unblocks it again. */
    pthread_sigmask(SIG_BLOCK, &usr1, NULL);
    pthread_t th;
    if (pthread_create(&th, NULL, helper, NULL) != 0) {
        fprintf(stderr, "pids: pthread_create failed\n");
        return 1;
    }
    pthread_sigmask(SIG_UNBLOCK, &usr1, NULL);

    printf("ready pid=%d\n", (int)getpid());
    print_ids();
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\r\n")] = 0;
        if (strcmp(line, "ids") == 0) {
            print_ids();
        } else if (strcmp(line, "selfkill") == 0) {
            install_handler();
            errno = 0;
            int rc = kill(getpid(), SIGUSR1);
            int e = errno;
            printf("selfkill got=%d rc=%d errno=%d\n", (int)got, rc, e);
        } else if (strcmp(line, "tgkill") == 0) {
            install_handler();
            errno = 0;
            long rc = syscall(SYS_tgkill, (long)getpid(), (long)gettid(), (long)SIGUSR1);
            int e = errno;
            printf("tgkill got=%d rc=%ld errno=%d\n", (int)got, rc, e);
        } else if (strcmp(line, "count") == 0) {
            printf("count got=%d\n", (int)got);
        } else if (strcmp(line, "proc") == 0) {
            char path[64];
            snprintf(path, sizeof path, "/proc/%d/status", (int)getpid());
            errno = 0;
            FILE *f = fopen(path, "r");
            int e = errno, ok = 0;
            long pid = -1;
            char name[64] = "-";
            if (f) {
                char buf[256];
                while (fgets(buf, sizeof buf, f)) {
                    if (sscanf(buf, "Name: %63s", name) == 1)
                        continue;
                    if (sscanf(buf, "Pid: %ld", &pid) == 1) {
                        ok = 1;
                        break;
                    }
                }
                fclose(f);
            }
            printf("proc ok=%d name=%s pid=%ld errno=%d\n", ok, name, pid, f ? 0 : e);
        } else if (strcmp(line, "threadid") == 0) {
            pthread_mutex_lock(&mu);
            int want = ++requests;
            pthread_cond_broadcast(&cv);
            while (answers < want)
                pthread_cond_wait(&cv, &mu);
            pthread_mutex_unlock(&mu);
        } else if (strcmp(line, "quit") == 0) {
            printf("bye\n");
            return 0;
        } else {
            printf("unknown %s\n", line);
        }
    }
    return 0;
}
